//! Kubernetes objects rendered from an `SnsCluster`: a pure function of the
//! resource, so every object is unit-tested without an API server.
//!
//! Mapping (names for an SnsCluster `demo`):
//!
//! | object | name | what |
//! |---|---|---|
//! | StatefulSet (replicas 1) + Service | `demo-coordinator` | the coordinator, its records on the PVC `data` (`data-demo-coordinator-0`); a StatefulSet so that two coordinators never run at once and a restarted one finds its records; the Service also serves the client gateway |
//! | StatefulSet (replicas 1) | `demo-server-<c>-<s>` | one per server process: containers `server` and `synchronizer` sharing the PVC `data` |
//! | headless Service | `demo-nodes` | stable DNS `demo-server-<c>-<s>-0.demo-nodes.<ns>.svc` for every server pod |
//! | Service | `demo-master-<c>` | selects the pod labelled `sns.io/role=master` in cluster c |
//! | PodDisruptionBudget | `demo-cluster-<c>` | at most one server of a cluster down by choice |
//! | ConfigMap | `demo-config` | environment shared by every node (`SNS_LOG`) |
//! | StatefulSet + Service + Secret | `demo-rabbitmq`, `demo-rabbitmq-credentials` | the managed broker |
//!
//! Why one StatefulSet per server process rather than one per SNS cluster
//! with two replicas: each pod's command line is then exactly the
//! deployment plan's (`sns_node::topology::plan`), with fixed cluster,
//! server and synchronizer ids and ports, instead of ids derived from a pod
//! ordinal at start-up; and master/slave is decided by the coordinator, not
//! by the ordinal, so nothing is lost by giving up a shared StatefulSet.
//! It also lets scale-down remove exactly server 2 of every cluster.

use crate::crd::{PvcRetention, SnsCluster, SnsClusterSpec};
use crate::error::{Error, Result};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, GRPCAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sns_node::topology::{self, PlanOptions, Process, Role};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The plan's base port: the coordinator listens on 9000 (the course's
/// port), server (c, s) on 9000 + 10c + s, its synchronizer on 9000 + 10c + 5 + s.
pub const BASE_PORT: u16 = 9000;
/// Where each server pod and the coordinator mount their volume; the plan
/// puts server (c, s) in `/data/cluster_<c>/<s>` and the coordinator's
/// records in `/data/coordinator`.
pub const DATA_ROOT: &str = "/data";
/// Port of the services that front a whole role (coordinator, masters).
pub const SERVICE_PORT: i32 = 9000;
pub const AMQP_PORT: i32 = 5672;
pub const RABBITMQ_MANAGEMENT_PORT: i32 = 15672;
/// User id of the runtime image (see the Dockerfile).
pub const RUN_AS_USER: i64 = 10001;
/// The official RabbitMQ image's `rabbitmq` user.
const RABBITMQ_USER_ID: i64 = 999;

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_CLUSTER: &str = "sns.io/cluster";
pub const LABEL_SERVER: &str = "sns.io/server";
/// `master`, `slave` or `unknown`, kept current by the operator from the
/// coordinator's routing table (never part of a pod template).
pub const LABEL_ROLE: &str = "sns.io/role";
pub const MANAGER: &str = "sns-operator";
const CONFIG_HASH: &str = "sns.io/config-hash";

/// Everything the renderer needs besides the resource itself.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Image for `sns-node` when the spec names none (the operator's own).
    pub default_image: String,
}

/// Names of one SnsCluster's children.
#[derive(Debug, Clone)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn of(obj: &SnsCluster) -> Result<Names> {
        let instance = obj.name_any();
        let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
        Ok(Names { instance, namespace })
    }
    /// The coordinator's StatefulSet and Service.
    pub fn coordinator(&self) -> String {
        format!("{}-coordinator", self.instance)
    }
    /// The PVC of the coordinator (from the `data` volumeClaimTemplate).
    pub fn coordinator_pvc(&self) -> String {
        format!("data-{}-0", self.coordinator())
    }
    pub fn nodes(&self) -> String {
        format!("{}-nodes", self.instance)
    }
    pub fn server(&self, cluster: u32, server: u32) -> String {
        format!("{}-server-{cluster}-{server}", self.instance)
    }
    /// The pod of a server's StatefulSet.
    pub fn server_pod(&self, cluster: u32, server: u32) -> String {
        format!("{}-0", self.server(cluster, server))
    }
    /// The PVC of a server (from the `data` volumeClaimTemplate).
    pub fn server_pvc(&self, cluster: u32, server: u32) -> String {
        format!("data-{}", self.server_pod(cluster, server))
    }
    pub fn master(&self, cluster: u32) -> String {
        format!("{}-master-{cluster}", self.instance)
    }
    pub fn pdb(&self, cluster: u32) -> String {
        format!("{}-cluster-{cluster}", self.instance)
    }
    pub fn config(&self) -> String {
        format!("{}-config", self.instance)
    }
    pub fn rabbitmq(&self) -> String {
        format!("{}-rabbitmq", self.instance)
    }
    pub fn rabbitmq_secret(&self) -> String {
        format!("{}-rabbitmq-credentials", self.instance)
    }
    /// In-cluster address of the coordinator, for the operator itself.
    pub fn coordinator_endpoint(&self) -> String {
        format!("http://{}.{}.svc:{SERVICE_PORT}", self.coordinator(), self.namespace)
    }
    /// The plan's advertise-host template: `{pod}` becomes `server-<c>-<s>`,
    /// giving the server pod's stable DNS name through the headless Service.
    pub fn advertise_template(&self) -> String {
        format!("{}-{{pod}}-0.{}.{}.svc", self.instance, self.nodes(), self.namespace)
    }
    /// Prefix of the deployment's broker objects: unique per namespace and
    /// name, in the alphabet `sns-node` accepts (letters, digits, '-', '_';
    /// at most 64).
    pub fn deployment(&self) -> String {
        deployment_name(&self.namespace, &self.instance)
    }
    pub fn selector(&self) -> String {
        format!("{LABEL_INSTANCE}={},{LABEL_MANAGED_BY}={MANAGER}", self.instance)
    }
    pub fn server_selector(&self) -> String {
        format!("{},{LABEL_COMPONENT}=server", self.selector())
    }
}

pub fn deployment_name(namespace: &str, name: &str) -> String {
    let raw = format!("{namespace}-{name}");
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if clean.len() <= 64 {
        return clean;
    }
    // Keep it unique when cut: a hash of the full name replaces the tail.
    format!("{}-{:08x}", &clean[..55], fnv1a(raw.as_bytes()) as u32)
}

/// FNV-1a: a stable hash for names and config checksums (not security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// One child object, in the order the reconciler applies them.
#[allow(
    clippy::large_enum_variant,
    reason = "a few dozen children per render, built once and applied: boxing the StatefulSets would save nothing measurable"
)]
#[derive(Debug, Clone, PartialEq)]
pub enum Child {
    ConfigMap(ConfigMap),
    Service(Service),
    StatefulSet(StatefulSet),
    Pdb(PodDisruptionBudget),
}

impl Child {
    pub fn name(&self) -> String {
        match self {
            Child::ConfigMap(o) => o.name_any(),
            Child::Service(o) => o.name_any(),
            Child::StatefulSet(o) => o.name_any(),
            Child::Pdb(o) => o.name_any(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Child::ConfigMap(_) => "ConfigMap",
            Child::Service(_) => "Service",
            Child::StatefulSet(_) => "StatefulSet",
            Child::Pdb(_) => "PodDisruptionBudget",
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
            Child::StatefulSet(o) => serde_json::to_value(o),
            Child::Pdb(o) => serde_json::to_value(o),
        }
        .expect("Kubernetes objects always serialize")
    }
}

/// Everything one SnsCluster needs.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Applied with server-side apply, in this order.
    pub children: Vec<Child>,
    /// The managed broker's credentials: created once if missing, never
    /// overwritten (its password lives in RabbitMQ's volume too).
    pub broker_secret: Option<Secret>,
}

impl Rendered {
    /// A checksum of the desired state: the reconciler re-applies only when
    /// it changes or a resync is due.
    pub fn checksum(&self) -> u64 {
        let all: Vec<serde_json::Value> = self.children.iter().map(Child::to_json).collect();
        fnv1a(serde_json::to_string(&all).unwrap_or_default().as_bytes())
    }
    pub fn names_of(&self, kind: &str) -> Vec<String> {
        self.children.iter().filter(|c| c.kind() == kind).map(Child::name).collect()
    }
}

/// The plan options for an SnsCluster: fixed ports, volumes under /data,
/// the coordinator's Service, each pod's stable DNS name; the broker URL
/// comes from a Secret through `AMQP_URL`, never on a command line.
pub fn plan_options(names: &Names) -> PlanOptions {
    PlanOptions {
        base_port: BASE_PORT,
        data_root: PathBuf::from(DATA_ROOT),
        coord_host: names.coordinator(),
        advertise_host: names.advertise_template(),
        bind: "0.0.0.0".into(),
        amqp_url: None,
        deployment: names.deployment(),
        queue_expires: None,
    }
}

/// The deployment plan of an SnsCluster.
pub fn plan(obj: &SnsCluster) -> Result<Vec<Process>> {
    let names = Names::of(obj)?;
    let spec = obj.spec.deployment_spec();
    spec.validate().map_err(Error::InvalidSpec)?;
    Ok(topology::plan(&spec, &plan_options(&names)))
}

/// The arguments a planned process runs with in its pod: exactly the
/// plan's, then the coordinator's port (left out of the plan because local
/// ports may be dynamic), and for the coordinator `--gateway`, so that
/// `kubectl port-forward` to its Service reaches every cluster's master.
pub fn pod_args(p: &Process) -> Vec<String> {
    let mut args = p.args.clone();
    match p.role {
        Role::Coordinator => args.push("--gateway".into()),
        _ => args.extend(["--coord-port".to_string(), BASE_PORT.to_string()]),
    }
    args
}

fn labels(names: &Names, component: &str) -> BTreeMap<String, String> {
    [
        (LABEL_NAME, "sns"),
        (LABEL_INSTANCE, names.instance.as_str()),
        (LABEL_COMPONENT, component),
        (LABEL_MANAGED_BY, MANAGER),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn server_labels(names: &Names, cluster: u32, server: u32) -> BTreeMap<String, String> {
    let mut l = labels(names, "server");
    l.insert(LABEL_CLUSTER.into(), cluster.to_string());
    l.insert(LABEL_SERVER.into(), server.to_string());
    l
}

fn selector_of(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    // Selectors leave out labels that may change over an object's life.
    labels.iter().filter(|(k, _)| k.as_str() != LABEL_NAME).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn meta(name: String, names: &Names, labels: BTreeMap<String, String>, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

fn pod_security(user: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        run_as_group: Some(user),
        fs_group: Some(user),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Every node serves `grpc.health.v1` on its own port, which the kubelet's
/// native gRPC probe speaks.
fn grpc_probe(port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction { port: i32::from(port), service: None }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort { name: Some(name.into()), container_port: port, protocol: Some("TCP".into()), ..Default::default() }
}

fn config_env(names: &Names) -> Vec<EnvFromSource> {
    vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource { name: names.config(), optional: Some(false) }),
        ..Default::default()
    }]
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tmp_volume() -> (Volume, VolumeMount) {
    // The root filesystem is read-only; anything that wants a scratch file
    // gets a small in-memory /tmp.
    (
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Mi".into())),
            }),
            ..Default::default()
        },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    )
}

struct NodeContainer<'a> {
    name: &'a str,
    args: Vec<String>,
    port_name: &'a str,
    port: u16,
    env: Vec<EnvVar>,
    mounts: Vec<VolumeMount>,
}

fn node_container(spec: &SnsClusterSpec, image: &str, names: &Names, c: NodeContainer<'_>) -> Container {
    Container {
        name: c.name.into(),
        image: Some(image.into()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["sns-node".into()]),
        args: Some(c.args),
        env: if c.env.is_empty() { None } else { Some(c.env) },
        env_from: Some(config_env(names)),
        ports: Some(vec![container_port(c.port_name, i32::from(c.port))]),
        readiness_probe: Some(grpc_probe(c.port, 5, 3)),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(10), ..grpc_probe(c.port, 10, 3) }),
        resources: spec.resources.clone(),
        security_context: Some(container_security()),
        volume_mounts: Some(c.mounts),
        ..Default::default()
    }
}

/// Renders every child of `obj`.
pub fn render(obj: &SnsCluster, opts: &RenderOptions) -> Result<Rendered> {
    let names = Names::of(obj)?;
    if obj.name_any().len() > crate::crd::MAX_NAME_LEN {
        return Err(Error::InvalidSpec(format!(
            "name {:?} is longer than {} characters",
            obj.name_any(),
            crate::crd::MAX_NAME_LEN
        )));
    }
    let owner = obj.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let spec = &obj.spec;
    let image = spec.image.clone().unwrap_or_else(|| opts.default_image.clone());
    let processes = plan(obj)?;
    let mut children = Vec::new();

    // Settings shared by every node; a change rolls the pods through the
    // checksum annotation on their templates.
    let mut data = BTreeMap::new();
    data.insert("SNS_LOG".to_string(), spec.log_level.clone().unwrap_or_else(|| "info".into()));
    let config_hash = format!("{:016x}", fnv1a(format!("{data:?}").as_bytes()));
    children.push(Child::ConfigMap(ConfigMap {
        metadata: meta(names.config(), &names, labels(&names, "config"), &owner),
        data: Some(data),
        ..Default::default()
    }));

    // Services first, so DNS names exist when the pods start.
    let coord_labels = labels(&names, "coordinator");
    children.push(Child::Service(Service {
        metadata: meta(names.coordinator(), &names, coord_labels.clone(), &owner),
        spec: Some(ServiceSpec {
            type_: Some(spec.coordinator.service_type.as_str().into()),
            selector: Some(selector_of(&coord_labels)),
            ports: Some(vec![grpc_port("grpc", Some("kubernetes.io/h2c"))]),
            ..Default::default()
        }),
        ..Default::default()
    }));
    let server_sel = selector_of(&labels(&names, "server"));
    children.push(Child::Service(Service {
        metadata: meta(names.nodes(), &names, labels(&names, "server"), &owner),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Nodes register with their DNS name as soon as they start, and
            // peers must resolve it before the readiness probe passes.
            publish_not_ready_addresses: Some(true),
            selector: Some(server_sel.clone()),
            ports: Some(vec![grpc_port("sns", None)]),
            ..Default::default()
        }),
        ..Default::default()
    }));
    for cluster in 1..=spec.clusters {
        let mut sel = server_sel.clone();
        sel.insert(LABEL_CLUSTER.into(), cluster.to_string());
        sel.insert(LABEL_ROLE.into(), "master".into());
        let mut l = labels(&names, "master");
        l.insert(LABEL_CLUSTER.into(), cluster.to_string());
        children.push(Child::Service(Service {
            metadata: meta(names.master(cluster), &names, l, &owner),
            spec: Some(ServiceSpec {
                selector: Some(sel),
                ports: Some(vec![grpc_port("sns", Some("kubernetes.io/h2c"))]),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }

    // The broker before the nodes that need it.
    let broker_secret = match spec.managed_broker() {
        Some(broker) => {
            let (svc, sts) = render_broker(&names, &broker, spec.storage.retention, &owner);
            children.push(Child::Service(svc));
            children.push(Child::StatefulSet(sts));
            Some(broker_secret_template(&names, &owner))
        }
        None => None,
    };
    let (url_secret, url_key) = match &spec.broker.external {
        Some(ext) => (ext.url_secret_ref.name.clone(), ext.url_secret_ref.key.clone()),
        None => (names.rabbitmq_secret(), "url".to_string()),
    };

    let coordinator = processes.iter().find(|p| p.role == Role::Coordinator).expect("every plan has a coordinator");
    children.push(Child::StatefulSet(render_coordinator(&names, spec, &image, coordinator, &config_hash, &owner)));

    for p in &processes {
        let Role::Server { cluster, id } = p.role else {
            continue;
        };
        let sync = processes
            .iter()
            .find(|q| matches!(q.role, Role::Synchronizer { cluster: c, server: s, .. } if c == cluster && s == id))
            .expect("every planned server has a synchronizer");
        children.push(Child::StatefulSet(render_server(
            &names,
            spec,
            &image,
            (p, sync),
            (&url_secret, &url_key),
            &config_hash,
            &owner,
        )));
    }

    for cluster in 1..=spec.clusters {
        let mut sel = server_sel.clone();
        sel.insert(LABEL_CLUSTER.into(), cluster.to_string());
        let mut l = labels(&names, "server");
        l.insert(LABEL_CLUSTER.into(), cluster.to_string());
        children.push(Child::Pdb(PodDisruptionBudget {
            metadata: meta(names.pdb(cluster), &names, l, &owner),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector { match_labels: Some(sel), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }

    Ok(Rendered { children, broker_secret })
}

/// The coordinator: a StatefulSet of one pod whose records (terms, masters,
/// which servers hold every acknowledged write) live on its own PVC, so a
/// restarted or rescheduled coordinator still knows which server it may
/// promote. A StatefulSet rather than a Deployment also because it never
/// runs two pods of one identity at once: the replacement is created only
/// after the old pod is gone, and two coordinators would each appoint
/// masters.
fn render_coordinator(
    names: &Names,
    spec: &SnsClusterSpec,
    image: &str,
    p: &Process,
    config_hash: &str,
    owner: &OwnerReference,
) -> StatefulSet {
    let l = labels(names, "coordinator");
    let data_mount = VolumeMount { name: "data".into(), mount_path: DATA_ROOT.into(), ..Default::default() };
    let (tmp, tmp_mount) = tmp_volume();
    let container = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "coordinator",
            args: pod_args(p),
            port_name: "grpc",
            port: p.port,
            env: vec![],
            mounts: vec![data_mount, tmp_mount],
        },
    );
    let mut pvc_labels = selector_of(&l);
    pvc_labels.insert(LABEL_NAME.into(), "sns".into());
    StatefulSet {
        metadata: meta(names.coordinator(), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            // No serviceName: nothing dials the coordinator pod by name;
            // clients and nodes go through the `<name>-coordinator` Service,
            // which may be a NodePort or LoadBalancer and so not headless.
            // Parallel: with one pod there is no order to keep, and an
            // OrderedReady rollout would stall behind a pod that never gets
            // ready instead of replacing it with the next revision.
            pod_management_policy: Some("Parallel".into()),
            // One pod at a time: deleted, gone, then its replacement.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(spec.storage.retention)),
            template: PodTemplateSpec {
                metadata: Some(template_meta(l, config_hash)),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    // fsGroup makes the volume writable by the non-root user.
                    security_context: Some(pod_security(RUN_AS_USER)),
                    containers: vec![container],
                    volumes: Some(vec![tmp]),
                    // The records are fsynced before they are acted on.
                    termination_grace_period_seconds: Some(10),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc_template(
                pvc_labels,
                &spec.coordinator.storage_size,
                spec.storage.storage_class_name.as_ref(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn retention_policy(r: PvcRetention) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    let v = match r {
        PvcRetention::Retain => "Retain",
        PvcRetention::Delete => "Delete",
    };
    StatefulSetPersistentVolumeClaimRetentionPolicy { when_deleted: Some(v.into()), when_scaled: Some(v.into()) }
}

fn pvc_template(labels: BTreeMap<String, String>, size: &str, class: Option<&String>) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta { name: Some("data".into()), labels: Some(labels), ..Default::default() },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.cloned(),
            resources: Some(VolumeResourceRequirements {
                requests: Some([("storage".to_string(), Quantity(size.into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn render_server(
    names: &Names,
    spec: &SnsClusterSpec,
    image: &str,
    (server, sync): (&Process, &Process),
    (url_secret, url_key): (&str, &str),
    config_hash: &str,
    owner: &OwnerReference,
) -> StatefulSet {
    let Role::Server { cluster, id } = server.role else { unreachable!("render_server takes a server process") };
    let l = server_labels(names, cluster, id);
    let data_mount = VolumeMount { name: "data".into(), mount_path: DATA_ROOT.into(), ..Default::default() };
    let (tmp, tmp_mount) = tmp_volume();
    let server_c = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "server",
            args: pod_args(server),
            port_name: "sns",
            port: server.port,
            env: vec![],
            mounts: vec![data_mount.clone(), tmp_mount.clone()],
        },
    );
    let sync_c = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "synchronizer",
            args: pod_args(sync),
            port_name: "sync",
            port: sync.port,
            env: vec![secret_env("AMQP_URL", url_secret, url_key)],
            // The synchronizer hands events to its server over gRPC and
            // writes no files; it sees the volume read-only.
            mounts: vec![VolumeMount { read_only: Some(true), ..data_mount }, tmp_mount],
        },
    );
    // Master and slave of a cluster on different nodes when there are
    // enough; preferred, not required, so a one-node kind cluster works.
    let mut same_cluster = selector_of(&labels(names, "server"));
    same_cluster.insert(LABEL_CLUSTER.into(), cluster.to_string());
    let affinity = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector { match_labels: Some(same_cluster), ..Default::default() }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut pvc_labels = selector_of(&l);
    pvc_labels.insert(LABEL_NAME.into(), "sns".into());
    StatefulSet {
        metadata: meta(names.server(cluster, id), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.nodes()),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(spec.storage.retention)),
            template: PodTemplateSpec {
                metadata: Some(template_meta(l, config_hash)),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(RUN_AS_USER)),
                    affinity: Some(affinity),
                    containers: vec![server_c, sync_c],
                    volumes: Some(vec![tmp]),
                    // Writes are fsynced before they are acknowledged: a
                    // short grace is safe and speeds up failover drills.
                    termination_grace_period_seconds: Some(10),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc_template(
                pvc_labels,
                &spec.storage.size,
                spec.storage.storage_class_name.as_ref(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn render_broker(
    names: &Names,
    broker: &crate::crd::ManagedBroker,
    retention: PvcRetention,
    owner: &OwnerReference,
) -> (Service, StatefulSet) {
    let l = labels(names, "broker");
    let svc = Service {
        metadata: meta(names.rabbitmq(), names, l.clone(), owner),
        spec: Some(ServiceSpec {
            selector: Some(selector_of(&l)),
            ports: Some(vec![
                ServicePort {
                    name: Some("amqp".into()),
                    port: AMQP_PORT,
                    target_port: Some(IntOrString::String("amqp".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("management".into()),
                    port: RABBITMQ_MANAGEMENT_PORT,
                    target_port: Some(IntOrString::String("management".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let secret = names.rabbitmq_secret();
    let tcp_probe = |period, failures| Probe {
        tcp_socket: Some(TCPSocketAction { port: IntOrString::String("amqp".into()), ..Default::default() }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let container = Container {
        name: "rabbitmq".into(),
        image: Some(broker.image.clone()),
        env: Some(vec![
            secret_env("RABBITMQ_DEFAULT_USER", &secret, "username"),
            secret_env("RABBITMQ_DEFAULT_PASS", &secret, "password"),
        ]),
        ports: Some(vec![container_port("amqp", AMQP_PORT), container_port("management", RABBITMQ_MANAGEMENT_PORT)]),
        readiness_probe: Some(tcp_probe(5, 3)),
        liveness_probe: Some(Probe {
            // Erlang and the broker take a while on a cold start.
            initial_delay_seconds: Some(60),
            ..tcp_probe(15, 4)
        }),
        resources: broker.resources.clone(),
        // The image's entrypoint writes its Erlang cookie and config at
        // start-up, so its root filesystem stays writable; it runs as the
        // image's unprivileged `rabbitmq` user with no capabilities.
        security_context: Some(SecurityContext { read_only_root_filesystem: Some(false), ..container_security() }),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/var/lib/rabbitmq".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let sts = StatefulSet {
        metadata: meta(names.rabbitmq(), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.rabbitmq()),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(retention)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(l.clone()), ..Default::default() }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(RABBITMQ_USER_ID)),
                    containers: vec![container],
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc_template(
                l,
                &broker.storage_size,
                broker.storage_class_name.as_ref(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    (svc, sts)
}

/// The broker credentials Secret without its password (filled in by
/// [`broker_secret`] at creation).
fn broker_secret_template(names: &Names, owner: &OwnerReference) -> Secret {
    Secret {
        metadata: meta(names.rabbitmq_secret(), names, labels(names, "broker"), owner),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The broker credentials with a fresh password: user `sns`, and the AMQP
/// URL the synchronizers read from the key `url`.
pub fn broker_secret(template: &Secret, names: &Names, password: &str) -> Secret {
    let url = format!("amqp://sns:{password}@{}.{}.svc:{AMQP_PORT}/%2f", names.rabbitmq(), names.namespace);
    let data = [("username", "sns".to_string()), ("password", password.to_string()), ("url", url)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.into_bytes())))
        .collect();
    Secret { data: Some(data), ..template.clone() }
}

/// A random password of 32 letters and digits (URL-safe, so it can sit in
/// the AMQP URL unescaped).
pub fn random_password() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    // 256 is 4 x 62 + 8: the modulo bias is under 4%, irrelevant at 190 bits.
    Ok(bytes.iter().map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect())
}

/// Every rendered object (and the broker Secret with a placeholder
/// password) as one multi-document YAML stream, for `sns-operator render`
/// and the offline schema checks.
pub fn to_yaml(rendered: &Rendered, names: &Names) -> String {
    let mut docs: Vec<serde_json::Value> = rendered.children.iter().map(Child::to_json).collect();
    if let Some(t) = &rendered.broker_secret {
        docs.push(serde_json::to_value(broker_secret(t, names, "rendered-placeholder")).expect("a Secret serializes"));
    }
    docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("JSON values serialize as YAML"))).collect()
}

/// Pod template metadata: the labels, and the config hash whose change
/// rolls the pods when the shared settings change.
fn template_meta(labels: BTreeMap<String, String>, config_hash: &str) -> ObjectMeta {
    ObjectMeta {
        labels: Some(labels),
        annotations: Some([(CONFIG_HASH.to_string(), config_hash.to_string())].into()),
        ..Default::default()
    }
}

/// The gRPC port of a Service, by the container port's name.
fn grpc_port(name: &str, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: SERVICE_PORT,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: app_protocol.map(Into::into),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ExternalBroker, SecretKeyRef};
    use crate::fixtures::cluster;
    use k8s_openapi::api::core::v1::PodTemplateSpec;

    fn opts() -> RenderOptions {
        RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }
    }

    fn statefulsets(r: &Rendered) -> Vec<&StatefulSet> {
        r.children
            .iter()
            .filter_map(|c| match c {
                Child::StatefulSet(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn sts<'a>(r: &'a Rendered, name: &str) -> &'a StatefulSet {
        statefulsets(r).into_iter().find(|s| s.name_any() == name).unwrap_or_else(|| panic!("no StatefulSet {name}"))
    }

    fn service<'a>(r: &'a Rendered, name: &str) -> &'a Service {
        r.children
            .iter()
            .find_map(|c| match c {
                Child::Service(s) if s.name_any() == name => Some(s),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Service {name}"))
    }

    fn template(s: &StatefulSet) -> &PodTemplateSpec {
        &s.spec.as_ref().unwrap().template
    }

    fn container<'a>(t: &'a PodTemplateSpec, name: &str) -> &'a Container {
        t.spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    #[test]
    fn default_spec_renders_the_course_topology() {
        let obj = cluster("demo", serde_json::json!({}));
        let r = render(&obj, &opts()).unwrap();
        let kinds: Vec<String> = r.children.iter().map(|c| format!("{}/{}", c.kind(), c.name())).collect();
        assert_eq!(
            kinds,
            [
                "ConfigMap/demo-config",
                "Service/demo-coordinator",
                "Service/demo-nodes",
                "Service/demo-master-1",
                "Service/demo-master-2",
                "Service/demo-master-3",
                "Service/demo-rabbitmq",
                "StatefulSet/demo-rabbitmq",
                "StatefulSet/demo-coordinator",
                "StatefulSet/demo-server-1-1",
                "StatefulSet/demo-server-1-2",
                "StatefulSet/demo-server-2-1",
                "StatefulSet/demo-server-2-2",
                "StatefulSet/demo-server-3-1",
                "StatefulSet/demo-server-3-2",
                "PodDisruptionBudget/demo-cluster-1",
                "PodDisruptionBudget/demo-cluster-2",
                "PodDisruptionBudget/demo-cluster-3",
            ]
        );
        for c in &r.children {
            let v = c.to_json();
            assert_eq!(v["metadata"]["namespace"], "prod", "{}", c.name());
            let owners = v["metadata"]["ownerReferences"].as_array().unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0]["kind"], "SnsCluster");
            assert_eq!(owners[0]["uid"], "uid-1");
            assert_eq!(owners[0]["controller"], true);
            assert_eq!(v["metadata"]["labels"][LABEL_INSTANCE], "demo");
            assert_eq!(v["metadata"]["labels"][LABEL_MANAGED_BY], MANAGER);
            assert!(v["apiVersion"].is_string() && v["kind"].is_string());
        }
        assert!(r.broker_secret.is_some());
    }

    #[test]
    fn server_and_synchronizer_run_exactly_the_plans_command_lines() {
        let obj = cluster("demo", serde_json::json!({"heartbeat": {"intervalMillis": 1000}}));
        let r = render(&obj, &opts()).unwrap();
        let procs = plan(&obj).unwrap();
        let mut checked = 0;
        for p in &procs {
            let (sts_name, container_name, pod) = match p.role {
                Role::Coordinator => continue,
                Role::Server { cluster, id } => {
                    (format!("demo-server-{cluster}-{id}"), "server", format!("server-{cluster}-{id}"))
                }
                Role::Synchronizer { cluster, server, .. } => {
                    (format!("demo-server-{cluster}-{server}"), "synchronizer", format!("server-{cluster}-{server}"))
                }
            };
            let c = container(template(sts(&r, &sts_name)), container_name);
            let args = c.args.as_ref().unwrap();
            assert_eq!(&args[..p.args.len()], &p.args[..], "{}", p.name);
            assert_eq!(&args[p.args.len()..], ["--coord-port", "9000"]);
            assert_eq!(c.command.as_ref().unwrap(), &["sns-node"]);
            let dns = format!("demo-{pod}-0.demo-nodes.prod.svc");
            assert!(
                args.windows(2).any(|w| w[0] == "--advertise-host" && w[1] == dns),
                "{}: advertises {dns}: {args:?}",
                p.name
            );
            assert!(args.iter().all(|a| !a.contains('{')), "{args:?}");
            assert_eq!(c.ports.as_ref().unwrap()[0].container_port, i32::from(p.port));
            assert_eq!(c.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap().port, i32::from(p.port));
            checked += 1;
        }
        assert_eq!(checked, 12);
        let coord = sts(&r, "demo-coordinator");
        let args = container(template(coord), "coordinator").args.clone().unwrap();
        let mut expected = procs[0].args.clone();
        expected.push("--gateway".into());
        assert_eq!(args, expected);
        assert!(args.windows(2).any(|w| w == ["--heartbeat-interval", "1000ms"]));
        assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
    }

    #[test]
    fn coordinator_keeps_its_records_on_its_own_claim() {
        let obj = cluster(
            "demo",
            serde_json::json!({
                "storage": {"size": "5Gi", "storageClassName": "fast", "retention": "Delete"},
                "coordinator": {"storageSize": "256Mi"},
            }),
        );
        let r = render(&obj, &opts()).unwrap();
        assert!(r.children.iter().all(|c| c.kind() != "Deployment"), "the coordinator is no Deployment any more");
        let s = sts(&r, "demo-coordinator");
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
        let policy = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
        assert_eq!(policy.when_deleted.as_deref(), Some("Delete"));

        // The claim: its own size, the servers' class, labels the cleanup's
        // selector finds.
        let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(pvc.metadata.name.as_deref(), Some("data"));
        let pvc_spec = pvc.spec.as_ref().unwrap();
        assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(pvc_spec.access_modes.as_ref().unwrap(), &["ReadWriteOnce"]);
        assert_eq!(
            pvc_spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"],
            Quantity("256Mi".into())
        );
        let names = Names::of(&obj).unwrap();
        let pvc_labels = pvc.metadata.labels.as_ref().unwrap();
        for term in names.selector().split(',') {
            let (k, v) = term.split_once('=').unwrap();
            assert_eq!(pvc_labels.get(k).map(String::as_str), Some(v), "{term}");
        }
        assert_eq!(names.coordinator_pvc(), "data-demo-coordinator-0");

        // Mounted writable at /data, where --data-dir points, by a locked
        // down non-root pod whose fsGroup owns the volume.
        let t = template(s);
        let c = container(t, "coordinator");
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "data").unwrap();
        assert_eq!(mount.mount_path, DATA_ROOT);
        assert_ne!(mount.read_only, Some(true));
        let args = c.args.as_ref().unwrap();
        assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
        assert!(args.contains(&"--gateway".to_string()));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
        let pod = t.spec.as_ref().unwrap();
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
            (Some(true), Some(RUN_AS_USER), Some(RUN_AS_USER))
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let readiness = c.readiness_probe.as_ref().unwrap();
        assert_eq!(readiness.grpc.as_ref().unwrap().port, i32::from(BASE_PORT));
        assert!(c.liveness_probe.is_some());
        let annotations = t.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
        assert!(annotations.contains_key(CONFIG_HASH));

        // The Service the clients port-forward to selects this pod.
        let svc = service(&r, "demo-coordinator").spec.clone().unwrap();
        let pod_labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(svc.selector.unwrap().iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
        assert_eq!(spec.selector.match_labels.as_ref().unwrap(), &selector_of(pod_labels));

        // Without a size given, 1Gi.
        let r = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
        let pvc = &sts(&r, "demo-coordinator").spec.as_ref().unwrap().volume_claim_templates.as_ref().unwrap()[0];
        let requests = pvc.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.clone().unwrap();
        assert_eq!(requests["storage"], Quantity("1Gi".into()));
        assert_eq!(pvc.spec.as_ref().unwrap().storage_class_name, None);
    }

    #[test]
    fn every_pod_command_line_parses_as_sns_node_would() {
        use clap::Parser;
        use sns_node::cli::{Cli, Command};
        let obj = cluster("demo", serde_json::json!({"serversPerCluster": 1}));
        let r = render(&obj, &opts()).unwrap();
        let mut parsed = 0;
        for c in &r.children {
            let template = match c {
                Child::StatefulSet(s) => &s.spec.as_ref().unwrap().template,
                _ => continue,
            };
            for container in &template.spec.as_ref().unwrap().containers {
                if container.command.as_deref() != Some(&["sns-node".to_string()][..]) {
                    continue;
                }
                let mut argv = vec!["sns-node".to_string()];
                argv.extend(container.args.clone().unwrap());
                let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{} {}: {e}", c.name(), container.name));
                match cli.command {
                    Command::Coordinator(a) => {
                        let cfg = a.config();
                        assert!(cfg.gateway, "the coordinator serves the client gateway");
                        assert_eq!(cfg.clusters, 3);
                        assert_eq!(cfg.data_dir.as_deref(), Some(std::path::Path::new("/data/coordinator")));
                    }
                    Command::Server(a) => {
                        let cfg = a.config().unwrap();
                        assert_eq!(cfg.coord_host, "demo-coordinator");
                        assert_eq!(cfg.coord_port, 9000);
                    }
                    Command::Synchronizer(a) => {
                        let cfg = a.config().unwrap();
                        assert_eq!(cfg.deployment, "prod-demo");
                        assert_eq!(cfg.servers_per_cluster, 1);
                    }
                    Command::Local(_) => panic!("no pod runs the launcher"),
                    Command::Promote(_) | Command::Switchover(_) => {
                        panic!("promote and switchover are commands run by hand, not pods")
                    }
                }
                parsed += 1;
            }
        }
        assert_eq!(parsed, 1 + 3 * 2);
    }

    #[test]
    fn server_pods_share_one_volume_and_are_locked_down() {
        let obj = cluster(
            "demo",
            serde_json::json!({"storage": {"size": "5Gi", "storageClassName": "fast"}, "image": "reg/sns:1"}),
        );
        let r = render(&obj, &opts()).unwrap();
        let s = sts(&r, "demo-server-2-1");
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.service_name.as_deref(), Some("demo-nodes"));
        let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
        assert_eq!(pvc.metadata.name.as_deref(), Some("data"));
        let pvc_spec = pvc.spec.as_ref().unwrap();
        assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(pvc_spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"], Quantity("5Gi".into()));
        assert_eq!(pvc.metadata.labels.as_ref().unwrap()[LABEL_CLUSTER], "2");
        let t = template(s);
        let labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_CLUSTER], "2");
        assert_eq!(labels[LABEL_SERVER], "1");
        assert!(!labels.contains_key(LABEL_ROLE), "the role label is the operator's, not the template's");
        for name in ["server", "synchronizer"] {
            let c = container(t, name);
            assert_eq!(c.image.as_deref(), Some("reg/sns:1"));
            let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "data").unwrap();
            assert_eq!(mount.mount_path, "/data");
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
        }
        let args = container(t, "server").args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/cluster_2/1"]));
        let pod = t.spec.as_ref().unwrap();
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
        let term = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0];
        let sel = term.pod_affinity_term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
        assert_eq!(sel[LABEL_CLUSTER], "2");
        assert!(!sel.contains_key(LABEL_SERVER), "anti-affinity spans both servers of the cluster");
    }

    #[test]
    fn one_server_per_cluster_renders_half_the_statefulsets() {
        let obj = cluster("solo", serde_json::json!({"clusters": 2, "serversPerCluster": 1}));
        let r = render(&obj, &opts()).unwrap();
        let mut names = r.names_of("StatefulSet");
        names.sort();
        assert_eq!(names, ["solo-coordinator", "solo-rabbitmq", "solo-server-1-1", "solo-server-2-1"]);
        let t = template(sts(&r, "solo-server-2-1"));
        let args = container(t, "synchronizer").args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--servers-per-cluster", "1"]));
        assert!(args.windows(2).any(|w| w == ["-i", "2"]), "{args:?}");
        assert_eq!(r.names_of("PodDisruptionBudget"), ["solo-cluster-1", "solo-cluster-2"]);
    }

    #[test]
    fn master_services_select_the_role_label() {
        let obj = cluster("demo", serde_json::json!({"coordinator": {"serviceType": "NodePort"}}));
        let r = render(&obj, &opts()).unwrap();
        let m = service(&r, "demo-master-3").spec.clone().unwrap();
        let sel = m.selector.unwrap();
        assert_eq!(sel[LABEL_CLUSTER], "3");
        assert_eq!(sel[LABEL_ROLE], "master");
        assert_eq!(sel[LABEL_INSTANCE], "demo");
        let coord = service(&r, "demo-coordinator").spec.clone().unwrap();
        assert_eq!(coord.type_.as_deref(), Some("NodePort"));
        assert_eq!(coord.ports.unwrap()[0].port, 9000);
        let nodes = service(&r, "demo-nodes").spec.clone().unwrap();
        assert_eq!(nodes.cluster_ip.as_deref(), Some("None"));
        assert_eq!(nodes.publish_not_ready_addresses, Some(true));
    }

    #[test]
    fn managed_broker_gets_statefulset_service_and_secret_url() {
        let obj = cluster("demo", serde_json::json!({}));
        let r = render(&obj, &opts()).unwrap();
        let b = sts(&r, "demo-rabbitmq");
        let c = container(template(b), "rabbitmq");
        assert_eq!(c.image.as_deref(), Some(crate::crd::DEFAULT_BROKER_IMAGE));
        let env = c.env.as_ref().unwrap();
        assert_eq!(
            env[1].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name,
            "demo-rabbitmq-credentials"
        );
        let names = Names::of(&obj).unwrap();
        let secret = broker_secret(r.broker_secret.as_ref().unwrap(), &names, "pw123");
        let data = secret.data.unwrap();
        assert_eq!(
            String::from_utf8(data["url"].0.clone()).unwrap(),
            "amqp://sns:pw123@demo-rabbitmq.prod.svc:5672/%2f"
        );
        let sync = container(template(sts(&r, "demo-server-1-1")), "synchronizer");
        let url = &sync.env.as_ref().unwrap()[0];
        assert_eq!(url.name, "AMQP_URL");
        let sel = url.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("demo-rabbitmq-credentials", "url"));
        let p = random_password().unwrap();
        assert_eq!(p.len(), 32);
        assert!(p.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(p, random_password().unwrap());
    }

    #[test]
    fn external_broker_renders_no_broker_and_reads_the_given_secret() {
        let mut obj = cluster("demo", serde_json::json!({}));
        obj.spec.broker.external =
            Some(ExternalBroker { url_secret_ref: SecretKeyRef { name: "my-amqp".into(), key: "AMQP".into() } });
        let r = render(&obj, &opts()).unwrap();
        assert!(r.broker_secret.is_none());
        assert!(!r.names_of("StatefulSet").contains(&"demo-rabbitmq".to_string()));
        assert!(!r.names_of("Service").contains(&"demo-rabbitmq".to_string()));
        let sync = container(template(sts(&r, "demo-server-3-2")), "synchronizer");
        let sel = sync.env.as_ref().unwrap()[0].value_from.as_ref().unwrap().secret_key_ref.clone().unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("my-amqp", "AMQP"));
    }

    #[test]
    fn retention_maps_to_the_statefulset_policy() {
        for (retention, expected) in [("Retain", "Retain"), ("Delete", "Delete")] {
            let obj = cluster("demo", serde_json::json!({"storage": {"retention": retention}}));
            let r = render(&obj, &opts()).unwrap();
            // Servers, coordinator and broker alike.
            assert_eq!(statefulsets(&r).len(), 8);
            for s in statefulsets(&r) {
                let p = s.spec.as_ref().unwrap().persistent_volume_claim_retention_policy.clone().unwrap();
                assert_eq!(p.when_deleted.as_deref(), Some(expected));
                assert_eq!(p.when_scaled.as_deref(), Some(expected));
            }
        }
    }

    #[test]
    fn config_changes_roll_the_pods() {
        let a = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
        let b = render(&cluster("demo", serde_json::json!({"logLevel": "debug"})), &opts()).unwrap();
        let hash = |r: &Rendered, name: &str| {
            template(sts(r, name)).metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH].clone()
        };
        for name in ["demo-server-1-1", "demo-coordinator"] {
            assert_ne!(hash(&a, name), hash(&b, name), "{name}");
        }
        assert_ne!(a.checksum(), b.checksum());
        assert_eq!(a.checksum(), render(&cluster("demo", serde_json::json!({})), &opts()).unwrap().checksum());
    }

    #[test]
    fn deployment_names_are_safe_for_the_broker() {
        assert_eq!(deployment_name("default", "demo"), "default-demo");
        let long = deployment_name(&"n".repeat(63), &"x".repeat(39));
        assert_eq!(long.len(), 64);
        assert!(sns_node::cli::parse_deployment(&long).is_ok());
        assert_ne!(long, deployment_name(&"n".repeat(63), &"y".repeat(39)));
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        let obj = cluster(&"a".repeat(40), serde_json::json!({}));
        assert!(matches!(render(&obj, &opts()), Err(Error::InvalidSpec(_))));
        let mut obj = cluster("demo", serde_json::json!({}));
        obj.metadata.namespace = None;
        assert!(matches!(render(&obj, &opts()), Err(Error::MissingNamespace)));
    }

    #[test]
    fn yaml_dump_holds_every_object() {
        let obj = cluster("demo", serde_json::json!({}));
        let r = render(&obj, &opts()).unwrap();
        let yaml = to_yaml(&r, &Names::of(&obj).unwrap());
        assert_eq!(yaml.matches("---\n").count(), r.children.len() + 1);
        assert!(yaml.contains("kind: Secret"));
    }
}
