//! The results: flat `key -> number` (plus a few texts describing the run),
//! written as JSON, and the table printed for people.

use super::stats::Samples;
use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fmt::Write as _;
use std::path::Path;

/// Keys every run writes with a number (the smoke test checks them).
pub const REQUIRED_KEYS: &[&str] = &[
    "cross_cluster_post_p50_ms",
    "cross_cluster_post_p90_ms",
    "cross_cluster_post_p99_ms",
    "cross_cluster_post_max_ms",
    "loaded_cross_cluster_post_p50_ms",
    "loaded_cross_cluster_post_p99_ms",
    "follow_visible_p50_ms",
    "follow_visible_p99_ms",
    "failover_outage_median_ms",
    "failover_outage_max_ms",
    "failover_kills",
    "failover_heartbeat_ms",
    "failover_missed_heartbeats",
    "switchover_outage_median_ms",
    "switchover_outage_max_ms",
    "switchover_count",
    "posts_per_s",
    "deliveries_per_s",
    "duplicate_deliveries",
    "lost_deliveries",
    "broker_sync_baseline_events_per_s",
    "posts_vs_broker_sync_ratio",
    "broker_baseline_msgs_per_s",
    "posts_vs_broker_ratio",
    "grpc_unary_baseline_p50_us",
    "fsync_append_baseline_p50_us",
    "fsync_append_baseline_p99_us",
    "broker_latency_baseline_p50_us",
    "catchup_ms",
    "catchup_posts",
    "scale_flat",
    "idle_rss_kb_max",
    "startup_ms",
    "startup_wall_ms",
    "cross_cluster_post_vs_floor_ratio",
    "follow_visible_vs_floor_ratio",
    "failover_vs_detection_ratio",
    "startup_vs_spawn_ratio",
];

#[derive(Debug, Default)]
pub struct Report {
    values: Map<String, Value>,
    errors: Vec<String>,
}

/// Three decimals, or four significant digits below 1 (a small ratio such
/// as 0.0004 must not round to 0).
fn round(v: f64) -> f64 {
    if v == 0.0 || v.abs() >= 1.0 || !v.is_finite() {
        return (v * 1000.0).round() / 1000.0;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

impl Report {
    /// Records a number (rounded, see [`round`]); NaN and infinities are
    /// not numbers in JSON and are left out.
    pub fn num(&mut self, key: &str, v: f64) {
        if let Some(n) = serde_json::Number::from_f64(round(v)) {
            self.values.insert(key.to_string(), Value::Number(n));
        }
    }

    pub fn int(&mut self, key: &str, v: u64) {
        self.values.insert(key.to_string(), Value::from(v));
    }

    pub fn text(&mut self, key: &str, v: &str) {
        self.values.insert(key.to_string(), Value::from(v));
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(Value::as_f64)
    }

    /// `<prefix>_p50<unit>`, `_p90`, `_p99`, `_max` and `_samples`.
    pub fn percentiles(&mut self, prefix: &str, unit: &str, s: &mut Samples) {
        self.int(&format!("{prefix}_samples"), s.len() as u64);
        for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)] {
            if let Some(v) = s.percentile(p) {
                self.num(&format!("{prefix}_{name}_{unit}"), v);
            }
        }
    }

    /// `duplicate_deliveries` and `lost_deliveries`: the sums of every
    /// phase's `<phase>_duplicate_deliveries` and `<phase>_lost_deliveries`.
    pub fn total_deliveries(&mut self) {
        for what in ["duplicate_deliveries", "lost_deliveries"] {
            let suffix = format!("_{what}");
            let total: u64 =
                self.values.iter().filter(|(k, _)| k.ends_with(&suffix)).filter_map(|(_, v)| v.as_u64()).sum();
            self.int(what, total);
        }
    }

    /// A measure that failed: the run goes on, the message is reported and
    /// the tool exits non-zero.
    pub fn error(&mut self, measure: &str, e: &anyhow::Error) {
        let msg = format!("{measure}: {e:#}");
        self.errors.push(msg.clone());
        let key = format!("{measure}_error");
        self.text(&key, &msg);
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Required keys that hold no number.
    pub fn missing(&self) -> Vec<&'static str> {
        REQUIRED_KEYS.iter().copied().filter(|k| self.get(k).is_none()).collect()
    }

    /// Why the run failed, if it did: a measure's error, a required figure
    /// missing, a post delivered twice or never to a follower's stream.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.errors.clone();
        let missing = self.missing();
        if !missing.is_empty() {
            out.push(format!("no figure for {}", missing.join(", ")));
        }
        let count = |k: &str| self.get(k).unwrap_or(0.0);
        let (dup, lost) = (count("duplicate_deliveries"), count("lost_deliveries"));
        if dup > 0.0 || lost > 0.0 {
            out.push(format!(
                "{dup} duplicate and {lost} lost deliveries to follower streams (see the `*_duplicate_deliveries` \
                 and `*_lost_deliveries` figures)"
            ));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&Value::Object(self.values.clone()))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The table: each figure beside its target and its baseline.
    pub fn table(&self) -> String {
        let f = |k: &str| self.get(k);
        let fmt = |v: Option<f64>, unit: &str| match v {
            Some(v) if v >= 100.0 => format!("{v:.0} {unit}"),
            Some(v) if v >= 10.0 => format!("{v:.1} {unit}"),
            Some(v) => format!("{v:.2} {unit}"),
            None => "n/a".into(),
        };
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        let pct = |v: Option<f64>| match v.map(|v| v * 100.0) {
            Some(p) if p >= 10.0 => format!("{p:.0}%"),
            Some(p) if p >= 1.0 => format!("{p:.1}%"),
            Some(p) => format!("{p:.2}%"),
            None => "n/a".into(),
        };
        let le = |k: &str, t: f64| f(k).map(|v| v <= t);
        let both = |a: Option<bool>, b: Option<bool>| Some(a? && b?);
        let floor = fmt(f("post_path_floor_ms"), "ms");
        let hb = format!(
            "detection bound {} (heartbeat {} x {})",
            fmt(f("failover_detection_bound_ms"), "ms"),
            fmt(f("failover_heartbeat_ms"), "ms"),
            f("failover_missed_heartbeats").unwrap_or(0.0)
        );
        // One row per controlled-rate run: `loaded_25pct`, ..., `loaded`.
        let mut prefixes: Vec<String> = self
            .values
            .keys()
            .filter_map(|k| k.strip_suffix("_rate_posts_per_s"))
            .filter(|p| p.starts_with("loaded"))
            .map(str::to_string)
            .collect();
        prefixes.sort_by(|a, b| {
            f(&format!("{a}_rate_posts_per_s"))
                .partial_cmp(&f(&format!("{b}_rate_posts_per_s")))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let loaded_row = |prefix: &str| -> [String; 5] {
            let k = |name: &str| format!("{prefix}_{name}");
            [
                format!("  same, under load ({} posts/s)", fmt(f(&k("rate_posts_per_s")), "").trim_end()),
                format!(
                    "p50 {} p90 {} p99 {} max {}",
                    fmt(f(&k("cross_cluster_post_p50_ms")), "ms"),
                    fmt(f(&k("cross_cluster_post_p90_ms")), "ms"),
                    fmt(f(&k("cross_cluster_post_p99_ms")), "ms"),
                    fmt(f(&k("cross_cluster_post_max_ms")), "ms")
                ),
                "p50 <= 20 ms, p99 <= 100 ms".into(),
                format!("floor {floor}"),
                verdict(both(le(&k("cross_cluster_post_p50_ms"), 20.0), le(&k("cross_cluster_post_p99_ms"), 100.0)))
                    .into(),
            ]
        };
        let mut rows: Vec<[String; 5]> = vec![
            [
                "post -> follower's stream, other cluster (idle)".into(),
                format!(
                    "p50 {} p90 {} p99 {} max {}",
                    fmt(f("cross_cluster_post_p50_ms"), "ms"),
                    fmt(f("cross_cluster_post_p90_ms"), "ms"),
                    fmt(f("cross_cluster_post_p99_ms"), "ms"),
                    fmt(f("cross_cluster_post_max_ms"), "ms")
                ),
                "p50 <= 20 ms, p99 <= 100 ms".into(),
                format!("floor {floor}"),
                verdict(both(le("cross_cluster_post_p50_ms", 20.0), le("cross_cluster_post_p99_ms", 100.0))).into(),
            ],
            [
                "follow -> visible in followee's LIST, other cluster".into(),
                format!(
                    "p50 {} p99 {} max {}",
                    fmt(f("follow_visible_p50_ms"), "ms"),
                    fmt(f("follow_visible_p99_ms"), "ms"),
                    fmt(f("follow_visible_max_ms"), "ms")
                ),
                "p99 <= 100 ms".into(),
                format!("floor {floor}"),
                verdict(le("follow_visible_p99_ms", 100.0)).into(),
            ],
            [
                format!("master SIGKILL -> client's next command ({} kills)", f("failover_kills").unwrap_or(0.0)),
                format!(
                    "median {} max {}",
                    fmt(f("failover_outage_median_ms"), "ms"),
                    fmt(f("failover_outage_max_ms"), "ms")
                ),
                "median <= 1500 ms".into(),
                hb,
                verdict(le("failover_outage_median_ms", 1500.0)).into(),
            ],
            [
                "sustained posts/s, 3 clusters, durable, fan-out".into(),
                format!(
                    "{} ({} deliveries/s); {} of the synchronizers' pattern, {} of raw",
                    fmt(f("posts_per_s"), "posts/s"),
                    fmt(f("deliveries_per_s"), "").trim_end(),
                    pct(f("posts_vs_broker_sync_ratio")),
                    pct(f("posts_vs_broker_ratio")),
                ),
                ">= 50% of broker (synchronizers' pattern)".into(),
                format!(
                    "synchronizers' pattern {}; raw single messages {} (4-way fan-out {})",
                    fmt(f("broker_sync_baseline_events_per_s"), "events/s"),
                    fmt(f("broker_baseline_msgs_per_s"), "msg/s"),
                    fmt(f("broker_fanout4_baseline_msgs_per_s"), "msg/s")
                ),
                verdict(f("posts_vs_broker_sync_ratio").map(|r| r >= 0.5)).into(),
            ],
            [
                format!("slave rejoin -> synced slave ({} posts in the cluster)", f("catchup_posts").unwrap_or(0.0)),
                format!(
                    "{} (snapshot {}, installed in {})",
                    fmt(f("catchup_ms"), "ms"),
                    fmt(f("catchup_snapshot_bytes").map(|b| b / 1024.0), "KiB"),
                    fmt(f("catchup_snapshot_ms"), "ms"),
                ),
                "- (informative)".into(),
                format!("process spawn {}", fmt(f("process_spawn_baseline_p50_ms"), "ms")),
                "n/a".into(),
            ],
            [
                "posts go only where read: per post, followers in 2 clusters".into(),
                {
                    let sizes = ["3", "4", "6", "12"];
                    let cells: Vec<String> = sizes
                        .iter()
                        .filter_map(|n| {
                            let d = f(&format!("scale_{n}_deliveries_per_post"))?;
                            let a = f(&format!("scale_{n}_remote_applies_per_post"))?;
                            Some(format!("{n} clusters: {d:.2} sent, {a:.2} applied"))
                        })
                        .collect();
                    if cells.is_empty() { "n/a".into() } else { cells.join("; ") }
                },
                "flat as clusters grow".into(),
                "every post to every cluster: N-1 each".into(),
                verdict(f("scale_flat").map(|v| v > 0.0)).into(),
            ],
            [
                "idle RSS per node process (max)".into(),
                format!(
                    "{} (coord {}, server {}, sync {})",
                    fmt(f("idle_rss_kb_max").map(|k| k / 1024.0), "MB"),
                    fmt(f("idle_rss_kb_coordinator").map(|k| k / 1024.0), "MB"),
                    fmt(f("idle_rss_kb_server_max").map(|k| k / 1024.0), "MB"),
                    fmt(f("idle_rss_kb_sync_max").map(|k| k / 1024.0), "MB"),
                ),
                "<= 15 MB".into(),
                format!("launcher (same binary, idle) {}", fmt(f("idle_rss_kb_launcher").map(|k| k / 1024.0), "MB")),
                verdict(le("idle_rss_kb_max", 15.0 * 1024.0)).into(),
            ],
            [
                "local topology start -> ready".into(),
                format!("{} (launcher) / {} (wall)", fmt(f("startup_ms"), "ms"), fmt(f("startup_wall_ms"), "ms")),
                "<= 2000 ms".into(),
                format!(
                    "{} x spawn {}",
                    f("startup_processes").unwrap_or(0.0),
                    fmt(f("process_spawn_baseline_p50_ms"), "ms")
                ),
                verdict(le("startup_wall_ms", 2000.0)).into(),
            ],
        ];
        if let Some(n) = f("hang_pauses") {
            rows.insert(
                3,
                [
                    format!("  master SIGSTOP (hung) -> next command ({n} pauses)"),
                    format!(
                        "median {} max {}",
                        fmt(f("hang_outage_median_ms"), "ms"),
                        fmt(f("hang_outage_max_ms"), "ms")
                    ),
                    "- (informative)".into(),
                    format!("detection bound {}", fmt(f("failover_detection_bound_ms"), "ms")),
                    "n/a".into(),
                ],
            );
        }
        if let Some(n) = f("switchover_count") {
            rows.insert(
                3,
                [
                    format!("  planned switchover -> next command ({n} switchovers)"),
                    format!(
                        "median {} max {}",
                        fmt(f("switchover_outage_median_ms"), "ms"),
                        fmt(f("switchover_outage_max_ms"), "ms")
                    ),
                    "- (informative)".into(),
                    format!("gRPC {}", fmt(f("grpc_unary_baseline_p50_us").map(|v| v / 1000.0), "ms")),
                    "n/a".into(),
                ],
            );
        }
        for (i, prefix) in prefixes.iter().enumerate() {
            rows.insert(1 + i, loaded_row(prefix));
        }
        let mut out = String::new();
        let head = ["measure", "figure", "target", "baseline", "verdict"];
        let widths: Vec<usize> =
            (0..5).map(|i| rows.iter().map(|r| r[i].len()).chain([head[i].len()]).max().unwrap_or(0)).collect();
        let mut line = |cells: &[&str]| {
            let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            let _ = writeln!(out, "{}", parts.join(" | ").trim_end());
        };
        line(&head);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule.iter().map(String::as_str).collect::<Vec<_>>());
        for r in &rows {
            line(&r.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let _ = writeln!(
            out,
            "\nbaselines: gRPC unary p50 {} p99 {}; fsync'd append p50 {} p99 {}; broker hop p50 {}; floor of the post path (4 gRPC + 4 fsync + broker hop) {}",
            fmt(f("grpc_unary_baseline_p50_us"), "us"),
            fmt(f("grpc_unary_baseline_p99_us"), "us"),
            fmt(f("fsync_append_baseline_p50_us"), "us"),
            fmt(f("fsync_append_baseline_p99_us"), "us"),
            fmt(f("broker_latency_baseline_p50_us"), "us"),
            floor,
        );
        if let Some(ack) = f("post_ack_p50_ms") {
            let _ = writeln!(
                out,
                "post acknowledged (durable on master and slave): p50 {} p99 {}",
                fmt(Some(ack), "ms"),
                fmt(f("post_ack_p99_ms"), "ms")
            );
        }
        let _ = writeln!(
            out,
            "client write (FOLLOW) acknowledged: p50 {} p99 {}",
            fmt(f("follow_ack_p50_ms"), "ms"),
            fmt(f("follow_ack_p99_ms"), "ms")
        );
        let _ = writeln!(
            out,
            "broker, synchronizers' pattern: {} events in {} messages, each event to {} queues (a message per destination); deliveries: {} duplicate, {} lost",
            f("broker_sync_baseline_events").unwrap_or(0.0),
            f("broker_sync_baseline_messages").unwrap_or(0.0),
            f("broker_sync_baseline_queues_per_message").unwrap_or(0.0),
            f("duplicate_deliveries").unwrap_or(0.0),
            f("lost_deliveries").unwrap_or(0.0),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_figures_keep_their_digits() {
        assert_eq!(round(1234.56789), 1234.568);
        assert_eq!(round(0.000_412_345), 0.000_412_3);
        assert_eq!(round(0.5), 0.5);
        assert_eq!(round(0.0), 0.0);
        let mut r = Report::default();
        r.num("tiny_ratio", 0.000_3);
        assert_eq!(r.get("tiny_ratio"), Some(0.000_3));
    }

    #[test]
    fn duplicates_and_losses_are_problems() {
        let mut r = Report::default();
        r.int("idle_duplicate_deliveries", 0);
        r.int("max_rate_duplicate_deliveries", 2);
        r.int("max_rate_lost_deliveries", 1);
        r.total_deliveries();
        assert_eq!(r.get("duplicate_deliveries"), Some(2.0));
        assert_eq!(r.get("lost_deliveries"), Some(1.0));
        let problems = r.problems();
        assert!(problems.iter().any(|p| p.contains("2 duplicate and 1 lost")), "{problems:?}");
    }
}
