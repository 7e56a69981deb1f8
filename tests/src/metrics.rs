//! Scrapes a node's `GET /metrics` and parses the OpenMetrics text strictly
//! enough that a malformed exposition fails the test that reads it.

use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

/// The body of `GET /metrics` on `127.0.0.1:port`.
pub fn scrape(port: u16) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("metrics port {port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header end in {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("metrics port {port} answered {head:?}");
    }
    if !head.to_ascii_lowercase().contains("content-type: application/openmetrics-text") {
        bail!("not OpenMetrics text: {head:?}");
    }
    Ok(body.to_string())
}

/// Every sample of an exposition: `name{labels}` (labels as written) ->
/// value. Fails on anything that is not a comment, a sample or the final
/// `# EOF`.
pub fn parse(text: &str) -> Result<BTreeMap<String, f64>> {
    let mut samples = BTreeMap::new();
    let mut lines = text.lines().peekable();
    let mut eof = false;
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            eof = lines.peek().is_none();
            if !eof {
                bail!("# EOF before the end");
            }
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            match (words.next(), words.next()) {
                (Some("HELP" | "TYPE" | "UNIT"), Some(name)) if valid_name(name) => continue,
                _ => bail!("bad comment line {line:?}"),
            }
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| anyhow!("bad sample line {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        if !valid_name(name) {
            bail!("bad metric name in {line:?}");
        }
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .ok_or_else(|| anyhow!("bad labels in {line:?}"))?;
            for pair in inner.split("\",").map(|p| p.trim_end_matches('"')) {
                let (k, v) = pair.split_once("=\"").ok_or_else(|| anyhow!("bad label {pair:?} in {line:?}"))?;
                if !valid_name(k) || v.contains('"') {
                    bail!("bad label {pair:?} in {line:?}");
                }
            }
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().with_context(|| format!("bad value in {line:?}"))?,
        };
        if samples.insert(series.to_string(), value).is_some() {
            bail!("sample {series} twice");
        }
    }
    if !eof {
        bail!("no # EOF at the end");
    }
    Ok(samples)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Sum of every sample of `name` whose labels contain all of `labels`
/// (`k="v"` strings); None when there is none.
pub fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l)))
        .map(|(_, v)| *v)
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}
