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
