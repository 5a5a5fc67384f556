//! Helpers shared by Ferry's fuzz targets (`fuzz_targets/`):
//!
//! - [`Counting`]: a global allocator that records the largest single allocation, so a
//!   target can assert that a reader never reserves what an untrusted length field claims.
//! - [`agents`]: a production and a staging agent's runtime [`Settings`], built from a small
//!   `agent.toml` the way `ferry-agent` builds them, with their key files in a temp dir.
//! - [`is_calendar_date`] and [`is_single_component`]: the properties the layout promises.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferry_agent::config::{AgentConfig, Settings};

/// The system allocator, recording the largest allocation (or reallocation) made since
/// [`Counting::reset`], bytes.
pub struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    /// Forgets the largest allocation seen so far.
    pub fn reset() {
        LARGEST.store(0, Ordering::Relaxed);
    }

    /// The largest allocation since the last [`Counting::reset`], bytes.
    pub fn largest() -> usize {
        LARGEST.load(Ordering::Relaxed)
    }
}

// SAFETY: every call is forwarded unchanged to `System`; only a counter is updated.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The two agents of [`agents`], and the directory holding their key files.
pub struct Agents {
    /// Its parsed (not yet built) config, to add datastores to.
    pub production_config: AgentConfig,
    /// Role `production`: datastores `www` (files) and `pg-main` (pgBackRest).
    pub production: Settings,
    /// Its parsed (not yet built) config.
    pub staging_config: AgentConfig,
    /// Role `staging`, restoring from `production`: the same two datastores.
    pub staging: Settings,
    /// Where `agent.toml`'s files are; kept for the life of the process.
    pub dir: tempfile::TempDir,
}

impl Agents {
    /// Where a config's relative names point (for [`AgentConfig::build`]'s messages).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }
}

fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write a key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// A production and a staging agent, built once per process from `agent.toml` text as
/// `ferry-agent` builds them (`AgentConfig::parse` then `build`), with an age key pair,
/// an SSH key file and a pgBackRest passphrase in a temp dir.
///
/// # Panics
/// If the temp dir cannot be written or the config is refused: a broken harness.
pub fn agents() -> &'static Agents {
    static AGENTS: OnceLock<Agents> = OnceLock::new();
    AGENTS.get_or_init(|| {
        use age::secrecy::ExposeSecret;
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let identity = age::x25519::Identity::generate();
        write_secret(
            &d.join("staging.key"),
            &format!("{}\n", identity.to_string().expose_secret()),
        );
        write_secret(&d.join("ssh_key"), "not read before connecting\n");
        write_secret(&d.join("agent.key"), "not parsed before serving\n");
        write_secret(&d.join("cipher_pass"), "a-passphrase-of-32-characters-xx\n");
        let common = |id: &str, role: &str, environment: &str| {
            format!(
                r#"id = "{id}"
role = "{role}"
environment = "{environment}"
listen = "127.0.0.1:7443"
[tls]
cert = "{d}/agent.crt"
key = "{d}/agent.key"
ca = "{d}/ca.crt"
[backup_server]
host = "backup.example"
user = "ferrybk"
private_key_file = "{d}/ssh_key"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
root = "/srv/ferry"
"#,
                d = d.display()
            )
        };
        let pgbackrest = |extra: &str| {
            format!(
                r#"[[datastores]]
name = "pg-main"
kind = "pgbackrest"
data_dir = "/var/lib/postgresql/15/main"
repo_dir = "/var/lib/ferry/pgbackrest"
config_file = "/etc/pgbackrest.conf"
cipher_pass_file = "{d}/cipher_pass"
{extra}
"#,
                d = d.display()
            )
        };
        let production = format!(
            "{}[encryption]\nrecipients = [\"{}\"]\n[[datastores]]\nname = \"www\"\nkind = \"files\"\npath = \"/srv/www\"\n{}",
            common("fuzz-prod", "production", "production"),
            identity.to_public(),
            pgbackrest("")
        );
        let staging = format!(
            "{}[encryption]\nidentity_file = \"{}/staging.key\"\n[restore]\nsource_environment = \"production\"\n[[datastores]]\nname = \"www\"\nkind = \"files\"\npath = \"/srv/www\"\n{}",
            common("fuzz-stage", "staging", "staging"),
            d.display(),
            pgbackrest("stop_command = [\"true\"]\nstart_command = [\"true\"]")
        );
        let path = d.join("agent.toml");
        let parse = |text: &str| AgentConfig::parse(&path, text).expect("fuzz agent.toml parses");
        let (production_config, staging_config) = (parse(&production), parse(&staging));
        Agents {
            production: production_config
                .clone()
                .build(&path)
                .expect("production config builds"),
            production_config,
            staging: staging_config
                .clone()
                .build(&path)
                .expect("staging config builds"),
            staging_config,
            dir,
        }
    })
}

/// Whether `date` is exactly `YYYY-MM-DD` (ASCII digits and two dashes, 10 bytes) and a
/// real calendar date that formats back to the same text.
pub fn is_calendar_date(date: &str) -> bool {
    let b = date.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
        && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
            .is_ok_and(|d| d.format("%Y-%m-%d").to_string() == date)
}

/// Whether `name`, joined to a directory, names an entry of that very directory: one
/// normal path component (no `/`, not `.` or `..`, no NUL).
pub fn is_single_component(name: &str) -> bool {
    let dir = Path::new("/srv/ferry/production/2026-01-01");
    let joined = dir.join(name);
    !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
        && joined.parent() == Some(dir)
        && matches!(
            Path::new(name).components().collect::<Vec<_>>().as_slice(),
            [Component::Normal(_)]
        )
}
