//! `sns-operator run`: connects to the cluster (in-cluster service account
//! or the local kubeconfig), starts the metrics/health endpoint and runs the
//! controller until SIGTERM or SIGINT.

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
use kube::runtime::watcher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
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
    let ns = cfg.namespace.as_deref();
    let clusters: Api<SnsCluster> = api(&client, ns);
    clusters
        .list(&ListParams::default().limit(1))
        .await
        .context("cannot list SnsClusters: is the CRD installed (kubectl apply -f manifests/crd.yaml) and may this account list them?")?;

    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(GrpcRoutingTable::new(cfg.coordinator_timeout)),
        metrics.clone(),
        RenderOptions { default_image: cfg.default_image.clone() },
        cfg.resync,
    ));
    // Only our own children wake the reconciler up.
    let children = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    let controller = Controller::new(clusters, watcher::Config::default().any_semantic())
        .owns(api::<StatefulSet>(&client, ns), children.clone())
        .owns(api::<Service>(&client, ns), children);
    let store = controller.store();

    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.metrics_addr))?;
    let endpoint = Arc::new(Endpoint {
        metrics: metrics.clone(),
        stall: cfg.stall_timeout,
        objects: Box::new(move || store.state().len()),
    });
    let http = tokio::spawn(metrics::serve(listener, endpoint, shutdown.clone()));
    tracing::info!(
        metrics = %cfg.metrics_addr,
        namespace = ns.unwrap_or("<all>"),
        image = %cfg.default_image,
        "sns-operator running"
    );

    controller
        .shutdown_on_signal()
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
    tracing::info!("stopping");
    shutdown.cancel();
    http.await.ok();
    Ok(())
}
