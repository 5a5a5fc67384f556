//! Leftovers of interrupted restores, and how the agent puts them right.
//!
//! A restore builds beside its target under names that carry its job id (a ULID), and
//! swaps at the end:
//! - `files` and etcd: `<parent>/.<name>.ferry-new-<job>` (the restored tree),
//!   `.<name>.ferry-old-<job>` (the target, moved aside during the swap), and etcd's
//!   `.<name>.ferry-snapshot-<job>` (the downloaded snapshot file);
//! - PostgreSQL: the databases `<target>__ferry_new_<job>` and `<target>__ferry_old_<job>`
//!   (the job id in lower case, the target's name cut so that the whole fits 63 bytes);
//! - InfluxDB: the databases `<target>__ferry_new_<job>` (verified copies) and
//!   `<target>__ferry_swap_<job>` (empty markers: "the target is being replaced"), and the
//!   unpacked backup in `<scratch_dir>/ferry-influxdb-<datastore>-<job>`;
//! - MongoDB: the databases `<target>__ferry_new_<job>` (the job id in lower case, the
//!   target's name cut to fit 63 bytes), each holding a marker that names its datastore,
//!   target and state; MongoDB moves collection by collection into the live target and keeps
//!   no old copy, so its commit point is a marker set to `swapping`, and a swap past it is
//!   finished ([`super::mongodb::swap`]).
//!
//! A restore killed (kill -9, a host that died) leaves them behind, and a retry of the same
//! job meets its own names again. So on start, and before each restore, the agent looks for
//! the leftovers of its configured datastores (these exact names for their own targets,
//! nothing else), skips those of jobs still running in this agent, and puts each job's
//! leftovers right: [`plan`] says how from what exists. Each kind does it with its own
//! operations; [`recover_dir`] does it for directories.
//!
//! The swap is `target → old`, `new → target`, remove `old`. The new copy is moved only
//! after it was checked against the manifest, so the first rename is the commit point:
//! before it, the new copy is scratch and is removed (the target is as it was); after it,
//! the swap is finished (the target then holds the checked restore).

use std::fmt;
use std::fs;
use std::path::Path;

use futures::future::BoxFuture;

/// What was done with one leftover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Removed: scratch data of a restore that had not reached its swap, or the old copy
    /// of a target whose swap had completed.
    Removed,
    /// Moved under the target's name, finishing a swap that had moved the target aside.
    SwappedIn {
        /// The target (a path or a database name).
        target: String,
    },
    /// Moved back under the target's name: the swap had moved the target aside and the
    /// restored copy could not take its place.
    MovedBack {
        /// The target (a path or a database name).
        target: String,
    },
    /// Left in place: why, and what the operator should do.
    Kept {
        /// A sentence for the operator.
        why: String,
    },
}

/// One leftover of an interrupted restore, and what the agent did with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The job whose restore left it (upper-case ULID).
    pub job_id: String,
    /// What it is, e.g. `/srv/.data.ferry-new-01J...` or `database app__ferry_new_01j...`.
    pub leftover: String,
    /// What was done.
    pub action: Action,
}

impl Recovered {
    /// A leftover of `job_id` and what was done with it.
    pub fn new(job_id: &str, leftover: impl Into<String>, action: Action) -> Self {
        Recovered {
            job_id: job_id.to_ascii_uppercase(),
            leftover: leftover.into(),
            action,
        }
    }

    /// The action as one word, for logs: `removed`, `swapped_in`, `moved_back`, `kept`.
    pub fn action_name(&self) -> &'static str {
        match self.action {
            Action::Removed => "removed",
            Action::SwappedIn { .. } => "swapped_in",
            Action::MovedBack { .. } => "moved_back",
            Action::Kept { .. } => "kept",
        }
    }
}

impl fmt::Display for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (leftover, job) = (&self.leftover, &self.job_id);
        match &self.action {
            Action::Removed => write!(f, "removed {leftover} (job {job})"),
            Action::SwappedIn { target } => write!(
                f,
                "put {leftover} in place of {target}, finishing the swap of job {job}: {target} holds that job's checked restore"
            ),
            Action::MovedBack { target } => write!(
                f,
                "moved {leftover} back to {target} (job {job} had moved it aside): {target} holds what it held before that job"
            ),
            Action::Kept { why } => write!(f, "kept {leftover} (job {job}): {why}"),
        }
    }
}

/// How to put one job's leftovers right, from what exists of the target, its old copy
/// (moved aside by the swap) and its new copy (the restore).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing of the swap is left.
    Nothing,
    /// The swap had not begun: remove the new copy; the target is as it was.
    RemoveNew,
    /// The target was moved aside and the new copy not yet moved in: move it in, then
    /// remove the old copy; if it cannot be moved in, move the old copy back and remove
    /// the new one.
    FinishSwap,
    /// The target was moved aside and the new copy is gone: move the old copy back.
    MoveOldBack,
    /// The swap moved the new copy in: remove the old copy.
    RemoveOld,
    /// The target, its old copy and the new copy all exist: something other than the
    /// swap made the target again after it was moved aside. Neither copy is provably
    /// scratch; keep both and say so.
    KeepBoth,
}

/// The [`Plan`] for one job, from whether the target, the old and the new copy exist.
pub fn plan(target: bool, old: bool, new: bool) -> Plan {
    match (target, old, new) {
        (_, false, false) => Plan::Nothing,
        (_, false, true) => Plan::RemoveNew,
        (false, true, true) => Plan::FinishSwap,
        (false, true, false) => Plan::MoveOldBack,
        (true, true, false) => Plan::RemoveOld,
        (true, true, true) => Plan::KeepBoth,
    }
}

/// The upper-case job id if `s` is a ULID (26 Crockford base-32 characters, either case).
pub fn job_id(s: &str) -> Option<String> {
    let upper = s.to_ascii_uppercase();
    (upper.len() == 26
        && upper.bytes().all(|b| b.is_ascii_alphanumeric())
        && ulid::Ulid::from_string(&upper).is_ok())
    .then_some(upper)
}

/// Whether `job` is one of `skip` (job ids, either case).
pub fn skipped(job: &str, skip: &[String]) -> bool {
    skip.iter().any(|s| s.eq_ignore_ascii_case(job))
}

/// Whether something (a file, a directory, a link) is at `p`, without following a link.
fn present(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Removes what is at `p` (a tree, a file or a link; a link is never followed).
fn remove(p: &Path) -> std::io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The operations a recovery needs on a target and its copies, named as the kind names
/// them (paths, database names).
pub trait Store: Send {
    /// Renames `from` to `to` (which does not exist).
    fn rename<'a>(&'a mut self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Removes `name` and everything in it.
    fn remove<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// How `name` is shown in a report, e.g. `database app__ferry_new_...`.
    fn show(&self, name: &str) -> String {
        name.to_owned()
    }
}

/// One job's swap: the target, its old and new copies, and which of the three exist.
#[derive(Clone, Copy, Debug)]
pub struct Swap<'a> {
    /// The job (a ULID).
    pub job: &'a str,
    /// The target's name.
    pub target: &'a str,
    /// Its copy moved aside by the swap.
    pub old: &'a str,
    /// The restored copy.
    pub new: &'a str,
    /// Whether the target, the old and the new copy exist.
    pub exists: (bool, bool, bool),
}

/// Carries out the [`plan`] of one job's `swap` with `store`; what became of each
/// leftover (none if nothing was left).
pub async fn recover_swap(store: &mut dyn Store, swap: Swap<'_>) -> Vec<Recovered> {
    let Swap {
        job,
        target,
        old,
        new,
        exists: (t, o, n),
    } = swap;
    let shown_target = store.show(target);
    let at = |store: &dyn Store, name: &str, action: Action| {
        Recovered::new(job, store.show(name), action)
    };
    match plan(t, o, n) {
        Plan::Nothing => Vec::new(),
        Plan::RemoveNew => vec![remove_one(store, job, new).await],
        Plan::RemoveOld => vec![remove_one(store, job, old).await],
        Plan::MoveOldBack => vec![match store.rename(old, target).await {
            Ok(()) => at(
                store,
                old,
                Action::MovedBack {
                    target: shown_target,
                },
            ),
            Err(e) => at(
                store,
                old,
                Action::Kept {
                    why: format!(
                        "{shown_target} is missing and this is what it held before; it cannot be moved back: {e}; move it back by hand"
                    ),
                },
            ),
        }],
        Plan::FinishSwap => match store.rename(new, target).await {
            Ok(()) => vec![
                at(
                    store,
                    new,
                    Action::SwappedIn {
                        target: shown_target,
                    },
                ),
                remove_one(store, job, old).await,
            ],
            Err(e) => match store.rename(old, target).await {
                Ok(()) => {
                    tracing::warn!(leftover = %store.show(new), target = %shown_target, error = %e,
                        "Cannot finish an interrupted swap; moving the previous copy back.");
                    vec![
                        at(
                            store,
                            old,
                            Action::MovedBack {
                                target: shown_target,
                            },
                        ),
                        remove_one(store, job, new).await,
                    ]
                }
                Err(e2) => vec![
                    at(
                        store,
                        new,
                        Action::Kept {
                            why: format!(
                                "{shown_target} is missing; this restored copy cannot be moved there ({e}), nor the previous one back ({e2}); move one of them there by hand"
                            ),
                        },
                    ),
                    at(
                        store,
                        old,
                        Action::Kept {
                            why: format!(
                                "what {shown_target} held before, kept with the restored copy"
                            ),
                        },
                    ),
                ],
            },
        },
        Plan::KeepBoth => vec![
            at(
                store,
                old,
                Action::Kept {
                    why: format!(
                        "what {shown_target} held before that job moved it aside; something else made {shown_target} again since: \
                         compare them, keep one and remove the others by hand"
                    ),
                },
            ),
            at(
                store,
                new,
                Action::Kept {
                    why: format!(
                        "that job's restored (checked) copy, never moved to {shown_target}"
                    ),
                },
            ),
        ],
    }
}

/// Removes `name` with `store`, and says what became of it.
async fn remove_one(store: &mut dyn Store, job: &str, name: &str) -> Recovered {
    let shown = store.show(name);
    match store.remove(name).await {
        Ok(()) => Recovered::new(job, shown, Action::Removed),
        Err(e) => Recovered::new(
            job,
            shown,
            Action::Kept {
                why: format!("cannot remove it: {e}; remove it by hand"),
            },
        ),
    }
}

/// The file system as a [`Store`]: names are paths. Blocking: use it on a blocking thread.
struct Files;

impl Store for Files {
    fn rename<'a>(&'a mut self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { fs::rename(from, to).map_err(|e| e.to_string()) })
    }
    fn remove<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { remove(Path::new(name)).map_err(|e| e.to_string()) })
    }
}

/// The leftovers beside `target` by job: the jobs that have a sibling
/// `.<name>.ferry-<what>-<job>` with `what` one of `new`, `old` or `scratch`, in job
/// order (a ULID sorts by time).
///
/// # Errors
/// The parent directory cannot be listed (a missing parent has no leftovers).
pub fn sibling_jobs(target: &Path, scratch: &[&str]) -> std::io::Result<Vec<String>> {
    let (Some(parent), Some(base)) = (target.parent(), target.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!(".{}.ferry-", base.to_string_lossy());
    let entries = match fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut jobs = std::collections::BTreeSet::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((what, job)) = rest.split_once('-') else {
            continue;
        };
        let known = what == "new" || what == "old" || scratch.contains(&what);
        // Exactly the name a restore gives: the job id as the agent writes it.
        if let Some(id) = job_id(job).filter(|id| known && id == job) {
            jobs.insert(id);
        }
    }
    Ok(jobs.into_iter().collect())
}

/// Puts right the leftovers beside the directory `target` of every job not in `skip`
/// (see the module docs): the siblings `new` and `old` by [`plan`], and the siblings
/// named in `scratch` (e.g. etcd's `snapshot`), which are only ever a restore's input,
/// removed. Blocking: call it on a blocking thread.
///
/// # Errors
/// The parent directory cannot be listed; nothing was touched.
pub fn recover_dir(
    target: &Path,
    scratch: &[&str],
    skip: &[String],
) -> std::io::Result<Vec<Recovered>> {
    recover_dir_with(&mut Files, target, scratch, skip)
}

fn recover_dir_with(
    store: &mut dyn Store,
    target: &Path,
    scratch: &[&str],
    skip: &[String],
) -> std::io::Result<Vec<Recovered>> {
    let mut out = Vec::new();
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let t = path(target);
    for job in sibling_jobs(target, scratch)? {
        if skipped(&job, skip) {
            continue;
        }
        for what in scratch {
            let p = super::tree::sibling(target, what, &job);
            if present(&p) {
                out.push(futures::executor::block_on(remove_one(
                    store,
                    &job,
                    &path(&p),
                )));
            }
        }
        let new = super::tree::sibling(target, "new", &job);
        let old = super::tree::sibling(target, "old", &job);
        let (old_name, new_name) = (path(&old), path(&new));
        let swap = Swap {
            job: &job,
            target: &t,
            old: &old_name,
            new: &new_name,
            exists: (present(target), present(&old), present(&new)),
        };
        out.extend(futures::executor::block_on(recover_swap(store, swap)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const JOB: &str = "01JAAAAAAAAAAAAAAAAAAAAAAA";

    /// A directory holding `marker`, so a test can tell the trees apart.
    fn tree(p: &Path, marker: &str) {
        fs::create_dir_all(p.join("sub")).unwrap();
        fs::write(p.join("sub/marker"), marker).unwrap();
    }

    fn marker(p: &Path) -> String {
        fs::read_to_string(p.join("sub/marker")).unwrap()
    }

    /// `target`, `old` and `new` of [`JOB`] in a temporary directory.
    fn layout() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data");
        let old = super::super::tree::sibling(&target, "old", JOB);
        let new = super::super::tree::sibling(&target, "new", JOB);
        (dir, target, old, new)
    }

    fn left(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_plan_follows_the_commit_point_of_the_swap() {
        // (target, old, new)
        assert_eq!(plan(true, false, false), Plan::Nothing);
        assert_eq!(plan(false, false, false), Plan::Nothing);
        assert_eq!(plan(true, false, true), Plan::RemoveNew);
        assert_eq!(plan(false, false, true), Plan::RemoveNew);
        assert_eq!(plan(false, true, true), Plan::FinishSwap);
        assert_eq!(plan(false, true, false), Plan::MoveOldBack);
        assert_eq!(plan(true, true, false), Plan::RemoveOld);
        assert_eq!(plan(true, true, true), Plan::KeepBoth);
    }

    #[test]
    fn killed_during_the_unpack_the_partial_tree_is_removed_and_the_target_kept() {
        let (dir, target, _old, new) = layout();
        tree(&target, "live");
        tree(&new, "half");
        let done = recover_dir(&target, &[], &[]).unwrap();
        assert_eq!(
            done,
            [Recovered::new(
                JOB,
                new.display().to_string(),
                Action::Removed
            )]
        );
        assert_eq!(marker(&target), "live");
        assert_eq!(left(dir.path()), ["data"]);
    }

    #[test]
    fn killed_after_moving_the_target_aside_the_swap_is_finished() {
        let (dir, target, old, new) = layout();
        tree(&old, "live");
        tree(&new, "restored");
        let done = recover_dir(&target, &[], &[]).unwrap();
        assert_eq!(marker(&target), "restored");
        assert_eq!(left(dir.path()), ["data"]);
        assert_eq!(done[0].action_name(), "swapped_in");
        assert_eq!(done[1].action, Action::Removed);
        assert!(
            done[0].to_string().contains("finishing the swap"),
            "{}",
            done[0]
        );
    }

    #[test]
    fn killed_after_moving_the_new_tree_in_the_old_one_is_removed() {
        let (dir, target, old, _new) = layout();
        tree(&target, "restored");
        tree(&old, "live");
        // Half removed already: removal goes on from where it stopped.
        fs::remove_file(old.join("sub/marker")).unwrap();
        let done = recover_dir(&target, &[], &[]).unwrap();
        assert_eq!(
            done,
            [Recovered::new(
                JOB,
                old.display().to_string(),
                Action::Removed
            )]
        );
        assert_eq!(marker(&target), "restored");
        assert_eq!(left(dir.path()), ["data"]);
    }

    #[test]
    fn a_target_moved_aside_whose_new_tree_is_gone_is_moved_back() {
        let (dir, target, old, _new) = layout();
        tree(&old, "live");
        let done = recover_dir(&target, &[], &[]).unwrap();
        assert_eq!(done[0].action_name(), "moved_back");
        assert_eq!(marker(&target), "live");
        assert_eq!(left(dir.path()), ["data"]);
    }

    #[test]
    fn a_first_restore_killed_before_its_rename_leaves_no_target() {
        let (dir, target, _old, new) = layout();
        tree(&new, "restored");
        recover_dir(&target, &[], &[]).unwrap();
        assert!(left(dir.path()).is_empty());
    }

    #[test]
    fn a_target_made_again_by_something_else_keeps_both_copies() {
        let (dir, target, old, new) = layout();
        tree(&target, "made by a service");
        tree(&old, "live");
        tree(&new, "restored");
        let done = recover_dir(&target, &[], &[]).unwrap();
        assert!(done.iter().all(|r| r.action_name() == "kept"), "{done:?}");
        assert_eq!(left(dir.path()).len(), 3);
        assert_eq!(marker(&old), "live");
        assert_eq!(marker(&new), "restored");
    }

    /// The file system, except that renaming a name containing `refuse` fails (as renaming
    /// a mount point does, EBUSY).
    struct Refusing(&'static str);

    impl Store for Refusing {
        fn rename<'a>(
            &'a mut self,
            from: &'a str,
            to: &'a str,
        ) -> BoxFuture<'a, Result<(), String>> {
            if from.contains(self.0) {
                return Box::pin(async { Err("Device or resource busy".to_owned()) });
            }
            Box::pin(async move { fs::rename(from, to).map_err(|e| e.to_string()) })
        }
        fn remove<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move { remove(Path::new(name)).map_err(|e| e.to_string()) })
        }
    }

    #[test]
    fn a_new_tree_that_cannot_be_moved_in_puts_the_old_one_back() {
        let (dir, target, old, new) = layout();
        tree(&old, "live");
        tree(&new, "restored");
        let done = recover_dir_with(&mut Refusing("ferry-new-"), &target, &[], &[]).unwrap();
        assert_eq!(marker(&target), "live");
        assert_eq!(left(dir.path()), ["data"]);
        assert_eq!(
            done.iter().map(Recovered::action_name).collect::<Vec<_>>(),
            ["moved_back", "removed"]
        );
    }

    #[test]
    fn when_neither_copy_can_be_moved_in_both_are_kept_and_named() {
        let (dir, target, old, new) = layout();
        tree(&old, "live");
        tree(&new, "restored");
        let done = recover_dir_with(&mut Refusing(".data.ferry-"), &target, &[], &[]).unwrap();
        assert_eq!(left(dir.path()).len(), 2);
        assert!(done.iter().all(|r| r.action_name() == "kept"), "{done:?}");
        assert!(done[0].to_string().contains("by hand"), "{}", done[0]);
        assert_eq!(
            (marker(&old), marker(&new)),
            ("live".into(), "restored".into())
        );
    }

    #[test]
    fn scratch_files_of_a_job_are_removed_and_running_jobs_and_other_names_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("member");
        tree(&target, "live");
        let running = "01JBBBBBBBBBBBBBBBBBBBBBBB";
        let snapshot = super::super::tree::sibling(&target, "snapshot", JOB);
        fs::write(&snapshot, b"half a snapshot").unwrap();
        tree(
            &super::super::tree::sibling(&target, "new", running),
            "busy",
        );
        fs::write(
            super::super::tree::sibling(&target, "snapshot", running),
            b"x",
        )
        .unwrap();
        // Not Ferry's, or not this target's: never touched.
        for other in [
            ".member.ferry-new-notaulid",
            ".member.ferry-new-01jaaaaaaaaaaaaaaaaaaaaaaa",
            ".member.ferry-other-01JAAAAAAAAAAAAAAAAAAAAAAA",
            ".member2.ferry-new-01JAAAAAAAAAAAAAAAAAAAAAAA",
            "member.ferry-new-01JAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            tree(&dir.path().join(other), "not ours");
        }
        let done = recover_dir(&target, &["snapshot"], &[running.to_owned()]).unwrap();
        assert_eq!(
            done,
            [Recovered::new(
                JOB,
                snapshot.display().to_string(),
                Action::Removed
            )]
        );
        assert_eq!(left(dir.path()).len(), 1 + 2 + 5, "{:?}", left(dir.path()));
        assert_eq!(marker(&target), "live");
    }

    #[test]
    fn job_ids_are_ulids_in_either_case() {
        assert_eq!(job_id(&JOB.to_lowercase()).as_deref(), Some(JOB));
        assert_eq!(job_id("01JAAAAAAAAAAAAAAAAAAAAAA"), None);
        assert_eq!(job_id("01JAAAAAAAAAAAAAAAAAAAAAA-"), None);
        assert_eq!(job_id("01JAAAAAAAAAAAAAAAAAAAAAAU"), None);
        assert!(skipped(JOB, &[JOB.to_lowercase()]));
    }
}
