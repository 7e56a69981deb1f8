//! Replicated coordinators under Kubernetes: one leads, the others stand by.
//!
//! The replicas elect a leader on a `coordination.k8s.io/v1` Lease
//! ([`crate::kube::leader`]) and keep the records in a ConfigMap
//! ([`ConfigMapRecords`], written with compare-and-swap). Every replica
//! serves gRPC all the time, but only the leader answers `CoordService`,
//! `CoordAdmin` (and the gateway): a standby answers them `UNAVAILABLE`
//! naming the leader, and its health service `readiness` is
//! `NOT_SERVING`, so a Kubernetes Service sends traffic to the leader only
//! (liveness, service `""`, stays `SERVING`).
//!
//! A *term* of leadership starts exactly like a coordinator restart: the
//! records are read afresh from the ConfigMap and claimed (written back
//! under a new epoch), and a fresh table adopts the running masters from
//! their heartbeats. It ends when the lease is lost (the elector gives up
//! at its renew deadline, before any standby may take the lease), when a
//! records write finds another coordinator wrote first, or at shutdown:
//! the services stop answering at once and nothing more is written.

use super::records::{ConfigMapRecords, Records, Store};
use super::state::StateFile;
use super::{Coordinator, CoordinatorConfig, gateway};
use crate::error::{Error, Result};
use crate::kube::leader::{Elector, LeaseConfig};
use crate::net;
use sns_proto::csce438::coord_service_server::CoordServiceServer;
use sns_proto::internal::coord_admin_server::CoordAdminServer;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service a readiness probe asks: `SERVING` on the leader only.
pub const READINESS: &str = "readiness";

#[derive(Debug, Clone)]
pub struct HaConfig {
    pub lease: LeaseConfig,
    /// The ConfigMap holding the records, in the lease's namespace.
    pub records: String,
}

/// Serves as one replica of a replicated coordinator until `shutdown`.
pub async fn run(
    cfg: CoordinatorConfig,
    ha: HaConfig,
    client: kube::Client,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    ha.lease.validate().map_err(Error::Config)?;
    let (leading_tx, leading) = watch::channel(false);
    let (holder_tx, holder) = watch::channel(None);
    let (active_tx, active) = watch::channel(None::<Coordinator>);
    // Stopped only after the last term ended: the lease is given up once
    // this replica no longer serves.
    let election_stop = CancellationToken::new();
    let elector = Elector::new(client.clone(), ha.lease.clone()).report_holder(holder_tx);
    let election = tokio::spawn(tracing::Instrument::instrument(
        elector.run(leading_tx, election_stop.clone()),
        tracing::info_span!("lease", name = %ha.lease.name),
    ));
    tracing::info!(
        addr = %listener.local_addr().map_err(|e| Error::Other(e.to_string()))?,
        lease = %ha.lease.name, namespace = %ha.lease.namespace, identity = %ha.lease.identity,
        records = %ha.records, clusters = cfg.clusters,
        "coordinator replica standing for leader"
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    net::serve_health(health_service.clone(), shutdown.clone());
    health.set_not_serving::<CoordServiceServer<Coordinator>>().await;
    health.set_service_status(READINESS, ServingStatus::NotServing).await;
    let me = ha.lease.identity.clone();
    fn switch<S>(
        active: &watch::Receiver<Option<Coordinator>>,
        holder: &watch::Receiver<Option<String>>,
        me: &str,
        make: fn(Coordinator) -> S,
    ) -> Switch<S> {
        Switch { active: active.clone(), holder: holder.clone(), me: me.to_string(), make }
    }
    let admin: fn(Coordinator) -> _ = |c| CoordAdminServer::with_interceptor(c.clone(), c.check.clone());
    let serve = crate::tls::server_builder()?
        .trace_fn(crate::telemetry::rpc_span(None))
        .layer(crate::metrics::grpc::CountLayer)
        .add_service(health_service)
        .add_service(switch(&active, &holder, &me, CoordServiceServer::new))
        .add_service(switch(&active, &holder, &me, admin))
        .add_optional_service(cfg.gateway.then(|| switch(&active, &holder, &me, gateway::service)))
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled());
    let terms = Terms { cfg, ha, client, active: active_tx, health };
    let (served, ()) = tokio::join!(serve, terms.run(leading, shutdown.clone()));
    election_stop.cancel();
    let _ = election.await;
    Ok(served?)
}

struct Terms {
    cfg: CoordinatorConfig,
    ha: HaConfig,
    client: kube::Client,
    active: watch::Sender<Option<Coordinator>>,
    health: HealthReporter,
}

impl Terms {
    async fn serving(&self, coord: Option<Coordinator>) {
        let status = if coord.is_some() { ServingStatus::Serving } else { ServingStatus::NotServing };
        // Callers are refused first, then told to go elsewhere; served
        // first, then told to come.
        if coord.is_none() {
            self.active.send_replace(None);
        }
        self.health.set_service_status(READINESS, status).await;
        self.health.set_service_status(<CoordServiceServer<Coordinator> as NamedService>::NAME, status).await;
        if coord.is_some() {
            self.active.send_replace(coord);
        }
    }

    async fn run(self, mut leading: watch::Receiver<bool>, shutdown: CancellationToken) {
        let retry = self.ha.lease.retry_period;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                l = leading.wait_for(|l| *l) => if l.is_err() { return },
            }
            let started = Instant::now();
            let store = ConfigMapRecords::new(
                self.client.clone(),
                &self.ha.lease.namespace,
                &self.ha.records,
                &self.ha.lease.identity,
            );
            let claimed = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = leading.wait_for(|l| !*l) => continue,
                c = claim(&self.cfg, &store) => c,
            };
            let (records, epoch) = match claimed {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "won the lease but cannot claim the records; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => continue,
                    }
                }
            };
            let term = shutdown.child_token();
            let clusters = records.len();
            let (coord, elector) =
                Coordinator::with_records(&self.cfg, records, Store::Kube(Box::new(store)), epoch, term.clone());
            let elector =
                tokio::spawn(tracing::Instrument::instrument(elector.run(), tracing::info_span!("elector", epoch)));
            self.serving(Some(coord)).await;
            tracing::info!(
                identity = %self.ha.lease.identity,
                epoch,
                clusters,
                millis = started.elapsed().as_millis() as u64,
                "leading: serving from the records in ConfigMap {}",
                self.ha.records
            );
            let lost = tokio::select! {
                _ = term.cancelled() => !shutdown.is_cancelled(),
                _ = leading.wait_for(|l| !*l) => true,
            };
            term.cancel();
            self.serving(None).await;
            let _ = elector.await;
            if shutdown.is_cancelled() {
                return;
            }
            if lost {
                tracing::warn!(identity = %self.ha.lease.identity, "no longer leading; standing by");
            }
            // After a records conflict, another coordinator wrote: give the
            // lease a retry period to settle before reading again.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }
}

/// Reads the records and writes them back under this leader's epoch, so a
/// write the previous leader still had in flight cannot land unnoticed.
/// With no records in the ConfigMap yet, those of the state file in the
/// data directory are imported (a single coordinator turned replicated).
async fn claim(cfg: &CoordinatorConfig, store: &ConfigMapRecords) -> Result<(Records, u64)> {
    let (records, last_epoch) = match store.load().await? {
        Some(stored) => (stored.records, stored.epoch),
        None => {
            let file = cfg.data_dir.as_deref().map(StateFile::in_dir).transpose()?;
            match file.as_ref().map(StateFile::load).transpose()?.flatten() {
                Some(stored) => {
                    tracing::warn!(
                        path = %file.as_ref().map(|f| f.path().display().to_string()).unwrap_or_default(),
                        configmap = store.name(),
                        clusters = stored.records.len(),
                        "importing the records of the state file; from now on the ConfigMap holds them"
                    );
                    (stored.records, stored.epoch)
                }
                None => {
                    tracing::info!(configmap = store.name(), "no coordinator records yet: a new deployment");
                    (Records::new(), 0)
                }
            }
        }
    };
    // After every earlier leader's, even if this machine's clock is behind.
    let epoch = super::next_epoch(last_epoch);
    store.save(&records, epoch).await?;
    Ok((records, epoch))
}

/// A gRPC service that the leader answers and a standby refuses.
#[derive(Clone)]
struct Switch<S> {
    active: watch::Receiver<Option<Coordinator>>,
    holder: watch::Receiver<Option<String>>,
    me: String,
    make: fn(Coordinator) -> S,
}

impl<S: NamedService> NamedService for Switch<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Switch<S> {
    fn refusal(&self) -> Status {
        match self.holder.borrow().as_deref() {
            Some(h) if h == self.me => Status::unavailable("coordinator taking over; try again shortly"),
            Some(h) => Status::unavailable(format!("standby coordinator; the leader is {h}")),
            None => Status::unavailable("standby coordinator; no leader yet"),
        }
    }
}

type Body = tonic::body::Body;

impl<S, B> tower_service::Service<http::Request<Body>> for Switch<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let active = self.active.borrow().clone();
        match active {
            Some(coord) => {
                let mut service = (self.make)(coord);
                Box::pin(async move {
                    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                    Ok(service.call(req).await?.map(Body::new))
                })
            }
            None => {
                let refusal = self.refusal();
                Box::pin(async move { Ok(refusal.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests;
