//! The server (tsd): serves clients, keeps the files, replicates to its
//! slave, and feeds its synchronizer.
//!
//! Shape: [`Node`] is a cheap cloneable handle holding the store, the role
//! the coordinator assigned, and the write lane. The gRPC layers in
//! [`sns`] (course protocol) and [`replica`] (our internal service) are thin
//! and call into it.
//!
//! Writes: every change (client write, replicated write, remote event) goes
//! through the single write lane, so master and slave apply client writes in
//! the same order. A client write is durable on the master (journal fsync)
//! and acknowledged by the slave (which fsyncs too) before the client hears
//! SUCCESS; the two happen concurrently.

pub mod replica;
pub mod sns;

use crate::error::{Error, Result};
use crate::net;
use crate::store::state::{Change, Effect, Entry, LocalOp, RemoteEvent, State};
use crate::store::{Store, codec};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::ReplicateRequest;
use sns_proto::internal::replica_client::ReplicaClient;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::Channel;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub cluster: u32,
    pub id: u32,
    pub clusters: u32,
    pub coord_host: String,
    pub coord_port: u16,
    pub advertise_host: String,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
}

/// What the coordinator last told this server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub is_master: bool,
    pub term: u64,
    /// The slave to forward writes to: (id, host, port).
    pub slave: Option<(u32, String, String)>,
}

struct Inner {
    cfg: ServerConfig,
    port: u16,
    store: Mutex<Store>,
    /// Serializes every change, and the forwarding of client writes to the
    /// slave, so both apply them in one order.
    lane: tokio::sync::Mutex<()>,
    role: watch::Sender<Role>,
    /// Bumped after every local commit: wakes the outbox tail.
    commits: watch::Sender<u64>,
    coord: CoordServiceClient<Channel>,
    /// The replica client of the current slave, keyed by its address.
    slave: Mutex<Option<(SlaveAddr, ReplicaClient<Channel>)>>,
}

type SlaveAddr = (String, String);

#[derive(Clone)]
pub struct Node(Arc<Inner>);

impl Node {
    pub fn open(cfg: ServerConfig, port: u16) -> Result<Node> {
        let store = Store::open(&cfg.data_dir, cfg.cluster, cfg.clusters)?;
        let coord =
            CoordServiceClient::new(net::channel(&cfg.coord_host, &cfg.coord_port.to_string())?);
        Ok(Node(Arc::new(Inner {
            cfg,
            port,
            store: Mutex::new(store),
            lane: tokio::sync::Mutex::new(()),
            role: watch::channel(Role::default()).0,
            commits: watch::channel(0).0,
            coord,
            slave: Mutex::new(None),
        })))
    }

    pub fn cfg(&self) -> &ServerConfig {
        &self.0.cfg
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.0.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the state under the store lock.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(self.store().state())
    }

    pub fn role(&self) -> Role {
        self.0.role.borrow().clone()
    }

    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.0.role.subscribe()
    }

    pub fn watch_commits(&self) -> watch::Receiver<u64> {
        self.0.commits.subscribe()
    }

    /// Sends one heartbeat and adopts the role it returns.
    pub async fn heartbeat(&self) -> Result<Role> {
        let current = self.role();
        let info = ServerInfo {
            server_id: self.0.cfg.id as i32,
            hostname: self.0.cfg.advertise_host.clone(),
            port: self.0.port.to_string(),
            r#type: "server".into(),
            cluster_id: self.0.cfg.cluster as i32,
            is_master: current.is_master,
            term: current.term as i64,
            paired_server_id: 0,
        };
        let reply = self.0.coord.clone().heartbeat(info).await?.into_inner();
        let slave = (reply.is_master && !reply.slave_port.is_empty()).then_some((
            reply.slave_server_id as u32,
            reply.slave_hostname,
            reply.slave_port,
        ));
        let role = Role {
            is_master: reply.is_master,
            term: reply.term.max(0) as u64,
            slave,
        };
        self.adopt(role.clone());
        Ok(role)
    }

    /// Takes on a role, ignoring anything older than the term we know.
    fn adopt(&self, role: Role) {
        self.0.role.send_if_modified(|cur| {
            if role.term < cur.term || *cur == role {
                return false;
            }
            if role.is_master != cur.is_master || role.term != cur.term {
                tracing::info!(
                    cluster = self.0.cfg.cluster,
                    id = self.0.cfg.id,
                    master = role.is_master,
                    term = role.term,
                    "role changed"
                );
            }
            *cur = role;
            true
        });
    }

    /// A newer term was seen from a peer: stop acting as master at once.
    pub fn fence(&self, term: u64) {
        let cur = self.role();
        if term > cur.term {
            tracing::warn!(term, old_term = cur.term, "newer term seen: fenced");
            self.adopt(Role {
                is_master: false,
                term,
                slave: None,
            });
        }
    }

    /// Fails unless this server is the cluster's master. A server that
    /// believes it is a slave asks the coordinator first: it may just have
    /// been promoted and not heard yet.
    async fn ensure_master(&self) -> Result<Role, Status> {
        let role = self.role();
        if role.is_master {
            return Ok(role);
        }
        match self.heartbeat().await {
            Ok(role) if role.is_master => Ok(role),
            _ => Err(Status::unavailable(format!(
                "server {} is not the master of cluster {}",
                self.0.cfg.id, self.0.cfg.cluster
            ))),
        }
    }

    /// Commits an entry on a blocking thread (the journal fsyncs).
    async fn commit(&self, entry: Entry, durable: bool) -> Result<Vec<Effect>> {
        let node = self.clone();
        let local = matches!(entry, Entry::Local(_));
        let effects = tokio::task::spawn_blocking(move || node.store().commit(&entry, durable))
            .await
            .map_err(|e| Error::Other(format!("commit task failed: {e}")))??;
        if local {
            self.0.commits.send_modify(|n| *n += 1);
        }
        Ok(effects)
    }

    /// Runs a client write as master: `decide` looks at the state (under the
    /// write lane, so nothing changes meanwhile) and returns the change to
    /// make, or a refusal. The change is journaled here and on the slave
    /// before this returns.
    pub async fn write<T>(
        &self,
        decide: impl FnOnce(&State) -> std::result::Result<Option<Change>, T>,
    ) -> Result<std::result::Result<(), T>, Status> {
        let _lane = self.0.lane.lock().await;
        let role = self.ensure_master().await?;
        let (change, seq, published) = {
            let store = self.store();
            match decide(store.state()) {
                Err(refusal) => return Ok(Err(refusal)),
                Ok(None) => return Ok(Ok(())),
                Ok(Some(change)) => (
                    change,
                    store.state().next_seq(),
                    store.state().published_upto(),
                ),
            }
        };
        let op = LocalOp { seq, change };
        let replicate = self.replicate(&role, &op, published);
        let local = self.commit(Entry::Local(op.clone()), true);
        let (replicated, committed) = tokio::join!(replicate, local);
        committed.map_err(Status::from)?;
        if let Err(status) = replicated {
            // A slave that rejects a write because it knows a newer term
            // proves this server was replaced: stop taking writes.
            if status.code() == tonic::Code::FailedPrecondition {
                self.heartbeat().await.ok();
            }
            tracing::warn!(seq, error = %status.message(), "slave did not take the write; carrying on without it");
        }
        Ok(Ok(()))
    }

    async fn replicate(
        &self,
        role: &Role,
        op: &LocalOp,
        published_upto: u64,
    ) -> Result<(), Status> {
        let Some((slave_id, host, port)) = role.slave.clone() else {
            return Ok(());
        };
        let mut client = {
            let mut cached = self.0.slave.lock().unwrap_or_else(PoisonError::into_inner);
            match cached.as_ref() {
                Some((addr, client)) if *addr == (host.clone(), port.clone()) => client.clone(),
                _ => {
                    let client =
                        ReplicaClient::new(net::channel(&host, &port).map_err(Status::from)?);
                    *cached = Some(((host, port), client.clone()));
                    client
                }
            }
        };
        let req = ReplicateRequest {
            term: role.term,
            op: Some(codec::local_op_to_pb(op)),
            published_upto,
            cluster: self.0.cfg.cluster,
            from_server: self.0.cfg.id,
        };
        client
            .replicate(req)
            .await
            .map(|_| ())
            .map_err(|s| Status::new(s.code(), format!("slave {slave_id}: {}", s.message())))
    }

    /// Applies a client write forwarded by the master.
    pub async fn apply_replicated(
        &self,
        term: u64,
        op: LocalOp,
        published_upto: u64,
    ) -> Result<(), Status> {
        let _lane = self.0.lane.lock().await;
        let role = self.role();
        if term < role.term || (role.is_master && term <= role.term) {
            return Err(Status::failed_precondition(format!(
                "stale term {term}: this server is at term {} (master: {})",
                role.term, role.is_master
            )));
        }
        self.fence(term);
        let next = self.read(|s| s.next_seq());
        if op.seq < next {
            return Ok(()); // already have it: a retried forward
        }
        if op.seq > next {
            tracing::warn!(
                expected = next,
                got = op.seq,
                "gap in replicated writes; this replica missed some"
            );
        }
        self.commit(Entry::Local(op), true).await?;
        if published_upto > self.read(|s| s.published_upto()) {
            self.commit(Entry::PublishedUpto(published_upto), false)
                .await?;
        }
        Ok(())
    }

    /// Applies an event from another cluster; false if it changed nothing.
    pub async fn apply_remote(&self, event: RemoteEvent) -> Result<bool> {
        let _lane = self.0.lane.lock().await;
        if !self.read(|s| s.is_new_remote(&event)) {
            return Ok(false);
        }
        self.commit(Entry::Remote(event), true).await?;
        Ok(true)
    }

    /// Records that the broker confirmed the outbox up to `upto`. Not
    /// fsynced: losing it only means republishing, which receivers ignore.
    pub async fn ack_outbox(&self, upto: u64) -> Result<()> {
        if upto > self.read(|s| s.published_upto()) && upto < self.read(|s| s.next_seq()) {
            self.commit(Entry::PublishedUpto(upto), false).await?;
        }
        Ok(())
    }
}

/// While a master has no slave it asks this often, so a slave that just
/// registered starts receiving writes within a fraction of a second rather
/// than a whole heartbeat period (the course's 5 s).
const SLAVE_DISCOVERY: Duration = Duration::from_millis(200);

/// Heartbeats until shutdown; the first one registers.
async fn heartbeat_loop(node: Node, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        match node.heartbeat().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("coordinator reachable again");
            }
            Ok(_) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "heartbeat failed; keeping the current role");
            }
            Err(_) => {}
        }
        let role = node.role();
        let wait = if role.is_master && role.slave.is_none() {
            node.cfg().heartbeat.min(SLAVE_DISCOVERY)
        } else {
            node.cfg().heartbeat
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Serves a server node on `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let port = net::local_port(&listener)?;
    let node = Node::open(cfg, port)?;
    tracing::info!(cluster = node.cfg().cluster, id = node.cfg().id, port, dir = %node.cfg().data_dir.display(), "server listening");
    let beats = tokio::spawn(heartbeat_loop(node.clone(), shutdown.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<sns_proto::csce438::sns_service_server::SnsServiceServer<sns::Sns>>()
        .await;
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sns::service(node.clone(), shutdown.clone()))
        .add_service(replica::service(node.clone(), shutdown.clone()))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    beats.abort();
    Ok(result?)
}
