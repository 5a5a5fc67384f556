//! Where the newest archived WAL segment of a datastore is, for a staging agent checking
//! that a restore to a point in time is covered and for the coordinator's
//! `ferry_archive_lag_seconds`: both read the layout of [`ferry_core::wal`].

use ferry_core::wal::{WalFileKind, WalFileName};

use crate::{ReadSession, TargetError};

/// The datastores whose WAL is archived in the environment folder `env_dir`: each
/// `<datastore>-wal` folder there whose name is a datastore name of the layout, sorted.
///
/// # Errors
/// The target's.
pub fn archived_datastores(
    session: &mut dyn ReadSession,
    env_dir: &str,
) -> Result<Vec<String>, TargetError> {
    datastores_with_folder(session, env_dir, "-wal")
}

/// The datastores that have a `<datastore><suffix>` folder in the environment folder
/// `env_dir` (`-wal`, `-oplog`), sorted.
///
/// # Errors
/// The target's.
pub fn datastores_with_folder(
    session: &mut dyn ReadSession,
    env_dir: &str,
    suffix: &str,
) -> Result<Vec<String>, TargetError> {
    let mut names: Vec<String> = session
        .list(env_dir)?
        .iter()
        .filter_map(|n| n.strip_suffix(suffix))
        .filter(|d| ferry_core::layout::validate_name("datastore", d).is_ok())
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

/// The record (`.zst.age.json`) of the newest WAL segment under `wal_dir`
/// (`<environment dir>/<datastore>-wal`): the greatest segment name whose stored file and
/// record both exist, in the greatest timeline folder (8 hex digits) that has one. History,
/// backup history and `.partial` files are passed over. `(record path, record bytes)`, or
/// `None` when no segment is archived (or the folder does not exist). Records are read up
/// to `max_record_bytes`.
///
/// # Errors
/// The target's.
pub fn newest_segment_record(
    session: &mut dyn ReadSession,
    wal_dir: &str,
    max_record_bytes: u64,
) -> Result<Option<(String, Vec<u8>)>, TargetError> {
    let mut timelines = session.list(wal_dir)?;
    timelines.retain(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()));
    timelines.sort();
    for timeline in timelines.iter().rev() {
        let dir = format!("{wal_dir}/{timeline}");
        let entries = session.list(&dir)?;
        let newest = entries
            .iter()
            .filter_map(|e| e.strip_suffix(".zst.age.json"))
            .filter(|n| {
                WalFileName::parse(n).is_ok_and(|w| w.kind == WalFileKind::Segment)
                    && entries
                        .iter()
                        .any(|e| e.strip_suffix(".zst.age") == Some(*n))
            })
            .max();
        if let Some(name) = newest {
            let path = format!("{dir}/{name}.zst.age.json");
            let bytes = session.read_small(&path, max_record_bytes)?;
            return Ok(Some((path, bytes)));
        }
    }
    Ok(None)
}

/// The data file and the record of `file` of `datastore` in `environment` under `root`:
/// `(<dir>/<file>.zst.age, <dir>/<file>.zst.age.json)`, or `None` for an environment or
/// datastore name that is not one of the layout.
pub fn wal_file_paths(
    root: &str,
    environment: &str,
    datastore: &str,
    file: &WalFileName,
) -> Option<(String, String)> {
    if ferry_core::layout::validate_name("environment", environment).is_err()
        || ferry_core::layout::validate_name("datastore", datastore).is_err()
    {
        return None;
    }
    let env_dir = ferry_core::layout::environment_dir(root, environment);
    let data = format!(
        "{}/{}",
        ferry_core::wal::timeline_dir(&env_dir, datastore, file),
        file.stored_name()
    );
    let record = format!("{data}.json");
    Some((data, record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;
    use crate::memory::MemoryTarget;

    #[test]
    fn the_newest_segment_of_the_newest_timeline_with_one_is_found() {
        let target = MemoryTarget::new("/memory");
        let root = "/memory/production/pg-wal";
        for (file, with_record) in [
            ("00000001/000000010000000000000003.zst.age", true),
            ("00000001/000000010000000000000004.zst.age", true),
            // A data file whose record is not there yet: not archived.
            ("00000001/000000010000000000000005.zst.age", false),
            // Timeline 2 has only its history file so far.
            ("00000002/00000002.history.zst.age", true),
        ] {
            target.insert(&format!("{root}/{file}"), b"data");
            if with_record {
                target.insert(&format!("{root}/{file}.json"), file.as_bytes());
            }
        }
        let mut session = target.read().unwrap();
        let (path, bytes) = newest_segment_record(&mut *session, root, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(
            path,
            "/memory/production/pg-wal/00000001/000000010000000000000004.zst.age.json"
        );
        assert_eq!(bytes, b"00000001/000000010000000000000004.zst.age");
        assert!(
            newest_segment_record(&mut *session, "/memory/production/none-wal", 1024)
                .unwrap()
                .is_none()
        );
    }
}
