//! TLS for an SnsCluster's nodes: the names its node certificate must carry,
//! the CA and certificate the operator makes when no issuer is given
//! (rcgen, ECDSA P-256), and the cert-manager Certificate when one is.
//!
//! One certificate serves every node of the deployment: nodes are peers
//! that already share the node secret, so per-pod keys would not keep one
//! compromised pod from acting as another. It names every address a node
//! is dialled by: the coordinator Service (which the nodes, the operator
//! and in-cluster clients use), each master Service, every server pod
//! through the headless Service (a wildcard, so scaling needs no new
//! certificate), and `localhost`/`127.0.0.1` for `kubectl port-forward`
//! and `sns-node promote` inside the coordinator pod.

use super::secrets::{bytes_of, generated_meta};
use super::{Names, pod};
use crate::crd::{IssuerKind, SnsClusterSpec};
use crate::error::{Error, Result};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::time::{Duration, SystemTime};

/// Annotation on the node certificate's Secret: a checksum of the names
/// it was issued for, so that a certificate for other names is reissued.
pub const TLS_NAMES_ANNOTATION: &str = "sns.io/tls-names";
/// How long the operator's CA and node certificate are valid. There is no
/// automatic rotation (see docs/kubernetes.md); ten years keeps a running
/// deployment from failing on an expiry nobody planned for.
const VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Every DNS name and address a node is reached by.
pub fn tls_names(names: &Names, clusters: u32) -> Vec<String> {
    let ns = &names.namespace;
    let service = |svc: &str| {
        [svc.to_string(), format!("{svc}.{ns}"), format!("{svc}.{ns}.svc"), format!("{svc}.{ns}.svc.cluster.local")]
    };
    let mut v = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    v.extend(service(&names.coordinator()));
    v.push(format!("*.{}.{ns}.svc", names.nodes()));
    v.push(format!("*.{}.{ns}.svc.cluster.local", names.nodes()));
    for c in 1..=clusters {
        v.extend(service(&names.master(c)));
    }
    v
}

/// Every DNS name the managed broker is reached by: its client Service
/// (which the synchronizers dial) and, for a broker cluster, each node
/// through the headless Service; `localhost` for `kubectl port-forward`.
pub fn broker_tls_names(names: &Names) -> Vec<String> {
    let ns = &names.namespace;
    let svc = names.rabbitmq();
    vec![
        "localhost".to_string(),
        svc.clone(),
        format!("{svc}.{ns}"),
        format!("{svc}.{ns}.svc"),
        format!("{svc}.{ns}.svc.cluster.local"),
        format!("*.{}.{ns}.svc", names.rabbitmq_nodes()),
        format!("*.{}.{ns}.svc.cluster.local", names.rabbitmq_nodes()),
    ]
}

/// The checksum [`TLS_NAMES_ANNOTATION`] holds.
pub fn names_checksum(names: &[String]) -> String {
    format!("{:016x}", super::fnv1a(names.join(",").as_bytes()))
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pem(key redacted)")
    }
}

fn tls_err(e: rcgen::Error) -> Error {
    Error::Tls(e.to_string())
}

/// The CA's parameters: the same every time for one SnsCluster, so the key
/// stored in its Secret signs later certificates under the same issuer.
fn ca_params(names: &Names) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tiny SNS");
    // X.509 caps a common name at 64 characters.
    let cn: String = format!("Tiny SNS CA {}/{}", names.namespace, names.instance).chars().take(64).collect();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn validity(p: &mut CertificateParams) {
    let now = SystemTime::now();
    // An hour back: nodes whose clocks run a little behind still accept it.
    p.not_before = (now - Duration::from_secs(3600)).into();
    p.not_after = (now + VALIDITY).into();
}

/// A new CA for the SnsCluster.
pub fn new_ca(names: &Names) -> Result<Pem> {
    let key = KeyPair::generate().map_err(tls_err)?;
    let mut p = ca_params(names)?;
    validity(&mut p);
    let cert = p.self_signed(&key).map_err(tls_err)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse {
    /// A node: server and client authentication (nodes are both).
    Node,
    /// The managed broker: server authentication only.
    Broker,
}

/// A node certificate for `tls_names`, signed by `ca` (server and client
/// authentication: nodes are both).
pub fn issue_node_cert(names: &Names, tls_names: &[String], ca: &Pem) -> Result<Pem> {
    issue_cert(names, tls_names, ca, CertUse::Node)
}

/// A certificate for `tls_names` and `usage`, signed by `ca`.
pub fn issue_cert(names: &Names, tls_names: &[String], ca: &Pem, usage: CertUse) -> Result<Pem> {
    let ca_key = KeyPair::from_pem(&ca.key).map_err(tls_err)?;
    let issuer = Issuer::new(ca_params(names)?, ca_key);
    let key = KeyPair::generate().map_err(tls_err)?;
    let mut p = CertificateParams::new(tls_names.to_vec()).map_err(tls_err)?;
    p.distinguished_name = DistinguishedName::new();
    // Names are checked against the SANs; a CN longer than 64 characters
    // (a long namespace) would make the certificate invalid.
    let (cn, usages) = match usage {
        CertUse::Node => {
            ("Tiny SNS node", vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])
        }
        CertUse::Broker => ("Tiny SNS broker", vec![ExtendedKeyUsagePurpose::ServerAuth]),
    };
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = usages;
    validity(&mut p);
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}

/// The CA's Secret (`tls.crt`, `tls.key`); no pod mounts it.
pub fn ca_secret(names: &Names, ca: &Pem) -> Secret {
    Secret {
        metadata: generated_meta(names.ca_secret(), names, "tls"),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(bytes_of([("tls.crt", ca.cert.as_str()), ("tls.key", ca.key.as_str())])),
        ..Default::default()
    }
}

/// The node certificate's Secret, in cert-manager's layout (`tls.crt`,
/// `tls.key`, `ca.crt`) so the pods mount either the same way.
pub fn node_tls_secret(names: &Names, node: &Pem, ca_cert: &str, checksum: &str) -> Secret {
    cert_secret(names.tls_secret(), names, node, ca_cert, checksum)
}

/// A certificate's Secret named `name`, in cert-manager's layout.
pub fn cert_secret(name: String, names: &Names, node: &Pem, ca_cert: &str, checksum: &str) -> Secret {
    let mut meta = generated_meta(name, names, "tls");
    meta.annotations = Some([(TLS_NAMES_ANNOTATION.to_string(), checksum.to_string())].into());
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(bytes_of([("tls.crt", node.cert.as_str()), ("tls.key", node.key.as_str()), ("ca.crt", ca_cert)])),
        ..Default::default()
    }
}

/// The cert-manager Certificates, when the spec names an issuer: the node
/// certificate's and, for a managed broker, the broker's; each writes the
/// Secret of its name that the pods mount.
pub(super) fn certificates(names: &Names, spec: &SnsClusterSpec, owner: &OwnerReference) -> Vec<serde_json::Value> {
    let mut v = Vec::new();
    v.extend(certificate(names, spec, owner, names.tls_secret(), tls_names(names, spec.clusters), CertUse::Node));
    if spec.managed_broker().is_some() {
        let broker = broker_tls_names(names);
        v.extend(certificate(names, spec, owner, names.rabbitmq_tls_secret(), broker, CertUse::Broker));
    }
    v
}

fn certificate(
    names: &Names,
    spec: &SnsClusterSpec,
    owner: &OwnerReference,
    name: String,
    all: Vec<String>,
    usage: CertUse,
) -> Option<serde_json::Value> {
    let issuer = spec.tls.issuer_ref.as_ref().filter(|_| spec.tls.enabled)?;
    let (ips, dns): (Vec<String>, Vec<String>) = all.into_iter().partition(|n| n.parse::<std::net::IpAddr>().is_ok());
    let meta = pod::meta(name.clone(), names, pod::labels(names, "tls"), owner);
    let usages = match usage {
        CertUse::Node => vec!["digital signature", "key encipherment", "server auth", "client auth"],
        CertUse::Broker => vec!["digital signature", "key encipherment", "server auth"],
    };
    let kind = match issuer.kind {
        IssuerKind::Issuer => "Issuer",
        IssuerKind::ClusterIssuer => "ClusterIssuer",
    };
    Some(serde_json::json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": meta,
        "spec": {
            "secretName": name,
            // The Secret carries the SnsCluster's labels, so it follows
            // storage.retention like the operator's own Secrets.
            "secretTemplate": {"labels": pod::labels(names, "tls")},
            "dnsNames": dns,
            "ipAddresses": ips,
            "usages": usages,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": {"name": issuer.name, "kind": kind, "group": issuer.group},
        }
    }))
}
