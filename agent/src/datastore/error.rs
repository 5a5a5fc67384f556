//! Why a dump or a restore of a datastore failed: [`DumpError`] and [`RestoreError`],
//! which the agent's [`crate::job::JobError`] wraps. A leaf: it imports no other module of
//! the agent but the tools' error, so that `job/` can name these errors without importing
//! the datastores' traits (which return `JobError`).

use super::common::tool::ToolError;

/// A dump that failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The dump tool could not be started.
    #[error("cannot start {tool}: {source} (is it installed? set bin_dir in the datastore config)")]
    Spawn {
        /// Tool name.
        tool: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The dump tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Tool name.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The source database refused or failed a query.
    #[error("{0}")]
    Source(String),
}

/// A restore that failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A restore tool could not be started.
    #[error("cannot start {tool}: {source} (is it installed? set bin_dir in the datastore config)")]
    Spawn {
        /// Tool name.
        tool: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A restore tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Tool name.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The restored data differs from the manifest.
    #[error("restored data differs from the manifest: {0}")]
    Mismatch(String),
    /// The target refused or failed a query.
    #[error("{0}")]
    Target(String),
    /// The manifest does not describe what this restorer expects.
    #[error("{0}")]
    Manifest(String),
}

impl DumpError {
    /// Maps a failed tool run ([`ToolError`], as [`run_tool`](super::run_tool) returns
    /// it) to [`DumpError::Tool`] naming `tool`.
    pub fn tool(tool: &str) -> impl FnOnce(ToolError) -> DumpError + use<> {
        let tool = tool.to_owned();
        move |e| DumpError::Tool {
            tool,
            status: e.status(),
            stderr: e.detail(),
        }
    }
}

impl RestoreError {
    /// Maps a failed tool run ([`ToolError`], as [`run_tool`](super::run_tool) returns
    /// it) to [`RestoreError::Tool`] naming `tool`.
    pub fn tool(tool: &str) -> impl FnOnce(ToolError) -> RestoreError + use<> {
        let tool = tool.to_owned();
        move |e| RestoreError::Tool {
            tool,
            status: e.status(),
            stderr: e.detail(),
        }
    }
}
