//! Where the newest oplog slice of a MongoDB datastore is, for the coordinator's
//! `ferry_archive_lag_seconds`: reads the layout of [`ferry_core::oplog`].

use ferry_core::oplog::is_slice_name;

use crate::{ReadSession, TargetError};

/// The datastores whose oplog is archived in the environment folder `env_dir`: each
/// `<datastore>-oplog` folder there, sorted.
///
/// # Errors
/// The target's.
pub fn archived_datastores(
    session: &mut dyn ReadSession,
    env_dir: &str,
) -> Result<Vec<String>, TargetError> {
    crate::wal::datastores_with_folder(session, env_dir, "-oplog")
}

/// The record (`.bson.zst.age.json`) of the newest slice under `oplog_dir`
/// (`<environment dir>/<datastore>-oplog`): the greatest slice name whose stored file and
/// record both exist. `(record path, record bytes)`, or `None` when there is none (or the
/// folder does not exist). Records are read up to `max_record_bytes`.
///
/// # Errors
/// The target's.
pub fn newest_slice_record(
    session: &mut dyn ReadSession,
    oplog_dir: &str,
    max_record_bytes: u64,
) -> Result<Option<(String, Vec<u8>)>, TargetError> {
    let entries = session.list(oplog_dir)?;
    let newest = entries
        .iter()
        .filter(|n| is_slice_name(n))
        .filter(|n| entries.iter().any(|e| *e == format!("{n}.json")))
        .max();
    match newest {
        Some(name) => {
            let path = format!("{oplog_dir}/{name}.json");
            let bytes = session.read_small(&path, max_record_bytes)?;
            Ok(Some((path, bytes)))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Target;
    use crate::memory::MemoryTarget;

    #[test]
    fn the_newest_slice_with_its_record_is_found() {
        let target = MemoryTarget::new("/memory");
        let dir = "/memory/production/mongo-oplog";
        for (name, with_record) in [
            (
                "20261205T100000.000Z-20261205T100100.000Z.bson.zst.age",
                true,
            ),
            (
                "20261205T100100.000Z-20261205T100200.000Z.bson.zst.age",
                true,
            ),
            // Written, its record not yet: not archived.
            (
                "20261205T100200.000Z-20261205T100300.000Z.bson.zst.age",
                false,
            ),
        ] {
            target.insert(&format!("{dir}/{name}"), b"data");
            if with_record {
                target.insert(&format!("{dir}/{name}.json"), name.as_bytes());
            }
        }
        target.insert("/memory/production/pg-wal/00000001/x.zst.age", b"x");
        let mut session = target.read().unwrap();
        assert_eq!(
            archived_datastores(&mut *session, "/memory/production").unwrap(),
            ["mongo"]
        );
        let (path, bytes) = newest_slice_record(&mut *session, dir, 1024)
            .unwrap()
            .unwrap();
        assert_eq!(
            path,
            format!("{dir}/20261205T100100.000Z-20261205T100200.000Z.bson.zst.age.json")
        );
        assert_eq!(
            bytes,
            b"20261205T100100.000Z-20261205T100200.000Z.bson.zst.age"
        );
        assert!(
            newest_slice_record(&mut *session, "/memory/production/none-oplog", 1024)
                .unwrap()
                .is_none()
        );
    }
}
