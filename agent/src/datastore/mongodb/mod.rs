//! MongoDB with the `mongodb` driver, no mongodump on the host. The dump is written in the
//! mongodump archive format ([`archive`]), so stock `mongorestore --archive` restores it:
//! every database except `admin`, `local` and `config` (or the configured list), each
//! collection and view with its options and indexes, documents as raw BSON straight from
//! the driver's batches.
//!
//! On a replica set the oplog over the dump window (from the entry at its start,
//! `ts >= start`, to the last at its end) is captured as the archive's `oplog` namespace
//! (what `mongodump --oplog` does) and its start and end timestamps go in the manifest; on
//! a standalone server the manifest says the dump is not point-in-time.
//!
//! Restore (staging), beside the live data: every database of the archive goes into a
//! scratch database `<target>__ferry_new_<job>` ([`swap`]): each collection created with its
//! options, filled with batched raw inserts, then given its indexes; then the views; then
//! the captured oplog replayed ([`oplog`]: every update form, the commands that change
//! data; an entry it cannot apply fails the restore, naming it). Document counts and index
//! names are compared with the manifest there, where the oplog did not change them. Only
//! then is each namespace moved into place with `--drop` semantics (`renameCollection`
//! with `dropTarget`; where the server loses collection options on a rename, which a probe
//! finds out, the collection is recreated with them and copied), views recreated, what the
//! oplog created moved too and what it dropped dropped in the target, and the scratch
//! databases dropped. A failure before the move leaves the target as it was; a marker in
//! each scratch database says whether the move had begun, so that the agent drops, or
//! finishes moving, the scratch databases of a restore that was stopped ([`swap`]).
//! Databases may be renamed (`rename = { app = "app_staging" }`, like mongorestore's
//! `--nsFrom/--nsTo`).

use std::io::{self, Read, Write};

use bson::doc;
use futures::FutureExt;
use futures::future::BoxFuture;
use mongodb::Client;
use tokio::sync::mpsc;

use super::common::leftovers::Recovered;
use super::{CheckError, Datastore, DumpError, Mode, Part, RestoreError};
use crate::pipeline::chunks;

pub mod archive;
mod config;
mod dump;
pub mod oplog;
mod restore;
pub mod slices;
pub mod swap;

pub use config::MongoConfig;
pub use restore::parse_metadata;

/// The only part: the archive.
pub const MAIN: Part = Part {
    name: "",
    format: "archive",
};

/// Most bytes of documents per archive segment (one document larger than that is a
/// segment of its own), and so per chunk between the dump task and the pipeline: a chunk's
/// room ([`chunks::CHUNK_BYTES`]) less 64 KiB for the segment's namespace header and
/// terminator, so that a chunk's buffer does not grow (a segment of 1 MiB and one
/// document made each chunk a 2 MiB buffer: heaptrack put 18.9 MiB of a four-job backup's
/// heap there, bench/ concurrent-jobs).
const SEGMENT_BYTES: usize = chunks::CHUNK_BYTES - 64 * 1024;

/// A built MongoDB datastore.
#[derive(Clone, Debug)]
pub struct Mongo {
    cfg: MongoConfig,
    password: Option<ferry_core::secrets::Password>,
}

/// A client that could not be made, or a server that refused or failed a command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `uri` does not parse, or its hosts do not resolve.
    #[error("MongoDB connection string {uri:?}: {error}")]
    ConnectionString {
        /// The configured connection string.
        uri: String,
        /// The driver's error.
        error: mongodb::error::Error,
    },
    /// No member matches `read_preference` (and its tags).
    #[error("no replica set member matches {preference}: {error}")]
    Selection {
        /// The preference, as configured.
        preference: String,
        /// The driver's error.
        error: mongodb::error::Error,
    },
    /// The client could not be made, or the server failed a command.
    #[error("MongoDB {uri}: {error}")]
    Server {
        /// The configured connection string.
        uri: String,
        /// The driver's error.
        error: mongodb::error::Error,
    },
}

impl From<ClientError> for DumpError {
    fn from(e: ClientError) -> Self {
        DumpError::Source(e.to_string())
    }
}

impl From<ClientError> for RestoreError {
    fn from(e: ClientError) -> Self {
        RestoreError::Target(e.to_string())
    }
}

impl From<ClientError> for CheckError {
    fn from(e: ClientError) -> Self {
        CheckError::Server(e.to_string())
    }
}

fn src(e: impl std::fmt::Display) -> DumpError {
    DumpError::Source(e.to_string())
}

fn tgt(e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Target(e.to_string())
}

impl Datastore for Mongo {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn replays_oplog(&self) -> bool {
        true
    }

    fn oplog_slices(&self) -> Option<(Mongo, u64)> {
        self.cfg.oplog_slice_seconds.map(|s| (self.clone(), s))
    }

    fn kind(&self) -> &'static str {
        "mongodb"
    }

    /// The driver's version; no external tool is used.
    fn tool_versions(&self) -> Vec<(String, String)> {
        vec![("mongodb driver".into(), "mongodb crate 3".into())]
    }

    /// Connects and reports the server version and databases.
    ///
    /// # Errors
    /// The connection or command error.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            let client = self.client().await?;
            let info = client
                .database("admin")
                .run_command(doc! {"buildInfo": 1})
                .await
                .map_err(|error| ClientError::Server {
                    uri: self.cfg.uri.clone(),
                    error,
                })?;
            let dbs = client
                .list_database_names()
                .await
                .map_err(|e| CheckError::Server(e.to_string()))?;
            Ok(format!(
                "MongoDB {} at {}, databases: {}",
                info.get_str("version").unwrap_or("?"),
                self.cfg.uri,
                dbs.join(", ")
            ))
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        Mode::streamed(self)
    }

    /// A restore may select `db.collection` namespaces.
    fn takes_namespaces(&self) -> bool {
        true
    }

    /// The scratch databases `<target>__ferry_new_<job>` whose marker names this datastore:
    /// dropped, or moved into place if their restore had passed its commit point
    /// ([`swap::recover`]).
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        swap::recover(self, skip).boxed()
    }
}

impl Mongo {
    async fn client(&self) -> Result<Client, ClientError> {
        let opts = self.options().await?;
        Client::with_options(opts).map_err(|error| ClientError::Server {
            uri: self.cfg.uri.clone(),
            error,
        })
    }

    /// The client options of the configured connection string, user and TLS.
    async fn options(&self) -> Result<mongodb::options::ClientOptions, ClientError> {
        let mut opts = mongodb::options::ClientOptions::parse(&self.cfg.uri)
            .await
            .map_err(|error| ClientError::ConnectionString {
                uri: self.cfg.uri.clone(),
                error,
            })?;
        opts.app_name = Some("ferry-agent".into());
        if let Some(user) = &self.cfg.user {
            opts.credential = Some(
                mongodb::options::Credential::builder()
                    .username(user.clone())
                    .password(self.password.as_ref().map(|p| p.0.clone()))
                    .source(
                        self.cfg
                            .auth_source
                            .clone()
                            .or_else(|| Some("admin".into())),
                    )
                    .build(),
            );
        }
        if let Some(ca) = &self.cfg.tls_ca_file {
            opts.tls = Some(mongodb::options::Tls::Enabled(
                mongodb::options::TlsOptions::builder()
                    .ca_file_path(ca.clone())
                    .build(),
            ));
        }
        Ok(opts)
    }

    /// The client production reads with (dumps, oplog slices), and where it reads: with
    /// `read_preference` other than `primary`, the member that preference selects is asked
    /// its name (`hello`'s `me`) and read through a direct connection to it alone, so that
    /// every read of one dump (its data and its oplog window) comes from the same member,
    /// as mongodump reads one host; otherwise the configured client.
    ///
    /// # Errors
    /// [`ClientError`]; no member matching the preference within 15 s names the preference.
    pub(crate) async fn read_client(&self) -> Result<(Client, String), ClientError> {
        use mongodb::options::{ReadPreference, ReadPreferenceOptions, SelectionCriteria};
        let mode = self.cfg.read_preference.as_deref().unwrap_or("primary");
        if mode == "primary" {
            return Ok((self.client().await?, "the primary".into()));
        }
        let tag_sets: Vec<mongodb::options::TagSet> = self
            .cfg
            .read_preference_tags
            .iter()
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .collect();
        let options = Some(
            ReadPreferenceOptions::builder()
                .tag_sets((!tag_sets.is_empty()).then_some(tag_sets))
                .build(),
        );
        let rp = match mode {
            "primaryPreferred" => ReadPreference::PrimaryPreferred { options },
            "secondary" => ReadPreference::Secondary { options },
            "secondaryPreferred" => ReadPreference::SecondaryPreferred { options },
            _ => ReadPreference::Nearest { options },
        };
        let server = |error| ClientError::Server {
            uri: self.cfg.uri.clone(),
            error,
        };
        let mut opts = self.options().await?;
        opts.server_selection_timeout = Some(std::time::Duration::from_secs(15));
        let chooser = Client::with_options(opts).map_err(server)?;
        let hello = chooser
            .database("admin")
            .run_command(bson::doc! {"hello": 1})
            .selection_criteria(SelectionCriteria::ReadPreference(rp))
            .await
            .map_err(|error| ClientError::Selection {
                preference: self.preference_text(),
                error,
            })?;
        let me = hello
            .get_str("me")
            .map(str::to_owned)
            .map_err(|_| ClientError::Selection {
                preference: self.preference_text(),
                error: mongodb::error::Error::custom(
                    "the member chosen did not say its name (hello.me): not a replica set?",
                ),
            })?;
        let role = if hello.get_bool("isWritablePrimary").unwrap_or(false) {
            "primary"
        } else {
            "secondary"
        };
        // `secondary` never reads the primary (a `directConnection=true` URI names one host,
        // which the driver takes whatever the preference).
        if mode == "secondary" && role == "primary" {
            return Err(ClientError::Selection {
                preference: self.preference_text(),
                error: mongodb::error::Error::custom(format!(
                    "the member reached, {me}, is the primary (a directConnection=true URI \
                     reaches its one host whatever the preference: name the replica set, \
                     replicaSet=...)"
                )),
            });
        }
        let mut direct = self.options().await?;
        direct.hosts = vec![mongodb::options::ServerAddress::parse(&me).map_err(server)?];
        direct.direct_connection = Some(true);
        direct.repl_set_name = None;
        // A direct connection reads from the member whatever its state.
        direct.selection_criteria = Some(SelectionCriteria::ReadPreference(
            ReadPreference::PrimaryPreferred { options: None },
        ));
        let client = Client::with_options(direct).map_err(server)?;
        Ok((client, format!("{role} {me} ({})", self.preference_text())))
    }

    /// `read_preference = "..."` and its tags, for messages.
    fn preference_text(&self) -> String {
        let mode = self.cfg.read_preference.as_deref().unwrap_or("primary");
        if self.cfg.read_preference_tags.is_empty() {
            format!("read_preference = {mode:?}")
        } else {
            format!(
                "read_preference = {mode:?}, tags {:?}",
                self.cfg.read_preference_tags
            )
        }
    }

    fn target_db(&self, db: &str) -> String {
        self.cfg
            .rename
            .get(db)
            .cloned()
            .unwrap_or_else(|| db.to_owned())
    }
}

/// Reads the byte chunks the dump task sends.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    chunks::recycle(std::mem::replace(&mut self.current, chunk));
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Sends written bytes as chunks of [`chunks::READ_CHUNK_BYTES`] (called from a blocking
/// thread): a restore's hand-off from the download to the archive's parser.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    /// Up to a chunk of [`chunks::READ_CHUNK_BYTES`] at a time.
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(chunks::READ_CHUNK_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= chunks::READ_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, chunks::read_buffer());
            self.tx.blocking_send(chunk).map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "the MongoDB restore stopped")
            })?;
        }
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
