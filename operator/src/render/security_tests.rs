//! Tests of the security objects: how the node secret and certificates
//! reach the pods, the names the certificate carries, and what each
//! NetworkPolicy lets in, checked against the rendered pods' labels.

use super::secrets::{AMQP_CA_DIR, NODE_SECRET_KEY, SECRET_DIR, TLS_DIR};
use super::*;
use crate::fixtures::cluster;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use serde_json::json;
use std::collections::BTreeSet;

fn opts() -> RenderOptions {
    RenderOptions { default_image: "img".into() }
}

fn rendered(name: &str, spec: serde_json::Value) -> Rendered {
    render(&cluster(name, spec), &opts()).unwrap()
}

/// One pod as its StatefulSet's template makes it.
struct PodView {
    name: String,
    labels: BTreeMap<String, String>,
    spec: PodSpec,
}

fn pods(r: &Rendered) -> Vec<PodView> {
    r.children
        .iter()
        .filter_map(|c| match c {
            Child::StatefulSet(s) => Some(s),
            _ => None,
        })
        .map(|s| {
            let t = &s.spec.as_ref().unwrap().template;
            PodView {
                name: format!("{}-0", s.name_any()),
                labels: t.metadata.as_ref().unwrap().labels.clone().unwrap(),
                spec: t.spec.clone().unwrap(),
            }
        })
        .collect()
}

fn env_of(c: &Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name).map(|e| e.value.clone().unwrap_or_default())
}

fn node_containers(p: &PodView) -> Vec<&Container> {
    p.spec.containers.iter().filter(|c| c.command.as_deref() == Some(&["sns-node".to_string()])).collect()
}

#[test]
fn every_node_reads_the_node_secret_from_a_read_only_file() {
    let r = rendered("demo", json!({}));
    let mut nodes = 0;
    for pod in pods(&r) {
        let volume = pod.spec.volumes.iter().flatten().find(|v| v.name == "node-secret");
        if pod.name == "demo-rabbitmq-0" {
            assert!(volume.is_none(), "the broker does not get the node secret");
            continue;
        }
        let source = volume.and_then(|v| v.secret.as_ref()).unwrap_or_else(|| panic!("{}: no node secret", pod.name));
        assert_eq!(source.secret_name.as_deref(), Some("demo-node-secret"));
        assert_eq!(source.default_mode, Some(0o440), "owner and the node's group only");
        for c in node_containers(&pod) {
            let mount = c.volume_mounts.iter().flatten().find(|m| m.name == "node-secret").unwrap();
            assert_eq!((mount.mount_path.as_str(), mount.read_only), (SECRET_DIR, Some(true)), "{}", c.name);
            assert_eq!(env_of(c, "SNS_SECRET_FILE"), Some(format!("{SECRET_DIR}/{NODE_SECRET_KEY}")), "{}", c.name);
            assert!(env_of(c, "SNS_SECRET").is_none(), "the secret is never an environment value");
            assert!(c.args.iter().flatten().all(|a| !a.contains("secret")), "{}: {:?}", c.name, c.args);
            nodes += 1;
        }
    }
    assert_eq!(nodes, 1 + 6 * 2, "coordinator, 6 servers, 6 synchronizers");
}

#[test]
fn generated_secrets_follow_retention_not_the_owner() {
    let r = rendered("demo", json!({}));
    let names = Names::of(&cluster("demo", json!({}))).unwrap();
    let node = node_secret(&r.node_secret, "0123456789abcdef0123456789abcdef");
    let broker = broker_secret(r.broker_secret.as_ref().unwrap(), &names, "pw");
    let pem = tls::Pem { cert: "c".into(), key: "k".into() };
    for s in [&node, &broker, &tls::ca_secret(&names, &pem), &tls::node_tls_secret(&names, &pem, "ca", "sum")] {
        // An owner reference would let garbage collection take them with
        // the SnsCluster even under Retain.
        assert!(s.metadata.owner_references.is_none(), "{:?}", s.metadata.name);
        let labels = s.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_INSTANCE], "demo");
        assert_eq!(labels[LABEL_MANAGED_BY], MANAGER);
    }
    assert_eq!(node.data.unwrap()[NODE_SECRET_KEY].0, b"0123456789abcdef0123456789abcdef");
}

/// Both probes of a node container are gRPC probes of its plain-text
/// health port (`SNS_HEALTH_PORT`, a container port of its own name):
/// liveness asks for the process (""), readiness for the server's
/// "readiness" service or the process's.
fn assert_probes_on_the_health_port(c: &Container) {
    let (name, port) = match c.name.as_str() {
        "synchronizer" => (SYNC_HEALTH_PORT_NAME, SYNC_HEALTH_PORT),
        _ => (HEALTH_PORT_NAME, HEALTH_PORT),
    };
    assert_eq!(env_of(c, "SNS_HEALTH_PORT"), Some(port.to_string()), "{}", c.name);
    let declared = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
    assert_eq!(declared.map(|p| p.container_port), Some(i32::from(port)), "{}: port {name}", c.name);
    // A server, and a replicated coordinator (ready while it leads).
    let replicated = env_of(c, "SNS_KUBE_HA").is_some();
    let readiness = if c.name == "server" || replicated { "readiness" } else { "" };
    for (probe, service) in [(&c.readiness_probe, readiness), (&c.liveness_probe, "")] {
        let probe = probe.as_ref().unwrap();
        assert!(probe.tcp_socket.is_none() && probe.http_get.is_none() && probe.exec.is_none(), "{}", c.name);
        let grpc = probe.grpc.as_ref().unwrap();
        assert_eq!((grpc.port, grpc.service.as_deref()), (i32::from(port), Some(service)), "{}", c.name);
    }
}

#[test]
fn tls_mounts_and_probes_follow_the_spec() {
    // On by default, with the operator's CA.
    let r = rendered("demo", json!({}));
    assert!(matches!(r.tls, TlsPlan::Operator { .. }));
    for pod in pods(&r).iter().filter(|p| p.name != "demo-rabbitmq-0") {
        let tls = pod.spec.volumes.iter().flatten().find(|v| v.name == "tls").unwrap();
        assert_eq!(tls.secret.as_ref().unwrap().secret_name.as_deref(), Some("demo-tls"));
        for c in node_containers(pod) {
            for (var, file) in [("SNS_TLS_CERT", "tls.crt"), ("SNS_TLS_KEY", "tls.key"), ("SNS_TLS_CA", "ca.crt")] {
                assert_eq!(env_of(c, var), Some(format!("{TLS_DIR}/{file}")), "{} {var}", c.name);
            }
            let mount = c.volume_mounts.iter().flatten().find(|m| m.name == "tls").unwrap();
            assert_eq!((mount.mount_path.as_str(), mount.read_only), (TLS_DIR, Some(true)));
            // The kubelet's gRPC probe cannot speak TLS: it asks the
            // plain-text health port instead of the node's own.
            assert_probes_on_the_health_port(c);
        }
    }
    assert!(!r.children.iter().any(|c| c.kind() == "Certificate"));

    // Off: no certificate, plaintext gRPC probes.
    let r = rendered("demo", json!({"tls": {"enabled": false}}));
    assert_eq!(r.tls, TlsPlan::Off);
    for pod in pods(&r).iter().filter(|p| p.name != "demo-rabbitmq-0") {
        assert!(pod.spec.volumes.iter().flatten().all(|v| v.name != "tls"));
        for c in node_containers(pod) {
            assert!(env_of(c, "SNS_TLS_CERT").is_none() && env_of(c, "SNS_TLS_CA").is_none());
            // The same probes with TLS off.
            assert_probes_on_the_health_port(c);
        }
    }
    let yaml = to_yaml(&r, &Names::of(&cluster("demo", json!({}))).unwrap());
    assert!(!yaml.contains("demo-tls") && !yaml.contains("demo-ca"));

    // With an issuer: cert-manager writes the same Secret.
    let spec = json!({"tls": {"issuerRef": {"name": "sns-ca", "kind": "ClusterIssuer"}}});
    let r = rendered("demo", spec.clone());
    assert_eq!(r.tls, TlsPlan::CertManager);
    let cert = r
        .children
        .iter()
        .find_map(|c| match c {
            Child::Certificate(v) => Some(v.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(cert["apiVersion"], "cert-manager.io/v1");
    assert_eq!(cert["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(cert["spec"]["secretName"], "demo-tls");
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": "sns-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    assert_eq!(cert["spec"]["secretTemplate"]["labels"][LABEL_INSTANCE], "demo", "so retention finds it");
    assert_eq!(cert["spec"]["ipAddresses"], json!(["127.0.0.1"]));
    let dns: Vec<&str> = cert["spec"]["dnsNames"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let names = Names::of(&cluster("demo", json!({}))).unwrap();
    let mut expected = tls::tls_names(&names, 3);
    expected.retain(|n| n != "127.0.0.1");
    assert_eq!(dns, expected);
    let usages = cert["spec"]["usages"].as_array().unwrap();
    assert!(usages.contains(&json!("server auth")) && usages.contains(&json!("client auth")));
    let pod = pods(&r).into_iter().find(|p| p.name == "demo-coordinator-0").unwrap();
    assert_eq!(env_of(&pod.spec.containers[0], "SNS_TLS_CA"), Some(format!("{TLS_DIR}/ca.crt")));
    let yaml = to_yaml(&r, &names);
    assert!(!yaml.contains("name: demo-ca\n"), "no operator CA with an issuer");
    // A disabled TLS section ignores the issuer.
    let r = rendered("demo", json!({"tls": {"enabled": false, "issuerRef": {"name": "sns-ca"}}}));
    assert!(r.tls == TlsPlan::Off && !r.children.iter().any(|c| c.kind() == "Certificate"));
}

#[test]
fn an_external_amqps_brokers_ca_reaches_the_synchronizers_only() {
    let spec = json!({"broker": {"external": {"urlSecretRef": {"name": "amqp"}, "caSecretRef": {"name": "amqp-ca"}}}});
    let r = rendered("demo", spec);
    let pod = pods(&r).into_iter().find(|p| p.name == "demo-server-1-1-0").unwrap();
    let vol = pod.spec.volumes.iter().flatten().find(|v| v.name == "amqp-ca").unwrap().secret.clone().unwrap();
    assert_eq!(vol.secret_name.as_deref(), Some("amqp-ca"));
    let item = &vol.items.unwrap()[0];
    assert_eq!((item.key.as_str(), item.path.as_str()), ("ca.crt", "ca.crt"), "the key defaults to ca.crt");
    let c = |n: &str| pod.spec.containers.iter().find(|c| c.name == n).unwrap().clone();
    assert_eq!(env_of(&c("synchronizer"), "SNS_AMQP_CA"), Some(format!("{AMQP_CA_DIR}/ca.crt")));
    assert!(env_of(&c("server"), "SNS_AMQP_CA").is_none());
    // Without one, nothing.
    let r = rendered("demo", json!({"broker": {"external": {"urlSecretRef": {"name": "amqp"}}}}));
    let pod = pods(&r).into_iter().find(|p| p.name == "demo-server-1-1-0").unwrap();
    assert!(pod.spec.containers.iter().all(|c| env_of(c, "SNS_AMQP_CA").is_none()));
}

/// Whether `name` is covered by the certificate name `pattern` (a leading
/// `*.` stands for exactly one label, as TLS clients read it).
fn covers(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(rest) => name.split_once('.').is_some_and(|(first, tail)| !first.is_empty() && tail == rest),
        None => pattern == name,
    }
}

#[test]
fn the_certificate_names_every_address_a_node_is_dialled_by() {
    for spec in [json!({}), json!({"clusters": 12, "serversPerCluster": 1})] {
        let obj = cluster("demo", spec);
        let names = Names::of(&obj).unwrap();
        let tls_names = tls::tls_names(&names, obj.spec.clusters);
        let mut wanted =
            vec![names.coordinator(), names.coordinator_host(), "localhost".to_string(), "127.0.0.1".to_string()];
        // Every address the plan has a node advertise or dial.
        for p in plan(&obj).unwrap() {
            for w in p.args.windows(2) {
                if w[0] == "--advertise-host" || w[0] == "--coord-host" || w[0] == "-h" {
                    wanted.push(w[1].clone());
                }
            }
        }
        // And with two servers per cluster, server 2 of every cluster too
        // (scaling up needs no new certificate).
        for c in 1..=obj.spec.clusters {
            wanted.push(format!("demo-server-{c}-2-0.demo-nodes.prod.svc"));
            wanted.push(names.master(c));
            wanted.push(format!("{}.prod.svc", names.master(c)));
        }
        let host = names.coordinator_endpoint();
        let host = host.trim_start_matches("http://").rsplit_once(':').unwrap().0.to_string();
        wanted.push(host);
        assert!(wanted.len() > 8);
        for w in &wanted {
            assert!(tls_names.iter().any(|n| covers(n, w)), "{w} is not in the certificate: {tls_names:?}");
        }
        for other in ["demo-server-1-1-0.other-nodes.prod.svc", "demo-coordinator.elsewhere.svc", "evil.example"] {
            assert!(!tls_names.iter().any(|n| covers(n, other)), "{other} must not be covered");
        }
    }
}

// --- NetworkPolicies ------------------------------------------------------

fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = sel.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            op => panic!("unknown operator {op}"),
        }
    });
    by_labels && by_expressions
}

fn selected<'a>(sel: &LabelSelector, pods: &'a [PodView]) -> BTreeSet<&'a str> {
    pods.iter().filter(|p| selects(sel, &p.labels)).map(|p| p.name.as_str()).collect()
}

fn peers<'a>(from: &[NetworkPolicyPeer], pods: &'a [PodView]) -> BTreeSet<&'a str> {
    from.iter()
        .flat_map(|peer| {
            assert!(peer.namespace_selector.is_none() && peer.ip_block.is_none(), "pods of the namespace only");
            selected(peer.pod_selector.as_ref().unwrap(), pods)
        })
        .collect()
}

fn policies(r: &Rendered) -> Vec<NetworkPolicy> {
    r.children
        .iter()
        .filter_map(|c| match c {
            Child::NetworkPolicy(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn port_names(pod: &PodView) -> BTreeSet<String> {
    pod.spec.containers.iter().flat_map(|c| c.ports.iter().flatten()).filter_map(|p| p.name.clone()).collect()
}

#[test]
fn network_policies_let_in_exactly_the_intended_pods() {
    let demo = rendered("demo", json!({}));
    // Another SnsCluster in the same namespace: none of its pods may get in.
    let other = rendered("other", json!({}));
    let mut all = pods(&demo);
    all.extend(pods(&other));
    // The operator labels server pods with their role at run time; the
    // policies must not depend on it.
    for p in all.iter_mut().filter(|p| p.name.contains("-server-")) {
        p.labels.insert(LABEL_ROLE.into(), "master".into());
    }
    let demo_pods = |prefix: &str| -> BTreeSet<&str> {
        all.iter().map(|p| p.name.as_str()).filter(|n| n.starts_with(&format!("demo-{prefix}"))).collect()
    };
    let servers = demo_pods("server-");
    assert_eq!(servers.len(), 6);
    let coordinator = demo_pods("coordinator");
    let broker = demo_pods("rabbitmq");

    let policies = policies(&demo);
    let names: Vec<String> = policies.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["demo-server", "demo-coordinator", "demo-broker"]);
    for p in &policies {
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
        let targets = selected(spec.pod_selector.as_ref().unwrap(), &all);
        let rules = spec.ingress.clone().unwrap();
        // Every named port a rule opens exists on every selected pod.
        for rule in &rules {
            for port in rule.ports.iter().flatten() {
                let Some(IntOrString::String(name)) = &port.port else { panic!("ports by name") };
                for t in &targets {
                    let pod = all.iter().find(|p| p.name == *t).unwrap();
                    assert!(port_names(pod).contains(name), "{t} has no port {name}");
                }
            }
        }
        match p.name_any().as_str() {
            "demo-server" => {
                assert_eq!(targets, servers, "servers and synchronizers (one pod each)");
                assert_eq!(rules.len(), 2);
                let from = peers(rules[0].from.as_ref().unwrap(), &all);
                assert_eq!(from, servers.union(&coordinator).copied().collect(), "own nodes and the coordinator");
                assert_eq!(ports_of(&rules[0]), ["sns", "sync"]);
                assert!(rules[1].from.is_none(), "the kubelet's probes, from wherever it is");
                assert_eq!(
                    ports_of(&rules[1]),
                    [HEALTH_PORT_NAME, SYNC_HEALTH_PORT_NAME, METRICS_PORT_NAME, SYNC_METRICS_PORT_NAME]
                );
            }
            "demo-coordinator" => {
                assert_eq!(targets, coordinator);
                assert_eq!(rules.len(), 2);
                assert!(rules[0].from.is_none(), "clients from anywhere the Service lets in");
                assert_eq!(ports_of(&rules[0]), ["grpc"]);
                assert!(rules[1].from.is_none(), "the kubelet's probes, from wherever it is");
                assert_eq!(ports_of(&rules[1]), [HEALTH_PORT_NAME, METRICS_PORT_NAME]);
            }
            "demo-broker" => {
                assert_eq!(targets, broker);
                let amqp = &rules[0];
                // TLS is on by default: AMQP over TLS only.
                assert_eq!(amqp.ports.as_ref().unwrap()[0].port, Some(IntOrString::String("amqps".into())));
                let from = peers(amqp.from.as_ref().unwrap(), &all);
                assert_eq!(from, servers, "the synchronizers' pods only");
                for s in &from {
                    let pod = all.iter().find(|p| p.name == *s).unwrap();
                    assert!(pod.spec.containers.iter().any(|c| c.name == "synchronizer"));
                }
                assert_eq!(peers(rules[1].from.as_ref().unwrap(), &all), broker, "its own peers");
                assert!(rules[1].ports.is_none());
                assert_eq!(rules.len(), 2);
            }
            other => panic!("unexpected policy {other}"),
        }
    }
}

/// The port names a rule opens.
fn ports_of(rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule) -> Vec<String> {
    rule.ports
        .iter()
        .flatten()
        .map(|p| match p.port.clone().unwrap() {
            IntOrString::String(name) => name,
            IntOrString::Int(n) => panic!("port {n} by number"),
        })
        .collect()
}

#[test]
fn every_probe_port_is_let_in_from_anywhere() {
    // However the policies narrow a pod's ingress, the port each of its
    // probes asks is open to every source (the kubelet's address is not a
    // pod's), and nothing else is opened that widely but the metrics ports
    // (for a Prometheus wherever it runs) and the coordinator's client
    // port.
    let r = rendered("demo", json!({}));
    let policies = policies(&r);
    for pod in pods(&r).iter().filter(|p| p.name != "demo-rabbitmq-0") {
        let component = &pod.labels[LABEL_COMPONENT];
        let policy = policies.iter().find(|p| p.name_any() == format!("demo-{component}")).unwrap();
        let open: BTreeSet<String> = policy
            .spec
            .as_ref()
            .unwrap()
            .ingress
            .iter()
            .flatten()
            .filter(|r| r.from.is_none())
            .flat_map(ports_of)
            .collect();
        let mut probed = BTreeSet::new();
        for c in node_containers(pod) {
            for probe in [&c.readiness_probe, &c.liveness_probe] {
                let port = probe.as_ref().unwrap().grpc.as_ref().unwrap().port;
                let name = c.ports.iter().flatten().find(|p| p.container_port == port).unwrap().name.clone();
                probed.insert(name.unwrap());
            }
        }
        let mut expected = probed.clone();
        for c in node_containers(pod) {
            let env = c.env.iter().flatten().find(|e| e.name == "SNS_METRICS_PORT").expect("a metrics port");
            let port: i32 = env.value.as_deref().unwrap().parse().unwrap();
            let name = c.ports.iter().flatten().find(|p| p.container_port == port).expect("declared").name.clone();
            expected.insert(name.unwrap());
        }
        if component == "coordinator" {
            expected.insert("grpc".into());
        }
        assert_eq!(open, expected, "{}", pod.name);
    }
}

#[test]
fn network_policies_can_be_switched_off_and_skip_an_external_broker() {
    let r = rendered("demo", json!({"networkPolicy": {"enabled": false}}));
    assert!(policies(&r).is_empty());
    let r = rendered("demo", json!({"broker": {"external": {"urlSecretRef": {"name": "amqp"}}}}));
    let names: Vec<String> = policies(&r).iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["demo-server", "demo-coordinator"]);
}
