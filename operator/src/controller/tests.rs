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
const NET: &str = "/apis/networking.k8s.io/v1/namespaces/prod";
const CERTS: &str = "/apis/cert-manager.io/v1/namespaces/prod";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/prod";

/// The calls of a poll of the default `demo` SnsCluster up to its full
/// apply: the Secrets first (every coordinator call carries their token
/// and CA), then the server pods are listed (their templates decide the
/// StatefulSets' partitions).
fn full_apply() -> Vec<String> {
    let mut v = secret_calls();
    v.push(format!("GET {NS}/pods"));
    v.push(format!("PATCH {NS}/configmaps/demo-config"));
    for p in ["server", "coordinator", "broker"] {
        v.push(format!("PATCH {NET}/networkpolicies/demo-{p}"));
    }
    v.extend([format!("PATCH {NS}/services/demo-coordinator"), format!("PATCH {NS}/services/demo-nodes")]);
    for c in 1..=3 {
        v.push(format!("PATCH {NS}/services/demo-master-{c}"));
    }
    v.push(format!("PATCH {NS}/configmaps/demo-rabbitmq-config"));
    v.push(format!("PATCH {NS}/services/demo-rabbitmq"));
    v.push(format!("PATCH {APPS}/statefulsets/demo-rabbitmq"));
    // No Deployment left from before the coordinator had a volume.
    // A replicated coordinator's identity, then its StatefulSet, looked
    // at first (a single coordinator moving to replicas goes in steps).
    v.push(format!("PATCH {NS}/serviceaccounts/demo-coordinator"));
    v.push(format!("PATCH {RBAC}/roles/demo-coordinator"));
    v.push(format!("PATCH {RBAC}/rolebindings/demo-coordinator"));
    v.push(format!("GET {APPS}/deployments/demo-coordinator"));
    v.push(format!("GET {APPS}/statefulsets"));
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
    v.push(format!("GET {NET}/networkpolicies"));
    // No cert-manager Certificate left from an issuer the spec dropped.
    v.push(format!("DELETE {CERTS}/certificates/demo-tls"));
    v.push(format!("DELETE {CERTS}/certificates/demo-rabbitmq-tls"));
    v
}

/// The Secrets of a first apply (none exists yet): broker credentials
/// created blind (409 if there), the node secret, CA and node
/// certificate each read, then created.
fn secret_calls() -> Vec<String> {
    let mut v = vec![format!("POST {NS}/secrets")];
    for s in ["demo-node-secret", "demo-ca", "demo-tls", "demo-rabbitmq-tls"] {
        v.push(format!("GET {NS}/secrets/{s}"));
        v.push(format!("POST {NS}/secrets"));
    }
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
        // The broker's readiness, then the coordinator's.
        format!("GET {APPS}/statefulsets"),
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
    let secret = &calls[0].body;
    assert_eq!(secret["metadata"]["name"], "demo-rabbitmq-credentials");
    assert!(secret["data"]["url"].is_string());
    // Pods listed by the server selector (after the Secrets); roles from
    // the table.
    let listed = &calls[secret_calls().len()];
    assert!(listed.line().ends_with("/pods") && listed.uri.contains("labelSelector="), "{}", listed.uri);
    let pods = full_apply().len();
    assert_eq!(calls[pods].body, json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
    assert_eq!(calls[pods + 1].body, json!({"metadata": {"labels": {"sns.io/role": "slave"}}}));
    assert!(calls[pods + 2].uri.contains("fieldSelector=metadata.name%3Ddemo-rabbitmq"), "{}", calls[pods + 2].uri);
    assert!(calls[pods + 3].uri.contains("fieldSelector=metadata.name%3Ddemo-coordinator"), "{}", calls[pods + 3].uri);
    assert_eq!(calls[pods + 4].body["reason"], "Created");
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
    let status = status_of(&calls[pods + 5]);
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
    let first = full_apply().len() + 4; // broker, coordinator, event, status
    let sts = format!("GET {APPS}/statefulsets"); // the broker's, the coordinator's
    assert_eq!(all[first..first + 3], [format!("GET {NS}/pods"), sts.clone(), sts.clone()], "{all:#?}");
    assert_eq!(
        all[first + 3..],
        [
            format!("GET {NS}/pods"),
            sts.clone(),
            sts,
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

/// Every coordinator call (table reads, and the switchovers of the
/// annotation, the rollout and a scale-down) came after the endpoint was
/// handed the SnsCluster's token and CA, so it went through the
/// authenticated, TLS-checked channel.
fn assert_calls_authenticated(mock: &Mock) {
    let authenticated = mock.table.authenticated.lock().unwrap().clone();
    assert!(!authenticated.is_empty(), "no credentials handed over");
    for (endpoint, creds) in &authenticated {
        assert_eq!(endpoint, "http://demo-coordinator.prod.svc:9000");
        assert!(creds.secret.is_some() && creds.ca.is_some(), "token and CA (TLS is on by default): {creds:?}");
    }
    let unauthenticated = mock.table.unauthenticated.lock().unwrap().clone();
    assert!(unauthenticated.is_empty(), "calls made before the credentials: {unauthenticated:?}");
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
    assert_calls_authenticated(&mock);
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
    // The only DELETE is the prune's check for a cert-manager Certificate.
    assert!(
        calls.iter().all(|c| c.method != "DELETE" || c.uri.contains("/certificates/")),
        "the StatefulSet controller replaces the pod"
    );
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
    assert_calls_authenticated(&mock);
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
    // Each full apply starts with the Secrets and ends with the
    // prune's Certificate check; events and status writes come between.
    let starts: Vec<usize> =
        all.iter().enumerate().filter(|(_, l)| l.ends_with("/secrets/demo-node-secret")).map(|(i, _)| i - 1).collect();
    assert_eq!(starts.len(), 3, "three full applies, none on the fourth poll: {all:#?}");
    let applies: Vec<&[String]> = starts
        .iter()
        .map(|&i| {
            let end = i + all[i..]
                .iter()
                .position(|l| l.starts_with("DELETE") && l.ends_with("/certificates/demo-rabbitmq-tls"))
                .unwrap();
            &all[i..=end]
        })
        .collect();
    let coordinator_sts = format!("PATCH {APPS}/statefulsets/demo-coordinator");
    let old = format!("{APPS}/deployments/demo-coordinator");
    let apply_only = || full_apply().into_iter(); // from the Secrets on
    let coordinator_list = format!("GET {APPS}/statefulsets");
    let mut waiting: Vec<String> = apply_only().filter(|l| *l != coordinator_sts).collect();
    // Nor is the coordinator's StatefulSet looked at.
    let listed = waiting.iter().position(|l| *l == coordinator_list).unwrap();
    waiting.remove(listed);
    assert_eq!(applies[1], waiting, "2: still waiting");
    let at = waiting.iter().position(|l| *l == format!("GET {old}")).unwrap();
    waiting.insert(at + 1, format!("DELETE {old}"));
    assert_eq!(applies[0], waiting, "1: deleted, the StatefulSet waits");
    let delete = calls.iter().find(|c| c.method == "DELETE" && c.uri.contains("/deployments/")).unwrap();
    assert_eq!(delete.body["propagationPolicy"], "Foreground", "the Deployment goes only after its pods");
    assert_eq!(applies[2], apply_only().collect::<Vec<_>>(), "3: gone, the StatefulSet applied");
    assert_eq!(all.iter().filter(|l| l.starts_with("DELETE") && l.contains("/deployments/")).count(), 1);
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
        // The prune's list (the first one is the coordinator's, by name).
        let list = calls
            .iter()
            .rposition(|l| l == "PATCH /apis/policy/v1/namespaces/prod/poddisruptionbudgets/demo-cluster-2")
            .unwrap()
            + 1;
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
    assert_calls_authenticated(&mock);
    mock.change_world(|w| w.statefulsets = vec![server_sts(2, 2)]);
    // Next poll: server 2/2 is a slave now, and goes; the apply counted
    // as unfinished, so it is retried at once.
    reconcile(obj, mock.ctx.clone()).await.unwrap();
    assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1);
    let calls = mock.calls().await;
    let deletes: Vec<String> =
        calls.iter().filter(|c| c.method == "DELETE" && !c.uri.contains("/certificates/")).map(|c| c.line()).collect();
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

/// Scaled from two servers per cluster to one: the staying servers' pods
/// (their synchronizers are told the new count) are replaced only once
/// the leaving servers are gone and recorded out of sync, never in the
/// poll that removes them (a master restarted meanwhile would wait for its
/// removed slave, or see it promoted just before it goes).
#[tokio::test]
async fn scale_down_updates_the_staying_servers_only_after_the_leaving_ones_are_gone_and_out_of_sync() {
    let obj = cluster("demo", json!({"clusters": 2, "serversPerCluster": 1}));
    let wanted = rollout::wanted_hashes(
        &render::render(&obj, &RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }).unwrap(),
    );
    assert_eq!(wanted.len(), 2);
    let pods: Vec<Pod> = wanted.keys().map(|&(c, s)| crate::fixtures::rolled_pod("demo", c, s, "old", true)).collect();
    let world = World {
        statefulsets: vec![server_sts(1, 2), server_sts(2, 2)],
        pods,
        secret_exists: true,
        ..Default::default()
    };
    let mock = Mock::new(world, Some(healthy_table(2, 2)));
    let obj = Arc::new(finalized(obj));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // Then gone, but still in sync by the coordinator.
    let mut table = healthy_table(2, 2);
    for n in table.iter_mut().filter(|n| n.id == 2) {
        n.alive = false;
    }
    mock.set_table(Some(table.clone()));
    mock.change_world(|w| w.statefulsets.clear());
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // Then recorded out of sync.
    for n in table.iter_mut().filter(|n| n.id == 2) {
        n.in_sync = false;
    }
    mock.set_table(Some(table));
    reconcile(obj, mock.ctx.clone()).await.unwrap();
    let calls = mock.calls().await;
    let polls: Vec<usize> =
        calls.iter().enumerate().filter(|(_, c)| c.line() == format!("GET {NS}/pods")).map(|(i, _)| i).collect();
    assert_eq!(polls.len(), 3);
    let (first, second, third) = (&calls[..polls[1]], &calls[polls[1]..polls[2]], &calls[polls[2]..]);
    let deletes = first.iter().filter(|c| c.method == "DELETE" && c.uri.contains("/statefulsets/")).count();
    assert_eq!(deletes, 2, "both leaving servers removed");
    assert_eq!(partitions(first), [("1-1", 1), ("2-1", 1)], "no staying pod replaced in the poll that removes them");
    assert!(partitions(second).iter().all(|(_, p)| *p == 1), "held: {:?}", partitions(second));
    let r = status_of(second.last().unwrap()).rollout.unwrap();
    assert!(r.message.contains("removes demo-server-1-2-0 first"), "{}", r.message);
    assert!(partitions(third).contains(&("1-1", 0)), "let go once out of sync: {:?}", partitions(third));
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
    let deletes: Vec<String> =
        calls.iter().filter(|c| c.method == "DELETE" && !c.uri.contains("/certificates/")).map(|c| c.line()).collect();
    assert_eq!(deletes, [format!("DELETE {APPS}/statefulsets/demo-server-2-2")], "cluster 2's slave only");
    let rollout = status_of(calls.last().unwrap()).rollout.unwrap();
    assert_eq!(rollout.state, "Paused");
    assert!(rollout.message.contains("server 1/2 stays"), "{}", rollout.message);
}

#[tokio::test]
async fn deletion_with_retain_keeps_volumes_and_secrets() {
    // The broker credentials as an older operator made them: owned by
    // the SnsCluster, so garbage collection would take them while the
    // retained RabbitMQ volume keeps their password.
    let owned = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": "demo-rabbitmq-credentials", "namespace": "prod",
            "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
        }
    });
    let node =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-node-secret", "namespace": "prod"}});
    let world = World { secrets: vec![owned, node], ..Default::default() };
    let mock = Mock::new(world, None);
    let mut obj = finalized(cluster("demo", json!({})));
    obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(mock.table.forgotten.lock().unwrap().len(), 1, "the coordinator's channel is closed");
    let calls = mock.calls().await;
    let mut expected: Vec<String> = [
        "demo-rabbitmq-credentials",
        "demo-rabbitmq-erlang-cookie",
        "demo-node-secret",
        "demo-ca",
        "demo-tls",
        "demo-rabbitmq-tls",
    ]
    .iter()
    .map(|s| format!("PATCH {NS}/secrets/{s}"))
    .collect();
    expected.push("POST /apis/events.k8s.io/v1/namespaces/prod/events".into());
    expected.push("PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo".into());
    assert_eq!(lines(&calls), expected, "the Secrets are kept, released from the SnsCluster; absent ones are fine");
    for c in &calls[..6] {
        assert_eq!(c.body, json!({"metadata": {"ownerReferences": null}}), "a merge patch dropping the owner");
    }
    assert!(calls.iter().all(|c| c.method != "DELETE"), "nothing is deleted");
    assert!(calls[6].body["note"].as_str().unwrap().contains("kept"));
    assert!(calls.iter().all(|c| !c.uri.contains("persistentvolumeclaims")), "no claim is touched");
    // The finalizer helper tests that ours is still there, then removes it.
    let ops = calls[7].body.as_array().unwrap();
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
            format!("DELETE {NS}/secrets"),
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
    assert!(calls[2].body["note"].as_str().unwrap().contains("coordinator"));
    // The generated Secrets go by the same selector, and only ours.
    assert_eq!(
        calls[1].uri.split("labelSelector=").nth(1).unwrap().split('&').next(),
        uri.split("labelSelector=").nth(1).unwrap().split('&').next()
    );
    let secret_labels = |obj: &SnsCluster| {
        let r = render::render(obj, &RenderOptions { default_image: "x".into() }).unwrap();
        [r.node_secret.metadata.labels.clone().unwrap(), r.broker_secret.unwrap().metadata.labels.unwrap()]
    };
    for labels in secret_labels(&cluster("demo", json!({}))) {
        assert!(matches(&labels), "{labels:?}");
    }
    for labels in secret_labels(&cluster("other", json!({}))) {
        assert!(!matches(&labels), "{labels:?}");
    }
}

#[tokio::test]
async fn a_new_sns_cluster_gets_a_random_node_secret_a_ca_and_a_node_certificate() {
    let decode = |v: &Value| -> String {
        String::from_utf8(serde_json::from_value::<k8s_openapi::ByteString>(v.clone()).unwrap().0).unwrap()
    };
    let mut values = Vec::new();
    for _ in 0..2 {
        let mock = Mock::new(World::default(), None);
        reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
        let authenticated = mock.table.authenticated.lock().unwrap().clone();
        let calls = mock.calls().await;
        assert_eq!(lines(&calls)[..secret_calls().len()], secret_calls()[..]);
        let posted = |name: &str| {
            calls.iter().find(|c| c.method == "POST" && c.body["metadata"]["name"] == name).unwrap().body.clone()
        };
        let node = posted("demo-node-secret");
        let value = decode(&node["data"]["secret"]);
        assert!(value.len() >= 64 && value.chars().all(|c| c.is_ascii_hexdigit()), "32 random bytes, hex");
        assert!(node["metadata"]["ownerReferences"].is_null(), "kept or deleted by retention, not by owner");
        let ca = decode(&posted("demo-ca")["data"]["tls.crt"]);
        let tls = posted("demo-tls");
        assert_eq!(decode(&tls["data"]["ca.crt"]), ca, "the node certificate ships its CA");
        assert!(decode(&tls["data"]["tls.crt"]).starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(decode(&tls["data"]["tls.key"]).contains("PRIVATE KEY"));
        let creds = &authenticated[0].1;
        let expected = sns_node::auth::Secret::from_text(&value).unwrap();
        assert_eq!(creds.secret.as_ref().unwrap().seal(b"x"), expected.seal(b"x"));
        assert_eq!(creds.ca.as_deref(), Some(ca.as_str()));
        values.push(value);
    }
    assert_ne!(values[0], values[1], "each SnsCluster its own secret");
}

#[tokio::test]
async fn network_policies_switched_off_are_pruned() {
    let policy = |name: &str, uid: &str| {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {
                "name": name, "namespace": "prod",
                "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": uid}]
            }
        })
    };
    let world = World {
        network_policies: vec![
            policy("demo-server", "uid-1"),
            policy("demo-broker", "uid-1"),
            policy("demo-x", "uid-9"),
        ],
        secret_exists: true,
        ..Default::default()
    };
    let mock = Mock::new(world, None);
    let spec = json!({"networkPolicy": {"enabled": false}});
    reconcile(Arc::new(finalized(cluster("demo", spec))), mock.ctx.clone()).await.unwrap();
    let all = lines(&mock.calls().await);
    assert!(all.iter().all(|l| !l.starts_with("PATCH") || !l.contains("networkpolicies")), "none applied");
    let deleted: Vec<&String> =
        all.iter().filter(|l| l.starts_with("DELETE") && l.contains("networkpolicies")).collect();
    assert_eq!(
        deleted,
        [&format!("DELETE {NET}/networkpolicies/demo-server"), &format!("DELETE {NET}/networkpolicies/demo-broker")],
        "ours only"
    );
}

#[tokio::test]
async fn with_an_issuer_cert_manager_makes_the_certificate_and_no_ca_is_generated() {
    let spec = json!({"tls": {"issuerRef": {"name": "sns-ca"}}, "networkPolicy": {"enabled": false}});
    let mock = Mock::new(World::default(), None);
    let obj = Arc::new(finalized(cluster("demo", spec)));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // Once cert-manager has written the Secret, the next poll reads its
    // CA (the apply was left incomplete), and the one after applies
    // nothing.
    let issued = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "demo-tls", "namespace": "prod"},
        "data": {"ca.crt": "Q0EgUEVN"}
    });
    mock.change_world(|w| w.secrets.push(issued));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    reconcile(obj, mock.ctx.clone()).await.unwrap();
    let authenticated = mock.table.authenticated.lock().unwrap().clone();
    let calls = mock.calls().await;
    let all = lines(&calls);
    assert_eq!(authenticated.len(), 2, "two full applies, none on the third poll: {all:#?}");
    assert_eq!(authenticated[1].1.ca.as_deref(), Some("CA PEM"));
    assert_eq!(
        all[..6],
        [
            format!("POST {NS}/secrets"),
            format!("GET {NS}/secrets/demo-node-secret"),
            format!("POST {NS}/secrets"),
            // Not issued yet: no CA to trust until cert-manager writes it.
            format!("GET {NS}/secrets/demo-tls"),
            format!("GET {NS}/pods"),
            format!("PATCH {NS}/configmaps/demo-config"),
        ],
        "no CA or certificate of the operator's own, no NetworkPolicy: {all:#?}"
    );
    let cert = calls.iter().find(|c| c.uri.contains("/certificates/demo-tls?")).unwrap();
    assert_eq!(cert.method, "PATCH");
    assert!(cert.uri.contains("fieldManager=sns-operator"), "server-side applied: {}", cert.uri);
    assert_eq!(cert.body["spec"]["issuerRef"]["name"], "sns-ca");
    assert!(all.iter().all(|l| !l.starts_with("DELETE")), "the Certificate is wanted: {all:#?}");
    // The list for the prune still runs: policies switched off go.
    assert!(all.contains(&format!("GET {NET}/networkpolicies")));
    assert!(authenticated[0].1.secret.is_some() && authenticated[0].1.ca.is_none());
}

#[tokio::test]
async fn existing_secrets_are_read_not_replaced_and_reach_the_admin_calls() {
    use crate::render::tls;
    let names = Names::of(&cluster("demo", json!({}))).unwrap();
    let value = "5f0c8a7e2b9d4c61a3e8f0b7d2c5a9e41f6b3d8c0a7e2b9d4c61a3e8f0b7d2c5";
    let r = render::render(&cluster("demo", json!({})), &RenderOptions { default_image: "x".into() }).unwrap();
    let render::TlsPlan::Operator { names: tls_names, .. } = &r.tls else { panic!("TLS is on by default") };
    let ca = tls::new_ca(&names).unwrap();
    let node = tls::issue_node_cert(&names, tls_names, &ca).unwrap();
    let node_secret = serde_json::to_value(render::node_secret(&r.node_secret, value)).unwrap();
    let ca_secret = serde_json::to_value(tls::ca_secret(&names, &ca)).unwrap();
    let fresh = |checksum: &str| {
        let mut s = serde_json::to_value(tls::node_tls_secret(&names, &node, &ca.cert, checksum)).unwrap();
        s["metadata"]["resourceVersion"] = json!("7");
        s
    };
    let current = tls::names_checksum(tls_names);
    for (tls_secret, reissued) in [(fresh(&current), false), (fresh("for-other-names"), true)] {
        let world = World {
            secret_exists: true,
            secrets: vec![node_secret.clone(), ca_secret.clone(), tls_secret],
            ..Default::default()
        };
        let mock = Mock::new(world, None);
        reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
        let authenticated = mock.table.authenticated.lock().unwrap().clone();
        let calls = mock.calls().await;
        let mut expected = vec![
            format!("POST {NS}/secrets"),
            format!("GET {NS}/secrets/demo-node-secret"),
            format!("GET {NS}/secrets/demo-ca"),
            format!("GET {NS}/secrets/demo-tls"),
        ];
        if reissued {
            expected.push(format!("PUT {NS}/secrets/demo-tls"));
        }
        // The broker's certificate, missing: issued by the same CA.
        expected.push(format!("GET {NS}/secrets/demo-rabbitmq-tls"));
        expected.push(format!("POST {NS}/secrets"));
        expected.push(format!("GET {NS}/pods"));
        expected.push(format!("PATCH {NS}/configmaps/demo-config"));
        assert_eq!(lines(&calls)[..expected.len()], expected[..], "reissued: {reissued}");
        if reissued {
            let put = &calls[4].body;
            assert_eq!(put["metadata"]["resourceVersion"], "7", "replaces exactly what it read");
            assert_eq!(put["metadata"]["annotations"][tls::TLS_NAMES_ANNOTATION], current.as_str());
            let ca_crt = put["data"]["ca.crt"].as_str().unwrap();
            assert_eq!(ca_crt, json!(k8s_openapi::ByteString(ca.cert.clone().into_bytes())), "from the same CA");
        }
        // The admin calls carry the stored secret's token and trust the
        // stored CA.
        let [(endpoint, creds)] = &authenticated[..] else { panic!("{authenticated:?}") };
        assert_eq!(endpoint, "http://demo-coordinator.prod.svc:9000");
        let stored = sns_node::auth::Secret::from_text(value).unwrap();
        assert_eq!(creds.secret.as_ref().unwrap().seal(b"x"), stored.seal(b"x"));
        assert_eq!(creds.ca.as_deref(), Some(ca.cert.as_str()));
    }
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
    // The secrets, the pods, then every apply is tried (each fails), and
    // a Warning event names them; nothing is pruned.
    // Up to the prune (its three lists and two Certificate checks).
    let mut expected = full_apply();
    expected.truncate(expected.len() - 5);
    expected.push("POST /apis/events.k8s.io/v1/namespaces/prod/events".into());
    assert_eq!(calls, expected);
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(7), Duration::from_secs(300));
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

#[tokio::test]
async fn a_refused_child_does_not_hold_back_the_others_and_is_named() {
    // The broker's StatefulSet is refused (a changed volumeClaimTemplate,
    // say): everything after it is applied all the same.
    let world = World { refuse_applies: vec!["demo-rabbitmq".into()], ..Default::default() };
    let mock = Mock::new(world, Some(healthy_table(3, 2)));
    let obj = Arc::new(finalized(cluster("demo", json!({}))));
    let err = reconcile(obj, mock.ctx.clone()).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("2 of "), "{text}");
    assert!(text.contains("Service/demo-rabbitmq: StatefulSet.apps is invalid"), "{text}");
    assert!(text.contains("StatefulSet/demo-rabbitmq: StatefulSet.apps is invalid"), "{text}");
    assert!(!text.contains("demo-server"), "{text}");
    assert_eq!(mock.ctx.metrics.failures(), 1);
    let calls = mock.calls().await;
    let applied: Vec<String> = lines(&calls);
    // Every child was tried, in order, the servers and PDBs after the
    // refused broker included; nothing is pruned after a failed apply.
    // Up to the prune (its three lists and two Certificate checks).
    let mut expected = full_apply();
    expected.truncate(expected.len() - 5);
    expected.push("POST /apis/events.k8s.io/v1/namespaces/prod/events".into());
    assert_eq!(applied, expected);
    let event = &calls.last().unwrap().body;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "ApplyFailed");
    assert!(event["note"].as_str().unwrap().contains("StatefulSet/demo-rabbitmq"), "{event}");
}

#[tokio::test]
async fn a_broker_cluster_gets_its_cookie_and_is_ready_with_a_majority() {
    for (nodes_ready, expected) in [(1, "BrokerNotReady"), (2, "AllServersLive")] {
        let world = World {
            pods: vec![server_pod("demo", 1, 1, None), server_pod("demo", 1, 2, None)],
            broker_ready: Some(nodes_ready),
            ..Default::default()
        };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        let obj = finalized(cluster("demo", json!({"broker": {"managed": {"replicas": 3}}})));
        reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        let calls = mock.calls().await;
        // The credentials, then the cookie: created blind, never replaced.
        let cookie = &calls[1];
        assert_eq!(cookie.line(), format!("POST {NS}/secrets"));
        assert_eq!(cookie.body["metadata"]["name"], "demo-rabbitmq-erlang-cookie");
        assert!(cookie.body["metadata"]["ownerReferences"].is_null(), "it follows storage.retention");
        let value = cookie.body["data"]["cookie"].as_str().unwrap();
        assert!(value.len() >= 40, "32 random characters, base64: {value}");
        let status = status_of(calls.last().unwrap());
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.reason, expected, "{nodes_ready} of 3 broker nodes ready");
    }
}

#[test]
fn polling_follows_the_heartbeat() {
    let fast = cluster("demo", json!({"heartbeat": {"intervalMillis": 500}}));
    assert_eq!(poll_interval(&fast), Duration::from_secs(1));
    let slow = cluster("demo", json!({"heartbeat": {"intervalMillis": 60000}}));
    assert_eq!(poll_interval(&slow), Duration::from_secs(10));
}

/// A coordinator StatefulSet as the API server would list it.
fn coordinator_sts(replicas: i32, replicated: bool, ready: i32, rolled: bool) -> Value {
    let env = if replicated { json!([{"name": "SNS_KUBE_HA", "value": "demo-coordinator"}]) } else { json!([]) };
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo-coordinator", "namespace": "prod", "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/component": "coordinator"}},
            "serviceName": "",
            "template": {"spec": {"containers": [{"name": "coordinator", "env": env}]}},
        },
        "status": {
            "replicas": replicas, "readyReplicas": ready, "observedGeneration": 2,
            "currentRevision": "a", "updateRevision": if rolled { "a" } else { "b" },
        },
    })
}

/// The replicas the coordinator StatefulSet was applied with, in order.
fn coordinator_replicas(calls: &[crate::fixtures::Call]) -> Vec<i64> {
    calls
        .iter()
        .filter(|c| c.method == "PATCH" && c.uri.contains("/statefulsets/demo-coordinator?"))
        .map(|c| c.body["spec"]["replicas"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_single_coordinator_becomes_replicated_in_two_steps() {
    // Running as one file-backed coordinator: first its pod is replaced by
    // one replica (which imports its volume's records), the standby only
    // once that pod runs the replicated template and leads.
    let single = coordinator_sts(1, false, 1, true);
    let mock = Mock::new(World { coordinator: Some(single), ..Default::default() }, Some(healthy_table(3, 2)));
    let obj = Arc::new(finalized(cluster("demo", json!({}))));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // Replaced, not yet rolled out: still one, applied again next poll.
    mock.change_world(|w| w.coordinator = Some(coordinator_sts(1, true, 0, false)));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // Rolled out and leading: the standby comes.
    mock.change_world(|w| w.coordinator = Some(coordinator_sts(1, true, 1, true)));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    // From then on the replicas stay, whoever leads or not.
    mock.change_world(|w| w.coordinator = Some(coordinator_sts(2, true, 0, true)));
    reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
    let calls = mock.calls().await;
    assert_eq!(coordinator_replicas(&calls), [1, 1, 2], "a fourth poll has nothing new to apply");
    let applied = calls.iter().find(|c| c.uri.contains("/statefulsets/demo-coordinator?")).unwrap();
    let env = &applied.body["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(env.as_array().unwrap().iter().any(|e| e["name"] == "SNS_KUBE_HA"), "the replicated template at once");
    // Ready while one pod (the leader) is; reported as pods ready / replicas.
    let statuses: Vec<SnsClusterStatus> =
        calls.iter().filter(|c| c.line().ends_with("/status")).map(status_of).collect();
    let last = statuses.last().unwrap();
    assert_eq!(last.ready_coordinators.as_deref(), Some("0/2"));
    assert_eq!(last.conditions.iter().find(|c| c.type_ == READY).unwrap().reason, "CoordinatorNotReady");
    assert!(statuses.iter().any(|s| s.ready_coordinators.as_deref() == Some("1/2")));
}

#[tokio::test]
async fn a_new_replicated_coordinator_starts_all_its_replicas_and_one_replica_stays_single() {
    let mock = Mock::new(World::default(), Some(healthy_table(3, 2)));
    reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
    let calls = mock.calls().await;
    assert_eq!(coordinator_replicas(&calls), [2]);
    let mock = Mock::new(World::default(), Some(healthy_table(3, 2)));
    let one = finalized(cluster("demo", json!({"coordinator": {"replicas": 1}})));
    reconcile(Arc::new(one), mock.ctx.clone()).await.unwrap();
    let calls = mock.calls().await;
    assert_eq!(coordinator_replicas(&calls), [1]);
    assert!(!calls.iter().any(|c| c.uri.contains("rbac.authorization.k8s.io") || c.uri.contains("serviceaccounts")));
}
