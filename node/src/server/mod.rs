//! The server (tsd): serves clients, keeps the files, replicates to its
//! slave, and feeds its synchronizer.
//!
//! Shape: [`Node`] is a cheap cloneable handle holding the store, the role
//! the coordinator assigned, its lease, and the write lane. The gRPC layers
//! in [`sns`] (course protocol) and [`replica`] (our internal service) are
//! thin and call into it; [`master`] is the write path of a master,
//! [`slave`] what a slave (or any server) applies on others' behalf.
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
pub mod master;
pub mod replica;
pub mod slave;
pub mod sns;

use crate::error::Result;
use crate::net;
use crate::store::state::{Entry, Snapshot, State};
use crate::store::{Log, Store, codec};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::LeaseRequest;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
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
    /// (coordinator epoch, table version) of the answer this came from.
    pub version: (u64, u64),
    /// A master: the servers recorded as holding every acknowledged write.
    pub in_sync: Vec<u32>,
    /// A master: number local events at least this high.
    pub seq_floor: u64,
    /// A master promoted by an operator accepting data loss.
    pub accept_data_loss: bool,
}

/// While a master has no slave it asks this often, so a slave that just
/// registered starts receiving writes within a fraction of a second rather
/// than a whole heartbeat period (the course's 5 s).
const SLAVE_DISCOVERY: Duration = Duration::from_millis(200);
/// How often a server that could not write its journal tries again.
const DISK_PROBE: Duration = Duration::from_secs(1);

type SlaveAddr = (String, String);

/// Why this server cannot write, if it cannot.
#[derive(Debug, Clone, Default)]
struct Disk {
    /// The last journal write failed (cut back): takes no writes until a
    /// probe or a snapshot install succeeds.
    unwritable: Option<String>,
    /// The journal refuses appends until the process restarts.
    poisoned: bool,
}

struct Inner {
    cfg: ServerConfig,
    /// Writes waiting for the writer ([`commit::commit_loop`]).
    writes: mpsc::UnboundedSender<commit::Request>,
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
    coord: Channel,
    /// The replica client of the current slave, keyed by its address.
    slave: Mutex<Option<(SlaveAddr, ReplicaClient<Channel>)>>,
    /// As master: the slave brought up to date under the current term.
    synced_slave: Mutex<Option<master::SyncedSlave>>,
    /// As a slave: the term whose master last installed a snapshot here.
    synced_term: AtomicU64,
    /// Why this master is not replicating ("" when it is).
    degraded: Mutex<String>,
    /// Every term under which this server accepted a client write as master.
    master_terms: Mutex<BTreeSet<u64>>,
    disk: Mutex<Disk>,
}

#[derive(Clone)]
pub struct Node(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Node {
    pub fn open(cfg: ServerConfig, port: u16) -> Result<(Node, mpsc::UnboundedReceiver<commit::Request>)> {
        let (log, store) = crate::store::open(&cfg.data_dir, cfg.cluster, cfg.clusters)?;
        let stable = store.state().next_seq() - 1;
        let coord = net::channel(&cfg.coord_host, &cfg.coord_port.to_string())?;
        let (writes, queued) = mpsc::unbounded_channel();
        let node = Node(Arc::new(Inner {
            cfg,
            writes,
            port,
            damage: Mutex::new(log.damage().map(str::to_string)),
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
            slave: Mutex::new(None),
            synced_slave: Mutex::new(None),
            synced_term: AtomicU64::new(0),
            degraded: Mutex::new(String::new()),
            master_terms: Mutex::new(BTreeSet::new()),
            disk: Mutex::new(Disk::default()),
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

    /// Journals `entries` (one write, one fsync) on a blocking thread.
    /// Called by the write lane's holder.
    async fn journal(&self, entries: Vec<Entry>) -> Result<()> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || lock(&node.0.log).append(&entries, true))
            .await
            .map_err(|e| crate::error::Error::Other(format!("journal task failed: {e}")))?
    }

    /// Makes `snapshot` the whole state: the journal first (atomically),
    /// then memory. Called by the write lane's holder.
    async fn install_state(&self, snapshot: Snapshot) -> Result<()> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut log = lock(&node.0.log);
            log.replace(&Entry::Snapshot(Box::new(snapshot.clone())))?;
            *lock(&node.0.damage) = None;
            node.0.incarnation.store(log.incarnation(), Ordering::SeqCst);
            drop(log);
            node.store().install(snapshot);
            Ok::<_, crate::error::Error>(())
        })
        .await
        .map_err(|e| crate::error::Error::Other(format!("install task failed: {e}")))??;
        self.mark_all_stable();
        Ok(())
    }

    /// Why this server cannot write its journal, if it cannot.
    pub fn unwritable(&self) -> Option<String> {
        lock(&self.0.disk).unwritable.clone()
    }

    pub fn lease_valid(&self) -> bool {
        self.0.lease.borrow().is_some_and(|until| Instant::now() < until)
    }

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

    /// Sends one heartbeat and adopts the role it returns; a master's
    /// heartbeat renews its lease, counted from when it was sent.
    pub async fn heartbeat(&self) -> Result<Role> {
        let current = self.role();
        let (incarnation, damaged, next_seq) =
            (self.incarnation(), self.damage().is_some(), self.read(|s| s.next_seq()));
        let info = ServerInfo {
            server_id: self.0.cfg.id as i32,
            hostname: self.0.cfg.advertise_host.clone(),
            port: self.0.port.to_string(),
            r#type: "server".into(),
            cluster_id: self.0.cfg.cluster as i32,
            is_master: current.is_master,
            term: current.term as i64,
            paired_server_id: 0,
            incarnation,
            damaged,
            unwritable: self.unwritable().is_some(),
            next_seq,
            unavailable_reason: String::new(),
        };
        let sent = Instant::now();
        let reply = CoordServiceClient::new(self.0.coord.clone()).heartbeat(info).await?.into_inner();
        let slave = (reply.is_master && !reply.slave_port.is_empty()).then_some((
            reply.slave_server_id as u32,
            reply.slave_hostname,
            reply.slave_port,
        ));
        let version = (reply.coordinator_epoch.max(0) as u64, reply.role_version.max(0) as u64);
        let role = Role {
            is_master: reply.is_master,
            term: reply.term.max(0) as u64,
            slave,
            version,
            in_sync: reply.in_sync_i_ds.iter().map(|id| (*id).max(0) as u32).collect(),
            seq_floor: reply.seq_floor,
            accept_data_loss: reply.accept_data_loss,
        };
        let adopted = self.adopt(role.clone());
        if adopted && role.is_master && reply.lease_millis > 0 {
            self.0.lease_ms.store(reply.lease_millis as u64, Ordering::Relaxed);
            let until = sent + Duration::from_millis(reply.lease_millis as u64);
            self.0.lease.send_if_modified(|l| {
                let newer = l.is_none_or(|cur| until > cur);
                if newer {
                    *l = Some(until);
                }
                newer
            });
        }
        Ok(self.role())
    }

    /// Takes on a role, ignoring anything older than the term we know.
    /// Returns whether `role` is now the role (adopted, or already it).
    fn adopt(&self, role: Role) -> bool {
        let mut same = false;
        self.0.role.send_if_modified(|cur| {
            // Older terms never; within a term, never an older answer (a
            // heartbeat reply overtaken by a lease push must not undo it).
            if role.term < cur.term || (role.term == cur.term && role.version < cur.version) {
                return false;
            }
            if *cur == role {
                same = true;
                return false;
            }
            same = true;
            if role.is_master != cur.is_master || role.term != cur.term {
                tracing::info!(
                    cluster = self.0.cfg.cluster,
                    id = self.0.cfg.id,
                    master = role.is_master,
                    term = role.term,
                    "role changed"
                );
            }
            if !role.is_master || role.term != cur.term {
                // A lease belongs to one term of mastership.
                self.0.lease.send_replace(None);
            }
            *cur = role;
            true
        });
        same
    }

    /// Stops acting as master at once (a newer term exists, or this server
    /// cannot serve), and tells the coordinator.
    pub fn fence(&self, term: u64) {
        let cur = self.role();
        if term > cur.term || cur.is_master {
            if cur.is_master {
                tracing::warn!(term, old_term = cur.term, "this server stops acting as master");
            }
            self.0.lease.send_replace(None);
            self.0.role.send_modify(|r| {
                r.is_master = false;
                r.term = r.term.max(term);
                r.slave = None;
            });
            self.0.beat_now.notify_one();
        }
    }

    /// Why this server does not serve clients now, if it does not.
    fn not_serving(&self) -> Option<String> {
        let (cluster, id) = (self.0.cfg.cluster, self.0.cfg.id);
        if let Some(damage) = self.damage() {
            return Some(format!("server {id} of cluster {cluster} has a damaged journal ({damage})"));
        }
        if let Some(why) = self.unwritable() {
            return Some(format!("server {id} of cluster {cluster} cannot write its journal ({why})"));
        }
        if !self.role().is_master {
            return Some(format!("server {id} is not the master of cluster {cluster}"));
        }
        if !self.lease_valid() {
            return Some(format!("server {id} of cluster {cluster} has no current lease from the coordinator"));
        }
        None
    }

    /// Fails unless this server may serve clients now: the master, with a
    /// current lease, able to write. One that is not asks the coordinator
    /// first (it may just have been promoted, or need its lease renewed).
    pub async fn ensure_serving(&self) -> Result<Role, Status> {
        if self.not_serving().is_some() && self.unwritable().is_none() && self.damage().is_none() {
            // Bounded: a master cut off from the coordinator must answer
            // its clients at once, not when the call times out.
            let _ = tokio::time::timeout(self.patience(), self.heartbeat()).await;
        }
        match self.not_serving() {
            None => Ok(self.role()),
            Some(why) => Err(Status::unavailable(format!("{why}; ask the coordinator for the master again"))),
        }
    }

    /// Everything journaled is stable (a slave, or a master between writes).
    fn mark_all_stable(&self) {
        let last = self.read(|s| s.next_seq()) - 1;
        self.0.stable.send_if_modified(|s| std::mem::replace(s, last) != last);
    }

    /// A journal write failed (and was cut back): this server takes no
    /// more writes until its disk works again, and stops being master.
    fn cannot_write(&self, e: &crate::error::Error) {
        let poisoned = matches!(e, crate::error::Error::Journal { poisoned: true, .. });
        {
            let mut disk = lock(&self.0.disk);
            if disk.unwritable.is_none() {
                tracing::error!(error = %e, poisoned, "cannot write the journal: this server takes no writes until it can");
            }
            disk.unwritable = Some(e.to_string());
            disk.poisoned |= poisoned;
        }
        self.0.synced_term.store(0, Ordering::SeqCst);
        self.fence(0);
        self.update_serving();
    }

    /// The disk works again (a probe or a snapshot install succeeded).
    fn can_write(&self) {
        let mut disk = lock(&self.0.disk);
        if disk.unwritable.take().is_some() && !disk.poisoned {
            tracing::info!("the journal can be written again");
            drop(disk);
            self.0.beat_now.notify_one();
            self.update_serving();
        }
    }

    /// Recomputes whether this server serves clients.
    fn update_serving(&self) {
        let serving = self.not_serving().is_none();
        self.0.serving.send_if_modified(|s| {
            let changed = *s != serving;
            if changed && !serving && self.role().is_master {
                tracing::warn!("not serving clients: {}", self.not_serving().unwrap_or_default());
            }
            *s = serving;
            changed
        });
    }

    /// Records that the broker confirmed the outbox up to `upto`. Not
    /// fsynced: losing it only means republishing, which receivers ignore.
    pub async fn ack_outbox(&self, upto: u64) -> Result<()> {
        if self.damage().is_none() && upto > self.read(|s| s.published_upto()) && upto < self.read(|s| s.next_seq()) {
            let node = self.clone();
            tokio::task::spawn_blocking(move || {
                let entries = [Entry::PublishedUpto(upto)];
                lock(&node.0.log).append(&entries, false)?;
                node.store().apply(&entries);
                Ok::<_, crate::error::Error>(())
            })
            .await
            .map_err(|e| crate::error::Error::Other(format!("commit task failed: {e}")))??;
        }
        Ok(())
    }

    /// Compacts the journal when it has grown large (under the lane, so no
    /// write is between its journal record and its application).
    async fn compact(&self) {
        let _lane = self.0.lane.lock().await;
        let node = self.clone();
        let compacted = tokio::task::spawn_blocking(move || {
            if !lock(&node.0.log).wants_compaction() {
                return Ok(false);
            }
            let snapshot = node.read(|s| s.snapshot());
            crate::store::compact(&mut lock(&node.0.log), snapshot)
        })
        .await;
        if let Ok(Err(e)) = compacted {
            tracing::error!(error = %e, "journal compaction failed; the old journal is intact");
        }
    }

    /// Writes the view files that lag behind the journal.
    pub async fn flush_views(&self) {
        if !self.store().views_dirty() {
            return;
        }
        let writes = self.store().prepare_flush();
        let flushed = tokio::task::spawn_blocking(move || writes.apply()).await;
        if let Ok(Err(e)) = flushed {
            // The journal has everything; every view is rewritten on the
            // next flush (and on restart).
            tracing::error!(error = %e, "writing view files failed; they will be rewritten");
            self.store().views_failed();
        }
    }

    /// Whether the data directory takes a write again (after a failure).
    async fn probe_disk(&self) -> bool {
        let dir = self.0.cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            let path = dir.join(".disk-probe");
            let probe = || -> std::io::Result<()> {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&path)?;
                // Enough that a nearly full disk fails here, not on the
                // next journal append.
                f.write_all(&[0u8; 64 * 1024])?;
                f.sync_all()
            };
            let ok = probe().is_ok();
            let _ = std::fs::remove_file(&path);
            ok
        })
        .await
        .unwrap_or(false)
    }
}

/// Heartbeats until shutdown; the first one registers. A master renews its
/// lease four times per lease period.
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
                tracing::warn!(error = %e, "heartbeat failed; keeping the current role until the lease runs out");
            }
            Err(_) => {}
        }
        node.update_serving();
        let role = node.role();
        let wait = if role.is_master {
            let granted = node.0.lease_ms.load(Ordering::Relaxed);
            let renew = if granted > 0 { Duration::from_millis(granted / 4) } else { SLAVE_DISCOVERY };
            let renew = renew.min(node.cfg().heartbeat);
            if role.slave.is_none() { renew.min(SLAVE_DISCOVERY) } else { renew }
        } else {
            node.cfg().heartbeat
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = node.0.beat_now.notified() => {}
        }
    }
}

/// Keeps [`Inner::serving`] current: flips it off the moment the lease
/// runs out (ending timeline streams), on again when it is renewed.
async fn serving_loop(node: Node, shutdown: CancellationToken) {
    let mut lease = node.0.lease.subscribe();
    let mut role = node.watch_role();
    loop {
        node.update_serving();
        let expiry = lease.borrow_and_update().filter(|until| *until > Instant::now());
        role.borrow_and_update();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = lease.changed() => if r.is_err() { return },
            r = role.changed() => if r.is_err() { return },
            _ = async {
                match expiry {
                    Some(until) => tokio::time::sleep_until(until.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                if node.role().is_master {
                    tracing::warn!("lease ran out: not serving until the coordinator renews it");
                }
            }
        }
    }
}

/// While this server cannot write, tries again now and then.
async fn disk_loop(node: Node, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(DISK_PROBE) => {}
        }
        let poisoned = lock(&node.0.disk).poisoned;
        if node.unwritable().is_some() && !poisoned && node.probe_disk().await {
            node.can_write();
        }
    }
}

/// Holds the lease stream to the coordinator open, adopting every role it
/// pushes; reopens it when it breaks (a coordinator restart). A push never
/// grants a lease: only a heartbeat's round trip bounds one.
async fn lease_loop(node: Node, shutdown: CancellationToken) {
    let req = LeaseRequest { cluster: node.cfg().cluster, id: node.cfg().id };
    loop {
        let mut admin = CoordAdminClient::new(node.0.coord.clone());
        if let Ok(stream) = admin.lease(req).await {
            let mut stream = stream.into_inner();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    update = stream.message() => match update {
                        Ok(Some(u)) => {
                            let slave = (u.is_master && !u.slave_port.is_empty())
                                .then_some((u.slave_id, u.slave_host, u.slave_port));
                            let promoted = u.is_master && !node.role().is_master;
                            node.adopt(Role {
                                is_master: u.is_master,
                                term: u.term,
                                slave,
                                version: (u.epoch, u.version),
                                in_sync: u.in_sync,
                                seq_floor: u.seq_floor,
                                accept_data_loss: u.accept_data_loss,
                            });
                            if promoted {
                                // Take the lease at once rather than at the
                                // next heartbeat.
                                node.0.beat_now.notify_one();
                            }
                        }
                        _ => break,
                    },
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SLAVE_DISCOVERY) => {}
        }
    }
}

/// How far the spec's view files may lag behind the journal. Short enough
/// that a person reading the files sees every write at once; long enough
/// to write each busy file once for many writes.
const VIEW_FLUSH: Duration = Duration::from_millis(50);

/// Keeps the view files current.
async fn flush_loop(node: Node, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(VIEW_FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                node.flush_views().await;
                node.compact().await;
            }
        }
    }
}

/// Serves a server node on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    serve(cfg, listener, None, shutdown).await
}

/// [`run`], writing the port to `port_file` once the store is open.
pub async fn serve(
    cfg: ServerConfig,
    listener: TcpListener,
    port_file: Option<&std::path::Path>,
    shutdown: CancellationToken,
) -> Result<()> {
    let port = net::local_port(&listener)?;
    let (node, queued) = Node::open(cfg, port)?;
    if let Some(path) = port_file {
        net::write_port_file(path, port)?;
    }
    tracing::info!(cluster = node.cfg().cluster, id = node.cfg().id, port, dir = %node.cfg().data_dir.display(), incarnation = node.incarnation(), "server listening");
    let tasks = [
        tokio::spawn(heartbeat_loop(node.clone(), shutdown.clone())),
        tokio::spawn(lease_loop(node.clone(), shutdown.clone())),
        tokio::spawn(serving_loop(node.clone(), shutdown.clone())),
        tokio::spawn(disk_loop(node.clone(), shutdown.clone())),
        tokio::spawn(master::slave_sync_loop(node.clone(), shutdown.clone())),
        tokio::spawn(flush_loop(node.clone(), shutdown.clone())),
        tokio::spawn(commit::commit_loop(node.clone(), queued, shutdown.clone())),
    ];
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<sns_proto::csce438::sns_service_server::SnsServiceServer<sns::Sns>>().await;
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sns::service(node.clone(), shutdown.clone()))
        .add_service(replica::service(node.clone(), shutdown.clone()))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    for t in tasks {
        t.abort();
    }
    node.flush_views().await;
    Ok(result?)
}

/// A snapshot as the chunks `Replica.InstallSnapshot` takes.
fn snapshot_chunks(bytes: &[u8], term: u64, cluster: u32) -> Vec<sns_proto::internal::SnapshotChunk> {
    use sns_proto::internal::SnapshotChunk;
    /// Well under gRPC's 4 MiB default message limit.
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<SnapshotChunk> =
        bytes.chunks(CHUNK).map(|c| SnapshotChunk { term, cluster, data: c.to_vec() }).collect();
    if chunks.is_empty() { vec![SnapshotChunk { term, cluster, data: Vec::new() }] } else { chunks }
}

/// Encodes the committed state for a slave.
fn encode_state(node: &Node) -> (Vec<u8>, u64) {
    let store = node.store();
    (codec::encode_snapshot(&store.state().snapshot(), node.cfg().cluster), store.state().post_count())
}
