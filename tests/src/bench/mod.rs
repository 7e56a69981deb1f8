//! `sns-bench`: starts its own local deployment (the real launcher, free
//! loopback ports, the real broker), measures the figures of issue 5 beside
//! baselines taken in the same run, prints a table and writes flat JSON.
//!
//! The throughput verdict compares like with like: posts/s against the
//! broker carrying the synchronizers' own traffic ([`sync_baseline`]); the
//! raw single-message rate ([`baseline::broker_rate`]) is reported beside
//! it. A post that reaches a follower's stream twice, or never, fails the
//! run ([`load::Tracker::verify`]).
//!
//! Every loop is bounded by a count and a time budget ([`Plan`]), so the
//! tool always ends by itself: `--smoke` in under 10 s, `--quick` in about
//! 30 s, the full run in a minute or two (most of it the load phases and the
//! failover series at the system's default 5 s heartbeat).

pub mod baseline;
pub mod catchup;
pub mod grpc;
pub mod load;
pub mod measure;
pub mod report;
pub mod scale;
pub mod stats;
pub mod sync_baseline;
pub mod system;

use crate::Deployment;
use anyhow::{Context, Result, anyhow};
use grpc::{Coord, User};
use report::Report;
use sns_node::ids::cluster_of;
use stats::{Clock, Samples, ms};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Longest the baselines may take together: their own bounds add up to
/// about two minutes in a full run.
const BASELINES_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
        }
    }
}

/// What the command line chose.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    /// Heartbeat period and misses of the deployment; None = the mode's.
    pub heartbeat: Option<Duration>,
    pub missed: Option<u32>,
    /// Posts/s of the controlled-rate run; None = half the measured maximum.
    pub rate: Option<f64>,
    /// Directory holding `sns-node`.
    pub bin_dir: PathBuf,
    /// The nodes' log filter; None = the system's default.
    pub log: Option<String>,
}

/// Counts and time budgets of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub clusters: u32,
    pub servers: u32,
    pub heartbeat: Duration,
    pub missed: u32,
    pub startups: usize,
    pub grpc_calls: usize,
    pub fsync_appends: usize,
    pub broker_msgs: usize,
    pub broker_fanout_msgs: usize,
    pub broker_latency_msgs: usize,
    /// Events of the like-for-like broker baseline (all clusters together)
    /// and how long it may publish.
    pub sync_events: usize,
    pub sync_publish_budget: Duration,
    pub idle_posts: usize,
    pub idle_budget: Duration,
    pub follows: usize,
    pub follow_budget: Duration,
    pub load_users: u32,
    pub load_follows: u32,
    pub max_rate_time: Duration,
    /// Controlled-rate runs, as fractions of the measured maximum (unless
    /// `--rate`); the last one's figures are the `loaded_*` keys, the
    /// others' `loaded_<percent>pct_*`.
    pub loaded_fractions: &'static [f64],
    pub loaded_time: Duration,
    pub drain: Duration,
    pub kills: usize,
    /// SIGSTOPs of a master (a hung server), revealed by missed heartbeats.
    pub pauses: usize,
    /// Planned switchovers, in turn over the clusters.
    pub switchovers: usize,
    pub per_kill: Duration,
    pub failover_budget: Duration,
    /// Posts the catch-up cluster holds before its slave is killed, posts
    /// written while it is down, and the time bound of each.
    pub catchup_posts: usize,
    pub catchup_extra: usize,
    pub catchup_budget: Duration,
    /// Deployment sizes (clusters of one server) of the scale measure, and
    /// the posts its author makes in each.
    pub scale_clusters: &'static [u32],
    pub scale_posts: usize,
}

impl Plan {
    pub fn new(opts: &Options) -> Plan {
        // The full run uses the system's defaults (5 s x 2); the short ones
        // a 500 ms heartbeat (as the end-to-end suites), or a single kill
        // would take longer than the whole run may.
        let (hb, missed) = match opts.mode {
            Mode::Full => (Duration::from_secs(5), 2),
            Mode::Quick | Mode::Smoke => (Duration::from_millis(500), 2),
        };
        let heartbeat = opts.heartbeat.unwrap_or(hb);
        let missed = opts.missed.unwrap_or(missed);
        let detection = heartbeat * missed;
        let base = Plan {
            clusters: 3,
            servers: 2,
            heartbeat,
            missed,
            startups: 3,
            grpc_calls: 2000,
            fsync_appends: 1000,
            broker_msgs: 20_000,
            broker_fanout_msgs: 10_000,
            broker_latency_msgs: 300,
            sync_events: 1_200_000,
            sync_publish_budget: Duration::from_secs(20),
            idle_posts: 300,
            idle_budget: Duration::from_secs(30),
            follows: 100,
            follow_budget: Duration::from_secs(30),
            load_users: 120,
            load_follows: 10,
            max_rate_time: Duration::from_secs(15),
            loaded_fractions: &[0.25, 0.5],
            loaded_time: Duration::from_secs(10),
            drain: Duration::from_secs(20),
            kills: 10,
            pauses: 3,
            switchovers: 9,
            // Detection plus generous room for the restart.
            per_kill: detection + Duration::from_secs(20),
            failover_budget: Duration::from_secs(300),
            catchup_posts: 10_000,
            catchup_extra: 1000,
            catchup_budget: Duration::from_secs(30),
            scale_clusters: &[3, 6, 12],
            scale_posts: 500,
        };
        match opts.mode {
            Mode::Full => base,
            Mode::Quick => Plan {
                startups: 1,
                grpc_calls: 500,
                fsync_appends: 200,
                broker_msgs: 5000,
                broker_fanout_msgs: 2000,
                broker_latency_msgs: 50,
                sync_events: 300_000,
                sync_publish_budget: Duration::from_secs(5),
                idle_posts: 60,
                idle_budget: Duration::from_secs(4),
                follows: 20,
                follow_budget: Duration::from_secs(3),
                max_rate_time: Duration::from_secs(3),
                loaded_time: Duration::from_secs(3),
                drain: Duration::from_secs(5),
                kills: 3,
                pauses: 1,
                switchovers: 3,
                failover_budget: Duration::from_secs(8).max(detection * 4),
                catchup_posts: 500,
                catchup_extra: 50,
                catchup_budget: Duration::from_secs(5),
                scale_posts: 100,
                ..base
            },
            Mode::Smoke => Plan {
                startups: 1,
                grpc_calls: 100,
                fsync_appends: 30,
                broker_msgs: 500,
                broker_fanout_msgs: 200,
                broker_latency_msgs: 10,
                sync_events: 30_000,
                sync_publish_budget: Duration::from_secs(2),
                idle_posts: 10,
                idle_budget: Duration::from_secs(2),
                follows: 3,
                follow_budget: Duration::from_secs(2),
                load_users: 12,
                load_follows: 3,
                max_rate_time: Duration::from_millis(700),
                loaded_fractions: &[0.5],
                loaded_time: Duration::from_millis(700),
                drain: Duration::from_secs(3),
                kills: 1,
                pauses: 0,
                switchovers: 1,
                scale_clusters: &[3, 4],
                scale_posts: 20,
                failover_budget: Duration::from_secs(4).max(detection * 2),
                catchup_posts: 200,
                catchup_extra: 20,
                catchup_budget: Duration::from_secs(3),
                ..base
            },
        }
    }
}

/// One line on stderr per step, so a person (or a profiler script) can
/// tell where a long run is.
fn progress(t0: Instant, msg: &str) {
    eprintln!("[{:6.1} s] {msg}", t0.elapsed().as_secs_f64());
}

/// Runs every measure and returns the report (with the errors of the
/// measures that failed; the others still ran). Needs a multi-thread
/// runtime: the launcher is driven through blocking pipes.
pub async fn run(opts: &Options) -> Result<Report> {
    let plan = Plan::new(opts);
    let t0 = Instant::now();
    let mut report = Report::default();
    let machine = system::Machine::probe();
    // Other work on the machine skews every figure: say how busy it was.
    if let Some(busy) = tokio::task::block_in_place(|| system::machine_busy(Duration::from_millis(500))) {
        report.num("machine_busy_before_pct", busy);
        if busy > 20.0 {
            eprintln!("warning: the machine was {busy:.0}% busy before the run; figures will be skewed");
        }
    }
    report.text("mode", opts.mode.as_str());
    report.int("machine_nproc", machine.nproc as u64);
    report.text("machine_cpu_model", &machine.cpu_model);
    report.int("machine_mem_total_kb", machine.mem_total_kb);
    report.int("clusters", plan.clusters.into());
    report.int("servers_per_cluster", plan.servers.into());
    report.int("failover_heartbeat_ms", plan.heartbeat.as_millis() as u64);
    report.int("failover_missed_heartbeats", plan.missed.into());
    report.int("failover_detection_bound_ms", (plan.heartbeat * plan.missed).as_millis() as u64);
    let node_bin = opts.bin_dir.join("sns-node");
    if !node_bin.is_file() {
        return Err(anyhow!(
            "{} is missing: build the workspace's binaries first (cargo build --release --workspace --bins)",
            node_bin.display()
        ));
    }
    let builder = |name: String| {
        Deployment::builder()
            .clusters(plan.clusters)
            .servers(plan.servers)
            .heartbeat(plan.heartbeat)
            .missed_heartbeats(plan.missed)
            .name(&name)
            .node_bin(node_bin.clone())
            .log(opts.log.as_deref())
    };
    let amqp = crate::amqp_url();
    let name = format!("bench-{}", std::process::id());
    report.text("deployment", &name);

    progress(t0, &format!("starting deployment {name} (heartbeat {:?} x {})", plan.heartbeat, plan.missed));
    let mut d = tokio::task::block_in_place(|| builder(name.clone()).start()).context("starting the deployment")?;
    let mut startup = Startups::default();
    startup.add(&d)?;
    let coord = Coord::connect(d.coord_port).await?;
    let main = Main { t0, plan: &plan, opts, coord: &coord, clock: Clock::new(), amqp: &amqp };
    main.all(&mut d, &mut report, &node_bin).await;
    let (clusters, servers) = (d.clusters, d.servers);
    tokio::task::block_in_place(|| drop(d));
    if let Err(e) = baseline::delete_deployment_objects(&amqp, &name, clusters).await {
        eprintln!("warning: could not delete {name}'s broker objects: {e:#}");
    }
    progress(t0, "deployment stopped");
    for i in 1..plan.startups {
        progress(t0, &format!("start-up {} of {}", i + 1, plan.startups));
        let extra = format!("{name}-s{i}");
        let d = tokio::task::block_in_place(|| builder(extra.clone()).start());
        match d {
            Ok(d) => {
                startup.add(&d)?;
                tokio::task::block_in_place(|| drop(d));
                baseline::delete_deployment_objects(&amqp, &extra, clusters).await.ok();
            }
            Err(e) => report.error("startup", &e),
        }
    }
    startup.report(&mut report, (clusters * servers * 2 + 1).into());
    scale(&plan, &builder, &amqp, &name, t0, &mut report).await;
    progress(t0, "done");
    report.total_deliveries();
    derive_ratios(&mut report);
    Ok(report)
}

/// Cost of a post as the deployment grows (see [`scale`](self::scale)).
async fn scale(
    plan: &Plan,
    builder: &impl Fn(String) -> crate::DeploymentBuilder,
    amqp: &str,
    name: &str,
    t0: Instant,
    report: &mut Report,
) {
    let mut per_post = Vec::new();
    for &n in plan.scale_clusters {
        progress(t0, &format!("scale: {n} clusters of one server"));
        let deployment = format!("{name}-x{n}");
        match scale::measure(builder(deployment.clone()), n, plan.scale_posts, plan.catchup_budget * 4).await {
            Ok(s) => {
                report.num(&format!("scale_{n}_deliveries_per_post"), s.deliveries_per_post);
                report.num(&format!("scale_{n}_remote_applies_per_post"), s.remote_applies_per_post);
                per_post.push((s.deliveries_per_post, s.remote_applies_per_post));
            }
            Err(e) => report.error(&format!("scale_{n}"), &e),
        }
        baseline::delete_deployment_objects(amqp, &deployment, n).await.ok();
    }
    if per_post.len() == plan.scale_clusters.len() && !per_post.is_empty() {
        // Flat: every size within 5% of the smallest deployment's figures.
        let (d0, a0) = per_post[0];
        let flat =
            per_post.iter().all(|(d, a)| (d - d0).abs() <= 0.05 * d0.max(1.0) && (a - a0).abs() <= 0.05 * a0.max(1.0));
        report.int("scale_flat", u64::from(flat));
        report.int("scale_clusters_max", plan.scale_clusters.iter().copied().max().unwrap_or(0).into());
    }
}

/// Start-up figures over every deployment the run started.
#[derive(Default)]
struct Startups {
    launcher: Samples,
    wall: Samples,
}

impl Startups {
    fn add(&mut self, d: &Deployment) -> Result<()> {
        // "ready: 3 clusters x 2 servers in 310 ms; ..."
        let reported: f64 = d
            .ready_line
            .split(" in ")
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow!("no start-up time in {:?}", d.ready_line))?;
        self.launcher.push(reported);
        self.wall.push(ms(d.spawn_to_ready));
        Ok(())
    }

    fn report(&mut self, r: &mut Report, processes: u64) {
        r.int("startup_runs", self.wall.len() as u64);
        r.int("startup_processes", processes);
        if let Some(v) = self.launcher.median() {
            r.num("startup_ms", v);
        }
        if let Some(v) = self.wall.median() {
            r.num("startup_wall_ms", v);
        }
        if let Some(v) = self.wall.max() {
            r.num("startup_wall_max_ms", v);
        }
    }
}

struct Main<'a> {
    t0: Instant,
    plan: &'a Plan,
    opts: &'a Options,
    coord: &'a Coord,
    clock: Clock,
    amqp: &'a str,
}

/// Users 1..=N (one per cluster) probe idle latency; N+1..=2N measure
/// follow visibility and are the failover clients; the load generator's
/// users come after them.
fn probe_ids(clusters: u32) -> Vec<u32> {
    (1..=clusters).collect()
}

fn follow_ids(clusters: u32) -> Vec<u32> {
    (clusters + 1..=2 * clusters).collect()
}

impl Main<'_> {
    async fn all(&self, d: &mut Deployment, r: &mut Report, node_bin: &std::path::Path) {
        let settled = Instant::now() + Duration::from_secs(1);
        progress(self.t0, "baselines: gRPC, fsync, broker");
        // Each baseline bounds itself; this bounds what none of them can
        // (a broker call that never returns), so the run still ends.
        match tokio::time::timeout(BASELINES_LIMIT, self.baselines(d, r, node_bin)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => r.error("baseline", &e),
            Err(_) => r.error("baseline", &anyhow!("the baselines did not finish within {BASELINES_LIMIT:?}")),
        }
        // Idle RSS: after start-up has settled, before any user exists.
        tokio::time::sleep_until(settled.into()).await;
        match measure::node_memory(d) {
            Ok(mem) => memory_report(r, "idle", &mem),
            Err(e) => r.error("idle_rss", &e),
        }
        progress(self.t0, "idle post latency");
        if let Err(e) = self.idle_latency(r).await {
            r.error("cross_cluster_post", &e);
        }
        progress(self.t0, "follow visibility");
        let mut follow_users = match self.follow_visibility(r).await {
            Ok(users) => users,
            Err(e) => {
                r.error("follow_visible", &e);
                Vec::new()
            }
        };
        // Before the load, so the cluster holds the posts this measure
        // wrote and few others.
        progress(self.t0, &format!("catch-up of a rejoining slave ({} posts)", self.plan.catchup_posts));
        if let Err(e) = self.catchup(d, r).await {
            r.error("catchup", &e);
        }
        if let Err(e) = self.load(d, r).await {
            r.error("load", &e);
        }
        // Memory once the load is over (users, relations and posts held).
        tokio::time::sleep(Duration::from_millis(500)).await;
        match measure::node_memory(d) {
            Ok(mem) => memory_report(r, "loaded", &mem),
            Err(e) => r.error("loaded_rss", &e),
        }
        progress(self.t0, "failover");
        if let Err(e) = self.failover(d, r, &mut follow_users).await {
            r.error("failover", &e);
        }
        // A measure that failed leaves the deployment's files and logs
        // behind (their path is printed when it stops): the evidence.
        if !r.errors().is_empty() {
            d.keep();
        }
    }

    async fn baselines(&self, d: &mut Deployment, r: &mut Report, node_bin: &std::path::Path) -> Result<()> {
        let p = self.plan;
        let mut grpc = baseline::grpc_unary(&self.coord.addr, p.grpc_calls, Duration::from_secs(5)).await?;
        r.percentiles("grpc_unary_baseline", "us", &mut grpc);
        let mut fsync = baseline::fsync_append(d.dir(), p.fsync_appends, Duration::from_secs(10))?;
        r.percentiles("fsync_append_baseline", "us", &mut fsync);
        let prefix = format!("sns-bench-{}", std::process::id());
        let budget = Duration::from_secs(30);
        // Each broker baseline within its own bound, so a broker call that
        // never returns is named (the baselines' overall limit says only
        // that one of them did not end).
        let bound = budget + Duration::from_secs(30);
        let raw = bounded("the raw single-message baseline", bound, async {
            baseline::broker_rate(self.amqp, &prefix, 1, p.broker_msgs, budget).await
        })
        .await?;
        r.num("broker_baseline_msgs_per_s", raw.msgs_per_s);
        r.int("broker_baseline_messages", raw.messages as u64);
        let fan = bounded("the 4-way fan-out baseline", bound, async {
            baseline::broker_rate(self.amqp, &prefix, 4, p.broker_fanout_msgs, budget).await
        })
        .await?;
        r.num("broker_fanout4_baseline_msgs_per_s", fan.msgs_per_s);
        let pattern = sync_baseline::Pattern {
            clusters: p.clusters,
            events: p.sync_events,
            publish_budget: p.sync_publish_budget,
            drain: Duration::from_secs(10),
        };
        let sync_bound = pattern.publish_budget + pattern.drain + Duration::from_secs(30);
        let sync = bounded("the synchronizers' pattern", sync_bound, sync_baseline::run(self.amqp, &prefix, pattern))
            .await
            .context("the synchronizers' pattern")?;
        r.num("broker_sync_baseline_events_per_s", sync.events_per_s);
        r.int("broker_sync_baseline_events", sync.events as u64);
        r.int("broker_sync_baseline_messages", sync.messages as u64);
        r.int("broker_sync_baseline_queues_per_message", sync.queues_per_message as u64);
        r.int("broker_sync_baseline_deliveries", sync.deliveries as u64);
        let mut hop = bounded("the broker hop baseline", Duration::from_secs(40), async {
            baseline::broker_latency(self.amqp, &prefix, p.broker_latency_msgs, Duration::from_secs(10)).await
        })
        .await?;
        r.percentiles("broker_latency_baseline", "us", &mut hop);
        let mut spawn = baseline::process_spawn(node_bin, 5)?;
        r.percentiles("process_spawn_baseline", "ms", &mut spawn);
        Ok(())
    }

    /// One post at a time between the probes, each following the others.
    async fn idle_latency(&self, r: &mut Report) -> Result<()> {
        let n = self.plan.clusters;
        let ids = probe_ids(n);
        let mut users = measure::login_all(self.coord, &ids).await?;
        measure::wait_users_known(&mut users, &ids, n, Duration::from_secs(10)).await?;
        let edges: Vec<(u32, u32)> =
            ids.iter().flat_map(|&a| ids.iter().filter(move |&&b| b != a).map(move |&b| (a, b))).collect();
        measure::follow_all(&users, &edges).await?;
        let followers = followers_of(&edges);
        let mut s = measure::open_streams(&mut users, followers, self.clock, 64).await?;
        let mut t = load::idle(
            &mut s,
            &ids,
            self.plan.idle_posts,
            2 * ids.len(),
            Duration::from_millis(10),
            self.plan.idle_budget,
            n,
        )
        .await?;
        r.percentiles("cross_cluster_post", "ms", &mut t.cross);
        if !t.ack.is_empty() {
            r.percentiles("post_ack", "ms", &mut t.ack);
        }
        deliveries_report(r, "idle", &t);
        t.verify("idle posts")
    }

    /// A cluster's slave killed and started again once the cluster holds
    /// `catchup_posts` posts; its own users (after the load generator's).
    async fn catchup(&self, d: &mut Deployment, r: &mut Report) -> Result<()> {
        let p = self.plan;
        let n = p.clusters;
        let first = 2 * n + p.load_users + 1;
        let ids: Vec<u32> = (first..first + 2 * n).collect();
        let plan = catchup::Plan {
            cluster: 1,
            posts: p.catchup_posts,
            extra: p.catchup_extra,
            write_budget: p.catchup_budget,
            drain: p.drain,
            rejoin_budget: p.per_kill,
        };
        let c = catchup::measure(d, self.coord, self.clock, &ids, plan).await?;
        deliveries_report(r, "catchup_fill", &c.fill);
        deliveries_report(r, "catchup_down", &c.down);
        r.num("catchup_ms", c.ms);
        r.int("catchup_posts", c.master_posts);
        r.int("catchup_posts_written_before", c.fill.completed as u64);
        r.int("catchup_posts_written_while_down", c.down.completed as u64);
        r.text("catchup_server", &c.server);
        match c.snapshot {
            Some(s) => {
                r.int("catchup_snapshot_bytes", s.bytes);
                r.int("catchup_snapshot_posts", s.posts);
                r.num("catchup_snapshot_ms", s.ms as f64);
            }
            None => progress(self.t0, "catch-up: the master logged no `slave caught up` line; no snapshot size"),
        }
        Ok(())
    }

    async fn follow_visibility(&self, r: &mut Report) -> Result<Vec<User>> {
        let n = self.plan.clusters;
        let ids = follow_ids(n);
        let mut users = measure::login_all(self.coord, &ids).await?;
        measure::wait_users_known(&mut users, &ids, n, Duration::from_secs(10)).await?;
        let mut f =
            measure::follow_visible(&users, n, self.plan.follows, Duration::from_millis(1), self.plan.follow_budget)
                .await?;
        r.percentiles("follow_visible", "ms", &mut f.visible);
        r.percentiles("follow_ack", "ms", &mut f.ack);
        r.percentiles("unfollow_visible", "ms", &mut f.unfollow_visible);
        Ok(users)
    }

    /// The load generator: many users, each following several others in
    /// every cluster, all timeline streams open; first the maximum
    /// sustained rate, then latency at a controlled rate below it.
    async fn load(&self, d: &mut Deployment, r: &mut Report) -> Result<()> {
        let p = self.plan;
        let n = p.clusters;
        let first = 2 * n + 1;
        let ids: Vec<u32> = (first..first + p.load_users).collect();
        progress(self.t0, &format!("load: {} users, {} follows each", p.load_users, p.load_follows));
        let t0 = Instant::now();
        let mut users = measure::login_all(self.coord, &ids).await?;
        measure::wait_users_known(&mut users, &ids, n, Duration::from_secs(30)).await?;
        // User i follows the next `load_follows` users: consecutive ids
        // are in consecutive clusters, so most followees are remote.
        let u = ids.len();
        let edges: Vec<(u32, u32)> = (0..u)
            .flat_map(|i| (1..=p.load_follows as usize).map(move |k| (i, (i + k) % u)))
            .map(|(a, b)| (ids[a], ids[b]))
            .collect();
        measure::follow_all(&users, &edges).await?;
        let followers = followers_of(&edges);
        let mut s = measure::open_streams(&mut users, followers, self.clock, 64).await?;
        r.num("load_setup_ms", ms(t0.elapsed()));
        r.int("load_users", u as u64);
        r.int("load_follows_per_user", p.load_follows.into());
        let cross_edges = edges.iter().filter(|(a, b)| cluster_of(*a, n) != cluster_of(*b, n)).count();
        r.int("load_cross_cluster_follows", cross_edges as u64);

        // Maximum rate, closed loop: two posts in flight per user keep
        // every stream and every cluster's write path busy.
        let pids = measure::node_pids(d)?;
        let mut watched = pids.clone();
        if let Some(pid) = system::broker_pid() {
            watched.insert("broker".into(), pid);
        }
        watched.insert("bench".into(), std::process::id());
        progress(self.t0, &format!("load: maximum rate for {:?}", p.max_rate_time));
        let ports = d.ports()?;
        let writers = system::WriterSnapshot::take(&ports);
        let before = system::CpuSnapshot::take(&watched);
        let mut t = load::max_rate(&mut s, &ids, 2 * u, 1_000_000, p.max_rate_time, p.drain, n).await?;
        let after = system::CpuSnapshot::take(&watched);
        cpu_report(r, "max_rate_cpu", &before, &after);
        writer_report(r, "max_rate", &writers, &system::WriterSnapshot::take(&ports));
        let rate = t.rate();
        r.num("posts_per_s", rate);
        r.num("deliveries_per_s", t.delivery_rate());
        r.int("max_rate_posts", t.completed as u64);
        r.int("max_rate_incomplete_posts", t.outstanding() as u64);
        deliveries_report(r, "max_rate", &t);
        r.percentiles("max_rate_cross_cluster_post", "ms", &mut t.cross);
        r.percentiles("max_rate_same_cluster_post", "ms", &mut t.same);
        if !t.ack.is_empty() {
            r.percentiles("max_rate_post_ack", "ms", &mut t.ack);
        }
        t.verify("maximum-rate run")?;

        // Controlled rates: latency under load, below saturation.
        let targets: Vec<(String, f64)> = match self.opts.rate {
            Some(rate) => vec![("loaded".into(), rate)],
            None => p
                .loaded_fractions
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let last = i + 1 == p.loaded_fractions.len();
                    let prefix = if last { "loaded".into() } else { format!("loaded_{:.0}pct", f * 100.0) };
                    (prefix, (rate * f).max(1.0))
                })
                .collect(),
        };
        for (prefix, target) in targets {
            progress(self.t0, &format!("load: {target:.0} posts/s for {:?}", p.loaded_time));
            let budget = (target * 5.0) as usize + 2 * u;
            let writers = system::WriterSnapshot::take(&ports);
            let before = system::CpuSnapshot::take(&watched);
            let (mut t, overloaded) = load::fixed_rate(&mut s, &ids, target, p.loaded_time, p.drain, budget, n).await?;
            let after = system::CpuSnapshot::take(&watched);
            cpu_report(r, &format!("{prefix}_cpu"), &before, &after);
            writer_report(r, &prefix, &writers, &system::WriterSnapshot::take(&ports));
            r.num(&format!("{prefix}_rate_posts_per_s"), target);
            r.num(&format!("{prefix}_achieved_posts_per_s"), t.rate());
            r.int(&format!("{prefix}_posts"), t.completed as u64);
            r.int(&format!("{prefix}_overloaded"), u64::from(overloaded));
            deliveries_report(r, &prefix, &t);
            r.percentiles(&format!("{prefix}_cross_cluster_post"), "ms", &mut t.cross);
            r.percentiles(&format!("{prefix}_same_cluster_post"), "ms", &mut t.same);
            if !t.ack.is_empty() {
                r.percentiles(&format!("{prefix}_post_ack"), "ms", &mut t.ack);
            }
            t.verify(&format!("controlled-rate run at {target:.0} posts/s"))?;
        }
        Ok(())
    }

    async fn failover(&self, d: &mut Deployment, r: &mut Report, clients: &mut [User]) -> Result<()> {
        let p = self.plan;
        if clients.len() < p.clusters as usize {
            return Err(anyhow!("no failover clients (the follow measure failed)"));
        }
        // A crashed master's connections reset at once; each try may wait
        // up to a second (it never needs to).
        let mut f = measure::failover(
            d,
            self.coord,
            clients,
            measure::Fault::Kill,
            p.kills,
            Duration::from_secs(1),
            p.per_kill,
            p.failover_budget,
        )
        .await?;
        r.int("failover_kills", f.outage.len() as u64);
        if let Some(v) = f.outage.median() {
            r.num("failover_outage_median_ms", v);
        }
        if let Some(v) = f.outage.min() {
            r.num("failover_outage_min_ms", v);
        }
        r.percentiles("failover_outage", "ms", &mut f.outage);
        r.percentiles("failover_rejoin", "ms", &mut f.rejoin);
        r.int("failover_client_attempts", f.attempts as u64);
        r.int("failover_non_success_replies", f.non_success as u64);
        if p.switchovers > 0 {
            progress(self.t0, "failover: planned switchovers");
            let mut s = measure::failover(
                d,
                self.coord,
                clients,
                measure::Fault::Switchover,
                p.switchovers,
                Duration::from_secs(1),
                p.per_kill,
                p.failover_budget,
            )
            .await?;
            r.int("switchover_count", s.outage.len() as u64);
            if let Some(v) = s.outage.median() {
                r.num("switchover_outage_median_ms", v);
            }
            r.percentiles("switchover_outage", "ms", &mut s.outage);
            r.percentiles("switchover_rejoin", "ms", &mut s.rejoin);
            r.int("switchover_non_success_replies", s.non_success as u64);
        }
        if p.pauses == 0 {
            return Ok(());
        }
        progress(self.t0, "failover: hung masters");
        // A hung master keeps its connections open: the client's try times
        // out (100 ms, the resolution of this figure) and only the missed
        // heartbeats get it replaced.
        let mut h = measure::failover(
            d,
            self.coord,
            clients,
            measure::Fault::Pause,
            p.pauses,
            Duration::from_millis(100),
            p.per_kill,
            p.failover_budget,
        )
        .await?;
        r.int("hang_pauses", h.outage.len() as u64);
        if let Some(v) = h.outage.median() {
            r.num("hang_outage_median_ms", v);
        }
        r.percentiles("hang_outage", "ms", &mut h.outage);
        r.percentiles("hang_rejoin", "ms", &mut h.rejoin);
        r.int("hang_non_success_replies", h.non_success as u64);
        Ok(())
    }
}

/// `<prefix>_duplicate_deliveries` and `_lost_deliveries` of a phase.
fn deliveries_report(r: &mut Report, prefix: &str, t: &load::Tracker) {
    r.int(&format!("{prefix}_deliveries"), t.deliveries as u64);
    r.int(&format!("{prefix}_duplicate_deliveries"), t.duplicates as u64);
    r.int(&format!("{prefix}_lost_deliveries"), t.missing_deliveries() as u64);
}

/// author -> followers, from (follower, followee) edges.
pub(crate) fn followers_of(edges: &[(u32, u32)]) -> HashMap<u32, Vec<u32>> {
    let mut m: HashMap<u32, Vec<u32>> = HashMap::new();
    for &(f, g) in edges {
        m.entry(g).or_default().push(f);
    }
    m
}

fn role(name: &str) -> &str {
    match name.split('-').next() {
        Some("server") => "server",
        Some("sync") => "sync",
        Some(other) => other,
        None => name,
    }
}

/// `<prefix>_rss_kb_max` over node processes (the launcher apart), and for
/// the largest process of each role its RSS and what it is made of
/// (anonymous memory, mapped files) and its thread count.
fn memory_report(r: &mut Report, prefix: &str, mem: &BTreeMap<String, system::Memory>) {
    let mut by_role: BTreeMap<&str, system::Memory> = BTreeMap::new();
    for (name, m) in mem {
        let e = by_role.entry(role(name)).or_default();
        if m.rss_kb > e.rss_kb {
            *e = *m;
        }
    }
    let nodes_max = mem.iter().filter(|(n, _)| n.as_str() != "launcher").map(|(_, m)| m.rss_kb).max();
    if let Some(max) = nodes_max {
        r.int(&format!("{prefix}_rss_kb_max"), max);
    }
    for (role, m) in by_role {
        let suffix = match role {
            "coordinator" | "launcher" => role.to_string(),
            _ => format!("{role}_max"),
        };
        r.int(&format!("{prefix}_rss_kb_{suffix}"), m.rss_kb);
        r.int(&format!("{prefix}_pss_kb_{suffix}"), m.pss_kb);
        r.int(&format!("{prefix}_anon_kb_{suffix}"), m.anon_kb);
        r.int(&format!("{prefix}_file_kb_{suffix}"), m.file_kb);
        r.int(&format!("{prefix}_threads_{suffix}"), m.threads);
    }
}

/// CPU use (percent of one core) per role (the sum over its processes) and
/// the machine's busy percent, between two snapshots.
fn cpu_report(r: &mut Report, prefix: &str, before: &system::CpuSnapshot, after: &system::CpuSnapshot) {
    let (machine, procs) = before.usage(after);
    if let Some(m) = machine {
        r.num(&format!("{prefix}_machine_busy_pct"), m);
    }
    let mut by_role: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, pct) in &procs {
        *by_role.entry(role(name)).or_default() += pct;
    }
    for (role, pct) in by_role {
        r.num(&format!("{prefix}_{role}_pct"), pct);
    }
}

/// How the servers' writers spent a phase (see `sns_commit_wait_seconds`
/// and `sns_commit_cycle_seconds`): the wait is what overlapping commits
/// could at most take off each commit a write goes through.
fn writer_report(r: &mut Report, prefix: &str, before: &system::WriterSnapshot, after: &system::WriterSnapshot) {
    let Some(u) = before.usage(after) else { return };
    r.num(&format!("{prefix}_commit_wait_mean_ms"), u.wait_mean_ms);
    r.num(&format!("{prefix}_commit_cycle_mean_ms"), u.cycle_mean_ms);
    r.num(&format!("{prefix}_commit_groups_per_s"), u.groups_per_s);
    r.num(&format!("{prefix}_commit_writes_per_group"), u.writes_per_group);
    r.num(&format!("{prefix}_commit_busy_pct"), u.busy_pct);
}

/// The ratios of each SNS figure to its baseline.
fn derive_ratios(r: &mut Report) {
    let mut out: Vec<(&str, f64)> = Vec::new();
    let g = |k: &str| r.get(k);
    // Every cross-cluster post (and follow) takes at least, one after the
    // other: the client's gRPC hop to its master; a durable commit there
    // (fsync), then on its slave (a gRPC hop and an fsync: a write is
    // forwarded only once durable on the master); a broker hop with
    // persistence; the synchronizer's gRPC call to the other cluster's
    // master, whose commit is durable there and on its slave (an fsync, a
    // gRPC hop, an fsync) before the post is visible (reads show committed
    // state only). Four gRPC hops, four fsyncs and a broker hop.
    if let (Some(grpc), Some(fsync), Some(hop)) =
        (g("grpc_unary_baseline_p50_us"), g("fsync_append_baseline_p50_us"), g("broker_latency_baseline_p50_us"))
    {
        let floor = (4.0 * grpc + 4.0 * fsync + hop) / 1000.0;
        out.push(("post_path_floor_ms", floor));
        // A client write: its gRPC hop, the master's fsync, then the
        // forward to the slave (a gRPC hop and the slave's fsync).
        out.push(("client_write_floor_ms", (2.0 * grpc + 2.0 * fsync) / 1000.0));
        for (fig, key) in [
            ("cross_cluster_post_p50_ms", "cross_cluster_post_vs_floor_ratio"),
            ("loaded_cross_cluster_post_p50_ms", "loaded_cross_cluster_post_vs_floor_ratio"),
            ("follow_visible_p50_ms", "follow_visible_vs_floor_ratio"),
        ] {
            if let Some(v) = g(fig) {
                out.push((key, v / floor));
            }
        }
        if let Some(v) = g("follow_ack_p50_ms") {
            out.push(("follow_ack_vs_floor_ratio", v / ((2.0 * grpc + 2.0 * fsync) / 1000.0)));
        }
        // How many posts one fsync-time buys: ~1 means one fsync per post
        // on the critical path, serialized.
        if let Some(v) = g("posts_per_s") {
            out.push(("posts_per_fsync_time", v * fsync / 1e6));
        }
    }
    // Like for like: a post is one event through the synchronizers'
    // pattern (batched messages fanned out to every other cluster's queues).
    if let (Some(p), Some(b)) = (g("posts_per_s"), g("broker_sync_baseline_events_per_s")) {
        out.push(("posts_vs_broker_sync_ratio", p / b));
    }
    // Raw: single small messages, one per event, through one queue.
    if let (Some(p), Some(b)) = (g("posts_per_s"), g("broker_baseline_msgs_per_s")) {
        out.push(("posts_vs_broker_ratio", p / b));
    }
    if let (Some(p), Some(b)) = (g("posts_per_s"), g("broker_fanout4_baseline_msgs_per_s")) {
        out.push(("posts_vs_broker_fanout4_ratio", p / b));
    }
    if let (Some(o), Some(b)) = (g("failover_outage_median_ms"), g("failover_detection_bound_ms")) {
        out.push(("failover_vs_detection_ratio", o / b));
    }
    if let (Some(o), Some(b)) = (g("hang_outage_median_ms"), g("failover_detection_bound_ms")) {
        out.push(("hang_vs_detection_ratio", o / b));
    }
    // The launcher is the same binary with a runtime and no service: what
    // any node costs before doing anything.
    if let (Some(m), Some(b)) = (g("idle_rss_kb_max"), g("idle_rss_kb_launcher")) {
        out.push(("idle_rss_vs_launcher_ratio", m / b));
    }
    if let (Some(s), Some(n), Some(spawn)) =
        (g("startup_wall_ms"), g("startup_processes"), g("process_spawn_baseline_p50_ms"))
    {
        out.push(("startup_vs_spawn_ratio", s / (n * spawn)));
    }
    for (k, v) in out {
        r.num(k, v);
    }
}

/// `work`, or an error naming `what` if it has not ended within `limit`.
async fn bounded<T>(what: &str, limit: Duration, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, work).await.map_err(|_| anyhow::anyhow!("{what} did not end within {limit:?}"))?
}
