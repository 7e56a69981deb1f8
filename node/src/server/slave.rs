//! What a slave applies on its master's behalf: the records its master
//! journaled (client writes and other clusters' events, in the master's
//! order), and the master's whole state (a snapshot).
//!
//! A slave takes forwarded writes only under the term it was last synced
//! in, in seq order with nothing missing. When it cannot write its journal
//! it says so at once (`RESOURCE_EXHAUSTED` for a full disk, `DATA_LOSS`
//! otherwise), cuts the failed record back, and forgets that it is synced:
//! its master records it out of sync and brings it back with a snapshot
//! once its disk takes writes again. It refuses a master of an older term
//! ([`Error::StaleTerm`]: the master steps down) and asks for a snapshot
//! when it cannot take a forward as it is ([`Error::NeedsSnapshot`]).

use super::Node;
use crate::error::{Error, Result};
use crate::store::state::{Arrival, Entry, Snapshot};
use std::sync::atomic::Ordering;

impl Node {
    /// Checks a forward or snapshot from a master under `term`.
    fn check_master_term(&self, term: u64) -> Result<()> {
        let role = self.role();
        if term < role.term || (role.is_master && term <= role.term) {
            return Err(Error::StaleTerm(format!(
                "stale term {term}: this server is at term {} (master: {})",
                role.term, role.is_master
            )));
        }
        self.fence(term);
        Ok(())
    }

    /// Journals and applies entries in one trip to a blocking thread; a
    /// journal failure leaves this server unwritable (and not synced).
    async fn commit_entries(&self, entries: Vec<Entry>) -> Result<()> {
        match self.journal_and_apply(entries, true).await {
            Ok(_) => {
                self.can_write();
                Ok(())
            }
            Err(e) => {
                self.cannot_write(&e);
                Err(e)
            }
        }
    }

    /// Applies journal records forwarded by the master, in its order:
    /// client writes (seqs continuing this server's) and other clusters'
    /// events.
    pub async fn apply_replicated(
        &self,
        term: u64,
        entries: Vec<Entry>,
        published_upto: u64,
        receipts: Vec<(u32, u64, u64)>,
    ) -> Result<()> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        if let Some(damage) = self.damage() {
            return Err(Error::NeedsSnapshot(format!("journal damaged ({damage}): send a snapshot")));
        }
        if self.synced_term() != term {
            return Err(Error::NeedsSnapshot(format!("not synced under term {term}: send a snapshot first")));
        }
        let (next, published) = self.read(|s| (s.next_seq(), s.published_upto()));
        // Records already here come from a retried forward (the first try
        // was applied whole, or not at all).
        let mut expected = next;
        let mut fresh = Vec::new();
        for entry in entries {
            match entry {
                Entry::Local(op) if op.seq < next => {}
                Entry::Local(op) if op.seq == expected => {
                    expected += 1;
                    fresh.push(Entry::Local(op));
                }
                Entry::Local(op) => {
                    // Cannot happen under the same term; resync rather
                    // than diverge.
                    self.0.synced_term.store(0, Ordering::SeqCst);
                    return Err(Error::NeedsSnapshot(format!(
                        "expected seq {expected}, got {}: send a snapshot",
                        op.seq
                    )));
                }
                // A retried forward repeats events already applied.
                Entry::Remote(ev) if ev.dest_seq != 0 && self.read(|s| s.arrival(&ev)) == Arrival::Duplicate => {}
                Entry::Remote(ev) => fresh.push(Entry::Remote(ev)),
                // So does a gap marker.
                Entry::Gap { origin, epoch, upto } if !self.read(|s| s.gap_advances(origin, epoch, upto)) => {}
                gap @ Entry::Gap { .. } => fresh.push(gap),
                Entry::PublishedUpto(_) | Entry::Receipt { .. } | Entry::Snapshot(_) => {
                    return Err(Error::Invalid("only client writes and remote events are replicated".into()));
                }
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // The master's published mark rides in the same journal write.
        if published_upto > published {
            fresh.push(Entry::PublishedUpto(published_upto));
        }
        // So do its receipts (what it keeps for other clusters follows).
        for (dest, epoch, applied) in receipts {
            if self
                .read(|s| s.check_receipt(dest, epoch, applied).is_none() && s.receipt_advances(dest, epoch, applied))
            {
                fresh.push(Entry::Receipt { dest, epoch, applied });
            }
        }
        self.commit_entries(fresh).await?;
        self.mark_all_stable();
        Ok(())
    }

    /// Installs the master's state (a rejoin, a new term, a damaged or
    /// unwritable journal); returns the next seq and this server's
    /// incarnation.
    pub async fn install_snapshot(&self, term: u64, sync: u64, snapshot: Snapshot) -> Result<(u64, u64)> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        let (last_term, last_sync) = *super::lock(&self.0.installed);
        if sync != 0 && last_term == term && sync < last_sync {
            // Its master gave up on it (this server was paused) and sent a
            // newer one since: installing it would take back writes this
            // server was recorded in sync for.
            tracing::warn!(term, sync, installed = last_sync, "refused a stale snapshot of this term");
            return Err(Error::Invalid(format!(
                "snapshot {sync} of term {term} is older than snapshot {last_sync}, installed here already"
            )));
        }
        if let Err(e) = self.install_state(snapshot).await {
            self.cannot_write(&e);
            return Err(e);
        }
        self.can_write();
        self.confirm_and_report().await;
        self.0.synced_term.store(term, Ordering::SeqCst);
        *super::lock(&self.0.installed) = (term, sync);
        self.mark_all_stable();
        self.update_serving();
        let next = self.read(|s| s.next_seq());
        tracing::info!(term, next_seq = next, "installed the master's snapshot");
        Ok((next, self.incarnation()))
    }
}
