//! The course's `SNSService` (Login, List, Follow, UnFollow, Timeline):
//! protobuf in, [`Node`] calls, status words out.

use super::Node;
use crate::error::Error;
use crate::ids::parse_user;
use crate::net::now_ms;
use crate::store::codec::check_post_text;
use crate::store::state::{Change, FeedItem, Outcome, Post};
use crate::store::{LIVE_BUFFER, Resume};
use futures_util::StreamExt as _;
use sns_proto::csce438::sns_service_server::{SnsService, SnsServiceServer};
use sns_proto::csce438::{ListReply, Message, Reply, Request as SnsRequest};
use sns_proto::rules::put_feed_start;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub struct Sns {
    node: Node,
    shutdown: CancellationToken,
}

pub fn service(node: Node, shutdown: CancellationToken) -> SnsServiceServer<Sns> {
    SnsServiceServer::new(Sns { node, shutdown })
}

fn reply(outcome: Outcome) -> Response<Reply> {
    Response::new(Reply { msg: outcome.as_str().to_string() })
}

/// A feed post as a timeline stream sends it: `at` is its index in the
/// reader's feed (sent as `feedPosition`, counted from 1), with its anchor
/// (`feedAnchor`).
fn to_message(item: &FeedItem, at: usize) -> Message {
    let p = &item.post;
    Message {
        feed_position: at as u64 + 1,
        feed_anchor: item.anchor,
        username: p.user.to_string(),
        msg: p.text.to_string(),
        timestamp: Some(prost_types::Timestamp {
            seconds: p.at_ms.div_euclid(1000),
            nanos: (p.at_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        post_id: 0,
    }
}

/// The displayed post time: the client's, unless absent or absurd.
fn post_time(m: &Message) -> i64 {
    m.timestamp.as_ref().and_then(|t| sns_proto::rules::post_time_ms(t.seconds, t.nanos)).unwrap_or_else(now_ms)
}

impl Sns {
    /// The caller: a valid id of this server's cluster.
    fn caller(&self, username: &str) -> Result<u32, Outcome> {
        let user = parse_user(username).map_err(|_| Outcome::InvalidUsername)?;
        crate::telemetry::record_user(user);
        if self.node.read(|s| s.is_local(user)) { Ok(user) } else { Err(Outcome::Invalid) }
    }

    async fn relation(&self, req: SnsRequest, follow: bool) -> Result<Response<Reply>, Status> {
        let user = match self.caller(&req.username) {
            Ok(u) => u,
            Err(o) => return Ok(reply(o)),
        };
        // Exactly one argument (SPEC §2).
        if req.arguments.len() != 1 {
            return Ok(reply(Outcome::Invalid));
        }
        let Some(target) = req.arguments.first().and_then(|a| parse_user(a.trim()).ok()) else {
            return Ok(reply(Outcome::InvalidUsername));
        };
        let outcome = self
            .node
            .write(
                user,
                req.request_id,
                Box::new(move |s| {
                    let check = if follow { s.check_follow(user, target) } else { s.check_unfollow(user, target) };
                    match check {
                        Outcome::Success => {
                            Ok(Some(Change::Relation { follower: user, followee: target, follow, at_ms: now_ms() }))
                        }
                        refusal => Err(refusal),
                    }
                }),
            )
            .await?;
        Ok(reply(outcome.err().unwrap_or(Outcome::Success)))
    }
}

/// The response stream of `Timeline`, shared with the gateway.
pub(crate) type TimelineStream = Pin<Box<dyn Stream<Item = Result<Message, Status>> + Send>>;

/// The first message of a timeline stream: it names the user; with text it
/// is also the user's first post (SPEC: both the opening and a post).
pub(crate) async fn read_opening(inbound: &mut Streaming<Message>) -> Result<Message, Status> {
    inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("timeline opened without a message naming the user"))
}

#[tonic::async_trait]
impl SnsService for Sns {
    async fn login(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        let req = req.into_inner();
        let user = match self.caller(&req.username) {
            Ok(u) => u,
            Err(o) => return Ok(reply(o)),
        };
        let result = self
            .node
            .write(user, req.request_id, Box::new(move |s| Ok((!s.has_user(user)).then_some(Change::User(user)))))
            .await?;
        Ok(reply(result.err().unwrap_or(Outcome::Success)))
    }

    async fn list(&self, req: Request<SnsRequest>) -> Result<Response<ListReply>, Status> {
        let user = self.caller(&req.into_inner().username).map_err(|o| Status::invalid_argument(o.as_str()))?;
        // Committed state, from the master of the current term only.
        self.node.ensure_serving().await?;
        self.node.read(|s| {
            if !s.has_user(user) {
                return Err(Status::not_found(Outcome::NotExists.as_str()));
            }
            Ok(Response::new(ListReply {
                all_users: s.users().iter().map(u32::to_string).collect(),
                followers: s.followers(user).map(|u| u.to_string()).collect(),
            }))
        })
    }

    async fn follow(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        self.relation(req.into_inner(), true).await
    }

    async fn un_follow(&self, req: Request<SnsRequest>) -> Result<Response<Reply>, Status> {
        self.relation(req.into_inner(), false).await
    }

    type TimelineStream = TimelineStream;

    async fn timeline(&self, req: Request<Streaming<Message>>) -> Result<Response<TimelineStream>, Status> {
        let mut inbound = req.into_inner();
        let opening = read_opening(&mut inbound).await?;
        let user = self.caller(&opening.username).map_err(|o| Status::invalid_argument(o.as_str()))?;
        self.node.ensure_serving().await?;
        if !self.node.read(|s| s.has_user(user)) {
            return Err(Status::not_found(format!("{}: user {user} has not logged in", Outcome::NotExists.as_str())));
        }
        // A reader resuming after position p (its last post shown) reads
        // the feed from index p on, if the feed has the history p was
        // counted in (see `Resume::within`).
        // Position 0 with an anchor: from the feed's start (see
        // `EMPTY_FEED_ANCHOR`); with none: no position, the backlog.
        let resume = (opening.feed_position > 0 || opening.feed_anchor != 0).then(|| Resume {
            from: usize::try_from(opening.feed_position).unwrap_or(usize::MAX),
            anchor: opening.feed_anchor,
        });
        let (start, live) = self.node.store().subscribe(user, resume);
        // Where the stream's live posts continue the feed, for a client to
        // resume from after a break even if no post came on this stream.
        let (start_position, start_anchor) = (start.next, start.anchor);
        // Acknowledgements and refusals of the client's posts.
        let (tx, rx) = mpsc::channel(64);
        // A first message with text is a post as well as the opening.
        let first = (!opening.msg.is_empty()).then_some(opening);
        let posts_span = tracing::info_span!("timeline_posts", user);
        tokio::spawn(tracing::Instrument::instrument(
            take_posts(self.node.clone(), user, first, inbound, tx),
            posts_span,
        ));
        let posts = feed_stream(self.node.clone(), user, start, live);
        let out = tokio_stream::StreamExt::merge(posts, ReceiverStream::new(rx));
        // The stream ends, telling the client to ask again, the moment this
        // server stops serving (lease lost, replaced, disk failed).
        let stopped = stop_serving(self.node.clone());
        let out = tokio_stream::StreamExt::merge(
            out.take_until(stopped.clone()),
            tokio_stream::once(()).then(move |()| {
                let stopped = stopped.clone();
                async move {
                    stopped.await;
                    Err(Status::unavailable("this server stopped serving; ask the coordinator for the master again"))
                }
            }),
        );
        let open = OpenStream::new();
        let out = out.take_until(self.shutdown.clone().cancelled_owned()).map(move |m| {
            let _counted = &open;
            m
        });
        let mut response = Response::new(Box::pin(out) as TimelineStream);
        put_feed_start(response.metadata_mut(), (start_position as u64, start_anchor));
        Ok(response)
    }
}

/// Counts an open timeline stream for as long as it lives.
struct OpenStream;

impl OpenStream {
    fn new() -> OpenStream {
        crate::metrics::get().timeline_streams.inc();
        OpenStream
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        crate::metrics::get().timeline_streams.dec();
    }
}

/// Resolves once `node` stops serving clients.
fn stop_serving(node: Node) -> futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>> {
    use futures_util::FutureExt as _;
    async move {
        let mut serving = node.watch_serving();
        let _ = serving.wait_for(|s| !*s).await;
    }
    .boxed()
    .shared()
}

/// The backlog, then live feed posts, polled straight by the connection
/// (no task in between: a post wakes the stream that sends it, and posts
/// that landed together go out in one write). Each live post carries its
/// index in the reader's feed: a reader that fell more than
/// [`LIVE_BUFFER`] posts behind (a slow link, a client that stopped
/// reading for a while) gets what it missed from the feed itself, in
/// order, before the live posts again, so it never silently misses one.
/// A reader resuming (see [`crate::store::Start`]) starts that way.
fn feed_stream(
    node: Node,
    user: u32,
    start: crate::store::Start,
    live: broadcast::Receiver<(usize, FeedItem)>,
) -> impl Stream<Item = Result<Message, Status>> + Send + 'static {
    struct Live {
        node: Node,
        user: u32,
        rx: broadcast::Receiver<(usize, FeedItem)>,
        /// Feed index of the next post to send.
        next: usize,
        /// Read from the feed, not yet sent (with their indices).
        read: std::collections::VecDeque<(usize, FeedItem)>,
        /// Missed live posts: read the feed from `next` on.
        behind: bool,
    }
    let live = Live { node, user, rx: live, next: start.next, read: Default::default(), behind: start.resumed };
    let live = futures_util::stream::unfold(live, |mut l| async move {
        loop {
            if let Some((at, post)) = l.read.pop_front() {
                return Some((Ok(to_message(&post, at)), l));
            }
            if l.behind {
                let posts = l.node.store().feed_from(l.user, l.next, LIVE_BUFFER);
                l.next += posts.len();
                l.behind = !posts.is_empty();
                l.read.extend(posts);
                continue;
            }
            match l.rx.recv().await {
                // Already read from the feed.
                Ok((at, _)) if at < l.next => {}
                Ok((at, post)) if at == l.next => {
                    l.next += 1;
                    return Some((Ok(to_message(&post, at)), l));
                }
                // A post between the last one sent and this one never came
                // live: the feed has it.
                Ok(_) => l.behind = true,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(user = l.user, missed, "timeline reader fell behind: reading the feed");
                    l.behind = true;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    tokio_stream::iter(start.backlog.into_iter().map(|(at, p)| Ok(to_message(&p, at)))).chain(live)
}

/// Posts of one stream queued and not yet acknowledged, at most: a client
/// that sends faster waits (HTTP/2 flow control holds it back).
const POSTS_IN_FLIGHT: usize = 64;

type Committed = oneshot::Receiver<crate::error::Result<()>>;

/// Turns every later client message into a post. Posts are queued as they
/// arrive, without waiting for the previous one's commit (so a client's
/// posts in flight commit together), and acknowledged in order.
async fn take_posts(
    node: Node,
    user: u32,
    mut first: Option<Message>,
    mut inbound: Streaming<Message>,
    tx: mpsc::Sender<Result<Message, Status>>,
) {
    let (queued, mut pending) = mpsc::channel::<(u64, std::time::Instant, Committed)>(POSTS_IN_FLIGHT);
    let acks = async move {
        while let Some((id, arrived, committed)) = pending.recv().await {
            let result = committed.await.unwrap_or(Err(Error::Stopping));
            if result.is_ok() {
                let m = crate::metrics::get();
                m.posts_committed.inc();
                m.post_commit_seconds.observe(arrived.elapsed().as_secs_f64());
            }
            match result {
                // A post resent after a failover (same id) is acknowledged
                // again but applied only once.
                Ok(()) if id != 0 => {
                    if tx.send(Ok(Message { post_id: id, ..Default::default() })).await.is_err() {
                        return;
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            }
        }
    };
    let reads = async move {
        loop {
            let msg = match first.take() {
                Some(msg) => msg,
                None => match inbound.message().await {
                    Ok(Some(msg)) => msg,
                    _ => break,
                },
            };
            if msg.msg.is_empty() {
                continue;
            }
            let arrived = std::time::Instant::now();
            let committed = match check_post_text(&msg.msg) {
                Ok(()) => {
                    let at_ms = post_time(&msg);
                    node.queue_post(Post { user, text: msg.msg.as_str().into(), at_ms, client_id: msg.post_id })
                }
                Err(why) => {
                    // Refuse loudly (after the acks of the posts before it)
                    // and end the session: the client learns why.
                    let (refused, committed) = oneshot::channel();
                    let _ = refused.send(Err(Error::Invalid(why)));
                    let _ = queued.send((msg.post_id, arrived, committed)).await;
                    return;
                }
            };
            if queued.send((msg.post_id, arrived, committed)).await.is_err() {
                return;
            }
        }
    };
    // Reading stops when the acks stop (the client left, or a refusal);
    // the acks go on until every queued post is answered.
    tokio::pin!(acks);
    tokio::select! {
        _ = &mut acks => {}
        _ = reads => acks.await,
    }
}
