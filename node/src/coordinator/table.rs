//! The coordinator's routing table and the rules that decide roles.
//!
//! Pure: time comes in as an `Instant` argument and nothing here touches a
//! disk, so the rules are tested without a clock. Two kinds of knowledge:
//!
//! - **Liveness** (in memory): every server and synchronizer's address,
//!   last heartbeat, and what it says of itself (incarnation, damaged,
//!   unwritable, journal position). A node is alive while its last
//!   heartbeat is younger than the timeout (heartbeat period × missed
//!   heartbeats).
//! - **Records** (durable, one [`Record`] per cluster, kept on disk by the
//!   coordinator before anything acts on them): the term, its master, and
//!   the servers that hold every acknowledged write (*in sync*).
//!
//! Rules:
//! - a cluster's first server becomes master under term 1, in sync alone;
//! - a master's slave is added to the in-sync set by the master once it
//!   installed the master's state, and dropped by the master before the
//!   master acknowledges a write the slave lacks ([`Table::set_in_sync`]);
//! - when the master dies (or says it cannot write), the earliest
//!   registered live in-sync server takes over under a new term, but only
//!   once the old master's lease ran out, so two masters never serve at
//!   once; a server that is not in sync is **never** promoted by itself:
//!   the cluster stays without a master until an in-sync server is back,
//!   or an operator promotes one accepting the loss ([`Table::promote`]);
//! - a server whose journal is damaged, or whose disk was replaced (new
//!   incarnation), is dropped from the in-sync set;
//! - a synchronizer is master exactly when its paired server is;
//! - a planned switchover ([`Table::begin_switchover`]) hands the role to
//!   a live in-sync server: the master's lease is no longer renewed, and
//!   the target is promoted as soon as the master says it stepped down
//!   (or its lease ran out); if the target stops being a candidate first,
//!   the switchover is abandoned and the master keeps its role.
//!
//! Decisions that change a record are proposed by [`Table::decide`] (and
//! the two requests above), written to disk by the coordinator, and only
//! then installed with [`Table::install`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Server,
    Synchronizer,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "server" => Some(Kind::Server),
            "synchronizer" => Some(Kind::Synchronizer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Synchronizer => "synchronizer",
        }
    }
}

/// What a node says about itself in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Beat {
    pub kind: Option<Kind>,
    pub cluster: u32,
    pub id: u32,
    pub host: String,
    pub port: String,
    /// Synchronizers: the server they work beside.
    pub paired_server: u32,
    /// The node believes it is master, under this term.
    pub claims_master: bool,
    pub term: u64,
    /// Servers: their journal's incarnation (0 = unknown).
    pub incarnation: u64,
    pub damaged: bool,
    pub unwritable: bool,
    /// Servers: the journal's end was cut at start-up and is not settled.
    pub tail_cut: bool,
    /// Servers: restarted, and not yet synced by a master or checked
    /// against an in-sync peer since.
    pub unconfirmed: bool,
    pub next_seq: u64,
    /// Servers: events of other clusters taken in.
    pub remote_events: u64,
    /// Synchronizers: why their link is down ("" while it is up).
    pub link_down: String,
    /// Servers: why the server, named master, serves nothing yet.
    pub waits: String,
    /// Servers: the newest coordinator epoch whose answer the node adopted
    /// (0: none).
    pub adopted_epoch: u64,
}

impl Beat {
    fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::Server)
    }
}

/// A cluster's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub term: u64,
    /// The master of `term` (None before the first election).
    pub master: Option<u32>,
    /// Servers holding every acknowledged write: id -> incarnation.
    pub in_sync: BTreeMap<u32, u64>,
    /// Local events of this cluster are numbered at least this high by a
    /// master promoted by override (the highest journal position a master
    /// reported).
    pub seq_floor: u64,
    /// The server an operator promoted accepting data loss, in this term.
    pub override_server: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub kind: Kind,
    pub cluster: u32,
    pub id: u32,
    pub host: String,
    pub port: String,
    pub paired_server: u32,
    pub alive: bool,
    pub is_master: bool,
    pub term: u64,
    pub last_seen: Duration,
    pub in_sync: bool,
    pub incarnation: u64,
    pub damaged: bool,
    pub unwritable: bool,
    pub link_down: String,
    /// A live server named master that serves nothing yet: why.
    pub waits: String,
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Assignment {
    pub is_master: bool,
    pub term: u64,
    /// This coordinator run's epoch and the table version this answer
    /// reflects: newer answers carry larger (epoch, version) pairs, so a
    /// node can ignore one that arrives late.
    pub epoch: u64,
    pub version: u64,
    /// For a master server: the cluster's live slave (id, host, port).
    pub slave: Option<(u32, String, String)>,
    /// For a master server: the in-sync set.
    pub in_sync: Vec<u32>,
    pub seq_floor: u64,
    /// The master was promoted by an operator accepting data loss.
    pub accept_data_loss: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    host: String,
    port: String,
    paired_server: u32,
    last_seen: Instant,
    /// Registration order; reset when a dead node comes back.
    order: u64,
    term: u64,
    claims_master: bool,
    incarnation: u64,
    damaged: bool,
    unwritable: bool,
    tail_cut: bool,
    unconfirmed: bool,
    next_seq: u64,
    remote_events: u64,
    link_down: String,
    waits: String,
}

/// A planned switchover under way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Handover {
    from: u32,
    to: u32,
    /// The term `from` is master of.
    term: u64,
    /// `from` answered that it stopped acting as master.
    stepped_down: bool,
}

/// Where a switchover stands, for the caller waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwitchoverOutcome {
    Pending,
    /// The target is master under this term.
    Done(u64),
    /// It was abandoned, and why.
    Abandoned(String),
}

/// A switchover just begun: who hands over to whom, under which term, and
/// the table version the master's step-down carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    pub from: u32,
    pub to: u32,
    pub term: u64,
    pub epoch: u64,
    pub version: u64,
}

/// A record change proposed by [`Table::decide`], with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub cluster: u32,
    pub record: Record,
    pub why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// A new master (first election, failover, or an adopted claim).
    Promotion { old: Option<u32>, new: u32 },
    /// Servers dropped from the in-sync set: damaged, or a new incarnation.
    Dropped(Vec<u32>),
}

/// Why a request about a record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The asker is not the recorded master under its term: a newer term
    /// (or another master) exists.
    #[error("{0}")]
    NotMaster(String),
    /// The asker is the recorded master of its term, but this coordinator
    /// does not count it as serving right now (it has not heard from it
    /// since it restarted, a change of master is being written, a
    /// switchover is under way): ask again, nothing newer exists yet.
    #[error("{0}")]
    NotNow(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsafe(String),
}

/// What [`Table::decide`] proposes.
#[derive(Debug, Default)]
pub struct Decisions {
    pub changes: Vec<Change>,
    /// When something may change by itself (a lease running out).
    pub wake_at: Option<Instant>,
}

#[derive(Debug)]
pub struct Table {
    /// When this coordinator started: leases granted before a restart are
    /// unknown, so no one is promoted before one lease has passed, and a
    /// recorded master gets one timeout to come back.
    started: Instant,
    timeout: Duration,
    lease: Duration,
    clusters: u32,
    nodes: BTreeMap<(Kind, u32, u32), Entry>,
    records: BTreeMap<u32, Record>,
    /// Per cluster: the master granted the latest lease, and until when.
    leases: BTreeMap<u32, (u32, Instant)>,
    /// Clusters whose master is changing: no lease is granted there until
    /// the change is on disk and installed.
    changing: BTreeSet<u32>,
    /// Why each cluster without a master has none (for logs and clients).
    unavailable: BTreeMap<u32, String>,
    /// A records write that has not finished (a hung disk): no cluster's
    /// role changes until it does, whichever cluster it is for.
    stalled: Option<String>,
    /// Planned switchovers under way, by cluster.
    handovers: BTreeMap<u32, Handover>,
    /// Why the last switchover of a cluster was abandoned.
    abandoned: BTreeMap<u32, String>,
    /// The last switchover of a cluster that promoted its target, and the
    /// term it did so under: its caller hears it was done even if another
    /// change (a failover of the target) followed before it looked.
    handed_over: BTreeMap<u32, (Handover, u64)>,
    next_order: u64,
    /// This coordinator run's epoch: it orders this run's answers after
    /// every earlier run's. Raised above any epoch a node reports having
    /// adopted (see [`Table::heartbeat`]) when `raise_epoch` is set.
    epoch: u64,
    /// Whether nodes' adopted epochs raise this run's: so for a lone
    /// coordinator, whose previous runs are gone. Not for replicated
    /// coordinators: there a newer epoch is a newer leader's, still alive
    /// perhaps, and a deposed one must stay ordered before it.
    raise_epoch: bool,
    /// Bumped on every registration, role change and death.
    version: u64,
}

impl Table {
    pub fn new(clusters: u32, timeout: Duration, lease: Duration) -> Table {
        Table::starting_at(Instant::now(), clusters, timeout, lease)
    }

    pub fn starting_at(started: Instant, clusters: u32, timeout: Duration, lease: Duration) -> Table {
        Table {
            started,
            timeout,
            lease,
            clusters,
            nodes: BTreeMap::new(),
            records: BTreeMap::new(),
            leases: BTreeMap::new(),
            changing: BTreeSet::new(),
            unavailable: BTreeMap::new(),
            stalled: None,
            handovers: BTreeMap::new(),
            abandoned: BTreeMap::new(),
            handed_over: BTreeMap::new(),
            next_order: 0,
            epoch: 0,
            raise_epoch: true,
            version: 0,
        }
    }

    /// Sets this run's epoch (at start-up), and whether nodes' adopted
    /// epochs raise it.
    pub fn set_epoch(&mut self, epoch: u64, raise: bool) {
        self.epoch = epoch;
        self.raise_epoch = raise;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Loads the records read from disk (at start-up).
    pub fn load(&mut self, records: BTreeMap<u32, Record>) {
        self.records = records;
    }

    pub fn records(&self) -> &BTreeMap<u32, Record> {
        &self.records
    }

    pub fn clusters(&self) -> u32 {
        self.clusters
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn alive(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) < self.timeout
    }

    fn server(&self, cluster: u32, id: u32) -> Option<&Entry> {
        self.nodes.get(&(Kind::Server, cluster, id))
    }

    fn server_alive(&self, cluster: u32, id: u32, now: Instant) -> bool {
        self.server(cluster, id).is_some_and(|e| self.alive(e, now))
    }

    /// Whether the live server `id` is recorded in sync under its current
    /// incarnation.
    fn in_sync(&self, cluster: u32, id: u32) -> bool {
        let recorded = self.records.get(&cluster).and_then(|r| r.in_sync.get(&id));
        matches!((recorded, self.server(cluster, id)), (Some(inc), Some(e)) if *inc == e.incarnation)
    }

    /// Whether server `id` may be promoted by the rules: alive, in sync,
    /// able to write, journal intact; and if its journal lost its end at
    /// start-up, or it restarted and nobody has confirmed its journal since
    /// (a disk that lost its last flushes whole leaves a journal that opens
    /// whole), only where no other in-sync server could hold more.
    fn candidate(&self, cluster: u32, id: u32, now: Instant) -> bool {
        self.server(cluster, id).is_some_and(|e| {
            self.alive(e, now)
                && !e.damaged
                && !e.unwritable
                && (!(e.tail_cut || e.unconfirmed) || self.holds_most(cluster, id, now))
        }) && self.in_sync(cluster, id)
    }

    /// Whether in-sync server `id`, whose journal lost its end at start-up
    /// or is unconfirmed since it restarted, holds every acknowledged
    /// write all the same: every other in-sync
    /// server of `cluster` is live, can read its journal, and reports no
    /// later position: neither a later sequence number nor more events of
    /// other clusters taken in. One that is not live may hold what it lost.
    fn holds_most(&self, cluster: u32, id: u32, now: Instant) -> bool {
        let (Some(record), Some(me)) = (self.records.get(&cluster), self.server(cluster, id)) else { return false };
        record.in_sync.keys().filter(|other| **other != id).all(|other| {
            self.server(cluster, *other).is_some_and(|p| {
                self.alive(p, now) && !p.damaged && p.next_seq <= me.next_seq && p.remote_events <= me.remote_events
            })
        })
    }

    /// Whether server `id` is the master of its cluster right now.
    fn is_master(&self, cluster: u32, id: u32, now: Instant) -> bool {
        let Some(r) = self.records.get(&cluster) else { return false };
        if r.master != Some(id) || self.changing.contains(&cluster) {
            return false;
        }
        // A master handing over is renewed no more.
        if self.handovers.get(&cluster).is_some_and(|h| h.from == id) {
            return false;
        }
        let Some(e) = self.server(cluster, id) else { return false };
        // A damaged journal serves only when an operator accepted its loss;
        // a server that moved past the recorded term gave up serving it.
        self.alive(e, now)
            && e.term <= r.term
            && !e.unwritable
            && (!e.damaged || r.override_server == Some(id))
            && self.in_sync(cluster, id)
    }

    /// Records a heartbeat and returns the node's role, and whether the
    /// node (re)registered (or the epoch was raised). A master's heartbeat
    /// renews its lease.
    ///
    /// A node that adopted an answer of a newer epoch than this run's (an
    /// earlier run that could not write its epoch down, on a disk that was
    /// full, and this run started on a clock behind it) would ignore every
    /// answer of this run: no lease renewed, no role taken. The epoch is
    /// raised above the one it reports, so this very answer is taken.
    pub fn heartbeat(&mut self, now: Instant, beat: &Beat) -> (Assignment, bool) {
        let raised = self.raise_epoch && beat.adopted_epoch > self.epoch;
        if raised {
            // (Answers carry epochs as int64: stay within it.)
            self.epoch = beat.adopted_epoch.saturating_add(1).min(i64::MAX as u64);
        }
        let kind = beat.kind();
        let key = (kind, beat.cluster, beat.id);
        let previous = self.nodes.get(&key).cloned();
        let was_alive = previous.as_ref().is_some_and(|e| self.alive(e, now));
        let order = match &previous {
            Some(e) if was_alive => e.order,
            _ => {
                self.next_order += 1;
                self.next_order
            }
        };
        let entry = Entry {
            host: beat.host.clone(),
            port: beat.port.clone(),
            paired_server: beat.paired_server,
            last_seen: now,
            order,
            term: beat.term,
            claims_master: beat.claims_master,
            incarnation: beat.incarnation,
            damaged: beat.damaged,
            unwritable: beat.unwritable,
            tail_cut: beat.tail_cut,
            unconfirmed: beat.unconfirmed,
            next_seq: beat.next_seq,
            remote_events: beat.remote_events,
            link_down: beat.link_down.clone(),
            waits: beat.waits.clone(),
        };
        // A change in what a server says of itself can change roles.
        let changed = previous.as_ref().is_none_or(|p| {
            p.incarnation != entry.incarnation
                || p.damaged != entry.damaged
                || p.unwritable != entry.unwritable
                || p.tail_cut != entry.tail_cut
                || p.unconfirmed != entry.unconfirmed
        });
        self.nodes.insert(key, entry);
        if !was_alive || changed {
            self.version += 1;
        }
        let a = self.assignment(now, kind, beat.cluster, beat.id);
        if kind == Kind::Server && a.is_master {
            self.leases.insert(beat.cluster, (beat.id, now + self.lease));
        }
        (a, !was_alive || changed || raised)
    }

    /// Declares a node dead now (its lease stream dropped and a probe
    /// failed).
    pub fn mark_dead(&mut self, now: Instant, kind: Kind, cluster: u32, id: u32) {
        let timeout = self.timeout;
        if let Some(e) = self.nodes.get_mut(&(kind, cluster, id)) {
            e.last_seen = now.checked_sub(timeout).unwrap_or(e.last_seen.min(now));
        }
        self.version += 1;
    }

    /// Until when the master of `cluster` may still be serving on a lease.
    fn lease_until(&self, cluster: u32, master: u32) -> Instant {
        // Leases granted by a previous run of the coordinator are unknown:
        // assume one was granted just before it started.
        let before_restart = self.started + self.lease;
        match self.leases.get(&cluster) {
            Some((m, until)) if *m == master => (*until).max(before_restart),
            _ => before_restart,
        }
    }

    /// The record changes the rules call for now, and when to look again.
    /// A proposed change of master blocks lease grants in its cluster until
    /// [`Table::install`] or [`Table::abandon`].
    pub fn decide(&mut self, now: Instant) -> Decisions {
        let mut out = Decisions::default();
        let clusters: BTreeSet<u32> =
            self.nodes.keys().filter(|(k, _, _)| *k == Kind::Server).map(|(_, c, _)| *c).collect();
        for cluster in clusters {
            if self.changing.contains(&cluster) {
                continue;
            }
            let change = match self.records.get(&cluster) {
                None => self.first_election(now, cluster, &mut out.wake_at),
                Some(_) => self.drop_lost(now, cluster).or_else(|| self.failover(now, cluster, &mut out.wake_at)),
            };
            if let Some(change) = change {
                if matches!(change.why, Why::Promotion { .. }) {
                    self.changing.insert(cluster);
                }
                out.changes.push(change);
            }
        }
        out
    }

    /// A cluster this coordinator has no record of.
    fn first_election(&mut self, now: Instant, cluster: u32, wake: &mut Option<Instant>) -> Option<Change> {
        let live: Vec<(u32, Entry)> = self
            .nodes
            .iter()
            .filter(|((k, c, _), e)| *k == Kind::Server && *c == cluster && self.alive(e, now))
            .map(|((_, _, id), e)| (*id, e.clone()))
            .collect();
        // A server that outlived a coordinator which lost its records (or
        // predates them) and still holds the role keeps it.
        if let Some((id, e)) = live
            .iter()
            .filter(|(_, e)| e.claims_master && e.term > 0 && !e.damaged && !e.unwritable)
            .max_by_key(|(_, e)| e.term)
        {
            let record = Record {
                term: e.term,
                master: Some(*id),
                in_sync: BTreeMap::from([(*id, e.incarnation)]),
                ..Record::default()
            };
            return Some(Change { cluster, record, why: Why::Promotion { old: None, new: *id } });
        }
        let history = live.iter().find(|(_, e)| e.next_seq > 1 || e.term > 0 || e.damaged);
        if let Some((id, e)) = history {
            // Servers with data and no record: whoever is elected could lack
            // acknowledged writes. Give a master that survived a coordinator
            // restart one timeout to claim its role, then leave it to an
            // operator.
            let grace = self.started + self.timeout;
            if now < grace {
                *wake = min_instant(*wake, grace);
                return None;
            }
            self.unavailable.insert(
                cluster,
                format!(
                    "cluster {cluster}: server {id} holds data (next seq {}, term {}) but the coordinator has no record of the cluster; if its state was lost, promote a server with `sns-node promote --cluster {cluster} --server <id> --accept-data-loss`",
                    e.next_seq, e.term
                ),
            );
            return None;
        }
        let (id, e) = live.iter().filter(|(_, e)| !e.unwritable).min_by_key(|(_, e)| e.order)?;
        let record =
            Record { term: 1, master: Some(*id), in_sync: BTreeMap::from([(*id, e.incarnation)]), ..Record::default() };
        Some(Change { cluster, record, why: Why::Promotion { old: None, new: *id } })
    }

    /// Drops in-sync servers that lost what they held: a damaged journal,
    /// or a new incarnation (a wiped or replaced disk).
    fn drop_lost(&self, now: Instant, cluster: u32) -> Option<Change> {
        let record = self.records.get(&cluster)?;
        let lost: Vec<u32> = record
            .in_sync
            .iter()
            .filter(|(id, inc)| {
                self.server(cluster, **id).is_some_and(|e| {
                    self.alive(e, now)
                        && ((e.damaged && record.override_server != Some(**id))
                            || (e.incarnation != **inc && e.incarnation != 0))
                })
            })
            .map(|(id, _)| *id)
            .collect();
        if lost.is_empty() {
            return None;
        }
        let mut record = record.clone();
        for id in &lost {
            record.in_sync.remove(id);
        }
        Some(Change { cluster, record, why: Why::Dropped(lost) })
    }

    /// Replaces a master that is gone or cannot serve, by the rules.
    fn failover(&mut self, now: Instant, cluster: u32, wake: &mut Option<Instant>) -> Option<Change> {
        let record = self.records.get(&cluster)?.clone();
        let old = record.master;
        let handover = self.handovers.get(&cluster).cloned();
        if let Some(h) = &handover
            && (!self.candidate(cluster, h.to, now) || record.master != Some(h.from) || record.term != h.term)
        {
            let why = if self.candidate(cluster, h.to, now) {
                format!("the master of cluster {cluster} changed (term {}) during the switchover", record.term)
            } else {
                format!(
                    "server {} of cluster {cluster} stopped being a live, writable, in-sync server during the switchover; server {} keeps the role",
                    h.to, h.from
                )
            };
            self.end_switchover(cluster, Some(why));
            return self.failover(now, cluster, wake);
        }
        if let Some(m) = old {
            if self.is_master(cluster, m, now) {
                self.unavailable.remove(&cluster);
                return None;
            }
            // A master that said it cannot serve (or came back as someone
            // else) stopped by itself; a silent one may still be serving
            // on its lease.
            let stopped = handover.as_ref().is_some_and(|h| h.stepped_down)
                || self.server(cluster, m).is_some_and(|e| {
                    self.alive(e, now)
                        && (e.unwritable
                            || e.damaged
                            || e.term > record.term
                            || record.in_sync.get(&m) != Some(&e.incarnation))
                });
            if !stopped {
                if self.server(cluster, m).is_none() && now < self.started + self.timeout {
                    // Just restarted: give the recorded master one timeout
                    // to report before replacing it.
                    *wake = min_instant(*wake, self.started + self.timeout);
                    return None;
                }
                let until = self.lease_until(cluster, m);
                if now < until {
                    *wake = min_instant(*wake, until);
                    return None;
                }
            }
        }
        let next = handover.as_ref().map(|h| h.to).or_else(|| {
            self.nodes
                .iter()
                .filter(|((k, c, id), _)| *k == Kind::Server && *c == cluster && self.candidate(cluster, *id, now))
                .min_by_key(|(_, e)| e.order)
                .map(|((_, _, id), _)| *id)
        });
        let Some(new) = next else {
            let in_sync: Vec<u32> = record.in_sync.keys().copied().collect();
            let live_with = |flag: fn(&Entry) -> bool| -> Vec<u32> {
                in_sync
                    .iter()
                    .copied()
                    .filter(|id| self.server(cluster, *id).is_some_and(|e| self.alive(e, now) && flag(e)))
                    .collect()
            };
            let (cut, unconfirmed) = (live_with(|e| e.tail_cut), live_with(|e| !e.tail_cut && e.unconfirmed));
            let mut why = Vec::new();
            if !cut.is_empty() {
                why.push(format!("{cut:?}, whose journal lost its end at start-up"));
            }
            if !unconfirmed.is_empty() {
                why.push(format!(
                    "{unconfirmed:?}, restarted and not yet synced by a master (its disk may have lost its last flushes whole)"
                ));
            }
            let cut = if why.is_empty() {
                String::new()
            } else {
                format!(" (live: {}; another in-sync server may hold writes it lacks)", why.join("; "))
            };
            self.unavailable.insert(
                cluster,
                format!(
                    "cluster {cluster} has no live server holding every acknowledged write (in sync: {in_sync:?}){cut}; writes are refused until one of them is back, or an operator promotes another with `sns-node promote --cluster {cluster} --server <id> --accept-data-loss`"
                ),
            );
            return None;
        };
        let seen = self.nodes.iter().filter(|((_, c, _), _)| *c == cluster).map(|(_, e)| e.term).max().unwrap_or(0);
        let record = Record {
            term: record.term.max(seen) + 1,
            master: Some(new),
            override_server: None,
            seq_floor: record.seq_floor.max(self.reported_seq(cluster)),
            ..record
        };
        Some(Change { cluster, record, why: Why::Promotion { old, new } })
    }

    /// The highest journal position a server of `cluster` reported.
    fn reported_seq(&self, cluster: u32) -> u64 {
        self.nodes
            .iter()
            .filter(|((k, c, _), _)| *k == Kind::Server && *c == cluster)
            .map(|(_, e)| e.next_seq)
            .max()
            .unwrap_or(0)
    }

    /// When `master` of `cluster` last renewed its lease (None: it holds
    /// none from this coordinator).
    pub fn last_renewal(&self, cluster: u32, master: u32) -> Option<Instant> {
        match self.leases.get(&cluster) {
            Some((m, until)) if *m == master => until.checked_sub(self.lease),
            _ => None,
        }
    }

    /// Installs a change once it is on disk.
    pub fn install(&mut self, change: &Change) {
        self.changing.remove(&change.cluster);
        if self.records.get(&change.cluster).map(|r| r.master) != Some(change.record.master) {
            self.leases.remove(&change.cluster);
            // A new master ends any switchover (done, or overtaken).
            if let Some(h) = self.handovers.remove(&change.cluster)
                && change.record.master == Some(h.to)
            {
                self.handed_over.insert(change.cluster, (h, change.record.term));
            }
        }
        self.records.insert(change.cluster, change.record.clone());
        self.unavailable.remove(&change.cluster);
        self.version += 1;
    }

    /// Gives up a proposed change that could not be written (`error`).
    ///
    /// A switchover's promotion that could not be written ends the
    /// switchover: the master stepped down for a change that cannot be
    /// recorded, and the record still names it master of its term, which
    /// nobody else was given, so it takes its role back at once. (Retried
    /// instead, the promotion would leave the cluster without a master for
    /// as long as the coordinator cannot write.)
    pub fn abandon(&mut self, change: &Change, error: &str) {
        self.changing.remove(&change.cluster);
        let cluster = change.cluster;
        if let Why::Promotion { new, .. } = change.why
            && let Some(h) = self.handovers.get(&cluster)
            && h.to == new
            && self.records.get(&cluster).is_some_and(|r| r.master == Some(h.from) && r.term == h.term)
        {
            let why = format!(
                "the coordinator cannot write the promotion of server {} into its records ({error}); server {} keeps the role",
                h.to, h.from
            );
            self.end_switchover(cluster, Some(why));
        }
    }

    /// The master's request to set the in-sync set of its cluster: members
    /// as (id, incarnation; 0 = as recorded). Returns the record to write.
    pub fn set_in_sync(
        &self,
        now: Instant,
        cluster: u32,
        term: u64,
        master: u32,
        members: &[(u32, u64)],
    ) -> Result<Change, Refusal> {
        let record = self
            .records
            .get(&cluster)
            .ok_or_else(|| Refusal::Invalid(format!("cluster {cluster} has no master yet")))?;
        if record.term != term || record.master != Some(master) {
            return Err(Refusal::NotMaster(format!(
                "server {master} is not the master of cluster {cluster} under term {term} (term {}, master {:?})",
                record.term, record.master
            )));
        }
        if !self.is_master(cluster, master, now) {
            // Not "replaced": a master told so gives up its term for good,
            // and one the record still names would then serve nobody.
            return Err(Refusal::NotNow(format!(
                "server {master} is the recorded master of cluster {cluster} under term {term} but the coordinator does not count it as serving now; ask again"
            )));
        }
        let mut in_sync = BTreeMap::new();
        for &(id, incarnation) in members {
            let inc = match (incarnation, record.in_sync.get(&id), self.server(cluster, id)) {
                (0, Some(recorded), _) => *recorded,
                (0, None, _) => {
                    return Err(Refusal::Invalid(format!("server {id} is not in sync; name its incarnation")));
                }
                (_, _, Some(e)) if e.damaged => {
                    return Err(Refusal::Invalid(format!("server {id} of cluster {cluster} has a damaged journal")));
                }
                (inc, _, Some(e)) if e.incarnation == inc => inc,
                (inc, _, _) => {
                    return Err(Refusal::Invalid(format!(
                        "server {id} of cluster {cluster} is not registered with incarnation {inc:#x}"
                    )));
                }
            };
            in_sync.insert(id, inc);
        }
        if !in_sync.contains_key(&master) {
            return Err(Refusal::Invalid("the in-sync set must hold the master".into()));
        }
        let record = Record { in_sync, seq_floor: record.seq_floor.max(self.reported_seq(cluster)), ..record.clone() };
        Ok(Change { cluster, record, why: Why::Dropped(vec![]) })
    }

    /// An operator's override: `server` becomes master under a new term.
    /// A server that is not in sync needs `accept_data_loss`; a live,
    /// serving master is never replaced this way.
    pub fn promote(
        &mut self,
        now: Instant,
        cluster: u32,
        server: u32,
        accept_data_loss: bool,
    ) -> Result<Change, Refusal> {
        let e = self
            .server(cluster, server)
            .filter(|e| self.alive(e, now))
            .ok_or_else(|| Refusal::Invalid(format!("server {server} of cluster {cluster} is not live")))?
            .clone();
        if e.unwritable {
            return Err(Refusal::Invalid(format!("server {server} of cluster {cluster} cannot write its journal")));
        }
        let record = self.records.get(&cluster).cloned().unwrap_or_default();
        if let Some(m) = record.master
            && self.is_master(cluster, m, now)
        {
            return Err(Refusal::Invalid(format!(
                "cluster {cluster} has a live master (server {m}); nothing to override"
            )));
        }
        if self.changing.contains(&cluster) || self.handovers.contains_key(&cluster) {
            return Err(Refusal::Invalid(format!("cluster {cluster} is changing master; try again")));
        }
        let safe = self.candidate(cluster, server, now);
        if !safe && !accept_data_loss {
            return Err(Refusal::Unsafe(format!(
                "server {server} is not known to hold every acknowledged write of cluster {cluster}{}; promoting it loses what it lacks: pass --accept-data-loss to do it anyway",
                if e.damaged { " (its journal is damaged)" } else { "" }
            )));
        }
        if let Some(m) = record.master
            && !self.server_alive(cluster, m, now)
            && now < self.lease_until(cluster, m)
        {
            return Err(Refusal::Invalid(format!(
                "the old master (server {m}) may still hold its lease for {:?}; try again",
                self.lease_until(cluster, m) - now
            )));
        }
        let seen = self.nodes.iter().filter(|((_, c, _), _)| *c == cluster).map(|(_, e)| e.term).max().unwrap_or(0);
        let mut in_sync = if safe { record.in_sync.clone() } else { BTreeMap::new() };
        in_sync.insert(server, e.incarnation);
        let record = Record {
            term: record.term.max(seen) + 1,
            master: Some(server),
            in_sync,
            seq_floor: record.seq_floor.max(self.reported_seq(cluster)),
            override_server: (!safe).then_some(server),
        };
        let old = self.records.get(&cluster).and_then(|r| r.master);
        self.changing.insert(cluster);
        Ok(Change { cluster, record, why: Why::Promotion { old, new: server } })
    }

    /// Begins a planned switchover of `cluster` to `to` (None: its live
    /// in-sync slave). From now on the master's lease is not renewed and
    /// every answer tells it it is not master; [`Table::decide`] promotes
    /// the target once the master stepped down or its lease ran out.
    pub fn begin_switchover(&mut self, now: Instant, cluster: u32, to: Option<u32>) -> Result<Begun, Refusal> {
        if cluster < 1 || cluster > self.clusters {
            return Err(Refusal::Invalid(format!("cluster {cluster} out of range 1..={}", self.clusters)));
        }
        let record = self.records.get(&cluster).cloned().unwrap_or_default();
        let from = record.master.filter(|m| self.is_master(cluster, *m, now)).ok_or_else(|| {
            Refusal::Invalid(match self.handovers.get(&cluster) {
                Some(h) => format!("cluster {cluster} is already switching over to server {}", h.to),
                None => format!("cluster {cluster} has no serving master to switch over from"),
            })
        })?;
        let to = match to {
            Some(to) => to,
            None => self
                .nodes
                .iter()
                .filter(|((k, c, id), _)| {
                    *k == Kind::Server && *c == cluster && *id != from && self.candidate(cluster, *id, now)
                })
                .min_by_key(|(_, e)| e.order)
                .map(|((_, _, id), _)| *id)
                .ok_or_else(|| {
                    Refusal::Unsafe(format!(
                        "cluster {cluster} has no live server other than its master (server {from}) holding every acknowledged write; wait for its slave to catch up"
                    ))
                })?,
        };
        if to == from {
            return Err(Refusal::Invalid(format!("server {to} is already the master of cluster {cluster}")));
        }
        if !self.candidate(cluster, to, now) {
            let state = match self.server(cluster, to) {
                None => "not registered",
                Some(e) if !self.alive(e, now) => "not live",
                Some(e) if e.damaged => "damaged",
                Some(e) if e.unwritable => "unable to write its journal",
                Some(_) => "not in sync (it may still be catching up)",
            };
            return Err(Refusal::Unsafe(format!(
                "server {to} of cluster {cluster} is {state}: only a live server holding every acknowledged write can take over"
            )));
        }
        self.abandoned.remove(&cluster);
        self.handed_over.remove(&cluster);
        self.handovers.insert(cluster, Handover { from, to, term: record.term, stepped_down: false });
        self.version += 1;
        Ok(Begun { from, to, term: record.term, epoch: self.epoch, version: self.version })
    }

    /// The master `from` of `term` answered that it stopped acting as
    /// master: the target need not wait for its lease.
    pub fn stepped_down(&mut self, cluster: u32, from: u32, term: u64) {
        if let Some(h) = self.handovers.get_mut(&cluster)
            && h.from == from
            && h.term == term
        {
            h.stepped_down = true;
        }
    }

    /// Ends a switchover without a promotion (`why`), or forgets one.
    pub fn end_switchover(&mut self, cluster: u32, why: Option<String>) {
        if self.handovers.remove(&cluster).is_some() {
            self.version += 1;
            if let Some(why) = why {
                self.abandoned.insert(cluster, why);
            }
        }
    }

    /// Where the switchover of `cluster` from `from` to `to` (begun under
    /// `term`) stands.
    pub fn switchover_outcome(&self, cluster: u32, from: u32, to: u32, term: u64) -> SwitchoverOutcome {
        if self.handovers.get(&cluster).is_some_and(|h| h.from == from && h.to == to && h.term == term) {
            return SwitchoverOutcome::Pending;
        }
        if let Some((h, promoted)) = self.handed_over.get(&cluster)
            && h.from == from
            && h.to == to
            && h.term == term
        {
            return SwitchoverOutcome::Done(*promoted);
        }
        match self.records.get(&cluster) {
            Some(r) if r.master == Some(to) && r.term > term => SwitchoverOutcome::Done(r.term),
            Some(r) if r.term > term => SwitchoverOutcome::Abandoned(format!(
                "cluster {cluster} got another master (server {:?}, term {}) during the switchover",
                r.master, r.term
            )),
            _ => SwitchoverOutcome::Abandoned(
                self.abandoned.get(&cluster).cloned().unwrap_or_else(|| "the switchover was abandoned".into()),
            ),
        }
    }

    /// The role of a registered node (None if it never registered).
    pub fn assignment_of(&self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Option<Assignment> {
        self.nodes.contains_key(&(kind, cluster, id)).then(|| self.assignment(now, kind, cluster, id))
    }

    fn assignment(&self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Assignment {
        let record = self.records.get(&cluster).cloned().unwrap_or_default();
        let server = match kind {
            Kind::Server => id,
            Kind::Synchronizer => self.nodes.get(&(kind, cluster, id)).map_or(0, |e| e.paired_server),
        };
        let is_master = self.is_master(cluster, server, now);
        let master_server = is_master && kind == Kind::Server;
        Assignment {
            is_master,
            term: record.term,
            epoch: self.epoch,
            version: self.version,
            slave: if master_server { self.slave(now, cluster).map(|v| (v.id, v.host, v.port)) } else { None },
            in_sync: if master_server { record.in_sync.keys().copied().collect() } else { vec![] },
            seq_floor: if master_server { record.seq_floor } else { 0 },
            accept_data_loss: master_server && record.override_server == Some(id),
        }
    }

    /// Address of a node, if registered.
    pub fn address(&self, kind: Kind, cluster: u32, id: u32) -> Option<(String, String)> {
        self.nodes.get(&(kind, cluster, id)).map(|e| (e.host.clone(), e.port.clone()))
    }

    /// The live master server of `cluster`.
    pub fn master(&self, now: Instant, cluster: u32) -> Option<NodeView> {
        let id = self.records.get(&cluster)?.master?;
        self.view(now, Kind::Server, cluster, id).filter(|v| v.is_master)
    }

    /// Records why `cluster` waits while the coordinator cannot act (its
    /// records cannot be written yet); the next decision replaces it.
    pub fn set_unavailable(&mut self, cluster: u32, why: String) {
        self.unavailable.insert(cluster, why);
    }

    /// Why `cluster` has no master, if the rules keep it without one, or
    /// if a records write that has not finished holds every change back.
    pub fn unavailable(&self, cluster: u32) -> Option<&str> {
        self.unavailable.get(&cluster).or(self.stalled.as_ref()).map(String::as_str)
    }

    /// Sets (or clears) the records write that has not finished.
    pub fn set_stalled(&mut self, why: Option<String>) {
        self.stalled = why;
    }

    /// The live slave of `cluster`: the earliest-registered live server that
    /// is not the master (in sync or not: the master brings it up to date).
    pub fn slave(&self, now: Instant, cluster: u32) -> Option<NodeView> {
        let master = self.records.get(&cluster).and_then(|r| r.master);
        self.nodes
            .iter()
            .filter(|((k, c, id), e)| *k == Kind::Server && *c == cluster && Some(*id) != master && self.alive(e, now))
            .min_by_key(|(_, e)| e.order)
            .and_then(|((_, _, id), _)| self.view(now, Kind::Server, cluster, *id))
    }

    /// The live synchronizer that works beside the master of `cluster`.
    pub fn master_synchronizer(&self, now: Instant, cluster: u32) -> Option<NodeView> {
        self.all(now)
            .into_iter()
            .find(|v| v.kind == Kind::Synchronizer && v.cluster == cluster && v.alive && v.is_master)
    }

    /// Every node, alive or not, ordered by kind, cluster and id.
    pub fn all(&self, now: Instant) -> Vec<NodeView> {
        self.nodes.keys().filter_map(|(k, c, id)| self.view(now, *k, *c, *id)).collect()
    }

    fn view(&self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Option<NodeView> {
        let e = self.nodes.get(&(kind, cluster, id))?;
        let record = self.records.get(&cluster).cloned().unwrap_or_default();
        let alive = self.alive(e, now);
        let server = if kind == Kind::Server { id } else { e.paired_server };
        let is_master = alive && self.is_master(cluster, server, now);
        Some(NodeView {
            kind,
            cluster,
            id,
            host: e.host.clone(),
            port: e.port.clone(),
            paired_server: e.paired_server,
            alive,
            is_master,
            term: record.term,
            last_seen: now.saturating_duration_since(e.last_seen),
            in_sync: kind == Kind::Server && self.in_sync(cluster, id),
            incarnation: e.incarnation,
            damaged: e.damaged,
            unwritable: e.unwritable,
            link_down: if alive { e.link_down.clone() } else { String::new() },
            waits: if is_master { e.waits.clone() } else { String::new() },
        })
    }
}

fn min_instant(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);
    const L: Duration = Duration::from_secs(1);

    fn server(cluster: u32, id: u32) -> Beat {
        Beat {
            kind: Some(Kind::Server),
            cluster,
            id,
            host: "127.0.0.1".into(),
            port: format!("90{cluster}{id}"),
            incarnation: u64::from(100 * cluster + id),
            next_seq: 1,
            ..Beat::default()
        }
    }

    fn sync(cluster: u32, id: u32, paired: u32) -> Beat {
        Beat { kind: Some(Kind::Synchronizer), paired_server: paired, incarnation: 0, ..server(cluster, id) }
    }

    /// Decides and installs every change at once (as if the disk were
    /// instant); returns the changes.
    fn settle(t: &mut Table, now: Instant) -> Vec<Change> {
        let d = t.decide(now);
        for c in &d.changes {
            t.install(c);
        }
        d.changes
    }

    /// A table whose cluster 2 has master 1 and in-sync slave 2 (term 1).
    fn pair(t0: Instant) -> Table {
        let mut t = Table::starting_at(t0, 3, T, L);
        t.heartbeat(t0, &server(2, 1));
        settle(&mut t, t0);
        t.heartbeat(t0, &server(2, 2));
        let c = t.set_in_sync(t0, 2, 1, 1, &[(1, 0), (2, 202)]).unwrap();
        t.install(&c);
        t
    }

    #[test]
    fn a_synchronizers_link_state_is_shown_while_it_is_alive_and_changes_no_role() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let view = |t: &Table, now| t.all(now).into_iter().find(|v| v.kind == Kind::Synchronizer).unwrap();
        let (_, registered) = t.heartbeat(t0, &sync(2, 1, 1));
        assert!(registered);
        assert_eq!(view(&t, t0).link_down, "");
        let version = t.version;
        let down = Beat { link_down: "IO error: Connection refused".into(), ..sync(2, 1, 1) };
        let (a, changed) = t.heartbeat(t0, &down);
        assert!(a.is_master && !changed && t.version == version, "a link going down moves no role");
        assert_eq!(view(&t, t0).link_down, "IO error: Connection refused");
        // A dead synchronizer's last word is not shown as current.
        assert!(!view(&t, t0 + T).alive && view(&t, t0 + T).link_down.is_empty());
        t.heartbeat(t0 + T, &sync(2, 1, 1));
        assert_eq!(view(&t, t0 + T).link_down, "");
    }

    /// [`pair`], both of whose servers heartbeat again 5 s on: returns the
    /// table and that time (the master's lease runs until it + L).
    fn pair_renewed() -> (Table, Instant) {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let t1 = t0 + Duration::from_secs(5);
        t.heartbeat(t1, &server(2, 1));
        t.heartbeat(t1, &server(2, 2));
        (t, t1)
    }

    #[test]
    fn first_server_is_master_second_is_slave() {
        let t0 = Instant::now();
        let mut t = Table::starting_at(t0, 3, T, L);
        let (a, registered) = t.heartbeat(t0, &server(2, 1));
        assert!(registered && !a.is_master, "no master before the record is written");
        let changes = settle(&mut t, t0);
        assert_eq!(changes[0].why, Why::Promotion { old: None, new: 1 });
        assert_eq!(changes[0].record.in_sync, BTreeMap::from([(1, 201)]));
        let (a, _) = t.heartbeat(t0, &server(2, 1));
        assert!(a.is_master);
        assert_eq!(a.term, 1);
        let (b, _) = t.heartbeat(t0, &server(2, 2));
        assert!(!b.is_master);
        let (a, _) = t.heartbeat(t0, &server(2, 1));
        assert_eq!(a.slave, Some((2, "127.0.0.1".into(), "9022".into())));
        assert_eq!(a.in_sync, vec![1], "the slave is not in sync until the master says so");
        assert_eq!(t.master(t0, 2).unwrap().id, 1);
        assert!(t.master(t0, 1).is_none());
    }

    #[test]
    fn a_dead_master_is_replaced_by_an_in_sync_slave_once_its_lease_ran_out() {
        let (mut t, t1) = pair_renewed(); // lease until t1 + L
        let t2 = t1 + Duration::from_millis(100);
        t.mark_dead(t2, Kind::Server, 2, 1);
        let d = t.decide(t2);
        assert!(d.changes.is_empty(), "the old master may still serve on its lease");
        assert_eq!(d.wake_at, Some(t1 + L));
        let changes = settle(&mut t, t1 + L);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].record.term, 2);
        assert_eq!(changes[0].record.master, Some(2));
        assert!(t.heartbeat(t1 + L, &server(2, 2)).0.is_master);
        // The old master comes back: slave, under the new term.
        let (a, registered) = t.heartbeat(t1 + L, &server(2, 1));
        assert!(registered && !a.is_master && a.term == 2);
    }

    #[test]
    fn a_slave_whose_journal_lost_its_end_is_promoted_only_where_nobody_could_hold_more() {
        let (mut t, t1) = pair_renewed();
        let t2 = t1 + L;
        t.heartbeat(t2, &Beat { tail_cut: true, next_seq: 10, remote_events: 4, ..server(2, 2) });
        t.mark_dead(t2, Kind::Server, 2, 1);
        assert!(settle(&mut t, t2).is_empty(), "the dead master may hold what the slave lost");
        let why = t.unavailable(2).unwrap();
        assert!(why.contains("lost its end at start-up") && why.contains("[2]"), "{why}");
        // The master is back, unable to write, and holds more: still not.
        t.heartbeat(t2, &Beat { unwritable: true, next_seq: 12, ..server(2, 1) });
        assert!(settle(&mut t, t2).is_empty());
        // Same position, but more events of other clusters taken in (they
        // carry no sequence number of this cluster): still not.
        t.heartbeat(t2, &Beat { unwritable: true, next_seq: 10, remote_events: 5, ..server(2, 1) });
        assert!(settle(&mut t, t2).is_empty(), "the master holds an event of another cluster the slave lost");
        // It holds no more than the slave: the slave may take over.
        t.heartbeat(t2, &Beat { unwritable: true, next_seq: 10, remote_events: 4, ..server(2, 1) });
        let changes = settle(&mut t, t2);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].record.master, Some(2));
    }

    #[test]
    fn a_restarted_slave_nobody_synced_is_promoted_only_where_nobody_could_hold_more() {
        let (mut t, t1) = pair_renewed();
        let t2 = t1 + L;
        // Its journal opened whole, but a disk that lost its last flushes
        // whole leaves just that.
        t.heartbeat(t2, &Beat { unconfirmed: true, next_seq: 10, ..server(2, 2) });
        t.mark_dead(t2, Kind::Server, 2, 1);
        assert!(settle(&mut t, t2).is_empty(), "the dead master may hold what the slave lost");
        let why = t.unavailable(2).unwrap();
        assert!(why.contains("restarted and not yet synced") && why.contains("[2]"), "{why}");
        // The master is back, unable to write, and holds more: still not.
        t.heartbeat(t2, &Beat { unwritable: true, next_seq: 12, ..server(2, 1) });
        assert!(settle(&mut t, t2).is_empty());
        // It holds no more than the slave: the slave may take over.
        t.heartbeat(t2, &Beat { unwritable: true, next_seq: 10, ..server(2, 1) });
        let changes = settle(&mut t, t2);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].record.master, Some(2));
    }

    #[test]
    fn a_switchover_promotes_the_in_sync_slave_as_soon_as_the_master_stepped_down() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let t1 = t0 + Duration::from_secs(5);
        t.heartbeat(t1, &server(2, 1)); // lease until t1 + L
        let v = t.heartbeat(t1, &server(2, 2)).0.version;
        let begun = t.begin_switchover(t1, 2, None).unwrap();
        assert_eq!((begun.from, begun.to, begun.term), (1, 2, 1));
        assert!(begun.version > v, "the master's step-down orders after every earlier answer");
        let (a, _) = t.heartbeat(t1, &server(2, 1));
        assert!(!a.is_master, "a master handing over is told it is not master");
        assert!(t.master(t1, 2).is_none(), "clients are told to wait, not sent to the old master");
        assert!(t.decide(t1).changes.is_empty(), "not before it stepped down or its lease ran out");
        t.stepped_down(2, 1, 1);
        let changes = settle(&mut t, t1);
        assert_eq!(changes.len(), 1, "no lease wait: the master said it stopped");
        assert_eq!(changes[0].record.master, Some(2));
        assert_eq!(changes[0].record.term, 2);
        assert!(changes[0].record.in_sync.contains_key(&1), "the old master still holds every write");
        assert_eq!(t.switchover_outcome(2, 1, 2, 1), SwitchoverOutcome::Done(2));
        assert!(t.heartbeat(t1, &server(2, 2)).0.is_master);
        assert!(!t.heartbeat(t1, &server(2, 1)).0.is_master);
    }

    #[test]
    fn a_switchover_whose_master_does_not_answer_waits_for_its_lease() {
        let (mut t, t1) = pair_renewed();
        t.begin_switchover(t1, 2, Some(2)).unwrap();
        // A renewal attempt during the handover grants nothing.
        t.heartbeat(t1 + L / 2, &server(2, 1));
        let d = t.decide(t1 + L / 2);
        assert!(d.changes.is_empty());
        assert_eq!(d.wake_at, Some(t1 + L), "the lease granted before the switchover, not renewed");
        let changes = settle(&mut t, t1 + L);
        assert_eq!(changes[0].record.master, Some(2));
    }

    #[test]
    fn a_switchover_is_refused_without_a_live_in_sync_target() {
        let t0 = Instant::now();
        let mut t = Table::starting_at(t0, 3, T, L);
        t.heartbeat(t0, &server(2, 1));
        settle(&mut t, t0);
        assert!(matches!(t.begin_switchover(t0, 2, None), Err(Refusal::Unsafe(_))), "no slave at all");
        t.heartbeat(t0, &server(2, 2));
        let e = t.begin_switchover(t0, 2, Some(2)).unwrap_err();
        assert!(e.to_string().contains("not in sync"), "{e}");
        assert!(matches!(t.begin_switchover(t0, 2, Some(1)), Err(Refusal::Invalid(_))), "already master");
        assert!(matches!(t.begin_switchover(t0, 1, None), Err(Refusal::Invalid(_))), "no master");
        assert!(matches!(t.begin_switchover(t0, 9, None), Err(Refusal::Invalid(_))), "no such cluster");
        let (a, _) = t.heartbeat(t0, &server(2, 1));
        assert!(a.is_master, "a refused switchover changes nothing");
    }

    /// A target that hangs right after it was promoted: the coordinator
    /// misses it and promotes the old master back under a newer term,
    /// possibly before the caller of the switchover looks. The caller
    /// still hears the switchover was done (under the target's term), not
    /// that another master appeared: the handover happened, and a failover
    /// followed.
    #[test]
    fn a_switchover_done_then_overtaken_by_a_failover_still_reports_it_done() {
        let (mut t, t1) = pair_renewed();
        t.begin_switchover(t1, 2, None).unwrap();
        t.stepped_down(2, 1, 1);
        let changes = settle(&mut t, t1);
        assert_eq!((changes[0].record.master, changes[0].record.term), (Some(2), 2));
        let t2 = t1 + 2 * L;
        t.heartbeat(t2, &server(2, 1));
        t.mark_dead(t2, Kind::Server, 2, 2);
        let changes = settle(&mut t, t2);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].record.master, Some(1), "the old master is promoted back");
        assert!(changes[0].record.term > 2);
        assert_eq!(t.switchover_outcome(2, 1, 2, 1), SwitchoverOutcome::Done(2));
        // The next switchover starts afresh: the old one's result is gone.
        t.heartbeat(t2, &server(2, 2));
        let begun = t.begin_switchover(t2, 2, Some(2)).unwrap();
        assert_eq!(t.switchover_outcome(2, 1, 2, begun.term), SwitchoverOutcome::Pending);
        assert!(matches!(t.switchover_outcome(2, 1, 2, 1), SwitchoverOutcome::Abandoned(_)));
    }

    #[test]
    fn a_switchover_whose_target_dies_is_abandoned_and_the_master_keeps_its_role() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.begin_switchover(t0, 2, None).unwrap();
        assert!(matches!(t.begin_switchover(t0, 2, None), Err(Refusal::Invalid(_))), "one at a time");
        assert!(t.promote(t0, 2, 2, false).is_err(), "no override during a switchover");
        t.mark_dead(t0, Kind::Server, 2, 2);
        // The handing-over master, writing as its target dies, is told to
        // ask again, not that it was replaced: it keeps its term.
        let refused = t.set_in_sync(t0, 2, 1, 1, &[(1, 0)]).unwrap_err();
        assert!(matches!(refused, Refusal::NotNow(_)), "{refused:?}");
        t.stepped_down(2, 1, 1);
        let changes = settle(&mut t, t0);
        assert!(changes.is_empty(), "{changes:?}");
        let SwitchoverOutcome::Abandoned(why) = t.switchover_outcome(2, 1, 2, 1) else { panic!("not abandoned") };
        assert!(why.contains("server 2"), "{why}");
        let (a, _) = t.heartbeat(t0, &server(2, 1));
        assert!(a.is_master && a.term == 1, "the old master takes its role back, same term");
        assert_eq!(t.master(t0, 2).unwrap().id, 1);
    }

    /// The promotion of a switchover's target cannot be written (a full
    /// disk): the switchover ends there and the master, which stepped down
    /// for it, takes its role back in its term; the promotion is not
    /// retried (the cluster would have no master until the disk had room).
    #[test]
    fn a_switchover_whose_promotion_cannot_be_written_gives_the_master_its_role_back() {
        let (mut t, t1) = pair_renewed();
        t.begin_switchover(t1, 2, None).unwrap();
        t.stepped_down(2, 1, 1);
        let d = t.decide(t1);
        assert_eq!(d.changes.len(), 1, "{d:?}");
        assert_eq!(d.changes[0].record.master, Some(2));
        t.abandon(&d.changes[0], "No space left on device (os error 28)");
        let SwitchoverOutcome::Abandoned(why) = t.switchover_outcome(2, 1, 2, 1) else { panic!("not abandoned") };
        assert!(why.contains("cannot write the promotion of server 2") && why.contains("No space left"), "{why}");
        let (a, _) = t.heartbeat(t1, &server(2, 1));
        assert!(a.is_master && a.term == 1, "the old master takes its role back, same term: {a:?}");
        assert!(t.decide(t1).changes.is_empty(), "the promotion is not retried");
        assert_eq!(t.master(t1, 2).unwrap().id, 1);
        // A failover's promotion that cannot be written is retried: there
        // the master is gone.
        t.mark_dead(t1, Kind::Server, 2, 1);
        let t2 = t1 + 2 * L;
        let d = t.decide(t2);
        assert_eq!(d.changes.len(), 1, "{d:?}");
        t.abandon(&d.changes[0], "No space left on device (os error 28)");
        assert_eq!(t.decide(t2).changes.len(), 1, "proposed again");
    }

    #[test]
    fn a_master_that_dies_during_a_switchover_is_replaced_by_the_target() {
        let (mut t, t1) = pair_renewed();
        t.begin_switchover(t1, 2, None).unwrap();
        t.mark_dead(t1, Kind::Server, 2, 1);
        assert!(t.decide(t1).changes.is_empty(), "still within its lease");
        let changes = settle(&mut t, t1 + L);
        assert_eq!(changes[0].record.master, Some(2));
        assert_eq!(t.switchover_outcome(2, 1, 2, 1), SwitchoverOutcome::Done(2));
    }

    #[test]
    fn a_stale_server_is_never_promoted_by_itself() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let t1 = t0 + Duration::from_secs(20);
        // Server 1 (master) dies; 2 takes over.
        t.heartbeat(t1, &server(2, 2));
        settle(&mut t, t1);
        assert_eq!(t.master(t1, 2).unwrap().id, 2);
        // 2 writes alone: first it drops 1 from the in-sync set.
        let c = t.set_in_sync(t1, 2, 2, 2, &[(2, 0)]).unwrap();
        t.install(&c);
        // 2 dies; the stale 1 comes back first.
        let t2 = t1 + Duration::from_secs(20);
        t.heartbeat(t2, &server(2, 1));
        assert!(settle(&mut t, t2).is_empty());
        assert!(t.master(t2, 2).is_none());
        assert!(t.unavailable(2).unwrap().contains("no live server holding every acknowledged write"));
        assert!(!t.heartbeat(t2, &server(2, 1)).0.is_master);
        // 2 comes back: still the recorded master of term 2, it serves again
        // (its journal holds every write it acknowledged).
        let (a, _) = t.heartbeat(t2, &server(2, 2));
        assert!(a.is_master && a.term == 2);
        assert!(settle(&mut t, t2).is_empty());
        assert!(t.unavailable(2).is_none());
    }

    #[test]
    fn an_operator_may_promote_a_stale_server_accepting_the_loss() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let t1 = t0 + Duration::from_secs(20);
        t.heartbeat(t1, &server(2, 2));
        settle(&mut t, t1);
        t.install(&t.set_in_sync(t1, 2, 2, 2, &[(2, 0)]).unwrap());
        let t2 = t1 + Duration::from_secs(20);
        t.heartbeat(t2, &Beat { next_seq: 40, ..server(2, 1) });
        let refused = t.promote(t2, 2, 1, false).unwrap_err();
        assert!(matches!(refused, Refusal::Unsafe(_)), "{refused}");
        let c = t.promote(t2, 2, 1, true).unwrap();
        assert_eq!(c.record.override_server, Some(1));
        assert_eq!(c.record.in_sync, BTreeMap::from([(1, 201)]));
        assert!(c.record.seq_floor >= 40);
        t.install(&c);
        let (a, _) = t.heartbeat(t2, &server(2, 1));
        assert!(a.is_master && a.accept_data_loss && a.term == 3);
        // A live master is never overridden.
        assert!(t.promote(t2, 2, 1, true).is_err());
    }

    #[test]
    fn only_the_current_master_changes_the_in_sync_set() {
        let t0 = Instant::now();
        let t = pair(t0);
        assert!(matches!(t.set_in_sync(t0, 2, 1, 2, &[(2, 0)]), Err(Refusal::NotMaster(_))));
        assert!(matches!(t.set_in_sync(t0, 2, 0, 1, &[(1, 0)]), Err(Refusal::NotMaster(_))));
        assert!(matches!(t.set_in_sync(t0, 2, 1, 1, &[(2, 0)]), Err(Refusal::Invalid(_))), "must hold the master");
        assert!(t.set_in_sync(t0, 2, 1, 1, &[(1, 0), (2, 999)]).is_err(), "wrong incarnation");
        assert!(t.set_in_sync(t0, 2, 1, 1, &[(1, 0)]).is_ok());
    }

    #[test]
    fn damaged_or_replaced_servers_leave_the_in_sync_set() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.heartbeat(t0, &Beat { damaged: true, ..server(2, 2) });
        let changes = settle(&mut t, t0);
        assert_eq!(changes[0].why, Why::Dropped(vec![2]));
        assert_eq!(t.records()[&2].in_sync.keys().copied().collect::<Vec<_>>(), vec![1]);
        // The master's disk is replaced: a new incarnation is not in sync,
        // so no one is left to promote.
        let t1 = t0 + Duration::from_secs(3);
        t.heartbeat(t1, &Beat { damaged: false, ..server(2, 2) });
        t.heartbeat(t1, &Beat { incarnation: 7, ..server(2, 1) });
        settle(&mut t, t1 + L);
        let d = t.decide(t1 + L);
        assert!(d.changes.is_empty());
        assert!(t.master(t1 + L, 2).is_none());
    }

    #[test]
    fn a_master_that_cannot_write_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.heartbeat(t0, &Beat { unwritable: true, ..server(2, 1) });
        let changes = settle(&mut t, t0);
        assert_eq!(changes[0].record.master, Some(2), "no lease wait: it stopped by itself");
    }

    #[test]
    fn a_restarted_coordinator_keeps_its_records_and_waits_for_the_master() {
        let t0 = Instant::now();
        let before = pair(t0);
        let mut t = Table::starting_at(t0 + T, 3, T, L);
        t.load(before.records().clone());
        let t1 = t0 + T;
        // The slave reports first: nobody is promoted while the recorded
        // master may still come back.
        t.heartbeat(t1, &Beat { term: 1, ..server(2, 2) });
        let d = t.decide(t1);
        assert!(d.changes.is_empty() && d.wake_at == Some(t1 + T));
        let (a, _) = t.heartbeat(t1, &Beat { term: 1, claims_master: true, ..server(2, 1) });
        assert!(a.is_master && a.term == 1);
        // Had it not come back, the in-sync slave takes over after the grace.
        let mut t = Table::starting_at(t1, 3, T, L);
        t.load(before.records().clone());
        t.heartbeat(t1 + T, &Beat { term: 1, ..server(2, 2) });
        let changes = settle(&mut t, t1 + T);
        assert_eq!(changes[0].record.master, Some(2));
    }

    /// A restarted coordinator that has not heard from the recorded
    /// master yet asks it to try again; telling it that it was replaced
    /// would have it give up its term while the record still names it,
    /// leaving the cluster without a master.
    #[test]
    fn a_restarted_coordinator_asks_its_unheard_master_to_try_again() {
        let t0 = Instant::now();
        let before = pair(t0);
        let t1 = t0 + T;
        let mut t = Table::starting_at(t1, 3, T, L);
        t.load(before.records().clone());
        let refused = t.set_in_sync(t1, 2, 1, 1, &[(1, 0)]).unwrap_err();
        assert!(matches!(refused, Refusal::NotNow(_)), "{refused:?}");
        t.heartbeat(t1, &Beat { term: 1, claims_master: true, ..server(2, 1) });
        let c = t.set_in_sync(t1, 2, 1, 1, &[(1, 0)]).unwrap();
        assert_eq!(c.record.in_sync.keys().copied().collect::<Vec<_>>(), vec![1]);
        // An older term, or a server the record does not name, is refused
        // for good.
        assert!(matches!(t.set_in_sync(t1, 2, 0, 1, &[(1, 0)]), Err(Refusal::NotMaster(_))));
        assert!(matches!(t.set_in_sync(t1, 2, 1, 2, &[(2, 0)]), Err(Refusal::NotMaster(_))));
    }

    /// A recorded master that reports a later term than the record's gave
    /// up its role: it is not counted as master, and a new term above the
    /// one it reports is decided at once (no lease to wait out).
    #[test]
    fn a_master_that_gave_up_its_term_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.heartbeat(t0, &Beat { term: 1, ..server(2, 2) });
        let (a, _) = t.heartbeat(t0, &Beat { term: 2, ..server(2, 1) });
        assert!(!a.is_master, "{a:?}");
        let changes = settle(&mut t, t0);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let record = &changes[0].record;
        assert_eq!(record.term, 3);
        let new = record.master.expect("a master");
        let (a, _) = t.heartbeat(t0, &Beat { term: 2, ..server(2, new) });
        assert!(a.is_master && a.term == 3, "{a:?}");
    }

    /// A node that adopted a newer epoch than this run's has this run's
    /// epoch raised above it, in the answer to that very heartbeat, and
    /// in every answer after it; an older or equal one changes nothing.
    #[test]
    fn a_node_that_adopted_a_newer_epoch_raises_this_runs_above_it() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.set_epoch(100, true);
        let (a, _) = t.heartbeat(t0, &Beat { adopted_epoch: 100, ..server(2, 2) });
        assert_eq!(a.epoch, 100, "its own epoch: nothing to raise");
        let (a, raised) = t.heartbeat(t0, &Beat { adopted_epoch: 250, ..server(2, 1) });
        assert!(raised && a.epoch == 251 && a.is_master, "{a:?}");
        let (a, raised) = t.heartbeat(t0, &Beat { adopted_epoch: 100, ..server(2, 2) });
        assert!(!raised && a.epoch == 251 && t.epoch() == 251, "{a:?}");
        let (a, _) = t.heartbeat(t0, &Beat { adopted_epoch: i64::MAX as u64, ..server(2, 1) });
        assert_eq!(a.epoch, i64::MAX as u64, "never past what an answer can carry");
        t.set_epoch(251, true);
        assert_eq!(t.assignment_of(t0, Kind::Server, 2, 2).map(|a| a.epoch), Some(251));
        // A replicated coordinator's epoch is never raised this way: a
        // newer one is a newer leader's.
        t.set_epoch(100, false);
        let (a, raised) = t.heartbeat(t0, &Beat { adopted_epoch: 250, ..server(2, 1) });
        assert!(!raised && a.epoch == 100, "{a:?}");
    }

    /// While a records write hangs, every cluster without a master is told
    /// why nothing changes (the write may be another cluster's); a
    /// cluster's own reason comes first.
    #[test]
    fn a_records_write_that_hangs_is_every_masterless_clusters_reason() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        assert_eq!(t.unavailable(1), None);
        t.set_stalled(Some("cluster 2: the records write has not finished".into()));
        assert_eq!(t.unavailable(1), Some("cluster 2: the records write has not finished"));
        t.set_unavailable(3, "cluster 3: no live in-sync server".into());
        assert_eq!(t.unavailable(3), Some("cluster 3: no live in-sync server"));
        t.set_stalled(None);
        assert_eq!(t.unavailable(1), None);
    }

    #[test]
    fn a_coordinator_without_records_adopts_a_live_master_and_refuses_to_guess() {
        let t0 = Instant::now();
        let mut t = Table::starting_at(t0, 3, T, L);
        t.heartbeat(t0, &Beat { term: 4, claims_master: true, next_seq: 9, ..server(1, 1) });
        let changes = settle(&mut t, t0);
        assert_eq!(changes[0].record.term, 4);
        assert_eq!(changes[0].record.master, Some(1));
        // Servers with data, none claiming: no guess, after the grace either.
        t.heartbeat(t0, &Beat { next_seq: 12, ..server(3, 1) });
        let d = t.decide(t0);
        assert!(d.changes.is_empty() && d.wake_at == Some(t0 + T));
        t.heartbeat(t0 + T, &Beat { next_seq: 12, ..server(3, 1) });
        assert!(settle(&mut t, t0 + T).is_empty());
        assert!(t.unavailable(3).unwrap().contains("--accept-data-loss"));
    }

    #[test]
    fn synchronizers_follow_their_server() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        let (s1, _) = t.heartbeat(t0, &sync(2, 2, 1));
        let (s5, _) = t.heartbeat(t0, &sync(2, 5, 2));
        assert!(s1.is_master && !s5.is_master);
        assert_eq!(t.master_synchronizer(t0, 2).unwrap().id, 2);
    }

    #[test]
    fn answers_are_versioned_so_late_ones_can_be_ignored() {
        let t0 = Instant::now();
        let mut t = Table::starting_at(t0, 3, T, L);
        t.heartbeat(t0, &server(1, 1));
        settle(&mut t, t0);
        let (early, _) = t.heartbeat(t0, &server(1, 1));
        t.heartbeat(t0, &server(1, 2));
        let (late, _) = t.heartbeat(t0, &server(1, 1));
        assert!(late.slave.is_some() && early.slave.is_none());
        assert!(late.version > early.version);
        let v = late.version;
        t.mark_dead(t0, Kind::Server, 1, 2);
        assert!(t.assignment_of(t0, Kind::Server, 1, 1).unwrap().version > v);
    }

    #[test]
    fn no_lease_is_granted_while_the_master_changes() {
        let t0 = Instant::now();
        let mut t = pair(t0);
        t.heartbeat(t0, &Beat { unwritable: true, ..server(2, 1) });
        let d = t.decide(t0);
        assert_eq!(d.changes.len(), 1);
        // The change is being written: the new master has no role yet.
        assert!(!t.heartbeat(t0, &server(2, 2)).0.is_master);
        t.abandon(&d.changes[0], "no space left");
        // Written or not, the next decision proposes it again.
        assert_eq!(t.decide(t0).changes.len(), 1);
    }
}
