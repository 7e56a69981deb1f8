//! The coordinator: the routing table behind the course's `CoordService`,
//! our `CoordAdmin` (the whole table, lease streams, the in-sync set, the
//! operator's override), and the one task that changes its durable records.
//!
//! Shape: [`Coordinator`] is a cheap handle around the [`Table`] (liveness
//! and records, in memory) and a channel to the *elector*, the only task
//! that changes records: it asks the table what the rules call for, writes
//! the new records to the state file (fsync), and only then installs them
//! and wakes the lease streams. So no server ever hears of a promotion, or
//! of a slave dropped from the in-sync set, that a coordinator restart
//! could forget. Heartbeats and queries never wait for the disk.

pub mod gateway;
pub mod ha;
pub mod records;
pub mod state;
pub mod table;

use crate::error::Result;
use crate::net;
use records::{Records, Store};
use sns_proto::csce438::coord_service_server::{CoordService, CoordServiceServer};
use sns_proto::csce438::{Confirmation, Id, ServerInfo, ServerList};
use sns_proto::internal::coord_admin_server::{CoordAdmin, CoordAdminServer};
use sns_proto::internal::{
    InSyncReply, InSyncRequest, LeaseRequest, Node, PromoteReply, PromoteRequest, RoleUpdate, RoutingTable,
    StepDownRequest, SwitchoverReply, SwitchoverRequest, TableRequest,
};
use state::StateFile;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use table::{Beat, Change, Kind, NodeView, Refusal, SwitchoverOutcome, Table, Why};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot, watch};
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
    /// How long a master may serve after its last renewal (at most half
    /// the heartbeat timeout).
    pub lease: Duration,
    /// Where the records live; None keeps them in memory only (tests).
    pub data_dir: Option<PathBuf>,
    /// The deployment's secret: heartbeats and `CoordAdmin` calls must
    /// carry its token (None: open, the course's hand-run style).
    pub secret: Option<crate::auth::Secret>,
}

impl CoordinatorConfig {
    /// The lease actually granted: never more than half the time the
    /// coordinator waits before it declares a silent node dead, so a
    /// partitioned master stops serving well before anyone replaces it.
    pub fn lease(&self) -> Duration {
        self.lease.min(self.heartbeat * self.missed.max(1) / 2).max(Duration::from_millis(50))
    }
}

/// A request only the elector may carry out (it changes records).
enum Job {
    SetInSync(InSyncRequest, oneshot::Sender<Result<Vec<u32>, Status>>),
    Promote(PromoteRequest, oneshot::Sender<Result<PromoteReply, Status>>),
}

/// Cheap cloneable handle on the routing table.
#[derive(Clone)]
pub struct Coordinator {
    /// The table also holds this run's epoch: its start time (ms since the
    /// Unix epoch), or just above the previous run's when the clock is
    /// behind it ([`next_epoch`]), or above any a node reports having
    /// adopted: a restarted coordinator's answers order after the
    /// previous one's.
    table: Arc<Mutex<Table>>,
    /// Bumped on every change of role or membership: wakes lease streams.
    changes: watch::Sender<u64>,
    /// Wakes the elector: something may call for a decision.
    kick: Arc<Notify>,
    jobs: mpsc::Sender<Job>,
    shutdown: CancellationToken,
    /// Checks the deployment's token on heartbeats (and, as the
    /// interceptor of `CoordAdmin`, on every admin call).
    check: crate::auth::Check,
    /// Adds it to this coordinator's own calls to servers.
    attach: crate::auth::Attach,
}

/// How long a client waits for a switchover's answer: the coordinator
/// answers within two leases and ten seconds.
pub const SWITCHOVER_PATIENCE: Duration = Duration::from_secs(60);
/// How long a write of the records may take before the coordinator says
/// it is waiting on its disk.
const SAVE_STALL_WARNING: Duration = Duration::from_secs(1);

/// How long the coordinator waits for a server whose lease dropped to
/// answer a health check. A live process on the same network answers in
/// milliseconds; a killed one refuses the connection at once.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

impl Coordinator {
    /// A coordinator with its records loaded from its state file (if it
    /// has a data directory), and the elector to run.
    pub fn new(cfg: &CoordinatorConfig, shutdown: CancellationToken) -> Result<(Coordinator, Elector)> {
        let file = cfg.data_dir.as_deref().map(StateFile::in_dir).transpose()?;
        let records = match &file {
            Some(file) => {
                let records = file.load()?;
                match &records {
                    Some(r) => {
                        tracing::info!(path = %file.path().display(), clusters = r.records.len(), epoch = r.epoch, "coordinator records loaded")
                    }
                    None => {
                        tracing::info!(path = %file.path().display(), "no coordinator records yet: a new deployment")
                    }
                }
                records
            }
            None => None,
        };
        let last_epoch = records.as_ref().map_or(0, |r| r.epoch);
        let epoch = next_epoch(last_epoch);
        let store = file.map_or(Store::Memory, Store::File);
        let records = records.map(|r| r.records).unwrap_or_default();
        Ok(Coordinator::with_records(cfg, records, store, epoch, shutdown))
    }

    /// A coordinator starting from `records`, writing its changes to
    /// `store`, its answers ordered by `epoch` (after every earlier
    /// coordinator's); it stops at `shutdown`, or when a write to `store`
    /// finds another coordinator wrote first.
    pub fn with_records(
        cfg: &CoordinatorConfig,
        records: Records,
        store: Store,
        epoch: u64,
        shutdown: CancellationToken,
    ) -> (Coordinator, Elector) {
        let timeout = cfg.heartbeat * cfg.missed.max(1);
        let mut table = Table::new(cfg.clusters, timeout, cfg.lease());
        for (cluster, r) in &records {
            crate::metrics::get()
                .cluster_term
                .get_or_create(&crate::metrics::ClusterLabels { cluster: *cluster })
                .set(i64::try_from(r.term).unwrap_or(i64::MAX));
        }
        table.load(records);
        table.set_epoch(epoch, !matches!(store, Store::Kube(_)));
        let (jobs, rx) = mpsc::channel(64);
        let coord = Coordinator {
            table: Arc::new(Mutex::new(table)),
            changes: watch::channel(0).0,
            kick: Arc::new(Notify::new()),
            jobs,
            shutdown,
            check: crate::auth::Check::new(cfg.secret.clone()),
            attach: crate::auth::Attach::new(cfg.secret.clone()),
        };
        (coord.clone(), Elector { coord, store, jobs: rx, sweep: cfg.heartbeat / 2, unavailable: BTreeMap::new() })
    }

    /// Wakes the lease streams.
    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
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
        self.with(|t| t.mark_dead(Instant::now(), Kind::Server, cluster, id));
        self.changed();
        self.kick.notify_one();
    }

    /// Asks the master handing over to stop acting as master; true once it
    /// answered that it did (its writes under way finished).
    async fn ask_step_down(&self, cluster: u32, begun: &table::Begun) -> bool {
        use sns_proto::internal::replica_client::ReplicaClient;
        let Some((host, port)) = self.with(|t| t.address(Kind::Server, cluster, begun.from)) else { return false };
        let req = StepDownRequest { cluster, term: begun.term, epoch: begun.epoch, version: begun.version };
        let call = async {
            let channel = net::node_channel(&host, &port, &self.attach).ok()?;
            ReplicaClient::new(channel).step_down(req).await.ok()
        };
        // A master that does not answer within a lease is waited out.
        let patience = self.with(|t| t.lease()).max(PROBE_TIMEOUT);
        tokio::time::timeout(patience, call).await.ok().flatten().is_some()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        f(&mut self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// This run's epoch, as it stands.
    pub fn epoch(&self) -> u64 {
        self.with(|t| t.epoch())
    }

    fn cluster_of_user(&self, user: i32) -> Option<u32> {
        let clusters = self.with(|t| t.clusters());
        (user > 0).then(|| crate::ids::cluster_of(user as u32, clusters))
    }

    /// Hands a job to the elector and waits for its answer.
    async fn job<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Job) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(make(tx)).await.map_err(|_| Status::unavailable("coordinator stopping"))?;
        rx.await.map_err(|_| Status::unavailable("coordinator stopping"))?
    }
}

/// The task that changes records: decisions of the rules, the masters'
/// in-sync changes and the operator's overrides, one at a time, each on
/// disk before it is installed.
pub struct Elector {
    coord: Coordinator,
    store: Store,
    jobs: mpsc::Receiver<Job>,
    /// The longest it sleeps without a reason (liveness changes by itself).
    sweep: Duration,
    /// Why each cluster without a master has none, as last logged.
    unavailable: BTreeMap<u32, String>,
}

/// The epoch of a coordinator run that follows one of epoch `last`: the
/// clock in ms, or just above `last` when the clock is not past it (a
/// clock stepped back, or another machine's clock behind). Nodes ignore an
/// answer ordered before the last they adopted, so a run whose epoch fell
/// below its predecessor's would be ignored by every node: no lease
/// renewed, no role taken, until the clock caught up.
pub(crate) fn next_epoch(last: u64) -> u64 {
    let now = net::now_ms().max(0) as u64;
    if now <= last && last > 0 {
        tracing::warn!(
            clock_ms = now,
            previous_epoch = last,
            "this machine's clock is behind the previous coordinator run's start; answers are ordered after that run's all the same"
        );
    }
    now.max(last.saturating_add(1))
}

impl Elector {
    pub async fn run(mut self) {
        self.record_epoch().await;
        loop {
            let wake_at = self.decide().await;
            let sweep = Instant::now() + self.sweep.max(Duration::from_millis(50));
            let until = wake_at.map_or(sweep, |w| w.min(sweep));
            tokio::select! {
                _ = self.coord.shutdown.cancelled() => return,
                _ = self.coord.kick.notified() => {}
                _ = tokio::time::sleep_until(until.into()) => {}
                job = self.jobs.recv() => match job {
                    Some(job) => self.handle(job).await,
                    None => return,
                },
            }
        }
    }

    /// Writes this run's epoch into the state file before the first change,
    /// so that a run that changes nothing still leaves it for the next run
    /// (whose answers must order after this one's). A failure (a full
    /// disk) is logged: the epoch goes with the first change written. A
    /// ConfigMap's leader wrote its epoch when it claimed the records.
    async fn record_epoch(&self) {
        if !matches!(self.store, Store::File(_)) {
            return;
        }
        let records: Records = self.coord.with(|t| t.records().clone());
        let epoch = self.coord.epoch();
        match self.store.save(&records, epoch).await {
            Ok(()) => tracing::debug!(epoch, "epoch recorded"),
            Err(e) => tracing::warn!(
                epoch,
                error = %e,
                "cannot write this run's epoch into the coordinator's records; it goes with the first change written"
            ),
        }
    }

    /// Carries out what the rules call for now; returns when to look again.
    async fn decide(&mut self) -> Option<Instant> {
        let decisions = self.coord.with(|t| t.decide(Instant::now()));
        self.count_live();
        for change in &decisions.changes {
            match self.commit(change).await {
                Ok(()) => log_change(change),
                Err(e) => {
                    tracing::error!(cluster = change.cluster, error = %e, "cannot write the coordinator's records; not acting on the change");
                    self.coord.with(|t| t.abandon(change, &e.to_string()));
                    // A switchover ended by it: its caller hears why, and
                    // the master that stepped down gets its role back.
                    self.coord.changed();
                }
            }
        }
        for cluster in 1..=self.coord.with(|t| t.clusters()) {
            let why = self.coord.with(|t| t.unavailable(cluster).map(str::to_string));
            if why != self.unavailable.get(&cluster).cloned() {
                match &why {
                    Some(why) => tracing::warn!(cluster, reason = %why, "cluster has no master"),
                    None if self.unavailable.contains_key(&cluster) => {
                        tracing::info!(cluster, "cluster has a master again")
                    }
                    None => {}
                }
                match why {
                    Some(why) => self.unavailable.insert(cluster, why),
                    None => self.unavailable.remove(&cluster),
                };
            }
        }
        decisions.wake_at
    }

    /// Writes the records with `change` applied, then installs it.
    async fn commit(&self, change: &Change) -> Result<()> {
        let renewed = match change.why {
            Why::Promotion { old: Some(old), .. } => self.coord.with(|t| t.last_renewal(change.cluster, old)),
            _ => None,
        };
        let (mut records, epoch): (Records, u64) = self.coord.with(|t| (t.records().clone(), t.epoch()));
        records.insert(change.cluster, change.record.clone());
        let save = self.store.save(&records, epoch);
        tokio::pin!(save);
        let saved = tokio::select! {
            saved = &mut save => saved,
            () = tokio::time::sleep(SAVE_STALL_WARNING) => {
                // A hung disk: nothing changes until the write ends (a
                // change acted on before it is durable could be forgotten
                // by a restart), but people and clients hear why.
                let why = format!(
                    "cluster {}: the coordinator's records write has not finished after {SAVE_STALL_WARNING:?} (a hung disk?); it changes no role until it does",
                    change.cluster
                );
                tracing::warn!(cluster = change.cluster, "{why}");
                self.coord.with(|t| {
                    t.set_unavailable(change.cluster, why.clone());
                    t.set_stalled(Some(why));
                });
                let saved = save.await;
                self.coord.with(|t| t.set_stalled(None));
                saved
            }
        };
        if let Err(e) = saved {
            if matches!(e, crate::error::Error::StaleRecords(_)) {
                // Another coordinator leads: nothing this one holds may be
                // acted on any more. Stop serving at once.
                tracing::error!(error = %e, "the records changed under this coordinator; stepping down");
                self.coord.shutdown.cancel();
            }
            return Err(e);
        }
        self.coord.with(|t| t.install(change));
        self.coord.changed();
        note_change(change, renewed);
        Ok(())
    }

    async fn handle(&mut self, job: Job) {
        match job {
            Job::SetInSync(req, reply) => {
                let members: Vec<(u32, u64)> = req.members.iter().map(|m| (m.id, m.incarnation)).collect();
                let proposed =
                    self.coord.with(|t| t.set_in_sync(Instant::now(), req.cluster, req.term, req.master, &members));
                let result = match proposed {
                    Err(refusal) => Err(refusal_status(refusal)),
                    Ok(change) => match self.commit(&change).await {
                        Ok(()) => {
                            tracing::info!(cluster = req.cluster, term = req.term, master = req.master, in_sync = ?change.record.in_sync.keys().collect::<Vec<_>>(), "in-sync servers recorded");
                            Ok(change.record.in_sync.keys().copied().collect())
                        }
                        Err(e) => Err(Status::unavailable(format!("cannot record the in-sync servers: {e}"))),
                    },
                };
                let _ = reply.send(result);
            }
            Job::Promote(req, reply) => {
                let proposed =
                    self.coord.with(|t| t.promote(Instant::now(), req.cluster, req.server, req.accept_data_loss));
                let result = match proposed {
                    Err(refusal) => Err(refusal_status(refusal)),
                    Ok(change) => match self.commit(&change).await {
                        Ok(()) => {
                            let warning = match change.record.override_server {
                                Some(s) => format!(
                                    "server {s} was not known to hold every acknowledged write of cluster {}: writes it lacks are lost; its events are numbered from {} on",
                                    req.cluster, change.record.seq_floor
                                ),
                                None => String::new(),
                            };
                            tracing::warn!(cluster = req.cluster, server = req.server, term = change.record.term, accept_data_loss = req.accept_data_loss, warning = %warning, "operator override: master promoted");
                            Ok(PromoteReply { term: change.record.term, warning })
                        }
                        Err(e) => {
                            self.coord.with(|t| t.abandon(&change, &e.to_string()));
                            Err(Status::unavailable(format!("cannot record the promotion: {e}")))
                        }
                    },
                };
                let _ = reply.send(result);
            }
        }
    }
}

impl Elector {
    /// Sets `sns_coordinator_live_nodes` (every cluster and kind, zeros
    /// included, so a cluster whose nodes all died shows 0, not nothing).
    fn count_live(&self) {
        let (clusters, nodes) = self.coord.with(|t| (t.clusters(), t.all(Instant::now())));
        let live = &crate::metrics::get().live_nodes;
        for cluster in 1..=clusters {
            for kind in [Kind::Server, Kind::Synchronizer] {
                let n = nodes.iter().filter(|v| v.alive && v.cluster == cluster && v.kind == kind).count();
                live.get_or_create(&crate::metrics::LiveLabels { cluster, kind: kind.as_str() }).set(n as i64);
            }
        }
    }
}

/// The coordinator's metrics of a recorded change: the cluster's term and,
/// when a master was replaced, the failover and how long it took since
/// the old master last renewed its lease (`renewed`).
fn note_change(change: &Change, renewed: Option<Instant>) {
    let m = crate::metrics::get();
    let cluster = crate::metrics::ClusterLabels { cluster: change.cluster };
    m.cluster_term.get_or_create(&cluster).set(i64::try_from(change.record.term).unwrap_or(i64::MAX));
    if let Why::Promotion { old: Some(old), new } = change.why
        && old != new
    {
        m.failovers.get_or_create(&cluster).inc();
        if let Some(renewed) = renewed {
            m.failover_seconds.observe(renewed.elapsed().as_secs_f64());
        }
    }
}

fn refusal_status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::NotMaster(m) => Status::failed_precondition(m),
        Refusal::NotNow(m) => Status::unavailable(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::Unsafe(m) => Status::failed_precondition(m),
    }
}

fn log_change(change: &Change) {
    match &change.why {
        Why::Promotion { old, new } => {
            tracing::info!(cluster = change.cluster, old = ?old, new, term = change.record.term, "master assigned")
        }
        Why::Dropped(ids) => {
            tracing::warn!(cluster = change.cluster, servers = ?ids, "servers dropped from the in-sync set (damaged journal or replaced disk)")
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
        incarnation: v.incarnation,
        damaged: v.damaged,
        unwritable: v.unwritable,
        ..ServerInfo::default()
    }
}

fn none() -> ServerInfo {
    ServerInfo { server_id: -1, ..Default::default() }
}

#[tonic::async_trait]
impl CoordService for Coordinator {
    async fn heartbeat(&self, req: Request<ServerInfo>) -> Result<Response<Confirmation>, Status> {
        // Registration steers the deployment: nodes only. The rest of
        // CoordService is the clients' and stays open.
        self.check.verify(req.metadata())?;
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
            kind: Some(kind),
            cluster: s.cluster_id as u32,
            id: s.server_id as u32,
            host: s.hostname,
            port: s.port,
            paired_server: paired,
            claims_master: s.is_master,
            term: s.term.max(0) as u64,
            incarnation: s.incarnation,
            damaged: s.damaged,
            unwritable: s.unwritable,
            tail_cut: s.tail_cut,
            unconfirmed: s.unconfirmed,
            next_seq: s.next_seq,
            remote_events: s.remote_events,
            link_down: s.link_down,
            waits: if kind == Kind::Server { s.unavailable_reason } else { String::new() },
            adopted_epoch: s.coordinator_epoch.max(0) as u64,
        };
        let (a, lease, registered, before) = self.with(|t| {
            let before = t.epoch();
            let (a, registered) = t.heartbeat(Instant::now(), &beat);
            (a, t.lease(), registered, before)
        });
        if a.epoch != before {
            tracing::warn!(
                cluster = beat.cluster,
                id = beat.id,
                adopted_epoch = beat.adopted_epoch,
                epoch = a.epoch,
                previous_epoch = before,
                "a node adopted the answers of a newer coordinator run than this one (one that could not write its epoch down); this run orders its answers after it"
            );
        }
        if registered {
            self.changed();
            self.kick.notify_one();
        }
        let (slave_id, slave_host, slave_port) = a.slave.unwrap_or((0, String::new(), String::new()));
        Ok(Response::new(Confirmation {
            status: true,
            is_master: a.is_master,
            term: a.term as i64,
            slave_hostname: slave_host,
            slave_port,
            slave_server_id: slave_id as i32,
            coordinator_epoch: a.epoch as i64,
            role_version: a.version as i64,
            lease_millis: if a.is_master && kind == Kind::Server { lease.as_millis() as i64 } else { 0 },
            in_sync_i_ds: a.in_sync.iter().map(|id| *id as i32).collect(),
            seq_floor: a.seq_floor,
            accept_data_loss: a.accept_data_loss,
        }))
    }

    async fn get_server(&self, req: Request<Id>) -> Result<Response<ServerInfo>, Status> {
        // An unknown user or a cluster with no master gets an empty
        // ServerInfo: the course client then prints "connection failed: -1".
        let Some(cluster) = self.cluster_of_user(req.into_inner().id) else {
            return Ok(Response::new(ServerInfo::default()));
        };
        let (master, why) =
            self.with(|t| (t.master(Instant::now(), cluster), t.unavailable(cluster).map(str::to_string)));
        let reply = match master {
            // A master that serves nothing yet says why; clients reach it
            // all the same and hear the same from it.
            Some(v) => ServerInfo { unavailable_reason: v.waits.clone(), ..info(&v) },
            None => ServerInfo { unavailable_reason: why.unwrap_or_default(), ..ServerInfo::default() },
        };
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
                in_sync: v.in_sync,
                incarnation: v.incarnation,
                damaged: v.damaged,
                unwritable: v.unwritable,
                link_down: v.link_down,
                waits: v.waits,
            })
            .collect();
        Ok(Response::new(RoutingTable { nodes, clusters }))
    }

    async fn set_in_sync(&self, req: Request<InSyncRequest>) -> Result<Response<InSyncReply>, Status> {
        let req = req.into_inner();
        let in_sync = self.job(|tx| Job::SetInSync(req, tx)).await?;
        Ok(Response::new(InSyncReply { in_sync }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        let req = req.into_inner();
        tracing::warn!(
            cluster = req.cluster,
            server = req.server,
            accept_data_loss = req.accept_data_loss,
            "operator asks to promote a server"
        );
        Ok(Response::new(self.job(|tx| Job::Promote(req, tx)).await?))
    }

    async fn switchover(&self, req: Request<SwitchoverRequest>) -> Result<Response<SwitchoverReply>, Status> {
        let SwitchoverRequest { cluster, to } = req.into_inner();
        let started = Instant::now();
        let begun =
            self.with(|t| t.begin_switchover(started, cluster, (to > 0).then_some(to))).map_err(refusal_status)?;
        // Tells the master (lease stream) it is not master any more.
        self.changed();
        tracing::info!(
            cluster,
            from = begun.from,
            to = begun.to,
            term = begun.term,
            "switchover: asking the master to step down"
        );
        let stepped_down = self.ask_step_down(cluster, &begun).await;
        if stepped_down {
            self.with(|t| t.stepped_down(cluster, begun.from, begun.term));
        } else {
            tracing::warn!(
                cluster,
                from = begun.from,
                "switchover: the master did not answer; waiting for its lease to run out"
            );
        }
        self.kick.notify_one();
        let mut changes = self.changes.subscribe();
        // Bounded: the lease runs out by itself, and the elector looks
        // again at least every sweep.
        let deadline = tokio::time::Instant::now() + self.with(|t| t.lease()) * 2 + Duration::from_secs(10);
        loop {
            changes.borrow_and_update();
            match self.with(|t| t.switchover_outcome(cluster, begun.from, begun.to, begun.term)) {
                SwitchoverOutcome::Done(term) => {
                    let millis = started.elapsed().as_millis() as u64;
                    tracing::info!(
                        cluster,
                        from = begun.from,
                        to = begun.to,
                        term,
                        millis,
                        stepped_down,
                        "switchover done"
                    );
                    return Ok(Response::new(SwitchoverReply {
                        from: begun.from,
                        to: begun.to,
                        term,
                        stepped_down,
                        millis,
                    }));
                }
                SwitchoverOutcome::Abandoned(why) => {
                    tracing::warn!(cluster, reason = %why, "switchover abandoned");
                    return Err(Status::aborted(why));
                }
                SwitchoverOutcome::Pending => {}
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the switchover of cluster {cluster} to server {} is still under way; see the routing table",
                        begun.to
                    )));
                }
            }
        }
    }

    type LeaseStream = Pin<Box<dyn Stream<Item = Result<RoleUpdate, Status>> + Send>>;

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<Self::LeaseStream>, Status> {
        let LeaseRequest { cluster, id } = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let coord = self.clone();
        let span = tracing::info_span!("lease_stream", cluster, server = id);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
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
                            epoch: a.epoch,
                            version: a.version,
                            in_sync: a.in_sync.clone(),
                            seq_floor: a.seq_floor,
                            accept_data_loss: a.accept_data_loss,
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
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// `sns-node promote`: asks the coordinator to promote a server, and says
/// what it answered.
#[allow(clippy::print_stdout, reason = "a command-line tool's answer goes to stdout")]
pub async fn promote(args: &crate::cli::PromoteArgs) -> Result<()> {
    use sns_proto::internal::coord_admin_client::CoordAdminClient;
    let attach = crate::auth::Attach::new(args.secret.load()?);
    let channel = net::node_channel(&args.coord.coord_host, &args.coord.coord_port.to_string(), &attach)?;
    let req = PromoteRequest { cluster: args.cluster, server: args.server, accept_data_loss: args.accept_data_loss };
    let reply = CoordAdminClient::new(channel)
        .promote(req)
        .await
        .map_err(|s| crate::error::Error::Other(format!("the coordinator refused: {}", s.message())))?;
    let reply = reply.into_inner();
    println!("server {} is the master of cluster {} under term {}", args.server, args.cluster, reply.term);
    if !reply.warning.is_empty() {
        println!("warning: {}", reply.warning);
    }
    Ok(())
}

/// `sns-node switchover`: asks the coordinator for a planned switchover,
/// and says how it went.
#[allow(clippy::print_stdout, reason = "a command-line tool's answer goes to stdout")]
pub async fn switchover(args: &crate::cli::SwitchoverArgs) -> Result<()> {
    use sns_proto::internal::coord_admin_client::CoordAdminClient;
    let attach = crate::auth::Attach::new(args.secret.load()?);
    let channel = net::node_channel_with_timeout(
        &args.coord.coord_host,
        &args.coord.coord_port.to_string(),
        SWITCHOVER_PATIENCE,
        &attach,
    )?;
    let req = SwitchoverRequest { cluster: args.cluster, to: args.to.unwrap_or(0) };
    let reply = CoordAdminClient::new(channel)
        .switchover(req)
        .await
        .map_err(|s| crate::error::Error::Other(format!("the coordinator refused: {}", s.message())))?
        .into_inner();
    println!("{}", describe_switchover(args.cluster, &reply));
    Ok(())
}

/// One line on a finished switchover (the CLI's and the launcher's answer).
pub fn describe_switchover(cluster: u32, r: &SwitchoverReply) -> String {
    format!(
        "cluster {cluster}: server {} is master under term {} (was server {}; {} in {} ms)",
        r.to,
        r.term,
        r.from,
        if r.stepped_down { "stepped down" } else { "its lease ran out" },
        r.millis
    )
}

/// Serves the coordinator on `listener` until `shutdown` is cancelled.
/// The caller holds the lock of `cfg.data_dir` (see `crate::store::lock`).
pub async fn run(cfg: CoordinatorConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let (coord, elector) = Coordinator::new(&cfg, shutdown.clone())?;
    tracing::info!(addr = %listener.local_addr().map_err(|e| crate::error::Error::Other(e.to_string()))?, clusters = cfg.clusters, lease_ms = cfg.lease().as_millis() as u64, "coordinator listening");
    let elector = tokio::spawn(tracing::Instrument::instrument(elector.run(), tracing::info_span!("elector")));
    let (health, health_service) = tonic_health::server::health_reporter();
    net::serve_health(health_service.clone(), shutdown.clone());
    health.set_serving::<CoordServiceServer<Coordinator>>().await;
    // The only coordinator is always the one to route to.
    health.set_service_status(ha::READINESS, tonic_health::ServingStatus::Serving).await;
    let result = crate::tls::server_builder()?
        .trace_fn(crate::telemetry::rpc_span(None))
        .layer(crate::metrics::grpc::CountLayer)
        .add_service(health_service)
        .add_service(CoordServiceServer::new(coord.clone()))
        .add_service(CoordAdminServer::with_interceptor(coord.clone(), coord.check.clone()))
        .add_optional_service(cfg.gateway.then(|| gateway::service(coord)))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    elector.abort();
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect: a coordinator run's epoch was its clock alone. Restarted on a
    /// clock behind the previous run's start, its answers ordered before
    /// the previous run's, and every node ignored them (no lease renewed)
    /// until the clock caught up. Now the state file keeps the epoch and
    /// the next run answers above it, and records its own before anything
    /// changes.
    #[tokio::test]
    async fn a_coordinator_restarted_on_a_clock_behind_orders_its_answers_after_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = net::now_ms() as u64 + 86_400_000; // the last run's clock was a day ahead
        StateFile::in_dir(dir.path()).unwrap().save(&Records::new(), ahead).unwrap();
        let cfg = CoordinatorConfig {
            clusters: 1,
            gateway: false,
            heartbeat: Duration::from_millis(100),
            missed: 3,
            lease: Duration::from_millis(150),
            data_dir: Some(dir.path().to_path_buf()),
            secret: None,
        };
        let (coord, elector) = Coordinator::new(&cfg, CancellationToken::new()).unwrap();
        assert_eq!(coord.epoch(), ahead + 1, "after the previous run's, not at this clock");
        elector.record_epoch().await;
        let stored = StateFile::in_dir(dir.path()).unwrap().load().unwrap().unwrap();
        assert_eq!(stored.epoch, ahead + 1, "the next run orders after this one even if nothing changes");
        let (again, _) = Coordinator::new(&cfg, CancellationToken::new()).unwrap();
        assert_eq!(again.epoch(), ahead + 2);
    }
}
