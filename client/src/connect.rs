//! Finding and reaching the user's server: the coordinator's answer, the
//! connection, the login, and bounded unary calls. Errors name the address
//! and whom the client was talking to.

use std::future::Future;
use std::time::Duration;

use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Request};
use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Peer};
use crate::session::{Config, Timing};

/// A logged-in connection to the user's server.
#[derive(Debug)]
pub struct Attached {
    /// The client for every later call.
    pub server: SnsServiceClient<Channel>,
    /// The server's `host:port` as the coordinator names it; with
    /// `--gateway`, followed by the gateway the calls go through.
    pub shown_as: String,
}

/// `host:port` of the coordinator (and gateway).
pub fn coordinator_address(config: &Config) -> String {
    format!("{}:{}", config.coord_host, config.coord_port)
}

/// A client for the coordinator. Lazy: the coordinator is asked again at
/// every failover, and a lazy channel reconnects by itself if the
/// coordinator restarted meanwhile.
pub fn coordinator(config: &Config) -> Result<CoordServiceClient<Channel>, Error> {
    let endpoint = endpoint(&config.coord_host, &config.coord_port.to_string(), config.tls.as_ref())?;
    Ok(CoordServiceClient::new(endpoint.connect_timeout(config.timing.connect).connect_lazy()))
}

/// Asks the coordinator for the user's server, connects and logs in (with
/// request id `login`). With `--gateway` the calls go to the coordinator's
/// gateway, but the coordinator is still asked which server is behind it,
/// so that what the user is told names the server.
pub async fn attach(config: &Config, coordinator: &CoordServiceClient<Channel>, login: u64) -> Result<Attached, Error> {
    let timing = &config.timing;
    let id = i32::try_from(config.user).map_err(|_| Error::UserOutOfRange(config.user))?;
    let mut ask = tonic::Request::new(Id { id });
    ask.set_timeout(timing.rpc);
    let coordinator_at = coordinator_address(config);
    let info = match unary(timing.rpc, coordinator.clone().get_server(ask)).await {
        Ok(info) => info,
        Err(Error::Rpc(status)) => return Err(Error::Coordinator { address: coordinator_at, status }),
        Err(Error::Timeout(limit)) => {
            return Err(Error::NoAnswer { peer: Peer::Coordinator, address: coordinator_at, limit });
        }
        Err(err) => return Err(err),
    };
    if info.hostname.is_empty() || info.port.is_empty() || info.server_id <= 0 {
        return Err(Error::NoServer(info.unavailable_reason));
    }
    let server_at = format!("{}:{}", info.hostname, info.port);
    let (peer, host, port, shown_as) = if config.gateway {
        let shown = format!("{server_at} via the gateway {coordinator_at}");
        (Peer::Gateway, config.coord_host.clone(), config.coord_port.to_string(), shown)
    } else {
        (Peer::Server, info.hostname, info.port, server_at)
    };
    let channel = connect(peer, &host, &port, timing, config.tls.as_ref()).await?;
    let mut server = SnsServiceClient::new(channel);
    let reply = unary(timing.rpc, server.login(request(timing.rpc, config.user.to_string(), None, login))).await?;
    if reply.msg != "SUCCESS" {
        return Err(Error::LoginRefused(reply.msg));
    }
    Ok(Attached { server, shown_as })
}

/// Connects to `peer` now (not lazily), so that a dead one is found out
/// before it is used.
async fn connect(
    peer: Peer,
    host: &str,
    port: &str,
    timing: &Timing,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel, Error> {
    let endpoint = endpoint(host, port, tls)?
        .connect_timeout(timing.connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(timing.keepalive)
        .keep_alive_timeout(timing.keepalive);
    let address = format!("{host}:{port}");
    // The outer timeout also bounds the HTTP/2 handshake, which
    // `connect_timeout` (TCP only) does not.
    match timeout(timing.connect, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(Error::Connect { peer, address, source }),
        Err(_) => Err(Error::NoAnswer { peer, address, limit: timing.connect }),
    }
}

/// The endpoint of `host:port`, over TLS when `tls` is given.
fn endpoint(host: &str, port: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> Result<Endpoint, Error> {
    let plain = uri(host, port)?;
    let uri = if tls.is_some() { plain.replacen("http://", "https://", 1) } else { plain };
    let endpoint = Endpoint::from_shared(uri.clone()).map_err(|_| Error::InvalidAddress(uri.clone()))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|_| Error::InvalidAddress(uri)),
        None => Ok(endpoint),
    }
}

/// `http://host:port`, with IPv6 literals bracketed. The port must be a
/// number: it comes from the coordinator, and a garbled one must fail here
/// rather than connect somewhere unexpected.
pub fn uri(host: &str, port: &str) -> Result<String, Error> {
    if port.parse::<u16>().is_err() || host.is_empty() {
        return Err(Error::InvalidAddress(format!("{host}:{port}")));
    }
    if host.contains(':') && !host.starts_with('[') {
        Ok(format!("http://[{host}]:{port}"))
    } else {
        Ok(format!("http://{host}:{port}"))
    }
}

/// Awaits a unary call for at most `limit`.
pub async fn unary<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(Error::Timeout(limit)),
    }
}

/// A `Request` for `user` with request id `id` (0: none), with the
/// client's deadline passed on to the server (`grpc-timeout`) so it can drop
/// work nobody waits for.
pub fn request(limit: Duration, user: String, argument: Option<&String>, id: u64) -> tonic::Request<Request> {
    let mut request = tonic::Request::new(Request {
        username: user,
        arguments: argument.cloned().into_iter().collect(),
        request_id: id,
    });
    request.set_timeout(limit);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_bracket_ipv6_and_reject_bad_ports() {
        assert_eq!(uri("127.0.0.1", "9000").ok().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(uri("tsd-1.sns", "9010").ok().as_deref(), Some("http://tsd-1.sns:9010"));
        assert_eq!(uri("::1", "9000").ok().as_deref(), Some("http://[::1]:9000"));
        assert_eq!(uri("[::1]", "9000").ok().as_deref(), Some("http://[::1]:9000"));
        assert!(uri("host", "").is_err());
        assert!(uri("host", "99999").is_err());
        assert!(uri("host", "90a").is_err());
        assert!(uri("", "9000").is_err());
    }

    #[test]
    fn requests_carry_the_argument_as_typed() {
        let req = request(Duration::from_secs(1), "1".into(), Some(&"../../etc".to_owned()), 7).into_inner();
        assert_eq!(req.username, "1");
        assert_eq!(req.arguments, ["../../etc"]);
        assert!(request(Duration::from_secs(1), "1".into(), None, 0).into_inner().arguments.is_empty());
    }
}
