//! What README tells a new operator, done literally: every `toml` example in README.md is a
//! config that Ferry accepts, and `ferry-agent check` on a staging agent checks what its
//! restores need (the source environment's folder), not its own environment's.
//!
//! README marks each `toml` block with the check it gets, on the line above it:
//! - `<!-- readme-check: agent -->`: a whole `agent.toml`, built by
//!   `ferry-agent check --offline`;
//! - `<!-- readme-check: datastores production -->` (or `staging`): `[[datastores]]`
//!   entries, checked in place of the datastores of README's first agent example of that
//!   role;
//! - `<!-- readme-check: coordinator -->`: a whole `coordinator.toml`, built by
//!   `ferry-coordinator check`;
//! - `<!-- readme-check: coordinator-fragment -->`: tables appended to README's
//!   coordinator example.
//!
//! A `toml` block without a mark fails the test, so no example escapes the check. The
//! examples' placeholders are made real first: every `/etc/ferry/NAME` file exists (the
//! fleet's certificates from `ferry-coordinator pki`, the identity from `ferry-agent
//! keygen`, SSH keys from `ssh-keygen`, secret files 0600), `age1...` is that identity's
//! recipient and `ssh-ed25519 AAAA...` a real host key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::deployment::{Deployment, DeploymentOptions};
use ferry_tests::fleet::{Fleet, age_keygen};
use ferry_tests::process::{bin, hermetic, run_ok, workspace_root};

/// One marked `toml` block of README: its mark, its text and its first line (1-based).
struct Example {
    mark: String,
    text: String,
    line: usize,
}

/// Every ```` ```toml ```` block of README with the mark above it; panics on one without.
fn readme_examples() -> Vec<Example> {
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut examples = Vec::new();
    let mut unmarked = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == "```toml" {
            let mark = i
                .checked_sub(1)
                .and_then(|p| lines[p].trim().strip_prefix("<!-- readme-check:"))
                .and_then(|m| m.strip_suffix("-->"))
                .map(|m| m.trim().to_owned());
            let start = i + 1;
            let end = (start..lines.len())
                .find(|&j| lines[j].trim_end() == "```")
                .unwrap_or_else(|| panic!("README.md:{start}: a toml block never closed"));
            match mark {
                Some(mark) => examples.push(Example {
                    mark,
                    text: lines[start..end].join("\n") + "\n",
                    line: start + 1,
                }),
                None => unmarked.push(start),
            }
            i = end;
        }
        i += 1;
    }
    assert!(
        unmarked.is_empty(),
        "README.md has toml blocks with no `<!-- readme-check: ... -->` line above them (at \
         lines {unmarked:?}): mark each with the check it gets (see tests/readme_e2e.rs)"
    );
    examples
}

/// The files README's examples name under `/etc/ferry/`, made real in `dir`, and the
/// substitutions that point the examples at them.
struct Fixture {
    etc: PathBuf,
    recipient: String,
    host_key: String,
}

impl Fixture {
    fn new(dir: &Path) -> Fixture {
        let fleet = Fleet::new(dir);
        for name in ["coordinator", "pg-prod", "pg-stage", "alice"] {
            fleet.issue(name);
        }
        let etc = fleet.pki.clone();
        let recipient = age_keygen(&etc.join("staging.key"));
        for key in [
            "id_ed25519",
            "id_rsync",
            "maintenance_ed25519",
            "host_ed25519",
        ] {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(etc.join(key)),
            );
        }
        let host_key: String = fs::read_to_string(etc.join("host_ed25519.pub"))
            .unwrap()
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        for secret in [
            "pgbackrest.pass",
            "pg.pass",
            "mongo.pass",
            "etcd.pass",
            "influx.pass",
            "s3-access-key",
            "s3-secret-key",
            "copy-access-key",
            "copy-secret-key",
        ] {
            let path = etc.join(secret);
            fs::write(&path, "correct horse battery staple\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        Fixture {
            etc,
            recipient,
            host_key,
        }
    }

    /// `text` with its placeholders made real (see the module docs).
    fn real(&self, text: &str) -> String {
        text.replace("\"/etc/ferry/", &format!("\"{}/", self.etc.display()))
            .replace(
                "\"/var/lib/ferry/",
                &format!("\"{}/var-lib-ferry/", self.etc.display()),
            )
            .replace("\"age1...\"", &format!("{:?}", self.recipient))
            .replace("\"ssh-ed25519 AAAA...\"", &format!("{:?}", self.host_key))
    }
}

/// `base` with its `[[datastores]]` entries replaced by `datastores`.
fn with_datastores(base: &str, datastores: &str) -> String {
    let cut = base.find("[[datastores]]").unwrap_or(base.len());
    format!("{}\n{datastores}", &base[..cut])
}

/// Runs `program args... --config FILE` on `config` written to `dir/name`; panics with its
/// output and the config if it fails.
fn check(dir: &Path, name: &str, config: &str, program: &str, args: &[&str], what: &str) {
    let path = dir.join(name);
    fs::write(&path, config).unwrap();
    let out = hermetic(&mut Command::new(bin(program)))
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} is refused by `{program} {}`:\nstdout: {}\nstderr: {}\nconfig as checked:\n{config}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_toml_example_in_readme_is_a_config_ferry_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let examples = readme_examples();
    let agents: Vec<&Example> = examples.iter().filter(|e| e.mark == "agent").collect();
    let first_agent = |role: &str| {
        agents
            .iter()
            .find(|e| e.text.contains(&format!("role = \"{role}\"")))
            .unwrap_or_else(|| panic!("README.md has no {role} agent.toml example"))
    };
    let coordinator = examples
        .iter()
        .find(|e| e.mark == "coordinator")
        .expect("README.md has no coordinator.toml example");
    let agent_check = ["check", "--offline"];
    let mut checked = 0;
    for (i, e) in examples.iter().enumerate() {
        let what = format!("README.md's example at line {} ({})", e.line, e.mark);
        let name = format!("example-{i}.toml");
        let real = fixture.real(&e.text);
        match e.mark.split_whitespace().collect::<Vec<_>>()[..] {
            ["agent"] => check(dir.path(), &name, &real, "ferry-agent", &agent_check, &what),
            ["datastores", role @ ("production" | "staging")] => {
                let base = fixture.real(&first_agent(role).text);
                let config = with_datastores(&base, &real);
                check(
                    dir.path(),
                    &name,
                    &config,
                    "ferry-agent",
                    &agent_check,
                    &what,
                );
            }
            ["coordinator"] => check(
                dir.path(),
                &name,
                &real,
                "ferry-coordinator",
                &["check"],
                &what,
            ),
            ["coordinator-fragment"] => {
                let config = format!("{}\n{real}", fixture.real(&coordinator.text));
                check(
                    dir.path(),
                    &name,
                    &config,
                    "ferry-coordinator",
                    &["check"],
                    &what,
                );
            }
            _ => panic!("{what}: unknown mark {:?}", e.mark),
        }
        checked += 1;
    }
    // The two agent roles, the coordinator and the datastores of every kind at least.
    assert!(checked >= 10, "only {checked} examples found in README.md");
}

#[test]
fn a_broken_example_would_be_caught() {
    // The check itself can fail: README's production agent with a typo in a key is refused.
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new(dir.path());
    let examples = readme_examples();
    let agent = examples
        .iter()
        .find(|e| e.mark == "agent")
        .expect("an agent example");
    let broken = fixture
        .real(&agent.text)
        .replacen("listen =", "listen_on =", 1);
    let path = dir.path().join("broken.toml");
    fs::write(&path, broken).unwrap();
    let out = hermetic(&mut Command::new(bin("ferry-agent")))
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("listen_on"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn staging_check_reads_the_source_environments_folder_not_its_own() {
    let d = Deployment::start_with_options(DeploymentOptions {
        start_agents: false,
        start_coordinator: false,
        ..DeploymentOptions::default()
    });
    let source = d.sshd.root().join("production");
    let run_check = || {
        hermetic(&mut Command::new(bin("ferry-agent")))
            .args(["check", "--config"])
            .arg(&d.stage_config)
            .output()
            .unwrap()
    };

    // A source folder the staging key may read: the check lists it.
    fs::create_dir_all(&source).unwrap();
    fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_check();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("/production holds") && stdout.contains("restores read from it"),
        "{stdout}"
    );

    // One it may not read: restores would fail, so the check fails, naming the folder.
    fs::set_permissions(&source, fs::Permissions::from_mode(0o000)).unwrap();
    let out = run_check();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    fs::set_permissions(&source, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("backup server: FAILED") && stdout.contains("/production"),
        "{stdout}"
    );
}
