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
//! 4. an `sns.io/switchover` annotation is taken off the object and the
//!    coordinator asked for that switchover (see [`crate::switchover`]);
//!    the rolling update takes its next step, if everything is healthy
//!    (deletes one server pod, or hands a master role to an updated slave:
//!    see [`crate::rollout`]);
//!    the coordinator's routing table gives each server pod's role: the
//!    `sns.io/role` label is patched where it is wrong, which moves the
//!    per-cluster master Service;
//! 5. status (conditions, masters, terms, last failover, last switchover,
//!    rollout; Ready also asks the managed broker's StatefulSet) is written
//!    via the status subresource when it changed, and Events
//!    tell of creation, scaling, failover and switchover;
//! 6. requeue after one heartbeat interval (1-10 s), which is what keeps the
//!    role labels current: the coordinator has no watch API.

use crate::coordinator::{NodeView, RoutingTable};
use crate::crd::{PvcRetention, SnsCluster, SwitchoverStatus};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::render::{
    self, Child, LABEL_CLUSTER, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_ROLE, LABEL_SERVER, MANAGER,
    Names, RenderOptions, Rendered,
};
use crate::rollout;
use crate::scale;
use crate::status::{self, Observation};
use crate::switchover::{self, Requester};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
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
    ctx.metrics.reconciled(started.elapsed(), result.is_ok());
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
    let spec = &obj.spec;
    let endpoint = names.coordinator_endpoint();
    let mut table = ctx.routing.table(&endpoint).await;
    // The server pods: the templates they run decide the rolling update and
    // the StatefulSets' partitions; their labels show the roles.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let pods = pods.list(&ListParams::default().labels(&names.server_selector())).await?.items;
    let wanted = rollout::wanted_hashes(&rendered);
    let requested = obj.annotations().get(switchover::ANNOTATION);
    let mut plan = table.as_deref().ok().map(|nodes| rollout::plan(&wanted, &pods, nodes, &names));
    if let Some(p) = plan.as_mut()
        && requested.is_some()
        && matches!(p.step, rollout::Step::Update { .. } | rollout::Step::Switchover { .. })
    {
        // One change of roles or pods per poll, and never a server updated
        // while it may be the one asked for.
        p.step = rollout::Step::Wait("a requested switchover goes first".into());
    }
    let step = plan.as_ref().map(|p| &p.step);
    let partitions = rollout::partitions(&wanted, &pods, step);
    let mut switched = None;
    let mut held = Vec::new();
    if due {
        let complete = apply_children(&obj, &names, &rendered, &partitions, &ctx).await?;
        let pruned = prune(&obj, &names, &rendered, table.as_deref().ok(), &ctx).await?;
        if let Some(record) = pruned.switched {
            switched = Some(record);
            table = ctx.routing.table(&endpoint).await;
        }
        // Left incomplete (the old coordinator still terminating, a
        // scale-down waiting), the next poll applies again rather than
        // waiting for a resync.
        if complete && pruned.held.is_empty() && switched.is_none() {
            ctx.applied.lock().expect("applied lock").insert(k, (checksum, Instant::now()));
        }
        held = pruned.held;
        ctx.metrics.applied();
    }
    if let (Some(rollout::Step::Update { cluster, server, pod }), Some(p)) = (step, &plan) {
        if !due {
            let sts = rendered.children.iter().find_map(|c| match c {
                Child::StatefulSet(s) if s.name_any() == names.server(*cluster, *server) => Some(s),
                _ => None,
            });
            if let Some(sts) = sts {
                ssa::<StatefulSet>(&ctx.client, &names.namespace, &with_partition(sts, 0)).await?;
            }
        }
        let note = format!("updating {pod} to the current template ({}/{} updated)", p.updated, p.total);
        tracing::info!(%note, "rolling update");
        ctx.publish(&obj, false, "RollingUpdate", "Update", note).await;
    }

    if let Some(value) = requested {
        if switched.is_some() {
            tracing::info!(request = %value, "switchover request left for the next poll: a scale-down made one");
        } else if table.is_ok() {
            if let Some((record, notice)) = requested_switchover(&obj, value, &endpoint, &ctx).await? {
                ctx.publish(&obj, notice.warning, notice.reason, notice.action, notice.note).await;
                switched = Some(record);
                // The roles and terms the status and labels show are the
                // ones after it.
                table = ctx.routing.table(&endpoint).await;
            }
        } else {
            tracing::info!(request = %value, "switchover waits for the coordinator to answer");
        }
    }
    let mut rollout_status = None;
    if let Some(mut plan) = plan {
        if let rollout::Step::Switchover { cluster, to } = plan.step
            && switched.is_none()
        {
            let target = switchover::Target { cluster, to: Some(to) };
            let (record, notice) =
                switchover::run(ctx.routing.as_ref(), &endpoint, Requester::Rollout, None, target).await;
            ctx.publish(&obj, notice.warning, notice.reason, notice.action, notice.note).await;
            if !record.succeeded {
                plan.step = rollout::Step::Paused(format!("the switchover it needs failed: {}", record.message));
            }
            switched = Some(record);
            table = ctx.routing.table(&endpoint).await;
        }
        if !held.is_empty() {
            // A server that scale-down must keep for now is a health issue
            // of its own: nothing else is rolled meanwhile.
            plan.step = rollout::Step::Paused(held.join("; "));
        }
        rollout_status = Some(plan.status(&names));
    }
    match &table {
        Ok(nodes) => {
            let o = Observation::from_table(spec.clusters, spec.servers_per_cluster, nodes);
            label_roles(&names, &o, &pods, &ctx).await?;
        }
        Err(e) => {
            tracing::info!(error = %e, "no routing table yet; role labels left as they are, no rolling update step")
        }
    }
    let broker_ready = match (&table, spec.managed_broker()) {
        (Ok(_), Some(_)) => Some(broker_ready(&names, &ctx).await?),
        _ => None,
    };
    let observation = table.map(|nodes| Observation {
        broker_ready,
        ..Observation::from_table(spec.clusters, spec.servers_per_cluster, &nodes)
    });
    let why;
    let obs = match &observation {
        Ok(o) => Ok(o),
        Err(e) => {
            why = e.to_string();
            Err(why.as_str())
        }
    };
    let (status, notices) =
        status::next_status(&obj, &names, obs, switched.as_ref(), rollout_status.as_ref(), Timestamp::now());
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

/// The `sns.io/switchover` annotation: removed first (under the object's
/// resourceVersion), then carried out; None when the object changed
/// meanwhile (the next reconcile sees the new value). See [`switchover`].
async fn requested_switchover(
    obj: &SnsCluster,
    value: &str,
    endpoint: &str,
    ctx: &Context,
) -> Result<Option<(SwitchoverStatus, status::Notice)>> {
    let api: Api<SnsCluster> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": obj.resource_version(),
            "annotations": {switchover::ANNOTATION: null},
        }
    });
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    match api.patch(&obj.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::info!("the SnsCluster changed before its switchover annotation was taken; next time");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Some(match switchover::parse(value, &obj.spec) {
        Ok(target) => switchover::run(ctx.routing.as_ref(), endpoint, Requester::Annotation, Some(value), target).await,
        Err(why) => switchover::refused(Requester::Annotation, Some(value), None, why, Timestamp::now()),
    }))
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
/// A server StatefulSet with the given rolling-update partition.
fn with_partition(sts: &StatefulSet, partition: i32) -> StatefulSet {
    let mut sts = sts.clone();
    if let Some(ru) = sts.spec.as_mut().and_then(|s| s.update_strategy.as_mut()).and_then(|u| u.rolling_update.as_mut())
    {
        ru.partition = Some(partition);
    }
    sts
}

async fn apply_children(
    obj: &SnsCluster,
    names: &Names,
    rendered: &Rendered,
    partitions: &BTreeMap<(u32, u32), i32>,
    ctx: &Context,
) -> Result<bool> {
    let ns = names.namespace.as_str();
    if let Some(template) = &rendered.broker_secret {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let secret = render::broker_secret(template, names, &render::random_password()?);
        let params = PostParams { field_manager: Some(MANAGER.into()), ..Default::default() };
        match secrets.create(&params, &secret).await {
            Ok(_) => tracing::info!(secret = %names.rabbitmq_secret(), "broker credentials created"),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {}
            Err(e) => return Err(e.into()),
        }
    }
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
            Child::StatefulSet(o) => {
                let server = rollout::server_of(o);
                match server.and_then(|k| partitions.get(&k)) {
                    Some(&p) => ssa::<StatefulSet>(&ctx.client, ns, &with_partition(o, p)).await?,
                    None => ssa::<StatefulSet>(&ctx.client, ns, o).await?,
                }
            }
            Child::Pdb(o) => ssa::<PodDisruptionBudget>(&ctx.client, ns, o).await?,
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

/// What a prune left: removals that wait (why), and the switchover one of
/// them made first.
#[derive(Default)]
struct Pruned {
    held: Vec<String>,
    switched: Option<SwitchoverStatus>,
}

/// Deletes the StatefulSets and Services of this SnsCluster that the
/// current spec no longer renders; a server's only when [`scale::removal`]
/// allows (a master hands its role over first, at most one switchover per
/// poll).
async fn prune(
    obj: &SnsCluster,
    names: &Names,
    rendered: &Rendered,
    table: Option<&[NodeView]>,
    ctx: &Context,
) -> Result<Pruned> {
    let ns = names.namespace.as_str();
    let selector = ListParams::default().labels(&names.selector());
    let wanted = rendered.names_of("StatefulSet");
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let mut pruned = Pruned::default();
    for s in sts.list(&selector).await? {
        let name = s.name_any();
        if wanted.contains(&name) || !owned_by(&s.metadata, obj) || s.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = s.labels();
        let server = (
            labels.get(LABEL_COMPONENT).map(String::as_str),
            labels.get(LABEL_CLUSTER).and_then(|v| v.parse::<u32>().ok()),
            labels.get(LABEL_SERVER).and_then(|v| v.parse::<u32>().ok()),
        );
        if let (Some("server"), Some(c), Some(id)) = server {
            match scale::removal(table, c, id, obj.spec.servers_per_cluster) {
                scale::Removal::Remove => {}
                scale::Removal::Keep(why) => {
                    tracing::info!(statefulset = %name, %why, "scale-down waits");
                    pruned.held.push(why);
                    continue;
                }
                scale::Removal::SwitchFirst { to } => {
                    pruned.held.push(format!("server {c}/{id} is master: handing its role to server {c}/{to} first"));
                    if pruned.switched.is_none() {
                        let target = switchover::Target { cluster: c, to: Some(to) };
                        let endpoint = names.coordinator_endpoint();
                        let (record, notice) =
                            switchover::run(ctx.routing.as_ref(), &endpoint, Requester::ScaleDown, None, target).await;
                        ctx.publish(obj, notice.warning, notice.reason, notice.action, notice.note).await;
                        pruned.switched = Some(record);
                    }
                    continue;
                }
            }
        }
        tracing::info!(statefulset = %name, "removing what the spec no longer wants");
        ignore_not_found(sts.delete(&name, &DeleteParams::background()).await.map(|_| ()))?;
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
    Ok(pruned)
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<()> {
    match r {
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

/// Whether the managed broker's pod is ready, by its StatefulSet (listed
/// by name: the operator may list StatefulSets, not get them).
async fn broker_ready(names: &Names, ctx: &Context) -> Result<bool> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let by_name = ListParams::default().fields(&format!("metadata.name={}", names.rabbitmq()));
    let list = api.list(&by_name).await?;
    Ok(list.items.into_iter().any(|s| s.status.and_then(|s| s.ready_replicas).unwrap_or(0) >= 1))
}

/// Sets `sns.io/role` on every server pod whose label disagrees with the
/// coordinator. A merge patch, not an apply: the pods belong to their
/// StatefulSets, the operator only owns this one label.
async fn label_roles(names: &Names, obs: &Observation, list: &[Pod], ctx: &Context) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..Default::default() };
    for (pod, role) in status::role_changes(list, obs) {
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

    /// The calls of a poll of the default `demo` SnsCluster up to its full
    /// apply: the server pods are listed first (their templates decide the
    /// StatefulSets' partitions).
    fn full_apply() -> Vec<String> {
        let mut v = vec![
            format!("GET {NS}/pods"),
            format!("POST {NS}/secrets"),
            format!("PATCH {NS}/configmaps/demo-config"),
            format!("PATCH {NS}/services/demo-coordinator"),
            format!("PATCH {NS}/services/demo-nodes"),
        ];
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
        let world = World {
            pods: vec![server_pod("demo", 1, 1, None), server_pod("demo", 1, 2, None)],
            broker_ready: Some(1),
            ..Default::default()
        };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        let obj = finalized(cluster("demo", json!({})));
        let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(5)));
        assert_eq!(mock.ctx.metrics.reconciles(), 1);
        let calls = mock.calls().await;
        let mut expected = full_apply();
        expected.extend([
            format!("PATCH {NS}/pods/demo-server-1-1-0"),
            format!("PATCH {NS}/pods/demo-server-1-2-0"),
            format!("GET {APPS}/statefulsets"),
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
        let secret = &calls[1].body;
        assert_eq!(secret["metadata"]["name"], "demo-rabbitmq-credentials");
        assert!(secret["data"]["url"].is_string());
        // Pods listed by the server selector; roles from the table.
        assert!(calls[0].uri.contains("labelSelector="), "{}", calls[0].uri);
        let pods = full_apply().len();
        assert_eq!(calls[pods].body, json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
        assert_eq!(calls[pods + 1].body, json!({"metadata": {"labels": {"sns.io/role": "slave"}}}));
        assert!(calls[pods + 2].uri.contains("fieldSelector=metadata.name%3Ddemo-rabbitmq"), "{}", calls[pods + 2].uri);
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
        let mock = Mock::new(World { broker_ready: Some(1), ..Default::default() }, Some(healthy_table(3, 2)));
        let mut obj = finalized(cluster("demo", json!({})));
        reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
        // As the watch would deliver it: the object with the status written.
        let mut table = healthy_table(3, 2);
        let names = Names::of(&obj).unwrap();
        let observed = Observation { broker_ready: Some(true), ..Observation::from_table(3, 2, &table) };
        let wanted = rollout::wanted_hashes(&render::render(&obj, &mock.ctx.render).unwrap());
        let rolled = rollout::plan(&wanted, &[], &table, &names).status(&names);
        obj.status = Some(status::next_status(&obj, &names, Ok(&observed), None, Some(&rolled), Timestamp::now()).0);

        // Nothing changed: the children are not re-applied (the Context
        // remembers them), the status is not rewritten; only the pod list
        // and the broker's readiness are read.
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
        let first = full_apply().len() + 3; // broker, event, status
        let broker = format!("GET {APPS}/statefulsets");
        assert_eq!(all[first..first + 2], [format!("GET {NS}/pods"), broker.clone()], "{all:#?}");
        assert_eq!(
            all[first + 2..],
            [
                format!("GET {NS}/pods"),
                broker,
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

    fn annotated(value: &str) -> SnsCluster {
        let mut obj = finalized(cluster("demo", json!({})));
        obj.metadata.annotations = Some([(switchover::ANNOTATION.to_string(), value.to_string())].into());
        obj
    }

    const SNS: &str = "/apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo";
    const EVENTS: &str = "POST /apis/events.k8s.io/v1/namespaces/prod/events";

    #[tokio::test]
    async fn the_switchover_annotation_is_taken_then_carried_out_once() {
        let world = World { secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        let obj = annotated("2");
        reconcile(Arc::new(obj.clone()), mock.ctx.clone()).await.unwrap();
        assert_eq!(*mock.table.switchovers.lock().unwrap(), [(2, None)]);
        // The watch then delivers the object without the annotation: nothing
        // more is asked of the coordinator.
        let mut after = obj.clone();
        after.metadata.annotations = None;
        reconcile(Arc::new(after), mock.ctx.clone()).await.unwrap();
        assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1, "once");
        assert_eq!(mock.ctx.metrics.failovers(), 0, "a planned switchover is no failover");

        let table = mock.table.clone();
        let calls = mock.calls().await;
        let all = lines(&calls);
        let n = full_apply().len();
        assert_eq!(all[..n], full_apply()[..]);
        // Taken first, under the resourceVersion it was read at; then the
        // event, the role labels and the status after the switchover.
        assert_eq!(all[n], format!("PATCH {SNS}"));
        assert_eq!(
            calls[n].body,
            json!({"metadata": {"resourceVersion": "100", "annotations": {"sns.io/switchover": null}}})
        );
        assert_eq!(all[n + 1], EVENTS);
        assert_eq!(calls[n + 1].body["reason"], "Switchover");
        assert_eq!(calls[n + 1].body["type"], "Normal");
        assert!(calls[n + 1].body["note"].as_str().unwrap().contains("cluster 2: master 1 -> 2 (term 2)"));
        let status = status_of(calls.iter().find(|c| c.line().ends_with("/status")).unwrap());
        let last = status.last_switchover.unwrap();
        assert!(last.succeeded);
        assert_eq!((last.cluster, last.from, last.to, last.term), (2, Some(1), Some(2), Some(2)));
        assert_eq!((last.requested_by.as_str(), last.request.as_deref()), ("annotation", Some("2")));
        assert_eq!(status.clusters[1].master.as_deref(), Some("demo-server-2-2-0"));
        assert_eq!(status.clusters[1].term, Some(2));
        assert!(status.last_failover_time.is_none());
        assert!(calls.iter().all(|c| c.body["reason"] != "Failover"), "no failover warning");
        assert_eq!(all.iter().filter(|l| **l == format!("PATCH {SNS}")).count(), 1);
        drop(table);
    }

    #[tokio::test]
    async fn a_server_can_be_named_and_a_refusal_is_reported() {
        let world = World { secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        *mock.table.refuse.lock().unwrap() = Some("server 2 is not in sync".into());
        reconcile(Arc::new(annotated("3/2")), mock.ctx.clone()).await.unwrap();
        assert_eq!(*mock.table.switchovers.lock().unwrap(), [(3, Some(2))]);
        let calls = mock.calls().await;
        let event = calls.iter().find(|c| c.line() == EVENTS).unwrap();
        assert_eq!(event.body["reason"], "SwitchoverFailed");
        assert_eq!(event.body["type"], "Warning");
        let status = status_of(calls.last().unwrap());
        let last = status.last_switchover.unwrap();
        assert!(!last.succeeded);
        assert_eq!((last.cluster, last.to), (3, Some(2)));
        assert!(last.message.contains("server 2 is not in sync"), "{}", last.message);
        assert_eq!(status.clusters[2].master.as_deref(), Some("demo-server-3-1-0"), "nothing moved");
    }

    #[tokio::test]
    async fn a_malformed_annotation_is_taken_and_explained_not_retried() {
        let world = World { secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        reconcile(Arc::new(annotated("4")), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty());
        let calls = mock.calls().await;
        assert!(calls.iter().any(|c| c.line() == format!("PATCH {SNS}")), "removed");
        let last = status_of(calls.last().unwrap()).last_switchover.unwrap();
        assert!(!last.succeeded);
        assert!(last.message.contains("cluster \"4\" is not one of 1..=3"), "{}", last.message);
    }

    #[tokio::test]
    async fn the_annotation_waits_for_the_coordinator_and_for_a_current_object() {
        // The coordinator does not answer: the annotation stays for later.
        let world = World { secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, None);
        reconcile(Arc::new(annotated("1")), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty());
        let calls = lines(&mock.calls().await);
        assert!(!calls.contains(&format!("PATCH {SNS}")), "{calls:#?}");

        // The object changed since it was read: the removal conflicts and
        // nothing is asked (the next reconcile reads the new value).
        let world = World { secret_exists: true, conflict_on_merge: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        reconcile(Arc::new(annotated("1")), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty());
        let status = status_of(mock.calls().await.last().unwrap());
        assert!(status.last_switchover.is_none());
    }

    /// The partition each server StatefulSet was applied with, in order.
    fn partitions(calls: &[crate::fixtures::Call]) -> Vec<(&str, i64)> {
        calls
            .iter()
            .filter(|c| c.method == "PATCH" && c.uri.contains("/statefulsets/demo-server-"))
            .map(|c| {
                let name = c.line().rsplit("demo-server-").next().unwrap().to_string();
                let p = c.body["spec"]["updateStrategy"]["rollingUpdate"]["partition"].as_i64().unwrap();
                (&*name.leak(), p)
            })
            .collect()
    }

    /// Every server pod of the default `demo`: made from the current
    /// template, or from an older one for those in `old`; all Ready.
    fn pods_with_old(old: &[(u32, u32)]) -> Vec<Pod> {
        let obj = cluster("demo", json!({}));
        let wanted = rollout::wanted_hashes(
            &render::render(&obj, &RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }).unwrap(),
        );
        wanted
            .iter()
            .map(|(&(c, s), h)| {
                let hash = if old.contains(&(c, s)) { "old" } else { h.as_str() };
                crate::fixtures::rolled_pod("demo", c, s, hash, true)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_rolling_update_lets_one_slave_go_and_says_so() {
        let pods = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
        let world = World { pods, secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty());
        let calls = mock.calls().await;
        assert!(calls.iter().all(|c| c.method != "DELETE"), "the StatefulSet controller replaces the pod");
        assert_eq!(
            partitions(&calls),
            [("1-1", 1), ("1-2", 0), ("2-1", 1), ("2-2", 1), ("3-1", 1), ("3-2", 1)],
            "one server at a time, cluster 1's slave first"
        );
        let event = calls.iter().find(|c| c.body["reason"] == "RollingUpdate").unwrap();
        assert!(event.body["note"].as_str().unwrap().contains("updating demo-server-1-2-0"));
        let status = status_of(calls.last().unwrap());
        let r = status.rollout.unwrap();
        assert_eq!((r.state.as_str(), r.updated_servers.as_str()), ("Updating", "0/6"));
        let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!((progressing.status.as_str(), progressing.reason.as_str()), ("True", "RollingUpdate"));
    }

    #[tokio::test]
    async fn a_rolling_update_moves_the_master_to_the_updated_slave() {
        // Cluster 1's slave is done; its master is next.
        let pods = pods_with_old(&[(1, 1), (2, 1), (2, 2)]);
        let world = World { pods, secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        reconcile(Arc::new(finalized(cluster("demo", json!({})))), mock.ctx.clone()).await.unwrap();
        assert_eq!(*mock.table.switchovers.lock().unwrap(), [(1, Some(2))]);
        let calls = mock.calls().await;
        assert_eq!(
            partitions(&calls),
            [("1-1", 1), ("1-2", 0), ("2-1", 1), ("2-2", 1), ("3-1", 0), ("3-2", 0)],
            "the old master is let go at the next poll; updated pods stay on the current template"
        );
        // The labels follow the new master at once.
        let label =
            |pod: &str| calls.iter().find(|c| c.line() == format!("PATCH {NS}/pods/{pod}")).map(|c| c.body.clone());
        assert_eq!(label("demo-server-1-2-0").unwrap(), json!({"metadata": {"labels": {"sns.io/role": "master"}}}));
        let status = status_of(calls.last().unwrap());
        let last = status.last_switchover.unwrap();
        assert_eq!((last.requested_by.as_str(), last.cluster, last.to, last.succeeded), ("rollout", 1, Some(2), true));
        assert_eq!(status.clusters[0].master.as_deref(), Some("demo-server-1-2-0"));
        assert_eq!(status.rollout.unwrap().updated_servers, "3/6");
    }

    #[tokio::test]
    async fn a_rolling_update_pauses_on_anything_unhealthy() {
        let mut pods = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
        pods[5] = crate::fixtures::rolled_pod("demo", 3, 2, "old", false);
        let world = World { pods, secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(healthy_table(3, 2)));
        let obj = Arc::new(finalized(cluster("demo", json!({}))));
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty());
        // Fixed: the next poll (nothing else to apply) lets cluster 1's
        // slave go, and applies that one StatefulSet only.
        let all_old = pods_with_old(&[(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
        mock.change_world(|w| w.pods = all_old);
        reconcile(obj, mock.ctx.clone()).await.unwrap();
        let calls = mock.calls().await;
        let second = calls.iter().rposition(|c| c.line() == format!("GET {NS}/pods")).unwrap();
        assert_eq!(partitions(&calls[second..]), [("1-2", 0)]);
        let calls = &calls[..second];
        assert!(partitions(calls).iter().all(|(_, p)| *p == 1), "every server held");
        let status = status_of(calls.last().unwrap());
        let r = status.rollout.unwrap();
        assert_eq!((r.state.as_str(), r.message.as_str()), ("Paused", "demo-server-3-2-0 is not ready"));
        assert!(calls.iter().all(|c| c.body["reason"] != "RollingUpdate"));
        let progressing = status.conditions.iter().find(|c| c.type_ == PROGRESSING).unwrap();
        assert_eq!(progressing.reason, "RolloutPaused");
        assert!(progressing.message.contains("demo-server-3-2-0 is not ready"), "{}", progressing.message);
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
        assert_eq!(lines(&calls), expected, "no label without a routing table");
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
        // Each full apply starts with the Secret and ends with the prune's
        // Service list; events and status writes come between.
        let starts: Vec<usize> =
            all.iter().enumerate().filter(|(_, l)| l.ends_with("/secrets")).map(|(i, _)| i).collect();
        assert_eq!(starts.len(), 3, "three full applies, none on the fourth poll: {all:#?}");
        let applies: Vec<&[String]> = starts
            .iter()
            .map(|&i| {
                let end = i + all[i..].iter().position(|l| *l == format!("GET {NS}/services")).unwrap();
                &all[i..=end]
            })
            .collect();
        let coordinator_sts = format!("PATCH {APPS}/statefulsets/demo-coordinator");
        let old = format!("{APPS}/deployments/demo-coordinator");
        let apply_only = || full_apply().into_iter().skip(1); // from the Secret on
        let mut waiting: Vec<String> = apply_only().filter(|l| *l != coordinator_sts).collect();
        assert_eq!(applies[1], waiting, "2: still waiting");
        let at = waiting.iter().position(|l| *l == format!("GET {old}")).unwrap();
        waiting.insert(at + 1, format!("DELETE {old}"));
        assert_eq!(applies[0], waiting, "1: deleted, the StatefulSet waits");
        let delete = calls.iter().find(|c| c.method == "DELETE").unwrap();
        assert_eq!(delete.body["propagationPolicy"], "Foreground", "the Deployment goes only after its pods");
        assert_eq!(applies[2], apply_only().collect::<Vec<_>>(), "3: gone, the StatefulSet applied");
        assert_eq!(all.iter().filter(|l| l.starts_with("DELETE")).count(), 1);
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
            let mock = Mock::new(world, Some(healthy_table(2, 2)));
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

    fn server_sts(c: u32, s: u32) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {
                "name": format!("demo-server-{c}-{s}"), "namespace": "prod",
                "labels": {"app.kubernetes.io/component": "server", "sns.io/cluster": c.to_string(), "sns.io/server": s.to_string()},
                "ownerReferences": [{"apiVersion": "sns.io/v1alpha1", "kind": "SnsCluster", "name": "demo", "uid": "uid-1"}]
            }
        })
    }

    #[tokio::test]
    async fn scale_down_moves_a_master_off_the_server_it_removes_first() {
        // Cluster 2's master is server 2; cluster 1's is server 1.
        let mut table = healthy_table(2, 2);
        table[2].is_master = false;
        table[3].is_master = true;
        let world =
            World { statefulsets: vec![server_sts(1, 2), server_sts(2, 2)], secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(table));
        let obj = Arc::new(finalized(cluster("demo", json!({"clusters": 2, "serversPerCluster": 1}))));
        reconcile(obj.clone(), mock.ctx.clone()).await.unwrap();
        assert_eq!(*mock.table.switchovers.lock().unwrap(), [(2, Some(1))]);
        mock.change_world(|w| w.statefulsets = vec![server_sts(2, 2)]);
        // Next poll: server 2/2 is a slave now, and goes; the apply counted
        // as unfinished, so it is retried at once.
        reconcile(obj, mock.ctx.clone()).await.unwrap();
        assert_eq!(mock.table.switchovers.lock().unwrap().len(), 1);
        let calls = mock.calls().await;
        let deletes: Vec<String> = calls.iter().filter(|c| c.method == "DELETE").map(|c| c.line()).collect();
        assert_eq!(
            deletes,
            [
                format!("DELETE {APPS}/statefulsets/demo-server-1-2"),
                format!("DELETE {APPS}/statefulsets/demo-server-2-2"),
            ],
            "1/2 (a slave) at once, 2/2 only after its role moved"
        );
        let first_status = status_of(calls.iter().find(|c| c.line().ends_with("/status")).unwrap());
        let last = first_status.last_switchover.unwrap();
        assert_eq!((last.requested_by.as_str(), last.cluster, last.to), ("scale-down", 2, Some(1)));
        assert!(first_status.rollout.unwrap().message.contains("server 2/2 is master"));
        assert_eq!(first_status.clusters[1].master.as_deref(), Some("demo-server-2-1-0"));
    }

    #[tokio::test]
    async fn scale_down_keeps_the_only_server_holding_every_write() {
        // Cluster 1: server 2 is master and server 1 is behind.
        let mut table = healthy_table(2, 2);
        table[0].is_master = false;
        table[0].in_sync = false;
        table[1].is_master = true;
        let world =
            World { statefulsets: vec![server_sts(1, 2), server_sts(2, 2)], secret_exists: true, ..Default::default() };
        let mock = Mock::new(world, Some(table));
        let obj = finalized(cluster("demo", json!({"clusters": 2, "serversPerCluster": 1})));
        reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert!(mock.table.switchovers.lock().unwrap().is_empty(), "no in-sync server to hand the role to");
        let calls = mock.calls().await;
        let deletes: Vec<String> = calls.iter().filter(|c| c.method == "DELETE").map(|c| c.line()).collect();
        assert_eq!(deletes, [format!("DELETE {APPS}/statefulsets/demo-server-2-2")], "cluster 2's slave only");
        let rollout = status_of(calls.last().unwrap()).rollout.unwrap();
        assert_eq!(rollout.state, "Paused");
        assert!(rollout.message.contains("server 1/2 stays"), "{}", rollout.message);
    }

    #[tokio::test]
    async fn deletion_with_retain_keeps_volumes() {
        let mock = Mock::new(World::default(), None);
        let mut obj = finalized(cluster("demo", json!({})));
        obj.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let action = reconcile(Arc::new(obj), mock.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(mock.table.forgotten.lock().unwrap().len(), 1, "the coordinator's channel is closed");
        let calls = mock.calls().await;
        assert_eq!(
            lines(&calls),
            [
                "POST /apis/events.k8s.io/v1/namespaces/prod/events",
                "PATCH /apis/sns.io/v1alpha1/namespaces/prod/snsclusters/demo",
            ]
        );
        assert!(calls[0].body["note"].as_str().unwrap().contains("kept"));
        assert!(calls.iter().all(|c| !c.uri.contains("persistentvolumeclaims")), "no claim is touched");
        // The finalizer helper tests that ours is still there, then removes it.
        let ops = calls[1].body.as_array().unwrap();
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
        assert!(calls[1].body["note"].as_str().unwrap().contains("coordinator"));
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
        // The secret, then the first apply fails and nothing else is tried.
        assert_eq!(
            calls,
            [format!("GET {NS}/pods"), format!("POST {NS}/secrets"), format!("PATCH {NS}/configmaps/demo-config")]
        );
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
