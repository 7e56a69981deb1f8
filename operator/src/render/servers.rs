//! One StatefulSet per planned server: its `server` and `synchronizer`
//! containers sharing the pod's volume.

use super::pod::{
    NodeContainer, labels, meta, node_container, pod_security, pvc_template, retention_policy, selector_of,
    server_labels, template_meta, tmp_volume,
};
use super::secrets::{amqp_ca_files, node_files};
use super::{
    DATA_ROOT, HEALTH_PORT, HEALTH_PORT_NAME, LABEL_CLUSTER, LABEL_NAME, METRICS_PORT, METRICS_PORT_NAME, Names,
    RUN_AS_USER, SYNC_HEALTH_PORT, SYNC_HEALTH_PORT_NAME, SYNC_METRICS_PORT, SYNC_METRICS_PORT_NAME, TEMPLATE_HASH,
    fnv1a, pod_args,
};
use crate::crd::SnsClusterSpec;
use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::api::core::v1::{
    Affinity, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use sns_node::topology::{Process, Role};

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..Default::default() }
}

/// The health service a server reports NOT_SERVING while it catches up
/// (node/src/server/role.rs `READINESS_SERVICE`, which the node crate
/// keeps private).
pub const READINESS_SERVICE: &str = "readiness";

pub(super) fn render_server(
    names: &Names,
    spec: &SnsClusterSpec,
    image: &str,
    (server, sync): (&Process, &Process),
    amqp: &[EnvVar],
    config_hash: &str,
    owner: &OwnerReference,
) -> StatefulSet {
    let Role::Server { cluster, id } = server.role else { unreachable!("render_server takes a server process") };
    let l = server_labels(names, cluster, id);
    let data_mount = VolumeMount { name: "data".into(), mount_path: DATA_ROOT.into(), ..Default::default() };
    let (tmp, tmp_mount) = tmp_volume();
    let files = node_files(names, spec);
    let amqp_ca = amqp_ca_files(spec);
    let server_c = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "server",
            args: pod_args(server),
            port_name: "sns",
            port: server.port,
            env: files.env.clone(),
            mounts: [vec![data_mount.clone(), tmp_mount.clone()], files.mounts.clone()].concat(),
            health: (HEALTH_PORT_NAME, HEALTH_PORT),
            metrics: (METRICS_PORT_NAME, METRICS_PORT),
            // NOT_SERVING while the server catches up with its master (or
            // is fenced, or has no trusted journal): a rolling update waits
            // for this before it goes on.
            readiness: READINESS_SERVICE,
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
            env: [
                amqp.to_vec(),
                // The same for every synchronizer: a queue's type is
                // fixed once declared.
                vec![plain_env("SNS_QUEUE_TYPE", spec.queue_type().as_str())],
                files.env,
                amqp_ca.env,
            ]
            .concat(),
            // The synchronizer hands events to its server over gRPC and
            // writes no files; it sees the volume read-only.
            mounts: [
                vec![VolumeMount { read_only: Some(true), ..data_mount }, tmp_mount],
                files.mounts,
                amqp_ca.mounts,
            ]
            .concat(),
            health: (SYNC_HEALTH_PORT_NAME, SYNC_HEALTH_PORT),
            metrics: (SYNC_METRICS_PORT_NAME, SYNC_METRICS_PORT),
            readiness: "",
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
    let mut template = PodTemplateSpec {
        metadata: Some(template_meta(l.clone(), config_hash)),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security(RUN_AS_USER)),
            affinity: Some(affinity),
            containers: vec![server_c, sync_c],
            volumes: Some([vec![tmp], files.volumes, amqp_ca.volumes].concat()),
            // Writes are fsynced before they are acknowledged: a
            // short grace is safe and speeds up failover drills.
            termination_grace_period_seconds: Some(10),
            ..Default::default()
        }),
    };
    // What the rolling update compares a running pod with (see
    // crate::rollout): the hash of everything else in the template.
    let hash = format!("{:016x}", fnv1a(serde_json::to_string(&template).unwrap_or_default().as_bytes()));
    if let Some(m) = template.metadata.as_mut() {
        m.annotations.get_or_insert_with(Default::default).insert(TEMPLATE_HASH.into(), hash);
    }
    let mut pvc_labels = selector_of(&l);
    pvc_labels.insert(LABEL_NAME.into(), "sns".into());
    StatefulSet {
        metadata: meta(names.server(cluster, id), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.nodes()),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(spec.storage.retention)),
            // Held: the operator lowers the partition to 0 when the
            // server's turn comes (slave first, then the master once its
            // role moved), or for a pod that already runs this template:
            // see crate::rollout.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy { partition: Some(1), max_unavailable: None }),
            }),
            template,
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
