//! `ferry prune`: the retention policies ([`crate::retention`]) applied to the catalog's
//! dated folders, and, unless it is a dry run, the folders that go removed from the
//! backup server with the coordinator's `[maintenance]` key. The newest date and the
//! newest complete backup set are always kept. Every run and every removal is audited.

use std::sync::Arc;

use crate::dispatch::{Coordinator, DispatchError, blocking};

/// What prune decided for one dated folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Environment.
    pub environment: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Why it is kept (`newest`, `daily`, `weekly`, `monthly`, `newest complete set`);
    /// empty: it goes.
    pub keep: Vec<String>,
    /// Catalog records in that folder.
    pub backups: u32,
    /// Their stored bytes.
    pub size_bytes: u64,
    /// It was removed.
    pub removed: bool,
}

/// Why prune did not finish.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// No policy, or no maintenance key for a real run; nothing was removed.
    #[error("{0}")]
    Refused(String),
    /// The backup server failed a removal; folders listed before it were removed.
    #[error("{0}")]
    Server(String),
    /// The store or the sets could not be read.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// Partial uploads untouched this long are abandoned (their agent died, or its key may
/// not delete them) and removed by prune: 24 hours, longer than any upload stalls.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Plans (and unless `dry_run`, carries out) the retention of `environment`'s dated
/// folders, or of every environment with a policy; decisions newest first per environment.
///
/// # Errors
/// [`PruneError`].
pub async fn run(
    c: &Arc<Coordinator>,
    who: &str,
    environment: Option<&str>,
    dry_run: bool,
) -> Result<Vec<Decision>, PruneError> {
    let policies: Vec<(String, crate::retention::Policy)> = c
        .settings
        .retention
        .iter()
        .filter(|(env, _)| environment.is_none_or(|e| e == env.as_str()))
        .map(|(e, p)| (e.clone(), *p))
        .collect();
    if policies.is_empty() {
        return Err(PruneError::Refused(format!(
            "no [[retention]] policy{} in coordinator.toml",
            environment
                .map(|e| format!(" for environment {}", ferry_proto::Bounded(e)))
                .unwrap_or_default()
        )));
    }
    let store = c.store.clone();
    let backups = blocking(move || store.list_backups(None)).await?;
    let mut decisions = Vec::new();
    for (env, policy) in &policies {
        let of_env: Vec<_> = backups.iter().filter(|b| &b.environment == env).collect();
        let dates: Vec<chrono::NaiveDate> = of_env
            .iter()
            .filter_map(|b| chrono::NaiveDate::parse_from_str(&b.date, "%Y-%m-%d").ok())
            .collect();
        // Never the newest complete set, whatever the policy says.
        let newest_complete = crate::sets::build(env, &c.expected_members(env), &backups)
            .into_iter()
            .find(|s| s.complete())
            .map(|s| s.date);
        for d in crate::retention::plan(&dates, policy) {
            let date = d.date.format("%Y-%m-%d").to_string();
            let mut keep: Vec<String> = d.keep.iter().map(|k| (*k).to_owned()).collect();
            if newest_complete.as_deref() == Some(date.as_str()) {
                keep.push("newest complete set".into());
            }
            let in_folder: Vec<_> = of_env.iter().filter(|b| b.date == date).collect();
            decisions.push(Decision {
                environment: env.clone(),
                backups: in_folder.len() as u32,
                size_bytes: in_folder.iter().map(|b| b.size_bytes).sum(),
                date,
                keep,
                removed: false,
            });
        }
    }
    let going = decisions.iter().filter(|d| d.keep.is_empty()).count();
    let target = environment.unwrap_or("*");
    if dry_run {
        c.audit(
            who,
            "prune --dry-run",
            target,
            &format!("ok: {going} folder(s) would go"),
        )
        .await;
        return Ok(decisions);
    }
    let Some(server) = c.settings.maintenance.clone() else {
        let message = format!(
            "{going} dated folder(s) would go, but deleting needs the maintenance key \
             ([maintenance] in coordinator.toml): nothing was removed (use --dry-run to list them)"
        );
        c.audit(who, "prune", target, &format!("refused: {message}"))
            .await;
        return Err(PruneError::Refused(message));
    };
    for (env, _) in &policies {
        let (server, env_name) = (server.clone(), env.clone());
        let swept = tokio::task::spawn_blocking(move || {
            server
                .connect()?
                .remove_abandoned_partials(&env_name, ABANDONED_AFTER)
        })
        .await
        .map_err(|e| PruneError::Server(e.to_string()))?
        .map_err(|e| PruneError::Server(format!("removing abandoned uploads: {e}")))?;
        if swept.0 > 0 {
            c.audit(
                who,
                "prune partials",
                env,
                &format!(
                    "removed {} abandoned partial upload(s), {} bytes",
                    swept.0, swept.1
                ),
            )
            .await;
        }
    }
    for d in decisions.iter_mut().filter(|d| d.keep.is_empty()) {
        let (server, env, date) = (server.clone(), d.environment.clone(), d.date.clone());
        let removed =
            tokio::task::spawn_blocking(move || server.connect()?.remove_dated_folder(&env, &date))
                .await
                .map_err(|e| PruneError::Server(e.to_string()))?;
        let folder = format!("{}/{}", d.environment, d.date);
        match removed {
            Ok((files, bytes)) => {
                let (store, env, date) = (c.store.clone(), d.environment.clone(), d.date.clone());
                blocking(move || store.delete_backups(&env, &date)).await?;
                d.removed = true;
                c.audit(
                    who,
                    "prune",
                    &folder,
                    &format!("removed {files} files, {bytes} bytes"),
                )
                .await;
            }
            Err(e) => {
                c.audit(who, "prune", &folder, &format!("failed: {e}"))
                    .await;
                return Err(PruneError::Server(format!(
                    "removing {folder}: {e}; folders listed before it were removed"
                )));
            }
        }
    }
    Ok(decisions)
}
