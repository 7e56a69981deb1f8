//! Roles, heartbeats, leases and the serving flag: what the coordinator
//! last told this server, and whether it may serve clients now.
//!
//! Why together: a server serves only while all of these hold — the
//! coordinator made it master, its lease (counted from when the renewing
//! heartbeat was sent) has not run out, and its journal can be written and
//! trusted. Whatever changes one of them recomputes the serving flag
//! ([`Node::update_serving`]), and [`serving_loop`] flips it off the
//! instant a lease runs out, which ends timeline streams and tells the
//! synchronizer. A role is only adopted forward: never an older term, and
//! within a term never an older answer.

use super::{Node, Role, lock};
use crate::error::{Error, Result};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::LeaseRequest;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// While a master has no slave it asks this often, so a slave that just
/// registered starts receiving writes within a fraction of a second rather
/// than a whole heartbeat period (the course's 5 s).
const SLAVE_DISCOVERY: Duration = Duration::from_millis(200);

impl Node {
    /// Whether this server holds a lease that has not run out.
    pub fn lease_valid(&self) -> bool {
        self.0.lease.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Sends one heartbeat and adopts the role it returns; a master's
    /// heartbeat renews its lease, counted from when it was sent.
    pub async fn heartbeat(&self) -> Result<Role> {
        let current = self.role();
        let (incarnation, damaged) = (self.incarnation(), self.damage().is_some());
        let (next_seq, remote_events) = self.read(|s| (s.next_seq(), s.received_total()));
        let confirmed = self.confirmed();
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
            tail_cut: self.tail_cut().is_some(),
            unconfirmed: !confirmed,
            next_seq,
            remote_events,
            // A restarted master checking its journal says why it waits,
            // for the routing table and GetServer.
            unavailable_reason: if self.unverified() { self.unverified_reason() } else { String::new() },
            link_down: String::new(),
            // (A coordinator run behind it raises its epoch above it.)
            coordinator_epoch: current.version.0 as i64,
        };
        let sent = Instant::now();
        let reply = CoordServiceClient::new(self.0.coord.clone()).heartbeat(info).await?.into_inner();
        if confirmed {
            self.0.confirmed_heard.send_replace(true);
        }
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
            if cur.term == 0 && role.term > 0 {
                // The first term this run hears of began before it: should
                // this server be (or become) its master, it restarted
                // within its term, and whatever its journal lost since the
                // last run only the in-sync peers can tell.
                self.0.unverified.store(role.term, Ordering::Relaxed);
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
            if !role.is_master || role.term != cur.term {
                // A lease belongs to one term of mastership.
                self.0.lease.send_replace(None);
            }
            *cur = role;
            true
        });
        same
    }

    /// A planned switchover: stops acting as master of `term` as if the
    /// coordinator said so at `version`, then waits for the write under
    /// way (if any) to finish, so every write this server will ever
    /// acknowledge under `term` is decided. Refused when the coordinator
    /// made it master again after asking (a newer answer).
    pub async fn step_down(&self, term: u64, version: (u64, u64)) -> Result<u64> {
        let cur = self.role();
        if cur.term == term && cur.is_master && cur.version > version {
            return Err(Error::StaleTerm(format!(
                "server {} was made master of term {term} again after the switchover began",
                self.0.cfg.id
            )));
        }
        if cur.term <= term {
            let stepped = Role { is_master: false, term, slave: None, version, ..Role::default() };
            if self.adopt(stepped) && cur.is_master {
                tracing::info!(term, "stepped down for a switchover");
            }
        }
        self.update_serving();
        // The writer holds the lane for the whole of a group: once we hold
        // it, any group begun as master is journaled and forwarded (or
        // failed), and later ones find this server not serving.
        drop(self.0.lane.lock().await);
        Ok(self.read(|s| s.next_seq()))
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
        if self.unverified() {
            return Some(self.unverified_reason());
        }
        None
    }

    /// Why a master restarted within its term serves nothing yet.
    fn unverified_reason(&self) -> String {
        let why = lock(&self.0.unverified_why).clone();
        if !why.is_empty() {
            return why;
        }
        format!(
            "server {} of cluster {} restarted as master of term {}: it compares its journal with its in-sync servers before it serves",
            self.0.cfg.id,
            self.0.cfg.cluster,
            self.role().term
        )
    }

    /// Fails unless this server may serve clients now: the master, with a
    /// current lease, able to write. One that is not asks the coordinator
    /// first (it may just have been promoted, or need its lease renewed).
    pub async fn ensure_serving(&self) -> Result<Role> {
        if self.not_serving().is_some() && self.unwritable().is_none() && self.damage().is_none() {
            // Bounded: a master cut off from the coordinator must answer
            // its clients at once, not when the call times out.
            let _ = tokio::time::timeout(self.patience(), self.heartbeat()).await;
        }
        match self.not_serving() {
            None => {
                let role = self.role();
                crate::telemetry::record_term(role.term);
                Ok(role)
            }
            Some(why) => Err(Error::NotServing(why)),
        }
    }

    /// Recomputes whether this server serves clients.
    pub(super) fn update_serving(&self) {
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
}

/// Heartbeats until shutdown; the first one registers. A master renews its
/// lease four times per lease period.
pub(super) async fn heartbeat_loop(node: Node, shutdown: CancellationToken) {
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
pub(super) async fn serving_loop(node: Node, shutdown: CancellationToken) {
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

/// Holds the lease stream to the coordinator open, adopting every role it
/// pushes; reopens it when it breaks (a coordinator restart). A push never
/// grants a lease: only a heartbeat's round trip bounds one.
pub(super) async fn lease_loop(node: Node, shutdown: CancellationToken) {
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

/// The gRPC health service a readiness probe asks: SERVING while this
/// server does its part — a master serving clients on a current lease, or
/// a slave that installed its master's state under the current term and
/// takes its writes — and NOT_SERVING while it is catching up, fenced,
/// without a role, or unable to trust or write its journal.
pub const READINESS_SERVICE: &str = "readiness";

/// Whether this server is ready, in the sense of [`READINESS_SERVICE`].
fn ready(node: &Node) -> bool {
    if node.damage().is_some() || node.unwritable().is_some() {
        return false;
    }
    let role = node.role();
    if role.is_master { *node.0.serving.borrow() } else { role.term > 0 && node.synced_term() == role.term }
}

/// Keeps the health service current. Three names answer: "" (the process
/// is up: liveness, and the coordinator's probe), [`READINESS_SERVICE`],
/// and `csce438.SNSService` (SERVING only while this server takes client
/// requests: the master).
pub(super) async fn health_loop(node: Node, health: tonic_health::server::HealthReporter, shutdown: CancellationToken) {
    use tonic_health::ServingStatus::{NotServing, Serving};
    let status = |on: bool| if on { Serving } else { NotServing };
    health.set_service_status("", Serving).await;
    let mut serving = node.watch_serving();
    let mut role = node.watch_role();
    let mut last: Option<(bool, bool)> = None;
    loop {
        // One statement per borrow: a watch's read guard held while
        // `ready` reads the same watch deadlocks against a writer waiting
        // in between.
        let serving_now = *serving.borrow_and_update();
        role.borrow_and_update();
        let now = (serving_now, ready(&node));
        if last != Some(now) {
            health.set_service_status(READINESS_SERVICE, status(now.1)).await;
            health
                .set_service_status(
                    <sns_proto::csce438::sns_service_server::SnsServiceServer<super::sns::Sns> as tonic::server::NamedService>::NAME,
                    status(now.0),
                )
                .await;
            last = Some(now);
        }
        // A slave's catch-up and a disk's health change without a watch:
        // look again within a fraction of a probe period.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = serving.changed() => if r.is_err() { return },
            r = role.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Keeps the `sns_master` and `sns_term` gauges on the current role.
pub(super) async fn role_metrics_loop(node: Node, shutdown: CancellationToken) {
    let mut role = node.watch_role();
    loop {
        let (is_master, term) = {
            let r = role.borrow_and_update();
            (r.is_master, r.term)
        };
        let m = crate::metrics::get();
        m.master.set(i64::from(is_master));
        m.term.set(i64::try_from(term).unwrap_or(i64::MAX));
        if !is_master {
            // Lag is a master's view of its slave.
            m.replication_lag_records.set(0);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = role.changed() => if changed.is_err() { return },
        }
    }
}
