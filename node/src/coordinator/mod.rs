//! The coordinator: the routing table behind the course's `CoordService`,
//! plus our `CoordAdmin` view of the whole table.

pub mod gateway;
pub mod table;

use crate::error::Result;
use crate::net;
use sns_proto::csce438::coord_service_server::{CoordService, CoordServiceServer};
use sns_proto::csce438::{Confirmation, Id, ServerInfo, ServerList};
use sns_proto::internal::coord_admin_server::{CoordAdmin, CoordAdminServer};
use sns_proto::internal::{LeaseRequest, Node, RoleUpdate, RoutingTable, TableRequest};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use table::{Beat, Kind, NodeView, Promotion, Table};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub clusters: u32,
    /// Also serve `SNSService`, forwarding to each caller's master.
    pub gateway: bool,
    pub heartbeat: Duration,
    pub missed: u32,
}

/// Cheap cloneable handle on the routing table.
#[derive(Clone)]
pub struct Coordinator {
    table: Arc<Mutex<Table>>,
    /// This coordinator's start time (ms since the Unix epoch): a restarted
    /// coordinator's answers order after the previous one's.
    epoch: u64,
    /// Bumped on every change of role or membership: wakes lease streams.
    changes: watch::Sender<u64>,
    shutdown: CancellationToken,
}

/// How long the coordinator waits for a server whose lease dropped to
/// answer a health check. A live process on the same network answers in
/// milliseconds; a killed one refuses the connection at once.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

impl Coordinator {
    pub fn new(cfg: &CoordinatorConfig, shutdown: CancellationToken) -> Coordinator {
        let timeout = cfg.heartbeat * cfg.missed.max(1);
        Coordinator {
            table: Arc::new(Mutex::new(Table::new(cfg.clusters, timeout))),
            epoch: net::now_ms().max(0) as u64,
            changes: watch::channel(0).0,
            shutdown,
        }
    }

    /// Logs promotions and wakes the lease streams if anything changed.
    fn changed(&self, promotions: &[Promotion], registered: bool) {
        log_promotions(promotions);
        if registered || !promotions.is_empty() {
            self.changes.send_modify(|v| *v += 1);
        }
    }

    fn refresh(&self) {
        let promotions = self.with(|t| t.refresh(Instant::now()));
        self.changed(&promotions, false);
    }

    /// A server's lease stream ended: if the server does not answer a health
    /// check either, it is dead now, not after the heartbeat timeout.
    async fn lease_lost(&self, cluster: u32, id: u32) {
        let Some((host, port)) = self.with(|t| t.address(Kind::Server, cluster, id)) else { return };
        let alive = async {
            let channel = net::channel(&host, &port).ok()?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            tokio::time::timeout(PROBE_TIMEOUT, health.check(req)).await.ok()?.ok()
        };
        if alive.await.is_some() {
            tracing::info!(cluster, id, "lease dropped but the server answers: keeping it");
            return;
        }
        tracing::warn!(cluster, id, "lease dropped and the server does not answer: declared dead");
        let promotions = self.with(|t| t.mark_dead(Instant::now(), Kind::Server, cluster, id));
        self.changed(&promotions, true);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        f(&mut self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn cluster_of_user(&self, user: i32) -> Option<u32> {
        let clusters = self.with(|t| t.clusters());
        (user > 0).then(|| crate::ids::cluster_of(user as u32, clusters))
    }
}

fn log_promotions(promotions: &[Promotion]) {
    for p in promotions {
        match p.new {
            Some(new) => {
                tracing::info!(cluster = p.cluster, old = ?p.old, new, term = p.term, "master assigned")
            }
            None => tracing::warn!(cluster = p.cluster, old = ?p.old, "cluster has no live server"),
        }
    }
}

fn info(v: &NodeView) -> ServerInfo {
    ServerInfo {
        server_id: v.id as i32,
        hostname: v.host.clone(),
        port: v.port.clone(),
        r#type: v.kind.as_str().to_string(),
        cluster_id: v.cluster as i32,
        is_master: v.is_master,
        term: v.term as i64,
        paired_server_id: v.paired_server as i32,
    }
}

fn none() -> ServerInfo {
    ServerInfo { server_id: -1, ..Default::default() }
}

#[tonic::async_trait]
impl CoordService for Coordinator {
    async fn heartbeat(&self, req: Request<ServerInfo>) -> Result<Response<Confirmation>, Status> {
        let s = req.into_inner();
        let kind = Kind::parse(&s.r#type)
            .ok_or_else(|| Status::invalid_argument(format!("unknown node type {:?}", s.r#type)))?;
        let clusters = self.with(|t| t.clusters());
        if s.cluster_id < 1 || s.cluster_id as u32 > clusters || s.server_id < 1 {
            return Err(Status::invalid_argument(format!(
                "cluster {} / id {} out of range (clusters 1..={clusters}, ids >= 1)",
                s.cluster_id, s.server_id
            )));
        }
        let paired = match (kind, s.paired_server_id) {
            (Kind::Synchronizer, p) if p > 0 => p as u32,
            (Kind::Synchronizer, _) => crate::ids::sync_pairing(s.server_id as u32, clusters).1,
            (Kind::Server, _) => 0,
        };
        let beat = Beat {
            kind,
            cluster: s.cluster_id as u32,
            id: s.server_id as u32,
            host: s.hostname,
            port: s.port,
            paired_server: paired,
            claims_master: s.is_master,
            term: s.term.max(0) as u64,
        };
        let (a, promotions, registered) = self.with(|t| t.heartbeat(Instant::now(), &beat));
        self.changed(&promotions, registered);
        let (slave_id, slave_host, slave_port) = a.slave.unwrap_or((0, String::new(), String::new()));
        Ok(Response::new(Confirmation {
            status: true,
            is_master: a.is_master,
            term: a.term as i64,
            slave_hostname: slave_host,
            slave_port,
            slave_server_id: slave_id as i32,
            coordinator_epoch: self.epoch as i64,
            role_version: a.version as i64,
        }))
    }

    async fn get_server(&self, req: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        // An unknown user or a cluster with no master gets an empty
        // ServerInfo: the course client then prints "connection failed: -1".
        let reply = self
            .cluster_of_user(req.into_inner().id)
            .and_then(|c| self.with(|t| t.master(Instant::now(), c)))
            .map(|v| info(&v))
            .unwrap_or_default();
        Ok(Response::new(reply))
    }

    async fn get_slave(&self, req: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        let c = req.into_inner().id;
        let reply = (c > 0).then(|| self.with(|t| t.slave(Instant::now(), c as u32))).flatten();
        Ok(Response::new(reply.map(|v| info(&v)).unwrap_or_else(none)))
    }

    async fn get_follower_server(&self, req: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        let reply = self
            .cluster_of_user(req.into_inner().id)
            .and_then(|c| self.with(|t| t.master_synchronizer(Instant::now(), c)));
        Ok(Response::new(reply.map(|v| info(&v)).unwrap_or_else(none)))
    }

    async fn get_all_follower_servers(&self, _req: Request<Id>) -> Result<Response<ServerList>, Status> {
        let mut list = ServerList::default();
        for v in self.with(|t| t.all(Instant::now())) {
            if v.kind == Kind::Synchronizer && v.alive {
                list.server_id.push(v.id as i32);
                list.hostname.push(v.host);
                list.port.push(v.port);
                list.r#type.push(v.kind.as_str().to_string());
            }
        }
        Ok(Response::new(list))
    }
}

#[tonic::async_trait]
impl CoordAdmin for Coordinator {
    async fn table(&self, _req: Request<TableRequest>) -> Result<Response<RoutingTable>, Status> {
        self.refresh();
        let (clusters, views) = self.with(|t| (t.clusters(), t.all(Instant::now())));
        let nodes = views
            .into_iter()
            .map(|v| Node {
                cluster: v.cluster,
                id: v.id,
                host: v.host,
                port: v.port,
                kind: v.kind.as_str().to_string(),
                alive: v.alive,
                is_master: v.is_master,
                term: v.term,
                paired_server: v.paired_server,
                last_seen_ms: v.last_seen.as_millis() as u64,
            })
            .collect();
        Ok(Response::new(RoutingTable { nodes, clusters }))
    }

    type LeaseStream = Pin<Box<dyn Stream<Item = Result<RoleUpdate, Status>> + Send>>;

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<Self::LeaseStream>, Status> {
        let LeaseRequest { cluster, id } = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let coord = self.clone();
        tokio::spawn(async move {
            let mut changes = coord.changes.subscribe();
            let mut last = None;
            loop {
                changes.borrow_and_update();
                let now = Instant::now();
                if let Some(a) = coord.with(|t| t.assignment_of(now, Kind::Server, cluster, id))
                    && last.as_ref() != Some(&a)
                {
                    let update = RoleUpdate {
                        is_master: a.is_master,
                        term: a.term,
                        slave_id: a.slave.as_ref().map_or(0, |s| s.0),
                        slave_host: a.slave.as_ref().map(|s| s.1.clone()).unwrap_or_default(),
                        slave_port: a.slave.as_ref().map(|s| s.2.clone()).unwrap_or_default(),
                        epoch: coord.epoch,
                        version: a.version,
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                    last = Some(a);
                }
                tokio::select! {
                    _ = coord.shutdown.cancelled() => return,
                    _ = tx.closed() => break,
                    _ = changes.changed() => {}
                }
            }
            coord.lease_lost(cluster, id).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the coordinator on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: CoordinatorConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let coord = Coordinator::new(&cfg, shutdown.clone());
    tracing::info!(addr = %listener.local_addr().map_err(|e| crate::error::Error::Other(e.to_string()))?, clusters = cfg.clusters, "coordinator listening");
    // Elections happen on every query too; this sweep only makes a master's
    // death show in the log when nobody is asking.
    let sweeper = {
        let coord = coord.clone();
        let token = shutdown.clone();
        let period = cfg.heartbeat / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period.max(Duration::from_millis(50)));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => coord.refresh(),
                }
            }
        })
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordServiceServer<Coordinator>>().await;
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(CoordServiceServer::new(coord.clone()))
        .add_service(CoordAdminServer::new(coord.clone()))
        .add_optional_service(cfg.gateway.then(|| gateway::service(coord)))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    sweeper.abort();
    Ok(result?)
}
