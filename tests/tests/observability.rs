//! Observability end to end: every node's `GET /metrics` (counters that
//! move when posts flow, role and term gauges that agree with the
//! coordinator's table, the failover counter), the launcher's failover
//! announcements and console help, and `sns-node status`.

use anyhow::{Result, anyhow};
use sns_e2e::metrics::{parse, scrape, sum};
use sns_e2e::nodes::{rt, table};
use sns_e2e::{Deployment, eventually};
use std::collections::BTreeMap;

const OK: &str = "Command completed successfully";

/// The metrics port the launcher gave process `name`.
fn metrics_port(d: &Deployment, name: &str) -> Result<u16> {
    let path = d.dir().join("logs").join(format!("{name}.metrics-port"));
    Ok(std::fs::read_to_string(&path)?.trim().parse()?)
}

/// `name`'s parsed metrics.
fn metrics(d: &Deployment, name: &str) -> Result<BTreeMap<String, f64>> {
    parse(&scrape(metrics_port(d, name)?)?)
}

/// Polls `name`'s metrics until `check` holds.
fn wait_metric(d: &Deployment, name: &str, what: &str, check: impl Fn(&BTreeMap<String, f64>) -> bool) -> Result<()> {
    let mut last = BTreeMap::new();
    eventually(&format!("{what} in the metrics of {name}"), || {
        last = metrics(d, name).ok()?;
        check(&last).then_some(())
    })
    .map_err(|e| anyhow!("{e}; last scrape: {last:?}"))
}

/// (master id, term) of `cluster` in the coordinator's table.
fn master_of(d: &Deployment, cluster: u32) -> Result<(u32, u64)> {
    let nodes = rt().block_on(table(d.coord_port))?;
    nodes
        .iter()
        .find(|n| n.kind == "server" && n.cluster == cluster && n.alive && n.is_master)
        .map(|n| (n.id, n.term))
        .ok_or_else(|| anyhow!("cluster {cluster} has no master in {nodes:?}"))
}

fn at_least(v: Option<f64>, n: f64) -> bool {
    v.is_some_and(|v| v >= n)
}

#[test]
fn metrics_move_when_posts_flow_and_gauges_match_the_table() -> Result<()> {
    let mut d = Deployment::start(2, 2)?;
    let status = d.command("status")?;
    assert!(status.contains("metrics "), "status names each process's metrics port: {status}");

    let (m1, term1) = master_of(&d, 1)?;
    let (m2, _) = master_of(&d, 2)?;
    let (master1, master2) = (format!("server-1-{m1}"), format!("server-2-{m2}"));
    let slave1 = format!("server-1-{}", 3 - m1);
    // Before any client: the role gauges already agree with the table.
    wait_metric(&d, &master1, "sns_master 1 and the table's term", |m| {
        sum(m, "sns_master", &[]) == Some(1.0) && sum(m, "sns_term", &[]) == Some(term1 as f64)
    })?;
    wait_metric(&d, &slave1, "sns_master 0", |m| sum(m, "sns_master", &[]) == Some(0.0))?;
    wait_metric(&d, "coordinator", "live nodes and terms", |m| {
        sum(m, "sns_coordinator_live_nodes", &["cluster=\"1\"", "kind=\"server\""]) == Some(2.0)
            && sum(m, "sns_coordinator_live_nodes", &["cluster=\"2\"", "kind=\"synchronizer\""]) == Some(2.0)
            && sum(m, "sns_coordinator_term", &["cluster=\"1\""]) == Some(term1 as f64)
    })?;
    let before = metrics(&d, &master1)?;
    assert_eq!(sum(&before, "sns_posts_committed_total", &[]), Some(0.0), "{before:?}");

    let mut c1 = d.client("1")?;
    c1.expect_line("=====================================")?;
    let mut c2 = d.client("2")?;
    c2.expect_line("=====================================")?;
    c1.poll_list(&[1, 2], &[])?;
    c2.run("FOLLOW 1", OK)?;
    c1.poll_list(&[1, 2], &[2])?;
    c2.run("TIMELINE", OK)?;
    c2.expect_line("Now you are in the timeline")?;
    c1.run("TIMELINE", OK)?;
    c1.expect_line("Now you are in the timeline")?;
    for p in ["m1", "m2", "m3"] {
        c1.send(p)?;
    }
    for p in ["m1", "m2", "m3"] {
        c2.expect_post(1, p)?;
    }

    // (A post the client resends, e.g. after its stream reconnected, is
    // acknowledged, and counted, again.)
    wait_metric(&d, &master1, "3 posts committed, a timeline open, Login counted", |m| {
        at_least(sum(m, "sns_posts_committed_total", &[]), 3.0)
            && sum(m, "sns_post_commit_seconds_count", &[]) == sum(m, "sns_posts_committed_total", &[])
            && sum(m, "sns_timeline_streams", &[]) == Some(1.0)
            && at_least(sum(m, "sns_grpc_requests_total", &["rpc=\"SNSService/Login\"", "code=\"Ok\""]), 1.0)
            && at_least(sum(m, "sns_grpc_requests_total", &["rpc=\"SNSService/List\"", "code=\"Ok\""]), 1.0)
            && at_least(sum(m, "sns_replication_seconds_count", &[]), 3.0)
            && sum(m, "sns_replication_lag_records", &[]) == Some(0.0)
    })?;
    // Cluster 2's master served the follower's timeline and the Follow.
    wait_metric(&d, &master2, "a timeline stream and a Follow", |m| {
        sum(m, "sns_timeline_streams", &[]) == Some(1.0)
            && at_least(sum(m, "sns_grpc_requests_total", &["rpc=\"SNSService/Follow\"", "code=\"Ok\""]), 1.0)
    })?;
    // The origin's synchronizer published the posts; the destination's
    // consumed and applied them, and timed their trip.
    wait_metric(&d, &format!("sync-1-{m1}"), "3 posts published", |m| {
        at_least(sum(m, "sns_sync_published_events_total", &[]), 3.0)
            && sum(m, "sns_sync_outbox_backlog_events", &[]) == Some(0.0)
    })?;
    wait_metric(&d, &format!("sync-2-{m2}"), "3 posts consumed and applied", |m| {
        at_least(sum(m, "sns_sync_consumed_events_total", &[]), 3.0)
            && at_least(sum(m, "sns_sync_applied_events_total", &[]), 3.0)
            && at_least(sum(m, "sns_sync_propagation_seconds_count", &[]), 3.0)
            && sum(m, "sns_sync_dead_lettered_events_total", &[]) == Some(0.0)
    })?;
    // The replica service's calls are counted too (the synchronizers'
    // ApplyRemote on cluster 2's master).
    let m = metrics(&d, &master2)?;
    assert!(
        at_least(sum(&m, "sns_grpc_requests_total", &["rpc=\"Replica/ApplyRemote\"", "code=\"Ok\""]), 1.0),
        "{m:?}"
    );

    // A client that leaves closes its stream: the gauge goes down.
    c1.close();
    wait_metric(&d, &master1, "no open timeline", |m| sum(m, "sns_timeline_streams", &[]) == Some(0.0))?;
    Ok(())
}
