//! The coordinator's routing table: who is alive, who is master, which term.
//!
//! Pure: time comes in as an `Instant` argument, so the rules are tested
//! without a clock. Rules (SPEC §5):
//! - a node is alive while its last heartbeat is younger than the timeout
//!   (heartbeat period × missed-heartbeat limit);
//! - the first live server of a cluster is its master; when the master dies
//!   the live server that registered earliest takes over, and every change
//!   of master increments the cluster's term;
//! - a node that comes back after being declared dead registers anew, at
//!   the back of the line;
//! - a synchronizer is master exactly when its paired server is.

use std::collections::BTreeMap;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub kind: Kind,
    pub cluster: u32,
    pub id: u32,
    pub host: String,
    pub port: String,
    /// Synchronizers: the server they work beside.
    pub paired_server: u32,
    /// The node believes it is master, under this term (a restarted
    /// coordinator uses this to keep the existing master).
    pub claims_master: bool,
    pub term: u64,
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
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub is_master: bool,
    pub term: u64,
    /// The table version this answer reflects: newer answers carry larger
    /// versions, so a node can ignore one that arrives late.
    pub version: u64,
    /// For a master server: the cluster's live slave (id, host, port).
    pub slave: Option<(u32, String, String)>,
}

#[derive(Debug, Clone)]
struct Entry {
    host: String,
    port: String,
    paired_server: u32,
    last_seen: Instant,
    /// Registration order; reset when a dead node comes back.
    order: u64,
    /// The term the node last reported.
    term: u64,
}

#[derive(Debug, Clone, Default)]
struct ClusterRoles {
    master: Option<u32>,
    term: u64,
}

#[derive(Debug)]
pub struct Table {
    /// When this coordinator started: right after a restart, servers that
    /// remember a term get one timeout to reclaim their roles.
    started: Instant,
    timeout: Duration,
    clusters: u32,
    nodes: BTreeMap<(Kind, u32, u32), Entry>,
    roles: BTreeMap<u32, ClusterRoles>,
    next_order: u64,
    /// Bumped on every registration, promotion and death.
    version: u64,
}

/// A change of master, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    pub cluster: u32,
    pub old: Option<u32>,
    pub new: Option<u32>,
    pub term: u64,
}

impl Table {
    pub fn new(clusters: u32, timeout: Duration) -> Table {
        Table::starting_at(Instant::now(), clusters, timeout)
    }

    pub fn starting_at(started: Instant, clusters: u32, timeout: Duration) -> Table {
        Table { started, timeout, clusters, nodes: BTreeMap::new(), roles: BTreeMap::new(), next_order: 0, version: 0 }
    }

    pub fn clusters(&self) -> u32 {
        self.clusters
    }

    fn alive(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.last_seen) < self.timeout
    }

    fn server_alive(&self, cluster: u32, id: u32, now: Instant) -> bool {
        self.nodes.get(&(Kind::Server, cluster, id)).is_some_and(|e| self.alive(e, now))
    }

    /// Records a heartbeat and returns the node's role, the promotions it
    /// caused, and whether the node (re)registered.
    pub fn heartbeat(&mut self, now: Instant, beat: &Beat) -> (Assignment, Vec<Promotion>, bool) {
        let key = (beat.kind, beat.cluster, beat.id);
        let was_alive = self.nodes.get(&key).is_some_and(|e| self.alive(e, now));
        let order = match self.nodes.get(&key) {
            Some(e) if was_alive => e.order,
            _ => {
                self.next_order += 1;
                self.next_order
            }
        };
        self.nodes.insert(
            key,
            Entry {
                host: beat.host.clone(),
                port: beat.port.clone(),
                paired_server: beat.paired_server,
                last_seen: now,
                order,
                term: beat.term,
            },
        );
        let mut promotions = Vec::new();
        if beat.kind == Kind::Server {
            let roles = self.roles.entry(beat.cluster).or_default();
            // A master that outlived a coordinator restart keeps its role:
            // the claim is honoured only when no one holds the role and the
            // claimed term is not older than what this coordinator has seen.
            if beat.claims_master && roles.master.is_none() && beat.term >= roles.term {
                roles.master = Some(beat.id);
                roles.term = beat.term;
                promotions.push(Promotion { cluster: beat.cluster, old: None, new: Some(beat.id), term: beat.term });
            }
            // Terms never go backwards, even across a coordinator restart:
            // the next promotion is numbered above any term a node knows.
            roles.term = roles.term.max(beat.term);
        }
        promotions.extend(self.refresh(now));
        if !was_alive {
            self.version += 1;
        }
        (self.assignment(now, beat.kind, beat.cluster, beat.id), promotions, !was_alive)
    }

    /// Declares a node dead now (its lease dropped and a probe failed).
    pub fn mark_dead(&mut self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Vec<Promotion> {
        let timeout = self.timeout;
        if let Some(e) = self.nodes.get_mut(&(kind, cluster, id)) {
            e.last_seen = now.checked_sub(timeout).unwrap_or(e.last_seen.min(now));
        }
        self.version += 1;
        self.refresh(now)
    }

    /// Declares dead masters dead and elects replacements.
    pub fn refresh(&mut self, now: Instant) -> Vec<Promotion> {
        let mut promotions = Vec::new();
        let clusters: Vec<u32> = self.nodes.keys().filter(|(k, _, _)| *k == Kind::Server).map(|(_, c, _)| *c).collect();
        let young = now.saturating_duration_since(self.started) < self.timeout;
        for cluster in clusters {
            let current = self.roles.get(&cluster).and_then(|r| r.master);
            if current.is_some_and(|m| self.server_alive(cluster, m, now)) {
                continue;
            }
            let live: Vec<(&(Kind, u32, u32), &Entry)> = self
                .nodes
                .iter()
                .filter(|((k, c, _), e)| *k == Kind::Server && *c == cluster && self.alive(e, now))
                .collect();
            // Just after a restart, a server that remembers a term means the
            // cluster had a master, which may not have beaten yet: give it
            // one timeout to reclaim the role before electing anyone else.
            if current.is_none() && young && live.iter().any(|(_, e)| e.term > 0) {
                continue;
            }
            let next = live.iter().min_by_key(|(_, e)| e.order).map(|((_, _, id), _)| *id);
            if next == current {
                continue;
            }
            let roles = self.roles.entry(cluster).or_default();
            roles.master = next;
            if next.is_some() {
                roles.term += 1;
            }
            promotions.push(Promotion { cluster, old: current, new: next, term: roles.term });
        }
        if !promotions.is_empty() {
            self.version += 1;
        }
        promotions
    }

    /// The role of a registered node (None if it never registered).
    pub fn assignment_of(&self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Option<Assignment> {
        self.nodes.contains_key(&(kind, cluster, id)).then(|| self.assignment(now, kind, cluster, id))
    }

    fn assignment(&self, now: Instant, kind: Kind, cluster: u32, id: u32) -> Assignment {
        let roles = self.roles.get(&cluster).cloned().unwrap_or_default();
        let server = match kind {
            Kind::Server => id,
            Kind::Synchronizer => self.nodes.get(&(kind, cluster, id)).map_or(0, |e| e.paired_server),
        };
        let is_master = roles.master == Some(server) && self.server_alive(cluster, server, now);
        let slave = if is_master && kind == Kind::Server {
            self.slave(now, cluster).map(|v| (v.id, v.host, v.port))
        } else {
            None
        };
        Assignment { is_master, term: roles.term, version: self.version, slave }
    }

    /// Address of a node, if registered.
    pub fn address(&self, kind: Kind, cluster: u32, id: u32) -> Option<(String, String)> {
        self.nodes.get(&(kind, cluster, id)).map(|e| (e.host.clone(), e.port.clone()))
    }

    /// The live master server of `cluster`.
    pub fn master(&self, now: Instant, cluster: u32) -> Option<NodeView> {
        let id = self.roles.get(&cluster)?.master?;
        self.view(now, Kind::Server, cluster, id).filter(|v| v.alive)
    }

    /// The live slave of `cluster`: the earliest-registered live server that
    /// is not the master.
    pub fn slave(&self, now: Instant, cluster: u32) -> Option<NodeView> {
        let master = self.roles.get(&cluster).and_then(|r| r.master);
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
        let roles = self.roles.get(&cluster).cloned().unwrap_or_default();
        let alive = self.alive(e, now);
        let server = if kind == Kind::Server { id } else { e.paired_server };
        let is_master = alive && roles.master == Some(server) && self.server_alive(cluster, server, now);
        Some(NodeView {
            kind,
            cluster,
            id,
            host: e.host.clone(),
            port: e.port.clone(),
            paired_server: e.paired_server,
            alive,
            is_master,
            term: roles.term,
            last_seen: now.saturating_duration_since(e.last_seen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn server(cluster: u32, id: u32) -> Beat {
        Beat {
            kind: Kind::Server,
            cluster,
            id,
            host: "127.0.0.1".into(),
            port: format!("90{cluster}{id}"),
            paired_server: 0,
            claims_master: false,
            term: 0,
        }
    }

    fn sync(cluster: u32, id: u32, paired: u32) -> Beat {
        Beat { kind: Kind::Synchronizer, paired_server: paired, ..server(cluster, id) }
    }

    #[test]
    fn first_server_is_master_second_is_slave() {
        let t0 = Instant::now();
        let mut table = Table::new(3, T);
        let (a, _, _) = table.heartbeat(t0, &server(2, 1));
        assert!(a.is_master);
        assert_eq!(a.term, 1);
        let (b, _, _) = table.heartbeat(t0, &server(2, 2));
        assert!(!b.is_master);
        assert_eq!(b.term, 1);
        let (a, _, _) = table.heartbeat(t0, &server(2, 1));
        assert_eq!(a.slave, Some((2, "127.0.0.1".into(), "9022".into())));
        assert_eq!(table.master(t0, 2).unwrap().id, 1);
        assert_eq!(table.slave(t0, 2).unwrap().id, 2);
        assert!(table.master(t0, 1).is_none());
    }

    #[test]
    fn dead_master_is_replaced_with_a_new_term() {
        let t0 = Instant::now();
        let mut table = Table::new(3, T);
        table.heartbeat(t0, &server(2, 1));
        table.heartbeat(t0, &server(2, 2));
        // Server 1 goes silent; server 2 keeps beating.
        let t1 = t0 + Duration::from_secs(6);
        let (b, p, _) = table.heartbeat(t1, &server(2, 2));
        assert!(!b.is_master && p.is_empty(), "not dead before the timeout");
        let t2 = t0 + T;
        let (b, p, _) = table.heartbeat(t2, &server(2, 2));
        assert!(b.is_master);
        assert_eq!(b.term, 2);
        assert_eq!(p, vec![Promotion { cluster: 2, old: Some(1), new: Some(2), term: 2 }]);
        assert!(table.slave(t2, 2).is_none());
        // The old master comes back: it registers anew, as slave.
        let (a, _, _) = table.heartbeat(t2, &server(2, 1));
        assert!(!a.is_master);
        assert_eq!(a.term, 2);
        assert_eq!(table.slave(t2, 2).unwrap().id, 1);
    }

    #[test]
    fn a_cluster_with_no_live_server_has_no_master() {
        let t0 = Instant::now();
        let mut table = Table::new(3, T);
        table.heartbeat(t0, &server(1, 1));
        let later = t0 + T * 2;
        let p = table.refresh(later);
        assert_eq!(p, vec![Promotion { cluster: 1, old: Some(1), new: None, term: 1 }]);
        assert!(table.master(later, 1).is_none());
        let (a, _, _) = table.heartbeat(later, &server(1, 1));
        assert!(a.is_master);
        assert_eq!(a.term, 2);
    }

    #[test]
    fn synchronizers_follow_their_server() {
        let t0 = Instant::now();
        let mut table = Table::new(3, T);
        table.heartbeat(t0, &server(1, 1));
        table.heartbeat(t0, &server(1, 2));
        let (s1, _, _) = table.heartbeat(t0, &sync(1, 1, 1));
        let (s4, _, _) = table.heartbeat(t0, &sync(1, 4, 2));
        assert!(s1.is_master && !s4.is_master);
        assert_eq!(table.master_synchronizer(t0, 1).unwrap().id, 1);
        let t1 = t0 + T;
        table.heartbeat(t1, &server(1, 2));
        let (s4, _, _) = table.heartbeat(t1, &sync(1, 4, 2));
        assert!(s4.is_master);
        assert_eq!(table.master_synchronizer(t1, 1).unwrap().id, 4);
        let alive: Vec<u32> =
            table.all(t1).iter().filter(|v| v.kind == Kind::Synchronizer && v.alive).map(|v| v.id).collect();
        assert_eq!(alive, vec![4]);
    }

    #[test]
    fn a_restarted_coordinator_keeps_the_existing_master() {
        let t0 = Instant::now();
        let mut table = Table::starting_at(t0, 3, T);
        // The slave's heartbeat happens to arrive first: it remembers term 4,
        // so a master existed; nobody is elected yet.
        let (b, p, _) = table.heartbeat(t0, &Beat { claims_master: false, term: 4, ..server(3, 2) });
        assert!(!b.is_master && p.is_empty());
        assert!(table.master(t0, 3).is_none());
        // The master reclaims its role under its term.
        let (a, _, _) = table.heartbeat(t0, &Beat { claims_master: true, term: 4, ..server(3, 1) });
        assert!(a.is_master);
        assert_eq!(a.term, 4);
        let (b, _, _) = table.heartbeat(t0, &Beat { term: 4, ..server(3, 2) });
        assert!(!b.is_master);
        assert_eq!(b.term, 4);
    }

    #[test]
    fn after_the_grace_period_the_survivor_is_elected_above_every_known_term() {
        let t0 = Instant::now();
        let mut table = Table::starting_at(t0, 3, T);
        table.heartbeat(t0, &Beat { term: 7, ..server(1, 2) });
        let t1 = t0 + T;
        let (b, p, _) = table.heartbeat(t1, &Beat { term: 7, ..server(1, 2) });
        assert!(b.is_master);
        assert_eq!(b.term, 8, "never reuse a term a node has seen");
        assert_eq!(p.len(), 1);
        // A stale claim (older term) does not unseat it.
        let (a, _, _) = table.heartbeat(t1, &Beat { claims_master: true, term: 7, ..server(1, 1) });
        assert!(!a.is_master);
    }

    #[test]
    fn answers_are_versioned_so_late_ones_can_be_ignored() {
        let t0 = Instant::now();
        let mut table = Table::starting_at(t0, 3, T);
        let (early, _, _) = table.heartbeat(t0, &server(1, 1));
        assert!(early.slave.is_none());
        table.heartbeat(t0, &server(1, 2));
        let (late, _, _) = table.heartbeat(t0, &server(1, 1));
        assert!(late.slave.is_some());
        assert!(late.version > early.version, "the answer naming the slave is newer");
        let v = late.version;
        table.mark_dead(t0, Kind::Server, 1, 2);
        assert!(table.assignment_of(t0, Kind::Server, 1, 1).unwrap().version > v);
    }

    #[test]
    fn a_fresh_deployment_elects_at_once() {
        let t0 = Instant::now();
        let mut table = Table::starting_at(t0, 3, T);
        let (a, _, registered) = table.heartbeat(t0, &server(2, 1));
        assert!(a.is_master && registered);
        let (_, _, registered) = table.heartbeat(t0, &server(2, 1));
        assert!(!registered);
    }

    #[test]
    fn a_node_marked_dead_is_replaced_at_once() {
        let t0 = Instant::now();
        let mut table = Table::starting_at(t0, 3, T);
        table.heartbeat(t0, &server(2, 1));
        table.heartbeat(t0, &server(2, 2));
        let t1 = t0 + Duration::from_millis(10);
        let p = table.mark_dead(t1, Kind::Server, 2, 1);
        assert_eq!(p, vec![Promotion { cluster: 2, old: Some(1), new: Some(2), term: 2 }]);
        assert_eq!(table.assignment_of(t1, Kind::Server, 2, 2).unwrap().term, 2);
        assert!(table.assignment_of(t1, Kind::Server, 2, 2).unwrap().is_master);
        // It comes back: registered anew, as slave.
        let (a, _, registered) = table.heartbeat(t1, &server(2, 1));
        assert!(!a.is_master && registered);
    }
}
