//! The disk: whether this server can write its journal, and the storage
//! work the write lane and the maintenance loops share.
//!
//! Why here: a journal append that fails is cut back (see
//! [`crate::store`]), and from then on this server takes no writes — it
//! stops being master and says so in its heartbeats — until a probe of its
//! data directory or a snapshot install succeeds. The journal and the view
//! files are written on blocking threads, never under the store's lock, so
//! readers never wait on a fsync.

use super::{Node, lock};
use crate::error::{Error, Result};
use crate::store::state::{Entry, Snapshot};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a server that could not write its journal tries again.
const DISK_PROBE: Duration = Duration::from_secs(1);

/// Why this server cannot write, if it cannot.
#[derive(Debug, Clone, Default)]
pub(super) struct Disk {
    /// The last journal write failed (cut back): takes no writes until a
    /// probe or a snapshot install succeeds.
    unwritable: Option<String>,
    /// The journal refuses appends until the process restarts.
    poisoned: bool,
}

/// See [`Node::stall_limit`].
fn stall_limit(cfg: &super::ServerConfig) -> Duration {
    cfg.disk_stall_limit.unwrap_or_else(|| (cfg.heartbeat * 2).clamp(Duration::from_secs(5), Duration::from_secs(30)))
}

impl Node {
    /// How long a journal write may take before this server counts its
    /// disk as hung: as configured, or two heartbeat periods within 5 to
    /// 30 s (well above what a busy but working disk takes: a write group
    /// is at most a few MB).
    fn stall_limit(&self) -> Duration {
        stall_limit(self.cfg())
    }

    /// Waits for blocking journal work (`what`). A hung disk (a write that
    /// neither ends nor fails) is told apart from a slow one by `limit`
    /// ([`Self::stall_limit`] for a write group): past it this server says
    /// it cannot write, so it stops being master and its coordinator fails
    /// it over (or drops it from the in-sync set as a slave), and it goes
    /// on waiting. The work is never given up halfway: what the journal
    /// takes, memory takes too, whenever the disk answers.
    async fn watched<T: Send + 'static>(
        &self,
        what: &str,
        limit: Duration,
        work: tokio::task::JoinHandle<Result<T>>,
    ) -> Result<T> {
        tokio::pin!(work);
        let done = match tokio::time::timeout(limit, &mut work).await {
            Ok(done) => done,
            Err(_) => {
                let stalled = Error::Other(format!("a {what} has not ended after {limit:?}: the disk is hung"));
                self.cannot_write(&stalled);
                let done = work.await;
                tracing::warn!(what, "the stalled journal write ended");
                done
            }
        };
        done.map_err(|e| Error::Other(format!("{what} task failed: {e}")))?
    }

    /// Journals `entries` (one write, one fsync) on a blocking thread.
    /// Called by the write lane's holder.
    pub(super) async fn journal(&self, entries: Vec<Entry>) -> Result<()> {
        let node = self.clone();
        let work = tokio::task::spawn_blocking(move || lock(&node.0.log).append(&entries, true));
        self.watched("journal write", self.stall_limit(), work).await
    }

    /// Journals `entries` (with `durable`, one fsync) and applies them to
    /// memory in one trip to a blocking thread: nothing of them reaches
    /// memory unless the journal took them.
    pub(super) async fn journal_and_apply(&self, entries: Vec<Entry>, durable: bool) -> Result<()> {
        let node = self.clone();
        let work = tokio::task::spawn_blocking(move || {
            lock(&node.0.log).append(&entries, durable)?;
            drop(node.store().apply(&entries));
            Ok::<_, Error>(())
        });
        self.watched("journal write", self.stall_limit(), work).await
    }

    /// Makes `snapshot` the whole state: the journal first (atomically),
    /// then memory. Called by the write lane's holder.
    pub(super) async fn install_state(&self, snapshot: Snapshot) -> Result<()> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut log = lock(&node.0.log);
            log.replace(&Entry::Snapshot(Box::new(snapshot.clone())))?;
            *lock(&node.0.damage) = None;
            // Whatever the old journal lost no longer matters.
            log.settle_tail()?;
            *lock(&node.0.tail_cut) = None;
            node.0.incarnation.store(log.incarnation(), Ordering::SeqCst);
            drop(log);
            node.store().install(snapshot);
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::Other(format!("install task failed: {e}")))??;
        self.mark_all_stable();
        Ok(())
    }

    /// What was cut from the journal's end and is not settled yet.
    pub fn tail_cut(&self) -> Option<String> {
        lock(&self.0.tail_cut).clone()
    }

    /// Forgets the journal's cut tail (see `Log::settle_tail`). Called by
    /// the write lane's holder.
    pub(super) async fn settle_tail(&self) -> Result<()> {
        if self.tail_cut().is_none() {
            return Ok(());
        }
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            lock(&node.0.log).settle_tail()?;
            *lock(&node.0.tail_cut) = None;
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::Other(format!("settle task failed: {e}")))?
    }

    /// Why this server cannot write its journal, if it cannot.
    pub fn unwritable(&self) -> Option<String> {
        lock(&self.0.disk).unwritable.clone()
    }

    /// Everything journaled is stable (a slave, or a master between writes).
    pub(super) fn mark_all_stable(&self) {
        let last = self.read(|s| s.next_seq()) - 1;
        self.0.stable.send_if_modified(|s| std::mem::replace(s, last) != last);
    }

    /// A journal write failed (and was cut back): this server takes no
    /// more writes until its disk works again, and stops being master.
    pub(super) fn cannot_write(&self, e: &Error) {
        let poisoned = matches!(e, Error::Journal { poisoned: true, .. });
        {
            let mut disk = lock(&self.0.disk);
            if disk.unwritable.is_none() {
                tracing::error!(error = %e, poisoned, "cannot write the journal: this server takes no writes until it can");
            }
            disk.unwritable = Some(e.to_string());
            disk.poisoned |= poisoned;
        }
        self.0.synced_term.store(0, Ordering::SeqCst);
        self.fence(0);
        self.update_serving();
    }

    /// The disk works again (a probe or a snapshot install succeeded).
    pub(super) fn can_write(&self) {
        let mut disk = lock(&self.0.disk);
        if disk.unwritable.take().is_some() && !disk.poisoned {
            tracing::info!("the journal can be written again");
            drop(disk);
            self.0.beat_now.notify_one();
            self.update_serving();
        }
    }

    /// Records that the broker confirmed the outbox up to `upto`. Not
    /// fsynced: losing it only means republishing, which receivers ignore.
    pub async fn ack_outbox(&self, upto: u64) -> Result<()> {
        if self.damage().is_none() && upto > self.read(|s| s.published_upto()) && upto < self.read(|s| s.next_seq()) {
            self.journal_and_apply(vec![Entry::PublishedUpto(upto)], false).await?;
        }
        Ok(())
    }

    /// Compacts the journal when it has grown large (under the lane, so no
    /// write is between its journal record and its application).
    async fn compact(&self) {
        let _lane = self.0.lane.lock().await;
        let node = self.clone();
        let work = tokio::task::spawn_blocking(move || {
            if !lock(&node.0.log).wants_compaction() {
                return Ok(false);
            }
            let snapshot = node.read(|s| s.snapshot());
            crate::store::compact(&mut lock(&node.0.log), snapshot)
        });
        // Every write waits for the lane meanwhile: a hung disk here is
        // told like one under a write (given the time to write the whole
        // state).
        if let Err(e) = self.watched("journal compaction", self.stall_limit() * 6, work).await {
            tracing::error!(error = %e, "journal compaction failed; the old journal is intact");
        }
    }

    /// Writes the view files that lag behind the journal.
    pub async fn flush_views(&self) {
        if !self.store().views_dirty() {
            return;
        }
        let writes = self.store().prepare_flush();
        let flushed = tokio::task::spawn_blocking(move || writes.apply()).await;
        if let Ok(Err(e)) = flushed {
            // The journal has everything; every view is rewritten on the
            // next flush (and on restart).
            tracing::error!(error = %e, "writing view files failed; they will be rewritten");
            self.store().views_failed();
        }
    }

    /// Whether the data directory takes a write again (after a failure).
    async fn probe_disk(&self) -> bool {
        let dir = self.0.cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            let path = dir.join(".disk-probe");
            let probe = || -> std::io::Result<()> {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&path)?;
                // Enough that a nearly full disk fails here, not on the
                // next journal append.
                f.write_all(&[0u8; 64 * 1024])?;
                f.sync_all()
            };
            let ok = probe().is_ok();
            let _ = std::fs::remove_file(&path);
            ok
        })
        .await
        .unwrap_or(false)
    }
}

/// While this server cannot write, tries again now and then.
pub(super) async fn disk_loop(node: Node, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(DISK_PROBE) => {}
        }
        let poisoned = lock(&node.0.disk).poisoned;
        if node.unwritable().is_some() && !poisoned && node.probe_disk().await {
            node.can_write();
        }
    }
}

/// How far the spec's view files may lag behind the journal. Short enough
/// that a person reading the files sees every write at once; long enough
/// to write each busy file once for many writes.
const VIEW_FLUSH: Duration = Duration::from_millis(50);

/// Keeps the view files current.
pub(super) async fn flush_loop(node: Node, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(VIEW_FLUSH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                node.flush_views().await;
                node.compact().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heartbeat_ms: u64, limit: Option<Duration>) -> super::super::ServerConfig {
        super::super::ServerConfig {
            cluster: 1,
            id: 1,
            clusters: 1,
            coord_host: String::new(),
            coord_port: 0,
            advertise_host: String::new(),
            data_dir: Default::default(),
            heartbeat: Duration::from_millis(heartbeat_ms),
            disk_stall_limit: limit,
            secret: None,
            source_address: None,
            commit_delay: Duration::ZERO,
            resend_after: crate::server::DEFAULT_RESEND_AFTER,
            compact_at: crate::store::log::COMPACT_AT,
        }
    }

    #[test]
    fn the_stall_limit_is_two_heartbeats_within_bounds_unless_configured() {
        assert_eq!(stall_limit(&cfg(500, None)), Duration::from_secs(5));
        assert_eq!(stall_limit(&cfg(5_000, None)), Duration::from_secs(10));
        assert_eq!(stall_limit(&cfg(60_000, None)), Duration::from_secs(30));
        assert_eq!(stall_limit(&cfg(500, Some(Duration::from_secs(2)))), Duration::from_secs(2));
        assert_eq!(stall_limit(&cfg(60_000, Some(Duration::from_secs(90)))), Duration::from_secs(90));
    }
}
