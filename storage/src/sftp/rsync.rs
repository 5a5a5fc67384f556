//! The rsync mirrors of differential datastores (a `files` datastore with `method =
//! "rsync"`, pgBackRest repositories) on the SFTP backup server: the stock `rsync` binary
//! over SSH (no crate speaks the rsync protocol to a stock rsync), with the pinned host key
//! of the target and the login of `[backup_server.rsync]` (or the SFTP login's).
//!
//! The mirror of datastore `<name>` in an environment is the folder
//! `<root>/<environment>/<name>/`, `<root>` as the rsync login sees it.

use super::SftpConfig;
use crate::Mirror;

/// rsync's command line pieces for the backup server: the `-e` SSH command (with the pinned
/// host key in a temporary known_hosts file, removed on drop) and `user@host:`.
pub struct Remote {
    ssh: String,
    /// `user@host:`, to put before a path on the server.
    prefix: String,
    /// The layout's root as the rsync login sees it.
    root: String,
    /// `max_upload_bytes_per_second`, for `--bwlimit` on uploads.
    bwlimit: Option<u64>,
    /// `--protect-args`, unless the rsync login is confined by rrsync, which refuses it
    /// (it checks the arguments itself; `rsync.root` is then checked for plain paths).
    protect_args: bool,
    _known_hosts: tempfile::TempDir,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Remote {
    /// The SSH command for `server`, its host key written to a temporary known_hosts.
    ///
    /// # Errors
    /// The temporary known_hosts file cannot be written.
    pub fn new(server: &SftpConfig) -> std::io::Result<Remote> {
        let (user, identity, root) = server.rsync_login();
        let dir = tempfile::Builder::new().prefix("ferry-rsync-").tempdir()?;
        let kh = dir.path().join("known_hosts");
        let key: Vec<&str> = server.host_key.split_whitespace().take(2).collect();
        let host = if server.port == 22 {
            server.host.clone()
        } else {
            format!("[{}]:{}", server.host, server.port)
        };
        std::fs::write(&kh, format!("{host} {}\n", key.join(" ")))?;
        let ssh = [
            "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes".to_owned(),
            "-o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null".to_owned(),
            format!("-o UserKnownHostsFile={}", quote(&kh.display().to_string())),
            format!("-o ConnectTimeout={}", server.connect_timeout_seconds),
            format!(
                "-o ServerAliveInterval={} -o ServerAliveCountMax=2",
                server.io_timeout_seconds.div_ceil(2).max(1)
            ),
            format!("-p {}", server.port),
            format!("-i {}", quote(&identity.display().to_string())),
        ]
        .join(" ");
        Ok(Remote {
            ssh,
            prefix: format!("{user}@{}:", server.host),
            root: root.to_owned(),
            bwlimit: server.max_upload_bytes_per_second,
            protect_args: server.rsync.is_none(),
            _known_hosts: dir,
        })
    }
}

impl Mirror for Remote {
    fn dir(&self, environment: &str, name: &str) -> String {
        format!(
            "{}/{name}/",
            ferry_core::layout::environment_dir(&self.root, environment)
        )
    }

    fn prefix(&self) -> String {
        self.prefix.clone()
    }

    fn rsync_up(&self) -> tokio::process::Command {
        let mut cmd = self.rsync();
        if let Some(rate) = self.bwlimit {
            // rsync's unit is KiB/s; at least 1.
            cmd.arg(format!("--bwlimit={}", (rate / 1024).max(1)));
        }
        cmd
    }

    fn rsync(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("rsync");
        cmd.args(["-a", "--checksum", "--numeric-ids"]);
        if self.protect_args {
            cmd.arg("--protect-args");
        }
        cmd.arg("-e").arg(&self.ssh);
        cmd
    }
}
