//! The coordinator's StatefulSet, and for a replicated coordinator
//! (`spec.coordinator.replicas` 2 or 3) the ServiceAccount, Role and
//! RoleBinding its replicas elect their leader and keep their records with.

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
use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, EnvVarSource, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec,
    ServiceAccount, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use sns_node::topology::Process;

/// The coordinator: a StatefulSet of one pod whose records (terms, masters,
/// which servers hold every acknowledged write) live on its own PVC, so a
/// restarted or rescheduled coordinator still knows which server it may
/// promote. A StatefulSet rather than a Deployment also because it never
/// runs two pods of one identity at once: the replacement is created only
/// after the old pod is gone, and two coordinators would each appoint
/// masters.
///
/// With `spec.coordinator.replicas` 2 or 3 the pods are replicas of one
/// replicated coordinator (`sns-node coordinator --kube-ha`): they elect a
/// leader on the Lease `<name>-coordinator` and keep the records in the
/// ConfigMap `<name>-coordinator-records`, under the ServiceAccount
/// `<name>-coordinator` ([`render_coordinator_rbac`]), the only pods of the
/// SnsCluster that get an API token. Only the leader reports ready (health
/// service `readiness`), so the `<name>-coordinator` Service, which the
/// servers, synchronizers, clients and the operator all dial, reaches the
/// leader alone. Each replica keeps its claim: the first leader imports the
/// records of a former single coordinator from its volume (pod 0's).
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
    let replicated = spec.coordinator.replicated();
    let mut env = files.env;
    if replicated {
        env.extend(ha_env(names));
    }
    let container = node_container(
        spec,
        image,
        names,
        NodeContainer {
            name: "coordinator",
            args: pod_args(p),
            port_name: "grpc",
            port: p.port,
            env,
            mounts: [vec![data_mount, tmp_mount], files.mounts].concat(),
            health: (HEALTH_PORT_NAME, HEALTH_PORT),
            metrics: (METRICS_PORT_NAME, METRICS_PORT),
            // A replica is ready while it leads; one coordinator as soon as
            // it is up.
            readiness: if replicated { sns_node::coordinator::ha::READINESS } else { "" },
        },
    );
    let mut pvc_labels = selector_of(&l);
    pvc_labels.insert(LABEL_NAME.into(), "sns".into());
    StatefulSet {
        metadata: meta(names.coordinator(), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(spec.coordinator.replicas).unwrap_or(1)),
            // No serviceName: nothing dials the coordinator pod by name;
            // clients and nodes go through the `<name>-coordinator` Service,
            // which may be a NodePort or LoadBalancer and so not headless.
            // Parallel: with one pod there is no order to keep, and an
            // OrderedReady rollout would stall behind a pod that never gets
            // ready instead of replacing it with the next revision; the
            // replicas of a replicated coordinator must all start at once,
            // since only one of them (the leader) ever gets ready.
            pod_management_policy: Some("Parallel".into()),
            // One pod at a time: deleted, gone, then its replacement.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(spec.storage.retention)),
            template: PodTemplateSpec {
                metadata: Some(template_meta(l.clone(), config_hash)),
                spec: Some(PodSpec {
                    // The replicas call the API server (the Lease, the
                    // records ConfigMap) under their own ServiceAccount;
                    // a single coordinator has no use for a token.
                    service_account_name: replicated.then(|| names.coordinator()),
                    automount_service_account_token: Some(replicated),
                    affinity: replicated.then(|| spread(&l)),
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

/// The downward-API environment of a replica: the Lease to elect on, its
/// identity (the pod's name) and namespace.
fn ha_env(names: &Names) -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        EnvVar { name: "SNS_KUBE_HA".into(), value: Some(names.coordinator_lease()), ..Default::default() },
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
    ]
}

/// The replicas on different nodes where there are several: preferred,
/// not required, so that a one-node cluster (kind) still runs them all.
fn spread(labels: &std::collections::BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_of(labels)),
                        ..Default::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The identity of a replicated coordinator's pods: a ServiceAccount
/// `<name>-coordinator`, and a Role bound to it granting exactly what
/// `sns-node coordinator --kube-ha` does with the API: read and renew its
/// Lease, read and replace its records ConfigMap, and create either when
/// missing. `create` cannot be limited to a name (the API server checks
/// it before the object, and its name, exists), so it is granted on its
/// own rule, for leases and ConfigMaps of the namespace.
pub(super) fn render_coordinator_rbac(names: &Names, owner: &OwnerReference) -> (ServiceAccount, Role, RoleBinding) {
    let l = labels(names, "coordinator");
    let name = names.coordinator();
    let rule = |group: &str, resource: &str, verbs: &[&str], only: Option<String>| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        resource_names: only.map(|n| vec![n]),
        ..Default::default()
    };
    let account = ServiceAccount {
        metadata: meta(name.clone(), names, l.clone(), owner),
        // The token is mounted by the pod template, for these pods only.
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(name.clone(), names, l.clone(), owner),
        rules: Some(vec![
            rule("coordination.k8s.io", "leases", &["get", "update"], Some(names.coordinator_lease())),
            // create cannot be restricted by resourceName.
            rule("coordination.k8s.io", "leases", &["create"], None),
            rule("", "configmaps", &["get", "update"], Some(names.coordinator_records())),
            // create cannot be restricted by resourceName.
            rule("", "configmaps", &["create"], None),
        ]),
    };
    let binding = RoleBinding {
        metadata: meta(name.clone(), names, l, owner),
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.clone() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: Some(names.namespace.clone()),
            ..Default::default()
        }]),
    };
    (account, role, binding)
}
