//! The server (tsd): serves clients, keeps the files, replicates to its
//! slave, and feeds its synchronizer.
//!
//! Shape: [`Node`] is a cheap cloneable handle holding the store, the role
//! the coordinator assigned, its lease, and the write lane; this module
//! holds the handle, its fields and [`run`]. What the server does is split
//! by concern:
//! - [`role`]: heartbeats, the role and lease the coordinator grants, and
//!   whether this server serves clients now;
//! - [`disk`]: whether the journal can be written, and the storage work the
//!   write lane and the maintenance loops share (journal appends, state
//!   installs, compaction, view files);
//! - [`commit`]: the single writer of a master; [`master`]: its write path
//!   (journal here, replicate, commit) and the catch-up of its slave;
//!   [`slave`]: what a slave (or any server) applies on others' behalf;
//! - [`resend`]: other clusters' receipts of this cluster's stream, and
//!   publishing again what the broker lost after confirming it;
//! - [`sns`] (course protocol) and [`replica`] (our internal service): the
//!   gRPC layers, thin, calling into the handle. The logic fails with
//!   domain errors ([`crate::error::Error`]); they become gRPC statuses
//!   only there, through the crate's one conversion.
//!
//! Safety, in one place:
//! - **Only a master with a current lease serves** reads and writes. Its
//!   heartbeats renew the lease (counted from when each was sent); when it
//!   runs out the master stops, ends its timeline streams and tells clients
//!   to ask the coordinator again. The coordinator promotes no one before
//!   it ran out.
//! - **A write is journaled on the master first**, then forwarded, then
//!   applied to memory and acknowledged: readers see committed state only,
//!   and the slave never holds a write the master failed to journal.
//! - **Acknowledged means held by every in-sync server.** The coordinator
//!   records which servers hold every acknowledged write; the master
//!   acknowledges only once each of them has the write, or once the
//!   coordinator recorded the one that lacks it as out of sync.
//! - **A server that cannot write its journal says so** (heartbeat, and
//!   at once to a master forwarding to it) and takes no writes; a damaged
//!   journal serves nothing until it is rebuilt from an in-sync peer or an
//!   operator accepts its loss.

pub mod commit;
mod disk;
pub mod master;
pub mod replica;
mod resend;
mod role;
pub mod slave;
pub mod sns;

use crate::error::Result;
use crate::net;
use crate::store::state::State;
use crate::store::{Log, Store};
use sns_proto::internal::replica_client::ReplicaClient;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

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
    /// How long a journal write may take before the disk counts as hung
    /// (None: derived from the heartbeat; see `disk.rs`).
    pub disk_stall_limit: Option<Duration>,
    /// The deployment's secret: `Replica` calls must carry its token, and
    /// this server's own calls to nodes carry it (None: open).
    pub secret: Option<crate::auth::Secret>,
    /// The address this server's own connections (to the coordinator, to
    /// its slave) leave from (None: the system's choice).
    pub source_address: Option<std::net::IpAddr>,
    /// How long the writer waits for more writes before a group commit
    /// while it is under concurrent load (zero: never; see `commit.rs`).
    pub commit_delay: Duration,
    /// How long another cluster's receipts may stay short of what the
    /// broker confirmed for it (while it says it is stuck) before the
    /// missing events are published again (see `resend.rs`).
    pub resend_after: Duration,
    /// Journal size that triggers a compaction (`--compact-at`).
    pub compact_at: u64,
}

/// `--resend-after` unless set.
pub const DEFAULT_RESEND_AFTER: Duration = Duration::from_secs(3);

/// `--commit-delay` unless set.
pub const DEFAULT_COMMIT_DELAY: Duration = Duration::from_millis(1);

/// What the coordinator last told this server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub is_master: bool,
    pub term: u64,
    /// The slave to forward writes to: (id, host, port).
    pub slave: Option<(u32, String, String)>,
    /// (coordinator epoch, table version) of the answer this came from.
    pub version: (u64, u64),
    /// A master: the servers recorded as holding every acknowledged write.
    pub in_sync: Vec<u32>,
    /// A master: number local events at least this high.
    pub seq_floor: u64,
    /// A master promoted by an operator accepting data loss.
    pub accept_data_loss: bool,
}

type SlaveAddr = (String, String);

struct Inner {
    cfg: ServerConfig,
    /// Writes waiting for the writer ([`commit::commit_loop`]).
    writes: mpsc::UnboundedSender<commit::Queued>,
    port: u16,
    /// The memory half: readers lock it briefly, never across disk I/O.
    store: Mutex<Store>,
    /// The disk half: only the write lane's holder locks it, on a blocking
    /// thread (an async handler never waits on it).
    log: Mutex<Log>,
    /// What readers need of the log, kept here so they never wait on it.
    damage: Mutex<Option<String>>,
    incarnation: AtomicU64,
    /// Serializes every change of the journal's order: the writer's
    /// cycles, replicated records, snapshots, compaction.
    lane: tokio::sync::Mutex<()>,
    role: watch::Sender<Role>,
    /// Until when this master may serve (None: no lease).
    lease: watch::Sender<Option<Instant>>,
    /// The lease length the coordinator last granted, in ms.
    lease_ms: AtomicU64,
    /// Whether this server serves clients now (master, leased, healthy).
    serving: watch::Sender<bool>,
    /// Wakes the heartbeat loop early (a change the coordinator must hear).
    beat_now: Notify,
    /// The highest local seq that is committed: only this much of the
    /// outbox may be published.
    stable: watch::Sender<u64>,
    coord: net::NodeChannel,
    /// Adds the deployment's token to this server's calls to other nodes.
    attach: crate::auth::Attach,
    /// The replica client of the current slave, keyed by its address.
    slave: Mutex<Option<(SlaveAddr, ReplicaClient<net::NodeChannel>)>>,
    /// As master: the slave brought up to date under the current term.
    synced_slave: Mutex<Option<master::SyncedSlave>>,
    /// As a slave: the term whose master last installed a snapshot here.
    synced_term: AtomicU64,
    /// Whether this run's journal has been confirmed: a master installed
    /// its state here, or (as a restarted master) this server compared it
    /// with an in-sync peer or had none to compare with. Until then the
    /// coordinator promotes it only where no other in-sync server could
    /// hold more (`ServerInfo.unconfirmed`).
    confirmed: AtomicBool,
    /// Whether the coordinator has answered a heartbeat that said so.
    confirmed_heard: watch::Sender<bool>,
    /// As a slave: (term, sync number) of the last snapshot installed here.
    installed: Mutex<(u64, u64)>,
    /// As master: the number of the last snapshot sent to a slave (see
    /// `master::next_snapshot_number`).
    snapshots_sent: AtomicU64,
    /// Why this master is not replicating ("" when it is).
    degraded: Mutex<String>,
    /// As master: what it saw of each other cluster's receipts.
    receipts: Mutex<std::collections::HashMap<u32, resend::Watch>>,
    /// Every term under which this server accepted a client write as master.
    master_terms: Mutex<BTreeSet<u64>>,
    /// The first term this process heard of, until it has compared its
    /// journal with its in-sync peers as master of that term (a restart
    /// within its term; 0: nothing to compare). See `master::verify_peers`.
    unverified: AtomicU64,
    /// What was cut from the journal's end as a torn tail (in this run or
    /// an earlier one) and not yet settled by a peer: this server cannot
    /// tell alone whether it was ever acknowledged.
    tail_cut: Mutex<Option<String>>,
    /// Why the last comparison did not let this master serve yet.
    unverified_why: Mutex<String>,
    /// A handover to a peer holding more of the term is under way.
    handing_over: AtomicBool,
    disk: Mutex<disk::Disk>,
    /// This process's hold on the data directory, for as long as it runs.
    _dir_lock: crate::store::lock::DirLock,
}

#[derive(Clone)]
pub struct Node(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Node {
    /// Opens the server's storage in `cfg.data_dir`, whose lock
    /// (`crate::store::lock::lock`) `dir_lock` is, held as long as the node.
    pub fn open(
        cfg: ServerConfig,
        port: u16,
        dir_lock: crate::store::lock::DirLock,
    ) -> Result<(Node, mpsc::UnboundedReceiver<commit::Queued>)> {
        let (mut log, store) = crate::store::open(&cfg.data_dir, cfg.cluster, cfg.clusters)?;
        log.set_compact_at(cfg.compact_at);
        let stable = store.state().next_seq() - 1;
        let attach = crate::auth::Attach::new(cfg.secret.clone());
        let coord = net::node_channel_from(&cfg.coord_host, &cfg.coord_port.to_string(), cfg.source_address, &attach)?;
        let (writes, queued) = mpsc::unbounded_channel();
        let node = Node(Arc::new(Inner {
            cfg,
            writes,
            port,
            damage: Mutex::new(log.damage().map(str::to_string)),
            tail_cut: Mutex::new(log.tail_cut().map(str::to_string)),
            incarnation: AtomicU64::new(log.incarnation()),
            store: Mutex::new(store),
            log: Mutex::new(log),
            lane: tokio::sync::Mutex::new(()),
            role: watch::channel(Role::default()).0,
            lease: watch::channel(None).0,
            lease_ms: AtomicU64::new(0),
            serving: watch::channel(false).0,
            beat_now: Notify::new(),
            stable: watch::channel(stable).0,
            coord,
            attach,
            slave: Mutex::new(None),
            synced_slave: Mutex::new(None),
            synced_term: AtomicU64::new(0),
            confirmed: AtomicBool::new(false),
            confirmed_heard: watch::channel(false).0,
            installed: Mutex::new((0, 0)),
            snapshots_sent: AtomicU64::new(0),
            degraded: Mutex::new(String::new()),
            receipts: Mutex::new(std::collections::HashMap::new()),
            master_terms: Mutex::new(BTreeSet::new()),
            unverified: AtomicU64::new(0),
            unverified_why: Mutex::new(String::new()),
            handing_over: AtomicBool::new(false),
            disk: Mutex::new(disk::Disk::default()),
            _dir_lock: dir_lock,
        }));
        Ok((node, queued))
    }

    pub fn cfg(&self) -> &ServerConfig {
        &self.0.cfg
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.0.store)
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

    /// Whether this server serves clients, as a watch (timeline streams
    /// end when it turns false).
    pub fn watch_serving(&self) -> watch::Receiver<bool> {
        self.0.serving.subscribe()
    }

    /// The stable outbox mark (see [`Inner::stable`]), as a watch.
    pub fn watch_stable(&self) -> watch::Receiver<u64> {
        self.0.stable.subscribe()
    }

    pub fn degraded(&self) -> String {
        lock(&self.0.degraded).clone()
    }

    pub fn master_terms(&self) -> Vec<u64> {
        lock(&self.0.master_terms).iter().copied().collect()
    }

    /// As a slave: (term, sync number) of the last snapshot installed in
    /// this run.
    pub fn installed(&self) -> (u64, u64) {
        *lock(&self.0.installed)
    }

    /// See [`Inner::confirmed`].
    pub(super) fn confirm(&self) {
        self.0.confirmed.store(true, Ordering::SeqCst);
    }

    /// [`Node::confirm`], then waits (at most a patience) until the
    /// coordinator has heard of it: a slave synced by its master may be
    /// promoted (a switchover, a failover) the moment it says it is synced.
    pub(super) async fn confirm_and_report(&self) {
        if self.confirmed() {
            return;
        }
        self.confirm();
        self.0.beat_now.notify_one();
        let mut heard = self.0.confirmed_heard.subscribe();
        if tokio::time::timeout(self.patience(), heard.wait_for(|h| *h)).await.is_err() {
            tracing::warn!("the coordinator has not yet heard that a master synced this server");
        }
    }

    pub(super) fn confirmed(&self) -> bool {
        self.0.confirmed.load(Ordering::SeqCst)
    }

    pub fn synced_term(&self) -> u64 {
        self.0.synced_term.load(Ordering::SeqCst)
    }

    pub fn incarnation(&self) -> u64 {
        self.0.incarnation.load(Ordering::SeqCst)
    }

    /// Why the journal cannot be trusted, if it cannot.
    pub fn damage(&self) -> Option<String> {
        lock(&self.0.damage).clone()
    }

    /// Records why this master replicates to no slave ("": it does again),
    /// logging each change.
    fn set_degraded(&self, why: &str) {
        let mut d = lock(&self.0.degraded);
        if *d != why {
            if why.is_empty() {
                tracing::info!("replicating to the slave again");
            } else {
                tracing::warn!(reason = why, "master carries on without its slave");
            }
            *d = why.to_string();
        }
    }
}

/// Serves a server node on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let dir_lock = crate::store::lock::lock(&cfg.data_dir)?;
    serve(cfg, dir_lock, listener, None, shutdown).await
}

/// [`run`], writing the port to `port_file` once the store is open.
pub async fn serve(
    cfg: ServerConfig,
    dir_lock: crate::store::lock::DirLock,
    listener: TcpListener,
    port_file: Option<&std::path::Path>,
    shutdown: CancellationToken,
) -> Result<()> {
    let port = net::local_port(&listener)?;
    let (node, queued) = Node::open(cfg, port, dir_lock)?;
    if let Some(path) = port_file {
        net::write_port_file(path, port)?;
    }
    // The node's span: every task below runs in a child of it.
    let span = tracing::info_span!("server", cluster = node.cfg().cluster, server = node.cfg().id);
    tracing::info!(cluster = node.cfg().cluster, id = node.cfg().id, port, dir = %node.cfg().data_dir.display(), incarnation = node.incarnation(), "server listening");
    let tasks = [
        tokio::spawn(
            role::heartbeat_loop(node.clone(), shutdown.clone())
                .instrument(tracing::info_span!(parent: &span, "heartbeat")),
        ),
        tokio::spawn(
            role::lease_loop(node.clone(), shutdown.clone()).instrument(tracing::info_span!(parent: &span, "lease")),
        ),
        tokio::spawn(
            role::serving_loop(node.clone(), shutdown.clone())
                .instrument(tracing::info_span!(parent: &span, "serving")),
        ),
        tokio::spawn(
            disk::disk_loop(node.clone(), shutdown.clone()).instrument(tracing::info_span!(parent: &span, "disk")),
        ),
        tokio::spawn(
            master::slave_sync_loop(node.clone(), shutdown.clone())
                .instrument(tracing::info_span!(parent: &span, "slave_sync")),
        ),
        tokio::spawn(
            disk::flush_loop(node.clone(), shutdown.clone()).instrument(tracing::info_span!(parent: &span, "flush")),
        ),
        tokio::spawn(
            commit::commit_loop(node.clone(), queued, shutdown.clone())
                .instrument(tracing::info_span!(parent: &span, "commit")),
        ),
        tokio::spawn(
            role::role_metrics_loop(node.clone(), shutdown.clone())
                .instrument(tracing::info_span!(parent: &span, "role_metrics")),
        ),
    ];
    let (health, health_service) = tonic_health::server::health_reporter();
    net::serve_health(health_service.clone(), shutdown.clone());
    let health_task = tokio::spawn(
        role::health_loop(node.clone(), health, shutdown.clone())
            .instrument(tracing::info_span!(parent: &span, "health")),
    );
    let result = crate::tls::server_builder()?
        .trace_fn(crate::telemetry::rpc_span(Some(crate::telemetry::NodeId {
            cluster: node.cfg().cluster,
            server: node.cfg().id,
        })))
        .layer(crate::metrics::grpc::CountLayer)
        .add_service(health_service)
        .add_service(sns::service(node.clone(), shutdown.clone()))
        .add_service(replica::service(node.clone(), shutdown.clone(), node.cfg().secret.clone()))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    for t in tasks {
        t.abort();
    }
    health_task.abort();
    node.flush_views().await;
    Ok(result?)
}
