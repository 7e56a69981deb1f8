//! Catch-up of a rejoining slave: a cluster holding N posts, its slave
//! SIGKILLed, more posts written once the master runs without it, then the
//! slave started again; timed from the launcher's `start` until the slave
//! reports itself synced under the master's term, the state the master
//! installs on it (`Replica.InstallSnapshot`) sized from the master's log.

use super::grpc::{self, Coord};
use super::load::{self, Tracker};
use super::measure;
use super::stats::{Clock, ms};
use crate::Deployment;
use anyhow::{Context, Result, anyhow, bail};
use sns_node::ids::cluster_of;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{StatusRequest, TableRequest};
use std::time::{Duration, Instant};

/// Pause between two status polls of the rejoining slave: the figure's
/// resolution (a catch-up takes tens of ms).
const POLL: Duration = Duration::from_millis(2);
/// Posts in flight per author while filling (a stream takes up to 64).
const WINDOW_PER_AUTHOR: usize = 64;
/// How long after the slave reports itself synced the master's log line
/// may take to appear (it is written right after the snapshot call returns).
const LOG_GRACE: Duration = Duration::from_secs(2);

/// Counts and time bounds of the measure.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub cluster: u32,
    /// Posts the cluster's users write before the slave is killed.
    pub posts: usize,
    /// Posts written while the slave is down.
    pub extra: usize,
    /// Time bound of each writing phase (it may end with fewer posts).
    pub write_budget: Duration,
    /// How long posts may take to reach every follower after writing ends.
    pub drain: Duration,
    /// How long the slave may take to be back and synced.
    pub rejoin_budget: Duration,
}

/// The master's own account of the catch-up (its `slave caught up` line).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub bytes: u64,
    pub posts: u64,
    pub ms: u64,
}

pub struct CatchupResult {
    /// `start server-c-s` written -> the slave synced under the master's term.
    pub ms: f64,
    /// Posts the cluster's master held then (its users' timelines).
    pub master_posts: u64,
    pub snapshot: Option<Snapshot>,
    /// The writing before the kill and while the slave was down.
    pub fill: Tracker,
    pub down: Tracker,
    pub server: String,
}

/// Runs the measure with users `ids` (at least one in `plan.cluster`,
/// all following each other; the cluster's users write).
pub async fn measure(
    d: &mut Deployment,
    coord: &Coord,
    clock: Clock,
    ids: &[u32],
    plan: Plan,
) -> Result<CatchupResult> {
    let n = d.clusters;
    let mut users = measure::login_all(coord, ids).await?;
    measure::wait_users_known(&mut users, ids, n, Duration::from_secs(10)).await?;
    let edges: Vec<(u32, u32)> =
        ids.iter().flat_map(|&a| ids.iter().filter(move |&&b| b != a).map(move |&b| (a, b))).collect();
    measure::follow_all(&users, &edges).await?;
    let mut s = measure::open_streams(&mut users, super::followers_of(&edges), clock, 64).await?;
    let authors: Vec<u32> = ids.iter().copied().filter(|u| cluster_of(*u, n) == plan.cluster).collect();
    if authors.is_empty() {
        bail!("no catch-up user in cluster {}", plan.cluster);
    }
    let window = WINDOW_PER_AUTHOR * authors.len();
    let fill = load::max_rate(&mut s, &authors, window, plan.posts, plan.write_budget, plan.drain, n).await?;
    fill.verify("catch-up: writing before the kill")?;

    let (master, slave) = servers_of(&coord.addr, plan.cluster).await?;
    let master_name = format!("server-{}-{master}", plan.cluster);
    let server = format!("server-{}-{slave}", plan.cluster);
    let caught_up_before = caught_up_lines(&d.log(&master_name), slave).len();
    tokio::task::block_in_place(|| d.command(&format!("kill {server}")))?;
    // The posts below are written while the master runs without its slave
    // (the coordinator told it the slave is gone), so the slave comes back
    // behind by exactly those.
    wait_alone(&coord.addr, plan.cluster, master, Instant::now() + plan.rejoin_budget)
        .await
        .with_context(|| format!("the master noticing {server} is gone"))?;
    let down = load::max_rate(&mut s, &authors, window, plan.extra, plan.write_budget, plan.drain, n).await?;
    down.verify(&format!("catch-up: writing while {server} was down"))?;

    let t0 = Instant::now();
    tokio::task::block_in_place(|| d.command(&format!("start {server}")))?;
    let status = measure::wait_synced_slave(&coord.addr, plan.cluster, slave, POLL, t0 + plan.rejoin_budget)
        .await
        .with_context(|| format!("{server} rejoining as a synced slave"))?;
    let took = ms(t0.elapsed());
    // The master logs the snapshot it installed once the call returned.
    let mut snapshot = None;
    let until = Instant::now() + LOG_GRACE;
    loop {
        let log = d.log(&master_name);
        let lines = caught_up_lines(&log, slave);
        if lines.len() > caught_up_before {
            snapshot = lines.last().and_then(|l| parse_caught_up(l));
            break;
        }
        if Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(CatchupResult { ms: took, master_posts: status.posts, snapshot, fill, down, server })
}

/// The ids of the live master and the live slave of `cluster`.
async fn servers_of(coord_addr: &str, cluster: u32) -> Result<(u32, u32)> {
    let mut admin = CoordAdminClient::new(grpc::node_channel(coord_addr)?);
    let nodes = admin.table(TableRequest {}).await?.into_inner().nodes;
    let live = || nodes.iter().filter(|n| n.kind == "server" && n.cluster == cluster && n.alive);
    let master = live().find(|n| n.is_master).ok_or_else(|| anyhow!("cluster {cluster} has no master"))?;
    let slave = live().find(|n| !n.is_master).ok_or_else(|| anyhow!("cluster {cluster} has no slave"))?;
    Ok((master.id, slave.id))
}

/// Polls until server `master` of `cluster` reports no slave.
async fn wait_alone(coord_addr: &str, cluster: u32, master: u32, deadline: Instant) -> Result<()> {
    let mut admin = CoordAdminClient::new(grpc::node_channel(coord_addr)?);
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        let nodes = admin.table(TableRequest {}).await?.into_inner().nodes;
        let node = nodes
            .iter()
            .find(|n| n.kind == "server" && n.cluster == cluster && n.id == master)
            .ok_or_else(|| anyhow!("server {master} of cluster {cluster} is not in the table"))?;
        let addr = format!("{}:{}", node.host, node.port);
        match ReplicaClient::new(grpc::node_channel(&addr)?).status(StatusRequest {}).await {
            Ok(st) if st.get_ref().slave.is_empty() => return Ok(()),
            Ok(st) => last = format!("it still forwards to {}", st.get_ref().slave),
            Err(e) => last = format!("status: {}", e.message()),
        }
        tokio::time::sleep(POLL).await;
    }
    bail!("not in time; last seen: {last}")
}

/// The master's `slave caught up` lines about slave `id`.
fn caught_up_lines(log: &str, id: u32) -> Vec<&str> {
    log.lines().filter(|l| l.contains("slave caught up") && field(l, "slave") == Some(u64::from(id))).collect()
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split(&format!(" {key}=")).nth(1)?.split_whitespace().next()?.parse().ok()
}

fn parse_caught_up(line: &str) -> Option<Snapshot> {
    Some(Snapshot { bytes: field(line, "bytes")?, posts: field(line, "posts").unwrap_or(0), ms: field(line, "ms")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_masters_caught_up_line() {
        let log = "2026-11-21T10:00:00Z  INFO slave caught up slave=2 term=1 bytes=559123 posts=10000 ms=41\n\
                   2026-11-21T10:00:01Z  INFO slave caught up slave=1 term=2 bytes=10 posts=0 ms=1\n";
        let lines = caught_up_lines(log, 2);
        assert_eq!(lines.len(), 1);
        let s = parse_caught_up(lines[0]).expect("parsed");
        assert_eq!((s.bytes, s.posts, s.ms), (559_123, 10_000, 41));
        assert!(caught_up_lines(log, 3).is_empty());
    }
}
