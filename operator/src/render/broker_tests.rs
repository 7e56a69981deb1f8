//! Unit tests of the managed broker's objects: one node, a cluster, and
//! the queue type every synchronizer is given.

use super::*;
use crate::fixtures::cluster;
use k8s_openapi::api::core::v1::{Container, EnvVar};

fn opts() -> RenderOptions {
    RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }
}

fn find<'a, T>(r: &'a Rendered, kind: &str, name: &str, pick: impl Fn(&'a Child) -> Option<&'a T>) -> Option<&'a T> {
    r.children.iter().filter(|c| c.kind() == kind && c.name() == name).find_map(pick)
}

fn broker_sts(r: &Rendered) -> &StatefulSet {
    find(r, "StatefulSet", "demo-rabbitmq", |c| match c {
        Child::StatefulSet(s) => Some(s),
        _ => None,
    })
    .expect("the broker's StatefulSet")
}

fn conf(r: &Rendered) -> String {
    let cm = find(r, "ConfigMap", "demo-rabbitmq-config", |c| match c {
        Child::ConfigMap(m) => Some(m),
        _ => None,
    })
    .expect("the broker's ConfigMap");
    cm.data.as_ref().unwrap()[rabbitmq_conf::CONF_KEY].clone()
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e: &&EnvVar| e.name == name).and_then(|e| e.value.clone())
}

/// The synchronizer containers of every server StatefulSet.
fn synchronizers(r: &Rendered) -> Vec<Container> {
    r.children
        .iter()
        .filter_map(|c| match c {
            Child::StatefulSet(s) if s.name_any().contains("-server-") => {
                let spec = s.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
                spec.containers.iter().find(|c| c.name == "synchronizer").cloned()
            }
            _ => None,
        })
        .collect()
}

fn queue_types(r: &Rendered) -> Vec<String> {
    let all: Vec<String> = synchronizers(r).iter().map(|c| env_value(c, "SNS_QUEUE_TYPE").unwrap()).collect();
    assert!(!all.is_empty());
    all
}

#[test]
fn a_single_broker_keeps_its_statefulset_shape() {
    let r = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
    let spec = broker_sts(&r).spec.as_ref().unwrap();
    // What a broker rendered before clusters existed had: a StatefulSet
    // refuses a change of these.
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("demo-rabbitmq"));
    assert_eq!(spec.pod_management_policy, None);
    let pod = spec.template.spec.as_ref().unwrap();
    assert!(pod.init_containers.is_none() && pod.affinity.is_none());
    let c = &pod.containers[0];
    assert_eq!(env_value(c, "RABBITMQ_NODENAME"), None, "a single broker keeps its node name (and data directory)");
    let mount = c.volume_mounts.iter().flatten().find(|m| m.name == "config").unwrap();
    assert_eq!(mount.mount_path, "/etc/rabbitmq/conf.d/90-sns.conf");
    assert_eq!(mount.sub_path.as_deref(), Some("90-sns.conf"));
    assert!(!conf(&r).contains("cluster_formation"), "{}", conf(&r));
    assert!(r.names_of("PodDisruptionBudget").iter().all(|n| n != "demo-rabbitmq"));
    assert!(!r.names_of("Service").contains(&"demo-rabbitmq-nodes".to_string()));
    assert!(r.broker_cookie.is_none(), "no cookie to share");
    assert!(queue_types(&r).iter().all(|t| t == "classic"));
}

#[test]
fn three_replicas_make_a_rabbitmq_cluster_with_quorum_queues() {
    let r = render(&cluster("demo", serde_json::json!({"broker": {"managed": {"replicas": 3}}})), &opts()).unwrap();
    let text = conf(&r);
    assert!(text.contains("cluster_formation.peer_discovery_backend = classic_config\n"), "{text}");
    for i in 0..3 {
        let line = format!(
            "cluster_formation.classic_config.nodes.{} = rabbit@demo-rabbitmq-{i}.demo-rabbitmq-nodes.prod\n",
            i + 1
        );
        assert!(text.contains(&line), "{text}");
    }
    assert!(!text.contains("nodes.4"), "{text}");
    assert!(text.contains("cluster_partition_handling = pause_minority"), "{text}");

    // The headless Service that gives those names.
    let nodes = find(&r, "Service", "demo-rabbitmq-nodes", |c| match c {
        Child::Service(s) => Some(s),
        _ => None,
    })
    .expect("a headless Service");
    let ns = nodes.spec.as_ref().unwrap();
    assert_eq!(ns.cluster_ip.as_deref(), Some("None"));
    assert_eq!(ns.publish_not_ready_addresses, Some(true));
    let ports: Vec<i32> = ns.ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [4369, 25672]);

    let sts = broker_sts(&r);
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("demo-rabbitmq-nodes"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let pod_labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(ns.selector.as_ref().unwrap(), &pod::selector_of(&pod_labels));
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        env_value(c, "RABBITMQ_NODENAME").as_deref(),
        Some("rabbit@$(POD_NAME).demo-rabbitmq-nodes.prod"),
        "each node named as the peer list names it"
    );
    let pod_name = c.env.iter().flatten().position(|e| e.name == "POD_NAME").unwrap();
    let node_name = c.env.iter().flatten().position(|e| e.name == "RABBITMQ_NODENAME").unwrap();
    assert!(pod_name < node_name, "$(POD_NAME) expands only after its definition");
    assert_eq!(env_value(c, "RABBITMQ_USE_LONGNAME").as_deref(), Some("true"));
    // The shared cookie, copied where Erlang wants it, owner-only.
    let init = &pod.init_containers.as_ref().unwrap()[0];
    let script = init.args.as_ref().unwrap()[0].clone();
    assert!(script.contains("cp /etc/sns/rabbitmq-cookie/cookie /var/lib/rabbitmq/.erlang.cookie"), "{script}");
    assert!(script.contains("chmod 400 /var/lib/rabbitmq/.erlang.cookie"), "{script}");
    let cookie_volume = pod.volumes.iter().flatten().find(|v| v.name == "erlang-cookie").unwrap();
    assert_eq!(cookie_volume.secret.as_ref().unwrap().secret_name.as_deref(), Some("demo-rabbitmq-erlang-cookie"));
    // Spread over machines.
    let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
    let term = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0].pod_affinity_term;
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    assert_eq!(term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap(), &pod::selector_of(&pod_labels));

    // At most one node down by choice.
    let pdb = find(&r, "PodDisruptionBudget", "demo-rabbitmq", |c| match c {
        Child::Pdb(p) => Some(p),
        _ => None,
    })
    .expect("a PodDisruptionBudget for the broker");
    let pdb = pdb.spec.as_ref().unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(pdb.selector.as_ref().unwrap().match_labels.as_ref().unwrap(), &pod::selector_of(&pod_labels));

    // The cookie: generated once, no owner (it follows storage.retention).
    let cookie = r.broker_cookie.as_ref().expect("a cookie Secret");
    assert_eq!(cookie.metadata.name.as_deref(), Some("demo-rabbitmq-erlang-cookie"));
    assert!(cookie.metadata.owner_references.is_none());
    assert_eq!(cookie.metadata.labels.as_ref().unwrap()[LABEL_INSTANCE], "demo");
    let filled = cookie_secret(cookie, "abc");
    assert_eq!(filled.data.unwrap()["cookie"].0, b"abc");

    // The synchronizers declare quorum queues, through the client Service.
    assert!(queue_types(&r).iter().all(|t| t == "quorum"));
}

#[test]
fn the_queue_type_given_wins_over_the_default() {
    let classic = cluster("demo", serde_json::json!({"broker": {"managed": {"replicas": 3}, "queueType": "classic"}}));
    assert!(queue_types(&render(&classic, &opts()).unwrap()).iter().all(|t| t == "classic"));
    let external = cluster(
        "demo",
        serde_json::json!({"broker": {"external": {"urlSecretRef": {"name": "amqp"}}, "queueType": "quorum"}}),
    );
    assert!(queue_types(&render(&external, &opts()).unwrap()).iter().all(|t| t == "quorum"));
    let plain = cluster("demo", serde_json::json!({"broker": {"external": {"urlSecretRef": {"name": "amqp"}}}}));
    assert!(queue_types(&render(&plain, &opts()).unwrap()).iter().all(|t| t == "classic"));
}

#[test]
fn a_config_change_rolls_the_broker() {
    let one = render(&cluster("demo", serde_json::json!({"broker": {"managed": {"replicas": 3}}})), &opts()).unwrap();
    let five = render(&cluster("demo", serde_json::json!({"broker": {"managed": {"replicas": 5}}})), &opts()).unwrap();
    let hash =
        |r: &Rendered| broker_sts(r).spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.clone();
    assert_ne!(hash(&one), hash(&five), "the template carries the config's checksum");
}

fn broker_container(r: &Rendered) -> Container {
    broker_sts(r).spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].clone()
}

fn port_names(c: &Container) -> Vec<(String, i32)> {
    c.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.container_port)).collect()
}

fn broker_policy_ports(r: &Rendered) -> Vec<IntOrString> {
    let p = find(r, "NetworkPolicy", "demo-broker", |c| match c {
        Child::NetworkPolicy(p) => Some(p),
        _ => None,
    })
    .unwrap();
    let rules = p.spec.as_ref().unwrap().ingress.clone().unwrap();
    rules[0].ports.iter().flatten().filter_map(|p| p.port.clone()).collect()
}

#[test]
fn with_tls_the_broker_serves_amqps_alone_and_the_synchronizers_dial_it() {
    let r = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
    let text = conf(&r);
    for line in [
        "listeners.tcp = none",
        "listeners.ssl.default = 5671",
        "ssl_options.cacertfile = /etc/rabbitmq/tls/ca.crt",
        "ssl_options.certfile = /etc/rabbitmq/tls/tls.crt",
        "ssl_options.keyfile = /etc/rabbitmq/tls/tls.key",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
    }
    // The files it names are where the broker's own certificate is.
    let b = broker_container(&r);
    let mount = b.volume_mounts.iter().flatten().find(|m| m.name == "tls").unwrap();
    assert_eq!(mount.mount_path, rabbitmq_conf::TLS_DIR);
    let pod = broker_sts(&r).spec.as_ref().unwrap().template.spec.clone().unwrap();
    let vol = pod.volumes.iter().flatten().find(|v| v.name == "tls").unwrap().secret.clone().unwrap();
    assert_eq!(vol.secret_name.as_deref(), Some("demo-rabbitmq-tls"));
    assert_eq!(port_names(&b), [("amqps".to_string(), 5671), ("management".to_string(), 15672)]);
    for probe in [b.readiness_probe.as_ref().unwrap(), b.liveness_probe.as_ref().unwrap()] {
        assert_eq!(probe.tcp_socket.as_ref().unwrap().port, IntOrString::String("amqps".into()));
    }
    let svc = find(&r, "Service", "demo-rabbitmq", |c| match c {
        Child::Service(s) => Some(s),
        _ => None,
    })
    .unwrap();
    let ports: Vec<(String, i32)> =
        svc.spec.as_ref().unwrap().ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.port)).collect();
    assert_eq!(ports, [("amqps".to_string(), 5671), ("management".to_string(), 15672)]);
    // The operator issues it for the client Service the synchronizers dial.
    let TlsPlan::Operator { broker: Some(broker_names), .. } = &r.tls else { panic!("{:?}", r.tls) };
    assert!(broker_names.contains(&"demo-rabbitmq.prod.svc".to_string()), "{broker_names:?}");
    assert!(broker_names.contains(&"*.demo-rabbitmq-nodes.prod.svc".to_string()), "{broker_names:?}");

    for s in synchronizers(&r) {
        let env = s.env.clone().unwrap();
        let at = |n: &str| env.iter().position(|e| e.name == n).unwrap_or_else(|| panic!("no {n}"));
        assert_eq!(
            env_value(&s, "AMQP_URL").as_deref(),
            Some("amqps://sns:$(AMQP_PASSWORD)@demo-rabbitmq.prod.svc:5671/%2f")
        );
        assert!(at("AMQP_PASSWORD") < at("AMQP_URL"), "$(AMQP_PASSWORD) expands only after its definition");
        let sel = env[at("AMQP_PASSWORD")].value_from.clone().unwrap().secret_key_ref.unwrap();
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("demo-rabbitmq-credentials", "password"));
        // The CA that signed the broker's certificate, mounted with the
        // node certificate.
        assert_eq!(env_value(&s, "SNS_AMQP_CA").as_deref(), Some("/etc/sns/tls/ca.crt"));
        assert!(s.volume_mounts.iter().flatten().any(|m| m.mount_path == "/etc/sns/tls"));
    }
    assert_eq!(broker_policy_ports(&r), [IntOrString::String("amqps".into())]);
}

#[test]
fn without_tls_the_broker_serves_plain_amqp() {
    let r = render(&cluster("demo", serde_json::json!({"tls": {"enabled": false}})), &opts()).unwrap();
    assert!(!conf(&r).contains("listeners"), "{}", conf(&r));
    let b = broker_container(&r);
    assert_eq!(port_names(&b), [("amqp".to_string(), 5672), ("management".to_string(), 15672)]);
    assert!(b.volume_mounts.iter().flatten().all(|m| m.name != "tls"));
    for s in synchronizers(&r) {
        assert_eq!(
            env_value(&s, "AMQP_URL").as_deref(),
            Some("amqp://sns:$(AMQP_PASSWORD)@demo-rabbitmq.prod.svc:5672/%2f")
        );
        assert_eq!(env_value(&s, "SNS_AMQP_CA"), None);
    }
    assert_eq!(broker_policy_ports(&r), [IntOrString::String("amqp".into())]);
    assert_eq!(r.tls, TlsPlan::Off);
}

#[test]
fn with_an_issuer_cert_manager_issues_the_brokers_certificate_too() {
    let spec = serde_json::json!({"tls": {"issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}});
    let r = render(&cluster("demo", spec), &opts()).unwrap();
    let cert = r
        .children
        .iter()
        .find_map(|c| match c {
            Child::Certificate(v) if v["metadata"]["name"] == "demo-rabbitmq-tls" => Some(v.clone()),
            _ => None,
        })
        .expect("a Certificate for the broker");
    assert_eq!(cert["spec"]["secretName"], "demo-rabbitmq-tls");
    assert_eq!(cert["spec"]["issuerRef"]["name"], "ca");
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    let dns: Vec<&str> = cert["spec"]["dnsNames"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(dns.contains(&"demo-rabbitmq.prod.svc"), "{dns:?}");
    let usages = cert["spec"]["usages"].as_array().unwrap();
    assert!(usages.contains(&serde_json::json!("server auth")) && !usages.contains(&serde_json::json!("client auth")));
    // An external broker: no broker certificate.
    let ext = serde_json::json!({"tls": {"issuerRef": {"name": "ca"}}, "broker": {"external": {"urlSecretRef": {"name": "a"}}}});
    let r = render(&cluster("demo", ext), &opts()).unwrap();
    assert_eq!(r.names_of("Certificate"), ["demo-tls"]);
}

#[test]
fn the_brokers_certificate_is_signed_by_the_deployments_ca_for_server_use() {
    let names = Names::of(&cluster("demo", serde_json::json!({}))).unwrap();
    let ca = tls::new_ca(&names).unwrap();
    let cert = tls::issue_cert(&names, &tls::broker_tls_names(&names), &ca, tls::CertUse::Broker).unwrap();
    let node = tls::issue_cert(&names, &tls::broker_tls_names(&names), &ca, tls::CertUse::Node).unwrap();
    // serverAuth is 1.3.6.1.5.5.7.3.1, clientAuth 1.3.6.1.5.5.7.3.2: in DER
    // the last bytes 03 01 and 03 02 after the common prefix.
    let der = |pem: &str| {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        // ByteString is base64 in JSON, as a PEM body is.
        serde_json::from_value::<k8s_openapi::ByteString>(serde_json::json!(b64)).unwrap().0
    };
    let has = |der: &[u8], last: u8| der.windows(8).any(|w| w == [0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, last]);
    assert!(has(&der(&cert.cert), 1) && !has(&der(&cert.cert), 2), "server auth only");
    assert!(has(&der(&node.cert), 1) && has(&der(&node.cert), 2), "a node's is both");
}
