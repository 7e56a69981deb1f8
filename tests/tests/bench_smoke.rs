//! `sns-bench --smoke` works end to end: it starts its own deployment
//! against the real broker, runs every measure with tiny counts, exits 0
//! and writes JSON whose flat keys are all there and numeric. Timing
//! targets are never asserted here (they depend on the machine); the
//! figures themselves are documented in docs/benchmarks.md.

use sns_e2e::bench::report::REQUIRED_KEYS;
use std::process::Command;
use std::time::{Duration, Instant};

/// The smoke run takes about 5 s on a 2-core machine (debug build a little
/// more); this bounds a hang, not the run.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn smoke_run_writes_every_figure() {
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
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("sns-bench --smoke still running after {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "sns-bench --smoke failed ({status}):\n{stdout}\n{stderr}");
    assert!(stdout.contains("post -> follower's stream"), "no table printed:\n{stdout}");

    let text = std::fs::read_to_string(&json).expect("the JSON file is written");
    let value: serde_json::Value = serde_json::from_str(&text).expect("the JSON parses");
    let obj = value.as_object().expect("a flat JSON object");
    let missing: Vec<&str> =
        REQUIRED_KEYS.iter().copied().filter(|k| !obj.get(*k).is_some_and(serde_json::Value::is_number)).collect();
    assert!(missing.is_empty(), "keys missing or not numbers: {missing:?}\n{text}");
    // Flat: no nested objects or arrays.
    assert!(obj.values().all(|v| v.is_number() || v.is_string()), "not flat:\n{text}");
    // Counts that must be real, not zeros standing in for a skipped measure.
    for key in ["failover_kills", "cross_cluster_post_samples", "follow_visible_samples", "posts_per_s"] {
        assert!(obj[key].as_f64().is_some_and(|v| v > 0.0), "{key} is {}", obj[key]);
    }
    assert!(obj.keys().all(|k| !k.ends_with("_error")), "a measure failed:\n{text}");
}
