//! Unit tests of the rendered objects.

use super::*;
use crate::crd::{ExternalBroker, SecretKeyRef};
use crate::fixtures::cluster;
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

fn opts() -> RenderOptions {
    RenderOptions { default_image: "ghcr.io/example/tiny-sns:test".into() }
}

fn statefulsets(r: &Rendered) -> Vec<&StatefulSet> {
    r.children
        .iter()
        .filter_map(|c| match c {
            Child::StatefulSet(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn sts<'a>(r: &'a Rendered, name: &str) -> &'a StatefulSet {
    statefulsets(r).into_iter().find(|s| s.name_any() == name).unwrap_or_else(|| panic!("no StatefulSet {name}"))
}

fn service<'a>(r: &'a Rendered, name: &str) -> &'a Service {
    r.children
        .iter()
        .find_map(|c| match c {
            Child::Service(s) if s.name_any() == name => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Service {name}"))
}

fn template(s: &StatefulSet) -> &PodTemplateSpec {
    &s.spec.as_ref().unwrap().template
}

/// The port of a probe: a gRPC probe, whatever the TLS setting (the
/// kubelet asks the node's plain-text health port).
fn probe_port(p: &k8s_openapi::api::core::v1::Probe) -> i32 {
    assert!(p.tcp_socket.is_none() && p.http_get.is_none() && p.exec.is_none(), "one probe kind: {p:?}");
    p.grpc.as_ref().expect("a gRPC probe").port
}

fn container<'a>(t: &'a PodTemplateSpec, name: &str) -> &'a Container {
    t.spec.as_ref().unwrap().containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn default_spec_renders_the_course_topology() {
    let obj = cluster("demo", serde_json::json!({}));
    let r = render(&obj, &opts()).unwrap();
    let kinds: Vec<String> = r.children.iter().map(|c| format!("{}/{}", c.kind(), c.name())).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap/demo-config",
            "NetworkPolicy/demo-server",
            "NetworkPolicy/demo-coordinator",
            "NetworkPolicy/demo-broker",
            "Service/demo-coordinator",
            "Service/demo-nodes",
            "Service/demo-master-1",
            "Service/demo-master-2",
            "Service/demo-master-3",
            "ConfigMap/demo-rabbitmq-config",
            "Service/demo-rabbitmq",
            "StatefulSet/demo-rabbitmq",
            "ServiceAccount/demo-coordinator",
            "Role/demo-coordinator",
            "RoleBinding/demo-coordinator",
            "StatefulSet/demo-coordinator",
            "StatefulSet/demo-server-1-1",
            "StatefulSet/demo-server-1-2",
            "StatefulSet/demo-server-2-1",
            "StatefulSet/demo-server-2-2",
            "StatefulSet/demo-server-3-1",
            "StatefulSet/demo-server-3-2",
            "PodDisruptionBudget/demo-cluster-1",
            "PodDisruptionBudget/demo-cluster-2",
            "PodDisruptionBudget/demo-cluster-3",
        ]
    );
    for c in &r.children {
        let v = c.to_json();
        assert_eq!(v["metadata"]["namespace"], "prod", "{}", c.name());
        let owners = v["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0]["kind"], "SnsCluster");
        assert_eq!(owners[0]["uid"], "uid-1");
        assert_eq!(owners[0]["controller"], true);
        assert_eq!(v["metadata"]["labels"][LABEL_INSTANCE], "demo");
        assert_eq!(v["metadata"]["labels"][LABEL_MANAGED_BY], MANAGER);
        assert!(v["apiVersion"].is_string() && v["kind"].is_string());
    }
    assert!(r.broker_secret.is_some());
}

#[test]
fn server_and_synchronizer_run_exactly_the_plans_command_lines() {
    let obj = cluster(
        "demo",
        serde_json::json!({
            "heartbeat": {"intervalMillis": 1000},
            "diskStallLimitMillis": 20000,
            "commitDelayMillis": 2,
            "resendAfterMillis": 15000,
            "compactAtBytes": 1048576
        }),
    );
    let r = render(&obj, &opts()).unwrap();
    let procs = plan(&obj).unwrap();
    let mut checked = 0;
    for p in &procs {
        let (sts_name, container_name, pod) = match p.role {
            Role::Coordinator => continue,
            Role::Server { cluster, id } => {
                (format!("demo-server-{cluster}-{id}"), "server", format!("server-{cluster}-{id}"))
            }
            Role::Synchronizer { cluster, server, .. } => {
                (format!("demo-server-{cluster}-{server}"), "synchronizer", format!("server-{cluster}-{server}"))
            }
        };
        let c = container(template(sts(&r, &sts_name)), container_name);
        let args = c.args.as_ref().unwrap();
        assert_eq!(&args[..p.args.len()], &p.args[..], "{}", p.name);
        assert_eq!(&args[p.args.len()..], ["--coord-port", "9000"]);
        assert_eq!(c.command.as_ref().unwrap(), &["sns-node"]);
        let dns = format!("demo-{pod}-0.demo-nodes.prod.svc");
        assert!(
            args.windows(2).any(|w| w[0] == "--advertise-host" && w[1] == dns),
            "{}: advertises {dns}: {args:?}",
            p.name
        );
        assert!(args.iter().all(|a| !a.contains('{')), "{args:?}");
        let stall = args.windows(2).any(|w| w == ["--disk-stall-limit", "20000ms"]);
        assert_eq!(stall, container_name == "server", "only servers journal: {args:?}");
        let compact = args.windows(2).any(|w| w == ["--compact-at", "1048576"]);
        assert_eq!(compact, container_name == "server", "only servers compact a journal: {args:?}");
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, i32::from(p.port));
        // Probed on its plain-text health port, a port of its own beside
        // the node's (the two containers share the pod's network).
        let health = if container_name == "synchronizer" { SYNC_HEALTH_PORT } else { HEALTH_PORT };
        assert_eq!(c.ports.as_ref().unwrap()[1].container_port, i32::from(health));
        assert_eq!(probe_port(c.readiness_probe.as_ref().unwrap()), i32::from(health));
        assert_eq!(probe_port(c.liveness_probe.as_ref().unwrap()), i32::from(health));
        checked += 1;
    }
    assert_eq!(checked, 12);
    let coord = sts(&r, "demo-coordinator");
    let args = container(template(coord), "coordinator").args.clone().unwrap();
    let mut expected = procs[0].args.clone();
    expected.push("--gateway".into());
    assert_eq!(args, expected);
    assert!(args.windows(2).any(|w| w == ["--heartbeat-interval", "1000ms"]));
    assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
}

#[test]
fn coordinator_keeps_its_records_on_its_own_claim() {
    let obj = cluster(
        "demo",
        serde_json::json!({
            "storage": {"size": "5Gi", "storageClassName": "fast", "retention": "Delete"},
            "coordinator": {"storageSize": "256Mi", "replicas": 1},
        }),
    );
    let r = render(&obj, &opts()).unwrap();
    assert!(r.children.iter().all(|c| c.kind() != "Deployment"), "the coordinator is no Deployment any more");
    let s = sts(&r, "demo-coordinator");
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(spec.update_strategy.as_ref().unwrap().type_.as_deref(), Some("RollingUpdate"));
    let policy = spec.persistent_volume_claim_retention_policy.as_ref().unwrap();
    assert_eq!(policy.when_deleted.as_deref(), Some("Delete"));

    // The claim: its own size, the servers' class, labels the cleanup's
    // selector finds.
    let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(pvc.metadata.name.as_deref(), Some("data"));
    let pvc_spec = pvc.spec.as_ref().unwrap();
    assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(pvc_spec.access_modes.as_ref().unwrap(), &["ReadWriteOnce"]);
    assert_eq!(pvc_spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"], Quantity("256Mi".into()));
    let names = Names::of(&obj).unwrap();
    let pvc_labels = pvc.metadata.labels.as_ref().unwrap();
    for term in names.selector().split(',') {
        let (k, v) = term.split_once('=').unwrap();
        assert_eq!(pvc_labels.get(k).map(String::as_str), Some(v), "{term}");
    }
    assert_eq!(names.coordinator_pvc(), "data-demo-coordinator-0");

    // Mounted writable at /data, where --data-dir points, by a locked
    // down non-root pod whose fsGroup owns the volume.
    let t = template(s);
    let c = container(t, "coordinator");
    let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "data").unwrap();
    assert_eq!(mount.mount_path, DATA_ROOT);
    assert_ne!(mount.read_only, Some(true));
    let args = c.args.as_ref().unwrap();
    assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/coordinator"]), "{args:?}");
    assert!(args.contains(&"--gateway".to_string()));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
    let pod = t.spec.as_ref().unwrap();
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(
        (psc.run_as_non_root, psc.run_as_user, psc.fs_group),
        (Some(true), Some(RUN_AS_USER), Some(RUN_AS_USER))
    );
    assert_eq!(pod.automount_service_account_token, Some(false));
    let readiness = c.readiness_probe.as_ref().unwrap();
    assert_eq!(probe_port(readiness), i32::from(HEALTH_PORT));
    assert_eq!(probe_port(c.liveness_probe.as_ref().unwrap()), i32::from(HEALTH_PORT));
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, i32::from(BASE_PORT));
    let annotations = t.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
    assert!(annotations.contains_key(CONFIG_HASH));

    // The Service the clients port-forward to selects this pod.
    let svc = service(&r, "demo-coordinator").spec.clone().unwrap();
    let pod_labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert!(svc.selector.unwrap().iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(spec.selector.match_labels.as_ref().unwrap(), &selector_of(pod_labels));

    // Without a size given, 1Gi.
    let r = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
    let pvc = &sts(&r, "demo-coordinator").spec.as_ref().unwrap().volume_claim_templates.as_ref().unwrap()[0];
    let requests = pvc.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.clone().unwrap();
    assert_eq!(requests["storage"], Quantity("1Gi".into()));
    assert_eq!(pvc.spec.as_ref().unwrap().storage_class_name, None);
}

#[test]
fn one_coordinator_replica_renders_none_of_the_replicated_objects() {
    let r = render(&cluster("demo", serde_json::json!({"coordinator": {"replicas": 1}})), &opts()).unwrap();
    for kind in ["ServiceAccount", "Role", "RoleBinding"] {
        assert!(r.names_of(kind).is_empty(), "{kind}");
    }
    assert_eq!(r.names_of("PodDisruptionBudget"), ["demo-cluster-1", "demo-cluster-2", "demo-cluster-3"]);
    let s = sts(&r, "demo-coordinator");
    let pod = template(s).spec.as_ref().unwrap();
    assert_eq!((pod.service_account_name.as_deref(), pod.automount_service_account_token), (None, Some(false)));
    assert!(pod.affinity.is_none());
    let c = container(template(s), "coordinator");
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert!(!env.iter().any(|e| ["SNS_KUBE_HA", "POD_NAME", "POD_NAMESPACE"].contains(e)), "{env:?}");
    assert_eq!(c.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap().service.as_deref(), Some(""));
}

#[test]
fn a_replicated_coordinator_gets_its_lease_its_records_and_only_its_own_token() {
    let obj = cluster("demo", serde_json::json!({"coordinator": {"replicas": 3}}));
    let r = render(&obj, &opts()).unwrap();
    let s = sts(&r, "demo-coordinator");
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    // Each replica keeps its claim (pod 0's holds a former single
    // coordinator's records, imported once).
    assert_eq!(spec.volume_claim_templates.as_ref().unwrap().len(), 1);

    let t = template(s);
    let pod = t.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("demo-coordinator"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    // Spread over nodes where there are several, one node still enough.
    let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
    assert!(anti.required_during_scheduling_ignored_during_execution.is_none());
    let preferred = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0];
    assert_eq!(preferred.pod_affinity_term.topology_key, "kubernetes.io/hostname");
    let pod_labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    let sel = preferred.pod_affinity_term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
    assert_eq!(sel, &selector_of(pod_labels));
    // Every other pod keeps no token.
    for other in statefulsets(&r).into_iter().filter(|o| o.name_any() != "demo-coordinator") {
        let p = template(other).spec.as_ref().unwrap();
        assert_eq!(p.automount_service_account_token, Some(false), "{}", other.name_any());
        assert_eq!(p.service_account_name, None, "{}", other.name_any());
    }

    // The Lease and identity through the environment (downward API).
    let c = container(t, "coordinator");
    let env = |name: &str| c.env.iter().flatten().find(|e| e.name == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(env("SNS_KUBE_HA").value.as_deref(), Some("demo-coordinator"));
    for (name, path) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        let field = env(name).value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, path);
    }
    // Ready while leading: the Service reaches the leader alone.
    let readiness = c.readiness_probe.as_ref().unwrap();
    assert_eq!(probe_port(readiness), i32::from(HEALTH_PORT));
    assert_eq!(readiness.grpc.as_ref().unwrap().service.as_deref(), Some(sns_node::coordinator::ha::READINESS));
    assert_eq!(c.liveness_probe.as_ref().unwrap().grpc.as_ref().unwrap().service.as_deref(), Some(""));
    let svc = service(&r, "demo-coordinator").spec.clone().unwrap();
    assert_eq!(svc.publish_not_ready_addresses, None, "not-ready standbys get no traffic");
    // The nodes dial the coordinator through that Service.
    let coord_host = plan(&obj)
        .unwrap()
        .into_iter()
        .find_map(|p| p.args.windows(2).find(|w| w[0] == "--coord-host").map(|w| w[1].clone()));
    assert!(coord_host.as_ref().is_none_or(|h| h == "demo-coordinator"), "{coord_host:?}");
    assert_eq!(plan_options(&Names::of(&obj).unwrap()).coord_host, "demo-coordinator");

    // The API access: exactly the Lease and the records ConfigMap.
    let names = Names::of(&obj).unwrap();
    assert_eq!(names.coordinator_records(), "demo-coordinator-records");
    let role = r
        .children
        .iter()
        .find_map(|c| match c {
            Child::Role(o) => Some(o),
            _ => None,
        })
        .unwrap();
    let rules = serde_json::to_value(role.rules.as_ref().unwrap()).unwrap();
    assert_eq!(
        rules,
        serde_json::json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["demo-coordinator"], "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["demo-coordinator-records"], "verbs": ["get", "update"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
        ])
    );
    let binding = r
        .children
        .iter()
        .find_map(|c| match c {
            Child::RoleBinding(o) => Some(serde_json::to_value(o).unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        binding["roleRef"],
        serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "demo-coordinator"})
    );
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "demo-coordinator", "namespace": "prod"}])
    );
    let account = r.children.iter().find(|c| c.kind() == "ServiceAccount").unwrap().to_json();
    assert_eq!(account["automountServiceAccountToken"], false, "mounted by the coordinator pods alone");
    // No PodDisruptionBudget for the coordinator: the standbys are never
    // ready, so any budget would forbid evicting the leader (see docs).
    assert_eq!(r.names_of("PodDisruptionBudget"), ["demo-cluster-1", "demo-cluster-2", "demo-cluster-3"]);
}

#[test]
fn every_pod_command_line_parses_as_sns_node_would() {
    use clap::Parser;
    use sns_node::cli::{Cli, Command};
    let obj = cluster("demo", serde_json::json!({"serversPerCluster": 1}));
    let r = render(&obj, &opts()).unwrap();
    let mut parsed = 0;
    for c in &r.children {
        let template = match c {
            Child::StatefulSet(s) => &s.spec.as_ref().unwrap().template,
            _ => continue,
        };
        for container in &template.spec.as_ref().unwrap().containers {
            if container.command.as_deref() != Some(&["sns-node".to_string()][..]) {
                continue;
            }
            let mut argv = vec!["sns-node".to_string()];
            argv.extend(container.args.clone().unwrap());
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{} {}: {e}", c.name(), container.name));
            match cli.command {
                Command::Coordinator(a) => {
                    let cfg = a.config();
                    assert!(cfg.gateway, "the coordinator serves the client gateway");
                    assert_eq!(cfg.clusters, 3);
                    assert_eq!(cfg.data_dir.as_deref(), Some(std::path::Path::new("/data/coordinator")));
                }
                Command::Server(a) => {
                    let cfg = a.config().unwrap();
                    assert_eq!(cfg.coord_host, "demo-coordinator");
                    assert_eq!(cfg.coord_port, 9000);
                }
                Command::Synchronizer(a) => {
                    let cfg = a.config().unwrap();
                    assert_eq!(cfg.deployment, "prod-demo");
                    assert_eq!(cfg.servers_per_cluster, 1);
                }
                Command::Local(_) => panic!("no pod runs the launcher"),
                Command::Promote(_) | Command::Switchover(_) | Command::Status(_) => {
                    panic!("promote, switchover and status are commands run by hand, not pods")
                }
            }
            parsed += 1;
        }
    }
    assert_eq!(parsed, 1 + 3 * 2);
}

#[test]
fn server_pods_share_one_volume_and_are_locked_down() {
    let obj = cluster(
        "demo",
        serde_json::json!({"storage": {"size": "5Gi", "storageClassName": "fast"}, "image": "reg/sns:1"}),
    );
    let r = render(&obj, &opts()).unwrap();
    let s = sts(&r, "demo-server-2-1");
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("demo-nodes"));
    let pvc = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(pvc.metadata.name.as_deref(), Some("data"));
    let pvc_spec = pvc.spec.as_ref().unwrap();
    assert_eq!(pvc_spec.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(pvc_spec.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"], Quantity("5Gi".into()));
    assert_eq!(pvc.metadata.labels.as_ref().unwrap()[LABEL_CLUSTER], "2");
    let t = template(s);
    let labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels[LABEL_CLUSTER], "2");
    assert_eq!(labels[LABEL_SERVER], "1");
    assert!(!labels.contains_key(LABEL_ROLE), "the role label is the operator's, not the template's");
    for name in ["server", "synchronizer"] {
        let c = container(t, name);
        assert_eq!(c.image.as_deref(), Some("reg/sns:1"));
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "data").unwrap();
        assert_eq!(mount.mount_path, "/data");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &["ALL"]);
    }
    let args = container(t, "server").args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--data-dir", "/data/cluster_2/1"]));
    let pod = t.spec.as_ref().unwrap();
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
    let term = &anti.preferred_during_scheduling_ignored_during_execution.as_ref().unwrap()[0];
    let sel = term.pod_affinity_term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
    assert_eq!(sel[LABEL_CLUSTER], "2");
    assert!(!sel.contains_key(LABEL_SERVER), "anti-affinity spans both servers of the cluster");
}

#[test]
fn one_server_per_cluster_renders_half_the_statefulsets() {
    let obj = cluster("solo", serde_json::json!({"clusters": 2, "serversPerCluster": 1}));
    let r = render(&obj, &opts()).unwrap();
    let mut names = r.names_of("StatefulSet");
    names.sort();
    assert_eq!(names, ["solo-coordinator", "solo-rabbitmq", "solo-server-1-1", "solo-server-2-1"]);
    let t = template(sts(&r, "solo-server-2-1"));
    let args = container(t, "synchronizer").args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--servers-per-cluster", "1"]));
    assert!(args.windows(2).any(|w| w == ["-i", "2"]), "{args:?}");
    assert_eq!(r.names_of("PodDisruptionBudget"), ["solo-cluster-1", "solo-cluster-2"]);
}

#[test]
fn master_services_select_the_role_label() {
    let obj = cluster("demo", serde_json::json!({"coordinator": {"serviceType": "NodePort"}}));
    let r = render(&obj, &opts()).unwrap();
    let m = service(&r, "demo-master-3").spec.clone().unwrap();
    let sel = m.selector.unwrap();
    assert_eq!(sel[LABEL_CLUSTER], "3");
    assert_eq!(sel[LABEL_ROLE], "master");
    assert_eq!(sel[LABEL_INSTANCE], "demo");
    let coord = service(&r, "demo-coordinator").spec.clone().unwrap();
    assert_eq!(coord.type_.as_deref(), Some("NodePort"));
    assert_eq!(coord.ports.unwrap()[0].port, 9000);
    let nodes = service(&r, "demo-nodes").spec.clone().unwrap();
    assert_eq!(nodes.cluster_ip.as_deref(), Some("None"));
    assert_eq!(nodes.publish_not_ready_addresses, Some(true));
}

#[test]
fn managed_broker_gets_statefulset_service_and_secret_url() {
    let obj = cluster("demo", serde_json::json!({}));
    let r = render(&obj, &opts()).unwrap();
    let b = sts(&r, "demo-rabbitmq");
    let c = container(template(b), "rabbitmq");
    assert_eq!(c.image.as_deref(), Some(crate::crd::DEFAULT_BROKER_IMAGE));
    let env = c.env.as_ref().unwrap();
    assert_eq!(env[1].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "demo-rabbitmq-credentials");
    let names = Names::of(&obj).unwrap();
    let secret = broker_secret(r.broker_secret.as_ref().unwrap(), &names, "pw123");
    let data = secret.data.unwrap();
    assert_eq!(String::from_utf8(data["url"].0.clone()).unwrap(), "amqp://sns:pw123@demo-rabbitmq.prod.svc:5672/%2f");
    // The synchronizers' URL is made from the password (see
    // broker_tests for its scheme and port).
    let sync = container(template(sts(&r, "demo-server-1-1")), "synchronizer");
    let password = &sync.env.as_ref().unwrap()[0];
    assert_eq!(password.name, "AMQP_PASSWORD");
    let sel = password.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("demo-rabbitmq-credentials", "password"));
    assert_eq!(sync.env.as_ref().unwrap()[1].name, "AMQP_URL");
    let p = random_password().unwrap();
    assert_eq!(p.len(), 32);
    assert!(p.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_ne!(p, random_password().unwrap());
}

#[test]
fn external_broker_renders_no_broker_and_reads_the_given_secret() {
    let mut obj = cluster("demo", serde_json::json!({}));
    obj.spec.broker.external = Some(ExternalBroker {
        url_secret_ref: SecretKeyRef { name: "my-amqp".into(), key: "AMQP".into() },
        ca_secret_ref: None,
    });
    let r = render(&obj, &opts()).unwrap();
    assert!(r.broker_secret.is_none());
    assert!(!r.names_of("StatefulSet").contains(&"demo-rabbitmq".to_string()));
    assert!(!r.names_of("Service").contains(&"demo-rabbitmq".to_string()));
    let sync = container(template(sts(&r, "demo-server-3-2")), "synchronizer");
    let sel = sync.env.as_ref().unwrap()[0].value_from.as_ref().unwrap().secret_key_ref.clone().unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("my-amqp", "AMQP"));
}

#[test]
fn retention_maps_to_the_statefulset_policy() {
    for (retention, expected) in [("Retain", "Retain"), ("Delete", "Delete")] {
        let obj = cluster("demo", serde_json::json!({"storage": {"retention": retention}}));
        let r = render(&obj, &opts()).unwrap();
        // Servers, coordinator and broker alike.
        assert_eq!(statefulsets(&r).len(), 8);
        for s in statefulsets(&r) {
            let p = s.spec.as_ref().unwrap().persistent_volume_claim_retention_policy.clone().unwrap();
            assert_eq!(p.when_deleted.as_deref(), Some(expected));
            assert_eq!(p.when_scaled.as_deref(), Some(expected));
        }
    }
}

#[test]
fn config_changes_roll_the_pods() {
    let a = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
    let b = render(&cluster("demo", serde_json::json!({"logLevel": "debug"})), &opts()).unwrap();
    let hash = |r: &Rendered, name: &str| {
        template(sts(r, name)).metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH].clone()
    };
    for name in ["demo-server-1-1", "demo-coordinator"] {
        assert_ne!(hash(&a, name), hash(&b, name), "{name}");
    }
    assert_ne!(a.checksum(), b.checksum());
    assert_eq!(a.checksum(), render(&cluster("demo", serde_json::json!({})), &opts()).unwrap().checksum());
}

#[test]
fn deployment_names_are_safe_for_the_broker() {
    assert_eq!(deployment_name("default", "demo"), "default-demo");
    let long = deployment_name(&"n".repeat(63), &"x".repeat(39));
    assert_eq!(long.len(), 64);
    assert!(sns_node::cli::parse_deployment(&long).is_ok());
    assert_ne!(long, deployment_name(&"n".repeat(63), &"y".repeat(39)));
}

#[test]
fn names_that_do_not_fit_are_refused() {
    let obj = cluster(&"a".repeat(40), serde_json::json!({}));
    assert!(matches!(render(&obj, &opts()), Err(Error::InvalidSpec(_))));
    let mut obj = cluster("demo", serde_json::json!({}));
    obj.metadata.namespace = None;
    assert!(matches!(render(&obj, &opts()), Err(Error::MissingNamespace)));
}

#[test]
fn yaml_dump_holds_every_object() {
    let obj = cluster("demo", serde_json::json!({}));
    let r = render(&obj, &opts()).unwrap();
    let yaml = to_yaml(&r, &Names::of(&obj).unwrap());
    // Plus the broker credentials, the node secret, the CA, the node
    // certificate and the broker's, with placeholder values.
    assert_eq!(yaml.matches("---\n").count(), r.children.len() + 5);
    assert!(yaml.contains("kind: Secret"));
    for name in ["demo-rabbitmq-credentials", "demo-node-secret", "demo-ca", "demo-tls", "demo-rabbitmq-tls"] {
        assert!(yaml.contains(&format!("name: {name}\n")), "{name}");
    }
}

#[test]
fn servers_roll_only_when_the_operator_lets_them() {
    let hash = |r: &Rendered, name: &str| {
        template(sts(r, name)).metadata.as_ref().unwrap().annotations.as_ref().unwrap()[TEMPLATE_HASH].clone()
    };
    let a = render(&cluster("demo", serde_json::json!({})), &opts()).unwrap();
    for c in 1..=3 {
        for s in 1..=2 {
            let set = sts(&a, &format!("demo-server-{c}-{s}"));
            let strategy = set.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
            assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
            let partition = strategy.rolling_update.as_ref().unwrap().partition;
            assert_eq!(partition, Some(1), "held: the operator picks the order");
            // Ready means caught up with the master, not merely up.
            let server = container(template(set), "server");
            let probe = server.readiness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
            assert_eq!(probe.service.as_deref(), Some("readiness"));
            let live = server.liveness_probe.as_ref().unwrap().grpc.as_ref().unwrap();
            assert_eq!(live.service.as_deref(), Some(""), "a catching-up server is alive");
            let sync = container(template(set), "synchronizer").readiness_probe.as_ref().unwrap();
            assert_eq!(sync.grpc.as_ref().unwrap().service.as_deref(), Some(""));
        }
    }
    assert_eq!(
        hash(&a, "demo-server-1-1"),
        hash(&render(&cluster("demo", serde_json::json!({})), &opts()).unwrap(), "demo-server-1-1")
    );
    assert_ne!(hash(&a, "demo-server-1-1"), hash(&a, "demo-server-1-2"), "each server's own template");
    // A new operator image (the default one) or settings change every
    // server's hash, so both go through the rolling update.
    let image =
        render(&cluster("demo", serde_json::json!({})), &RenderOptions { default_image: "tiny-sns:next".into() })
            .unwrap();
    let log = render(&cluster("demo", serde_json::json!({"logLevel": "debug"})), &opts()).unwrap();
    for name in ["demo-server-1-1", "demo-server-3-2"] {
        assert_ne!(hash(&a, name), hash(&image, name), "{name}");
        assert_ne!(hash(&a, name), hash(&log, name), "{name}");
    }
}
