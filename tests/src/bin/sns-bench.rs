//! `sns-bench [--quick | --smoke] [--json PATH]`: benchmarks a local Tiny SNS
//! deployment against raw baselines (see `docs/benchmarks.md`).
#![allow(clippy::print_stdout, reason = "a command-line tool: the table on stdout is its output")]

use clap::Parser;
use sns_e2e::bench::{self, Mode, Options};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Benchmarks Tiny SNS on this machine: starts its own local deployment on
/// free loopback ports against the RabbitMQ broker, measures propagation
/// latency, failover outage, a slave's catch-up, throughput, memory and
/// start-up beside baselines measured in the same run, prints a table, and
/// writes JSON. Exits non-zero when a measure failed or a post reached a
/// follower twice or never.
#[derive(Debug, Parser)]
#[command(name = "sns-bench", version)]
struct Args {
    /// Short run (under 30 s): smaller counts, 500 ms heartbeat.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Tiny run (about 10 s) that checks the tool works; figures are rough.
    #[arg(long)]
    smoke: bool,
    /// Write the results as flat JSON here.
    #[arg(long, env = "SNS_BENCH_JSON")]
    json: Option<PathBuf>,
    /// Heartbeat period of the deployment [default: 5s in full runs, 500ms in quick/smoke].
    #[arg(long, env = "SNS_BENCH_HEARTBEAT", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Heartbeats a node may miss before it is dead [default: 2].
    #[arg(long, env = "SNS_BENCH_MISSED", value_parser = clap::value_parser!(u32).range(1..=100))]
    missed_heartbeats: Option<u32>,
    /// Posts/s of the controlled-rate run [default: half the measured maximum].
    #[arg(long, env = "SNS_BENCH_RATE")]
    rate: Option<f64>,
    /// Directory of the sns-node binary [default: this binary's directory].
    #[arg(long, env = "SNS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Log filter of the nodes (SNS_LOG) [default: the system's].
    #[arg(long, env = "SNS_BENCH_NODE_LOG")]
    node_log: Option<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v < 3600.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("{text:?} is not a duration like 5s or 500ms")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin_dir =
        match args.bin_dir.clone().or_else(|| std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)))
        {
            Some(d) => d,
            None => {
                eprintln!("sns-bench: cannot tell where sns-node is; pass --bin-dir");
                return ExitCode::from(2);
            }
        };
    let opts = Options {
        mode: if args.smoke {
            Mode::Smoke
        } else if args.quick {
            Mode::Quick
        } else {
            Mode::Full
        },
        heartbeat: args.heartbeat_interval,
        missed: args.missed_heartbeats,
        rate: args.rate,
        bin_dir,
        log: args.node_log.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sns-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let result = runtime.block_on(bench::run(&opts));
    // Nothing may outlive the run: streams and consumers end here.
    runtime.shutdown_timeout(Duration::from_secs(2));
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sns-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    report.num("bench_wall_s", started.elapsed().as_secs_f64());
    println!("{}", report.table());
    let problems = report.problems();
    for p in &problems {
        eprintln!("error: {p}");
    }
    if let Some(path) = &args.json {
        if let Err(e) = report.write_json(path) {
            eprintln!("sns-bench: {e:#}");
            return ExitCode::FAILURE;
        }
        println!("results written to {}", path.display());
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("sns-bench: FAILED ({} problems above)", problems.len());
        ExitCode::FAILURE
    }
}
