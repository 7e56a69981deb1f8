//! Test helpers: SnsCluster and pod fixtures, a fixed routing table, and a
//! mocked API server (tower-test) that answers like Kubernetes would and
//! records every call, so a reconcile test asserts the exact call sequence.

use crate::controller::Context;
use crate::coordinator::{Credentials, NodeKind, NodeView, RoutingTable, SwitchoverDone};
use crate::crd::{SnsCluster, SnsClusterSpec};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::render::{LABEL_CLUSTER, LABEL_INSTANCE, LABEL_ROLE, LABEL_SERVER, RenderOptions};
use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower_test::mock;

/// An SnsCluster `name` in namespace `prod`, as the API server would hand
/// it to the reconciler (uid, generation 1).
pub fn cluster(name: &str, spec: Value) -> SnsCluster {
    let spec: SnsClusterSpec = serde_json::from_value(spec).unwrap();
    let mut obj = SnsCluster::new(name, spec);
    obj.metadata.namespace = Some("prod".into());
    obj.metadata.uid = Some("uid-1".into());
    obj.metadata.generation = Some(1);
    obj.metadata.resource_version = Some("100".into());
    obj
}

pub fn node(cluster: u32, id: u32, alive: bool, is_master: bool, term: u64) -> NodeView {
    NodeView { cluster, id, kind: NodeKind::Server, alive, is_master, term, in_sync: alive, paired_server: 0 }
}

/// The healthy table of a default deployment: server 1 is every master;
/// the servers first (cluster by cluster), then their synchronizers.
pub fn healthy_table(clusters: u32, servers: u32) -> Vec<NodeView> {
    let mut nodes = Vec::new();
    for c in 1..=clusters {
        for s in 1..=servers {
            nodes.push(node(c, s, true, s == 1, 1));
        }
    }
    for c in 1..=clusters {
        for s in 1..=servers {
            nodes.push(NodeView {
                kind: NodeKind::Synchronizer,
                id: 100 + 10 * c + s,
                paired_server: s,
                is_master: false,
                in_sync: false,
                ..node(c, s, true, false, 1)
            });
        }
    }
    nodes
}

pub fn server_pod(instance: &str, cluster: u32, server: u32, role: Option<&str>) -> Pod {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_INSTANCE.to_string(), instance.to_string());
    labels.insert(LABEL_CLUSTER.to_string(), cluster.to_string());
    labels.insert(LABEL_SERVER.to_string(), server.to_string());
    if let Some(r) = role {
        labels.insert(LABEL_ROLE.to_string(), r.to_string());
    }
    let mut pod = Pod::default();
    pod.metadata.name = Some(format!("{instance}-server-{cluster}-{server}-0"));
    pod.metadata.namespace = Some("prod".into());
    pod.metadata.labels = Some(labels);
    pod
}

/// A server pod made from a template of hash `hash`, Ready or not.
pub fn rolled_pod(instance: &str, cluster: u32, server: u32, hash: &str, ready: bool) -> Pod {
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    let mut p = server_pod(instance, cluster, server, None);
    p.metadata.uid = Some(format!("uid-{cluster}-{server}-{hash}"));
    p.metadata.annotations = Some([(crate::render::TEMPLATE_HASH.to_string(), hash.to_string())].into());
    let status = if ready { "True" } else { "False" };
    let condition = PodCondition { type_: "Ready".into(), status: status.into(), ..Default::default() };
    p.status = Some(PodStatus { conditions: Some(vec![condition]), ..Default::default() });
    p
}

/// A coordinator in memory: its routing table (or unreachable, when
/// None); switchovers done as the real one does them (the in-sync slave,
/// or the server asked for, becomes master under the next term) or
/// refused with `refuse`'s reason; the coordinators it was told to forget.
#[derive(Default)]
pub struct FixedTable {
    pub answer: Mutex<Option<Vec<NodeView>>>,
    pub forgotten: Mutex<Vec<String>>,
    /// Every switchover asked for: (cluster, to).
    pub switchovers: Mutex<Vec<(u32, Option<u32>)>>,
    pub refuse: Mutex<Option<String>>,
    /// Every `authenticate` call, in order.
    pub authenticated: Mutex<Vec<(String, Credentials)>>,
    /// Calls (`table` or `switchover`) to an endpoint no `authenticate`
    /// had named yet: the real client would make them without the token.
    pub unauthenticated: Mutex<Vec<String>>,
}

impl FixedTable {
    fn check_authenticated(&self, call: &str, endpoint: &str) {
        if !self.authenticated.lock().unwrap().iter().any(|(e, _)| e == endpoint) {
            self.unauthenticated.lock().unwrap().push(format!("{call} {endpoint}"));
        }
    }

    fn switch(&self, cluster: u32, to: Option<u32>) -> std::result::Result<SwitchoverDone, String> {
        if let Some(why) = self.refuse.lock().unwrap().clone() {
            return Err(why);
        }
        let mut guard = self.answer.lock().unwrap();
        let nodes = guard.as_mut().ok_or("unreachable")?;
        let servers = |n: &&mut NodeView| n.kind == NodeKind::Server && n.cluster == cluster;
        let from = nodes.iter_mut().filter(servers).find(|n| n.alive && n.is_master).map(|n| n.id);
        let from = from.ok_or_else(|| format!("cluster {cluster} has no live master"))?;
        let target = nodes
            .iter_mut()
            .filter(servers)
            .find(|n| n.id != from && n.alive && n.in_sync && to.is_none_or(|t| t == n.id))
            .map(|n| n.id)
            .ok_or_else(|| format!("no live in-sync server of cluster {cluster} to hand the role to"))?;
        let term = nodes.iter().filter(|n| n.cluster == cluster).map(|n| n.term).max().unwrap_or(0) + 1;
        for n in nodes.iter_mut().filter(|n| n.cluster == cluster) {
            n.term = term;
            if n.kind == NodeKind::Server {
                n.is_master = n.id == target;
            }
        }
        Ok(SwitchoverDone { from, to: target, term, stepped_down: true, millis: 7 })
    }
}

impl RoutingTable for FixedTable {
    fn table<'a>(&'a self, endpoint: &'a str) -> BoxFuture<'a, Result<Vec<NodeView>>> {
        self.check_authenticated("table", endpoint);
        let answer = self.answer.lock().unwrap().clone();
        Box::pin(async move {
            answer.ok_or_else(|| Error::Coordinator { endpoint: endpoint.into(), reason: "connection refused".into() })
        })
    }

    fn forget(&self, endpoint: &str) {
        self.forgotten.lock().unwrap().push(endpoint.to_string());
    }

    fn switchover<'a>(
        &'a self,
        endpoint: &'a str,
        cluster: u32,
        to: Option<u32>,
    ) -> BoxFuture<'a, Result<SwitchoverDone>> {
        self.check_authenticated("switchover", endpoint);
        self.switchovers.lock().unwrap().push((cluster, to));
        let result = self.switch(cluster, to).map_err(|reason| Error::Switchover { cluster, reason });
        Box::pin(async move { result })
    }

    fn authenticate(&self, endpoint: &str, credentials: Credentials) {
        self.authenticated.lock().unwrap().push((endpoint.to_string(), credentials));
    }
}

/// What the mocked API server holds, for its list and get answers.
#[derive(Default, Clone)]
pub struct World {
    pub statefulsets: Vec<Value>,
    pub services: Vec<Value>,
    pub network_policies: Vec<Value>,
    pub pods: Vec<Pod>,
    /// Answers to GET of a Deployment by name (the coordinator's former kind).
    pub deployments: Vec<Value>,
    /// Answer creation of the broker credentials with 409 AlreadyExists.
    pub secret_exists: bool,
    /// Answers to GET of a Secret by name (merge patches of others: 404).
    pub secrets: Vec<Value>,
    /// Answer every server-side apply with 500.
    pub fail_applies: bool,
    /// Answer the server-side apply of objects of these names with 422, as
    /// the API server refuses a change of an immutable field.
    pub refuse_applies: Vec<String>,
    /// Answer a merge patch of the SnsCluster with 409 (it changed since).
    pub conflict_on_merge: bool,
    /// The coordinator's StatefulSet, listed by name (None: absent).
    pub coordinator: Option<Value>,
    /// Ready replicas of the managed broker's StatefulSet (None: absent).
    pub broker_ready: Option<i32>,
}

/// One call the reconciler made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    /// Path and query, e.g. `/api/v1/namespaces/prod/pods?&labelSelector=...`.
    pub uri: String,
    pub body: Value,
}

impl Call {
    /// `METHOD path` without the query string.
    pub fn line(&self) -> String {
        let path = self.uri.split('?').next().unwrap_or_default();
        format!("{} {path}", self.method)
    }
}

/// A Context wired to a mocked API server and a routing table that the
/// test can change; the server task answers requests until the Context is
/// dropped and then yields every call it saw.
pub struct Mock {
    pub ctx: Arc<Context>,
    pub table: Arc<FixedTable>,
    world: Arc<Mutex<World>>,
    server: tokio::task::JoinHandle<Vec<Call>>,
}

impl Mock {
    pub fn new(world: World, table: Option<Vec<NodeView>>) -> Mock {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let fixed = Arc::new(FixedTable { answer: Mutex::new(table), ..Default::default() });
        let ctx = Context::new(
            client,
            fixed.clone(),
            Arc::new(Metrics::default()),
            RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() },
            Duration::from_secs(60),
        );
        let world = Arc::new(Mutex::new(world));
        let shared = world.clone();
        let server = tokio::spawn(async move {
            let mut handle = handle;
            let mut calls = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let uri = req.uri().to_string();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value =
                    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
                let (status, reply) = answer(&shared.lock().unwrap(), &method, &uri, &body);
                calls.push(Call { method, uri, body });
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
            calls
        });
        Mock { ctx: Arc::new(ctx), table: fixed, world, server }
    }

    pub fn set_table(&self, table: Option<Vec<NodeView>>) {
        *self.table.answer.lock().unwrap() = table;
    }

    /// Changes what the API server holds from now on (as other controllers
    /// would between two reconciles).
    pub fn change_world(&self, change: impl FnOnce(&mut World)) {
        change(&mut self.world.lock().unwrap());
    }

    /// Drops the Context (so the mocked server sees its client go) and
    /// returns every call made.
    pub async fn calls(self) -> Vec<Call> {
        drop(self.ctx);
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the mocked API server stops once the client is dropped")
            .unwrap()
    }
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// What a real API server would answer, closely enough for the client.
fn answer(world: &World, method: &str, uri: &str, body: &Value) -> (StatusCode, Value) {
    let path = uri.split('?').next().unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or_default();
    match method {
        // The coordinator's or the broker's StatefulSet, listed by name.
        "GET" if last == "statefulsets" && uri.contains("fieldSelector=metadata.name") => {
            let name = uri.split("metadata.name%3D").nth(1).unwrap_or_default().split('&').next().unwrap_or_default();
            if name.ends_with("-coordinator") {
                return (StatusCode::OK, list("StatefulSetList", world.coordinator.iter().cloned().collect()));
            }
            let items = match world.broker_ready {
                Some(n) => vec![
                    json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": "prod"}, "status": {"replicas": 1, "readyReplicas": n}}),
                ],
                None => vec![],
            };
            (StatusCode::OK, list("StatefulSetList", items))
        }
        "GET" if last == "statefulsets" => (StatusCode::OK, list("StatefulSetList", world.statefulsets.clone())),
        "GET" if last == "services" => (StatusCode::OK, list("ServiceList", world.services.clone())),
        "GET" if last == "networkpolicies" => {
            (StatusCode::OK, list("NetworkPolicyList", world.network_policies.clone()))
        }
        "GET" if path.contains("/secrets/") => match world.secrets.iter().find(|d| d["metadata"]["name"] == last) {
            Some(d) => (StatusCode::OK, d.clone()),
            None => not_found(),
        },
        "DELETE" if last == "secrets" => (StatusCode::OK, list("SecretList", vec![])),
        "PATCH" if path.contains("/secrets/") && !world.secrets.iter().any(|d| d["metadata"]["name"] == last) => {
            not_found()
        }
        "GET" if last == "pods" => {
            (StatusCode::OK, list("PodList", world.pods.iter().map(|p| serde_json::to_value(p).unwrap()).collect()))
        }
        "GET" if path.contains("/deployments/") => {
            match world.deployments.iter().find(|d| d["metadata"]["name"] == last) {
                Some(d) => (StatusCode::OK, d.clone()),
                None => not_found(),
            }
        }
        "POST"
            if last == "secrets"
                && ((world.secret_exists
                    && body["metadata"]["name"].as_str().is_some_and(|n| n.ends_with("-rabbitmq-credentials")))
                    || world.secrets.iter().any(|d| d["metadata"]["name"] == body["metadata"]["name"])) =>
        {
            (
                StatusCode::CONFLICT,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "already exists"}),
            )
        }
        "POST" => (StatusCode::CREATED, body.clone()),
        "PUT" => (StatusCode::OK, body.clone()),
        "DELETE" if last == "persistentvolumeclaims" => (StatusCode::OK, list("PersistentVolumeClaimList", vec![])),
        "DELETE" => (StatusCode::OK, json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})),
        "PATCH" if !body.is_array() && world.refuse_applies.iter().any(|n| path.ends_with(&format!("/{n}"))) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": "StatefulSet.apps is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"}),
        ),
        "PATCH" if world.fail_applies && !body.is_array() => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd is having a bad day"}),
        ),
        "PATCH" if path.ends_with("/status") => {
            let name = path.rsplit('/').nth(1).unwrap_or_default();
            (
                StatusCode::OK,
                json!({"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "metadata": {"name": name, "namespace": "prod"}, "spec": {}, "status": body["status"]}),
            )
        }
        // A merge patch of a pod's labels: answer with a pod of that name.
        "PATCH" if path.contains("/pods/") => (
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": last, "namespace": "prod"}}),
        ),
        "PATCH" if path.contains("/snsclusters/") && world.conflict_on_merge && !body.is_array() => (
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        ),
        // The finalizer helper's JSON patch, or a merge patch of the
        // SnsCluster's metadata: answer with a bare SnsCluster.
        "PATCH" if body.is_array() || path.contains("/snsclusters/") => (
            StatusCode::OK,
            json!({"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "metadata": {"name": last, "namespace": "prod"}, "spec": {}}),
        ),
        // Server-side apply: the applied object is what comes back.
        "PATCH" => (StatusCode::OK, body.clone()),
        _ => not_found(),
    }
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

/// A Deployment `name` in `prod`, as older operators made the coordinator:
/// owned by the fixture SnsCluster (`uid-1`) and labelled as its children.
pub fn old_coordinator_deployment(name: &str, deleting: bool) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": format!("{name}-coordinator"), "namespace": "prod",
            "labels": {
                "app.kubernetes.io/instance": name, "app.kubernetes.io/managed-by": "sns-operator",
                "app.kubernetes.io/component": "coordinator"
            },
            "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": name, "uid": "uid-1", "controller": true}]
        }
    });
    if deleting {
        d["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        d["metadata"]["finalizers"] = json!(["foregroundDeletion"]);
    }
    d
}
