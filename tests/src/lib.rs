//! Harness for the end-to-end suites: a whole deployment started through
//! the real local launcher (`sns-node local`) on free loopback ports against
//! the real RabbitMQ broker, and real `tsc` processes driven through pipes.
//!
//! Nothing here sleeps to wait: every expectation polls with a deadline.
//! The binaries are the workspace's own (`cargo build --workspace` first);
//! `SNS_BIN_DIR` points elsewhere if needed.

pub mod bench;
pub mod broker;
pub mod disk;
pub mod load;
pub mod metrics;
pub mod nodes;
pub mod pty;
pub mod secret;

use anyhow::{Context, Result, anyhow, bail};
use sns_node::topology;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any single expectation may take. Propagation is event-driven
/// (milliseconds); failover here is bounded by the 500 ms heartbeat used in
/// the suites, so 10 s is a generous bound, not a wait.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two polls of a condition that has no event to wait on.
const POLL: Duration = Duration::from_millis(50);

/// Directory holding `sns-node` and `tsc`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SNS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Records that the calling test could not run, for a reason the README
/// documents as a permitted skip, and says why on stderr. `scripts/test.sh`
/// sets `SNS_SKIP_LOG`: every skip is one line there, counted in its final
/// summary (`N passed, N failed, N skipped`), so a skip never passes
/// silently as a success. A test that cannot run for any other reason must
/// fail instead.
/// xorshift64*: small, seedable, good enough to pick faults (the fault
/// schedules) and what a hostile client replays (`broker::Replayer`): a
/// seed replays the same choices.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("SNS_SKIP_LOG") {
        let line = format!("{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot record the skip of {test} in {}: {e}", Path::new(&path).display());
        }
    }
}

/// A process started by a test, killed (and reaped) however the test
/// ends, a failed assertion included.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` until it returns Some, or fails after `DEADLINE`.
pub fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> Result<T> {
    eventually_within(what, DEADLINE, check)
}

/// [`eventually`] with a deadline of `limit`.
pub fn eventually_within<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// A growing text buffer filled by a reader thread.
#[derive(Clone, Default)]
struct Output(Arc<(Mutex<(String, bool)>, Condvar)>);

impl Output {
    fn spawn_reader(mut src: impl Read + Send + 'static) -> Output {
        let out = Output::default();
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = src.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*o.0;
                let mut g = lock.lock().unwrap();
                if n == 0 {
                    g.1 = true;
                    cv.notify_all();
                    return;
                }
                g.0.push_str(&String::from_utf8_lossy(&buf[..n]));
                cv.notify_all();
            }
        });
        out
    }

    fn text(&self) -> String {
        self.0.0.lock().unwrap().0.clone()
    }

    fn closed(&self) -> bool {
        self.0.0.lock().unwrap().1
    }

    /// Waits until `pred(text)` holds (woken by new output), up to `deadline`.
    fn wait(&self, deadline: Instant, mut pred: impl FnMut(&str) -> bool) -> bool {
        let (lock, cv) = &*self.0;
        let mut g = lock.lock().unwrap();
        loop {
            if pred(&g.0) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || g.1 {
                return pred(&g.0);
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Settings of a deployment started by [`DeploymentBuilder::start`]. The
/// defaults are those of [`Deployment::start`]: 3 clusters of 2 servers, a
/// 500 ms heartbeat with 2 misses allowed, `info` logs, broker queues that
/// expire 10 minutes after the run, the workspace's `sns-node`.
#[derive(Debug, Clone)]
pub struct DeploymentBuilder {
    clusters: u32,
    servers: u32,
    heartbeat: Duration,
    missed: u32,
    name: Option<String>,
    node_bin: Option<PathBuf>,
    log: Option<String>,
    ready_timeout: Duration,
    /// Servers whose data directory is a small tmpfs: (cluster, id, bytes).
    tmpfs: Vec<(u32, u32, u64)>,
    /// Servers whose data directory is a file system a test can freeze.
    freezable: Vec<(u32, u32)>,
    /// The coordinator's data directory is a tmpfs of this many bytes.
    coordinator_tmpfs: Option<u64>,
    /// Environment of the launcher, and so of every node.
    env: Vec<(String, String)>,
    /// The launcher's `--queue-type`, when not the default.
    queue_type: Option<String>,
    /// The launcher's `--tls`.
    tls: bool,
    /// Another broker URL than [`amqp_url`], and the CA it is checked
    /// against (`--amqp-ca`).
    broker: Option<(String, Option<PathBuf>)>,
}

/// The key of the coordinator's disk among the freezable ones (no server
/// is cluster 0).
const COORDINATOR_DISK: (u32, u32) = (0, 0);

impl Default for DeploymentBuilder {
    fn default() -> Self {
        DeploymentBuilder {
            clusters: 3,
            servers: 2,
            heartbeat: Duration::from_millis(500),
            missed: 2,
            name: None,
            node_bin: None,
            log: Some("info".into()),
            ready_timeout: Duration::from_secs(60),
            tmpfs: Vec::new(),
            freezable: Vec::new(),
            coordinator_tmpfs: None,
            env: Vec::new(),
            queue_type: None,
            tls: false,
            broker: None,
        }
    }
}

impl DeploymentBuilder {
    pub fn clusters(mut self, clusters: u32) -> Self {
        self.clusters = clusters;
        self
    }

    pub fn servers(mut self, servers: u32) -> Self {
        self.servers = servers;
        self
    }

    /// Heartbeat period of every node (the launcher's `--heartbeat-interval`).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// Heartbeats a node may miss before it is dead (`--missed-heartbeats`).
    pub fn missed_heartbeats(mut self, missed: u32) -> Self {
        self.missed = missed;
        self
    }

    /// The deployment name (broker object prefix) instead of `e2e-<pid>-<n>`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// The `sns-node` binary to run instead of the workspace's.
    pub fn node_bin(mut self, path: PathBuf) -> Self {
        self.node_bin = Some(path);
        self
    }

    /// The nodes' log filter (`SNS_LOG`); None leaves the system's default.
    pub fn log(mut self, filter: Option<&str>) -> Self {
        self.log = filter.map(str::to_string);
        self
    }

    /// How long to wait for the launcher's `ready:` line.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Puts server `id` of `cluster`'s data directory on a tmpfs of
    /// `bytes` (so a test can fill its disk). [`DeploymentBuilder::start`]
    /// fails with [`disk::MountRefused`] where mounting is not allowed.
    pub fn tmpfs(mut self, cluster: u32, id: u32, bytes: u64) -> Self {
        self.tmpfs.push((cluster, id, bytes));
        self
    }

    /// Puts the coordinator's data directory on a tmpfs of `bytes` (so a
    /// test can fill its disk); fails like [`DeploymentBuilder::tmpfs`].
    pub fn coordinator_tmpfs(mut self, bytes: u64) -> Self {
        self.coordinator_tmpfs = Some(bytes);
        self
    }

    /// Server (`cluster`, `id`) keeps its data on a loop-mounted ext4 that
    /// [`Deployment::freeze`] hangs. [`DeploymentBuilder::start`] fails with
    /// [`disk::MountRefused`] where mounting is not allowed.
    pub fn freezable(mut self, cluster: u32, id: u32) -> Self {
        self.freezable.push((cluster, id));
        self
    }

    /// The coordinator keeps its records on a loop-mounted ext4 that
    /// [`Deployment::freeze_coordinator`] hangs; fails like
    /// [`DeploymentBuilder::freezable`].
    pub fn freezable_coordinator(mut self) -> Self {
        self.freezable.push(COORDINATOR_DISK);
        self
    }

    /// Sets `var` to `value` for the launcher and every node it runs.
    pub fn env(mut self, var: &str, value: &str) -> Self {
        self.env.push((var.to_string(), value.to_string()));
        self
    }

    /// The type of the deployment's broker queues (`classic`, `quorum`).
    pub fn queue_type(mut self, queue_type: &str) -> Self {
        self.queue_type = Some(queue_type.to_string());
        self
    }

    /// TLS on every port and between every node (`--tls`).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// The broker at `url` (e.g. `amqps://...`), checked against `ca`.
    pub fn broker(mut self, url: &str, ca: Option<&Path>) -> Self {
        self.broker = Some((url.to_string(), ca.map(Path::to_path_buf)));
        self
    }

    /// Runs the launcher and waits for its `ready:` line.
    pub fn start(self) -> Result<Deployment> {
        let dir = tempfile::Builder::new().prefix("sns-e2e-").tempdir()?;
        let mut mounts = Vec::new();
        for &(cluster, id, bytes) in &self.tmpfs {
            mounts.push(disk::Tmpfs::mount(&topology::data_dir(dir.path(), cluster, id), bytes)?);
        }
        if let Some(bytes) = self.coordinator_tmpfs {
            mounts.push(disk::Tmpfs::mount(&topology::coordinator_dir(dir.path()), bytes)?);
        }
        let mut freezable = Vec::new();
        for &(cluster, id) in &self.freezable {
            let path = if (cluster, id) == COORDINATOR_DISK {
                topology::coordinator_dir(dir.path())
            } else {
                topology::data_dir(dir.path(), cluster, id)
            };
            let image = dir.path().join(format!("disk-{cluster}-{id}.img"));
            freezable.push(((cluster, id), disk::FreezableFs::mount(&path, &image, 64 << 20)?));
        }
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("e2e-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        let node_bin = self.node_bin.clone().unwrap_or_else(|| bin("sns-node"));
        let (clusters, servers) = (self.clusters, self.servers);
        let mut cmd = Command::new(node_bin);
        cmd.args(["local", "--base-port", "0", "--clusters", &clusters.to_string()])
            .args(["--servers-per-cluster", &servers.to_string(), "--deployment", &name])
            .args([
                "--heartbeat-interval",
                &format!("{}ms", self.heartbeat.as_millis()),
                "--missed-heartbeats",
                &self.missed.to_string(),
                "--queue-expires",
                "10m",
            ])
            .args(["--no-broker-start", "--amqp-url", &self.broker.as_ref().map_or_else(amqp_url, |b| b.0.clone())])
            .arg("--dir")
            .arg(dir.path())
            .arg("--secret-file")
            .arg(secret::file())
            // A test or bench killed mid-run leaves no deployment behind.
            .arg("--stop-on-stdin-eof");
        if let Some(filter) = &self.log {
            cmd.env("SNS_LOG", filter);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.tls {
            cmd.arg("--tls");
        }
        if let Some((_, Some(ca))) = &self.broker {
            cmd.arg("--amqp-ca").arg(ca);
        }
        if let Some(queue_type) = &self.queue_type {
            cmd.args(["--queue-type", queue_type]);
        }
        let spawned = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("launcher.log"))?))
            .spawn()
            .context("starting sns-node local")?;
        let stdin = child.stdin.take().expect("piped stdin");
        let out = Output::spawn_reader(child.stdout.take().expect("piped stdout"));
        let mut d = Deployment {
            child,
            stdin: Some(stdin),
            out,
            seen: 0,
            coord_port: 0,
            clusters,
            servers,
            name,
            dir,
            spawn_to_ready: Duration::ZERO,
            ready_line: String::new(),
            mounts,
            freezable,
            keep: false,
        };
        let deadline = Instant::now() + self.ready_timeout;
        if !d.out.wait(deadline, |t| t.contains("\nconnect a client")) {
            bail!("launcher not ready: {}\n{}", d.out.text(), d.launcher_log());
        }
        d.spawn_to_ready = spawned.elapsed();
        let text = d.out.text();
        d.ready_line = text.lines().find(|l| l.starts_with("ready:")).unwrap_or_default().to_string();
        let port = text
            .split("coordinator at 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no coordinator address in {text:?}"))?;
        d.coord_port = port;
        d.seen = text.lines().count();
        Ok(d)
    }
}

/// A deployment run by `sns-node local` in a temporary directory.
pub struct Deployment {
    child: Child,
    /// None once [`Deployment::end_input`] closed it.
    stdin: Option<ChildStdin>,
    out: Output,
    /// Lines of stdout already consumed by `command`.
    seen: usize,
    pub coord_port: u16,
    pub clusters: u32,
    pub servers: u32,
    pub name: String,
    dir: tempfile::TempDir,
    /// Wall time from spawning the launcher to reading its `ready:` line.
    pub spawn_to_ready: Duration,
    /// The launcher's `ready:` line (it reports its own start-up time).
    pub ready_line: String,
    /// Unmounted when the deployment is dropped, after its processes.
    mounts: Vec<disk::Tmpfs>,
    /// Thawed before its processes are stopped, unmounted after.
    freezable: Vec<((u32, u32), disk::FreezableFs)>,
    /// Keep the data directory when dropped (see [`Deployment::keep`]).
    keep: bool,
}

impl Deployment {
    /// Starts `clusters` clusters of `servers` servers, with a 500 ms
    /// heartbeat so that failover completes in about a second.
    pub fn start(clusters: u32, servers: u32) -> Result<Deployment> {
        Deployment::builder().clusters(clusters).servers(servers).start()
    }

    /// A deployment with more knobs than [`Deployment::start`] (whose
    /// settings are the builder's defaults).
    pub fn builder() -> DeploymentBuilder {
        DeploymentBuilder::default()
    }

    /// Keeps the data directory and logs when dropped (a check failed
    /// without a panic), and says where.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The launcher's process id.
    pub fn launcher_pid(&self) -> u32 {
        self.child.id()
    }

    /// Hangs server (`cluster`, `id`)'s disk (see
    /// [`DeploymentBuilder::freezable`]): every write to it blocks.
    pub fn freeze(&self, cluster: u32, id: u32) -> Result<()> {
        self.freezable_fs(cluster, id)?.freeze()
    }

    /// Ends [`Deployment::freeze`]: the blocked writes go on.
    pub fn thaw(&self, cluster: u32, id: u32) -> Result<()> {
        self.freezable_fs(cluster, id)?.thaw()
    }

    /// Hangs the coordinator's disk (see
    /// [`DeploymentBuilder::freezable_coordinator`]).
    pub fn freeze_coordinator(&self) -> Result<()> {
        self.freeze(COORDINATOR_DISK.0, COORDINATOR_DISK.1)
    }

    /// Ends [`Deployment::freeze_coordinator`].
    pub fn thaw_coordinator(&self) -> Result<()> {
        self.thaw(COORDINATOR_DISK.0, COORDINATOR_DISK.1)
    }

    fn freezable_fs(&self, cluster: u32, id: u32) -> Result<&disk::FreezableFs> {
        self.freezable
            .iter()
            .find(|(at, _)| *at == (cluster, id))
            .map(|(_, fs)| fs)
            .ok_or_else(|| anyhow!("server {cluster}/{id} has no freezable disk"))
    }

    /// Closes the launcher's standard input, as this process's death would.
    pub fn end_input(&mut self) {
        self.stdin = None;
    }

    /// The launcher's exit status, once it has exited.
    pub fn launcher_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Everything the launcher printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.out.text()
    }

    /// The launcher's `status` command, parsed: every process by name, with
    /// its pid when it is up.
    pub fn status(&mut self) -> Result<BTreeMap<String, Option<u32>>> {
        let line = self.status_line()?;
        let body = line.strip_prefix("status:").ok_or_else(|| anyhow!("unexpected status reply {line:?}"))?;
        // `name=up(pid 123, port 456)` or `name=down`.
        let mut procs = BTreeMap::new();
        let mut words = body.split_whitespace();
        while let Some(word) = words.next() {
            let Some((name, state)) = word.split_once('=') else {
                continue;
            };
            let pid =
                if state == "up(pid" { words.next().and_then(|w| w.trim_end_matches(',').parse().ok()) } else { None };
            procs.insert(name.to_string(), pid);
        }
        Ok(procs)
    }

    /// The ports (its own and its metrics port) of every process that is
    /// up, by name, from the launcher's `status` line.
    pub fn ports(&mut self) -> Result<BTreeMap<String, (u16, u16)>> {
        let line = self.status_line()?;
        // `name=up(pid 123, port 456, metrics 789)`
        let mut ports = BTreeMap::new();
        for part in line.trim_start_matches("status:").split(")") {
            let Some((name, rest)) = part.trim().split_once("=up(") else { continue };
            let number = |key: &str| {
                rest.split(", ").find_map(|w| w.strip_prefix(key)).and_then(|n| n.trim().parse::<u16>().ok())
            };
            let (Some(port), Some(metrics)) = (number("port "), number("metrics ")) else {
                bail!("unexpected status entry {part:?}");
            };
            ports.insert(name.to_string(), (port, metrics));
        }
        Ok(ports)
    }

    /// The launcher's `status` reply line. A line the launcher prints by
    /// itself (`... exited`) may follow the reply: the latest status line.
    fn status_line(&mut self) -> Result<String> {
        let reply = self.command("status")?;
        let text = self.out.text();
        Ok(text.lines().rev().find(|l| l.starts_with("status:")).unwrap_or(&reply).to_string())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn launcher_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("launcher.log")).unwrap_or_default()
    }

    /// Sends a launcher command (e.g. `kill master-2`) and returns its reply
    /// line; a reply that is an error is an `Err`.
    pub fn command(&mut self, line: &str) -> Result<String> {
        let reply = self.command_reply(line)?;
        if reply.starts_with("error:") {
            bail!("launcher: {reply}");
        }
        Ok(reply)
    }

    /// Sends a launcher command and returns its reply line, errors too.
    pub fn command_reply(&mut self, line: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("the launcher's input is closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let seen = self.seen;
        let deadline = Instant::now() + DEADLINE;
        let ok = self.out.wait(deadline, |t| {
            t.lines().skip(seen).any(|l| {
                l.starts_with("paused ")
                    || l.starts_with("resumed ")
                    || l.starts_with("killed ")
                    || l.starts_with("started ")
                    || l.starts_with("stopped ")
                    || l.starts_with("partitioned ")
                    || l.starts_with("healed ")
                    || l.starts_with("promoted ")
                    || l.starts_with("switched over")
                    || l.starts_with("error:")
                    || l.starts_with("status:")
                    || l.contains("; started ")
            })
        });
        let text = self.out.text();
        let reply: Vec<&str> = text.lines().skip(seen).collect();
        self.seen = text.lines().count();
        if !ok {
            bail!("no reply to {line:?}; got {reply:?}");
        }
        Ok(reply.last().copied().unwrap_or_default().to_string())
    }

    /// Sends a console line whose answer is not one reply line (`help`, an
    /// unknown command) and returns what the launcher printed from then on
    /// once `done` holds of it.
    pub fn console(&mut self, line: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("the launcher's input is closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let seen = self.seen;
        let after = |t: &str| t.lines().skip(seen).collect::<Vec<_>>().join("\n");
        let ok = self.out.wait(Instant::now() + DEADLINE, |t| done(&after(t)));
        let text = after(&self.out.text());
        self.seen += text.lines().count();
        if !ok {
            bail!("no complete answer to {line:?}; got {text:?}");
        }
        Ok(text)
    }

    /// Waits until the launcher has printed a line for which `pred` holds,
    /// at any time since it started; returns that line.
    pub fn wait_stdout_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + DEADLINE;
        if !self.out.wait(deadline, |t| t.lines().any(&pred)) {
            bail!("launcher never printed {what}; stdout:\n{}", self.out.text());
        }
        Ok(self.out.text().lines().find(|l| pred(l)).unwrap_or_default().to_string())
    }

    /// Data directory of server `id` of cluster `cluster`.
    pub fn server_dir(&self, cluster: u32, id: u32) -> PathBuf {
        topology::data_dir(self.dir.path(), cluster, id)
    }

    /// `sns-node switchover` of `cluster` (to server `to`, or to the one
    /// the coordinator picks) against this deployment's coordinator.
    pub fn switchover_command(&self, cluster: u32, to: Option<u32>) -> std::process::Command {
        let mut cmd = std::process::Command::new(bin("sns-node"));
        cmd.args([
            "switchover",
            "-h",
            "127.0.0.1",
            "-k",
            &self.coord_port.to_string(),
            "--cluster",
            &cluster.to_string(),
        ])
        .arg("--secret-file")
        .arg(secret::file());
        if let Some(to) = to {
            cmd.args(["--to", &to.to_string()]);
        }
        cmd
    }

    /// The coordinator's data directory.
    pub fn coordinator_dir(&self) -> PathBuf {
        topology::coordinator_dir(self.dir.path())
    }

    pub fn client(&self, user: &str) -> Result<Client> {
        Client::start(self.coord_port, user)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // A process blocked on a frozen disk cannot end, not even killed.
        for (_, fs) in &self.freezable {
            let _ = fs.thaw();
        }
        // SIGTERM: the launcher stops every node it started.
        #[allow(unsafe_code, reason = "kill(2) has no safe wrapper in std")]
        // SAFETY: kill takes plain integers.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let keep = self.keep || std::thread::panicking() || std::env::var_os("SNS_KEEP").is_some();
        if keep {
            // A tmpfs goes with its mount: copy what it holds beside it
            // (`<dir>.tmpfs`), the evidence of the server that ran there.
            let paths = self.mounts.iter().map(disk::Tmpfs::path).chain(self.freezable.iter().map(|(_, fs)| fs.path()));
            for path in paths {
                let copy = path.with_extension("tmpfs");
                if let Err(e) = copy_dir(path, &copy) {
                    eprintln!("could not keep {}: {e}", path.display());
                }
            }
        }
        self.mounts.clear();
        self.freezable.clear();
        if !keep {
            delete_broker_objects(&self.name, self.clusters);
        }
        if keep {
            let kept = self.dir.path().to_path_buf();
            eprintln!("deployment {} kept in {} (launcher stdout:\n{})", self.name, kept.display(), self.out.text());
            std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep());
        }
    }
}

/// Deletes a stopped deployment's broker objects (its queues would expire
/// after 10 minutes unused; its two exchanges never would), within 5 s and
/// saying nothing when the broker cannot be reached (a test stopped it): a
/// suite run on a long-lived broker leaves nothing behind.
fn delete_broker_objects(name: &str, clusters: u32) {
    let (name, url) = (name.to_string(), amqp_url());
    // Its own thread and runtime: a test's runtime may be the caller.
    let deleting = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        let delete = bench::baseline::delete_deployment_objects(&url, &name, clusters);
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), delete).await.ok()?.ok() })
    });
    let _ = deleting.join();
}

/// Copies the files of `from` (one level: a server's data directory) into
/// `to`.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A running `tsc`, fed through a pipe; its stdout is collected as lines
/// (the `Cmd> ` prompts, which have no newline, are stripped).
pub struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Output,
    err: Output,
    /// Lines already matched by `expect_line`.
    cursor: usize,
    pub user: String,
}

impl Client {
    pub fn start(coord_port: u16, user: &str) -> Result<Client> {
        Client::with_args(&["-h", "127.0.0.1", "-k", &coord_port.to_string(), "-u", user], user)
    }

    pub fn with_args(args: &[&str], user: &str) -> Result<Client> {
        let mut child = Command::new(bin("tsc"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tsc")?;
        let stdin = child.stdin.take();
        let out = Output::spawn_reader(child.stdout.take().expect("piped stdout"));
        let err = Output::spawn_reader(child.stderr.take().expect("piped stderr"));
        Ok(Client { child, stdin, out, err, cursor: 0, user: user.to_string() })
    }

    /// Every complete output line so far, prompts removed.
    pub fn lines(&self) -> Vec<String> {
        clean_lines(&self.out.text())
    }

    pub fn stderr(&self) -> String {
        self.err.text()
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow!("stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes stdin (end of input).
    pub fn close(&mut self) {
        self.stdin = None;
    }

    /// Waits for a line equal to `want` after the last matched one.
    pub fn expect_line(&mut self, want: &str) -> Result<()> {
        self.expect(want, |l| l == want)
    }

    /// Waits for a line matching `pred` after the last matched one and
    /// returns it.
    pub fn expect(&mut self, what: &str, mut pred: impl FnMut(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + DEADLINE;
        let cursor = self.cursor;
        let mut found = None;
        self.out.wait(deadline, |t| {
            let lines = clean_lines(t);
            found = lines.iter().skip(cursor).position(|l| pred(l)).map(|i| cursor + i + 1);
            found.is_some()
        });
        match found {
            Some(next) => {
                self.cursor = next;
                Ok(())
            }
            None => bail!(
                "user {}: no line {what:?} after line {cursor}; output:\n{}\nstderr:\n{}",
                self.user,
                self.lines().join("\n"),
                self.stderr()
            ),
        }
    }

    /// Runs a command and expects one result line.
    pub fn run(&mut self, cmd: &str, want: &str) -> Result<()> {
        self.send(cmd)?;
        self.expect_line(want)
    }

    /// Re-runs LIST until it shows exactly these users and followers.
    pub fn poll_list(&mut self, all: &[u32], followers: &[u32]) -> Result<()> {
        let want_all = format!("All users: {}", all.iter().map(|u| format!("{u}, ")).collect::<String>());
        let want_f = format!("Followers: {}", followers.iter().map(|u| format!("{u}, ")).collect::<String>());
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.send("LIST")?;
            self.expect("Followers: line", |l| l.starts_with("Followers: "))?;
            let lines = self.lines();
            let (a, f) = (&lines[self.cursor - 2], &lines[self.cursor - 1]);
            if *a == want_all && *f == want_f {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("user {}: LIST never showed {want_all:?} / {want_f:?}; last: {a:?} / {f:?}", self.user);
            }
            std::thread::sleep(POLL);
        }
    }

    /// The `tsc` process's pid (to pause it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a timeline line `<author> (<time>) >> <text>`.
    pub fn expect_post(&mut self, author: u32, text: &str) -> Result<()> {
        let (prefix, suffix) = (format!("{author} ("), format!(") >> {text}"));
        self.expect(&format!("{author} (...) >> {text}"), |l| l.starts_with(&prefix) && l.ends_with(&suffix))
    }

    /// Posts (timeline texts) shown so far, as (author, text).
    pub fn posts_seen(&self) -> Vec<(String, String)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let (head, text) = l.split_once(") >> ")?;
                let (author, _) = head.split_once(" (")?;
                Some((author.to_string(), text.to_string()))
            })
            .collect()
    }

    /// Waits for the process to exit and returns its code.
    pub fn wait_exit(&mut self) -> Result<i32> {
        self.close();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader threads drain what the process printed.
                self.out.wait(deadline, |_| false);
                self.err.wait(deadline, |_| false);
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                bail!("tsc for user {} did not exit", self.user);
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn is_done(&self) -> bool {
        self.out.closed()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clean_lines(text: &str) -> Vec<String> {
    let text = text.replace("Cmd> ", "");
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    lines.pop(); // the unfinished last line
    lines
}

/// Waits until each of `texts` (posts of user 1) is exactly once in user
/// 2's feed on both servers of cluster 2: the two-cluster suites' check
/// that posts crossed the broker.
pub fn feed_of_2_holds(d: &Deployment, texts: &[String], what: &str) -> Result<()> {
    feed_of_2_holds_within(d, texts, what, DEADLINE)
}

/// [`feed_of_2_holds`], polling for up to `limit`.
pub fn feed_of_2_holds_within(d: &Deployment, texts: &[String], what: &str, limit: Duration) -> Result<()> {
    let mut last = String::new();
    eventually_within(&format!("{what} in user 2's feed on both servers of cluster 2"), limit, || {
        for s in [1, 2] {
            let feed = feed_texts(&d.server_dir(2, s), 2, 1).ok()?;
            for text in texts {
                let n = feed.iter().filter(|t| *t == text).count();
                if n != 1 {
                    last = format!("server 2/{s}: {text:?} appears {n} times");
                    return None;
                }
            }
        }
        Some(())
    })
    .map_err(|e| anyhow!("{e}: {last}"))
}

/// The posts in `reader`'s feed file in the server directory `dir`, in
/// feed order.
pub fn feed_posts(dir: &Path, reader: u32) -> Result<Vec<sns_node::store::record::PostRecord>> {
    let files = spec_files(dir)?;
    Ok(sns_node::store::record::decode_posts(files.get(&format!("{reader}_following.txt")).map_or("", |t| t)))
}

/// The texts of `author`'s posts in `reader`'s feed (see [`feed_posts`]).
pub fn feed_texts(dir: &Path, reader: u32, author: u32) -> Result<Vec<String>> {
    Ok(feed_posts(dir, reader)?.into_iter().filter(|p| p.user == author).map(|p| p.text).collect())
}

/// The spec's files of one server directory, by name (`*.txt` only; the
/// journal and temporary files are ours).
pub fn spec_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".txt") && !name.starts_with('.') {
            files.insert(name, std::fs::read_to_string(entry.path())?);
        }
    }
    Ok(files)
}

fn ids(text: Option<&String>) -> BTreeSet<u32> {
    text.map(|t| sns_node::store::record::decode_ids(t).into_iter().collect()).unwrap_or_default()
}

/// Checks the SPEC §6 goal state over the given servers' directories
/// ((cluster, server id) pairs) of a deployment of `clusters` clusters:
/// the same users everywhere; every user's followers file agrees with the
/// follow lists of all clusters; every feed post exists in its author's
/// timeline; master and slave of a cluster hold identical files.
/// `expected_feeds` adds (user, author, text) posts that must be in the
/// user's feed on every server of the user's cluster.
pub fn check_convergence(d: &Deployment, servers: &[(u32, u32)], expected_feeds: &[(u32, u32, &str)]) -> Result<()> {
    let mut last = String::new();
    let result = eventually("convergence", || match converged(d, servers, expected_feeds) {
        Ok(()) => Some(()),
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    });
    result.map_err(|e| anyhow!("{e}: {last}"))
}

fn converged(d: &Deployment, servers: &[(u32, u32)], expected_feeds: &[(u32, u32, &str)]) -> Result<()> {
    let clusters = d.clusters;
    let cluster_of = |u: u32| sns_node::ids::cluster_of(u, clusters);
    if servers.is_empty() {
        bail!("no servers to compare");
    }
    let mut files = BTreeMap::new();
    for &(c, s) in servers {
        let f = spec_files(&d.server_dir(c, s))?;
        // A directory with no files would agree with anything.
        if !f.contains_key("all_users.txt") {
            bail!("server {c}/{s} has no all_users.txt: nothing to compare");
        }
        files.insert((c, s), f);
    }
    let users: Vec<_> = files.values().map(|f| f.get("all_users.txt").cloned().unwrap_or_default()).collect();
    if users.windows(2).any(|w| w[0] != w[1]) {
        bail!("all_users.txt differs between servers: {users:?}");
    }
    let all: BTreeSet<u32> = ids(files.values().next().and_then(|f| f.get("all_users.txt")));
    if all.is_empty() {
        bail!("no users on any server: nothing to compare");
    }
    // Who follows whom, from the follow lists (each on its user's cluster).
    let mut follows: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for ((c, _), f) in &files {
        for &u in all.iter().filter(|u| cluster_of(**u) == *c) {
            follows.insert(u, ids(f.get(&format!("{u}_follow_list.txt"))));
        }
    }
    // Each author's timeline (on the first server of its cluster), decoded
    // once: a feed holds thousands of posts.
    let mut timelines: HashMap<u32, HashSet<(String, i64)>> = HashMap::new();
    for ((c, s), f) in &files {
        for &u in all.iter().filter(|u| cluster_of(**u) == *c) {
            let want: BTreeSet<u32> = follows.iter().filter(|(_, l)| l.contains(&u)).map(|(f, _)| *f).collect();
            let got = ids(f.get(&format!("{u}_followers.txt")));
            if got != want {
                bail!("server {c}/{s}: followers of {u} are {got:?}, follow lists say {want:?}");
            }
            let feed = sns_node::store::record::decode_posts(f.get(&format!("{u}_following.txt")).map_or("", |t| t));
            for p in &feed {
                let author_files = files.iter().find(|((ac, _), _)| *ac == cluster_of(p.user)).map(|(_, f)| f);
                if let Some(af) = author_files {
                    let tl = timelines.entry(p.user).or_insert_with(|| {
                        sns_node::store::record::decode_posts(
                            af.get(&format!("{}_timeline.txt", p.user)).map_or("", |t| t),
                        )
                        .into_iter()
                        .map(|t| (t.text, t.at_secs))
                        .collect()
                    });
                    if !tl.contains(&(p.text.clone(), p.at_secs)) {
                        bail!("server {c}/{s}: feed of {u} has {p:?}, which is not in {}'s timeline", p.user);
                    }
                }
            }
            for (reader, author, text) in expected_feeds.iter().filter(|(r, _, _)| *r == u) {
                if !feed.iter().any(|p| p.user == *author && p.text == *text) {
                    bail!("server {c}/{s}: feed of {reader} lacks {author}'s post {text:?}");
                }
            }
        }
    }
    for c in 1..=clusters {
        let copies: Vec<_> = files.iter().filter(|((fc, _), _)| *fc == c).collect();
        if let [(a, fa), (b, fb), ..] = copies.as_slice()
            && fa != fb
        {
            let diff: Vec<&String> = fa.keys().chain(fb.keys()).filter(|k| fa.get(*k) != fb.get(*k)).collect();
            bail!("servers {a:?} and {b:?} differ in {diff:?}");
        }
    }
    Ok(())
}
