//! The end-to-end harness: real PostgreSQL clusters, a real sshd as the backup server, a
//! MongoDB-wire server, and the real `ferry-agent`, `ferry-coordinator` and `ferry`
//! binaries, each on free loopback ports in a per-test directory and stopped on drop. A
//! missing service binary fails the test naming the Debian package to install (and
//! `scripts/install-deps`, which installs them all); nothing is skipped. Needs root: it
//! runs PostgreSQL as the `postgres` OS user and creates the OS user `ferrybk`.
//!
//! Modules, all re-exported at the top:
//! - [`process`]: [`free_port`], [`bin`], [`require`], [`Proc`] (a child killed on drop)
//!   and small helpers ([`tail`], [`run_ok`], [`output_within`], [`append`], [`Tmpfs`]).
//! - [`postgres`]: [`Postgres`], a throwaway cluster, with [`Postgres::table_fingerprints`]
//!   to compare restored content with the source.
//! - [`sshd`]: [`Sshd`], the backup server, and [`BACKUP_USER`].
//! - [`fleet`]: [`Fleet`] (certificates from `ferry-coordinator pki`) and [`age_keygen`].
//! - [`config`]: writers of `agent.toml` ([`AgentConfig`]) and `coordinator.toml`
//!   ([`CoordinatorConfig`]).
//! - [`deployment`]: [`Deployment`], all of the above for one test.
//! - [`mongo`]: [`MongoServer`] (SecantusDB).
//! - [`etcd`]: [`EtcdServer`] (Debian's etcd-server) and `etcdctl`.
//! - [`influx`]: [`InfluxServer`] (Debian's influxdb) and the `influx` shell.
//! - [`ceph`]: [`CephCluster`], a one-host Ceph cluster with an RGW (S3) on loopback,
//!   shared by the tests of a test binary, and S3 calls through the stock client (boto3).
//! - [`hostile`]: what an attacker would do: certificates with a chosen validity,
//!   raw gRPC clients, a backup server whose host key changed, crafted tar archives.
//!
//! Environment: `FERRY_KEEP_TEST_DIRS=1` keeps a deployment's directory;
//! `FERRY_TEST_NO_BUILD=1` uses the built binaries without running `cargo build` first;
//! `FERRY_VENV` is the SecantusDB venv (default `/opt/ferry-test/venv`).

pub mod ceph;
pub mod config;
pub mod deployment;
pub mod etcd;
pub mod fleet;
pub mod hostile;
pub mod influx;
pub mod mongo;
pub mod netns;
pub mod physical;
pub mod postgres;
pub mod process;
pub mod sshd;
pub mod webhook;

pub use ceph::*;
pub use config::*;
pub use deployment::*;
pub use etcd::*;
pub use fleet::*;
pub use hostile::*;
pub use influx::*;
pub use mongo::*;
pub use physical::*;
pub use postgres::*;
pub use process::*;
pub use sshd::*;
pub use webhook::*;
