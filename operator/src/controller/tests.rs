//! Reconcile scenarios against the mocked API server (see
//! [`crate::fixtures`]): each asserts the calls made, in order.

use super::*;
use crate::crd::SnsClusterStatus;
use crate::fixtures::{Mock, World, cluster, healthy_table, old_coordinator_deployment, server_pod};
use crate::status::{PROGRESSING, READY};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

fn finalized(mut obj: SnsCluster) -> SnsCluster {
    obj.metadata.finalizers = Some(vec![FINALIZER.into()]);
    obj
}

fn lines(calls: &[crate::fixtures::Call]) -> Vec<String> {
    calls.iter().map(|c| c.line()).collect()
}

const NS: &str = "/api/v1/namespaces/prod";
const APPS: &str = "/apis/apps/v1/namespaces/prod";

/// The calls of a poll of the default `demo` SnsCluster up to its full
/// apply: the server pods are listed first (their templates decide the
/// StatefulSets' partitions).
fn full_apply() -> Vec<String> {
    let mut v = vec![
        format!("GET {NS}/pods"),
        format!("POST {NS}/secrets"),
        format!("PATCH {NS}/configmaps/demo-config"),
        format!("PATCH {NS}/services/demo-coordinator"),
        format!("PATCH {NS}/services/demo-nodes"),
    ];
    for c in 1..=3 {
        v.push(format!("PATCH {NS}/services/demo-master-{c}"));
    }
    v.push(format!("PATCH {NS}/services/demo-rabbitmq"));
    v.push(format!("PATCH {APPS}/statefulsets/demo-rabbitmq"));
    // No Deployment left from before the coordinator had a volume.
    v.push(format!("GET {APPS}/deployments/demo-coordinator"));
    v.push(format!("PATCH {APPS}/statefulsets/demo-coordinator"));
    for c in 1..=3 {
        for s in 1..=2 {
            v.push(format!("PATCH {APPS}/statefulsets/demo-server-{c}-{s}"));
        }
    }
    for c in 1..=3 {
        v.push(format!("PATCH /apis/policy/v1/namespaces/prod/poddisruptionbudgets/demo-cluster-{c}"));
    }
    v.push(format!("GET {APPS}/statefulsets"));
    v.push(format!("GET {NS}/services"));
    v
}

fn status_of(call: &crate::fixtures::Call) -> SnsClusterStatus {
    serde_json::from_value(call.body["status"].clone()).unwrap()
}

#[tokio::test]
async fn a_new_sns_cluster_first_gets_the_finalizer() {
    let mock = Mock::new(World::default(), None);
    let action = reconcile(Arc::new(cluster("demo", json!({}))), mock.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let calls = mock.calls().await;
    assert_eq!(lines(&calls), ["PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo"]);
    let ops = calls[0].body.as_array().unwrap();
    assert_eq!(ops.last().unwrap()["value"], json!([FINALIZER]));
}

#[tokio::test]
async fn first_apply_creates_everything_labels_roles_and_writes_status() {
    let world = World {
        pods: vec![server_pod("demo", 1, 1, None), server_pod("demo", 1, 2, None)],
        broker_ready: Some(1),
        ..Default::default()
    };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    let obj = finalized(cluster("demo", json!({})));
    let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(mock.ctx.metrics.reconciles(), 1);
    let calls = mock.calls().await;
    let mut expected = full_apply();
    expected.extend([
        format!("PATCH {NS}/pods/demo-server-1-1-0"),
        format!("PATCH {NS}/pods/demo-server-1-2-0"),
        format!("GET {APPS}/statefulsets"),
        "POST /apis/events.k8s.io/v1/namespaces/prod/events".into(),
        "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".into(),
    ]);
    assert_eq!(lines(&calls), expected);

    // Every apply is a server-side apply by our one field manager.
    for c in calls.iter().filter(|c| c.method == "PATCH" && !c.uri.contains("/pods/")) {
        assert!(c.uri.contains("fieldManager=sns-operator"), "{}", c.uri);
        assert!(c.uri.contains("force=true"), "{}", c.uri);
    }
    // The generated password went into the Secret, URL included.
    let secret = &calls[1].body;
    assert_eq!(secret["metadata"]["name"], "demo-rabbitmq-credentials");
    assert!(secret["data"]["url"].is_string());
    // Pods listed by the server selector; roles from the table.
    assert!(calls[0].uri.contains("labelSelector="), "{}", calls[0].uri);
    let pods = full_apply().len();
    assert_eq!(calls[pods].body, json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
    assert_eq!(calls[pods + 1].body, json!({"metadata": {"labels": {"sns.io/role": "slave"}}}));
    assert!(calls[pods + 2].uri.contains("fieldSelector=metadata.name%3Ddemo-rabbitmq"), "{}", calls[pods + 2].uri);
    assert_eq!(calls[pods + 3].body["reason"], "Created");
    // The coordinator: a StatefulSet whose records live on its claim.
    let coord = calls.iter().find(|c| c.uri.contains("/statefulsets/demo-coordinator?")).unwrap();
    assert_eq!(coord.body["kind"], "StatefulSet");
    let claim = &coord.body["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "data");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    let pod = &coord.body["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(pod["volumeMounts"][0], json!({"name": "data", "mountPath": "/data"}));
    let args: Vec<&str> = pod["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
    assert!(args.contains(&"--gateway"));
    assert!(calls.iter().all(|c| !c.uri.contains("/deployments/") || c.method == "GET"));
    let status = status_of(&calls[pods + 4]);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.masters.as_deref(), Some("3/3"));
    let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
    assert_eq!(ready.status, "True");
    assert_eq!(status.clusters[2].master.as_deref(), Some("demo-server-3-1-0"));
}

#[tokio::test]
async fn steady_state_touches_nothing_and_a_failover_updates_status() {
    let mock = Mock::new(World { broker_ready: Some(1), ..Default::default() }, Some(healthy_table(3, 2)));
    let mut obj = finalized(cluster("demo", json!({})));
    reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
    // As the watch would deliver it: the object with the status written.
    let mut table = healthy_table(3, 2);
    let names = Names::of(&obj).unwrap();
    let observed = Observation { broker_ready: Some(true), ..Observation::from_table(3, 2, &table) };
    let wanted = rollout::wanted_hashes(&render::render(&obj, &mock.ctx.render).unwrap());
    let rolled = rollout::plan(&wanted, &[], &table, &names).status(&names);
    obj.status = Some(status::next_status(&obj, &names, Ok(&observed), None, Some(&rolled), Timestamp::now()).0);

    // Nothing changed: the children are not re-applied (the Context
    // remembers them), the status is not rewritten; only the pod list
    // and the broker's readiness are read.
    reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();

    // Cluster 2 fails over to server 2.
    table[2].alive = false;
    table[2].is_master = false;
    table[3].is_master = true;
    table[3].term = 2;
    mock.set_table(Some(table));
    reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.ctx.metrics.failovers(), 1);
    let calls = mock.calls().await;
    let all = lines(&calls);
    let first = full_apply().len() + 3; // broker, event, status
    let broker = format!("GET {APPS}/statefulsets");
    assert_eq!(all[first..first + 2], [format!("GET {NS}/pods"), broker.clone()], "{all:#?}");
    assert_eq!(
        all[first + 2..],
        [
            format!("GET {NS}/pods"),
            broker,
            "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
            "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".to_string(),
        ]
    );
    let event = &calls[calls.len() - 2].body;
    assert_eq!(event["reason"], "Failover");
    assert_eq!(event["type"], "Warning");
    let status = status_of(calls.last().unwrap());
    assert_eq!(status.clusters[1].master.as_deref(), Some("demo-server-2-2-0"));
    assert_eq!(status.clusters[1].term, Some(2));
    assert!(status.last_failover_time.is_some());
}

fn annotated(value: &str) -> SnsCluster {
    let mut obj = finalized(cluster("demo", json!({})));
    obj.metadata.annotations = Some([(switchover::ANNOTATION.to_string(), value.to_string())].into());
    obj
}

const SNS: &str = "/apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo";
const EVENTS: &str = "POST /apis/events.k8s.io/v1/namespaces/prod/events";

#[tokio::test]
async fn the_switchover_annotation_is_taken_then_carried_out_once() {
    let world = World { secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    let obj = annotated("2");
    reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
    assert_eq!(*mock.table.switchovers.lock().unwrap(), [(2, None)]);
    // The watch then delivers the object without the annotation: nothing
    // more is asked of the coordinator.
    let mut after = obj.clone();
    after.metadata.annotations = None;
    reconcile(Arc::new(after), mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1, "once");
    assert_eq!(mock.ctx.metrics.failovers(), 0, "a planned switchover is no failover");

    let table = mock.table.clone();
    let calls = mock.calls().await;
    let all = lines(&calls);
    let n = full_apply().len();
    assert_eq!(all[..n], full_apply()[..]);
    // Taken first, under the resourceVersion it was read at; then the
    // event, the role labels and the status after the switchover.
    assert_eq!(all[n], format!("PATCH {SNS}"));
    assert_eq!(
        calls[n].body,
        json!({"metadata": {"resourceVersion": "100", "annotations": {"sns.io/switchover": null}}})
    );
    assert_eq!(all[n + 1], EVENTS);
    assert_eq!(calls[n + 1].body["reason"], "Switchover");
    assert_eq!(calls[n + 1].body["type"], "Normal");
    assert!(calls[n + 1].body["note"].as_str().unwrap().contains("cluster 2: master 1 -> 2 (term 2)"));
    let status = status_of(calls.iter().find(|c| c.line().ends_with("/status")).unwrap());
    let last = status.last_switchover.unwrap();
    assert!(last.succeeded);
    assert_eq!((last.cluster, last.from, last.to, last.term), (2, Some(1), Some(2), Some(2)));
    assert_eq!((last.requested_by.as_str(), last.request.as_deref()), ("annotation", Some("2")));
    assert_eq!(status.clusters[1].master.as_deref(), Some("demo-server-2-2-0"));
    assert_eq!(status.clusters[1].term, Some(2));
    assert!(status.last_failover_time.is_none());
    assert!(calls.iter().all(|c| c.body["reason"] != "Failover"), "no failover warning");
    assert_eq!(all.iter().filter(|l| **l == format!("PATCH {SNS}")).count(), 1);
    drop(table);
}

#[tokio::test]
async fn a_server_can_be_named_and_a_refusal_is_reported() {
    let world = World { secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    *mock.table.refuse.lock().unwrap() = Some("server 2 is not in sync".into());
    reconcile(Arc::new(annotated("3/2")), mock.ctx.clone()).await.unwrap();
    assert_eq!(*mock.table.switchovers.lock().unwrap(), [(3, Some(2))]);
    let calls = mock.calls().await;
    let event = calls.iter().find(|c| c.line() == EVENTS).unwrap();
    assert_eq!(event.body["reason"], "SwitchoverFailed");
    assert_eq!(event.body["type"], "Warning");
    let status = status_of(calls.last().unwrap());
    let last = status.last_switchover.unwrap();
    assert!(!last.succeeded);
    assert_eq!((last.cluster, last.to), (3, Some(2)));
    assert!(last.message.contains("server 2 is not in sync"), "{}", last.message);
    assert_eq!(status.clusters[2].master.as_deref(), Some("demo-server-3-1-0"), "nothing moved");
}

#[tokio::test]
async fn a_malformed_annotation_is_taken_and_explained_not_retried() {
    let world = World { secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    reconcile(Arc::new(annotated("4")), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty());
    let calls = mock.calls().await;
    assert!(calls.iter().any(|c| c.line() == format!("PATCH {SNS}")), "removed");
    let last = status_of(calls.last().unwrap()).last_switchover.unwrap();
    assert!(!last.succeeded);
    assert!(last.message.contains("cluster \"4\" is not one of 1..=3"), "{}", last.message);
}

#[tokio::test]
async fn the_annotation_waits_for_the_coordinator_and_for_a_current_object() {
    // The coordinator does not answer: the annotation stays for later.
    let world = World { secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, None);
    reconcile(Arc::new(annotated("1")), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty());
    let calls = lines(&mock.calls().await);
    assert!(!calls.contains(&format!("PATCH {SNS}")), "{calls:#?}");

    // The object changed since it was read: the removal conflicts and
    // nothing is asked (the next reconcile reads the new value).
    let world = World { secret_exists: true, conflict_on_merge: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    reconcile(Arc::new(annotated("1")), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty());
    let status = status_of(mock.calls().await.last().unwrap());
    assert!(status.last_switchover.is_none());
}

/// The partition each server StatefulSet was applied with, in order.
fn partitions(calls: &[crate::fixtures::Call]) -> Vec<(&str, i64)> {
    calls
        .iter()
        .filter(|c| c.method == "PATCH" && c.uri.contains("/statefulsets/demo-server-"))
        .map(|c| {
            let name = c.line().rsplit("demo-server-").next().unwrap().to_string();
            let p = c.body["spec"]["updateStrategy"]["rollingUpdate"]["partition"].as_i64().unwrap();
            (&*name.leak(), p)
        })
        .collect()
}

/// Every server pod of the default `demo`: made from the current
/// template, or from an older one for those in `old`; all Ready.
fn pods_with_old(old: &[(u32, u32)]) -> Vec<Pod> {
    let obj = cluster("demo", json!({}));
    let wanted = rollout::wanted_hashes(
        &render::render(&obj, &RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }).unwrap(),
    );
    wanted
        .iter()
        .map(|(&(c, s), h)| {
            let hash = if old.contains(&(c, s)) { "old" } else { h.as_str() };
            crate::fixtures::rolled_pod("demo", c, s, hash, true)
        })
        .collect()
}

#[tokio::test]
async fn a_rolling_update_lets_one_slave_go_and_says_so() {
    let pods = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
    let world = World { pods, secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty());
    let calls = mock.calls().await;
    assert!(calls.iter().all(|c| c.method != "DELETE"), "the StatefulSet controller replaces the pod");
    assert_eq!(
        partitions(&calls),
        [("1-1", 1), ("1-2", 0), ("2-1", 1), ("2-2", 1), ("3-1", 1), ("3-2", 1)],
        "one server at a time, cluster 1's slave first"
    );
    let event = calls.iter().find(|c| c.body["reason"] == "RollingUpdate").unwrap();
    assert!(event.body["note"].as_str().unwrap().contains("updating demo-server-1-2-0"));
    let status = status_of(calls.last().unwrap());
    let r = status.rollout.unwrap();
    assert_eq!((r.state.as_str(), r.updated_servers.as_str()), ("Updating", "0/6"));
    let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
    assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "RollingUpdate"));
}

#[tokio::test]
async fn a_rolling_update_moves_the_master_to_the_updated_slave() {
    // Cluster 1's slave is done; its master is next.
    let pods = pods_with_old(&[(1, 1), (2, 1), (2, 2)]);
    let world = World { pods, secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
    assert_eq!(*mock.table.switchovers.lock().unwrap(), [(1, Some(2))]);
    let calls = mock.calls().await;
    assert_eq!(
        partitions(&calls),
        [("1-1", 1), ("1-2", 0), ("2-1", 1), ("2-2", 1), ("3-1", 0), ("3-2", 0)],
        "the old master is let go at the next poll; updated pods stay on the current template"
    );
    // The labels follow the new master at once.
    let label = |pod: &str| calls.iter().find(|c| c.line() == format!("PATCH {NS}/pods/{pod}")).map(|c| c.body.clone());
    assert_eq!(label("demo-server-1-2-0").unwrap(), json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
    let status = status_of(calls.last().unwrap());
    let last = status.last_switchover.unwrap();
    assert_eq!((last.requested_by.as_str(), last.cluster, last.to, last.succeeded), ("rollout", 1, Some(2), true));
    assert_eq!(status.clusters[0].master.as_deref(), Some("demo-server-1-2-0"));
    assert_eq!(status.rollout.unwrap().updated_servers, "3/6");
}

#[tokio::test]
async fn a_refused_rollout_switchover_is_not_asked_again_at_once() {
    let pods = pods_with_old(&[(1, 1), (2, 1), (2, 2)]);
    let world = World { pods, secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    *mock.table.refuse.lock().unwrap() = Some("server 2 is not in sync".into());
    let mut obj = finalized(cluster("demo", json!({})));
    reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1);
    // The next poll sees the failure in status: it waits instead of asking
    // (and warning) again.
    let (record, _) = switchover::refused(
        Requester::Rollout,
        None,
        Some(switchover::Target { cluster: 1, to: Some(2) }),
        "cluster 1: refused: server 2 is not in sync".into(),
        Timestamp::now(),
    );
    obj.status = Some(SnsClusterStatus { last_switchover: Some(record), ..Default::default() });
    reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1, "not asked again");
    let calls = mock.calls().await;
    let r = status_of(calls.last().unwrap()).rollout.unwrap();
    assert_eq!(r.state, "Paused");
    assert!(r.message.contains("server 2 is not in sync"), "{}", r.message);
    assert_eq!(calls.iter().filter(|c| c.body["reason"] == "SwitchoverFailed").count(), 1);
}

#[tokio::test]
async fn a_rolling_update_pauses_on_anything_unhealthy() {
    let mut pods = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
    pods[5] = crate::fixtures::rolled_pod("demo", 3, 2, "old", false);
    let world = World { pods, secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    let obj = Arc::new(finalized(cluster("demo", json!({}))));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty());
    // Fixed: the next poll (nothing else to apply) lets cluster 1's
    // slave go, and applies that one StatefulSet only.
    let all_old = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
    mock.change_world(|w| w.pods = all_old);
    reconcile(obj, mock.ctx.clone()).await.unwrap();
    let calls = mock.calls().await;
    let second = calls.iter().rposition(|c| c.line() == format!("GET {NS}/pods")).unwrap();
    assert_eq!(partitions(&calls[second..]), [("1-2", 0)]);
    let calls = &calls[..second];
    assert!(partitions(calls).iter().all(|(_, p)| *p == 1), "every server held");
    let status = status_of(calls.last().unwrap());
    let r = status.rollout.unwrap();
    assert_eq!((r.state.as_str(), r.message.as_str()), ("Paused", "demo-server-3-2-0 is not ready"));
    assert!(calls.iter().all(|c| c.body["reason"] != "RollingUpdate"));
    let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
    assert_eq!(progressing.reason, "RolloutPaused");
    assert!(progressing.message.contains("demo-server-3-2-0 is not ready"), "{}", progressing.message);
}

#[tokio::test]
async fn unreachable_coordinator_still_applies_and_reports_progressing() {
    let world = World { secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, None);
    let obj = finalized(cluster("demo", json!({})));
    let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    let calls = mock.calls().await;
    let mut expected = full_apply();
    expected.extend([
        "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
        "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".to_string(),
    ]);
    assert_eq!(lines(&calls), expected, "no label without a routing table");
    let status = status_of(calls.last().unwrap());
    let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
    assert_eq!(ready.reason, "CoordinatorUnreachable");
    let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
    assert_eq!(progressing.status, "True");
}

#[tokio::test]
async fn upgrade_retires_the_coordinator_deployment_before_the_statefulset_starts() {
    let world = World {
        deployments: vec![old_coordinator_deployment("demo", false)],
        secret_exists: true,
        ..Default::default()
    };
    let mock = Mock::new(world, None);
    let obj = Arc::new(finalized(cluster("demo", json!({}))));
    // 1. The old Deployment is there: deleted in the foreground (it goes
    //    only after its pod), and the StatefulSet waits.
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // 2. Still terminating: not deleted twice, the StatefulSet still
    //    waits, and the whole apply is retried at once (not at resync).
    mock.change_world(|w| w.deployments = vec![old_coordinator_deployment("demo", true)]);
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // 3. Gone: now the StatefulSet is applied, and the apply counts as
    //    done, so 4. a further poll applies nothing.
    mock.change_world(|w| w.deployments.clear());
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();

    let calls = mock.calls().await;
    let all = lines(&calls);
    // Each full apply starts with the Secret and ends with the prune's
    // Service list; events and status writes come between.
    let starts: Vec<usize> = all.iter().enumerate().filter(|(_, l)| l.ends_with("/secrets")).map(|(i, _)| i).collect();
    assert_eq!(starts.len(), 3, "three full applies, none on the fourth poll: {all:#?}");
    let applies: Vec<&[String]> = starts
        .iter()
        .map(|&i| {
            let end = i + all[i..].iter().position(|l| *l == format!("GET {NS}/services")).unwrap();
            &all[i..=end]
        })
        .collect();
    let coordinator_sts = format!("PATCH {APPS}/statefulsets/demo-coordinator");
    let old = format!("{APPS}/deployments/demo-coordinator");
    let apply_only = || full_apply().into_iter().skip(1); // from the Secret on
    let mut waiting: Vec<String> = apply_only().filter(|l| *l != coordinator_sts).collect();
    assert_eq!(applies[1], waiting, "2: still waiting");
    let at = waiting.iter().position(|l| *l == format!("GET {old}")).unwrap();
    waiting.insert(at + 1, format!("DELETE {old}"));
    assert_eq!(applies[0], waiting, "1: deleted, the StatefulSet waits");
    let delete = calls.iter().find(|c| c.method == "DELETE").unwrap();
    assert_eq!(delete.body["propagationPolicy"], "Foreground", "the Deployment goes only after its pods");
    assert_eq!(applies[2], apply_only().collect::<Vec<_>>(), "3: gone, the StatefulSet applied");
    assert_eq!(all.iter().filter(|l| l.starts_with("DELETE")).count(), 1);
}

#[tokio::test]
async fn a_deployment_the_operator_did_not_make_is_left_alone() {
    let mut foreign = old_coordinator_deployment("demo", false);
    foreign["metadata"]["labels"] = json!({"app": "something-else"});
    foreign["metadata"]["ownerReferences"] = json!([]);
    let world = World { deployments: vec![foreign], secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, None);
    reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
    let all = lines(&mock.calls().await);
    assert_eq!(all[..full_apply().len()], full_apply()[..], "{all:#?}");
}

#[tokio::test]
async fn scale_down_prunes_the_second_servers() {
    let leftover = |c: u32| -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {
                "name": format!("demo-server-{c}-2"), "namespace": "prod",
                "labels": {"app.kubernetes.io/component": "server", "sns.io/cluster": c.to_string(), "sns.io/server": "2"},
                "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
            }
        })
    };
    // The coordinator is always wanted: never pruned, its claim kept.
    let coordinator = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {
            "name": "demo-coordinator", "namespace": "prod",
            "labels": {"app.kubernetes.io/component": "coordinator"},
            "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
        }
    });
    for (retention, deletes_pvcs) in [("Retain", false), ("Delete", true)] {
        let world = World {
            statefulsets: vec![coordinator.clone(), leftover(1), leftover(2)],
            secret_exists: true,
            ..Default::default()
        };
        let mock = Mock::new(world, Some(healthy_table(2, 2)));
        let obj = finalized(cluster(
            "demo",
            json!({"clusters": 2, "serversPerCluster": 1, "storage": {"retention": retention}}),
        ));
        reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        let calls = lines(&mock.calls().await);
        let list = calls.iter().position(|l| l == &format!("GET {APPS}/statefulsets")).unwrap();
        let mut expected = Vec::new();
        for c in 1..=2 {
            expected.push(format!("DELETE {APPS}/statefulsets/demo-server-{c}-2"));
            if deletes_pvcs {
                expected.push(format!("DELETE {NS}/persistentvolumeclaims/data-demo-server-{c}-2-0"));
            }
        }
        expected.push(format!("GET {NS}/services"));
        assert_eq!(calls[list + 1..list + 1 + expected.len()], expected[..], "{retention}");
        assert!(calls.iter().all(|l| !l.contains("coordinator") || !l.starts_with("DELETE")), "{calls:#?}");
    }
}

fn server_sts(c: u32, s: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {
            "name": format!("demo-server-{c}-{s}"), "namespace": "prod",
            "labels": {"app.kubernetes.io/component": "server", "sns.io/cluster": c.to_string(), "sns.io/server": s.to_string()},
            "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
        }
    })
}

#[tokio::test]
async fn scale_down_moves_a_master_off_the_server_it_removes_first() {
    // Cluster 2's master is server 2; cluster 1's is server 1.
    let mut table = healthy_table(2, 2);
    table[2].is_master = false;
    table[3].is_master = true;
    let world =
        World { statefulsets: vec![server_sts(1, 2), server_sts(2, 2)], secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(table));
    let obj = Arc::new(finalized(cluster("demo", json!({"clusters": 2, "serversPerCluster": 1}))));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    assert_eq!(*mock.table.switchovers.lock().unwrap(), [(2, Some(1))]);
    mock.change_world(|w| w.statefulsets = vec![server_sts(2, 2)]);
    // Next poll: server 2/2 is a slave now, and goes; the apply counted
    // as unfinished, so it is retried at once.
    reconcile(obj, mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1);
    let calls = mock.calls().await;
    let deletes: Vec<String> = calls.iter().filter(|c| c.method == "DELETE").map(|c| c.line()).collect();
    assert_eq!(
        deletes,
        [format!("DELETE {APPS}/statefulsets/demo-server-1-2"), format!("DELETE {APPS}/statefulsets/demo-server-2-2"),],
        "1/2 (a slave) at once, 2/2 only after its role moved"
    );
    let first_status = status_of(calls.iter().find(|c| c.line().ends_with("/status")).unwrap());
    let last = first_status.last_switchover.unwrap();
    assert_eq!((last.requested_by.as_str(), last.cluster, last.to), ("scale-down", 2, Some(1)));
    assert!(first_status.rollout.unwrap().message.contains("server 2/2 is master"));
    assert_eq!(first_status.clusters[1].master.as_deref(), Some("demo-server-2-1-0"));
}

#[tokio::test]
async fn scale_down_keeps_the_only_server_holding_every_write() {
    // Cluster 1: server 2 is master and server 1 is behind.
    let mut table = healthy_table(2, 2);
    table[0].is_master = false;
    table[0].in_sync = false;
    table[1].is_master = true;
    let world =
        World { statefulsets: vec![server_sts(1, 2), server_sts(2, 2)], secret_exists: true, ..Default::default() };
    let mock = Mock::new(world, Some(table));
    let obj = finalized(cluster("demo", json!({"clusters": 2, "serversPerCluster": 1})));
    reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert!(mock.table.switchovers.lock().unwrap().is_empty(), "no in-sync server to hand the role to");
    let calls = mock.calls().await;
    let deletes: Vec<String> = calls.iter().filter(|c| c.method == "DELETE").map(|c| c.line()).collect();
    assert_eq!(deletes, [format!("DELETE {APPS}/statefulsets/demo-server-2-2")], "cluster 2's slave only");
    let rollout = status_of(calls.last().unwrap()).rollout.unwrap();
    assert_eq!(rollout.state, "Paused");
    assert!(rollout.message.contains("server 1/2 stays"), "{}", rollout.message);
}

#[tokio::test]
async fn deletion_with_retain_keeps_volumes() {
    let mock = Mock::new(World::default(), None);
    let mut obj = finalized(cluster("demo", json!({})));
    obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(mock.table.forgotten.lock().unwrap().len(), 1, "the coordinator's channel is closed");
    let calls = mock.calls().await;
    assert_eq!(
        lines(&calls),
        [
            "POST /apis/events.k8s.io/v1/namespaces/prod/events",
            "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo",
        ]
    );
    assert!(calls[0].body["note"].as_str().unwrap().contains("kept"));
    assert!(calls.iter().all(|c| !c.uri.contains("persistentvolumeclaims")), "no claim is touched");
    // The finalizer helper tests that ours is still there, then removes it.
    let ops = calls[1].body.as_array().unwrap();
    assert_eq!(ops[0]["op"], "test");
    assert_eq!(ops[1]["op"], "remove");
}

#[tokio::test]
async fn deletion_with_delete_removes_this_clusters_volumes() {
    let mock = Mock::new(World::default(), None);
    let mut obj = finalized(cluster("demo", json!({"storage": {"retention": "Delete"}})));
    obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    let forgotten = mock.table.forgotten.lock().unwrap().clone();
    assert_eq!(forgotten, ["http://demo-coordinator.prod.svc:9000"], "its coordinator's channel is closed");
    let calls = mock.calls().await;
    assert_eq!(
        lines(&calls),
        [
            format!("DELETE {NS}/persistentvolumeclaims"),
            "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
            "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo".to_string(),
        ]
    );
    let uri = &calls[0].uri;
    assert!(uri.contains("labelSelector=app.kubernetes.io%2Finstance%3Ddemo"), "only this SnsCluster's claims: {uri}");
    // The selector takes the coordinator's claim (its records) with the
    // servers' and the broker's, and no other SnsCluster's.
    let selector = uri.split("labelSelector=").nth(1).unwrap().split('&').next().unwrap();
    let selector = selector.replace("%2F", "/").replace("%3D", "=").replace("%2C", ",");
    let matches = |labels: &std::collections::BTreeMap<String, String>| {
        selector.split(',').all(|t| {
            let (k, v) = t.split_once('=').unwrap();
            labels.get(k).map(String::as_str) == Some(v)
        })
    };
    let claims = |obj: &SnsCluster| -> Vec<(String, std::collections::BTreeMap<String, String>)> {
        let r = render::render(obj, &RenderOptions { default_image: "x".into() }).unwrap();
        r.children
            .iter()
            .filter_map(|c| match c {
                Child::StatefulSet(s) => Some(s),
                _ => None,
            })
            .map(|s| {
                let t = &s.spec.as_ref().unwrap().volume_claim_templates.as_ref().unwrap()[0];
                (s.name_any(), t.metadata.labels.clone().unwrap())
            })
            .collect()
    };
    let ours = claims(&cluster("demo", json!({"storage": {"retention": "Delete"}})));
    assert!(ours.iter().any(|(n, _)| n == "demo-coordinator"));
    assert_eq!(ours.len(), 8);
    for (name, labels) in &ours {
        assert!(matches(labels), "{name}'s claim is deleted: {selector} vs {labels:?}");
    }
    for (name, labels) in claims(&cluster("other", json!({}))) {
        assert!(!matches(&labels), "{name} belongs to another SnsCluster");
    }
    assert!(calls[1].body["note"].as_str().unwrap().contains("coordinator"));
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let world = World { fail_applies: true, ..Default::default() };
    let mock = Mock::new(world, None);
    let obj = Arc::new(finalized(cluster("demo", json!({}))));
    let err = reconcile(obj.clone(), mock.ctx.clone()).await.unwrap_err();
    assert!(err.to_string().contains("bad day"), "{err}");
    assert_eq!(mock.ctx.metrics.failures(), 1);
    let ctx = mock.ctx.clone();
    assert_eq!(error_policy(obj.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(5)));
    assert_eq!(error_policy(obj.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(10)));
    drop(ctx);
    let calls = lines(&mock.calls().await);
    // The secret, then the first apply fails and nothing else is tried.
    assert_eq!(
        calls,
        [format!("GET {NS}/pods"), format!("POST {NS}/secrets"), format!("PATCH {NS}/configmaps/demo-config")]
    );
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(7), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[test]
fn polling_follows_the_heartbeat() {
    let fast = cluster("demo", json!({"heartbeat": {"intervalMillis": 500}}));
    assert_eq!(poll_interval(&fast), Duration::from_secs(1));
    let slow = cluster("demo", json!({"heartbeat": {"intervalMillis": 60000}}));
    assert_eq!(poll_interval(&slow), Duration::from_secs(10));
}
