//! The single writer of a master: one task takes every write waiting —
//! client writes (Login, Follow, UnFollow), posts, other clusters' events —
//! decides each in arrival order against the committed state with the
//! group's earlier writes on top, and commits the whole group as one
//! journal append, one fsync, one forward to the slave and one fsync there.
//! Under load a cycle carries many writes for the cost of one.

use super::Node;
use crate::error::{Error, Result};
use crate::store::state::{Arrival, Change, Entry, Group, LocalOp, Outcome, Pending, Post, RemoteEvent, View};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The writer counts as busy when its previous group ended this recently
/// before the next write arrived (see [`waits_for_more`]).
const BUSY_WINDOW: Duration = Duration::from_millis(5);

/// Whether the writer, given the first write of its next group at `now`,
/// waits `delay` for more before it commits (`--commit-delay`). Only under
/// concurrent load: the previous group carried more than one write and
/// ended within [`BUSY_WINDOW`]. An idle server, or a lone client sending
/// one write after another (groups of one), never waits. Under load the
/// wait gathers more writes into each group: fewer journal appends,
/// fsyncs and forwards to the slave on every server, and fewer and larger
/// broker messages downstream; each group then commits sooner, so the
/// writes wait less overall than the delay adds (docs/benchmarks.md).
fn waits_for_more(delay: Duration, previous: Option<(usize, Instant)>, now: Instant) -> bool {
    match previous {
        Some((writes, ended)) => !delay.is_zero() && writes > 1 && now.saturating_duration_since(ended) < BUSY_WINDOW,
        None => false,
    }
}

/// How a client write is decided: the change to make (None: nothing to
/// do), or a refusal.
pub type Decide = Box<dyn FnOnce(&View<'_>) -> Result<Option<Change>, Outcome> + Send>;

/// What became of a batch of other clusters' events, once committed.
#[derive(Debug, Default)]
pub struct Applied {
    /// Journaled: applied, or held for a gap.
    pub journaled: usize,
    /// Cannot be valid (index in the batch, why).
    pub rejected: Vec<(usize, String)>,
    /// Found no room to be held behind a gap: left for their origin to
    /// send again (see [`Arrival::Full`]).
    pub deferred: usize,
}

/// A write waiting for the writer.
pub enum Request {
    Client {
        user: u32,
        request_id: u64,
        decide: Decide,
        done: oneshot::Sender<Result<Result<(), Outcome>>>,
    },
    Post {
        post: Post,
        done: oneshot::Sender<Result<()>>,
    },
    Remote {
        events: Vec<RemoteEvent>,
        done: oneshot::Sender<Result<Applied>>,
    },
    /// Another cluster's events up to `upto` (in `epoch`) are gone for good.
    Gap {
        origin: u32,
        epoch: u64,
        upto: u64,
        done: oneshot::Sender<Result<()>>,
    },
}

/// A request and when it was queued: the writer measures how long writes
/// wait for their group (`sns_commit_wait_seconds`).
pub type Queued = (Instant, Request);

/// Most requests in one cycle, and most posts or events: bounds one
/// journal write and one replication request (posts are at most 4 KiB).
const MAX_REQUESTS: usize = 1024;
const MAX_RECORDS: usize = 2048;

impl Request {
    fn records(&self) -> usize {
        match self {
            Request::Remote { events, .. } => events.len(),
            _ => 1,
        }
    }
}

/// What one request amounts to once decided.
enum Answer {
    Client(Result<(), Outcome>),
    Post,
    Remote(Applied),
}

impl Node {
    fn submit(&self, request: Request) {
        // A closed queue drops the request's sender: its receiver then
        // reports the stop.
        let _ = self.0.writes.send((Instant::now(), request));
    }

    /// Runs a client write as master: `decide` sees the state (with the
    /// writes decided before it in its group) and returns the change to
    /// make (None: nothing to do) or a refusal. Ok once the change is on
    /// every in-sync server. A request id this user already used is
    /// answered as done (a retry after a failover).
    pub async fn write(&self, user: u32, request_id: u64, decide: Decide) -> Result<Result<(), Outcome>> {
        let (done, result) = oneshot::channel();
        self.submit(Request::Client { user, request_id, decide, done });
        result.await.unwrap_or(Err(Error::Stopping))
    }

    /// Queues a post; the receiver tells when it is committed (or why not).
    /// A post whose client id was already applied is acknowledged without
    /// being applied again.
    pub fn queue_post(&self, post: Post) -> oneshot::Receiver<Result<()>> {
        let (done, result) = oneshot::channel();
        self.submit(Request::Post { post, done });
        result
    }

    /// Queues events of other clusters for the writer, to be applied as
    /// master in this cluster's log order with its own writes, replicated
    /// to the in-sync servers like them (a slave never applies them on its
    /// own: it gets them from its master, so both hold the same events in
    /// the same order). The receiver tells when they are committed. Batches
    /// queued one after the other enter the log in that order.
    pub fn queue_remote(&self, events: Vec<RemoteEvent>) -> oneshot::Receiver<Result<Applied>> {
        let (done, result) = oneshot::channel();
        self.submit(Request::Remote { events, done });
        result
    }

    /// Queues a gap marker of `origin`'s stream (see [`Entry::Gap`]) for
    /// the writer: in this cluster's log order, replicated like events.
    pub async fn skip_gap(&self, origin: u32, epoch: u64, upto: u64) -> Result<()> {
        let (done, result) = oneshot::channel();
        self.submit(Request::Gap { origin, epoch, upto, done });
        result.await.unwrap_or(Err(Error::Stopping))
    }

    /// Decides and commits one group of requests, and answers each.
    async fn commit_group(&self, group: Vec<Request>) {
        let _lane = self.0.lane.lock().await;
        let mut dones = Vec::with_capacity(group.len());
        let decided = async {
            let role = self.ensure_serving().await?;
            self.prepare_role(&role).await?;
            let (entries, answers, published) = {
                let store = self.store();
                let state = store.state();
                let mut pending = Pending::default();
                // Where the group's events of other clusters take each stream.
                let mut remote = Group::default();
                let mut seq = state.next_seq();
                let (mut entries, mut answers) = (Vec::new(), Vec::new());
                let local = |change: Change,
                             request_id: u64,
                             seq: &mut u64,
                             pending: &mut Pending,
                             entries: &mut Vec<Entry>| {
                    let op = LocalOp { seq: *seq, change, request_id };
                    pending.note(&op);
                    entries.push(Entry::Local(op));
                    *seq += 1;
                };
                for request in group {
                    match request {
                        Request::Client { user, request_id, decide, done } => {
                            dones.push(Done::Client(done));
                            let view = View::new(state, &pending);
                            if view.has_request_id(user, request_id) {
                                answers.push(Answer::Client(Ok(())));
                                continue;
                            }
                            let decision = decide(&view);
                            if let Ok(Some(change)) = &decision {
                                local(change.clone(), request_id, &mut seq, &mut pending, &mut entries);
                            }
                            answers.push(Answer::Client(decision.map(drop)));
                        }
                        Request::Post { post, done } => {
                            dones.push(Done::Post(done));
                            if !View::new(state, &pending).has_post_id(post.user, post.client_id) {
                                local(Change::Post(post), 0, &mut seq, &mut pending, &mut entries);
                            }
                            answers.push(Answer::Post);
                        }
                        Request::Remote { events, done } => {
                            dones.push(Done::Remote(done));
                            answers.push(Answer::Remote(classify(state, events, &mut remote, &mut entries)));
                        }
                        Request::Gap { origin, epoch, upto, done } => {
                            dones.push(Done::Post(done));
                            if state.gap_advances(origin, epoch, upto) {
                                tracing::warn!(
                                    origin,
                                    epoch,
                                    upto,
                                    "events of another cluster's stream are gone for good: going on after them"
                                );
                                state.skip_in(origin, epoch, upto, &mut remote);
                                entries.push(Entry::Gap { origin, epoch, upto });
                            }
                            answers.push(Answer::Post);
                        }
                    }
                }
                (entries, answers, state.published_upto())
            };
            if !entries.is_empty() {
                self.write_entries(&role, entries, published).await?;
            }
            Ok::<_, Error>(answers)
        }
        .await;
        match decided {
            Ok(answers) => {
                for (done, answer) in dones.into_iter().zip(answers) {
                    done.send(Ok(answer));
                }
            }
            // The group failed as one: each of its writers hears why.
            Err(e) => {
                for done in dones {
                    done.send(Err(e.duplicate()));
                }
            }
        }
    }
}

/// Sorts arriving events: those to journal (the next of their stream, or
/// ahead of it and held), duplicates (dropped) and impossible ones.
fn classify(
    state: &crate::store::state::State,
    events: Vec<RemoteEvent>,
    group: &mut Group,
    entries: &mut Vec<Entry>,
) -> Applied {
    let mut out = Applied::default();
    // Each against the state with the group's earlier events on top (of
    // this batch and of the batches before it in the group): a second
    // copy is a duplicate, and a gap the group closes is closed.
    for (i, e) in events.into_iter().enumerate() {
        let arrival = state.arrival_in(&e, group);
        state.take_in(&e, &arrival, group);
        match arrival {
            Arrival::Next | Arrival::Early => {
                out.journaled += 1;
                entries.push(Entry::Remote(e));
            }
            Arrival::Duplicate => {}
            Arrival::Full => out.deferred += 1,
            Arrival::Invalid(why) => {
                tracing::warn!(origin = e.origin, dest_seq = e.dest_seq, reason = %why, "event of another cluster refused: dead-lettered");
                out.rejected.push((i, why));
            }
        }
    }
    out
}

/// Where a request's answer goes.
enum Done {
    Client(oneshot::Sender<Result<Result<(), Outcome>>>),
    Post(oneshot::Sender<Result<()>>),
    Remote(oneshot::Sender<Result<Applied>>),
}

impl Done {
    fn send(self, answer: Result<Answer>) {
        match (self, answer) {
            (Done::Client(tx), Ok(Answer::Client(a))) => drop(tx.send(Ok(a))),
            (Done::Post(tx), Ok(_)) => drop(tx.send(Ok(()))),
            (Done::Remote(tx), Ok(Answer::Remote(a))) => drop(tx.send(Ok(a))),
            (Done::Client(tx), Err(s)) => drop(tx.send(Err(s))),
            (Done::Post(tx), Err(s)) => drop(tx.send(Err(s))),
            (Done::Remote(tx), Err(s)) => drop(tx.send(Err(s))),
            (Done::Client(tx), Ok(_)) => drop(tx.send(Err(Error::Other("answer mismatch".into())))),
            (Done::Remote(tx), Ok(_)) => drop(tx.send(Err(Error::Other("answer mismatch".into())))),
        }
    }
}

/// The writer: takes whatever is waiting (up to the cycle's bounds) and
/// commits it as one group, in arrival order; under concurrent load it
/// first waits the commit delay for more (see [`waits_for_more`]).
pub(super) async fn commit_loop(node: Node, mut queued: mpsc::UnboundedReceiver<Queued>, shutdown: CancellationToken) {
    let delay = node.cfg().commit_delay;
    // The previous group: how many writes, and when it ended.
    let mut previous: Option<(usize, Instant)> = None;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = queued.recv() => match r { Some(r) => r, None => return },
        };
        if waits_for_more(delay, previous, Instant::now()) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let metrics = crate::metrics::get();
        let started = Instant::now();
        let wait = |(queued_at, request): Queued| {
            metrics.commit_wait_seconds.observe(started.saturating_duration_since(queued_at).as_secs_f64());
            request
        };
        let first = wait(first);
        let mut records = first.records();
        let mut group = vec![first];
        while group.len() < MAX_REQUESTS && records < MAX_RECORDS {
            match queued.try_recv() {
                Ok(r) => {
                    let r = wait(r);
                    records += r.records();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        let writes = group.len();
        metrics.commit_group_writes.observe(writes as f64);
        node.commit_group(group).await;
        let ended = Instant::now();
        metrics.commit_cycle_seconds.observe(ended.saturating_duration_since(started).as_secs_f64());
        previous = Some((writes, ended));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_waits_for_more_only_under_concurrent_load() {
        let delay = Duration::from_millis(1);
        let now = Instant::now();
        let just = now - Duration::from_micros(200);
        // The previous group had company and just ended: wait.
        assert!(waits_for_more(delay, Some((2, just)), now));
        assert!(waits_for_more(delay, Some((300, just)), now));
        // The first write ever, an idle server, a lone sequential client.
        assert!(!waits_for_more(delay, None, now));
        assert!(!waits_for_more(delay, Some((40, now - BUSY_WINDOW)), now));
        assert!(!waits_for_more(delay, Some((40, now - Duration::from_secs(3))), now));
        assert!(!waits_for_more(delay, Some((1, just)), now));
        // Turned off.
        assert!(!waits_for_more(Duration::ZERO, Some((300, just)), now));
    }
}
