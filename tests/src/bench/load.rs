//! Latency and throughput of posts through real timeline streams: the idle
//! probe (one post at a time), the closed-loop run at the system's maximum
//! rate, and the open-loop run at a controlled rate.
//!
//! A [`Tracker`] follows every post until each of its expected receivers
//! (the author's followers, in every cluster) has it on their stream, and
//! turns arrivals into latency samples, split by whether the receiver is in
//! the author's cluster (served at once) or another one (through the
//! synchronizers and the broker).

use super::grpc::{Event, Timeline};
use super::stats::{Clock, Samples, ns_to_ms};
use anyhow::{Result, anyhow};
use sns_node::ids::cluster_of;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A post on its way to its receivers.
struct Pending {
    author: u32,
    waiting: Vec<u32>,
}

/// What became of the posts of one phase.
#[derive(Default)]
pub struct Tracker {
    clusters: u32,
    pending: HashMap<u64, Pending>,
    /// Posts whose acknowledgement has not arrived: seq -> send time.
    unacked: HashMap<u64, u64>,
    pub cross: Samples,
    pub same: Samples,
    pub ack: Samples,
    pub sent: usize,
    pub completed: usize,
    pub deliveries: usize,
    pub first_sent_ns: u64,
    pub last_completion_ns: u64,
    /// A post arriving twice on a stream, or on the stream of a user who
    /// does not follow its author: both would be bugs.
    pub duplicates: usize,
    pub unexpected: usize,
    pub ended: Vec<String>,
}

impl Tracker {
    pub fn new(clusters: u32) -> Tracker {
        Tracker { clusters, ..Default::default() }
    }

    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    pub fn sent(&mut self, seq: u64, author: u32, sent_ns: u64, receivers: &[u32]) {
        if self.sent == 0 {
            self.first_sent_ns = sent_ns;
        }
        self.sent += 1;
        self.unacked.insert(seq, sent_ns);
        if !receivers.is_empty() {
            self.pending.insert(seq, Pending { author, waiting: receivers.to_vec() });
        }
    }

    /// Applies one event; true when it completed a post.
    pub fn on_event(&mut self, event: Event) -> bool {
        match event {
            Event::Delivered { receiver, author, seq, sent_ns, at_ns } => {
                let Some(p) = self.pending.get_mut(&seq) else {
                    // Not one of this phase's posts, or already complete:
                    // a second copy.
                    self.duplicates += 1;
                    return false;
                };
                let Some(i) = p.waiting.iter().position(|r| *r == receiver) else {
                    self.unexpected += 1;
                    return false;
                };
                debug_assert_eq!(p.author, author);
                p.waiting.swap_remove(i);
                self.deliveries += 1;
                let latency = ns_to_ms(at_ns.saturating_sub(sent_ns));
                if cluster_of(receiver, self.clusters) == cluster_of(p.author, self.clusters) {
                    self.same.push(latency);
                } else {
                    self.cross.push(latency);
                }
                if p.waiting.is_empty() {
                    self.pending.remove(&seq);
                    self.completed += 1;
                    self.last_completion_ns = self.last_completion_ns.max(at_ns);
                    return true;
                }
                false
            }
            Event::Acked { seq, at_ns, .. } => {
                if let Some(sent) = self.unacked.remove(&seq) {
                    self.ack.push(ns_to_ms(at_ns.saturating_sub(sent)));
                }
                false
            }
            Event::Ended { user, why } => {
                self.ended.push(format!("timeline of {user} ended: {why}"));
                false
            }
        }
    }

    /// Completed posts per second from the first send to the last completion.
    pub fn rate(&self) -> f64 {
        let secs = self.last_completion_ns.saturating_sub(self.first_sent_ns) as f64 / 1e9;
        if secs > 0.0 { self.completed as f64 / secs } else { 0.0 }
    }

    /// Fails if a stream ended or a post went where it should not.
    pub fn check(&self) -> Result<()> {
        if let Some(e) = self.ended.first() {
            return Err(anyhow!("{e}"));
        }
        if self.unexpected > 0 {
            return Err(anyhow!("{} deliveries to users who do not follow the author", self.unexpected));
        }
        Ok(())
    }
}

/// Open timeline streams of a set of users and who follows whom.
pub struct Streams {
    pub clock: Clock,
    pub timelines: BTreeMap<u32, Timeline>,
    /// author -> the users whose streams must receive the author's posts.
    pub followers: HashMap<u32, Vec<u32>>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub next_seq: u64,
}

impl Streams {
    /// Posts as `author`; records the post in `t`.
    pub async fn post(&mut self, t: &mut Tracker, author: u32) -> Result<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let tl = self.timelines.get(&author).ok_or_else(|| anyhow!("no timeline for {author}"))?;
        let sent = tl.post(seq).await?;
        let receivers = self.followers.get(&author).map_or(&[][..], Vec::as_slice);
        t.sent(seq, author, sent, receivers);
        Ok(seq)
    }

    /// Applies every event until `until` (or one already queued); returns
    /// how many posts completed.
    pub async fn pump(&mut self, t: &mut Tracker, until: Instant) -> usize {
        let mut done = 0;
        let first = match tokio::time::timeout_at(until.into(), self.events.recv()).await {
            Ok(Some(e)) => e,
            _ => return 0,
        };
        done += usize::from(t.on_event(first));
        while let Ok(e) = self.events.try_recv() {
            done += usize::from(t.on_event(e));
        }
        done
    }

    /// Throws away events of earlier phases.
    pub fn drain(&mut self) {
        while self.events.try_recv().is_ok() {}
    }
}

/// One post at a time, each after the previous reached all its receivers,
/// with `gap` between them: latency of an otherwise idle system.
pub async fn idle(
    s: &mut Streams,
    authors: &[u32],
    count: usize,
    warmup: usize,
    gap: Duration,
    budget: Duration,
    clusters: u32,
) -> Result<Tracker> {
    let deadline = Instant::now() + budget;
    let mut warm = Tracker::new(clusters);
    let mut t = Tracker::new(clusters);
    for i in 0..warmup + count {
        if Instant::now() >= deadline {
            break;
        }
        let tracker = if i < warmup { &mut warm } else { &mut t };
        let author = authors[i % authors.len()];
        s.post(tracker, author).await?;
        // Bounded by the phase's budget, plus a grace for this last post.
        let post_deadline = deadline.max(Instant::now() + Duration::from_secs(2));
        while tracker.outstanding() > 0 && Instant::now() < post_deadline {
            s.pump(tracker, post_deadline).await;
        }
        tracker.check()?;
        if tracker.outstanding() > 0 {
            return Err(anyhow!(
                "post {} of {author} did not reach all its followers within the budget",
                s.next_seq - 1
            ));
        }
        tokio::time::sleep(gap).await;
    }
    // Late acknowledgements still count.
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until && s.pump(&mut t, until).await > 0 {}
    Ok(t)
}

/// Closed loop: keeps `window` posts in flight, round-robin over the
/// authors, replacing each as it completes, for `duration`; then waits up
/// to `drain` for the last ones. The rate counts completed posts (every
/// receiver has it) per second.
pub async fn max_rate(
    s: &mut Streams,
    authors: &[u32],
    window: usize,
    max_posts: usize,
    duration: Duration,
    drain: Duration,
    clusters: u32,
) -> Result<Tracker> {
    let mut t = Tracker::new(clusters);
    let start = Instant::now();
    let stop_sending = start + duration;
    let give_up = stop_sending + drain;
    let mut next = 0;
    loop {
        let now = Instant::now();
        let sending = now < stop_sending && t.sent < max_posts;
        while sending && t.outstanding() < window && t.sent < max_posts {
            s.post(&mut t, authors[next % authors.len()]).await?;
            next += 1;
        }
        if (!sending && t.outstanding() == 0) || now >= give_up {
            break;
        }
        let until = if sending { stop_sending } else { give_up };
        s.pump(&mut t, until.min(now + Duration::from_millis(100))).await;
        t.check()?;
    }
    Ok(t)
}

/// Open loop: posts at `rate` per second, round-robin over the authors,
/// for `duration`, whatever the system does; then waits up to `drain`.
/// Stops sending early if more than `max_outstanding` posts are in flight
/// (the system cannot keep up; latency would only grow).
pub async fn fixed_rate(
    s: &mut Streams,
    authors: &[u32],
    rate: f64,
    duration: Duration,
    drain: Duration,
    max_outstanding: usize,
    clusters: u32,
) -> Result<(Tracker, bool)> {
    let mut t = Tracker::new(clusters);
    let start = Instant::now();
    let stop_sending = start + duration;
    let give_up = stop_sending + drain;
    let mut overloaded = false;
    let mut next = 0;
    // Sending is paced by this tick; a 2 ms tick keeps the pace within a
    // post or two of the target at any rate we can sustain.
    let tick = Duration::from_millis(2);
    loop {
        let now = Instant::now();
        let sending = now < stop_sending && !overloaded;
        if sending {
            let due = (now.duration_since(start).as_secs_f64() * rate) as usize;
            while t.sent < due {
                s.post(&mut t, authors[next % authors.len()]).await?;
                next += 1;
            }
            if t.outstanding() > max_outstanding {
                overloaded = true;
            }
        } else if t.outstanding() == 0 || now >= give_up {
            break;
        }
        s.pump(&mut t, now + tick).await;
        t.check()?;
    }
    Ok((t, overloaded))
}
