//! What the suites ask the running nodes: the coordinator's routing table,
//! each server's `Replica.Status`, and the checks built on them (who is
//! master under which term, whether a slave caught up, that no two servers
//! accepted writes in one term, that every acknowledged post is in every
//! follower's feed exactly once).

use crate::load::WriterReport;
use crate::{Deployment, eventually, eventually_within, spec_files};
use anyhow::{Result, anyhow};
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{Node, ServerStatus, StatusRequest, TableRequest};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A multi-threaded runtime for a synchronous test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

/// Bounds one call to a node: a paused (SIGSTOPped) node must not hang a
/// poll loop.
const CALL: Duration = Duration::from_secs(2);

/// The coordinator's whole routing table.
pub async fn table(coord_port: u16) -> Result<Vec<Node>> {
    let call = async {
        let mut admin = CoordAdminClient::new(crate::secret::channel("127.0.0.1", &coord_port.to_string())?);
        anyhow::Ok(admin.table(TableRequest {}).await?.into_inner().nodes)
    };
    tokio::time::timeout(CALL, call).await.map_err(|_| anyhow!("coordinator did not answer within {CALL:?}"))?
}

/// A server's own account of itself.
pub async fn status(node: &Node) -> Result<ServerStatus> {
    status_at(&node.host, &node.port).await
}

/// `Replica.Status` of the server at `host:port`.
pub async fn status_at(host: &str, port: &str) -> Result<ServerStatus> {
    let call = async {
        let mut c = ReplicaClient::new(crate::secret::channel(host, port)?);
        anyhow::Ok(c.status(StatusRequest {}).await?.into_inner())
    };
    tokio::time::timeout(CALL, call).await.map_err(|_| anyhow!("{host}:{port} did not answer within {CALL:?}"))?
}

/// The table's entry for server `id` of `cluster`.
pub async fn server_node(coord_port: u16, cluster: u32, id: u32) -> Option<Node> {
    table(coord_port).await.ok()?.into_iter().find(|n| n.kind == "server" && n.cluster == cluster && n.id == id)
}

/// The live master's (id, term) of `cluster`, per the coordinator.
pub async fn master_of(coord_port: u16, cluster: u32) -> Option<(u32, u64)> {
    table(coord_port)
        .await
        .ok()?
        .into_iter()
        .find(|n| n.kind == "server" && n.cluster == cluster && n.is_master && n.alive)
        .map(|n| (n.id, n.term))
}

/// Waits until `cluster`'s master is server `id` under a term above `after`,
/// and that server says so itself; returns the term.
pub fn wait_master(rt: &tokio::runtime::Runtime, d: &Deployment, cluster: u32, id: u32, after: u64) -> Result<u64> {
    eventually(&format!("server {cluster}/{id} to be master above term {after}"), || {
        rt.block_on(async {
            let (m, term) = master_of(d.coord_port, cluster).await?;
            let node = server_node(d.coord_port, cluster, id).await?;
            let s = status(&node).await.ok()?;
            (m == id && term > after && s.is_master && s.term == term).then_some(term)
        })
    })
}

/// Waits (within `limit`) until server `id` of `cluster` serves on a lease
/// that the coordinator answering now granted: its lease is current more
/// than two seconds from now, when one that an earlier coordinator run
/// granted (a second at most) has run out. `what` names that coordinator.
pub fn wait_lease_from_current_run(
    rt: &tokio::runtime::Runtime,
    d: &Deployment,
    (cluster, id): (u32, u32),
    what: &str,
    limit: Duration,
) -> Result<()> {
    let since = std::time::Instant::now();
    eventually_within(&format!("server {cluster}/{id} to serve on a lease {what} granted"), limit, || {
        rt.block_on(async {
            let node = server_node(d.coord_port, cluster, id).await?;
            let st = status(&node).await.ok()?;
            (since.elapsed() > Duration::from_secs(2) && st.lease_valid).then_some(())
        })
    })
}

/// Waits until server `id` of `cluster` is a live slave synced under the
/// master's current term (i.e. it caught up).
pub fn wait_synced_slave(rt: &tokio::runtime::Runtime, d: &Deployment, cluster: u32, id: u32) -> Result<()> {
    eventually(&format!("server {cluster}/{id} to rejoin as a synced slave"), || {
        rt.block_on(async {
            let node = server_node(d.coord_port, cluster, id).await.filter(|n| n.alive)?;
            let (_, term) = master_of(d.coord_port, cluster).await?;
            let s = status(&node).await.ok()?;
            (!s.is_master && s.synced_term == term).then_some(())
        })
    })
}

/// (cluster, term) -> servers that logged accepting writes as master in it.
pub fn master_terms(d: &Deployment) -> BTreeMap<(u32, u64), BTreeSet<u32>> {
    let mut seen: BTreeMap<(u32, u64), BTreeSet<u32>> = BTreeMap::new();
    for c in 1..=d.clusters {
        for s in 1..=d.servers {
            for line in d.log(&format!("server-{c}-{s}")).lines().filter(|l| l.contains("accepting writes as master")) {
                let field = |k: &str| {
                    line.split(&format!("{k}="))
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                };
                if let (Some(cluster), Some(id), Some(term)) = (field("cluster"), field("id"), field("term")) {
                    seen.entry((cluster as u32, term)).or_default().insert(id as u32);
                }
            }
        }
    }
    seen
}

/// No two servers of a cluster accepted writes under the same term (and
/// some server accepted writes at all, so the check is not vacuous).
pub fn assert_one_master_per_term(d: &Deployment) {
    let terms = master_terms(d);
    assert!(!terms.is_empty(), "no server logged accepting writes");
    for ((cluster, term), ids) in &terms {
        assert_eq!(ids.len(), 1, "cluster {cluster}: servers {ids:?} all accepted writes in term {term}");
    }
}

/// Every acknowledged post of each writer appears exactly once in the feed
/// of each of its followers, on every server of the follower's cluster.
pub fn assert_exactly_once(
    d: &Deployment,
    servers: &[(u32, u32)],
    reports: &[WriterReport],
    followers: &BTreeMap<u32, Vec<u32>>,
) -> Result<()> {
    // Why the last look failed, and how many posts it checked.
    let last = std::cell::RefCell::new(String::new());
    let checked = std::cell::Cell::new(0usize);
    let check = || {
        checked.set(0);
        for &(c, s) in servers {
            let files = match spec_files(&d.server_dir(c, s)) {
                Ok(f) => f,
                Err(e) => {
                    *last.borrow_mut() = e.to_string();
                    return None;
                }
            };
            for r in reports {
                for &f in followers.get(&r.user).into_iter().flatten() {
                    if sns_node::ids::cluster_of(f, d.clusters) != c {
                        continue;
                    }
                    let feed = sns_node::store::record::decode_posts(
                        files.get(&format!("{f}_following.txt")).map_or("", |t| t),
                    );
                    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                    for p in feed.iter().filter(|p| p.user == r.user) {
                        *counts.entry(p.text.as_str()).or_default() += 1;
                    }
                    let wrong: Vec<(&String, usize)> = r
                        .acked
                        .iter()
                        .map(|text| (text, counts.get(text.as_str()).copied().unwrap_or(0)))
                        .filter(|(_, n)| *n != 1)
                        .collect();
                    if let Some((text, n)) = wrong.first() {
                        *last.borrow_mut() = format!(
                            "server {c}/{s}: feed of {f} has {text:?} {n} times ({} of {}'s {} acknowledged posts wrong there, the last {:?})",
                            wrong.len(),
                            r.user,
                            r.acked.len(),
                            wrong.last().map(|(t, _)| t)
                        );
                        return None;
                    }
                    checked.set(checked.get() + r.acked.len());
                }
            }
        }
        Some(())
    };
    let started = std::time::Instant::now();
    if let Err(e) = eventually("every acknowledged post exactly once in every follower's feed", check) {
        // Still a failure; but say whether the posts were late or lost.
        let first = last.borrow().clone();
        let verdict = match crate::eventually_within("the missing posts", LATE, check) {
            Ok(()) => format!("late, not lost: all there {:?} after the check began", started.elapsed()),
            Err(_) => format!("still so {:?} after the check began: {}", started.elapsed(), last.borrow()),
        };
        return Err(anyhow!("{e}: {first} ({verdict})"));
    }
    anyhow::ensure!(checked.get() > 0, "no acknowledged post to check: the check would pass vacuously");
    Ok(())
}

/// How much longer a failed feed check keeps looking, to tell a late post
/// from a lost one in its message.
const LATE: Duration = Duration::from_secs(60);

/// The coordinator's `GetServer` answer for `user`.
pub async fn get_server(coord_port: u16, user: u32) -> Result<sns_proto::csce438::ServerInfo> {
    use sns_proto::csce438::coord_service_client::CoordServiceClient;
    let call = async {
        let mut c = CoordServiceClient::connect(format!("http://127.0.0.1:{coord_port}")).await?;
        anyhow::Ok(c.get_server(sns_proto::csce438::Id { id: user as i32 }).await?.into_inner())
    };
    tokio::time::timeout(CALL, call).await.map_err(|_| anyhow!("coordinator did not answer within {CALL:?}"))?
}

/// A client of the SNS service at `host:port` (one server, not through the
/// coordinator).
pub async fn sns_at(
    host: &str,
    port: &str,
) -> Result<sns_proto::csce438::sns_service_client::SnsServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))?
        .connect_timeout(CALL)
        .timeout(CALL)
        .connect_lazy();
    Ok(sns_proto::csce438::sns_service_client::SnsServiceClient::new(channel))
}

/// A Login / Follow / UnFollow request.
pub fn request(user: u32, argument: Option<u32>, request_id: u64) -> sns_proto::csce438::Request {
    sns_proto::csce438::Request {
        username: user.to_string(),
        arguments: argument.iter().map(u32::to_string).collect(),
        request_id,
    }
}

/// Runs `sns-node promote` against the deployment's coordinator.
pub fn promote_cli(d: &Deployment, cluster: u32, server: u32, accept_data_loss: bool) -> Result<std::process::Output> {
    let mut cmd = std::process::Command::new(crate::bin("sns-node"));
    cmd.args(["promote", "-h", "127.0.0.1", "-k", &d.coord_port.to_string()])
        .arg("--secret-file")
        .arg(crate::secret::file())
        .args(["--cluster", &cluster.to_string(), "--server", &server.to_string()]);
    if accept_data_loss {
        cmd.arg("--accept-data-loss");
    }
    Ok(cmd.output()?)
}

/// What the server at `host:port` answers to a `grpc.health.v1` check of
/// `service` ("" = the process, "readiness", "csce438.SNSService"): true
/// for SERVING, false for NOT_SERVING.
pub async fn health(host: &str, port: &str, service: &str) -> Result<bool> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))?.connect().await?;
        let mut c = HealthClient::new(channel);
        let req = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
        anyhow::Ok(c.check(req).await?.into_inner().status)
    };
    let status = tokio::time::timeout(CALL, call)
        .await
        .map_err(|_| anyhow!("{host}:{port} did not answer a health check within {CALL:?}"))??;
    match ServingStatus::try_from(status) {
        Ok(ServingStatus::Serving) => Ok(true),
        Ok(ServingStatus::NotServing) => Ok(false),
        other => Err(anyhow!("{host}:{port}: health of {service:?} is {other:?}")),
    }
}

/// Server `id` of `cluster`'s (liveness, readiness, serving clients)
/// health, per its own health service.
pub async fn healths(coord_port: u16, cluster: u32, id: u32) -> Result<(bool, bool, bool)> {
    let n = server_node(coord_port, cluster, id).await.ok_or_else(|| anyhow!("server {cluster}/{id} unknown"))?;
    Ok((
        health(&n.host, &n.port, "").await?,
        health(&n.host, &n.port, "readiness").await?,
        health(&n.host, &n.port, "csce438.SNSService").await?,
    ))
}

/// Whether process `pid` still runs: a thread of it has not ended. (A
/// killed process's main thread can be a zombie while another is stuck in
/// the kernel, on a hung disk.)
pub fn running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])))
    })
}
