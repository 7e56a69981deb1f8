//! The `SnsCluster` custom resource (`sns.io/v1alpha1`, short name `sns`).
//!
//! The spec keeps the camelCase shape that `sns_node::topology::DeploymentSpec`
//! reads (`clusters`, `serversPerCluster`, `heartbeat.intervalMillis`,
//! `heartbeat.missed`), so one YAML file runs unchanged under
//! `sns-node local --spec` and under the operator. Everything else (image,
//! storage, broker, Service type) belongs to the operator and the local
//! launcher ignores it.
//!
//! Validation lives in the schema where the API server enforces it: ranges
//! through schemars, CEL rules (`x-kubernetes-validations`) through kube's
//! `KubeSchema` derive. The CRD YAML in `manifests/` is generated from these
//! types by `sns-operator crd` and checked for drift by a test.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{CustomResourceDefinition, JSONSchemaProps};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sns_node::topology::{DeploymentSpec, HeartbeatSpec as PlanHeartbeat};

/// Longest `SnsCluster` name: the StatefulSet `<name>-server-<c>-<s>` (with
/// c up to 100) must leave room in its pods' 63-character
/// `controller-revision-hash` label for the 11-character hash suffix.
pub const MAX_NAME_LEN: usize = 39;

/// Desired state of a Tiny SNS deployment.
// Each printcolumn repeats `type_`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sns.io",
    version = "v1alpha1",
    kind = "SnsCluster",
    plural = "snsclusters",
    shortname = "sns",
    namespaced,
    status = "SnsClusterStatus",
    derive = "PartialEq",
    doc = "A Tiny SNS deployment: a coordinator, N clusters of master/slave servers with a synchronizer beside each, and a RabbitMQ broker between clusters.",
    printcolumn(name = "Clusters", type_ = "integer", json_path = ".spec.clusters"),
    printcolumn(
        name = "Servers",
        type_ = "integer",
        json_path = ".spec.serversPerCluster",
        description = "servers per cluster"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.readyServers",
        description = "live servers / planned servers"
    ),
    printcolumn(
        name = "Masters",
        type_ = "string",
        json_path = ".status.masters",
        description = "clusters with a live master / clusters"
    ),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct SnsClusterSpec {
    /// Number of clusters; user u belongs to cluster ((u-1) mod N)+1, so the
    /// count cannot change once users exist.
    #[serde(default = "default_clusters")]
    #[schemars(range(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusters is immutable: users are assigned to clusters by their id modulo the count"))]
    pub clusters: u32,
    /// Servers per cluster: 2 = master + slave, 1 = master only.
    #[serde(default = "default_servers")]
    #[schemars(range(min = 1, max = 2))]
    pub servers_per_cluster: u32,
    /// Heartbeat period and how many a node may miss before it is dead.
    #[serde(default)]
    pub heartbeat: HeartbeatSpec,
    /// Milliseconds a server's journal write may neither end nor fail
    /// before its disk counts as hung: it then says it cannot write, and a
    /// hung master steps down (default: two heartbeat intervals, within 5
    /// to 30 s). Raise it for volumes whose writes can stall for long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 3600000))]
    pub disk_stall_limit_millis: Option<u64>,
    /// Milliseconds a server's writer waits for more writes, under
    /// concurrent load, before a group commit (default 1; 0 turns it off).
    /// Larger groups cost less CPU per write and add that much latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub commit_delay_millis: Option<u64>,
    /// Milliseconds another cluster may stay short of the events the
    /// broker confirmed for it (holding a gap, or with its queue empty)
    /// before the master has them published again: the broker lost them
    /// after confirming them (default 3000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1000, max = 3600000))]
    pub resend_after_millis: Option<u64>,
    /// Journal size in bytes at which a server rewrites its journal as one
    /// snapshot of its state, when that is smaller, and again each time the
    /// journal doubles after that (default 67108864, 64 MiB; at least 4096).
    /// Smaller keeps volumes smaller and restarts faster, at the cost of
    /// more rewrites.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 4096))]
    pub compact_at_bytes: Option<u64>,
    /// Image with `sns-node` (default: the operator's own image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pull policy of that image (default: Kubernetes' default for the tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Resources of every `sns-node` container (coordinator, server, synchronizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Each server's persistent volume (class and retention apply to the
    /// coordinator's volume too).
    #[serde(default)]
    pub storage: StorageSpec,
    /// The RabbitMQ broker between clusters.
    #[serde(default)]
    pub broker: BrokerSpec,
    /// The coordinator's Service and volume.
    #[serde(default)]
    pub coordinator: CoordinatorSpec,
    /// `SNS_LOG` of every node (tracing-subscriber filter syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// NetworkPolicies that let only the deployment's own pods reach its
    /// servers, synchronizers and broker.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
    /// TLS on every node's port (node-to-node calls and clients).
    #[serde(default)]
    pub tls: TlsSpec,
}

/// Whether the operator renders the deployment's NetworkPolicies. They
/// take effect only where the cluster's network plugin enforces them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        NetworkPolicySpec { enabled: true }
    }
}

fn default_true() -> bool {
    true
}

/// TLS for the nodes: each serves TLS on its port and trusts the
/// deployment's CA for its calls to the others. Without `issuerRef` the
/// operator makes a CA and the node certificate itself; with it,
/// cert-manager issues them (`issuerRef` must be a CA-kind issuer, whose
/// Secrets carry `ca.crt`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A cert-manager Issuer or ClusterIssuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec { enabled: true, issuer_ref: None }
    }
}

/// A cert-manager issuer, as a Certificate's `spec.issuerRef` names it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (in the SnsCluster's namespace) or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: IssuerKind,
    #[serde(default = "default_issuer_group")]
    pub group: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssuerKind {
    Issuer,
    ClusterIssuer,
}

fn default_issuer_kind() -> IssuerKind {
    IssuerKind::Issuer
}
fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

fn default_clusters() -> u32 {
    3
}
fn default_servers() -> u32 {
    2
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatSpec {
    /// Milliseconds between heartbeats.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 10, max = 600000))]
    pub interval_millis: u64,
    /// Heartbeats a node may miss before the coordinator declares it dead.
    #[serde(default = "default_missed")]
    #[schemars(range(min = 1, max = 100))]
    pub missed: u32,
}

fn default_interval() -> u64 {
    5000
}
fn default_missed() -> u32 {
    2
}

impl Default for HeartbeatSpec {
    fn default() -> Self {
        HeartbeatSpec { interval_millis: default_interval(), missed: default_missed() }
    }
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// What happens to the PersistentVolumeClaims (servers', coordinator's,
/// managed broker's) when the SnsCluster is deleted or scaled down.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvcRetention {
    /// Keep them: a re-created SnsCluster of the same name finds its data.
    #[default]
    Retain,
    /// Delete them with the SnsCluster or the removed servers.
    Delete,
}

/// The volumes are the StatefulSets' volumeClaimTemplates, which Kubernetes
/// does not let change: size and class are immutable here too, so a change
/// is refused up front instead of failing every reconcile (grow a volume by
/// expanding its PVC directly).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("storage.storageClassName is immutable"))]
pub struct StorageSpec {
    /// Size of each server's volume.
    #[serde(default = "default_storage_size")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("storage.size must be a positive quantity such as 1Gi"),
        validation = Rule::new("self == oldSelf").message("storage.size is immutable (expand the PersistentVolumeClaims directly)")
    )]
    pub size: String,
    /// StorageClass of the volumes (default: the cluster's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// PVC retention on delete and scale-down.
    #[serde(default)]
    pub retention: PvcRetention,
}

fn default_storage_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { size: default_storage_size(), storage_class_name: None, retention: PvcRetention::Retain }
    }
}

/// Either a broker the operator runs (`managed`, the default when neither
/// is given) or an existing one (`external`).
///
/// The managed broker's volume is its StatefulSet's volumeClaimTemplate,
/// which Kubernetes does not let change: its class and size are immutable
/// while the broker stays managed. The rules sit here, not on the fields,
/// because an absent `managed` means the defaults: a rule on
/// `managed.storageClassName` would not see `managed` appear with another
/// class, which the StatefulSet would refuse, and since the broker is
/// applied before the nodes, every later change with it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.managed) && has(self.external))").message("set broker.managed or broker.external, not both"),
    validation = Rule::new("has(self.external) || has(oldSelf.external) || (has(self.managed) && has(self.managed.storageClassName) ? self.managed.storageClassName : '') == (has(oldSelf.managed) && has(oldSelf.managed.storageClassName) ? oldSelf.managed.storageClassName : '')").message("broker.managed.storageClassName is immutable: it is the broker StatefulSet's volumeClaimTemplate"),
    validation = Rule::new("has(self.external) || has(oldSelf.external) || (has(self.managed) && has(self.managed.storageSize) ? self.managed.storageSize : '1Gi') == (has(oldSelf.managed) && has(oldSelf.managed.storageSize) ? oldSelf.managed.storageSize : '1Gi')").message("broker.managed.storageSize is immutable: it is the broker StatefulSet's volumeClaimTemplate (expand the PersistentVolumeClaim directly)"),
    validation = Rule::new("has(self.external) || has(oldSelf.external) || (has(self.managed) && has(self.managed.replicas) ? self.managed.replicas : 1) == (has(oldSelf.managed) && has(oldSelf.managed.replicas) ? oldSelf.managed.replicas : 1)").message("broker.managed.replicas is immutable: a running broker cannot safely move between one node and a cluster (its StatefulSet's Service and pod management cannot change, its node names and its queues' type would); create a new SnsCluster, or switch to broker.external, to change it"),
    validation = Rule::new("has(self.external) != has(oldSelf.external) || (has(self.queueType) ? self.queueType : (has(self.managed) && has(self.managed.replicas) && self.managed.replicas >= 3 ? 'quorum' : 'classic')) == (has(oldSelf.queueType) ? oldSelf.queueType : (has(oldSelf.managed) && has(oldSelf.managed.replicas) && oldSelf.managed.replicas >= 3 ? 'quorum' : 'classic'))").message("broker.queueType is immutable while the broker stays the same: its queues exist with their type (to change it, stop the synchronizers, drain and delete the queues, then switch broker)")
)]
pub struct BrokerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedBroker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalBroker>,
    /// The type of the deployment's queues, passed to every synchronizer
    /// (`SNS_QUEUE_TYPE`): `quorum` (replicated; needs a broker cluster of
    /// 3 or more nodes to survive one's loss) or `classic` (default:
    /// `quorum` with a managed broker of 3 or more replicas, else
    /// `classic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_type: Option<QueueType>,
}

/// The type of the deployment's queues (`sns-node`'s `--queue-type`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

/// A RabbitMQ StatefulSet with its own volume and generated credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedBroker {
    #[serde(default = "default_broker_image")]
    pub image: String,
    #[serde(default = "default_storage_size")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("broker.managed.storageSize must be a positive quantity such as 1Gi")
    )]
    pub storage_size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// RabbitMQ nodes: 1 (trials), or an odd number of at least 3, a
    /// cluster whose quorum queues survive the loss of a minority.
    #[serde(default = "default_broker_replicas")]
    #[schemars(range(min = 1, max = 7))]
    #[x_kube(validation = Rule::new("self == 1 || (self >= 3 && self % 2 == 1)").message("broker.managed.replicas must be 1 or an odd number of at least 3 (a majority must survive the loss of a node)"))]
    pub replicas: u32,
}

fn default_broker_replicas() -> u32 {
    1
}

/// The default broker image: RabbitMQ 3 with the management plugin (so
/// `kubectl port-forward` to 15672 shows the queues).
pub const DEFAULT_BROKER_IMAGE: &str = "rabbitmq:3.13-management";

fn default_broker_image() -> String {
    DEFAULT_BROKER_IMAGE.into()
}

impl Default for ManagedBroker {
    fn default() -> Self {
        ManagedBroker {
            image: default_broker_image(),
            storage_size: default_storage_size(),
            storage_class_name: None,
            resources: None,
            replicas: default_broker_replicas(),
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalBroker {
    /// Secret key holding the AMQP URL (`amqp://user:pass@host:5672/%2f`).
    pub url_secret_ref: SecretKeyRef,
    /// Secret key holding the PEM CA of an `amqps://` broker (mounted as
    /// `SNS_AMQP_CA`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Secret in the SnsCluster's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default = "default_ca_key")]
    pub key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret in the SnsCluster's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default = "default_url_key")]
    pub key: String,
}

fn default_url_key() -> String {
    "url".into()
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The coordinator: its Service, and the volume of its records (terms,
/// masters, which servers hold every acknowledged write), which a restarted
/// coordinator needs to know which server it may promote.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CoordinatorSpec {
    /// Type of the `<name>-coordinator` Service (which is also the client
    /// gateway).
    #[serde(default)]
    pub service_type: ServiceType,
    /// Size of the coordinator's volume, which holds its records (class and
    /// retention are `storage`'s).
    // The records take a few kilobytes; the 1Gi default because many
    // provisioners round smaller claims up to that anyway.
    #[serde(default = "default_storage_size")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("coordinator.storageSize must be a positive quantity such as 1Gi"),
        validation = Rule::new("self == oldSelf").message("coordinator.storageSize is immutable (expand the PersistentVolumeClaim directly)")
    )]
    pub storage_size: String,
    /// Coordinator replicas: 2 or 3 run a replicated coordinator (a leader
    /// elected on a Lease serves, the others stand by; the records live in
    /// the ConfigMap `<name>-coordinator-records`), 1 a single coordinator
    /// keeping its records on its volume. Going from 1 to more is allowed
    /// (the operator moves the first pod over before adding standbys, and
    /// the leader imports the volume's records); back to 1 is refused: the
    /// records newer than the volume's live in the ConfigMap only.
    #[serde(default = "default_coordinator_replicas")]
    #[schemars(range(min = 1, max = 3))]
    #[x_kube(
        validation = Rule::new("self >= 1 && self <= 3").message("coordinator.replicas must be 1, 2 or 3"),
        validation = Rule::new("self >= 2 || oldSelf == 1").message("coordinator.replicas cannot go back to 1: a replicated coordinator keeps its records in the ConfigMap <name>-coordinator-records, which a single coordinator does not read (its volume holds older records)")
    )]
    pub replicas: u32,
}

fn default_coordinator_replicas() -> u32 {
    2
}

impl Default for CoordinatorSpec {
    fn default() -> Self {
        CoordinatorSpec {
            service_type: ServiceType::default(),
            storage_size: default_storage_size(),
            replicas: default_coordinator_replicas(),
        }
    }
}

impl CoordinatorSpec {
    /// Whether the coordinator runs replicated (`--kube-ha`).
    pub fn replicated(&self) -> bool {
        self.replicas >= 2
    }
}

/// Observed state, written by the operator through the status subresource.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnsClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing and Degraded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Servers per cluster that the operator last rolled out (scale events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers_per_cluster: Option<u32>,
    /// Live servers / planned servers, e.g. `6/6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_servers: Option<String>,
    /// Clusters with a live master / clusters, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masters: Option<String>,
    /// Coordinator pods ready / replicas, e.g. `1/2`: a replicated
    /// coordinator's standbys report not ready by design (the Service
    /// routes to the leader alone), so `1/N` is a coordinator that serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_coordinators: Option<String>,
    /// Each SNS cluster's current master.
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
    /// When a cluster's master last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<Time>,
    /// The last planned switchover: asked for with the `sns.io/switchover`
    /// annotation, or made by a rolling update or a scale-down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover: Option<SwitchoverStatus>,
    /// The rolling update of the servers: how far, and what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Where the servers' rolling update stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Done`, `Updating` or `Paused` (something unhealthy: see message).
    pub state: String,
    /// Servers running the current template / planned servers, e.g. `4/6`.
    pub updated_servers: String,
    /// What it does or waits for, or why it paused.
    pub message: String,
}

/// A planned switchover and how it went.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverStatus {
    /// SNS cluster id.
    pub cluster: u32,
    /// What asked for it: `annotation` (`sns.io/switchover`), `rollout` or
    /// `scale-down`.
    pub requested_by: String,
    /// The annotation's value, when one asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Server id of the master before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u32>,
    /// Server id of the master after (or the one asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u32>,
    /// The term the new master serves under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// Whether the role moved.
    pub succeeded: bool,
    /// How it went, or why it did not happen.
    pub message: String,
    pub time: Time,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// SNS cluster id (1-based).
    pub cluster: u32,
    /// Pod of the live master, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// Server id of that master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_server: Option<u32>,
    /// The coordinator's promotion term for the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// Whether `master` is alive (a cluster whose master died keeps
    /// showing it until another is promoted).
    #[serde(default)]
    pub master_alive: bool,
    /// Live servers of the cluster.
    #[serde(default)]
    pub live_servers: u32,
}

impl SnsClusterSpec {
    /// The topology part, as the deployment plan reads it.
    pub fn deployment_spec(&self) -> DeploymentSpec {
        DeploymentSpec {
            clusters: self.clusters,
            servers_per_cluster: self.servers_per_cluster,
            heartbeat: PlanHeartbeat { interval_millis: self.heartbeat.interval_millis, missed: self.heartbeat.missed },
            disk_stall_limit_millis: self.disk_stall_limit_millis,
            commit_delay_millis: self.commit_delay_millis,
            resend_after_millis: self.resend_after_millis,
            compact_at_bytes: self.compact_at_bytes,
        }
    }

    /// The deployment's queue type: as given, else quorum on a managed
    /// broker cluster, classic otherwise.
    pub fn queue_type(&self) -> QueueType {
        match (self.broker.queue_type, self.managed_broker()) {
            (Some(t), _) => t,
            (None, Some(m)) if m.replicas >= 3 => QueueType::Quorum,
            _ => QueueType::Classic,
        }
    }

    /// The managed broker's settings, or None for an external broker.
    pub fn managed_broker(&self) -> Option<ManagedBroker> {
        match (&self.broker.managed, &self.broker.external) {
            (_, Some(_)) => None,
            (Some(m), None) => Some(m.clone()),
            (None, None) => Some(ManagedBroker::default()),
        }
    }
}

/// The CRD: kube's derived one, plus constraints on `metadata.name` (the only
/// metadata field a CRD schema may constrain). They are plain OpenAPI rather
/// than CEL because the API server's CEL cost estimate treats
/// `metadata.name` as unbounded, which a regex rule would exceed.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = SnsCluster::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) else {
            continue;
        };
        let name = JSONSchemaProps {
            type_: Some("string".into()),
            max_length: Some(MAX_NAME_LEN as i64),
            // A DNS-1035 label: Service names derived from it must start
            // with a letter and contain no dots.
            pattern: Some("^[a-z]([-a-z0-9]*[a-z0-9])?$".into()),
            ..Default::default()
        };
        let metadata = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some([("name".to_string(), name)].into()),
            ..Default::default()
        };
        schema.properties.get_or_insert_with(Default::default).insert("metadata".into(), metadata);
    }
    crd
}

/// The CRD as YAML, exactly as `sns-operator crd` prints it and
/// `manifests/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = crd();
    let body = serde_yaml::to_string(&crd).expect("a CRD always serializes");
    format!("# Generated by `sns-operator crd` from operator/src/crd.rs; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn rules(v: &Value) -> Vec<String> {
        v["x-kubernetes-validations"]
            .as_array()
            .map(|a| a.iter().map(|r| r["rule"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }

    fn messages(v: &Value) -> Vec<String> {
        v["x-kubernetes-validations"]
            .as_array()
            .map(|a| a.iter().map(|r| r["message"].as_str().unwrap_or_default().to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn crd_has_names_subresources_and_columns() {
        let crd = serde_json::to_value(crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "snsclusters.sns.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "sns");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> =
            v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(cols, ["Clusters", "Servers", "Ready", "Masters", "Status", "Age"]);
    }

    #[test]
    fn schema_carries_ranges_defaults_and_cel_rules() {
        let s = schema();
        let spec = &s["properties"]["spec"]["properties"];
        assert_eq!(spec["clusters"]["default"], 3);
        let num = |v: &Value| v.as_f64().unwrap();
        assert_eq!(num(&spec["clusters"]["minimum"]), 1.0);
        assert_eq!(num(&spec["clusters"]["maximum"]), 100.0);
        assert_eq!(rules(&spec["clusters"]), ["self == oldSelf"]);
        assert_eq!(spec["serversPerCluster"]["default"], 2);
        assert_eq!(num(&spec["serversPerCluster"]["minimum"]), 1.0);
        assert_eq!(num(&spec["serversPerCluster"]["maximum"]), 2.0);
        let hb = &spec["heartbeat"]["properties"];
        assert_eq!(hb["intervalMillis"]["default"], 5000);
        assert_eq!(num(&hb["intervalMillis"]["minimum"]), 10.0);
        assert_eq!(hb["missed"]["default"], 2);
        let broker_rules = rules(&spec["broker"]);
        assert_eq!(broker_rules[0], "!(has(self.managed) && has(self.external))");
        // The managed broker's volume: immutable on the broker, where an
        // absent `managed` (the defaults) is seen too; not across a switch
        // to or from an external broker (the StatefulSet goes or comes).
        for field in ["storageClassName", "storageSize"] {
            let rule = broker_rules.iter().find(|r| r.contains(&format!("self.managed.{field}"))).unwrap();
            assert!(rule.starts_with("has(self.external) || has(oldSelf.external) || "), "{rule}");
            assert!(rule.contains(&format!("oldSelf.managed.{field}")), "{rule}");
            assert!(
                messages(&spec["broker"])
                    .iter()
                    .any(|m| m.starts_with(&format!("broker.managed.{field} is immutable")))
            );
        }
        assert_eq!(spec["storage"]["properties"]["retention"]["enum"], serde_json::json!(["Retain", "Delete"]));
        assert_eq!(spec["storage"]["properties"]["retention"]["default"], "Retain");
        let size = rules(&spec["storage"]["properties"]["size"]);
        assert!(size[0].contains("quantity(self)"));
        assert_eq!(size[1], "self == oldSelf");
        assert!(rules(&spec["storage"])[0].contains("self.storageClassName == oldSelf.storageClassName"));
        let managed = &spec["broker"]["properties"]["managed"]["properties"];
        assert_eq!(managed["replicas"]["default"], 1);
        assert_eq!(rules(&managed["replicas"]), ["self == 1 || (self >= 3 && self % 2 == 1)"]);
        assert!(broker_rules.iter().any(|r| r.contains("self.managed.replicas : 1) == (")));
        let queue = broker_rules.iter().find(|r| r.contains("self.queueType")).unwrap();
        assert!(queue.starts_with("has(self.external) != has(oldSelf.external) || "), "{queue}");
        assert_eq!(spec["broker"]["properties"]["queueType"]["enum"], serde_json::json!(["classic", "quorum", null]));
        let broker = &managed["storageSize"];
        assert!(rules(broker)[0].contains("quantity(self)"));
        let coord = &spec["coordinator"]["properties"]["storageSize"];
        assert_eq!(coord["default"], "1Gi");
        assert!(rules(coord)[0].contains("quantity(self)"));
        assert_eq!(rules(coord)[1], "self == oldSelf");
        assert_eq!(spec["coordinator"]["default"]["storageSize"], "1Gi", "an absent `coordinator` gets the size too");
        let replicas = &spec["coordinator"]["properties"]["replicas"];
        assert_eq!(replicas["default"], 2);
        assert_eq!(spec["coordinator"]["default"]["replicas"], 2, "an absent `coordinator` is replicated too");
        assert_eq!((num(&replicas["minimum"]), num(&replicas["maximum"])), (1.0, 3.0));
        assert_eq!(rules(replicas), ["self >= 1 && self <= 3", "self >= 2 || oldSelf == 1"]);
        assert_eq!(
            spec["imagePullPolicy"]["enum"],
            // kube marks an optional enum nullable, with null among the values.
            serde_json::json!(["Always", "IfNotPresent", "Never", null])
        );
        let name = &s["properties"]["metadata"]["properties"]["name"];
        assert_eq!(name["maxLength"], MAX_NAME_LEN);
        assert_eq!(name["pattern"], "^[a-z]([-a-z0-9]*[a-z0-9])?$");
    }

    #[test]
    fn condition_and_status_shapes() {
        let s = schema();
        let cond = &s["properties"]["status"]["properties"]["conditions"]["items"];
        let mut required: Vec<&str> =
            cond["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        required.sort();
        assert_eq!(required, ["lastTransitionTime", "message", "reason", "status", "type"]);
        let status = &s["properties"]["status"]["properties"];
        for field in ["observedGeneration", "clusters", "lastFailoverTime", "masters"] {
            assert!(status[field].is_object(), "status.{field} missing");
        }
    }

    #[test]
    fn defaults_match_the_local_launcher() {
        let spec: SnsClusterSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.deployment_spec(), DeploymentSpec::default());
        assert_eq!(spec.storage.retention, PvcRetention::Retain);
        assert_eq!(spec.managed_broker(), Some(ManagedBroker::default()));
        assert_eq!(spec.coordinator.service_type, ServiceType::ClusterIP);
        assert_eq!(spec.coordinator.storage_size, "1Gi");
        assert_eq!(spec.coordinator.replicas, 2, "a replicated coordinator unless asked for one");
        assert!(spec.coordinator.replicated());
        let partial: SnsClusterSpec =
            serde_json::from_value(serde_json::json!({"coordinator": {"serviceType": "NodePort"}})).unwrap();
        assert_eq!(partial.coordinator.storage_size, "1Gi");
        assert!(spec.network_policy.enabled, "NetworkPolicies are on unless switched off");
        assert!(spec.tls.enabled && spec.tls.issuer_ref.is_none(), "TLS is on, with the operator's own CA");
        let issuer: SnsClusterSpec =
            serde_json::from_value(serde_json::json!({"tls": {"issuerRef": {"name": "ca"}}})).unwrap();
        let r = issuer.tls.issuer_ref.unwrap();
        assert_eq!((r.kind, r.group.as_str()), (IssuerKind::Issuer, "cert-manager.io"));
        assert!(issuer.tls.enabled);
    }

    #[test]
    fn queue_type_defaults_to_quorum_on_a_broker_cluster_only() {
        let of = |v: serde_json::Value| serde_json::from_value::<SnsClusterSpec>(v).unwrap().queue_type();
        assert_eq!(of(serde_json::json!({})), QueueType::Classic);
        assert_eq!(of(serde_json::json!({"broker": {"managed": {"replicas": 3}}})), QueueType::Quorum);
        assert_eq!(
            of(serde_json::json!({"broker": {"managed": {"replicas": 3}, "queueType": "classic"}})),
            QueueType::Classic
        );
        let external =
            serde_json::json!({"broker": {"external": {"urlSecretRef": {"name": "a"}}, "queueType": "quorum"}});
        assert_eq!(of(external), QueueType::Quorum);
    }

    #[test]
    fn external_broker_wins_over_managed_default() {
        let spec: SnsClusterSpec = serde_json::from_value(serde_json::json!({
            "broker": {"external": {"urlSecretRef": {"name": "amqp"}}}
        }))
        .unwrap();
        assert_eq!(spec.managed_broker(), None);
        assert_eq!(spec.broker.external.unwrap().url_secret_ref.key, "url", "the key defaults to `url`");
    }
}
