//! The russh client of the `ssh-transport` benchmark: russh 0.65 (ring) and russh-sftp 3.0
//! moving the benchmark's data (`data.rs`, shared with it) to and from an SFTP server.
//!
//! `ferry-bench-russh HOST PORT USER KEY HOST_KEY CIPHER PATH BYTES IN_FLIGHT`: logs in to
//! `HOST:PORT` as `USER` with the private key file `KEY`, accepting only the server key
//! `HOST_KEY` (`ssh-ed25519 AAAA...`), offering the cipher `CIPHER` alone; opens SFTP and
//! prints `ready`. Then, one line of standard input each: `upload` writes `BYTES` bytes
//! of the data to `PATH` (created or truncated), `IN_FLIGHT` writes outstanding, asks the
//! server to fsync it, and prints `uploaded SIZE` (the server's `fstat`); `download` reads
//! `PATH` back, `IN_FLIGHT` reads outstanding, compares every byte with the data and
//! prints `downloaded BYTES`. It disconnects at the end of its input. On an error it
//! exits non-zero, the error on standard error.

use std::borrow::Cow;
use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use russh::keys::{
    PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate, load_secret_key,
    parse_public_key_base64,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "../../src/bin/ssh-transport/data.rs"]
mod data;

/// The command line (see the module docs).
struct Args {
    host: String,
    port: u16,
    user: String,
    key: String,
    host_key: String,
    cipher: String,
    path: String,
    bytes: u64,
    in_flight: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let a: Vec<String> = std::env::args().skip(1).collect();
        let [
            host,
            port,
            user,
            key,
            host_key,
            cipher,
            path,
            bytes,
            in_flight,
        ] = &a[..]
        else {
            bail!(
                "usage: ferry-bench-russh HOST PORT USER KEY HOST_KEY CIPHER PATH BYTES IN_FLIGHT"
            );
        };
        Ok(Args {
            host: host.clone(),
            port: port.parse().context("PORT")?,
            user: user.clone(),
            key: key.clone(),
            host_key: host_key.clone(),
            cipher: cipher.clone(),
            path: path.clone(),
            bytes: bytes.parse().context("BYTES")?,
            in_flight: in_flight.parse().context("IN_FLIGHT")?,
        })
    }
}

/// Accepts only the pinned host key.
struct Pinned(PublicKey);

impl russh::client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(matches!(key, PublicKeyOrCertificate::PublicKey { key, .. }
            if key.key_data() == self.0.key_data()))
    }
}

/// Prints one line of the protocol.
fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let data = data::Data::new(args.bytes);

    let cipher = russh::cipher::Name::try_from(args.cipher.as_str())
        .map_err(|()| anyhow::anyhow!("russh has no cipher {}", args.cipher))?;
    let config = russh::client::Config {
        preferred: russh::Preferred {
            cipher: Cow::Owned(vec![cipher]),
            ..russh::Preferred::default()
        },
        // As Ferry's libssh2 connection.
        nodelay: true,
        ..russh::client::Config::default()
    };
    let b64 = args
        .host_key
        .split_whitespace()
        .nth(1)
        .context("HOST_KEY: expected `ssh-ed25519 AAAA...`")?;
    let pinned = Pinned(parse_public_key_base64(b64)?);
    let mut session =
        russh::client::connect(Arc::new(config), (args.host.as_str(), args.port), pinned).await?;
    let key = load_secret_key(&args.key, None)?;
    let auth = session
        .authenticate_publickey(
            args.user.as_str(),
            PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await?;
    ensure!(auth.success(), "the server refused the key");
    let channel = session.channel_open_session().await?;
    channel.request_subsystem(true, "sftp").await?;
    let sftp = russh_sftp::client::SftpSession::new_with_config(
        channel.into_stream(),
        russh_sftp::client::Config {
            max_concurrent_reads: args.in_flight,
            max_concurrent_writes: args.in_flight,
            // Writes as large as reads (its default is 32 KiB); the server's limit still
            // applies.
            max_write_packet_len: 256 * 1024,
            request_timeout_secs: 120,
            ..russh_sftp::client::Config::default()
        },
    )
    .await?;
    say("ready")?;

    let mut lines = std::io::stdin().lock().lines();
    while let Some(line) = lines.next().transpose()? {
        match line.trim() {
            "upload" => {
                let mut f = sftp.create(args.path.as_str()).await?;
                for piece in data.pieces() {
                    f.write_all(piece).await?;
                }
                f.flush().await?;
                f.sync_all().await?;
                let size = f.metadata().await?.size.unwrap_or(0);
                f.shutdown().await?;
                ensure!(
                    size == data.total(),
                    "the server's fstat says {size} bytes, not {}",
                    data.total()
                );
                say(&format!("uploaded {size}"))?;
            }
            "download" => {
                let mut f = sftp.open(args.path.as_str()).await?;
                let mut v = data.verifier();
                let mut buf = vec![0; data::PIECE_BYTES];
                loop {
                    let n = f.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    v.feed(&buf[..n])?;
                }
                f.shutdown().await?;
                say(&format!("downloaded {}", v.finish()?))?;
            }
            other => bail!("unknown command {other:?}"),
        }
    }
    sftp.close().await?;
    session
        .disconnect(russh::Disconnect::ByApplication, "", "")
        .await?;
    Ok(())
}
