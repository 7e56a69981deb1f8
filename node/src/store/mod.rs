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

pub mod codec;
pub mod journal;
pub mod record;
pub mod state;

use crate::error::{Error, Result};
use journal::Journal;
use state::{Effect, Entry, Post, Snapshot, State};
use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use tokio::sync::broadcast;

/// Live posts a slow timeline reader may fall behind by before it misses
/// some; a person reads far fewer than this between two screen refreshes.
const LIVE_BUFFER: usize = 1024;

pub const JOURNAL_FILE: &str = "journal.log";

pub struct Store {
    dir: PathBuf,
    journal: Journal,
    state: State,
    live: HashMap<u32, broadcast::Sender<Post>>,
}

impl Store {
    /// Opens the store in `dir` (created if missing), replays the journal
    /// and rewrites every view file from it.
    pub fn open(dir: &Path, cluster: u32, clusters: u32) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(JOURNAL_FILE);
        let (journal, records) = Journal::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut state = State::new(cluster, clusters);
        for (i, rec) in records.iter().enumerate() {
            let entry = codec::decode_entry(rec, clusters)
                .map_err(|e| Error::Corrupt(format!("{} record {i}: {e}", path.display())))?;
            state.apply(&entry);
        }
        let store = Store { dir: dir.to_path_buf(), journal, state, live: HashMap::new() };
        store.rebuild_views()?;
        tracing::info!(dir = %dir.display(), records = records.len(), users = store.state.users().len(), "store opened");
        Ok(store)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Journals `entry` (fsynced when `durable`), applies it, updates the
    /// files and wakes the timeline streams it concerns.
    pub fn commit(&mut self, entry: &Entry, durable: bool) -> Result<Vec<Effect>> {
        let bytes = codec::encode_entry(entry);
        self.journal.append(&bytes, durable).map_err(|e| Error::io(&self.dir.join(JOURNAL_FILE), e))?;
        let effects = self.state.apply(entry);
        for effect in &effects {
            if let Err(e) = self.write_view(effect) {
                // The journal has the write; the view is rebuilt on restart.
                tracing::error!(error = %e, "updating a view file failed");
            }
            if let Effect::Feed { user, post, .. } = effect
                && let Some(tx) = self.live.get(user)
            {
                let _ = tx.send(post.clone());
            }
        }
        Ok(effects)
    }

    /// The timeline backlog of `user` and a receiver of its later feed
    /// posts, taken together so no post falls between the two.
    pub fn subscribe(&mut self, user: u32) -> (Vec<Post>, broadcast::Receiver<Post>) {
        self.live.retain(|_, tx| tx.receiver_count() > 0);
        let rx = self.live.entry(user).or_insert_with(|| broadcast::channel(LIVE_BUFFER).0).subscribe();
        (self.state.backlog(user), rx)
    }

    fn path(&self, user: u32, suffix: &str) -> PathBuf {
        self.dir.join(format!("{user}_{suffix}.txt"))
    }

    fn write_view(&self, effect: &Effect) -> std::io::Result<()> {
        match effect {
            Effect::Users => replace(&self.dir.join("all_users.txt"), &record::encode_ids(self.state.users())),
            Effect::NewLocalUser(u) => {
                for suffix in ["follow_list", "followers", "timeline", "following"] {
                    fs::OpenOptions::new().create(true).append(true).open(self.path(*u, suffix))?;
                }
                Ok(())
            }
            Effect::FollowList(u) => {
                let ids: Vec<u32> = self.state.following(*u).collect();
                replace(&self.path(*u, "follow_list"), &record::encode_ids(&ids))
            }
            Effect::Followers(u) => {
                let ids: Vec<u32> = self.state.followers(*u).collect();
                replace(&self.path(*u, "followers"), &record::encode_ids(&ids))
            }
            Effect::TimelineAppend { user, post } => append(&self.path(*user, "timeline"), &[post]),
            Effect::Feed { user, post, appended: true } => append(&self.path(*user, "following"), &[post]),
            Effect::Feed { user, appended: false, .. } => {
                replace(&self.path(*user, "following"), &posts_text(self.state.feed(*user)))
            }
            Effect::Reset => self.reset_views().map_err(|e| std::io::Error::other(e.to_string())),
        }
    }

    /// Replaces the whole state with `snapshot` (from the master): the
    /// journal is rewritten to hold just the snapshot, in one atomic rename,
    /// so a crash leaves either the old state or the new one.
    pub fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<()> {
        let path = self.dir.join(JOURNAL_FILE);
        let tmp = self.dir.join(format!(".{JOURNAL_FILE}.tmp"));
        let _ = fs::remove_file(&tmp);
        let entry = Entry::Snapshot(Box::new(snapshot));
        {
            let (mut fresh, _) = Journal::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            fresh.append(&codec::encode_entry(&entry), true).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&self.dir, e))?;
        let (journal, _) = Journal::open(&path).map_err(|e| Error::io(&path, e))?;
        self.journal = journal;
        self.state.apply(&entry);
        self.reset_views()
    }

    /// Removes every view file and writes them anew from the state (files
    /// of users the new state does not have must not linger).
    fn reset_views(&self) -> Result<()> {
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".txt") {
                let _ = fs::remove_file(entry.path());
            }
        }
        self.rebuild_views()
    }

    fn rebuild_views(&self) -> Result<()> {
        let write = |path: PathBuf, text: String| replace(&path, &text).map_err(|e| Error::io(&path, e));
        write(self.dir.join("all_users.txt"), record::encode_ids(self.state.users()))?;
        for &u in self.state.users().iter().filter(|u| self.state.is_local(**u)) {
            let follows: Vec<u32> = self.state.following(u).collect();
            let followers: Vec<u32> = self.state.followers(u).collect();
            write(self.path(u, "follow_list"), record::encode_ids(&follows))?;
            write(self.path(u, "followers"), record::encode_ids(&followers))?;
            write(self.path(u, "timeline"), posts_text(self.state.timeline(u)))?;
            write(self.path(u, "following"), posts_text(self.state.feed(u)))?;
        }
        Ok(())
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

fn append(path: &Path, posts: &[&Post]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path)?;
    // One write per append: concurrent readers never see a partial record
    // followed by another writer's bytes.
    f.write_all(posts_text(posts.iter().copied()).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::state::{Change, LocalOp, RemoteEvent};
    use super::*;

    fn local(store: &mut Store, change: Change) {
        let seq = store.state().next_seq();
        store.commit(&Entry::Local(LocalOp { seq, change }), true).unwrap();
    }

    fn read(dir: &Path, name: &str) -> String {
        fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn an_installed_snapshot_replaces_journal_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
        let mut a = Store::open(&a_dir, 1, 3).unwrap();
        let mut b = Store::open(&b_dir, 1, 3).unwrap();
        local(&mut a, Change::User(1));
        local(&mut a, Change::User(4));
        local(&mut a, Change::Relation { follower: 4, followee: 1, follow: true, at_ms: 0 });
        local(&mut a, Change::Post(Post { user: 1, text: "hi".into(), at_ms: 10, client_id: 3 }));
        // b went its own way (a fenced master's unreplicated write).
        local(&mut b, Change::User(7));
        b.install_snapshot(a.state().snapshot()).unwrap();
        assert_eq!(b.state().snapshot(), a.state().snapshot());
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
        assert_eq!(files(&a_dir), files(&b_dir));
        // The installed state survives a restart, and writes go on after it.
        local(&mut b, Change::Post(Post { user: 1, text: "more".into(), at_ms: 11, client_id: 4 }));
        drop(b);
        let b = Store::open(&b_dir, 1, 3).unwrap();
        assert_eq!(b.state().timeline(1).len(), 2);
        assert!(b.state().has_post_id(1, 3) && b.state().has_post_id(1, 4));
    }

    #[test]
    fn files_follow_the_spec_and_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster_1/1");
        let mut s = Store::open(&dir, 1, 3).unwrap();
        local(&mut s, Change::User(4));
        local(&mut s, Change::User(1));
        s.commit(&Entry::Remote(RemoteEvent { origin: 2, seq: 1, change: Change::User(2) }), true).unwrap();
        local(&mut s, Change::Relation { follower: 4, followee: 1, follow: true, at_ms: 0 });
        local(&mut s, Change::Post(Post { user: 1, text: "p11".into(), at_ms: 1_744_336_636_000, client_id: 0 }));
        let (backlog, mut rx) = s.subscribe(4);
        assert_eq!(backlog.len(), 1);
        local(&mut s, Change::Post(Post { user: 1, text: "p12".into(), at_ms: 1_744_336_637_000, client_id: 0 }));
        assert_eq!(&*rx.try_recv().unwrap().text, "p12");

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
        let s = Store::open(&dir, 1, 3).unwrap();
        let after: Vec<String> = ["all_users.txt", "4_following.txt", "1_timeline.txt", "1_followers.txt"]
            .iter()
            .map(|f| read(&dir, f))
            .collect();
        assert_eq!(before, after);
        assert_eq!(s.state().next_seq(), 6);
    }
}
