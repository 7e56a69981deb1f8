//! The Tiny SNS measures that need more than one post stream: setting up
//! users and follows, follow visibility, failover, and memory.

use super::grpc::{self, Coord, User};
use super::load::Streams;
use super::stats::{Clock, Samples, ms};
use crate::Deployment;
use anyhow::{Context, Result, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt};
use sns_node::ids::cluster_of;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{ServerStatus, StatusRequest, TableRequest};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Concurrent setup calls (logins, follows, stream openings): enough to
/// keep every cluster's write lane busy, few enough not to time out.
const SETUP_CONCURRENCY: usize = 32;

/// Logs every user in, concurrently.
pub async fn login_all(coord: &Coord, ids: &[u32]) -> Result<Vec<User>> {
    futures_util::stream::iter(ids.iter().map(|&id| User::login(coord, id)))
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

/// Waits until the master of every cluster lists all of `ids` (logins
/// propagate through the broker; FOLLOW needs the target to be known).
pub async fn wait_users_known(users: &mut [User], ids: &[u32], clusters: u32, budget: Duration) -> Result<()> {
    let deadline = Instant::now() + budget;
    for c in 1..=clusters {
        let u = users
            .iter_mut()
            .find(|u| cluster_of(u.id, clusters) == c)
            .ok_or_else(|| anyhow!("no user in cluster {c}"))?;
        loop {
            let (all, _) = u.list().await?;
            let missing = ids.iter().filter(|id| !all.contains(id)).count();
            if missing == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("cluster {c} still lacks {missing} of {} users after {budget:?}", ids.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Makes every (follower, followee) edge, concurrently; each must succeed.
pub async fn follow_all(users: &[User], edges: &[(u32, u32)]) -> Result<()> {
    let by_id: HashMap<u32, &User> = users.iter().map(|u| (u.id, u)).collect();
    let calls = edges.iter().map(|&(f, g)| {
        let mut u = (*by_id.get(&f).expect("follower is a user")).clone();
        async move {
            let reply = u.relation(g, true).await?;
            match reply.as_str() {
                "SUCCESS" | "FAILURE_ALREADY_EXISTS" => Ok(()),
                other => Err(anyhow!("{f} follow {g}: {other}")),
            }
        }
    });
    futures_util::stream::iter(calls).buffer_unordered(SETUP_CONCURRENCY * 2).try_collect::<Vec<()>>().await?;
    // A post reaches a follower only if the follow reached the author's
    // cluster first (visibility follows the log): wait until every followee
    // lists its followers.
    let mut followers: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(f, g) in edges {
        followers.entry(g).or_default().push(f);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (g, want) in followers {
        let mut u = (*by_id.get(&g).ok_or_else(|| anyhow!("followee {g} is not a user"))?).clone();
        loop {
            let (_, have) = u.list().await?;
            if want.iter().all(|f| have.contains(f)) {
                break;
            }
            if Instant::now() > deadline {
                bail!("user {g}'s followers never reached {want:?} (have {have:?})");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Opens every user's timeline stream; `followers` says who must receive
/// whose posts.
pub async fn open_streams(
    users: &mut [User],
    followers: HashMap<u32, Vec<u32>>,
    clock: Clock,
    buffer: usize,
) -> Result<Streams> {
    let (tx, rx) = mpsc::unbounded_channel();
    let opened: Vec<grpc::Timeline> =
        futures_util::stream::iter(users.iter_mut().map(|u| u.open_timeline(clock, tx.clone(), buffer)))
            .buffer_unordered(SETUP_CONCURRENCY)
            .try_collect()
            .await?;
    Ok(Streams {
        clock,
        timelines: opened.into_iter().map(|t| (t.user, t)).collect(),
        followers,
        events: rx,
        next_seq: 1,
    })
}

/// Follow visibility across clusters.
#[derive(Default)]
pub struct FollowResult {
    /// FOLLOW sent -> the follower in the followee's LIST (ms).
    pub visible: Samples,
    /// FOLLOW sent -> its SUCCESS reply (a durable client write) (ms).
    pub ack: Samples,
    /// UNFOLLOW sent -> the follower gone from the followee's LIST (ms).
    pub unfollow_visible: Samples,
}

/// Over ordered pairs of users in different clusters, in turn: FOLLOW, then
/// poll the followee's LIST on its own master until the follower shows;
/// then the same for UNFOLLOW. `poll` paces the LIST calls.
pub async fn follow_visible(
    users: &[User],
    clusters: u32,
    count: usize,
    poll: Duration,
    budget: Duration,
) -> Result<FollowResult> {
    let pairs: Vec<(usize, usize)> = (0..users.len())
        .flat_map(|a| (0..users.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| cluster_of(users[a].id, clusters) != cluster_of(users[b].id, clusters))
        .collect();
    if pairs.is_empty() {
        bail!("follow visibility needs users in two clusters");
    }
    let mut r = FollowResult::default();
    let deadline = Instant::now() + budget;
    for i in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let (a, b) = pairs[i % pairs.len()];
        let (mut f, mut g) = (users[a].clone(), users[b].clone());
        for follow in [true, false] {
            let t0 = Instant::now();
            let reply = f.relation(g.id, follow).await?;
            if reply != "SUCCESS" {
                bail!("{} {} {}: {reply}", f.id, if follow { "follow" } else { "unfollow" }, g.id);
            }
            if follow {
                r.ack.push(ms(t0.elapsed()));
            }
            let limit = Instant::now() + Duration::from_secs(5);
            loop {
                let (_, followers) = g.list().await?;
                if followers.contains(&f.id) == follow {
                    break;
                }
                if Instant::now() > limit {
                    bail!("{} never showed {} follow={follow} within 5 s", g.id, f.id);
                }
                tokio::time::sleep(poll).await;
            }
            let took = ms(t0.elapsed());
            if follow {
                r.visible.push(took);
            } else {
                r.unfollow_visible.push(took);
            }
        }
    }
    Ok(r)
}

/// Memory of every running process of the deployment, by name, plus the
/// launcher itself as `launcher`.
pub fn node_memory(d: &mut Deployment) -> Result<BTreeMap<String, super::system::Memory>> {
    let mut mem = BTreeMap::new();
    for (name, pid) in node_pids(d)? {
        if let Some(m) = super::system::memory(pid) {
            mem.insert(name, m);
        }
    }
    Ok(mem)
}

/// Pids of the launcher's running children, by name.
pub fn node_pids(d: &mut Deployment) -> Result<BTreeMap<String, u32>> {
    let status = tokio::task::block_in_place(|| d.status())?;
    let mut pids: BTreeMap<String, u32> = status.into_iter().filter_map(|(n, pid)| Some((n, pid?))).collect();
    pids.insert("launcher".into(), d.launcher_pid());
    Ok(pids)
}

/// How the master is taken down, and brought back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL (a crash): `kill`, then `start` again.
    Kill,
    /// SIGSTOP (a hung process that keeps its connections): `pause`, then
    /// `resume`; only missed heartbeats reveal it.
    Pause,
    /// A planned switchover to the in-sync slave (`switchover <c>`); the
    /// old master stays up and rejoins as slave by itself.
    Switchover,
}

/// Faults of the master and how long a connected client waited.
#[derive(Default)]
pub struct FailoverResult {
    /// `kill master-<c>` sent -> the client's next command answered (ms).
    pub outage: Samples,
    /// `start` of the killed server -> it is back as its master's synced
    /// slave (ms).
    pub rejoin: Samples,
    /// Calls the client made during the outages (failed ones included).
    pub attempts: usize,
    /// Answers other than SUCCESS (a promoted server that missed writes
    /// answers, but from a different state).
    pub non_success: usize,
}

/// Pause between two polls of a restarted server's status.
const REJOIN_POLL: Duration = Duration::from_millis(20);

/// Pause between two tries of a client whose server is gone: short enough
/// that the measured outage is the system's, not the client's back-off.
const RETRY: Duration = Duration::from_millis(5);

/// For each fault, in turn over the clusters: a client of that cluster,
/// connected and warm, sees its master SIGKILLed (or SIGSTOPped) through
/// the launcher and repeats its command (FOLLOW/UNFOLLOW of another user,
/// alternately), each try bounded by `call_timeout`, re-asking the
/// coordinator for its server after each failure, until one is answered.
/// The server is then started (or resumed) and must be back as a synced
/// slave (see [`wait_synced_slave`]) before the next fault.
#[allow(clippy::too_many_arguments, reason = "one call site; a struct would only rename them")]
pub async fn failover(
    d: &mut Deployment,
    coord: &Coord,
    clients: &mut [User],
    fault: Fault,
    kills: usize,
    call_timeout: Duration,
    per_kill: Duration,
    budget: Duration,
) -> Result<FailoverResult> {
    let clusters = d.clusters;
    let mut r = FailoverResult::default();
    let deadline = Instant::now() + budget;
    // Whether each client's next command is a FOLLOW.
    let mut follow: HashMap<u32, bool> = clients.iter().map(|c| (c.id, true)).collect();
    let targets: Vec<u32> = clients.iter().map(|c| c.id).collect();
    for k in 0..kills {
        if Instant::now() >= deadline {
            break;
        }
        let cluster = (k as u32 % clusters) + 1;
        let client = clients
            .iter_mut()
            .find(|c| cluster_of(c.id, clusters) == cluster)
            .ok_or_else(|| anyhow!("no client in cluster {cluster}"))?;
        let target = *targets.iter().find(|t| **t != client.id).ok_or_else(|| anyhow!("failover needs two clients"))?;
        let next = follow.entry(client.id).or_insert(true);
        // Connected and warm: one answered command before the kill.
        let reply = command(client, coord, target, *next, call_timeout, Instant::now() + per_kill).await?;
        *next = next_is_follow(&reply, *next);

        let t0 = Instant::now();
        let (line, done) = match fault {
            Fault::Kill => (format!("kill master-{cluster}"), "killed "),
            Fault::Pause => (format!("pause master-{cluster}"), "paused "),
            Fault::Switchover => (format!("switchover {cluster}"), "switched over: "),
        };
        let replied = tokio::task::block_in_place(|| d.command(&line))?;
        let name = match fault {
            // "switched over: cluster C: server N is master under term T (was server O; ...)"
            Fault::Switchover => replied
                .split("(was server ")
                .nth(1)
                .and_then(|r| r.split(';').next())
                .map(|old| format!("server-{cluster}-{old}")),
            _ => replied.strip_prefix(done).and_then(|r| r.split_whitespace().next()).map(str::to_string),
        }
        .ok_or_else(|| anyhow!("unexpected reply to {line}: {replied:?}"))?;
        let (reply, attempts) = retry_command(client, coord, target, *next, call_timeout, t0 + per_kill)
            .await
            .with_context(|| format!("fault {k} ({line}): {replied}"))?;
        r.outage.push(ms(t0.elapsed()));
        r.attempts += attempts;
        if reply != "SUCCESS" {
            r.non_success += 1;
        }
        *next = next_is_follow(&reply, *next);

        let t1 = Instant::now();
        match fault {
            Fault::Kill => drop(tokio::task::block_in_place(|| d.command(&format!("start {name}")))?),
            Fault::Pause => drop(tokio::task::block_in_place(|| d.command(&format!("resume {name}")))?),
            Fault::Switchover => {}
        }
        let server_id: u32 = name
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("unexpected process name {name}"))?;
        wait_synced_slave(&coord.addr, cluster, server_id, REJOIN_POLL, t1 + per_kill)
            .await
            .with_context(|| format!("{name} rejoining as slave"))?;
        r.rejoin.push(ms(t1.elapsed()));
    }
    Ok(r)
}

fn next_is_follow(reply: &str, was_follow: bool) -> bool {
    match reply {
        "SUCCESS" => !was_follow,
        "FAILURE_ALREADY_EXISTS" => false,
        "FAILURE_NOT_A_FOLLOWER" => true,
        _ => was_follow,
    }
}

/// One command, which must be answered before `deadline`.
async fn command(
    u: &mut User,
    coord: &Coord,
    target: u32,
    follow: bool,
    call_timeout: Duration,
    deadline: Instant,
) -> Result<String> {
    Ok(retry_command(u, coord, target, follow, call_timeout, deadline).await?.0)
}

/// Repeats the command until a server answers, re-asking the coordinator
/// for the user's server after every failure. Returns the answer and the
/// number of calls made.
async fn retry_command(
    u: &mut User,
    coord: &Coord,
    target: u32,
    follow: bool,
    call_timeout: Duration,
    deadline: Instant,
) -> Result<(String, usize)> {
    let mut attempts = 0;
    let mut last = String::new();
    while Instant::now() < deadline {
        attempts += 1;
        match tokio::time::timeout(call_timeout, u.relation(target, follow)).await {
            Ok(Ok(reply)) => return Ok((reply, attempts)),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => last = format!("no answer within {call_timeout:?}"),
        }
        // Straight on if the coordinator names another server; else pause
        // (the channel reconnects to the same address by itself).
        if let Ok(addr) = coord.server_of(u.id).await
            && addr != u.addr
            && let Ok(ch) = grpc::connect(&addr).await
        {
            u.sns = sns_proto::csce438::sns_service_client::SnsServiceClient::new(ch);
            u.addr = addr;
            continue;
        }
        tokio::time::sleep(RETRY).await;
    }
    bail!("no server answered within the deadline after {attempts} tries; last error: {last}")
}

/// Waits until server `id` of `cluster` is back as a slave synced under
/// its master's current term — the master installed its state on it — as
/// the failover suites' `wait_synced_slave` checks it: the server says it is
/// not master and its `synced_term` is the term of the live master. Polls
/// every `poll`; returns the master's status then.
pub async fn wait_synced_slave(
    coord_addr: &str,
    cluster: u32,
    id: u32,
    poll: Duration,
    deadline: Instant,
) -> Result<ServerStatus> {
    let mut admin = CoordAdminClient::new(grpc::node_channel(coord_addr)?);
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match synced(&mut admin, cluster, id).await {
            Ok(Ok(master)) => return Ok(master),
            Ok(Err(why)) => last = why,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(poll).await;
    }
    bail!("not back as a synced slave in time; last seen: {last}")
}

/// The master's status if server `id` is its synced slave, else why not.
async fn synced(
    admin: &mut CoordAdminClient<sns_node::net::NodeChannel>,
    cluster: u32,
    id: u32,
) -> Result<std::result::Result<ServerStatus, String>> {
    let nodes = admin.table(TableRequest {}).await?.into_inner().nodes;
    let servers = || nodes.iter().filter(|n| n.kind == "server" && n.cluster == cluster);
    let Some(master) = servers().find(|n| n.is_master && n.alive && n.id != id) else {
        return Ok(Err("no live master".into()));
    };
    let Some(slave) = servers().find(|n| n.id == id) else {
        return Ok(Err(format!("server {id} is not in the table")));
    };
    let status = |n: &sns_proto::internal::Node| {
        let addr = format!("{}:{}", n.host, n.port);
        async move { anyhow::Ok(ReplicaClient::new(grpc::node_channel(&addr)?).status(StatusRequest {}).await?) }
    };
    let m = status(master).await.context("master status")?.into_inner();
    let s = match status(slave).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Ok(Err(format!("server {id}: {e:#}"))),
    };
    if m.is_master && !s.is_master && s.synced_term == m.term {
        Ok(Ok(m))
    } else {
        Ok(Err(format!(
            "server {id}: master={} synced_term={}; master {}: master={} term={} (degraded: {:?})",
            s.is_master, s.synced_term, master.id, m.is_master, m.term, m.degraded
        )))
    }
}
