//! The synchronizer: carries one server's events to the other clusters
//! through RabbitMQ, and the other clusters' events into that server.
//!
//! It keeps no state of its own. The server owns the outbox (its journal)
//! and the published mark; the synchronizer tails the outbox over the local
//! `Replica.TailOutbox` stream, which only flows while its server is master,
//! so exactly the master's synchronizer publishes and a promoted server's
//! synchronizer takes over by itself, starting from the replicated published
//! mark. Incoming events come from one queue per cluster, consumed by the
//! synchronizer beside the master only (it watches its server's role), and
//! are applied through `Replica.ApplyRemote` by the master, which orders
//! them with its own writes and replicates them to its slave; they are
//! acknowledged to the broker only once committed. Redeliveries change
//! nothing (the replicated record of what was applied). The consuming
//! synchronizer also tells each origin how far its stream was applied
//! ([`receipts`]), and publishes again what its own server says another
//! cluster lacks.
//! Why not write the files directly as the course does: the server is then
//! the only writer of its directory, and it can push a remote post to open
//! timeline streams the moment it lands.

pub mod receipts;
pub mod topology;

use crate::error::{Error, Result};
use crate::net;
use crate::store::codec;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::AMQPValue;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel as AmqpChannel, Connection, ConnectionProperties};
use prost::Message as _;
use sns_proto::csce438::ServerInfo;
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::replica_client::ReplicaClient;
use sns_proto::internal::{AckRequest, SyncBatch, SyncEvent, TableRequest, TailRequest};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use topology::Names;
use tracing::Instrument as _;

#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub id: u32,
    pub cluster: u32,
    pub paired_server: u32,
    pub clusters: u32,
    pub servers_per_cluster: u32,
    pub coord_host: String,
    pub coord_port: u16,
    pub advertise_host: String,
    /// host:port of the server; None = look it up in the coordinator.
    pub server_addr: Option<String>,
    pub amqp_url: String,
    pub deployment: String,
    pub queue_expires: Option<Duration>,
    pub queue_type: topology::QueueType,
    pub heartbeat: Duration,
    /// The deployment's secret: calls to nodes carry its token, published
    /// events its MAC, and consumed events without a valid one are
    /// dead-lettered (None: neither).
    pub secret: Option<crate::auth::Secret>,
}

/// Most events taken from the outbox for one publish (split into messages
/// by [`runs`]).
pub const PUBLISH_BATCH: usize = 1024;
/// Most events published and not yet confirmed by the broker.
pub const UNCONFIRMED_MAX: usize = 8 * PUBLISH_BATCH;
/// Most bytes of events in one broker message. Consecutive events with one
/// routing key travel as one message (a `SyncBatch`): the broker's cost is
/// per message, and a post is routed to every other cluster's queues.
pub const MESSAGE_BYTES: usize = 256 * 1024;
/// AMQP heartbeat asked of the broker, in seconds (the lower of ours and
/// the broker's applies; RabbitMQ's default is 60). A link that hears
/// nothing for two of them is dropped and made again: a broker that hung,
/// or whose host vanished without resetting the connection (a rescheduled
/// pod), stops a cluster's events for 20 s instead of two minutes.
pub const HEARTBEAT_SECS: u32 = 10;
/// Unacknowledged deliveries the broker may push ahead of our applies.
pub const PREFETCH: u16 = 64;
/// How long an apply may take before the synchronizer gives up on its
/// server (a hung master) and lets the broker redeliver elsewhere.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Events handed to the server in one apply (one fsync), at most: more
/// deliveries are taken while the total stays below this.
pub const APPLY_BATCH: usize = 1024;
/// Batches sent to the server and not yet answered, at most (the prefetch
/// bounds them too).
const APPLY_IN_FLIGHT: usize = 8;
/// AMQP frame size asked of the broker. lapin keeps two buffers of 32
/// frames each per connection, so the broker's default (128 KiB) costs 8 MiB
/// of memory; events are at most a few KiB, and 16 KiB frames cost 1 MiB.
pub const FRAME_MAX: u32 = 16 * 1024;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Runs a synchronizer until `shutdown` is cancelled.
pub async fn run(cfg: SyncConfig, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let port = net::local_port(&listener)?;
    tracing::info!(id = cfg.id, cluster = cfg.cluster, server = cfg.paired_server, port, deployment = %cfg.deployment, "synchronizer starting");
    let attach = crate::auth::Attach::new(cfg.secret.clone());
    let coord = net::node_channel(&cfg.coord_host, &cfg.coord_port.to_string(), &attach)?;
    let span = tracing::info_span!("synchronizer", cluster = cfg.cluster, sync = cfg.id, server = cfg.paired_server);
    // Why the link is down, for the heartbeats ("" while it is up).
    let (link, link_rx) = watch::channel(String::from("connecting"));
    let beats = tokio::spawn(
        heartbeats(cfg.clone(), port, coord.clone(), link_rx, shutdown.clone())
            .instrument(tracing::info_span!(parent: &span, "heartbeat")),
    );
    let bridge = tokio::spawn(
        bridge(cfg, coord, link, shutdown.clone()).instrument(tracing::info_span!(parent: &span, "bridge")),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    net::serve_health(health_service.clone(), shutdown.clone());
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let served = crate::tls::server_builder()?
        .trace_fn(crate::telemetry::rpc_span(None))
        .layer(crate::metrics::grpc::CountLayer)
        .add_service(health_service)
        .serve_with_incoming_shutdown(net::incoming(listener), shutdown.cancelled())
        .await;
    beats.abort();
    bridge.await.ok();
    Ok(served?)
}

/// Heartbeats to the coordinator, each saying whether the link is up
/// (`link`: why it is down, "" while it is up), and keeps
/// `sns_sync_link_up` on it.
async fn heartbeats(
    cfg: SyncConfig,
    port: u16,
    coord: net::NodeChannel,
    mut link: watch::Receiver<String>,
    shutdown: CancellationToken,
) {
    let mut client = CoordServiceClient::new(coord);
    let mut tick = tokio::time::interval(cfg.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut is_master = false;
    loop {
        // A change of the link is told at once, not a period later.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            Ok(()) = link.changed() => {}
        }
        let link_down = link.borrow_and_update().clone();
        crate::metrics::get().link_up.set(i64::from(link_down.is_empty()));
        let info = ServerInfo {
            server_id: cfg.id as i32,
            hostname: cfg.advertise_host.clone(),
            port: port.to_string(),
            r#type: "synchronizer".into(),
            cluster_id: cfg.cluster as i32,
            is_master,
            term: 0,
            paired_server_id: cfg.paired_server as i32,
            link_down,
            ..ServerInfo::default()
        };
        match client.heartbeat(info).await {
            Ok(r) => is_master = r.into_inner().is_master,
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

/// Connects server and broker, and reconnects whichever fails, forever;
/// `link` says why the link is down ("" while it is up).
async fn bridge(cfg: SyncConfig, coord: net::NodeChannel, link: watch::Sender<String>, shutdown: CancellationToken) {
    let names = Names::new(&cfg.deployment);
    let mut backoff = sns_proto::backoff::Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        // Up again only once both ends are; a failure keeps its reason
        // through the next attempt.
        link.send_if_modified(|l| {
            let was_up = l.is_empty();
            if was_up {
                *l = "reconnecting".into();
            }
            was_up
        });
        let attempt = async {
            let server = find_server(&cfg, coord.clone(), &shutdown).await?;
            let broker = crate::launcher::broker_addr(&cfg.amqp_url);
            let url = link_url(&cfg.amqp_url);
            let connect = async { Ok(crate::tls::amqp_connect(&url, ConnectionProperties::default()).await?) };
            let conn = within_setup(&broker, "connect to it", connect).await?;
            let declare = async {
                let setup = conn.create_channel().await?;
                topology::declare(&setup, &names, cfg.clusters, cfg.queue_expires, cfg.queue_type).await
            };
            if let Err(e) = within_setup(&broker, "declare the deployment's exchanges and queues", declare).await {
                bounded_close("connection", conn.close(200, "synchronizer giving up".into())).await;
                return Err(e);
            }
            tracing::info!(server = %server, "connected to server and broker");
            link.send_replace(String::new());
            let attach = crate::auth::Attach::new(cfg.secret.clone());
            let consumer =
                consume_while_master(&cfg, &names, &conn, ReplicaClient::new(net::node_channel_to(&server, &attach)?));
            let publisher = publish(
                &names,
                &conn,
                ReplicaClient::new(net::node_channel_to(&server, &attach)?),
                cfg.secret.as_ref(),
                &shutdown,
            );
            let result = tokio::select! {
                r = consumer => r,
                r = publisher => r,
                _ = shutdown.cancelled() => Ok(()),
            };
            bounded_close("connection", conn.close(200, "synchronizer stopping".into())).await;
            result
        };
        let delay = match attempt.await {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => {
                backoff.reset();
                backoff.next_delay()
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "synchronizer link down");
                link.send_replace(link_down_reason(&e));
                delay
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What the routing table shows of a link failure: the error, on one line
/// and short enough for a table.
fn link_down_reason(e: &Error) -> String {
    const MAX: usize = 200;
    let text: String = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "down".into(),
        None => text,
    }
}

/// How long connecting to the broker may take, and then declaring the
/// deployment's objects. The AMQP handshake has no bound of its own (lapin
/// sends heartbeats only once it is done): a broker that accepted the
/// connection and then says nothing (hung, a proxy in front of one that is
/// gone, a lost wake-up in the client) would hold the synchronizer for
/// good, alive by its heartbeats, its cluster's events unpublished, even
/// once the broker answers again. Past this the attempt is abandoned and
/// made again after the backoff; the abandoned attempt's socket is shut
/// down, which ends lapin's I/O thread for it ([`crate::tls::amqp_connect`]).
/// (RabbitMQ ends a handshake left unfinished after 10 s of its own.)
pub const BROKER_SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one step of setting up the broker link within
/// [`BROKER_SETUP_TIMEOUT`].
async fn within_setup<T>(broker: &str, step: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(BROKER_SETUP_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(Error::NoAnswer(format!(
            "the broker at {broker} did not let the synchronizer {step} within {BROKER_SETUP_TIMEOUT:?}"
        )))
    })
}

/// How long closing a broker channel or connection may take. A close can
/// stay unanswered for good (a channel's own close racing the
/// connection's leaves the connection in error, its close never
/// settled; a broker that stopped answering): a synchronizer waiting on it
/// would never reconnect, and its cluster's events would stay unpublished
/// while its heartbeats say it is alive. Past this the objects are dropped,
/// which closes them as far as the client can.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

async fn bounded_close(what: &str, close: impl std::future::Future<Output = lapin::Result<()>>) {
    match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "closing the broker {what}"),
        Err(_) => tracing::warn!("the broker {what} did not close within {CLOSE_TIMEOUT:?}: dropped"),
    }
}

/// The broker URL with our frame size and heartbeat, unless it names them
/// itself (sns-bench's synchronizers'-pattern baseline connects with it
/// too).
pub fn link_url(url: &str) -> String {
    let mut url = url.to_string();
    for (key, value) in [("frame_max", FRAME_MAX), ("heartbeat", HEARTBEAT_SECS)] {
        if !url.contains(&format!("{key}=")) {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}{key}={value}");
        }
    }
    url
}

/// The address of this synchronizer's server: configured, or the live
/// server of our cluster with our paired id in the coordinator's table.
async fn find_server(cfg: &SyncConfig, coord: net::NodeChannel, shutdown: &CancellationToken) -> Result<String> {
    if let Some(addr) = &cfg.server_addr {
        return Ok(addr.clone());
    }
    let mut admin = CoordAdminClient::new(coord);
    loop {
        if let Ok(table) = admin.table(TableRequest {}).await {
            let found = table
                .into_inner()
                .nodes
                .into_iter()
                .find(|n| n.kind == "server" && n.cluster == cfg.cluster && n.id == cfg.paired_server && n.alive);
            if let Some(n) = found {
                return Ok(format!("{}:{}", n.host, n.port));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(Error::Other("shutting down".into())),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Consumes the cluster's queue while this synchronizer's server serves as
/// master, and stands by otherwise: the master applies other clusters'
/// events in its own order and replicates them to its slave, so the
/// slave's synchronizer has nothing to apply. When the server stops being
/// master the channel is closed, and the broker hands what was delivered
/// but not acknowledged to the next master's synchronizer.
async fn consume_while_master(
    cfg: &SyncConfig,
    names: &Names,
    conn: &Connection,
    mut server: ReplicaClient<net::NodeChannel>,
) -> Result<()> {
    let mut states = server.watch_serving(TailRequest {}).await?.into_inner();
    loop {
        // Stand by until the server serves as master.
        loop {
            match states.message().await? {
                Some(s) if s.serving => break,
                Some(_) => {}
                None => return Err(Error::Other("the server ended its serving stream".into())),
            }
        }
        tracing::info!(queue = %names.queue(cfg.cluster), "server is master: consuming the cluster's queue");
        let channel = conn.create_channel().await?;
        let stepped_down = async {
            loop {
                match states.message().await {
                    Ok(Some(s)) if !s.serving => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(Error::Other("the server ended its serving stream".into())),
                    Err(e) => return Err(Error::from(e)),
                }
            }
        };
        let activity = receipts::Activity::default();
        let (taken, to_answer) = receipts::queue();
        let result = tokio::select! {
            r = consume(cfg, names, &channel, server.clone(), &activity, &taken) => r,
            r = receipts::send(cfg, names, &channel, server.clone(), &activity) => r,
            r = receipts::answer(names, &channel, server.clone(), cfg.secret.as_ref(), to_answer) => r,
            r = stepped_down => r,
        };
        // Unacknowledged deliveries go back to the queue for whoever
        // consumes next.
        bounded_close("channel", channel.close(200, "server is not master".into())).await;
        result?;
        tracing::info!("server stopped serving as master: standing by");
    }
}

/// Applies every delivery to the server, then acknowledges it. A message
/// that cannot be decoded is rejected to the dead-letter queue and logged.
///
/// Deliveries go to the server as they arrive, over one `ApplyRemote`
/// stream, without waiting for the batches before them to commit: each
/// joins the server's next group commit. The server answers them in order;
/// each answer acknowledges its batch's deliveries to the broker (and
/// none of a later batch), so the broker redelivers exactly what was not
/// committed when anything fails.
async fn consume(
    cfg: &SyncConfig,
    names: &Names,
    channel: &AmqpChannel,
    mut server: ReplicaClient<net::NodeChannel>,
    activity: &receipts::Activity,
    taken: &tokio::sync::mpsc::Sender<receipts::Taken>,
) -> Result<()> {
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let queue = names.queue(cfg.cluster);
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            format!("sync-{}", cfg.id).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    activity.consuming.store(true, std::sync::atomic::Ordering::SeqCst);
    let (batches, outgoing) = tokio::sync::mpsc::channel::<SyncBatch>(APPLY_IN_FLIGHT);
    let mut replies = server.apply_remote(tokio_stream::wrappers::ReceiverStream::new(outgoing)).await?.into_inner();
    // Batches sent and not yet answered, oldest first: their events, the
    // last delivery they settle, and when they were sent.
    let mut sent: VecDeque<(Vec<SyncEvent>, lapin::message::Delivery, tokio::time::Instant)> = VecDeque::new();
    loop {
        let deadline = sent.front().map(|(_, _, at)| *at + APPLY_TIMEOUT);
        tokio::select! {
            first = deliveries.next(), if sent.len() < APPLY_IN_FLIGHT => {
                let Some(first) = first else { break };
                let (events, last, others) = gather(cfg, first?, &mut deliveries).await?;
                for t in others {
                    if taken.try_send(t).is_err() {
                        tracing::debug!("receipts queued already: one dropped");
                    }
                }
                // (Only refused messages and receipts: each is settled.)
                let Some(last) = last else { continue };
                activity.took_events();
                activity.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                batches
                    .send(SyncBatch { events: events.clone() })
                    .await
                    .map_err(|_| Error::Other("the server ended the apply stream".into()))?;
                sent.push_back((events, last, tokio::time::Instant::now()));
            }
            reply = replies.next(), if !sent.is_empty() => {
                let reply = reply.ok_or_else(|| Error::Other("the server ended the apply stream".into()))??;
                let Some((events, last, _)) = sent.pop_front() else { continue };
                activity.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                tracing::debug!(count = events.len(), applied = reply.applied, "events applied");
                note_applied(&events, &reply);
                if reply.deferred > 0 {
                    // Valid, but the master holds all it may behind a gap:
                    // not dead-lettered, since the origin keeps them until
                    // a receipt covers them and sends them again.
                    crate::metrics::get().deferred.inc_by(u64::from(reply.deferred));
                    tracing::warn!(
                        count = reply.deferred,
                        "events left for their origin to send again: the master holds all it may behind a gap"
                    );
                }
                // Events that cannot be valid (forged, broken) are never
                // applied; they go to the dead-letter queue, with why.
                for r in &reply.rejected {
                    let Some(event) = events.get(r.index as usize) else { continue };
                    dead_letter(channel, names, event, &r.reason).await?;
                }
                last.ack(BasicAckOptions { multiple: true }).await?;
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                return Err(Error::NoAnswer(format!("the server did not apply events within {APPLY_TIMEOUT:?}")));
            }
        }
    }
    Err(Error::Other("broker closed the consumer".into()))
}

/// Takes `first` and whatever else has arrived already (up to
/// [`APPLY_BATCH`] events): the server applies it all with one fsync, and
/// one broker ack (multiple) settles it. Returns the events, the last
/// delivery that carried any (None: every message was refused, a receipt
/// or a gap marker, and each is settled already), and the receipts and gap
/// markers (each acknowledged on its own as it is taken). A message without
/// this deployment's MAC, for another cluster, or that cannot be decoded is
/// dead-lettered and logged.
async fn gather(
    cfg: &SyncConfig,
    first: lapin::message::Delivery,
    deliveries: &mut lapin::Consumer,
) -> Result<(Vec<SyncEvent>, Option<lapin::message::Delivery>, Vec<receipts::Taken>)> {
    let mut next = Some(Ok(first));
    let mut events = Vec::new();
    let mut receipts = Vec::new();
    let mut last = None;
    while let Some(delivery) = next.take() {
        let delivery = delivery?;
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str().to_string()).unwrap_or_default();
        if let Some(secret) = &cfg.secret
            && !sealed_by(secret, &delivery)
        {
            tracing::error!(bytes = delivery.data.len(), routing_key = %delivery.routing_key, "broker message without this deployment's MAC (forged, or from another deployment): dead-lettered, not applied");
            crate::metrics::get().dead_lettered.inc();
            delivery.reject(BasicRejectOptions { requeue: false }).await?;
        } else if kind == codec::RECEIPT_TYPE || kind == codec::GAP_TYPE {
            let decoded = if kind == codec::GAP_TYPE {
                receipts::decode_gap(&delivery.data, cfg.cluster, cfg.clusters).map(receipts::Taken::Gap)
            } else {
                receipts::decode(&delivery.data, cfg.cluster, cfg.clusters).map(receipts::Taken::Receipt)
            };
            match decoded {
                Ok(t) => {
                    delivery.ack(BasicAckOptions::default()).await?;
                    receipts.push(t);
                }
                Err(e) => {
                    tracing::error!(error = %e, routing_key = %delivery.routing_key, "bad stream receipt or gap marker: dead-lettered");
                    crate::metrics::get().dead_lettered.inc();
                    delivery.reject(BasicRejectOptions { requeue: false }).await?;
                }
            }
        } else {
            let batch = kind == codec::BATCH_TYPE;
            match codec::decode_message(&delivery.data, batch, cfg.clusters) {
                Ok(decoded) if decoded.iter().all(|e| e.dest_cluster == cfg.cluster) => {
                    crate::metrics::get().consumed.inc_by(decoded.len() as u64);
                    events.extend(decoded);
                    last = Some(delivery);
                }
                Ok(_) => {
                    tracing::error!(routing_key = %delivery.routing_key, "broker message for another cluster: dead-lettered");
                    crate::metrics::get().dead_lettered.inc();
                    delivery.reject(BasicRejectOptions { requeue: false }).await?;
                }
                Err(e) => {
                    tracing::error!(error = %e, bytes = delivery.data.len(), routing_key = %delivery.routing_key, "malformed broker message: dead-lettered");
                    crate::metrics::get().dead_lettered.inc();
                    delivery.reject(BasicRejectOptions { requeue: false }).await?;
                }
            }
        }
        if events.len() < APPLY_BATCH {
            next = deliveries.next().now_or_never().flatten();
        }
    }
    Ok((events, last, receipts))
}

/// Puts a refused event on the dead-letter exchange, with the reason.
async fn dead_letter(channel: &AmqpChannel, names: &Names, event: &SyncEvent, reason: &str) -> Result<()> {
    tracing::error!(
        origin = event.origin_cluster,
        seq = event.seq,
        dest_seq = event.dest_seq,
        reason,
        "event refused: dead-lettered"
    );
    crate::metrics::get().dead_lettered.inc();
    let mut headers = FieldTable::default();
    headers.insert("x-reason".into(), lapin::types::AMQPValue::LongString(reason.into()));
    let props =
        BasicProperties::default().with_delivery_mode(2).with_type(codec::BATCH_TYPE.into()).with_headers(headers);
    channel
        .basic_publish(
            names.dead.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &codec::encode_batch(std::slice::from_ref(event)),
            props,
        )
        .await?;
    Ok(())
}

/// Publishes the server's outbox while the server is master, with publisher
/// confirms, and reports each confirmed prefix back to the server.
///
/// Publishing does not wait for confirms: under load the broker confirms
/// persistent messages only when it syncs its files (in batches, tens of
/// ms apart), and a publisher that waited would hold every later event back
/// that long. Up to [`UNCONFIRMED_MAX`] events are out unconfirmed; a
/// reconnect republishes them from the server's mark, and receivers ignore
/// what they already applied.
async fn publish(
    names: &Names,
    conn: &Connection,
    server: ReplicaClient<net::NodeChannel>,
    secret: Option<&crate::auth::Secret>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let (confirmed, confirmed_rx) = watch::channel(0u64);
    let publisher = async {
        let mut server = server.clone();
        loop {
            let mut outbox = server.tail_outbox(TailRequest {}).await?.into_inner();
            let mut inflight = FuturesOrdered::new();
            let mut unconfirmed = 0;
            loop {
                tokio::select! {
                    Some(done) = inflight.next() => {
                        let (upto, count): (u64, usize) = done?;
                        unconfirmed -= count;
                        confirmed.send_replace(upto);
                    }
                    next = outbox.message(), if unconfirmed < UNCONFIRMED_MAX => {
                        // Each message of the stream is whole outbox
                        // events: the confirmed mark never falls inside one.
                        let Some(first) = next? else { break };
                        let mut batch = first.events;
                        while batch.len() < PUBLISH_BATCH {
                            match outbox.message().now_or_never() {
                                Some(Ok(Some(more))) => batch.extend(more.events),
                                Some(Err(e)) => return Err(e.into()),
                                Some(Ok(None)) | None => break,
                            }
                        }
                        if batch.is_empty() {
                            continue;
                        }
                        let confirms = send_batch(&channel, names, &batch, secret).await?;
                        let (upto, count) = (batch.last().map_or(0, |e| e.seq), batch.len());
                        unconfirmed += count;
                        inflight.push_back(async move {
                            for confirm in confirms {
                                if !confirm.await?.is_ack() {
                                    return Err(Error::Other("broker refused a message (nack)".into()));
                                }
                            }
                            tracing::debug!(upto, count, "published");
                            crate::metrics::get().published.inc_by(count as u64);
                            Ok((upto, count))
                        });
                    }
                }
            }
            // Our server stopped being master: settle what is out, wait a
            // beat and ask again (the stream waits until it is master).
            while let Some(done) = inflight.next().await {
                confirmed.send_replace(done?.0);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RETRY_MIN) => {}
            }
        }
    };
    tokio::select! {
        r = publisher => r,
        r = report_confirmed(server.clone(), confirmed_rx) => r,
        r = watch_backlog(server.clone()) => r,
    }
}

/// How often the outbox backlog gauge is refreshed: a scrape interval is
/// 15 s or more, and one Status call a second costs the server nothing.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// Keeps `sns_sync_outbox_backlog_events` on the paired server's outbox:
/// events committed there and not yet confirmed by the broker (0 while it
/// is not master: a slave's synchronizer publishes nothing).
async fn watch_backlog(mut server: ReplicaClient<net::NodeChannel>) -> Result<()> {
    let mut every = tokio::time::interval(BACKLOG_EVERY);
    loop {
        every.tick().await;
        let s = server.status(sns_proto::internal::StatusRequest {}).await?.into_inner();
        let backlog = if s.is_master { s.next_seq.saturating_sub(1).saturating_sub(s.published_upto) } else { 0 };
        crate::metrics::get().outbox_backlog.set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }
}

/// Counts what the master applied and, when the whole batch was new (no
/// redelivery in it), how long its posts took to get here from their
/// origin: from the post's time (set by the origin's master, or the
/// client's timestamp when it sent a sane one) to now.
fn note_applied(events: &[SyncEvent], reply: &sns_proto::internal::ApplyReply) {
    use sns_proto::internal::sync_event::Kind;
    let m = crate::metrics::get();
    m.applied.inc_by(u64::from(reply.applied));
    if reply.applied as usize + reply.rejected.len() != events.len() {
        return;
    }
    let now = net::now_ms();
    for (i, e) in events.iter().enumerate() {
        if let Some(Kind::Post(p)) = &e.kind
            && !reply.rejected.iter().any(|r| r.index as usize == i)
        {
            m.propagation_seconds.observe((now - p.at_ms).max(0) as f64 / 1000.0);
        }
    }
}

/// Least time between two reports of the confirmed mark. The mark only
/// says where a promoted server's synchronizer starts publishing again
/// (receivers ignore what they already applied), so a mark this much
/// behind costs a few redelivered events after a failover; reporting every
/// confirm would cost a call and a journal record per broker round trip.
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// Tells the server how far the broker has confirmed its outbox: the
/// latest mark, at most every [`REPORT_EVERY`] (only the latest matters;
/// the last one is always sent).
async fn report_confirmed(
    mut server: ReplicaClient<net::NodeChannel>,
    mut confirmed: watch::Receiver<u64>,
) -> Result<()> {
    while confirmed.changed().await.is_ok() {
        let upto = *confirmed.borrow_and_update();
        server.ack_outbox(AckRequest { upto }).await?;
        tokio::time::sleep(REPORT_EVERY).await;
    }
    // The publisher is gone, and with it this link.
    std::future::pending().await
}

/// Sends outbox events, a message per run (see [`runs`]); returns the
/// broker's confirms to wait for.
async fn send_batch(
    channel: &AmqpChannel,
    names: &Names,
    batch: &[SyncEvent],
    secret: Option<&crate::auth::Secret>,
) -> Result<Vec<lapin::PublisherConfirm>> {
    let mut confirms = Vec::new();
    for (key, run) in runs(batch, MESSAGE_BYTES) {
        let (first, last) = (&run[0], &run[run.len() - 1]);
        let body = codec::encode_batch(&run);
        let props = sealed_props(codec::BATCH_TYPE, &body, 2, secret).with_message_id(
            format!("{}>{}:{}-{}", first.origin_cluster, first.dest_cluster, first.dest_seq, last.dest_seq).into(),
        );
        let confirm = channel
            .basic_publish(names.exchange.as_str().into(), key.into(), BasicPublishOptions::default(), &body, props)
            .await?;
        confirms.push(confirm);
    }
    Ok(confirms)
}

/// The properties of a message of AMQP type `kind` holding `body`, with
/// `delivery_mode` (1 transient, 2 persistent), sealed with the
/// deployment's MAC when there is a secret.
fn sealed_props(kind: &str, body: &[u8], delivery_mode: u8, secret: Option<&crate::auth::Secret>) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(secret) = secret {
        headers.insert(crate::auth::MAC_HEADER.into(), AMQPValue::LongString(secret.seal_message(kind, body).into()));
    }
    BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(delivery_mode)
        .with_content_type("application/x-protobuf".into())
        .with_type(kind.into())
}

/// Whether `delivery` carries a valid MAC of this deployment.
fn sealed_by(secret: &crate::auth::Secret, delivery: &lapin::message::Delivery) -> bool {
    let kind = delivery.properties.kind().as_ref().map(|k| k.as_str().to_string()).unwrap_or_default();
    match delivery.properties.headers().as_ref().and_then(|h| h.inner().get(crate::auth::MAC_HEADER).cloned()) {
        Some(AMQPValue::LongString(mac)) => secret.opens_message(&kind, &delivery.data, &mac.to_string()),
        _ => false,
    }
}

/// Splits outbox events into runs of one routing key (one destination) of
/// at most `max_bytes` (a larger event is a run alone). Events to one
/// destination keep their order, which is all receivers rely on (each
/// origin -> destination stream is numbered on its own); events to
/// different destinations are regrouped so each travels in few messages.
fn runs(events: &[SyncEvent], max_bytes: usize) -> Vec<(String, Vec<SyncEvent>)> {
    let mut by_dest: BTreeMap<u32, Vec<&SyncEvent>> = BTreeMap::new();
    for e in events {
        by_dest.entry(e.dest_cluster).or_default().push(e);
    }
    let mut out = Vec::new();
    for (_, evs) in by_dest {
        let mut run: Vec<SyncEvent> = Vec::new();
        let mut bytes = 0;
        for e in evs {
            let size = e.encoded_len();
            if !run.is_empty() && bytes + size > max_bytes {
                out.push((topology::routing_key(&run[0]), std::mem::take(&mut run)));
                bytes = 0;
            }
            bytes += size;
            run.push(e.clone());
        }
        if !run.is_empty() {
            out.push((topology::routing_key(&run[0]), run));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sns_proto::internal::UserAdded;
    use sns_proto::internal::sync_event::Kind;

    #[test]
    fn outbox_events_travel_in_runs_of_one_destination_in_order() {
        let ev = |seq, dest| SyncEvent {
            origin_cluster: 1,
            seq,
            dest_cluster: dest,
            dest_seq: seq,
            kind: Some(Kind::User(UserAdded { user: 1 })),
            ..Default::default()
        };
        let events = [ev(1, 2), ev(1, 3), ev(2, 2), ev(3, 3), ev(4, 2)];
        let got: Vec<(String, Vec<u64>)> =
            runs(&events, 1 << 20).into_iter().map(|(k, r)| (k, r.iter().map(|e| e.seq).collect())).collect();
        let want = [("to.2", vec![1, 2, 4]), ("to.3", vec![1, 3])];
        assert_eq!(got, want.map(|(k, s)| (k.to_string(), s)));
        // The size cap splits a run; an event larger than the cap goes alone.
        let size = events[0].encoded_len();
        let capped: Vec<usize> = runs(&[ev(1, 2), ev(2, 2)], size).iter().map(|(_, r)| r.len()).collect();
        assert_eq!(capped, [1, 1]);
        assert!(runs(&[], size).is_empty());
    }

    #[test]
    fn broker_urls_get_small_frames_and_a_short_heartbeat_unless_they_choose() {
        assert_eq!(link_url("amqp://h/%2f"), "amqp://h/%2f?frame_max=16384&heartbeat=10");
        assert_eq!(link_url("amqp://h/%2f?heartbeat=30"), "amqp://h/%2f?heartbeat=30&frame_max=16384");
        assert_eq!(link_url("amqp://h/%2f?frame_max=8192"), "amqp://h/%2f?frame_max=8192&heartbeat=10");
        assert_eq!(link_url("amqp://h/%2f?heartbeat=5&frame_max=8192"), "amqp://h/%2f?heartbeat=5&frame_max=8192");
    }
}
