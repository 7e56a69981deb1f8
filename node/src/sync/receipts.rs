//! Stream receipts between clusters: the receiving end tells each origin
//! how far it applied that origin's stream; the origin's master keeps
//! confirmed events until receipts cover them and has the ones a stuck
//! receiver lacks published again (see `server/resend.rs`). Receipts travel
//! through the broker like events: routed to the origin's queue, sealed
//! with the deployment's MAC, consumed by the synchronizer beside the
//! origin's master. They are not persistent: each is superseded by the
//! next, and a lost one only delays a resend.

use super::{Names, SyncConfig, send_batch};
use crate::error::{Error, Result};
use crate::net;
use crate::store::codec;
use lapin::Channel as AmqpChannel;
use lapin::options::BasicPublishOptions;
use prost::Message as _;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{StatusRequest, StreamGap, StreamReceipt};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often the receiving master's synchronizer looks at what its server
/// applied, and sends a receipt for each stream that moved or is held up.
pub const RECEIPT_EVERY: Duration = Duration::from_secs(1);
/// How often a receipt goes out for a stream that did not move (so an
/// origin learns that a receiver is idle short of its last events).
pub const RECEIPT_QUIET_EVERY: Duration = Duration::from_secs(5);
/// Receipts waiting for the server, at most (more are dropped: the next
/// one from the same cluster says the same, or more).
const RECEIPTS_QUEUED: usize = 64;

/// What the consumer is doing, for the receipts: when it last took events
/// off the queue, and how many batches the server has not answered yet.
pub struct Activity {
    last_events: Mutex<Instant>,
    pub in_flight: AtomicUsize,
    /// The consumer is registered with the broker (so the queue's
    /// consumers include it).
    pub consuming: AtomicBool,
}

impl Default for Activity {
    /// Counted from now: idle once [`RECEIPT_EVERY`] passes without events.
    fn default() -> Activity {
        Activity {
            last_events: Mutex::new(Instant::now()),
            in_flight: AtomicUsize::new(0),
            consuming: AtomicBool::new(false),
        }
    }
}

impl Activity {
    pub fn took_events(&self) {
        *self.last_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
    }

    /// Consuming, nothing taken off the queue for `quiet`, nothing
    /// waiting on the server.
    fn idle(&self, quiet: Duration) -> bool {
        self.consuming.load(Ordering::SeqCst)
            && self.in_flight.load(Ordering::SeqCst) == 0
            && self.last_events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed() >= quiet
    }
}

/// What came off this cluster's queue for the receipts' task.
#[derive(Debug)]
pub enum Taken {
    /// Another cluster's receipt of this cluster's stream.
    Receipt(StreamReceipt),
    /// Another cluster says events of its stream here are gone for good.
    Gap(StreamGap),
}

/// Checks a gap marker that came off this cluster's queue: for this
/// cluster, from another cluster of the deployment.
pub fn decode_gap(body: &[u8], cluster: u32, clusters: u32) -> Result<StreamGap> {
    let g = StreamGap::decode(body).map_err(|e| Error::Invalid(format!("undecodable gap marker: {e}")))?;
    if g.dest_cluster != cluster || g.origin_cluster == 0 || g.origin_cluster > clusters || g.origin_cluster == cluster
    {
        return Err(Error::Invalid(format!(
            "gap marker of cluster {}'s stream to cluster {}, taken by cluster {cluster} of {clusters}",
            g.origin_cluster, g.dest_cluster
        )));
    }
    Ok(g)
}

/// Checks a receipt that came off this cluster's queue: for this cluster's
/// stream, from another cluster of the deployment.
pub fn decode(body: &[u8], cluster: u32, clusters: u32) -> Result<StreamReceipt> {
    let r = StreamReceipt::decode(body).map_err(|e| Error::Invalid(format!("undecodable receipt: {e}")))?;
    if r.origin_cluster != cluster || r.from_cluster == 0 || r.from_cluster > clusters || r.from_cluster == cluster {
        return Err(Error::Invalid(format!(
            "receipt from cluster {} of cluster {}'s stream, taken by cluster {cluster} of {clusters}",
            r.from_cluster, r.origin_cluster
        )));
    }
    Ok(r)
}

/// Publishes `body` of AMQP type `kind` under `key`, sealed when there is
/// a secret, with `delivery_mode` (1 transient, 2 persistent).
async fn publish_sealed(
    channel: &AmqpChannel,
    names: &Names,
    key: &str,
    kind: &str,
    body: &[u8],
    delivery_mode: u8,
    secret: Option<&crate::auth::Secret>,
) -> Result<()> {
    let props = super::sealed_props(kind, body, delivery_mode, secret);
    channel
        .basic_publish(names.exchange.as_str().into(), key.into(), BasicPublishOptions::default(), body, props)
        .await?;
    Ok(())
}

/// Publishes one receipt to its origin's queue (not persistent).
async fn publish(channel: &AmqpChannel, names: &Names, r: &StreamReceipt, cfg: &SyncConfig) -> Result<()> {
    let key = format!("to.{}", r.origin_cluster);
    publish_sealed(channel, names, &key, codec::RECEIPT_TYPE, &r.encode_to_vec(), 1, cfg.secret.as_ref()).await
}

/// While this synchronizer consumes for its master: every
/// [`RECEIPT_EVERY`], a receipt to each origin whose stream moved or is
/// held up by a gap, and to the others every [`RECEIPT_QUIET_EVERY`].
pub async fn send(
    cfg: &SyncConfig,
    names: &Names,
    channel: &AmqpChannel,
    mut server: ReplicaClient<net::NodeChannel>,
    activity: &Activity,
) -> Result<()> {
    let mut sent: HashMap<u32, ((u64, u64, u64), Instant)> = HashMap::new();
    let mut every = tokio::time::interval(RECEIPT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let status = match server.status(StatusRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "no status for the receipts this time");
                continue;
            }
        };
        if !status.is_master {
            continue;
        }
        let idle = activity.idle(RECEIPT_EVERY) && drained(channel, names, cfg.cluster).await?;
        for m in status.streams {
            let mark = (m.epoch, m.applied, m.held);
            let due = sent
                .get(&m.origin)
                .is_none_or(|(last, at)| *last != mark || m.held > 0 || at.elapsed() >= RECEIPT_QUIET_EVERY);
            if !due {
                continue;
            }
            let receipt = StreamReceipt {
                from_cluster: cfg.cluster,
                origin_cluster: m.origin,
                epoch: m.epoch,
                applied: m.applied,
                held: m.held,
                idle,
                term: status.term,
            };
            publish(channel, names, &receipt, cfg).await?;
            sent.insert(m.origin, (mark, Instant::now()));
        }
    }
}

/// Whether the cluster's queue holds nothing for this synchronizer: no
/// message ready, and no consumer but this one (registered already: see
/// [`Activity::idle`]). A consumer that took nothing lately is not enough
/// to say the receiver is idle: while
/// another one holds the queue's single-consumer slot (a paused
/// synchronizer of the old master, until the broker drops it), the
/// messages it was delivered and those behind them wait, and an origin
/// told "idle" would publish them all again for nothing.
async fn drained(channel: &AmqpChannel, names: &Names, cluster: u32) -> Result<bool> {
    let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = channel
        .queue_declare(names.queue(cluster).as_str().into(), options, lapin::types::FieldTable::default())
        .await?;
    Ok(queue.message_count() == 0 && queue.consumer_count() <= 1)
}

/// A sender for receipts and gap markers taken off the queue, and its
/// receiving end.
pub fn queue() -> (mpsc::Sender<Taken>, mpsc::Receiver<Taken>) {
    mpsc::channel(RECEIPTS_QUEUED)
}

/// Hands each receipt taken off this cluster's queue to the server (the
/// master), and publishes again whatever it says the receiver lacks (after
/// a marker to step over what it lacks for good, if the server says so);
/// hands each gap marker to the server.
pub async fn answer(
    names: &Names,
    channel: &AmqpChannel,
    mut server: ReplicaClient<net::NodeChannel>,
    secret: Option<&crate::auth::Secret>,
    mut taken: mpsc::Receiver<Taken>,
) -> Result<()> {
    while let Some(t) = taken.recv().await {
        let r = match t {
            Taken::Receipt(r) => r,
            Taken::Gap(g) => {
                let (origin, upto) = (g.origin_cluster, g.upto);
                match server.skip_gap(g).await {
                    Ok(_) => tracing::warn!(
                        origin,
                        upto,
                        "went on after events of another cluster's stream it says are gone"
                    ),
                    Err(e) => tracing::warn!(origin, error = %e, "the server did not take a gap marker"),
                }
                continue;
            }
        };
        let from = r.from_cluster;
        let reply = match server.receipt(r).await {
            Ok(reply) => reply.into_inner(),
            Err(e) => {
                tracing::warn!(from, error = %e, "the server did not take a receipt");
                continue;
            }
        };
        if let Some(gap) = &reply.gap {
            // Persistent, and before the events that follow the hole.
            let key = format!("to.{}", gap.dest_cluster);
            publish_sealed(channel, names, &key, codec::GAP_TYPE, &gap.encode_to_vec(), 2, secret).await?;
            tracing::warn!(to = from, upto = gap.upto, "told a cluster to go on after events it lacks for good");
        }
        if reply.resend.is_empty() {
            continue;
        }
        let count = reply.resend.len();
        // Not confirmed: if the broker loses these too, the next receipt
        // says so again.
        drop(send_batch(channel, names, &reply.resend, secret).await?);
        tracing::info!(to = from, count, missing = reply.missing, "published events again for a stuck cluster");
        crate::metrics::get().resent.inc_by(count as u64);
    }
    std::future::pending().await
}
