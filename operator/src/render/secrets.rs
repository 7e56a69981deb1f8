//! The Secrets the operator generates for an SnsCluster (the node secret,
//! the broker credentials, the CA and node certificate) and how the node
//! pods see them: read-only files, named by environment variables, never a
//! command-line argument.
//!
//! Generated Secrets carry the SnsCluster's labels but no owner reference:
//! like the volumes, they follow `storage.retention`. With `Retain` they
//! outlive the SnsCluster, so a re-created one finds the broker password
//! its RabbitMQ volume still holds and the secret its nodes' peers know;
//! with `Delete` the finalizer deletes them with the volumes.

use super::Names;
use super::pod::labels;
use crate::crd::SnsClusterSpec;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{EnvVar, KeyToPath, Secret, SecretVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// The node secret's key in its Secret.
pub const NODE_SECRET_KEY: &str = "secret";
/// Where the node containers find the node secret.
pub const SECRET_DIR: &str = "/etc/sns/secret";
/// Where the node containers find `tls.crt`, `tls.key` and `ca.crt`.
pub const TLS_DIR: &str = "/etc/sns/tls";
/// Where a synchronizer finds an external broker's CA.
pub const AMQP_CA_DIR: &str = "/etc/sns/amqp-ca";
/// Readable by the owner and the pod's fsGroup (the node's group) only.
const SECRET_FILE_MODE: i32 = 0o440;

/// Metadata of a generated Secret: the SnsCluster's labels, no owner (see
/// the module's docs).
pub(super) fn generated_meta(name: String, names: &Names, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(labels(names, component)),
        ..Default::default()
    }
}

/// The node secret without its value (filled in by [`node_secret`] when
/// the operator creates it).
pub(super) fn node_secret_template(names: &Names) -> Secret {
    Secret {
        metadata: generated_meta(names.node_secret(), names, "node-secret"),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// The node secret holding `value`.
pub fn node_secret(template: &Secret, value: &str) -> Secret {
    Secret { data: Some(bytes_of([(NODE_SECRET_KEY, value)])), ..template.clone() }
}

pub(super) fn bytes_of<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> BTreeMap<String, ByteString> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec()))).collect()
}

/// The files a node container reads its credentials from.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeFiles {
    pub(super) volumes: Vec<Volume>,
    pub(super) mounts: Vec<VolumeMount>,
    pub(super) env: Vec<EnvVar>,
}

fn secret_volume(name: &str, secret: String, items: Option<Vec<KeyToPath>>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(SECRET_FILE_MODE),
            items,
            optional: Some(false),
        }),
        ..Default::default()
    }
}

fn read_only(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(true), ..Default::default() }
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value), ..Default::default() }
}

/// The node secret and, with TLS on, the node certificate: what every
/// coordinator, server and synchronizer container mounts.
pub(super) fn node_files(names: &Names, spec: &SnsClusterSpec) -> NodeFiles {
    let mut f = NodeFiles::default();
    f.volumes.push(secret_volume("node-secret", names.node_secret(), None));
    f.mounts.push(read_only("node-secret", SECRET_DIR));
    f.env.push(env("SNS_SECRET_FILE", format!("{SECRET_DIR}/{NODE_SECRET_KEY}")));
    if spec.tls.enabled {
        f.volumes.push(secret_volume("tls", names.tls_secret(), None));
        f.mounts.push(read_only("tls", TLS_DIR));
        f.env.push(env("SNS_TLS_CERT", format!("{TLS_DIR}/tls.crt")));
        f.env.push(env("SNS_TLS_KEY", format!("{TLS_DIR}/tls.key")));
        f.env.push(env("SNS_TLS_CA", format!("{TLS_DIR}/ca.crt")));
    }
    f
}

/// An external `amqps://` broker's CA, for the synchronizer.
pub(super) fn amqp_ca_files(spec: &SnsClusterSpec) -> NodeFiles {
    let mut f = NodeFiles::default();
    if let Some(ca) = spec.broker.external.as_ref().and_then(|e| e.ca_secret_ref.as_ref()) {
        let item = KeyToPath { key: ca.key.clone(), path: "ca.crt".into(), mode: None };
        f.volumes.push(secret_volume("amqp-ca", ca.name.clone(), Some(vec![item])));
        f.mounts.push(read_only("amqp-ca", AMQP_CA_DIR));
        f.env.push(env("SNS_AMQP_CA", format!("{AMQP_CA_DIR}/ca.crt")));
    }
    f
}
