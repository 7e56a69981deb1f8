//! A mocked API server (tower-test) holding one Lease and any ConfigMaps
//! the way Kubernetes does, for the election's tests, the coordinator's
//! (its records) and the operator manager's.

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tower_test::mock;

pub const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";
pub const CONFIGMAPS: &str = "/api/v1/namespaces/ops/configmaps";

/// What the mocked API server holds: at most one Lease, versioned like
/// Kubernetes does (a create or replace bumps `resourceVersion`, a replace
/// naming another version is a 409 Conflict, a second create a 409
/// AlreadyExists), and every call seen.
#[derive(Default)]
pub struct ApiServer {
    pub lease: Option<Value>,
    pub version: u64,
    pub calls: Vec<String>,
    /// Answer every call with 500.
    pub failing: bool,
    /// Right after answering a GET, this holder writes the lease (another
    /// replica winning the race between our read and our write).
    pub race_after_get: Option<String>,
    /// ConfigMaps by name, versioned from the same counter as the lease.
    pub configmaps: BTreeMap<String, Value>,
    /// Every lease write kept, in order: its holder and when it was made.
    pub lease_writes: Vec<(String, std::time::Instant)>,
}

pub type Shared = Arc<Mutex<ApiServer>>;

pub fn status(code: StatusCode, reason: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code.as_u16(), "message": reason}),
    )
}

impl ApiServer {
    fn store(&mut self, mut lease: Value) -> Value {
        let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string();
        self.lease_writes.push((holder, std::time::Instant::now()));
        self.version += 1;
        lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.lease = Some(lease.clone());
        lease
    }

    /// Another replica's write: `holder` renews (or takes) the lease now,
    /// for `seconds`.
    pub fn written_by(&mut self, holder: &str, seconds: i32) {
        let mut lease = self.lease.clone().unwrap_or_else(|| json!({"metadata": {"name": "sns", "namespace": "ops"}}));
        lease["apiVersion"] = json!("coordination.k8s.io/v1");
        lease["kind"] = json!("Lease");
        lease["spec"]["holderIdentity"] = json!(holder);
        lease["spec"]["leaseDurationSeconds"] = json!(seconds);
        lease["spec"]["renewTime"] = json!("2026-01-01T00:00:00.000000Z");
        self.store(lease);
    }

    /// Another writer replaces ConfigMap `name` (its data only).
    pub fn configmap_written(&mut self, name: &str, data: Value) {
        self.version += 1;
        let mut cm = self.configmaps.get(name).cloned().unwrap_or_else(
            || json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ops"}}),
        );
        cm["data"] = data;
        cm["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.configmaps.insert(name.to_string(), cm);
    }

    fn configmap(&mut self, method: &str, name: Option<&str>, body: Value) -> (StatusCode, Value) {
        match (method, name) {
            ("GET", Some(n)) => match self.configmaps.get(n) {
                Some(cm) => (StatusCode::OK, cm.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            },
            ("POST", None) => {
                let n = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
                if self.configmaps.contains_key(&n) {
                    return status(StatusCode::CONFLICT, "AlreadyExists");
                }
                self.version += 1;
                let mut cm = body;
                cm["metadata"]["resourceVersion"] = json!(self.version.to_string());
                self.configmaps.insert(n, cm.clone());
                (StatusCode::CREATED, cm)
            }
            ("PUT", Some(n)) => {
                let current = self.configmaps.get(n).map(|c| c["metadata"]["resourceVersion"].clone());
                let Some(current) = current else { return status(StatusCode::NOT_FOUND, "NotFound") };
                if current != body["metadata"]["resourceVersion"] {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                self.version += 1;
                let mut cm = body;
                cm["metadata"]["resourceVersion"] = json!(self.version.to_string());
                self.configmaps.insert(n.to_string(), cm.clone());
                (StatusCode::OK, cm)
            }
            _ => status(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    fn answer(&mut self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        self.calls.push(format!("{method} {path}"));
        if self.failing {
            return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        }
        if let Some(rest) = path.strip_prefix(CONFIGMAPS) {
            let name = rest.strip_prefix('/').filter(|n| !n.is_empty());
            return self.configmap(method, name, body);
        }
        match (method, path) {
            ("GET", p) if p == format!("{LEASE}/sns") => {
                let reply = match self.lease.clone() {
                    Some(l) => (StatusCode::OK, l),
                    None => status(StatusCode::NOT_FOUND, "NotFound"),
                };
                if let Some(h) = self.race_after_get.take() {
                    self.written_by(&h, 15);
                }
                reply
            }
            ("POST", LEASE) if self.lease.is_some() => status(StatusCode::CONFLICT, "AlreadyExists"),
            ("POST", LEASE) => (StatusCode::CREATED, self.store(body)),
            ("PUT", p) if p == format!("{LEASE}/sns") => {
                let current = self.lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                if current != Some(body["metadata"]["resourceVersion"].clone()) {
                    return status(StatusCode::CONFLICT, "Conflict");
                }
                (StatusCode::OK, self.store(body))
            }
            _ => status(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    pub fn holder(&self) -> Option<String> {
        self.lease.as_ref().and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    }
}

/// What the mocked API server answers a call that is not about the lease.
pub enum Reply {
    Json(StatusCode, Value),
    /// Never answered (a watch with nothing to report).
    Hold,
}

/// A client whose lease calls `server` answers, and every other call
/// `other(method, path, query)`; each call is appended to `log`.
pub fn client_with(
    server: &Shared,
    log: Arc<Mutex<Vec<String>>>,
    other: impl Fn(&str, &str, &str) -> Reply + Send + 'static,
) -> Client {
    client_cut_off(server, log, Arc::default(), other)
}

/// A client for one replica: its lease and ConfigMap calls `server`
/// answers, except while `cut` is set (this replica cut off from the API
/// server: every call fails with 503).
pub fn replica_client(server: &Shared, cut: Arc<AtomicBool>) -> Client {
    client_cut_off(server, Arc::default(), cut, |_, _, _| {
        Reply::Json(StatusCode::NOT_FOUND, status(StatusCode::NOT_FOUND, "NotFound").1)
    })
}

fn client_cut_off(
    server: &Shared,
    log: Arc<Mutex<Vec<String>>>,
    cut: Arc<AtomicBool>,
    other: impl Fn(&str, &str, &str) -> Reply + Send + 'static,
) -> Client {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = server.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or_default().to_string();
            log.lock().unwrap().push(format!("{method} {path}?{query}"));
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            let (code, reply) = if cut.load(Ordering::SeqCst) {
                status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            } else if path.starts_with(LEASE) || path.starts_with(CONFIGMAPS) {
                server.lock().unwrap().answer(&method, &path, body)
            } else {
                match other(&method, &path, &query) {
                    Reply::Json(code, reply) => (code, reply),
                    Reply::Hold => {
                        held.push(send);
                        continue;
                    }
                }
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    Client::new(service, "default")
}

/// A client that only finds the lease.
pub fn client(server: &Shared) -> Client {
    client_with(server, Arc::default(), |_, _, _| {
        Reply::Json(StatusCode::NOT_FOUND, status(StatusCode::NOT_FOUND, "NotFound").1)
    })
}
