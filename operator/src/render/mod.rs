//! Kubernetes objects rendered from an `SnsCluster`: a pure function of the
//! resource, so every object is unit-tested without an API server.
//!
//! Mapping (names for an SnsCluster `demo`):
//!
//! | object | name | what |
//! |---|---|---|
//! | StatefulSet + Service | `demo-coordinator` | the coordinator (`coordinator.replicas`, default 2: replicas electing a leader on the Lease `demo-coordinator`, records in the ConfigMap `demo-coordinator-records`; 1: one coordinator, its records on the PVC `data-demo-coordinator-0`); a StatefulSet so that two pods of one identity never run at once and each finds its volume; the Service routes to the ready pod (the leader) and also serves the client gateway |
//! | ServiceAccount + Role + RoleBinding | `demo-coordinator` | a replicated coordinator's API access: its Lease and its records ConfigMap |
//! | StatefulSet (replicas 1) | `demo-server-<c>-<s>` | one per server process: containers `server` and `synchronizer` sharing the PVC `data` |
//! | headless Service | `demo-nodes` | stable DNS `demo-server-<c>-<s>-0.demo-nodes.<ns>.svc` for every server pod |
//! | Service | `demo-master-<c>` | selects the pod labelled `sns.io/role=master` in cluster c |
//! | PodDisruptionBudget | `demo-cluster-<c>` | at most one server of a cluster down by choice |
//! | ConfigMap | `demo-config` | environment shared by every node (`SNS_LOG`) |
//! | StatefulSet + Service + ConfigMap + Secret | `demo-rabbitmq`, `demo-rabbitmq-config`, `demo-rabbitmq-credentials` | the managed broker |
//! | headless Service + Secret + PodDisruptionBudget | `demo-rabbitmq-nodes`, `demo-rabbitmq-erlang-cookie`, `demo-rabbitmq` | a managed broker cluster (`replicas` 3 or more) |
//! | Secret | `demo-node-secret` | the node secret (tokens, event MACs), mounted in every node |
//! | Secrets | `demo-ca`, `demo-tls` | the operator's CA; the node certificate with `ca.crt` (or a cert-manager Certificate `demo-tls` writing it) |
//! | NetworkPolicy | `demo-server`, `demo-coordinator`, `demo-broker` | who may reach which pods |
//!
//! Why one StatefulSet per server process rather than one per SNS cluster
//! with two replicas: each pod's command line is then exactly the
//! deployment plan's (`sns_node::topology::plan`), with fixed cluster,
//! server and synchronizer ids and ports, instead of ids derived from a pod
//! ordinal at start-up; and master/slave is decided by the coordinator, not
//! by the ordinal, so nothing is lost by giving up a shared StatefulSet.
//! It also lets scale-down remove exactly server 2 of every cluster.
//!
//! Submodules, by what they render: [`names`] (object names), [`pod`]
//! (labels, containers, probes, volumes shared by every pod),
//! [`coordinator`], [`servers`], [`broker`], [`secrets`] (generated
//! Secrets and how pods mount them), [`tls`] (certificates), [`network`]
//! (NetworkPolicies).

mod broker;
mod coordinator;
mod names;
mod network;
mod pod;
mod rabbitmq_conf;
pub mod secrets;
mod servers;
pub mod tls;

pub use broker::{broker_secret, cookie_secret, random_password};
pub use names::{Names, deployment_name, fnv1a};
pub use secrets::node_secret;

use crate::crd::SnsCluster;
use crate::error::{Error, Result};
use broker::{broker_secret_template, render_broker};
use coordinator::{render_coordinator, render_coordinator_rbac};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use pod::{grpc_port, labels, meta, selector_of};
use servers::render_server;
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
/// AMQP over TLS: the managed broker's only AMQP port when TLS is on.
pub const AMQPS_PORT: i32 = 5671;
pub const RABBITMQ_MANAGEMENT_PORT: i32 = 15672;
/// The plain-text port on which a node serves its gRPC health service
/// alone (`SNS_HEALTH_PORT`), for the kubelet's probes: the coordinator's
/// and a server's. A server pod's synchronizer shares the pod's network,
/// so it has its own, [`SYNC_HEALTH_PORT`].
pub const HEALTH_PORT: u16 = 8086;
pub const SYNC_HEALTH_PORT: u16 = 8087;
/// The container port names of [`HEALTH_PORT`] and [`SYNC_HEALTH_PORT`].
pub const HEALTH_PORT_NAME: &str = "health";
pub const SYNC_HEALTH_PORT_NAME: &str = "sync-health";
/// The plain-HTTP port on which a node serves its Prometheus metrics
/// (`SNS_METRICS_PORT`, `GET /metrics`); a server pod's synchronizer has
/// its own, [`SYNC_METRICS_PORT`]. The chart's PodMonitor scrapes both
/// names.
pub const METRICS_PORT: u16 = 9100;
pub const SYNC_METRICS_PORT: u16 = 9101;
pub const METRICS_PORT_NAME: &str = "metrics";
pub const SYNC_METRICS_PORT_NAME: &str = "sync-metrics";
/// User id of the runtime image (see the Dockerfile).
pub const RUN_AS_USER: i64 = 10001;

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
/// On a server pod template: the hash of the rest of the template, which a
/// running pod carries from the template it was made from.
pub const TEMPLATE_HASH: &str = "sns.io/template-hash";

/// Everything the renderer needs besides the resource itself.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Image for `sns-node` when the spec names none (the operator's own).
    pub default_image: String,
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
    NetworkPolicy(NetworkPolicy),
    ServiceAccount(ServiceAccount),
    Role(RbacRole),
    RoleBinding(RoleBinding),
    /// A cert-manager `Certificate` (not a type k8s-openapi knows).
    Certificate(serde_json::Value),
}

impl Child {
    pub fn name(&self) -> String {
        match self {
            Child::ConfigMap(o) => o.name_any(),
            Child::Service(o) => o.name_any(),
            Child::StatefulSet(o) => o.name_any(),
            Child::Pdb(o) => o.name_any(),
            Child::NetworkPolicy(o) => o.name_any(),
            Child::ServiceAccount(o) => o.name_any(),
            Child::Role(o) => o.name_any(),
            Child::RoleBinding(o) => o.name_any(),
            Child::Certificate(o) => o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Child::ConfigMap(_) => "ConfigMap",
            Child::Service(_) => "Service",
            Child::StatefulSet(_) => "StatefulSet",
            Child::Pdb(_) => "PodDisruptionBudget",
            Child::NetworkPolicy(_) => "NetworkPolicy",
            Child::ServiceAccount(_) => "ServiceAccount",
            Child::Role(_) => "Role",
            Child::RoleBinding(_) => "RoleBinding",
            Child::Certificate(_) => "Certificate",
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Child::ConfigMap(o) => serde_json::to_value(o),
            Child::Service(o) => serde_json::to_value(o),
            Child::StatefulSet(o) => serde_json::to_value(o),
            Child::Pdb(o) => serde_json::to_value(o),
            Child::NetworkPolicy(o) => serde_json::to_value(o),
            Child::ServiceAccount(o) => serde_json::to_value(o),
            Child::Role(o) => serde_json::to_value(o),
            Child::RoleBinding(o) => serde_json::to_value(o),
            Child::Certificate(o) => Ok(o.clone()),
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
    /// A managed broker cluster's Erlang cookie: created once if missing,
    /// never overwritten (its nodes must keep agreeing on it).
    pub broker_cookie: Option<Secret>,
    /// The node secret without its value: created once if missing, never
    /// overwritten (running nodes hold the keys derived from it).
    pub node_secret: Secret,
    /// Who makes the node certificate.
    pub tls: TlsPlan,
}

/// Where the node certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPlan {
    /// TLS is off.
    Off,
    /// The operator's own CA issues it, for these names, and the managed
    /// broker's for `broker` (None: no managed broker).
    Operator { names: Vec<String>, broker: Option<Vec<String>> },
    /// cert-manager issues it through the rendered Certificate.
    CertManager,
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

    // Policies before the pods they protect exist.
    if spec.network_policy.enabled {
        let broker_port = spec.managed_broker().map(|_| amqp_port_name(spec));
        children.extend(
            network::render_network_policies(&names, broker_port, &owner).into_iter().map(Child::NetworkPolicy),
        );
    }

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
    let (broker_secret, broker_cookie) = match spec.managed_broker() {
        Some(broker) => {
            let objects = render_broker(&names, &broker, spec.storage.retention, spec.tls.enabled, &owner);
            children.extend(objects.children);
            (Some(broker_secret_template(&names)), objects.cookie)
        }
        None => (None, None),
    };
    let amqp = amqp_env(&names, spec);

    let tls = match (&spec.tls.enabled, &spec.tls.issuer_ref) {
        (false, _) => TlsPlan::Off,
        (true, None) => TlsPlan::Operator {
            names: tls::tls_names(&names, spec.clusters),
            broker: spec.managed_broker().map(|_| tls::broker_tls_names(&names)),
        },
        (true, Some(_)) => TlsPlan::CertManager,
    };
    children.extend(tls::certificates(&names, spec, &owner).into_iter().map(Child::Certificate));

    // A replicated coordinator's identity before the pods that use it.
    if spec.coordinator.replicated() {
        let (account, role, binding) = render_coordinator_rbac(&names, &owner);
        children.extend([Child::ServiceAccount(account), Child::Role(role), Child::RoleBinding(binding)]);
    }
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
        children.push(Child::StatefulSet(render_server(&names, spec, &image, (p, sync), &amqp, &config_hash, &owner)));
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

    Ok(Rendered { children, broker_secret, broker_cookie, node_secret: secrets::node_secret_template(&names), tls })
}

/// The name of the managed broker's AMQP port: `amqps` with TLS on, when
/// it is the only one, else `amqp`.
fn amqp_port_name(spec: &crate::crd::SnsClusterSpec) -> &'static str {
    if spec.tls.enabled { "amqps" } else { "amqp" }
}

/// How a synchronizer finds its broker. An external one: the URL from the
/// given Secret. The managed one: a URL made here from the password in the
/// credentials Secret (Kubernetes expands `$(AMQP_PASSWORD)` when it starts
/// the container), so that it follows `spec.tls`, where the URL written
/// into the Secret once could not; with TLS, `amqps://` to port 5671 and
/// the deployment's CA, which signed the broker's certificate.
fn amqp_env(names: &Names, spec: &crate::crd::SnsClusterSpec) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    use k8s_openapi::api::core::v1::EnvVar;
    let plain = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    if let Some(ext) = &spec.broker.external {
        return vec![pod::secret_env("AMQP_URL", &ext.url_secret_ref.name, &ext.url_secret_ref.key)];
    }
    let (scheme, port) = if spec.tls.enabled { ("amqps", AMQPS_PORT) } else { ("amqp", AMQP_PORT) };
    let mut v = vec![
        pod::secret_env("AMQP_PASSWORD", &names.rabbitmq_secret(), "password"),
        plain("AMQP_URL", format!("{scheme}://sns:$(AMQP_PASSWORD)@{}:{port}/%2f", names.rabbitmq_host())),
    ];
    if spec.tls.enabled {
        v.push(plain("SNS_AMQP_CA", format!("{}/ca.crt", secrets::TLS_DIR)));
    }
    v
}

/// Every rendered object (and the generated Secrets with placeholder
/// values) as one multi-document YAML stream, for `sns-operator render`
/// and the offline schema checks.
pub fn to_yaml(rendered: &Rendered, names: &Names) -> String {
    let mut docs: Vec<serde_json::Value> = rendered.children.iter().map(Child::to_json).collect();
    let placeholder = "rendered-placeholder";
    let mut secrets = vec![node_secret(&rendered.node_secret, placeholder)];
    if let Some(t) = &rendered.broker_secret {
        secrets.push(broker_secret(t, names, placeholder));
    }
    if let Some(t) = &rendered.broker_cookie {
        secrets.push(cookie_secret(t, placeholder));
    }
    if let TlsPlan::Operator { broker, .. } = &rendered.tls {
        let pem = tls::Pem { cert: placeholder.into(), key: placeholder.into() };
        secrets.push(tls::ca_secret(names, &pem));
        secrets.push(tls::node_tls_secret(names, &pem, placeholder, placeholder));
        if broker.is_some() {
            secrets.push(tls::cert_secret(names.rabbitmq_tls_secret(), names, &pem, placeholder, placeholder));
        }
    }
    for s in secrets {
        docs.push(serde_json::to_value(s).expect("a Secret serializes"));
    }
    docs.iter().map(|d| format!("---\n{}", serde_yaml::to_string(d).expect("JSON values serialize as YAML"))).collect()
}

#[cfg(test)]
mod broker_tests;
#[cfg(test)]
mod security_tests;
#[cfg(test)]
mod tests;
