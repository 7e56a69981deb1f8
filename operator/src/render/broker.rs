//! The managed RabbitMQ broker: its Service, StatefulSet and credentials.

use super::pod::{
    container_port, container_security, labels, meta, pod_security, pvc_template, retention_policy, secret_env,
    selector_of,
};
use super::{AMQP_PORT, Names, RABBITMQ_MANAGEMENT_PORT};
use crate::crd::PvcRetention;
use crate::error::{Error, Result};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, PodSpec, PodTemplateSpec, Probe, Secret, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The official RabbitMQ image's `rabbitmq` user.
const RABBITMQ_USER_ID: i64 = 999;

pub(super) fn render_broker(
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
