//! The `.json` manifest sidecar written beside every stored archive (DESIGN.md, "Backup
//! server layout"). It is what restore and verify compare with: the stored file's size
//! and SHA-256, and the source's own counts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the manifest format written by this build.
pub const MANIFEST_VERSION: u32 = 1;

/// Largest manifest accepted when reading one back, bytes.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// The tool and server a dump came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The dump tool, e.g. `pg_dump`.
    pub tool: String,
    /// Its version line, e.g. `pg_dump (PostgreSQL) 15.14`.
    pub tool_version: String,
    /// The server's version, e.g. `15.14`.
    pub server_version: String,
}

/// An age recipient the archive was encrypted to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipientInfo {
    /// The recipient (a public key, `age1...`).
    pub recipient: String,
    /// `sha256:` + the first 16 hex digits of SHA-256 of the recipient string.
    pub fingerprint: String,
}

/// One archive's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] of the writer.
    pub manifest_version: u32,
    /// The archive's file name (no directory).
    pub file: String,
    /// Datastore name from the agent's config.
    pub datastore: String,
    /// Datastore kind, e.g. `postgres`.
    pub kind: String,
    /// Empty for the main archive; a companion's part name, e.g. `globals`.
    pub part: String,
    /// What the dump is: `pgdump` (pg_dump custom format), `sql`, ...
    pub format: String,
    /// `zst` or `gz`.
    pub compression: String,
    /// Always `age` (age v1, X25519 recipients, <https://age-encryption.org/v1>).
    pub encryption: String,
    /// Agent id that made the backup.
    pub agent: String,
    /// Hostname of that agent.
    pub hostname: String,
    /// Environment, e.g. `production`.
    pub environment: String,
    /// `YYYY-MM-DD` of the dated folder (UTC).
    pub date: String,
    /// When the dump started (RFC 3339, UTC).
    pub started: DateTime<Utc>,
    /// When the upload finished (RFC 3339, UTC).
    pub finished: DateTime<Utc>,
    /// Dump tool and server versions.
    pub source: Source,
    /// Size of the dump before compression, bytes.
    pub bytes_uncompressed: u64,
    /// Size of the stored archive, bytes.
    pub bytes_stored: u64,
    /// Lower-case hex SHA-256 of the stored archive.
    pub sha256: String,
    /// Who can decrypt it.
    pub recipients: Vec<RecipientInfo>,
    /// File names of the companion archives of the same backup (main archive only), in
    /// restore order, e.g. PostgreSQL's roles (`globals`).
    pub companions: Vec<String>,
    /// The source's own counts, shaped by the datastore kind, e.g. for PostgreSQL
    /// `{"tables": 3, "rows": {"public.t": 10}}`.
    pub counts: serde_json::Value,
    /// The target's version id of the stored archive this manifest describes (an S3 bucket
    /// with versioning, filled by the target at commit): a restore reads that version, so
    /// a later write of the same key does not change what it reads. Absent (and not
    /// written) on targets without versions (SFTP) and in manifests of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// The coordinator's job that made the backup (its ULID, without the attempt's
    /// `-a<N>`): `ferry-coordinator catalog rebuild` gives the catalog record this job id.
    /// Absent in manifests of older builds (the record's job id is then `manifest:<file>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// On a copy target: when the coordinator committed the copy (RFC 3339, UTC), which
    /// the catalog records as the copy's time. Absent on the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied: Option<DateTime<Utc>>,
}

/// A manifest that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of the expected shape.
    #[error("manifest {path} is malformed: {source}")]
    Malformed {
        /// Where it was read from.
        path: String,
        /// The decode error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// Written by a newer Ferry.
    #[error("manifest {path} has version {found}; this agent reads version {MANIFEST_VERSION}")]
    Version {
        /// Where it was read from.
        path: String,
        /// The version found.
        found: u32,
    },
}

impl Manifest {
    /// Parses a manifest read from `path`.
    ///
    /// # Errors
    /// [`ManifestError`] naming the path.
    pub fn from_slice(path: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|source| ManifestError::Malformed {
                path: path.to_owned(),
                source,
            })?;
        if manifest.manifest_version != MANIFEST_VERSION {
            return Err(ManifestError::Version {
                path: path.to_owned(),
                found: manifest.manifest_version,
            });
        }
        Ok(manifest)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `manifest` fuzz target: without serde_json's `float_roundtrip`, a large
    /// float count read back one digit off, so a manifest did not equal itself re-read.
    #[test]
    fn a_manifest_with_float_counts_reads_back_equal() {
        let seed = include_bytes!("../../fuzz/corpus/manifest/seed-main");
        let mut m = Manifest::from_slice("seed.json", seed).expect("the seed parses");
        m.counts = serde_json::json!({"rows": {"public.t": 1.4464222222222233e20_f64}});
        let back = Manifest::from_slice("back.json", &m.to_json()).expect("re-read");
        assert_eq!(back, m);
    }

    /// A manifest without a version id (SFTP's, older builds') reads, and writes back
    /// byte for byte; one with an id keeps it.
    #[test]
    fn the_version_id_is_optional_and_written_only_when_known() {
        let seed = include_bytes!("../../fuzz/corpus/manifest/seed-main");
        let mut m = Manifest::from_slice("seed.json", seed).expect("the seed parses");
        assert_eq!(m.version_id, None);
        let plain = m.to_json();
        assert!(!String::from_utf8_lossy(&plain).contains("version_id"));
        assert_eq!(
            Manifest::from_slice("plain.json", &plain)
                .unwrap()
                .to_json(),
            plain
        );
        m.version_id = Some("a1B2c3".into());
        let back = Manifest::from_slice("versioned.json", &m.to_json()).unwrap();
        assert_eq!(back.version_id.as_deref(), Some("a1B2c3"));
    }
}
