//! A synchronizer lets go of a broker link it is dropping and connects
//! again, however the link ended. Its heartbeats keep coming either way,
//! so a synchronizer stuck while closing looks alive to everyone and
//! silently stops its cluster's events once its server is promoted.

use anyhow::{Context, Result, anyhow};
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
