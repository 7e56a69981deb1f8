//! The local launcher: runs a whole deployment (coordinator, every server
//! and synchronizer) as child processes of this one, on loopback.
//!
//! Logs go to `<dir>/logs/<name>.log`, data to `<dir>/cluster_<c>/<s>/`.
//! Once every node is up it prints one `ready:` line naming the coordinator
//! address. Commands on standard input (`status`, `kill`, `stop`, `start`,
//! `restart` of a process name such as `server-2-1`, or of `master-2` /
//! `slave-2`) make failover demos one line each. Ctrl-C stops everything;
//! children also die with the launcher if it is killed outright.
#![allow(clippy::print_stdout, reason = "the launcher talks to the person (or test) that started it on stdout")]

pub mod console;
mod cut;
pub mod ports;

use crate::cli::{LocalArgs, parse_deployment};
use crate::error::{Error, Result};
use crate::net;
use crate::relay::Relay;
use crate::topology::{self, DeploymentSpec, HeartbeatSpec, PlanOptions, Process, Role};
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{StatusRequest, TableRequest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long a stopped child gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Proc {
    plan: Process,
    port: u16,
    /// Its `GET /metrics` port: reserved (or any free one) at first, kept
    /// across restarts.
    metrics_port: u16,
    child: Option<Child>,
    /// A server: the loopback address its own connections leave from
    /// (`--source-address`), which `partition <server> <server>` cuts by.
    source: Option<std::net::Ipv4Addr>,
}

struct Launcher {
    bin: PathBuf,
    dir: PathBuf,
    coord_port: u16,
    procs: BTreeMap<String, Proc>,
    /// The free ports handed out (`--base-port 0`), held for the
    /// launcher's life so that a restarted node finds its port free.
    reserved: Option<ports::Reserved>,
    /// Each server reaches the coordinator through its own relay, which
    /// `partition` cuts.
    relays: BTreeMap<String, Relay>,
    /// Pairs of servers cut off from each other.
    cuts: cut::Cuts,
    queue_type: crate::sync::topology::QueueType,
    /// The deployment's secret, handed to every node by path.
    secret_file: PathBuf,
    /// Adds its token to the launcher's own calls.
    attach: crate::auth::Attach,
    /// Handed to every node (`SNS_TLS_*`, `SNS_AMQP_CA`); the launcher's
    /// own calls follow it too.
    tls: crate::tls::TlsArgs,
    /// Who is master, and what the console did to whom: for announcements.
    failovers: console::Failovers,
    /// The log filter and format every node gets (`SNS_LOG`, `SNS_LOG_FORMAT`).
    log: (String, crate::telemetry::LogFormat),
}

/// Runs the deployment; every node logs with the launcher's `log` filter
/// and format.
pub async fn run(
    args: LocalArgs,
    log: (String, crate::telemetry::LogFormat),
    shutdown: CancellationToken,
) -> Result<()> {
    let (spec, name) = match &args.spec {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let doc =
                topology::parse_sns_cluster(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            (doc.spec, doc.metadata.name)
        }
        None => {
            let spec = DeploymentSpec {
                clusters: args.size.clusters,
                servers_per_cluster: args.servers.servers_per_cluster,
                heartbeat: HeartbeatSpec {
                    interval_millis: args.heartbeat.interval.as_millis() as u64,
                    missed: args.heartbeat.missed,
                },
                disk_stall_limit_millis: args.disk_stall_limit.map(|d| d.as_millis() as u64),
                // The servers take these from the environment.
                commit_delay_millis: None,
                resend_after_millis: None,
                compact_at_bytes: None,
            };
            spec.validate().map_err(Error::Config)?;
            (spec, None)
        }
    };
    let stop_on_eof = args.stop_on_stdin_eof;
    let deployment = args.deployment.clone().or(name).unwrap_or_else(|| "sns".into());
    parse_deployment(&deployment).map_err(Error::Config)?;
    ensure_broker(&args.broker.amqp_url, !args.no_broker_start).await?;

    std::fs::create_dir_all(args.dir.join("logs")).map_err(|e| Error::io(&args.dir, e))?;
    let dir = std::fs::canonicalize(&args.dir).map_err(|e| Error::io(&args.dir, e))?;
    let bin = match &args.node_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|e| Error::Other(format!("cannot find this binary: {e}")))?,
    };
    let opts = PlanOptions {
        base_port: args.base_port,
        data_root: dir.clone(),
        coord_host: "127.0.0.1".into(),
        advertise_host: "127.0.0.1".into(),
        bind: "127.0.0.1".into(),
        amqp_url: Some(args.broker.amqp_url.clone()),
        deployment: deployment.clone(),
        queue_expires: args.queue_expires.clone(),
    };
    let plan = topology::plan(&spec, &opts);
    let started = Instant::now();
    let secret_file = args.secret_file.clone().unwrap_or_else(|| dir.join("secret"));
    let secret = crate::auth::ensure_secret_file(&secret_file)?;
    let mut tls = if args.tls { crate::tls::ensure_local(&dir.join("tls"))? } else { crate::tls::TlsArgs::default() };
    tls.amqp_ca = args
        .amqp_ca
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| Error::Config(format!("--amqp-ca: {e}")))?;
    tls.install()?;
    let mut l = Launcher {
        bin,
        dir: dir.clone(),
        coord_port: 0,
        procs: BTreeMap::new(),
        reserved: None,
        relays: BTreeMap::new(),
        cuts: cut::Cuts::new(),
        queue_type: args.queue_type,
        secret_file,
        attach: crate::auth::Attach::new(Some(secret)),
        tls,
        failovers: console::Failovers::default(),
        log,
    };
    cut::sweep_stale();
    for p in plan {
        let source = match p.role {
            Role::Server { cluster, id } => cut::source_address(cluster, id),
            _ => None,
        };
        l.procs.insert(p.name.clone(), Proc { port: p.port, metrics_port: 0, plan: p, child: None, source });
    }
    l.reserve_ports();
    let result = async {
        l.start("coordinator").await?;
        l.coord_port = l.procs["coordinator"].port;
        let servers: Vec<String> = l
            .procs
            .iter()
            .filter(|(_, p)| matches!(p.plan.role, Role::Server { .. }))
            .map(|(n, _)| n.clone())
            .collect();
        for name in servers {
            l.relays.insert(name, Relay::start(l.coord_port, shutdown.clone()).await?);
        }
        let names: Vec<String> = l.procs.keys().filter(|n| *n != "coordinator").cloned().collect();
        for n in &names {
            l.start(n).await?;
        }
        l.wait_ready(&spec, args.ready_timeout, &shutdown).await
    }
    .await;
    if let Err(e) = result {
        l.stop_all().await;
        return Err(e);
    }
    println!(
        "ready: {} clusters x {} servers in {} ms; coordinator at 127.0.0.1:{}; deployment {deployment}; data and logs in {}",
        spec.clusters,
        spec.servers_per_cluster,
        started.elapsed().as_millis(),
        l.coord_port,
        dir.display()
    );
    println!(
        "node-to-node calls need the deployment secret in {} (sns-node promote/switchover: --secret-file)",
        l.secret_file.display()
    );
    match &l.tls.tls_ca {
        Some(ca) => println!(
            "connect a client with: tsc --tls --ca {} -h 127.0.0.1 -k {} -u <user id>",
            ca.display(),
            l.coord_port
        ),
        None => println!("connect a client with: tsc -h 127.0.0.1 -k {} -u <user id>", l.coord_port),
    }
    println!("{}", console::hint());
    let (announce, mut announcements) = tokio::sync::mpsc::unbounded_channel();
    l.failovers.check(l.coord_port, &l.attach).await;
    tokio::spawn(tracing::Instrument::instrument(
        l.failovers.clone().watch(l.coord_port, l.attach.clone(), announce, shutdown.clone()),
        tracing::info_span!("failover_watch"),
    ));

    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut watch = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let reply = l.command(line.trim()).await;
                    // Announcements first: a reply is the last line its
                    // command prints.
                    while let Ok(a) = announcements.try_recv() {
                        println!("{a}");
                    }
                    println!("{reply}");
                }
                // No more commands: the program driving this launcher is
                // gone (stop with it), or there never was one (started
                // with </dev/null: run until stopped).
                _ if stop_on_eof => {
                    println!("standard input ended: stopping");
                    break;
                }
                _ => stdin_open = false,
            },
            Some(a) = announcements.recv() => println!("{a}"),
            _ = watch.tick() => l.reap(),
        }
    }
    l.stop_all().await;
    println!("stopped");
    Ok(())
}

impl Launcher {
    /// Gives every process without a fixed port (and every metrics port) a
    /// reserved one; where none can be reserved, the OS picks one at the
    /// first start, as before (a restart may then find it taken).
    fn reserve_ports(&mut self) {
        let wanted = self.procs.values().map(|p| usize::from(p.port == 0) + usize::from(p.metrics_port == 0)).sum();
        if wanted == 0 {
            return;
        }
        let reserved = match ports::reserve(wanted) {
            Ok(r) => r,
            Err(e) => {
                println!(
                    "warning: no ports reserved ({e}); the system picks them, and a restarted node may find its port taken"
                );
                return;
            }
        };
        let mut free = reserved.ports.iter().copied();
        for proc in self.procs.values_mut() {
            for port in [&mut proc.port, &mut proc.metrics_port] {
                if *port == 0 {
                    *port = free.next().unwrap_or(0);
                }
            }
        }
        self.reserved = Some(reserved);
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    async fn start(&mut self, name: &str) -> Result<()> {
        self.start_on(name, None).await
    }

    /// Starts process `name`, on a clock `clock` off when given.
    async fn start_on(&mut self, name: &str, clock: Option<&SkewedClock>) -> Result<()> {
        let coord_port = self.coord_port;
        let port_file = self.dir.join("logs").join(format!("{name}.port"));
        let metrics_file = self.dir.join("logs").join(format!("{name}.metrics-port"));
        let _ = std::fs::remove_file(&port_file);
        let _ = std::fs::remove_file(&metrics_file);
        let log_path = self.log_path(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| Error::io(&log_path, e))?;
        let proc = self.procs.get_mut(name).ok_or_else(|| Error::Other(format!("no process named {name}")))?;
        if proc.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(Some(_)))) {
            proc.child = None;
        }
        if proc.child.is_some() {
            return Err(Error::Other(format!("{name} is already running")));
        }
        let mut args = proc.plan.args.clone();
        // Keep the port across restarts, even one first picked by the OS.
        if let Some(i) = args.iter().position(|a| a == "-p") {
            args[i + 1] = proc.port.to_string();
        }
        if proc.plan.role == Role::Coordinator {
            // Locally every server is reachable too; the gateway lets the
            // same `tsc --gateway` that works through a port-forward work here.
            args.push("--gateway".to_string());
        } else {
            let port = self.relays.get(name).map_or(coord_port, |r| r.port);
            args.extend(["-k".to_string(), port.to_string()]);
            if let Some(source) = proc.source {
                args.extend(["--source-address".to_string(), source.to_string()]);
            }
        }
        args.extend(["--port-file".to_string(), port_file.display().to_string()]);
        args.extend([
            "--metrics-port".to_string(),
            proc.metrics_port.to_string(),
            "--metrics-port-file".to_string(),
            metrics_file.display().to_string(),
        ]);
        let mut cmd = Command::new(&self.bin);
        cmd.env("SNS_QUEUE_TYPE", self.queue_type.as_str())
            .env("SNS_LOG", &self.log.0)
            .env("SNS_LOG_FORMAT", self.log.1.as_str())
            .env("SNS_SECRET_FILE", &self.secret_file)
            .env_remove("SNS_SECRET");
        for (var, path) in [
            ("SNS_TLS_CERT", &self.tls.tls_cert),
            ("SNS_TLS_KEY", &self.tls.tls_key),
            ("SNS_TLS_CA", &self.tls.tls_ca),
            ("SNS_AMQP_CA", &self.tls.amqp_ca),
        ] {
            match path {
                Some(p) => cmd.env(var, p),
                None => cmd.env_remove(var),
            };
        }
        if let Some(clock) = clock {
            // libfaketime shifts the wall clock only: timeouts and leases
            // run on the monotonic clock, as on a machine whose clock is off.
            cmd.env("LD_PRELOAD", &clock.library)
                .env("FAKETIME", &clock.offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        cmd.args(&args).stdin(Stdio::null()).stdout(log).stderr(log2).kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| Error::Other(format!("cannot start {}: {e}", self.bin.display())))?;
        tracing::info!(name, pid = child.id(), "started");
        self.failovers.back(name);
        proc.child = Some(child);
        let failed = |e| {
            // The node's own last words say why, where it wrote any.
            let last = std::fs::read_to_string(&log_path)
                .ok()
                .and_then(|log| log.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(" ({})", l.trim())));
            Error::Other(format!("{name}: {e}{}; see {}", last.unwrap_or_default(), log_path.display()))
        };
        proc.port = wait_port_file(&port_file, proc.child.as_mut()).await.map_err(failed)?;
        // Bound before the node's own port: there by now.
        proc.metrics_port = wait_port_file(&metrics_file, proc.child.as_mut()).await.map_err(failed)?;
        Ok(())
    }

    /// Waits until every node heartbeats, every cluster has a master, and
    /// every master forwards to a slave (when the cluster has two servers).
    async fn wait_ready(&self, spec: &DeploymentSpec, timeout: Duration, shutdown: &CancellationToken) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut admin =
            CoordAdminClient::new(net::node_channel("127.0.0.1", &self.coord_port.to_string(), &self.attach)?);
        let expected = self.procs.len() - 1;
        let mut last = String::from("coordinator not answering");
        while Instant::now() < deadline && !shutdown.is_cancelled() {
            match admin.table(TableRequest {}).await {
                Ok(t) => {
                    let nodes = t.into_inner().nodes;
                    let alive = nodes.iter().filter(|n| n.alive).count();
                    let masters: Vec<_> = nodes.iter().filter(|n| n.kind == "server" && n.is_master).collect();
                    last = format!("{alive}/{expected} nodes up, {}/{} masters", masters.len(), spec.clusters);
                    if alive == expected && masters.len() == spec.clusters as usize {
                        let mut paired = 0;
                        for m in &masters {
                            let status = match net::node_channel(&m.host, &m.port, &self.attach) {
                                Ok(ch) => ReplicaClient::new(ch).status(StatusRequest {}).await.ok(),
                                Err(_) => None,
                            };
                            if status.is_some_and(|s| spec.servers_per_cluster < 2 || !s.into_inner().slave.is_empty())
                            {
                                paired += 1;
                            }
                        }
                        if paired == masters.len() {
                            return Ok(());
                        }
                        last = format!("{paired}/{} masters know their slave", masters.len());
                    }
                }
                Err(e) => last = format!("coordinator: {}", e.message()),
            }
            self.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Error::Other(format!("not ready after {timeout:?}: {last}; logs in {}", self.dir.join("logs").display())))
    }

    fn check_alive(&self) -> Result<()> {
        for (name, p) in &self.procs {
            if p.child.is_none() {
                continue;
            }
            let log = self.log_path(name);
            if let Some(id) = p.child.as_ref().and_then(|c| c.id())
                && !Path::new(&format!("/proc/{id}")).exists()
            {
                return Err(Error::Other(format!("{name} exited during start-up; see {}", log.display())));
            }
        }
        Ok(())
    }

    /// Notices children that exited by themselves.
    fn reap(&mut self) {
        for (name, p) in &mut self.procs {
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                tracing::warn!(name = %name, %status, "process exited");
                self.failovers.gone(name, "exited");
                println!("{name} exited ({status})");
                p.child = None;
            }
        }
    }

    /// Resolves `master-<c>` / `slave-<c>` through the coordinator.
    async fn resolve(&self, target: &str) -> Result<String, String> {
        let (which, cluster) = match target.split_once('-') {
            Some((w @ ("master" | "slave"), c)) => {
                (w, c.parse::<u32>().map_err(|_| format!("bad cluster in {target:?}"))?)
            }
            _ if self.procs.contains_key(target) => return Ok(target.to_string()),
            _ => return Err(format!("unknown process {target:?}")),
        };
        let ch =
            net::node_channel("127.0.0.1", &self.coord_port.to_string(), &self.attach).map_err(|e| e.to_string())?;
        let table = CoordAdminClient::new(ch).table(TableRequest {}).await.map_err(|e| e.message().to_string())?;
        let want_master = which == "master";
        table
            .into_inner()
            .nodes
            .into_iter()
            .find(|n| n.kind == "server" && n.cluster == cluster && n.alive && n.is_master == want_master)
            .map(|n| format!("server-{}-{}", n.cluster, n.id))
            .ok_or_else(|| format!("cluster {cluster} has no live {which}"))
    }

    async fn command(&mut self, line: &str) -> String {
        let mut words = line.split_whitespace();
        let (verb, target) = (words.next().unwrap_or(""), words.next());
        if verb == "switchover" {
            return match target.map(str::parse::<u32>) {
                Some(Ok(cluster)) => {
                    let reply = self.switchover(cluster, words.next()).await;
                    self.with_announcements(reply).await
                }
                _ => "error: switchover needs a cluster number (and optionally the server to hand over to)".into(),
            };
        }
        let known = console::COMMANDS.iter().any(|(c, _)| c.split(' ').next() == Some(verb));
        if !verb.is_empty() && !known {
            return console::unknown(verb);
        }
        let target = match (verb, target) {
            ("" | "status" | "help", _) => None,
            (_, Some(t)) => match self.resolve(t).await {
                Ok(name) => Some(name),
                Err(e) => return format!("error: {e}"),
            },
            (_, None) => return format!("error: {verb} needs a process name"),
        };
        match (verb, target) {
            ("", _) => String::new(),
            ("help", _) => console::help(),
            ("status", _) => self.status().await,
            // Reply once the process is gone, so `start` may follow at once.
            ("kill", Some(n)) => {
                let reply = self.signal(&n, libc::SIGKILL, "killed");
                self.wait_exit(&n, reply).await
            }
            ("stop", Some(n)) => {
                let reply = self.signal(&n, libc::SIGTERM, "stopped");
                self.wait_exit(&n, reply).await
            }
            ("pause", Some(n)) => self.signal(&n, libc::SIGSTOP, "paused"),
            ("partition" | "heal", Some(n)) if words.clone().next().is_some() => {
                let other = match self.resolve(words.next().unwrap_or_default()).await {
                    Ok(o) => o,
                    Err(e) => return format!("error: {e}"),
                };
                self.cut(verb == "partition", &n, &other)
            }
            ("partition" | "heal", Some(n)) => match self.relays.get(&n) {
                Some(relay) => {
                    relay.set_cut(verb == "partition");
                    if verb == "partition" {
                        self.failovers.gone(&n, "was partitioned");
                        format!("partitioned {n} from the coordinator")
                    } else {
                        self.failovers.back(&n);
                        format!("healed {n}")
                    }
                }
                None => format!("error: only a server can be partitioned from the coordinator, not {n}"),
            },
            ("promote", Some(n)) => {
                let reply = self.promote(&n, words.next() == Some("--accept-data-loss")).await;
                self.with_announcements(reply).await
            }
            ("resume", Some(n)) => {
                self.failovers.back(&n);
                self.signal(&n, libc::SIGCONT, "resumed")
            }
            ("start" | "restart", Some(n)) => {
                let clock = match clock_offset(&mut words) {
                    Ok(c) => c,
                    Err(e) => return format!("error: {e}"),
                };
                let stopped = if verb == "restart" {
                    let stopped = self.signal(&n, libc::SIGKILL, "killed");
                    format!("{}; ", self.wait_exit(&n, stopped).await)
                } else {
                    String::new()
                };
                match self.start_on(&n, clock.as_ref()).await {
                    Ok(()) => {
                        format!("{stopped}started {n} on port {}{}", self.procs[&n].port, on_clock(clock.as_ref()))
                    }
                    Err(e) => format!("error: {e}"),
                }
            }
            (_, _) => console::unknown(verb),
        }
    }

    /// Cuts servers `a` and `b` off from each other (`cut`), or ends that.
    fn cut(&mut self, cut: bool, a: &str, b: &str) -> String {
        let end = |name: &str| match self.procs.get(name) {
            Some(Proc { plan: Process { role: Role::Server { .. }, .. }, source: Some(source), port, .. }) => {
                Ok(cut::End { source: *source, port: *port })
            }
            Some(Proc { plan: Process { role: Role::Server { .. }, .. }, .. }) => {
                Err(format!("error: {name} has no loopback address of its own to cut it by"))
            }
            _ => Err(format!("error: only servers can be cut off from each other, not {name}")),
        };
        let (ea, eb) = match (end(a), end(b)) {
            (Ok(ea), Ok(eb)) if a != b => (ea, eb),
            (Ok(_), Ok(_)) => return format!("error: {a} cannot be cut off from itself"),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let done = if cut { self.cuts.cut(ea, eb) } else { self.cuts.heal(ea, eb) };
        match (cut, done) {
            (true, Ok(true)) => format!("partitioned {a} from {b}"),
            (true, Ok(false)) => format!("{a} and {b} were already partitioned"),
            (false, Ok(true)) => format!("healed {a} and {b}"),
            (false, Ok(false)) => format!("{a} and {b} were not partitioned"),
            (_, Err(e)) => format!("error: {e}"),
        }
    }

    /// `reply` after the announcements of the master changes it made.
    async fn with_announcements(&self, reply: String) -> String {
        let mut lines = self.failovers.check(self.coord_port, &self.attach).await;
        lines.push(reply);
        lines.join("\n")
    }

    /// A planned switchover of `cluster` to `to` (a server's name, or
    /// `slave-<c>`; default: the coordinator picks its in-sync slave).
    async fn switchover(&self, cluster: u32, to: Option<&str>) -> String {
        let to = match to {
            None => 0,
            Some(name) => match self.resolve(name).await.map(|n| self.procs.get(&n).map(|p| p.plan.role)) {
                Ok(Some(Role::Server { cluster: c, id })) if c == cluster => id,
                Ok(_) => return format!("error: {name} is not a server of cluster {cluster}"),
                Err(e) => return format!("error: {e}"),
            },
        };
        let port = self.coord_port.to_string();
        let patience = crate::coordinator::SWITCHOVER_PATIENCE;
        let channel = match net::node_channel_with_timeout("127.0.0.1", &port, patience, &self.attach) {
            Ok(c) => c,
            Err(e) => return format!("error: {e}"),
        };
        let req = sns_proto::internal::SwitchoverRequest { cluster, to };
        match CoordAdminClient::new(channel).switchover(req).await {
            Ok(r) => format!("switched over: {}", crate::coordinator::describe_switchover(cluster, &r.into_inner())),
            Err(s) => format!("error: {}", s.message()),
        }
    }

    /// Asks the coordinator to make server `name` its cluster's master.
    async fn promote(&self, name: &str, accept_data_loss: bool) -> String {
        let Some(Role::Server { cluster, id }) = self.procs.get(name).map(|p| p.plan.role) else {
            return format!("error: {name} is not a server");
        };
        let req = sns_proto::internal::PromoteRequest { cluster, server: id, accept_data_loss };
        let channel = match net::node_channel("127.0.0.1", &self.coord_port.to_string(), &self.attach) {
            Ok(c) => c,
            Err(e) => return format!("error: {e}"),
        };
        match CoordAdminClient::new(channel).promote(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let warning = if r.warning.is_empty() { String::new() } else { format!(" (warning: {})", r.warning) };
                format!("promoted {name} under term {}{warning}", r.term)
            }
            Err(s) => format!("error: {}", s.message()),
        }
    }

    /// The routing table with each process's pid and metrics port, then
    /// the one-line `status:` summary (every process, up or down).
    async fn status(&self) -> String {
        let table = match crate::status::fetch("127.0.0.1", self.coord_port, &self.attach).await {
            Ok(snapshot) => {
                let pid = |name: &str| {
                    self.procs
                        .get(name)
                        .and_then(|p| p.child.as_ref())
                        .and_then(|c| c.id())
                        .map_or("-".into(), |p| p.to_string())
                };
                let metrics = |name: &str| self.procs.get(name).map_or("-".into(), |p| p.metrics_port.to_string());
                crate::status::render(&snapshot, &[("PID", &pid), ("METRICS", &metrics)])
            }
            Err(e) => format!("(no routing table: {e})\n"),
        };
        format!("{table}{}", self.summary())
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .procs
            .iter()
            .map(|(n, p)| match p.child.as_ref().and_then(|c| c.id()) {
                Some(pid) => format!("{n}=up(pid {pid}, port {}, metrics {})", p.port, p.metrics_port),
                None => format!("{n}=down"),
            })
            .collect();
        format!("status: {}", parts.join(" "))
    }

    fn signal(&mut self, name: &str, sig: i32, done: &str) -> String {
        let Some(pid) = self.procs.get(name).and_then(|p| p.child.as_ref()).and_then(|c| c.id()) else {
            return format!("error: {name} is not running");
        };
        if send_signal(pid, sig) {
            match sig {
                libc::SIGKILL => self.failovers.gone(name, "died"),
                libc::SIGTERM => self.failovers.gone(name, "was stopped"),
                libc::SIGSTOP => self.failovers.gone(name, "was paused"),
                _ => {}
            }
            format!("{done} {name} (pid {pid})")
        } else {
            format!("error: cannot signal {name}")
        }
    }

    /// Waits (a while) for `name` to exit after a signal; `reply` says what
    /// was done, and whether the process is still there after the wait.
    async fn wait_exit(&mut self, name: &str, reply: String) -> String {
        let Some(mut child) = self.procs.get_mut(name).and_then(|p| p.child.take()) else { return reply };
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return reply;
        }
        // Only a process stuck in the kernel outlives SIGKILL this long
        // (a write to a hung disk): it ends when the kernel lets it, and it
        // holds its data directory until then.
        let pid = child.id().map(|p| format!(" {p}")).unwrap_or_default();
        format!(
            "{reply}; process{pid} has not exited after {} s (stuck in the kernel, on a hung disk?): it keeps its \
             data directory until it does",
            STOP_GRACE.as_secs()
        )
    }

    async fn stop_all(&mut self) {
        self.cuts.clear();
        // Stop the readers and writers of state before the coordinator.
        let names: Vec<String> = self.procs.keys().rev().cloned().collect();
        for n in &names {
            if let Some(pid) = self.procs[n].child.as_ref().and_then(|c| c.id()) {
                send_signal(pid, libc::SIGCONT);
                send_signal(pid, libc::SIGTERM);
            }
        }
        for n in &names {
            if let Some(mut child) = self.procs.get_mut(n).and_then(|p| p.child.take())
                && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

async fn wait_port_file(path: &Path, child: Option<&mut Child>) -> std::result::Result<u16, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let Some(child) = child else {
        return Err("not started".into());
    };
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(port) = text.trim().parse()
        {
            return Ok(port);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited during start-up ({status})"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("did not start listening within 30 s".into())
}

/// Makes the kernel SIGTERM the child if this process dies, so a launcher
/// killed with SIGKILL leaves no orphans behind.
#[allow(unsafe_code, reason = "prctl in pre_exec is the only way to set the parent-death signal")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code, reason = "kill(2) has no safe wrapper in std")]
fn send_signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(pid as i32, sig) == 0 }
}

/// Makes sure a broker answers at `url`; starts the local `rabbitmq-server`
/// if allowed and installed, else says exactly how to get one.
pub async fn ensure_broker(url: &str, may_start: bool) -> Result<()> {
    let addr = broker_addr(url);
    let reachable = || async {
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr))
            .await
            .is_ok_and(|r| r.is_ok())
    };
    if reachable().await {
        return Ok(());
    }
    let local = addr.starts_with("127.") || addr.starts_with("localhost") || addr.starts_with("[::1]");
    let installed = which("rabbitmq-server");
    if may_start && local && installed {
        println!("no broker at {addr}: starting rabbitmq-server");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .stdin(Stdio::null())
            .status()
            .await
            .map_err(|e| Error::Other(format!("cannot run rabbitmq-server: {e}")))?;
        if !status.success() {
            return Err(Error::Other(format!("rabbitmq-server -detached failed ({status})")));
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if reachable().await {
                println!("broker up at {addr}");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        return Err(Error::Other(format!("started rabbitmq-server but nothing answers at {addr} after 90 s")));
    }
    Err(Error::Other(format!(
        "no RabbitMQ broker answers at {addr}. Start one with `sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached` (or run ./scripts/run.sh, which does it), or point --amqp-url / AMQP_URL at yours"
    )))
}

/// host:port of an amqp:// URL (default port 5672).
pub fn broker_addr(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let port = if scheme == "amqps" { 5671 } else { 5672 };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit_once('@').map_or(hostport, |(_, h)| h);
    if hostport.is_empty() {
        format!("127.0.0.1:{port}")
    } else if hostport.contains(':') && !hostport.ends_with(']') {
        hostport.to_string()
    } else {
        format!("{hostport}:{port}")
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(program).is_file()
}

/// A wall clock off by `offset` (libfaketime's relative form, e.g. "-1d"),
/// through libfaketime's `library`.
#[derive(Debug, Clone, PartialEq)]
struct SkewedClock {
    offset: String,
    library: PathBuf,
}

/// The optional `--clock <offset>` after a start or restart.
fn clock_offset<'a>(words: &mut impl Iterator<Item = &'a str>) -> std::result::Result<Option<SkewedClock>, String> {
    match words.next() {
        None => Ok(None),
        Some("--clock") => {
            let offset = words.next().ok_or("--clock needs an offset, e.g. -1d, +30s or -2h")?;
            if !valid_offset(offset) {
                return Err(format!(
                    "{offset:?} is not a clock offset: a sign, a number and s, m, h, d or y (e.g. -1d, +30s)"
                ));
            }
            let library =
                libfaketime().ok_or("--clock needs libfaketime (Debian package faketime), which is not installed")?;
            Ok(Some(SkewedClock { offset: offset.to_string(), library }))
        }
        Some(other) => Err(format!("unexpected {other:?} (only --clock <offset> may follow the name)")),
    }
}

/// `+30s`, `-1d`, `-1.5h`: what libfaketime takes as a relative offset.
fn valid_offset(offset: &str) -> bool {
    let Some(rest) = offset.strip_prefix(['+', '-']) else { return false };
    let number = rest.trim_end_matches(['s', 'm', 'h', 'd', 'y']);
    rest.len() - number.len() <= 1
        && number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.parse::<f64>().is_ok()
}

/// libfaketime's library, where installed.
fn libfaketime() -> Option<PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib").ok()?.filter_map(|e| e.ok()).map(|e| e.path());
    dirs.chain([PathBuf::from("/usr/lib")]).map(|d| d.join("faketime/libfaketime.so.1")).find(|p| p.exists())
}

fn on_clock(clock: Option<&SkewedClock>) -> String {
    clock.map(|c| format!(" on a clock {} off", c.offset)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_offsets_are_what_libfaketime_takes() {
        for ok in ["-1d", "+30s", "-1.5h", "+2y", "-90"] {
            assert!(valid_offset(ok), "{ok}");
        }
        for bad in ["1d", "-", "-d", "-1dd", "-1w", "--1d", "+inf", "-1d; rm", ""] {
            assert!(!valid_offset(bad), "{bad}");
        }
        let mut words = ["--clock"].into_iter();
        assert!(clock_offset(&mut words).unwrap_err().contains("needs an offset"));
        let mut words = ["--clock", "yesterday"].into_iter();
        assert!(clock_offset(&mut words).unwrap_err().contains("not a clock offset"));
        let mut words = ["now"].into_iter();
        assert!(clock_offset(&mut words).unwrap_err().contains("only --clock"));
        assert_eq!(clock_offset(&mut std::iter::empty()), Ok(None));
    }

    #[test]
    fn broker_addresses_come_from_urls() {
        assert_eq!(broker_addr("amqp://guest:guest@127.0.0.1:5672/%2f"), "127.0.0.1:5672");
        assert_eq!(broker_addr("amqp://rabbit.example/%2f"), "rabbit.example:5672");
        assert_eq!(broker_addr("amqp://u:p@[::1]:5673/vh"), "[::1]:5673");
        assert_eq!(broker_addr("amqp://"), "127.0.0.1:5672");
        assert_eq!(broker_addr("amqps://u:p@rabbit.example/%2f"), "rabbit.example:5671");
    }
}
