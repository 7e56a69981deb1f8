//! A server's storage: the journal (source of truth), the in-memory
//! [`State`], the SPEC §4 files (views rebuilt from the journal on start),
//! and the hub that pushes new feed posts to open timeline streams.
//!
//! Why a journal under the spec's files: an acknowledged write must survive
//! a crash, and a write touches several files (a post lands in the author's
//! timeline and in every follower's feed). One fsynced journal append makes
//! the whole write durable at once; the per-user files are then plain views
//! that are rewritten from the journal on start, so a crash between two file
//! writes can never leave them disagreeing or torn.
//!
//! Views are written behind the journal, not in the write path: a commit
//! only notes which files changed, and [`Store::flush_views`] (called every
//! few tens of milliseconds by the server) appends what is new. Timelines
//! and feeds only grow at the end, in the cluster's log order, which master
//! and slave share, so their files are identical.

pub mod codec;
pub mod journal;
pub mod lock;
pub mod log;
pub mod record;
pub mod state;

use crate::error::{Error, Result};
use journal::Journal;
pub use log::Log;
use state::{Effect, Entry, FeedItem, Post, Snapshot, State};
use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::broadcast;

/// How a timeline stream starts (see [`Store::subscribe`]).
#[derive(Debug)]
pub struct Start {
    /// The backlog, each post with its index in the feed.
    pub backlog: Vec<(usize, FeedItem)>,
    /// The feed index of the first post to send after the backlog.
    pub next: usize,
    /// A reader resuming: read the feed from `next` on before the live
    /// posts.
    pub resumed: bool,
    /// The anchor of the post before `next` ([`state::EMPTY_FEED_ANCHOR`]
    /// at 0): with `next`, where the stream's live posts continue the feed.
    pub anchor: u64,
}

/// Where a timeline reader that reconnects asks to go on: after the post
/// at feed position `from` (`feedPosition`, counted from 1; the index of
/// the first post it has not shown), whose feed anchor it was given
/// (`feedAnchor`; 0 when its client sends none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub from: usize,
    pub anchor: u64,
}

impl Resume {
    /// Whether `feed` has the history the reader's position was counted
    /// in: the position is within it and the post there has the anchor the
    /// reader was given with it. After a failover an operator forced at
    /// the cost of acknowledged writes, the feed may hold other posts
    /// there, or fewer: resuming by position alone would skip the ones
    /// that took the lost ones' places. Without an anchor the position is
    /// taken as it is.
    pub fn within(&self, feed: &[FeedItem]) -> bool {
        match self.from {
            0 => true,
            from if from > feed.len() => false,
            from => self.anchor == 0 || feed[from - 1].anchor == self.anchor,
        }
    }
}

/// Live posts a slow timeline reader may fall behind by before its stream
/// reads the rest from the feed instead (see [`Store::feed_from`]); a
/// person reads far fewer than this between two screen refreshes.
pub const LIVE_BUFFER: usize = 1024;

pub const JOURNAL_FILE: &str = "journal.log";
/// Present while a cut torn tail is unsettled: it says what was cut, and
/// stays across restarts until an in-sync peer showed it held nothing more
/// or the state was rebuilt (see [`Log::settle_tail`]).
pub const TAIL_CUT_FILE: &str = "journal.cut";

/// The memory half of a server's storage: the state, the views that lag
/// it, and the hub of live timeline streams. Never held across disk I/O
/// (view files are written after the lock is released).
pub struct Store {
    dir: PathBuf,
    state: State,
    live: HashMap<u32, broadcast::Sender<(usize, FeedItem)>>,
    dirty: Dirty,
    /// How many records each user's timeline / feed file holds.
    on_disk: HashMap<(u32, PostFile), usize>,
    /// Held while view files are written, so writes prepared by one flush
    /// never interleave with another flush or a reset.
    view_io: Arc<Mutex<()>>,
    /// A view write failed: the next flush rewrites every view file.
    views_stale: bool,
    /// The state was replaced (a snapshot): the next flush removes every
    /// view file and writes them anew.
    views_reset: bool,
}

/// One pending view file write.
enum ViewWrite {
    Replace(PathBuf, String),
    Append(PathBuf, String),
}

/// View file writes prepared by [`Store::prepare_flush`].
pub struct ViewWrites {
    io: Arc<Mutex<()>>,
    /// Remove every view file of this directory first.
    clear: Option<PathBuf>,
    writes: Vec<ViewWrite>,
}

impl ViewWrites {
    /// Carries the writes out (without the store lock).
    pub fn apply(self) -> Result<()> {
        let io = self.io.clone();
        let _io = io.lock().unwrap_or_else(PoisonError::into_inner);
        self.apply_locked()
    }

    /// [`ViewWrites::apply`], with the view lock already held.
    fn apply_locked(self) -> Result<()> {
        if let Some(dir) = &self.clear {
            // Files of users the new state does not have must not linger.
            let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".txt") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        for w in &self.writes {
            let (path, result) = match w {
                ViewWrite::Replace(path, text) => (path, replace(path, text)),
                ViewWrite::Append(path, text) => (path, append_text(path, text)),
            };
            result.map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PostFile {
    Timeline,
    Feed,
}

/// View files that lag behind the state.
#[derive(Debug, Default)]
struct Dirty {
    users: bool,
    new_users: BTreeSet<u32>,
    follow_lists: BTreeSet<u32>,
    followers: BTreeSet<u32>,
    timelines: BTreeSet<u32>,
    feeds: BTreeSet<u32>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        !self.users
            && self.new_users.is_empty()
            && self.follow_lists.is_empty()
            && self.followers.is_empty()
            && self.timelines.is_empty()
            && self.feeds.is_empty()
    }
}

/// Writes `bytes` to `path` and makes file and directory entry durable.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    journal::sync_dir(path)
}

/// Opens the storage in `dir` (created if missing): replays the journal
/// and rewrites every view file from it. A damaged journal (see
/// [`journal`]) opens too, its state holding the records before the damage
/// and its log refusing writes: [`Log::damage`] says why.
pub fn open(dir: &Path, cluster: u32, clusters: u32) -> Result<(Log, Store)> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(JOURNAL_FILE);
    let marker = dir.join(TAIL_CUT_FILE);
    let opened = Journal::open_noting_cuts(&path, |bytes| {
        let why = format!("{bytes} bytes cut from the end of {} at {} ms", path.display(), crate::net::now_ms());
        write_durably(&marker, why.as_bytes())
    })
    .map_err(|e| Error::io(&path, e))?;
    let mut damage = opened.damage.map(|d| format!("{}: {d}", path.display()));
    // This run's cut, or an earlier run's that no peer has settled yet.
    let cut = match fs::read_to_string(&marker) {
        Ok(why) => Some(why.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&marker, e)),
    };
    let mut state = State::new(cluster, clusters);
    for (i, rec) in opened.records.iter().enumerate() {
        match codec::decode_entry(rec, clusters) {
            // A client write numbered below what the journal already
            // holds: two writes under one seq. Replaying both would make
            // another state than the one served (each would count in the
            // streams to other clusters); the journal is not trustworthy.
            Ok(Entry::Local(op)) if op.seq < state.next_seq() => {
                damage = Some(format!(
                    "{}: record {i} repeats seq {} (the records before it reach {})",
                    path.display(),
                    op.seq,
                    state.next_seq() - 1
                ));
                break;
            }
            Ok(entry) => {
                state.apply(&entry);
            }
            Err(e) => {
                // Intact bytes that do not decode: written by something
                // else, or altered with a matching checksum. Damage too.
                damage = Some(format!("{}: record {i} does not decode: {e}", path.display()));
                break;
            }
        }
    }
    let records = opened.records.len();
    let incarnation = opened.journal.incarnation();
    let mut store = Store {
        dir: dir.to_path_buf(),
        state,
        live: HashMap::new(),
        dirty: Dirty::default(),
        on_disk: HashMap::new(),
        view_io: Arc::default(),
        views_stale: false,
        views_reset: false,
    };
    if let Some(why) = &damage {
        tracing::error!(damage = %why, records_before = records, "journal damaged: this server holds no trustworthy state and serves nothing until it is rebuilt from an in-sync peer");
    } else {
        store.rebuild_views()?;
        tracing::info!(dir = %dir.display(), records, users = store.state.users().len(), incarnation, "store opened");
    }
    Ok((Log::new(dir, opened.journal, damage, cut), store))
}

/// Rewrites the journal as one `snapshot` of the current state when it
/// has grown large (see [`Log::wants_compaction`]) and the snapshot is
/// smaller: feeds hold a copy of each post per follower, so a state can be
/// bigger than the journal that built it. Returns whether it did.
pub fn compact(log: &mut Log, snapshot: Snapshot) -> Result<bool> {
    let before = log.bytes();
    let entry = Entry::Snapshot(Box::new(snapshot));
    if codec::encode_entry(&entry).len() as u64 >= before {
        log.skip_compaction();
        return Ok(false);
    }
    log.replace(&entry)?;
    tracing::info!(before, after = log.bytes(), "journal compacted");
    Ok(true)
}

/// Both halves of the storage in one place, for single-threaded use (tools
/// and tests); a server keeps them under separate locks.
pub struct Disk {
    pub log: Log,
    pub store: Store,
}

impl Disk {
    pub fn open(dir: &Path, cluster: u32, clusters: u32) -> Result<Disk> {
        let (log, store) = open(dir, cluster, clusters)?;
        Ok(Disk { log, store })
    }

    pub fn state(&self) -> &State {
        self.store.state()
    }

    /// Journals `entry` (fsynced when `durable`) and applies it.
    pub fn commit(&mut self, entry: &Entry, durable: bool) -> Result<Vec<Effect>> {
        self.commit_all(std::slice::from_ref(entry), durable)
    }

    /// Journals `entries` in one write and one fsync, then applies them.
    pub fn commit_all(&mut self, entries: &[Entry], durable: bool) -> Result<Vec<Effect>> {
        self.log.append(entries, durable)?;
        Ok(self.store.apply(entries))
    }

    /// Replaces everything with `snapshot`: the journal first, then memory.
    pub fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        self.log.replace(&Entry::Snapshot(Box::new(snapshot.clone())))?;
        self.store.install(snapshot);
        Ok(())
    }

    pub fn compact_if_large(&mut self) -> Result<bool> {
        if !self.log.wants_compaction() {
            return Ok(false);
        }
        compact(&mut self.log, self.store.state().snapshot())
    }

    pub fn flush_views(&mut self) -> Result<()> {
        self.store.flush_views()
    }
}

impl Store {
    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Applies journaled entries, in order, and wakes the timeline streams
    /// they concern.
    pub fn apply(&mut self, entries: &[Entry]) -> Vec<Effect> {
        let mut all = Vec::new();
        for entry in entries {
            let effects = self.state.apply(entry);
            for effect in &effects {
                self.note(effect);
                if let Effect::Feed { user, at, .. } = effect
                    && let Some(tx) = self.live.get(user)
                    && let Some(item) = self.state.feed(*user).get(*at)
                {
                    let _ = tx.send((*at, item.clone()));
                }
            }
            all.extend(effects);
        }
        all
    }

    /// Whether some view file lags behind the state.
    pub fn views_dirty(&self) -> bool {
        self.views_reset || self.views_stale || !self.dirty.is_empty()
    }

    fn note(&mut self, effect: &Effect) {
        let d = &mut self.dirty;
        match effect {
            Effect::Users => d.users = true,
            Effect::NewLocalUser(u) => {
                d.new_users.insert(*u);
            }
            Effect::FollowList(u) => {
                d.follow_lists.insert(*u);
            }
            Effect::Followers(u) => {
                d.followers.insert(*u);
            }
            Effect::TimelineAppend(user) => {
                d.timelines.insert(*user);
            }
            Effect::Feed { user, .. } => {
                d.feeds.insert(*user);
            }
            // Only a snapshot install resets, and it rewrites the views
            // itself.
            Effect::Reset => self.dirty = Dirty::default(),
        }
    }

    /// Brings every view file up to date with the state.
    pub fn flush_views(&mut self) -> Result<()> {
        self.prepare_flush().apply()
    }

    /// The file writes that bring the views up to date, prepared under the
    /// store lock (cheap: formatting) and carried out after it is released
    /// (the disk), so a flush never stalls commits or live streams.
    pub fn prepare_flush(&mut self) -> ViewWrites {
        let dirty = std::mem::take(&mut self.dirty);
        if std::mem::take(&mut self.views_reset) {
            self.views_stale = false;
            let mut writes = self.all_view_writes();
            writes.clear = Some(self.dir.clone());
            return writes;
        }
        if std::mem::take(&mut self.views_stale) {
            return self.all_view_writes();
        }
        let mut writes = Vec::new();
        if dirty.users {
            writes.push(ViewWrite::Replace(self.dir.join("all_users.txt"), record::encode_ids(self.state.users())));
        }
        for u in &dirty.new_users {
            for suffix in ["follow_list", "followers", "timeline", "following"] {
                writes.push(ViewWrite::Append(self.path(*u, suffix), String::new()));
            }
        }
        for u in &dirty.follow_lists {
            let ids: Vec<u32> = self.state.following(*u).collect();
            writes.push(ViewWrite::Replace(self.path(*u, "follow_list"), record::encode_ids(&ids)));
        }
        for u in &dirty.followers {
            let ids: Vec<u32> = self.state.followers(*u).collect();
            writes.push(ViewWrite::Replace(self.path(*u, "followers"), record::encode_ids(&ids)));
        }
        for u in &dirty.timelines {
            writes.push(self.post_write(*u, PostFile::Timeline));
        }
        for u in &dirty.feeds {
            writes.push(self.post_write(*u, PostFile::Feed));
        }
        ViewWrites { io: self.view_io.clone(), clear: None, writes }
    }

    /// The write that appends the records a post file lacks (timelines and
    /// feeds only grow at the end).
    fn post_write(&mut self, user: u32, file: PostFile) -> ViewWrite {
        let (text, total, suffix) = match file {
            PostFile::Timeline => {
                let posts = self.state.timeline(user);
                let from = self.on_disk.get(&(user, file)).copied().unwrap_or(0).min(posts.len());
                (posts_text(&posts[from..]), posts.len(), "timeline")
            }
            PostFile::Feed => {
                let items = self.state.feed(user);
                let from = self.on_disk.get(&(user, file)).copied().unwrap_or(0).min(items.len());
                (posts_text(items[from..].iter().map(|i| &i.post)), items.len(), "following")
            }
        };
        self.on_disk.insert((user, file), total);
        ViewWrite::Append(self.path(user, suffix), text)
    }

    /// What a timeline stream of `user` starts with, and a receiver of its
    /// later feed posts (each with its index in the feed), taken together
    /// so no post falls between the two. It starts with the backlog, or,
    /// when `resume` is within the feed and of its history, with the feed
    /// from there on, which the stream reads itself: then
    /// [`Start::resumed`] is set.
    pub fn subscribe(&mut self, user: u32, resume: Option<Resume>) -> (Start, broadcast::Receiver<(usize, FeedItem)>) {
        self.live.retain(|_, tx| tx.receiver_count() > 0);
        let rx = self.live.entry(user).or_insert_with(|| broadcast::channel(LIVE_BUFFER).0).subscribe();
        let feed = self.state.feed(user);
        let anchor = |next: usize| next.checked_sub(1).map_or(state::EMPTY_FEED_ANCHOR, |i| feed[i].anchor);
        // Where the stream resumes reading the feed, if it does.
        let resumed = match resume {
            Some(r) if r.within(feed) => Some(r.from),
            Some(r) => {
                tracing::info!(
                    user,
                    from = r.from,
                    feed = feed.len(),
                    "a resuming timeline reader's position is not in this feed's history: it gets the backlog"
                );
                None
            }
            None => None,
        };
        let start = match resumed {
            Some(from) => Start { backlog: Vec::new(), next: from, resumed: true, anchor: anchor(from) },
            None => Start {
                backlog: self.state.backlog(user),
                next: feed.len(),
                resumed: false,
                anchor: anchor(feed.len()),
            },
        };
        (start, rx)
    }

    /// Up to `most` posts of `user`'s feed from index `from` on, each with
    /// its index: what a live stream that fell more than [`LIVE_BUFFER`]
    /// posts behind missed, or what a resuming reader has not shown.
    pub fn feed_from(&self, user: u32, from: usize, most: usize) -> Vec<(usize, FeedItem)> {
        self.state.feed(user).iter().enumerate().skip(from).take(most).map(|(at, i)| (at, i.clone())).collect()
    }

    fn path(&self, user: u32, suffix: &str) -> PathBuf {
        self.dir.join(format!("{user}_{suffix}.txt"))
    }

    /// Replaces the whole state with `snapshot` (once the log holds it):
    /// every view file is removed and written anew by the next flush.
    pub fn install(&mut self, snapshot: Snapshot) {
        self.state.apply(&Entry::Snapshot(Box::new(snapshot)));
        self.dirty = Dirty::default();
        self.views_reset = true;
    }

    fn rebuild_views(&mut self) -> Result<()> {
        let written = self.all_view_writes().apply();
        self.views_written(written);
        Ok(())
    }

    /// The journal holds the truth: views that could not be written (a
    /// full disk) are rewritten by a later flush, not fatal.
    fn views_written(&mut self, written: Result<()>) {
        if let Err(e) = written {
            tracing::error!(error = %e, "writing view files failed; they will be rewritten");
            self.views_stale = true;
        }
    }

    /// Writes that replace every view file with what the state holds.
    fn all_view_writes(&mut self) -> ViewWrites {
        let mut writes =
            vec![ViewWrite::Replace(self.dir.join("all_users.txt"), record::encode_ids(self.state.users()))];
        self.on_disk.clear();
        let local: Vec<u32> = self.state.users().iter().copied().filter(|u| self.state.is_local(*u)).collect();
        for u in local {
            let follows: Vec<u32> = self.state.following(u).collect();
            let followers: Vec<u32> = self.state.followers(u).collect();
            writes.push(ViewWrite::Replace(self.path(u, "follow_list"), record::encode_ids(&follows)));
            writes.push(ViewWrite::Replace(self.path(u, "followers"), record::encode_ids(&followers)));
            let timeline = self.state.timeline(u);
            self.on_disk.insert((u, PostFile::Timeline), timeline.len());
            writes.push(ViewWrite::Replace(self.path(u, "timeline"), posts_text(timeline)));
            let feed = self.state.feed(u);
            self.on_disk.insert((u, PostFile::Feed), feed.len());
            writes.push(ViewWrite::Replace(self.path(u, "following"), posts_text(feed.iter().map(|i| &i.post))));
        }
        ViewWrites { io: self.view_io.clone(), clear: None, writes }
    }

    /// Writing the views failed (a full disk): what is on disk is no longer
    /// known, so the next flush rewrites every view file.
    pub fn views_failed(&mut self) {
        self.views_stale = true;
    }
}

fn posts_text<'a>(posts: impl IntoIterator<Item = &'a Post>) -> String {
    let mut out = String::new();
    for p in posts {
        record::encode_post(&mut out, p.user, &p.text, p.at_ms);
    }
    out
}

/// Replaces a file's contents atomically (write aside, then rename), so a
/// reader sees the old file or the new one, never half of either.
fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("view");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

fn append_text(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    // One write per append: a reader never sees half a batch of records.
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::state::{Change, LocalOp, RemoteEvent};
    use super::*;

    fn local(store: &mut Disk, change: Change) {
        let seq = store.state().next_seq();
        store.commit(&Entry::Local(LocalOp::new(seq, change)), true).unwrap();
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn an_installed_snapshot_replaces_journal_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut a = Disk::open(&a_dir, 1, 3).unwrap();
        let mut b = Disk::open(&b_dir, 1, 3).unwrap();
        local(&mut a, Change::User(1));
        local(&mut a, Change::User(4));
        local(&mut a, Change::Relation { follower: 4, followee: 1, follow: true, at_ms: 0 });
        local(&mut a, Change::Post(Post { user: 1, text: "hi".into(), at_ms: 10, client_id: 3 }));
        // b went its own way (a fenced master's unreplicated write).
        local(&mut b, Change::User(7));
        b.install_snapshot(a.state().snapshot()).unwrap();
        assert_eq!(b.state().snapshot(), a.state().snapshot());
        b.flush_views().unwrap();
        assert!(!b_dir.join("7_timeline.txt").exists(), "views of the discarded state are gone");
        let files = |d: &Path| -> Vec<(String, String)> {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".txt") && !n.starts_with('.'))
                .map(|n| (n.clone(), read(d, &n)))
                .collect();
            v.sort();
            v
        };
        a.flush_views().unwrap();
        b.flush_views().unwrap();
        assert_eq!(files(&a_dir), files(&b_dir));
        // The installed state survives a restart, and writes go on after it.
        local(&mut b, Change::Post(Post { user: 1, text: "more".into(), at_ms: 11, client_id: 4 }));
        drop(b);
        let b = Disk::open(&b_dir, 1, 3).unwrap();
        assert_eq!(b.state().timeline(1).len(), 2);
        assert!(b.state().has_post_id(1, 3) && b.state().has_post_id(1, 4));
    }

    #[test]
    fn a_journal_with_two_writes_under_one_seq_is_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let mut s = Disk::open(&dir, 1, 3).unwrap();
        local(&mut s, Change::User(1));
        local(&mut s, Change::User(4));
        // A second write under seq 2, as a journal holding records its
        // server's memory lacked would get.
        s.commit(&Entry::Local(LocalOp::new(2, Change::User(7))), true).unwrap();
        local(&mut s, Change::User(10));
        drop(s);
        let s = Disk::open(&dir, 1, 3).unwrap();
        let damage = s.log.damage().expect("reported as damage");
        assert!(damage.contains("record 2 repeats seq 2"), "{damage}");
        // What came before the repeat is read; nothing is cut from the file.
        assert!(s.state().has_user(4) && !s.state().has_user(7));
        assert!(fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len() > 0);
    }

    #[test]
    fn a_large_journal_is_compacted_into_one_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let mut s = Disk::open(&dir, 1, 3).unwrap();
        local(&mut s, Change::User(1));
        // Ten followers in this cluster: each post is in a timeline and
        // ten feeds.
        let followers: Vec<u32> = (1..=10).map(|k| 1 + 3 * k).collect();
        for f in &followers {
            local(&mut s, Change::User(*f));
            local(&mut s, Change::Relation { follower: *f, followee: 1, follow: true, at_ms: 0 });
        }
        assert!(!s.compact_if_large().unwrap(), "small journals are left alone");
        for i in 0..100 {
            local(&mut s, Change::Post(Post { user: 1, text: format!("post {i}").into(), at_ms: i, client_id: 0 }));
        }
        s.commit(&Entry::PublishedUpto(s.state().next_seq() - 1), false).unwrap();
        for i in 0..400 {
            // Churn that a snapshot does not keep.
            local(&mut s, Change::Relation { follower: 1, followee: 4, follow: i % 2 == 0, at_ms: i });
        }
        let before = s.log.bytes();
        let state = s.state().snapshot();
        // Copies of each post in every feed would outweigh the journal
        // that holds each once: such a snapshot would never be written.
        let copies = codec::encode_snapshot(&state, 1, codec::SnapshotFormat::Copies).len() as u64;
        assert!(copies > before, "{copies} <= {before}");
        assert!(s.compact_if_large().unwrap());
        assert!(s.log.bytes() < before / 2, "{} >= {before} / 2", s.log.bytes());
        assert!(!s.compact_if_large().unwrap(), "not again right away");
        local(&mut s, Change::Post(Post { user: 1, text: "after".into(), at_ms: 200, client_id: 0 }));
        drop(s);
        let s = Disk::open(&dir, 1, 3).unwrap();
        assert_eq!(s.state().timeline(1).len(), 101);
        for f in &followers {
            assert_eq!(s.state().feed(*f).len(), 101);
        }
        let mut expected = state;
        expected
            .local_users
            .iter_mut()
            .find(|u| u.user == 1)
            .unwrap()
            .timeline
            .push(s.state().timeline(1)[100].clone());
        for f in &followers {
            expected.local_users.iter_mut().find(|u| u.user == *f).unwrap().feed.push(s.state().feed(*f)[100].clone());
        }
        expected.next_seq += 1;
        assert_eq!(s.state().snapshot(), expected);
    }

    #[test]
    fn a_journal_is_not_compacted_into_a_bigger_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let mut s = Disk::open(&dir, 1, 3).unwrap();
        let mut u = 1;
        while s.log.bytes() < log::COMPACT_AT_MIN {
            local(&mut s, Change::User(u));
            u += 3;
        }
        let before = s.log.bytes();
        assert!(s.log.wants_compaction());
        // A state bigger than the journal (here: one that holds 200 posts
        // of 100 bytes the journal does not) is not written.
        let mut bigger = s.state().snapshot();
        bigger.local_users[0].timeline =
            (0..200).map(|i| Post { user: 1, text: "x".repeat(100).into(), at_ms: i, client_id: 0 }).collect();
        assert!(!compact(&mut s.log, bigger).unwrap());
        assert_eq!(s.log.bytes(), before);
        assert!(!s.log.wants_compaction(), "not until the journal doubles");
        drop(s);
        assert_eq!(Disk::open(&dir, 1, 3).unwrap().state().timeline(1).len(), 0);
    }

    /// A remote post of `author` (cluster `author` of 3) for user 3,
    /// followed under `follow`, the `n`th event of its stream.
    fn remote_post(author: u32, n: u64, text: &str, at_ms: i64, follow: u64) -> Entry {
        Entry::Remote(RemoteEvent {
            origin: author,
            seq: n,
            epoch: 1,
            dest_seq: n,
            change: Change::Post(Post { user: author, text: text.into(), at_ms, client_id: 0 }),
            recipients: vec![(3, follow)],
        })
    }

    #[test]
    fn views_follow_the_journal_in_log_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        let mut s = Disk::open(&dir, 3, 3).unwrap();
        local(&mut s, Change::User(3));
        local(&mut s, Change::Relation { follower: 3, followee: 1, follow: true, at_ms: 0 }); // seq 2
        local(&mut s, Change::Relation { follower: 3, followee: 2, follow: true, at_ms: 0 }); // seq 3
        s.commit_all(&[remote_post(1, 1, "b", 2_000, 2), remote_post(1, 2, "c", 3_000, 2)], true).unwrap();
        assert!(s.store.views_dirty());
        assert_eq!(fs::read_to_string(dir.join("3_following.txt")).unwrap_or_default(), "", "views lag until flushed");
        s.flush_views().unwrap();
        assert!(!s.store.views_dirty());
        let texts = |d: &Path| -> Vec<String> {
            record::decode_posts(&read(d, "3_following.txt")).into_iter().map(|p| p.text).collect()
        };
        assert_eq!(texts(&dir), vec!["b", "c"]);
        // An older timestamp changes nothing: the feed is in log order.
        s.commit(&remote_post(2, 1, "a", 1_000, 3), true).unwrap();
        s.commit(&remote_post(2, 2, "d", 4_000, 3), true).unwrap();
        s.flush_views().unwrap();
        assert_eq!(texts(&dir), vec!["b", "c", "a", "d"]);
        drop(s);
        let s = Disk::open(&dir, 3, 3).unwrap();
        assert_eq!(s.state().feed(3).len(), 4);
        assert_eq!(texts(&dir), vec!["b", "c", "a", "d"], "rebuilt identically");
    }

    #[test]
    fn feed_files_equal_the_feed_after_every_flush() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("f");
        let mut s = Disk::open(&dir, 3, 3).unwrap();
        local(&mut s, Change::User(3));
        local(&mut s, Change::Relation { follower: 3, followee: 1, follow: true, at_ms: 0 }); // 2
        local(&mut s, Change::Relation { follower: 3, followee: 2, follow: true, at_ms: 0 }); // 3
        local(&mut s, Change::User(6));
        local(&mut s, Change::Relation { follower: 3, followee: 6, follow: true, at_ms: 0 }); // 5
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut streams = [0u64; 2];
        for round in 0..400 {
            let author = [1u32, 2, 6][next(3) as usize];
            let at_ms = 1_700_000_000_000 + round * 37 - next(1500) as i64;
            let text = "x".repeat(next(30) as usize) + &round.to_string();
            let entry = if author == 6 {
                let seq = s.state().next_seq();
                Entry::Local(LocalOp::new(seq, Change::Post(Post { user: 6, text: text.into(), at_ms, client_id: 0 })))
            } else {
                let i = author as usize - 1;
                streams[i] += 1;
                remote_post(author, streams[i], &text, at_ms, author as u64 + 1)
            };
            s.commit(&entry, false).unwrap();
            if next(4) == 0 {
                s.flush_views().unwrap();
                assert_eq!(
                    read(&dir, "3_following.txt"),
                    posts_text(s.state().feed(3).iter().map(|i| &i.post)),
                    "round {round}"
                );
            }
        }
        s.flush_views().unwrap();
        assert_eq!(read(&dir, "3_following.txt"), posts_text(s.state().feed(3).iter().map(|i| &i.post)));
        assert_eq!(read(&dir, "6_timeline.txt"), posts_text(s.state().timeline(6)));
        assert_eq!(s.state().feed(3).len(), 400);
    }

    #[test]
    fn views_lost_to_a_failed_flush_are_rewritten_by_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("w");
        let mut s = Disk::open(&dir, 1, 3).unwrap();
        local(&mut s, Change::User(1));
        local(&mut s, Change::User(4));
        local(&mut s, Change::Relation { follower: 4, followee: 1, follow: true, at_ms: 0 });
        s.flush_views().unwrap();
        local(&mut s, Change::Post(Post { user: 1, text: "lost".into(), at_ms: 5, client_id: 0 }));
        // A flush whose writes never reach the disk (ENOSPC).
        drop(s.store.prepare_flush());
        s.store.views_failed();
        assert!(s.store.views_dirty());
        local(&mut s, Change::Post(Post { user: 1, text: "next".into(), at_ms: 6, client_id: 0 }));
        s.flush_views().unwrap();
        assert_eq!(read(&dir, "4_following.txt"), posts_text(s.state().feed(4).iter().map(|i| &i.post)));
        assert_eq!(read(&dir, "1_timeline.txt"), posts_text(s.state().timeline(1)));
        assert_eq!(s.state().feed(4).len(), 2);
        assert!(!s.store.views_dirty());
    }

    #[test]
    fn files_follow_the_spec_and_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster_1/1");
        let mut s = Disk::open(&dir, 1, 3).unwrap();
        local(&mut s, Change::User(4));
        local(&mut s, Change::User(1));
        let user2 =
            RemoteEvent { origin: 2, seq: 1, epoch: 1, dest_seq: 1, change: Change::User(2), recipients: vec![] };
        s.commit(&Entry::Remote(user2), true).unwrap();
        local(&mut s, Change::Relation { follower: 4, followee: 1, follow: true, at_ms: 0 });
        local(&mut s, Change::Post(Post { user: 1, text: "p11".into(), at_ms: 1_744_336_636_000, client_id: 0 }));
        let (start, mut rx) = s.store.subscribe(4, None);
        assert_eq!((start.backlog.len(), start.next, start.resumed), (1, 1, false));
        // A reader resuming within the feed reads it from there; beyond
        // it (another history), it gets the backlog.
        let (resumed, _) = s.store.subscribe(4, Some(Resume { from: 0, anchor: 0 }));
        assert_eq!((resumed.backlog.len(), resumed.next, resumed.resumed), (0, 0, true));
        let (beyond, _) = s.store.subscribe(4, Some(Resume { from: 2, anchor: 0 }));
        assert_eq!((beyond.backlog.len(), beyond.next, beyond.resumed), (1, 1, false));
        // After its first post, with that post's anchor: resumed; with
        // another history's anchor there: the backlog; with none: resumed.
        let anchor = start.backlog[0].1.anchor;
        assert_eq!(start.anchor, anchor, "live posts continue after the backlog's last");
        let (empty, _) = s.store.subscribe(1, None);
        assert_eq!((empty.next, empty.anchor), (0, state::EMPTY_FEED_ANCHOR));
        let (same, _) = s.store.subscribe(4, Some(Resume { from: 1, anchor }));
        assert_eq!((same.backlog.len(), same.next, same.resumed), (0, 1, true));
        let (other, _) = s.store.subscribe(4, Some(Resume { from: 1, anchor: anchor ^ 1 }));
        assert_eq!((other.backlog.len(), other.next, other.resumed), (1, 1, false));
        let (unanchored, _) = s.store.subscribe(4, Some(Resume { from: 1, anchor: 0 }));
        assert_eq!((unanchored.next, unanchored.resumed), (1, true));
        local(&mut s, Change::Post(Post { user: 1, text: "p12".into(), at_ms: 1_744_336_637_000, client_id: 0 }));
        let (at, item) = rx.try_recv().unwrap();
        assert_eq!((at, &*item.post.text), (1, "p12"));
        assert_eq!(item.anchor, state::feed_anchor(anchor, &item.post), "each anchor follows the one before");
        let missed: Vec<(usize, String)> =
            s.store.feed_from(4, 0, 10).iter().map(|(at, i)| (*at, i.post.text.to_string())).collect();
        assert_eq!(missed, [(0, "p11".to_string()), (1, "p12".to_string())]);
        assert_eq!(s.store.feed_from(4, 1, 10).len(), 1);
        assert!(s.store.feed_from(4, 2, 10).is_empty());
        s.flush_views().unwrap();

        assert_eq!(read(&dir, "all_users.txt"), "1\n2\n4\n");
        assert_eq!(read(&dir, "4_follow_list.txt"), "1\n");
        assert_eq!(read(&dir, "1_followers.txt"), "4\n");
        assert_eq!(read(&dir, "4_followers.txt"), "");
        let feed = read(&dir, "4_following.txt");
        assert_eq!(record::decode_posts(&feed).len(), 2);
        assert!(feed.starts_with("T 2025-04-11 01:57:16 UTC\nU 1\nW p11\n\n"));
        assert_eq!(record::decode_posts(&read(&dir, "1_timeline.txt")).len(), 2);
        let before: Vec<String> = ["all_users.txt", "4_following.txt", "1_timeline.txt", "1_followers.txt"]
            .iter()
            .map(|f| read(&dir, f))
            .collect();
        drop(s);

        // A view damaged by a crash is rebuilt from the journal.
        fs::write(dir.join("4_following.txt"), "T 2025").unwrap();
        let s = Disk::open(&dir, 1, 3).unwrap();
        let after: Vec<String> = ["all_users.txt", "4_following.txt", "1_timeline.txt", "1_followers.txt"]
            .iter()
            .map(|f| read(&dir, f))
            .collect();
        assert_eq!(before, after);
        assert_eq!(s.state().next_seq(), 6);
    }

    /// The spec's files of a server directory (the journal is ours).
    fn spec_files(d: &Path) -> Vec<(String, String)> {
        let mut v: Vec<_> = fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".txt") && !n.starts_with('.'))
            .map(|n| (n.clone(), read(d, &n)))
            .collect();
        v.sort();
        v
    }

    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// The master's next entry: a client write of cluster 1 (of 3) that
    /// its rules accept, or an event of cluster 2 or 3 (sometimes a
    /// duplicate, sometimes ahead of its stream).
    fn next_entry(m: &State, rng: &mut Rng, streams: &mut [u64; 4], sent: &mut Vec<RemoteEvent>) -> Entry {
        let local_users: Vec<u32> = m.users().iter().copied().filter(|u| m.is_local(*u)).collect();
        let any_users: Vec<u32> = m.users().iter().copied().collect();
        let seq = m.next_seq();
        match rng.below(10) {
            0 | 1 => Entry::Local(LocalOp::new(seq, Change::User(1 + 3 * rng.below(6) as u32))),
            2 | 3 if !local_users.is_empty() && any_users.len() > 1 => {
                let f = local_users[rng.below(local_users.len() as u64) as usize];
                let t = any_users[rng.below(any_users.len() as u64) as usize];
                let follow = m.check_follow(f, t) == state::Outcome::Success;
                if follow || m.check_unfollow(f, t) == state::Outcome::Success {
                    Entry::Local(LocalOp::new(seq, Change::Relation { follower: f, followee: t, follow, at_ms: 0 }))
                } else {
                    Entry::PublishedUpto(m.published_upto().max(seq / 2))
                }
            }
            4..=6 if !local_users.is_empty() => {
                let u = local_users[rng.below(local_users.len() as u64) as usize];
                let text = format!("p{seq}-{}", "x".repeat(rng.below(20) as usize));
                Entry::Local(LocalOp::new(
                    seq,
                    Change::Post(Post { user: u, text: text.into(), at_ms: rng.below(1 << 40) as i64, client_id: seq }),
                ))
            }
            7 if !sent.is_empty() && rng.below(3) == 0 => {
                // A redelivery.
                Entry::Remote(sent[rng.below(sent.len() as u64) as usize].clone())
            }
            _ => {
                let origin = 2 + rng.below(2) as u32;
                streams[origin as usize] += 1;
                let n = streams[origin as usize];
                let author = origin + 3 * rng.below(4) as u32;
                let mut readers = Vec::new();
                for u in &local_users {
                    if rng.below(2) == 0 {
                        readers.push((*u, 1 + rng.below(3 * seq.max(1))));
                    }
                }
                let change = match rng.below(3) {
                    0 => Change::User(author),
                    1 if !local_users.is_empty() => Change::Relation {
                        follower: author,
                        followee: local_users[rng.below(local_users.len() as u64) as usize],
                        follow: rng.below(3) > 0,
                        at_ms: 0,
                    },
                    _ => Change::Post(Post { user: author, text: format!("r{n}").into(), at_ms: 7, client_id: 0 }),
                };
                let ev = RemoteEvent { origin, seq: 100 + n, epoch: 1, dest_seq: n, change, recipients: readers };
                sent.push(ev.clone());
                Entry::Remote(ev)
            }
        }
    }

    /// Property: a slave that journals the master's entries in the master's
    /// order holds byte-identical spec files after every flush of both,
    /// however the entries are batched, whenever either side flushes,
    /// compacts, or the slave reinstalls the master's state.
    #[test]
    fn master_and_slave_files_are_identical_whatever_the_interleaving() {
        for seed in 1..=20u64 {
            let tmp = tempfile::tempdir().unwrap();
            let (md, sd) = (tmp.path().join("m"), tmp.path().join("s"));
            let mut m = Disk::open(&md, 1, 3).unwrap();
            let mut s = Disk::open(&sd, 1, 3).unwrap();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let (mut streams, mut sent) = ([0u64; 4], Vec::new());
            for round in 0..120 {
                // A batch as the master commits it (a group of writes and
                // events), forwarded whole to the slave.
                let mut batch = Vec::new();
                let mut scratch = m.state().clone();
                for _ in 0..1 + rng.below(6) {
                    let e = next_entry(&scratch, &mut rng, &mut streams, &mut sent);
                    scratch.apply(&e);
                    batch.push(e);
                }
                m.commit_all(&batch, false).unwrap();
                s.commit_all(&batch, false).unwrap();
                match rng.below(8) {
                    0 => m.flush_views().unwrap(),
                    1 => s.flush_views().unwrap(),
                    2 => {
                        m.compact_if_large().unwrap();
                    }
                    3 if round % 30 == 0 => s.install_snapshot(m.state().snapshot()).unwrap(),
                    _ => {}
                }
                if rng.below(5) == 0 {
                    m.flush_views().unwrap();
                    s.flush_views().unwrap();
                    assert_eq!(spec_files(&md), spec_files(&sd), "seed {seed}, round {round}");
                }
            }
            m.flush_views().unwrap();
            s.flush_views().unwrap();
            assert_eq!(m.state().snapshot(), s.state().snapshot(), "seed {seed}");
            assert_eq!(spec_files(&md), spec_files(&sd), "seed {seed}");
            assert!(!spec_files(&md).is_empty());
            // And what each holds survives its restart as it is.
            drop((m, s));
            let (m, s) = (Disk::open(&md, 1, 3).unwrap(), Disk::open(&sd, 1, 3).unwrap());
            assert_eq!(m.state().snapshot(), s.state().snapshot(), "seed {seed} after restart");
        }
    }
}
