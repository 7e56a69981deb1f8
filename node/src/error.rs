//! The node crate's error type, and the one place it becomes a gRPC status.

use std::path::Path;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("corrupt journal: {0}")]
    Corrupt(String),
    /// An append to the journal failed and was cut back: nothing of it
    /// stays. `poisoned`: the journal refuses appends until a restart.
    #[error("cannot write the journal {path}: {source}")]
    Journal { path: String, source: std::io::Error, disk_full: bool, poisoned: bool },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC call failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.display().to_string(), source }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::Rpc(status) => status,
            Error::Transport(_) => tonic::Status::unavailable(e.to_string()),
            // A peer that cannot write says so at once (a master reacts to
            // it instead of retrying).
            Error::Journal { disk_full: true, .. } => tonic::Status::resource_exhausted(e.to_string()),
            Error::Journal { .. } => tonic::Status::data_loss(e.to_string()),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}
