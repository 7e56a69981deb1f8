//! The reconciler: `reconcile(obj, ctx) -> Result<Action>` and
//! `error_policy`, in the shape of kube-rs's controller-rs.
//!
//! One reconcile of an SnsCluster:
//! 1. kube's `finalizer()` helper adds `sns.io/cleanup` first, and on
//!    deletion runs [`cleanup`] (PVC retention) before letting it go;
//! 2. the Secrets are made if missing (see [`crate::secrets`]: broker
//!    credentials, never overwritten as RabbitMQ keeps the password in its
//!    volume; the node secret; the CA and node certificate), and the
//!    coordinator client is handed the node token and the CA, so every
//!    `CoordAdmin` call below (table, switchover) is authenticated and,
//!    with TLS on, over TLS;
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
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
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
    sns_proto::backoff::Backoff::after_failures(Duration::from_secs(5), Duration::from_secs(300), failures)
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
    // The Secrets first: every call to the coordinator below (its table, a
    // switchover of the annotation, the rollout or a scale-down) carries
    // the node token and trusts the CA they hold.
    let mut issued = true;
    if due {
        let credentials = crate::secrets::ensure(&ctx.client, &names, &rendered).await?;
        // cert-manager has not issued the certificate yet: its CA is
        // needed for the coordinator calls as soon as it is there.
        issued = rendered.tls != render::TlsPlan::CertManager || credentials.ca.is_some();
        ctx.routing.authenticate(&endpoint, credentials);
    }
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
        let complete = apply_children(&obj, &names, &rendered, &partitions, &ctx).await? && issued;
        let pruned = prune(&obj, &names, &rendered, table.as_deref().ok(), &ctx).await?;
        if let Some(record) = pruned.switched {
            switched = Some(record);
            table = ctx.routing.table(&endpoint).await;
        }
        // Left incomplete (the old coordinator still terminating, a
        // scale-down waiting, the certificate not issued), the next poll
        // applies again rather than waiting for a resync.
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
        let last = obj.status.as_ref().and_then(|s| s.last_switchover.as_ref());
        if let rollout::Step::Switchover { cluster, to } = plan.step
            && switched.is_none()
            && !switchover::may_ask(
                last,
                Requester::Rollout,
                switchover::Target { cluster, to: Some(to) },
                Timestamp::now(),
            )
        {
            let why = last.map(|l| l.message.as_str()).unwrap_or_default();
            plan.step = rollout::Step::Paused(format!("the switchover it needs failed (asked again shortly): {why}"));
        } else if let rollout::Step::Switchover { cluster, to } = plan.step
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
        (Ok(_), Some(b)) => Some(broker_ready(&names, b.replicas, &ctx).await?),
        _ => None,
    };
    let coordinators = match &table {
        Ok(_) => coordinator_readiness(live_coordinator(&names, &ctx).await?.as_ref(), spec.coordinator.replicas),
        Err(_) => None,
    };
    let observation = table.map(|nodes| Observation {
        broker_ready,
        coordinators,
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

/// A server StatefulSet with the given rolling-update partition.
fn with_partition(sts: &StatefulSet, partition: i32) -> StatefulSet {
    let mut sts = sts.clone();
    if let Some(ru) = sts.spec.as_mut().and_then(|s| s.update_strategy.as_mut()).and_then(|u| u.rolling_update.as_mut())
    {
        ru.partition = Some(partition);
    }
    sts
}

/// Applies every child, each whatever became of the others; false when the
/// coordinator's StatefulSet had to wait for the Deployment it replaces to
/// go, an [`Error::Apply`] naming those that failed (also a Warning Event).
async fn apply_children(
    obj: &SnsCluster,
    names: &Names,
    rendered: &Rendered,
    partitions: &BTreeMap<(u32, u32), i32>,
    ctx: &Context,
) -> Result<bool> {
    let ns = names.namespace.as_str();
    let mut complete = true;
    // One child refused (an immutable field of a StatefulSet, a webhook, a
    // quota) must not hold back the others: the broker is applied before
    // the nodes, and a broken broker would otherwise freeze every server.
    let mut failed = Vec::new();
    for child in &rendered.children {
        let result = match child {
            Child::ConfigMap(o) => ssa::<ConfigMap>(&ctx.client, ns, o).await,
            Child::Service(o) => ssa::<Service>(&ctx.client, ns, o).await,
            Child::StatefulSet(o) if o.name_any() == names.coordinator() => {
                match retire_coordinator_deployment(obj, names, ctx).await {
                    Ok(true) => match live_coordinator(names, ctx).await {
                        Ok(live) => {
                            let (step, held) = coordinator_step(o, live.as_ref());
                            if held {
                                tracing::info!(statefulset = %names.coordinator(), "replicated coordinator: pod 0 takes over the records first, the standbys come once it leads");
                                complete = false;
                            }
                            ssa::<StatefulSet>(&ctx.client, ns, &step).await
                        }
                        Err(e) => Err(e),
                    },
                    Ok(false) => {
                        complete = false;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Child::StatefulSet(o) => {
                let server = rollout::server_of(o);
                match server.and_then(|k| partitions.get(&k)) {
                    Some(&p) => ssa::<StatefulSet>(&ctx.client, ns, &with_partition(o, p)).await,
                    None => ssa::<StatefulSet>(&ctx.client, ns, o).await,
                }
            }
            Child::Pdb(o) => ssa::<PodDisruptionBudget>(&ctx.client, ns, o).await,
            Child::NetworkPolicy(o) => ssa::<NetworkPolicy>(&ctx.client, ns, o).await,
            Child::ServiceAccount(o) => ssa::<ServiceAccount>(&ctx.client, ns, o).await,
            Child::Role(o) => ssa::<Role>(&ctx.client, ns, o).await,
            Child::RoleBinding(o) => ssa::<RoleBinding>(&ctx.client, ns, o).await,
            Child::Certificate(o) => crate::secrets::apply_certificate(&ctx.client, names, o).await,
        };
        if let Err(e) = result {
            tracing::warn!(kind = child.kind(), name = %child.name(), error = %e, "cannot apply");
            failed.push(format!("{}/{}: {}", child.kind(), child.name(), api_message(&e)));
        }
    }
    if !failed.is_empty() {
        let err = Error::Apply { failed, total: rendered.children.len() };
        ctx.publish(obj, true, "ApplyFailed", "Apply", err.to_string()).await;
        return Err(err);
    }
    tracing::debug!(objects = rendered.children.len(), uid = ?obj.uid(), complete, "children applied");
    Ok(complete)
}

/// The API server's own words for a refused request (what `kubectl`
/// would show), else the error.
fn api_message(e: &Error) -> String {
    match e {
        Error::Kube(kube::Error::Api(s)) => s.message.clone(),
        other => other.to_string(),
    }
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
                    let target = switchover::Target { cluster: c, to: Some(to) };
                    let last = obj.status.as_ref().and_then(|s| s.last_switchover.as_ref());
                    if pruned.switched.is_none()
                        && switchover::may_ask(last, Requester::ScaleDown, target, Timestamp::now())
                    {
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
    let certificates = rendered.names_of("Certificate");
    for name in [names.tls_secret(), names.rabbitmq_tls_secret()] {
        if !certificates.contains(&name) {
            crate::secrets::retire_certificate(&ctx.client, names, &name).await?;
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

/// The coordinator's StatefulSet as the API server holds it (listed by
/// name: the operator may list StatefulSets, not get them).
async fn live_coordinator(names: &Names, ctx: &Context) -> Result<Option<StatefulSet>> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let by_name = ListParams::default().fields(&format!("metadata.name={}", names.coordinator()));
    Ok(api.list(&by_name).await?.items.into_iter().next())
}

/// The coordinator StatefulSet to apply, and whether it is held back.
///
/// A single coordinator becoming replicated (`coordinator.replicas` raised,
/// or an SnsCluster made before replicas existed, whose default is now 2)
/// moves in two steps. First its one pod is replaced by a replica (still
/// one pod: the StatefulSet deletes the old pod before it starts the new
/// one), which leads at once and imports the records of its volume into
/// the empty ConfigMap; only once that pod runs the replicated template and
/// is ready (it leads) are the standbys added. Applying both at once would
/// start a standby beside the old single coordinator, which might lead and
/// serve with the empty records of its own new volume while the old one
/// still serves.
pub(crate) fn coordinator_step(desired: &StatefulSet, live: Option<&StatefulSet>) -> (StatefulSet, bool) {
    let want = desired.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(live) = live else { return (desired.clone(), false) };
    let live_replicas = live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if want < 2 || live_replicas >= 2 || leads_replicated(live) {
        return (desired.clone(), false);
    }
    let mut held = desired.clone();
    if let Some(spec) = held.spec.as_mut() {
        spec.replicas = Some(1);
    }
    (held, true)
}

/// Whether a coordinator StatefulSet runs the replicated template on every
/// pod and one of them is ready (the leader).
fn leads_replicated(sts: &StatefulSet) -> bool {
    let replicated = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|p| p.containers.iter().flat_map(|c| c.env.iter().flatten()).any(|e| e.name == "SNS_KUBE_HA"));
    let Some(status) = sts.status.as_ref() else { return false };
    let current = status.observed_generation >= sts.metadata.generation
        && status.update_revision.is_some()
        && status.current_revision == status.update_revision;
    replicated && current && status.ready_replicas.unwrap_or(0) >= 1
}

/// Coordinator pods ready and replicas wanted, from its StatefulSet.
/// None when there is no StatefulSet to tell (the coordinator answered
/// all the same).
fn coordinator_readiness(live: Option<&StatefulSet>, want: u32) -> Option<(u32, u32)> {
    let ready = live?.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    Some((u32::try_from(ready).unwrap_or(0), want))
}

/// Whether the managed broker serves, by its StatefulSet (listed by name:
/// the operator may list StatefulSets, not get them): its pod is ready, or
/// for a cluster of `replicas` nodes a majority, which quorum queues need.
async fn broker_ready(names: &Names, replicas: u32, ctx: &Context) -> Result<bool> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let by_name = ListParams::default().fields(&format!("metadata.name={}", names.rabbitmq()));
    let list = api.list(&by_name).await?;
    let majority = i32::try_from(replicas / 2 + 1).unwrap_or(i32::MAX);
    Ok(list.items.into_iter().any(|s| s.status.and_then(|s| s.ready_replicas).unwrap_or(0) >= majority))
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
    crate::secrets::on_delete(&ctx.client, &names, obj.spec.storage.retention).await?;
    tracing::info!(note, "cleanup");
    ctx.publish(&obj, false, "Deleting", "Delete", note.into()).await;
    ctx.applied.lock().expect("applied lock").remove(&key(&obj));
    ctx.routing.forget(&names.coordinator_endpoint());
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests;
