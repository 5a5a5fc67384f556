//! The pipeline against the in-memory target ([`ferry_storage::memory`]) and a datastore
//! of this test's own: what a user of backups checks, without a server or a database.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::{Keys, Settings};
use crate::datastore::{
    CheckError, Datastore, DumpError, DumpOutcome, DumpStream, Dumper, Mode, Part, PartSink,
    RestoreError, RestoreSession, Restorer,
};
use crate::job::{JobError, Progress};
use crate::pipeline::encrypt::{self, Decryption, Encryption};
use ferry_core::manifest::Manifest;
use ferry_storage::memory::MemoryTarget;

const PARTS: &[Part] = &[Part {
    name: "",
    format: "raw",
}];

/// What the test datastore's restores did.
#[derive(Default)]
struct Restored {
    /// Bytes written by the parts.
    bytes: Vec<u8>,
    /// Commits.
    commits: u32,
    /// Aborts.
    aborts: u32,
}

/// A datastore whose dump is `data` (cut short by an error after `fail_after` bytes, if
/// set) and whose restores go into `restored`.
struct TestStore {
    data: Vec<u8>,
    fail_after: Option<usize>,
    restored: Arc<Mutex<Restored>>,
}

impl TestStore {
    fn new(data: Vec<u8>) -> Arc<TestStore> {
        Arc::new(TestStore {
            data,
            fail_after: None,
            restored: Arc::default(),
        })
    }
}

/// Gives `data`, then fails with an I/O error if `fail` (a dump tool that died).
struct DumpReader {
    data: io::Cursor<Vec<u8>>,
    fail: bool,
}

impl Read for DumpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.data.read(buf)? {
            0 if self.fail => Err(io::Error::other("the dump tool died half-way")),
            n => Ok(n),
        }
    }
}

impl Datastore for TestStore {
    fn name(&self) -> &str {
        "db"
    }
    fn kind(&self) -> &'static str {
        "test"
    }
    fn tool_versions(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        Box::pin(async { Ok(String::new()) })
    }
    fn mode(&self) -> Mode<'_> {
        Mode::streamed(self)
    }
}

impl Dumper for TestStore {
    fn parts(&self) -> &'static [Part] {
        PARTS
    }
    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        let (data, fail) = match self.fail_after {
            Some(n) => (self.data[..n].to_vec(), true),
            None => (self.data.clone(), false),
        };
        Box::pin(async move {
            Ok(DumpStream {
                reader: Box::new(DumpReader {
                    data: io::Cursor::new(data),
                    fail,
                }),
                finish: Box::pin(async move {
                    if fail {
                        Err(DumpError::Source("the dump tool died half-way".into()))
                    } else {
                        Ok(DumpOutcome::default())
                    }
                }),
            })
        })
    }
}

/// Appends to the shared restored bytes.
struct Sink(Arc<Mutex<Restored>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Session(Arc<Mutex<Restored>>);

impl RestoreSession for Session {
    fn part<'a>(
        &'a mut self,
        _manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        let sink = Sink(self.0.clone());
        Box::pin(async move {
            Ok(PartSink {
                writer: Box::new(sink),
                finish: Box::pin(async { Ok(()) }),
            })
        })
    }
    fn commit<'a>(&'a mut self, main: &'a Manifest) -> BoxFuture<'a, Result<String, RestoreError>> {
        self.0.lock().unwrap().commits += 1;
        let summary = format!("restored {}", main.file);
        Box::pin(async move { Ok(summary) })
    }
    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        self.0.lock().unwrap().aborts += 1;
        Box::pin(async {})
    }
}

impl Restorer for TestStore {
    fn begin<'a>(
        &'a self,
        _main: &'a Manifest,
        _job_id: &'a str,
        _namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        let session: Box<dyn RestoreSession> = Box::new(Session(self.restored.clone()));
        Box::pin(async move { Ok(session) })
    }
    // Streamed beside the target and checked before commit, in one download: the
    // harder case for "checked before the restore commits".
    fn stages_part(&self, _manifest: &Manifest) -> bool {
        true
    }
}

/// A production and a staging agent of environment `prod` sharing `target`, and the
/// staging agent's identity file (kept alive with the settings).
struct Fleet {
    target: MemoryTarget,
    production: Arc<Settings>,
    staging: Arc<Settings>,
    _identity: tempfile::TempDir,
}

fn settings(target: &MemoryTarget, keys: Keys, source: Option<&str>) -> Arc<Settings> {
    let base = Settings::for_tests(Arc::new(target.clone()), keys);
    Arc::new(match source {
        Some(source) => Settings {
            role: ferry_proto::Role::Staging,
            environment: "staging".into(),
            source_environment: Some(source.to_owned()),
            ..base
        },
        None => Settings {
            environment: "prod".into(),
            ..base
        },
    })
}

fn fleet() -> Fleet {
    let target = MemoryTarget::default();
    let (secret, public) = encrypt::generate_identity();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("identity");
    std::fs::write(&file, secret).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let enc = Encryption::from_recipients(&[public]).unwrap();
    let dec = Decryption::from_identity_file(&file).unwrap();
    Fleet {
        production: settings(&target, Keys::Encrypt(enc), None),
        staging: settings(&target, Keys::Decrypt(dec), Some("prod")),
        target,
        _identity: dir,
    }
}

fn progress() -> Progress {
    Progress::new(CancellationToken::new())
}

/// Data of a few chunks that does not compress to nothing.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x % 7) as u8 + b'a'
        })
        .collect()
}

const JOB: &str = "01KBX8Z3E5M1Q2W3E4R5T6Y7U8";

/// The names a reader lists in the target's dated folders (no hidden partials).
fn visible(target: &MemoryTarget) -> Vec<String> {
    target
        .paths()
        .into_iter()
        .filter(|p| !p.rsplit('/').next().unwrap_or_default().starts_with('.'))
        .collect()
}

/// The staging agent's restore of the newest backup of `store`.
async fn restore_newest(
    fleet: &Fleet,
    store: &Arc<TestStore>,
) -> Result<crate::job::JobReport, JobError> {
    super::restore(
        fleet.staging.clone(),
        store.clone(),
        "01KBX8Z3E5M1Q2W3E4R5T6Y7U9".into(),
        (None, None, None),
        super::RestoreTo::default(),
        progress(),
    )
    .await
}

#[tokio::test]
async fn a_backup_restores_to_the_same_bytes() {
    let fleet = fleet();
    let bytes = data(3 * 1024 * 1024 + 17);
    let store = TestStore::new(bytes.clone());
    let report = super::backup(
        fleet.production.clone(),
        store.clone(),
        JOB.into(),
        progress(),
    )
    .await
    .unwrap();
    assert_eq!(report.bytes_uncompressed, bytes.len() as u64);
    assert_eq!(
        visible(&fleet.target),
        [
            report.stored_path.clone(),
            format!("{}.json", report.stored_path)
        ]
    );
    let restored = restore_newest(&fleet, &store).await.unwrap();
    assert_eq!(restored.stored_path, report.stored_path);
    let r = store.restored.lock().unwrap();
    assert_eq!(r.commits, 1);
    assert!(r.bytes == bytes, "the restored bytes differ from the dump");
}

#[tokio::test]
async fn a_dump_that_dies_half_way_leaves_nothing_on_the_target() {
    let fleet = fleet();
    let store = Arc::new(TestStore {
        data: data(2 * 1024 * 1024),
        fail_after: Some(1024 * 1024 + 5),
        restored: Arc::default(),
    });
    let e = super::backup(fleet.production.clone(), store, JOB.into(), progress())
        .await
        .unwrap_err();
    assert!(
        matches!(e, JobError::Dump { .. } | JobError::Stage { .. }),
        "{e}"
    );
    // Nothing under a final name, and the hidden partial removed too.
    assert_eq!(fleet.target.paths(), Vec::<String>::new());
}

#[tokio::test]
async fn a_second_backup_of_a_date_gets_a_stamp_with_the_time_and_overwrites_nothing() {
    let fleet = fleet();
    let first = TestStore::new(data(1000));
    let a = super::backup(fleet.production.clone(), first, JOB.into(), progress())
        .await
        .unwrap();
    let stored = fleet.target.get(&a.stored_path).unwrap();
    let b = super::backup(
        fleet.production.clone(),
        TestStore::new(data(2000)),
        JOB.into(),
        progress(),
    )
    .await
    .unwrap();
    assert_ne!(a.stored_path, b.stored_path);
    let date = &a.date;
    assert!(
        a.stored_path
            .ends_with(&format!("/db_backup_{date}.raw.zst.age")),
        "{}",
        a.stored_path
    );
    // `_<date>T<HHMM>Z`: the date and the minute.
    let name = b.stored_path.rsplit('/').next().unwrap();
    let stamp = name
        .strip_prefix(&format!("db_backup_{date}T"))
        .and_then(|s| s.strip_suffix("Z.raw.zst.age"))
        .unwrap_or_else(|| panic!("{name} has no _<date>T<HHMM>Z stamp"));
    assert!(
        stamp.len() == 4 && stamp.bytes().all(|b| b.is_ascii_digit()),
        "{name}"
    );
    assert_eq!(fleet.target.get(&a.stored_path).unwrap(), stored);
    assert_eq!(visible(&fleet.target).len(), 4);
}

#[tokio::test]
async fn a_corrupted_object_fails_the_restore_before_it_commits() {
    let fleet = fleet();
    let store = TestStore::new(data(2 * 1024 * 1024));
    let report = super::backup(
        fleet.production.clone(),
        store.clone(),
        JOB.into(),
        progress(),
    )
    .await
    .unwrap();
    // One byte flipped in the middle of the stored ciphertext, its size unchanged.
    assert!(fleet.target.tamper(&report.stored_path, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
    }));
    let e = restore_newest(&fleet, &store).await.unwrap_err();
    let JobError::Integrity(text) = &e else {
        panic!("not an integrity error: {e}");
    };
    assert!(
        text.contains(&report.stored_path) && text.contains("does not match its manifest"),
        "{text}"
    );
    let r = store.restored.lock().unwrap();
    assert_eq!((r.commits, r.aborts), (0, 1), "committed or not aborted");
}

/// A target that cannot be reached: every session fails to connect.
#[derive(Debug)]
struct Unreachable;

impl ferry_storage::Target for Unreachable {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn describe(&self) -> String {
        "backup.invalid:22".into()
    }
    fn environment_dir(&self, environment: &str) -> String {
        format!("/srv/ferry/{environment}")
    }
    fn write(&self) -> Result<Box<dyn ferry_storage::WriteSession>, ferry_storage::TargetError> {
        Err(self.down())
    }
    fn read(&self) -> Result<Box<dyn ferry_storage::ReadSession>, ferry_storage::TargetError> {
        Err(self.down())
    }
    fn maintain(
        &self,
    ) -> Result<Box<dyn ferry_storage::MaintainSession>, ferry_storage::TargetError> {
        Err(self.down())
    }
}

impl Unreachable {
    fn down(&self) -> ferry_storage::TargetError {
        ferry_storage::TargetError::Connect {
            addr: ferry_storage::Target::describe(self),
            message: "connection refused".into(),
        }
    }
}

/// Staging settings reading `primary`, with `copies`, holding `fleet`'s identity.
fn staging_with(
    fleet: &Fleet,
    primary: Arc<dyn ferry_storage::Target>,
    copies: Vec<(String, Arc<dyn ferry_storage::Target>)>,
) -> Arc<Settings> {
    let dec = Decryption::from_identity_file(&fleet._identity.path().join("identity")).unwrap();
    let base = settings(&fleet.target, Keys::Decrypt(dec), Some("prod"));
    let mut s = Arc::into_inner(base).unwrap();
    s.backup_server = primary;
    s.copies = copies;
    Arc::new(s)
}

#[tokio::test]
async fn a_restore_reads_a_copy_when_the_primary_cannot_be_reached_and_says_so() {
    let fleet = fleet();
    let bytes = data(2 * 1024 * 1024 + 3);
    let store = TestStore::new(bytes.clone());
    super::backup(
        fleet.production.clone(),
        store.clone(),
        JOB.into(),
        progress(),
    )
    .await
    .unwrap();
    // The copy holds what the primary held; the primary is down.
    let copy: Arc<dyn ferry_storage::Target> = Arc::new(fleet.target.clone());
    let staging = staging_with(
        &fleet,
        Arc::new(Unreachable),
        vec![("offsite".into(), copy.clone())],
    );
    let restore = |target: Option<&str>| {
        super::restore(
            staging.clone(),
            store.clone(),
            "01KBX8Z3E5M1Q2W3E4R5T6Y7U9".into(),
            (None, None, target.map(str::to_owned)),
            super::RestoreTo::default(),
            progress(),
        )
    };
    let report = restore(None).await.unwrap();
    assert_eq!(report.target, "offsite");
    assert!(
        report.summary.contains("read from copy offsite (")
            && report.summary.contains("the primary could not be reached"),
        "{}",
        report.summary
    );
    assert!(store.restored.lock().unwrap().bytes == bytes);
    // Asked for the primary, it does not fall back.
    let e = restore(Some("primary")).await.unwrap_err();
    assert!(
        e.to_string().contains("backup.invalid:22"),
        "not the primary's error: {e}"
    );
    // Asked for a copy by name, it reads that copy, and says no more.
    let report = restore(Some("offsite")).await.unwrap();
    assert_eq!(report.target, "offsite");
    assert!(
        !report.summary.contains("could not be reached"),
        "{}",
        report.summary
    );
    // A name it does not have.
    let e = restore(Some("elsewhere")).await.unwrap_err();
    assert!(matches!(e, JobError::InvalidArgument(_)), "{e}");
    // With no copy reachable either, both errors are said.
    let staging = staging_with(
        &fleet,
        Arc::new(Unreachable),
        vec![("offsite".into(), Arc::new(Unreachable))],
    );
    let e = super::restore(
        staging,
        store.clone(),
        "01KBX8Z3E5M1Q2W3E4R5T6Y7U9".into(),
        (None, None, None),
        super::RestoreTo::default(),
        progress(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("no copy could be read either (copy offsite:"),
        "{e}"
    );
}
