//! A load generator for the failover suites: writers that post through
//! real timeline streams with post ids, wait for each acknowledgement, and
//! ride through failovers (re-asking the coordinator, resending the
//! unacknowledged post). What they record as acknowledged must never be
//! lost.

use anyhow::{Result, anyhow};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Message, Request};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Longest a writer waits for one acknowledgement before it treats the
/// server as gone and fails over.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Numbers every post a writer of this process makes: each call of
/// [`writer`] takes a fresh range, so no two phases of a test ever send the
/// same post id or text (a server acknowledges a resent id without writing
/// it again, so a reused id would make a phase look written when it wrote
/// nothing). Seeded from the clock so that two test processes sharing a
/// deployment never collide either.
static NEXT_CALL: AtomicU64 = AtomicU64::new(0);

/// A process-unique tag for one writer call: (call number, id base).
fn next_call() -> (u64, u64) {
    let call = NEXT_CALL.fetch_add(1, Ordering::SeqCst);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // 2^24 posts per call at most; the high bits keep processes apart.
    let base = ((seed ^ u64::from(std::process::id())) << 40) ^ (call << 24);
    (call, base)
}

/// The wall clock, in whole seconds since the epoch (what a client puts in
/// a post's timestamp).
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// What one writer saw.
#[derive(Debug, Default, Clone)]
pub struct WriterReport {
    pub user: u32,
    /// Texts of the posts the servers acknowledged, in order.
    pub acked: Vec<String>,
    /// Longest time between two acknowledgements (the outage it saw).
    pub longest_gap: Duration,
    pub failovers: u32,
}

fn channel(addr: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .connect_lazy())
}

/// The user's current server, logged in.
pub async fn attach(coord_port: u16, user: u32) -> Result<SnsServiceClient<Channel>> {
    let mut coord = CoordServiceClient::new(channel(&format!("127.0.0.1:{coord_port}"))?);
    let info = coord.get_server(Id { id: user as i32 }).await?.into_inner();
    if info.port.is_empty() {
        return Err(anyhow!("no master for user {user} yet"));
    }
    let mut sns = SnsServiceClient::new(channel(&format!("{}:{}", info.hostname, info.port))?);
    let login = Request { username: user.to_string(), arguments: vec![], request_id: next_call().1 };
    let reply = sns.login(login).await?.into_inner();
    if reply.msg != "SUCCESS" {
        return Err(anyhow!("login of {user}: {}", reply.msg));
    }
    Ok(sns)
}

/// `user`'s LIST on its current master, one attempt: every user the
/// cluster knows, and `user`'s followers.
pub async fn list(coord_port: u16, user: u32) -> Result<(Vec<String>, Vec<String>)> {
    let mut sns = attach(coord_port, user).await?;
    let req = Request { username: user.to_string(), arguments: vec![], request_id: 0 };
    let reply = sns.list(req).await?.into_inner();
    Ok((reply.all_users, reply.followers))
}

/// Runs a unary command against the user's master, failing over until it
/// gets an answer (bounded by `deadline`); returns the status word. Every
/// attempt carries the same request id, as `tsc` does: a retry of a write
/// the old master made durable answers as the first attempt did.
pub async fn command(coord_port: u16, user: u32, follow: bool, target: u32, deadline: Instant) -> Result<String> {
    let request_id = next_call().1;
    loop {
        let attempt = async {
            let mut sns = attach(coord_port, user).await?;
            let req = Request { username: user.to_string(), arguments: vec![target.to_string()], request_id };
            let reply = if follow { sns.follow(req).await? } else { sns.un_follow(req).await? };
            anyhow::Ok(reply.into_inner().msg)
        };
        match attempt.await {
            Ok(msg) => return Ok(msg),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Posts `<user>-w<call>-<n>` texts until `stop` is set (or `max` posts,
/// or `deadline`), each acknowledged before the next. Every call posts
/// texts and ids no earlier call used.
pub async fn writer(coord_port: u16, user: u32, stop: Arc<AtomicBool>, max: usize, deadline: Instant) -> WriterReport {
    writer_counting(coord_port, user, stop, max, deadline, Arc::default()).await
}

/// [`writer`], adding every acknowledged post to `progress`.
pub async fn writer_counting(
    coord_port: u16,
    user: u32,
    stop: Arc<AtomicBool>,
    max: usize,
    deadline: Instant,
    progress: Arc<AtomicUsize>,
) -> WriterReport {
    writer_padded(coord_port, user, stop, max, deadline, progress, 0).await
}

/// [`writer_counting`] with `pad` bytes of filler after each text (posts
/// big enough to need new disk pages).
pub async fn writer_padded(
    coord_port: u16,
    user: u32,
    stop: Arc<AtomicBool>,
    max: usize,
    deadline: Instant,
    progress: Arc<AtomicUsize>,
    pad: usize,
) -> WriterReport {
    Writer { coord_port, user, stop, max, deadline, progress, pad, pace: Duration::ZERO, clock: None }.run().await
}

/// A writer with every knob: see [`writer`].
#[derive(Debug, Clone)]
pub struct Writer {
    pub coord_port: u16,
    pub user: u32,
    pub stop: Arc<AtomicBool>,
    pub max: usize,
    pub deadline: Instant,
    pub progress: Arc<AtomicUsize>,
    /// Filler bytes after each text.
    pub pad: usize,
    /// Pause after each acknowledged post (a steady, bounded load).
    pub pace: Duration,
    /// The client's clock, in seconds off the true one: each post carries
    /// that time (None: posts carry no time, as the server's clock is used).
    pub clock: Option<i64>,
}

impl Writer {
    pub async fn run(self) -> WriterReport {
        let Writer { coord_port, user, stop, max, deadline, progress, pad, pace, clock } = self;
        let mut report = WriterReport { user, ..Default::default() };
        let (call, id_base) = next_call();
        let mut last_ack = Instant::now();
        let mut n = 0usize;
        'session: while !stop.load(Ordering::SeqCst) && n < max && Instant::now() < deadline {
            let Ok(mut sns) = attach(coord_port, user).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let opening = Message { username: user.to_string(), ..Default::default() };
            let _ = tx.send(opening);
            let Ok(resp) = sns.timeline(UnboundedReceiverStream::new(rx)).await else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let mut inbound = resp.into_inner();
            while !stop.load(Ordering::SeqCst) && n < max && Instant::now() < deadline {
                let text = format!("{user}-w{call}-{n}{}", ".".repeat(pad));
                let id = id_base + n as u64 + 1;
                let timestamp =
                    clock.map(|off| sns_proto::prost_types::Timestamp { seconds: now_secs() + off, nanos: 0 });
                let post = Message {
                    username: user.to_string(),
                    msg: text.clone(),
                    timestamp,
                    post_id: id,
                    feed_position: 0,
                    feed_anchor: 0,
                };
                if tx.send(post).is_err() {
                    report.failovers += 1;
                    continue 'session;
                }
                if !await_ack(&mut inbound, id, ACK_TIMEOUT).await {
                    // Same post, same id, on the next server: applied at most once.
                    report.failovers += 1;
                    continue 'session;
                }
                report.longest_gap = report.longest_gap.max(last_ack.elapsed());
                last_ack = Instant::now();
                report.acked.push(text);
                progress.fetch_add(1, Ordering::SeqCst);
                n += 1;
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
            break;
        }
        report
    }
}

/// Whether post `id`, sent on a timeline stream, is acknowledged on it
/// within `within` (followees' posts coming meanwhile pass by); false if
/// the stream fails or ends first.
pub async fn await_ack(inbound: &mut tonic::Streaming<Message>, id: u64, within: Duration) -> bool {
    let acked = tokio::time::timeout(within, async {
        loop {
            match inbound.message().await {
                Ok(Some(m)) if m.post_id == id && m.msg.is_empty() => return true,
                Ok(Some(_)) => continue, // a followee's post
                _ => return false,
            }
        }
    });
    acked.await == Ok(true)
}

/// Users `follower` and `followee` log in, `follower` follows `followee`
/// (asked again until it succeeds, e.g. while `followee` has not yet
/// reached `follower`'s cluster), and returns once the follow reached
/// `followee`'s cluster.
pub async fn follow_until_done(coord_port: u16, follower: u32, followee: u32, deadline: Instant) -> Result<()> {
    attach(coord_port, followee).await?;
    attach(coord_port, follower).await?;
    let mut msg = String::new();
    while msg != "SUCCESS" && Instant::now() < deadline {
        msg = command(coord_port, follower, true, followee, deadline).await?;
    }
    wait_followers(coord_port, followee, &[follower], deadline).await
}

/// Waits until `user`'s LIST shows each of `followers` as a follower: their
/// follows reached `user`'s cluster, so posts `user` makes from now on are
/// in their feeds (visibility follows the log, not clocks).
pub async fn wait_followers(coord_port: u16, user: u32, followers: &[u32], deadline: Instant) -> Result<()> {
    loop {
        if let Ok((_, list)) = list(coord_port, user).await
            && followers.iter().all(|f| list.contains(&f.to_string()))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("user {user}'s followers never included all of {followers:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A feed post as a timeline stream sent it: text, position, anchor.
pub type FeedPost = (String, u64, u64);

/// What [`read_feed`] read: where the stream said its live posts continue
/// the feed (position and anchor; None when it did not say), and the posts.
#[derive(Debug)]
pub struct FeedRead {
    pub start: Option<(u64, u64)>,
    pub posts: Vec<FeedPost>,
}

/// Opens `user`'s timeline on its master, resuming after `from` (a feed
/// position and the anchor that came with it; (0, 0): none), and reads
/// feed posts until `until` holds for what arrived or 5 s went by.
pub async fn read_feed(
    coord_port: u16,
    user: u32,
    (feed_position, feed_anchor): (u64, u64),
    until: impl Fn(&[FeedPost]) -> bool,
) -> Result<FeedRead> {
    let mut sns = attach(coord_port, user).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Message { username: user.to_string(), feed_position, feed_anchor, ..Default::default() })?;
    let response = sns.timeline(UnboundedReceiverStream::new(rx)).await?;
    let start = sns_proto::rules::feed_start(response.metadata());
    let mut inbound = response.into_inner();
    let mut posts = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !until(&posts) {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(m))) if !m.msg.is_empty() => posts.push((m.msg, m.feed_position, m.feed_anchor)),
            Ok(Ok(Some(_))) => {}
            _ => break,
        }
    }
    Ok(FeedRead { start, posts })
}
