//! The backup catalog: what the backup server holds, as the coordinator recorded it
//! (stored in the [`crate::store::Store`]), and what is decided from it.
//!
//! Modules:
//! - [`sets`]: backup sets, everything one environment backed up on one date.
//! - [`retention`]: the GFS retention policy of dated folders.
//! - [`prune`]: `ferry prune`, the policy carried out on the backup server.
//! - [`locks`]: Object Lock by retention tier, on a target with locks.
//! - [`copies`]: copies of each backup on the environment's copy targets (3-2-1).
//! - [`archive`]: the lag of continuous archiving (the newest archived WAL segment).
//! - [`rebuild`]: the catalog read back from the manifests on the targets.
//! - [`keys`]: which recipients the backups need and which staging agents open them.

pub mod archive;
pub mod copies;
pub mod keys;
pub mod locks;
pub mod prune;
pub mod rebuild;
pub mod retention;
pub mod sets;

use crate::dispatch::Coordinator;
use crate::model::BackupRecord;
use crate::store::{StoreError, blocking};

impl Coordinator {
    /// The catalog, newest first, of `environment` or of all.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn backups(
        &self,
        environment: Option<&str>,
    ) -> Result<Vec<BackupRecord>, StoreError> {
        let (store, environment) = (self.store.clone(), environment.map(str::to_owned));
        blocking(move || store.list_backups(environment.as_deref())).await
    }

    /// The datastores of `agent`: those it described, then those its schedules name.
    pub(crate) fn datastores_of(&self, agent: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .agents
            .state(agent)
            .described
            .map(|d| d.datastores.into_iter().map(|d| d.name).collect())
            .unwrap_or_default();
        for s in self.settings.schedules.iter().filter(|s| s.agent == agent) {
            if let Some(d) = &s.datastore
                && !names.contains(d)
            {
                names.push(d.clone());
            }
        }
        names
    }

    /// The production datastores of `environment`: `(agent, datastore)` for every
    /// production agent there, its described datastores and those its schedules name.
    pub fn expected_members(&self, environment: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for a in self
            .agents
            .all()
            .filter(|a| a.environment == environment && a.role.may_backup())
        {
            out.extend(
                self.datastores_of(&a.id)
                    .into_iter()
                    .map(|n| (a.id.clone(), n)),
            );
        }
        out
    }

    /// The environments that have production agents, sorted.
    pub fn production_environments(&self) -> Vec<String> {
        let mut envs: Vec<String> = self
            .agents
            .all()
            .filter(|a| a.role.may_backup())
            .map(|a| a.environment.clone())
            .collect();
        envs.sort();
        envs.dedup();
        envs
    }

    /// The backup sets of `environment` (every environment with production agents when
    /// `None`), newest first by their members' finish times ([`crate::catalog::sets`]); the catalog
    /// is read once.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn sets(
        &self,
        environment: Option<&str>,
    ) -> Result<Vec<sets::BackupSet>, StoreError> {
        let backups = self.backups(None).await?;
        let mut sets: Vec<sets::BackupSet> = match environment {
            Some(e) => vec![e.to_owned()],
            None => self.production_environments(),
        }
        .iter()
        .flat_map(|e| sets::build(e, &self.expected_members(e), &backups))
        .collect();
        // Newest first by when their backups finished (their manifests' ends, checked
        // against the coordinator's clock when recorded), not by folder name: an agent's
        // clock that ran ahead named later folders for older data.
        sets.sort_by(|a, b| {
            b.finished_ms()
                .cmp(&a.finished_ms())
                .then(b.date.cmp(&a.date))
                .then(a.environment.cmp(&b.environment))
        });
        Ok(sets)
    }

    /// For a verify of `date`: `(datastore, Some(stored_path))` for every dated archive the
    /// catalog lists of each of `datastores` in `source_environment` on `date`, oldest
    /// first; `(datastore, None)` for a datastore with none (its job then fails naming
    /// what the catalog lacks) or kept in a differential repository (checked by date).
    ///
    /// # Errors
    /// The catalog cannot be read.
    pub(crate) async fn backups_of_date(
        &self,
        source_environment: &str,
        datastores: &[String],
        date: &str,
    ) -> Result<Vec<(String, Option<String>)>, StoreError> {
        let mut records = self.backups(Some(source_environment)).await?;
        records.sort_by_key(|r| r.finished_ms);
        let mut out = Vec::new();
        for ds in datastores {
            let of_day: Vec<&BackupRecord> = records
                .iter()
                .filter(|r| r.datastore == *ds && r.date == date)
                .collect();
            if of_day.is_empty() || !of_day.iter().all(|r| r.is_archive()) {
                out.push((ds.clone(), None));
            } else {
                out.extend(
                    of_day
                        .into_iter()
                        .map(|r| (ds.clone(), Some(r.stored_path.clone()))),
                );
            }
        }
        Ok(out)
    }
}
