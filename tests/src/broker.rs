//! What the suites do on the broker directly: publish into a deployment's
//! exchange as a forger would, read what its receivers dead-lettered, and
//! stop and start the local broker itself.

use crate::{DEADLINE, amqp_url};
use anyhow::Result;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sns_node::sync::topology::Names;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long connecting to the broker may take here: lapin's handshake has
/// no bound of its own, and a connection that never completes must fail
/// the test or the bench phase, not hang it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the broker at `url` within [`CONNECT_TIMEOUT`].
pub async fn connect(url: &str) -> Result<Connection> {
    tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, ConnectionProperties::default()))
        .await
        .map_err(|_| anyhow::anyhow!("the broker at {url} did not complete the connection within {CONNECT_TIMEOUT:?}"))?
        .map_err(Into::into)
}

/// A connection to the real broker, with one channel.
pub struct Broker {
    conn: Connection,
    pub channel: Channel,
    /// The deployment's broker objects, named as the nodes name them.
    names: Names,
}

impl Broker {
    /// Connects for the deployment named `deployment`.
    pub async fn connect(deployment: &str) -> Result<Broker> {
        let conn = connect(&amqp_url()).await?;
        let channel = conn.create_channel().await?;
        Ok(Broker { conn, channel, names: Names::new(deployment) })
    }

    /// Waits until cluster `cluster`'s queue exists and has a consumer
    /// (its master's synchronizer): a message published to a queue not yet
    /// declared and bound is dropped as unroutable. Fails after
    /// [`DEADLINE`].
    pub async fn wait_consumed(&self, cluster: u32) -> Result<()> {
        let queue = self.names.queue(cluster);
        let deadline = Instant::now() + DEADLINE;
        loop {
            // A passive declaration of a queue that does not exist closes
            // the channel: one channel per look.
            let channel = self.conn.create_channel().await?;
            let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            let consumed = match channel
                .queue_declare(queue.as_str().into(), options, lapin::types::FieldTable::default())
                .await
            {
                Ok(q) => {
                    let _ = channel.close(200, "done".into()).await;
                    q.consumer_count() > 0
                }
                Err(_) => false,
            };
            if consumed {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "queue {queue} has no consumer after {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes `body` to the deployment's event exchange under `key`
    /// (e.g. `to.2`) and waits for the broker's confirm.
    pub async fn publish(&self, key: &str, body: &[u8], props: BasicProperties) -> Result<()> {
        self.channel
            .basic_publish(self.names.exchange.as_str().into(), key.into(), BasicPublishOptions::default(), body, props)
            .await?
            .await?;
        Ok(())
    }

    /// Takes `count` messages off the deployment's dead-letter queue,
    /// polling until [`DEADLINE`]; fewer if they do not come.
    pub async fn dead_letters(&self, count: usize) -> Result<Vec<BasicGetMessage>> {
        let queue = &self.names.dead;
        let deadline = Instant::now() + DEADLINE;
        let mut dead = Vec::new();
        while dead.len() < count && Instant::now() < deadline {
            match self.channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await? {
                Some(m) => dead.push(m),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(dead)
    }

    /// Deletes every message waiting in cluster `cluster`'s queue, as a
    /// broker that loses what it confirmed would (a disk replaced, a queue
    /// purged by hand): returns how many there were.
    pub async fn purge(&self, cluster: u32) -> Result<u32> {
        let queue = self.names.queue(cluster);
        Ok(self.channel.queue_purge(queue.as_str().into(), lapin::options::QueuePurgeOptions::default()).await?)
    }

    pub async fn close(self) -> Result<()> {
        self.conn.close(200, "done".into()).await?;
        Ok(())
    }
}

/// Runs `rabbitmqctl` against the local broker.
pub fn rabbitmqctl(args: &[&str]) -> Result<()> {
    control("rabbitmqctl", args).map(drop)
}

/// Runs one of the broker's control tools; returns what it printed.
fn control(tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(tool).args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").output()?;
    anyhow::ensure!(
        out.status.success(),
        "{tool} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `test` may stop or fill the broker: a local one it can
/// control. A remote broker (AMQP_URL) skips the test (recorded, saying
/// it must not be `disturbed`); a local one `rabbitmqctl` cannot control
/// is an error.
pub fn local_or_skip(test: &str, disturbed: &str) -> Result<bool> {
    if !local() {
        crate::skip(test, &format!("AMQP_URL names a remote broker, which this test must not {disturbed}"));
        return Ok(false);
    }
    rabbitmqctl(&["status"]).map_err(|e| anyhow::anyhow!("the local broker cannot be controlled: {e}"))?;
    Ok(true)
}

/// Whether the suites may stop the broker: a local RabbitMQ. A remote
/// broker (AMQP_URL) is the one documented reason to leave that out; a
/// local broker without `rabbitmqctl` is a broken setup and fails.
pub fn local() -> bool {
    let url = amqp_url();
    url.contains("@127.0.0.1") || url.contains("@localhost") || url.contains("@[::1]")
}

/// The local broker's app, stopped; started again when dropped, whatever
/// happens, so a failing test never leaves the machine without its broker.
pub struct StoppedBroker(bool);

impl StoppedBroker {
    pub fn stop() -> Result<StoppedBroker> {
        rabbitmqctl(&["stop_app"])?;
        Ok(StoppedBroker(true))
    }

    /// Starts the app again and waits until it serves.
    pub fn start(mut self) -> Result<()> {
        self.0 = false;
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup"])
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if self.0 {
            let _ = rabbitmqctl(&["start_app"]);
        }
    }
}

/// The free-disk limit that raises the alarm: 10^15 bytes, beyond any
/// disk. `scripts/ensure-rabbitmq.sh` puts a limit left at this value (a
/// test killed while it held the alarm) back to RabbitMQ's default.
pub const ALARM_LIMIT: &str = "1000000000000000";

/// The local broker out of disk: its free-disk alarm raised (the limit
/// set far above the disk's size), so RabbitMQ blocks every connection
/// that publishes, until [`DiskAlarm::clear`] (or drop, whatever happens)
/// puts the limit back as it was.
pub struct DiskAlarm {
    /// `rabbitmqctl set_disk_free_limit` arguments that restore the limit.
    restore: Vec<String>,
    raised: bool,
}

impl DiskAlarm {
    pub fn raise() -> Result<DiskAlarm> {
        DiskAlarm::clear_left()?;
        // The limit in force (`set_disk_free_limit` changes it, not the
        // configured one).
        let restore = vec![eval("rabbit_disk_monitor:get_disk_free_limit().")?.trim().to_string()];
        set_disk_free_limit(&[ALARM_LIMIT.to_string()])?;
        let alarm = DiskAlarm { restore, raised: true };
        crate::eventually("the broker's free-disk alarm", || alarms().ok()?.contains("disk").then_some(()))?;
        Ok(alarm)
    }

    /// Puts the configured limit back if a test killed while it held the
    /// alarm left ours in force (as `scripts/ensure-rabbitmq.sh` does).
    pub fn clear_left() -> Result<()> {
        if eval("rabbit_disk_monitor:get_disk_free_limit().")?.trim() == ALARM_LIMIT {
            let configured = parse_disk_free_limit(&eval("application:get_env(rabbit, disk_free_limit).")?)?;
            set_disk_free_limit(&configured)?;
            eprintln!(
                "the broker's free-disk limit was left at {ALARM_LIMIT} by a killed test: put back to {configured:?}"
            );
        }
        Ok(())
    }

    /// Puts the limit back and waits until the broker reports no alarm.
    pub fn clear(mut self) -> Result<()> {
        self.raised = false;
        set_disk_free_limit(&self.restore)?;
        crate::eventually("the broker's free-disk alarm to clear", || (!alarms().ok()?.contains("disk")).then_some(()))
    }
}

impl Drop for DiskAlarm {
    fn drop(&mut self) {
        if self.raised {
            let _ = set_disk_free_limit(&self.restore);
        }
    }
}

/// `rabbitmqctl set_disk_free_limit` with `limit` (its arguments).
fn set_disk_free_limit(limit: &[String]) -> Result<()> {
    let args: Vec<&str> = std::iter::once("set_disk_free_limit").chain(limit.iter().map(String::as_str)).collect();
    rabbitmqctl(&args)
}

/// What `rabbitmqctl eval` prints for `expr`.
fn eval(expr: &str) -> Result<String> {
    control("rabbitmqctl", &["eval", expr])
}

/// The broker's alarms, as `rabbitmq-diagnostics alarms` words them.
fn alarms() -> Result<String> {
    Ok(control("rabbitmq-diagnostics", &["-q", "alarms"])?.to_lowercase())
}

/// `set_disk_free_limit` arguments for the value `rabbitmqctl eval` printed:
/// `{ok,50000000}` (bytes), `{ok,"50MB"}` or `{ok,{mem_relative,1.5}}`.
fn parse_disk_free_limit(printed: &str) -> Result<Vec<String>> {
    let v = printed.trim().strip_prefix("{ok,").and_then(|v| v.strip_suffix('}')).map(str::trim);
    match v {
        Some(v) if v.starts_with("{mem_relative,") => {
            let ratio = v.trim_start_matches("{mem_relative,").trim_end_matches('}').trim();
            Ok(vec!["mem_relative".into(), ratio.into()])
        }
        Some(v) if !v.is_empty() => Ok(vec![v.trim_matches('"').to_string()]),
        _ => anyhow::bail!("cannot read the broker's disk_free_limit from {printed:?}"),
    }
}

/// Stands where the broker should be, on a free loopback port, relaying
/// each connection to the real broker while it relays. Silenced, it is a
/// partition without a reset: the connections it was relaying stop
/// carrying anything either way without being closed (a broker whose host
/// vanished), and new ones are accepted and never answered (a broker hung
/// mid-handshake, or a proxy in front of one that is gone). Restored, it
/// closes everything it held and relays new connections again.
pub struct StandIn {
    /// The broker URL (credentials, virtual host) through the stand-in.
    pub url: String,
    relaying: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
    released: Arc<AtomicUsize>,
}

impl StandIn {
    /// Starts relaying (or silent) on `rt`, in front of the broker of
    /// [`amqp_url`].
    pub fn start(rt: &tokio::runtime::Runtime, relaying: bool) -> Result<StandIn> {
        let real = amqp_url();
        let broker = sns_node::launcher::broker_addr(&real);
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let url = real.replacen(&broker, &format!("127.0.0.1:{}", listener.local_addr()?.port()), 1);
        anyhow::ensure!(url != real, "cannot find the broker's address {broker} in {real}");
        let (tx, rx) = watch::channel(relaying);
        let (held, released) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        rt.spawn(stand_in(listener, rx, held.clone(), released.clone(), broker));
        Ok(StandIn { url, relaying: tx, held, released })
    }

    pub fn silence(&self) {
        self.relaying.send_replace(false);
    }

    pub fn restore(&self) {
        self.relaying.send_replace(true);
    }

    /// Connections accepted while silent, so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Of those, how many the client closed (or reset) while held.
    pub fn released(&self) -> usize {
        self.released.load(Ordering::SeqCst)
    }
}

async fn stand_in(
    listener: TcpListener,
    relaying: watch::Receiver<bool>,
    held: Arc<AtomicUsize>,
    released: Arc<AtomicUsize>,
    broker: String,
) {
    while let Ok((mut client, _)) = listener.accept().await {
        let mut relaying = relaying.clone();
        if !*relaying.borrow_and_update() {
            held.fetch_add(1, Ordering::SeqCst);
            // Held without a word until the stand-in relays again, then
            // closed; what the client sends is read and ignored, and its
            // end of the connection noted.
            let released = released.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut sink = [0u8; 1024];
                loop {
                    tokio::select! {
                        _ = relaying.wait_for(|on| *on) => return,
                        n = client.read(&mut sink) => if matches!(n, Ok(0) | Err(_)) {
                            released.fetch_add(1, Ordering::SeqCst);
                            return;
                        },
                    }
                }
            });
            continue;
        }
        let broker = broker.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&broker).await else { return };
            relay(client, upstream, relaying).await;
        });
    }
}

/// Carries a connection both ways while the stand-in relays. Once it went
/// silent, whatever arrives is swallowed; once it relays again, the
/// connection is closed.
async fn relay(client: TcpStream, upstream: TcpStream, mut relaying: watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_broker, mut to_broker) = upstream.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut cut = false;
    loop {
        let (n, to_broker_side) = tokio::select! {
            r = from_client.read(&mut up) => (r, true),
            r = from_broker.read(&mut down) => (r, false),
            changed = relaying.changed() => {
                if changed.is_err() {
                    return;
                }
                let on = *relaying.borrow_and_update();
                if !on {
                    cut = true;
                } else if cut {
                    return;
                }
                continue;
            }
        };
        let n = match n {
            // Cut off, neither end hears the other close: held until the
            // stand-in relays again.
            Ok(0) | Err(_) if cut => {
                let _ = relaying.wait_for(|on| *on).await;
                return;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut {
            continue;
        }
        let written =
            if to_broker_side { to_broker.write_all(&up[..n]).await } else { to_client.write_all(&down[..n]).await };
        if written.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_disk_free_limit;

    #[test]
    fn the_disk_free_limit_is_read_back_in_each_form() {
        assert_eq!(parse_disk_free_limit("{ok,50000000}\n").unwrap(), ["50000000"]);
        assert_eq!(parse_disk_free_limit("{ok,\"2GB\"}").unwrap(), ["2GB"]);
        assert_eq!(parse_disk_free_limit("{ok,{mem_relative,1.5}}").unwrap(), ["mem_relative", "1.5"]);
        assert!(parse_disk_free_limit("undefined").is_err());
    }
}

/// What a [`Replayer`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    /// Messages of the deployment it took off its tap.
    pub captured: usize,
    /// Captured messages published again as they were.
    pub copies: usize,
    /// Captured messages published again to another cluster's key.
    pub misrouted: usize,
    /// Captured messages published again with a byte of their body flipped.
    pub flipped: usize,
    /// Bytes that decode as nothing, with a captured message's properties.
    pub garbage: usize,
    /// Connections it had to make again (the broker stopped, cut off or
    /// out of disk).
    pub reconnects: usize,
}

impl Replayed {
    /// Counts what `other` did too.
    pub fn add(&mut self, other: &Replayed) {
        self.captured += other.captured;
        self.copies += other.copies;
        self.misrouted += other.misrouted;
        self.flipped += other.flipped;
        self.garbage += other.garbage;
        self.reconnects += other.reconnects;
    }
}

/// A hostile client of a deployment's broker, beside its nodes (straight
/// to the broker at [`amqp_url`], not through their links): it taps every
/// message the nodes publish (events, receipts, gap markers: a queue of
/// its own, exclusive, bound to `<dep>.events` with `#`) and, until
/// stopped, publishes random ones of the last 4,096 again, old and new, in
/// any order, every 20–200 ms: most as they were, some to another
/// cluster's key, some with one byte of their body flipped, some replaced
/// by bytes that decode as nothing. Receivers must ignore every copy
/// (applied already, or a duplicate of what comes next) and dead-letter
/// every forgery, whatever faults strike meanwhile.
pub struct Replayer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Replayed>,
}

/// Messages kept to publish again.
const REPLAY_RING: usize = 4096;

impl Replayer {
    pub fn start(rt: &tokio::runtime::Runtime, deployment: &str, clusters: u32, seed: u64) -> Replayer {
        let (stop, stopped) = watch::channel(false);
        let names = Names::new(deployment);
        let task = rt.spawn(replay(names, clusters, seed, stopped));
        Replayer { stop, task }
    }

    /// Stops it (within 5 s) and says what it did.
    pub fn stop(self, rt: &tokio::runtime::Runtime) -> Result<Replayed> {
        let _ = self.stop.send(true);
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), self.task).await })
            .map_err(|_| anyhow::anyhow!("the replayer did not stop within 5 s"))?
            .map_err(Into::into)
    }
}

/// A captured message: routing key, body, properties.
type Captured = (String, Vec<u8>, BasicProperties);

async fn replay(names: Names, clusters: u32, seed: u64, mut stopped: watch::Receiver<bool>) -> Replayed {
    use futures_util::StreamExt;
    // The schedule's seed decides what is replayed when.
    let mut rng = crate::Rng(seed | 1);
    let mut next = move |n: u64| rng.below(n);
    let mut out = Replayed::default();
    let mut ring: std::collections::VecDeque<Captured> = std::collections::VecDeque::new();
    let tap = format!("{}.tap", names.deployment);
    let mut first = true;
    while !*stopped.borrow() {
        if !first {
            out.reconnects += 1;
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        first = false;
        // The broker stopped, cut off or blocking publishers: try again.
        let link = async {
            let conn = connect(&amqp_url()).await?;
            let ch = conn.create_channel().await?;
            let options =
                lapin::options::QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
            ch.queue_declare(tap.as_str().into(), options, lapin::types::FieldTable::default()).await?;
            ch.queue_bind(
                tap.as_str().into(),
                names.exchange.as_str().into(),
                "#".into(),
                lapin::options::QueueBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
            let consumer = ch
                .basic_consume(
                    tap.as_str().into(),
                    "replayer".into(),
                    lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() },
                    lapin::types::FieldTable::default(),
                )
                .await?;
            anyhow::Ok((conn, ch, consumer))
        };
        let Ok(Ok((conn, ch, mut consumer))) = tokio::time::timeout(Duration::from_secs(2), link).await else {
            continue;
        };
        // When the next replay is due (captures arriving meanwhile do not
        // put it off).
        let mut due = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                delivery = consumer.next() => match delivery {
                    Some(Ok(d)) => {
                        out.captured += 1;
                        if ring.len() == REPLAY_RING {
                            ring.pop_front();
                        }
                        ring.push_back((d.routing_key.to_string(), d.data, d.properties));
                    }
                    _ => break,
                },
                _ = tokio::time::sleep_until(due), if !ring.is_empty() => {
                    due = tokio::time::Instant::now() + Duration::from_millis(20 + next(180));
                    let mut blocked = false;
                    for _ in 0..1 + next(8) {
                        let (key, mut body, props) = ring[next(ring.len() as u64) as usize].clone();
                        let key = match next(10) {
                            0 => {
                                out.misrouted += 1;
                                format!("to.{}", 1 + next(u64::from(clusters)))
                            }
                            1 if !body.is_empty() => {
                                out.flipped += 1;
                                let at = next(body.len() as u64) as usize;
                                body[at] ^= 1 << next(8);
                                key
                            }
                            2 => {
                                out.garbage += 1;
                                body = (0..1 + next(64)).map(|_| next(256) as u8).collect();
                                key
                            }
                            _ => {
                                out.copies += 1;
                                key
                            }
                        };
                        let publish = ch.basic_publish(
                            names.exchange.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            props,
                        );
                        // A broker out of disk blocks publishers.
                        match tokio::time::timeout(Duration::from_secs(1), publish).await {
                            Ok(Ok(_)) => {}
                            _ => {
                                blocked = true;
                                break;
                            }
                        }
                    }
                    if blocked {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "done".into())).await;
    }
    out
}
