//! The node's Prometheus metrics: one registry per process, holding what
//! the node kind running in it measures, served as OpenMetrics text on
//! `GET /metrics` ([`http`]) on `--metrics-port`.
//!
//! Every metric lives in one process-wide [`Metrics`] (cheap handles, bumped
//! from wherever the event happens); [`install`] registers the ones that
//! mean something for this process's node kind, so a coordinator does not
//! export post counters that stay at zero. Server and synchronizer metrics
//! carry `cluster` and `server` (or `sync`) labels: a launcher's processes
//! scraped together stay apart without relabelling.

pub mod grpc;
pub mod http;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};

/// Content type of the OpenMetrics text `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `Service/Method`, without the protobuf package.
    pub rpc: String,
    /// The gRPC status code's name (`Ok`, `Unavailable`, ...).
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LiveLabels {
    pub cluster: u32,
    /// `server` or `synchronizer`.
    pub kind: &'static str,
}

/// Which node this process runs: decides what [`install`] registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Coordinator,
    Server { cluster: u32, id: u32 },
    Synchronizer { cluster: u32, id: u32 },
}

/// Every metric a node may export.
#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RpcLabels, Counter>,
    // Server.
    pub posts_committed: Counter,
    pub post_commit_seconds: Histogram,
    pub commit_group_writes: Histogram,
    pub commit_wait_seconds: Histogram,
    pub commit_cycle_seconds: Histogram,
    pub timeline_streams: Gauge,
    pub replication_lag_records: Gauge,
    pub replication_seconds: Histogram,
    pub master: Gauge,
    pub term: Gauge,
    // Synchronizer.
    pub published: Counter,
    pub consumed: Counter,
    pub applied: Counter,
    pub dead_lettered: Counter,
    pub resent: Counter,
    pub deferred: Counter,
    pub outbox_backlog: Gauge,
    pub propagation_seconds: Histogram,
    pub link_up: Gauge,
    // Coordinator.
    pub failovers: Family<ClusterLabels, Counter>,
    pub failover_seconds: Histogram,
    pub live_nodes: Family<LiveLabels, Gauge>,
    pub cluster_term: Family<ClusterLabels, Gauge>,
}

/// Buckets from 0.5 ms to ~16 s (x2 each): a commit is a journal fsync
/// and a forward to the slave, milliseconds on a healthy disk; a stalled
/// one shows up in the top buckets rather than vanishing into +Inf.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Buckets from 50 µs to ~1.6 s (x2 each): the writer's own steps, a
/// fraction of a commit.
fn fine_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

/// Buckets from 10 ms to ~80 s: failovers wait for a lease (1 s by
/// default) and a heartbeat timeout; propagation crosses a broker.
fn slow_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            posts_committed: Counter::default(),
            post_commit_seconds: latency_buckets(),
            commit_group_writes: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_wait_seconds: fine_buckets(),
            commit_cycle_seconds: fine_buckets(),
            timeline_streams: Gauge::default(),
            replication_lag_records: Gauge::default(),
            replication_seconds: latency_buckets(),
            master: Gauge::default(),
            term: Gauge::default(),
            published: Counter::default(),
            consumed: Counter::default(),
            applied: Counter::default(),
            dead_lettered: Counter::default(),
            resent: Counter::default(),
            deferred: Counter::default(),
            outbox_backlog: Gauge::default(),
            propagation_seconds: slow_buckets(),
            link_up: Gauge::default(),
            failovers: Family::default(),
            failover_seconds: slow_buckets(),
            live_nodes: Family::default(),
            cluster_term: Family::default(),
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);
static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// This process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Registers the metrics of `kind` in the process's registry (once; a
/// second call is ignored, there is one node per process).
pub fn install(kind: NodeKind) {
    let m = get();
    let labels: Vec<(Cow<'static, str>, Cow<'static, str>)> = match kind {
        NodeKind::Coordinator => vec![],
        NodeKind::Server { cluster, id } => {
            vec![("cluster".into(), cluster.to_string().into()), ("server".into(), id.to_string().into())]
        }
        NodeKind::Synchronizer { cluster, id } => {
            vec![("cluster".into(), cluster.to_string().into()), ("sync".into(), id.to_string().into())]
        }
    };
    let mut r = Registry::with_prefix_and_labels("sns", labels.into_iter());
    r.register("grpc_requests", "gRPC requests served, by RPC and status code", m.requests.clone());
    match kind {
        NodeKind::Server { .. } => {
            r.register("posts_committed", "Posts committed by this server as master", m.posts_committed.clone());
            r.register(
                "post_commit_seconds",
                "From a post's arrival to its commit (journal, slave, fsync)",
                m.post_commit_seconds.clone(),
            );
            r.register(
                "commit_group_writes",
                "Writes (client writes, posts, batches of other clusters' events) per group commit",
                m.commit_group_writes.clone(),
            );
            r.register(
                "commit_wait_seconds",
                "From a write's arrival at the writer's queue to the start of the group that carries it (the previous group's commit, then the commit delay)",
                m.commit_wait_seconds.clone(),
            );
            r.register(
                "commit_cycle_seconds",
                "One group commit: decide, journal and fsync, forward to the slave, answer",
                m.commit_cycle_seconds.clone(),
            );
            r.register("timeline_streams", "Open Timeline streams", m.timeline_streams.clone());
            r.register(
                "replication_lag_records",
                "Journal records this master holds that its slave was not sent",
                m.replication_lag_records.clone(),
            );
            r.register(
                "replication_seconds",
                "Round trip of one forward to the slave (Replica.Replicate)",
                m.replication_seconds.clone(),
            );
            r.register("master", "1 while this server is its cluster's master, else 0", m.master.clone());
            r.register("term", "The term of this server's role", m.term.clone());
        }
        NodeKind::Synchronizer { .. } => {
            r.register(
                "sync_published_events",
                "Outbox events published and confirmed by the broker",
                m.published.clone(),
            );
            r.register("sync_consumed_events", "Events taken from the cluster's queue", m.consumed.clone());
            r.register(
                "sync_applied_events",
                "Events newly applied by the master (duplicates not counted)",
                m.applied.clone(),
            );
            r.register(
                "sync_dead_lettered_events",
                "Events and messages sent to the dead-letter queue",
                m.dead_lettered.clone(),
            );
            r.register(
                "sync_resent_events",
                "Events published again because a receiving cluster stopped short of what the broker had confirmed",
                m.resent.clone(),
            );
            r.register(
                "sync_deferred_events",
                "Events the master had no room to hold behind a gap, left for their origin to send again",
                m.deferred.clone(),
            );
            r.register(
                "sync_outbox_backlog_events",
                "Events in the paired server's outbox not yet confirmed by the broker",
                m.outbox_backlog.clone(),
            );
            r.register(
                "sync_propagation_seconds",
                "From a post's time at its origin to its apply in this cluster",
                m.propagation_seconds.clone(),
            );
            r.register(
                "sync_link_up",
                "1 while linked to both the paired server and the broker, else 0",
                m.link_up.clone(),
            );
        }
        NodeKind::Coordinator => {
            r.register("coordinator_failovers", "Masters replaced by another server", m.failovers.clone());
            r.register(
                "coordinator_failover_seconds",
                "From the old master's last lease renewal to its successor being recorded",
                m.failover_seconds.clone(),
            );
            r.register("coordinator_live_nodes", "Nodes heartbeating, by cluster and kind", m.live_nodes.clone());
            r.register("coordinator_term", "Each cluster's current term", m.cluster_term.clone());
        }
    }
    let _ = REGISTRY.set(r);
}

/// The exposition, as OpenMetrics text.
pub fn render() -> String {
    let mut out = String::new();
    if let Some(r) = REGISTRY.get() {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, r);
    }
    out
}
