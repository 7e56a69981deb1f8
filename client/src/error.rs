//! The client's error type, and which errors mean "the server is gone".

use std::time::Duration;

use tonic::Code;

/// Why talking to the coordinator or a server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host/port pair that does not form a URI.
    #[error("invalid address {0:?}")]
    InvalidAddress(String),
    /// The user id does not fit the coordinator protocol's `int32` id.
    #[error("user id {0} does not fit the coordinator's int32 id")]
    UserOutOfRange(u32),
    /// The coordinator knows no live master for the user's cluster; why,
    /// when it says (e.g. no server holding every acknowledged write is up).
    #[error("the coordinator has no server for this user{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    NoServer(String),
    /// The TCP/HTTP2 connection could not be established.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Login answered something other than `SUCCESS`.
    #[error("login refused: {0:?}")]
    LoginRefused(String),
    /// A call failed with this status (boxed: `Status` is large, and this
    /// error travels in every `Result`).
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(Box<tonic::Status>),
    /// The server ended the timeline stream.
    #[error("the server closed the timeline stream")]
    StreamEnded,
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rpc(Box::new(status))
    }
}

impl Error {
    /// True when the error means the server is gone (dead, unreachable, or
    /// no longer the master), so the client should ask the coordinator for
    /// another one; false when the server answered and meant it.
    ///
    /// `Unavailable` is what a live server that is not the master answers.
    /// `Unknown`, `Cancelled` and `DeadlineExceeded` are what tonic reports
    /// for a connection that broke mid-call; our servers never send them on
    /// purpose.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout(_) | Error::NoServer(_) | Error::StreamEnded => true,
            Error::Rpc(status) => {
                matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
            }
            Error::InvalidAddress(_) | Error::UserOutOfRange(_) | Error::LoginRefused(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Status;

    use super::Error;

    #[test]
    fn broken_connections_and_non_masters_mean_failover() {
        for status in [
            Status::unavailable("not the master"),
            Status::unknown("transport error"),
            Status::cancelled("h2 protocol error"),
            Status::deadline_exceeded("timeout"),
        ] {
            assert!(Error::from(status.clone()).is_connection_lost(), "{status:?}");
        }
        assert!(Error::Timeout(Duration::from_secs(5)).is_connection_lost());
        assert!(Error::StreamEnded.is_connection_lost());
        assert!(Error::NoServer(String::new()).is_connection_lost());
    }

    #[test]
    fn deliberate_answers_are_not_failover() {
        for status in [
            Status::invalid_argument("bad"),
            Status::already_exists("second timeline"),
            Status::internal("disk"),
            Status::permission_denied("no"),
        ] {
            assert!(!Error::from(status.clone()).is_connection_lost(), "{status:?}");
        }
        assert!(!Error::LoginRefused("FAILURE_UNKNOWN".into()).is_connection_lost());
    }
}
