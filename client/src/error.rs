//! The client's error type, which errors mean "the server is gone", and
//! what to tell the user about an address that does not work.

use std::fmt;
use std::time::Duration;

use tonic::Code;

/// Who the client was talking to when something failed: it decides what the
/// message suggests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The coordinator at `-h`/`-k`.
    Coordinator,
    /// A server the coordinator named.
    Server,
    /// The coordinator's gateway (`--gateway`), at `-h`/`-k`.
    Gateway,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Coordinator => "the coordinator",
            Peer::Server => "the server",
            Peer::Gateway => "the coordinator's gateway",
        })
    }
}

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
    #[error("cannot connect to {peer} at {address}: {}; {}", chain(.source), connect_hint(*.peer, .source))]
    Connect {
        /// Whom.
        peer: Peer,
        /// `host:port`.
        address: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// Asking the coordinator failed (`GetServer`): it is not there, or what
    /// answers there is not a coordinator.
    #[error("cannot ask the coordinator at {address}: {}; {}", status_chain(.status), coordinator_hint(.status))]
    Coordinator {
        /// `host:port` of `-h`/`-k`.
        address: String,
        /// The call's status (boxed: `Status` is large).
        status: Box<tonic::Status>,
    },
    /// No answer in time from `peer` at `address`.
    #[error("{peer} at {address} did not answer within {limit:?}; {}", timeout_hint(*.peer))]
    NoAnswer {
        /// Whom.
        peer: Peer,
        /// `host:port`.
        address: String,
        /// How long the client waited.
        limit: Duration,
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
            Error::Connect { .. }
            | Error::Coordinator { .. }
            | Error::NoAnswer { .. }
            | Error::Timeout(_)
            | Error::NoServer(_)
            | Error::StreamEnded => true,
            Error::Rpc(status) => {
                matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
            }
            Error::InvalidAddress(_) | Error::UserOutOfRange(_) | Error::LoginRefused(_) => false,
        }
    }
}

/// An error and its sources, `a: b: c`, each said once (transports often
/// repeat their source's words in their own message) and without tonic's
/// uninformative "transport error".
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    chain_from(String::new(), Some(err))
}

fn chain_from(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(cause) = source {
        let said = cause.to_string();
        if !said.is_empty() && said != "transport error" && !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// A status's message and the errors beneath it, without the status's own
/// debug rendering of them.
fn status_chain(status: &tonic::Status) -> String {
    let said = if status.message().is_empty() { status.code().description() } else { status.message() };
    chain_from(said.to_owned(), std::error::Error::source(status))
}

/// True when an error's words say that what answered does not speak
/// HTTP/2 (and so not gRPC): another service's port. Such a service
/// (RabbitMQ, say) answers our preface with its own and hangs up; which
/// of the two the client notices first is a race, so a connection closed
/// or broken before any answer counts too.
fn not_grpc(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["h2 protocol", "http2", "frame", "protocol error", "invalid http", "connection closed", "broken pipe"]
        .iter()
        .any(|w| text.contains(w))
}

/// What to check when the coordinator cannot be asked.
fn coordinator_hint(status: &tonic::Status) -> &'static str {
    let text = status_chain(status);
    match status.code() {
        Code::Unimplemented => {
            "what answers there is not the coordinator (a server's port?): -k/--port must be the coordinator's port"
        }
        _ if not_grpc(&text) => {
            "what answers there does not speak gRPC (or hung up at once): -k/--port must be the coordinator's port"
        }
        Code::DeadlineExceeded => timeout_hint(Peer::Coordinator),
        _ => "is the coordinator running, and do -h/--host and -k/--port (SNS_COORD_HOST, SNS_COORD_PORT) name it?",
    }
}

/// What to check when a connection cannot be made.
fn connect_hint(peer: Peer, source: &tonic::transport::Error) -> &'static str {
    if peer != Peer::Server && not_grpc(&chain(source)) {
        return "what answers there does not speak gRPC (or hung up at once): -k/--port must be the coordinator's port";
    }
    match peer {
        Peer::Server => {
            "the coordinator named it for this user: it may have just stopped, or the address it advertises is \
             not reachable from here (then use --gateway)"
        }
        Peer::Coordinator => {
            "is the coordinator running, and do -h/--host and -k/--port (SNS_COORD_HOST, SNS_COORD_PORT) name it?"
        }
        Peer::Gateway => "is the coordinator running with --gateway, and do -h/--host and -k/--port name it?",
    }
}

/// What to check when nothing answers in time.
fn timeout_hint(peer: Peer) -> &'static str {
    match peer {
        Peer::Server => "the server may be overloaded or cut off; the client looks for another",
        Peer::Coordinator | Peer::Gateway => {
            "a firewall or a wrong -h/--host may swallow the connection; check -h/--host and -k/--port"
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
    fn coordinator_errors_name_the_address_and_what_to_check() {
        let at = |status: Status| Error::Coordinator { address: "127.0.0.1:9010".into(), status: Box::new(status) };
        let not_coordinator = at(Status::unimplemented("")).to_string();
        assert!(not_coordinator.starts_with("cannot ask the coordinator at 127.0.0.1:9010: "), "{not_coordinator}");
        assert!(not_coordinator.contains("is not the coordinator"), "{not_coordinator}");
        let not_grpc = at(Status::internal("h2 protocol error: http2 error")).to_string();
        assert!(not_grpc.contains("does not speak gRPC"), "{not_grpc}");
        let nobody = at(Status::unavailable("tcp connect error")).to_string();
        assert!(nobody.contains("is the coordinator running"), "{nobody}");
        assert!(at(Status::unavailable("x")).is_connection_lost(), "retried during a failover");
    }

    #[test]
    fn chains_say_each_cause_once() {
        let inner = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let outer = std::io::Error::other(ChainLink("tcp connect error", inner));
        assert_eq!(super::chain(&outer), "tcp connect error: Connection refused");
    }

    /// An error with a message and a source.
    #[derive(Debug)]
    struct ChainLink(&'static str, std::io::Error);

    impl std::fmt::Display for ChainLink {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for ChainLink {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
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
