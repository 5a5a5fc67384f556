//! Which objects of a dated folder failed or interrupted uploads left, whatever the
//! target: [`classify`] takes the folder's listing and a way to read its manifests, so
//! that every target's [`crate::MaintainSession::leftovers`] judges alike.

use std::collections::HashSet;

use ferry_core::manifest::Manifest;

use crate::{Leftover, LeftoverKind};

/// One object of a dated folder, as listed.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its name in the folder.
    pub name: String,
    /// Size, bytes.
    pub size: u64,
    /// Last modified, seconds since the Unix epoch; `None` if the target does not say.
    pub mtime: Option<u64>,
}

/// The leftovers among `files`, the objects of the dated folder `dir` (`environment`,
/// `date`): partial uploads (hidden `.…​.partial` names), and data objects under a final
/// name that no committed backup includes (no manifest beside them, or a companion part
/// whose main part's manifest was never written). `read_manifest` reads and parses a
/// manifest by its full path (`None` if it does not read). Manifests that do not read are
/// left out of the decision: a folder holding one reports no orphan companions. `now` is
/// seconds since the Unix epoch.
pub fn classify(
    environment: &str,
    date: &str,
    dir: &str,
    files: &[Entry],
    now: u64,
    mut read_manifest: impl FnMut(&str) -> Option<Manifest>,
) -> Vec<Leftover> {
    let names: HashSet<&str> = files.iter().map(|e| e.name.as_str()).collect();
    // What the committed main parts include, from their manifests.
    let mut included = HashSet::new();
    let mut companions_with_manifest = HashSet::new();
    let mut unreadable = false;
    for e in files {
        let Some(data) = e.name.strip_suffix(".json") else {
            continue;
        };
        if e.name.starts_with('.') || !data.ends_with(".age") {
            continue;
        }
        match read_manifest(&format!("{dir}/{}", e.name)) {
            Some(m) if m.file == data && m.part.is_empty() => {
                included.insert(data.to_owned());
                included.extend(m.companions);
            }
            Some(m) if m.file == data => {
                companions_with_manifest.insert(data.to_owned());
            }
            _ => unreadable = true,
        }
    }
    let mut out = Vec::new();
    for e in files {
        let name = e.name.as_str();
        let path = format!("{dir}/{name}");
        let leftover = |kind, manifest| Leftover {
            environment: environment.to_owned(),
            date: date.to_owned(),
            path: path.clone(),
            size: e.size,
            idle_seconds: now.saturating_sub(e.mtime.unwrap_or(now)),
            kind,
            manifest,
        };
        if name.starts_with('.') {
            if let Some(stem) = name.strip_suffix(".partial") {
                out.push(leftover(
                    LeftoverKind::Partial {
                        job_ids: job_ids_in(stem),
                    },
                    None,
                ));
            }
            continue;
        }
        if !name.ends_with(".age") || included.contains(name) {
            continue;
        }
        let manifest = format!("{name}.json");
        if !names.contains(manifest.as_str()) {
            out.push(leftover(LeftoverKind::Orphan, None));
        } else if companions_with_manifest.contains(name) && !unreadable {
            out.push(leftover(
                LeftoverKind::Orphan,
                Some(format!("{dir}/{manifest}")),
            ));
        }
    }
    out
}

/// Whether `path` is a file directly in the dated folder `dir` (not the folder itself,
/// not below it): what a removal of a leftover accepts.
pub fn in_folder(dir: &str, path: &str) -> bool {
    path.strip_prefix(dir)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|n| !n.is_empty() && !n.contains('/') && n != "." && n != "..")
}

/// Whether `leftover` names files of a dated folder of the layout under `root` only:
/// its environment and date valid, its path (and manifest) in that folder.
pub fn removable(root: &str, leftover: &Leftover) -> bool {
    let dir = format!("{root}/{}/{}", leftover.environment, leftover.date);
    ferry_core::layout::validate_name("environment", &leftover.environment).is_ok()
        && ferry_core::layout::parse_date(&leftover.date).is_ok()
        && in_folder(&dir, &leftover.path)
        && leftover
            .manifest
            .as_deref()
            .is_none_or(|m| in_folder(&dir, m))
}

/// The job ids in a partial file's name without its `.partial` (its components that are
/// ULIDs), e.g. `01JD...` in `.x.age.01JD....18f3a.partial`.
pub fn job_ids_in(stem: &str) -> Vec<String> {
    stem.split('.')
        .filter(|c| {
            c.len() == 26
                && c.bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
                && c.as_bytes()[0] <= b'7'
        })
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::manifest::Manifest;

    /// A manifest of `file`, part `part`, listing `companions`.
    fn manifest(file: &str, part: &str, companions: &[&str]) -> Manifest {
        let seed = include_bytes!("../../fuzz/corpus/manifest/seed-main");
        let mut m = Manifest::from_slice("seed.json", seed).expect("the seed parses");
        m.file = file.into();
        m.part = part.into();
        m.companions = companions.iter().map(|c| (*c).to_owned()).collect();
        m
    }

    #[test]
    fn orphans_and_partials_are_told_from_committed_backups_of_any_target() {
        let dir = "/r/production/2026-02-05";
        let main = "pg_backup_2026-02-05.pgdump.zst.age";
        let globals = "pg-globals_backup_2026-02-05.sql.zst.age";
        let cut = "pg_backup_2026-02-05T0300Z.pgdump.zst.age";
        let lone_globals = "pg-globals_backup_2026-02-05T0400Z.sql.zst.age";
        let partial =
            ".pg_backup_2026-02-05T0500Z.pgdump.zst.age.01KBX8Z3E5M1Q2W3E4R5T6Y7U8.18f3a.partial";
        let names = [
            main.to_owned(),
            format!("{main}.json"),
            globals.to_owned(),
            format!("{globals}.json"),
            cut.to_owned(),
            lone_globals.to_owned(),
            format!("{lone_globals}.json"),
            partial.to_owned(),
            "notes.txt".to_owned(),
        ];
        let files: Vec<Entry> = names
            .iter()
            .map(|n| Entry {
                name: n.clone(),
                size: 7,
                mtime: Some(1_000),
            })
            .collect();
        let out = classify("production", "2026-02-05", dir, &files, 1_100, |path| {
            let name = path.rsplit('/').next()?.strip_suffix(".json")?;
            Some(if name == main {
                manifest(main, "", &[globals])
            } else {
                manifest(name, "globals", &[])
            })
        });
        let got: Vec<(&str, &LeftoverKind, Option<&str>, u64)> = out
            .iter()
            .map(|l| {
                (
                    l.path.rsplit('/').next().unwrap(),
                    &l.kind,
                    l.manifest.as_deref(),
                    l.idle_seconds,
                )
            })
            .collect();
        let lone_manifest = format!("{dir}/{lone_globals}.json");
        assert_eq!(
            got,
            [
                (cut, &LeftoverKind::Orphan, None, 100),
                (
                    lone_globals,
                    &LeftoverKind::Orphan,
                    Some(lone_manifest.as_str()),
                    100
                ),
                (
                    partial,
                    &LeftoverKind::Partial {
                        job_ids: vec!["01KBX8Z3E5M1Q2W3E4R5T6Y7U8".into()]
                    },
                    None,
                    100
                ),
            ]
        );
        assert!(removable("/r", &out[1]) && !removable("/other", &out[1]));
    }

    #[test]
    fn job_ids_are_the_ulids_in_a_partial_name() {
        let job = "01KBX8Z3E5M1Q2W3E4R5T6Y7U8";
        assert_eq!(
            job_ids_in(&format!(
                ".postgres_backup_2026-02-05.pgdump.zst.age.{job}.18f3a9c"
            )),
            [job]
        );
        assert_eq!(job_ids_in(&format!(".x.age.json.{job}.18f3a9c")), [job]);
        assert!(job_ids_in(".postgres_backup_x.pgdump.zst.age.01JOB.1").is_empty());
    }
}
