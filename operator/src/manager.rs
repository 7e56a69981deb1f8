//! `sns-operator run`: connects to the cluster (in-cluster service account
//! or the local kubeconfig), starts the metrics/health endpoint, takes part
//! in the leader election and runs the controller while it leads, until
//! SIGTERM or SIGINT.
//!
//! A standby keeps no watches: the controller (its watches, cache and
//! per-SnsCluster state) is built afresh each time this replica starts
//! leading and dropped the moment it stops, so nothing a previous term saw
//! is trusted after another leader may have acted.

use crate::controller::{self, Context};
use crate::coordinator::GrpcRoutingTable;
use crate::crd::SnsCluster;
use crate::metrics::{self, Endpoint, Metrics};
use crate::render::{LABEL_MANAGED_BY, MANAGER, RenderOptions};
use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{self as kc, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use sns_node::kube::leader::{self, Elector, LeaseConfig};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub metrics_addr: SocketAddr,
    /// `sns-node` image for SnsClusters that name none.
    pub default_image: String,
    /// Watch one namespace only (default: all).
    pub namespace: Option<String>,
    /// `/healthz` fails after this long without progress.
    pub stall_timeout: Duration,
    /// Bound on one routing-table call to a coordinator.
    pub coordinator_timeout: Duration,
    /// Children are re-applied at least this often (drift repair).
    pub resync: Duration,
    /// Reconcile only while holding this Lease; None: always (one replica).
    pub leader_election: Option<LeaderElection>,
}

#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub lease_name: String,
    /// Default: the client's namespace (in a pod, the pod's own).
    pub lease_namespace: Option<String>,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// This replica's `holderIdentity`: the pod's name, so `kubectl get lease`
/// names the leading pod, and a random suffix, so a restarted container
/// does not take its predecessor's unexpired lease for its own.
fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sns-operator".into());
    let mut bytes = [0u8; 4];
    // Without randomness the suffix is zero: still unique per pod name.
    let _ = getrandom::fill(&mut bytes);
    format!("{host}_{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Ends on the first SIGTERM or SIGINT.
async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the operator");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster service account or kubeconfig)")?;
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.metrics_addr))?;
    let shutdown = CancellationToken::new();
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            signalled().await;
            tracing::info!("stopping");
            shutdown.cancel();
        })
    };
    let result = run_with(client, cfg, listener, shutdown).await;
    signals.abort();
    result
}

/// [`run`] with a given client and metrics listener, until `shutdown`.
pub async fn run_with(
    client: Client,
    cfg: RunConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let lease = cfg
        .leader_election
        .as_ref()
        .map(|le| {
            let lease = LeaseConfig {
                name: le.lease_name.clone(),
                namespace: le.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
                identity: identity(),
                lease_duration: le.lease_duration,
                renew_deadline: le.renew_deadline,
                retry_period: le.retry_period,
            };
            lease.validate().map(|()| lease)
        })
        .transpose()
        .map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
    let ns = cfg.namespace.as_deref();
    let clusters: Api<SnsCluster> = api(&client, ns);
    clusters
        .list(&ListParams::default().limit(1))
        .await
        .context("cannot list SnsClusters: is the CRD installed (kubectl apply -f manifests/crd.yaml) and may this account list them?")?;

    let metrics = Arc::new(Metrics::default());
    // The cache of the current term's controller, for /healthz; None while
    // standing by.
    let store: Arc<Mutex<Option<Store<SnsCluster>>>> = Arc::default();
    let seen = store.clone();
    let endpoint = Arc::new(Endpoint {
        metrics: metrics.clone(),
        stall: cfg.stall_timeout,
        objects: Box::new(move || seen.lock().expect("store lock").as_ref().map_or(0, |s| s.state().len())),
    });
    let http_stop = CancellationToken::new();
    let listener_addr = listener.local_addr().map_or_else(|_| cfg.metrics_addr.to_string(), |a| a.to_string());
    let http = tokio::spawn(metrics::serve(listener, endpoint, http_stop.clone()));

    let (leading_tx, leading) = watch::channel(false);
    let election_stop = CancellationToken::new();
    let election = match lease {
        Some(lease) => {
            tracing::info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "standing for leader");
            let elector = Elector::new(client.clone(), lease);
            Some(tokio::spawn(elector.run(leading_tx, election_stop.clone())))
        }
        None => {
            leading_tx.send_replace(true);
            // Kept until the end: a dropped sender would end the gate.
            tokio::spawn(async move {
                leading_tx.closed().await;
            });
            None
        }
    };
    tracing::info!(
        metrics = %listener_addr,
        namespace = ns.unwrap_or("<all>"),
        image = %cfg.default_image,
        leader_election = election.is_some(),
        "sns-operator running"
    );

    leader::while_leading(leading, &shutdown, || lead(&client, &cfg, metrics.clone(), store.clone(), &shutdown)).await;
    // Only now, with no reconcile left running, may another replica lead.
    election_stop.cancel();
    if let Some(election) = election {
        election.await.ok();
    }
    http_stop.cancel();
    http.await.ok();
    Ok(())
}

/// Marks a leadership term in the metrics and the health endpoint's cache
/// handle, also when the term is dropped mid-way.
struct Term {
    metrics: Arc<Metrics>,
    store: Arc<Mutex<Option<Store<SnsCluster>>>>,
}

impl Drop for Term {
    fn drop(&mut self) {
        self.metrics.set_leader(false);
        *self.store.lock().expect("store lock") = None;
    }
}

/// One term as leader: a fresh controller, run until shutdown (gracefully:
/// reconciles in flight finish) or until dropped because the lease is lost.
async fn lead(
    client: &Client,
    cfg: &RunConfig,
    metrics: Arc<Metrics>,
    store: Arc<Mutex<Option<Store<SnsCluster>>>>,
    shutdown: &CancellationToken,
) {
    let ns = cfg.namespace.as_deref();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(GrpcRoutingTable::new(cfg.coordinator_timeout)),
        metrics.clone(),
        RenderOptions { default_image: cfg.default_image.clone() },
        cfg.resync,
    ));
    // Only our own children wake the reconciler up.
    let children = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let controller = Controller::new(api::<SnsCluster>(client, ns), watcher::Config::default().any_semantic())
        .owns(api::<StatefulSet>(client, ns), children.clone())
        .owns(api::<Service>(client, ns), children);
    metrics.set_leader(true);
    *store.lock().expect("store lock") = Some(controller.store());
    let _term = Term { metrics: metrics.clone(), store };
    let stop = shutdown.clone();
    controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| {
            match result {
                Ok(_) => {}
                Err(kc::Error::QueueError(e)) => {
                    metrics.watch_error();
                    tracing::warn!(error = %e, "watch error");
                }
                // Reconcile failures are logged by error_policy.
                Err(kc::Error::ReconcilerFailed(..)) => {}
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
            std::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests;
