//! Leader election on a `coordination.k8s.io/v1` Lease, so the operator and
//! the coordinator can run several replicas of which exactly one leads.
//!
//! The rules are client-go's `leaderelection`:
//! - every write is conditional on the `resourceVersion` read just before
//!   (create when absent, otherwise replace), so of two candidates that
//!   read the same lease at most one write succeeds;
//! - a lease held by another replica has expired once this replica has
//!   seen it unchanged for its `leaseDurationSeconds`, timed by this
//!   replica's own clock (clocks of different machines are never
//!   compared, and a lease seen for the first time counts from then);
//! - the leader renews every `retry_period` and stops leading when it has
//!   not renewed for `renew_deadline`, which is shorter than the lease
//!   duration: it stops before a standby may take over;
//! - a leader that shuts down gives the lease up (no holder), and a standby
//!   takes a lease without a holder at its next retry.
//!
//! Why not a crate: kube 5 has no elector, and `kube-lease-manager` (which
//! fits kube 5) takes an expired lease with a release patch followed by an
//! apply and renews with a strategic merge patch, none of them conditional
//! on the version it read; the conditional replace is the property the
//! tests here pin down, and the whole algorithm is this page.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease object, in `namespace`.
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity`, unique among the replicas.
    pub identity: String,
    /// A standby takes the lease once it has seen it unchanged this long.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops leading.
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby tries.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The timing rules that make two leaders impossible: the leader gives
    /// up (`renew_deadline`) before a standby may take over
    /// (`lease_duration`), and it tries more than once before giving up.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            return Err(format!("the lease duration must be whole seconds, at least 1s: {:?}", self.lease_duration));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err("the renew deadline must be shorter than the lease duration".into());
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err("the retry period must be shorter than the renew deadline".into());
        }
        if self.identity.is_empty() {
            return Err("the identity must not be empty".into());
        }
        Ok(())
    }
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This replica holds the lease (acquired or renewed just now).
    Leader,
    /// Another replica holds it and it has not expired, or another replica
    /// wrote it first; the holder, when known.
    Standby(Option<String>),
}

#[derive(Debug)]
struct Observed {
    resource_version: String,
    since: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Option<Observed>,
    /// Told who holds the lease, as last seen (see [`Self::report_holder`]).
    holder: Option<watch::Sender<Option<String>>>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl Elector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Self {
        Elector { api: Api::namespaced(client, &cfg.namespace), cfg, observed: None, holder: None }
    }

    /// While it runs, tells `holder` who holds the lease as last seen
    /// (this replica's identity while it leads), so a standby can say who
    /// leads without asking the API server again.
    pub fn report_holder(mut self, holder: watch::Sender<Option<String>>) -> Self {
        self.holder = Some(holder);
        self
    }

    fn seen_holder(&self, who: Option<&str>) {
        if let (Some(tx), Some(who)) = (&self.holder, who) {
            tx.send_if_modified(|h| {
                let changed = h.as_deref() != Some(who);
                if changed {
                    *h = Some(who.to_string());
                }
                changed
            });
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|o| o.resource_version != rv) {
            self.observed = Some(Observed { resource_version: rv, since: now });
        }
    }

    /// One round: create the lease if there is none, renew it if it is
    /// ours, take it if it expired or has no holder, else leave it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Outcome, kube::Error> {
        self.attempt(Instant::now()).await
    }

    /// [`Self::try_acquire_or_renew`] at `now` (on this replica's clock).
    pub async fn attempt(&mut self, now: Instant) -> Result<Outcome, kube::Error> {
        let wall = MicroTime(Timestamp::now());
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(seconds(self.cfg.lease_duration)),
                    acquire_time: Some(wall.clone()),
                    renew_time: Some(wall),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    Ok(Outcome::Leader)
                }
                // Another replica created it first.
                Err(e) if is_conflict(&e) => Ok(Outcome::Standby(None)),
                Err(e) => Err(e),
            };
        };
        self.observe(&lease, now);
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.cfg.identity.as_str());
        if let Some(other) = holder.as_ref().filter(|_| !ours) {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.cfg.lease_duration, Duration::from_secs);
            let since = self.observed.as_ref().map_or(now, |o| o.since);
            if now.saturating_duration_since(since) < duration {
                return Ok(Outcome::Standby(Some(other.clone())));
            }
            tracing::info!(lease = %self.cfg.name, previous = %other, "taking over an expired lease");
        }
        let mut next = spec.clone();
        next.holder_identity = Some(self.cfg.identity.clone());
        next.lease_duration_seconds = Some(seconds(self.cfg.lease_duration));
        next.renew_time = Some(wall.clone());
        if !ours {
            next.acquire_time = Some(wall);
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        let updated = Lease { metadata: lease.metadata, spec: Some(next) };
        match self.api.replace(&self.cfg.name, &PostParams::default(), &updated).await {
            Ok(written) => {
                self.observe(&written, now);
                Ok(Outcome::Leader)
            }
            // Someone wrote it since we read it: they win this round.
            Err(e) if is_conflict(&e) => Ok(Outcome::Standby(None)),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica still holds it: no holder, and a
    /// one-second duration for readers that go by the duration.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.cfg.name).await? else { return Ok(()) };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let released = Lease { metadata: lease.metadata, spec: Some(spec) };
        match self.api.replace(&self.cfg.name, &PostParams::default(), &released).await {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs the election until `stop`: `leading` is true exactly while this
    /// replica may reconcile. At `stop` a leader first says it no longer
    /// leads, then gives the lease up, so a standby takes over at its next
    /// retry instead of waiting the lease out.
    pub async fn run(mut self, leading: watch::Sender<bool>, stop: CancellationToken) {
        let cfg = self.cfg.clone();
        let mut renewed: Option<Instant> = None;
        loop {
            if let Some(at) = renewed
                && Instant::now().saturating_duration_since(at) >= cfg.renew_deadline
            {
                tracing::warn!(lease = %cfg.name, "could not renew the lease in time; no longer reconciling");
                renewed = None;
                leading.send_replace(false);
            }
            // A leader's attempt may not outlast its deadline.
            let bound = renewed
                .map_or(cfg.renew_deadline, |at| (at + cfg.renew_deadline).saturating_duration_since(Instant::now()));
            // Counted from before the write: a standby sees the renewed
            // version only after it, so its wait starts later than ours.
            let started = Instant::now();
            let attempt = tokio::select! {
                _ = stop.cancelled() => break,
                a = tokio::time::timeout(bound, self.try_acquire_or_renew()) => a,
            };
            match attempt {
                Ok(Ok(Outcome::Leader)) => {
                    self.seen_holder(Some(&cfg.identity));
                    if renewed.is_none() {
                        tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
                        leading.send_replace(true);
                    }
                    renewed = Some(started);
                }
                Ok(Ok(Outcome::Standby(holder))) => {
                    self.seen_holder(holder.as_deref());
                    if renewed.take().is_some() {
                        tracing::warn!(lease = %cfg.name, holder = ?holder, "lost the lease; no longer reconciling");
                        leading.send_replace(false);
                    }
                }
                Ok(Err(e)) if renewed.is_some() => {
                    tracing::warn!(lease = %cfg.name, error = %e, "cannot renew the lease")
                }
                Ok(Err(e)) => tracing::debug!(lease = %cfg.name, error = %e, "cannot read or take the lease"),
                Err(_) => tracing::warn!(lease = %cfg.name, "the lease call timed out"),
            }
            // Every retry period; a leader also wakes at its deadline, so
            // it stops by then and not up to a retry period later.
            let pause = renewed.map_or(cfg.retry_period, |at| {
                cfg.retry_period.min((at + cfg.renew_deadline).saturating_duration_since(Instant::now()))
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if renewed.is_some() {
            leading.send_replace(false);
            match tokio::time::timeout(cfg.renew_deadline, self.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %cfg.name, "released the lease"),
                Ok(Err(e)) => tracing::warn!(lease = %cfg.name, error = %e, "cannot release the lease"),
                Err(_) => tracing::warn!(lease = %cfg.name, "releasing the lease timed out"),
            }
        }
    }
}

/// Runs `work()` while `leading` is true: started when this replica starts
/// leading, dropped (so it stops at its next await) the moment it stops,
/// and started afresh when it leads again. Returns when `work` returns by
/// itself (it ends on `stop` while leading), when `stop` fires while
/// standing by, or when the election has ended.
pub async fn while_leading<F, Fut>(mut leading: watch::Receiver<bool>, stop: &CancellationToken, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let started = tokio::select! {
            _ = stop.cancelled() => false,
            l = leading.wait_for(|l| *l) => l.is_ok(),
        };
        if !started {
            return;
        }
        let term = work();
        tokio::pin!(term);
        tokio::select! {
            _ = &mut term => return,
            lost = leading.wait_for(|l| !*l) => {
                if lost.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(any(test, feature = "kube-fake"))]
pub mod fake;
#[cfg(test)]
mod tests;
