//! From the coordinator's routing table to pod role labels, the
//! SnsCluster's status and the events worth telling: pure functions, so the
//! rules (what counts as Ready, Degraded, a failover) are unit-tested.
//!
//! Conditions, in the standard `metav1.Condition` shape:
//! - `Ready`: the coordinator answers, every cluster has a live master,
//!   every planned server and its synchronizer are alive, and the managed
//!   broker's pod is ready (an external broker is not looked at: the
//!   synchronizers' liveness is what tells of it).
//! - `Progressing`: the current generation has not been Ready yet (a
//!   rollout or scale in flight). Once it has, it stays False for that
//!   generation, and a later loss shows as Degraded instead.
//! - `Degraded`: not Ready although the generation has been rolled out.

use crate::coordinator::{NodeKind, NodeView};
use crate::crd::{ClusterStatus, RolloutStatus, SnsCluster, SnsClusterStatus, SwitchoverStatus};
use crate::render::{LABEL_CLUSTER, LABEL_ROLE, LABEL_SERVER, Names};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

pub const ROLE_MASTER: &str = "master";
pub const ROLE_SLAVE: &str = "slave";
pub const ROLE_UNKNOWN: &str = "unknown";

/// One SNS cluster as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster: u32,
    /// Server id of the live master.
    pub master: Option<u32>,
    pub term: u64,
    /// Live servers (by id).
    pub live: Vec<u32>,
    /// Live synchronizers (by the id of the server each is paired with).
    pub syncs: Vec<u32>,
}

/// The routing table, reduced to what the operator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub clusters: Vec<ClusterView>,
    /// Whether the managed broker is ready (None: not known here, an
    /// external broker).
    pub broker_ready: Option<bool>,
    /// The coordinator's StatefulSet: pods ready and replicas wanted (None:
    /// not looked at). Only a replicated coordinator's leader reports
    /// ready, so one ready pod is a coordinator that serves.
    pub coordinators: Option<(u32, u32)>,
}

impl Observation {
    pub fn from_table(clusters: u32, servers_per_cluster: u32, nodes: &[NodeView]) -> Self {
        let clusters = (1..=clusters)
            .map(|c| {
                let servers = nodes
                    .iter()
                    .filter(|n| n.kind == NodeKind::Server && n.cluster == c && n.id <= servers_per_cluster);
                let live: Vec<u32> = servers.clone().filter(|n| n.alive).map(|n| n.id).collect();
                let master = servers.clone().find(|n| n.alive && n.is_master).map(|n| n.id);
                let term = nodes.iter().filter(|n| n.cluster == c).map(|n| n.term).max().unwrap_or(0);
                let syncs = nodes
                    .iter()
                    .filter(|n| n.kind == NodeKind::Synchronizer && n.cluster == c && n.alive)
                    .filter(|n| (1..=servers_per_cluster).contains(&n.paired_server))
                    .map(|n| n.paired_server)
                    .collect();
                ClusterView { cluster: c, master, term, live, syncs }
            })
            .collect();
        Observation { clusters, broker_ready: None, coordinators: None }
    }

    fn live_syncs(&self) -> usize {
        self.clusters.iter().map(|c| c.syncs.len()).sum()
    }

    pub fn cluster(&self, c: u32) -> Option<&ClusterView> {
        self.clusters.iter().find(|v| v.cluster == c)
    }

    /// The role label a server pod should carry.
    pub fn role_of(&self, cluster: u32, server: u32) -> &'static str {
        match self.cluster(cluster) {
            Some(v) if v.master == Some(server) => ROLE_MASTER,
            Some(v) if v.live.contains(&server) => ROLE_SLAVE,
            _ => ROLE_UNKNOWN,
        }
    }

    fn live_servers(&self) -> usize {
        self.clusters.iter().map(|c| c.live.len()).sum()
    }

    fn masters(&self) -> usize {
        self.clusters.iter().filter(|c| c.master.is_some()).count()
    }
}

/// Server pods whose `sns.io/role` label differs from what the coordinator
/// says: (pod name, new role).
pub fn role_changes(pods: &[Pod], obs: &Observation) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for pod in pods {
        let Some(labels) = pod.metadata.labels.as_ref() else {
            continue;
        };
        let (Some(c), Some(s)) = (
            labels.get(LABEL_CLUSTER).and_then(|v| v.parse().ok()),
            labels.get(LABEL_SERVER).and_then(|v| v.parse().ok()),
        ) else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let role = obs.role_of(c, s);
        if labels.get(LABEL_ROLE).map(String::as_str) != Some(role)
            && let Some(name) = &pod.metadata.name
        {
            out.push((name.clone(), role));
        }
    }
    out.sort();
    out
}

/// An event to publish about the SnsCluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// The next status and what changed, from the current object, what the
/// coordinator said (`Err` = it did not answer) and a planned switchover
/// this reconcile made, if any, and where the rolling update stands (None:
/// not looked at this time, as before).
///
/// A change of master that the last planned switchover explains (its
/// cluster, target and term) is not a failover: no Warning, and
/// `lastFailoverTime` stays.
pub fn next_status(
    obj: &SnsCluster,
    names: &Names,
    obs: std::result::Result<&Observation, &str>,
    switched: Option<&SwitchoverStatus>,
    rollout: Option<&RolloutStatus>,
    now: Timestamp,
) -> (SnsClusterStatus, Vec<Notice>) {
    let spec = &obj.spec;
    let generation = obj.metadata.generation;
    let prev = obj.status.clone().unwrap_or_default();
    let mut notices = Vec::new();
    let last_switchover = switched.cloned().or_else(|| prev.last_switchover.clone());
    let explained = |c: u32, to: Option<u32>, term: u64| {
        last_switchover.as_ref().is_some_and(|s| s.succeeded && s.cluster == c && s.to == to && s.term == Some(term))
    };

    if obj.status.is_none() {
        notices.push(Notice {
            warning: false,
            reason: "Created",
            action: "Create",
            note: format!("rolling out {} clusters x {} servers", spec.clusters, spec.servers_per_cluster),
        });
    } else if let Some(old) = prev.servers_per_cluster
        && old != spec.servers_per_cluster
    {
        notices.push(Notice {
            warning: false,
            reason: "Scaled",
            action: "Scale",
            note: format!("servers per cluster {old} -> {}", spec.servers_per_cluster),
        });
    }

    let planned = (spec.clusters * spec.servers_per_cluster) as usize;
    let mut last_failover = prev.last_failover_time.clone();
    let clusters: Vec<ClusterStatus> = (1..=spec.clusters)
        .map(|c| {
            let before = prev.clusters.iter().find(|s| s.cluster == c);
            let view = obs.ok().and_then(|o| o.cluster(c));
            let Some(view) = view else {
                // No news from the coordinator: keep what we knew.
                return before.cloned().unwrap_or(ClusterStatus { cluster: c, ..Default::default() });
            };
            let master = view.master.map(|s| names.server_pod(c, s));
            if let (Some(old), Some(new)) = (before.and_then(|b| b.master.as_ref()), &master)
                && old != new
                && !explained(c, view.master, view.term)
            {
                last_failover = Some(Time(now));
                notices.push(Notice {
                    warning: true,
                    reason: "Failover",
                    action: "Promote",
                    note: format!("cluster {c}: master {old} -> {new} (term {})", view.term),
                });
            }
            ClusterStatus {
                cluster: c,
                // A cluster without a live master keeps showing its last
                // master, so the next promotion is recognised as a failover.
                master: master.or_else(|| before.and_then(|b| b.master.clone())),
                master_server: view.master.or_else(|| before.and_then(|b| b.master_server)),
                term: Some(view.term),
                live_servers: view.live.len() as u32,
                master_alive: view.master.is_some(),
            }
        })
        .collect();

    let (ready, reason, message) = match obs {
        Err(e) => (false, "CoordinatorUnreachable", format!("routing table unavailable: {e}")),
        Ok(o) if o.coordinators.is_some_and(|(ready, _)| ready == 0) => (
            false,
            "CoordinatorNotReady",
            format!("no pod of {} is ready (a replicated coordinator's leader is)", names.coordinator()),
        ),
        Ok(o) if o.masters() < spec.clusters as usize => {
            (false, "NoMaster", format!("{} of {} clusters have a live master", o.masters(), spec.clusters))
        }
        Ok(o) if o.live_servers() < planned => {
            (false, "ServersDown", format!("{} of {planned} servers are live", o.live_servers()))
        }
        Ok(o) if o.live_syncs() < planned => {
            (false, "SynchronizersDown", format!("{} of {planned} synchronizers are live", o.live_syncs()))
        }
        Ok(o) if o.broker_ready == Some(false) => {
            (false, "BrokerNotReady", format!("the broker {} is not ready", names.rabbitmq()))
        }
        Ok(o) => (
            true,
            "AllServersLive",
            format!(
                "coordinator answering, {planned} servers and {planned} synchronizers live, every cluster has a master{}",
                if o.broker_ready.is_some() { ", the broker ready" } else { "" }
            ),
        ),
    };
    let rolled_out_before = prev
        .conditions
        .iter()
        .any(|c| c.type_ == PROGRESSING && c.status == "False" && c.observed_generation == generation);
    let rollout = rollout.cloned().or_else(|| prev.rollout.clone());
    let updating = rollout.as_ref().filter(|r| r.state != "Done");
    let progressing = updating.is_some() || (!ready && !rolled_out_before);
    let degraded = !ready && !progressing;

    let cond = |type_: &str, on: bool, reason: &str, message: &str| {
        condition(&prev.conditions, type_, on, reason, message, generation, now)
    };
    let conditions = vec![
        cond(READY, ready, reason, &message),
        if let Some(r) = updating {
            let reason = if r.state == "Paused" { "RolloutPaused" } else { "RollingUpdate" };
            cond(PROGRESSING, true, reason, &format!("{} servers updated: {}", r.updated_servers, r.message))
        } else if progressing {
            cond(PROGRESSING, true, "RollingOut", &message)
        } else {
            cond(PROGRESSING, false, "RolledOut", "the current generation has been ready")
        },
        if degraded {
            cond(DEGRADED, true, reason, &message)
        } else {
            cond(DEGRADED, false, "AsExpected", "nothing lost since the rollout")
        },
    ];

    let (ready_servers, masters) = match obs {
        Ok(o) => (Some(format!("{}/{planned}", o.live_servers())), Some(format!("{}/{}", o.masters(), spec.clusters))),
        Err(_) => (prev.ready_servers.clone(), prev.masters.clone()),
    };
    let ready_coordinators = match obs {
        Ok(Observation { coordinators: Some((ready, replicas)), .. }) => Some(format!("{ready}/{replicas}")),
        _ => prev.ready_coordinators.clone(),
    };
    let status = SnsClusterStatus {
        observed_generation: generation,
        conditions,
        servers_per_cluster: Some(spec.servers_per_cluster),
        ready_servers,
        masters,
        ready_coordinators,
        clusters,
        last_failover_time: last_failover,
        last_switchover,
        rollout,
    };
    (status, notices)
}

/// A condition that keeps its lastTransitionTime while its status holds.
fn condition(
    prev: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let since = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cluster, node, server_pod};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn healthy() -> Vec<NodeView> {
        crate::fixtures::healthy_table(3, 2)
    }

    fn cond<'a>(s: &'a SnsClusterStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn observation_picks_live_masters() {
        let mut nodes = healthy();
        nodes[2].alive = false; // cluster 2's master died...
        nodes[2].is_master = false;
        nodes[3].is_master = true; // ...and server 2 took over
        nodes[3].term = 2;
        nodes.push(NodeView { kind: NodeKind::Synchronizer, ..node(1, 7, true, true, 1) });
        let o = Observation::from_table(3, 2, &nodes);
        assert_eq!(o.cluster(2).unwrap().master, Some(2));
        assert_eq!(o.cluster(2).unwrap().live, vec![2]);
        assert_eq!(o.cluster(2).unwrap().term, 2);
        assert_eq!(o.role_of(2, 1), ROLE_UNKNOWN);
        assert_eq!(o.role_of(2, 2), ROLE_MASTER);
        assert_eq!(o.role_of(1, 2), ROLE_SLAVE);
        assert_eq!(o.live_servers(), 5);
        assert_eq!(o.masters(), 3);
    }

    #[test]
    fn a_planned_switchover_is_not_a_failover() {
        let mut obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        obj.status =
            Some(next_status(&obj, &names, Ok(&Observation::from_table(3, 2, &healthy())), None, None, at(0)).0);
        let mut nodes = healthy();
        nodes[2].is_master = false;
        nodes[3].is_master = true;
        nodes[2].term = 2;
        nodes[3].term = 2;
        let o = Observation::from_table(3, 2, &nodes);
        let record = SwitchoverStatus {
            cluster: 2,
            requested_by: "annotation".into(),
            request: Some("2".into()),
            from: Some(1),
            to: Some(2),
            term: Some(2),
            succeeded: true,
            message: "done".into(),
            time: Time(at(1)),
        };
        let (s, notices) = next_status(&obj, &names, Ok(&o), Some(&record), None, at(1));
        assert!(notices.is_empty(), "{notices:?}");
        assert!(s.last_failover_time.is_none());
        assert_eq!(s.last_switchover.as_ref(), Some(&record));
        // Kept by later polls, and it explains only that change: a later
        // promotion under another term is a failover.
        obj.status = Some(s);
        let (s, _) = next_status(&obj, &names, Ok(&o), None, None, at(2));
        assert_eq!(s.last_switchover.as_ref(), Some(&record));
        obj.status = Some(s);
        for n in nodes.iter_mut().filter(|n| n.cluster == 2) {
            n.is_master = n.id == 1;
            n.term = 3;
        }
        let (s, notices) = next_status(&obj, &names, Ok(&Observation::from_table(3, 2, &nodes)), None, None, at(3));
        assert_eq!(notices[0].reason, "Failover");
        assert_eq!(s.last_failover_time, Some(Time(at(3))));
    }

    #[test]
    fn ready_needs_synchronizers_and_the_broker_too() {
        let obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        let ready = |o: &Observation| {
            let (s, _) = next_status(&obj, &names, Ok(o), None, None, at(0));
            let c = cond(&s, READY).clone();
            (c.status, c.reason, c.message)
        };
        let mut nodes = healthy();
        let all = Observation { broker_ready: Some(true), ..Observation::from_table(3, 2, &nodes) };
        let (on, reason, message) = ready(&all);
        assert_eq!((on.as_str(), reason.as_str()), ("True", "AllServersLive"));
        assert!(message.contains("6 synchronizers") && message.contains("broker ready"), "{message}");
        // One synchronizer gone.
        let sync = nodes.iter().position(|n| n.kind == NodeKind::Synchronizer && n.cluster == 2).unwrap();
        nodes[sync].alive = false;
        let o = Observation { broker_ready: Some(true), ..Observation::from_table(3, 2, &nodes) };
        let (on, reason, message) = ready(&o);
        assert_eq!(
            (on.as_str(), reason.as_str(), message.as_str()),
            ("False", "SynchronizersDown", "5 of 6 synchronizers are live")
        );
        // The broker not ready.
        let o = Observation { broker_ready: Some(false), ..all.clone() };
        let (on, reason, message) = ready(&o);
        assert_eq!((on.as_str(), reason.as_str()), ("False", "BrokerNotReady"));
        assert!(message.contains("demo-rabbitmq"), "{message}");
        // An external broker is not looked at.
        let o = Observation { broker_ready: None, ..all };
        assert_eq!(ready(&o).0, "True");
        // A synchronizer of a server that scale-down removed does not count.
        let mut extra = healthy();
        extra.retain(|n| !(n.kind == NodeKind::Synchronizer && n.paired_server == 2 && n.cluster == 1));
        extra.push(NodeView { kind: NodeKind::Synchronizer, paired_server: 3, ..node(1, 99, true, false, 1) });
        let o = Observation { broker_ready: Some(true), ..Observation::from_table(3, 2, &extra) };
        assert_eq!(ready(&o).1, "SynchronizersDown");
    }

    #[test]
    fn only_wrong_labels_are_patched() {
        let o = Observation::from_table(3, 2, &healthy());
        let pods = vec![
            server_pod("demo", 1, 1, Some("master")),
            server_pod("demo", 1, 2, Some("master")),
            server_pod("demo", 2, 1, None),
            server_pod("demo", 2, 2, Some("slave")),
        ];
        assert_eq!(
            role_changes(&pods, &o),
            vec![("demo-server-1-2-0".to_string(), "slave"), ("demo-server-2-1-0".to_string(), "master"),]
        );
    }

    #[test]
    fn first_status_is_progressing_then_ready() {
        let obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        let empty = Observation::from_table(3, 2, &[]);
        let (s, notices) = next_status(&obj, &names, Ok(&empty), None, None, at(0));
        assert_eq!(notices[0].reason, "Created");
        assert_eq!(cond(&s, READY).status, "False");
        assert_eq!(cond(&s, READY).reason, "NoMaster");
        assert_eq!(cond(&s, PROGRESSING).status, "True");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.masters.as_deref(), Some("0/3"));
        assert_eq!(s.observed_generation, Some(1));

        let mut obj = obj;
        obj.status = Some(s);
        let o = Observation::from_table(3, 2, &healthy());
        let (s, notices) = next_status(&obj, &names, Ok(&o), None, None, at(10));
        assert!(notices.is_empty(), "{notices:?}");
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, READY).last_transition_time, Time(at(10)));
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(s.ready_servers.as_deref(), Some("6/6"));
        assert_eq!(s.clusters[1].master.as_deref(), Some("demo-server-2-1-0"));
        assert_eq!(s.clusters[1].term, Some(1));

        // Nothing changes: nothing moves, not even the transition times.
        obj.status = Some(s.clone());
        let (again, _) = next_status(&obj, &names, Ok(&o), None, None, at(20));
        assert_eq!(again, s);
    }

    #[test]
    fn a_new_master_is_a_failover() {
        let mut obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        let o = Observation::from_table(3, 2, &healthy());
        obj.status = Some(next_status(&obj, &names, Ok(&o), None, None, at(0)).0);
        obj.status = Some(next_status(&obj, &names, Ok(&o), None, None, at(1)).0);

        // The master of cluster 2 is gone and not yet replaced.
        let mut nodes = healthy();
        nodes[2].alive = false;
        nodes[2].is_master = false;
        let o = Observation::from_table(3, 2, &nodes);
        let (s, notices) = next_status(&obj, &names, Ok(&o), None, None, at(5));
        assert!(notices.is_empty());
        assert_eq!(cond(&s, READY).reason, "NoMaster");
        assert_eq!(cond(&s, DEGRADED).status, "True", "it had been rolled out");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(s.clusters[1].master.as_deref(), Some("demo-server-2-1-0"));
        assert!(!s.clusters[1].master_alive);
        assert_eq!(s.masters.as_deref(), Some("2/3"));
        obj.status = Some(s);

        // The slave is promoted under term 2.
        nodes[3].is_master = true;
        for n in nodes.iter_mut().filter(|n| n.cluster == 2) {
            n.term = 2;
        }
        let o = Observation::from_table(3, 2, &nodes);
        let (s, notices) = next_status(&obj, &names, Ok(&o), None, None, at(7));
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].reason, "Failover");
        assert!(notices[0].note.contains("demo-server-2-1-0 -> demo-server-2-2-0"));
        assert_eq!(s.last_failover_time, Some(Time(at(7))));
        assert_eq!(s.clusters[1].master.as_deref(), Some("demo-server-2-2-0"));
        assert_eq!(s.clusters[1].term, Some(2));
        assert_eq!(cond(&s, READY).reason, "ServersDown");
    }

    #[test]
    fn unreachable_coordinator_keeps_the_last_known_masters() {
        let mut obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        let o = Observation::from_table(3, 2, &healthy());
        obj.status = Some(next_status(&obj, &names, Ok(&o), None, None, at(0)).0);
        let (s, notices) = next_status(&obj, &names, Err("connection refused"), None, None, at(3));
        assert!(notices.is_empty());
        assert_eq!(cond(&s, READY).reason, "CoordinatorUnreachable");
        assert_eq!(s.clusters, obj.status.as_ref().unwrap().clusters);
    }

    #[test]
    fn scaling_is_announced() {
        let mut obj = cluster("demo", serde_json::json!({}));
        let names = Names::of(&obj).unwrap();
        let o = Observation::from_table(3, 2, &healthy());
        obj.status = Some(next_status(&obj, &names, Ok(&o), None, None, at(0)).0);
        obj.spec.servers_per_cluster = 1;
        obj.metadata.generation = Some(2);
        let o = Observation::from_table(3, 1, &healthy());
        let (s, notices) = next_status(&obj, &names, Ok(&o), None, None, at(1));
        assert_eq!(notices[0].reason, "Scaled");
        assert_eq!(notices[0].note, "servers per cluster 2 -> 1");
        assert_eq!(s.servers_per_cluster, Some(1));
        assert_eq!(s.ready_servers.as_deref(), Some("3/3"));
        assert_eq!(cond(&s, READY).observed_generation, Some(2));
    }
}
