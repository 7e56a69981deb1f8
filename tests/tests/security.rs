//! The deployment's secret, end to end: who may steer a deployment and whose
//! events it applies. Real processes started by the launcher with a secret
//! file, real gRPC on loopback, the real broker.
//!
//! - A heartbeat without the deployment's token (or with another
//!   deployment's) is refused and changes nothing: `GetServer` still names
//!   the real master.
//! - `Replica` and `CoordAdmin` calls without it are refused, and the
//!   cluster goes on as before.
//! - A well-formed event without a valid MAC is dead-lettered and never
//!   applied, and the real events of its origin still arrive.
//! - The secret is in a 0600 file, never on a command line, never logged.

use lapin::BasicProperties;
use prost::Message as _;
use sns_e2e::broker::Broker;
use sns_e2e::nodes::{get_server, master_of, rt, table};
use sns_e2e::{Deployment, eventually};
use sns_node::auth::{Attach, Secret};
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{
    PromoteRequest, SnapshotChunk, StatusRequest, StepDownRequest, SwitchoverRequest, SyncBatch, SyncEvent,
    TableRequest, UserAdded, sync_event::Kind,
};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Another deployment's secret: well-formed, just not this one.
fn stranger() -> Secret {
    Secret::from_text(&"f".repeat(64)).expect("a valid secret")
}

fn plain(host: &str, port: &str) -> anyhow::Result<Channel> {
    Ok(sns_node::net::channel(host, port)?)
}

fn as_stranger(host: &str, port: &str) -> anyhow::Result<InterceptedService<Channel, Attach>> {
    Ok(InterceptedService::new(plain(host, port)?, Attach::new(Some(stranger()))))
}

/// What a node answers a forged call: its code (the call must fail).
fn refused<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(reply) => panic!("{what} without the deployment's token was accepted: {reply:?}"),
        Err(status) => status.code(),
    }
}

#[test]
fn a_heartbeat_without_the_deployments_token_changes_nothing() -> anyhow::Result<()> {
    let d = Deployment::start(1, 2)?;
    let rt = rt();
    let port = d.coord_port.to_string();
    let real = rt.block_on(get_server(d.coord_port, 1))?;
    let (master, term) = rt.block_on(master_of(d.coord_port, 1)).expect("cluster 1 has a master");
    // An attacker's server claiming to be cluster 1's master under a
    // higher term, and a synchronizer claiming its place.
    let forged = |kind: &str| ServerInfo {
        server_id: master as i32,
        hostname: "127.0.0.2".into(),
        port: "1".into(),
        r#type: kind.into(),
        cluster_id: 1,
        is_master: true,
        term: term as i64 + 10,
        ..Default::default()
    };
    rt.block_on(async {
        for kind in ["server", "synchronizer"] {
            let mut open = CoordServiceClient::new(plain("127.0.0.1", &port)?);
            let code = refused("a heartbeat", open.heartbeat(forged(kind)).await);
            assert_eq!(code, Code::Unauthenticated, "no token: {kind}");
            let mut other = CoordServiceClient::new(as_stranger("127.0.0.1", &port)?);
            let code = refused("a heartbeat", other.heartbeat(forged(kind)).await);
            assert_eq!(code, Code::PermissionDenied, "another deployment's token: {kind}");
        }
        anyhow::Ok(())
    })?;
    let now = rt.block_on(get_server(d.coord_port, 1))?;
    assert_eq!((now.hostname.as_str(), now.port.as_str()), (real.hostname.as_str(), real.port.as_str()));
    let nodes = rt.block_on(table(d.coord_port))?;
    assert!(nodes.iter().all(|n| n.host != "127.0.0.2" && n.port != "1"), "no forged address in {nodes:?}");
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((master, term)), "same master, same term");
    // The client plane stays open: a client works as before.
    let mut c = d.client("1")?;
    c.expect_line("=====================================")?;
    c.poll_list(&[1], &[])?;
    Ok(())
}

#[test]
fn replica_and_admin_calls_without_the_token_are_refused() -> anyhow::Result<()> {
    let d = Deployment::start(1, 2)?;
    let rt = rt();
    let (master, term) = rt.block_on(master_of(d.coord_port, 1)).expect("cluster 1 has a master");
    let nodes = rt.block_on(table(d.coord_port))?;
    let servers: Vec<_> = nodes.iter().filter(|n| n.kind == "server").cloned().collect();
    assert_eq!(servers.len(), 2);
    let port = d.coord_port.to_string();
    rt.block_on(async {
        for n in &servers {
            let mut open = ReplicaClient::new(plain(&n.host, &n.port)?);
            assert_eq!(refused("Replica.Status", open.status(StatusRequest {}).await), Code::Unauthenticated);
            let step = StepDownRequest { cluster: 1, term: term + 10, epoch: 0, version: 0 };
            assert_eq!(refused("Replica.StepDown", open.step_down(step).await), Code::Unauthenticated);
            let chunk = SnapshotChunk { term: term + 10, cluster: 1, sync: 1, data: b"not a snapshot".to_vec() };
            let install = open.install_snapshot(futures_util::stream::iter([chunk])).await;
            assert_eq!(refused("Replica.InstallSnapshot", install), Code::Unauthenticated);
            let event = SyncEvent {
                origin_cluster: 2,
                seq: 1,
                kind: Some(Kind::User(UserAdded { user: 77 })),
                epoch: 1,
                dest_cluster: 1,
                dest_seq: 1,
                recipients: vec![],
            };
            let apply = open.apply_remote(tokio_stream::iter(vec![SyncBatch { events: vec![event] }])).await;
            assert_eq!(refused("Replica.ApplyRemote", apply), Code::Unauthenticated);
            let mut other = ReplicaClient::new(as_stranger(&n.host, &n.port)?);
            assert_eq!(refused("Replica.Status", other.status(StatusRequest {}).await), Code::PermissionDenied);
        }
        let mut admin = CoordAdminClient::new(plain("127.0.0.1", &port)?);
        assert_eq!(refused("CoordAdmin.Table", admin.table(TableRequest {}).await), Code::Unauthenticated);
        let slave = servers.iter().find(|n| n.id != master).expect("a slave").id;
        let promote = PromoteRequest { cluster: 1, server: slave, accept_data_loss: true };
        assert_eq!(refused("CoordAdmin.Promote", admin.promote(promote).await), Code::Unauthenticated);
        let switch = SwitchoverRequest { cluster: 1, to: slave };
        assert_eq!(refused("CoordAdmin.Switchover", admin.switchover(switch).await), Code::Unauthenticated);
        let mut other = CoordAdminClient::new(as_stranger("127.0.0.1", &port)?);
        assert_eq!(refused("CoordAdmin.Table", other.table(TableRequest {}).await), Code::PermissionDenied);
        anyhow::Ok(())
    })?;
    // Nothing moved: same master under the same term, the slave still in
    // sync and serving; the cluster takes writes.
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((master, term)));
    let mut c = d.client("1")?;
    c.expect_line("=====================================")?;
    c.poll_list(&[1], &[])?;
    sns_e2e::nodes::wait_synced_slave(&rt, &d, 1, servers.iter().find(|n| n.id != master).expect("a slave").id)?;
    let files = sns_e2e::spec_files(&d.server_dir(1, master))?;
    assert!(!files.get("all_users.txt").is_some_and(|u| u.contains("77")), "the forged user was never made");
    // The `sns-node` CLI without the secret says what is missing.
    let out = std::process::Command::new(sns_e2e::bin("sns-node"))
        .args(["switchover", "-h", "127.0.0.1", "-k", &port, "--cluster", "1"])
        .env_remove("SNS_SECRET")
        .env_remove("SNS_SECRET_FILE")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SNS_SECRET_FILE"), "the error names how to pass the secret: {err}");
    Ok(())
}

/// Cluster 1 has not published anything yet, so an event of origin 1 at
/// position 1 is exactly what cluster 2 expects next: only the MAC stands
/// between a forger and cluster 2's files. Unsealed, sealed by another
/// deployment, and sealed as another message type, all three are
/// dead-lettered; then cluster 1's real first event (position 1 too)
/// arrives and is applied.
#[test]
fn events_without_the_deployments_mac_are_dead_lettered_and_real_ones_still_apply() -> anyhow::Result<()> {
    let d = Deployment::start(2, 1)?;
    let mut c2 = d.client("2")?;
    c2.expect_line("=====================================")?;
    let rt = tokio::runtime::Runtime::new()?;
    let batch = sns_node::store::codec::BATCH_TYPE;
    let forged = SyncEvent {
        origin_cluster: 1,
        seq: 1,
        kind: Some(Kind::User(UserAdded { user: 99 })),
        epoch: 1,
        dest_cluster: 2,
        dest_seq: 1,
        recipients: vec![],
    };
    let body = SyncBatch { events: vec![forged] }.encode_to_vec();
    let stranger = stranger();
    let attempts = [
        ("no MAC", BasicProperties::default().with_type(batch.into())),
        (
            "another deployment's MAC",
            BasicProperties::default().with_type(batch.into()).with_headers(sns_e2e::secret::sealed(
                batch,
                &body,
                Some(&stranger),
            )),
        ),
        (
            "this deployment's MAC of another message type",
            BasicProperties::default().with_type(batch.into()).with_headers(sns_e2e::secret::sealed(
                "sns.event",
                &body,
                None,
            )),
        ),
    ];
    rt.block_on(async {
        let broker = Broker::connect(&d.name).await?;
        // (Published before cluster 2's queue is bound, they would be
        // dropped as unroutable.)
        broker.wait_consumed(2).await?;
        for (_, props) in &attempts {
            broker.publish("to.2", &body, props.clone()).await?;
        }
        let dead = broker.dead_letters(attempts.len()).await?;
        assert_eq!(dead.len(), attempts.len(), "every forged message is dead-lettered");
        assert!(dead.iter().all(|m| m.delivery.data == body), "the forged messages themselves");
        broker.close().await
    })?;
    // Cluster 1's real first event arrives and is applied.
    let mut c1 = d.client("1")?;
    c1.expect_line("=====================================")?;
    c2.poll_list(&[1, 2], &[])?;
    // The view files follow the journal within a flush period.
    let users = sns_e2e::eventually("cluster 2's all_users.txt to list user 1", || {
        let files = sns_e2e::spec_files(&d.server_dir(2, 1)).ok()?;
        files.get("all_users.txt").filter(|u| u.starts_with("1\n")).cloned()
    })?;
    assert_eq!(users, "1\n2\n", "user 99 was never made");
    let log = d.log("sync-2-1");
    assert_eq!(log.matches("without this deployment's MAC").count(), attempts.len(), "one line each:\n{log}");
    Ok(())
}

#[test]
fn the_secret_is_in_a_private_file_never_on_a_command_line_nor_in_a_log() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut d = Deployment::start(2, 2)?;
    let file = sns_e2e::secret::file();
    let mode = std::fs::metadata(file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is readable by others", file.display());
    let text = std::fs::read_to_string(file)?.trim().to_string();
    let rt = rt();
    // Traffic flows, so every node has used the secret.
    rt.block_on(sns_e2e::load::attach(d.coord_port, 2))?;
    let mut c = d.client("1")?;
    c.expect_line("=====================================")?;
    c.poll_list(&[1, 2], &[])?;
    c.run("FOLLOW 2", "Command completed successfully")?;
    let pids = d.status()?;
    let mut seen = 0;
    for (name, pid) in &pids {
        let Some(pid) = pid else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        assert!(!String::from_utf8_lossy(&cmdline).contains(&text), "{name}'s command line holds the secret");
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        assert!(!String::from_utf8_lossy(&environ).contains(&text), "{name}'s environment holds the secret");
        seen += 1;
    }
    assert_eq!(seen, 1 + 2 * 2 * 2, "coordinator, servers and synchronizers: {pids:?}");
    let launcher = std::fs::read(format!("/proc/{}/cmdline", d.launcher_pid()))?;
    assert!(!String::from_utf8_lossy(&launcher).contains(&text));
    let logs = d.dir().join("logs");
    eventually("logs written", || std::fs::read_dir(&logs).ok().map(|r| r.count()).filter(|n| *n > 1))?;
    for entry in std::fs::read_dir(&logs)? {
        let path = entry?.path();
        let log = std::fs::read_to_string(&path)?;
        assert!(!log.contains(&text), "{} holds the secret", path.display());
    }
    Ok(())
}
