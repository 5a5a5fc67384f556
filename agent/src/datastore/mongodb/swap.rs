//! The scratch databases of a MongoDB restore, the move of their namespaces into place, and
//! what the agent does with those of a restore that was stopped (see
//! [`super::super::leftovers`]).
//!
//! A restore of job `J` fills, for each database of the archive, a scratch database beside
//! its target `T` (`rename` applied): `<T>__ferry_new_<j>` ([`scratch_name`]; `j` is `J` in
//! lower case, and `T` is cut so that the name fits MongoDB's 63 bytes). Its first write
//! creates it: the marker, document `{_id: "restore"}` of collection [`MARKER`], which names
//! the datastore, the job, the archive's database, the target and the state, `filling`.
//!
//! Once every scratch database of the job has been checked against the manifest, the
//! restore writes each one's plan into its marker (the collections to move into `T`, the
//! views to recreate there, the namespaces the oplog dropped, to drop there), then sets
//! every marker to `swapping`: that is the commit point. Only then is anything of a target
//! touched: each collection is moved with `renameCollection` and `dropTarget` (or recreated
//! with its options and copied, on a server that loses them on a rename), the views are
//! recreated, and what the oplog dropped is dropped. Last, the scratch databases are
//! dropped, markers with them.
//!
//! MongoDB cannot rename a database, and a rename with `dropTarget` drops the target's
//! collection: the target's previous data is not kept anywhere once the first collection has
//! been moved. So a restore stopped during its move cannot be undone; it can be finished,
//! since what is left of its (checked) restore is still in the scratch databases and the
//! plan says what remains to do. Found on start or before a restore ([`recover`]), the
//! scratch databases of a job none of whose markers says `swapping` are dropped (the targets
//! are as they were); those of a job one of whose markers says `swapping` are first all set
//! to `swapping` (so that a stop during the recovery finishes them too), then each plan is
//! carried out again (a collection no longer in the scratch database was moved already; a
//! view is recreated again; a drop is repeated) and the scratch database dropped: every
//! target then holds that job's checked restore. If the rest cannot be moved, the scratch
//! database is kept, the targets stay partly replaced, and the report says so. A restore
//! whose move fails (an error rather than a kill) keeps its scratch databases likewise, for
//! the recovery before the next restore (the coordinator's retry among them) to finish.

use std::collections::BTreeMap;

use bson::{Bson, Document, doc};
use mongodb::Client;

use super::super::leftovers::{Action, Recovered, job_id, skipped};
use super::{
    Mongo, Replaced, RestoreError, collection_spec, copy_collection, rename_keeps_options,
};

/// The tag of a restore's scratch database: `<target>__ferry_new_<job>`.
pub const NEW_TAG: &str = "__ferry_new_";

/// The collection of a scratch database that holds its marker (a name Ferry keeps: an
/// archive holding a collection of that name is refused).
pub const MARKER: &str = "__ferry_restore";

/// The `_id` of the marker document.
const MARKER_ID: &str = "restore";

/// Longest database name MongoDB accepts, bytes.
const MAX_DB_NAME: usize = 63;

/// Length of a job id (a ULID), characters.
const JOB_LEN: usize = 26;

/// How long the search for leftovers waits for the server to list its databases, seconds.
const RECOVER_TIMEOUT_SECONDS: u64 = 30;

/// The scratch database of `target` for job `job`: `<target>__ferry_new_<job>`, the job id
/// in lower case, `target` cut (at a character boundary) so that the whole fits
/// 63 bytes (the longest database name MongoDB accepts).
pub fn scratch_name(target: &str, job: &str) -> String {
    let job = job.to_lowercase();
    let mut keep = MAX_DB_NAME
        .saturating_sub(NEW_TAG.len() + job.len())
        .min(target.len());
    while !target.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{NEW_TAG}{job}", &target[..keep])
}

/// The job (upper-case ULID) whose scratch database `name` may be: `name` is some
/// non-empty text, [`NEW_TAG`], and a job id exactly as [`scratch_name`] writes it (lower
/// case). `None` for any other name. Whether the database is this datastore's is for its
/// marker to say ([`recover`]).
pub fn parse(name: &str) -> Option<String> {
    let cut = name
        .len()
        .checked_sub(JOB_LEN)
        .filter(|&c| name.is_char_boundary(c))?;
    let (head, job) = name.split_at(cut);
    let id = job_id(job).filter(|id| id.to_lowercase() == job)?;
    head.strip_suffix(NEW_TAG)
        .filter(|t| !t.is_empty())
        .map(|_| id)
}

/// Where a restore stands, as its markers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Filling and checking the scratch databases: no target was touched.
    Filling,
    /// Past the commit point: the targets are being replaced.
    Swapping,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Filling => "filling",
            State::Swapping => "swapping",
        }
    }
}

/// What moving one scratch database into place does, collection names in its target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Collections to move into the target (renamed, or recreated and copied).
    pub moves: Vec<String>,
    /// Views to recreate in the target, from their definitions in the scratch database.
    pub views: Vec<String>,
    /// Namespaces the oplog dropped: dropped in the target.
    pub drops: Vec<String>,
}

impl Plan {
    fn to_document(&self) -> Document {
        doc! {"moves": &self.moves, "views": &self.views, "drops": &self.drops}
    }

    fn from_document(d: &Document) -> Option<Plan> {
        let list = |key: &str| -> Option<Vec<String>> {
            d.get_array(key)
                .ok()?
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        Some(Plan {
            moves: list("moves")?,
            views: list("views")?,
            drops: list("drops")?,
        })
    }
}

/// A scratch database's marker (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The datastore whose restore made it.
    pub datastore: String,
    /// The job (upper-case ULID, or the job id as the restore was given it).
    pub job: String,
    /// The archive's database restored into it.
    pub source: String,
    /// The database it is moved into.
    pub target: String,
    /// Where the restore stands.
    pub state: State,
    /// What moving it into place does; written just before the commit point.
    pub plan: Option<Plan>,
}

impl Marker {
    fn from_document(d: &Document) -> Option<Marker> {
        let text = |key: &str| d.get_str(key).ok().map(str::to_owned);
        let state = match d.get_str("state").ok()? {
            "filling" => State::Filling,
            "swapping" => State::Swapping,
            _ => return None,
        };
        let plan = match d.get("plan") {
            None | Some(Bson::Null) => None,
            Some(Bson::Document(p)) => Some(Plan::from_document(p)?),
            Some(_) => return None,
        };
        Some(Marker {
            datastore: text("datastore")?,
            job: text("job")?,
            source: text("source")?,
            target: text("target")?,
            state,
            plan,
        })
    }
}

/// Creates the scratch database `name` by writing its marker, state `filling`.
///
/// # Errors
/// [`RestoreError::Target`] naming the database.
pub async fn create(
    client: &Client,
    name: &str,
    (datastore, job): (&str, &str),
    (source, target): (&str, &str),
) -> Result<(), RestoreError> {
    client
        .database(name)
        .collection::<Document>(MARKER)
        .insert_one(doc! {
            "_id": MARKER_ID,
            "datastore": datastore,
            "job": job.to_ascii_uppercase(),
            "source": source,
            "target": target,
            "state": State::Filling.as_str(),
        })
        .await
        .map_err(|e| {
            RestoreError::Target(format!(
                "creating the scratch database {name} (its marker {name}.{MARKER}): {e}"
            ))
        })?;
    Ok(())
}

/// Sets `fields` in the marker of scratch database `name`.
async fn update(client: &Client, name: &str, fields: Document) -> Result<(), String> {
    let done = client
        .database(name)
        .collection::<Document>(MARKER)
        .update_one(doc! {"_id": MARKER_ID}, doc! {"$set": fields})
        .await
        .map_err(|e| format!("updating the marker {name}.{MARKER}: {e}"))?;
    if done.matched_count == 0 {
        return Err(format!("the marker {name}.{MARKER} is missing"));
    }
    Ok(())
}

/// Writes `plan` into the marker of scratch database `name`.
///
/// # Errors
/// [`RestoreError::Target`]: the marker cannot be written or is missing.
pub async fn set_plan(client: &Client, name: &str, plan: &Plan) -> Result<(), RestoreError> {
    update(client, name, doc! {"plan": plan.to_document()})
        .await
        .map_err(RestoreError::Target)
}

/// Sets the state in the marker of scratch database `name`.
///
/// # Errors
/// [`RestoreError::Target`]: the marker cannot be written or is missing.
pub async fn set_state(client: &Client, name: &str, state: State) -> Result<(), RestoreError> {
    update(client, name, doc! {"state": state.as_str()})
        .await
        .map_err(RestoreError::Target)
}

/// The marker of database `name`, `None` if it has none (or not one [`create`] writes).
async fn read(client: &Client, name: &str) -> Result<Option<Marker>, RestoreError> {
    let found = client
        .database(name)
        .collection::<Document>(MARKER)
        .find_one(doc! {"_id": MARKER_ID})
        .await
        .map_err(|e| RestoreError::Target(format!("reading {name}.{MARKER}: {e}")))?;
    Ok(found.as_ref().and_then(Marker::from_document))
}

/// What moving one scratch database into place did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moved {
    /// Collections moved and views recreated.
    pub namespaces: usize,
    /// Namespaces dropped in the target, as the oplog dropped them.
    pub dropped: usize,
    /// Documents of the collections moved (the server's estimate).
    pub documents: i64,
}

/// Carries out `plan`: moves the collections still in scratch database `from` into `to`,
/// recreates the views, drops what the oplog dropped. Each namespace of `to` it replaces is
/// added to `replaced`. A collection no longer in `from` was moved already and is skipped,
/// so this can be done again after a stop. `rename_keeps`: whether the server keeps a
/// collection's options on a rename, probed once (in `from`) when first needed.
///
/// # Errors
/// [`RestoreError::Target`] naming the namespace that could not be moved, recreated or
/// dropped; what was done before stays done.
pub async fn move_into_place(
    client: &Client,
    (from, to): (&str, &str),
    plan: &Plan,
    rename_keeps: &mut Option<bool>,
    replaced: &Replaced,
) -> Result<Moved, RestoreError> {
    let mut moved = Moved::default();
    let note = |ns: String| {
        replaced.lock().unwrap_or_else(|e| e.into_inner()).push(ns);
    };
    for coll in &plan.moves {
        let Some(spec) = collection_spec(client, from, coll).await? else {
            continue;
        };
        let options = spec.get_document("options").cloned().unwrap_or_default();
        moved.documents += client
            .database(from)
            .collection::<Document>(coll)
            .estimated_document_count()
            .await
            .map_err(|e| RestoreError::Target(format!("counting {from}.{coll}: {e}")))?
            as i64;
        if rename_keeps.is_none() && !options.is_empty() {
            *rename_keeps = Some(rename_keeps_options(client, from).await);
        }
        if options.is_empty() || *rename_keeps == Some(true) {
            client
                .database("admin")
                .run_command(doc! {
                    "renameCollection": format!("{from}.{coll}"),
                    "to": format!("{to}.{coll}"),
                    "dropTarget": true,
                })
                .await
                .map_err(|e| {
                    RestoreError::Target(format!("renaming {from}.{coll} to {to}.{coll}: {e}"))
                })?;
        } else {
            // This server loses options (capped, validator, collation...) on a rename:
            // recreate the collection with them and copy. The source is dropped last, so
            // a copy stopped half-way is done again from the start.
            copy_collection(client, (from, coll), (to, coll), options).await?;
        }
        note(format!("{to}.{coll}"));
        moved.namespaces += 1;
    }
    for view in &plan.views {
        let Some(spec) = collection_spec(client, from, view).await? else {
            continue;
        };
        let target = client.database(to);
        target
            .collection::<Document>(view)
            .drop()
            .await
            .map_err(|e| RestoreError::Target(format!("dropping view {to}.{view}: {e}")))?;
        let mut create = doc! {"create": view};
        for (k, v) in spec.get_document("options").cloned().unwrap_or_default() {
            create.insert(k, v);
        }
        target
            .run_command(create)
            .await
            .map_err(|e| RestoreError::Target(format!("creating view {to}.{view}: {e}")))?;
        note(format!("{to}.{view}"));
        moved.namespaces += 1;
    }
    for coll in &plan.drops {
        client
            .database(to)
            .collection::<Document>(coll)
            .drop()
            .await
            .map_err(|e| {
                RestoreError::Target(format!(
                    "dropping {to}.{coll}, which the oplog dropped: {e}"
                ))
            })?;
        note(format!("{to}.{coll}"));
        moved.dropped += 1;
    }
    Ok(moved)
}

/// `database <name>`, as a leftover is shown in reports.
fn shown(name: &str) -> String {
    format!("database {name}")
}

/// Puts right the leftovers of `mongo`'s interrupted restores (see the module docs), job by
/// job, but those of the jobs in `skip`. A database is a leftover when its name is exactly
/// a scratch name ([`parse`]) and its marker names this datastore, that job, and a target
/// whose scratch name it is; one whose target is not where this datastore restores the
/// marker's database now (`rename` changed, or another agent's datastore of the same name
/// shares the server) is kept and named.
///
/// # Errors
/// [`RestoreError::Target`]: the databases or their markers cannot be read (the server
/// does not answer within 30 s); nothing was touched then.
pub async fn recover(mongo: &Mongo, skip: &[String]) -> Result<Vec<Recovered>, RestoreError> {
    let client = mongo.client().await.map_err(RestoreError::Target)?;
    let names = tokio::time::timeout(
        std::time::Duration::from_secs(RECOVER_TIMEOUT_SECONDS),
        client.list_database_names(),
    )
    .await
    .map_err(|_| {
        RestoreError::Target(format!(
            "MongoDB at {} did not list its databases within {RECOVER_TIMEOUT_SECONDS} s",
            mongo.cfg.uri
        ))
    })?
    .map_err(|e| RestoreError::Target(format!("listing the databases: {e}")))?;
    let mut out = Vec::new();
    let mut jobs: BTreeMap<String, Vec<(String, Marker)>> = BTreeMap::new();
    for name in names {
        let Some(job) = parse(&name) else { continue };
        if skipped(&job, skip) {
            continue;
        }
        let Some(marker) = read(&client, &name).await? else {
            continue;
        };
        if marker.datastore != mongo.name()
            || !marker.job.eq_ignore_ascii_case(&job)
            || scratch_name(&marker.target, &job) != name
        {
            continue;
        }
        let now = mongo.target_db(&marker.source);
        if now != marker.target {
            let stage = match marker.state {
                State::Filling => format!("{} was not touched", marker.target),
                State::Swapping => format!(
                    "it was stopped while it moved this into {}, which may be partly replaced: restore it again",
                    marker.target
                ),
            };
            out.push(Recovered::new(
                &job,
                shown(&name),
                Action::Kept {
                    why: format!(
                        "a restore of database {} into {} by a datastore named {:?}, but this one restores {} into {now}; \
                         {stage}; drop it by hand once no restore of another agent uses it",
                        marker.source,
                        marker.target,
                        marker.datastore,
                        marker.source
                    ),
                },
            ));
            continue;
        }
        jobs.entry(job).or_default().push((name, marker));
    }
    for (job, scratch) in jobs {
        if scratch.iter().all(|(_, m)| m.state == State::Filling) {
            for (name, _) in &scratch {
                out.push(drop_scratch(&client, &job, name).await);
            }
        } else {
            out.extend(finish(&client, &job, scratch).await);
        }
    }
    // In job order (a ULID sorts by time), each job's in the order done.
    out.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    Ok(out)
}

/// Drops scratch database `name` of `job`, and says what became of it.
async fn drop_scratch(client: &Client, job: &str, name: &str) -> Recovered {
    match client.database(name).drop().await {
        Ok(()) => Recovered::new(job, shown(name), Action::Removed),
        Err(e) => Recovered::new(
            job,
            shown(name),
            Action::Kept {
                why: format!("cannot drop it: {e}; drop it by hand"),
            },
        ),
    }
}

/// Finishes the move of a job that had passed its commit point (see the module docs).
async fn finish(client: &Client, job: &str, scratch: Vec<(String, Marker)>) -> Vec<Recovered> {
    let mut out = Vec::new();
    // Every marker first: a stop from here on finishes every target too, never drops the
    // rest of one as if the job had not reached its commit point.
    for (name, marker) in &scratch {
        if marker.state == State::Swapping {
            continue;
        }
        if let Err(e) = set_state(client, name, State::Swapping).await {
            let targets: Vec<&str> = scratch.iter().map(|(_, m)| m.target.as_str()).collect();
            return scratch
                .iter()
                .map(|(name, m)| {
                    Recovered::new(
                        job,
                        shown(name),
                        Action::Kept {
                            why: format!(
                                "job {job} was stopped while it moved its checked restore into {}, which may be partly \
                                 replaced; the rest of {} is here, and it cannot be finished now ({e}): the agent tries \
                                 again before the next restore",
                                targets.join(", "),
                                m.target
                            ),
                        },
                    )
                })
                .collect();
        }
    }
    let replaced = Replaced::default();
    let mut rename_keeps = None;
    for (name, marker) in &scratch {
        let target = &marker.target;
        let Some(plan) = &marker.plan else {
            out.push(Recovered::new(
                job,
                shown(name),
                Action::Kept {
                    why: format!(
                        "its marker says job {job} was moving it into {target} but holds no plan of the move; \
                         {target} may be partly replaced: restore it again, then drop this by hand"
                    ),
                },
            ));
            continue;
        };
        match move_into_place(client, (name, target), plan, &mut rename_keeps, &replaced).await {
            Ok(moved) => {
                tracing::info!(job_id = %job, database = %name, %target, namespaces = moved.namespaces,
                    documents = moved.documents, dropped = moved.dropped,
                    "Finished moving an interrupted MongoDB restore into place.");
                out.push(Recovered::new(
                    job,
                    shown(name),
                    Action::SwappedIn {
                        target: shown(target),
                    },
                ));
                out.push(drop_scratch(client, job, name).await);
            }
            Err(e) => out.push(Recovered::new(
                job,
                shown(name),
                Action::Kept {
                    why: format!(
                        "job {job} was stopped while it moved its checked restore into {target}, which is partly \
                         replaced; the rest is here and cannot be moved now ({e}): the agent tries again before the \
                         next restore; or restore again"
                    ),
                },
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "01JAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn scratch_names_carry_the_whole_job_id_and_fit_mongodb() {
        let name = scratch_name("app", JOB);
        assert_eq!(name, "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa");
        assert_eq!(parse(&name).as_deref(), Some(JOB));
        let long = "a_very_long_database_name_for_staging_of_the_shop";
        let cut = scratch_name(long, JOB);
        assert_eq!(cut.len(), MAX_DB_NAME);
        assert!(
            long.starts_with(
                cut.strip_suffix(&format!("{NEW_TAG}01jaaaaaaaaaaaaaaaaaaaaaaa"))
                    .unwrap()
            )
        );
        assert_eq!(parse(&cut).as_deref(), Some(JOB));
        // Cut at a character boundary.
        let wide = "é".repeat(20);
        let cut = scratch_name(&wide, JOB);
        assert!(cut.len() <= MAX_DB_NAME, "{cut}");
        assert_eq!(parse(&cut).as_deref(), Some(JOB));
    }

    #[test]
    fn lookalike_names_of_other_databases_are_not_scratch_names() {
        for other in [
            "app",
            "app__ferry_new_backup",
            // The job id in upper case: not how a restore writes it.
            "app__ferry_new_01JAAAAAAAAAAAAAAAAAAAAAAA",
            // The other kinds' tags, and the names of older agents (8 characters).
            "app__ferry_old_01jaaaaaaaaaaaaaaaaaaaaaaa",
            "app__ferry_swap_01jaaaaaaaaaaaaaaaaaaaaaaa",
            "app__ferry_aaaaaaaa",
            // No target, a character too many or too few, not a ULID.
            "__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa",
            "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaax",
            "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaa",
            "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaau",
            "app_ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa",
            "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa_copy",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_marker_reads_back_what_was_written() {
        let plan = Plan {
            moves: vec!["users".into(), "orders".into()],
            views: vec!["active".into()],
            drops: vec!["gone".into()],
        };
        let d = doc! {
            "_id": MARKER_ID, "datastore": "mongo", "job": JOB, "source": "shop",
            "target": "shop_staging", "state": "swapping", "plan": plan.to_document(),
        };
        assert_eq!(
            Marker::from_document(&d),
            Some(Marker {
                datastore: "mongo".into(),
                job: JOB.into(),
                source: "shop".into(),
                target: "shop_staging".into(),
                state: State::Swapping,
                plan: Some(plan),
            })
        );
        let mut filling = d.clone();
        filling.insert("state", "filling");
        filling.remove("plan");
        assert_eq!(
            Marker::from_document(&filling).map(|m| (m.state, m.plan)),
            Some((State::Filling, None))
        );
        // Anything else is not a marker Ferry wrote.
        let mut odd = d.clone();
        odd.insert("state", "done");
        assert_eq!(Marker::from_document(&odd), None);
        let mut odd = d;
        odd.remove("target");
        assert_eq!(Marker::from_document(&odd), None);
    }
}
