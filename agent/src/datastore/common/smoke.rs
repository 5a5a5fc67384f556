//! Smoke checks: the operator's queries run on a restored datastore (`smoke = [...]` in a
//! staging datastore's config), each compared with its least acceptable number.

use ferry_proto::Role;
use serde::Deserialize;

use crate::datastore::{DatastoreConfigError, RestoreError};

/// One smoke check of a restored datastore (`smoke = [...]` in a staging datastore's
/// config): PostgreSQL runs `sql` (one row, one integer column) in the target database;
/// MongoDB counts the documents of `ns` (`db.collection`, before `rename`) matching
/// `filter` (Extended JSON, default `{}`). The check passes when the number is at least
/// `min`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    /// PostgreSQL: the query.
    pub sql: Option<String>,
    /// MongoDB: the namespace.
    pub ns: Option<String>,
    /// MongoDB: the filter, Extended JSON.
    pub filter: Option<String>,
    /// The least acceptable number.
    pub min: i64,
}

impl SmokeCheck {
    /// Checks a datastore's `smoke` list for `role`: staging only, and each entry written
    /// as its kind takes it (`fits`, e.g. PostgreSQL's `sql` without `ns` nor `filter`),
    /// `needs` naming those fields for the message.
    ///
    /// # Errors
    /// [`DatastoreConfigError::WrongRole`] for checks on a production agent,
    /// [`DatastoreConfigError::Invalid`] naming `smoke[i]`, the first entry that does not
    /// fit.
    pub fn validate(
        checks: &[SmokeCheck],
        role: Role,
        needs: &str,
        fits: impl Fn(&SmokeCheck) -> bool,
    ) -> Result<(), DatastoreConfigError> {
        if !checks.is_empty() && role == Role::Production {
            return Err(DatastoreConfigError::WrongRole {
                field: "smoke",
                why: "smoke checks run after restores: staging agents only",
            });
        }
        match checks.iter().position(|c| !fits(c)) {
            Some(i) => Err(DatastoreConfigError::invalid(
                format!("smoke[{i}]"),
                format!("this datastore's smoke checks take {needs} (and min)"),
            )),
            None => Ok(()),
        }
    }

    /// The line for the report: `WHAT = N (at least MIN)`, and whether it passed.
    pub fn judge(&self, what: &str, n: i64) -> (String, bool) {
        (
            format!("{what} = {n} (at least {})", self.min),
            n >= self.min,
        )
    }
}

/// A smoke check that could not run.
#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    /// The check cannot run as written, e.g. a filter that is not a document: why.
    #[error("{0}")]
    Check(String),
    /// The query failed or did not give a number.
    #[error("{query}: {reason}")]
    Query {
        /// The query or what was counted, e.g. `SELECT count(*) FROM orders`.
        query: String,
        /// The server's error, or what the answer was instead of a number.
        reason: String,
    },
}

/// Runs `checks` one by one with `run` (which gives a label and the number).
///
/// # Errors
/// The first failing or erroring check.
pub async fn run_smoke<'a, F, Fut>(
    checks: &'a [SmokeCheck],
    mut run: F,
) -> Result<Vec<String>, RestoreError>
where
    F: FnMut(&'a SmokeCheck) -> Fut,
    Fut: std::future::Future<Output = Result<(String, i64), SmokeError>>,
{
    let mut out = Vec::new();
    for c in checks {
        let (what, n) = run(c)
            .await
            .map_err(|e| RestoreError::Target(format!("smoke check failed to run: {e}")))?;
        let (line, ok) = c.judge(&what, n);
        if !ok {
            return Err(RestoreError::Mismatch(format!("smoke check: {line}")));
        }
        out.push(line);
    }
    Ok(out)
}
