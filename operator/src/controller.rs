//! The reconciler: `reconcile(obj, ctx) -> Result<Action>` and
//! `error_policy`, in the shape of kube-rs's controller-rs.
//!
//! One reconcile of an SnsCluster:
//! 1. kube's `finalizer()` helper adds `sns.io/cleanup` first, and on
//!    deletion runs [`cleanup`] (PVC retention) before letting it go;
//! 2. the broker credentials Secret is created if missing (never
//!    overwritten: RabbitMQ keeps the password in its volume);
//! 3. every rendered child is server-side applied with the one field
//!    manager `sns-operator`, and StatefulSets/Services this SnsCluster no
//!    longer wants (scale-down, a switch to an external broker) are
//!    deleted — with their volumes when `storage.retention` is `Delete`.
//!    The coordinator's StatefulSet is applied only once no coordinator
//!    Deployment of the same name (what older versions ran) is left: that
//!    one is deleted first, and two coordinators must never run at once.
//!    Steps 2-3 run when the rendered state changed or every resync period
//!    (drift repair), not on every poll;
//! 4. the coordinator's routing table gives each server pod's role: the
//!    `sns.io/role` label is patched where it is wrong, which moves the
//!    per-cluster master Service;
//! 5. status (conditions, masters, terms, last failover) is written via the
//!    status subresource when it changed, and Events tell of creation,
//!    scaling and failover;
//! 6. requeue after one heartbeat interval (1-10 s), which is what keeps the
//!    role labels current: the coordinator has no watch API.

use crate::coordinator::RoutingTable;
use crate::crd::{PvcRetention, SnsCluster};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::render::{
    self, Child, LABEL_CLUSTER, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_ROLE, LABEL_SERVER, MANAGER,
    Names, RenderOptions, Rendered,
};
use crate::status::{self, Observation};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FINALIZER: &str = "sns.io/cleanup";

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub routing: Arc<dyn RoutingTable>,
    pub metrics: Arc<Metrics>,
    pub render: RenderOptions,
    /// How often the children are re-applied even if nothing changed.
    pub resync: Duration,
    recorder: Recorder,
    /// Per SnsCluster (`ns/name`): checksum of the last full apply and when.
    applied: Mutex<HashMap<String, (u64, Instant)>>,
    /// Per SnsCluster: consecutive failures, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        routing: Arc<dyn RoutingTable>,
        metrics: Arc<Metrics>,
        render: RenderOptions,
        resync: Duration,
    ) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            routing,
            metrics,
            render,
            resync,
            applied: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    async fn publish(&self, obj: &SnsCluster, warning: bool, reason: &str, action: &str, note: String) {
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        // Events are for people: failing to publish one is logged, never a
        // reason to fail the reconcile.
        match self.recorder.publish(&event, &obj.object_ref(&())).await {
            Ok(()) => self.metrics.event(),
            Err(e) => tracing::warn!(error = %e, reason, "cannot publish event"),
        }
    }
}

fn key(obj: &SnsCluster) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// How often the role labels and status are refreshed: one heartbeat
/// interval (a failover is noticed within one beat of the coordinator
/// deciding it), but at least 1 s apart and at most 10 s.
pub fn poll_interval(obj: &SnsCluster) -> Duration {
    Duration::from_millis(obj.spec.heartbeat.interval_millis.clamp(1000, 10_000))
}

#[tracing::instrument(skip_all, fields(sns_cluster = %key(&obj)))]
pub async fn reconcile(obj: Arc<SnsCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let k = key(&obj);
    let ns = obj.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<SnsCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(obj) => apply(obj, ctx.clone()).await,
            Finalizer::Cleanup(obj) => cleanup(obj, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(Error::reason));
    if result.is_ok() {
        ctx.failures.lock().expect("failures lock").remove(&k);
    }
    result
}

/// Exponential backoff per SnsCluster: 5 s (the poll cadence), doubling up
/// to 5 minutes, reset by the next success.
pub fn error_policy(obj: Arc<SnsCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().expect("failures lock");
        let n = f.entry(key(&obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(sns_cluster = %key(&obj), error = %error, failures = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs.min(300))
}

async fn apply(obj: Arc<SnsCluster>, ctx: Arc<Context>) -> Result<Action> {
    let names = Names::of(&obj)?;
    let rendered = render::render(&obj, &ctx.render)?;
    let k = key(&obj);
    let checksum = rendered.checksum();
    let due = ctx
        .applied
        .lock()
        .expect("applied lock")
        .get(&k)
        .is_none_or(|(sum, at)| *sum != checksum || at.elapsed() >= ctx.resync);
    if due {
        let credentials = crate::secrets::ensure(&ctx.client, &names, &rendered).await?;
        // cert-manager has not issued the certificate yet: its CA is
        // needed for the coordinator calls as soon as it is there.
        let issued = rendered.tls != render::TlsPlan::CertManager || credentials.ca.is_some();
        ctx.routing.authenticate(&names.coordinator_endpoint(), credentials);
        let complete = apply_children(&obj, &names, &rendered, &ctx).await? && issued;
        prune(&obj, &names, &rendered, &ctx).await?;
        // Left incomplete (the old coordinator still terminating, the
        // certificate not issued), the next poll applies again rather
        // than waiting for a resync.
        if complete {
            ctx.applied.lock().expect("applied lock").insert(k, (checksum, Instant::now()));
        }
        ctx.metrics.applied();
    }

    let spec = &obj.spec;
    let observation = ctx
        .routing
        .table(&names.coordinator_endpoint())
        .await
        .map(|nodes| Observation::from_table(spec.clusters, spec.servers_per_cluster, &nodes));
    match &observation {
        Ok(o) => label_roles(&names, o, &ctx).await?,
        Err(e) => tracing::info!(error = %e, "no routing table yet; role labels left as they are"),
    }
    let why;
    let obs = match &observation {
        Ok(o) => Ok(o),
        Err(e) => {
            why = e.to_string();
            Err(why.as_str())
        }
    };
    let (status, notices) = status::next_status(&obj, &names, obs, Timestamp::now());
    for n in notices {
        if n.reason == "Failover" {
            ctx.metrics.failover();
        }
        tracing::info!(reason = n.reason, note = %n.note, "event");
        ctx.publish(&obj, n.warning, n.reason, n.action, n.note).await;
    }
    if obj.status.as_ref() != Some(&status) {
        let api: Api<SnsCluster> = Api::namespaced(ctx.client.clone(), &names.namespace);
        let patch = serde_json::json!({
            "apiVersion": "sns.io/v1alpha1",
            "kind": "SnsCluster",
            "status": status,
        });
        api.patch_status(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(Action::requeue(poll_interval(&obj)))
}

async fn ssa<K>(client: &Client, ns: &str, obj: &K) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(&obj.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(obj)).await?;
    Ok(())
}

/// Applies every child; false when the coordinator's StatefulSet had to
/// wait for the Deployment it replaces to go.
async fn apply_children(obj: &SnsCluster, names: &Names, rendered: &Rendered, ctx: &Context) -> Result<bool> {
    let ns = names.namespace.as_str();
    let mut complete = true;
    for child in &rendered.children {
        match child {
            Child::ConfigMap(o) => ssa::<ConfigMap>(&ctx.client, ns, o).await?,
            Child::Service(o) => ssa::<Service>(&ctx.client, ns, o).await?,
            Child::StatefulSet(o) if o.name_any() == names.coordinator() => {
                if retire_coordinator_deployment(obj, names, ctx).await? {
                    ssa::<StatefulSet>(&ctx.client, ns, o).await?;
                } else {
                    complete = false;
                }
            }
            Child::StatefulSet(o) => ssa::<StatefulSet>(&ctx.client, ns, o).await?,
            Child::Pdb(o) => ssa::<PodDisruptionBudget>(&ctx.client, ns, o).await?,
            Child::NetworkPolicy(o) => ssa::<NetworkPolicy>(&ctx.client, ns, o).await?,
            Child::Certificate(o) => crate::secrets::apply_certificate(&ctx.client, names, o).await?,
        }
    }
    tracing::debug!(objects = rendered.children.len(), uid = ?obj.uid(), complete, "children applied");
    Ok(complete)
}

/// Upgrade path: before the coordinator kept records on a volume it ran as
/// a Deployment of the same name. Its replacement must not start while the
/// old pod runs (two coordinators would each appoint masters, and both
/// would answer behind the one Service), so the Deployment is deleted in
/// the foreground, which removes it only once its pods are gone, and the
/// StatefulSet waits for that. Returns whether no such Deployment is left.
/// The old coordinator kept its records in memory only: the new one starts
/// without them (see docs/kubernetes.md on `sns-node promote`).
async fn retire_coordinator_deployment(obj: &SnsCluster, names: &Names, ctx: &Context) -> Result<bool> {
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let name = names.coordinator();
    let Some(old) = api.get_opt(&name).await? else {
        return Ok(true);
    };
    // Ours if this SnsCluster owns it, or it carries our labels (left over
    // from an earlier SnsCluster of this name deleted with orphaning).
    let labels = old.labels();
    let labelled = labels.get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGER)
        && labels.get(LABEL_INSTANCE) == Some(&names.instance);
    if !owned_by(&old.metadata, obj) && !labelled {
        tracing::warn!(deployment = %name, "a Deployment named like the coordinator that sns-operator did not create: left alone");
        return Ok(true);
    }
    if old.metadata.deletion_timestamp.is_none() {
        tracing::info!(deployment = %name, "replacing the coordinator Deployment with a StatefulSet: deleting it first");
        ignore_not_found(api.delete(&name, &DeleteParams::foreground()).await.map(|_| ()))?;
    } else {
        tracing::info!(deployment = %name, "waiting for the old coordinator Deployment to go");
    }
    Ok(false)
}

fn owned_by(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, obj: &SnsCluster) -> bool {
    meta.owner_references.iter().flatten().any(|o| Some(&o.uid) == obj.metadata.uid.as_ref())
}

/// Deletes the StatefulSets and Services of this SnsCluster that the
/// current spec no longer renders.
async fn prune(obj: &SnsCluster, names: &Names, rendered: &Rendered, ctx: &Context) -> Result<()> {
    let ns = names.namespace.as_str();
    let selector = ListParams::default().labels(&names.selector());
    let wanted = rendered.names_of("StatefulSet");
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    for s in sts.list(&selector).await? {
        let name = s.name_any();
        if wanted.contains(&name) || !owned_by(&s.metadata, obj) {
            continue;
        }
        tracing::info!(statefulset = %name, "removing what the spec no longer wants");
        ignore_not_found(sts.delete(&name, &DeleteParams::background()).await.map(|_| ()))?;
        let labels = s.labels();
        let server = (
            labels.get(LABEL_COMPONENT).map(String::as_str),
            labels.get(LABEL_CLUSTER).and_then(|v| v.parse::<u32>().ok()),
            labels.get(LABEL_SERVER).and_then(|v| v.parse::<u32>().ok()),
        );
        if let (Some("server"), Some(c), Some(id)) = server
            && obj.spec.storage.retention == PvcRetention::Delete
        {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
            let pvc = names.server_pvc(c, id);
            tracing::info!(pvc = %pvc, "deleting the removed server's volume (retention: Delete)");
            ignore_not_found(pvcs.delete(&pvc, &DeleteParams::default()).await.map(|_| ()))?;
        }
    }
    let wanted = rendered.names_of("Service");
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    for s in svcs.list(&selector).await? {
        let name = s.name_any();
        if !wanted.contains(&name) && owned_by(&s.metadata, obj) {
            tracing::info!(service = %name, "removing what the spec no longer wants");
            ignore_not_found(svcs.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
        }
    }
    // NetworkPolicies switched off (or the broker's, for an external one).
    let wanted = rendered.names_of("NetworkPolicy");
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    for p in policies.list(&selector).await? {
        let name = p.name_any();
        if !wanted.contains(&name) && owned_by(&p.metadata, obj) {
            tracing::info!(networkpolicy = %name, "removing what the spec no longer wants");
            ignore_not_found(policies.delete(&name, &DeleteParams::default()).await.map(|_| ()))?;
        }
    }
    if rendered.tls != render::TlsPlan::CertManager {
        crate::secrets::retire_certificate(&ctx.client, names).await?;
    }
    Ok(())
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

/// Sets `sns.io/role` on every server pod whose label disagrees with the
/// coordinator. A merge patch, not an apply: the pods belong to their
/// StatefulSets, the operator only owns this one label.
async fn label_roles(names: &Names, obs: &Observation, ctx: &Context) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let list = pods.list(&ListParams::default().labels(&names.server_selector())).await?;
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    for (pod, role) in status::role_changes(&list.items, obs) {
        tracing::info!(pod = %pod, role, "role label");
        let patch = serde_json::json!({"metadata": {"labels": {LABEL_ROLE: role}}});
        ignore_not_found(pods.patch(&pod, &params, &Patch::Merge(&patch)).await.map(|_| ()))?;
    }
    Ok(())
}

/// Runs before the SnsCluster goes: owner references take the children
/// (garbage collection); what is left to decide is the volumes (servers',
/// coordinator's, managed broker's: all carry the SnsCluster's labels),
/// which no owner reference covers when they are retained.
async fn cleanup(obj: Arc<SnsCluster>, ctx: Arc<Context>) -> Result<Action> {
    let names = Names::of(&obj)?;
    let note = match obj.spec.storage.retention {
        PvcRetention::Delete => {
            let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &names.namespace);
            pvcs.delete_collection(&DeleteParams::default(), &ListParams::default().labels(&names.selector())).await?;
            "deleting the SnsCluster and its PersistentVolumeClaims, the coordinator's records included (storage.retention: Delete)"
        }
        PvcRetention::Retain => {
            "deleting the SnsCluster; its PersistentVolumeClaims are kept, the coordinator's records included (storage.retention: Retain)"
        }
    };
    crate::secrets::on_delete(&ctx.client, &names, obj.spec.storage.retention).await?;
    tracing::info!(note, "cleanup");
    ctx.publish(&obj, false, "Deleting", "Delete", note.into()).await;
    ctx.applied.lock().expect("applied lock").remove(&key(&obj));
    ctx.routing.forget(&names.coordinator_endpoint());
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SnsClusterStatus;
    use crate::fixtures::{Mock, World, cluster, healthy_table, old_coordinator_deployment, server_pod};
    use crate::status::{PROGRESSING, READY};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    fn finalized(mut obj: SnsCluster) -> SnsCluster {
        obj.metadata.finalizers = Some(vec![FINALIZER.into()]);
        obj
    }

    fn lines(calls: &[crate::fixtures::Call]) -> Vec<String> {
        calls.iter().map(|c| c.line()).collect()
    }

    const NS: &str = "/api/v1/namespaces/prod";
    const APPS: &str = "/apis/apps/v1/namespaces/prod";
    const NET: &str = "/apis/networking.k8s.io/v1/namespaces/prod";
    const CERTS: &str = "/apis/cert-manager.io/v1/namespaces/prod";

    /// The calls of a full apply of the default `demo` SnsCluster.
    fn full_apply() -> Vec<String> {
        let mut v = secret_calls();
        v.push(format!("PATCH {NS}/configmaps/demo-config"));
        for p in ["server", "coordinator", "broker"] {
            v.push(format!("PATCH {NET}/networkpolicies/demo-{p}"));
        }
        v.extend([format!("PATCH {NS}/services/demo-coordinator"), format!("PATCH {NS}/services/demo-nodes")]);
        for c in 1..=3 {
            v.push(format!("PATCH {NS}/services/demo-master-{c}"));
        }
        v.push(format!("PATCH {NS}/services/demo-rabbitmq"));
        v.push(format!("PATCH {APPS}/statefulsets/demo-rabbitmq"));
        // No Deployment left from before the coordinator had a volume.
        v.push(format!("GET {APPS}/deployments/demo-coordinator"));
        v.push(format!("PATCH {APPS}/statefulsets/demo-coordinator"));
        for c in 1..=3 {
            for s in 1..=2 {
                v.push(format!("PATCH {APPS}/statefulsets/demo-server-{c}-{s}"));
            }
        }
        for c in 1..=3 {
            v.push(format!("PATCH /apis/policy/v1/namespaces/prod/poddisruptionbudgets/demo-cluster-{c}"));
        }
        v.push(format!("GET {APPS}/statefulsets"));
        v.push(format!("GET {NS}/services"));
        v.push(format!("GET {NET}/networkpolicies"));
        // No cert-manager Certificate left from an issuer the spec dropped.
        v.push(format!("DELETE {CERTS}/certificates/demo-tls"));
        v
    }

    /// The Secrets of a first apply (none exists yet): broker credentials
    /// created blind (409 if there), the node secret, CA and node
    /// certificate each read, then created.
    fn secret_calls() -> Vec<String> {
        let mut v = vec![format!("POST {NS}/secrets")];
        for s in ["demo-node-secret", "demo-ca", "demo-tls"] {
            v.push(format!("GET {NS}/secrets/{s}"));
            v.push(format!("POST {NS}/secrets"));
        }
        v
    }

    fn status_of(call: &crate::fixtures::Call) -> SnsClusterStatus {
        serde_json::from_value(call.body["status"].clone()).unwrap()
    }

    #[tokio::test]
    async fn a_new_sns_cluster_first_gets_the_finalizer() {
        let mock = Mock::new(World::default(), None);
        let action = reconcile(Arc::new(cluster("demo", json!({}))), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        let calls = mock.calls().await;
        assert_eq!(lines(&calls), ["PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo"]);
        let ops = calls[0].body.as_array().unwrap();
        assert_eq!(ops.last().unwrap()["value"], json!([FINALIZER]));
    }

    #[tokio::test]
    async fn first_apply_creates_everything_labels_roles_and_writes_status() {
        let world =
            World { pods: vec![server_pod("demo", 1, 1, None), server_pod("demo", 1, 2, None)], ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        let obj = finalized(cluster("demo", json!({})));
        let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        assert_eq!(mock.ctx.metrics.reconciles(), 1);
        let calls = mock.calls().await;
        let mut expected = full_apply();
        expected.extend([
            format!("GET {NS}/pods"),
            format!("PATCH {NS}/pods/demo-server-1-1-0"),
            format!("PATCH {NS}/pods/demo-server-1-2-0"),
            "POST /apis/events.k8s.io/v1/namespaces/prod/events".into(),
            "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".into(),
        ]);
        assert_eq!(lines(&calls), expected);

        // Every apply is a server-side apply by our one field manager.
        for c in calls.iter().filter(|c| c.method == "PATCH" && !c.uri.contains("/pods/")) {
            assert!(c.uri.contains("fieldManager=sns-operator"), "{}", c.uri);
            assert!(c.uri.contains("force=true"), "{}", c.uri);
        }
        // The generated password went into the Secret, URL included.
        let secret = &calls[0].body;
        assert_eq!(secret["metadata"]["name"], "demo-rabbitmq-credentials");
        assert!(secret["data"]["url"].is_string());
        // Pods listed by the server selector; roles from the table.
        let pods = full_apply().len();
        assert!(calls[pods].uri.contains("labelSelector="), "{}", calls[pods].uri);
        assert_eq!(calls[pods + 1].body, json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
        assert_eq!(calls[pods + 2].body, json!({"metadata": {"labels": {"sns.io/role": "slave"}}}));
        assert_eq!(calls[pods + 3].body["reason"], "Created");
        // The coordinator: a StatefulSet whose records live on its claim.
        let coord = calls.iter().find(|c| c.uri.contains("/statefulsets/demo-coordinator?")).unwrap();
        assert_eq!(coord.body["kind"], "StatefulSet");
        let claim = &coord.body["spec"]["volumeClaimTemplates"][0];
        assert_eq!(claim["metadata"]["name"], "data");
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
        let pod = &coord.body["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(pod["volumeMounts"][0], json!({"name": "data", "mountPath": "/data"}));
        let args: Vec<&str> = pod["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
        assert!(args.contains(&"--gateway"));
        assert!(calls.iter().all(|c| !c.uri.contains("/deployments/") || c.method == "GET"));
        let status = status_of(&calls[pods + 4]);
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.masters.as_deref(), Some("3/3"));
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(status.clusters[2].master.as_deref(), Some("demo-server-3-1-0"));
    }

    #[tokio::test]
    async fn steady_state_touches_nothing_and_a_failover_updates_status() {
        let mock = Mock::new(World::default(), Some(healthy_table(3, 2)));
        let mut obj = finalized(cluster("demo", json!({})));
        reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
        // As the watch would deliver it: the object with the status written.
        let mut table = healthy_table(3, 2);
        let names = Names::of(&obj).unwrap();
        let observed = Observation::from_table(3, 2, &table);
        obj.status = Some(status::next_status(&obj, &names, Ok(&observed), Timestamp::now()).0);

        // Nothing changed: the children are not re-applied (the Context
        // remembers them), the status is not rewritten; only the pod list.
        reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();

        // Cluster 2 fails over to server 2.
        table[2].alive = false;
        table[2].is_master = false;
        table[3].is_master = true;
        table[3].term = 2;
        mock.set_table(Some(table));
        reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(mock.ctx.metrics.failovers(), 1);
        let calls = mock.calls().await;
        let all = lines(&calls);
        let first = full_apply().len() + 3; // pods, event, status
        assert_eq!(all[first..first + 1], [format!("GET {NS}/pods")], "{all:#?}");
        assert_eq!(
            all[first + 1..],
            [
                format!("GET {NS}/pods"),
                "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
                "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".to_string(),
            ]
        );
        let event = &calls[calls.len() - 2].body;
        assert_eq!(event["reason"], "Failover");
        assert_eq!(event["type"], "Warning");
        let status = status_of(calls.last().unwrap());
        assert_eq!(status.clusters[1].master.as_deref(), Some("demo-server-2-2-0"));
        assert_eq!(status.clusters[1].term, Some(2));
        assert!(status.last_failover_time.is_some());
    }

    #[tokio::test]
    async fn unreachable_coordinator_still_applies_and_reports_progressing() {
        let world = World { secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, None);
        let obj = finalized(cluster("demo", json!({})));
        let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        let calls = mock.calls().await;
        let mut expected = full_apply();
        expected.extend([
            "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
            "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo/status".to_string(),
        ]);
        assert_eq!(lines(&calls), expected, "no pod list or label without a routing table");
        let status = status_of(calls.last().unwrap());
        let ready = status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.reason, "CoordinatorUnreachable");
        let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!(progressing.status, "True");
    }

    #[tokio::test]
    async fn upgrade_retires_the_coordinator_deployment_before_the_statefulset_starts() {
        let world = World {
            deployments: vec![old_coordinator_deployment("demo", false)],
            secret_exists: true,
            ..Default::default()
        };
        let mock = Mock::new(world, None);
        let obj = Arc::new(finalized(cluster("demo", json!({}))));
        // 1. The old Deployment is there: deleted in the foreground (it goes
        //    only after its pod), and the StatefulSet waits.
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        // 2. Still terminating: not deleted twice, the StatefulSet still
        //    waits, and the whole apply is retried at once (not at resync).
        mock.change_world(|w| w.deployments = vec![old_coordinator_deployment("demo", true)]);
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        // 3. Gone: now the StatefulSet is applied, and the apply counts as
        //    done, so 4. a further poll applies nothing.
        mock.change_world(|w| w.deployments.clear());
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();

        let calls = mock.calls().await;
        let all = lines(&calls);
        // Each full apply starts with the Secrets and ends with the
        // prune's Certificate check; events and status writes come between.
        let starts: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, l)| l.ends_with("/secrets/demo-node-secret"))
            .map(|(i, _)| i - 1)
            .collect();
        assert_eq!(starts.len(), 3, "three full applies, none on the fourth poll: {all:#?}");
        let applies: Vec<&[String]> = starts
            .iter()
            .map(|&i| {
                let end = i + all[i..]
                    .iter()
                    .position(|l| l.starts_with("DELETE") && l.ends_with("/certificates/demo-tls"))
                    .unwrap();
                &all[i..=end]
            })
            .collect();
        let coordinator_sts = format!("PATCH {APPS}/statefulsets/demo-coordinator");
        let old = format!("{APPS}/deployments/demo-coordinator");
        let mut waiting: Vec<String> = full_apply().into_iter().filter(|l| *l != coordinator_sts).collect();
        assert_eq!(applies[1], waiting, "2: still waiting");
        let at = waiting.iter().position(|l| *l == format!("GET {old}")).unwrap();
        waiting.insert(at + 1, format!("DELETE {old}"));
        assert_eq!(applies[0], waiting, "1: deleted, the StatefulSet waits");
        let delete = calls.iter().find(|c| c.method == "DELETE" && c.uri.contains("/deployments/")).unwrap();
        assert_eq!(delete.body["propagationPolicy"], "Foreground", "the Deployment goes only after its pods");
        assert_eq!(applies[2], full_apply(), "3: gone, the StatefulSet applied");
        assert_eq!(all.iter().filter(|l| l.starts_with("DELETE") && l.contains("/deployments/")).count(), 1);
    }

    #[tokio::test]
    async fn a_deployment_the_operator_did_not_make_is_left_alone() {
        let mut foreign = old_coordinator_deployment("demo", false);
        foreign["metadata"]["labels"] = json!({"app": "something-else"});
        foreign["metadata"]["ownerReferences"] = json!([]);
        let world = World { deployments: vec![foreign], secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, None);
        reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
        let all = lines(&mock.calls().await);
        assert_eq!(all[..full_apply().len()], full_apply()[..], "{all:#?}");
    }

    #[tokio::test]
    async fn scale_down_prunes_the_second_servers() {
        let leftover = |c: u32| -> Value {
            json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {
                    "name": format!("demo-server-{c}-2"), "namespace": "prod",
                    "labels": {"app.kubernetes.io/component": "server", "sns.io/cluster": c.to_string(), "sns.io/server": "2"},
                    "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
                }
            })
        };
        // The coordinator is always wanted: never pruned, its claim kept.
        let coordinator = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {
                "name": "demo-coordinator", "namespace": "prod",
                "labels": {"app.kubernetes.io/component": "coordinator"},
                "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
            }
        });
        for (retention, deletes_pvcs) in [("Retain", false), ("Delete", true)] {
            let world = World {
                statefulsets: vec![coordinator.clone(), leftover(1), leftover(2)],
                secret_exists: true,
                ..Default::default()
            };
            let mock = Mock::new(world, None);
            let obj = finalized(cluster(
                "demo",
                json!({"clusters": 2, "serversPerCluster": 1, "storage": {"retention": retention}}),
            ));
            reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
            let calls = lines(&mock.calls().await);
            let list = calls.iter().position(|l| l == &format!("GET {APPS}/statefulsets")).unwrap();
            let mut expected = Vec::new();
            for c in 1..=2 {
                expected.push(format!("DELETE {APPS}/statefulsets/demo-server-{c}-2"));
                if deletes_pvcs {
                    expected.push(format!("DELETE {NS}/persistentvolumeclaims/data-demo-server-{c}-2-0"));
                }
            }
            expected.push(format!("GET {NS}/services"));
            assert_eq!(calls[list + 1..list + 1 + expected.len()], expected[..], "{retention}");
            assert!(calls.iter().all(|l| !l.contains("coordinator") || !l.starts_with("DELETE")), "{calls:#?}");
        }
    }

    #[tokio::test]
    async fn deletion_with_retain_keeps_volumes_and_secrets() {
        // The broker credentials as an older operator made them: owned by
        // the SnsCluster, so garbage collection would take them while the
        // retained RabbitMQ volume keeps their password.
        let owned = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "demo-rabbitmq-credentials", "namespace": "prod",
                "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
            }
        });
        let node = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-node-secret", "namespace": "prod"}});
        let world = World { secrets: vec![owned, node], ..Default::default() };
        let mock = Mock::new(world, None);
        let mut obj = finalized(cluster("demo", json!({})));
        obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(mock.table.forgotten.lock().unwrap().len(), 1, "the coordinator's channel is closed");
        let calls = mock.calls().await;
        let mut expected: Vec<String> = ["demo-rabbitmq-credentials", "demo-node-secret", "demo-ca", "demo-tls"]
            .iter()
            .map(|s| format!("PATCH {NS}/secrets/{s}"))
            .collect();
        expected.push("POST /apis/events.k8s.io/v1/namespaces/prod/events".into());
        expected.push("PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo".into());
        assert_eq!(lines(&calls), expected, "the Secrets are kept, released from the SnsCluster; absent ones are fine");
        for c in &calls[..4] {
            assert_eq!(c.body, json!({"metadata": {"ownerReferences": null}}), "a merge patch dropping the owner");
        }
        assert!(calls.iter().all(|c| c.method != "DELETE"), "nothing is deleted");
        assert!(calls[4].body["note"].as_str().unwrap().contains("kept"));
        assert!(calls.iter().all(|c| !c.uri.contains("persistentvolumeclaims")), "no claim is touched");
        // The finalizer helper tests that ours is still there, then removes it.
        let ops = calls[5].body.as_array().unwrap();
        assert_eq!(ops[0]["op"], "test");
        assert_eq!(ops[1]["op"], "remove");
    }

    #[tokio::test]
    async fn deletion_with_delete_removes_this_clusters_volumes() {
        let mock = Mock::new(World::default(), None);
        let mut obj = finalized(cluster("demo", json!({"storage": {"retention": "Delete"}})));
        obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        let forgotten = mock.table.forgotten.lock().unwrap().clone();
        assert_eq!(forgotten, ["http://demo-coordinator.prod.svc:9000"], "its coordinator's channel is closed");
        let calls = mock.calls().await;
        assert_eq!(
            lines(&calls),
            [
                format!("DELETE {NS}/persistentvolumeclaims"),
                format!("DELETE {NS}/secrets"),
                "POST /apis/events.k8s.io/v1/namespaces/prod/events".to_string(),
                "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo".to_string(),
            ]
        );
        let uri = &calls[0].uri;
        assert!(
            uri.contains("labelSelector=app.kubernetes.io%2Finstance%3Ddemo"),
            "only this SnsCluster's claims: {uri}"
        );
        // The selector takes the coordinator's claim (its records) with the
        // servers' and the broker's, and no other SnsCluster's.
        let selector = uri.split("labelSelector=").nth(1).unwrap().split('&').next().unwrap();
        let selector = selector.replace("%2F", "/").replace("%3D", "=").replace("%2C", ",");
        let matches = |labels: &std::collections::BTreeMap<String, String>| {
            selector.split(',').all(|t| {
                let (k, v) = t.split_once('=').unwrap();
                labels.get(k).map(String::as_str) == Some(v)
            })
        };
        let claims = |obj: &SnsCluster| -> Vec<(String, std::collections::BTreeMap<String, String>)> {
            let r = render::render(obj, &RenderOptions { default_image: "x".into() }).unwrap();
            r.children
                .iter()
                .filter_map(|c| match c {
                    Child::StatefulSet(s) => Some(s),
                    _ => None,
                })
                .map(|s| {
                    let t = &s.spec.as_ref().unwrap().volume_claim_templates.as_ref().unwrap()[0];
                    (s.name_any(), t.metadata.labels.clone().unwrap())
                })
                .collect()
        };
        let ours = claims(&cluster("demo", json!({"storage": {"retention": "Delete"}})));
        assert!(ours.iter().any(|(n, _)| n == "demo-coordinator"));
        assert_eq!(ours.len(), 8);
        for (name, labels) in &ours {
            assert!(matches(labels), "{name}'s claim is deleted: {selector} vs {labels:?}");
        }
        for (name, labels) in claims(&cluster("other", json!({}))) {
            assert!(!matches(&labels), "{name} belongs to another SnsCluster");
        }
        assert!(calls[2].body["note"].as_str().unwrap().contains("coordinator"));
        // The generated Secrets go by the same selector, and only ours.
        assert_eq!(
            calls[1].uri.split("labelSelector=").nth(1).unwrap().split('&').next(),
            uri.split("labelSelector=").nth(1).unwrap().split('&').next()
        );
        let secret_labels = |obj: &SnsCluster| {
            let r = render::render(obj, &RenderOptions { default_image: "x".into() }).unwrap();
            [r.node_secret.metadata.labels.clone().unwrap(), r.broker_secret.unwrap().metadata.labels.unwrap()]
        };
        for labels in secret_labels(&cluster("demo", json!({}))) {
            assert!(matches(&labels), "{labels:?}");
        }
        for labels in secret_labels(&cluster("other", json!({}))) {
            assert!(!matches(&labels), "{labels:?}");
        }
    }

    #[tokio::test]
    async fn a_new_sns_cluster_gets_a_random_node_secret_a_ca_and_a_node_certificate() {
        let decode = |v: &Value| -> String {
            String::from_utf8(serde_json::from_value::<k8s_openapi::ByteString>(v.clone()).unwrap().0).unwrap()
        };
        let mut values = Vec::new();
        for _ in 0..2 {
            let mock = Mock::new(World::default(), None);
            reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
            let authenticated = mock.table.authenticated.lock().unwrap().clone();
            let calls = mock.calls().await;
            assert_eq!(lines(&calls)[..secret_calls().len()], secret_calls()[..]);
            let posted = |name: &str| {
                calls.iter().find(|c| c.method == "POST" && c.body["metadata"]["name"] == name).unwrap().body.clone()
            };
            let node = posted("demo-node-secret");
            let value = decode(&node["data"]["secret"]);
            assert!(value.len() >= 64 && value.chars().all(|c| c.is_ascii_hexdigit()), "32 random bytes, hex");
            assert!(node["metadata"]["ownerReferences"].is_null(), "kept or deleted by retention, not by owner");
            let ca = decode(&posted("demo-ca")["data"]["tls.crt"]);
            let tls = posted("demo-tls");
            assert_eq!(decode(&tls["data"]["ca.crt"]), ca, "the node certificate ships its CA");
            assert!(decode(&tls["data"]["tls.crt"]).starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(decode(&tls["data"]["tls.key"]).contains("PRIVATE KEY"));
            let creds = &authenticated[0].1;
            let expected = sns_node::auth::Secret::from_text(&value).unwrap();
            assert_eq!(creds.secret.as_ref().unwrap().seal(b"x"), expected.seal(b"x"));
            assert_eq!(creds.ca.as_deref(), Some(ca.as_str()));
            values.push(value);
        }
        assert_ne!(values[0], values[1], "each SnsCluster its own secret");
    }

    #[tokio::test]
    async fn network_policies_switched_off_are_pruned() {
        let policy = |name: &str, uid: &str| {
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {
                    "name": name, "namespace": "prod",
                    "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": uid}]
                }
            })
        };
        let world = World {
            network_policies: vec![
                policy("demo-server", "uid-1"),
                policy("demo-broker", "uid-1"),
                policy("demo-x", "uid-9"),
            ],
            secret_exists: true,
            ..Default::default()
        };
        let mock = Mock::new(world, None);
        let spec = json!({"networkPolicy": {"enabled": false}});
        reconcile(Arc::new(finalized(cluster("demo", spec))), mock.ctx.clone()).await.unwrap();
        let all = lines(&mock.calls().await);
        assert!(all.iter().all(|l| !l.starts_with("PATCH") || !l.contains("networkpolicies")), "none applied");
        let deleted: Vec<&String> =
            all.iter().filter(|l| l.starts_with("DELETE") && l.contains("networkpolicies")).collect();
        assert_eq!(
            deleted,
            [
                &format!("DELETE {NET}/networkpolicies/demo-server"),
                &format!("DELETE {NET}/networkpolicies/demo-broker")
            ],
            "ours only"
        );
    }

    #[tokio::test]
    async fn with_an_issuer_cert_manager_makes_the_certificate_and_no_ca_is_generated() {
        let spec = json!({"tls": {"issuerRef": {"name": "sns-ca"}}, "networkPolicy": {"enabled": false}});
        let mock = Mock::new(World::default(), None);
        let obj = Arc::new(finalized(cluster("demo", spec)));
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        // Once cert-manager has written the Secret, the next poll reads its
        // CA (the apply was left incomplete), and the one after applies
        // nothing.
        let issued = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "demo-tls", "namespace": "prod"},
            "data": {"ca.crt": "Q0EgUEVN"}
        });
        mock.change_world(|w| w.secrets.push(issued));
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        reconcile(obj, mock.ctx.clone()).await.unwrap();
        let authenticated = mock.table.authenticated.lock().unwrap().clone();
        let calls = mock.calls().await;
        let all = lines(&calls);
        assert_eq!(authenticated.len(), 2, "two full applies, none on the third poll: {all:#?}");
        assert_eq!(authenticated[1].1.ca.as_deref(), Some("CA PEM"));
        assert_eq!(
            all[..5],
            [
                format!("POST {NS}/secrets"),
                format!("GET {NS}/secrets/demo-node-secret"),
                format!("POST {NS}/secrets"),
                // Not issued yet: no CA to trust until cert-manager writes it.
                format!("GET {NS}/secrets/demo-tls"),
                format!("PATCH {NS}/configmaps/demo-config"),
            ],
            "no CA or certificate of the operator's own, no NetworkPolicy: {all:#?}"
        );
        let cert = calls.iter().find(|c| c.uri.contains("/certificates/demo-tls?")).unwrap();
        assert_eq!(cert.method, "PATCH");
        assert!(cert.uri.contains("fieldManager=sns-operator"), "server-side applied: {}", cert.uri);
        assert_eq!(cert.body["spec"]["issuerRef"]["name"], "sns-ca");
        assert!(all.iter().all(|l| !l.starts_with("DELETE")), "the Certificate is wanted: {all:#?}");
        // The list for the prune still runs: policies switched off go.
        assert!(all.contains(&format!("GET {NET}/networkpolicies")));
        assert!(authenticated[0].1.secret.is_some() && authenticated[0].1.ca.is_none());
    }

    #[tokio::test]
    async fn existing_secrets_are_read_not_replaced_and_reach_the_admin_calls() {
        use crate::render::tls;
        let names = Names::of(&cluster("demo", json!({}))).unwrap();
        let value = "5f0c8a7e2b9d4c61a3e8f0b7d2c5a9e41f6b3d8c0a7e2b9d4c61a3e8f0b7d2c5";
        let r = render::render(&cluster("demo", json!({})), &RenderOptions { default_image: "x".into() }).unwrap();
        let render::TlsPlan::Operator { names: tls_names } = &r.tls else { panic!("TLS is on by default") };
        let ca = tls::new_ca(&names).unwrap();
        let node = tls::issue_node_cert(&names, tls_names, &ca).unwrap();
        let node_secret = serde_json::to_value(render::node_secret(&r.node_secret, value)).unwrap();
        let ca_secret = serde_json::to_value(tls::ca_secret(&names, &ca)).unwrap();
        let fresh = |checksum: &str| {
            let mut s = serde_json::to_value(tls::node_tls_secret(&names, &node, &ca.cert, checksum)).unwrap();
            s["metadata"]["resourceVersion"] = json!("7");
            s
        };
        let current = tls::names_checksum(tls_names);
        for (tls_secret, reissued) in [(fresh(&current), false), (fresh("for-other-names"), true)] {
            let world = World {
                secret_exists: true,
                secrets: vec![node_secret.clone(), ca_secret.clone(), tls_secret],
                ..Default::default()
            };
            let mock = Mock::new(world, None);
            reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
            let authenticated = mock.table.authenticated.lock().unwrap().clone();
            let calls = mock.calls().await;
            let mut expected = vec![
                format!("POST {NS}/secrets"),
                format!("GET {NS}/secrets/demo-node-secret"),
                format!("GET {NS}/secrets/demo-ca"),
                format!("GET {NS}/secrets/demo-tls"),
            ];
            if reissued {
                expected.push(format!("PUT {NS}/secrets/demo-tls"));
            }
            expected.push(format!("PATCH {NS}/configmaps/demo-config"));
            assert_eq!(lines(&calls)[..expected.len()], expected[..], "reissued: {reissued}");
            if reissued {
                let put = &calls[4].body;
                assert_eq!(put["metadata"]["resourceVersion"], "7", "replaces exactly what it read");
                assert_eq!(put["metadata"]["annotations"][tls::TLS_NAMES_ANNOTATION], current.as_str());
                let ca_crt = put["data"]["ca.crt"].as_str().unwrap();
                assert_eq!(ca_crt, json!(k8s_openapi::ByteString(ca.cert.clone().into_bytes())), "from the same CA");
            }
            // The admin calls carry the stored secret's token and trust the
            // stored CA.
            let [(endpoint, creds)] = &authenticated[..] else { panic!("{authenticated:?}") };
            assert_eq!(endpoint, "http://demo-coordinator.prod.svc:9000");
            let stored = sns_node::auth::Secret::from_text(value).unwrap();
            assert_eq!(creds.secret.as_ref().unwrap().seal(b"x"), stored.seal(b"x"));
            assert_eq!(creds.ca.as_deref(), Some(ca.cert.as_str()));
        }
    }

    #[tokio::test]
    async fn api_errors_fail_the_reconcile_and_back_off() {
        let world = World { fail_applies: true, ..Default::default() };
        let mock = Mock::new(world, None);
        let obj = Arc::new(finalized(cluster("demo", json!({}))));
        let err = reconcile(obj.clone(), mock.ctx.clone()).await.unwrap_err();
        assert!(err.to_string().contains("bad day"), "{err}");
        assert_eq!(mock.ctx.metrics.failures(), 1);
        let ctx = mock.ctx.clone();
        assert_eq!(error_policy(obj.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(5)));
        assert_eq!(error_policy(obj.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(10)));
        drop(ctx);
        let calls = lines(&mock.calls().await);
        // The secrets, then the first apply fails and nothing else is tried.
        let mut expected = secret_calls();
        expected.push(format!("PATCH {NS}/configmaps/demo-config"));
        assert_eq!(calls, expected);
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(7), Duration::from_secs(300));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn polling_follows_the_heartbeat() {
        let fast = cluster("demo", json!({"heartbeat": {"intervalMillis": 500}}));
        assert_eq!(poll_interval(&fast), Duration::from_secs(1));
        let slow = cluster("demo", json!({"heartbeat": {"intervalMillis": 60000}}));
        assert_eq!(poll_interval(&slow), Duration::from_secs(10));
    }
}
