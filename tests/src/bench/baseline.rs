//! The raw baselines, measured in the same run on the same machine: what
//! the hardware and the libraries we build on give before any Tiny SNS
//! logic — a bare tonic unary round trip, an fsync'd append, the broker's
//! raw rate for single small messages and its one-message hop, and a
//! process spawn. The broker baseline that reproduces the synchronizers'
//! own traffic (batched messages, their fan-out, their settings) is
//! [`super::sync_baseline`]; the raw rate here is kept beside it.

use super::stats::{Clock, Samples, ms};
use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use sns_node::sync::topology::Names;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// The raw rate's own settings, not the synchronizers' (theirs are in
/// [`super::sync_baseline`]): the publisher waits for the confirms of every
/// 256 messages before it sends the next 256, and the broker may push 256
/// unacknowledged deliveries ahead of the consumer, which acknowledges each
/// message on its own. Large enough that neither wait dominates the rate
/// of single 100-byte messages.
const RAW_CONFIRM_BATCH: usize = 256;
const RAW_PREFETCH: u16 = 256;
/// One event per message: about a post's `SyncEvent` with a 70-character
/// text (the same size as [`super::sync_baseline::EVENT_BYTES`]).
const PAYLOAD: usize = super::sync_baseline::EVENT_BYTES;
/// A throwaway queue outlives a crashed bench by at most this long.
const QUEUE_EXPIRES_MS: i64 = 60_000;

/// Sequential gRPC health checks against a node (a bare tonic server in
/// another process): microseconds per round trip.
pub async fn grpc_unary(addr: &str, calls: usize, budget: Duration) -> Result<Samples> {
    let mut client = HealthClient::new(super::grpc::connect(addr).await?);
    let req = || HealthCheckRequest { service: "csce438.CoordService".into() };
    // Warm the connection and both sides' allocators.
    for _ in 0..20 {
        client.check(req()).await?;
    }
    let mut samples = Samples::default();
    let deadline = Instant::now() + budget;
    while samples.len() < calls && Instant::now() < deadline {
        let t = Instant::now();
        client.check(req()).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// Appends of a ~100-byte record to a file in `dir`, each followed by
/// fdatasync, as the journal does: microseconds per append.
pub fn fsync_append(dir: &Path, appends: usize, budget: Duration) -> Result<Samples> {
    let path = dir.join(format!("sns-bench-fsync-{}.log", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let record = [b'x'; PAYLOAD];
    let mut samples = Samples::default();
    let deadline = Instant::now() + budget;
    let result = (|| {
        while samples.len() < appends && Instant::now() < deadline {
            let t = Instant::now();
            file.write_all(&record)?;
            file.sync_data()?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<_, std::io::Error>(())
    })();
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("appending to {}", path.display()))?;
    Ok(samples)
}

/// Wall time of spawning `program --help` to its exit: the floor of
/// starting one node process (milliseconds).
pub fn process_spawn(program: &Path, runs: usize) -> Result<Samples> {
    let mut samples = Samples::default();
    for _ in 0..runs {
        let t = Instant::now();
        let status = std::process::Command::new(program)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .with_context(|| format!("running {}", program.display()))?;
        if !status.success() {
            bail!("{} --help failed: {status}", program.display());
        }
        samples.push(ms(t.elapsed()));
    }
    Ok(samples)
}

/// Publish→consume throughput figures of the broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerRate {
    /// Messages published and consumed (by every queue) per second.
    pub msgs_per_s: f64,
    pub messages: usize,
}

struct Broker {
    conn: Connection,
    prefix: String,
}

impl Broker {
    async fn connect(url: &str, prefix: &str) -> Result<Broker> {
        let conn = crate::broker::connect(url).await?;
        Ok(Broker { conn, prefix: prefix.to_string() })
    }

    async fn durable_queue(&self, ch: &Channel, name: &str) -> Result<()> {
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
        ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args).await?;
        Ok(())
    }

    /// A consumer on `queue` (prefetch [`RAW_PREFETCH`]) that acks every
    /// delivery on its own and reports the time (ns on `clock`) each one
    /// arrived.
    async fn consumer(&self, queue: &str, clock: Clock) -> Result<mpsc::UnboundedReceiver<u64>> {
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(RAW_PREFETCH, BasicQosOptions::default()).await?;
        let mut deliveries = ch
            .basic_consume(
                queue.into(),
                format!("{queue}-consumer").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(delivery)) = deliveries.next().await {
                let at = clock.ns();
                if delivery.ack(BasicAckOptions::default()).await.is_err() || tx.send(at).is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn publisher(&self) -> Result<Channel> {
        let ch = self.conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(ch)
    }

    /// Closes the connection, giving the broker 5 s to answer (a close
    /// that never ends would hold up the run; the connection is dropped
    /// then, and stderr says so, naming where a baseline hung).
    async fn close(self) {
        let limit = Duration::from_secs(5);
        if tokio::time::timeout(limit, self.conn.close(200, "bench done".into())).await.is_err() {
            eprintln!("sns-bench: closing a baseline's broker connection did not end within {limit:?}: dropped");
        }
    }
}

/// Persistent (delivery mode 2), like the synchronizers' messages.
fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/x-protobuf".into())
}

/// Publishes `count` persistent messages of [`PAYLOAD`] bytes to
/// `exchange` with `key`, [`RAW_CONFIRM_BATCH`] at a time, waiting for each
/// group's confirms before the next (unlike the synchronizer, which keeps
/// publishing while confirms are out).
async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, count: usize) -> Result<()> {
    let payload = vec![b'p'; PAYLOAD];
    let mut sent = 0;
    while sent < count {
        let n = RAW_CONFIRM_BATCH.min(count - sent);
        let mut confirms = Vec::with_capacity(n);
        for _ in 0..n {
            confirms.push(
                ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), &payload, persistent())
                    .await?,
            );
        }
        for c in confirms {
            if !c.await?.is_ack() {
                bail!("broker nacked a publish");
            }
        }
        sent += n;
    }
    Ok(())
}

/// Waits until each receiver has seen `count` deliveries; returns the
/// latest arrival time (ns).
async fn wait_consumed(rxs: &mut [mpsc::UnboundedReceiver<u64>], count: usize, deadline: Instant) -> Result<u64> {
    let mut last = 0;
    for rx in rxs.iter_mut() {
        for i in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(at)) => last = last.max(at),
                Ok(None) => bail!("consumer stopped after {i} of {count} messages"),
                Err(_) => bail!("consumed only {i} of {count} messages in time"),
            }
        }
    }
    Ok(last)
}

/// Raw publish→consume rate of single small messages: one publisher
/// channel and one consumer per queue on one connection (the broker's
/// default frame size), durable queues, persistent [`PAYLOAD`]-byte
/// messages (one per event, no batching), confirms awaited per
/// [`RAW_CONFIRM_BATCH`], prefetch [`RAW_PREFETCH`] and one ack per
/// message. The rate is messages / (first publish → last delivery). With
/// `fanout > 1`, a durable topic exchange routes every message to
/// `fanout` durable queues (as a post goes to the other clusters'
/// synchronizer queues), the last delivery is the last of any queue, and
/// the rate counts messages published. Not the synchronizers' pattern:
/// that is [`super::sync_baseline`].
pub async fn broker_rate(url: &str, prefix: &str, fanout: usize, count: usize, budget: Duration) -> Result<BrokerRate> {
    let broker = Broker::connect(url, prefix).await?;
    let result = broker_rate_on(&broker, fanout, count, budget).await;
    broker.close().await;
    result
}

async fn broker_rate_on(broker: &Broker, fanout: usize, count: usize, budget: Duration) -> Result<BrokerRate> {
    let clock = Clock::new();
    let setup = broker.conn.create_channel().await?;
    let exchange = format!("{}.fanout{fanout}", broker.prefix);
    let queues: Vec<String> = (1..=fanout).map(|i| format!("{}.fanout{fanout}.q{i}", broker.prefix)).collect();
    let (target, key) = if fanout > 1 {
        setup
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        (exchange.clone(), "post.1".to_string())
    } else {
        (String::new(), queues[0].clone())
    };
    for q in &queues {
        broker.durable_queue(&setup, q).await?;
        if fanout > 1 {
            setup
                .queue_bind(
                    q.as_str().into(),
                    exchange.as_str().into(),
                    "post.*".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    let run = async {
        let mut rxs = Vec::new();
        for q in &queues {
            rxs.push(broker.consumer(q, clock).await?);
        }
        let ch = broker.publisher().await?;
        let deadline = Instant::now() + budget;
        let t0 = clock.ns();
        let publish = tokio::time::timeout(budget, publish_confirmed(&ch, &target, &key, count));
        publish.await.map_err(|_| anyhow!("publishing {count} messages took over {budget:?}"))??;
        let last = wait_consumed(&mut rxs, count, deadline).await?;
        let secs = (last.saturating_sub(t0)) as f64 / 1e9;
        Ok(BrokerRate { msgs_per_s: count as f64 / secs.max(1e-9), messages: count })
    };
    let result = run.await;
    for q in &queues {
        setup.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.ok();
    }
    if fanout > 1 {
        setup.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await.ok();
    }
    result
}

/// One persistent 100-byte message at a time through a durable queue (the
/// default exchange, a confirm channel; the next is published once the
/// previous was delivered and confirmed): microseconds from publish to its
/// delivery to the consumer (the broker hop of a post). The first 5 warm
/// the channels and are not counted.
pub async fn broker_latency(url: &str, prefix: &str, count: usize, budget: Duration) -> Result<Samples> {
    let broker = Broker::connect(url, prefix).await?;
    let clock = Clock::new();
    let queue = format!("{prefix}.latency");
    let setup = broker.conn.create_channel().await?;
    broker.durable_queue(&setup, &queue).await?;
    let run = async {
        let mut rx = broker.consumer(&queue, clock).await?;
        let ch = broker.publisher().await?;
        let payload = vec![b'p'; PAYLOAD];
        let mut samples = Samples::default();
        let deadline = Instant::now() + budget;
        // The first few warm the channels and the queue process.
        let mut i = 0;
        while samples.len() < count && Instant::now() < deadline {
            let t0 = clock.ns();
            let confirm = ch
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &payload, persistent())
                .await?;
            let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
            let at = tokio::time::timeout(left, rx.recv())
                .await
                .map_err(|_| anyhow!("a message took over {left:?} to arrive"))?
                .ok_or_else(|| anyhow!("consumer stopped"))?;
            confirm.await?;
            if i >= 5 {
                samples.push((at - t0) as f64 / 1e3);
            }
            i += 1;
        }
        Ok(samples)
    };
    let result = run.await;
    setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.ok();
    broker.close().await;
    result
}

/// Deletes the broker objects a deployment named `deployment` declared
/// (README "Broker objects"; the names are the node's own), once it has
/// stopped.
pub async fn delete_deployment_objects(url: &str, deployment: &str, clusters: u32) -> Result<()> {
    let names = Names::new(deployment);
    let broker = Broker::connect(url, deployment).await?;
    let ch = broker.conn.create_channel().await?;
    let mut queues: Vec<String> = (1..=clusters).map(|c| names.queue(c)).collect();
    queues.push(names.dead.clone());
    for q in &queues {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    for x in [&names.exchange, &names.dead] {
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await?;
    }
    broker.close().await;
    Ok(())
}
