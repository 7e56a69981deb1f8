//! The broker out of disk: RabbitMQ's free-disk alarm blocks every
//! connection that publishes (it stops reading from it), so the
//! synchronizers can neither publish nor acknowledge what they took, and
//! nothing crosses clusters. Writes must go on inside each cluster; a
//! master killed meanwhile must leave its slave the outbox it never got
//! published; once the broker has room again, every acknowledged post must
//! reach the other cluster exactly once.
//!
//! This raises the shared local broker's alarm, so it is its own test
//! binary (cargo runs test binaries one after another). It skips (counted
//! in the suite's summary) only where AMQP_URL names a remote broker.

use sns_e2e::broker::DiskAlarm;
use sns_e2e::load;
use sns_e2e::nodes::{assert_one_master_per_term, master_of, rt, server_node, status, wait_master, wait_synced_slave};
use sns_e2e::{Deployment, check_convergence, eventually, feed_of_2_holds, feed_texts};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

#[test]
fn a_broker_out_of_disk_holds_posts_back_and_loses_none_across_a_failover() -> anyhow::Result<()> {
    let test = "a_broker_out_of_disk_holds_posts_back_and_loses_none_across_a_failover";
    if !sns_e2e::broker::local_or_skip(test, "fill")? {
        return Ok(());
    }
    DiskAlarm::clear_left()?;
    let mut d = Deployment::start(2, 2)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(120);
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    feed_of_2_holds(&d, &before.acked, "the posts made before the alarm")?;

    let alarm = DiskAlarm::raise()?;
    // Acknowledged inside the cluster: the servers do not need the broker.
    let during = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    assert_eq!(during.acked.len(), 20, "posts acknowledged while the broker is out of disk");
    let (old, term) =
        rt.block_on(master_of(d.coord_port, 1)).ok_or_else(|| anyhow::anyhow!("no master in cluster 1"))?;
    let node = rt.block_on(server_node(d.coord_port, 1, old)).ok_or_else(|| anyhow::anyhow!("master not in table"))?;
    // The broker confirms nothing it blocked: the posts wait in the outbox
    // (one message may have gone through as the alarm was raised).
    let s = rt.block_on(status(&node))?;
    assert!(s.next_seq - 1 - s.published_upto >= 19, "the posts of the alarm wait in cluster 1's outbox: {s:?}");

    // The master dies with its outbox unpublished: its slave, promoted,
    // must publish it.
    d.command(&format!("kill server-1-{old}"))?;
    let new = 3 - old;
    wait_master(&rt, &d, 1, new, term)?;
    let failed_over = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    assert_eq!(failed_over.acked.len(), 20, "posts acknowledged by the new master while the broker is out of disk");
    for s in [1, 2] {
        let feed = feed_texts(&d.server_dir(2, s), 2, 1)?;
        let crossed = during.acked.iter().chain(&failed_over.acked).filter(|t| feed.contains(t)).count();
        assert!(crossed <= 1, "server 2/{s} got {crossed} posts through a broker that blocks publishing");
    }

    alarm.clear()?;
    d.command(&format!("start server-1-{old}"))?;
    let acked: Vec<String> = [&before, &during, &failed_over].iter().flat_map(|r| r.acked.iter().cloned()).collect();
    feed_of_2_holds(&d, &acked, "every post, once the broker has room")?;
    let new_node =
        rt.block_on(server_node(d.coord_port, 1, new)).ok_or_else(|| anyhow::anyhow!("new master not in table"))?;
    eventually("the new master's outbox to drain", || {
        let s = rt.block_on(status(&new_node)).ok()?;
        (s.published_upto == s.next_seq - 1).then_some(())
    })?;
    wait_synced_slave(&rt, &d, 1, old)?;
    let after = rt.block_on(load::writer(d.coord_port, 1, stop, 20, deadline));
    feed_of_2_holds(&d, &after.acked, "a post made after the alarm")?;
    check_convergence(&d, &[(1, 1), (1, 2), (2, 1), (2, 2)], &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}
