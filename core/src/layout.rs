//! The backup server layout of DESIGN.md, and the validation that keeps names inside it:
//!
//! ```text
//! <root>/<environment>/<YYYY-MM-DD>/<datastore>_backup_<stamp>.<format>.<compression>.age
//! <root>/<environment>/<YYYY-MM-DD>/<datastore>_backup_<stamp>.<format>.<compression>.age.json
//! ```
//!
//! `<stamp>` is the date, or `<date>T<HHMM>Z` (then `<date>T<HHMMSS>Z`) when a backup of
//! the same datastore already exists under that name: a second backup never overwrites.

use crate::Bounded;
use chrono::{DateTime, NaiveDate, Utc};

/// The folder of the coordinator's self-backups beside the environments' folders
/// (`<root>/_ferry/<YYYY-MM-DD>/`): `_` is never in an environment's name, so it is never
/// taken for one.
pub const COORDINATOR_FOLDER: &str = "_ferry";

/// Whether `name` is a folder of dated folders in the layout: an environment (a valid
/// name) or [`COORDINATOR_FOLDER`].
pub fn holds_dated_folders(name: &str) -> bool {
    name == COORDINATOR_FOLDER || validate_name("environment", name).is_ok()
}

/// Longest environment, datastore or agent name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A name (environment, datastore, part) that would escape or confuse the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// Empty, too long, or with a character outside `[A-Za-z0-9-]` (`_` is the layout's
    /// separator, `.`/`/`/NUL could escape it).
    #[error(
        "{what} {name} is not a valid name: use 1 to {MAX_NAME_LEN} characters of a-z, A-Z, 0-9 and '-', not starting with '-'"
    )]
    Invalid {
        /// Which kind of name, e.g. `datastore`.
        what: &'static str,
        /// The offending value, quoted, escaped and cut as [`Bounded`] shows it.
        name: String,
    },
    /// Not a `YYYY-MM-DD` calendar date.
    #[error("date {0} is not a calendar date of the form YYYY-MM-DD")]
    Date(
        /// The value, quoted, escaped and cut as [`Bounded`] shows it.
        String,
    ),
    /// Not the name of a main archive of the datastore in that date's folder.
    #[error(
        "backup file {file} is not a main archive of datastore {datastore:?} dated {date}: \
         expected {datastore}_backup_{date}[THHMM[SS]Z].<format>.<compression>.age"
    )]
    BackupFile {
        /// The datastore.
        datastore: String,
        /// The date's folder, `YYYY-MM-DD`.
        date: String,
        /// The value, quoted, escaped and cut as [`Bounded`] shows it.
        file: String,
    },
    /// A manifest names a companion that is not a plain file name of the same folder.
    #[error("manifest names companion {0}, which is not a file name of the layout")]
    Companion(
        /// The value, quoted, escaped and cut as [`Bounded`] shows it.
        String,
    ),
}

/// Checks a name used as a path component: 1 to 64 of `[A-Za-z0-9-]`, not starting with `-`.
///
/// # Errors
/// [`NameError::Invalid`] naming `what` and the value.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            what,
            name: Bounded(name).to_string(),
        })
    }
}

/// Parses a `YYYY-MM-DD` date.
///
/// # Errors
/// [`NameError::Date`] if it is not exactly that form or not a real date.
pub fn parse_date(date: &str) -> Result<NaiveDate, NameError> {
    // Exactly `DDDD-DD-DD`: chrono alone also takes a space-padded `2026-02- 5` (found
    // by the `manifest` fuzz target).
    let shaped = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shaped {
        return Err(NameError::Date(Bounded(date).to_string()));
    }
    NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .map_err(|_| NameError::Date(Bounded(date).to_string()))
}

/// Where one stored file lives: `<root>/<environment>/<date>/<file>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    /// `<root>/<environment>/<date>`, no trailing slash.
    pub dir: String,
    /// The file name, e.g. `postgres_backup_2026-11-25.pgdump.zst.age`.
    pub name: String,
}

impl StoredFile {
    /// The full path of the archive.
    pub fn path(&self) -> String {
        format!("{}/{}", self.dir, self.name)
    }

    /// The full path of its `.json` manifest sidecar.
    pub fn manifest_path(&self) -> String {
        format!("{}/{}.json", self.dir, self.name)
    }

    /// The hidden name it is written under until complete and verified,
    /// `.<name>.<job>.partial`; unique per job, so two writers never share one.
    pub fn partial_name(&self, job_id: &str) -> String {
        format!(".{}.{job_id}.partial", self.name)
    }
}

/// `<root>/<environment>/<date>`.
pub fn dated_dir(root: &str, environment: &str, date: NaiveDate) -> String {
    format!(
        "{}/{}/{}",
        root.trim_end_matches('/'),
        environment,
        date.format("%Y-%m-%d")
    )
}

/// `<root>/<environment>`.
pub fn environment_dir(root: &str, environment: &str) -> String {
    format!("{}/{}", root.trim_end_matches('/'), environment)
}

/// The stem of a part's file name: `<datastore>` for the main part, `<datastore>-<part>`
/// for a companion such as PostgreSQL's `globals`.
pub fn part_stem(datastore: &str, part: &str) -> String {
    if part.is_empty() {
        datastore.to_owned()
    } else {
        format!("{datastore}-{part}")
    }
}

/// `<stem>_backup_<stamp>.<format>.<compression>.age`.
pub fn file_name(stem: &str, stamp: &str, format: &str, compression: &str) -> String {
    format!("{stem}_backup_{stamp}.{format}.{compression}.age")
}

/// The stamps to try for a backup started at `at`, in order: the date, then with the
/// minute, then with the second.
pub fn candidate_stamps(at: DateTime<Utc>) -> [String; 3] {
    [
        at.format("%Y-%m-%d").to_string(),
        at.format("%Y-%m-%dT%H%MZ").to_string(),
        at.format("%Y-%m-%dT%H%M%SZ").to_string(),
    ]
}

/// Extracts the stamp from a main-part archive name of `datastore`, e.g.
/// `postgres_backup_2026-02-05T1315Z.pgdump.zst.age` → `2026-02-05T1315Z`. `None` for
/// other files (companions, manifests, partials, other datastores).
pub fn stamp_of<'a>(datastore: &str, file: &'a str) -> Option<&'a str> {
    let rest = file.strip_prefix(datastore)?.strip_prefix("_backup_")?;
    let stamp = rest.split('.').next()?;
    // `get`: byte 10 of a crafted name may fall inside a character (the `manifest` fuzz
    // target found the panic of `stamp[..10]`).
    let date_ok = stamp.get(..10).is_some_and(|d| parse_date(d).is_ok());
    // `THHMMZ` or `THHMMSSZ` (see `stamps`), nothing else: the fuzzer found
    // `2026-02-05T/315Z` accepted when any `T...Z` was.
    let tail_ok = stamp.len() == 10
        || stamp.get(10..).is_some_and(|t| {
            let digits = t.len().saturating_sub(2);
            t.starts_with('T')
                && t.ends_with('Z')
                && (digits == 4 || digits == 6)
                && t[1..t.len() - 1].bytes().all(|b| b.is_ascii_digit())
        });
    let one_name = !file.contains(['/', '\\', '\0']);
    (date_ok && tail_ok && one_name && rest.ends_with(".age")).then_some(stamp)
}

/// Checks the main archive's file name that an order names (the exact backup the
/// coordinator chose from its catalog): a plain file name of the layout, at most 255 bytes
/// of `[A-Za-z0-9._-]`, of `datastore`'s main part ([`stamp_of`]) with a stamp of `date`.
///
/// # Errors
/// [`NameError::BackupFile`] naming the datastore, the date and the value (bounded).
pub fn validate_main_file(datastore: &str, date: &str, file: &str) -> Result<(), NameError> {
    let plain = file.len() <= 255
        && !file.starts_with('.')
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if plain && stamp_of(datastore, file).is_some_and(|stamp| stamp.starts_with(date)) {
        Ok(())
    } else {
        Err(NameError::BackupFile {
            datastore: datastore.to_owned(),
            date: date.to_owned(),
            file: Bounded(file).to_string(),
        })
    }
}

/// Checks a companion file name read from a manifest: a plain file name in the same
/// folder (no `/`, not hidden, an `.age` archive), so a crafted manifest cannot point a
/// restore elsewhere.
///
/// # Errors
/// [`NameError::Companion`] naming the value (bounded).
pub fn validate_companion(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.ends_with(".age")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NameError::Companion(Bounded(name).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_exactly_digits_and_dashes_and_stamps_never_panic() {
        assert!(parse_date("2026-02-05").is_ok());
        for bad in [
            "2026-02- 5",
            "2026-2-05 ",
            "+026-02-05",
            "2026-02-30",
            "２０２６-02-05",
        ] {
            assert!(parse_date(bad).is_err(), "{bad:?}");
        }
        assert_eq!(stamp_of("pg", "pg_backup_2026-02-0é.pgdump.zst.age"), None);
        assert_eq!(stamp_of("pg", "pg_backup_2026-02-05é.x.age"), None);
        assert_eq!(
            stamp_of("pg", "pg_backup_2026-02-05T/315Z.pgdump.zst.age"),
            None
        );
        assert_eq!(
            stamp_of("pg", "pg_backup_2026-02-05T13Z.pgdump.zst.age"),
            None
        );
        assert_eq!(stamp_of("pg", "pg_backup_2026-02-05.pgdump/x.age"), None);
        assert_eq!(
            stamp_of("pg", "pg_backup_2026-02-05T131502Z.pgdump.zst.age"),
            Some("2026-02-05T131502Z")
        );
        assert_eq!(
            stamp_of("pg", "pg_backup_2026-02-05T1315Z.pgdump.zst.age"),
            Some("2026-02-05T1315Z")
        );
    }

    #[test]
    fn an_ordered_backup_file_is_a_main_archive_of_its_datastore_and_date() {
        for good in [
            "pg_backup_2026-02-05.pgdump.zst.age",
            "pg_backup_2026-02-05T1315Z.pgdump.zst.age",
            "pg_backup_2026-02-05T131502Z.archive.gz.age",
        ] {
            validate_main_file("pg", "2026-02-05", good).unwrap();
        }
        for bad in [
            "pg_backup_2026-02-06.pgdump.zst.age",
            "pg-globals_backup_2026-02-05.sql.zst.age",
            "other_backup_2026-02-05.pgdump.zst.age",
            "pg_backup_2026-02-05.pgdump.zst.age.json",
            "../pg_backup_2026-02-05.pgdump.zst.age",
            ".pg_backup_2026-02-05.pgdump.zst.age",
            "pg_backup_2026-02-05.pg dump.zst.age",
            &format!("pg_backup_2026-02-05.{}.age", "x".repeat(300)),
        ] {
            let e = validate_main_file("pg", "2026-02-05", bad).unwrap_err();
            assert!(e.to_string().len() < 400, "{e}");
        }
    }

    #[test]
    fn names_that_escape_the_layout_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            "a\0b",
            "-x",
            ".hidden",
            "a_b",
            "a.b",
            &"x".repeat(65),
        ] {
            assert!(validate_name("datastore", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["postgres", "pg-main-2", "A1"] {
            validate_name("datastore", good).unwrap();
        }
    }

    #[test]
    fn dates_must_be_calendar_dates() {
        assert!(parse_date("2026-02-30").is_err());
        assert!(parse_date("2026-2-3").is_err());
        assert!(parse_date("../../etc").is_err());
        assert_eq!(parse_date("2026-02-05").unwrap().to_string(), "2026-02-05");
    }

    #[test]
    fn second_backup_of_a_day_gets_a_time_suffix() {
        let at = DateTime::parse_from_rfc3339("2026-02-05T13:15:42Z")
            .unwrap()
            .with_timezone(&Utc);
        let [a, b, c] = candidate_stamps(at);
        assert_eq!(a, "2026-02-05");
        assert_eq!(b, "2026-02-05T1315Z");
        assert_eq!(c, "2026-02-05T131542Z");
        assert_eq!(
            file_name(&part_stem("postgres", ""), &b, "pgdump", "zst"),
            "postgres_backup_2026-02-05T1315Z.pgdump.zst.age"
        );
    }

    #[test]
    fn stamp_is_read_back_only_from_main_archives() {
        assert_eq!(
            stamp_of("postgres", "postgres_backup_2026-02-05.pgdump.zst.age"),
            Some("2026-02-05")
        );
        assert_eq!(
            stamp_of(
                "postgres",
                "postgres_backup_2026-02-05T1315Z.pgdump.zst.age"
            ),
            Some("2026-02-05T1315Z")
        );
        assert_eq!(
            stamp_of("postgres", "postgres-globals_backup_2026-02-05.sql.zst.age"),
            None
        );
        assert_eq!(
            stamp_of("postgres", "postgres_backup_2026-02-05.pgdump.zst.age.json"),
            None
        );
        assert_eq!(
            stamp_of(
                "postgres",
                ".postgres_backup_2026-02-05.pgdump.zst.age.x.partial"
            ),
            None
        );
    }
}
