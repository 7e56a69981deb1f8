//! `sns-bench --smoke` works end to end and its figures make sense: it
//! starts its own deployment against the real broker, runs every measure
//! with tiny counts, exits 0 and writes flat JSON in which every required
//! key is a number, every latency set is ordered (p50 <= p90 <= p99 <=
//! max), every ratio is positive and bounded, counts are real (not zeros
//! standing in for a skipped measure), and no post reached a follower's
//! stream twice or never. Timing targets are never asserted (they depend on
//! the machine); the figures themselves are documented in
//! docs/benchmarks.md.

use serde_json::{Map, Value};
use sns_e2e::bench::report::REQUIRED_KEYS;
use std::io::Read as _;
use std::process::Command;
use std::time::{Duration, Instant};

/// The smoke run takes about 10 s on a 2-core machine (debug build a little
/// more); this bounds a hang, not the run.
const LIMIT: Duration = Duration::from_secs(90);

/// A ratio of an SNS figure to its baseline beyond this is a broken
/// measure, not a slow machine: the largest seen in a smoke run is about 30
/// (a loaded post's p50 against the idle floor of its primitives).
const RATIO_MAX: f64 = 1000.0;
/// Throughput ratios (posts/s against a broker rate): the system cannot
/// outrun the broker it runs on by an order of magnitude.
const THROUGHPUT_RATIO_MAX: f64 = 10.0;

#[test]
fn smoke_run_writes_sane_figures() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let bench = env!("CARGO_BIN_EXE_sns-bench");
    let started = Instant::now();
    let mut child = Command::new(bench)
        .args(["--smoke", "--json"])
        .arg(&json)
        // The workspace's sns-node, built beside the test executables.
        .env("SNS_BIN_DIR", sns_e2e::bin_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sns-bench starts");
    // Both pipes are drained while it runs: a child that filled one would
    // otherwise block on its next write and look like a stall.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = tx.send(bytes);
        });
        // What the pipe held by the end (bounded: a stray holder of the
        // pipe must not hang the test).
        move || rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::process::Output { status: status.unwrap_or_default(), stdout: stdout(), stderr: stderr() };
    // Its progress lines name the phase that stalled.
    assert!(
        status.is_some(),
        "sns-bench --smoke still running after {LIMIT:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = out.status;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "sns-bench --smoke failed ({status}):\n{stdout}\n{stderr}");
    for row in [
        "post -> follower's stream",
        "sustained posts/s",
        "synchronizers' pattern",
        "slave rejoin",
        "planned switchover",
    ] {
        assert!(stdout.contains(row), "no {row:?} in the table:\n{stdout}");
    }

    let text = std::fs::read_to_string(&json).expect("the JSON file is written");
    let value: Value = serde_json::from_str(&text).expect("the JSON parses");
    let obj = value.as_object().expect("a flat JSON object");
    let missing: Vec<&str> =
        REQUIRED_KEYS.iter().copied().filter(|k| !obj.get(*k).is_some_and(Value::is_number)).collect();
    assert!(missing.is_empty(), "keys missing or not numbers: {missing:?}\n{text}");
    // Flat: no nested objects or arrays.
    assert!(obj.values().all(|v| v.is_number() || v.is_string()), "not flat:\n{text}");
    assert!(obj.keys().all(|k| !k.ends_with("_error")), "a measure failed:\n{text}");
    let problems =
        [check_counts(obj), check_deliveries(obj), check_percentiles(obj), check_ratios(obj), check_consistency(obj)]
            .concat();
    assert!(problems.is_empty(), "insane figures:\n  {}\n{text}", problems.join("\n  "));
}

fn num(obj: &Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key).and_then(Value::as_f64)
}

/// Counts and rates that must be real, not zeros standing in for a
/// skipped measure.
fn check_counts(obj: &Map<String, Value>) -> Vec<String> {
    [
        "failover_kills",
        "cross_cluster_post_samples",
        "follow_visible_samples",
        "loaded_cross_cluster_post_samples",
        "posts_per_s",
        "deliveries_per_s",
        "max_rate_posts",
        "broker_baseline_msgs_per_s",
        "broker_sync_baseline_events_per_s",
        "broker_sync_baseline_events",
        "broker_sync_baseline_messages",
        "catchup_ms",
        "catchup_posts",
        "catchup_posts_written_before",
        "catchup_posts_written_while_down",
        "idle_rss_kb_max",
        "startup_ms",
    ]
    .iter()
    .filter(|k| !num(obj, k).is_some_and(|v| v > 0.0))
    .map(|k| format!("{k} is {:?}, not > 0", obj.get(*k)))
    .collect()
}

/// Every post reached each follower's stream exactly once, in every phase.
fn check_deliveries(obj: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    let mut phases = 0;
    for (k, v) in obj {
        if k.ends_with("duplicate_deliveries") || k.ends_with("lost_deliveries") {
            phases += 1;
            if v.as_f64() != Some(0.0) {
                out.push(format!("{k} is {v}, not 0"));
            }
        }
    }
    // idle, catch-up (2 phases), maximum rate, controlled rate; two keys
    // each, plus the totals.
    if phases < 2 * 5 + 2 {
        out.push(format!("only {phases} duplicate/lost delivery figures"));
    }
    out
}

/// Every sample set is ordered: p50 <= p90 <= p99 <= max, all >= 0.
fn check_percentiles(obj: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    let mut sets = 0;
    for (k, _) in obj.iter().filter(|(k, _)| k.contains("_p50_")) {
        sets += 1;
        let chain: Vec<(String, f64)> = ["p50", "p90", "p99", "max"]
            .iter()
            .filter_map(|p| {
                let key = k.replace("_p50_", &format!("_{p}_"));
                num(obj, &key).map(|v| (key, v))
            })
            .collect();
        if chain.len() < 3 {
            out.push(format!("{k}: only {} of p50/p90/p99/max", chain.len()));
        }
        if let Some((key, v)) = chain.iter().find(|(_, v)| *v < 0.0) {
            out.push(format!("{key} is negative: {v}"));
        }
        for w in chain.windows(2) {
            if w[0].1 > w[1].1 {
                out.push(format!("{} = {} > {} = {}", w[0].0, w[0].1, w[1].0, w[1].1));
            }
        }
    }
    if sets < 10 {
        out.push(format!("only {sets} sample sets"));
    }
    out
}

/// Every ratio is positive and within a sane bound.
fn check_ratios(obj: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in obj.iter().filter(|(k, _)| k.ends_with("_ratio")) {
        let bound = if k.starts_with("posts_vs_broker") { THROUGHPUT_RATIO_MAX } else { RATIO_MAX };
        match v.as_f64() {
            Some(r) if r > 0.0 && r <= bound => {}
            _ => out.push(format!("{k} is {v}, not in (0, {bound}]")),
        }
    }
    for k in ["posts_vs_broker_sync_ratio", "posts_vs_broker_ratio", "cross_cluster_post_vs_floor_ratio"] {
        if !obj.contains_key(k) {
            out.push(format!("no {k}"));
        }
    }
    out
}

/// Figures that must agree with each other.
fn check_consistency(obj: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(posts), Some(deliveries), Some(follows)) =
        (num(obj, "posts_per_s"), num(obj, "deliveries_per_s"), num(obj, "load_follows_per_user"))
    else {
        return vec!["no posts_per_s, deliveries_per_s or load_follows_per_user".into()];
    };
    // Each load post has exactly `follows` followers and none is lost, so
    // the measured delivery rate is that multiple of the post rate (both
    // are counted over nearly the same window).
    let expected = posts * follows;
    if (deliveries - expected).abs() > 0.05 * expected {
        out.push(format!("deliveries_per_s {deliveries} is not about {follows} x posts_per_s {posts}"));
    }
    // A queue's copies are every event it was routed: events x queues.
    if let (Some(e), Some(q), Some(d)) = (
        num(obj, "broker_sync_baseline_events"),
        num(obj, "broker_sync_baseline_queues_per_message"),
        num(obj, "broker_sync_baseline_deliveries"),
    ) {
        if d != e * q {
            out.push(format!("synchronizers' pattern: {d} deliveries for {e} events x {q} queues"));
        }
    } else {
        out.push("no synchronizers' pattern counts".into());
    }
    // Posts go only where they are read: with the author's followers in two
    // clusters, each post is sent to and applied by exactly two, whatever
    // the deployment's size.
    for n in [3, 4] {
        for what in ["deliveries", "remote_applies"] {
            let key = format!("scale_{n}_{what}_per_post");
            match num(obj, &key) {
                Some(v) if (v - 2.0).abs() < 1e-9 => {}
                other => out.push(format!("{key} is {other:?}, not 2")),
            }
        }
    }
    if num(obj, "scale_flat") != Some(1.0) {
        out.push("the cost of a post is not flat as clusters grow".into());
    }
    // The cluster holds at least what the catch-up measure wrote into it.
    if let (Some(held), Some(before), Some(down)) = (
        num(obj, "catchup_posts"),
        num(obj, "catchup_posts_written_before"),
        num(obj, "catchup_posts_written_while_down"),
    ) && held < before + down
    {
        out.push(format!("the catch-up cluster holds {held} posts, fewer than the {before} + {down} written"));
    }
    if let (Some(bytes), Some(posts)) = (num(obj, "catchup_snapshot_bytes"), num(obj, "catchup_snapshot_posts"))
        && (bytes <= 0.0 || posts <= 0.0)
    {
        out.push(format!("catch-up snapshot of {bytes} bytes, {posts} posts"));
    }
    out
}
