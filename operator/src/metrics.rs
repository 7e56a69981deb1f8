//! Counters in the Prometheus text format and the liveness rule, served by
//! a deliberately tiny HTTP/1.1 responder (`GET /metrics`, `/healthz`,
//! `/readyz`): three fixed routes do not justify an HTTP framework.
//!
//! Liveness fails when the controller has stalled: SnsClusters exist but
//! none was reconciled for the stall timeout (every SnsCluster is requeued
//! at least every 10 s, so silence means a stuck loop), or the watch on
//! the API server has been failing continuously for that long.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Two watch errors further apart than this are separate incidents: the
/// watcher's own backoff retries at most every 30 s while it keeps failing.
const WATCH_ERROR_STREAK_GAP: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: AtomicU64,
    failovers: AtomicU64,
    events: AtomicU64,
    applies: AtomicU64,
    watch_errors: AtomicU64,
    reconcile_micros: AtomicU64,
    last_reconcile_unix_ms: AtomicU64,
    state: Mutex<Liveness>,
}

#[derive(Debug)]
struct Liveness {
    last_reconcile: Instant,
    watch_error_streak: Option<(Instant, Instant)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconciles: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            events: AtomicU64::new(0),
            applies: AtomicU64::new(0),
            watch_errors: AtomicU64::new(0),
            reconcile_micros: AtomicU64::new(0),
            last_reconcile_unix_ms: AtomicU64::new(0),
            state: Mutex::new(Liveness { last_reconcile: Instant::now(), watch_error_streak: None }),
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration, ok: bool) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.reconcile_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.last_reconcile_unix_ms.store(unix_ms, Ordering::Relaxed);
        self.state.lock().expect("metrics lock").last_reconcile = Instant::now();
    }

    pub fn failover(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn event(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn applied(&self) {
        self.applies.fetch_add(1, Ordering::Relaxed);
    }

    pub fn watch_error(&self) {
        self.watch_error_at(Instant::now());
    }

    fn watch_error_at(&self, now: Instant) {
        self.watch_errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state.lock().expect("metrics lock");
        s.watch_error_streak = match s.watch_error_streak {
            Some((start, last)) if now.duration_since(last) < WATCH_ERROR_STREAK_GAP => Some((start, now)),
            _ => Some((now, now)),
        };
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
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

    /// The Prometheus text exposition.
    pub fn render(&self, objects: usize) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric("sns_operator_reconciles_total", "counter", "Reconciles run.", get(&self.reconciles).to_string());
        metric(
            "sns_operator_reconcile_failures_total",
            "counter",
            "Reconciles that returned an error.",
            get(&self.failures).to_string(),
        );
        metric(
            "sns_operator_reconcile_seconds_total",
            "counter",
            "Time spent reconciling.",
            format!("{:.6}", get(&self.reconcile_micros) as f64 / 1e6),
        );
        metric(
            "sns_operator_last_reconcile_timestamp_seconds",
            "gauge",
            "Unix time of the last finished reconcile.",
            format!("{:.3}", get(&self.last_reconcile_unix_ms) as f64 / 1e3),
        );
        metric(
            "sns_operator_applies_total",
            "counter",
            "Full server-side applies of an SnsCluster's children.",
            get(&self.applies).to_string(),
        );
        metric(
            "sns_operator_failovers_total",
            "counter",
            "Master changes seen in SNS clusters.",
            get(&self.failovers).to_string(),
        );
        metric("sns_operator_events_total", "counter", "Kubernetes Events published.", get(&self.events).to_string());
        metric(
            "sns_operator_watch_errors_total",
            "counter",
            "Errors from the watch on the API server.",
            get(&self.watch_errors).to_string(),
        );
        metric("sns_operator_snsclusters", "gauge", "SnsClusters the operator knows.", objects.to_string());
        out
    }
}

/// What the HTTP endpoint reads: the metrics, the stall timeout and how
/// many SnsClusters the controller's cache holds.
pub struct Endpoint {
    pub metrics: std::sync::Arc<Metrics>,
    pub stall: Duration,
    pub objects: Box<dyn Fn() -> usize + Send + Sync>,
}

impl Endpoint {
    fn respond(&self, path: &str) -> (u16, &'static str, String) {
        let objects = (self.objects)();
        match path {
            "/metrics" => (200, "text/plain; version=0.0.4", self.metrics.render(objects)),
            "/healthz" => match self.metrics.liveness(Instant::now(), self.stall, objects) {
                Ok(()) => (200, "text/plain", "ok\n".into()),
                Err(why) => (503, "text/plain", format!("{why}\n")),
            },
            "/readyz" => (200, "text/plain", "ok\n".into()),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }
}

/// Serves `endpoint` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, endpoint: std::sync::Arc<Endpoint>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    continue;
                }
            },
        };
        let endpoint = endpoint.clone();
        // One short exchange per connection, bounded in time so a slow
        // client cannot pile up tasks.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), exchange(stream, &endpoint)).await;
        });
    }
}

async fn exchange(mut stream: TcpStream, endpoint: &Endpoint) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (status, ctype, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => endpoint.respond(path.split('?').next().unwrap_or(path)),
        _ => (405, "text/plain", "only GET\n".to_string()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn liveness_fails_on_a_stalled_loop_or_a_failing_watch() {
        let m = Metrics::default();
        let stall = Duration::from_secs(120);
        let t0 = Instant::now();
        assert!(m.liveness(t0, stall, 3).is_ok());
        assert!(m.liveness(t0 + stall, stall, 0).is_ok(), "nothing to reconcile is not a stall");
        let why = m.liveness(t0 + stall + Duration::from_secs(1), stall, 3).unwrap_err();
        assert!(why.contains("no reconcile"), "{why}");

        let m = Metrics::default();
        // Errors every 30 s for 2.5 minutes: one continuous failure.
        for i in 0..6 {
            m.watch_error_at(t0 + Duration::from_secs(30 * i));
        }
        m.reconciled(Duration::from_millis(1), true);
        let now = t0 + Duration::from_secs(151);
        let why = m.liveness(now, stall, 0).unwrap_err();
        assert!(why.contains("watch"), "{why}");
        // Once the errors stop, the watch counts as recovered.
        assert!(m.liveness(t0 + Duration::from_secs(150 + 61), stall, 0).is_ok());
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_health() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled(Duration::from_millis(250), true);
        metrics.reconciled(Duration::from_millis(250), false);
        metrics.failover();
        let objects = Arc::new(AtomicUsize::new(2));
        let seen = objects.clone();
        let endpoint = Arc::new(Endpoint {
            metrics: metrics.clone(),
            stall: Duration::from_secs(1),
            objects: Box::new(move || seen.load(Ordering::Relaxed)),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoint, shutdown.clone()));

        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
        assert!(m.contains("\nsns_operator_reconciles_total 2\n"), "{m}");
        assert!(m.contains("\nsns_operator_reconcile_failures_total 1\n"), "{m}");
        assert!(m.contains("\nsns_operator_reconcile_seconds_total 0.500000\n"), "{m}");
        assert!(m.contains("\nsns_operator_failovers_total 1\n"), "{m}");
        assert!(m.contains("\nsns_operator_snsclusters 2\n"), "{m}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        // No reconcile for longer than the stall timeout, with objects to
        // reconcile: unhealthy, until a reconcile happens again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = get(addr, "/healthz").await;
            if h.starts_with("HTTP/1.1 503") {
                assert!(h.contains("no reconcile"), "{h}");
                break;
            }
            assert!(Instant::now() < deadline, "never reported the stall");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        metrics.reconciled(Duration::from_millis(1), true);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        objects.store(0, Ordering::Relaxed);
        shutdown.cancel();
        server.await.unwrap();
    }
}
