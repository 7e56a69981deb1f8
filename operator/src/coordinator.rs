//! The operator's view of a deployment's coordinator: its routing table
//! (who is alive, who is master, under which term, who is in sync), and the
//! one thing the operator asks of it, a planned switchover.
//!
//! The reconciler sees only the [`RoutingTable`] trait, so its tests run
//! against a fixed table with no network; [`GrpcRoutingTable`] is the real
//! one, over `CoordAdmin.Table` and `CoordAdmin.Switchover`. Protobuf types
//! stay in this module.
//!
//! `CoordAdmin` is a node-to-node API: the coordinator of an SnsCluster
//! with a node secret answers only calls carrying the token derived from
//! it, and with TLS on it serves TLS under the SnsCluster's CA. The
//! reconciler hands both over through [`RoutingTable::authenticate`] after
//! reading them from the SnsCluster's Secrets; every call, a table read or
//! a switchover, goes through the same channel and carries them.

use crate::error::{Error, Result};
use futures_util::future::BoxFuture;
use sns_node::auth::{Attach, Secret};
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::{SwitchoverRequest, TableRequest};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Server,
    Synchronizer,
}

/// One node of the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub cluster: u32,
    /// Server id within the cluster, or the synchronizer's id.
    pub id: u32,
    pub kind: NodeKind,
    pub alive: bool,
    pub is_master: bool,
    /// The cluster's current promotion term.
    pub term: u64,
    /// A server recorded as holding every acknowledged write.
    pub in_sync: bool,
    /// A synchronizer's server (0 for a server).
    pub paired_server: u32,
}

/// A finished planned switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchoverDone {
    pub from: u32,
    pub to: u32,
    pub term: u64,
    /// Whether the old master stepped down when asked (false: the
    /// coordinator waited for its lease to run out).
    pub stepped_down: bool,
    pub millis: u64,
}

/// How long the operator waits for `CoordAdmin.Switchover`: the coordinator
/// answers within two of its leases plus 10 s (it waits out a silent
/// master's lease), and a lease is at most a few heartbeats of at most 10 s.
pub const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);

/// What a call to one coordinator needs: its deployment's node secret
/// (the token derives from it) and, with TLS on, the CA its certificate
/// chains to.
#[derive(Clone, Default)]
pub struct Credentials {
    pub secret: Option<Secret>,
    /// PEM; the endpoint is then dialled over https.
    pub ca: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("secret", &self.secret.is_some()).field("tls", &self.ca.is_some()).finish()
    }
}

pub trait RoutingTable: Send + Sync + 'static {
    /// The routing table of the coordinator at `endpoint`
    /// (`http://host:port`).
    fn table<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<Vec<NodeView>>>;
    /// Hands the master role of `cluster` to server `to` (None: the
    /// coordinator picks the in-sync slave), answered once it is done or
    /// why not.
    fn switchover<'a>(
        &'a self,
        endpoint: &'a str,
        cluster: u32,
        to: Option<u32>,
    ) -> BoxFuture<'a, Result<SwitchoverDone>>;
    /// Forgets the coordinator at `endpoint`: its SnsCluster is gone, so
    /// whatever is kept for it (a connection) is released.
    fn forget(&self, endpoint: &str);
    /// Calls to `endpoint` from now on carry `credentials`.
    fn authenticate(&self, endpoint: &str, credentials: Credentials) {
        let _ = (endpoint, credentials);
    }
}

/// One coordinator's connection and what its calls carry.
struct Link {
    channel: Channel,
    attach: Attach,
}

/// `CoordAdmin` over gRPC, one lazily connected channel per coordinator.
/// Each call carries its own deadline (a switchover may take far longer
/// than a table read).
pub struct GrpcRoutingTable {
    channels: Mutex<HashMap<String, Link>>,
    credentials: Mutex<HashMap<String, Credentials>>,
    timeout: Duration,
}

impl GrpcRoutingTable {
    /// `timeout` bounds each call: a coordinator that does not answer must
    /// not hold up the reconcile loop.
    pub fn new(timeout: Duration) -> Self {
        GrpcRoutingTable { channels: Mutex::new(HashMap::new()), credentials: Mutex::new(HashMap::new()), timeout }
    }

    /// The channel to `endpoint` (`http://host:port`; dialled as https
    /// with its CA when it has one) and the token its calls carry.
    fn channel(&self, endpoint: &str) -> Result<(Channel, Attach)> {
        // One lock at a time (authenticate takes them in the other order).
        if let Some(l) = self.channels.lock().expect("channel map lock").get(endpoint) {
            return Ok((l.channel.clone(), l.attach.clone()));
        }
        let creds = self.credentials.lock().expect("credentials lock").get(endpoint).cloned().unwrap_or_default();
        let bad = |reason: String| Error::Coordinator { endpoint: endpoint.into(), reason };
        let mut e = match &creds.ca {
            None => Endpoint::from_shared(endpoint.to_string()),
            Some(_) => Endpoint::from_shared(endpoint.replacen("http://", "https://", 1)),
        }
        .map_err(|e| bad(e.to_string()))?;
        if let Some(ca) = &creds.ca {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            e = e.tls_config(tls).map_err(|e| bad(format!("TLS: {e}")))?;
        }
        // No channel-wide request timeout: each call sets its own deadline
        // (a table read `timeout`, a switchover SWITCHOVER_PATIENCE).
        let channel = e.connect_timeout(self.timeout).connect_lazy();
        let attach = Attach::new(creds.secret);
        self.channels
            .lock()
            .expect("channel map lock")
            .insert(endpoint.to_string(), Link { channel: channel.clone(), attach: attach.clone() });
        Ok((channel, attach))
    }

    /// How many coordinators this client holds a channel to.
    /// After `UNAVAILABLE` (a replicated coordinator's standby, or one
    /// going away) the channel is dropped, credentials kept: the Service
    /// spreads connections, not calls, so a connection made to a replica
    /// that led once stays with it after it stood down. The next poll
    /// dials afresh and the Service, which routes to the ready pod (the
    /// leader) alone, picks the new leader.
    fn unavailable(&self, endpoint: &str, status: &tonic::Status) {
        if status.code() == tonic::Code::Unavailable {
            tracing::info!(endpoint, reason = status.message(), "coordinator unavailable; reconnecting next poll");
            self.channels.lock().expect("channel map lock").remove(endpoint);
        }
    }

    pub fn channels(&self) -> usize {
        self.channels.lock().expect("channel map lock").len()
    }
}

impl RoutingTable for GrpcRoutingTable {
    fn table<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<Vec<NodeView>>> {
        Box::pin(async move {
            let (channel, attach) = self.channel(endpoint)?;
            let mut client = CoordAdminClient::with_interceptor(channel, attach);
            let call = client.table(TableRequest {});
            let reply = tokio::time::timeout(self.timeout, call)
                .await
                .map_err(|_| Error::CoordinatorTimeout { endpoint: endpoint.into(), timeout: self.timeout })?
                .map_err(|s| {
                    self.unavailable(endpoint, &s);
                    Error::Coordinator { endpoint: endpoint.into(), reason: s.message().to_string() }
                })?;
            Ok(reply
                .into_inner()
                .nodes
                .into_iter()
                .filter_map(|n| {
                    let kind = match n.kind.as_str() {
                        "server" => NodeKind::Server,
                        "synchronizer" => NodeKind::Synchronizer,
                        _ => return None,
                    };
                    Some(NodeView {
                        cluster: n.cluster,
                        id: n.id,
                        kind,
                        alive: n.alive,
                        is_master: n.is_master,
                        term: n.term,
                        in_sync: n.in_sync,
                        paired_server: n.paired_server,
                    })
                })
                .collect())
        })
    }

    fn switchover<'a>(
        &'a self,
        endpoint: &'a str,
        cluster: u32,
        to: Option<u32>,
    ) -> BoxFuture<'a, Result<SwitchoverDone>> {
        Box::pin(async move {
            let (channel, attach) = self.channel(endpoint)?;
            let mut client = CoordAdminClient::with_interceptor(channel, attach);
            let call = client.switchover(SwitchoverRequest { cluster, to: to.unwrap_or(0) });
            let reply = tokio::time::timeout(SWITCHOVER_PATIENCE, call)
                .await
                .map_err(|_| Error::CoordinatorTimeout { endpoint: endpoint.into(), timeout: SWITCHOVER_PATIENCE })?
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable => {
                        self.unavailable(endpoint, &s);
                        Error::Coordinator { endpoint: endpoint.into(), reason: s.message().into() }
                    }
                    _ => Error::Switchover { cluster, reason: s.message().to_string() },
                })?
                .into_inner();
            Ok(SwitchoverDone {
                from: reply.from,
                to: reply.to,
                term: reply.term,
                stepped_down: reply.stepped_down,
                millis: reply.millis,
            })
        })
    }

    /// Drops the channel of a coordinator that is gone: the last clone of
    /// a tonic `Channel` going closes its connection, and a later SnsCluster
    /// of the same name starts with a fresh one.
    fn forget(&self, endpoint: &str) {
        self.channels.lock().expect("channel map lock").remove(endpoint);
        self.credentials.lock().expect("credentials lock").remove(endpoint);
    }

    /// A change of credentials (first read, a new CA, a replaced secret)
    /// drops the channel, so the next call connects with them.
    fn authenticate(&self, endpoint: &str, credentials: Credentials) {
        let fingerprint = |c: &Credentials| (c.secret.as_ref().map(|s| s.seal(b"fingerprint")), c.ca.clone());
        let changed = {
            let mut creds = self.credentials.lock().expect("credentials lock");
            let changed = creds.get(endpoint).map(fingerprint) != Some(fingerprint(&credentials));
            creds.insert(endpoint.to_string(), credentials);
            changed
        };
        if changed {
            self.channels.lock().expect("channel map lock").remove(endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_absent_coordinator_is_an_error_not_a_hang() {
        // Port 9 on loopback (discard) has no gRPC server in any test setup.
        let t = GrpcRoutingTable::new(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let err = t.table("http://127.0.0.1:9").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.reason(), "CoordinatorUnreachable");
        assert!(t.table("not a url").await.is_err());
    }

    #[tokio::test]
    async fn forget_drops_the_channel() {
        let t = GrpcRoutingTable::new(Duration::from_millis(200));
        t.channel("http://127.0.0.1:9").unwrap();
        t.channel("http://127.0.0.2:9").unwrap();
        t.channel("http://127.0.0.2:9").unwrap();
        assert_eq!(t.channels(), 2, "one lazily made channel per coordinator, kept between polls");
        t.forget("http://127.0.0.1:9");
        assert_eq!(t.channels(), 1);
        t.forget("http://127.0.0.1:9");
        assert_eq!(t.channels(), 1, "forgetting twice is harmless");
    }

    #[tokio::test]
    async fn an_unavailable_coordinator_is_dialled_afresh_next_time() {
        // Nothing listens there: the call fails UNAVAILABLE, as a standby's
        // refusal does, and the next call makes a new channel.
        let t = GrpcRoutingTable::new(Duration::from_millis(200));
        t.authenticate("http://127.0.0.1:9", Credentials::default());
        t.table("http://127.0.0.1:9").await.unwrap_err();
        assert_eq!(t.channels(), 0);
        assert!(t.credentials.lock().unwrap().contains_key("http://127.0.0.1:9"), "the credentials are kept");
    }
}
