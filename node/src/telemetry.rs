//! Logging and spans: one line per event on stderr, as text (coloured only
//! when stderr is a terminal, so log files stay plain) or as JSON (one
//! object per line, with the spans it happened in), filtered by `--log`
//! (env `SNS_LOG`, `RUST_LOG` syntax: `info`, `sns_node::server=debug`).
//!
//! Every gRPC call runs in an `rpc` span naming the method and the node
//! (cluster, server); handlers add the user and the term once they know
//! them. Every background task runs in a span named after it, under the
//! node's.

use std::io::IsTerminal;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

pub fn init(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_current_span(false).with_span_list(true).init(),
    }
}

/// Who this process is, for the `rpc` spans of its gRPC servers.
#[derive(Debug, Clone, Copy)]
pub struct NodeId {
    pub cluster: u32,
    pub server: u32,
}

/// The span of one gRPC call: `rpc` (`Service/Method`), the node, and
/// `user` / `term` left for the handler to record.
pub fn rpc_span(node: Option<NodeId>) -> impl Fn(&http::Request<()>) -> tracing::Span + Clone + Send + Sync + 'static {
    move |req| {
        let path = req.uri().path();
        let rpc = path.rsplit_once('/').map_or(path, |(service, method)| {
            let service = service.rsplit('.').next().unwrap_or(service);
            &path[path.len() - method.len() - service.len() - 1..]
        });
        match node {
            Some(n) => tracing::info_span!(
                "rpc",
                rpc,
                cluster = n.cluster,
                server = n.server,
                user = tracing::field::Empty,
                term = tracing::field::Empty
            ),
            None => tracing::info_span!("rpc", rpc, cluster = tracing::field::Empty, user = tracing::field::Empty),
        }
    }
}

/// Records the caller's user id on the current `rpc` span.
pub fn record_user(user: u32) {
    tracing::Span::current().record("user", user);
}

/// Records the term a call is served under on the current `rpc` span.
pub fn record_term(term: u64) {
    tracing::Span::current().record("term", term);
}
