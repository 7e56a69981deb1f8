//! Pieces shared by the rendered objects: labels and metadata, the node
//! container with its probes and security settings, volumes and claims.

use super::{
    CONFIG_HASH, LABEL_CLUSTER, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME, LABEL_SERVER, MANAGER,
    Names, SERVICE_PORT,
};
use crate::crd::{PvcRetention, SnsClusterSpec};
use k8s_openapi::api::apps::v1::StatefulSetPersistentVolumeClaimRetentionPolicy;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource, EnvFromSource, EnvVar,
    EnvVarSource, GRPCAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, Probe,
    SeccompProfile, SecretKeySelector, SecurityContext, ServicePort, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

pub(super) fn labels(names: &Names, component: &str) -> BTreeMap<String, String> {
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

pub(super) fn server_labels(names: &Names, cluster: u32, server: u32) -> BTreeMap<String, String> {
    let mut l = labels(names, "server");
    l.insert(LABEL_CLUSTER.into(), cluster.to_string());
    l.insert(LABEL_SERVER.into(), server.to_string());
    l
}

pub(super) fn selector_of(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    // Selectors leave out labels that may change over an object's life.
    labels.iter().filter(|(k, _)| k.as_str() != LABEL_NAME).map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub(super) fn meta(
    name: String,
    names: &Names,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

pub(super) fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

pub(super) fn pod_security(user: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        run_as_group: Some(user),
        fs_group: Some(user),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// Every node serves `grpc.health.v1` alone, in plain text, on its health
/// port (`SNS_HEALTH_PORT`) as well as on its own port, which speaks TLS
/// when the SnsCluster's TLS is on: the kubelet's native gRPC probe cannot
/// speak TLS, so every probe asks the health port, TLS on or off.
/// `service` "" asks whether the process is up.
pub(super) fn grpc_probe(port: u16, service: &str, period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction { port: i32::from(port), service: Some(service.into()) }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

pub(super) fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort { name: Some(name.into()), container_port: port, protocol: Some("TCP".into()), ..Default::default() }
}

pub(super) fn config_env(names: &Names) -> Vec<EnvFromSource> {
    vec![EnvFromSource {
        config_map_ref: Some(ConfigMapEnvSource { name: names.config(), optional: Some(false) }),
        ..Default::default()
    }]
}

pub(super) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn tmp_volume() -> (Volume, VolumeMount) {
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

pub(super) struct NodeContainer<'a> {
    pub(super) name: &'a str,
    pub(super) args: Vec<String>,
    pub(super) port_name: &'a str,
    pub(super) port: u16,
    pub(super) env: Vec<EnvVar>,
    pub(super) mounts: Vec<VolumeMount>,
    /// The plain-text health port: its container port name and number
    /// (the two containers of a server pod share its network, so each has
    /// its own).
    pub(super) health: (&'a str, u16),
    /// The metrics port: its container port name and number.
    pub(super) metrics: (&'a str, u16),
    /// The health service the readiness probe asks ("": the process's).
    pub(super) readiness: &'a str,
}

pub(super) fn node_container(spec: &SnsClusterSpec, image: &str, names: &Names, c: NodeContainer<'_>) -> Container {
    let (health_name, health_port) = c.health;
    let (metrics_name, metrics_port) = c.metrics;
    let health_env =
        EnvVar { name: "SNS_HEALTH_PORT".into(), value: Some(health_port.to_string()), ..Default::default() };
    let metrics_env =
        EnvVar { name: "SNS_METRICS_PORT".into(), value: Some(metrics_port.to_string()), ..Default::default() };
    Container {
        name: c.name.into(),
        image: Some(image.into()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec!["sns-node".into()]),
        args: Some(c.args),
        env: Some([c.env, vec![health_env, metrics_env]].concat()),
        env_from: Some(config_env(names)),
        ports: Some(vec![
            container_port(c.port_name, i32::from(c.port)),
            container_port(health_name, i32::from(health_port)),
            container_port(metrics_name, i32::from(metrics_port)),
        ]),
        readiness_probe: Some(grpc_probe(health_port, c.readiness, 5, 3)),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(10), ..grpc_probe(health_port, "", 10, 3) }),
        resources: spec.resources.clone(),
        security_context: Some(container_security()),
        volume_mounts: Some(c.mounts),
        ..Default::default()
    }
}

pub(super) fn retention_policy(r: PvcRetention) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    let v = match r {
        PvcRetention::Retain => "Retain",
        PvcRetention::Delete => "Delete",
    };
    StatefulSetPersistentVolumeClaimRetentionPolicy { when_deleted: Some(v.into()), when_scaled: Some(v.into()) }
}

pub(super) fn pvc_template(
    labels: BTreeMap<String, String>,
    size: &str,
    class: Option<&String>,
) -> PersistentVolumeClaim {
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

/// Pod template metadata: the labels, and the config hash whose change
/// rolls the pods when the shared settings change.
pub(super) fn template_meta(labels: BTreeMap<String, String>, config_hash: &str) -> ObjectMeta {
    ObjectMeta {
        labels: Some(labels),
        annotations: Some([(CONFIG_HASH.to_string(), config_hash.to_string())].into()),
        ..Default::default()
    }
}

/// The gRPC port of a Service, by the container port's name.
pub(super) fn grpc_port(name: &str, app_protocol: Option<&str>) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: SERVICE_PORT,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        app_protocol: app_protocol.map(Into::into),
        ..Default::default()
    }
}
