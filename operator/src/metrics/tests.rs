use super::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parses an OpenMetrics / Prometheus text exposition the way a scraper
/// does, strictly: metadata names a family, every sample belongs to the
/// family declared before it with a suffix its type allows, labels are
/// quoted and escaped, values are numbers, no sample repeats, histogram
/// buckets are cumulative and end at `+Inf` = `_count`, and `# EOF` ends
/// the text. Returns each sample as `name{label="value",...}` (labels
/// sorted) -> value.
pub(crate) fn parse_exposition(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut samples = BTreeMap::new();
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut family: Option<(String, String)> = None;
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let Some(body) = text.strip_suffix("# EOF\n") else {
        return Err("does not end with `# EOF`".into());
    };
    for (n, line) in body.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", n + 1);
        if let Some(meta) = line.strip_prefix("# ") {
            let mut parts = meta.splitn(3, ' ');
            let (kind, name, rest) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
            check_name(name).map_err(at)?;
            match kind {
                "TYPE" => {
                    let ty = rest.unwrap_or("");
                    if !["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"].contains(&ty) {
                        return Err(at(format!("unknown type {ty:?}")));
                    }
                    if families.insert(name.to_string(), ty.to_string()).is_some() {
                        return Err(at("family declared twice".into()));
                    }
                    family = Some((name.to_string(), ty.to_string()));
                }
                "HELP" | "UNIT" => {
                    if family.as_ref().is_some_and(|(f, _)| f != name) && families.contains_key(name) {
                        return Err(at("metadata of a family already closed".into()));
                    }
                }
                _ => return Err(at(format!("unknown metadata {kind:?}"))),
            }
            continue;
        }
        let (name, labels, value) = split_sample(line).map_err(at)?;
        let Some((fam, ty)) = &family else { return Err(at("sample before any # TYPE".into())) };
        let suffix = name.strip_prefix(fam.as_str()).ok_or_else(|| at(format!("not in family {fam}")))?;
        let allowed: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            _ => &[""],
        };
        if !allowed.contains(&suffix) {
            return Err(at(format!("suffix {suffix:?} is not one a {ty} has")));
        }
        let mut sorted = labels.clone();
        sorted.sort();
        if suffix == "_bucket" {
            let (le, rest): (Vec<_>, Vec<_>) = sorted.iter().cloned().partition(|(k, _)| k == "le");
            let le = le.first().ok_or_else(|| at("a bucket without le".into()))?;
            let bound = parse_value(&le.1).map_err(at)?;
            buckets.entry(key(&format!("{fam}_bucket"), &rest)).or_default().push((bound, value));
        }
        if samples.insert(key(name, &sorted), value).is_some() {
            return Err(at("sample repeated".into()));
        }
    }
    for (series, bs) in &buckets {
        let ordered = bs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let last = bs.last().expect("at least one bucket");
        let count = samples.get(&series.replacen("_bucket", "_count", 1));
        if !ordered || last.0 != f64::INFINITY || count != Some(&last.1) {
            return Err(format!("{series}: buckets {bs:?} are not cumulative up to +Inf = _count {count:?}"));
        }
    }
    Ok(samples)
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse().map_err(|_| format!("bad value {v:?}")),
    }
}

type Labels = Vec<(String, String)>;

fn split_sample(line: &str) -> Result<(&str, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut l) = rest.strip_prefix('{') {
        while !l.starts_with('}') {
            let eq = l.find("=\"").ok_or("a label without =\"")?;
            let label = &l[..eq];
            if label.is_empty() || label.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!("bad label name {label:?}"));
            }
            check_name(label)?;
            let mut value = String::new();
            let mut chars = l[eq + 2..].char_indices();
            let close = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value".into()),
                }
            };
            labels.push((label.to_string(), value));
            l = &l[eq + 2 + close + 1..];
            l = l.strip_prefix(',').unwrap_or(l);
        }
        rest = &l[1..];
    }
    let mut fields = rest.strip_prefix(' ').ok_or("no space before the value")?.split(' ');
    let value = parse_value(fields.next().unwrap_or(""))?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok((name, labels, value))
}

fn key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

pub(crate) struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

pub(crate) async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {out:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_string))
        .unwrap_or_default();
    Reply { status, content_type, body: body.to_string() }
}

pub(crate) async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let r = request(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("application/openmetrics-text"), "{}", r.content_type);
    parse_exposition(&r.body).unwrap_or_else(|e| panic!("{e}\n{}", r.body))
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
    m.reconciled(Duration::from_millis(1), None);
    let now = t0 + Duration::from_secs(151);
    let why = m.liveness(now, stall, 0).unwrap_err();
    assert!(why.contains("watch"), "{why}");
    // Once the errors stop, the watch counts as recovered.
    assert!(m.liveness(t0 + Duration::from_secs(150 + 61), stall, 0).is_ok());
}

#[test]
fn watch_errors_are_counted() {
    let m = Metrics::default();
    m.watch_error();
    m.watch_error();
    let samples = parse_exposition(&m.render(0)).unwrap();
    assert_eq!(samples["sns_operator_watch_errors_total"], 2.0);
}

#[test]
fn a_new_leader_reports_it_and_starts_its_health_afresh() {
    let m = Metrics::default();
    assert_eq!(parse_exposition(&m.render(0)).unwrap()["sns_operator_leader"], 0.0);
    let t0 = Instant::now();
    for i in 0..6 {
        m.watch_error_at(t0 + Duration::from_secs(30 * i));
    }
    let stall = Duration::from_secs(120);
    assert!(m.liveness(t0 + Duration::from_secs(151), stall, 0).is_err());
    // A standby's old watch troubles are not the new leader's.
    m.set_leader(true);
    assert!(m.liveness(t0 + Duration::from_secs(151), stall, 0).is_ok());
    assert_eq!(parse_exposition(&m.render(0)).unwrap()["sns_operator_leader"], 1.0);
    m.set_leader(false);
    assert_eq!(parse_exposition(&m.render(0)).unwrap()["sns_operator_leader"], 0.0);
}

#[test]
fn the_parser_rejects_what_a_scraper_would() {
    let ok = "# HELP a_total A.\n# TYPE a counter\na_total 1\n# EOF\n";
    assert_eq!(parse_exposition(ok).unwrap()["a_total"], 1.0);
    for (bad, why) in [
        ("# TYPE a counter\na_total 1\n", "EOF"),
        ("a_total 1\n# EOF\n", "before any"),
        ("# TYPE a counter\na 1\n# EOF\n", "suffix"),
        ("# TYPE a counter\na_total one\n# EOF\n", "bad value"),
        ("# TYPE a counter\na_total{x=\"1} 1\n# EOF\n", "unterminated"),
        ("# TYPE a counter\na_total 1\na_total 2\n# EOF\n", "repeated"),
        ("# TYPE a counter\n# TYPE a gauge\n# EOF\n", "twice"),
        ("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n# EOF\n", "cumulative"),
        ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n# EOF\n", "cumulative"),
    ] {
        let e = parse_exposition(bad).expect_err(bad);
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[tokio::test]
async fn endpoint_serves_parsable_metrics_that_move_and_health() {
    let metrics = Arc::new(Metrics::default());
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

    let before = scrape(addr).await;
    for name in ["reconciles_total", "applies_total", "failovers_total", "events_total", "watch_errors_total"] {
        assert_eq!(before[&format!("sns_operator_{name}")], 0.0, "{name}");
    }
    assert_eq!(before["sns_operator_reconcile_duration_seconds_count"], 0.0);
    assert_eq!(before["sns_operator_snsclusters"], 2.0);

    metrics.reconciled(Duration::from_millis(250), None);
    metrics.reconciled(Duration::from_millis(250), Some("CoordinatorUnreachable"));
    metrics.reconciled(Duration::from_millis(20), Some("KubeApiError"));
    metrics.reconciled(Duration::from_millis(20), Some("KubeApiError"));
    metrics.failover();
    metrics.applied();
    metrics.event();
    objects.store(3, Ordering::Relaxed);

    let after = scrape(addr).await;
    assert_eq!(after["sns_operator_reconciles_total"], 4.0);
    assert_eq!(after["sns_operator_reconcile_failures_total{reason=\"KubeApiError\"}"], 2.0);
    assert_eq!(after["sns_operator_reconcile_failures_total{reason=\"CoordinatorUnreachable\"}"], 1.0);
    assert_eq!(metrics.failures(), 3);
    assert_eq!(after["sns_operator_reconcile_duration_seconds_count"], 4.0);
    assert!((after["sns_operator_reconcile_duration_seconds_sum"] - 0.54).abs() < 1e-9);
    // 0.25 s lands in the 0.32 s bucket, not the 0.16 s one.
    assert_eq!(after["sns_operator_reconcile_duration_seconds_bucket{le=\"0.16\"}"], 2.0);
    assert_eq!(after["sns_operator_reconcile_duration_seconds_bucket{le=\"0.32\"}"], 4.0);
    for name in ["failovers_total", "applies_total", "events_total"] {
        assert_eq!(after[&format!("sns_operator_{name}")], 1.0, "{name}");
    }
    assert_eq!(after["sns_operator_snsclusters"], 3.0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - after["sns_operator_last_reconcile_timestamp_seconds"]).abs() < 60.0);

    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);
    assert_eq!(request(addr, "GET", "/readyz").await.status, 200);
    assert_eq!(request(addr, "GET", "/nope").await.status, 404);
    assert_eq!(request(addr, "POST", "/metrics").await.status, 405);

    // No reconcile for longer than the stall timeout, with objects to
    // reconcile: unhealthy, until a reconcile happens again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = request(addr, "GET", "/healthz").await;
        if h.status == 503 {
            assert!(h.body.contains("no reconcile"), "{}", h.body);
            break;
        }
        assert!(Instant::now() < deadline, "never reported the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    metrics.reconciled(Duration::from_millis(1), None);
    assert_eq!(request(addr, "GET", "/healthz").await.status, 200);

    // A connection left open does not hold the server up at shutdown.
    let idle = TcpStream::connect(addr).await.unwrap();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server drains on shutdown").unwrap();
    drop(idle);
}
