//! The real routing-table client against a real coordinator on
//! 127.0.0.1:0: what the reconciler reads is what the coordinator decided,
//! and the coordinator keeps its records under `--data-dir` (the directory
//! the operator puts on the coordinator's PersistentVolumeClaim).

use clap::Parser;
use sns_node::cli::{Cli, Command};
use sns_operator::coordinator::{GrpcRoutingTable, NodeKind, RoutingTable};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn routing_table_reports_the_registered_master() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("coordinator");
    let cli = Cli::try_parse_from([
        "sns-node",
        "coordinator",
        "-p",
        "0",
        "--clusters",
        "2",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ])
    .unwrap();
    let Command::Coordinator(args) = cli.command else { panic!("not a coordinator") };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let coordinator = tokio::spawn(sns_node::coordinator::run(args.config(), listener, shutdown.clone()));

    let table = GrpcRoutingTable::new(Duration::from_secs(2));
    let mut client = CoordServiceClient::connect(endpoint.clone()).await.unwrap();
    for id in [1, 2] {
        client
            .heartbeat(ServerInfo {
                server_id: id,
                hostname: "127.0.0.1".into(),
                port: format!("{}", 9020 + id),
                r#type: "server".into(),
                cluster_id: 2,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let nodes = loop {
        let nodes = table.table(&endpoint).await.unwrap();
        // Both registered and one elected (the election follows the
        // registration, once its record is on disk).
        if nodes.iter().filter(|n| n.alive).count() == 2 && nodes.iter().any(|n| n.is_master) {
            break nodes;
        }
        assert!(Instant::now() < deadline, "servers or master never showed up: {nodes:?}");
        tokio::task::yield_now().await;
    };
    let master = nodes.iter().find(|n| n.is_master).expect("a master");
    assert_eq!((master.cluster, master.id, master.kind), (2, 1, NodeKind::Server));
    assert!(master.term >= 1);
    let slave = nodes.iter().find(|n| n.id == 2).unwrap();
    assert!(!slave.is_master && slave.alive);
    // The master was recorded before it was announced: this file is what
    // the coordinator's volume keeps across restarts.
    let state = data_dir.join(sns_node::coordinator::state::STATE_FILE);
    assert!(std::fs::metadata(&state).is_ok_and(|m| m.len() > 8), "{} holds the records", state.display());

    // A switchover the coordinator refuses comes back as a refusal with
    // its reason, not as an unreachable coordinator: cluster 1 has no
    // server at all.
    let err = table.switchover(&endpoint, 1, None).await.unwrap_err();
    assert_eq!(err.reason(), "SwitchoverRefused", "{err}");
    assert_eq!(master.term, table.table(&endpoint).await.unwrap().iter().find(|n| n.is_master).unwrap().term);

    shutdown.cancel();
    coordinator.await.unwrap().unwrap();
}

/// A replicated coordinator: a call that reaches a standby (a connection
/// made while it led, or during a takeover) fails `UNAVAILABLE` for this
/// poll, and the channel is dropped so the next poll dials afresh; the
/// leader answers.
#[tokio::test]
async fn a_standby_answers_unavailable_and_the_channel_is_redialled() {
    use sns_node::coordinator::ha::{self, HaConfig};
    use sns_node::kube::leader::LeaseConfig;
    use sns_node::kube::leader::fake::{Shared, replica_client};
    let api = Shared::default();
    let mut replicas = Vec::new();
    for identity in ["coord-0", "coord-1"] {
        let cfg = sns_node::coordinator::CoordinatorConfig {
            clusters: 1,
            gateway: false,
            heartbeat: Duration::from_millis(100),
            missed: 3,
            lease: Duration::from_millis(150),
            data_dir: None,
            secret: None,
        };
        let lease = LeaseConfig {
            name: "sns".into(),
            namespace: "ops".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(600),
            retry_period: Duration::from_millis(100),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let client = replica_client(&api, Default::default());
        let ha = HaConfig { lease, records: "sns-records".into() };
        tokio::spawn(ha::run(cfg, ha, client, listener, stop.clone()));
        replicas.push((endpoint, stop));
    }
    let table = GrpcRoutingTable::new(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (leader, standby) = loop {
        let a = table.table(&replicas[0].0).await;
        let b = table.table(&replicas[1].0).await;
        match (a, b) {
            (Ok(_), Err(e)) => break (0, (1, e)),
            (Err(e), Ok(_)) => break (1, (0, e)),
            _ => {}
        }
        assert!(Instant::now() < deadline, "no one replica leading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (standby, refusal) = standby;
    assert!(refusal.to_string().contains("standby coordinator"), "{refusal}");
    // The standby's channel went, the leader's stays.
    assert_eq!(table.channels(), 1);
    assert!(table.table(&replicas[leader].0).await.is_ok());
    assert!(table.table(&replicas[standby].0).await.is_err());
    assert_eq!(table.channels(), 1, "only the leader's channel is kept");
    for (_, stop) in replicas {
        stop.cancel();
    }
}
