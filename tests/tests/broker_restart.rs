//! RabbitMQ restarts mid-run: synchronizers reconnect by themselves, the
//! outbox they could not publish meanwhile goes out afterwards, and every
//! acknowledged post reaches the other cluster exactly once.
//!
//! This restarts the shared local broker, so it is its own test binary
//! (cargo runs test binaries one after another). It skips (counted in the
//! suite's summary) only where AMQP_URL names a remote broker; a local
//! broker it cannot control is a failure.

use sns_e2e::broker::StoppedBroker;
use sns_e2e::load;
use sns_e2e::nodes::{master_of, rt, server_node, status};
use sns_e2e::{Deployment, check_convergence, eventually, feed_of_2_holds, spec_files};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[test]
fn synchronizers_ride_through_a_broker_restart() -> anyhow::Result<()> {
    if !sns_e2e::broker::local_or_skip("synchronizers_ride_through_a_broker_restart", "restart")? {
        return Ok(());
    }
    let d = Deployment::start(2, 2)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(90);
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    feed_of_2_holds(&d, &before.acked, "the posts made before the restart")?;

    let broker = StoppedBroker::stop()?;
    // Writes go on while the broker is down: servers do not need it.
    let during = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    // They wait in cluster 1's outbox: acknowledged, not published.
    let (master, _) =
        rt.block_on(master_of(d.coord_port, 1)).ok_or_else(|| anyhow::anyhow!("no master in cluster 1"))?;
    let node =
        rt.block_on(server_node(d.coord_port, 1, master)).ok_or_else(|| anyhow::anyhow!("master not in table"))?;
    let s = rt.block_on(status(&node))?;
    let waiting = s.next_seq - 1 - s.published_upto;
    assert!(waiting >= 20, "the 20 posts made during the outage wait in the outbox: {s:?}");
    for s in [1, 2] {
        let files = spec_files(&d.server_dir(2, s))?;
        let feed = sns_node::store::record::decode_posts(files.get("2_following.txt").map_or("", |t| t));
        assert!(
            !feed.iter().any(|p| during.acked.contains(&p.text)),
            "server 2/{s} has a post of the outage while the broker is down"
        );
    }
    broker.start()?;
    // The outbox drains by itself once the broker is back.
    feed_of_2_holds(&d, &during.acked, "the posts made during the outage")?;
    eventually("cluster 1's outbox to drain", || {
        let s = rt.block_on(status(&node)).ok()?;
        (s.published_upto == s.next_seq - 1).then_some(())
    })?;
    let after = rt.block_on(load::writer(d.coord_port, 1, stop, 20, deadline));

    let phases = [&before, &during, &after];
    let acked: Vec<String> = phases.iter().flat_map(|r| r.acked.iter().cloned()).collect();
    for (i, phase) in phases.iter().enumerate() {
        assert_eq!(phase.acked.len(), 20, "phase {} acknowledged {} posts", i + 1, phase.acked.len());
    }
    let distinct: std::collections::BTreeSet<&String> = acked.iter().collect();
    assert_eq!(distinct.len(), 60, "each phase wrote posts of its own");
    // User 2 (cluster 2) follows user 1 (cluster 1): every post crossed the
    // broker, exactly once, to both servers of cluster 2.
    feed_of_2_holds(&d, &acked, "all 60 posts")?;
    check_convergence(&d, &[(1, 1), (1, 2), (2, 1), (2, 2)], &[])?;
    assert!(
        d.log("sync-1-1").contains("synchronizer link down") || d.log("sync-1-2").contains("synchronizer link down")
    );
    Ok(())
}
