//! A synchronizer lets go of a broker link it is dropping and connects
//! again, however the link ended, and gives up on a connection the broker
//! never completes. Its heartbeats keep coming either way, so a
//! synchronizer stuck while closing or connecting looks alive to everyone
//! and silently stops its cluster's events.

use anyhow::{Context, Result, anyhow};
use sns_e2e::broker::StandIn;
use sns_e2e::nodes::{master_of, rt};
use sns_e2e::{Deployment, eventually_within, load};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Kill/start rounds of the server beside the standing-by synchronizer.
const ROUNDS: usize = 12;
/// How long a synchronizer may take to notice its server died and let go
/// of its broker link (a close is bounded to 2 s).
const LET_GO: Duration = Duration::from_secs(10);

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

#[test]
fn a_synchronizer_whose_server_dies_right_after_it_connected_comes_back() -> Result<()> {
    let mut d = Deployment::start(2, 2)?;
    let rt = rt();
    let (master, _) = rt.block_on(master_of(d.coord_port, 1)).ok_or_else(|| anyhow!("cluster 1 has no master"))?;
    let slave = 3 - master;
    let (server, sync) = (format!("server-1-{slave}"), format!("sync-1-{slave}"));
    for round in 0..ROUNDS {
        // Each round kills the server the moment its synchronizer has
        // connected to it and to the broker: the link is torn down while
        // its channels are still being set up.
        let connected = if round == 0 { 0 } else { count(&d.log(&sync), "connected to server and broker") };
        if round > 0 {
            d.command(&format!("start {server}"))?;
        }
        eventually_within("the synchronizer to connect", LET_GO, || {
            (count(&d.log(&sync), "connected to server and broker") > connected).then_some(())
        })
        .with_context(|| format!("round {round}"))?;
        let downs = count(&d.log(&sync), "synchronizer link down");
        d.command(&format!("kill {server}"))?;
        eventually_within("the synchronizer to let go of its link", LET_GO, || {
            (count(&d.log(&sync), "synchronizer link down") > downs).then_some(())
        })
        .with_context(|| format!("round {round}: {sync} is stuck; its log:\n{}", d.log(&sync)))?;
    }
    // The server is back and takes over: its synchronizer carries the
    // cluster's posts to the other cluster.
    d.command(&format!("start {server}"))?;
    sns_e2e::nodes::wait_synced_slave(&rt, &d, 1, slave)?;
    d.command(&format!("switchover 1 {server}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        for u in [1, 2] {
            load::attach(d.coord_port, u).await?;
        }
        // 2 (cluster 2) follows 1 (cluster 1), whose posts now leave
        // through the synchronizer of the killed and restarted server.
        load::follow_until_done(d.coord_port, 2, 1, deadline).await?;
        anyhow::Ok(())
    })?;
    let report = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 5, deadline));
    anyhow::ensure!(report.acked.len() == 5, "posts not acknowledged: {report:?}");
    let followers = [(1, vec![2])].into_iter().collect();
    sns_e2e::nodes::assert_exactly_once(&d, &[(2, 1), (2, 2)], &[report], &followers)?;
    Ok(())
}

/// User 2 (cluster 2) follows user 1 (cluster 1).
fn follow(d: &Deployment, rt: &tokio::runtime::Runtime) -> Result<()> {
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, Instant::now() + Duration::from_secs(60)))
}

/// User 1 posts `n` times.
fn post(d: &Deployment, rt: &tokio::runtime::Runtime, n: usize) -> Result<load::WriterReport> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), n, deadline));
    anyhow::ensure!(report.acked.len() == n, "posts not acknowledged: {report:?}");
    Ok(report)
}

#[test]
fn a_synchronizer_gives_up_on_a_broker_that_never_completes_the_connection() -> Result<()> {
    let rt = rt();
    let broker = StandIn::start(&rt, false)?;
    let mut d = Deployment::builder().clusters(2).servers(1).broker(&broker.url, None).start()?;
    // Each synchronizer gives up on its silent connection and says why.
    let limit = sns_node::sync::BROKER_SETUP_TIMEOUT + LET_GO;
    for sync in ["sync-1-1", "sync-2-1"] {
        eventually_within(&format!("{sync} to give up on the silent broker"), limit, || {
            d.log(sync).contains("did not let the synchronizer connect to it within").then_some(())
        })
        .with_context(|| format!("{sync} is stuck connecting; its log:\n{}", d.log(sync)))?;
    }
    anyhow::ensure!(broker.held() >= 2, "the stand-in held {} connections", broker.held());
    // Each abandoned attempt closed its socket, and with it lapin's
    // thread for the connection: attempts over a long outage cost
    // nothing that stays. (A synchronizer keeps trying meanwhile, so its
    // latest attempt may still be open.)
    let pid = |d: &mut Deployment| d.status().ok().and_then(|s| s.get("sync-1-1").copied().flatten());
    let threads = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/task")).map(|t| t.count()).unwrap_or(0);
    let sync_pid = pid(&mut d).ok_or_else(|| anyhow!("sync-1-1 is not up"))?;
    let after_first = threads(sync_pid);
    let gave_up = |d: &Deployment| count(&d.log("sync-1-1"), "did not let the synchronizer connect to it within");
    let first = gave_up(&d);
    eventually_within("sync-1-1 to give up twice more", 2 * limit, || (gave_up(&d) >= first + 2).then_some(()))?;
    eventually_within("the abandoned connections to be closed", LET_GO, || {
        (broker.released() + 2 >= broker.held()).then_some(())
    })
    .with_context(|| format!("held {}, closed by the synchronizers {}", broker.held(), broker.released()))?;
    let now = threads(sync_pid);
    // (One more is allowed: a runtime's blocking thread may come or go.)
    anyhow::ensure!(
        now <= after_first + 1,
        "sync-1-1 went from {after_first} to {now} threads over two more abandoned attempts"
    );
    // The broker answers again: the next attempts reach it, and posts
    // cross between the clusters.
    broker.restore();
    follow(&d, &rt)?;
    let report = post(&d, &rt, 5)?;
    let followers = [(1, vec![2])].into_iter().collect();
    sns_e2e::nodes::assert_exactly_once(&d, &[(2, 1)], &[report], &followers)
}

#[test]
fn a_synchronizer_drops_a_broker_link_that_went_silent() -> Result<()> {
    let rt = rt();
    let broker = StandIn::start(&rt, true)?;
    let d = Deployment::builder().clusters(2).servers(1).broker(&broker.url, None).start()?;
    follow(&d, &rt)?;
    let before = post(&d, &rt, 3)?;
    // The link goes silent without being closed: nothing flows either
    // way, and no reset tells the synchronizers.
    let downs: Vec<usize> =
        ["sync-1-1", "sync-2-1"].iter().map(|s| count(&d.log(s), "synchronizer link down")).collect();
    broker.silence();
    // The heartbeats (every 5 s each way) now go unanswered: each
    // synchronizer drops its link within two heartbeat periods.
    let limit = Duration::from_secs(2 * u64::from(sns_node::sync::HEARTBEAT_SECS)) + LET_GO;
    for (sync, was) in ["sync-1-1", "sync-2-1"].into_iter().zip(downs) {
        eventually_within(&format!("{sync} to drop its silent link"), limit, || {
            (count(&d.log(sync), "synchronizer link down") > was).then_some(())
        })
        .with_context(|| format!("{sync} still trusts its silent link; its log:\n{}", d.log(sync)))?;
    }
    broker.restore();
    let after = post(&d, &rt, 3)?;
    let followers = [(1, vec![2])].into_iter().collect();
    sns_e2e::nodes::assert_exactly_once(&d, &[(2, 1)], &[before, after], &followers)
}
