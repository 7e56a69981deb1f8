//! Visibility follows the cluster's log, never clocks: posts whose client
//! clock is 30 s or a day behind or ahead, or absurd, reach every follower
//! (in the author's cluster and in others) exactly where they belong, with
//! the client's time displayed; and a post reaches only the clusters with
//! followers of its author.

use sns_e2e::load;
use sns_e2e::nodes::rt;
use sns_e2e::{DEADLINE, Deployment, check_convergence, spec_files};
use sns_proto::csce438::Message;
use sns_proto::prost_types::Timestamp;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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
        tx.send(Message { username: user.to_string(), msg: text.to_string(), timestamp, post_id: id })?;
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

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
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
    let now = now_secs();
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
