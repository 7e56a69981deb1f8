//! Rolling updates of the servers, one server at a time, decided by the
//! operator rather than the StatefulSet controller.
//!
//! Each server has a StatefulSet of one replica whose `RollingUpdate`
//! partition is 1 while its pod must wait: a new template is then held, and
//! a pod that restarts meanwhile comes back as it was. The operator lets
//! one server go by applying its StatefulSet with partition 0, and the
//! StatefulSet controller replaces the pod ([`partitions`]). The operator
//! deletes no pod itself (it is not allowed to).
//!
//! A pod is up to date when its `sns.io/template-hash` annotation is the
//! one its StatefulSet's template now carries. Anything that changes the
//! template (the image, including the operator's own `SNS_OPERATOR_IMAGE`
//! when the spec names none, settings, resources) rolls the same way:
//!
//! 1. one cluster at a time, lowest id first;
//! 2. its slave is updated (its StatefulSet makes a new pod from the
//!    current template), and nothing else happens until that server is
//!    Ready again: its readiness probe asks the `readiness` health service,
//!    which is NOT_SERVING until the server has caught up with its master;
//! 3. the master role is handed to the updated slave (a planned switchover:
//!    no acknowledged write lost, writes wait a moment instead of failing
//!    over on missed heartbeats);
//! 4. the old master, now a slave, is updated and waited for the same way.
//!
//! A cluster of one server has no one to hand the role to: its pod is
//! replaced and its clients wait for it to come back.
//!
//! Each poll takes at most one step, and only when everything is healthy:
//! every planned server's pod Ready, live and in sync by the coordinator,
//! every cluster with a live master that the spec keeps (a scale-down
//! moves the role first: see [`crate::scale`]). Otherwise the rollout waits (an
//! updated server still catching up) or pauses (something else is wrong),
//! and says why in `status.rollout`.
//!
//! [`plan`] is a pure function of what the operator observes, so the order
//! and the pauses are unit-tested; the controller carries its step out.

use crate::coordinator::{NodeKind, NodeView};
use crate::crd::RolloutStatus;
use crate::render::{Child, LABEL_CLUSTER, LABEL_SERVER, Names, Rendered, TEMPLATE_HASH};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use std::collections::BTreeMap;

/// What the rollout does on this poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Every planned server runs its current template.
    Done,
    /// Let this server's StatefulSet replace its pod (partition 0).
    Update { cluster: u32, server: u32, pod: String },
    /// Hand the cluster's master role to this updated server first.
    Switchover { cluster: u32, to: u32 },
    /// An update is under way: wait for it (why).
    Wait(String),
    /// Something unrelated to the update is unhealthy: nothing is touched
    /// until it is fixed (why).
    Paused(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub step: Step,
    /// Planned servers whose pod runs the current template.
    pub updated: u32,
    pub total: u32,
    /// Servers per cluster.
    pub per_cluster: u32,
}

impl Plan {
    /// The plan as `status.rollout` shows it.
    pub fn status(&self, names: &Names) -> RolloutStatus {
        let (state, message) = match &self.step {
            Step::Done => ("Done", "every server runs the current template".to_string()),
            Step::Update { cluster, server, .. } if self.per_cluster == 1 => (
                "Updating",
                format!(
                    "updating {} (a cluster of one server: its clients wait for it)",
                    names.server_pod(*cluster, *server)
                ),
            ),
            Step::Update { cluster, server, .. } => {
                ("Updating", format!("updating {}", names.server_pod(*cluster, *server)))
            }
            Step::Switchover { cluster, to } => {
                ("Updating", format!("cluster {cluster}: handing the master role to the updated server {to}"))
            }
            Step::Wait(why) => ("Updating", why.clone()),
            Step::Paused(why) => ("Paused", why.clone()),
        };
        RolloutStatus { state: state.into(), updated_servers: format!("{}/{}", self.updated, self.total), message }
    }
}

/// Each planned server's current template hash, from the rendered
/// StatefulSets: (cluster, server) -> hash.
pub fn wanted_hashes(rendered: &Rendered) -> BTreeMap<(u32, u32), String> {
    rendered
        .children
        .iter()
        .filter_map(|c| match c {
            Child::StatefulSet(s) => Some(s),
            _ => None,
        })
        .filter_map(|s| {
            let key = server_of(s)?;
            let hash = s.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(TEMPLATE_HASH)?;
            Some((key, hash.clone()))
        })
        .collect()
}

/// (cluster, server) of a server's StatefulSet, by its labels.
pub fn server_of(sts: &StatefulSet) -> Option<(u32, u32)> {
    let labels = sts.metadata.labels.as_ref()?;
    Some((labels.get(LABEL_CLUSTER)?.parse().ok()?, labels.get(LABEL_SERVER)?.parse().ok()?))
}

/// The server pod of (cluster, server) among `pods`, by its labels.
pub fn pod_of(pods: &[Pod], cluster: u32, server: u32) -> Option<&Pod> {
    pods.iter().find(|p| {
        let l = p.metadata.labels.as_ref();
        let get = |k: &str| l.and_then(|l| l.get(k)).and_then(|v| v.parse::<u32>().ok());
        get(LABEL_CLUSTER) == Some(cluster) && get(LABEL_SERVER) == Some(server)
    })
}

/// Ready by the kubelet (its readiness probe passes) and not going away.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodState {
    /// Runs the current template.
    Current,
    /// Runs an older one.
    Old,
    /// No pod, or one being deleted: its StatefulSet is making it anew.
    Gone,
}

/// The next step of the rolling update. `wanted` holds every planned
/// server's hash; `table` is the coordinator's routing table.
pub fn plan(wanted: &BTreeMap<(u32, u32), String>, pods: &[Pod], table: &[NodeView], names: &Names) -> Plan {
    Inputs { wanted, pods, table, names }.decide()
}

struct Inputs<'a> {
    wanted: &'a BTreeMap<(u32, u32), String>,
    pods: &'a [Pod],
    table: &'a [NodeView],
    names: &'a Names,
}

impl Inputs<'_> {
    fn state(&self, c: u32, s: u32) -> PodState {
        match pod_of(self.pods, c, s) {
            None => PodState::Gone,
            Some(p) if p.metadata.deletion_timestamp.is_some() => PodState::Gone,
            Some(p) => {
                let hash = p.metadata.annotations.as_ref().and_then(|a| a.get(TEMPLATE_HASH));
                if hash == self.wanted.get(&(c, s)) { PodState::Current } else { PodState::Old }
            }
        }
    }

    fn node(&self, c: u32, s: u32) -> Option<&NodeView> {
        self.table.iter().find(|n| n.kind == NodeKind::Server && n.cluster == c && n.id == s)
    }

    fn decide(self) -> Plan {
        let total = self.wanted.len() as u32;
        let per_cluster = self.wanted.keys().map(|(_, s)| *s).max().unwrap_or(0);
        let updated = self.wanted.keys().filter(|(c, s)| self.state(*c, *s) == PodState::Current).count() as u32;
        let step = self.step(per_cluster);
        Plan { step, updated, total, per_cluster }
    }

    fn step(&self, per_cluster: u32) -> Step {
        let old: Vec<(u32, u32)> =
            self.wanted.keys().copied().filter(|(c, s)| self.state(*c, *s) == PodState::Old).collect();
        let Some(&(cluster, _)) = old.first() else {
            // Nothing to delete; pods still being made are its last steps.
            return match self.wanted.keys().find(|(c, s)| self.state(*c, *s) == PodState::Gone) {
                Some(&(c, s)) => Step::Wait(format!("waiting for {} to be made", self.names.server_pod(c, s))),
                None => Step::Done,
            };
        };
        // Health first: an updated server still coming back is the update
        // under way (wait); anything else wrong pauses it.
        for &(c, s) in self.wanted.keys() {
            let pod = self.names.server_pod(c, s);
            let state = self.state(c, s);
            let hold = |why: String| if state == PodState::Old { Step::Paused(why) } else { Step::Wait(why) };
            if state == PodState::Gone {
                return Step::Wait(format!("waiting for {pod} to be made anew"));
            }
            if !pod_of(self.pods, c, s).is_some_and(is_ready) {
                return hold(if state == PodState::Current {
                    format!("waiting for {pod} to be ready (it is not until it has caught up with its master)")
                } else {
                    format!("{pod} is not ready")
                });
            }
            match self.node(c, s) {
                Some(n) if n.alive && (n.in_sync || per_cluster == 1) => {}
                Some(n) if n.alive => return hold(format!("{pod} is not in sync with its master yet")),
                _ => return hold(format!("the coordinator does not count {pod} as live")),
            }
        }
        let master_of = |c: u32| {
            self.table
                .iter()
                .find(|n| n.kind == NodeKind::Server && n.cluster == c && n.alive && n.is_master)
                .map(|n| n.id)
        };
        if let Some(c) = self.wanted.keys().map(|(c, _)| *c).find(|c| master_of(*c).is_none()) {
            return Step::Paused(format!("cluster {c} has no live master"));
        }
        if let Some((c, m)) = self
            .wanted
            .keys()
            .filter_map(|(c, _)| Some((*c, master_of(*c)?)))
            .find(|(c, m)| !self.wanted.contains_key(&(*c, *m)))
        {
            return Step::Paused(format!("cluster {c}'s master is server {m}, which the scale-down removes first"));
        }
        // A server the spec no longer wants must be gone, and recorded out
        // of sync by its master, before any pod is replaced: a staying
        // server updated while the leaving one still runs could see it
        // promoted in its place just before it goes, and a master restarted
        // while its removed slave still counts as in sync waits for that
        // slave (it may hold writes the master's disk lost), which never
        // comes back. Its master records it out of sync at its next write,
        // or after ten heartbeats (at least 10 s) without one.
        if let Some(n) = self.table.iter().find(|n| {
            n.kind == NodeKind::Server && !self.wanted.contains_key(&(n.cluster, n.id)) && (n.alive || n.in_sync)
        }) {
            let why = if n.alive { "still runs" } else { "is gone, not yet recorded out of sync by its master" };
            return Step::Wait(format!(
                "the scale-down removes {} first: it {why}",
                self.names.server_pod(n.cluster, n.id)
            ));
        }
        let master = master_of(cluster);
        let in_cluster: Vec<u32> = old.iter().filter(|(c, _)| *c == cluster).map(|(_, s)| *s).collect();
        if let Some(&server) = in_cluster.iter().find(|s| Some(**s) != master) {
            return Step::Update { cluster, server, pod: self.names.server_pod(cluster, server) };
        }
        // Only the master runs the old template.
        let to = self
            .wanted
            .keys()
            .filter(|(c, s)| *c == cluster && Some(*s) != master && self.state(*c, *s) == PodState::Current)
            .map(|(_, s)| *s)
            .next();
        match (to, master) {
            (Some(to), _) => Step::Switchover { cluster, to },
            (None, Some(server)) => Step::Update { cluster, server, pod: self.names.server_pod(cluster, server) },
            (None, None) => Step::Paused(format!("cluster {cluster} has no live master")),
        }
    }
}

/// Each planned server's StatefulSet partition: 0 lets its pod run the
/// current template, 1 holds it. 0 for a pod that already runs it (were
/// it held, a restart would bring the old template back), for a pod being
/// made (it is made from the current one), and for the server `step`
/// updates now; 1 for every other pod that runs an older template.
pub fn partitions(
    wanted: &BTreeMap<(u32, u32), String>,
    pods: &[Pod],
    step: Option<&Step>,
) -> BTreeMap<(u32, u32), i32> {
    wanted
        .iter()
        .map(|(&(c, s), hash)| {
            let pod = pod_of(pods, c, s).filter(|p| p.metadata.deletion_timestamp.is_none());
            let old =
                pod.is_some_and(|p| p.metadata.annotations.as_ref().and_then(|a| a.get(TEMPLATE_HASH)) != Some(hash));
            let now = matches!(step, Some(Step::Update { cluster, server, .. }) if (*cluster, *server) == (c, s));
            ((c, s), if old && !now { 1 } else { 0 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cluster, healthy_table, rolled_pod};
    use std::collections::BTreeMap;

    fn names() -> Names {
        Names::of(&cluster("demo", serde_json::json!({}))).unwrap()
    }

    fn wanted(clusters: u32, servers: u32) -> BTreeMap<(u32, u32), String> {
        let mut w = BTreeMap::new();
        for c in 1..=clusters {
            for s in 1..=servers {
                w.insert((c, s), format!("new-{c}-{s}"));
            }
        }
        w
    }

    fn pod(c: u32, s: u32, hash: &str, ready: bool) -> Pod {
        rolled_pod("demo", c, s, hash, ready)
    }

    fn old_pods(clusters: u32, servers: u32) -> Vec<Pod> {
        let mut v = Vec::new();
        for c in 1..=clusters {
            for s in 1..=servers {
                v.push(pod(c, s, "old", true));
            }
        }
        v
    }

    /// Runs the rollout to its end against a simulated world (a deleted pod
    /// comes back with the current template, first not ready, then ready;
    /// a switchover moves the master), recording each action; after every
    /// action the plan must wait rather than act again.
    fn simulate(servers: u32, mut table: Vec<NodeView>) -> Vec<String> {
        let names = names();
        let w = wanted(2, servers);
        let mut pods = old_pods(2, servers);
        let mut actions = Vec::new();
        for _ in 0..100 {
            let p = plan(&w, &pods, &table, &names);
            match p.step {
                Step::Done => {
                    assert_eq!((p.updated, p.total), (2 * servers, 2 * servers));
                    return actions;
                }
                Step::Update { cluster, server, pod: name } => {
                    assert_eq!(name, format!("demo-server-{cluster}-{server}-0"));
                    actions.push(format!("delete {cluster}/{server}"));
                    let i = pods.iter().position(|p| pod_of(std::slice::from_ref(p), cluster, server).is_some());
                    pods.remove(i.unwrap());
                    let gone = plan(&w, &pods, &table, &names);
                    assert!(matches!(gone.step, Step::Wait(ref m) if m.contains("made")), "{gone:?}");
                    let mut fresh = pod(cluster, server, &w[&(cluster, server)], false);
                    pods.push(fresh.clone());
                    let catching_up = plan(&w, &pods, &table, &names);
                    if catching_up.updated < catching_up.total {
                        assert!(
                            matches!(catching_up.step, Step::Wait(ref m) if m.contains("caught up")),
                            "{catching_up:?}"
                        );
                    } else {
                        // The last one: nothing left to delete (Ready tells
                        // when it is back).
                        assert_eq!(catching_up.step, Step::Done);
                    }
                    fresh = pod(cluster, server, &w[&(cluster, server)], true);
                    *pods.last_mut().unwrap() = fresh;
                }
                Step::Switchover { cluster, to } => {
                    actions.push(format!("switch {cluster}->{to}"));
                    for n in table.iter_mut().filter(|n| n.cluster == cluster) {
                        n.is_master = n.id == to;
                        n.term += 1;
                    }
                }
                other => panic!("the healthy rollout stopped: {other:?} after {actions:?}"),
            }
        }
        panic!("no end: {actions:?}");
    }

    #[test]
    fn slave_first_then_switchover_then_the_old_master_one_cluster_at_a_time() {
        assert_eq!(
            simulate(2, healthy_table(2, 2)),
            ["delete 1/2", "switch 1->2", "delete 1/1", "delete 2/2", "switch 2->2", "delete 2/1"]
        );
        // Whoever is master: its slave goes first.
        let mut table = healthy_table(2, 2);
        table[2].is_master = false;
        table[3].is_master = true;
        assert_eq!(
            simulate(2, table),
            ["delete 1/2", "switch 1->2", "delete 1/1", "delete 2/1", "switch 2->1", "delete 2/2"]
        );
    }

    #[test]
    fn a_cluster_of_one_server_is_restarted_in_place() {
        assert_eq!(simulate(1, healthy_table(2, 1)), ["delete 1/1", "delete 2/1"]);
        let p = plan(&wanted(2, 1), &old_pods(2, 1), &healthy_table(2, 1), &names());
        assert!(p.status(&names()).message.contains("clients wait"), "{:?}", p.status(&names()));
    }

    #[test]
    fn anything_unhealthy_pauses_it_and_says_why() {
        let names = names();
        let w = wanted(2, 2);
        let paused = |pods: &[Pod], table: &[NodeView]| match plan(&w, pods, table, &names).step {
            Step::Paused(why) => why,
            other => panic!("not paused: {other:?}"),
        };
        // A server of cluster 2, not yet updated, is not ready: not even
        // cluster 1 is touched.
        let mut pods = old_pods(2, 2);
        pods[3] = pod(2, 2, "old", false);
        assert_eq!(paused(&pods, &healthy_table(2, 2)), "demo-server-2-2-0 is not ready");
        // Dead by the coordinator, out of sync, a cluster without master.
        let mut table = healthy_table(2, 2);
        table[1].alive = false;
        assert!(paused(&old_pods(2, 2), &table).contains("does not count demo-server-1-2-0 as live"));
        let mut table = healthy_table(2, 2);
        table[3].in_sync = false;
        assert!(paused(&old_pods(2, 2), &table).contains("demo-server-2-2-0 is not in sync"));
        let mut table = healthy_table(2, 2);
        table[2].is_master = false;
        assert_eq!(paused(&old_pods(2, 2), &table), "cluster 2 has no live master");
        // The status says so.
        let s = plan(&w, &pods, &healthy_table(2, 2), &names).status(&names);
        assert_eq!((s.state.as_str(), s.updated_servers.as_str()), ("Paused", "0/4"));
    }

    #[test]
    fn nothing_to_do_when_every_pod_is_current() {
        let names = names();
        let w = wanted(2, 2);
        let pods: Vec<Pod> = w.iter().map(|(&(c, s), h)| pod(c, s, h, true)).collect();
        let p = plan(&w, &pods, &healthy_table(2, 2), &names);
        assert_eq!((p.step.clone(), p.updated), (Step::Done, 4));
        assert_eq!(p.status(&names).state, "Done");
        // A current pod that is down is no rollout's business (Ready says so).
        let mut down = pods.clone();
        down[0] = pod(1, 1, &w[&(1, 1)], false);
        assert_eq!(plan(&w, &down, &healthy_table(2, 2), &names).step, Step::Done);
        // A pod still missing is the rollout's last step (a new server).
        assert!(matches!(plan(&w, &pods[1..], &healthy_table(2, 2), &names).step, Step::Wait(_)));
    }

    #[test]
    fn only_current_making_and_the_next_pods_are_let_go() {
        let w = wanted(1, 2);
        let pods = vec![pod(1, 1, "old", true), pod(1, 2, &w[&(1, 2)], true)];
        let p = partitions(&w, &pods, None);
        assert_eq!((p[&(1, 1)], p[&(1, 2)]), (1, 0), "old held, current let go");
        let step = Step::Update { cluster: 1, server: 1, pod: "demo-server-1-1-0".into() };
        assert_eq!(partitions(&w, &pods, Some(&step))[&(1, 1)], 0, "the one updated now");
        assert_eq!(partitions(&w, &pods[1..], None)[&(1, 1)], 0, "a pod being made gets the current template");
        let mut terminating = pods[0].clone();
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(partitions(&w, &[terminating, pods[1].clone()], None)[&(1, 1)], 0);
    }

    #[test]
    fn a_master_that_scale_down_removes_pauses_it() {
        // Scaled to one server per cluster; cluster 2's master is still
        // server 2, which is going: its role moves first, not its pods.
        let mut table = healthy_table(2, 2);
        table[2].is_master = false;
        table[3].is_master = true;
        let p = plan(&wanted(2, 1), &old_pods(2, 1), &table, &names());
        assert_eq!(p.step, Step::Paused("cluster 2's master is server 2, which the scale-down removes first".into()));
    }

    #[test]
    fn a_staying_server_is_updated_only_once_the_removed_one_is_gone_and_out_of_sync() {
        // Scaled from two servers per cluster to one: every staying server
        // runs an old template (its synchronizer is told the new count).
        let names = names();
        let (w, pods) = (wanted(2, 1), old_pods(2, 1));
        let mut table = healthy_table(2, 2);
        let step = |table: &[NodeView]| plan(&w, &pods, table, &names).step;
        let waits = |table: &[NodeView]| match step(table) {
            Step::Wait(why) => why,
            other => panic!("not waiting: {other:?}"),
        };
        // Both still run: nothing is replaced in the poll that removes them.
        assert_eq!(waits(&table), "the scale-down removes demo-server-1-2-0 first: it still runs");
        assert!(partitions(&w, &pods, Some(&step(&table))).values().all(|p| *p == 1));
        // Gone, but still counted in sync: a restarted master would wait
        // for it.
        for n in table.iter_mut().filter(|n| n.id == 2) {
            n.alive = false;
        }
        assert!(waits(&table).contains("demo-server-1-2-0 first: it is gone, not yet recorded out of sync"));
        table[1].in_sync = false;
        assert!(waits(&table).contains("demo-server-2-2-0 first: it is gone"));
        // Both recorded out of sync: the staying servers are updated.
        table[3].in_sync = false;
        assert_eq!(step(&table), Step::Update { cluster: 1, server: 1, pod: "demo-server-1-1-0".into() });
    }

    #[test]
    fn hashes_come_from_the_rendered_server_templates() {
        let obj = cluster("demo", serde_json::json!({"clusters": 2}));
        let r = crate::render::render(&obj, &crate::render::RenderOptions { default_image: "x".into() }).unwrap();
        let w = wanted_hashes(&r);
        assert_eq!(w.keys().copied().collect::<Vec<_>>(), [(1, 1), (1, 2), (2, 1), (2, 2)], "servers only");
        assert!(w.values().all(|h| h.len() == 16));
    }
}
