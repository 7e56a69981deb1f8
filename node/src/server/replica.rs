//! Our internal `Replica` service: master -> slave forwarding, status, and
//! the link between a server and its synchronizer.

use super::Node;
use crate::store::codec;
use crate::store::state::Entry;
use futures_util::StreamExt as _;
use sns_proto::internal::replica_server::{Replica, ReplicaServer};
use sns_proto::internal::{
    AckReply, AckRequest, ApplyReply, InstallReply, ReceiptReply, RejectedEvent, ReplicateReply, ReplicateRequest,
    ServerStatus, ServingState, SnapshotChunk, StatusRequest, StepDownReply, StepDownRequest, StreamGap, StreamMark,
    StreamReceipt, SyncBatch, SyncEvent, TailRequest,
};
use std::pin::Pin;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub struct ReplicaService {
    node: Node,
    shutdown: CancellationToken,
}

/// The `Replica` service; every call must carry the deployment's token
/// when `secret` is set (node-to-node only).
pub fn service(
    node: Node,
    shutdown: CancellationToken,
    secret: Option<crate::auth::Secret>,
) -> tonic::service::interceptor::InterceptedService<ReplicaServer<ReplicaService>, crate::auth::Check> {
    ReplicaServer::with_interceptor(ReplicaService { node, shutdown }, crate::auth::Check::new(secret))
}

/// Runs a call's change of this server's state to completion in a task of
/// its own, whatever happens to the call. tonic drops a handler's future
/// when its caller gives up (a deadline, a reset stream); a replicated
/// write dropped between its journal append and its application to memory
/// left the journal holding records memory lacked: the server then
/// numbered new writes over them, and after a restart its journal replayed
/// into another state than the one it had served (seen in the fault
/// schedules: a post published twice under two stream positions, the
/// event that should have had the first one ignored as a duplicate). The
/// write lane is held by the task, so the next call waits for it.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(work).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("task failed: {e}"))),
    }
}

/// How many outbox events one read of the store hands to the stream.
const TAIL_BATCH: usize = 256;

#[tonic::async_trait]
impl Replica for ReplicaService {
    async fn replicate(&self, req: Request<ReplicateRequest>) -> Result<Response<ReplicateReply>, Status> {
        let req = req.into_inner();
        if req.cluster != self.node.cfg().cluster {
            return Err(Status::invalid_argument(format!(
                "write for cluster {} sent to a server of cluster {}",
                req.cluster,
                self.node.cfg().cluster
            )));
        }
        let clusters = self.node.cfg().clusters;
        let entries = req
            .entries
            .into_iter()
            .map(|e| codec::entry_from_pb(e, clusters))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let seqs: Vec<u64> =
            entries.iter().filter_map(|e| if let Entry::Local(op) = e { Some(op.seq) } else { None }).collect();
        if entries.is_empty() || seqs.windows(2).any(|w| w[1] != w[0] + 1) {
            return Err(Status::invalid_argument("replicated records must be non-empty, client writes consecutive"));
        }
        let node = self.node.clone();
        let receipts = req.receipts.iter().map(|m| (m.origin, m.epoch, m.seq)).collect();
        to_completion(async move { node.apply_replicated(req.term, entries, req.published_upto, receipts).await })
            .await?;
        Ok(Response::new(ReplicateReply {}))
    }

    async fn step_down(&self, req: Request<StepDownRequest>) -> Result<Response<StepDownReply>, Status> {
        let req = req.into_inner();
        if req.cluster != self.node.cfg().cluster {
            return Err(Status::invalid_argument(format!(
                "step-down for cluster {} sent to a server of cluster {}",
                req.cluster,
                self.node.cfg().cluster
            )));
        }
        let node = self.node.clone();
        let next_seq = to_completion(async move { node.step_down(req.term, (req.epoch, req.version)).await }).await?;
        Ok(Response::new(StepDownReply { next_seq }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<ServerStatus>, Status> {
        let role = self.node.role();
        let cfg = self.node.cfg();
        let (next_seq, published_upto, users, posts) =
            self.node.read(|s| (s.next_seq(), s.published_upto(), s.users().len() as u32, s.post_count()));
        let (installed_term, installed_sync) = self.node.installed();
        Ok(Response::new(ServerStatus {
            cluster: cfg.cluster,
            server_id: cfg.id,
            is_master: role.is_master,
            term: role.term,
            slave: role.slave.map(|(_, h, p)| format!("{h}:{p}")).unwrap_or_default(),
            next_seq,
            published_upto,
            users,
            posts,
            degraded: if role.is_master { self.node.degraded() } else { String::new() },
            master_terms: self.node.master_terms(),
            synced_term: self.node.synced_term(),
            incarnation: self.node.incarnation(),
            damage: self.node.damage().unwrap_or_default(),
            unwritable: self.node.unwritable().unwrap_or_default(),
            lease_valid: role.is_master && self.node.lease_valid(),
            in_sync: if role.is_master { role.in_sync.clone() } else { vec![] },
            held: self.node.read(|s| s.held_count() as u64),
            sent_events: self.node.read(|s| s.sent_total()),
            received_events: self.node.read(|s| s.received_total()),
            installed_term,
            installed_sync,
            snapshot_format: codec::SnapshotFormat::NEWEST.number(),
            retained: self.node.read(|s| s.retained_count() as u64),
            streams: self
                .node
                .read(|s| s.stream_marks())
                .into_iter()
                .map(|(origin, epoch, applied, held)| StreamMark { origin, epoch, applied, held })
                .collect(),
        }))
    }

    type WatchServingStream = Pin<Box<dyn Stream<Item = Result<ServingState, Status>> + Send>>;

    async fn watch_serving(&self, _req: Request<TailRequest>) -> Result<Response<Self::WatchServingStream>, Status> {
        let node = self.node.clone();
        let serving = tokio_stream::wrappers::WatchStream::new(node.watch_serving())
            .map(move |serving| Ok(ServingState { serving, term: node.role().term }));
        Ok(Response::new(Box::pin(serving.take_until(self.shutdown.clone().cancelled_owned()))))
    }

    type TailOutboxStream = Pin<Box<dyn Stream<Item = Result<SyncBatch, Status>> + Send>>;

    async fn tail_outbox(&self, _req: Request<TailRequest>) -> Result<Response<Self::TailOutboxStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(tracing::Instrument::instrument(
            tail(self.node.clone(), tx, self.shutdown.clone()),
            tracing::info_span!("outbox_tail"),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn receipt(&self, req: Request<StreamReceipt>) -> Result<Response<ReceiptReply>, Status> {
        let node = self.node.clone();
        let receipt = req.into_inner();
        Ok(Response::new(to_completion(async move { node.receipt(receipt).await }).await?))
    }

    async fn skip_gap(&self, req: Request<StreamGap>) -> Result<Response<AckReply>, Status> {
        let g = req.into_inner();
        let cfg = self.node.cfg();
        if g.dest_cluster != cfg.cluster || g.origin_cluster == cfg.cluster || g.origin_cluster > cfg.clusters {
            return Err(Status::invalid_argument(format!(
                "gap of cluster {}'s stream to cluster {} sent to cluster {} of {}",
                g.origin_cluster, g.dest_cluster, cfg.cluster, cfg.clusters
            )));
        }
        let node = self.node.clone();
        to_completion(async move { node.skip_gap(g.origin_cluster, g.epoch, g.upto).await }).await?;
        Ok(Response::new(AckReply {}))
    }

    async fn ack_outbox(&self, req: Request<AckRequest>) -> Result<Response<AckReply>, Status> {
        let (node, upto) = (self.node.clone(), req.into_inner().upto);
        to_completion(async move { node.ack_outbox(upto).await }).await?;
        Ok(Response::new(AckReply {}))
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<InstallReply>, Status> {
        let mut chunks = req.into_inner();
        let (mut data, mut term) = (Vec::new(), None);
        let cluster = self.node.cfg().cluster;
        while let Some(chunk) = chunks.message().await? {
            if chunk.cluster != cluster || term.is_some_and(|t| t != (chunk.term, chunk.sync)) {
                return Err(Status::invalid_argument("snapshot chunks disagree on cluster, term or number"));
            }
            term = Some((chunk.term, chunk.sync));
            data.extend_from_slice(&chunk.data);
        }
        let (term, sync) = term.ok_or_else(|| Status::invalid_argument("empty snapshot"))?;
        let snapshot = codec::decode_snapshot(&data, cluster, self.node.cfg().clusters)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot: {e}")))?;
        let node = self.node.clone();
        let (next_seq, incarnation) =
            to_completion(async move { node.install_snapshot(term, sync, snapshot).await }).await?;
        Ok(Response::new(InstallReply { next_seq, incarnation }))
    }

    type ApplyRemoteStream = Pin<Box<dyn Stream<Item = Result<ApplyReply, Status>> + Send>>;

    async fn apply_remote(
        &self,
        req: Request<Streaming<SyncBatch>>,
    ) -> Result<Response<Self::ApplyRemoteStream>, Status> {
        let (replies, rx) = mpsc::channel(APPLY_IN_FLIGHT);
        tokio::spawn(apply_in_order(self.node.clone(), req.into_inner(), replies));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Batches of other clusters' events a synchronizer may have queued and
/// not yet heard about, at most: one that sends faster waits.
const APPLY_IN_FLIGHT: usize = 16;

/// Queues each batch of an `ApplyRemote` stream for the writer as it
/// arrives (so they enter the log in stream order, and a batch joins the
/// next commit without waiting for the one before it), and answers each
/// in order once committed. Ends at the first failure, which it reports.
async fn apply_in_order(
    node: Node,
    mut batches: Streaming<SyncBatch>,
    replies: mpsc::Sender<Result<ApplyReply, Status>>,
) {
    type Queued = oneshot::Receiver<crate::error::Result<crate::server::commit::Applied>>;
    let clusters = node.cfg().clusters;
    let (queued, mut waiting) = mpsc::channel::<Result<Queued, Status>>(APPLY_IN_FLIGHT);
    let reads = async move {
        loop {
            let batch = match batches.message().await {
                Ok(Some(batch)) => batch,
                Ok(None) => return,
                Err(e) => {
                    let _ = queued.send(Err(e)).await;
                    return;
                }
            };
            let events = batch
                .events
                .iter()
                .map(|e| codec::event_from_pb(e, clusters))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::invalid_argument(e.to_string()));
            let failed = events.is_err();
            if queued.send(events.map(|events| node.queue_remote(events))).await.is_err() || failed {
                return;
            }
        }
    };
    let answers = async move {
        while let Some(next) = waiting.recv().await {
            let reply = match next {
                Ok(committed) => match committed.await.unwrap_or(Err(crate::error::Error::Stopping)) {
                    Ok(a) => Ok(ApplyReply {
                        applied: a.journaled as u32,
                        rejected: a
                            .rejected
                            .into_iter()
                            .map(|(index, reason)| RejectedEvent { index: index as u32, reason })
                            .collect(),
                        deferred: a.deferred as u32,
                    }),
                    Err(e) => Err(Status::from(e)),
                },
                Err(status) => Err(status),
            };
            let failed = reply.is_err();
            if replies.send(reply).await.is_err() || failed {
                return;
            }
        }
    };
    // The answers go on until every queued batch is answered (or one
    // failed); reading stops when the caller is gone.
    tokio::pin!(answers);
    tokio::select! {
        _ = &mut answers => {}
        _ = reads => answers.await,
    }
}

/// Streams unpublished outbox events while this server is the master:
/// waits to become master, sends everything after the published mark, then
/// each new event as it is committed. Ends when the server stops being
/// master, so a demoted server's synchronizer stops publishing at once.
///
/// Each message carries whole outbox events (every destination's copy of
/// each): the synchronizer reports the last event of a confirmed message
/// as published, and an event split over two messages would be marked
/// published with one destination's copy still unsent.
async fn tail(node: Node, tx: mpsc::Sender<Result<SyncBatch, Status>>, shutdown: CancellationToken) {
    let mut role = node.watch_role();
    let mut stable = node.watch_stable();
    loop {
        if role.borrow_and_update().is_master {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            changed = role.changed() => if changed.is_err() { return },
        }
    }
    let mut sent = node.read(|s| s.published_upto());
    let origin = node.cfg().cluster;
    loop {
        let upto = *stable.borrow_and_update();
        // A copy per destination of each event, all in one message.
        let events: Vec<SyncEvent> = node.read(|s| {
            s.outbox_after(sent)
                .take_while(|e| e.seq <= upto)
                .take(TAIL_BATCH)
                .flat_map(|e| e.deliveries.iter().map(move |d| codec::delivery_to_pb(e, origin, d)))
                .collect()
        });
        if let Some(last) = events.last() {
            sent = last.seq;
            if tx.send(Ok(SyncBatch { events })).await.is_err() {
                return;
            }
        }
        if node.read(|s| s.outbox_after(sent).next().is_some_and(|e| e.seq <= upto)) {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            changed = stable.changed() => if changed.is_err() { return },
            changed = role.changed() => {
                if changed.is_err() || !role.borrow_and_update().is_master {
                    return;
                }
            }
        }
    }
}
