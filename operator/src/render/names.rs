//! Names of an SnsCluster's children, and the deployment's broker prefix.

use super::{LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGER, SERVICE_PORT};
use crate::crd::SnsCluster;
use crate::error::{Error, Result};
use kube::ResourceExt;

/// Names of one SnsCluster's children.
#[derive(Debug, Clone)]
pub struct Names {
    pub instance: String,
    pub namespace: String,
}

impl Names {
    pub fn of(obj: &SnsCluster) -> Result<Names> {
        let instance = obj.name_any();
        let namespace = obj.namespace().ok_or(Error::MissingNamespace)?;
        Ok(Names { instance, namespace })
    }
    /// The coordinator's StatefulSet and Service.
    pub fn coordinator(&self) -> String {
        format!("{}-coordinator", self.instance)
    }
    /// A replicated coordinator's Lease (its replicas' `SNS_KUBE_HA`), and
    /// the name of its ServiceAccount, Role and RoleBinding.
    pub fn coordinator_lease(&self) -> String {
        self.coordinator()
    }
    /// The ConfigMap holding a replicated coordinator's records (the
    /// default `--kube-records` of its lease).
    pub fn coordinator_records(&self) -> String {
        format!("{}-records", self.coordinator_lease())
    }
    /// The PVC of the coordinator (from the `data` volumeClaimTemplate).
    pub fn coordinator_pvc(&self) -> String {
        format!("data-{}-0", self.coordinator())
    }
    pub fn nodes(&self) -> String {
        format!("{}-nodes", self.instance)
    }
    pub fn server(&self, cluster: u32, server: u32) -> String {
        format!("{}-server-{cluster}-{server}", self.instance)
    }
    /// The pod of a server's StatefulSet.
    pub fn server_pod(&self, cluster: u32, server: u32) -> String {
        format!("{}-0", self.server(cluster, server))
    }
    /// The PVC of a server (from the `data` volumeClaimTemplate).
    pub fn server_pvc(&self, cluster: u32, server: u32) -> String {
        format!("data-{}", self.server_pod(cluster, server))
    }
    pub fn master(&self, cluster: u32) -> String {
        format!("{}-master-{cluster}", self.instance)
    }
    pub fn pdb(&self, cluster: u32) -> String {
        format!("{}-cluster-{cluster}", self.instance)
    }
    pub fn config(&self) -> String {
        format!("{}-config", self.instance)
    }
    pub fn rabbitmq(&self) -> String {
        format!("{}-rabbitmq", self.instance)
    }
    pub fn rabbitmq_secret(&self) -> String {
        format!("{}-rabbitmq-credentials", self.instance)
    }
    /// The managed broker's headless Service, which gives a broker
    /// cluster's pods their stable DNS names (a single broker keeps the
    /// client Service as its StatefulSet's, which cannot change).
    pub fn rabbitmq_nodes(&self) -> String {
        format!("{}-rabbitmq-nodes", self.instance)
    }
    /// The Erlang cookie a broker cluster's nodes share.
    pub fn rabbitmq_cookie(&self) -> String {
        format!("{}-rabbitmq-erlang-cookie", self.instance)
    }
    /// The managed broker's `rabbitmq.conf` additions.
    pub fn rabbitmq_config(&self) -> String {
        format!("{}-rabbitmq-config", self.instance)
    }
    /// The client Service's DNS name, which the synchronizers dial.
    pub fn rabbitmq_host(&self) -> String {
        format!("{}.{}.svc", self.rabbitmq(), self.namespace)
    }
    /// The Erlang node name of broker pod `ordinal` in a broker cluster:
    /// its DNS name through the headless Service, namespace-relative as
    /// RabbitMQ's cluster operator names them (resolved through the pods'
    /// DNS search path, so no cluster domain is assumed).
    pub fn rabbitmq_node(&self, ordinal: u32) -> String {
        format!("rabbit@{}-{ordinal}.{}.{}", self.rabbitmq(), self.rabbitmq_nodes(), self.namespace)
    }
    /// The deployment's node secret (the token and event MACs derive from it).
    pub fn node_secret(&self) -> String {
        format!("{}-node-secret", self.instance)
    }
    /// The node certificate, its key and the CA (`tls.crt`, `tls.key`,
    /// `ca.crt`): made by the operator, or by cert-manager.
    pub fn tls_secret(&self) -> String {
        format!("{}-tls", self.instance)
    }
    /// The managed broker's certificate, its key and the CA, in the node
    /// certificate's layout: a certificate of its own, since the broker is
    /// not one of the nodes (see README, Security).
    pub fn rabbitmq_tls_secret(&self) -> String {
        format!("{}-rabbitmq-tls", self.instance)
    }
    /// The operator-made CA's certificate and key (never mounted in a pod).
    pub fn ca_secret(&self) -> String {
        format!("{}-ca", self.instance)
    }
    /// The NetworkPolicy of the pods named by `component`.
    pub fn network_policy(&self, component: &str) -> String {
        format!("{}-{component}", self.instance)
    }
    /// The coordinator Service's DNS name in the cluster, which the
    /// operator dials and the node certificate names.
    pub fn coordinator_host(&self) -> String {
        format!("{}.{}.svc", self.coordinator(), self.namespace)
    }
    /// In-cluster address of the coordinator, for the operator itself.
    pub fn coordinator_endpoint(&self) -> String {
        format!("http://{}.{}.svc:{SERVICE_PORT}", self.coordinator(), self.namespace)
    }
    /// The plan's advertise-host template: `{pod}` becomes `server-<c>-<s>`,
    /// giving the server pod's stable DNS name through the headless Service.
    pub fn advertise_template(&self) -> String {
        format!("{}-{{pod}}-0.{}.{}.svc", self.instance, self.nodes(), self.namespace)
    }
    /// Prefix of the deployment's broker objects: unique per namespace and
    /// name, in the alphabet `sns-node` accepts (letters, digits, '-', '_';
    /// at most 64).
    pub fn deployment(&self) -> String {
        deployment_name(&self.namespace, &self.instance)
    }
    pub fn selector(&self) -> String {
        format!("{LABEL_INSTANCE}={},{LABEL_MANAGED_BY}={MANAGER}", self.instance)
    }
    pub fn server_selector(&self) -> String {
        format!("{},{LABEL_COMPONENT}=server", self.selector())
    }
}

pub fn deployment_name(namespace: &str, name: &str) -> String {
    let raw = format!("{namespace}-{name}");
    let clean: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    if clean.len() <= 64 {
        return clean;
    }
    // Keep it unique when cut: a hash of the full name replaces the tail.
    format!("{}-{:08x}", &clean[..55], fnv1a(raw.as_bytes()) as u32)
}

/// FNV-1a: a stable hash for names and config checksums (not security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
