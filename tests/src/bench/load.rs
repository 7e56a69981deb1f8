//! Latency and throughput of posts through real timeline streams: the idle
//! probe (one post at a time), the closed-loop run at the system's maximum
//! rate, and the open-loop run at a controlled rate.
//!
//! A [`Tracker`] follows every post until each of its expected receivers
//! (the author's followers, in every cluster) has it on their stream, and
//! turns arrivals into latency samples, split by whether the receiver is in
//! the author's cluster (served at once) or another one (through the
//! synchronizers and the broker). It also counts what must never happen —
//! a post arriving twice on a stream, a post that never arrives, a post on
//! the stream of a user who does not follow its author — and
//! [`Tracker::verify`] fails the phase on any of them.

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
    /// author -> the users whose streams must receive the author's posts.
    followers: HashMap<u32, Vec<u32>>,
    pending: HashMap<u64, Pending>,
    /// Posts whose acknowledgement has not arrived: seq -> send time.
    unacked: HashMap<u64, u64>,
    pub cross: Samples,
    pub same: Samples,
    pub ack: Samples,
    pub sent: usize,
    pub completed: usize,
    /// Posts that reached a follower's stream (the first copy of each).
    pub deliveries: usize,
    pub first_sent_ns: u64,
    pub last_completion_ns: u64,
    pub last_delivery_ns: u64,
    /// A post arriving again on a stream that already had it (in this
    /// phase or an earlier one): a bug, and the phase fails.
    pub duplicates: usize,
    /// A post arriving on the stream of a user who does not follow its
    /// author: a bug too.
    pub unexpected: usize,
    pub ended: Vec<String>,
}

impl Tracker {
    pub fn new(clusters: u32, followers: HashMap<u32, Vec<u32>>) -> Tracker {
        Tracker { clusters, followers, ..Default::default() }
    }

    /// Posts not yet on every follower's stream.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Deliveries still missing: (post, follower) pairs not seen.
    pub fn missing_deliveries(&self) -> usize {
        self.pending.values().map(|p| p.waiting.len()).sum()
    }

    fn follows(&self, receiver: u32, author: u32) -> bool {
        self.followers.get(&author).is_some_and(|f| f.contains(&receiver))
    }

    pub fn sent(&mut self, seq: u64, author: u32, sent_ns: u64) {
        if self.sent == 0 {
            self.first_sent_ns = sent_ns;
        }
        self.sent += 1;
        self.unacked.insert(seq, sent_ns);
        let receivers = self.followers.get(&author).cloned().unwrap_or_default();
        if !receivers.is_empty() {
            self.pending.insert(seq, Pending { author, waiting: receivers });
        }
    }

    /// Applies one event; true when it completed a post.
    pub fn on_event(&mut self, event: Event) -> bool {
        match event {
            Event::Delivered { receiver, author, seq, sent_ns, at_ns } => {
                let waiting = self.pending.get(&seq).and_then(|p| {
                    let i = p.waiting.iter().position(|r| *r == receiver)?;
                    Some((p.author, i))
                });
                let Some((sent_author, i)) = waiting else {
                    // Not awaited: a second copy of a post this stream
                    // already had (this phase's, or an earlier phase's,
                    // all of which completed), or a stray.
                    if self.follows(receiver, author) {
                        self.duplicates += 1;
                    } else {
                        self.unexpected += 1;
                    }
                    return false;
                };
                if sent_author != author {
                    self.unexpected += 1;
                    return false;
                }
                let p = self.pending.get_mut(&seq).expect("pending post");
                p.waiting.swap_remove(i);
                let done = p.waiting.is_empty();
                self.deliveries += 1;
                self.last_delivery_ns = self.last_delivery_ns.max(at_ns);
                let latency = ns_to_ms(at_ns.saturating_sub(sent_ns));
                if cluster_of(receiver, self.clusters) == cluster_of(author, self.clusters) {
                    self.same.push(latency);
                } else {
                    self.cross.push(latency);
                }
                if done {
                    self.pending.remove(&seq);
                    self.completed += 1;
                    self.last_completion_ns = self.last_completion_ns.max(at_ns);
                }
                done
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

    /// Posts delivered to follower streams per second, from the first send
    /// to the last delivery (counted, not derived from the post rate).
    pub fn delivery_rate(&self) -> f64 {
        let secs = self.last_delivery_ns.saturating_sub(self.first_sent_ns) as f64 / 1e9;
        if secs > 0.0 { self.deliveries as f64 / secs } else { 0.0 }
    }

    /// Fails at once if a stream ended or a post went where it should not.
    pub fn check(&self) -> Result<()> {
        if let Some(e) = self.ended.first() {
            return Err(anyhow!("{e}"));
        }
        if self.unexpected > 0 {
            return Err(anyhow!("{} deliveries to users who do not follow the author", self.unexpected));
        }
        Ok(())
    }

    /// At the end of a phase: every post reached every follower exactly
    /// once, or the phase fails saying what went wrong.
    pub fn verify(&self, phase: &str) -> Result<()> {
        self.check().map_err(|e| anyhow!("{phase}: {e}"))?;
        let (dup, lost) = (self.duplicates, self.missing_deliveries());
        if dup > 0 || lost > 0 {
            return Err(anyhow!(
                "{phase}: {dup} duplicate deliveries (a post on a follower's stream more than once) and {lost} \
                 lost deliveries ({} posts not on every follower's stream by the end of the drain)",
                self.outstanding()
            ));
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
    /// A tracker for a new phase over these streams.
    pub fn tracker(&self, clusters: u32) -> Tracker {
        Tracker::new(clusters, self.followers.clone())
    }

    /// Posts as `author`; records the post in `t`.
    pub async fn post(&mut self, t: &mut Tracker, author: u32) -> Result<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let tl = self.timelines.get(&author).ok_or_else(|| anyhow!("no timeline for {author}"))?;
        let sent = tl.post(seq).await?;
        t.sent(seq, author, sent);
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

    /// Applies the events already queued (late acknowledgements, and any
    /// second copy of a post) to `t`, the phase that just ended, without
    /// waiting; then the next phase starts from an empty queue.
    pub fn settle(&mut self, t: &mut Tracker) {
        while let Ok(e) = self.events.try_recv() {
            t.on_event(e);
        }
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
    let mut warm = s.tracker(clusters);
    let mut t = s.tracker(clusters);
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
    s.settle(&mut t);
    t.duplicates += warm.duplicates;
    t.unexpected += warm.unexpected;
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
    let mut t = s.tracker(clusters);
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
    s.settle(&mut t);
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
    let mut t = s.tracker(clusters);
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
    s.settle(&mut t);
    Ok((t, overloaded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(receiver: u32, author: u32, seq: u64, at_ns: u64) -> Event {
        Event::Delivered { receiver, author, seq, sent_ns: 0, at_ns }
    }

    #[test]
    fn tracker_counts_duplicates_losses_and_strays() {
        // 3 clusters; user 1 is followed by 2 (other cluster) and 4 (same).
        let followers = HashMap::from([(1, vec![2, 4])]);
        let mut t = Tracker::new(3, followers);
        t.sent(10, 1, 0);
        t.sent(11, 1, 0);
        assert!(!t.on_event(delivered(2, 1, 10, 1_000_000)));
        // The same stream again, while the post is still in flight.
        assert!(!t.on_event(delivered(2, 1, 10, 2_000_000)));
        assert!(t.on_event(delivered(4, 1, 10, 3_000_000)));
        // Again, after the post completed; and an earlier phase's post.
        t.on_event(delivered(4, 1, 10, 4_000_000));
        t.on_event(delivered(4, 1, 3, 4_000_000));
        assert_eq!(t.duplicates, 3);
        assert!(t.check().is_ok());
        // Post 11 reached one of its two followers only.
        t.on_event(delivered(4, 1, 11, 5_000_000));
        assert_eq!((t.completed, t.deliveries, t.missing_deliveries()), (1, 3, 1));
        assert_eq!((t.cross.len(), t.same.len()), (1, 2));
        let e = t.verify("phase").unwrap_err().to_string();
        assert!(e.contains("3 duplicate deliveries") && e.contains("1 lost deliveries"), "{e}");
        // Deliveries are counted over first send -> last delivery.
        assert!((t.delivery_rate() - 3.0 / 0.005).abs() < 1e-6);
        // A user who does not follow the author.
        t.on_event(delivered(3, 1, 11, 6_000_000));
        assert_eq!(t.unexpected, 1);
        assert!(t.check().is_err());
    }
}
