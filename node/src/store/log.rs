//! The disk half of a server's storage: its [`Journal`] and what is known
//! of it (damage, incarnation, size at the last compaction). Only the
//! server's writer touches it, under its own lock, so a fsync never holds
//! the memory half ([`super::Store`]) that readers use.

use super::journal::{self, Journal};
use super::state::Entry;
use super::{JOURNAL_FILE, codec};
use crate::error::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// Journal size that triggers compaction by default (`--compact-at`): big
/// enough that compaction is rare (a snapshot write holds the writer for a
/// few tens of ms), small enough that a restart replays quickly.
pub const COMPACT_AT: u64 = 64 << 20;
/// The smallest `--compact-at`: under it a server would rewrite its state
/// all the time.
pub const COMPACT_AT_MIN: u64 = 4 << 10;

pub struct Log {
    dir: PathBuf,
    journal: Journal,
    /// Why the journal cannot be trusted (file, offset), if it cannot.
    damage: Option<String>,
    /// Journal size right after the last compaction (or snapshot install).
    compacted_len: u64,
    /// Journal size that triggers a compaction (see [`Log::wants_compaction`]).
    compact_at: u64,
    /// What was cut from the journal's end as a torn tail, in this run or
    /// an earlier one, and is not settled yet (see [`super::TAIL_CUT_FILE`]).
    tail_cut: Option<String>,
}

impl Log {
    pub(super) fn new(dir: &Path, journal: Journal, damage: Option<String>, tail_cut: Option<String>) -> Log {
        let compact_at = if cfg!(test) { COMPACT_AT_MIN } else { COMPACT_AT };
        Log { dir: dir.to_path_buf(), journal, damage, compacted_len: 0, compact_at, tail_cut }
    }

    /// Compacts once the journal reaches `bytes` (at least [`COMPACT_AT_MIN`]).
    pub fn set_compact_at(&mut self, bytes: u64) {
        self.compact_at = bytes.max(COMPACT_AT_MIN);
    }

    /// What was cut from the journal's end as a torn tail, in this run or
    /// an earlier one, while no peer has settled it (None: nothing).
    pub fn tail_cut(&self) -> Option<&str> {
        self.tail_cut.as_deref()
    }

    /// Forgets a cut tail: an in-sync peer showed it held nothing this
    /// server lacks, or the state was rebuilt from a peer (or an operator
    /// accepted the loss).
    pub fn settle_tail(&mut self) -> Result<()> {
        if self.tail_cut.is_none() {
            return Ok(());
        }
        let marker = self.dir.join(super::TAIL_CUT_FILE);
        match fs::remove_file(&marker) {
            Ok(()) => journal::sync_dir(&marker).map_err(|e| Error::io(&marker, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&marker, e)),
        }
        tracing::info!(cut = self.tail_cut.as_deref().unwrap_or_default(), "the journal's cut tail is settled");
        self.tail_cut = None;
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Why the journal cannot be trusted, if it cannot.
    pub fn damage(&self) -> Option<&str> {
        self.damage.as_deref()
    }

    /// The journal's incarnation (see [`journal`]).
    pub fn incarnation(&self) -> u64 {
        self.journal.incarnation()
    }

    pub fn bytes(&self) -> u64 {
        self.journal.bytes()
    }

    /// Journals `entries` in one write (and one fsync when `durable`). On
    /// failure nothing of them stays in the journal.
    pub fn append(&mut self, entries: &[Entry], durable: bool) -> Result<()> {
        let encoded: Vec<Vec<u8>> = entries.iter().map(codec::encode_entry).collect();
        let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        self.journal.append_all(&slices, durable).map_err(|e| Error::Journal {
            path: self.path().display().to_string(),
            disk_full: journal::is_disk_full(&e.source),
            poisoned: e.poisoned,
            source: e.source,
        })
    }

    /// Whether the journal has grown past the compaction size and twice its size
    /// after the last compaction (so a large state is not rewritten over
    /// and over).
    pub fn wants_compaction(&self) -> bool {
        self.damage.is_none() && self.journal.bytes() >= self.compact_at.max(2 * self.compacted_len)
    }

    /// A compaction was judged useless (the snapshot would be bigger):
    /// wait for the journal to double again.
    pub fn skip_compaction(&mut self) {
        self.compacted_len = self.journal.bytes();
    }

    /// Replaces the journal with one holding just `entry` (a snapshot),
    /// atomically: a crash leaves the old journal or the new one. The
    /// incarnation stays (a fresh one if the old header was unreadable); a
    /// damaged journal is kept aside (`journal.log.damaged-<ms>`) first.
    pub fn replace(&mut self, entry: &Entry) -> Result<()> {
        let path = self.path();
        if let Some(why) = &self.damage {
            let aside = self.dir.join(format!("{JOURNAL_FILE}.damaged-{}", crate::net::now_ms()));
            // A link, so that a crash before the rename below still leaves
            // the damaged file in place (and the server still knows it).
            fs::hard_link(&path, &aside)
                .or_else(|_| fs::copy(&path, &aside).map(drop))
                .map_err(|e| Error::io(&aside, e))?;
            tracing::warn!(damage = %why, kept = %aside.display(), "damaged journal kept aside");
        }
        let journal =
            Journal::replace(&path, self.journal.incarnation(), &[&codec::encode_entry(entry)]).map_err(|e| {
                Error::Journal {
                    path: path.display().to_string(),
                    disk_full: journal::is_disk_full(&e),
                    poisoned: false,
                    source: e,
                }
            })?;
        self.journal = journal;
        self.damage = None;
        self.compacted_len = self.journal.bytes();
        Ok(())
    }
}
