//! The S3 target: an S3-compatible bucket (AWS, Ceph RGW, ...) through the AWS SDK
//! (`aws-sdk-s3`, HTTPS by hyper and rustls with ring). The SDK is async; the sessions block,
//! as the seam wants, by running each call on one runtime of this module's own
//! ([`runtime`]), from the session's thread.
//!
//! The layout is SFTP's: an object's key is its path under `prefix`
//! (`<prefix>/<env>/<date>/<ds>_backup_<stamp>...`).
//!
//! - A part is staged as a multipart upload of its final key ([`mod@write`]), parts of
//!   [`write::part_size`] (8 MiB growing, so that 5 TiB fit in 10,000 parts), each sent with
//!   its `Content-MD5`, which the server checks; at most `parts_in_flight` parts are in
//!   memory (the next part fills once fewer are in flight; [`S3Config::parts_in_flight`]),
//!   their buffers reused from part to part. Nothing is visible until `CompleteMultipartUpload`. The stored
//!   size is checked with `ListParts` (which production may call; `HeadObject` needs
//!   `GetObject`, which production's bucket policy denies): the parts' sizes must add up to
//!   the bytes sent and their ETags be the MD5s sent; after completion, the object's ETag
//!   must be the multipart ETag of those parts.
//! - Never overwrite: production may not read, so it cannot check before an upload whether
//!   a key exists ([`WriteSession::exists`] says "no" when
//!   `HeadObject` is refused). What keeps a backup from being replaced is the bucket's
//!   versioning (required): a racing or repeated write of a key adds a version, the earlier
//!   one stays, and Object Lock keeps it. The version id each completion gives is written
//!   into the part's manifest (`version_id`, [`mod@write`]), and a restore reads that
//!   version ([`mod@read`]), whatever a racing writer of the key added since.
//! - Object Lock: Ceph 16's RGW ignores lock headers on `CreateMultipartUpload`, and
//!   production may not `PutObjectRetention`: objects are locked after completion by the
//!   bucket's default retention, or by the maintenance session's
//!   [`MaintainSession::extend_lock`], which never
//!   shortens a lock. The coordinator does so per dated folder, until UTC midnight of
//!   the folder's date + its retention tier's period, and reads the locks back with
//!   [`MaintainSession::retain_until`] before it removes a folder.
//! - Leftovers: in-progress multipart uploads (with no job id: `ferry prune` removes them
//!   once untouched for 24 h) and data objects without a manifest. The maintenance
//!   credentials of `docs/s3-bucket-policy.json` may not `GetObject`, so they cannot read
//!   manifests: a companion part whose main part was never committed (it has a manifest of
//!   its own) is then not told from a committed one, and is not reported.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::TargetConfigError;
use crate::{MaintainSession, ReadSession, Target, TargetError, WriteSession};

pub mod maintain;
pub mod read;
pub mod write;

/// `kind = "s3"`: `[backup_server]` in the agent config, `[maintenance]` in the
/// coordinator's.
///
/// ```toml
/// [backup_server]
/// kind = "s3"
/// endpoint = "https://rgw.example:7480"   # AWS's endpoint for `region` if absent
/// region = "us-east-1"
/// bucket = "ferry"                        # versioned, with Object Lock
/// prefix = "backups"                      # keys: backups/<env>/<date>/<file>
/// path_style = true                       # Ceph RGW without wildcard DNS
/// ca_file = "/etc/ferry/rgw-ca.pem"       # a private CA, added to the system's roots
/// access_key_file = "/etc/ferry/s3-access-key"   # 0600/0400; with secret_key_file, or
/// secret_key_file = "/etc/ferry/s3-secret-key"   # neither: the standard AWS chain
/// lock = { mode = "compliance" }          # maintenance: extend_lock's mode for new locks
/// parts_in_flight = 3                     # UploadPart requests at once; memory N x 8 MiB
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The endpoint URL (`http://` or `https://`, with a port if not the scheme's); AWS's
    /// endpoint for `region` if absent.
    pub endpoint: Option<String>,
    /// The region (`us-east-1` if absent; Ceph RGW accepts any).
    #[serde(default = "default_region")]
    pub region: String,
    /// The bucket (versioned; with Object Lock for locks).
    pub bucket: String,
    /// The key prefix the layout starts under, without leading or trailing `/` (empty:
    /// the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-host style
    /// (`bucket.endpoint/key`).
    #[serde(default)]
    pub path_style: bool,
    /// A PEM file of CA certificates trusted for the endpoint, besides the system's (a
    /// private endpoint).
    pub ca_file: Option<PathBuf>,
    /// A file holding the access key id (mode 0600 or 0400); with `secret_key_file`. When
    /// both are absent, the standard AWS chain (environment, profile, ...) gives the
    /// credentials.
    pub access_key_file: Option<PathBuf>,
    /// A file holding the secret access key (mode 0600 or 0400); with `access_key_file`.
    pub secret_key_file: Option<PathBuf>,
    /// TCP and TLS connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// A call that waits this long for the server's next bytes fails (seconds).
    #[serde(default = "default_io_timeout")]
    pub io_timeout_seconds: u64,
    /// Object Lock: the mode of the locks the maintenance session sets where an object
    /// has none yet. Without it, `extend_lock` is unsupported.
    pub lock: Option<LockConfig>,
    /// `UploadPart` requests of one upload in flight at once, 1 to
    /// [`write::MAX_PARTS_IN_FLIGHT`] (default [`write::DEFAULT_PARTS_IN_FLIGHT`]); the next
    /// part fills once fewer are in flight. Memory: each part holds its bytes until the
    /// server answers, so an upload holds at most `parts_in_flight` × [`write::part_size`]
    /// bytes, 8 MiB a part for the first 1,000 parts (an 8 GiB stream): 24 MiB at 3.
    /// More parts in flight help where one request's round trip, not the bandwidth or the
    /// agent's CPU, sets the pace (see `bench/README.md`, s3-upload).
    #[serde(default = "default_parts_in_flight")]
    pub parts_in_flight: usize,
}

/// `lock = { mode = "compliance" | "governance" }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockConfig {
    /// The retention mode.
    pub mode: LockMode,
}

/// An Object Lock retention mode.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// No one, not even the bucket's owner, may shorten it or delete the version.
    Compliance,
    /// Users with `s3:BypassGovernanceRetention` may.
    Governance,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_io_timeout() -> u64 {
    120
}
fn default_parts_in_flight() -> usize {
    write::DEFAULT_PARTS_IN_FLIGHT
}

impl S3Config {
    /// `endpoint/bucket`, for messages.
    pub fn addr(&self) -> String {
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("s3.{}.amazonaws.com", self.region));
        format!("{}/{}", endpoint.trim_end_matches('/'), self.bucket)
    }

    /// The layout's root: the prefix without slashes around it.
    pub fn root(&self) -> &str {
        self.prefix.trim_matches('/')
    }

    /// Checks what can be checked without the network: the bucket's name, the prefix,
    /// the endpoint's scheme, the CA file, the credential files and their modes.
    ///
    /// # Errors
    /// [`TargetConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), TargetConfigError> {
        let invalid =
            |field: &'static str, message: String| TargetConfigError::Path { field, message };
        if self.bucket.is_empty() {
            return Err(TargetConfigError::Empty { field: "bucket" });
        }
        let bucket_ok = (3..=63).contains(&self.bucket.len())
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(invalid(
                "bucket",
                format!(
                    "{:?} is not an S3 bucket name (3 to 63 lowercase letters, digits, `-` and `.`)",
                    self.bucket
                ),
            ));
        }
        if self.region.is_empty() {
            return Err(TargetConfigError::Empty { field: "region" });
        }
        let root = self.root();
        if !root.is_empty()
            && root
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(invalid(
                "prefix",
                format!(
                    "{:?} must be key components without empty, . or .. ones",
                    self.prefix
                ),
            ));
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(invalid(
                "endpoint",
                format!("{e:?} must be a URL starting with http:// or https://"),
            ));
        }
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read_to_string(ca)
                .map_err(|e| invalid("ca_file", format!("cannot read {}: {e}", ca.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(invalid(
                    "ca_file",
                    format!("{} holds no PEM certificate", ca.display()),
                ));
            }
        }
        if !(1..=write::MAX_PARTS_IN_FLIGHT).contains(&self.parts_in_flight) {
            return Err(TargetConfigError::Range {
                field: "parts_in_flight",
                message: format!(
                    "{} is not 1 to {} (each part in flight holds 8 MiB or more)",
                    self.parts_in_flight,
                    write::MAX_PARTS_IN_FLIGHT
                ),
            });
        }
        self.static_credentials()?;
        Ok(())
    }

    /// The access key id and secret from the two files, `None` when neither is set.
    fn static_credentials(&self) -> Result<Option<(String, String)>, TargetConfigError> {
        let read = |field: &'static str, path: &PathBuf| {
            let text = ferry_core::secrets::read_secret_file(path)
                .map_err(|source| TargetConfigError::Secret { field, source })?;
            let text = text.trim().to_owned();
            if text.is_empty() {
                return Err(TargetConfigError::Empty { field });
            }
            Ok(text)
        };
        match (&self.access_key_file, &self.secret_key_file) {
            (None, None) => Ok(None),
            (Some(a), Some(s)) => Ok(Some((
                read("access_key_file", a)?,
                read("secret_key_file", s)?,
            ))),
            (Some(_), None) => Err(TargetConfigError::Empty {
                field: "secret_key_file",
            }),
            (None, Some(_)) => Err(TargetConfigError::Empty {
                field: "access_key_file",
            }),
        }
    }

    /// The SDK client for this configuration (credentials read now).
    async fn client(&self) -> Result<Client, TargetError> {
        use aws_config::timeout::TimeoutConfig;
        use aws_smithy_http_client::tls;
        let connect = |message: String| TargetError::Connect {
            addr: self.addr(),
            message,
        };
        let mut trust = tls::TrustStore::default();
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| connect(format!("cannot read ca_file {}: {e}", ca.display())))?;
            trust = trust.with_pem_certificate(pem);
        }
        let tls_context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .map_err(|e| connect(format!("TLS set-up: {e}")))?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .tls_context(tls_context)
            .build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(self.connect_timeout_seconds.max(1)))
            .read_timeout(Duration::from_secs(self.io_timeout_seconds.max(1)))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()))
            .http_client(http)
            .timeout_config(timeouts);
        if let Some(e) = &self.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        let static_creds = self
            .static_credentials()
            .map_err(|e| connect(format!("backup_server.{}: {e}", e.field())))?;
        if let Some((id, secret)) = static_creds {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "ferry access_key_file",
            ));
        }
        let shared = loader.load().await;
        // RGW 16 does not know the flexible checksums' aws-chunked trailers: each part
        // carries its Content-MD5 instead, which RGW checks.
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(self.path_style)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .build();
        Ok(Client::from_conf(config))
    }
}

/// The runtime every S3 call runs on (two worker threads, shared by all sessions and
/// never shut down); a session's thread blocks on it.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-s3")
            .enable_all()
            .build()
            .expect("start the S3 target's runtime")
    })
}

/// How long the clean-up of a failed or cancelled upload (its `AbortMultipartUpload`) may
/// take.
pub(crate) const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a session needs: the client, the configuration, and its cancel token.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) client: Client,
    pub(crate) config: Arc<S3Config>,
    pub(crate) addr: String,
    pub(crate) cancel: CancellationToken,
}

impl Conn {
    /// The key of a layout path (`<root>/<env>/...`; no leading `/`).
    pub(crate) fn key(path: &str) -> &str {
        path.trim_start_matches('/')
    }

    /// The layout path of a key, as [`Target::environment_dir`] writes it.
    pub(crate) fn path_of(&self, key: &str) -> String {
        if self.config.root().is_empty() {
            format!("/{key}")
        } else {
            key.to_owned()
        }
    }

    /// Runs `fut` (an SDK call) to its end, or until the session is aborted.
    ///
    /// # Errors
    /// [`TargetError`] from the call, or [`TargetError::Io`] saying the job was cancelled.
    pub(crate) fn call<T, E>(
        &self,
        op: &'static str,
        path: &str,
        fut: impl Future<Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>>,
    ) -> Result<T, TargetError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let cancel = self.cancel.clone();
        let out = runtime().block_on(async move {
            tokio::select! {
                _ = cancel.cancelled() => None,
                r = fut => Some(r),
            }
        });
        match out {
            None => Err(self.cancelled(op, path)),
            Some(r) => r.map_err(|e| self.err(op, path, e)),
        }
    }

    /// Runs `fut` even on an aborted session, for at most [`CLEANUP_TIMEOUT`].
    pub(crate) fn cleanup<T, E>(
        &self,
        op: &'static str,
        path: &str,
        fut: impl Future<Output = Result<T, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>>,
    ) -> Result<T, TargetError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // The timer needs the runtime's context: made inside it.
        match runtime().block_on(async move { tokio::time::timeout(CLEANUP_TIMEOUT, fut).await }) {
            Err(_) => Err(TargetError::Stalled {
                addr: self.addr.clone(),
                op,
                path: path.to_owned(),
                seconds: CLEANUP_TIMEOUT.as_secs(),
            }),
            Ok(r) => r.map_err(|e| self.err(op, path, e)),
        }
    }

    /// Where a paginated listing goes on: `None` after its last page, the marker of the
    /// next page otherwise.
    ///
    /// # Errors
    /// [`TargetError::Io`] when a page says it is truncated but gives no marker to go on:
    /// the listing is incomplete, and nothing may be decided on a part of it.
    pub(crate) fn next_page(
        &self,
        op: &'static str,
        prefix: &str,
        truncated: Option<bool>,
        marker: Option<&str>,
    ) -> Result<Option<String>, TargetError> {
        match (truncated == Some(true), marker) {
            (false, _) => Ok(None),
            (true, Some(m)) => Ok(Some(m.to_owned())),
            (true, None) => Err(TargetError::Io {
                addr: self.addr.clone(),
                op,
                path: prefix.to_owned(),
                message: "the listing is truncated but names no next page; nothing was done \
                          on a part of it"
                    .into(),
            }),
        }
    }

    /// The error of a call the session's aborter cut short.
    pub(crate) fn cancelled(&self, op: &'static str, path: &str) -> TargetError {
        TargetError::Io {
            addr: self.addr.clone(),
            op,
            path: path.to_owned(),
            message: "the job was cancelled, so the agent closed the connection".into(),
        }
    }

    /// The [`TargetError`] of a failed SDK call.
    pub(crate) fn err<E>(
        &self,
        op: &'static str,
        path: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> TargetError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        to_target_error(&self.addr, self.config.io_timeout_seconds, op, path, e)
    }
}

/// The S3 error code of a failed call (`NoSuchKey`, `AccessDenied`, ...), if the server
/// sent one.
pub(crate) fn code<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<String> {
    e.code().map(str::to_owned)
}

/// An error and its sources, each as displayed, joined with `: ` (repeats dropped).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// The HTTP status of a failed call's response, if there was one.
pub(crate) fn status<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// The [`TargetError`] of a failed SDK call `op` on `path`: refused (403) is
/// [`TargetError::PermissionDenied`], missing (404) [`TargetError::NotFound`], a quota
/// [`TargetError::QuotaExceeded`], a timeout [`TargetError::Stalled`], the rest
/// [`TargetError::Io`] with the server's code and message.
pub(crate) fn to_target_error<E>(
    addr: &str,
    io_timeout_seconds: u64,
    op: &'static str,
    path: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> TargetError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (addr, path) = (addr.to_owned(), path.to_owned());
    let code = code(&e);
    let message = e
        .message()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned);
    match (&e, status(&e), code.as_deref()) {
        (SdkError::TimeoutError(_), _, _) => TargetError::Stalled {
            addr,
            op,
            path,
            seconds: io_timeout_seconds,
        },
        (SdkError::DispatchFailure(_), _, _) => TargetError::Connect {
            addr,
            message: format!("{op} {path}: {}", chain(&e)),
        },
        // RGW answers a bucket or user quota with 403 QuotaExceeded.
        (_, _, Some("QuotaExceeded")) => TargetError::QuotaExceeded {
            addr,
            path,
            partial: crate::PartialFate::Unknown,
        },
        (_, _, Some(c @ ("InvalidAccessKeyId" | "SignatureDoesNotMatch"))) => {
            TargetError::PermissionDenied {
                addr,
                op,
                path,
                message: format!(
                    "{c}: the endpoint does not know these keys (a wrong access key id or \
                     secret key; check access_key_file and secret_key_file, or the AWS chain)"
                ),
            }
        }
        (_, Some(403), _) => TargetError::PermissionDenied {
            addr,
            op,
            path,
            message: format!(
                "{}{}: these credentials may not do this (see the bucket policy)",
                code.as_deref().unwrap_or("HTTP 403"),
                message.map(|m| format!(" {m}")).unwrap_or_default()
            ),
        },
        (_, Some(404), Some("NoSuchKey" | "NotFound") | None) => {
            TargetError::NotFound { addr, path }
        }
        _ => TargetError::Io {
            addr,
            op,
            path,
            message: match (code, status(&e)) {
                (Some(c), Some(s)) => format!(
                    "{c} (HTTP {s}){}",
                    message.map(|m| format!(": {m}")).unwrap_or_default()
                ),
                _ => chain(&e),
            },
        },
    }
}

/// The S3 bucket as a [`Target`]: the one client of its configuration, made on the first
/// session; write, read and maintain differ only by the credentials the configuration gives
/// (the bucket policy confines each).
#[derive(Debug)]
pub struct S3Target {
    config: Arc<S3Config>,
    client: Mutex<Option<Client>>,
}

impl S3Target {
    /// The target of a validated `config` ([`S3Config::validate`]).
    pub fn new(config: S3Config) -> S3Target {
        S3Target {
            config: Arc::new(config),
            client: Mutex::new(None),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn conn(&self) -> Result<Conn, TargetError> {
        let mut slot = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let client = match &*slot {
            Some(c) => c.clone(),
            None => {
                let config = self.config.clone();
                let c = runtime().block_on(async move { config.client().await })?;
                *slot = Some(c.clone());
                c
            }
        };
        Ok(Conn {
            client,
            config: self.config.clone(),
            addr: self.config.addr(),
            cancel: CancellationToken::new(),
        })
    }
}

impl Target for S3Target {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        self.config.addr()
    }

    fn environment_dir(&self, environment: &str) -> String {
        ferry_core::layout::environment_dir(self.config.root(), environment)
    }

    fn object_lock(&self) -> bool {
        self.config.lock.is_some()
    }

    fn write(&self) -> Result<Box<dyn WriteSession>, TargetError> {
        Ok(Box::new(write::S3Write::new(self.conn()?)))
    }

    /// Production may not list (the bucket policy): starts a multipart upload of a probe
    /// key in the folder and aborts it (`S3Write::probe` in [`mod@write`]).
    fn check_write(&self, environment: &str) -> Result<String, TargetError> {
        write::S3Write::new(self.conn()?).probe(&self.environment_dir(environment))
    }

    fn read(&self) -> Result<Box<dyn ReadSession>, TargetError> {
        Ok(Box::new(read::S3Read::new(self.conn()?)))
    }

    fn maintain(&self) -> Result<Box<dyn MaintainSession>, TargetError> {
        Ok(Box::new(maintain::S3Maintain::new(self.conn()?)))
    }
}

#[cfg(test)]
mod tests {
    use crate::TargetConfig;

    fn parse(text: &str) -> Result<TargetConfig, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_s3_table_parses_and_its_errors_name_the_field() {
        let c = parse(
            r#"{"kind": "s3", "endpoint": "http://127.0.0.1:7480", "bucket": "ferry",
                "prefix": "backups", "path_style": true, "lock": {"mode": "compliance"}}"#,
        )
        .unwrap();
        assert_eq!(c.kind(), "s3");
        let target = c.build().unwrap();
        assert_eq!(
            target.dated_dir("production", "2026-12-05".parse().unwrap()),
            "backups/production/2026-12-05"
        );
        assert_eq!(target.describe(), "http://127.0.0.1:7480/ferry");

        let e = parse(r#"{"kind": "s3", "bucket": "ferry", "colour": 1}"#).unwrap_err();
        assert!(e.contains("colour"), "{e}");
        for (json, field) in [
            (r#"{"kind": "s3", "bucket": "Ferry_Backups"}"#, "bucket"),
            (
                r#"{"kind": "s3", "bucket": "ferry", "prefix": "a//b"}"#,
                "prefix",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "endpoint": "rgw:7480"}"#,
                "endpoint",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "access_key_file": "/nonexistent"}"#,
                "secret_key_file",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "access_key_file": "/nonexistent",
                    "secret_key_file": "/nonexistent"}"#,
                "access_key_file",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "ca_file": "/nonexistent"}"#,
                "ca_file",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "parts_in_flight": 0}"#,
                "parts_in_flight",
            ),
            (
                r#"{"kind": "s3", "bucket": "ferry", "parts_in_flight": 17}"#,
                "parts_in_flight",
            ),
        ] {
            let e = parse(json).unwrap().build().expect_err(json);
            assert_eq!(e.field(), field, "{json}: {e}");
        }
    }

    #[test]
    fn an_endpoint_that_refuses_connections_fails_naming_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let json = format!(
            r#"{{"kind": "s3", "endpoint": "http://127.0.0.1:{port}", "bucket": "ferry",
                "path_style": true, "access_key_file": {k:?}, "secret_key_file": {k:?}}}"#,
            k = key.display().to_string()
        );
        let target = parse(&json).unwrap().build().unwrap();
        let (tx, rx) = crate::chunk::channel();
        drop(tx);
        let file = ferry_core::layout::StoredFile {
            dir: target.dated_dir("production", "2026-12-05".parse().unwrap()),
            name: "x.age".into(),
        };
        let e = target
            .write()
            .unwrap()
            .stage(&file, "job", rx)
            .expect_err("nothing listens there");
        assert!(matches!(e, crate::TargetError::Connect { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}/ferry"))
                && text.contains("production/2026-12-05/x.age"),
            "{text}"
        );
        assert!(e.retryable());
    }

    #[test]
    fn a_listing_truncated_without_a_next_page_fails_rather_than_stop_short() {
        let TargetConfig::S3(config) = parse(
            r#"{"kind": "s3", "endpoint": "http://127.0.0.1:9", "bucket": "ferry",
                "path_style": true}"#,
        )
        .unwrap() else {
            panic!("not an s3 table");
        };
        let conn = super::S3Target::new(config).conn().unwrap();
        let next = |t, m| conn.next_page("list versions", "ferry/production/", t, m);
        assert_eq!(next(None, None).unwrap(), None);
        assert_eq!(next(Some(false), Some("k")).unwrap(), None);
        assert_eq!(next(Some(true), Some("k")).unwrap().as_deref(), Some("k"));
        let e = next(Some(true), None).expect_err("an incomplete listing");
        let text = e.to_string();
        assert!(
            text.contains("truncated") && text.contains("ferry/production/"),
            "{text}"
        );
    }

    #[test]
    fn credential_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, s) = (dir.path().join("a"), dir.path().join("s"));
        std::fs::write(&a, "AKIA\n").unwrap();
        std::fs::write(&s, "secret\n").unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o644)).unwrap();
        let json = format!(
            r#"{{"kind": "s3", "bucket": "ferry", "access_key_file": {:?},
                "secret_key_file": {:?}}}"#,
            a.display().to_string(),
            s.display().to_string()
        );
        let e = parse(&json).unwrap().build().err().unwrap();
        assert_eq!(e.field(), "secret_key_file", "{e}");
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o400)).unwrap();
        parse(&json).unwrap().build().unwrap();
    }
}
