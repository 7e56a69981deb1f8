//! Visibility follows the cluster's log, never clocks: posts whose client
//! clock is 30 s or a day behind or ahead, or absurd, reach every follower
//! (in the author's cluster and in others) exactly where they belong, with
//! the client's time displayed; a post reaches only the clusters with
//! followers of its author; and events the broker loses after confirming
//! them reach their cluster all the same; a timeline reader that stopped
//! reading gets every post in order once it reads again.

use sns_e2e::broker::Broker;
use sns_e2e::load;
use sns_e2e::nodes::{master_of, rt, server_node, status};
use sns_e2e::{
    DEADLINE, Deployment, check_convergence, eventually, feed_of_2_holds, feed_of_2_holds_within, feed_posts,
    feed_texts, spec_files,
};
use sns_proto::csce438::Message;
use sns_proto::prost_types::Timestamp;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Posts `(text, client time in seconds, or None)` as `user` through one
/// timeline stream, each acknowledged before the next.
async fn post_at(coord_port: u16, user: u32, posts: &[(&str, Option<i64>)]) -> anyhow::Result<()> {
    let mut sns = load::attach(coord_port, user).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Message { username: user.to_string(), ..Default::default() })?;
    let mut inbound = sns.timeline(UnboundedReceiverStream::new(rx)).await?.into_inner();
    for (i, (text, secs)) in posts.iter().enumerate() {
        let id = 7_000 + i as u64;
        let timestamp = secs.map(|seconds| Timestamp { seconds, nanos: 0 });
        tx.send(Message {
            username: user.to_string(),
            msg: text.to_string(),
            timestamp,
            post_id: id,
            feed_position: 0,
            feed_anchor: 0,
        })?;
        loop {
            let m = tokio::time::timeout(DEADLINE, inbound.message())
                .await?
                .map_err(|s| anyhow::anyhow!("post {text:?}: {s}"))?
                .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
            if m.post_id == id && m.msg.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

#[test]
fn skewed_client_clocks_decide_nothing() -> anyhow::Result<()> {
    let d = Deployment::start(3, 2)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    // 1 (cluster 1) is followed by 4 (cluster 1), 2 (cluster 2) and 3
    // (cluster 3); nobody follows 5 (cluster 2).
    rt.block_on(async {
        for u in 1..=5 {
            load::attach(d.coord_port, u).await?;
        }
        for f in [4, 2, 3] {
            let mut msg = String::new();
            while msg != "SUCCESS" && Instant::now() < deadline {
                msg = load::command(d.coord_port, f, true, 1, deadline).await?;
            }
        }
        load::wait_followers(d.coord_port, 1, &[2, 3, 4], deadline).await
    })?;
    let now = load::now_secs();
    let posts = [
        ("a day behind", Some(now - 86_400)),
        ("30 s behind", Some(now - 30)),
        ("30 s ahead", Some(now + 30)),
        ("a day ahead", Some(now + 86_400)),
        ("no time", None),
        ("year 10000", Some(253_402_300_800)),
        ("before 1970", Some(-5)),
    ];
    rt.block_on(post_at(d.coord_port, 1, &posts))?;
    // 5 posts too, with a clock a day behind; nobody reads it.
    rt.block_on(post_at(d.coord_port, 5, &[("unread", Some(now - 86_400))]))?;

    let texts: Vec<&str> = posts.iter().map(|(t, _)| *t).collect();
    let expected: Vec<(u32, u32, &str)> =
        [4, 2, 3].iter().flat_map(|f| texts.iter().map(move |t| (*f, 1, *t))).collect();
    let all: Vec<(u32, u32)> = (1..=3).flat_map(|c| [(c, 1), (c, 2)]).collect();
    check_convergence(&d, &all, &expected)?;
    for (reader, c) in [(4, 1), (2, 2), (3, 3)] {
        for s in [1, 2] {
            let files = spec_files(&d.server_dir(c, s))?;
            let feed = sns_node::store::record::decode_posts(&files[&format!("{reader}_following.txt")]);
            // Every post once, in the order it was made, whatever its clock.
            let got: Vec<&str> = feed.iter().filter(|p| p.user == 1).map(|p| p.text.as_str()).collect();
            assert_eq!(got, texts, "server {c}/{s}: feed of {reader}");
            for p in feed.iter().filter(|p| p.user == 1) {
                let client = posts.iter().find(|(t, _)| *t == p.text).and_then(|(_, secs)| *secs);
                match client {
                    // The client's time is displayed as given.
                    Some(secs) if secs > 0 && secs < 253_402_300_800 => assert_eq!(p.at_secs, secs, "{p:?}"),
                    // Absent or absurd: the server's clock.
                    _ => assert!((p.at_secs - now).abs() < 600, "{p:?} carries the server's time"),
                }
            }
        }
    }
    // The unread post is in nobody's feed.
    for c in 1..=3 {
        for s in [1, 2] {
            let files = spec_files(&d.server_dir(c, s))?;
            let anywhere = files.iter().any(|(name, text)| name.ends_with("_following.txt") && text.contains("unread"));
            assert!(!anywhere, "server {c}/{s} has the unread post in a feed");
        }
    }
    // The stream of a follower entering its timeline shows the same order.
    rt.block_on(async {
        let mut sns = load::attach(d.coord_port, 3).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Message { username: "3".into(), ..Default::default() })?;
        let mut inbound = sns.timeline(UnboundedReceiverStream::new(rx)).await?.into_inner();
        let mut seen = Vec::new();
        while seen.len() < texts.len() {
            let m = tokio::time::timeout(DEADLINE, inbound.message()).await??.expect("backlog");
            seen.push(m.msg);
        }
        assert_eq!(seen, texts);
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The synchronizer marks an outbox event published once the broker has
/// confirmed the message it travelled in; if one message carried a post's
/// copy for cluster 2 and the next its copy for cluster 3, a synchronizer
/// killed between the two confirms would leave cluster 3 without it for
/// good. So each message of the outbox stream holds whole events.
#[test]
fn the_outbox_stream_never_splits_an_event_between_messages() -> anyhow::Result<()> {
    use sns_proto::internal::TailRequest;
    use sns_proto::internal::replica_client::ReplicaClient;
    use sns_proto::internal::sync_event::Kind;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    const POSTS: usize = 300;
    let d = Deployment::start(3, 1)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(async {
        for u in 1..=3 {
            load::attach(d.coord_port, u).await?;
        }
        // 1 (cluster 1) is followed in clusters 2 and 3: each of its posts
        // is one outbox event with a copy for each.
        load::follow_until_done(d.coord_port, 2, 1, deadline).await?;
        load::follow_until_done(d.coord_port, 3, 1, deadline).await?;
        let master = sns_e2e::nodes::server_node(d.coord_port, 1, 1).await.expect("server 1/1");
        let mut replica = ReplicaClient::new(sns_e2e::secret::channel(&master.host, &master.port)?);
        // A second reader of the outbox, beside the synchronizer's.
        let mut outbox = replica.tail_outbox(TailRequest {}).await?.into_inner();
        let writer = tokio::spawn(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), POSTS, deadline));
        let (mut posts, mut messages) = (BTreeSet::new(), 0);
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        while posts.len() < POSTS {
            let batch = tokio::time::timeout_at(deadline.into(), outbox.message()).await??.expect("outbox stream");
            messages += 1;
            let mut copies: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
            for e in &batch.events {
                copies.entry(e.seq).or_default().insert(e.dest_cluster);
                if matches!(e.kind, Some(Kind::Post(_))) {
                    posts.insert(e.seq);
                }
            }
            for (seq, dests) in copies {
                // Every event of cluster 1 here goes to both other clusters.
                assert_eq!(dests, BTreeSet::from([2, 3]), "event {seq}: copies split between messages");
                assert!(seen.insert(seq), "event {seq} in two messages");
            }
        }
        let report = writer.await?;
        assert_eq!(report.acked.len(), POSTS, "{report:?}");
        eprintln!("{POSTS} posts came in {messages} messages, each with both copies of its events");
        anyhow::Ok(())
    })?;
    Ok(())
}

/// A synchronizer hands batches of other clusters' events to the master
/// one after the other on one `ApplyRemote` stream, without waiting for
/// their commits. They enter the log in stream order and are answered in
/// it; the first batch that fails ends the stream, and nothing sent after
/// it is applied (the broker redelivers it to whoever consumes next).
#[test]
fn batches_on_one_apply_stream_commit_in_order_and_stop_at_the_first_failure() -> anyhow::Result<()> {
    use sns_proto::internal::replica_client::ReplicaClient;
    use sns_proto::internal::sync_event::Kind;
    use sns_proto::internal::{StatusRequest, SyncBatch, SyncEvent, UserAdded};

    const BATCHES: u64 = 200;
    // Cluster 1 has no client, so it publishes nothing: positions 1.. of
    // its stream to cluster 2 are free for these events.
    let d = Deployment::start(2, 1)?;
    let rt = rt();
    // Users of cluster 1 (odd ids with two clusters).
    let user_at = |n: u64| 2 * (500 + n as u32) + 1;
    let event = |n: u64, kind: Option<Kind>| SyncEvent {
        origin_cluster: 1,
        seq: n,
        kind,
        epoch: 1,
        dest_cluster: 2,
        dest_seq: n,
        recipients: vec![],
    };
    let added = |n: u64| event(n, Some(Kind::User(UserAdded { user: user_at(n) })));
    rt.block_on(async {
        let master = sns_e2e::nodes::server_node(d.coord_port, 2, 1).await.expect("server 2/1");
        let mut replica = ReplicaClient::new(sns_e2e::secret::channel(&master.host, &master.port)?);
        // Every batch is sent before the first answer is read.
        let (tx, rx) = mpsc::unbounded_channel();
        for n in 1..=BATCHES {
            tx.send(SyncBatch { events: vec![added(n)] })?;
        }
        let mut replies = replica.apply_remote(UnboundedReceiverStream::new(rx)).await?.into_inner();
        for n in 1..=BATCHES {
            let reply = tokio::time::timeout(DEADLINE, replies.message()).await??.expect("a reply per batch");
            assert_eq!((reply.applied, reply.rejected.len()), (1, 0), "batch {n}: {reply:?}");
        }
        let status = replica.status(StatusRequest {}).await?.into_inner();
        assert_eq!(status.held, 0, "nothing was held for a gap: {status:?}");
        // Then: a good batch, a batch that cannot be decoded (an event
        // without a kind), and a good batch behind it.
        let after = BATCHES + 1;
        tx.send(SyncBatch { events: vec![added(after)] })?;
        tx.send(SyncBatch { events: vec![event(after + 1, None)] })?;
        tx.send(SyncBatch { events: vec![added(after + 1)] })?;
        let reply = tokio::time::timeout(DEADLINE, replies.message()).await??.expect("a reply");
        assert_eq!(reply.applied, 1, "{reply:?}");
        let failed = tokio::time::timeout(DEADLINE, replies.message()).await?;
        assert_eq!(failed.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument), "the broken batch fails");
        // On a fresh stream, position after + 1 is still free: the batch
        // sent behind the broken one was never applied.
        let (tx, rx) = mpsc::unbounded_channel();
        let other = event(after + 1, Some(Kind::User(UserAdded { user: 2 * 900 + 1 })));
        tx.send(SyncBatch { events: vec![other] })?;
        drop(tx);
        let mut replies = replica.apply_remote(UnboundedReceiverStream::new(rx)).await?.into_inner();
        let reply = tokio::time::timeout(DEADLINE, replies.message()).await??.expect("a reply");
        assert_eq!(reply.applied, 1, "position {} was free: {reply:?}", after + 1);
        assert!(tokio::time::timeout(DEADLINE, replies.message()).await??.is_none(), "one reply, then the end");
        anyhow::Ok(())
    })?;
    let users = sns_e2e::eventually("cluster 2's view of the users", || {
        let files = spec_files(&d.server_dir(2, 1)).ok()?;
        files.get("all_users.txt").filter(|u| u.contains("1801\n")).cloned()
    })?;
    let listed: Vec<u32> = users.lines().filter_map(|l| l.parse().ok()).collect();
    for n in 1..=BATCHES + 1 {
        assert!(listed.contains(&user_at(n)), "user {} of batch {n} is listed", user_at(n));
    }
    assert!(!listed.contains(&user_at(BATCHES + 2)), "the batch behind the broken one was not applied");
    Ok(())
}

/// Posts `count` posts as user 1 (cluster 1) while cluster 2 consumes
/// nothing (both its synchronizers killed), waits until the broker has
/// confirmed them all to cluster 1, then has the broker lose them: cluster
/// 2's queue is purged. Returns the posts.
fn post_and_lose(d: &mut Deployment, rt: &tokio::runtime::Runtime, count: usize) -> anyhow::Result<Vec<String>> {
    for s in [1, 2] {
        d.command(&format!("kill sync-2-{s}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let posts = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), count, deadline)).acked;
    anyhow::ensure!(posts.len() == count, "{} of {count} posts acknowledged", posts.len());
    lose_what_waits_for_cluster_2(d, rt)?;
    Ok(posts)
}

/// Waits until the broker has confirmed cluster 1's whole outbox, then
/// purges cluster 2's queue (which must hold some of it).
fn lose_what_waits_for_cluster_2(d: &Deployment, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let master = rt.block_on(master_of(d.coord_port, 1)).ok_or_else(|| anyhow::anyhow!("no master in cluster 1"))?.0;
    let node = rt.block_on(server_node(d.coord_port, 1, master)).ok_or_else(|| anyhow::anyhow!("no master node"))?;
    eventually("the broker to confirm cluster 1's outbox", || {
        let s = rt.block_on(status(&node)).ok()?;
        (s.published_upto == s.next_seq - 1).then_some(())
    })?;
    let purged = rt.block_on(async {
        let broker = Broker::connect(&d.name).await?;
        let n = broker.purge(2).await?;
        broker.close().await?;
        anyhow::Ok(n)
    })?;
    anyhow::ensure!(purged > 0, "cluster 2's queue held none of the posts");
    Ok(())
}

fn start_cluster_2_synchronizers(d: &mut Deployment) -> anyhow::Result<()> {
    for s in [1, 2] {
        d.command(&format!("start sync-2-{s}"))?;
    }
    Ok(())
}

/// The broker confirmed these messages and then lost them, so cluster 1's
/// outbox had forgotten them: without receipts, cluster 2 would never learn
/// of the stream's last events (nothing after them says they existed), and
/// would hold every later event for the gap forever. Its receipts show the
/// origin it stopped short of what the broker confirmed, and cluster 1
/// publishes the missing events again: every post reaches the follower
/// once, in order, on both servers.
#[test]
fn events_the_broker_loses_after_confirming_them_are_published_again() -> anyhow::Result<()> {
    let mut d = Deployment::builder().clusters(2).servers(2).env("SNS_RESEND_AFTER", "1s").start()?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let mut all = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 5, deadline)).acked;
    feed_of_2_holds(&d, &all, "the posts before any loss")?;
    // The stream's last events lost: nothing later shows a gap.
    all.extend(post_and_lose(&mut d, &rt, 5)?);
    start_cluster_2_synchronizers(&mut d)?;
    feed_of_2_holds_within(&d, &all, "the posts lost at the stream's end", Duration::from_secs(40))?;
    // Events lost in the middle: the later ones wait for the gap.
    all.extend(post_and_lose(&mut d, &rt, 5)?);
    let later = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 5, deadline)).acked;
    all.extend(later);
    start_cluster_2_synchronizers(&mut d)?;
    feed_of_2_holds_within(&d, &all, "the posts lost in the middle, and those after", Duration::from_secs(40))?;
    for s in [1, 2] {
        let node = rt
            .block_on(server_node(d.coord_port, 2, s))
            .ok_or_else(|| anyhow::anyhow!("server 2/{s} not in the table"))?;
        eventually(&format!("server 2/{s} to hold no event for a gap"), || {
            let st = rt.block_on(status(&node)).ok()?;
            (st.held == 0).then_some(())
        })?;
    }
    // In the order they were made.
    for s in [1, 2] {
        assert_eq!(feed_texts(&d.server_dir(2, s), 2, 1)?, all, "server 2/{s}");
    }
    check_convergence(&d, &[(1, 1), (1, 2), (2, 1), (2, 2)], &[])?;
    let said = |what: &str| (1..=2).any(|s| d.log(&format!("server-1-{s}")).contains(what));
    assert!(said("publishing the missing events again"), "cluster 1's master says it resent");
    Ok(())
}

/// Thousands of events lost while a busy stream goes on: the receiver
/// holds what it can for the gap (4,096 events) and leaves the rest to the
/// origin (valid events: none is dead-lettered), the origin sends what it
/// lacks in chunks, the next as soon as a receipt shows the last one
/// taken, and the receiver catches up with a stream that kept growing
/// meanwhile.
#[test]
fn a_receiver_that_lost_thousands_of_events_under_load_catches_up() -> anyhow::Result<()> {
    // Long enough for the stream to pile more than the receiver holds.
    let mut d = Deployment::builder().clusters(2).servers(1).env("SNS_RESEND_AFTER", "4s").start()?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(120);
    // 2 (cluster 2) follows four authors of cluster 1.
    let authors = [1u32, 3, 5, 7];
    for a in authors {
        rt.block_on(load::follow_until_done(d.coord_port, 2, a, deadline))?;
    }
    let coord_port = d.coord_port;
    let write = |rt: &tokio::runtime::Runtime, count: usize| -> Vec<Vec<String>> {
        rt.block_on(async {
            let writers = authors
                .map(|a| tokio::spawn(load::writer(coord_port, a, Arc::new(AtomicBool::new(false)), count, deadline)));
            let mut out = Vec::new();
            for w in writers {
                out.push(w.await.map(|r| r.acked).unwrap_or_default());
            }
            out
        })
    };
    d.command("kill sync-2-1")?;
    // More than one resend carries (16,384).
    let lost = write(&rt, 4_200);
    lose_what_waits_for_cluster_2(&d, &rt)?;
    // Waiting in the queue when the receiver comes back, all after the
    // gap: more than it may hold (4,096), whatever the machine's speed.
    let queued = write(&rt, 1_500);
    d.command("start sync-2-1")?;
    let after = write(&rt, 500);
    let reader = rt.block_on(server_node(d.coord_port, 2, 1)).ok_or_else(|| anyhow::anyhow!("no server 2/1"))?;
    let mut last = String::new();
    sns_e2e::eventually_within("user 2's feed to hold every post once, in order", Duration::from_secs(90), || {
        let feed = feed_posts(&d.server_dir(2, 1), 2).ok()?;
        for (i, a) in authors.iter().enumerate() {
            let got: Vec<&str> = feed.iter().filter(|p| p.user == *a).map(|p| p.text.as_str()).collect();
            let want: Vec<&str> = lost[i].iter().chain(&queued[i]).chain(&after[i]).map(String::as_str).collect();
            if got != want {
                last = format!("author {a}: {} of {} posts", got.len(), want.len());
                return None;
            }
        }
        let held = rt.block_on(status(&reader)).ok()?.held;
        (held == 0).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
    let sync = d.log("sync-2-1");
    anyhow::ensure!(
        sync.contains("events left for their origin to send again"),
        "the receiver never ran out of room to hold events: the test lost too few"
    );
    anyhow::ensure!(!sync.contains("dead-lettered"), "valid events were dead-lettered:\n{sync}");
    Ok(())
}

/// A cluster whose master is replaced by the operator's override, with
/// data loss, lacks events that its lost master had applied and receipted:
/// the origin no longer keeps them, so it cannot send them again, and the
/// stream would hold at the hole for good. The origin tells it to go on
/// after them (a sealed gap marker), and what comes later reaches it.
#[test]
fn a_cluster_overridden_with_data_loss_goes_on_after_the_events_it_lost() -> anyhow::Result<()> {
    let mut d = Deployment::builder().clusters(2).servers(2).env("SNS_RESEND_AFTER", "1s").start()?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let coord = d.coord_port;
    let write = |n| rt.block_on(load::writer(coord, 1, Arc::new(AtomicBool::new(false)), n, deadline)).acked;
    let before = write(5);
    feed_of_2_holds(&d, &before, "the posts before the override")?;
    // Cluster 2's master goes on alone; the posts reach it only.
    let (m, _) = rt.block_on(master_of(d.coord_port, 2)).ok_or_else(|| anyhow::anyhow!("no master in cluster 2"))?;
    let stale = 3 - m;
    d.command(&format!("kill server-2-{stale}"))?;
    let lost = write(5);
    let dirs = [d.server_dir(2, 1), d.server_dir(2, 2)];
    let feed_of = |s: u32| feed_texts(&dirs[s as usize - 1], 2, 1).unwrap_or_default();
    eventually("the posts to reach cluster 2's master", || lost.iter().all(|p| feed_of(m).contains(p)).then_some(()))?;
    // Its receipts cover them: cluster 1 keeps none of them any more.
    let (om, _) = rt.block_on(master_of(d.coord_port, 1)).ok_or_else(|| anyhow::anyhow!("no master in cluster 1"))?;
    let origin = rt.block_on(server_node(d.coord_port, 1, om)).ok_or_else(|| anyhow::anyhow!("no master node"))?;
    eventually("cluster 2's receipts to cover cluster 1's stream", || {
        let s = rt.block_on(status(&origin)).ok()?;
        (s.published_upto == s.next_seq - 1 && s.retained == 0).then_some(())
    })?;
    // The master is lost; the stale server is promoted, accepting the loss.
    d.command(&format!("kill server-2-{m}"))?;
    d.command(&format!("start server-2-{stale}"))?;
    eventually("cluster 2 without a master", || {
        let info = rt.block_on(sns_e2e::nodes::get_server(d.coord_port, 2)).ok()?;
        (!info.unavailable_reason.is_empty()).then_some(())
    })?;
    let out = sns_e2e::nodes::promote_cli(&d, 2, stale, true)?;
    anyhow::ensure!(out.status.success(), "promotion failed: {out:?}");
    let after = write(5);
    eventually_within_posts(&feed_of, stale, &before, &after)?;
    assert!(lost.iter().all(|p| !feed_of(stale).contains(p)), "the lost posts stay lost (the override accepted it)");
    let said = |what: &str| (1..=2).any(|s| d.log(&format!("server-1-{s}")).contains(what));
    assert!(said("telling cluster 2 to go on after"), "cluster 1's master told cluster 2 to step over the hole");
    Ok(())
}

/// Waits until server 2/`s`'s feed of user 1 is `before` then `after`.
fn eventually_within_posts(
    feed_of: &dyn Fn(u32) -> Vec<String>,
    s: u32,
    before: &[String],
    after: &[String],
) -> anyhow::Result<()> {
    let want: Vec<String> = before.iter().chain(after).cloned().collect();
    let mut last = Vec::new();
    sns_e2e::eventually_within("the later posts on the overridden cluster", Duration::from_secs(40), || {
        last = feed_of(s);
        (last == want).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: server 2/{s} has {last:?}"))
}

/// A receiver whose queue is held by a paused consumer — the old master's
/// synchronizer, SIGSTOPped through a switchover, keeps the queue's
/// single-consumer slot until the broker gives up on its connection — is
/// short of what the broker confirmed, but not idle: its events wait in
/// the queue. Its receipts must not say idle, or the origin would publish
/// them all again (every `--resend-after`, for nothing, behind them in the
/// same queue). Once the broker drops the paused consumer, the new
/// master's synchronizer takes the queue and every post arrives once.
#[test]
fn a_queue_held_by_a_paused_consumer_is_not_taken_for_an_idle_receiver() -> anyhow::Result<()> {
    let mut d = Deployment::builder().clusters(2).servers(2).env("SNS_RESEND_AFTER", "1s").start()?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(90);
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let coord = d.coord_port;
    let write = |n| rt.block_on(load::writer(coord, 1, Arc::new(AtomicBool::new(false)), n, deadline)).acked;
    let before = write(3);
    feed_of_2_holds(&d, &before, "the posts before the pause")?;
    let (old, _) = rt.block_on(master_of(d.coord_port, 2)).ok_or_else(|| anyhow::anyhow!("no master in cluster 2"))?;
    let new = 3 - old;
    d.command(&format!("pause sync-2-{old}"))?;
    d.command(&format!("switchover 2 server-2-{new}"))?;
    eventually(&format!("server 2/{new} to be master"), || {
        (rt.block_on(master_of(d.coord_port, 2)).map(|(m, _)| m) == Some(new)).then_some(())
    })?;
    let held = write(20);
    // The broker drops the paused synchronizer's connection once its
    // heartbeats are missed: then the posts come.
    let limit = Duration::from_secs(4 * u64::from(sns_node::sync::HEARTBEAT_SECS)) + Duration::from_secs(30);
    let all: Vec<String> = before.iter().chain(&held).cloned().collect();
    feed_of_2_holds_within(&d, &all, "the posts made while the queue was held", limit)?;
    d.command(&format!("resume sync-2-{old}"))?;
    for s in [1, 2] {
        let feed = feed_texts(&d.server_dir(2, s), 2, 1)?;
        let order: Vec<&String> = feed.iter().filter(|t| all.contains(t)).collect();
        anyhow::ensure!(order == all.iter().collect::<Vec<_>>(), "server 2/{s}: posts out of order: {order:?}");
    }
    let origin = |s: u32| d.log(&format!("server-1-{s}"));
    for s in [1, 2] {
        anyhow::ensure!(
            !origin(s).contains("publishing the missing events again"),
            "cluster 1 published again events waiting in cluster 2's queue (server 1/{s})"
        );
    }
    Ok(())
}

/// A timeline stream says where its live posts continue the feed (its
/// response metadata), so a reader whose stream broke before any post came
/// (here an empty feed, and 30 posts made while it was away) resumes from
/// there and gets all 30, not the backlog's last 20. The control: opening
/// with no position gets only those 20.
#[test]
fn a_reader_that_got_no_post_before_a_break_gets_every_post_made_meanwhile() -> anyhow::Result<()> {
    let d = Deployment::start(1, 1)?;
    let rt = rt();
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let first = rt.block_on(load::read_feed(d.coord_port, 2, (0, 0), |_| true))?;
    assert!(first.posts.is_empty());
    let start = first.start.expect("the stream says where its live posts start");
    assert_eq!(start.0, 0, "an empty feed");
    assert_ne!(start.1, 0, "position 0 has an anchor of its own");
    let made = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 30, deadline));
    assert_eq!(made.acked.len(), 30);
    let all = |got: &[load::FeedPost]| got.len() >= 30;
    let resumed = rt.block_on(load::read_feed(d.coord_port, 2, start, all))?;
    let texts: Vec<&String> = resumed.posts.iter().map(|(t, ..)| t).collect();
    assert_eq!(texts, made.acked.iter().collect::<Vec<_>>(), "every post, in order");
    assert_eq!(resumed.posts.iter().map(|(_, p, _)| *p).collect::<Vec<_>>(), (1..=30).collect::<Vec<u64>>());
    assert_eq!(resumed.start, Some(start), "resumed where asked");
    let blind = rt.block_on(load::read_feed(d.coord_port, 2, (0, 0), |got| got.len() >= 20))?;
    let positions: Vec<u64> = blind.posts.iter().map(|(_, p, _)| *p).collect();
    assert_eq!(positions, (11..=30).collect::<Vec<u64>>(), "with no position, the backlog: the last 20");
    assert_eq!(blind.start.map(|(p, _)| p), Some(30), "its live posts would come after the last");
    Ok(())
}

/// A reader that stops reading its timeline for a while (a slow link, a
/// laptop lid closed) falls behind the live posts by more than the server
/// buffers for it. It used to miss the posts beyond that, silently (a log
/// line on the server); now its stream reads what it missed from its feed:
/// once it reads again it gets every post of every followee, in order,
/// once each.
#[test]
fn a_timeline_reader_that_stopped_reading_gets_every_post_in_order() -> anyhow::Result<()> {
    const WRITERS: [u32; 3] = [1, 3, 4];
    const EACH: usize = 1_500;
    let d = Deployment::start(1, 1)?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut inbound = rt.block_on(async {
        for w in WRITERS {
            load::follow_until_done(d.coord_port, 2, w, deadline).await?;
        }
        let mut sns = load::attach(d.coord_port, 2).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Message { username: "2".into(), ..Default::default() })?;
        let inbound = sns.timeline(UnboundedReceiverStream::new(rx)).await?.into_inner();
        anyhow::Ok((inbound, tx, sns))
    })?;
    // Posts of about 3 KB, so that HTTP/2's windows and buffers hold few
    // of them and the server's own buffer for the reader overflows.
    let reports = rt.block_on(async {
        let writers = WRITERS.map(|w| {
            let stop = Arc::new(AtomicBool::new(false));
            tokio::spawn(load::writer_padded(d.coord_port, w, stop, EACH, deadline, Arc::default(), 3_000))
        });
        let mut reports = Vec::new();
        for w in writers {
            reports.push(w.await?);
        }
        anyhow::Ok(reports)
    })?;
    for r in &reports {
        assert_eq!(r.acked.len(), EACH, "user {} acknowledged {} posts", r.user, r.acked.len());
    }
    // Now it reads: every post, each author's in the order acknowledged.
    let mut got: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let total = WRITERS.len() * EACH;
    let mut received = 0;
    rt.block_on(async {
        while received < total {
            let Ok(next) = tokio::time::timeout(Duration::from_secs(10), inbound.0.message()).await else {
                break;
            };
            let m = next?.ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
            got.entry(m.username.clone()).or_default().push(m.msg);
            received += 1;
        }
        anyhow::Ok(())
    })?;
    for r in &reports {
        let seen = got.remove(&r.user.to_string()).unwrap_or_default();
        assert_eq!(seen.len(), r.acked.len(), "user {}'s posts reached the reader {} times", r.user, seen.len());
        assert!(seen == r.acked, "user {}'s posts came out of order or changed", r.user);
    }
    assert!(got.is_empty(), "posts of users it does not follow: {:?}", got.keys());
    Ok(())
}
