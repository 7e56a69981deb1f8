//! Two operator replicas against one mocked API server: only the one
//! holding the Lease watches SnsClusters, and the other takes over when it
//! shuts down.

use super::*;
use crate::metrics::tests::scrape;
use http::StatusCode;
use serde_json::json;
use sns_node::kube::leader::fake::{Reply, Shared, client_with, status};
use std::time::Instant;

/// Lists are empty and watches never report: there is nothing to
/// reconcile, only who watches matters here.
fn nothing_to_reconcile(method: &str, path: &str, query: &str) -> Reply {
    if method != "GET" {
        return Reply::Json(StatusCode::NOT_FOUND, status(StatusCode::NOT_FOUND, "NotFound").1);
    }
    if query.contains("watch=true") {
        return Reply::Hold;
    }
    let (api_version, kind) = match path.rsplit('/').next().unwrap_or_default() {
        "snsclusters" => ("sns.io/v1alpha1", "SnsClusterList"),
        "statefulsets" => ("apps/v1", "StatefulSetList"),
        "services" => ("v1", "ServiceList"),
        _ => return Reply::Json(StatusCode::NOT_FOUND, status(StatusCode::NOT_FOUND, "NotFound").1),
    };
    Reply::Json(
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "1"}, "items": []}),
    )
}

struct Replica {
    log: Arc<Mutex<Vec<String>>>,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    async fn start(server: &Shared) -> Replica {
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let client = client_with(server, log.clone(), nothing_to_reconcile);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = RunConfig {
            metrics_addr: addr,
            default_image: "tiny-sns:test".into(),
            namespace: None,
            stall_timeout: Duration::from_secs(120),
            coordinator_timeout: Duration::from_secs(1),
            resync: Duration::from_secs(60),
            leader_election: Some(LeaderElection {
                lease_name: "sns".into(),
                lease_namespace: Some("ops".into()),
                lease_duration: Duration::from_secs(1),
                renew_deadline: Duration::from_millis(600),
                retry_period: Duration::from_millis(50),
            }),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with(client, cfg, listener, shutdown.clone()));
        Replica { log, addr, shutdown, task }
    }

    async fn leads(&self) -> bool {
        scrape(self.addr).await["sns_operator_leader"] == 1.0
    }

    /// Whether it has listed or watched SnsClusters (beyond the one-item
    /// list every replica makes at start to check the CRD is there).
    fn watched(&self) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("GET /apis/sns.io/v1alpha1/snsclusters?") && !c.contains("limit=1"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("a replica stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over_on_shutdown() {
    let server = Shared::default();
    let a = Replica::start(&server).await;
    eventually("a leads", async || a.leads().await).await;
    eventually("a watches SnsClusters", async || a.watched()).await;

    let b = Replica::start(&server).await;
    // b stands by while a renews the lease many times over.
    let version = server.lock().unwrap().version;
    eventually("a renews while b stands by", async || server.lock().unwrap().version >= version + 20).await;
    assert!(!b.leads().await, "two leaders");
    assert!(!b.watched(), "a standby watches nothing: {:?}", b.log.lock().unwrap());
    assert!(b.log.lock().unwrap().iter().any(|c| c.contains("/leases/sns")), "b stands for leader");

    // a shuts down: it gives the lease up and b leads and watches.
    a.stop().await;
    eventually("b leads", async || b.leads().await).await;
    eventually("b watches SnsClusters", async || b.watched()).await;
    assert!(server.lock().unwrap().holder().is_some_and(|h| !h.is_empty()));
    b.stop().await;
    assert_eq!(server.lock().unwrap().holder(), None, "the last leader released the lease");
}
