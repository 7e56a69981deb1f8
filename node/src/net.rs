//! Small networking helpers shared by every node kind.

use crate::auth::Attach;
use crate::error::{Error, Result};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel for node-to-node calls: every call carries the deployment's
/// token (see [`crate::auth`]).
pub type NodeChannel = InterceptedService<Channel, Attach>;

/// How long to wait for a TCP connection to a peer on the same network.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound for one unary call between nodes.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `bind:port` (port 0 = any free port) and, if asked, writes the
/// bound port to `port_file` (so a launcher can start nodes on free ports).
pub async fn bind(bind: &str, port: u16, port_file: Option<&Path>) -> Result<TcpListener> {
    let listener = TcpListener::bind((bind, port))
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {bind}:{port}: {e}")))?;
    if let Some(path) = port_file {
        write_port_file(path, local_port(&listener)?)?;
    }
    Ok(listener)
}

/// Writes `port` to `path` atomically (a launcher polls for it).
pub fn write_port_file(path: &Path, port: u16) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, port.to_string()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub fn local_port(listener: &TcpListener) -> Result<u16> {
    listener.local_addr().map(|a: SocketAddr| a.port()).map_err(|e| Error::Other(e.to_string()))
}

/// The listener as a stream of accepted connections, for tonic, with
/// Nagle's algorithm off: every message here is small and latency-bound.
pub fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A lazily connecting channel to `host:port`.
pub fn channel(host: &str, port: &str) -> Result<Channel> {
    channel_with_timeout(host, port, CALL_TIMEOUT)
}

/// As [`channel`], for calls that may take up to `timeout` (a switchover
/// waits for a lease to run out).
pub fn channel_with_timeout(host: &str, port: &str, timeout: Duration) -> Result<Channel> {
    channel_from(host, port, timeout, None)
}

/// As [`channel_with_timeout`], its connections leaving from `source` when
/// given (the system picks otherwise).
fn channel_from(host: &str, port: &str, timeout: Duration, source: Option<IpAddr>) -> Result<Channel> {
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
    let tls = crate::tls::client();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}:{port}"))
        .map_err(|e| Error::Config(format!("bad address {host}:{port}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .tcp_nodelay(true)
        .local_address(source);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| Error::Config(format!("TLS to {host}:{port}: {e}")))?;
    }
    Ok(endpoint.connect_lazy())
}

/// A lazily connecting node-to-node channel to `host:port`.
pub fn node_channel(host: &str, port: &str, attach: &Attach) -> Result<NodeChannel> {
    Ok(InterceptedService::new(channel(host, port)?, attach.clone()))
}

/// As [`node_channel`], its connections leaving from `source` when given.
pub fn node_channel_from(host: &str, port: &str, source: Option<IpAddr>, attach: &Attach) -> Result<NodeChannel> {
    Ok(InterceptedService::new(channel_from(host, port, CALL_TIMEOUT, source)?, attach.clone()))
}

/// As [`node_channel`], for calls that may take up to `timeout`.
pub fn node_channel_with_timeout(host: &str, port: &str, timeout: Duration, attach: &Attach) -> Result<NodeChannel> {
    Ok(InterceptedService::new(channel_with_timeout(host, port, timeout)?, attach.clone()))
}

/// A node-to-node channel to `host:port` given as one string.
pub fn node_channel_to(addr: &str, attach: &Attach) -> Result<NodeChannel> {
    Ok(InterceptedService::new(channel_to(addr)?, attach.clone()))
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A lazily connecting channel to `host:port` given as one string.
pub fn channel_to(addr: &str) -> Result<Channel> {
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| Error::Config(format!("address {addr:?} is not host:port")))?;
    channel(host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// The listener of a plain-text port that serves the gRPC health service
/// only (`--health-port`): what the kubelet's gRPC probes can reach when the
/// node's own port speaks TLS. Bound by `main` before the node starts, taken
/// by the node that serves it (one node per process).
static HEALTH_LISTENER: std::sync::Mutex<Option<TcpListener>> = std::sync::Mutex::new(None);

/// Binds `bind:port` for [`serve_health`].
pub async fn bind_health(bind: &str, port: u16) -> Result<()> {
    let listener = crate::net::bind(bind, port, None).await?;
    *HEALTH_LISTENER.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(listener);
    Ok(())
}

/// Serves `health` (the same service as on the node's port, so both answer
/// alike) on the health port, if one was bound, until `shutdown`.
pub fn serve_health<T: tonic_health::pb::health_server::Health>(
    health: tonic_health::pb::health_server::HealthServer<T>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(listener) = HEALTH_LISTENER.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
        return;
    };
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the health port stopped");
        }
    });
}
