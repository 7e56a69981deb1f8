//! The coordinator's StatefulSet.

use super::pod::{
    NodeContainer, labels, meta, node_container, pod_security, pvc_template, retention_policy, selector_of,
    template_meta, tmp_volume,
};
use super::secrets::node_files;
use super::{
    DATA_ROOT, HEALTH_PORT, HEALTH_PORT_NAME, LABEL_NAME, METRICS_PORT, METRICS_PORT_NAME, Names, RUN_AS_USER, pod_args,
};
use crate::crd::SnsClusterSpec;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use sns_node::topology::Process;

/// The coordinator: a StatefulSet of one pod whose records (terms, masters,
/// which servers hold every acknowledged write) live on its own PVC, so a
/// restarted or rescheduled coordinator still knows which server it may
/// promote. A StatefulSet rather than a Deployment also because it never
/// runs two pods of one identity at once: the replacement is created only
/// after the old pod is gone, and two coordinators would each appoint
/// masters.
pub(super) fn render_coordinator(
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
    let files = node_files(names, spec);
    let container = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "coordinator",
            args: pod_args(p),
            port_name: "grpc",
            port: p.port,
            env: files.env,
            mounts: [vec![data_mount, tmp_mount], files.mounts].concat(),
            health: (HEALTH_PORT_NAME, HEALTH_PORT),
            metrics: (METRICS_PORT_NAME, METRICS_PORT),
            readiness: "",
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
                    volumes: Some([vec![tmp], files.volumes].concat()),
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
