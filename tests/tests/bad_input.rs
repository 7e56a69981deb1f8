//! Bad input gets a clear error and loses nothing: invalid ids, path-like
//! names, unknown commands, oversized posts (through tsc and straight over
//! gRPC), malformed broker messages, an unreachable coordinator, a second
//! coordinator on the same data directory.

use futures_util::StreamExt;
use lapin::BasicProperties;
use sns_e2e::broker::Broker;
use sns_e2e::{Client, Deployment, eventually};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Message, Request};

const OK: &str = "Command completed successfully";

#[test]
fn invalid_user_ids_are_refused_by_the_client() -> anyhow::Result<()> {
    for bad in ["abc", "0", "007", "-3", "../x", "2147483648"] {
        let mut c = Client::with_args(&["-h", "127.0.0.1", "-k", "1", "-u", bad], bad)?;
        let code = c.wait_exit()?;
        assert_eq!(code, 2, "tsc -u {bad} must fail with a usage error");
        assert!(c.stderr().contains("invalid user id"), "tsc -u {bad}: {}", c.stderr());
    }
    Ok(())
}

#[test]
fn unreachable_coordinator_fails_cleanly() -> anyhow::Result<()> {
    // Port 1 on loopback: nothing listens there.
    let mut c = Client::with_args(&["-h", "127.0.0.1", "-k", "1", "-u", "1"], "1")?;
    c.expect_line("connection failed: -1")?;
    assert_eq!(c.wait_exit()?, 1);
    Ok(())
}

#[test]
fn bad_commands_and_posts_keep_the_server_running() -> anyhow::Result<()> {
    let d = Deployment::start(1, 2)?;
    let mut c = d.client("1")?;
    c.expect_line("=====================================")?;
    c.run("follow ../../etc", "Command failed with invalid username")?;
    c.run("FOLLOW /etc/passwd", "Command failed with invalid username")?;
    c.run("FOLLOW 0", "Command failed with invalid username")?;
    c.run("FOLLOW", "Invalid Input -- No Arguments Given")?;
    c.run("DANCE", "Command failed with invalid command")?;
    c.run("FOLLOW 1", "Input username already exists, command failed")?;
    c.run("UNFOLLOW 1", "Command failed with invalid username")?;
    c.run("UNFOLLOW 7", "Command failed with invalid username")?;
    // No file was created for any of those names.
    let names: Vec<String> = std::fs::read_dir(d.server_dir(1, 1))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().to_string()))
        .collect::<Result<_, _>>()?;
    assert!(names.iter().all(|n| !n.contains("etc") && !n.contains("passwd") && !n.starts_with("0_")), "{names:?}");

    let mut reader = d.client("2")?;
    reader.run("FOLLOW 1", OK)?;
    reader.run("TIMELINE", OK)?;
    reader.expect_line("Now you are in the timeline")?;
    c.run("TIMELINE", OK)?;
    c.expect_line("Now you are in the timeline")?;
    let huge = "x".repeat(1 << 20);
    c.send(&huge)?;
    c.expect("a refusal of the oversized post", |l| l.starts_with("Post too long"))?;
    c.send("after the big one")?;
    reader.expect_post(1, "after the big one")?;

    // The same oversized post straight over gRPC, bypassing tsc's check:
    // the server refuses it with a clear status and keeps serving.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut coord = CoordServiceClient::connect(format!("http://127.0.0.1:{}", d.coord_port)).await?;
        let info = coord.get_server(Id { id: 1 }).await?.into_inner();
        let mut sns = SnsServiceClient::connect(format!("http://{}:{}", info.hostname, info.port)).await?;
        let msg = |text: &str, post_id| Message {
            username: "1".into(),
            msg: text.into(),
            timestamp: None,
            post_id,
            feed_position: 0,
            feed_anchor: 0,
        };
        // Posts ahead of the refused one are queued together, committed
        // and acknowledged in order before the refusal.
        let posts = [msg("", 0), msg("piped 1", 11), msg("piped 2", 12), msg("piped 3", 13), msg(&huge, 14)];
        let mut inbound = sns.timeline(tokio_stream_iter(posts.to_vec())).await?.into_inner();
        let mut acks = Vec::new();
        let err = loop {
            match inbound.next().await {
                Some(Ok(m)) if m.post_id != 0 => acks.push(m.post_id),
                Some(Ok(_)) => continue,
                Some(Err(status)) => break status,
                None => anyhow::bail!("stream ended without refusing the post"),
            }
        };
        assert_eq!(acks, [11, 12, 13]);
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("at most 4096"), "{}", err.message());
        let reply = sns.login(Request { username: "abc".into(), arguments: vec![], request_id: 0 }).await?.into_inner();
        assert_eq!(reply.msg, "FAILURE_INVALID_USERNAME");
        let list = sns.list(Request { username: "1".into(), arguments: vec![], request_id: 0 }).await?.into_inner();
        assert_eq!(list.all_users, vec!["1", "2"]);
        // Strict input, with the exact answers: ids are canonical decimal,
        // Follow and UnFollow take exactly one argument.
        for bad in ["007", "+7", "-7", " 7", "7 ", "2147483648", ""] {
            let reply = sns.login(Request { username: bad.into(), arguments: vec![], request_id: 0 }).await?;
            assert_eq!(reply.into_inner().msg, "FAILURE_INVALID_USERNAME", "Login({bad:?})");
        }
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for arguments in [args(&["2", "3", "4"]), args(&["2", "2"]), args(&[])] {
            let req = Request { username: "1".into(), arguments: arguments.clone(), request_id: 0 };
            assert_eq!(sns.follow(req.clone()).await?.into_inner().msg, "FAILURE_INVALID", "Follow {arguments:?}");
            assert_eq!(sns.un_follow(req).await?.into_inner().msg, "FAILURE_INVALID", "UnFollow {arguments:?}");
        }
        let req = Request { username: "1".into(), arguments: args(&["02"]), request_id: 0 };
        assert_eq!(sns.follow(req).await?.into_inner().msg, "FAILURE_INVALID_USERNAME", "Follow 02");
        // A first timeline message with text is the opening and a post,
        // acknowledged like any other.
        let mut inbound = sns.timeline(tokio_stream_iter(vec![msg("the opening post", 21)])).await?.into_inner();
        let acked = async {
            loop {
                match inbound.next().await {
                    Some(Ok(m)) if m.post_id == 21 && m.msg.is_empty() => return Ok(()),
                    Some(Ok(_)) => continue,
                    other => return Err(anyhow::anyhow!("the stream ended: {other:?}")),
                }
            }
        };
        tokio::time::timeout(sns_e2e::DEADLINE, acked)
            .await
            .map_err(|_| anyhow::anyhow!("the opening post was not acknowledged within {:?}", sns_e2e::DEADLINE))??;
        anyhow::Ok(())
    })?;
    reader.expect_post(1, "the opening post")?;
    c.send("still here")?;
    reader.expect_post(1, "still here")?;
    // The slave's view file, once it has the last post.
    let tl = eventually("the slave's timeline file", || {
        std::fs::read_to_string(d.server_dir(1, 2).join("1_timeline.txt")).ok().filter(|t| t.contains("still here"))
    })?;
    assert!(!tl.contains("xxxxxxxx"), "the oversized post must not be stored");
    let texts: Vec<String> = sns_node::store::record::decode_posts(&tl).into_iter().map(|p| p.text).collect();
    let piped: Vec<&str> = texts.iter().map(String::as_str).filter(|t| t.starts_with("piped")).collect();
    assert_eq!(piped, ["piped 1", "piped 2", "piped 3"], "once each, in order");
    Ok(())
}

fn tokio_stream_iter(msgs: Vec<Message>) -> impl futures_util::Stream<Item = Message> + Send + 'static {
    // Keep the stream open after the messages, as a live client would.
    futures_util::stream::iter(msgs).chain(futures_util::stream::pending())
}

#[test]
fn malformed_broker_messages_are_dead_lettered() -> anyhow::Result<()> {
    let d = Deployment::start(2, 1)?;
    let mut c1 = d.client("1")?;
    c1.expect_line("=====================================")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let broker = Broker::connect(&d.name).await?;
        // (Published before cluster 2's queue is bound, they would be
        // dropped as unroutable.)
        broker.wait_consumed(2).await?;
        // Sealed with the deployment's key, so that it is the decoding
        // that refuses them (the security suite sends unsealed ones).
        for body in [&b"\xff\xfe garbage"[..], &b""[..]] {
            let props = BasicProperties::default().with_headers(sns_e2e::secret::sealed("", body, None));
            broker.publish("to.2", body, props).await?;
        }
        // Both land in cluster 2's queue, fail to decode, and are rejected
        // to the dead-letter queue.
        let dead = broker.dead_letters(2).await?;
        assert_eq!(dead.len(), 2, "both malformed messages must be dead-lettered");
        broker.close().await
    })?;
    // The synchronizer is still applying real events.
    let mut c2 = d.client("2")?;
    c2.expect_line("=====================================")?;
    c2.poll_list(&[1, 2], &[])?;
    c1.poll_list(&[1, 2], &[])?;
    assert!(d.log("sync-2-1").contains("malformed broker message"));
    eventually("sync-2-1 still running", || (!d.log("sync-2-1").contains("panicked")).then_some(()))?;
    Ok(())
}

/// A well-formed event that cannot be valid (its stream position jumps to
/// i64::MAX) is dead-lettered, never applied, and does not stop the real
/// events of its origin that come after it.
#[test]
fn a_forged_event_is_dead_lettered_and_later_events_still_apply() -> anyhow::Result<()> {
    use prost::Message as _;
    use sns_proto::internal::{SyncBatch, SyncEvent, UserAdded, sync_event::Kind};
    let d = Deployment::start(2, 1)?;
    let mut c2 = d.client("2")?;
    c2.expect_line("=====================================")?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let broker = Broker::connect(&d.name).await?;
        // (Published before cluster 2's queue is bound, they would be
        // dropped as unroutable.)
        broker.wait_consumed(2).await?;
        let forged = SyncEvent {
            origin_cluster: 1,
            seq: i64::MAX as u64,
            kind: Some(Kind::User(UserAdded { user: 99 })),
            epoch: 1,
            dest_cluster: 2,
            dest_seq: i64::MAX as u64,
            recipients: vec![],
        };
        let body = SyncBatch { events: vec![forged] }.encode_to_vec();
        // Sealed with the deployment's key: the MAC holds, the stream
        // position is what gives it away.
        let props = BasicProperties::default()
            .with_type(sns_node::store::codec::BATCH_TYPE.into())
            .with_headers(sns_e2e::secret::sealed(sns_node::store::codec::BATCH_TYPE, &body, None));
        broker.publish("to.2", &body, props).await?;
        let dead = broker
            .dead_letters(1)
            .await?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("the forged event was never dead-lettered"))?;
        let reason = match dead.properties.headers().as_ref().and_then(|h| h.inner().get("x-reason").cloned()) {
            Some(lapin::types::AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).to_string(),
            other => format!("{other:?}"),
        };
        assert!(reason.contains("jumps past the window"), "the reason travels with it: {reason}");
        broker.close().await
    })?;
    // Cluster 1's real events still reach cluster 2, and the forged user
    // was never made.
    let mut c1 = d.client("1")?;
    c1.expect_line("=====================================")?;
    c2.poll_list(&[1, 2], &[])?;
    // The files follow memory within a flush period.
    let mut users = None;
    let listed = eventually("all_users.txt to list users 1 and 2", || {
        users = sns_e2e::spec_files(&d.server_dir(2, 1)).ok()?.get("all_users.txt").cloned();
        (users.as_deref() == Some("1\n2\n")).then_some(())
    });
    assert!(listed.is_ok(), "the forged user is not among them: {users:?}");
    assert!(d.log("server-2-1").contains("refused"), "the server says why");
    Ok(())
}

#[test]
fn the_launcher_says_how_to_get_a_broker_when_none_answers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Port 1 on loopback: nothing listens there.
    let out = std::process::Command::new(sns_e2e::bin("sns-node"))
        .args(["local", "--base-port", "0", "--no-broker-start", "--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .arg("--dir")
        .arg(dir.path())
        .output()?;
    assert!(!out.status.success(), "the launcher must not start without a broker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no RabbitMQ broker answers at 127.0.0.1:1"), "{err}");
    assert!(err.contains("apt-get install -y rabbitmq-server"), "{err}");
    assert!(!dir.path().join("logs").join("coordinator.log").exists(), "nothing was started");
    Ok(())
}

/// A second coordinator started on the data directory of a running one
/// exits at once, naming the first: two would each act on records the
/// other rewrites. The first one goes on.
#[test]
fn a_second_coordinator_on_the_same_data_directory_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, port_file) = (dir.path().join("data"), dir.path().join("port"));
    let coordinator = |port_file: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(sns_e2e::bin("sns-node"));
        cmd.args(["coordinator", "-p", "0", "--bind", "127.0.0.1", "--clusters", "1", "--data-dir"])
            .arg(&data)
            .env_remove("SNS_SECRET_FILE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = port_file {
            cmd.arg("--port-file").arg(p);
        }
        cmd
    };
    let first = sns_e2e::KillOnDrop(coordinator(Some(&port_file)).spawn()?);
    let port: u16 =
        eventually("the first coordinator's port", || std::fs::read_to_string(&port_file).ok()?.trim().parse().ok())?;
    let mut second = coordinator(None).spawn()?;
    let exited = eventually("the second coordinator to exit", || second.try_wait().ok().flatten());
    if exited.is_err() {
        let _ = second.kill();
    }
    let out = second.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!exited?.success(), "{err}");
    assert!(err.contains(&format!("is in use by process {}", first.0.id())), "{err}");
    // The first one still answers.
    let rt = sns_e2e::nodes::rt();
    let table = rt.block_on(sns_e2e::nodes::table(port));
    assert!(table.is_ok(), "{table:?}");
    Ok(())
}
