//! What a server applies on others' behalf: writes its master forwards,
//! the master's whole state (a snapshot), and events of other clusters
//! that its synchronizer hands it.
//!
//! A slave takes forwarded writes only under the term it was last synced
//! in, in seq order with nothing missing. When it cannot write its journal
//! it says so at once (`RESOURCE_EXHAUSTED` for a full disk, `DATA_LOSS`
//! otherwise), cuts the failed record back, and forgets that it is synced:
//! its master records it out of sync and brings it back with a snapshot
//! once its disk takes writes again.

use super::Node;
use crate::error::{Error, Result};
use crate::store::state::{Entry, LocalOp, RemoteEvent, Snapshot};
use std::sync::atomic::Ordering;
use tonic::Status;

impl Node {
    /// Checks a forward or snapshot from a master under `term`.
    fn check_master_term(&self, term: u64) -> Result<(), Status> {
        let role = self.role();
        if term < role.term || (role.is_master && term <= role.term) {
            return Err(Status::failed_precondition(format!(
                "stale term {term}: this server is at term {} (master: {})",
                role.term, role.is_master
            )));
        }
        self.fence(term);
        Ok(())
    }

    /// Journals and applies entries on a blocking thread; a journal failure
    /// leaves this server unwritable (and not synced).
    async fn commit_entries(&self, entries: Vec<Entry>) -> Result<()> {
        let node = self.clone();
        let committed = tokio::task::spawn_blocking(move || node.store().commit_all(&entries, true))
            .await
            .map_err(|e| Error::Other(format!("commit task failed: {e}")))?;
        match committed {
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

    /// Applies a client write forwarded by the master.
    pub async fn apply_replicated(&self, term: u64, ops: Vec<LocalOp>, published_upto: u64) -> Result<(), Status> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        if let Some(damage) = self.damage() {
            return Err(Status::aborted(format!("journal damaged ({damage}): send a snapshot")));
        }
        if self.synced_term() != term {
            return Err(Status::aborted(format!("not synced under term {term}: send a snapshot first")));
        }
        let (next, published) = self.read(|s| (s.next_seq(), s.published_upto()));
        // Ops already here come from a retried forward.
        let mut fresh: Vec<Entry> = ops.into_iter().filter(|op| op.seq >= next).map(Entry::Local).collect();
        let Some(Entry::Local(first)) = fresh.first() else { return Ok(()) };
        if first.seq > next {
            // Cannot happen under the same term; resync rather than diverge.
            self.0.synced_term.store(0, Ordering::SeqCst);
            return Err(Status::aborted(format!("expected seq {next}, got {}: send a snapshot", first.seq)));
        }
        // The master's published mark rides in the same journal write.
        if published_upto > published {
            fresh.push(Entry::PublishedUpto(published_upto));
        }
        self.commit_entries(fresh).await.map_err(Status::from)?;
        self.mark_all_stable();
        Ok(())
    }

    /// Installs the master's state (a rejoin, a new term, a damaged or
    /// unwritable journal); returns the next seq and this server's
    /// incarnation.
    pub async fn install_snapshot(&self, term: u64, snapshot: Snapshot) -> Result<(u64, u64), Status> {
        let _lane = self.0.lane.lock().await;
        self.check_master_term(term)?;
        let node = self.clone();
        let installed = tokio::task::spawn_blocking(move || node.store().install_snapshot(snapshot))
            .await
            .map_err(|e| Status::internal(format!("install task failed: {e}")))?;
        if let Err(e) = installed {
            self.cannot_write(&e);
            return Err(Status::from(e));
        }
        self.can_write();
        self.0.synced_term.store(term, Ordering::SeqCst);
        self.mark_all_stable();
        self.update_serving();
        let next = self.read(|s| s.next_seq());
        tracing::info!(term, next_seq = next, "installed the master's snapshot");
        Ok((next, self.incarnation()))
    }

    /// Applies events from other clusters, in order, with one fsync;
    /// returns how many changed anything (a redelivered one does not).
    ///
    /// In the write lane, so that the journal's order is the order in which
    /// memory changes. Master and slave each apply other clusters' events
    /// from their own broker queue.
    pub async fn apply_remote(&self, events: Vec<RemoteEvent>) -> Result<usize> {
        let _lane = self.0.lane.lock().await;
        if let Some(damage) = self.damage() {
            return Err(Error::Other(format!("journal damaged ({damage}): not applying events until rebuilt")));
        }
        let fresh: Vec<Entry> = self.read(|s| {
            let mut marks = std::collections::HashMap::new();
            events
                .into_iter()
                .filter(|e| {
                    // Within the batch too: each origin's seqs must increase.
                    let last = marks.entry(e.origin).or_insert(0u64);
                    let new = s.is_new_remote(e) && e.seq > *last;
                    if new {
                        *last = e.seq;
                    }
                    new
                })
                .map(Entry::Remote)
                .collect()
        });
        if fresh.is_empty() {
            return Ok(0);
        }
        let n = fresh.len();
        self.commit_entries(fresh).await?;
        Ok(n)
    }
}
