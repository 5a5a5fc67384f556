//! The coordinator's domain error: why a request of the `ferry` CLI was refused or could
//! not be done, by the module that says so. The gRPC service turns it into a status in one
//! place (`From<Error> for tonic::Status` in [`crate::service`]).

use crate::access::AccessError;
use crate::catalog::prune::PruneError;
use crate::dispatch::DispatchError;
use crate::store::StoreError;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's certificate may not call the method ([`crate::access`]).
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A trigger or a job lookup refused ([`crate::dispatch`]).
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// Prune refused, or the backup server failed it ([`crate::catalog::prune`]).
    #[error(transparent)]
    Prune(#[from] PruneError),
    /// The store failed.
    #[error("job store: {0}")]
    Store(#[from] StoreError),
}
