//! Command-line flags of `sns-node`. Every flag has a long form and an
//! environment variable; values are parsed into typed configs here, at the
//! edge. The course's short flags are kept: `-h` is the coordinator host
//! (so help is `--help` only), `-k` its port, `-p` our own port.

use crate::coordinator::CoordinatorConfig;
use crate::ids::{cluster_of, sync_pairing};
use crate::server::ServerConfig;
use crate::sync::SyncConfig;
use clap::{ArgAction, Args, Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "sns-node",
    version,
    about = "Tiny SNS node: coordinator, server, synchronizer, or a whole local deployment"
)]
pub struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax) [default: info for
    /// nodes and the launcher, warn for the one-shot commands].
    #[arg(long, env = "SNS_LOG", global = true)]
    pub log: Option<String>,
    /// Log lines as plain text or as JSON objects (with their spans).
    #[arg(long, env = "SNS_LOG_FORMAT", value_enum, default_value_t, global = true)]
    pub log_format: crate::telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Routing table, heartbeats, master/slave roles.
    Coordinator(CoordinatorArgs),
    /// Serves clients of one cluster and keeps its files.
    #[command(disable_help_flag = true)]
    Server(ServerArgs),
    /// Replicates users, follows and posts between clusters through RabbitMQ.
    #[command(disable_help_flag = true)]
    Synchronizer(SyncArgs),
    /// Runs a whole deployment as processes on this machine, with a
    /// console on standard input (commands below).
    #[command(after_help = console_help())]
    Local(LocalArgs),
    /// Makes a chosen server its cluster's master under a new term (an
    /// operator's override for a cluster left without an in-sync server).
    #[command(disable_help_flag = true)]
    Promote(PromoteArgs),
    /// Hands a cluster's master role to a server holding every acknowledged
    /// write (a planned switchover: nothing acknowledged is lost, writes
    /// pause for the handover).
    #[command(disable_help_flag = true)]
    Switchover(SwitchoverArgs),
    /// Prints the routing table: every node's role, term, in-sync state,
    /// last heartbeat, its synchronizer's backlog and address.
    #[command(disable_help_flag = true)]
    Status(StatusArgs),
}

impl Cli {
    /// The log filter: as given, else `info` for the long-running commands
    /// and `warn` for the one-shot ones (whose output is their answer).
    pub fn log_filter(&self) -> &str {
        match (&self.log, &self.command) {
            (Some(filter), _) => filter,
            (None, Command::Promote(_) | Command::Switchover(_) | Command::Status(_)) => "warn",
            (None, _) => "info",
        }
    }
}

/// Parses durations like `5s`, `500ms`, `2m`, `1h 30m` (the `humantime`
/// crate's syntax) or a bare number of seconds, between 1 ms and 24 h.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    // A bare number has always meant seconds here; humantime wants a unit.
    let d = match t.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            humantime::parse_duration(t).map_err(|e| format!("{text:?} is not a duration like 5s or 500ms: {e}"))?
        }
    };
    if d < Duration::from_millis(1) || d >= Duration::from_secs(86_400) {
        return Err(format!("{text:?}: must be between 1ms and 24h"));
    }
    Ok(d)
}

/// `--clusters`, shared by every node kind and the launcher.
#[derive(Debug, Clone, Args)]
pub struct ClustersArg {
    /// Number of clusters: user u belongs to cluster ((u-1) mod N)+1.
    #[arg(long, env = "SNS_CLUSTERS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub clusters: u32,
}

/// `--servers-per-cluster`, shared by synchronizers and the launcher.
#[derive(Debug, Clone, Args)]
pub struct ServersPerClusterArg {
    /// Servers per cluster: 2 = master + slave, 1 = master only (a
    /// synchronizer declares a broker queue per cluster, consumed beside
    /// its master).
    #[arg(long, env = "SNS_SERVERS_PER_CLUSTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub servers_per_cluster: u32,
}

/// `--amqp-url`, shared by synchronizers and the launcher.
#[derive(Debug, Clone, Args)]
pub struct BrokerArg {
    /// RabbitMQ URL.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
}

/// `--advertise-host`, shared by servers and synchronizers.
#[derive(Debug, Clone, Args)]
pub struct AdvertiseArg {
    /// Host name or address other nodes and clients use to reach this node.
    #[arg(long, env = "SNS_ADVERTISE_HOST", default_value = "127.0.0.1")]
    pub advertise_host: String,
}

#[derive(Debug, Clone, Args)]
pub struct HeartbeatArgs {
    /// How often nodes send a heartbeat to the coordinator.
    #[arg(long = "heartbeat-interval", env = "SNS_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Heartbeats a node may miss before the coordinator declares it dead.
    #[arg(long = "missed-heartbeats", env = "SNS_MISSED_HEARTBEATS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub missed: u32,
}

/// Where the deployment's secret comes from: a file, or the environment
/// (`SNS_SECRET`, read directly so the value can never be a flag on a
/// command line). Without either, node-to-node calls and events between
/// clusters are not authenticated (the course's hand-run style).
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// File holding the deployment's secret (at least 32 characters).
    #[arg(long, env = "SNS_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
}

impl SecretArgs {
    pub fn load(&self) -> crate::error::Result<Option<crate::auth::Secret>> {
        crate::auth::Secret::load(self.secret_file.as_deref())
    }

    /// [`Self::load`] for a node listening on `bind`: without a secret on
    /// an address beyond loopback, it warns that anyone who reaches the
    /// port can steer the deployment.
    pub fn load_for(&self, bind: &str) -> crate::error::Result<Option<crate::auth::Secret>> {
        let secret = self.load()?;
        if secret.is_none() && !is_loopback(bind) {
            tracing::warn!(
                bind,
                "no deployment secret (SNS_SECRET_FILE): node-to-node calls and events between clusters are not authenticated, so anyone who reaches this port can register nodes and move masters"
            );
        }
        Ok(secret)
    }
}

/// Whether `bind` only listens on this machine.
fn is_loopback(bind: &str) -> bool {
    bind == "localhost" || bind.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Address to listen on.
    #[arg(long, env = "SNS_BIND", default_value = "0.0.0.0")]
    pub bind: String,
    /// Write the bound port to this file once listening (useful with -p 0).
    #[arg(long, env = "SNS_PORT_FILE")]
    pub port_file: Option<PathBuf>,
    /// Also serve the gRPC health service alone, in plain text, on this
    /// port (for probes that cannot speak TLS, e.g. the kubelet's).
    #[arg(long, env = "SNS_HEALTH_PORT")]
    pub health_port: Option<u16>,
    /// Serve Prometheus metrics (OpenMetrics text, `GET /metrics`) in plain
    /// HTTP on this port (0 = any free port).
    #[arg(long, env = "SNS_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Write the bound metrics port to this file (useful with --metrics-port 0).
    #[arg(long, env = "SNS_METRICS_PORT_FILE")]
    pub metrics_port_file: Option<PathBuf>,
}

impl ListenArgs {
    /// Binds the health and metrics ports this node was asked for.
    pub async fn bind_side_ports(
        &self,
        kind: crate::metrics::NodeKind,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> crate::error::Result<()> {
        if let Some(port) = self.health_port {
            crate::net::bind_health(&self.bind, port).await?;
        }
        crate::metrics::install(kind);
        if let Some(port) = self.metrics_port {
            crate::metrics::http::start(&self.bind, port, self.metrics_port_file.as_deref(), shutdown.clone()).await?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// Port to listen on (0 = any free port).
    #[arg(short = 'p', long, env = "SNS_PORT", default_value_t = 9000)]
    pub port: u16,
    #[command(flatten)]
    pub size: ClustersArg,
    /// Also serve the clients' SNSService here, forwarding each call to the
    /// caller's master (for clients that cannot reach the servers, e.g.
    /// through `kubectl port-forward`; use `tsc --gateway`).
    #[arg(long, env = "SNS_GATEWAY")]
    pub gateway: bool,
    /// Directory for the coordinator's records (terms, masters, which
    /// servers hold every acknowledged write), kept across restarts.
    #[arg(long, env = "SNS_DATA_DIR", default_value = "coordinator")]
    pub data_dir: PathBuf,
    /// How long a master keeps serving without renewing its role with this
    /// coordinator; capped at half of heartbeat-interval x missed-heartbeats.
    /// A crashed master is replaced after at most this long.
    #[arg(long, env = "SNS_LEASE", default_value = "1s", value_parser = parse_duration)]
    pub lease: Duration,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub ha: KubeHaArgs,
}

/// Replicated coordinators under Kubernetes.
#[derive(Debug, Clone, Args)]
pub struct KubeHaArgs {
    /// Run as one of several coordinator replicas under Kubernetes: elect a
    /// leader on this Lease (in the pod's namespace, POD_NAMESPACE); only
    /// the leader serves, and the records live in a ConfigMap, not in
    /// --data-dir (whose state file is imported once, into an empty
    /// ConfigMap). The replica's identity is POD_NAME (else HOSTNAME).
    #[arg(long, env = "SNS_KUBE_HA", value_name = "LEASE")]
    pub kube_ha: Option<String>,
    /// The ConfigMap holding the records [default: <LEASE>-records].
    #[arg(long, env = "SNS_KUBE_RECORDS", value_name = "CONFIGMAP", requires = "kube_ha")]
    pub kube_records: Option<String>,
    /// A standby takes the lease over once it has seen it unrenewed this
    /// long (whole seconds).
    #[arg(long, env = "SNS_HA_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    pub ha_lease_duration: Duration,
    /// The leader stops serving when it could not renew for this long
    /// (shorter than the lease duration, so it stops before a standby may
    /// take over).
    #[arg(long, env = "SNS_HA_RENEW_DEADLINE", default_value = "7s", value_parser = parse_duration)]
    pub ha_renew_deadline: Duration,
    /// How often the leader renews and a standby tries (shorter than the
    /// renew deadline).
    #[arg(long, env = "SNS_HA_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub ha_retry_period: Duration,
}

impl KubeHaArgs {
    /// The replication settings, when asked for; an error names what is
    /// missing or unsafe.
    pub fn config(&self) -> Result<Option<crate::coordinator::ha::HaConfig>, String> {
        let Some(lease) = self.kube_ha.clone().filter(|l| !l.is_empty()) else { return Ok(None) };
        let namespace = crate::kube::namespace()
            .ok_or("--kube-ha needs the pod's namespace: set POD_NAMESPACE (the downward API)")?;
        let identity =
            crate::kube::identity().ok_or("--kube-ha needs the replica's name: set POD_NAME (the downward API)")?;
        let cfg = crate::kube::leader::LeaseConfig {
            name: lease.clone(),
            namespace,
            identity,
            lease_duration: self.ha_lease_duration,
            renew_deadline: self.ha_renew_deadline,
            retry_period: self.ha_retry_period,
        };
        cfg.validate()?;
        let records = self.kube_records.clone().unwrap_or_else(|| format!("{lease}-records"));
        Ok(Some(crate::coordinator::ha::HaConfig { lease: cfg, records }))
    }
}

impl CoordinatorArgs {
    pub fn config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            clusters: self.size.clusters,
            gateway: self.gateway,
            heartbeat: self.heartbeat.interval,
            missed: self.heartbeat.missed,
            lease: self.lease,
            data_dir: Some(self.data_dir.clone()),
            secret: None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub coord: CoordAddrArgs,
    /// The cluster.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub cluster: u32,
    /// The server to promote.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub server: u32,
    /// Promote it even if it is not known to hold every acknowledged write:
    /// what it lacks is lost.
    #[arg(long)]
    pub accept_data_loss: bool,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchoverArgs {
    #[command(flatten)]
    pub coord: CoordAddrArgs,
    /// The cluster.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub cluster: u32,
    /// The server to hand the role to (default: the cluster's in-sync
    /// slave).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub to: Option<u32>,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub coord: CoordAddrArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Debug, Clone, Args)]
pub struct CoordAddrArgs {
    /// Coordinator host.
    #[arg(short = 'h', long = "coord-host", env = "SNS_COORD_HOST", default_value = "127.0.0.1")]
    pub coord_host: String,
    /// Coordinator port.
    #[arg(short = 'k', long = "coord-port", env = "SNS_COORD_PORT", default_value_t = 9000)]
    pub coord_port: u16,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Cluster id (1-based).
    #[arg(short = 'c', long, env = "SNS_CLUSTER", value_parser = clap::value_parser!(u32).range(1..))]
    pub cluster: u32,
    /// Server id within the cluster (1-based).
    #[arg(short = 's', long = "server-id", env = "SNS_SERVER_ID", value_parser = clap::value_parser!(u32).range(1..))]
    pub id: u32,
    #[command(flatten)]
    pub coord: CoordAddrArgs,
    /// Port to serve clients on (0 = any free port).
    #[arg(short = 'p', long, env = "SNS_PORT", default_value_t = 10000)]
    pub port: u16,
    /// Directory for this server's files [default: ./cluster_<c>/<id>].
    #[arg(long, env = "SNS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub size: ClustersArg,
    #[command(flatten)]
    pub advertise: AdvertiseArg,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// How long a journal write may go without ending or failing before
    /// this server counts its disk as hung, says it cannot write and (as
    /// master) steps down; a compaction gets six times as long. At least
    /// 1s [default: two heartbeat intervals, within 5s to 30s].
    #[arg(long, env = "SNS_DISK_STALL_LIMIT", value_parser = parse_stall_limit)]
    pub disk_stall_limit: Option<Duration>,
    /// While this server is under concurrent load (its last group commit
    /// carried more than one write and ended under 5 ms ago), how long
    /// its writer waits for more writes before the next group commit. An
    /// idle server or a lone client never waits. 0 turns it off; at most
    /// 100ms.
    #[arg(long, env = "SNS_COMMIT_DELAY", default_value = "1ms", value_parser = parse_commit_delay)]
    pub commit_delay: Duration,
    /// How long another cluster may stay short of the events the broker
    /// confirmed for it, while it holds events for a gap or its queue is
    /// empty, before this server (as master) has them published again:
    /// the broker lost them after confirming them. At least 1s.
    #[arg(long, env = "SNS_RESEND_AFTER", default_value = "3s", value_parser = parse_resend_after)]
    pub resend_after: Duration,
    /// Journal size (bytes) at which this server rewrites its journal as
    /// one snapshot of its state (when that is smaller), and again each
    /// time the journal doubles after that. At least 4096.
    #[arg(long, env = "SNS_COMPACT_AT", default_value_t = crate::store::log::COMPACT_AT, value_parser = parse_compact_at)]
    pub compact_at: u64,
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Address this server's own connections (to the coordinator, to its
    /// slave) leave from [default: the system's choice]. With several
    /// servers on one machine, each on a loopback address of its own (the
    /// local launcher), a firewall can tell one server's traffic from
    /// another's.
    #[arg(long, env = "SNS_SOURCE_ADDRESS")]
    pub source_address: Option<std::net::IpAddr>,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

/// A disk stall limit: below a second, a busy but working disk (an fsync
/// behind a burst of writeback) would pass for a hung one.
fn parse_stall_limit(text: &str) -> Result<Duration, String> {
    let limit = parse_duration(text)?;
    if limit < Duration::from_secs(1) {
        return Err(format!("{text} is too short: a working disk can take longer than that under load (at least 1s)"));
    }
    Ok(limit)
}

/// A resend delay: under a second, a destination merely busy with a burst
/// would get events again that it is about to apply.
fn parse_resend_after(text: &str) -> Result<Duration, String> {
    let after = parse_duration(text)?;
    if after < Duration::from_secs(1) {
        return Err(format!(
            "{text} is too short: a busy cluster would get events again that it is about to apply (at least 1s)"
        ));
    }
    Ok(after)
}

fn parse_compact_at(text: &str) -> Result<u64, String> {
    let bytes: u64 = text.trim().parse().map_err(|_| format!("{text} is not a number of bytes"))?;
    let min = crate::store::log::COMPACT_AT_MIN;
    if bytes < min {
        return Err(format!("{text} is too small: the server would rewrite its state all the time (at least {min})"));
    }
    Ok(bytes)
}

/// A commit delay: 0 (off) up to 100ms (a longer wait only adds latency).
fn parse_commit_delay(text: &str) -> Result<Duration, String> {
    if matches!(text.trim(), "0" | "0ms" | "0s") {
        return Ok(Duration::ZERO);
    }
    let delay = parse_duration(text)?;
    if delay > Duration::from_millis(100) {
        return Err(format!("{text} is too long: every write under load would wait that long (at most 100ms)"));
    }
    Ok(delay)
}

impl ServerArgs {
    pub fn config(&self) -> Result<ServerConfig, String> {
        if self.cluster > self.size.clusters {
            return Err(format!(
                "cluster {} does not exist in a deployment of {} clusters",
                self.cluster, self.size.clusters
            ));
        }
        Ok(ServerConfig {
            cluster: self.cluster,
            id: self.id,
            clusters: self.size.clusters,
            coord_host: self.coord.coord_host.clone(),
            coord_port: self.coord.coord_port,
            advertise_host: self.advertise.advertise_host.clone(),
            data_dir: self
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("cluster_{}", self.cluster)).join(self.id.to_string())),
            heartbeat: self.heartbeat.interval,
            disk_stall_limit: self.disk_stall_limit,
            secret: None,
            source_address: self.source_address,
            commit_delay: self.commit_delay,
            resend_after: self.resend_after,
            compact_at: self.compact_at,
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub coord: CoordAddrArgs,
    /// Port of this synchronizer's health endpoint (0 = any free port).
    #[arg(short = 'p', long, env = "SNS_PORT", default_value_t = 10100)]
    pub port: u16,
    /// Synchronizer id; its cluster is ((id-1) mod N)+1.
    #[arg(short = 'i', long, env = "SNS_SYNC_ID", value_parser = clap::value_parser!(u32).range(1..))]
    pub id: u32,
    /// Id of the server this synchronizer works beside [default: ((id-1) div N)+1].
    #[arg(long = "server-id", env = "SNS_SERVER_ID")]
    pub server_id: Option<u32>,
    /// host:port of that server [default: looked up in the coordinator].
    #[arg(long, env = "SNS_SERVER_ADDR")]
    pub server_addr: Option<String>,
    #[command(flatten)]
    pub size: ClustersArg,
    #[command(flatten)]
    pub servers: ServersPerClusterArg,
    #[command(flatten)]
    pub broker: BrokerArg,
    /// Prefix of every broker object, so deployments sharing a broker stay apart.
    #[arg(long, env = "SNS_DEPLOYMENT", default_value = "sns", value_parser = parse_deployment)]
    pub deployment: String,
    /// Let the broker delete this deployment's queues after they go unused this long.
    #[arg(long, env = "SNS_QUEUE_EXPIRES", value_parser = parse_duration)]
    pub queue_expires: Option<Duration>,
    /// The type of the deployment's queues: quorum needs a broker cluster
    /// of 3+ nodes; fixed when the queues are first declared.
    #[arg(long, env = "SNS_QUEUE_TYPE", value_enum, default_value_t = crate::sync::topology::QueueType::Classic)]
    pub queue_type: crate::sync::topology::QueueType,
    #[command(flatten)]
    pub advertise: AdvertiseArg,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub secret: SecretArgs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    pub help: Option<bool>,
}

#[derive(Debug, Clone, Args)]
/// `sns-node local`: a whole deployment as processes on this machine.
pub struct LocalArgs {
    /// An SnsCluster YAML file to take the topology from (overrides --clusters, --servers-per-cluster, heartbeat).
    #[arg(long, env = "SNS_SPEC")]
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub size: ClustersArg,
    #[command(flatten)]
    pub servers: ServersPerClusterArg,
    /// First port: coordinator on it, server (c,s) on +10c+s, its synchronizer on +10c+5+s. 0 = free ports.
    #[arg(long, env = "SNS_BASE_PORT", default_value_t = 9000)]
    pub base_port: u16,
    /// Directory for data and logs.
    #[arg(long, env = "SNS_DIR", default_value = "sns-data")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub broker: BrokerArg,
    /// Broker object prefix [default: the SnsCluster's name, else "sns"].
    #[arg(long, env = "SNS_DEPLOYMENT", value_parser = parse_deployment)]
    pub deployment: Option<String>,
    /// Let the broker drop this deployment's queues after they go unused this long.
    #[arg(long, env = "SNS_QUEUE_EXPIRES")]
    pub queue_expires: Option<String>,
    /// The type of the deployment's queues (passed to the synchronizers as
    /// SNS_QUEUE_TYPE): quorum needs a broker cluster.
    #[arg(long, env = "SNS_QUEUE_TYPE", value_enum, default_value_t = crate::sync::topology::QueueType::Classic)]
    pub queue_type: crate::sync::topology::QueueType,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Every server's --disk-stall-limit (at least 1s) [default: the
    /// servers' own, two heartbeat intervals within 5s to 30s].
    #[arg(long, env = "SNS_DISK_STALL_LIMIT", value_parser = parse_stall_limit)]
    pub disk_stall_limit: Option<Duration>,
    /// Do not try to start a local rabbitmq-server when no broker answers.
    #[arg(long)]
    pub no_broker_start: bool,
    /// The sns-node binary to run [default: this one].
    #[arg(long, env = "SNS_NODE_BIN")]
    pub node_bin: Option<PathBuf>,
    /// How long to wait for every node to be ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Stop every node when standard input ends (by default the launcher
    /// then runs until it is signalled): for a program that drives the
    /// launcher through its standard input, so that program's crash leaves
    /// nothing running.
    #[arg(long)]
    pub stop_on_stdin_eof: bool,
    /// The deployment's secret [default: `<dir>/secret`, made (mode 0600)
    /// if missing]. Every node gets it through `SNS_SECRET_FILE`.
    #[arg(long, env = "SNS_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Serve TLS on every port and make every node-to-node call over it,
    /// with a CA and a certificate for 127.0.0.1 / ::1 / localhost made
    /// under `<dir>/tls` (clients: `tsc --tls --ca <dir>/tls/ca.pem`).
    #[arg(long)]
    pub tls: bool,
    /// PEM CA an `amqps://` broker URL is checked against [default: the
    /// system's roots]; handed to every synchronizer.
    #[arg(long, env = "SNS_AMQP_CA")]
    pub amqp_ca: Option<PathBuf>,
}

/// Every command of the launcher's console, with what it does: one place
/// for `sns-node local --help`, the console's `help` and its start-up hint.
pub const CONSOLE_COMMANDS: &[(&str, &str)] = &[
    ("status", "the routing table (role, term, in sync, heartbeat, backlog) with pids and ports"),
    ("kill <name>", "SIGKILL a process (e.g. kill master-2, kill server-2-1, kill sync-3-2)"),
    ("stop <name>", "SIGTERM a process and wait for it to exit"),
    (
        "start <name> [--clock <offset>]",
        "start a stopped process again, on its port and data directory; --clock runs it on a clock that far off (e.g. -1d, +30s, -2h; needs libfaketime)",
    ),
    ("restart <name> [--clock <offset>]", "kill, then start"),
    ("pause <name>", "SIGSTOP a process (a hung node)"),
    ("resume <name>", "SIGCONT a paused process"),
    (
        "partition <server> [<server>]",
        "cut a server off from the coordinator, or two servers off from each other (needs nftables and root); not from their clients",
    ),
    ("heal <server> [<server>]", "end a partition"),
    ("promote <server> [--accept-data-loss]", "the operator's override: make a server its cluster's master"),
    ("switchover <cluster> [<server>]", "hand a cluster's master role to an in-sync server"),
    ("help", "this list"),
];

/// The names console commands take.
pub const CONSOLE_NAMES: &str = "names: coordinator, server-<c>-<s>, sync-<c>-<s>, master-<c>, slave-<c>";

/// One line per console command.
pub fn console_help() -> String {
    let width = CONSOLE_COMMANDS.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    let mut out = String::from("commands:\n");
    for (cmd, what) in CONSOLE_COMMANDS {
        out.push_str(&format!("  {cmd:<width$}  {what}\n"));
    }
    out.push_str(&format!("  ({CONSOLE_NAMES})"));
    out
}

/// Deployment names become broker object names: keep them to a safe alphabet.
pub fn parse_deployment(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(text.to_string()) } else { Err(format!("{text:?}: use 1-64 letters, digits, '-' or '_'")) }
}

impl SyncArgs {
    pub fn config(&self) -> Result<SyncConfig, String> {
        let clusters = self.size.clusters;
        let (cluster, derived) = sync_pairing(self.id, clusters);
        debug_assert_eq!(cluster, cluster_of(self.id, clusters));
        Ok(SyncConfig {
            id: self.id,
            cluster,
            paired_server: self.server_id.unwrap_or(derived),
            clusters,
            servers_per_cluster: self.servers.servers_per_cluster,
            coord_host: self.coord.coord_host.clone(),
            coord_port: self.coord.coord_port,
            advertise_host: self.advertise.advertise_host.clone(),
            server_addr: self.server_addr.clone(),
            amqp_url: self.broker.amqp_url.clone(),
            deployment: self.deployment.clone(),
            queue_expires: self.queue_expires,
            queue_type: self.queue_type,
            heartbeat: self.heartbeat.interval,
            secret: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["sns-node", "status", "-h", "10.0.0.2", "-k", "9100", "--secret-file", "/s"]).unwrap();
        assert_eq!(cli.log_filter(), "warn", "a one-shot command logs warnings only");
        let Command::Status(s) = cli.command else { panic!("not status: {cli:?}") };
        assert_eq!((s.coord.coord_host.as_str(), s.coord.coord_port), ("10.0.0.2", 9100));
        let cli = Cli::try_parse_from(["sns-node", "--log", "debug", "status"]).unwrap();
        assert_eq!(cli.log_filter(), "debug");
    }

    #[test]
    fn the_compaction_size_is_a_number_of_bytes_not_too_small() {
        assert_eq!(parse_compact_at("16384"), Ok(16384));
        assert_eq!(parse_compact_at(" 4096 "), Ok(4096));
        assert!(parse_compact_at("4095").unwrap_err().contains("at least 4096"));
        assert!(parse_compact_at("64MiB").unwrap_err().contains("not a number of bytes"));
    }

    #[test]
    fn only_loopback_binds_go_without_the_unauthenticated_warning() {
        for bind in ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"] {
            assert!(is_loopback(bind), "{bind}");
        }
        for bind in ["0.0.0.0", "::", "10.0.0.5", "sns-node-0.sns", ""] {
            assert!(!is_loopback(bind), "{bind}");
        }
    }

    #[test]
    fn course_flags_parse() {
        let cli = Cli::try_parse_from([
            "sns-node", "server", "-c", "2", "-s", "1", "-h", "10.0.0.1", "-k", "9001", "-p", "10000",
        ])
        .unwrap();
        let Command::Server(s) = cli.command else { panic!("not a server") };
        let cfg = s.config().unwrap();
        assert_eq!((cfg.cluster, cfg.id, cfg.coord_port), (2, 1, 9001));
        assert_eq!(cfg.coord_host, "10.0.0.1");
        assert_eq!(cfg.data_dir, PathBuf::from("cluster_2/1"));
        assert_eq!(cfg.heartbeat, Duration::from_secs(5));

        let cli =
            Cli::try_parse_from(["sns-node", "synchronizer", "-h", "localhost", "-k", "9000", "-p", "9100", "-i", "5"])
                .unwrap();
        let Command::Synchronizer(s) = cli.command else { panic!("not a synchronizer") };
        let cfg = s.config().unwrap();
        assert_eq!((cfg.cluster, cfg.paired_server), (2, 2));
        assert_eq!(cfg.deployment, "sns");

        assert!(
            Cli::try_parse_from(["sns-node", "server", "--help"]).is_err(),
            "--help prints help (as a clap 'error')"
        );
        assert!(Cli::try_parse_from(["sns-node", "server", "-c", "4", "-s", "1"]).unwrap().command.server_config_err());
    }

    /// The configuration of `sns-node server -c 1 -s 1 <extra>`, or why
    /// the arguments were refused.
    fn server_with(extra: &[&str]) -> Result<ServerConfig, clap::Error> {
        let args = [&["sns-node", "server", "-c", "1", "-s", "1"][..], extra].concat();
        Cli::try_parse_from(args).map(|cli| match cli.command {
            Command::Server(s) => s.config().unwrap(),
            _ => panic!("not a server"),
        })
    }

    #[test]
    fn a_disk_stall_limit_is_taken_when_sane() {
        let server = |extra: &[&str]| server_with(extra).map(|c| c.disk_stall_limit);
        assert_eq!(server(&[]).unwrap(), None, "derived from the heartbeat unless set");
        assert_eq!(server(&["--disk-stall-limit", "2s"]).unwrap(), Some(Duration::from_secs(2)));
        let err = server(&["--disk-stall-limit", "500ms"]).unwrap_err().to_string();
        assert!(err.contains("too short") && err.contains("at least 1s"), "{err}");
    }

    #[test]
    fn a_commit_delay_is_taken_when_sane() {
        let server = |extra: &[&str]| server_with(extra).map(|c| c.commit_delay);
        assert_eq!(server(&[]).unwrap(), crate::server::DEFAULT_COMMIT_DELAY);
        assert_eq!(server(&["--commit-delay", "0"]).unwrap(), Duration::ZERO);
        assert_eq!(server(&["--commit-delay", "3ms"]).unwrap(), Duration::from_millis(3));
        let err = server(&["--commit-delay", "2"]).unwrap_err().to_string();
        assert!(err.contains("too long") && err.contains("at most 100ms"), "{err}");
        assert!(server(&["--commit-delay", "soon"]).is_err());
    }

    impl Command {
        fn server_config_err(&self) -> bool {
            matches!(self, Command::Server(s) if s.config().is_err())
        }
    }

    #[test]
    fn durations_and_names() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration(" 1s "), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("25h").is_err() && parse_duration("2x").is_err());
        assert!(parse_deployment("ci-42_x").is_ok());
        assert!(parse_deployment("a.b").is_err());
        assert!(parse_deployment("").is_err());
    }
}
