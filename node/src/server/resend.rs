//! Receipts and resending: what a master does when another cluster's
//! synchronizer reports how far it applied this cluster's stream.
//!
//! The broker confirms a message once it has it on disk, and the outbox
//! forgets events once confirmed; a broker that loses confirmed messages
//! afterwards (its disk replaced, a queue purged or deleted, a message
//! taken off the queue by hand) would leave the destination with a gap it
//! holds forever, or missing the stream's last events without knowing it.
//! So confirmed events stay in the outbox until the destination's receipt
//! covers them (at most [`RETAIN_MAX`] of them), and a destination that
//! stopped short of what the broker confirmed — holding events for a gap,
//! or with nothing left in its queue — for [`ServerConfig::resend_after`]
//! gets the missing events published again. Receivers ignore what they
//! already applied, so a resend that was not needed costs only traffic.
//! When the first event a destination lacks is no longer kept, nothing
//! goes (the rest would only be held behind the hole): the loss is logged.
//! Found again at the next look, the destination gets a gap marker that
//! tells it to go on after the hole ([`Entry::Gap`]), then what follows.
//!
//! [`Entry::Gap`]: crate::store::state::Entry::Gap
//!
//! [`RETAIN_MAX`]: crate::store::state::RETAIN_MAX
//! [`ServerConfig::resend_after`]: super::ServerConfig::resend_after

use super::{Node, lock};
use crate::error::{Error, Result};
use crate::store::codec;
use crate::store::state::Entry;
use sns_proto::internal::{ReceiptReply, StreamGap, StreamReceipt, SyncEvent};
use std::time::{Duration, Instant};

/// Events published again for one receipt, at most. They start right
/// after what the receiver applied, so it applies them in order without
/// holding any; the next chunk goes as soon as a receipt shows it took
/// this one, so a receiver catches up faster than a busy stream grows.
pub const RESEND_MAX: usize = 16_384;

/// What a master remembers of one destination's receipts (not kept: a
/// new master starts watching afresh, which only delays a resend).
#[derive(Debug, Clone, Copy)]
pub(super) struct Watch {
    /// The last position reported, in the current epoch.
    applied: u64,
    /// When it last moved, or last had nothing outstanding.
    progressed: Instant,
    /// When the missing events were last published again.
    resent: Option<Instant>,
    /// The last position of that resend (0: none under way).
    resent_upto: u64,
    /// The end of a hole (events no longer kept) found at the last look
    /// (0: none): found again at the next, the destination is told to go
    /// on after it.
    hole: u64,
    /// The newest receipt taken: the destination master's term, and what
    /// it applied then (current epoch).
    newest: (u64, u64),
}

impl Watch {
    /// Starts watching at a first receipt saying `applied`.
    fn new(applied: u64, now: Instant) -> Watch {
        Watch { applied, progressed: now, resent: None, resent_upto: 0, hole: 0, newest: (0, 0) }
    }

    /// Whether a receipt of the destination master's term `term` saying
    /// `applied` (current epoch) is a stale copy of an earlier one: within
    /// one term what a cluster applied never goes back, so a receipt of an
    /// older term, or of the same term with less applied, was redelivered
    /// or replayed. Taken as news, it would put off a resend (the position
    /// seems to move) or start one from where the destination no longer
    /// is. A later term may say less (an override replaced that cluster's
    /// master and what it had applied): that is news. Term 0 (an earlier
    /// synchronizer) is always news. Notes a fresh one as the newest.
    fn stale(&mut self, term: u64, applied: u64) -> bool {
        if term == 0 {
            return false;
        }
        if (term, applied) < self.newest {
            return true;
        }
        self.newest = (term, applied);
        false
    }

    /// Whether the missing events go out again now, given a receipt
    /// (`applied` in the current epoch), the last position the broker
    /// confirmed for that destination, and whether it says it is stuck
    /// (it holds events for a gap, or its queue had nothing for it lately).
    /// Only after it has not moved for `after`, and at most once per
    /// `after`; but once it took all of a resend and is still short and
    /// stuck, the next chunk goes at once.
    fn due(&mut self, applied: u64, confirmed: u64, stuck: bool, now: Instant, after: Duration) -> bool {
        if applied >= confirmed {
            self.resent_upto = 0;
        }
        if self.resent_upto > 0 && applied >= self.resent_upto && stuck {
            (self.applied, self.progressed, self.resent) = (applied, now, Some(now));
            return true;
        }
        if applied >= confirmed || applied != self.applied {
            self.applied = applied;
            self.progressed = now;
            return false;
        }
        let quiet = now.saturating_duration_since(self.progressed) >= after;
        let rested = self.resent.is_none_or(|t| now.saturating_duration_since(t) >= after);
        if stuck && quiet && rested {
            self.resent = Some(now);
            return true;
        }
        false
    }

    /// Notes what the look that [`Watch::due`] allowed found: a hole ending
    /// at `hole` (0: none), and `upto`, where a resend from there would
    /// end. True when the previous look found the same hole; a hole found
    /// the first time sends nothing.
    fn looked(&mut self, hole: u64, upto: u64) -> bool {
        let again = std::mem::replace(&mut self.hole, hole) == hole && hole > 0;
        self.resent_upto = if hole == 0 || again { upto } else { 0 };
        again
    }
}

impl Node {
    /// Takes another cluster's receipt of this cluster's stream: keeps it
    /// (journaled, and forwarded to the slave with the next write), and
    /// returns the events to publish again, if any are due.
    pub async fn receipt(&self, r: StreamReceipt) -> Result<ReceiptReply> {
        self.receipt_at(r, Instant::now()).await
    }

    /// [`Node::receipt`], taken at `now`.
    async fn receipt_at(&self, r: StreamReceipt, now: Instant) -> Result<ReceiptReply> {
        let cluster = self.0.cfg.cluster;
        if r.origin_cluster != cluster {
            return Err(Error::Invalid(format!(
                "receipt of cluster {}'s stream sent to cluster {cluster}",
                r.origin_cluster
            )));
        }
        let (dest, epoch, applied) = (r.from_cluster, r.epoch, r.applied);
        if let Some(why) = self.read(|s| s.check_receipt(dest, epoch, applied)) {
            return Err(Error::Invalid(why));
        }
        if !self.role().is_master {
            return Err(Error::NotServing("this server is not the master, which takes receipts".into()));
        }
        if self.damage().is_none() && self.read(|s| s.receipt_advances(dest, epoch, applied)) {
            // Not fsynced: a receipt lost in a crash only means keeping
            // events longer (the next one says it again).
            self.journal_and_apply(vec![Entry::Receipt { dest, epoch, applied }], false).await?;
        }
        let (current, applied, confirmed) = self.read(|s| {
            let current = s.epoch();
            (current, if epoch == current { applied } else { 0 }, s.confirmed_to(dest))
        });
        let stuck = r.held > 0 || r.idle;
        let after = self.0.cfg.resend_after;
        let due = {
            let mut receipts = lock(&self.0.receipts);
            let watch = receipts.entry(dest).or_insert_with(|| Watch::new(applied, now));
            if epoch == current && watch.stale(r.term, applied) {
                tracing::debug!(dest, term = r.term, applied, "a stale copy of an earlier receipt: ignored");
                return Ok(ReceiptReply::default());
            }
            watch.due(applied, confirmed, stuck, now, after)
        };
        if !due {
            return Ok(ReceiptReply::default());
        }
        let (events, missing) = self.read(|s| s.resend_to(dest, applied, confirmed, RESEND_MAX));
        let hole = if missing > 0 { applied + missing } else { 0 };
        let upto = events.last().map_or(hole, |e| e.dest_seq);
        let again = lock(&self.0.receipts).get_mut(&dest).is_some_and(|w| w.looked(hole, upto));
        if missing > 0 && !again {
            // What follows the hole would only be held there: nothing goes
            // yet. Still there at the next look, it is stepped over.
            tracing::error!(
                dest,
                applied,
                missing,
                "cluster {dest} lacks events of this cluster's stream that this server no longer keeps (the broker lost them after confirming them, or that cluster lost what it had applied): they are lost for that cluster; if it still lacks them at the next look, it is told to go on after them"
            );
            return Ok(ReceiptReply { resend: vec![], missing, gap: None });
        }
        let gap = (missing > 0).then(|| {
            tracing::error!(
                dest,
                applied,
                upto = hole,
                "telling cluster {dest} to go on after the events of this cluster's stream it lacks for good"
            );
            StreamGap { origin_cluster: cluster, dest_cluster: dest, epoch: current, upto: hole }
        });
        tracing::warn!(
            dest,
            epoch = current,
            applied,
            confirmed,
            count = events.len(),
            held = r.held,
            "cluster {dest} stopped short of what the broker confirmed for it: publishing the missing events again"
        );
        let resend = events.iter().map(|e| SyncEvent { dest_cluster: dest, ..codec::event_to_pb(e) }).collect();
        Ok(ReceiptReply { resend, missing, gap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Role, ServerConfig};
    use crate::store::state::{Change, LocalOp};

    /// A master of cluster 1 of 2 whose stream to cluster 2 holds events
    /// 1..=5, all confirmed by the broker.
    async fn master(dir: &std::path::Path) -> Node {
        let cfg = ServerConfig {
            cluster: 1,
            id: 1,
            clusters: 2,
            coord_host: "127.0.0.1".into(),
            coord_port: 9,
            advertise_host: "127.0.0.1".into(),
            data_dir: dir.to_path_buf(),
            heartbeat: Duration::from_secs(1),
            disk_stall_limit: None,
            secret: None,
            source_address: None,
            commit_delay: Duration::ZERO,
            resend_after: Duration::from_secs(3),
            compact_at: crate::store::log::COMPACT_AT,
        };
        let dir_lock = crate::store::lock::lock(&cfg.data_dir).unwrap();
        let (node, _writes) = Node::open(cfg, 0, dir_lock).unwrap();
        let users = (0..5u32).map(|i| Entry::Local(LocalOp::new(u64::from(i) + 1, Change::User(1 + 2 * i))));
        node.journal_and_apply(users.collect(), false).await.unwrap();
        node.journal_and_apply(vec![Entry::PublishedUpto(5)], false).await.unwrap();
        node
    }

    fn receipt(applied: u64, held: u64) -> StreamReceipt {
        StreamReceipt { from_cluster: 2, origin_cluster: 1, epoch: 1, applied, held, idle: false, term: 0 }
    }

    #[tokio::test]
    async fn a_master_resends_what_a_stuck_receiver_lacks_and_nothing_past_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let node = master(dir.path()).await;
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Only the master takes receipts.
        assert!(matches!(node.receipt_at(receipt(2, 1), at(0)).await, Err(Error::NotServing(_))));
        node.0.role.send_replace(Role { is_master: true, term: 1, ..Role::default() });
        // Receipts that cannot be this deployment's.
        for bad in [
            receipt(6, 0),
            StreamReceipt { origin_cluster: 2, ..receipt(1, 0) },
            StreamReceipt { from_cluster: 1, ..receipt(1, 0) },
            StreamReceipt { epoch: 2, ..receipt(1, 0) },
        ] {
            assert!(matches!(node.receipt_at(bad, at(0)).await, Err(Error::Invalid(_))), "{bad:?}");
        }
        // Applied 2, holding a later one: watched first, then 3..=5 again.
        assert!(node.receipt_at(receipt(2, 1), at(0)).await.unwrap().resend.is_empty());
        assert!(node.receipt_at(receipt(2, 1), at(2)).await.unwrap().resend.is_empty());
        let reply = node.receipt_at(receipt(2, 1), at(3)).await.unwrap();
        let sent: Vec<(u32, u32, u64)> =
            reply.resend.iter().map(|e| (e.origin_cluster, e.dest_cluster, e.dest_seq)).collect();
        assert_eq!((sent, reply.missing), (vec![(1, 2, 3), (1, 2, 4), (1, 2, 5)], 0));
        // The receipt is kept: 1 and 2 are no longer.
        assert_eq!(node.read(|s| (s.retained_count(), s.receipt_marks())), (3, vec![(2, 1, 2)]));
        // The receiver lost what it had applied (its data): 1 and 2 are
        // gone here, so nothing goes, and the loss is told.
        assert!(node.receipt_at(receipt(0, 3), at(4)).await.unwrap().resend.is_empty());
        let reply = node.receipt_at(receipt(0, 3), at(7)).await.unwrap();
        assert_eq!((reply.resend.len(), reply.missing, reply.gap), (0, 2, None));
        // Still there at the next look: it is told to step over 1 and 2,
        // and gets what follows.
        let reply = node.receipt_at(receipt(0, 3), at(10)).await.unwrap();
        let gap = StreamGap { origin_cluster: 1, dest_cluster: 2, epoch: 1, upto: 2 };
        let sent: Vec<u64> = reply.resend.iter().map(|e| e.dest_seq).collect();
        assert_eq!((sent, reply.missing, reply.gap), (vec![3, 4, 5], 2, Some(gap)));
        // Caught up: nothing to do.
        assert!(node.receipt_at(receipt(5, 0), at(20)).await.unwrap().resend.is_empty());
        assert_eq!(node.read(|s| s.retained_count()), 0);
    }

    #[tokio::test]
    async fn a_stale_copy_of_a_receipt_neither_puts_off_a_resend_nor_starts_one() {
        let dir = tempfile::tempdir().unwrap();
        let node = master(dir.path()).await;
        node.0.role.send_replace(Role { is_master: true, term: 1, ..Role::default() });
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let of_term = |term: u64, applied: u64, held: u64| StreamReceipt { term, ..receipt(applied, held) };
        // Cluster 2's master (term 7) applied 2 and holds a later event.
        assert!(node.receipt_at(of_term(7, 2, 1), at(0)).await.unwrap().resend.is_empty());
        // Copies of its older receipts come back (the broker redelivers or
        // replays them): of its term, saying less; of an older term.
        assert!(node.receipt_at(of_term(7, 1, 0), at(1)).await.unwrap().resend.is_empty());
        assert!(node.receipt_at(of_term(6, 1, 1), at(2)).await.unwrap().resend.is_empty());
        // They moved nothing: 3 s after it stopped, 3..=5 go again.
        let reply = node.receipt_at(of_term(7, 2, 1), at(3)).await.unwrap();
        assert_eq!(reply.resend.iter().map(|e| e.dest_seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        // A stale copy saying it is stuck further back starts nothing.
        assert!(node.receipt_at(of_term(7, 0, 5), at(9)).await.unwrap().resend.is_empty());
        assert_eq!(node.read(|s| s.receipt_marks()), vec![(2, 1, 2)]);
        // A later term may say less (an override replaced its master and
        // what it had applied): that is news, watched from there, and the
        // event it lost that is no longer kept here is told.
        assert!(node.receipt_at(of_term(8, 1, 1), at(10)).await.unwrap().resend.is_empty());
        let reply = node.receipt_at(of_term(8, 1, 1), at(13)).await.unwrap();
        assert_eq!((reply.resend.len(), reply.missing), (0, 1));
    }

    #[test]
    fn a_receipt_is_stale_when_its_term_said_more_or_a_later_term_spoke() {
        let mut w = Watch::new(0, Instant::now());
        assert!(!w.stale(3, 10));
        assert!(!w.stale(3, 10), "the same again is news (a stuck destination repeats itself)");
        assert!(w.stale(3, 9));
        assert!(w.stale(2, 50));
        assert!(!w.stale(4, 1), "a later term may have less");
        assert!(w.stale(3, 10));
        // Synchronizers that do not say their term: always news.
        assert!(!w.stale(0, 0));
        assert_eq!(w.newest, (4, 1));
    }

    #[test]
    fn missing_events_go_again_only_once_the_destination_stopped_and_says_it_is_stuck() {
        let after = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // First receipt: start watching, never resend at once.
        let mut w = Watch::new(3, at(0));
        assert!(!w.due(3, 10, true, at(0), after));
        // Not moved, stuck, but not for long enough.
        assert!(!w.due(3, 10, true, at(4), after));
        // Long enough, but not stuck (its queue still brings events).
        assert!(!w.due(3, 10, false, at(6), after));
        // Stuck and quiet: resend.
        assert!(w.due(3, 10, true, at(6), after));
        // Not again within `after` of the last resend.
        assert!(!w.due(3, 10, true, at(9), after));
        assert!(w.due(3, 10, true, at(11), after));
        // It moved: wait afresh.
        assert!(!w.due(7, 10, true, at(12), after));
        assert!(!w.due(7, 10, true, at(16), after));
        assert!(w.due(7, 10, true, at(17), after));
        // Caught up with what the broker confirmed: nothing to do, and the
        // next shortfall waits its own `after`.
        assert!(!w.due(10, 10, true, at(30), after));
        assert!(!w.due(10, 12, true, at(31), after));
        assert!(w.due(10, 12, true, at(35), after));
    }

    #[test]
    fn a_receiver_that_took_a_whole_resend_and_is_still_short_gets_the_next_chunk_at_once() {
        let after = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watch::new(100, at(0));
        assert!(!w.due(100, 50_000, true, at(0), after));
        assert!(w.due(100, 50_000, true, at(5), after));
        w.looked(0, 16_484);
        // Part of it applied so far: wait for the rest.
        assert!(!w.due(9_000, 50_000, true, at(6), after));
        // All of it, and more held behind: the next chunk now.
        assert!(w.due(16_484, 50_000, true, at(7), after));
        w.looked(0, 32_868);
        // Took it, but no longer stuck (its queue brings the rest): wait.
        assert!(!w.due(32_868, 50_000, false, at(8), after));
        // Caught up: the resend is over; a later shortfall waits `after`.
        assert!(!w.due(50_000, 50_000, true, at(9), after));
        assert!(!w.due(50_000, 50_100, true, at(10), after));
        assert!(w.due(50_000, 50_100, true, at(15), after));
    }
}
