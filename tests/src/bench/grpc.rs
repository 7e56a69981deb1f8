//! Raw tonic clients of the course protocol, so every step is timestamped
//! where it happens (no `tsc` process and pipe in between).
//!
//! Each user has its own connection to its cluster's master, as each `tsc`
//! does. Timeline streams report what they receive as [`Event`]s on one
//! channel, stamped on arrival with the run's [`Clock`]; a bench post's
//! text is `<seq>:<send time in ns>`, so the latency is computed from the
//! bench's own clock alone.

use super::stats::Clock;
use anyhow::{Context, Result, anyhow, bail};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Message, Request};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// A refused connection on loopback fails at once; this only bounds a
/// server that accepts and hangs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Upper bound of one unary call: generous against a busy 2-core machine,
/// small against the bench's own time limits.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn endpoint(addr: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// A channel that connects lazily, with a per-call timeout.
pub fn lazy_channel(addr: &str) -> Result<Channel> {
    Ok(endpoint(addr)?.timeout(CALL_TIMEOUT).connect_lazy())
}

/// A lazily connecting node-to-node channel (`CoordAdmin`, `Replica`),
/// carrying the deployment's token.
pub fn node_channel(addr: &str) -> Result<sns_node::net::NodeChannel> {
    let channel = lazy_channel(addr)?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, crate::secret::attach()))
}

/// A channel connected now (so the first call does not pay the handshake).
pub async fn connect(addr: &str) -> Result<Channel> {
    endpoint(addr)?.timeout(CALL_TIMEOUT).connect().await.with_context(|| format!("connecting to {addr}"))
}

/// The coordinator's `CoordService`.
#[derive(Clone)]
pub struct Coord {
    client: CoordServiceClient<Channel>,
    pub addr: String,
}

impl Coord {
    pub async fn connect(port: u16) -> Result<Coord> {
        let addr = format!("127.0.0.1:{port}");
        Ok(Coord { client: CoordServiceClient::new(connect(&addr).await?), addr })
    }

    /// `GetServer`: host:port of the master serving `user`.
    pub async fn server_of(&self, user: u32) -> Result<String> {
        let info = self.client.clone().get_server(Id { id: user as i32 }).await?.into_inner();
        if info.hostname.is_empty() || info.port.is_empty() {
            bail!("the coordinator knows no master for user {user}");
        }
        Ok(format!("{}:{}", info.hostname, info.port))
    }
}

/// A logged-in user with its own connection to its master (clones share
/// the connection).
#[derive(Clone)]
pub struct User {
    pub id: u32,
    pub addr: String,
    pub sns: SnsServiceClient<Channel>,
}

#[allow(clippy::needless_update, reason = "the course's Request grows optional extension fields")]
fn request(user: u32, args: &[String]) -> Request {
    Request { username: user.to_string(), arguments: args.to_vec(), ..Default::default() }
}

impl User {
    /// Asks the coordinator for the user's server, connects and logs in.
    pub async fn login(coord: &Coord, id: u32) -> Result<User> {
        let addr = coord.server_of(id).await?;
        let mut sns = SnsServiceClient::new(connect(&addr).await?);
        let reply = sns.login(request(id, &[])).await?.into_inner().msg;
        if reply != "SUCCESS" {
            bail!("login of {id} at {addr}: {reply}");
        }
        Ok(User { id, addr, sns })
    }

    /// Follow (or unfollow) `target`; returns the reply's status word.
    pub async fn relation(&mut self, target: u32, follow: bool) -> Result<String> {
        let req = request(self.id, &[target.to_string()]);
        let reply = if follow { self.sns.follow(req).await? } else { self.sns.un_follow(req).await? };
        Ok(reply.into_inner().msg)
    }

    /// `List`: (all users, followers of this user).
    pub async fn list(&mut self) -> Result<(Vec<u32>, Vec<u32>)> {
        let reply = self.sns.list(request(self.id, &[])).await?.into_inner();
        let ids = |v: Vec<String>| v.iter().filter_map(|s| s.parse().ok()).collect();
        Ok((ids(reply.all_users), ids(reply.followers)))
    }

    /// Opens the user's timeline stream: sends the opening and returns once
    /// the server has subscribed the stream (it answers only then).
    /// `buffer` bounds the posts queued on the client side.
    pub async fn open_timeline(
        &mut self,
        clock: Clock,
        events: mpsc::UnboundedSender<Event>,
        buffer: usize,
    ) -> Result<Timeline> {
        let (tx, rx) = mpsc::channel(buffer);
        tx.send(Message { username: self.id.to_string(), ..Default::default() })
            .await
            .map_err(|_| anyhow!("timeline channel closed"))?;
        let mut inbound = self
            .sns
            .timeline(ReceiverStream::new(rx))
            .await
            .with_context(|| format!("opening the timeline of {}", self.id))?
            .into_inner();
        let user = self.id;
        let reader = tokio::spawn(async move {
            loop {
                let event = match inbound.message().await {
                    Ok(Some(m)) => {
                        let at_ns = clock.ns();
                        if m.msg.is_empty() {
                            if m.post_id == 0 {
                                continue;
                            }
                            Event::Acked { user, seq: m.post_id, at_ns }
                        } else {
                            let Some((seq, sent_ns)) = parse_post(&m.msg) else {
                                continue;
                            };
                            Event::Delivered {
                                receiver: user,
                                author: m.username.parse().unwrap_or(0),
                                seq,
                                sent_ns,
                                at_ns,
                            }
                        }
                    }
                    Ok(None) => Event::Ended { user, why: "stream closed by the server".into() },
                    Err(status) => Event::Ended { user, why: status.message().to_string() },
                };
                let end = matches!(event, Event::Ended { .. });
                if events.send(event).is_err() || end {
                    return;
                }
            }
        });
        Ok(Timeline { user, tx, reader, clock })
    }
}

/// What a timeline stream received.
#[derive(Debug, Clone)]
pub enum Event {
    /// A bench post reached `receiver`'s stream.
    Delivered { receiver: u32, author: u32, seq: u64, sent_ns: u64, at_ns: u64 },
    /// The server acknowledged post `seq` of `user` as durable (servers
    /// that echo `Message.postID`; older ones never send this).
    Acked { user: u32, seq: u64, at_ns: u64 },
    /// The stream ended.
    Ended { user: u32, why: String },
}

pub fn post_text(seq: u64, sent_ns: u64) -> String {
    format!("{seq}:{sent_ns}")
}

fn parse_post(text: &str) -> Option<(u64, u64)> {
    let (seq, sent) = text.split_once(':')?;
    Some((seq.parse().ok()?, sent.parse().ok()?))
}

/// An open timeline stream: posts go out through it, and what arrives is
/// reported as [`Event`]s by a reader task that ends with it.
pub struct Timeline {
    pub user: u32,
    tx: mpsc::Sender<Message>,
    reader: JoinHandle<()>,
    clock: Clock,
}

impl Timeline {
    /// Posts bench post `seq`; returns its send time (ns on the run clock).
    pub async fn post(&self, seq: u64) -> Result<u64> {
        let sent_ns = self.clock.ns();
        self.tx
            .send(Message {
                username: self.user.to_string(),
                msg: post_text(seq, sent_ns),
                post_id: seq,
                ..Default::default()
            })
            .await
            .map_err(|_| anyhow!("timeline of {} is closed", self.user))?;
        Ok(sent_ns)
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_texts_round_trip() {
        assert_eq!(parse_post(&post_text(42, 123_456_789)), Some((42, 123_456_789)));
        assert_eq!(parse_post("p11"), None);
        assert_eq!(parse_post("1:x"), None);
    }
}
