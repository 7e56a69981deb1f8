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

    // At least 3: a LIST that `poll_list` typed and tsc had not read before
    // the timeline began is posted as text once it is there.
    wait_metric(&d, &master1, "3 posts committed, a timeline open, Login counted", |m| {
        at_least(sum(m, "sns_posts_committed_total", &[]), 3.0)
            && sum(m, "sns_post_commit_seconds_count", &[]) == sum(m, "sns_posts_committed_total", &[])
            // Each post was a write of some group commit: at least as many
            // writes as posts, and at least one write per group.
            && at_least(sum(m, "sns_commit_group_writes_sum", &[]), sum(m, "sns_posts_committed_total", &[]).unwrap_or(f64::MAX))
            && at_least(sum(m, "sns_commit_group_writes_count", &[]), 1.0)
            && sum(m, "sns_commit_group_writes_sum", &[]) >= sum(m, "sns_commit_group_writes_count", &[])
            // Every write waited once for its group; every group was one cycle.
            && sum(m, "sns_commit_wait_seconds_count", &[]) == sum(m, "sns_commit_group_writes_sum", &[])
            && sum(m, "sns_commit_cycle_seconds_count", &[]) == sum(m, "sns_commit_group_writes_count", &[])
            && at_least(sum(m, "sns_commit_cycle_seconds_sum", &[]), 1e-6)
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
    // The replica service's calls are counted too (the synchronizers ask
    // cluster 2's master for its Status every second; their ApplyRemote
    // and TailOutbox streams are counted when they end).
    wait_metric(&d, &master2, "Replica/Status calls", |m| {
        at_least(sum(m, "sns_grpc_requests_total", &["rpc=\"Replica/Status\"", "code=\"Ok\""]), 1.0)
    })?;

    // A client that leaves closes its stream: the gauge goes down.
    c1.close();
    wait_metric(&d, &master1, "no open timeline", |m| sum(m, "sns_timeline_streams", &[]) == Some(0.0))?;
    Ok(())
}

#[test]
fn a_failover_is_counted_and_announced_on_the_console() -> Result<()> {
    let mut d = Deployment::start(2, 2)?;
    let (old, term) = master_of(&d, 2)?;
    let new = 3 - old;
    let count =
        |m: &BTreeMap<String, f64>| sum(m, "sns_coordinator_failovers_total", &["cluster=\"2\""]).unwrap_or(0.0);
    let before = count(&metrics(&d, "coordinator")?);
    d.command("kill master-2")?;

    let announced = format!("cluster 2: server {new} promoted, term ");
    let line = d.wait_stdout_line("the failover announcement", |l| l.starts_with(&announced))?;
    assert!(line.ends_with(&format!(" ms after server {old} died")), "{line}");
    let (now_master, new_term) = master_of(&d, 2)?;
    assert_eq!(now_master, new);
    assert!(new_term > term);
    assert!(line.contains(&format!("term {new_term}, ")), "{line} names the table's term {new_term}");

    wait_metric(&d, "coordinator", "one more failover of cluster 2, timed", |m| {
        count(m) == before + 1.0
            && at_least(sum(m, "sns_coordinator_failover_seconds_count", &[]), 1.0)
            && sum(m, "sns_coordinator_term", &["cluster=\"2\""]) == Some(new_term as f64)
            && sum(m, "sns_coordinator_live_nodes", &["cluster=\"2\"", "kind=\"server\""]) == Some(1.0)
    })?;
    wait_metric(&d, &format!("server-2-{new}"), "the promoted server's role gauges", |m| {
        sum(m, "sns_master", &[]) == Some(1.0) && sum(m, "sns_term", &[]) == Some(new_term as f64)
    })?;
    Ok(())
}

/// `sns-node status` against a running deployment, with its secret; and
/// refused without it.
#[test]
fn sns_node_status_prints_the_routing_table() -> Result<()> {
    let mut d = Deployment::start(2, 2)?;
    let (m1, term1) = master_of(&d, 1)?;
    let port = d.coord_port.to_string();
    let run = |secret: bool| {
        let mut cmd = std::process::Command::new(sns_e2e::bin("sns-node"));
        cmd.args(["status", "-h", "127.0.0.1", "-k", &port]).env_remove("SNS_SECRET_FILE");
        if secret {
            cmd.arg("--secret-file").arg(sns_e2e::secret::file());
        }
        cmd.output()
    };
    // Synchronizers list themselves as problems until their links are up.
    let mut last = String::new();
    let out = eventually("a table without problems", || {
        let out = run(true).ok()?;
        last = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success() && !last.contains("problems:")).then_some(out)
    })
    .map_err(|e| anyhow!("{e}; last answer:\n{last}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1 + 8, "a header and 8 nodes:\n{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["CLUSTER", "NODE", "ROLE", "TERM", "IN-SYNC", "LAST-BEAT", "BACKLOG", "ADDRESS"]);
    // Aligned: every row's address starts in the header's ADDRESS column.
    let col = lines[0].find("ADDRESS").unwrap();
    assert!(lines[1..].iter().all(|l| l.get(col..).is_some_and(|a| a.starts_with("127.0.0.1:"))), "{text}");
    let row = |name: &str| lines.iter().find(|l| l.split_whitespace().nth(1) == Some(name)).copied().unwrap_or("");
    let master: Vec<&str> = row(&format!("server-1-{m1}")).split_whitespace().collect();
    assert_eq!(&master[..5], ["1", &format!("server-1-{m1}"), "master", &term1.to_string(), "yes"], "{text}");
    let slave: Vec<&str> = row(&format!("server-1-{}", 3 - m1)).split_whitespace().collect();
    assert_eq!(slave[2], "slave", "{text}");
    // The publishing synchronizer (beside the master) shows a backlog.
    let sync: Vec<&str> = row(&format!("sync-1-{m1}")).split_whitespace().collect();
    assert!(sync[2] == "sync" && sync[6].parse::<u64>().is_ok(), "{text}");
    assert!(master[5].ends_with("ms") && master[6] == "-", "{text}");

    let refused = run(false)?;
    assert!(!refused.status.success(), "the table needs the deployment's secret");

    // The launcher's status: the same table, with pids and metrics ports,
    // then the one-line summary.
    let status = d.console("status", |t| t.lines().any(|l| l.starts_with("status:")))?;
    let header = status.lines().find(|l| l.starts_with("CLUSTER")).unwrap_or_default();
    assert!(header.split_whitespace().rev().take(2).eq(["METRICS", "PID"]), "{status}");
    let procs = d.status()?;
    let pid = procs[&format!("server-1-{m1}")].expect("the master runs");
    let launcher_row = status.lines().find(|l| l.contains(&format!("server-1-{m1} "))).unwrap_or_default();
    assert!(launcher_row.contains(&format!(" {pid} ")), "{status}");
    Ok(())
}

/// A synchronizer that cannot reach the broker says so in its heartbeats:
/// `sns-node status` lists it below the table with the broker's error, and
/// the line goes once it is connected again.
#[test]
fn a_synchronizer_cut_off_from_the_broker_is_listed_as_a_problem() -> Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let port = d.coord_port.to_string();
    let status = || -> Result<String> {
        let out = std::process::Command::new(sns_e2e::bin("sns-node"))
            .args(["status", "-h", "127.0.0.1", "-k", &port, "--secret-file"])
            .arg(sns_e2e::secret::file())
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // Each synchronizer says "connecting" until its links are up.
    eventually("every synchronizer to connect", || {
        let text = status().ok()?;
        (text.contains("sync-1-2") && !text.contains("problems:")).then_some(())
    })?;

    // sync-1-2 again, as the launcher ran it, but against a broker port that
    // refuses connections.
    let pid = d.status()?["sync-1-2"].ok_or_else(|| anyhow!("sync-1-2 runs"))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let mut args: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let url = args.iter().position(|a| a == "--amqp-url").ok_or_else(|| anyhow!("no --amqp-url in {args:?}"))?;
    args[url + 1] = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    d.command("kill sync-1-2")?;
    let mut cut_off = std::process::Command::new(&args[0])
        .args(&args[1..])
        .env("SNS_SECRET_FILE", sns_e2e::secret::file())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // First "connecting", then the broker's own error.
    let mut last = String::new();
    let shown = eventually("the status to show why the synchronizer is cut off", || {
        last = status().ok()?;
        last.lines()
            .any(|l| {
                l.starts_with("  sync-1-2: link to its server or the broker down:")
                    && l.to_lowercase().contains("refused")
            })
            .then(|| last.clone())
    });
    // Its metrics say so too (it wrote its port where the launcher's
    // sync-1-2 did); the other synchronizer is linked.
    let link_up = |name: &str| metrics(&d, name).ok().and_then(|m| sum(&m, "sns_sync_link_up", &[]));
    let cut_metric = eventually("the cut-off synchronizer's link gauge", || link_up("sync-1-2"));
    let linked_metric = link_up("sync-1-1");
    let _ = cut_off.kill();
    let _ = cut_off.wait();
    let shown = shown.map_err(|e| anyhow!("{e}; last status:\n{last}"))?;
    assert_eq!((cut_metric?, linked_metric), (0.0, Some(1.0)), "sns_sync_link_up of sync-1-2, sync-1-1");
    let problems: Vec<&str> = shown.lines().skip_while(|l| *l != "problems:").skip(1).collect();
    assert_eq!(problems.len(), 1, "only the cut-off one: {shown}");

    d.command("start sync-1-2")?;
    eventually("the problem to go once it is connected", || {
        let text = status().ok()?;
        (!text.contains("problems:") && text.contains("sync-1-2")).then_some(())
    })?;
    Ok(())
}

#[test]
fn the_console_lists_its_commands_and_names_unknown_ones() -> Result<()> {
    let mut d = Deployment::start(1, 1)?;
    let hint = d.wait_stdout_line("the start-up hint", |l| l.starts_with("commands:"))?;
    assert!(hint.contains("pause <name>") && hint.contains("resume <name>") && hint.contains("help"), "{hint}");
    // The help's own last line (the start-up hint, which may still be
    // unread, holds "(names:" too, but not alone on an indented line).
    let help = d.console("help", |t| t.lines().any(|l| l.starts_with("  (names:")))?;
    for cmd in [
        "status",
        "kill",
        "stop",
        "start",
        "restart",
        "pause",
        "resume",
        "partition",
        "heal",
        "promote",
        "switchover",
        "help",
    ] {
        assert_eq!(
            help.lines().filter(|l| l.split_whitespace().next() == Some(cmd)).count(),
            1,
            "one line for {cmd}:\n{help}"
        );
    }
    let unknown = d.console("frobnicate", |t| t.contains("unknown command"))?;
    assert_eq!(unknown.trim(), "unknown command: frobnicate (help lists the commands)");
    let out = std::process::Command::new(sns_e2e::bin("sns-node")).args(["local", "--help"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("switchover <cluster> [<server>]") && text.contains("pause <name>"), "{text}");
    Ok(())
}

/// A launcher driven through its standard input (`--stop-on-stdin-eof`, as
/// every test and the bench run it) stops every node it started when that
/// input ends, as it does when the program driving it is killed: nothing of
/// the deployment is left running.
#[test]
fn a_launcher_whose_input_ends_stops_every_node() -> Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let pids: Vec<u32> = d.status()?.into_values().flatten().collect();
    assert!(pids.len() >= 4, "coordinator, two servers and their synchronizers: {pids:?}");
    d.end_input();
    let status = eventually("the launcher exits", || d.launcher_exit())?;
    assert!(status.success(), "{status}");
    assert!(d.stdout().contains("standard input ended: stopping"), "{}", d.stdout());
    for pid in pids {
        // A stopped node's process is gone (reaped by its launcher).
        eventually(&format!("node process {pid} is gone"), || {
            (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })?;
    }
    Ok(())
}

/// A node started by hand with `--log-format json` and `--metrics-port 0`:
/// every log line is a JSON object, and the metrics port it wrote answers.
#[test]
fn json_logs_and_a_metrics_port_on_a_node_run_by_hand() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (log, port_file) = (dir.path().join("coordinator.log"), dir.path().join("metrics.port"));
    let child = std::process::Command::new(sns_e2e::bin("sns-node"))
        .args(["--log-format", "json", "--log", "info", "coordinator", "-p", "0", "--clusters", "2"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics-port", "0", "--metrics-port-file"])
        .arg(&port_file)
        .env_remove("SNS_SECRET_FILE")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let _child = sns_e2e::KillOnDrop(child);
    (|| {
        let port: u16 =
            eventually("the metrics port file", || std::fs::read_to_string(&port_file).ok()?.trim().parse().ok())?;
        // The port answers as soon as it is bound; the coordinator sets its
        // gauges once it runs.
        let live = eventually("the coordinator's live-nodes gauge", || {
            let m = parse(&scrape(port).ok()?).ok()?;
            sum(&m, "sns_coordinator_live_nodes", &["cluster=\"2\"", "kind=\"server\""])
        })?;
        assert_eq!(live, 0.0, "no server heartbeats to a coordinator run alone");
        let text = eventually("the coordinator's start-up line", || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("coordinator listening").then_some(text)
        })?;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{e}: {line}"))?;
            assert!(
                v["timestamp"].is_string() && v["level"].is_string() && v["fields"]["message"].is_string(),
                "{line}"
            );
        }
        anyhow::Ok(())
    })()
}
