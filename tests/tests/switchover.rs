//! Planned switchovers, end to end: the master role handed to the in-sync
//! slave and back in every cluster while writers post continuously, through
//! the launcher and through `sns-node switchover`; refused while the slave
//! is not in sync; and the faults that can strike one: the old master hung
//! (its lease is waited out), the target hung right after it was asked
//! (the old master takes the role back). Nothing acknowledged may be lost,
//! and no two servers may accept writes in one term. Real processes; every
//! wait polls with a deadline.

use sns_e2e::load::{self, WriterReport};
use sns_e2e::nodes::{
    assert_exactly_once, assert_one_master_per_term, healths, master_of, rt, server_node, status, wait_master,
    wait_synced_slave,
};
use sns_e2e::{DEADLINE, Deployment, check_convergence, eventually};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

/// Users 1..=n log in and follow each other; waits until every follow
/// reached its followee's cluster.
fn everyone_follows_everyone(rt: &Runtime, d: &Deployment, users: &[u32], deadline: Instant) -> anyhow::Result<()> {
    rt.block_on(async {
        for &u in users {
            load::attach(d.coord_port, u).await?;
        }
        for &u in users {
            for &t in users.iter().filter(|t| **t != u) {
                let mut msg = String::new();
                while msg != "SUCCESS" && Instant::now() < deadline {
                    msg = load::command(d.coord_port, u, true, t, deadline).await?;
                }
            }
        }
        for &u in users {
            let others: Vec<u32> = users.iter().copied().filter(|f| *f != u).collect();
            load::wait_followers(d.coord_port, u, &others, deadline).await?;
        }
        anyhow::Ok(())
    })
}

/// Waits until server `id` of `cluster` is a live slave recorded in sync.
fn wait_in_sync(rt: &Runtime, d: &Deployment, cluster: u32, id: u32) -> anyhow::Result<()> {
    wait_synced_slave(rt, d, cluster, id)?;
    eventually(&format!("server {cluster}/{id} recorded in sync"), || {
        rt.block_on(server_node(d.coord_port, cluster, id)).filter(|n| n.in_sync && n.alive).map(|_| ())
    })
}

/// Hand every cluster's master role to its slave and back, twice each,
/// while every user posts: each switchover answers, the old master steps
/// down (no lease wait), rejoins as a synced slave, and every acknowledged
/// post is in every follower's feed exactly once.
#[test]
fn switchovers_under_load_lose_no_acknowledged_post() -> anyhow::Result<()> {
    let mut d = Deployment::start(3, 2)?;
    let rt = rt();
    let users: Vec<u32> = (1..=6).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    everyone_follows_everyone(&rt, &d, &users, deadline)?;
    let followers: BTreeMap<u32, Vec<u32>> =
        users.iter().map(|&u| (u, users.iter().copied().filter(|f| *f != u).collect())).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = users
        .iter()
        .map(|&u| rt.spawn(load::writer_counting(d.coord_port, u, stop.clone(), 100_000, deadline, progress.clone())))
        .collect();
    let phase = 100;
    let wait_progress = |from: usize| {
        eventually("writers to make progress", || (progress.load(Ordering::SeqCst) >= from + phase).then_some(()))
    };
    let mut took = Vec::new();
    for round in 0..2 {
        for cluster in 1..=3u32 {
            wait_progress(progress.load(Ordering::SeqCst))?;
            let (old, term) = rt
                .block_on(master_of(d.coord_port, cluster))
                .ok_or_else(|| anyhow::anyhow!("cluster {cluster} has no master"))?;
            let target = 3 - old;
            wait_in_sync(&rt, &d, cluster, target)?;
            let reply = d.command(&format!("switchover {cluster}"))?;
            let want = format!("switched over: cluster {cluster}: server {target} is master under term ");
            assert!(reply.starts_with(&want), "round {round}, cluster {cluster}: {reply}");
            assert!(reply.contains(&format!("was server {old}; stepped down")), "no lease wait: {reply}");
            let millis: u64 = reply
                .rsplit(" in ")
                .next()
                .and_then(|r| r.trim_end_matches(" ms)").parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no duration in {reply:?}"))?;
            took.push(millis);
            let new_term = wait_master(&rt, &d, cluster, target, term)?;
            assert_eq!(new_term, term + 1, "one new term per switchover");
            wait_synced_slave(&rt, &d, cluster, old)?;
            // Health follows the roles: the new master serves clients, the
            // old one is a ready slave that does not.
            eventually("health to follow the switchover", || {
                let new = rt.block_on(healths(d.coord_port, cluster, target)).ok()?;
                let old = rt.block_on(healths(d.coord_port, cluster, old)).ok()?;
                (new == (true, true, true) && old == (true, true, false)).then_some(())
            })?;
        }
    }
    wait_progress(progress.load(Ordering::SeqCst))?;
    stop.store(true, Ordering::SeqCst);
    let reports: Vec<WriterReport> = writers.into_iter().map(|w| rt.block_on(w)).collect::<Result<_, _>>()?;
    let acked: usize = reports.iter().map(|r| r.acked.len()).sum();
    eprintln!(
        "switchovers: 6, coordinator-side {took:?} ms; {acked} acknowledged posts; longest write pause per writer {:?}; writers' reconnects {:?}",
        reports.iter().map(|r| r.longest_gap).collect::<Vec<_>>(),
        reports.iter().map(|r| r.failovers).collect::<Vec<_>>(),
    );
    assert!(reports.iter().all(|r| r.acked.len() >= 5), "every writer made progress: {reports:?}");
    let all: Vec<(u32, u32)> = (1..=3).flat_map(|c| [(c, 1), (c, 2)]).collect();
    assert_exactly_once(&d, &all, &reports, &followers)?;
    check_convergence(&d, &all, &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// Runs `sns-node switchover` against the deployment's coordinator.
fn switchover_cli(d: &Deployment, cluster: u32, to: Option<u32>) -> anyhow::Result<std::process::Output> {
    Ok(d.switchover_command(cluster, to).output()?)
}

/// A switchover to a slave that is down, or back but not yet recorded in
/// sync, is refused with the reason and changes nothing; once the slave is
/// in sync `sns-node switchover` hands the role over, and the writes made
/// while the slave was away are on it.
#[test]
fn a_switchover_waits_for_an_in_sync_slave() -> anyhow::Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let rt = rt();
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(async {
        load::attach(d.coord_port, 1).await?;
        load::attach(d.coord_port, 2).await?;
        anyhow::ensure!(load::command(d.coord_port, 2, true, 1, deadline).await? == "SUCCESS");
        anyhow::Ok(())
    })?;
    let (m, term) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    let s = 3 - m;
    wait_in_sync(&rt, &d, 1, s)?;
    d.command(&format!("kill server-1-{s}"))?;
    // Written while the slave is away: the master records it out of sync.
    let away = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 10, deadline));
    assert_eq!(away.acked.len(), 10);
    let out = switchover_cli(&d, 1, None)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a switchover with no slave succeeded: {stderr}");
    assert!(stderr.contains("no live server other than its master"), "{stderr}");
    let out = switchover_cli(&d, 1, Some(s))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains(&format!("server {s} of cluster 1 is ")), "{stderr}");
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((m, term)), "refusals change nothing");

    d.command(&format!("start server-1-{s}"))?;
    wait_in_sync(&rt, &d, 1, s)?;
    let out = switchover_cli(&d, 1, Some(s))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with(&format!("cluster 1: server {s} is master under term {}", term + 1)), "{stdout}");
    wait_master(&rt, &d, 1, s, term)?;
    // The new master holds what was written while it was away, and takes
    // writes itself.
    let after = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 10, deadline));
    assert_eq!(after.acked.len(), 10);
    let acked = WriterReport { user: 1, acked: [away.acked, after.acked].concat(), ..Default::default() };
    wait_synced_slave(&rt, &d, 1, m)?;
    assert_exactly_once(&d, &[(1, 1), (1, 2)], &[acked], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(&d, &[(1, 1), (1, 2)], &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// The master hangs (SIGSTOP) just before a switchover: it cannot step
/// down, so the target is promoted once the master's lease ran out. The
/// resumed old master never acknowledges a write and rejoins as a slave.
#[test]
fn a_switchover_from_a_hung_master_waits_out_its_lease() -> anyhow::Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        load::attach(d.coord_port, 1).await?;
        load::attach(d.coord_port, 2).await?;
        anyhow::ensure!(load::command(d.coord_port, 2, true, 1, deadline).await? == "SUCCESS");
        anyhow::Ok(())
    })?;
    let (m, term) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    let s = 3 - m;
    wait_in_sync(&rt, &d, 1, s)?;
    let before = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 20, deadline));
    let old_node = rt.block_on(server_node(d.coord_port, 1, m)).expect("old master registered");
    d.command(&format!("pause server-1-{m}"))?;
    let reply = d.command_reply("switchover 1")?;
    // Either the switchover waited the lease out, or the coordinator had
    // already replaced the silent master by itself (then nothing is left
    // to switch over from).
    let by_lease = reply.starts_with(&format!("switched over: cluster 1: server {s} is master"));
    assert!(by_lease || reply.contains("no serving master"), "{reply}");
    if by_lease {
        assert!(reply.contains("its lease ran out"), "a hung master cannot have stepped down: {reply}");
    }
    wait_master(&rt, &d, 1, s, term)?;
    let during = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 20, deadline));
    d.command(&format!("resume server-1-{m}"))?;
    wait_synced_slave(&rt, &d, 1, m)?;
    let st = rt.block_on(status(&old_node))?;
    assert!(!st.is_master && st.term > term, "{st:?}");
    let acked = WriterReport { user: 1, acked: [before.acked, during.acked].concat(), ..Default::default() };
    assert_eq!(acked.acked.len(), 40);
    assert_exactly_once(&d, &[(1, 1), (1, 2)], &[acked], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(&d, &[(1, 1), (1, 2)], &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// The target hangs (SIGSTOP) just as the switchover is asked for, while a
/// writer posts: the coordinator may still promote it (it has not missed
/// its heartbeats yet), but then replaces it with the old master, which
/// holds every acknowledged write. The writer goes on; nothing is lost;
/// the resumed target is rebuilt as a slave.
#[test]
fn a_target_that_hangs_during_a_switchover_hands_the_role_back() -> anyhow::Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(90);
    rt.block_on(async {
        load::attach(d.coord_port, 1).await?;
        load::attach(d.coord_port, 2).await?;
        anyhow::ensure!(load::command(d.coord_port, 2, true, 1, deadline).await? == "SUCCESS");
        anyhow::Ok(())
    })?;
    let (m, term) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    let s = 3 - m;
    wait_in_sync(&rt, &d, 1, s)?;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let writer = rt.spawn(load::writer_counting(d.coord_port, 1, stop.clone(), 100_000, deadline, progress.clone()));
    eventually("the writer to make progress", || (progress.load(Ordering::SeqCst) >= 20).then_some(()))?;
    d.command(&format!("pause server-1-{s}"))?;
    let reply = d.command_reply("switchover 1")?;
    assert!(reply.starts_with("switched over") || reply.contains("not live"), "{reply}");
    // The old master serves again, under a newer term if the hung target
    // was promoted meanwhile.
    eventually("the old master to serve again", || {
        let (id, _) = rt.block_on(master_of(d.coord_port, 1))?;
        (id == m).then_some(())
    })?;
    let resumed_at = progress.load(Ordering::SeqCst);
    eventually("writes on the old master", || (progress.load(Ordering::SeqCst) >= resumed_at + 20).then_some(()))?;
    d.command(&format!("resume server-1-{s}"))?;
    wait_synced_slave(&rt, &d, 1, s)?;
    let at = progress.load(Ordering::SeqCst);
    eventually("writes with the target back", || (progress.load(Ordering::SeqCst) >= at + 20).then_some(()))?;
    stop.store(true, Ordering::SeqCst);
    let report = rt.block_on(writer)?;
    eprintln!(
        "target hung during a switchover ({reply}); {} acknowledged posts, longest write pause {:?}",
        report.acked.len(),
        report.longest_gap
    );
    let (_, final_term) = rt.block_on(master_of(d.coord_port, 1)).expect("a master");
    assert!(final_term >= term, "terms never go back");
    assert_exactly_once(&d, &[(1, 1), (1, 2)], &[report], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(&d, &[(1, 1), (1, 2)], &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// A master that gave up on a snapshot call to its paused slave sends a
/// newer one later; the paused slave may serve the old call after the new
/// one (seen: a rejoining old master installed its new master's snapshot
/// of 40 posts, then two stale ones of 20, and was recorded in sync
/// lacking acknowledged posts). A slave refuses a snapshot older than the
/// last one of the same term it installed, and keeps what it holds.
#[test]
fn a_slave_refuses_a_snapshot_older_than_the_one_it_installed() -> anyhow::Result<()> {
    use sns_proto::internal::SnapshotChunk;
    use sns_proto::internal::replica_client::ReplicaClient;

    let d = Deployment::start(1, 2)?;
    let rt = rt();
    let (m, term) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    let s = 3 - m;
    wait_in_sync(&rt, &d, 1, s)?;
    rt.block_on(async {
        let slave = server_node(d.coord_port, 1, s).await.expect("slave registered");
        let mut replica = ReplicaClient::new(sns_e2e::secret::channel(&slave.host, &slave.port)?);
        let snapshot_at = |next_seq: u64| {
            let mut snap = sns_node::store::state::State::new(1, 1).snapshot();
            snap.next_seq = next_seq;
            sns_node::store::codec::encode_snapshot(&snap, 1, sns_node::store::codec::SnapshotFormat::NEWEST)
        };
        let chunk = |sync: u64, next_seq: u64| SnapshotChunk { term, cluster: 1, sync, data: snapshot_at(next_seq) };
        // Above anything its master sent it: numbers follow the master's
        // clock (ms x 1000); these are an hour ahead.
        let ahead = (sns_node::net::now_ms() as u64 + 3_600_000) * 1000;
        let newer = replica.install_snapshot(tokio_stream::iter([chunk(ahead, 50)])).await?.into_inner();
        assert_eq!(newer.next_seq, 50);
        let stale = replica.install_snapshot(tokio_stream::iter([chunk(ahead - 1, 20)])).await;
        assert_eq!(stale.err().map(|e| e.code()), Some(tonic::Code::InvalidArgument), "the older one is refused");
        let st = status(&slave).await?;
        assert_eq!(st.next_seq, 50, "what it holds is kept: {st:?}");
        anyhow::Ok(())
    })?;
    Ok(())
}
