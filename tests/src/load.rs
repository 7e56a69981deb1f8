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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// Longest a writer waits for one acknowledgement before it treats the
/// server as gone and fails over.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

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
    let reply = sns.login(Request { username: user.to_string(), arguments: vec![] }).await?.into_inner();
    if reply.msg != "SUCCESS" {
        return Err(anyhow!("login of {user}: {}", reply.msg));
    }
    Ok(sns)
}

/// Runs a unary command against the user's master, failing over until it
/// gets an answer (bounded by `deadline`); returns the status word.
pub async fn command(coord_port: u16, user: u32, follow: bool, target: u32, deadline: Instant) -> Result<String> {
    loop {
        let attempt = async {
            let mut sns = attach(coord_port, user).await?;
            let req = Request { username: user.to_string(), arguments: vec![target.to_string()] };
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

/// Posts `user-<n>` texts until `stop` is set (or `max` posts, or
/// `deadline`), each acknowledged before the next.
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
    let mut report = WriterReport { user, ..Default::default() };
    let id_base = (u64::from(std::process::id()) << 40) ^ (u64::from(user) << 24);
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
        let Ok(resp) = sns.timeline(UnboundedReceiverStream::new(rx)).await else { continue };
        let mut inbound = resp.into_inner();
        while !stop.load(Ordering::SeqCst) && n < max && Instant::now() < deadline {
            let text = format!("{user}-{n}");
            let id = id_base + n as u64 + 1;
            let post = Message { username: user.to_string(), msg: text.clone(), timestamp: None, post_id: id };
            if tx.send(post).is_err() {
                report.failovers += 1;
                continue 'session;
            }
            let acked = tokio::time::timeout(ACK_TIMEOUT, async {
                loop {
                    match inbound.message().await {
                        Ok(Some(m)) if m.post_id == id && m.msg.is_empty() => return true,
                        Ok(Some(_)) => continue, // a followee's post
                        _ => return false,
                    }
                }
            })
            .await;
            if acked != Ok(true) {
                // Same post, same id, on the next server: applied at most once.
                report.failovers += 1;
                continue 'session;
            }
            report.longest_gap = report.longest_gap.max(last_ack.elapsed());
            last_ack = Instant::now();
            report.acked.push(text);
            progress.fetch_add(1, Ordering::SeqCst);
            n += 1;
        }
        break;
    }
    report
}
