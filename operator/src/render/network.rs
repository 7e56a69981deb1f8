//! NetworkPolicies of an SnsCluster (ingress only): who may open a
//! connection to which of its pods.
//!
//! - servers and synchronizers (one pod per server): from the deployment's
//!   own node pods (the coordinator and the other servers/synchronizers),
//!   on their named ports `sns` and `sync`;
//! - the coordinator: from anywhere on `grpc`, as far as its Service lets
//!   traffic in (clients, the gateway, the operator's admin calls);
//! - the managed broker: AMQP (its TLS port `amqps` with TLS on, else
//!   `amqp`) from the synchronizers only (they share the server pods), and
//!   anything from its own peers (a broker cluster's nodes);
//! - the plain-text health and metrics ports of the coordinator and the
//!   server pods (the metrics ports for a Prometheus wherever it runs);
//! - the plain-text health ports of the coordinator and the server pods
//!   (`health`, and `sync-health` for a server pod's synchronizer): from
//!   anywhere, since they answer the kubelet's gRPC probes, which come from
//!   the node's own address (most CNIs never apply a NetworkPolicy to
//!   them, some do). They serve the health service and nothing else.
//!
//! Selectors are label selectors without a namespace selector, so they
//! match pods of the SnsCluster's namespace only. `kubectl port-forward`
//! does not cross the pod network and is unaffected.

use super::pod::{labels, meta, selector_of};
use super::{
    HEALTH_PORT_NAME, LABEL_COMPONENT, METRICS_PORT_NAME, Names, SYNC_HEALTH_PORT_NAME, SYNC_METRICS_PORT_NAME,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

fn select(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector { match_labels: Some(labels), ..Default::default() }
}

/// The pods of this SnsCluster whose component is one of `components`.
fn components(names: &Names, components: &[&str]) -> NetworkPolicyPeer {
    let mut sel = selector_of(&labels(names, "any"));
    sel.remove(LABEL_COMPONENT);
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(sel),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: LABEL_COMPONENT.into(),
                operator: "In".into(),
                values: Some(components.iter().map(|c| c.to_string()).collect()),
            }]),
        }),
        ..Default::default()
    }
}

fn port(name: &str) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn policy(
    names: &Names,
    component: &str,
    owner: &OwnerReference,
    ingress: Vec<NetworkPolicyIngressRule>,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(names.network_policy(component), names, labels(names, component), owner),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(select(selector_of(&labels(names, component)))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    }
}

/// The SnsCluster's NetworkPolicies; the broker's only when it is managed,
/// `broker_port` naming its AMQP port (`amqps` with TLS on, `amqp` off).
pub(super) fn render_network_policies(
    names: &Names,
    broker_port: Option<&str>,
    owner: &OwnerReference,
) -> Vec<NetworkPolicy> {
    let nodes = NetworkPolicyIngressRule {
        from: Some(vec![components(names, &["coordinator", "server"])]),
        ports: Some(vec![port("sns"), port("sync")]),
    };
    let clients = NetworkPolicyIngressRule { from: None, ports: Some(vec![port("grpc")]) };
    // The kubelet's probes, from wherever the kubelet is.
    let probes =
        |ports: &[&str]| NetworkPolicyIngressRule { from: None, ports: Some(ports.iter().map(|p| port(p)).collect()) };
    // And the metrics ports, for a Prometheus wherever it runs: read-only
    // counters, no user data, no credentials.
    let mut v = vec![
        policy(
            names,
            "server",
            owner,
            vec![nodes, probes(&[HEALTH_PORT_NAME, SYNC_HEALTH_PORT_NAME, METRICS_PORT_NAME, SYNC_METRICS_PORT_NAME])],
        ),
        policy(names, "coordinator", owner, vec![clients, probes(&[HEALTH_PORT_NAME, METRICS_PORT_NAME])]),
    ];
    if let Some(amqp) = broker_port {
        let synchronizers = NetworkPolicyIngressRule {
            from: Some(vec![components(names, &["server"])]),
            ports: Some(vec![port(amqp)]),
        };
        let peers = NetworkPolicyIngressRule { from: Some(vec![components(names, &["broker"])]), ports: None };
        v.push(policy(names, "broker", owner, vec![synchronizers, peers]));
    }
    v
}
