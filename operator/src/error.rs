//! The operator's one error type.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the SnsCluster has no namespace")]
    MissingNamespace,
    #[error("the SnsCluster has no uid yet")]
    MissingUid,
    #[error("invalid SnsCluster: {0}")]
    InvalidSpec(String),
    #[error("coordinator at {endpoint}: {reason}")]
    Coordinator { endpoint: String, reason: String },
    #[error("coordinator at {endpoint} did not answer within {timeout:?}")]
    CoordinatorTimeout { endpoint: String, timeout: Duration },
    #[error("switchover of cluster {cluster}: {reason}")]
    Switchover { cluster: u32, reason: String },
    #[error("cannot generate a password: {0}")]
    Random(String),
    #[error("certificates: {0}")]
    Tls(String),
    #[error("the Secret {0} is not what the operator generates: {1}")]
    BadSecret(String, String),
    /// Children whose apply failed (`Kind/name: why`); the others were
    /// applied all the same.
    #[error("{} of {total} children not applied: {}", failed.len(), failed.join("; "))]
    Apply { failed: Vec<String>, total: usize },
    #[error("serializing {0}: {1}")]
    Serialize(&'static str, serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short label for the failure metric and the Warning event.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::Finalizer(_) => "FinalizerError",
            Error::MissingNamespace | Error::MissingUid | Error::InvalidSpec(_) => "InvalidSpec",
            Error::Coordinator { .. } | Error::CoordinatorTimeout { .. } => "CoordinatorUnreachable",
            Error::Switchover { .. } => "SwitchoverRefused",
            Error::Random(_) => "RandomSourceError",
            Error::Serialize(..) => "SerializeError",
            Error::Tls(_) => "CertificateError",
            Error::BadSecret(..) => "BadSecret",
            Error::Apply { .. } => "ApplyFailed",
        }
    }
}
