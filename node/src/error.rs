//! The node crate's error type, and the one place it becomes a gRPC status.
//!
//! The server's logic speaks in domain words (a server that is not
//! serving, a master that was replaced, a stale term, a slave that needs a
//! snapshot); `From<Error> for tonic::Status` alone picks the gRPC code
//! each one shows clients and peers. Those codes are a protocol: clients
//! retry on `UNAVAILABLE`, a master reads its slave's `FAILED_PRECONDITION`
//! as a newer term and its `RESOURCE_EXHAUSTED` or `DATA_LOSS` as a disk
//! that cannot take writes.

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
    /// This server does not serve clients now (not the master, no current
    /// lease, a journal it cannot write or trust): the client should ask
    /// the coordinator who does.
    #[error("{0}; ask the coordinator for the master again")]
    NotServing(String),
    /// The master could not journal a write: nothing of it stays anywhere,
    /// and this server stops taking writes.
    #[error("the write was not made: {0}; ask the coordinator for the master again")]
    NotMade(#[source] Box<Error>),
    /// A newer master exists: the write stays in this server's journal but
    /// was never acknowledged (the new master's snapshot replaces it).
    #[error("{0}; the write was not acknowledged: ask the coordinator for the master again")]
    Replaced(String),
    /// The coordinator could not be reached within the lease: the slave
    /// may hold the write. A retry with the same request id gets the first
    /// outcome.
    #[error("{0}; the write may or may not have been made: retry it with the same request id")]
    OutcomeUnknown(String),
    /// A newer term exists than the one a call came under: a slave refusing
    /// an old master, or the coordinator refusing a master it replaced.
    #[error("{0}")]
    StaleTerm(String),
    /// A slave cannot take forwarded writes before its master installs its
    /// whole state (damaged journal, not synced under the term, a gap).
    #[error("{0}")]
    NeedsSnapshot(String),
    /// A request that can never be valid, whoever serves it.
    #[error("{0}")]
    Invalid(String),
    /// A peer did not answer in time.
    #[error("{0}")]
    NoAnswer(String),
    /// A peer's failed answer to a call of ours, as it came off the wire
    /// (the message says which peer where it matters): the master only
    /// reports it, and its code is passed on unchanged.
    #[error("{message}")]
    Peer { code: tonic::Code, message: String },
    /// The coordinator's records were written by another coordinator since
    /// this one read them (a compare-and-swap lost): this one is no longer
    /// the leader and must not act on what it holds.
    #[error("{0}")]
    StaleRecords(String),
    /// A call to the Kubernetes API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(String),
    /// The server is shutting down: the request was dropped undecided.
    #[error("server stopping")]
    Stopping,
    /// The data directory is held by another process (see
    /// [`crate::store::lock`]).
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Other(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.display().to_string(), source }
    }

    /// The same failure again, for another of the writes of a group that
    /// failed as one (the writer answers each). Every copy shows the same
    /// message and maps to the same gRPC code; an I/O source keeps its kind
    /// and text (`std::io::Error` is not `Clone`).
    pub fn duplicate(&self) -> Error {
        let io = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
        match self {
            Error::Io { path, source } => Error::Io { path: path.clone(), source: io(source) },
            Error::Corrupt(s) => Error::Corrupt(s.clone()),
            Error::Journal { path, source, disk_full, poisoned } => {
                Error::Journal { path: path.clone(), source: io(source), disk_full: *disk_full, poisoned: *poisoned }
            }
            // Not `Clone`: the copy keeps its message and its code.
            Error::Transport(_) => Error::Peer { code: tonic::Code::Unavailable, message: self.to_string() },
            Error::Rpc(status) => Error::Rpc(status.clone()),
            Error::Broker(e) => Error::Broker(e.clone()),
            Error::Config(s) => Error::Config(s.clone()),
            Error::NotServing(s) => Error::NotServing(s.clone()),
            Error::NotMade(e) => Error::NotMade(Box::new(e.duplicate())),
            Error::Replaced(s) => Error::Replaced(s.clone()),
            Error::OutcomeUnknown(s) => Error::OutcomeUnknown(s.clone()),
            Error::StaleTerm(s) => Error::StaleTerm(s.clone()),
            Error::NeedsSnapshot(s) => Error::NeedsSnapshot(s.clone()),
            Error::Invalid(s) => Error::Invalid(s.clone()),
            Error::NoAnswer(s) => Error::NoAnswer(s.clone()),
            Error::Peer { code, message } => Error::Peer { code: *code, message: message.clone() },
            Error::StaleRecords(s) => Error::StaleRecords(s.clone()),
            Error::Kube(s) => Error::Kube(s.clone()),
            Error::Stopping => Error::Stopping,
            Error::InUse(s) => Error::InUse(s.clone()),
            Error::Other(s) => Error::Other(s.clone()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Status;
        let message = e.to_string();
        match e {
            Error::Rpc(status) => status,
            Error::Peer { code, .. } => Status::new(code, message),
            // Clients retry these: they ask the coordinator again, or (an
            // unknown outcome) resend with the same request id.
            Error::Transport(_)
            | Error::NotServing(_)
            | Error::NotMade(_)
            | Error::Replaced(_)
            | Error::OutcomeUnknown(_)
            | Error::StaleRecords(_)
            | Error::Kube(_)
            | Error::Stopping => Status::unavailable(message),
            // A master reads this from its slave as "a newer term exists"
            // and steps down.
            Error::StaleTerm(_) => Status::failed_precondition(message),
            // A slave asking its master to install its state first.
            Error::NeedsSnapshot(_) => Status::aborted(message),
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::NoAnswer(_) => Status::deadline_exceeded(message),
            // A peer that cannot write says so at once (a master reacts to
            // it instead of retrying).
            Error::Journal { disk_full: true, .. } => Status::resource_exhausted(message),
            Error::Journal { .. } => Status::data_loss(message),
            Error::Io { .. }
            | Error::Corrupt(_)
            | Error::Broker(_)
            | Error::Config(_)
            | Error::InUse(_)
            | Error::Other(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;
    use tonic::Code;

    fn journal(disk_full: bool) -> Error {
        let source = if disk_full {
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        } else {
            std::io::Error::from_raw_os_error(libc::EIO)
        };
        Error::Journal { path: "/d/journal.log".into(), source, disk_full, poisoned: !disk_full }
    }

    /// Clients and peers act on these codes and messages: a master steps
    /// down on FAILED_PRECONDITION from its slave, drops a slave answering
    /// RESOURCE_EXHAUSTED or DATA_LOSS, and clients re-ask the coordinator
    /// on UNAVAILABLE.
    #[test]
    fn domain_errors_keep_their_grpc_codes_and_messages() {
        let cases = [
            (
                Error::NotServing("server 1 is not the master of cluster 2".into()),
                Code::Unavailable,
                "server 1 is not the master of cluster 2; ask the coordinator for the master again",
            ),
            (
                Error::NotMade(Box::new(journal(true))),
                Code::Unavailable,
                "the write was not made: cannot write the journal /d/journal.log: No space left on device (os error 28); ask the coordinator for the master again",
            ),
            (
                Error::Replaced("server 1 was replaced as master of cluster 2".into()),
                Code::Unavailable,
                "server 1 was replaced as master of cluster 2; the write was not acknowledged: ask the coordinator for the master again",
            ),
            (
                Error::OutcomeUnknown("no coordinator".into()),
                Code::Unavailable,
                "no coordinator; the write may or may not have been made: retry it with the same request id",
            ),
            (Error::Stopping, Code::Unavailable, "server stopping"),
            (
                Error::StaleTerm("stale term 3: this server is at term 4 (master: false)".into()),
                Code::FailedPrecondition,
                "stale term 3: this server is at term 4 (master: false)",
            ),
            (
                Error::NeedsSnapshot("not synced under term 4: send a snapshot first".into()),
                Code::Aborted,
                "not synced under term 4: send a snapshot first",
            ),
            (
                Error::Invalid("post is 5000 bytes; at most 4096 are allowed".into()),
                Code::InvalidArgument,
                "post is 5000 bytes; at most 4096 are allowed",
            ),
            (
                Error::NoAnswer("slave 2 did not answer within 1s".into()),
                Code::DeadlineExceeded,
                "slave 2 did not answer within 1s",
            ),
            (
                Error::Peer { code: Code::Unavailable, message: "slave 2: transport error".into() },
                Code::Unavailable,
                "slave 2: transport error",
            ),
            (
                journal(true),
                Code::ResourceExhausted,
                "cannot write the journal /d/journal.log: No space left on device (os error 28)",
            ),
            (
                journal(false),
                Code::DataLoss,
                "cannot write the journal /d/journal.log: Input/output error (os error 5)",
            ),
            (Error::Other("apply task failed: x".into()), Code::Internal, "apply task failed: x"),
        ];
        for (e, code, message) in cases {
            let copy = tonic::Status::from(e.duplicate());
            let status = tonic::Status::from(e);
            assert_eq!((status.code(), status.message()), (code, message));
            assert_eq!((copy.code(), copy.message()), (code, message), "a duplicate answers the same");
        }
    }
}
