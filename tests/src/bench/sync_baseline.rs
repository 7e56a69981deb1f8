//! The like-for-like broker baseline: the synchronizers' own traffic, sent
//! and received with bare lapin, no Tiny SNS server behind either end.
//!
//! What a deployment of `clusters` clusters asks of the broker when its
//! users post, reproduced step by step (node/src/sync/mod.rs and
//! topology.rs):
//! - the deployment's own broker objects, declared by the node's
//!   [`topology::declare`] under a throwaway deployment name: a durable topic
//!   exchange and one durable queue per cluster, bound by the node's
//!   [`topology::bindings`] to `to.<c>`; a post whose author has followers
//!   in every other cluster is sent once to each of them (2 with 3
//!   clusters), numbered in its origin -> destination stream (only the
//!   synchronizer beside each cluster's master consumes, the other stands
//!   by);
//! - per cluster, one connection — the master's synchronizer's — with the
//!   synchronizer's URL (`sync::link_url`: 16 KiB frames, 10 s heartbeat), carrying its publisher and its consumer;
//! - one publisher per cluster on a confirm channel: up to
//!   [`PUBLISH_BATCH`] deliveries per publish, split into messages of one
//!   destination and at most [`MESSAGE_BYTES`], each a `SyncBatch` encoded
//!   by the node's codec, persistent; it does not wait for confirms before
//!   the next publish, but stops taking deliveries while
//!   [`UNCONFIRMED_MAX`] are unconfirmed;
//! - one consumer per cluster queue with prefetch [`PREFETCH`] that takes
//!   every delivery already arrived (up to [`APPLY_BATCH`] events), decodes
//!   it with the node's codec and acknowledges the last one with
//!   `multiple = true`.
//!
//! The publishers' outbox is always full here (nothing upstream limits
//! them), so every publish takes the whole [`PUBLISH_BATCH`]: this is the
//! broker's ceiling for the synchronizers' pattern. The rate counts events
//! published per second, from the first publish to the moment every queue
//! has received every event routed to it.

use super::stats::Clock;
use anyhow::{Context, Result, anyhow, bail};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use prost::Message as _;
use sns_node::store::codec;
use sns_node::sync::topology::{self, Names};
use sns_proto::internal::sync_event::Kind;
use sns_proto::internal::{Post, Recipient, SyncEvent};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

// The synchronizer's own settings.
pub use sns_node::sync::{APPLY_BATCH, FRAME_MAX, MESSAGE_BYTES, PREFETCH, PUBLISH_BATCH, UNCONFIRMED_MAX, link_url};
/// Encoded size of one event: a post of about 70 characters in its
/// `SyncEvent` (the bench's own posts, `<seq>:<send time>`, are shorter).
pub const EVENT_BYTES: usize = 100;
/// The throwaway queues outlive a crashed bench by at most this long.
const QUEUE_EXPIRES: Duration = Duration::from_secs(60);

/// What the run was asked to do.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    pub clusters: u32,
    /// Events published in all (split evenly over the clusters).
    pub events: usize,
    /// Publishing stops at this time even if `events` were not all sent;
    /// the rate counts what was.
    pub publish_budget: Duration,
    /// After publishing ends, how long every queue may take to receive
    /// everything routed to it (exceeding it is an error: a loss).
    pub drain: Duration,
}

/// The result: events per second, end to end.
#[derive(Debug, Clone, Default)]
pub struct SyncRate {
    /// Events published (and received by every queue they were routed to)
    /// per second, first publish to last delivery.
    pub events_per_s: f64,
    pub events: usize,
    pub messages: usize,
    /// Queues each post event reaches (a message per destination).
    pub queues_per_message: usize,
    /// Event copies received by all queues together.
    pub deliveries: usize,
}

/// Runs the pattern against the broker at `url`, on objects named after
/// `prefix` (deleted afterwards).
pub async fn run(url: &str, prefix: &str, p: Pattern) -> Result<SyncRate> {
    let deployment = format!("{prefix}-sync");
    let names = Names::new(&deployment);
    let setup = crate::broker::connect(url).await?;
    let ch = setup.create_channel().await?;
    topology::declare(&ch, &names, p.clusters, Some(QUEUE_EXPIRES), topology::QueueType::Classic)
        .await
        .map_err(|e| anyhow!("declaring the synchronizers' broker objects: {e}"))?;
    let result = run_on(url, &names, p).await;
    let deleted = super::baseline::delete_deployment_objects(url, &deployment, p.clusters).await;
    setup.close(200, "bench done".into()).await.ok();
    let rate = result?;
    deleted.context("deleting the baseline's broker objects")?;
    Ok(rate)
}

async fn run_on(url: &str, names: &Names, p: Pattern) -> Result<SyncRate> {
    let clock = Clock::new();
    // The master's synchronizer of each cluster: one connection.
    let mut conns = Vec::new();
    for _ in 1..=p.clusters {
        conns.push(crate::broker::connect(&link_url(url)).await?);
    }
    // Per origin cluster, how many events it published (known once it is
    // done publishing); consumers end once they hold all routed to them.
    let (published_tx, published_rx) = watch::channel(HashMap::<u32, u64>::new());
    let mut consumers = Vec::new();
    for c in 1..=p.clusters {
        let ch = conns[c as usize - 1].create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let deliveries = ch
            .basic_consume(
                names.queue(c).as_str().into(),
                format!("bench-sync-{c}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let rx = published_rx.clone();
        let (origins, clusters) = (post_origins(c, p.clusters), p.clusters);
        consumers.push(tokio::spawn(async move {
            let _ch = ch;
            consume(deliveries, c, clusters, origins, rx, clock).await
        }));
    }
    let per_origin = p.events.div_ceil(p.clusters as usize);
    let t0 = clock.ns();
    let stop = Instant::now() + p.publish_budget;
    let mut publishers = Vec::new();
    for c in 1..=p.clusters {
        let ch = conns[c as usize - 1].create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let exchange = names.exchange.clone();
        let clusters = p.clusters;
        publishers.push(tokio::spawn(async move { publish(&ch, &exchange, c, clusters, per_origin, stop).await }));
    }
    // Every task ends with the run, whatever happened to it.
    let tasks: Vec<tokio::task::AbortHandle> =
        consumers.iter().map(|h| h.abort_handle()).chain(publishers.iter().map(|h| h.abort_handle())).collect();
    let mut published = HashMap::new();
    let (mut events, mut messages) = (0, 0);
    let mut failure = None;
    // Publishing stops at `stop`; confirms of what is out follow within
    // the drain time.
    let confirmed_by = stop + p.drain;
    for (i, h) in publishers.into_iter().enumerate() {
        let left = confirmed_by.saturating_duration_since(Instant::now());
        let joined = match tokio::time::timeout(left, h).await {
            Ok(joined) => joined.map_err(|e| anyhow!("publisher task: {e}")).and_then(|r| r),
            Err(_) => Err(anyhow!("its messages were not confirmed within {:?} of the end of publishing", p.drain)),
        };
        match joined {
            Ok((n, m)) => {
                published.insert(i as u32 + 1, n as u64);
                events += n;
                messages += m;
            }
            Err(e) => failure = failure.or(Some(e.context(format!("publisher of cluster {}", i + 1)))),
        }
    }
    published_tx.send_replace(published);
    let deadline = Instant::now() + p.drain;
    let mut last = t0;
    let mut deliveries = 0;
    for (i, h) in consumers.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, h).await {
            Ok(Ok(Ok(q))) => {
                last = last.max(q.last_ns);
                deliveries += q.events;
            }
            Ok(Ok(Err(e))) => failure = failure.or(Some(e.context(format!("consumer of queue {}", i + 1)))),
            Ok(Err(e)) => failure = failure.or(Some(anyhow!("consumer task {}: {e}", i + 1))),
            Err(_) => {
                failure = failure.or(Some(anyhow!(
                    "queue {} did not receive every event routed to it within {:?} of the last publish",
                    i + 1,
                    p.drain
                )))
            }
        }
    }
    for t in tasks {
        t.abort();
    }
    for conn in conns {
        conn.close(200, "bench done".into()).await.ok();
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if events == 0 {
        bail!("nothing was published within {:?}", p.publish_budget);
    }
    let secs = last.saturating_sub(t0) as f64 / 1e9;
    Ok(SyncRate {
        events_per_s: events as f64 / secs.max(1e-9),
        events,
        messages,
        // Each post event is sent once to each other cluster's queue.
        queues_per_message: p.clusters.saturating_sub(1) as usize,
        deliveries,
    })
}

/// The clusters whose posts reach the queue of `cluster`: every other one
/// (their authors have followers everywhere).
fn post_origins(cluster: u32, clusters: u32) -> Vec<u32> {
    (1..=clusters).filter(|o| *o != cluster).collect()
}

/// Post `seq` of origin `cluster` for cluster `dest`, about [`EVENT_BYTES`]
/// encoded, one recipient (the deployment's posts name their readers).
fn event(cluster: u32, dest: u32, seq: u64, padding: &str) -> SyncEvent {
    SyncEvent {
        origin_cluster: cluster,
        seq,
        kind: Some(Kind::Post(Post {
            user: cluster,
            text: padding.to_string(),
            at_ms: 1_790_000_000_000 + seq as i64,
            client_id: seq,
        })),
        epoch: 1,
        dest_cluster: dest,
        dest_seq: seq,
        recipients: vec![Recipient { user: dest, follow_id: 1 }],
    }
}

/// The padding that makes an event [`EVENT_BYTES`] long (seqs of up to 5
/// digits; longer ones add a byte or two).
fn padding() -> String {
    let base = event(1, 2, 10_000, "").encoded_len();
    "x".repeat(EVENT_BYTES.saturating_sub(base + 2))
}

/// Publishes `count` events of origin `cluster` the synchronizer's way;
/// returns (events, messages) published, all confirmed.
async fn publish(
    ch: &lapin::Channel,
    exchange: &str,
    cluster: u32,
    clusters: u32,
    count: usize,
    stop: Instant,
) -> Result<(usize, usize)> {
    let pad = padding();
    let dests = post_origins(cluster, clusters);
    let mut inflight = FuturesOrdered::new();
    let (mut seq, mut unconfirmed, mut messages) = (0u64, 0usize, 0usize);
    loop {
        let sending = (seq as usize) < count && Instant::now() < stop;
        if sending && unconfirmed < UNCONFIRMED_MAX {
            // A publish takes PUBLISH_BATCH deliveries: posts times their
            // destinations, grouped by destination as the synchronizer does.
            let n = (PUBLISH_BATCH / dests.len().max(1)).max(1).min(count - seq as usize);
            let batch: Vec<SyncEvent> = dests
                .iter()
                .flat_map(|d| (1..=n as u64).map(|i| event(cluster, *d, seq + i, &pad)).collect::<Vec<_>>())
                .collect();
            seq += n as u64;
            let k = batch.len();
            let mut confirms = Vec::new();
            for run in runs(&batch, MESSAGE_BYTES) {
                let (first, last) = (&run[0], &run[run.len() - 1]);
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/x-protobuf".into())
                    .with_type(codec::BATCH_TYPE.into())
                    .with_message_id(format!("{}:{}-{}", first.origin_cluster, first.seq, last.seq).into());
                let key = topology::routing_key(first);
                confirms.push(
                    ch.basic_publish(
                        exchange.into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &codec::encode_batch(run),
                        props,
                    )
                    .await?,
                );
                messages += 1;
            }
            unconfirmed += k;
            inflight.push_back(async move {
                for c in confirms {
                    if !c.await?.is_ack() {
                        bail!("the broker refused a message (nack)");
                    }
                }
                Ok(k)
            });
            continue;
        }
        // Wait for the oldest publish's confirms: room for the next batch,
        // or the end.
        match inflight.next().await {
            Some(done) => unconfirmed -= done?,
            None => break,
        }
    }
    Ok((seq as usize, messages))
}

/// Consecutive events of one routing key (destination) and at most
/// `max_bytes`.
fn runs(events: &[SyncEvent], max_bytes: usize) -> Vec<&[SyncEvent]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        let size = e.encoded_len();
        if i > start && (bytes + size > max_bytes || e.dest_cluster != events[start].dest_cluster) {
            out.push(&events[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

/// What one queue received.
struct Received {
    events: usize,
    last_ns: u64,
}

/// Receives the queue of `cluster` the synchronizer's way until it holds
/// every event the publishers of `origins` routed to it. Each origin's
/// events must arrive once each, in seq order.
async fn consume(
    mut deliveries: lapin::Consumer,
    cluster: u32,
    clusters: u32,
    origins: Vec<u32>,
    mut published: watch::Receiver<HashMap<u32, u64>>,
    clock: Clock,
) -> Result<Received> {
    let mut next: HashMap<u32, u64> = origins.into_iter().map(|o| (o, 1)).collect();
    let mut r = Received { events: 0, last_ns: 0 };
    let done = |next: &HashMap<u32, u64>, published: &HashMap<u32, u64>| {
        !published.is_empty() && next.iter().all(|(o, n)| *n > published.get(o).copied().unwrap_or(0))
    };
    loop {
        if done(&next, &published.borrow()) {
            return Ok(r);
        }
        let first = tokio::select! {
            d = deliveries.next() => d,
            changed = published.changed() => {
                changed.map_err(|_| anyhow!("the bench stopped"))?;
                continue;
            }
        };
        let mut item = first;
        let (mut events, mut last) = (0, None);
        while let Some(delivery) = item.take() {
            let delivery = delivery?;
            let batch = delivery.properties.kind().as_ref().is_some_and(|k| k.as_str() == codec::BATCH_TYPE);
            let decoded = codec::decode_message(&delivery.data, batch, clusters)
                .map_err(|e| anyhow!("a message of the baseline does not decode: {e}"))?;
            for e in &decoded {
                let expected = next.get_mut(&e.origin_cluster).ok_or_else(|| {
                    anyhow!("queue of cluster {cluster} received an event of cluster {}", e.origin_cluster)
                })?;
                if e.seq != *expected {
                    bail!(
                        "queue of cluster {cluster}: event {}:{} arrived when {}:{} was due ({})",
                        e.origin_cluster,
                        e.seq,
                        e.origin_cluster,
                        expected,
                        if e.seq < *expected { "a duplicate" } else { "events lost" }
                    );
                }
                *expected += 1;
            }
            events += decoded.len();
            last = Some(delivery);
            if events < APPLY_BATCH {
                item = deliveries.next().now_or_never().flatten();
            }
        }
        r.events += events;
        r.last_ns = clock.ns();
        if let Some(last) = last {
            last.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_the_intended_size_and_batches_split_by_bytes() {
        let pad = padding();
        let e = event(2, 1, 1234, &pad);
        assert!((EVENT_BYTES - 3..=EVENT_BYTES + 1).contains(&e.encoded_len()), "{}", e.encoded_len());
        // Valid for the node's codec (what a synchronizer would apply).
        assert!(codec::event_from_pb(&e, 3).is_ok());
        let batch: Vec<SyncEvent> = (1..=PUBLISH_BATCH as u64).map(|s| event(1, 2, s, &pad)).collect();
        // A full publish fits in one message, as in the synchronizer.
        assert_eq!(runs(&batch, MESSAGE_BYTES).len(), 1);
        let split = runs(&batch, 10 * EVENT_BYTES);
        assert!(split.len() > 100 && split.iter().all(|r| !r.is_empty()));
        assert_eq!(split.iter().map(|r| r.len()).sum::<usize>(), batch.len());
        assert_eq!(topology::routing_key(&batch[0]), "to.2");
        assert_eq!(link_url("amqp://h/%2f"), "amqp://h/%2f?frame_max=16384&heartbeat=10");
        // Every other cluster's posts, as the deployment binds them.
        assert_eq!(post_origins(2, 3), vec![1, 3]);
    }
}
