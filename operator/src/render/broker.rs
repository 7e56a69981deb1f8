//! The managed RabbitMQ broker: its Services, configuration, StatefulSet,
//! credentials and, for a broker cluster (`replicas` 3 or more), the
//! Erlang cookie its nodes share and a PodDisruptionBudget.

use super::pod::{
    container_port, container_security, labels, meta, pod_security, pvc_template, retention_policy, secret_env,
    selector_of, template_meta,
};
use super::rabbitmq_conf::{CONF_KEY, CONF_PATH, TLS_DIR, rabbitmq_conf};
use super::{AMQP_PORT, AMQPS_PORT, Child, Names, RABBITMQ_MANAGEMENT_PORT, fnv1a};
use crate::crd::PvcRetention;
use crate::error::{Error, Result};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, ObjectFieldSelector, PodAffinityTerm,
    PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The official RabbitMQ image's `rabbitmq` user.
const RABBITMQ_USER_ID: i64 = 999;
/// Erlang's port mapper and the inter-node (distribution) port, on which a
/// broker cluster's nodes talk to each other.
const EPMD_PORT: i32 = 4369;
const DIST_PORT: i32 = 25672;
/// Where RabbitMQ keeps its data and looks for its Erlang cookie.
const DATA_DIR: &str = "/var/lib/rabbitmq";
/// Where the cookie Secret is mounted for the init container to copy.
const COOKIE_DIR: &str = "/etc/sns/rabbitmq-cookie";

/// What the managed broker is made of, in the order they are applied.
pub(super) struct BrokerObjects {
    pub(super) children: Vec<Child>,
    /// The Erlang cookie Secret without its value (a broker cluster only).
    pub(super) cookie: Option<Secret>,
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value), ..Default::default() }
}

pub(super) fn render_broker(
    names: &Names,
    broker: &crate::crd::ManagedBroker,
    retention: PvcRetention,
    tls: bool,
    owner: &OwnerReference,
) -> BrokerObjects {
    let l = labels(names, "broker");
    let cluster = broker.replicas > 1;
    // With TLS, AMQP is served on the TLS port alone (see rabbitmq_conf).
    let (amqp, amqp_port) = if tls { ("amqps", AMQPS_PORT) } else { ("amqp", AMQP_PORT) };
    let mut children = Vec::new();
    let conf = rabbitmq_conf(names, broker, tls);
    let conf_hash = format!("{:016x}", fnv1a(conf.as_bytes()));
    children.push(Child::ConfigMap(ConfigMap {
        metadata: meta(names.rabbitmq_config(), names, l.clone(), owner),
        data: Some([(CONF_KEY.to_string(), conf)].into()),
        ..Default::default()
    }));
    children.push(Child::Service(Service {
        metadata: meta(names.rabbitmq(), names, l.clone(), owner),
        spec: Some(ServiceSpec {
            selector: Some(selector_of(&l)),
            ports: Some(vec![service_port(amqp, amqp_port), service_port("management", RABBITMQ_MANAGEMENT_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }));
    if cluster {
        children.push(Child::Service(Service {
            metadata: meta(names.rabbitmq_nodes(), names, l.clone(), owner),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                // Peers must resolve a node before it is ready: it joins
                // the cluster while it starts.
                publish_not_ready_addresses: Some(true),
                selector: Some(selector_of(&l)),
                ports: Some(vec![service_port("epmd", EPMD_PORT), service_port("cluster-links", DIST_PORT)]),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }
    let secret = names.rabbitmq_secret();
    let tcp_probe = |period, failures| Probe {
        tcp_socket: Some(TCPSocketAction { port: IntOrString::String(amqp.into()), ..Default::default() }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let mut env_vars = vec![
        secret_env("RABBITMQ_DEFAULT_USER", &secret, "username"),
        secret_env("RABBITMQ_DEFAULT_PASS", &secret, "password"),
    ];
    let mut ports = vec![container_port(amqp, amqp_port), container_port("management", RABBITMQ_MANAGEMENT_PORT)];
    let mut mounts = vec![
        VolumeMount { name: "data".into(), mount_path: DATA_DIR.into(), ..Default::default() },
        VolumeMount {
            name: "config".into(),
            mount_path: CONF_PATH.into(),
            sub_path: Some(CONF_KEY.into()),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource { name: names.rabbitmq_config(), ..Default::default() }),
        ..Default::default()
    }];
    if tls {
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.rabbitmq_tls_secret()),
                // Read by the pod's group (the `rabbitmq` user's, by fsGroup).
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let mut init_containers = None;
    if cluster {
        // A single broker keeps the short node name it has always had (its
        // data directory is named after it); a cluster's nodes are named by
        // their stable DNS names, which the peer list gives.
        env_vars.push(EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        });
        env_vars.push(env("RABBITMQ_USE_LONGNAME", "true".into()));
        env_vars.push(env(
            "RABBITMQ_NODENAME",
            format!("rabbit@$(POD_NAME).{}.{}", names.rabbitmq_nodes(), names.namespace),
        ));
        ports.extend([container_port("epmd", EPMD_PORT), container_port("cluster-links", DIST_PORT)]);
        volumes.push(Volume {
            name: "erlang-cookie".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.rabbitmq_cookie()),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        });
        // Erlang accepts a cookie file only if its owner alone can read it,
        // which a Secret volume (owned by root, group-readable with an
        // fsGroup) is not: it is copied into the data directory first.
        let cookie = format!("{DATA_DIR}/.erlang.cookie");
        init_containers = Some(vec![Container {
            name: "erlang-cookie".into(),
            image: Some(broker.image.clone()),
            command: Some(vec!["sh".into(), "-c".into()]),
            args: Some(vec![format!("rm -f {cookie} && cp {COOKIE_DIR}/{COOKIE_KEY} {cookie} && chmod 400 {cookie}")]),
            security_context: Some(container_security()),
            volume_mounts: Some(vec![
                VolumeMount { name: "data".into(), mount_path: DATA_DIR.into(), ..Default::default() },
                VolumeMount {
                    name: "erlang-cookie".into(),
                    mount_path: COOKIE_DIR.into(),
                    read_only: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }]);
    }
    let container = Container {
        name: "rabbitmq".into(),
        image: Some(broker.image.clone()),
        env: Some(env_vars),
        ports: Some(ports),
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
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    // A cluster's nodes on different machines when there are enough;
    // preferred, not required, so a small cluster still schedules them.
    let affinity = cluster.then(|| Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let sts = StatefulSet {
        metadata: meta(names.rabbitmq(), names, l.clone(), owner),
        spec: Some(StatefulSetSpec {
            replicas: Some(broker.replicas as i32),
            // Both immutable on a StatefulSet, as `replicas` is on the
            // SnsCluster: a single broker keeps what it always had.
            service_name: Some(if cluster { names.rabbitmq_nodes() } else { names.rabbitmq() }),
            // A cluster's nodes wait for each other while they boot: one
            // at a time, the first would never become ready alone.
            pod_management_policy: cluster.then(|| "Parallel".to_string()),
            selector: LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() },
            persistent_volume_claim_retention_policy: Some(retention_policy(retention)),
            template: PodTemplateSpec {
                metadata: Some(template_meta(l.clone(), &conf_hash)),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security(RABBITMQ_USER_ID)),
                    affinity,
                    init_containers,
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![pvc_template(
                l.clone(),
                &broker.storage_size,
                broker.storage_class_name.as_ref(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    };
    children.push(Child::StatefulSet(sts));
    if cluster {
        // One broker node down by choice at a time: the others keep a
        // majority for the quorum queues.
        children.push(Child::Pdb(PodDisruptionBudget {
            metadata: meta(names.rabbitmq(), names, l.clone(), owner),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector { match_labels: Some(selector_of(&l)), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }));
    }
    let cookie = cluster.then(|| Secret {
        metadata: super::secrets::generated_meta(names.rabbitmq_cookie(), names, "broker"),
        type_: Some("Opaque".into()),
        ..Default::default()
    });
    BrokerObjects { children, cookie }
}

/// The key of the Erlang cookie in its Secret.
pub const COOKIE_KEY: &str = "cookie";

/// The Erlang cookie Secret holding `cookie`.
pub fn cookie_secret(template: &Secret, cookie: &str) -> Secret {
    Secret { data: Some(super::secrets::bytes_of([(COOKIE_KEY, cookie)])), ..template.clone() }
}

/// The broker credentials Secret without its password (filled in by
/// [`broker_secret`] at creation). No owner: it follows
/// `storage.retention` like the broker's volume, which keeps the password.
pub(super) fn broker_secret_template(names: &Names) -> Secret {
    Secret {
        metadata: super::secrets::generated_meta(names.rabbitmq_secret(), names, "broker"),
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
