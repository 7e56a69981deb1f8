//! A synchronizer lets go of a broker link it is dropping and connects
//! again, however the link ended, and gives up on a connection the broker
//! never completes. Its heartbeats keep coming either way, so a
//! synchronizer stuck while closing or connecting looks alive to everyone
//! and silently stops its cluster's events.

use anyhow::{Context, Result, anyhow};
use sns_e2e::nodes::{master_of, rt};
use sns_e2e::{Deployment, eventually_within, load};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

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

/// Stands where the broker should be, relaying to the real one at `broker`
/// while `relaying` is set. While it is not, it goes silent: it accepts
/// connections and never says a word (a broker hung mid-handshake, or a
/// proxy in front of one that is gone), and the connections it was
/// relaying stop carrying anything either way, for good, without being
/// closed (a broker whose host vanished without a reset).
async fn stand_in(listener: TcpListener, relaying: Arc<AtomicBool>, held: Arc<AtomicUsize>, broker: String) {
    let mut parked = Vec::new();
    while let Ok((client, _)) = listener.accept().await {
        if !relaying.load(Ordering::SeqCst) {
            held.fetch_add(1, Ordering::SeqCst);
            parked.push(client);
            continue;
        }
        let (broker, relaying) = (broker.clone(), relaying.clone());
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&broker).await else { return };
            let (from_client, to_client) = client.into_split();
            let (from_broker, to_broker) = upstream.into_split();
            let cut = Arc::new(AtomicBool::new(false));
            tokio::join!(
                pump(from_client, to_broker, relaying.clone(), cut.clone()),
                pump(from_broker, to_client, relaying, cut)
            );
        });
    }
}

/// Carries one direction of a relayed connection until either end closes;
/// once the stand-in went silent, whatever arrives is swallowed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    relaying: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !relaying.load(Ordering::SeqCst) {
            cut.store(true, Ordering::SeqCst);
        }
        if !cut.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A stand-in for the broker on a free loopback port, and the broker URL
/// (credentials, virtual host) through it.
fn start_stand_in(rt: &tokio::runtime::Runtime, relaying: bool) -> Result<(String, Arc<AtomicBool>, Arc<AtomicUsize>)> {
    let real = sns_e2e::amqp_url();
    let broker = sns_node::launcher::broker_addr(&real);
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
    let port = listener.local_addr()?.port();
    let url = real.replacen(&broker, &format!("127.0.0.1:{port}"), 1);
    anyhow::ensure!(url != real, "cannot find {broker} in {real}");
    let (relay, held) = (Arc::new(AtomicBool::new(relaying)), Arc::new(AtomicUsize::new(0)));
    rt.spawn(stand_in(listener, relay.clone(), held.clone(), broker));
    Ok((url, relay, held))
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
    let (url, relaying, held) = start_stand_in(&rt, false)?;
    let d = Deployment::builder().clusters(2).servers(1).broker(&url, None).start()?;
    // Each synchronizer gives up on its silent connection and says why.
    let limit = sns_node::sync::BROKER_SETUP_TIMEOUT + LET_GO;
    for sync in ["sync-1-1", "sync-2-1"] {
        eventually_within(&format!("{sync} to give up on the silent broker"), limit, || {
            d.log(sync).contains("did not let the synchronizer connect to it within").then_some(())
        })
        .with_context(|| format!("{sync} is stuck connecting; its log:\n{}", d.log(sync)))?;
    }
    anyhow::ensure!(held.load(Ordering::SeqCst) >= 2, "the stand-in held {} connections", held.load(Ordering::SeqCst));
    // The broker answers again: the next attempts reach it, and posts
    // cross between the clusters.
    relaying.store(true, Ordering::SeqCst);
    follow(&d, &rt)?;
    let report = post(&d, &rt, 5)?;
    let followers = [(1, vec![2])].into_iter().collect();
    sns_e2e::nodes::assert_exactly_once(&d, &[(2, 1)], &[report], &followers)
}

#[test]
fn a_synchronizer_drops_a_broker_link_that_went_silent() -> Result<()> {
    let rt = rt();
    let (url, relaying, _) = start_stand_in(&rt, true)?;
    let d = Deployment::builder().clusters(2).servers(1).broker(&url, None).start()?;
    follow(&d, &rt)?;
    let before = post(&d, &rt, 3)?;
    // The link goes silent without being closed: nothing flows either
    // way, and no reset tells the synchronizers.
    let downs: Vec<usize> =
        ["sync-1-1", "sync-2-1"].iter().map(|s| count(&d.log(s), "synchronizer link down")).collect();
    relaying.store(false, Ordering::SeqCst);
    // The heartbeats (every 5 s each way) now go unanswered: each
    // synchronizer drops its link within two heartbeat periods.
    let limit = Duration::from_secs(2 * u64::from(sns_node::sync::HEARTBEAT_SECS)) + LET_GO;
    for (sync, was) in ["sync-1-1", "sync-2-1"].into_iter().zip(downs) {
        eventually_within(&format!("{sync} to drop its silent link"), limit, || {
            (count(&d.log(sync), "synchronizer link down") > was).then_some(())
        })
        .with_context(|| format!("{sync} still trusts its silent link; its log:\n{}", d.log(sync)))?;
    }
    relaying.store(true, Ordering::SeqCst);
    let after = post(&d, &rt, 3)?;
    let followers = [(1, vec![2])].into_iter().collect();
    sns_e2e::nodes::assert_exactly_once(&d, &[(2, 1)], &[before, after], &followers)
}
