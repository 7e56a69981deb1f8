//! Two (or three) real coordinator replicas on loopback gRPC sharing one
//! mocked API server: who serves, takeover, the records across it.

use super::*;
use crate::coordinator::records::Records;
use crate::coordinator::state;
use crate::kube::leader::fake::{Shared, replica_client};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::{InSyncMember, InSyncRequest, RoutingTable, TableRequest};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as Health;
use tonic_health::pb::health_client::HealthClient;

const LEASE_DURATION: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_millis(100);
const RECORDS: &str = "sns-coordinator-records";

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        clusters: 1,
        gateway: false,
        // A dead server is noticed after 300 ms.
        heartbeat: Duration::from_millis(100),
        missed: 3,
        lease: Duration::from_millis(150),
        data_dir: None,
        secret: None,
    }
}

struct Replica {
    port: String,
    stop: CancellationToken,
    cut: Arc<AtomicBool>,
    done: tokio::task::JoinHandle<Result<()>>,
}

async fn replica(api: &Shared, identity: &str) -> Replica {
    let ha = HaConfig {
        lease: LeaseConfig {
            name: "sns".into(),
            namespace: "ops".into(),
            identity: identity.into(),
            // The shortest lease Kubernetes expresses (whole seconds).
            lease_duration: LEASE_DURATION,
            renew_deadline: Duration::from_millis(600),
            retry_period: RETRY,
        },
        records: RECORDS.into(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let cut = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let client = replica_client(api, cut.clone());
    let done = tokio::spawn(run(config(), ha, client, listener, stop.clone()));
    Replica { port, stop, cut, done }
}

impl Replica {
    async fn readiness(&self) -> Option<Health> {
        let mut h = HealthClient::new(net::channel("127.0.0.1", &self.port).ok()?);
        let reply = h.check(HealthCheckRequest { service: READINESS.into() }).await.ok()?;
        Health::try_from(reply.into_inner().status).ok()
    }

    async fn serving(&self) -> bool {
        self.readiness().await == Some(Health::Serving)
    }

    async fn table(&self) -> Result<RoutingTable, Status> {
        let channel = net::channel("127.0.0.1", &self.port).map_err(Status::from)?;
        CoordAdminClient::new(channel).table(TableRequest {}).await.map(|r| r.into_inner())
    }

    async fn alive(&self) -> bool {
        let Ok(channel) = net::channel("127.0.0.1", &self.port) else { return false };
        let mut h = HealthClient::new(channel);
        h.check(HealthCheckRequest { service: String::new() })
            .await
            .is_ok_and(|r| r.into_inner().status == Health::Serving as i32)
    }
}

/// Polls `cond` every 10 ms until it holds or 10 s pass.
async fn eventually<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A server that beats to whichever replica answers, taking on the role
/// it is given, like a real one.
#[derive(Clone)]
struct Beating {
    id: u32,
    incarnation: u64,
    role: Arc<std::sync::Mutex<(bool, i64)>>,
    stop: CancellationToken,
}

fn beating(id: u32, ports: Vec<String>) -> Beating {
    let s = Beating { id, incarnation: 100 + u64::from(id), role: Arc::default(), stop: CancellationToken::new() };
    let me = s.clone();
    tokio::spawn(async move {
        while !me.stop.is_cancelled() {
            for port in &ports {
                let (is_master, term) = *me.role.lock().unwrap();
                let info = ServerInfo {
                    server_id: me.id as i32,
                    hostname: "127.0.0.1".into(),
                    port: format!("{}", 7000 + me.id),
                    r#type: "server".into(),
                    cluster_id: 1,
                    is_master,
                    term,
                    incarnation: me.incarnation,
                    ..ServerInfo::default()
                };
                let Ok(channel) = net::channel("127.0.0.1", port) else { continue };
                if let Ok(r) = CoordServiceClient::new(channel).heartbeat(info).await {
                    let r = r.into_inner();
                    *me.role.lock().unwrap() = (r.is_master, r.term);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    s
}

fn stored_records(api: &Shared) -> Records {
    let cm = api.lock().unwrap().configmaps[RECORDS].clone();
    let b64 = cm["binaryData"][state::STATE_FILE].as_str().unwrap().to_string();
    let bytes: k8s_openapi::ByteString = serde_json::from_value(serde_json::Value::String(b64)).unwrap();
    state::decode(&bytes.0, "test").unwrap().records
}

fn node(t: &RoutingTable, id: u32) -> Option<&sns_proto::internal::Node> {
    t.nodes.iter().find(|n| n.kind == "server" && n.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_serves_and_a_standby_takes_over_with_the_records() {
    let api = Shared::default();
    let a = replica(&api, "coord-a").await;
    eventually("a leads", || a.serving()).await;
    let b = replica(&api, "coord-b").await;
    eventually("b names the leader", || async {
        b.table().await.is_err_and(|s| {
            s.code() == tonic::Code::Unavailable && s.message() == "standby coordinator; the leader is coord-a"
        })
    })
    .await;
    assert_eq!(b.readiness().await, Some(Health::NotServing), "a standby is not ready");
    assert!(b.alive().await, "a standby is alive");

    // Two servers register with the leader; the master records both in sync.
    let ports = vec![a.port.clone(), b.port.clone()];
    let s1 = beating(1, ports.clone());
    eventually("server 1 is master", || async { *s1.role.lock().unwrap() == (true, 1) }).await;
    let s2 = beating(2, ports.clone());
    eventually("server 2 registered", || async { a.table().await.is_ok_and(|t| node(&t, 2).is_some()) }).await;
    let members = vec![InSyncMember { id: 1, incarnation: 101 }, InSyncMember { id: 2, incarnation: 102 }];
    let channel = net::channel("127.0.0.1", &a.port).unwrap();
    CoordAdminClient::new(channel)
        .set_in_sync(InSyncRequest { cluster: 1, term: 1, master: 1, members })
        .await
        .unwrap();
    let before = stored_records(&api);
    assert_eq!(before[&1].term, 1);
    assert_eq!(before[&1].master, Some(1));
    assert_eq!(before[&1].in_sync, BTreeMap::from([(1, 101), (2, 102)]));

    // The leader stops: the standby takes over.
    let stopped = Instant::now();
    a.stop.cancel();
    eventually("b leads", || b.serving()).await;
    let takeover = stopped.elapsed();
    eprintln!("takeover after the leader stopped: {} ms", takeover.as_millis());
    assert!(takeover < LEASE_DURATION + RETRY, "took {takeover:?}");
    a.done.await.unwrap().unwrap();
    assert_eq!(stored_records(&api)[&1], before[&1], "the records came across intact");

    // The running master is adopted under its term, in sync as recorded.
    eventually("b adopted the master", || async {
        b.table().await.is_ok_and(|t| {
            node(&t, 1).is_some_and(|n| n.is_master && n.term == 1 && n.in_sync)
                && node(&t, 2).is_some_and(|n| !n.is_master && n.in_sync)
        })
    })
    .await;

    // The master dies: b promotes the in-sync slave under a newer term.
    s1.stop.cancel();
    eventually("server 2 is master", || async {
        b.table().await.is_ok_and(|t| node(&t, 2).is_some_and(|n| n.is_master && n.term == 2))
    })
    .await;
    let after = stored_records(&api);
    assert_eq!((after[&1].term, after[&1].master), (2, Some(2)));

    // The old leader comes back: a standby.
    let a = replica(&api, "coord-a").await;
    eventually("a names b", || async {
        a.table().await.is_err_and(|s| s.message() == "standby coordinator; the leader is coord-b")
    })
    .await;
    assert_eq!(a.readiness().await, Some(Health::NotServing));
    assert!(b.serving().await);
    s2.stop.cancel();
    a.stop.cancel();
    b.stop.cancel();
    a.done.await.unwrap().unwrap();
    b.done.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_before_the_standby_starts() {
    let api = Shared::default();
    let a = replica(&api, "coord-a").await;
    eventually("a leads", || a.serving()).await;
    let b = replica(&api, "coord-b").await;
    eventually("b stands by", || async { b.table().await.is_err_and(|s| s.message().contains("coord-a")) }).await;

    // a no longer reaches the API server (as if partitioned, or hung): it
    // cannot renew, and b must wait the lease out.
    let cut = Instant::now();
    a.cut.store(true, Ordering::SeqCst);
    let (mut a_stopped, mut b_started) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while b_started.is_none() {
        assert!(Instant::now() < deadline, "no takeover");
        // b is asked first: if it serves while a still did a moment ago,
        // both served at once.
        if b.serving().await {
            b_started = Some(cut.elapsed());
        }
        if a_stopped.is_none() && !a.serving().await {
            a_stopped = Some(cut.elapsed());
        }
        assert!(a_stopped.is_some() || b_started.is_none(), "both replicas served at once");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (a_stopped, b_started) = (a_stopped.unwrap(), b_started.unwrap());
    eprintln!(
        "leader cut off: it stopped serving after {} ms, the standby served after {} ms",
        a_stopped.as_millis(),
        b_started.as_millis()
    );
    assert!(a_stopped < Duration::from_millis(600) + RETRY * 2, "the leader stops by its renew deadline");
    // The lease runs from a's last renewal, which came up to a retry
    // period before the cut (so b may serve a little less than a lease
    // after the cut, as it did in one CI run): the mocked API server's
    // record of the writes says when each was made.
    let writes = api.lock().unwrap().lease_writes.clone();
    let renewed = writes.iter().rev().find(|(h, _)| h == "coord-a").map(|(_, at)| *at).expect("a renewed");
    let taken = writes.iter().find(|(h, at)| h == "coord-b" && *at > renewed).map(|(_, at)| *at).expect("b took it");
    assert!(
        taken.duration_since(renewed) >= LEASE_DURATION,
        "the standby waits the lease out: it took the lease {} ms after a's last renewal",
        taken.duration_since(renewed).as_millis()
    );
    assert!(a.table().await.is_err(), "the old leader refuses");
    a.cut.store(false, Ordering::SeqCst);
    eventually("a names b", || async { a.table().await.is_err_and(|s| s.message().contains("coord-b")) }).await;
    a.stop.cancel();
    b.stop.cancel();
    a.done.await.unwrap().unwrap();
    b.done.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_records_conflict_stops_the_leader_at_once() {
    let api = Shared::default();
    let a = replica(&api, "coord-a").await;
    eventually("a leads", || a.serving()).await;
    // Another writer (a previous leader's late write) changes the records.
    api.lock().unwrap().configmap_written(RECORDS, serde_json::json!({"epoch": "1"}));
    // a's next write (a server registering makes it master) is refused:
    // a stops serving, then, still holding the lease, reads the records
    // again and serves from them.
    let s1 = beating(1, vec![a.port.clone()]);
    eventually("a stepped down", || async { !a.serving().await }).await;
    eventually("a leads again", || a.serving()).await;
    eventually("server 1 is master", || async { *s1.role.lock().unwrap() == (true, 1) }).await;
    s1.stop.cancel();
    a.stop.cancel();
    a.done.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_state_file_is_imported_into_an_empty_configmap_once() {
    let api = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let file = StateFile::in_dir(dir.path()).unwrap();
    let old =
        BTreeMap::from([(1, crate::coordinator::table::Record { term: 4, master: Some(2), ..Default::default() })]);
    file.save(&old, 0).unwrap();
    let cfg = CoordinatorConfig { data_dir: Some(dir.path().to_path_buf()), ..config() };
    let store = ConfigMapRecords::new(replica_client(&api, Arc::default()), "ops", RECORDS, "coord-a");
    let (records, first) = claim(&cfg, &store).await.unwrap();
    assert_eq!(records, old, "imported");
    assert_eq!(stored_records(&api), old, "and written to the ConfigMap");
    // From then on the ConfigMap is the truth: a changed file is ignored.
    file.save(&BTreeMap::new(), 0).unwrap();
    let store = ConfigMapRecords::new(replica_client(&api, Arc::default()), "ops", RECORDS, "coord-b");
    let (records, second) = claim(&cfg, &store).await.unwrap();
    assert_eq!(records, old);
    assert!(second > first, "a later leader's epoch orders after");
}
