//! The real routing-table client against a real coordinator on
//! 127.0.0.1:0: what the reconciler reads is what the coordinator decided.

use clap::Parser;
use sns_node::cli::{Cli, Command};
use sns_operator::coordinator::{GrpcRoutingTable, NodeKind, RoutingTable};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn routing_table_reports_the_registered_master() {
    let cli = Cli::try_parse_from(["sns-node", "coordinator", "-p", "0", "--clusters", "2"]).unwrap();
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
        if nodes.iter().filter(|n| n.alive).count() == 2 {
            break nodes;
        }
        assert!(Instant::now() < deadline, "servers never showed up: {nodes:?}");
        tokio::task::yield_now().await;
    };
    let master = nodes.iter().find(|n| n.is_master).expect("a master");
    assert_eq!((master.cluster, master.id, master.kind), (2, 1, NodeKind::Server));
    assert!(master.term >= 1);
    let slave = nodes.iter().find(|n| n.id == 2).unwrap();
    assert!(!slave.is_master && slave.alive);

    shutdown.cancel();
    coordinator.await.unwrap().unwrap();
}
