//! The operator's Prometheus metrics (the `prometheus-client` crate) and the
//! liveness rule, served over HTTP/1 by hyper (`GET /metrics`, `/healthz`,
//! `/readyz`).
//!
//! Liveness fails when the controller has stalled: SnsClusters exist but
//! none was reconciled for the stall timeout (every SnsCluster is requeued
//! at least every 10 s, so silence means a stuck loop), or the watch on
//! the API server has been failing continuously for that long. A standby
//! (not the leader) reconciles nothing and knows no SnsClusters, so it is
//! never stalled.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Two watch errors further apart than this are separate incidents: the
/// watcher's own backoff retries at most every 30 s while it keeps failing.
const WATCH_ERROR_STREAK_GAP: Duration = Duration::from_secs(60);

/// Content type of the OpenMetrics text that `prometheus-client` writes
/// (Prometheus asks for it first when it scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    failures_total: Counter,
    duration: Histogram,
    last_reconcile: Gauge<f64, AtomicU64>,
    applies: Counter,
    failovers: Counter,
    events: Counter,
    watch_errors: Counter,
    snsclusters: Gauge,
    leader: Gauge,
    state: Mutex<Liveness>,
}

#[derive(Debug)]
struct Liveness {
    last_reconcile: Instant,
    watch_error_streak: Option<(Instant, Instant)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sns_operator");
        // Counters get their `_total` suffix from the encoder.
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register("reconcile_failures", "Reconciles that returned an error, by reason", failures.clone());
        // 5 ms (a steady-state poll: one routing-table call, no writes) to
        // 41 s (a full apply against a slow API server), doubling.
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("reconcile_duration_seconds", "Time one reconcile took", duration.clone());
        let last_reconcile = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_reconcile_timestamp_seconds",
            "Unix time of the last finished reconcile",
            last_reconcile.clone(),
        );
        let applies = Counter::default();
        registry.register("applies", "Full server-side applies of an SnsCluster's children", applies.clone());
        let failovers = Counter::default();
        registry.register("failovers", "Master changes seen in SNS clusters", failovers.clone());
        let events = Counter::default();
        registry.register("events", "Kubernetes Events published", events.clone());
        let watch_errors = Counter::default();
        registry.register("watch_errors", "Errors from the watch on the API server", watch_errors.clone());
        let snsclusters = Gauge::default();
        registry.register("snsclusters", "SnsClusters the operator knows", snsclusters.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the lease and reconciles, else 0", leader.clone());
        Metrics {
            registry,
            reconciles,
            failures,
            failures_total: Counter::default(),
            duration,
            last_reconcile,
            applies,
            failovers,
            events,
            watch_errors,
            snsclusters,
            leader,
            state: Mutex::new(Liveness { last_reconcile: Instant::now(), watch_error_streak: None }),
        }
    }
}

impl Metrics {
    /// One reconcile finished after `took`; `failure` is the error's reason
    /// (`Error::reason`) when it failed.
    pub fn reconciled(&self, took: Duration, failure: Option<&'static str>) {
        self.reconciles.inc();
        if let Some(reason) = failure {
            self.failures.get_or_create(&FailureLabels { reason }).inc();
            self.failures_total.inc();
        }
        self.duration.observe(took.as_secs_f64());
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.last_reconcile.set(unix);
        self.state.lock().expect("metrics lock").last_reconcile = Instant::now();
    }

    pub fn failover(&self) {
        self.failovers.inc();
    }

    pub fn event(&self) {
        self.events.inc();
    }

    pub fn applied(&self) {
        self.applies.inc();
    }

    pub fn watch_error(&self) {
        self.watch_error_at(Instant::now());
    }

    fn watch_error_at(&self, now: Instant) {
        self.watch_errors.inc();
        let mut s = self.state.lock().expect("metrics lock");
        s.watch_error_streak = match s.watch_error_streak {
            Some((start, last)) if now.duration_since(last) < WATCH_ERROR_STREAK_GAP => Some((start, now)),
            _ => Some((now, now)),
        };
    }

    /// This replica starts or stops reconciling. A new leader's stall
    /// timer starts now: it did nothing while it stood by.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if leading {
            let mut s = self.state.lock().expect("metrics lock");
            s.last_reconcile = Instant::now();
            s.watch_error_streak = None;
        }
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }
    pub fn failures(&self) -> u64 {
        self.failures_total.get()
    }
    pub fn failovers(&self) -> u64 {
        self.failovers.get()
    }

    /// Ok, or why the operator should be restarted.
    pub fn liveness(&self, now: Instant, stall: Duration, objects: usize) -> Result<(), String> {
        let s = self.state.lock().expect("metrics lock");
        if let Some((start, last)) = s.watch_error_streak
            && now.saturating_duration_since(last) < WATCH_ERROR_STREAK_GAP
            && now.saturating_duration_since(start) >= stall
        {
            return Err(format!("the watch has been failing for {}s", now.saturating_duration_since(start).as_secs()));
        }
        let idle = now.saturating_duration_since(s.last_reconcile);
        if objects > 0 && idle >= stall {
            return Err(format!("{objects} SnsClusters but no reconcile for {}s", idle.as_secs()));
        }
        Ok(())
    }

    /// The exposition (OpenMetrics text, which Prometheus scrapes).
    pub fn render(&self, objects: usize) -> String {
        self.snsclusters.set(i64::try_from(objects).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode metrics");
        out
    }
}

/// What the HTTP endpoint reads: the metrics, the stall timeout and how
/// many SnsClusters the controller's cache holds.
pub struct Endpoint {
    pub metrics: Arc<Metrics>,
    pub stall: Duration,
    pub objects: Box<dyn Fn() -> usize + Send + Sync>,
}

impl Endpoint {
    fn respond(&self, method: &Method, path: &str) -> Response<Full<Bytes>> {
        let (status, ctype, body) = if method != Method::GET && method != Method::HEAD {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".to_string())
        } else {
            let objects = (self.objects)();
            match path {
                "/metrics" => (StatusCode::OK, CONTENT_TYPE, self.metrics.render(objects)),
                "/healthz" => match self.metrics.liveness(Instant::now(), self.stall, objects) {
                    Ok(()) => (StatusCode::OK, "text/plain", "ok\n".into()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
                },
                "/readyz" => (StatusCode::OK, "text/plain", "ok\n".into()),
                _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
            }
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
        response
    }
}

/// Serves `endpoint` on `listener` until `shutdown`, then lets the
/// connections finish the request they are on (the nodes' HTTP/1 server).
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>, shutdown: CancellationToken) {
    let respond = move |method: &Method, path: &str| endpoint.respond(method, path);
    sns_node::metrics::http::serve_with(listener, respond, shutdown).await
}

#[cfg(test)]
pub(crate) mod tests;
