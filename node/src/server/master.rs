//! A master's write path: decide under the write lane, journal here,
//! replicate, then commit (apply to memory, publish, acknowledge).
//!
//! Replication rule: the coordinator records which servers hold every
//! acknowledged write (the *in-sync set*). A write is acknowledged once
//! every member of the set has it; a member that does not answer, or
//! answers that it cannot write, is first recorded out of sync by the
//! coordinator (on its disk) — only then does the master carry on without
//! it. A slave outside the set still gets every write while it keeps up,
//! and is brought back (a snapshot of the committed state, then added to
//! the set) as soon as it can be.
//!
//! Every failure has one outcome for the client and one for the journal:
//! - the master's own journal write fails: it is cut back (nothing of it
//!   stays here), the master stops taking writes and tells the coordinator;
//!   the client hears the write was not made ([`Error::NotMade`]) or, when
//!   the slave may hold it (it is forwarded while the master journals),
//!   that the outcome is unknown ([`Error::OutcomeUnknown`]);
//! - the slave knows a newer term, or the coordinator says this server is
//!   no longer master ([`Error::StaleTerm`]): the write stays in this
//!   server's journal but was never acknowledged (a snapshot from the new
//!   master replaces it); the client hears it was not acknowledged
//!   ([`Error::Replaced`]);
//! - the coordinator cannot be reached before the lease runs out: the
//!   outcome is unknown (the slave may have it); the client retries with
//!   the same request id and gets the first outcome
//!   ([`Error::OutcomeUnknown`]).

use super::{Node, Role, SlaveAddr, lock};
use crate::error::{Error, Result};
use crate::net;
use crate::store::codec;
use crate::store::state::Entry;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{
    InSyncMember, InSyncRequest, ReplicateRequest, ServerStatus, StatusRequest, SwitchoverRequest,
};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

/// Pause between two attempts to reach the coordinator about a write.
const COORD_RETRY: Duration = Duration::from_millis(50);
/// Backoff of the background catch-up of a slave that failed it.
const RESYNC_MIN: Duration = Duration::from_millis(200);
const RESYNC_MAX: Duration = Duration::from_secs(5);
/// A snapshot travels at least this fast on the networks we run on; its
/// install may take this long per byte on top of the forward patience.
const SNAPSHOT_BYTES_PER_SEC: u64 = 50 << 20;

/// The slave this master brought up to date under its current term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedSlave {
    pub id: u32,
    pub addr: SlaveAddr,
    pub incarnation: u64,
    pub term: u64,
}

impl Node {
    /// How long a master waits for its slave's answer before it counts the
    /// slave out: within one heartbeat period (and at most a second).
    pub(super) fn patience(&self) -> Duration {
        self.cfg().heartbeat.min(Duration::from_secs(1))
    }

    /// A master restarted within its term first checks its journal against
    /// its in-sync peers ([`Node::verify_peers`]). A master promoted by an
    /// operator accepting data loss makes what its journal holds its state
    /// (keeping a damaged file aside) and numbers its events above any the
    /// cluster may have published. Called with the write lane held; does
    /// nothing otherwise.
    pub(super) async fn prepare_role(&self, role: &Role) -> Result<()> {
        if self.unverified() {
            self.verify_peers(role).await?;
        } else if role.is_master && self.tail_cut().is_some() {
            // Promoted: the coordinator found no in-sync server that could
            // hold more than this one.
            self.settle_tail().await?;
        }
        if !self.needs_prepare(role) {
            return Ok(());
        }
        let mut snapshot = self.read(|s| s.snapshot());
        snapshot.next_seq = snapshot.next_seq.max(role.seq_floor);
        // What this server lacks may include events the lost master had
        // numbered for other clusters and published (whatever seq the
        // coordinator heard of: its last heartbeat may predate them):
        // numbered again, this server's next events would look like copies
        // of those there and be ignored. The override's term becomes the
        // stream epoch, above any an earlier override set; every stream
        // starts anew at 1, and receivers move to it.
        if snapshot.epoch < role.term {
            snapshot.epoch = role.term;
            snapshot.sent.clear();
        }
        let lost = self.damage();
        self.install_state(snapshot).await?;
        if let Some(why) = lost {
            tracing::warn!(damage = %why, "accepted the loss of what followed the damage");
        }
        tracing::warn!(
            next_seq = self.read(|s| s.next_seq()),
            "promoted accepting data loss: serving what this server holds"
        );
        self.update_serving();
        Ok(())
    }

    /// Whether this server is master of the first term its run heard of
    /// (it restarted within its term) and has not yet compared its journal
    /// with its in-sync peers (it serves nothing until it has: see
    /// [`Node::verify_peers`]).
    pub(super) fn unverified(&self) -> bool {
        let role = self.role();
        role.is_master && role.term > 0 && self.0.unverified.load(Ordering::Relaxed) == role.term
    }

    /// Before a master restarted within its term serves, it asks its
    /// in-sync slave what it holds. The slave may hold writes of the term
    /// that this journal lacks: forwarded just before the crash and never
    /// journaled here (never acknowledged), or journaled and acknowledged,
    /// then lost by a disk that acknowledged a flush it never made (the
    /// journal cut them at start-up as a torn tail). Either way the slave
    /// must not get this server's shorter state: the master hands the
    /// cluster over to it (a switchover: the slave becomes master under a
    /// newer term, and rebuilds this server). When no in-sync peer answers,
    /// it waits for one, or for an operator's promotion accepting data
    /// loss: a journal that opened whole does not prove it lost nothing (a
    /// disk that lost its last flushes whole leaves it ending cleanly).
    /// Called with the write lane held.
    async fn verify_peers(&self, role: &Role) -> Result<()> {
        let (me, cluster, term) = (self.0.cfg.id, self.0.cfg.cluster, role.term);
        let peers: Vec<u32> = role.in_sync.iter().copied().filter(|id| *id != me).collect();
        let verified = |why: &str| {
            self.confirm();
            self.0.unverified.store(0, Ordering::Relaxed);
            tracing::info!(term, reason = why, "restarted master: journal checked against the in-sync servers");
            self.update_serving();
            Ok(())
        };
        if role.accept_data_loss || peers.is_empty() {
            // Nobody else holds the term's writes (a new cluster, or an
            // operator's override): there is nothing to compare with, and
            // nothing a cut tail lost can be found anywhere.
            self.settle_tail().await?;
            return verified("no other server holds the term's writes");
        }
        let asked = match role.slave.clone().filter(|(id, ..)| peers.contains(id)) {
            // A damaged peer cannot vouch for what it holds.
            Some((_, host, port)) => self.slave_status(&host, &port).await?.filter(|peer| peer.damage.is_empty()),
            None => None,
        };
        let refuse = |why: String| {
            *lock(&self.0.unverified_why) = why.clone();
            Err(Error::NotServing(why))
        };
        let Some(peer) = asked else {
            // A journal that opened whole proves nothing: a disk that lost
            // its last flushes whole (the file's length back at an earlier
            // one) leaves it ending cleanly after a record.
            return refuse(match self.tail_cut() {
                Some(cut) => format!(
                    "server {me} of cluster {cluster} waits for in-sync servers {peers:?}: its journal lost its end at start-up ({cut}), and only they can tell whether that held acknowledged writes"
                ),
                None => format!(
                    "server {me} of cluster {cluster} waits for in-sync servers {peers:?}: it restarted within its term, and only they can tell whether its journal lost acknowledged writes (a disk can lose its last flushes whole)"
                ),
            });
        };
        if peer.term > term {
            return refuse(format!(
                "in-sync server {} of cluster {cluster} knows term {}, newer than this master's {term}",
                peer.server_id, peer.term
            ));
        }
        let (next_seq, received) = self.read(|s| (s.next_seq(), s.received_total()));
        if peer.next_seq <= next_seq && peer.received_events <= received {
            self.settle_tail().await?;
            return verified("the in-sync slave holds nothing more");
        }
        let why = format!(
            "in-sync server {} holds more of term {term} than this server (next seq {} against {next_seq}, events of other clusters {} against {received})",
            peer.server_id, peer.next_seq, peer.received_events
        );
        tracing::warn!(to = peer.server_id, term, cut = ?self.tail_cut(), reason = %why, "restarted master: handing the cluster over to its slave");
        self.hand_over(peer.server_id);
        refuse(format!("server {me} of cluster {cluster} is handing the cluster over: {why}"))
    }

    /// Asks the coordinator to switch the cluster over to server `to`
    /// (once at a time, in its own task: the coordinator calls back for
    /// this server to step down).
    fn hand_over(&self, to: u32) {
        if self.0.handing_over.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            let req = SwitchoverRequest { cluster: node.0.cfg.cluster, to };
            match CoordAdminClient::new(node.0.coord.clone()).switchover(req).await {
                Ok(reply) => tracing::info!(to, term = reply.into_inner().term, "handed the cluster over"),
                Err(s) => tracing::warn!(to, error = %s.message(), "the handover failed; the next check tries again"),
            }
            node.0.handing_over.store(false, Ordering::Release);
        });
    }

    fn needs_prepare(&self, role: &Role) -> bool {
        role.is_master
            && role.accept_data_loss
            && (self.damage().is_some() || self.read(|s| s.next_seq() < role.seq_floor || s.epoch() < role.term))
    }

    /// Whether [`Node::prepare_role`] still has work to do for `role`.
    fn unprepared(&self, role: &Role) -> bool {
        self.needs_prepare(role) || self.unverified()
    }

    /// Journals entries here (client writes with consecutive seqs, other
    /// clusters' events) while replicating them, then applies them: Ok once
    /// they are committed. Called with the write lane held.
    ///
    /// The journal write and the forward to the slave run at the same
    /// time: a cycle costs the longer of the two, not their sum. Nothing
    /// is applied or acknowledged before both ended. When the journal
    /// write fails, the slave may hold what this server does not: it is
    /// forgotten as synced (whatever it holds is replaced by a snapshot
    /// before it takes another forward), and the client hears that the
    /// outcome is unknown (a retry with the same request id settles it).
    pub(super) async fn write_entries(&self, role: &Role, entries: Vec<Entry>, published: u64) -> Result<()> {
        let last = entries.iter().filter_map(|e| if let Entry::Local(op) = e { Some(op.seq) } else { None }).max();
        let (journaled, verdict) =
            tokio::join!(self.journal(entries.clone()), self.replicate(role, &entries, published));
        if let Err(e) = journaled {
            self.unsync();
            self.cannot_write(&e);
            return Err(match role.slave {
                Some((slave, ..)) => Error::OutcomeUnknown(format!(
                    "this server could not write its journal ({e}) while its slave {slave} may have"
                )),
                None => Error::NotMade(Box::new(e)),
            });
        }
        // The journal holds the entries whatever the verdict: memory
        // follows it.
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.store().apply(&entries))
            .await
            .map_err(|e| Error::Other(format!("apply task failed: {e}")))?;
        match verdict {
            Ok(()) => {
                // The term the entries were committed under (the role may
                // have moved on while they were: a pause, a switchover).
                let term = role.term;
                if lock(&self.0.master_terms).insert(term) {
                    // One line per term: tests check no two servers of a
                    // cluster ever log the same term.
                    tracing::info!(
                        cluster = self.0.cfg.cluster,
                        id = self.0.cfg.id,
                        term,
                        "accepting writes as master"
                    );
                }
                if let Some(last) = last {
                    self.0.stable.send_replace(last);
                }
                Ok(())
            }
            Err(unknown @ Error::OutcomeUnknown(_)) => {
                self.fence(0);
                Err(unknown)
            }
            Err(e) => Err(e),
        }
    }

    /// The slave synced under `role`'s term, if it is `role`'s slave.
    fn synced(&self, role: &Role) -> Option<SyncedSlave> {
        let (id, host, port) = role.slave.clone()?;
        lock(&self.0.synced_slave).clone().filter(|s| s.id == id && s.addr == (host, port) && s.term == role.term)
    }

    fn unsync(&self) {
        *lock(&self.0.synced_slave) = None;
    }

    /// Gets `entries` onto every in-sync server, or has the coordinator
    /// record the ones that lack them as out of sync. How it ended: Ok,
    /// every in-sync server has them (acknowledge); [`Error::Replaced`], a
    /// newer master exists (not acknowledged); [`Error::OutcomeUnknown`],
    /// the coordinator could not be reached within the lease.
    async fn replicate(&self, role: &Role, entries: &[Entry], published: u64) -> Result<()> {
        let mut role = role.clone();
        let me = self.0.cfg.id;
        let seq = entries.iter().find_map(|e| if let Entry::Local(op) = e { Some(op.seq) } else { None }).unwrap_or(0);
        let mut tried_catch_up = false;
        loop {
            let mut holders = vec![(me, self.incarnation())];
            let mut lacking = String::new();
            if let Some(slave) = role.slave.clone() {
                let slave_id = slave.0;
                let mut synced = self.synced(&role);
                if synced.is_none() && role.in_sync.contains(&slave_id) && !tried_catch_up {
                    // The slave counts for acknowledgements: bring it up
                    // to date now (once), or count it out below.
                    tried_catch_up = true;
                    match self.sync_slave(&role, slave).await {
                        Ok(s) => synced = Some(s),
                        Err(e) => lacking = format!("slave {slave_id} could not catch up: {e}"),
                    }
                }
                if let Some(s) = synced {
                    match self.forward(&role, &s, entries, published).await {
                        Ok(()) => {
                            crate::metrics::get().replication_lag_records.set(0);
                            holders.push((s.id, s.incarnation));
                        }
                        Err(Error::StaleTerm(why)) => {
                            tracing::warn!(seq, error = %why, "write refused by a newer term");
                            if let Some(r) = self.reelected(&role).await {
                                role = r;
                                continue;
                            }
                            self.fence(role.term + 1);
                            return Err(Error::Replaced(format!(
                                "server {me} was replaced as master of cluster {}",
                                self.0.cfg.cluster
                            )));
                        }
                        Err(e) => {
                            self.unsync();
                            lacking = e.to_string();
                        }
                    }
                }
            }
            if holders.len() == 1 && !entries.is_empty() {
                // Journaled here only: the slave lacks these until a catch-up.
                crate::metrics::get().replication_lag_records.inc_by(entries.len() as i64);
            }
            let missing: Vec<u32> =
                role.in_sync.iter().copied().filter(|id| !holders.iter().any(|(h, _)| h == id)).collect();
            if missing.is_empty() {
                if holders.len() > 1 {
                    self.set_degraded("");
                } else if role.slave.is_none() {
                    self.set_degraded("no live slave");
                }
                // (A slave recorded out of sync keeps the reason it was.)
                return Ok(());
            }
            // Before acknowledging without them, the coordinator must know
            // they lack this write.
            let keep: Vec<(u32, u64)> =
                holders.iter().copied().filter(|(id, _)| *id == me || role.in_sync.contains(id)).collect();
            match self.record_in_sync(&role, &keep).await {
                Ok(in_sync) => {
                    role.in_sync = in_sync;
                    let why = if lacking.is_empty() { format!("servers {missing:?} are not live") } else { lacking };
                    tracing::warn!(seq, out_of_sync = ?missing, reason = %why, "servers recorded out of sync");
                    self.set_degraded(&format!("out of sync: {missing:?} ({why})"));
                    return Ok(());
                }
                Err(Error::StaleTerm(why)) => {
                    if let Some(r) = self.reelected(&role).await {
                        role = r;
                        continue;
                    }
                    self.fence(role.term + 1);
                    return Err(Error::Replaced(format!("server {me} is no longer master: {why}")));
                }
                Err(e) => {
                    if !self.lease_valid() {
                        return Err(Error::OutcomeUnknown(format!(
                            "the coordinator could not record {missing:?} out of sync before the lease ran out ({e})"
                        )));
                    }
                    tokio::time::sleep(COORD_RETRY).await;
                    // Go on with the coordinator's current view of this
                    // term: the slave may be back in it (a restarted
                    // coordinator that heard this master first), and
                    // forwarding to it beats waiting for a record that a
                    // coordinator unable to write may never make.
                    let current = self.role();
                    if current.is_master && current.term == role.term {
                        role = current;
                    }
                }
            }
        }
    }

    /// After a refusal: the coordinator may have re-elected this server
    /// under a newer term meanwhile (e.g. after its restart).
    async fn reelected(&self, role: &Role) -> Option<Role> {
        match self.heartbeat().await {
            Ok(r) if r.is_master && r.term > role.term => Some(r),
            _ => None,
        }
    }

    /// The slave at `host:port`'s `Replica.Status`; None when it does not
    /// answer within [`Node::patience`].
    async fn slave_status(&self, host: &str, port: &str) -> Result<Option<ServerStatus>> {
        let mut client = self.slave_client(host, port)?;
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(self.patience());
        Ok(match tokio::time::timeout(self.patience(), client.status(req)).await {
            Ok(Ok(reply)) => Some(reply.into_inner()),
            _ => None,
        })
    }

    /// [`Node::slave_status`], a slave that does not answer being an error.
    async fn answering_slave_status(&self, slave_id: u32, host: &str, port: &str) -> Result<ServerStatus> {
        self.slave_status(host, port)
            .await?
            .ok_or_else(|| Error::NoAnswer(format!("slave {slave_id} did not answer within {:?}", self.patience())))
    }

    fn slave_client(&self, host: &str, port: &str) -> Result<ReplicaClient<net::NodeChannel>> {
        let mut cached = lock(&self.0.slave);
        let addr = (host.to_string(), port.to_string());
        match cached.as_ref() {
            Some((a, client)) if *a == addr => Ok(client.clone()),
            _ => {
                let client =
                    ReplicaClient::new(net::node_channel_from(host, port, self.0.cfg.source_address, &self.0.attach)?);
                *cached = Some((addr, client.clone()));
                Ok(client)
            }
        }
    }

    async fn forward(&self, role: &Role, slave: &SyncedSlave, entries: &[Entry], published: u64) -> Result<()> {
        let mut req = tonic::Request::new(ReplicateRequest {
            term: role.term,
            entries: entries.iter().map(codec::entry_to_pb).collect(),
            published_upto: published,
            cluster: self.0.cfg.cluster,
            from_server: self.0.cfg.id,
            receipts: self
                .read(|s| s.receipt_marks())
                .into_iter()
                .map(|(origin, epoch, seq)| sns_proto::internal::OriginMark { origin, seq, epoch })
                .collect(),
        });
        req.set_timeout(self.patience());
        let (host, port) = &slave.addr;
        let mut client = self.slave_client(host, port)?;
        let started = Instant::now();
        tokio::time::timeout(self.patience(), client.replicate(req))
            .await
            .map_err(|_| Error::NoAnswer(format!("slave {} did not answer within {:?}", slave.id, self.patience())))?
            .map_err(|s| refused(&s, format!("slave {}: {}", slave.id, s.message())))?;
        crate::metrics::get().replication_seconds.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Installs this master's committed state on its slave, then has the
    /// coordinator add the slave to the in-sync set. Called with the write
    /// lane held, so no write slips in between. `slave` is `role`'s slave.
    async fn sync_slave(&self, role: &Role, (slave_id, host, port): (u32, String, String)) -> Result<SyncedSlave> {
        let started = Instant::now();
        // Numbered above what the slave installed from this term's master,
        // even from an earlier run of this server on a clock ahead of
        // today's. A slave that does not answer this within its patience
        // would not take the snapshot either: no state is encoded for it,
        // and a write waiting on it waits one patience, not two.
        let st = self.answering_slave_status(slave_id, &host, &port).await?;
        if st.installed_term == role.term {
            self.0.snapshots_sent.fetch_max(st.installed_sync, Ordering::SeqCst);
        }
        let (bytes, posts) = encode_state(self, codec::SnapshotFormat::readable_by(st.snapshot_format));
        let size = bytes.len();
        let sync = next_snapshot_number(&self.0.snapshots_sent, net::now_ms());
        let chunks = snapshot_chunks(&bytes, role.term, sync, self.0.cfg.cluster);
        let limit = self.patience() + Duration::from_millis(size as u64 * 1000 / SNAPSHOT_BYTES_PER_SEC);
        let mut client = self.slave_client(&host, &port)?;
        let mut req = tonic::Request::new(tokio_stream::iter(chunks));
        req.set_timeout(limit);
        let reply = tokio::time::timeout(limit, client.install_snapshot(req))
            .await
            .map_err(|_| Error::NoAnswer(format!("slave {slave_id} did not install the snapshot within {limit:?}")))?
            .map_err(|s| refused(&s, format!("slave {slave_id}: {}", s.message())))?
            .into_inner();
        let synced = SyncedSlave { id: slave_id, addr: (host, port), incarnation: reply.incarnation, term: role.term };
        *lock(&self.0.synced_slave) = Some(synced.clone());
        crate::metrics::get().replication_lag_records.set(0);
        tracing::info!(
            slave = slave_id,
            term = role.term,
            bytes = size,
            posts,
            ms = started.elapsed().as_millis() as u64,
            "slave caught up"
        );
        if !role.in_sync.contains(&slave_id) {
            let mut members: Vec<(u32, u64)> = role.in_sync.iter().map(|id| (*id, 0)).collect();
            members.retain(|(id, _)| *id != self.0.cfg.id);
            members.push((self.0.cfg.id, self.incarnation()));
            members.push((slave_id, reply.incarnation));
            match self.record_in_sync(role, &members).await {
                Ok(_) => tracing::info!(slave = slave_id, term = role.term, "slave recorded in sync"),
                // It holds every write all the same; the next catch-up
                // round records it.
                Err(e) => tracing::warn!(slave = slave_id, error = %e, "could not record the slave in sync"),
            }
        }
        Ok(synced)
    }

    /// Asks the coordinator to record `members` ((id, incarnation; 0 = as
    /// recorded)) as the in-sync set; returns the set it recorded.
    async fn record_in_sync(&self, role: &Role, members: &[(u32, u64)]) -> Result<Vec<u32>> {
        let mut req = tonic::Request::new(InSyncRequest {
            cluster: self.0.cfg.cluster,
            term: role.term,
            master: self.0.cfg.id,
            members: members
                .iter()
                .map(|(id, incarnation)| InSyncMember { id: *id, incarnation: *incarnation })
                .collect(),
        });
        req.set_timeout(net::CALL_TIMEOUT);
        let reply = CoordAdminClient::new(self.0.coord.clone())
            .set_in_sync(req)
            .await
            .map_err(|s| refused(&s, s.message().to_string()))?
            .into_inner();
        let in_sync = reply.in_sync;
        // A slave recorded out of sync may lack acknowledged writes from now
        // on: it is never recorded back without a fresh snapshot, whatever
        // role updates this master may have missed meanwhile.
        let dropped = lock(&self.0.synced_slave).as_ref().is_some_and(|s| !in_sync.contains(&s.id));
        if dropped {
            self.unsync();
        }
        self.0.role.send_if_modified(|r| {
            let same_term = r.term == role.term && r.is_master;
            if same_term && r.in_sync != in_sync {
                r.in_sync = in_sync.clone();
            }
            same_term
        });
        Ok(in_sync)
    }

    /// Whether the slave of `role` still needs a catch-up or a record. A
    /// slave this master synced is asked whether it still is: it may have
    /// restarted at the same address (and lost its place), or found its
    /// journal damaged.
    async fn slave_behind(&self, role: &Role) -> bool {
        if !role.is_master {
            return false;
        }
        if self.unprepared(role) {
            return true;
        }
        let Some((id, host, port)) = role.slave.clone() else { return false };
        if self.synced(role).is_none() || !role.in_sync.contains(&id) {
            return true;
        }
        match self.slave_status(&host, &port).await.ok().flatten() {
            Some(s) if s.synced_term == role.term && s.damage.is_empty() => false,
            Some(_) => {
                self.unsync();
                true
            }
            // Not answering: writes find out (and drop it) when they come.
            None => false,
        }
    }

    /// As master with no live slave: has the coordinator record the gone
    /// in-sync servers out of sync now, not at the next write. A slave
    /// that died long ago, or that a scale-down removed, would otherwise
    /// still count as holding every write, and a restart of this master
    /// within its term would wait for it ([`Node::verify_peers`]). A master
    /// that is itself unverified, or off its lease, leaves them be.
    async fn drop_gone_peers(&self) -> Result<()> {
        let _lane = self.0.lane.lock().await;
        let role = self.role();
        let me = self.0.cfg.id;
        if !role.is_master
            || role.slave.is_some()
            || self.unprepared(&role)
            || !self.lease_valid()
            || role.in_sync.iter().all(|id| *id == me)
        {
            return Ok(());
        }
        self.replicate(&role, &[], 0).await
    }

    /// As master: brings the slave up to date (and into the in-sync set)
    /// outside of any write.
    async fn catch_up_slave(&self) -> Result<()> {
        // A slave that does not answer (cut off from this master, while it
        // still reaches the coordinator) would hold the write lane for a
        // patience on every retry, and every write behind it: ask first,
        // outside the lane.
        let role = self.role();
        if let Some((slave_id, host, port)) =
            role.slave.clone().filter(|_| !self.unprepared(&role) && self.synced(&role).is_none())
        {
            self.answering_slave_status(slave_id, &host, &port).await?;
        }
        let _lane = self.0.lane.lock().await;
        let role = self.role();
        if !role.is_master {
            return Ok(());
        }
        self.prepare_role(&role).await?;
        let Some(slave) = role.slave.clone() else { return Ok(()) };
        let slave_id = slave.0;
        if self.synced(&role).is_none() {
            self.sync_slave(&role, slave).await?;
            return Ok(());
        }
        if !role.in_sync.contains(&slave_id)
            && let Some(s) = self.synced(&role)
        {
            let mut members: Vec<(u32, u64)> =
                role.in_sync.iter().filter(|id| **id != self.0.cfg.id).map(|id| (*id, 0)).collect();
            members.push((self.0.cfg.id, self.incarnation()));
            members.push((s.id, s.incarnation));
            if let Err(e) = self.record_in_sync(&role, &members).await {
                // Refused (e.g. it turned out damaged): start it over.
                self.unsync();
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The pause before the next attempt to bring the slave up to date (or to
/// have a gone one recorded out of sync): from [`RESYNC_MIN`], doubling up
/// to [`RESYNC_MAX`] while attempts fail; back to the shortest once one
/// succeeds, or when the slave changes: a new one, or the same one back
/// after it was gone, is not made to wait out the pauses earned while it
/// was away.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    /// The slave the pauses were earned with.
    slave: Option<(u32, String, String)>,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: RESYNC_MIN, slave: None }
    }

    /// Notes the role's slave: a different one (or none) starts over.
    fn slave(&mut self, slave: &Option<(u32, String, String)>) {
        if *slave != self.slave {
            self.next = RESYNC_MIN;
            self.slave = slave.clone();
        }
    }

    /// An attempt failed: the pause before the next (twice as long the
    /// time after).
    fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(RESYNC_MAX);
        pause
    }

    fn succeeded(&mut self) {
        self.next = RESYNC_MIN;
    }
}

/// As master, brings each slave up to date as soon as it appears, and
/// again (with backoff) while it cannot be; as a slave, forgets any synced
/// slave (whoever comes next starts from a snapshot).
pub(super) async fn slave_sync_loop(node: Node, shutdown: CancellationToken) {
    let mut role = node.watch_role();
    let mut backoff = Backoff::new();
    // Since when this master has had no live slave.
    let mut alone_since: Option<Instant> = None;
    loop {
        let current = role.borrow_and_update().clone();
        backoff.slave(&current.slave);
        let mut retry = None;
        if current.is_master && current.slave.is_none() {
            // Whoever comes next, even at the same address, starts over.
            node.unsync();
            let since = *alone_since.get_or_insert_with(Instant::now);
            let grace = gone_grace(node.cfg().heartbeat);
            match grace.checked_sub(since.elapsed()) {
                Some(left) if !left.is_zero() => retry = Some(left),
                _ => {
                    if let Err(e) = node.drop_gone_peers().await {
                        let pause = backoff.failed();
                        tracing::warn!(error = %e, retry_in = ?pause, "could not record the gone slave out of sync");
                        retry = Some(pause);
                    }
                }
            }
        } else {
            alone_since = None;
        }
        if node.slave_behind(&current).await {
            match node.catch_up_slave().await {
                Ok(()) if node.slave_behind(&node.role()).await => retry = Some(backoff.failed()),
                Ok(()) => backoff.succeeded(),
                Err(e) => {
                    let pause = backoff.failed();
                    tracing::warn!(error = %e, retry_in = ?pause, "could not bring the slave up to date");
                    retry = Some(pause);
                }
            }
        } else if !current.is_master {
            node.unsync();
            backoff.succeeded();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = role.changed() => if changed.is_err() { return },
            _ = async {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// How long a master waits, with no live slave and no write, before it
/// has the gone in-sync slave recorded out of sync
/// ([`Node::drop_gone_peers`]). Not at once: when slave and master go down
/// together (a power loss), the slave must stay in sync, since it may hold
/// acknowledged writes the master's disk lost, and a damaged master needs
/// it to take over. Not never: a slave gone for good (a scale-down, a lost
/// machine) would otherwise make every later restart of the master within
/// its term wait for it. Ten heartbeats, at least 10 s.
fn gone_grace(heartbeat: Duration) -> Duration {
    (heartbeat * 10).max(Duration::from_secs(10))
}

/// Reads a peer's failed answer (`message` says which peer where it
/// matters): FAILED_PRECONDITION is a newer term speaking — the slave knows
/// one, or the coordinator no longer counts this server as master under
/// its term; any other answer is kept as it came.
fn refused(status: &Status, message: String) -> Error {
    match status.code() {
        Code::FailedPrecondition => Error::StaleTerm(message),
        code => Error::Peer { code, message },
    }
}

/// The number of this master's next snapshot. A slave refuses one older
/// than the last it installed under the same term (see `slave.rs`), and a
/// master restarted in its term (nobody could replace it) must not fall
/// under its previous run's: numbers follow the wall clock (ms x 1000) and
/// always grow within a run, and a master first raises `sent` to the number
/// its slave reports installed under the same term (the clock may have
/// stepped back across the restart).
fn next_snapshot_number(sent: &std::sync::atomic::AtomicU64, now_ms: i64) -> u64 {
    use std::sync::atomic::Ordering::SeqCst;
    let floor = u64::try_from(now_ms).unwrap_or(0).saturating_mul(1000);
    let next = |prev: u64| prev.saturating_add(1).max(floor);
    let prev = sent.fetch_update(SeqCst, SeqCst, |p| Some(next(p))).unwrap_or_else(|p| p);
    next(prev)
}

/// A snapshot as the chunks `Replica.InstallSnapshot` takes.
fn snapshot_chunks(bytes: &[u8], term: u64, sync: u64, cluster: u32) -> Vec<sns_proto::internal::SnapshotChunk> {
    use sns_proto::internal::SnapshotChunk;
    /// Well under gRPC's 4 MiB default message limit.
    const CHUNK: usize = 1 << 20;
    let chunks: Vec<SnapshotChunk> =
        bytes.chunks(CHUNK).map(|c| SnapshotChunk { term, cluster, sync, data: c.to_vec() }).collect();
    if chunks.is_empty() { vec![SnapshotChunk { term, cluster, sync, data: Vec::new() }] } else { chunks }
}

/// Encodes the committed state for a slave that reads `format`.
fn encode_state(node: &Node, format: codec::SnapshotFormat) -> (Vec<u8>, u64) {
    let store = node.store();
    (codec::encode_snapshot(&store.state().snapshot(), node.cfg().cluster, format), store.state().post_count())
}

#[cfg(test)]
mod tests {
    use super::{Backoff, RESYNC_MAX, RESYNC_MIN, next_snapshot_number};
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    #[test]
    fn snapshot_numbers_grow_within_a_run_and_across_restarts() {
        let run = AtomicU64::new(0);
        let a = next_snapshot_number(&run, 1_000);
        let b = next_snapshot_number(&run, 1_000);
        let c = next_snapshot_number(&run, 900);
        assert_eq!(a, 1_000_000);
        assert!(b > a && c > b, "grows within a run, even if the clock steps back: {a} {b} {c}");
        // A restart 1 ms later numbers above every one of the first run.
        let restarted = AtomicU64::new(0);
        assert!(next_snapshot_number(&restarted, 1_001) > c);
    }

    #[test]
    fn the_catch_up_backoff_doubles_while_failing_and_starts_over_for_a_returning_slave() {
        let slave = Some((2, "127.0.0.1".to_string(), "10001".to_string()));
        let mut b = Backoff::new();
        b.slave(&slave);
        let pauses: Vec<Duration> = (0..7).map(|_| b.failed()).collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(pauses, [ms(200), ms(400), ms(800), ms(1600), ms(3200), ms(5000), ms(5000)]);
        // The same slave, still there: the pauses it earned stand.
        b.slave(&slave);
        assert_eq!(b.failed(), RESYNC_MAX);
        // It is gone (attempts to record that may fail and back off too) ...
        b.slave(&None);
        assert_eq!(b.failed(), RESYNC_MIN);
        b.failed();
        b.failed();
        // ... and back at the same address: it starts from the shortest.
        b.slave(&slave);
        assert_eq!(b.failed(), RESYNC_MIN);
        // Another server as slave starts over too; a success resets.
        b.failed();
        b.slave(&Some((3, "127.0.0.1".to_string(), "10002".to_string())));
        assert_eq!(b.failed(), RESYNC_MIN);
        b.failed();
        b.succeeded();
        assert_eq!(b.failed(), RESYNC_MIN);
    }
}
