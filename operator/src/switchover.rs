//! Planned switchovers: asked for by a person with the `sns.io/switchover`
//! annotation, or made by the operator itself (a rolling update hands the
//! master role to the updated slave, a scale-down moves it off the server
//! it removes). Each one is a `CoordAdmin.Switchover` call whose outcome is
//! kept in `status.lastSwitchover` and told in an Event.
//!
//! The annotation runs at most once: it is removed (under the object's
//! resourceVersion, so a value changed meanwhile is not lost) before the
//! coordinator is asked. Running it twice would be worse than not at all:
//! a repeated `"<cluster>"` hands the role straight back. An operator that
//! dies between the two leaves the annotation gone and no outcome in the
//! status; the person asks again.

use crate::coordinator::RoutingTable;
use crate::crd::{SnsClusterSpec, SwitchoverStatus};
use crate::error::Error;
use crate::status::Notice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub const ANNOTATION: &str = "sns.io/switchover";

/// Who asked, as `status.lastSwitchover.requestedBy` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    Annotation,
    Rollout,
    ScaleDown,
}

impl Requester {
    pub fn as_str(self) -> &'static str {
        match self {
            Requester::Annotation => "annotation",
            Requester::Rollout => "rollout",
            Requester::ScaleDown => "scale-down",
        }
    }
}

/// A switchover to ask for: the cluster, and the server to hand the role
/// to (None: the coordinator picks the in-sync slave).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub cluster: u32,
    pub to: Option<u32>,
}

/// Reads the annotation's value, `"<cluster>"` or `"<cluster>/<server>"`,
/// against the spec (both ids are 1-based and must be planned).
pub fn parse(value: &str, spec: &SnsClusterSpec) -> Result<Target, String> {
    let value = value.trim();
    let (c, s) = match value.split_once('/') {
        Some((c, s)) => (c, Some(s)),
        None => (value, None),
    };
    let id = |what: &str, v: &str, max: u32| -> Result<u32, String> {
        match v.trim().parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "{ANNOTATION}: {what} {v:?} is not one of 1..={max} (expected \"<cluster>\" or \"<cluster>/<server>\")"
            )),
        }
    };
    Ok(Target {
        cluster: id("cluster", c, spec.clusters)?,
        to: s.map(|s| id("server", s, spec.servers_per_cluster)).transpose()?,
    })
}

/// How long a switchover the operator makes itself (rollout, scale-down)
/// is not asked again after it failed: a refusal (no in-sync target) does
/// not change by the next poll, and each attempt is a Warning Event and a
/// call of up to [`crate::coordinator::SWITCHOVER_PATIENCE`].
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether to ask for `target` now, given the last recorded switchover.
pub fn may_ask(last: Option<&SwitchoverStatus>, requester: Requester, target: Target, now: Timestamp) -> bool {
    let Some(last) = last else { return true };
    let same = !last.succeeded
        && last.requested_by == requester.as_str()
        && last.cluster == target.cluster
        && last.to == target.to;
    let since = now.duration_since(last.time.0);
    !same || since >= k8s_openapi::jiff::SignedDuration::try_from(RETRY_AFTER).unwrap_or_default()
}

/// What a switchover request came to: the record for the status and the
/// Event to publish.
pub fn refused(
    requester: Requester,
    request: Option<&str>,
    target: Option<Target>,
    why: String,
    now: Timestamp,
) -> (SwitchoverStatus, Notice) {
    let record = SwitchoverStatus {
        cluster: target.map(|t| t.cluster).unwrap_or(0),
        requested_by: requester.as_str().into(),
        request: request.map(Into::into),
        from: None,
        to: target.and_then(|t| t.to),
        term: None,
        succeeded: false,
        message: why.clone(),
        time: Time(now),
    };
    let notice = Notice { warning: true, reason: "SwitchoverFailed", action: "Switchover", note: why };
    (record, notice)
}

/// Asks the coordinator at `endpoint` for the switchover and waits for its
/// answer (up to [`crate::coordinator::SWITCHOVER_PATIENCE`]).
pub async fn run(
    routing: &dyn RoutingTable,
    endpoint: &str,
    requester: Requester,
    request: Option<&str>,
    target: Target,
) -> (SwitchoverStatus, Notice) {
    tracing::info!(cluster = target.cluster, to = ?target.to, by = requester.as_str(), "switchover: asking the coordinator");
    match routing.switchover(endpoint, target.cluster, target.to).await {
        Ok(done) => {
            let how = if done.stepped_down { "stepped down" } else { "did not answer; its lease ran out" };
            let note = format!(
                "cluster {}: master {} -> {} (term {}) in {} ms, asked by {}; the old master {how}",
                target.cluster,
                done.from,
                done.to,
                done.term,
                done.millis,
                requester.as_str()
            );
            tracing::info!(%note, "switchover done");
            let record = SwitchoverStatus {
                cluster: target.cluster,
                requested_by: requester.as_str().into(),
                request: request.map(Into::into),
                from: Some(done.from),
                to: Some(done.to),
                term: Some(done.term),
                succeeded: true,
                message: note.clone(),
                time: Time(Timestamp::now()),
            };
            (record, Notice { warning: false, reason: "Switchover", action: "Switchover", note })
        }
        Err(e) => {
            let why = match &e {
                Error::Switchover { reason, .. } => format!("cluster {}: refused: {reason}", target.cluster),
                other => {
                    format!("cluster {}: {other} (whether the role moved shows in status.clusters)", target.cluster)
                }
            };
            tracing::warn!(%why, "switchover failed");
            refused(requester, request, Some(target), why, Timestamp::now())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FixedTable, healthy_table};
    use std::sync::Mutex;

    fn spec(clusters: u32, servers: u32) -> SnsClusterSpec {
        serde_json::from_value(serde_json::json!({"clusters": clusters, "serversPerCluster": servers})).unwrap()
    }

    #[test]
    fn annotation_values() {
        let s = spec(3, 2);
        assert_eq!(parse("2", &s), Ok(Target { cluster: 2, to: None }));
        assert_eq!(parse(" 3/1 ", &s), Ok(Target { cluster: 3, to: Some(1) }));
        for bad in ["", "0", "4", "x", "1/0", "1/3", "1/", "/1", "1/2/3", "-1"] {
            let err = parse(bad, &s).unwrap_err();
            assert!(err.contains(ANNOTATION), "{bad:?}: {err}");
        }
        assert!(parse("1/2", &spec(3, 1)).unwrap_err().contains("1..=1"), "a server that is not planned");
    }

    #[test]
    fn a_failed_switchover_of_our_own_is_not_asked_again_at_once() {
        let at = |secs: i64| Timestamp::from_second(1_700_000_000 + secs).unwrap();
        let target = Target { cluster: 1, to: Some(2) };
        let (failed, _) = refused(Requester::Rollout, None, Some(target), "no".into(), at(0));
        assert!(may_ask(None, Requester::Rollout, target, at(0)));
        assert!(!may_ask(Some(&failed), Requester::Rollout, target, at(29)));
        assert!(may_ask(Some(&failed), Requester::Rollout, target, at(30)));
        assert!(may_ask(Some(&failed), Requester::ScaleDown, target, at(1)), "another reason");
        assert!(may_ask(Some(&failed), Requester::Rollout, Target { cluster: 2, to: Some(2) }, at(1)));
        let ok = SwitchoverStatus { succeeded: true, ..failed };
        assert!(may_ask(Some(&ok), Requester::Rollout, target, at(1)));
    }

    #[tokio::test]
    async fn outcome_is_recorded_either_way() {
        let table = FixedTable { answer: Mutex::new(Some(healthy_table(3, 2))), ..Default::default() };
        let (ok, notice) =
            run(&table, "http://c:9000", Requester::Annotation, Some("2"), Target { cluster: 2, to: None }).await;
        assert!(ok.succeeded);
        assert_eq!((ok.cluster, ok.from, ok.to, ok.term), (2, Some(1), Some(2), Some(2)));
        assert_eq!(ok.requested_by, "annotation");
        assert_eq!(ok.request.as_deref(), Some("2"));
        assert!(!notice.warning);
        assert!(notice.note.contains("master 1 -> 2 (term 2)"), "{}", notice.note);

        *table.refuse.lock().unwrap() = Some("server 2 is not in sync".into());
        let (no, notice) =
            run(&table, "http://c:9000", Requester::Rollout, None, Target { cluster: 1, to: Some(2) }).await;
        assert!(!no.succeeded);
        assert_eq!((no.cluster, no.to, no.term), (1, Some(2), None));
        assert!(no.message.contains("server 2 is not in sync"), "{}", no.message);
        assert!(notice.warning);
        assert_eq!(notice.reason, "SwitchoverFailed");
        assert_eq!(*table.switchovers.lock().unwrap(), [(2, None), (1, Some(2))]);

        *table.refuse.lock().unwrap() = None;
        *table.answer.lock().unwrap() = None;
        let (down, _) = run(&table, "http://c:9000", Requester::ScaleDown, None, Target { cluster: 1, to: None }).await;
        assert!(!down.succeeded);
        assert_eq!(down.requested_by, "scale-down");
    }
}
