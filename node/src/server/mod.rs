//! The server (tsd): serves clients, keeps the files, replicates to its
//! slave, and feeds its synchronizer.
//!
//! Shape: [`Node`] is a cheap cloneable handle holding the store, the role
//! the coordinator assigned, and the write lane. The gRPC layers in
//! [`sns`] (course protocol) and [`replica`] (our internal service) are thin
//! and call into it.
//!
//! Writes: every client write, replicated write and snapshot goes through
//! the single write lane, so master and slave apply client writes in the
//! same order (remote events, which each server applies from its own queue,
//! only take the store lock). A client write is journaled (fsync) on
//! the master and, concurrently, on the slave; the client hears SUCCESS only
//! once both have it. If the slave does not answer, the master asks the
//! coordinator: while the slave still counts as live it keeps trying; once
//! the coordinator drops it, the master carries on alone and says so in its
//! status ("degraded").
//!
//! Roles: the coordinator pushes this server's role over a lease stream the
//! moment it changes (and the course's heartbeat remains as the backstop).
//! Every promotion carries a new term. A master whose forward is refused
//! because the slave knows a newer term has been replaced: it stops taking
//! writes at once and the write fails; it never answers SUCCESS.
//!
//! Catch-up: a slave takes forwarded writes only under the term it was last
//! synced in. A master installs its whole state on a slave (a snapshot)
//! when a new slave appears, after a promotion, and whenever the slave asks
//! for it; the write lane is held meanwhile, so no write slips between the
//! snapshot and the forwards that follow it.

pub mod replica;
pub mod sns;

use crate::error::{Error, Result};
use crate::net;
use crate::store::state::{Change, Effect, Entry, LocalOp, Post, RemoteEvent, Snapshot, State};
use crate::store::{Store, codec};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{LeaseRequest, ReplicateRequest, SnapshotChunk};
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

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
}

/// While a master has no slave it asks this often, so a slave that just
/// registered starts receiving writes within a fraction of a second rather
/// than a whole heartbeat period (the course's 5 s).
const SLAVE_DISCOVERY: Duration = Duration::from_millis(200);
/// Pause between two forwards to a slave that did not answer, while the
/// coordinator still counts it as live.
const FORWARD_RETRY: Duration = Duration::from_millis(50);
/// A write gives up on a slave that neither answers nor is declared dead
/// within this long (the coordinator's heartbeat timeout is far shorter).
const FORWARD_GIVE_UP: Duration = Duration::from_secs(60);
/// Snapshot chunk size: well under gRPC's 4 MiB default message limit.
const SNAPSHOT_CHUNK: usize = 1 << 20;

type SlaveAddr = (String, String);

/// A post waiting to be committed, and who waits for it.
pub struct PostRequest {
    post: Post,
    done: oneshot::Sender<Result<(), Status>>,
}

/// Most posts committed as one group: bounds one journal write and one
/// replication request (posts are at most 4 KiB).
const POST_BATCH: usize = 256;

struct Inner {
    cfg: ServerConfig,
    /// Posts waiting for the committer.
    posts: mpsc::UnboundedSender<PostRequest>,
    port: u16,
    store: Mutex<Store>,
    /// Serializes every change, and the forwarding of client writes to the
    /// slave, so both apply them in one order.
    lane: tokio::sync::Mutex<()>,
    role: watch::Sender<Role>,
    /// The highest local seq that is fully written (here and on the slave):
    /// only this much of the outbox may be published, so a master that dies
    /// mid-write never publishes an event its successor does not have.
    stable: watch::Sender<u64>,
    coord: Channel,
    /// The replica client of the current slave, keyed by its address.
    slave: Mutex<Option<(SlaveAddr, ReplicaClient<Channel>)>>,
    /// (slave address, term) of the last snapshot this master installed.
    synced_slave: Mutex<Option<(SlaveAddr, u64)>>,
    /// As a slave: the term whose master last installed a snapshot here.
    synced_term: AtomicU64,
    /// Why this master is not replicating ("" when it is).
    degraded: Mutex<String>,
    /// Every term under which this server accepted a client write as master.
    master_terms: Mutex<BTreeSet<u64>>,
}

#[derive(Clone)]
pub struct Node(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Node {
    pub fn open(cfg: ServerConfig, port: u16) -> Result<(Node, mpsc::UnboundedReceiver<PostRequest>)> {
        let store = Store::open(&cfg.data_dir, cfg.cluster, cfg.clusters)?;
        let stable = store.state().next_seq() - 1;
        let coord = net::channel(&cfg.coord_host, &cfg.coord_port.to_string())?;
        let (posts, queued) = mpsc::unbounded_channel();
        let node = Node(Arc::new(Inner {
            cfg,
            posts,
            port,
            store: Mutex::new(store),
            lane: tokio::sync::Mutex::new(()),
            role: watch::channel(Role::default()).0,
            stable: watch::channel(stable).0,
            coord,
            slave: Mutex::new(None),
            synced_slave: Mutex::new(None),
            synced_term: AtomicU64::new(0),
            degraded: Mutex::new(String::new()),
            master_terms: Mutex::new(BTreeSet::new()),
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

    fn set_degraded(&self, why: &str) {
        let mut d = lock(&self.0.degraded);
        if *d != why {
            if why.is_empty() {
                tracing::info!("replicating to the slave again");
            } else {
                tracing::warn!(reason = why, "master carries on without a slave");
            }
            *d = why.to_string();
        }
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
        let reply = CoordServiceClient::new(self.0.coord.clone()).heartbeat(info).await?.into_inner();
        let slave = (reply.is_master && !reply.slave_port.is_empty()).then_some((
            reply.slave_server_id as u32,
            reply.slave_hostname,
            reply.slave_port,
        ));
        let version = (reply.coordinator_epoch.max(0) as u64, reply.role_version.max(0) as u64);
        self.adopt(Role { is_master: reply.is_master, term: reply.term.max(0) as u64, slave, version });
        Ok(self.role())
    }

    /// Takes on a role, ignoring anything older than the term we know.
    fn adopt(&self, role: Role) {
        self.0.role.send_if_modified(|cur| {
            // Older terms never; within a term, never an older answer (a
            // heartbeat reply overtaken by a lease push must not undo it).
            if role.term < cur.term || (role.term == cur.term && role.version < cur.version) || *cur == role {
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
            if cur.is_master {
                tracing::warn!(term, old_term = cur.term, "a newer term exists: this server is fenced");
            }
            self.adopt(Role { is_master: false, term, slave: None, version: cur.version });
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
            _ => Err(self.not_master()),
        }
    }

    fn not_master(&self) -> Status {
        Status::unavailable(format!("server {} is not the master of cluster {}", self.0.cfg.id, self.0.cfg.cluster))
    }

    /// Commits an entry on a blocking thread (the journal fsyncs).
    async fn commit(&self, entry: Entry, durable: bool) -> Result<Vec<Effect>> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.store().commit(&entry, durable))
            .await
            .map_err(|e| Error::Other(format!("commit task failed: {e}")))?
    }

    /// Everything journaled is stable (a slave, or a master between writes).
    fn mark_all_stable(&self) {
        let last = self.read(|s| s.next_seq()) - 1;
        self.0.stable.send_if_modified(|s| std::mem::replace(s, last) != last);
    }

    /// Runs a client write as master: `decide` looks at the state (under the
    /// write lane, so nothing changes meanwhile) and returns the change to
    /// make (None: nothing to do), or a refusal. The change is journaled here
    /// and on the slave before this returns Ok.
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
                Ok(Some(change)) => (change, store.state().next_seq(), store.state().published_upto()),
            }
        };
        self.write_ops(&role, vec![LocalOp { seq, change }], published).await?;
        Ok(Ok(()))
    }

    /// Journals consecutive ops here and on the slave (concurrently), and
    /// finishes the forward. Called with the write lane held.
    async fn write_ops(&self, role: &Role, ops: Vec<LocalOp>, published: u64) -> Result<(), Status> {
        let last = ops.last().map_or(0, |op| op.seq);
        let entries: Vec<Entry> = ops.iter().cloned().map(Entry::Local).collect();
        let replicate = self.forward(role, &ops, published);
        let node = self.clone();
        let local = tokio::task::spawn_blocking(move || node.store().commit_all(&entries, true));
        let (replicated, committed) = tokio::join!(replicate, local);
        committed.map_err(|e| Status::internal(format!("commit task failed: {e}")))?.map_err(Status::from)?;
        self.finish_forward(role.clone(), &ops, published, replicated).await?;
        if lock(&self.0.master_terms).insert(role.term) {
            // One line per term: tests check no two servers of a cluster
            // ever log the same term.
            tracing::info!(
                cluster = self.0.cfg.cluster,
                id = self.0.cfg.id,
                term = role.term,
                "accepting writes as master"
            );
        }
        self.0.stable.send_replace(last);
        Ok(())
    }

    /// Queues a post: it is committed with the other posts that are waiting
    /// (one lane turn, one fsync here and one on the slave for the whole
    /// group), in queue order; the receiver tells when. A post whose client
    /// id was already applied is acknowledged without being applied again.
    pub fn queue_post(&self, post: Post) -> oneshot::Receiver<Result<(), Status>> {
        let (done, result) = oneshot::channel();
        // A closed queue drops `done`: the receiver then reports the stop.
        let _ = self.0.posts.send(PostRequest { post, done });
        result
    }

    /// Commits a group of queued posts.
    async fn write_posts(&self, batch: Vec<PostRequest>) {
        let _lane = self.0.lane.lock().await;
        let result = async {
            let role = self.ensure_master().await?;
            let (ops, published) = {
                let store = self.store();
                let state = store.state();
                let mut seq = state.next_seq();
                let mut ids = HashSet::new();
                let mut ops = Vec::new();
                for r in &batch {
                    let (user, id) = (r.post.user, r.post.client_id);
                    if id != 0 && (state.has_post_id(user, id) || !ids.insert((user, id))) {
                        continue; // a resent post: acknowledge, do not apply
                    }
                    ops.push(LocalOp { seq, change: Change::Post(r.post.clone()) });
                    seq += 1;
                }
                (ops, state.published_upto())
            };
            if ops.is_empty() {
                return Ok(());
            }
            self.write_ops(&role, ops, published).await
        }
        .await;
        for r in batch {
            let _ = r.done.send(result.clone());
        }
    }

    /// Drives a forward to completion: done when the slave has the write,
    /// or when the coordinator says there is no live slave any more; failed
    /// when this server turns out to be replaced.
    async fn finish_forward(
        &self,
        mut role: Role,
        ops: &[LocalOp],
        published: u64,
        mut result: Result<(), Status>,
    ) -> Result<(), Status> {
        let seq = ops.first().map_or(0, |op| op.seq);
        let give_up = Instant::now() + FORWARD_GIVE_UP;
        loop {
            let status = match result {
                Ok(()) => {
                    self.set_degraded("");
                    return Ok(());
                }
                Err(status) => status,
            };
            match status.code() {
                // The slave knows a newer term: we were replaced.
                Code::FailedPrecondition => {
                    tracing::warn!(seq, error = %status.message(), "write refused by a newer term");
                    if let Ok(r) = self.heartbeat().await
                        && r.is_master
                        && r.term > role.term
                    {
                        // Re-elected meanwhile (e.g. a coordinator restart): retry.
                        role = r;
                    } else {
                        self.fence(role.term + 1);
                        return Err(Status::unavailable(format!(
                            "server {} was replaced as master of cluster {}; the write was not acknowledged",
                            self.0.cfg.id, self.0.cfg.cluster
                        )));
                    }
                }
                // The slave must be brought up to date first.
                Code::Aborted => {
                    if let Err(e) = self.sync_slave(&role).await {
                        result = Err(e);
                        continue;
                    }
                }
                _ => {
                    tracing::debug!(seq, error = %status.message(), "forward failed");
                    *lock(&self.0.synced_slave) = None;
                    match self.heartbeat().await {
                        Ok(r) if !r.is_master => return Err(self.not_master()),
                        Ok(r) => {
                            if r.slave.is_none() {
                                self.set_degraded("no live slave");
                                return Ok(());
                            }
                            role = r;
                        }
                        Err(_) => {} // coordinator unreachable: keep trying the slave we know
                    }
                    if Instant::now() > give_up {
                        self.set_degraded("slave unreachable");
                        return Err(Status::unavailable("the slave does not answer; the write was not acknowledged"));
                    }
                    tokio::time::sleep(FORWARD_RETRY).await;
                }
            }
            result = self.forward(&role, ops, published).await;
        }
    }

    fn slave_client(&self, host: &str, port: &str) -> Result<ReplicaClient<Channel>, Status> {
        let mut cached = lock(&self.0.slave);
        let addr = (host.to_string(), port.to_string());
        match cached.as_ref() {
            Some((a, client)) if *a == addr => Ok(client.clone()),
            _ => {
                let client = ReplicaClient::new(net::channel(host, port).map_err(Status::from)?);
                *cached = Some((addr, client.clone()));
                Ok(client)
            }
        }
    }

    async fn forward(&self, role: &Role, ops: &[LocalOp], published_upto: u64) -> Result<(), Status> {
        let Some((slave_id, host, port)) = role.slave.clone() else { return Ok(()) };
        let req = ReplicateRequest {
            term: role.term,
            ops: ops.iter().map(codec::local_op_to_pb).collect(),
            published_upto,
            cluster: self.0.cfg.cluster,
            from_server: self.0.cfg.id,
        };
        self.slave_client(&host, &port)?
            .replicate(req)
            .await
            .map(|_| ())
            .map_err(|s| Status::new(s.code(), format!("slave {slave_id}: {}", s.message())))
    }

    /// Installs this master's whole state on its slave. Called with the
    /// write lane held.
    async fn sync_slave(&self, role: &Role) -> Result<(), Status> {
        let Some((slave_id, host, port)) = role.slave.clone() else { return Ok(()) };
        let started = Instant::now();
        let (bytes, posts) = {
            let store = self.store();
            (codec::encode_snapshot(&store.state().snapshot(), self.0.cfg.cluster), store.state().post_count())
        };
        let size = bytes.len();
        let (term, cluster) = (role.term, self.0.cfg.cluster);
        let chunks: Vec<SnapshotChunk> =
            bytes.chunks(SNAPSHOT_CHUNK).map(|c| SnapshotChunk { term, cluster, data: c.to_vec() }).collect::<Vec<_>>();
        let chunks = if chunks.is_empty() { vec![SnapshotChunk { term, cluster, data: Vec::new() }] } else { chunks };
        self.slave_client(&host, &port)?
            .install_snapshot(tokio_stream::iter(chunks))
            .await
            .map_err(|s| Status::new(s.code(), format!("slave {slave_id}: {}", s.message())))?;
        *lock(&self.0.synced_slave) = Some(((host, port), term));
        tracing::info!(
            slave = slave_id,
            term,
            bytes = size,
            posts,
            ms = started.elapsed().as_millis() as u64,
            "slave caught up"
        );
        Ok(())
    }

    /// As master: bring a newly seen slave up to date without waiting for
    /// the next client write.
    async fn sync_new_slave(&self) {
        let _lane = self.0.lane.lock().await;
        let role = self.role();
        let Some((_, host, port)) = role.slave.clone() else { return };
        if !role.is_master || *lock(&self.0.synced_slave) == Some(((host, port), role.term)) {
            return;
        }
        if let Err(e) = self.sync_slave(&role).await {
            tracing::warn!(error = %e.message(), "could not bring the slave up to date; will retry on the next write");
        }
    }

    /// Checks a forward or snapshot from a master under `term`.
    fn check_master_term(&self, term: u64) -> Result<(), Status> {
        let role = self.role();
        if term < role.term || (role.is_master && term <= role.term) {
            return Err(Status::failed_precondition(format!(
                "stale term {term}: this server is at term {} (master: {})",
                role.term, role.is_master
            )));
        }
        self.fence(term);
        Ok(())
    }

    /// Applies a client write forwarded by the master.
    pub async fn apply_replicated(&self, term: u64, ops: Vec<LocalOp>, published_upto: u64) -> Result<(), Status> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        if self.synced_term() != term {
            return Err(Status::aborted(format!("not synced under term {term}: send a snapshot first")));
        }
        let (next, published) = self.read(|s| (s.next_seq(), s.published_upto()));
        // Ops already here come from a retried forward.
        let mut fresh: Vec<Entry> = ops.into_iter().filter(|op| op.seq >= next).map(Entry::Local).collect();
        let Some(Entry::Local(first)) = fresh.first() else { return Ok(()) };
        if first.seq > next {
            // Cannot happen under the same term; resync rather than diverge.
            self.0.synced_term.store(0, Ordering::SeqCst);
            return Err(Status::aborted(format!("expected seq {next}, got {}: send a snapshot", first.seq)));
        }
        // The master's published mark rides in the same journal write.
        if published_upto > published {
            fresh.push(Entry::PublishedUpto(published_upto));
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.store().commit_all(&fresh, true))
            .await
            .map_err(|e| Status::internal(format!("commit task failed: {e}")))?
            .map_err(Status::from)?;
        self.mark_all_stable();
        Ok(())
    }

    /// Installs the master's state (a rejoin or a new term).
    pub async fn install_snapshot(&self, term: u64, snapshot: Snapshot) -> Result<u64, Status> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.store().install_snapshot(snapshot))
            .await
            .map_err(|e| Status::internal(format!("install task failed: {e}")))?
            .map_err(Status::from)?;
        self.0.synced_term.store(term, Ordering::SeqCst);
        self.mark_all_stable();
        let next = self.read(|s| s.next_seq());
        tracing::info!(term, next_seq = next, "installed the master's snapshot");
        Ok(next)
    }

    /// Applies events from other clusters, in order, with one fsync;
    /// returns how many changed anything (a redelivered one does not).
    ///
    /// Not in the write lane: remote events do not take part in the order
    /// master and slave share (each server applies them from its own queue,
    /// tracked per origin), so they need not wait behind a client write's
    /// round trip to the slave. Only this server's synchronizer calls this,
    /// one batch at a time; the store lock orders the commit with the rest,
    /// and applying skips an event the state already has.
    pub async fn apply_remote(&self, events: Vec<RemoteEvent>) -> Result<usize> {
        let fresh: Vec<Entry> = self.read(|s| {
            let mut marks = std::collections::HashMap::new();
            events
                .into_iter()
                .filter(|e| {
                    // Within the batch too: each origin's seqs must increase.
                    let last = marks.entry(e.origin).or_insert(0u64);
                    let new = s.is_new_remote(e) && e.seq > *last;
                    if new {
                        *last = e.seq;
                    }
                    new
                })
                .map(Entry::Remote)
                .collect()
        });
        if fresh.is_empty() {
            return Ok(0);
        }
        let n = fresh.len();
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.store().commit_all(&fresh, true))
            .await
            .map_err(|e| Error::Other(format!("commit task failed: {e}")))??;
        Ok(n)
    }

    /// Compacts the journal when it has grown large.
    async fn compact(&self) {
        let node = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || node.store().compact_if_large()).await {
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
            // The journal has everything; the views are rebuilt on restart.
            tracing::error!(error = %e, "writing view files failed");
        }
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

/// Holds the lease stream to the coordinator open, adopting every role it
/// pushes; reopens it when it breaks (a coordinator restart).
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
                            node.adopt(Role { is_master: u.is_master, term: u.term, slave, version: (u.epoch, u.version) });
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

/// Commits queued posts in groups, in arrival order.
async fn post_loop(node: Node, mut queued: mpsc::UnboundedReceiver<PostRequest>, shutdown: CancellationToken) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = queued.recv() => match r { Some(r) => r, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < POST_BATCH {
            match queued.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        node.write_posts(batch).await;
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

/// As master, brings each new slave up to date as soon as it appears.
async fn slave_sync_loop(node: Node, shutdown: CancellationToken) {
    let mut role = node.watch_role();
    loop {
        let current = role.borrow_and_update().clone();
        if current.is_master && current.slave.is_some() {
            node.sync_new_slave().await;
        } else {
            // The slave left (or we are no longer master): whoever comes
            // next, even at the same address, starts from a snapshot.
            *lock(&node.0.synced_slave) = None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = role.changed() => if changed.is_err() { return },
        }
    }
}

/// Serves a server node on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: ServerConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let port = net::local_port(&listener)?;
    let (node, queued) = Node::open(cfg, port)?;
    tracing::info!(cluster = node.cfg().cluster, id = node.cfg().id, port, dir = %node.cfg().data_dir.display(), "server listening");
    let tasks = [
        tokio::spawn(heartbeat_loop(node.clone(), shutdown.clone())),
        tokio::spawn(lease_loop(node.clone(), shutdown.clone())),
        tokio::spawn(slave_sync_loop(node.clone(), shutdown.clone())),
        tokio::spawn(flush_loop(node.clone(), shutdown.clone())),
        tokio::spawn(post_loop(node.clone(), queued, shutdown.clone())),
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
