//! Smoke checks: the operator's queries run on a restored datastore (`smoke = [...]` in a
//! staging datastore's config), each compared with its least acceptable number.

use ferry_proto::Role;
use serde::Deserialize;

use crate::datastore::RestoreError;

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
    /// Checks a datastore's `smoke` list for `role`: staging only, and each entry with
    /// the field its kind needs (`sql` for PostgreSQL, `ns` for MongoDB).
    ///
    /// # Errors
    /// `(field, message)` naming `smoke[i]`.
    pub fn validate(
        checks: &[SmokeCheck],
        role: Role,
        needs: &str,
    ) -> Result<(), (String, String)> {
        if !checks.is_empty() && role == Role::Production {
            return Err((
                "smoke".into(),
                "smoke checks run after restores: staging agents only".into(),
            ));
        }
        for (i, c) in checks.iter().enumerate() {
            let ok = match needs {
                "sql" => c.sql.is_some() && c.ns.is_none() && c.filter.is_none(),
                _ => c.ns.is_some() && c.sql.is_none(),
            };
            if !ok {
                return Err((
                    format!("smoke[{i}]"),
                    format!("this datastore's smoke checks take {needs} (and min)"),
                ));
            }
        }
        Ok(())
    }

    /// The line for the report: `WHAT = N (at least MIN)`, and whether it passed.
    pub fn judge(&self, what: &str, n: i64) -> (String, bool) {
        (
            format!("{what} = {n} (at least {})", self.min),
            n >= self.min,
        )
    }
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
    Fut: std::future::Future<Output = Result<(String, i64), String>>,
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
