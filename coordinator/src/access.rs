//! Who may call what on the coordinator: the `[[operators]]` of `coordinator.toml` (a
//! certificate name and a role each) against one table, [`METHODS`], of every method of
//! the `ferry.v1.Coordinator` service and the least role it needs.
//!
//! | role       | may call                                                                  |
//! |------------|---------------------------------------------------------------------------|
//! | `viewer`   | ListAgents, ListJobs, GetJob, WatchJob, ListBackups, Status, ListAudit, ListSets, ListKeys |
//! | `operator` | the above, and TriggerBackup, TriggerRestore (restores and verify drills)  |
//! | `admin`    | the above, and Prune                                                      |
//!
//! Every other certificate the fleet CA signed (the agents', the coordinator's own, a name
//! no longer listed) is refused on every method with `PermissionDenied`, naming the
//! certificate and the role the method needs (the status comes from [`crate::Error`]).
//! The check runs in one place, [`Guarded`], a wrapper around the whole gRPC service: it
//! sees the method's path and the client's certificate before any handler runs or any
//! message is decoded, and refuses a path missing from the table, so a method added to
//! the contract without a row here is refused to everyone rather than open to all.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferry_core::Bounded;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// An operator's role, from least to most allowed: each role may call what the ones before
/// it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum OperatorRole {
    /// Read only: agents, jobs, backups, status, audit log, backup sets.
    Viewer,
    /// Also orders backups, restores and verify drills.
    Operator,
    /// Also prunes the backup server.
    Admin,
}

impl OperatorRole {
    /// Every role, least first.
    pub const ALL: [OperatorRole; 3] = [
        OperatorRole::Viewer,
        OperatorRole::Operator,
        OperatorRole::Admin,
    ];

    /// `viewer`, `operator` or `admin`: the spelling of `coordinator.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Operator => "operator",
            OperatorRole::Admin => "admin",
        }
    }

    /// The role spelt `s` (exactly, lower case), if any.
    pub fn parse(s: &str) -> Option<OperatorRole> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The gRPC service [`Guarded`] protects.
pub const SERVICE: &str = "ferry.v1.Coordinator";

/// Every method of `ferry.v1.Coordinator` (as named in `proto/ferry/v1/ferry.proto`) and
/// the least role that may call it. A unit test checks that it lists exactly the methods
/// of the contract.
pub const METHODS: &[(&str, OperatorRole)] = &[
    ("ListAgents", OperatorRole::Viewer),
    ("ListJobs", OperatorRole::Viewer),
    ("GetJob", OperatorRole::Viewer),
    ("WatchJob", OperatorRole::Viewer),
    ("ListBackups", OperatorRole::Viewer),
    ("Status", OperatorRole::Viewer),
    ("ListAudit", OperatorRole::Viewer),
    ("ListSets", OperatorRole::Viewer),
    ("ListKeys", OperatorRole::Viewer),
    ("TriggerBackup", OperatorRole::Operator),
    ("TriggerRestore", OperatorRole::Operator),
    ("Prune", OperatorRole::Admin),
];

/// The method named by a gRPC request path `/ferry.v1.Coordinator/NAME` and the role it
/// needs; `None` for any other path.
pub fn method_of(path: &str) -> Option<(&'static str, OperatorRole)> {
    let name = path
        .strip_prefix('/')?
        .strip_prefix(SERVICE)?
        .strip_prefix('/')?;
    METHODS.iter().copied().find(|(m, _)| *m == name)
}

/// A call refused: all of them become `PermissionDenied`.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The certificate's name is not in `[[operators]]`.
    #[error(
        "certificate {name} is not an operator of this coordinator: {method} needs the {needed} \
         role (list the certificate's name with a role in [[operators]] of coordinator.toml; \
         agents' and the coordinator's own certificates are never operators)"
    )]
    NotAnOperator {
        /// The certificate's common name, quoted and cut.
        name: String,
        /// The method called.
        method: &'static str,
        /// The least role it needs.
        needed: OperatorRole,
    },
    /// The certificate is an operator whose role is below the method's.
    #[error(
        "certificate {name} has the {has} role: {method} needs the {needed} role \
         ([[operators]] of coordinator.toml)"
    )]
    RoleTooLow {
        /// The certificate's common name, quoted and cut.
        name: String,
        /// Its role.
        has: OperatorRole,
        /// The method called.
        method: &'static str,
        /// The least role it needs.
        needed: OperatorRole,
    },
    /// No client certificate, or one without a readable common name.
    #[error(
        "a client certificate without a common name cannot be an operator: {method} needs the \
         {needed} role"
    )]
    NoName {
        /// The method called.
        method: &'static str,
        /// The least role it needs.
        needed: OperatorRole,
    },
    /// A path that is not a method of the table.
    #[error(
        "{path} is not a method of {SERVICE} this coordinator grants to anyone (it is not in \
         its access table)"
    )]
    UnknownMethod {
        /// The request path, quoted and cut.
        path: String,
    },
}

/// The operators and their roles, by certificate name.
#[derive(Clone, Debug, Default)]
pub struct Access {
    operators: BTreeMap<String, OperatorRole>,
}

impl Access {
    /// Grants each certificate name its role.
    pub fn new(operators: BTreeMap<String, OperatorRole>) -> Access {
        Access { operators }
    }

    /// Whether the certificate named `peer` (`None`: no name) may call the method at
    /// request path `path` (`/ferry.v1.Coordinator/NAME`).
    ///
    /// # Errors
    /// [`AccessError`] naming the certificate (cut to 100 characters), the method and the
    /// role it needs.
    pub fn check(&self, peer: Option<&str>, path: &str) -> Result<(), AccessError> {
        let (method, needed) = method_of(path).ok_or_else(|| AccessError::UnknownMethod {
            path: Bounded(path).to_string(),
        })?;
        let name = peer.ok_or(AccessError::NoName { method, needed })?;
        match self.operators.get(name) {
            Some(has) if *has >= needed => Ok(()),
            Some(has) => Err(AccessError::RoleTooLow {
                name: Bounded(name).to_string(),
                has: *has,
                method,
                needed,
            }),
            None => Err(AccessError::NotAnOperator {
                name: Bounded(name).to_string(),
                method,
                needed,
            }),
        }
    }
}

/// The client certificate's common name of an HTTP request the TLS server accepted, as
/// [`ferry_proto::tls::peer_name`] reads it.
fn peer_name<B>(request: &http::Request<B>) -> Option<String> {
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let mut probe = tonic::Request::new(());
    probe.extensions_mut().insert(info.clone());
    ferry_proto::tls::peer_name(&probe)
}

/// A gRPC service that calls [`Access::check`] on every request before `S` sees it, and
/// answers a refusal itself (`PermissionDenied`).
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    access: Arc<Access>,
}

impl<S> Guarded<S> {
    /// `inner`, open only to `access`.
    pub fn new(inner: S, access: Arc<Access>) -> Guarded<S> {
        Guarded { inner, access }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let peer = peer_name(&request);
        match self.access.check(peer.as_deref(), request.uri().path()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(e) => {
                tracing::warn!(
                    client = %Bounded(peer.as_deref().unwrap_or("")),
                    method = %Bounded(request.uri().path()),
                    error = %e,
                    "Request refused."
                );
                let response = Status::from(crate::Error::from(e)).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(BTreeMap::from([
            ("vera".to_owned(), OperatorRole::Viewer),
            ("otto".to_owned(), OperatorRole::Operator),
            ("ada".to_owned(), OperatorRole::Admin),
        ]))
    }

    fn path(method: &str) -> String {
        format!("/{SERVICE}/{method}")
    }

    #[test]
    fn the_table_lists_exactly_the_methods_of_the_contract() {
        let proto = include_str!("../../proto/proto/ferry/v1/ferry.proto");
        let body = proto
            .split("service Coordinator {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .expect("service Coordinator in ferry.proto");
        let mut in_proto: Vec<&str> = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .map(str::trim)
            .collect();
        let mut in_table: Vec<&str> = METHODS.iter().map(|(m, _)| *m).collect();
        in_proto.sort_unstable();
        in_table.sort_unstable();
        assert_eq!(in_proto, in_table);
    }

    #[test]
    fn each_role_calls_its_methods_and_those_below_only() {
        let a = access();
        for (method, needed) in METHODS {
            for (name, role) in [
                ("vera", OperatorRole::Viewer),
                ("otto", OperatorRole::Operator),
                ("ada", OperatorRole::Admin),
            ] {
                let got = a.check(Some(name), &path(method));
                assert_eq!(got.is_ok(), role >= *needed, "{name} {method}: {got:?}");
                if let Err(e) = got {
                    let text = e.to_string();
                    assert!(
                        text.contains(&format!("\"{name}\""))
                            && text.contains(&format!("the {needed} role"))
                            && text.contains(method),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn names_not_listed_are_refused_naming_the_certificate_cut_and_the_role() {
        let a = access();
        let e = a
            .check(Some("pg-prod"), &path("ListBackups"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"pg-prod\"") && e.contains("the viewer role") && e.contains("ListBackups"),
            "{e}"
        );
        let long = "x".repeat(5000);
        let e = a
            .check(Some(&long), &path("Prune"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("(cut; 5000 bytes)") && e.len() < 600, "{e}");
        let e = a.check(None, &path("Status")).unwrap_err().to_string();
        assert!(e.contains("without a common name"), "{e}");
    }

    #[test]
    fn a_path_missing_from_the_table_is_refused_even_to_an_admin() {
        let a = access();
        for p in [
            path("DropEverything"),
            "/ferry.v1.Agent/RunBackup".to_owned(),
            "/".to_owned(),
        ] {
            let e = a.check(Some("ada"), &p).unwrap_err();
            assert!(matches!(e, AccessError::UnknownMethod { .. }), "{p}: {e}");
        }
        assert_eq!(
            Status::from(crate::Error::from(a.check(Some("ada"), "/x").unwrap_err())).code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn roles_are_spelt_as_in_the_config() {
        for r in OperatorRole::ALL {
            assert_eq!(OperatorRole::parse(r.as_str()), Some(r));
        }
        assert_eq!(OperatorRole::parse("Admin"), None);
        assert_eq!(OperatorRole::parse("root"), None);
    }
}
