//! Order validation (`agent/src/jobs.rs`, `validate(settings, job_id, datastore, kind)`) with
//! arbitrary strings, against a production and a staging agent built from `agent.toml` (see
//! `ferry_fuzz::agents`), optionally with one more `files` datastore of an arbitrary name
//! added to the config and built as the agent builds it. Properties:
//!
//! - the config build accepts the extra datastore exactly when its name is valid for the
//!   layout and not taken;
//! - the role decides first: an order outside the role is `PermissionDenied` whatever else
//!   it holds, and one inside it never is;
//! - an accepted order names a configured datastore whose name is 1 to 64 bytes, no `/`,
//!   no NUL, no `..`, not hidden and one path component; a ULID job id, or a ULID and
//!   `-a<N>` (N >= 2, a retry's attempt id); dates of exactly
//!   `YYYY-MM-DD`; a backup type the datastore offers; namespaces `db.collection`; a
//!   backup file only with its date, as one file name of that datastore's main archives
//!   of that date.
#![no_main]

use arbitrary::Arbitrary;
use ferry_agent::config::Settings;
use ferry_agent::datastore::DatastoreConfig;
use ferry_agent::datastore::files::{FilesConfig, Method};
use ferry_agent::jobs::{OrderError, OrderKind, validate};
use ferry_core::layout::{self, MAX_NAME_LEN};
use ferry_fuzz::{agents, is_calendar_date, is_single_component};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum JobId {
    Ulid(u128),
    /// A ULID followed by `-a` and this text (a retry's attempt id when it is a number).
    Attempt(u128, String),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Name {
    /// One of the agent's datastores, by index.
    Configured(u8),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Date {
    /// Days from 0001-01-01.
    Days(i32),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Backup {
        backup_type: Option<String>,
    },
    Verify {
        date: Option<Date>,
        file: Option<String>,
        target: Option<String>,
    },
    Restore {
        date: Option<Date>,
        file: Option<String>,
        namespaces: Vec<String>,
        target: Option<String>,
        /// UTC ms.
        to_time: Option<i64>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    staging: bool,
    /// A `files` datastore of this name added to the agent's config.
    extra_datastore: Option<String>,
    job_id: JobId,
    datastore: Name,
    kind: Kind,
}

fn date(d: Option<Date>) -> Option<String> {
    d.map(|d| match d {
        Date::Days(n) => chrono::NaiveDate::from_num_days_from_ce_opt(n)
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        Date::Text(s) => s,
    })
}

fn built_with(staging: bool, extra: &str) -> Option<Settings> {
    let agents = agents();
    let mut config = if staging {
        agents.staging_config.clone()
    } else {
        agents.production_config.clone()
    };
    config.datastores.push(DatastoreConfig::Files(FilesConfig {
        name: extra.to_owned(),
        path: "/srv/extra".into(),
        exclude: Vec::new(),
        method: Method::Tar,
    }));
    // The names already taken are those of the agent built from the same config.
    let built_before = if staging {
        &agents.staging
    } else {
        &agents.production
    };
    let taken = built_before.datastores.contains_key(extra);
    let valid = layout::validate_name("datastore", extra).is_ok();
    let built = config.build(&agents.config_path());
    assert_eq!(
        built.is_ok(),
        valid && !taken,
        "datastore name {extra:?}: build gave {:?}",
        built.as_ref().err()
    );
    built.ok()
}

/// An accepted backup file: with its date, one path component, a main archive of
/// `datastore` whose stamp is of that date.
fn check_file(datastore: &str, date: Option<&str>, file: Option<&str>) {
    let Some(f) = file else { return };
    let d = date.expect("an accepted file has its date");
    assert!(is_single_component(f) && !f.starts_with('.'), "{f:?}");
    let stamp = layout::stamp_of(datastore, f).expect("a main archive of the datastore");
    assert!(stamp.starts_with(d), "{f:?} is not of {d}");
}

/// An accepted order's target is `primary` or one of the agent's `[copies]`, and never
/// of a differential repository (read from `[backup_server]` only).
fn check_target(settings: &Settings, repository: bool, target: Option<&str>) {
    let Some(t) = target else { return };
    assert!(!repository, "target {t:?} of a repository");
    assert!(
        t == "primary" || settings.copies.iter().any(|(n, _)| n == t),
        "accepted target {t:?}"
    );
}

fuzz_target!(|input: Input| {
    let agents = agents();
    let extra = input
        .extra_datastore
        .as_deref()
        .and_then(|name| built_with(input.staging, name));
    let settings = match (&extra, input.staging) {
        (Some(s), _) => s,
        (None, true) => &agents.staging,
        (None, false) => &agents.production,
    };
    let job_id = match input.job_id {
        JobId::Ulid(n) => ulid::Ulid(n).to_string(),
        JobId::Attempt(n, attempt) => format!("{}-a{attempt}", ulid::Ulid(n)),
        JobId::Text(s) => s,
    };
    let datastore = match input.datastore {
        Name::Configured(i) => {
            let names: Vec<&String> = settings.datastores.keys().collect();
            names[usize::from(i) % names.len()].clone()
        }
        Name::Text(s) => s,
    };
    let kind = match input.kind {
        Kind::Backup { backup_type } => OrderKind::Backup { backup_type },
        Kind::Verify {
            date: d,
            file,
            target,
        } => OrderKind::Verify {
            date: date(d),
            file,
            target,
        },
        Kind::Restore {
            date: d,
            file,
            namespaces,
            target,
            to_time,
        } => OrderKind::Restore {
            date: date(d),
            file,
            namespaces,
            target,
            to_time: to_time.and_then(chrono::DateTime::from_timestamp_millis),
        },
    };
    let allowed = match kind {
        OrderKind::Backup { .. } => settings.role.may_backup(),
        OrderKind::Verify { .. } | OrderKind::Check { .. } | OrderKind::Restore { .. } => {
            settings.role.may_restore()
        }
    };

    let result = validate(settings, &job_id, &datastore, kind.clone());
    let order = match result {
        Err(OrderError::PermissionDenied(m)) => {
            assert!(
                !allowed,
                "refused for its role though the role allows it: {m}"
            );
            return;
        }
        Err(e) => {
            assert!(
                allowed,
                "an order outside the role was not PermissionDenied: {e}"
            );
            return;
        }
        Ok(order) => order,
    };
    assert!(allowed, "an order outside the role was accepted");
    assert_eq!(order.kind, kind);
    assert_eq!(order.job_id, job_id);
    let (job, attempt) = ferry_proto::attempt::split_attempt_id(&job_id)
        .expect("accepted job id is a ULID or an attempt id");
    ulid::Ulid::from_string(job).expect("accepted job id is a ULID, with its attempt");
    assert!(attempt >= 1);
    if attempt > 1 {
        assert_eq!(job_id, format!("{job}-a{attempt}"));
    }
    assert_eq!(order.job(), job);

    let name = order.datastore.name();
    assert_eq!(name, datastore);
    assert!(settings.datastores.contains_key(name));
    assert!(!name.is_empty() && name.len() <= MAX_NAME_LEN, "{name:?}");
    assert!(!name.contains(['/', '\0']), "{name:?}");
    assert!(
        !name.contains("..") && !name.starts_with(['.', '-']),
        "{name:?}"
    );
    assert!(is_single_component(name), "{name:?}");

    match &order.kind {
        OrderKind::Backup { backup_type } => {
            if let Some(t) = backup_type {
                let types = order
                    .datastore
                    .repository()
                    .map(|r| r.backup_types())
                    .unwrap_or(&[]);
                assert!(types.contains(&t.as_str()), "backup type {t:?}");
            }
        }
        OrderKind::Verify { date, file, target } | OrderKind::Check { date, file, target } => {
            check_target(
                settings,
                order.datastore.repository().is_some(),
                target.as_deref(),
            );
            if let Some(d) = date {
                assert!(is_calendar_date(d), "accepted date {d:?}");
            }
            check_file(name, date.as_deref(), file.as_deref());
        }
        OrderKind::Restore {
            date,
            file,
            namespaces,
            target,
            to_time,
        } => {
            if to_time.is_some() {
                // Only a datastore that archives WAL, on a staging agent with [wal], from a
                // named base backup.
                assert!(
                    settings.point_in_time(&*order.datastore),
                    "a restore to a point in time accepted for {name}"
                );
                assert!(file.is_some() && namespaces.is_empty());
            }
            check_target(
                settings,
                order.datastore.repository().is_some(),
                target.as_deref(),
            );
            if let Some(d) = date {
                assert!(is_calendar_date(d), "accepted date {d:?}");
            }
            check_file(name, date.as_deref(), file.as_deref());
            for ns in namespaces {
                let (db, coll) = ns.split_once('.').expect("namespace has a dot");
                assert!(!db.is_empty() && !coll.is_empty(), "{ns:?}");
                assert!(ns.len() <= 255 && !ns.contains('\0'), "{ns:?}");
                assert!(!db.contains(['/', '$', ' ']), "{ns:?}");
            }
        }
    }
});
