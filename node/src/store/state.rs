//! The in-memory state of one server and the rules that change it.
//!
//! Pure: no files, no network, no clock. Every change arrives as an
//! [`Entry`] (a client write accepted by the cluster's master, an event from
//! another cluster, or an outbox mark) and [`State::apply`] returns the
//! [`Effect`]s the file views and live timeline streams must reflect. Master
//! and slave apply the same local entries in the same order and the same
//! remote events in any order, and end in the same state: that is what
//! keeps their files identical.

use crate::ids::cluster_of;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// How many posts a timeline shows on entry (SPEC §3).
pub const BACKLOG: usize = 20;
/// Client post ids remembered per user to refuse a resent post. A client
/// resends only the few posts in flight when its server died.
pub const RECENT_POST_IDS: usize = 1024;
/// Request ids of Login / Follow / UnFollow remembered per user. A client
/// retries one command at a time, so a handful covers every retry; more
/// covers several clients of one user.
pub const RECENT_REQUEST_IDS: usize = 64;

/// A post as it lives in memory; the text is shared by every feed holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    pub user: u32,
    pub text: Arc<str>,
    pub at_ms: i64,
    /// The client's id for the post (0 = none): a resent post is ignored.
    pub client_id: u64,
}

impl Post {
    /// Feed order: by time, then author, then text, so that every replica
    /// orders a feed the same way whatever order the posts arrived in.
    fn key(&self) -> (i64, u32, &str) {
        (self.at_ms, self.user, &self.text)
    }
}

/// A change to the social graph or the posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user logged in for the first time.
    User(u32),
    Relation {
        follower: u32,
        followee: u32,
        follow: bool,
        at_ms: i64,
    },
    Post(Post),
}

impl Change {
    /// The user whose request made this change.
    pub fn requester(&self) -> Option<u32> {
        match self {
            Change::User(u) => Some(*u),
            Change::Relation { follower, .. } => Some(*follower),
            Change::Post(p) => Some(p.user),
        }
    }
}

/// A client write accepted by this cluster's master; `seq` is dense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOp {
    pub seq: u64,
    pub change: Change,
    /// The client's id for a Login / Follow / UnFollow (0 = none): a
    /// retried request is answered without being applied again.
    pub request_id: u64,
}

impl LocalOp {
    pub fn new(seq: u64, change: Change) -> LocalOp {
        LocalOp { seq, change, request_id: 0 }
    }
}

/// An event of cluster `origin`, as published between clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEvent {
    pub origin: u32,
    pub seq: u64,
    pub change: Change,
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Local(LocalOp),
    Remote(RemoteEvent),
    /// Outbox events up to this seq are confirmed by the broker.
    PublishedUpto(u64),
    /// The whole state, installed from the master.
    Snapshot(Box<Snapshot>),
}

/// A server's whole state, as a rejoining slave installs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub users: Vec<u32>,
    pub local_users: Vec<UserSnapshot>,
    pub next_seq: u64,
    pub published_upto: u64,
    pub outbox: Vec<RemoteEvent>,
    pub applied: Vec<(u32, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserSnapshot {
    pub user: u32,
    pub following: Vec<(u32, i64)>,
    pub followers: Vec<u32>,
    pub timeline: Vec<Post>,
    pub feed: Vec<Post>,
    pub recent_post_ids: Vec<u64>,
    pub recent_request_ids: Vec<u64>,
}

/// What an applied entry changed, for the file views and the live streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `all_users.txt` changed.
    Users,
    /// A user of this cluster appeared: create its (empty) files.
    NewLocalUser(u32),
    FollowList(u32),
    Followers(u32),
    TimelineAppend {
        user: u32,
        post: Post,
    },
    /// `post` entered `user`'s feed at index `at` (the feed's length
    /// before, when it sorts last).
    Feed {
        user: u32,
        post: Post,
        at: usize,
    },
    /// Everything was replaced (a snapshot was installed).
    Reset,
}

/// The outcome of a command, in the course's status words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    AlreadyExists,
    NotExists,
    InvalidUsername,
    NotAFollower,
    Invalid,
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "SUCCESS",
            Outcome::AlreadyExists => "FAILURE_ALREADY_EXISTS",
            Outcome::NotExists => "FAILURE_NOT_EXISTS",
            Outcome::InvalidUsername => "FAILURE_INVALID_USERNAME",
            Outcome::NotAFollower => "FAILURE_NOT_A_FOLLOWER",
            Outcome::Invalid => "FAILURE_INVALID",
            Outcome::Unknown => "FAILURE_UNKNOWN",
        }
    }
}

#[derive(Debug, Clone)]
pub struct State {
    cluster: u32,
    clusters: u32,
    users: BTreeSet<u32>,
    /// user (of this cluster) -> followee -> follow start (ms).
    following: HashMap<u32, BTreeMap<u32, i64>>,
    /// user of this cluster -> all its followers, from every cluster.
    followers: HashMap<u32, BTreeSet<u32>>,
    /// author of any cluster -> the users of this cluster who follow it:
    /// the fan-out index for local and remote posts alike.
    local_followers: HashMap<u32, BTreeSet<u32>>,
    timelines: HashMap<u32, Vec<Post>>,
    feeds: HashMap<u32, Vec<Post>>,
    next_seq: u64,
    published_upto: u64,
    /// Local events not yet confirmed by the broker, by seq.
    outbox: BTreeMap<u64, RemoteEvent>,
    /// origin cluster -> highest event seq applied from it.
    applied: HashMap<u32, u64>,
    /// user -> the client ids of its latest posts, oldest first.
    recent_ids: HashMap<u32, VecDeque<u64>>,
    /// user -> the request ids of its latest other writes, oldest first.
    recent_requests: HashMap<u32, VecDeque<u64>>,
}

impl State {
    pub fn new(cluster: u32, clusters: u32) -> Self {
        State {
            cluster,
            clusters,
            users: BTreeSet::new(),
            following: HashMap::new(),
            followers: HashMap::new(),
            local_followers: HashMap::new(),
            timelines: HashMap::new(),
            feeds: HashMap::new(),
            next_seq: 1,
            published_upto: 0,
            outbox: BTreeMap::new(),
            applied: HashMap::new(),
            recent_ids: HashMap::new(),
            recent_requests: HashMap::new(),
        }
    }

    /// Whether `user` already posted with client id `id` (recently).
    pub fn has_post_id(&self, user: u32, id: u64) -> bool {
        id != 0 && self.recent_ids.get(&user).is_some_and(|ids| ids.contains(&id))
    }

    /// Whether `user` already made a write with request id `id` (recently).
    pub fn has_request_id(&self, user: u32, id: u64) -> bool {
        id != 0 && self.recent_requests.get(&user).is_some_and(|ids| ids.contains(&id))
    }

    /// The whole state, for a rejoining slave.
    pub fn snapshot(&self) -> Snapshot {
        let mut local: BTreeSet<u32> = self.users.iter().copied().filter(|u| self.is_local(*u)).collect();
        local.extend(
            self.following
                .keys()
                .chain(self.timelines.keys())
                .chain(self.feeds.keys())
                .chain(self.recent_requests.keys()),
        );
        Snapshot {
            users: self.users.iter().copied().collect(),
            local_users: local
                .into_iter()
                .map(|u| UserSnapshot {
                    user: u,
                    following: self
                        .following
                        .get(&u)
                        .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
                        .unwrap_or_default(),
                    followers: self.followers(u).collect(),
                    timeline: self.timeline(u).to_vec(),
                    feed: self.feed(u).to_vec(),
                    recent_post_ids: self.recent_ids.get(&u).map(|d| d.iter().copied().collect()).unwrap_or_default(),
                    recent_request_ids: self
                        .recent_requests
                        .get(&u)
                        .map(|d| d.iter().copied().collect())
                        .unwrap_or_default(),
                })
                .collect(),
            next_seq: self.next_seq,
            published_upto: self.published_upto,
            outbox: self.outbox.values().cloned().collect(),
            applied: self.applied.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// Replaces everything with `snap`.
    fn install(&mut self, snap: &Snapshot) {
        let mut fresh = State::new(self.cluster, self.clusters);
        fresh.users = snap.users.iter().copied().collect();
        for u in &snap.local_users {
            if !u.following.is_empty() {
                fresh.following.insert(u.user, u.following.iter().copied().collect());
                for (followee, _) in &u.following {
                    fresh.local_followers.entry(*followee).or_default().insert(u.user);
                }
            }
            if !u.followers.is_empty() {
                fresh.followers.insert(u.user, u.followers.iter().copied().collect());
            }
            if !u.timeline.is_empty() {
                fresh.timelines.insert(u.user, u.timeline.clone());
            }
            if !u.feed.is_empty() {
                fresh.feeds.insert(u.user, u.feed.clone());
            }
            if !u.recent_post_ids.is_empty() {
                fresh.recent_ids.insert(u.user, u.recent_post_ids.iter().copied().collect());
            }
            if !u.recent_request_ids.is_empty() {
                fresh.recent_requests.insert(u.user, u.recent_request_ids.iter().copied().collect());
            }
        }
        fresh.next_seq = snap.next_seq.max(1);
        fresh.published_upto = snap.published_upto;
        fresh.outbox = snap.outbox.iter().map(|e| (e.seq, e.clone())).collect();
        fresh.applied = snap.applied.iter().copied().collect();
        *self = fresh;
    }

    pub fn cluster(&self) -> u32 {
        self.cluster
    }

    pub fn is_local(&self, user: u32) -> bool {
        cluster_of(user, self.clusters) == self.cluster
    }

    pub fn users(&self) -> &BTreeSet<u32> {
        &self.users
    }

    pub fn has_user(&self, user: u32) -> bool {
        self.users.contains(&user)
    }

    pub fn following(&self, user: u32) -> impl Iterator<Item = u32> + '_ {
        self.following.get(&user).into_iter().flat_map(|m| m.keys().copied())
    }

    pub fn followers(&self, user: u32) -> impl Iterator<Item = u32> + '_ {
        self.followers.get(&user).into_iter().flat_map(|s| s.iter().copied())
    }

    pub fn timeline(&self, user: u32) -> &[Post] {
        self.timelines.get(&user).map_or(&[], Vec::as_slice)
    }

    pub fn feed(&self, user: u32) -> &[Post] {
        self.feeds.get(&user).map_or(&[], Vec::as_slice)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn published_upto(&self) -> u64 {
        self.published_upto
    }

    pub fn post_count(&self) -> u64 {
        self.timelines.values().map(|t| t.len() as u64).sum()
    }

    /// Unpublished outbox events with seq greater than `after`, in order.
    pub fn outbox_after(&self, after: u64) -> impl Iterator<Item = &RemoteEvent> {
        self.outbox.range(after + 1..).map(|(_, e)| e)
    }

    /// Whether `event` would change anything (false for a redelivery, an
    /// event of our own cluster, or one that is not ours to apply).
    pub fn is_new_remote(&self, event: &RemoteEvent) -> bool {
        event.origin != self.cluster && event.seq > self.applied.get(&event.origin).copied().unwrap_or(0)
    }

    /// Checks a FOLLOW of `target` by `user` (a known local user).
    pub fn check_follow(&self, user: u32, target: u32) -> Outcome {
        if !self.users.contains(&user) {
            Outcome::NotExists
        } else if target == user {
            Outcome::AlreadyExists
        } else if !self.users.contains(&target) {
            Outcome::InvalidUsername
        } else if self.following.get(&user).is_some_and(|m| m.contains_key(&target)) {
            Outcome::AlreadyExists
        } else {
            Outcome::Success
        }
    }

    /// Checks an UNFOLLOW of `target` by `user`.
    pub fn check_unfollow(&self, user: u32, target: u32) -> Outcome {
        if !self.users.contains(&user) {
            Outcome::NotExists
        } else if target == user || !self.users.contains(&target) {
            Outcome::InvalidUsername
        } else if !self.following.get(&user).is_some_and(|m| m.contains_key(&target)) {
            Outcome::NotAFollower
        } else {
            Outcome::Success
        }
    }

    /// What a timeline shows on entry: up to [`BACKLOG`] most recent posts of
    /// users `user` follows now, made after the follow began, oldest first.
    pub fn backlog(&self, user: u32) -> Vec<Post> {
        let follows = self.following.get(&user);
        let visible =
            |p: &&Post| p.user != user && follows.and_then(|m| m.get(&p.user)).is_some_and(|since| p.at_ms >= *since);
        let mut posts: Vec<Post> = self.feed(user).iter().rev().filter(visible).take(BACKLOG).cloned().collect();
        posts.reverse();
        posts
    }

    /// Applies one journal entry. Applying a remote event twice, or an entry
    /// that changes nothing, yields no effects.
    pub fn apply(&mut self, entry: &Entry) -> Vec<Effect> {
        let mut effects = Vec::new();
        match entry {
            Entry::Local(op) => {
                self.next_seq = self.next_seq.max(op.seq + 1);
                if op.request_id != 0
                    && let Some(user) = op.change.requester()
                {
                    let ids = self.recent_requests.entry(user).or_default();
                    if ids.len() == RECENT_REQUEST_IDS {
                        ids.pop_front();
                    }
                    ids.push_back(op.request_id);
                }
                self.apply_change(&op.change, true, &mut effects);
                if let Some(event) = self.publishable(op) {
                    self.outbox.insert(op.seq, event);
                }
            }
            Entry::Remote(event) => {
                if !self.is_new_remote(event) {
                    return effects;
                }
                self.applied.insert(event.origin, event.seq);
                self.apply_change(&event.change, false, &mut effects);
            }
            Entry::PublishedUpto(upto) => {
                if *upto > self.published_upto {
                    self.published_upto = *upto;
                    self.outbox = self.outbox.split_off(&(upto + 1));
                }
            }
            Entry::Snapshot(snap) => {
                self.install(snap);
                effects.push(Effect::Reset);
            }
        }
        effects
    }

    /// The event other clusters need for a local op, if any: users and posts
    /// go everywhere (each cluster knows its own followers best, so the
    /// receiver picks the feeds), relations only when the followee is remote.
    fn publishable(&self, op: &LocalOp) -> Option<RemoteEvent> {
        let wanted = match &op.change {
            Change::User(_) | Change::Post(_) => true,
            Change::Relation { followee, .. } => !self.is_local(*followee),
        };
        wanted.then(|| RemoteEvent { origin: self.cluster, seq: op.seq, change: op.change.clone() })
    }

    fn apply_change(&mut self, change: &Change, local: bool, effects: &mut Vec<Effect>) {
        match change {
            Change::User(user) => {
                if self.users.insert(*user) {
                    effects.push(Effect::Users);
                    if self.is_local(*user) {
                        effects.push(Effect::NewLocalUser(*user));
                    }
                }
            }
            Change::Relation { follower, followee, follow, at_ms } => {
                let (follower, followee) = (*follower, *followee);
                // A local op records the follower's side; the followee's side
                // is recorded wherever the followee lives (here, or through
                // the followee's cluster applying the published relation).
                if local {
                    let list = self.following.entry(follower).or_default();
                    let changed = if *follow {
                        list.insert(followee, *at_ms).is_none()
                    } else {
                        list.remove(&followee).is_some()
                    };
                    if changed {
                        effects.push(Effect::FollowList(follower));
                    }
                    let index = self.local_followers.entry(followee).or_default();
                    if *follow {
                        index.insert(follower);
                    } else {
                        index.remove(&follower);
                    }
                }
                if self.is_local(followee) {
                    let set = self.followers.entry(followee).or_default();
                    let changed = if *follow { set.insert(follower) } else { set.remove(&follower) };
                    if changed {
                        effects.push(Effect::Followers(followee));
                    }
                }
            }
            Change::Post(post) => {
                if local {
                    if post.client_id != 0 {
                        let ids = self.recent_ids.entry(post.user).or_default();
                        if ids.len() == RECENT_POST_IDS {
                            ids.pop_front();
                        }
                        ids.push_back(post.client_id);
                    }
                    self.timelines.entry(post.user).or_default().push(post.clone());
                    effects.push(Effect::TimelineAppend { user: post.user, post: post.clone() });
                }
                let Some(readers) = self.local_followers.get(&post.user) else {
                    return;
                };
                for reader in readers {
                    let since = self.following.get(reader).and_then(|m| m.get(&post.user));
                    if *reader == post.user || since.is_none_or(|s| post.at_ms < *s) {
                        continue;
                    }
                    let feed = self.feeds.entry(*reader).or_default();
                    let at = feed.partition_point(|p| p.key() <= post.key());
                    feed.insert(at, post.clone());
                    effects.push(Effect::Feed { user: *reader, post: post.clone(), at });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(user: u32, text: &str, at_ms: i64) -> Change {
        Change::Post(Post { user, text: text.into(), at_ms, client_id: 0 })
    }

    fn rel(follower: u32, followee: u32, follow: bool, at_ms: i64) -> Change {
        Change::Relation { follower, followee, follow, at_ms }
    }

    /// A cluster-1 state (of 3) that applies local ops with dense seqs.
    struct Node {
        state: State,
    }

    impl Node {
        fn new(cluster: u32) -> Self {
            Node { state: State::new(cluster, 3) }
        }
        fn local(&mut self, change: Change) -> Vec<Effect> {
            let seq = self.state.next_seq();
            self.state.apply(&Entry::Local(LocalOp::new(seq, change)))
        }
        fn remote(&mut self, origin: u32, seq: u64, change: Change) -> Vec<Effect> {
            self.state.apply(&Entry::Remote(RemoteEvent { origin, seq, change }))
        }
    }

    #[test]
    fn follow_rules_match_the_course() {
        let mut n = Node::new(1);
        n.local(Change::User(1));
        n.local(Change::User(4));
        let s = &n.state;
        assert_eq!(s.check_follow(1, 4), Outcome::Success);
        assert_eq!(s.check_follow(1, 1), Outcome::AlreadyExists);
        assert_eq!(s.check_follow(1, 7), Outcome::InvalidUsername);
        assert_eq!(s.check_follow(9, 4), Outcome::NotExists);
        assert_eq!(s.check_unfollow(1, 4), Outcome::NotAFollower);
        assert_eq!(s.check_unfollow(1, 1), Outcome::InvalidUsername);
        assert_eq!(s.check_unfollow(1, 7), Outcome::InvalidUsername);
        n.local(rel(1, 4, true, 10));
        assert_eq!(n.state.check_follow(1, 4), Outcome::AlreadyExists);
        assert_eq!(n.state.check_unfollow(1, 4), Outcome::Success);
        assert_eq!(n.state.followers(4).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn local_posts_reach_local_followers_after_the_follow_only() {
        let mut n = Node::new(1);
        for u in [1, 4, 7] {
            n.local(Change::User(u));
        }
        n.local(post(1, "before", 5));
        n.local(rel(4, 1, true, 10));
        n.local(rel(1, 1, true, 10)); // never shows own posts
        let fx = n.local(post(1, "p11", 20));
        assert!(fx.contains(&Effect::Feed {
            user: 4,
            post: Post { user: 1, text: "p11".into(), at_ms: 20, client_id: 0 },
            at: 0
        }));
        assert_eq!(n.state.backlog(4).iter().map(|p| &*p.text).collect::<Vec<_>>(), vec!["p11"]);
        assert!(n.state.backlog(7).is_empty());
        assert!(n.state.backlog(1).is_empty());
        assert_eq!(n.state.timeline(1).len(), 2);
    }

    #[test]
    fn backlog_is_the_last_twenty_oldest_first() {
        let mut n = Node::new(1);
        n.local(Change::User(1));
        n.local(Change::User(4));
        n.local(rel(4, 1, true, 0));
        for i in 0..30 {
            n.local(post(1, &format!("p{i}"), 100 + i));
        }
        let b = n.state.backlog(4);
        assert_eq!(b.len(), BACKLOG);
        assert_eq!(&*b[0].text, "p10");
        assert_eq!(&*b[19].text, "p29");
        n.local(rel(4, 1, false, 200));
        assert!(n.state.backlog(4).is_empty(), "unfollowed authors disappear");
    }

    #[test]
    fn remote_events_apply_once() {
        let mut n = Node::new(2);
        n.local(Change::User(2));
        assert_eq!(n.remote(1, 1, Change::User(1)), vec![Effect::Users]);
        assert!(n.remote(1, 1, Change::User(1)).is_empty(), "redelivery changes nothing");
        n.local(rel(2, 1, true, 50));
        // A remote post from before the follow is not shown; after it is.
        assert!(n.remote(1, 2, post(1, "old", 40)).is_empty());
        assert_eq!(n.remote(1, 3, post(1, "new", 60)).len(), 1);
        assert!(n.remote(1, 3, post(1, "new", 60)).is_empty());
        assert!(n.remote(1, 2, post(1, "late duplicate", 70)).is_empty());
        assert_eq!(n.state.feed(2).len(), 1);
        // Own-cluster events are never applied from the broker.
        assert!(n.remote(2, 99, Change::User(5)).is_empty());
    }

    #[test]
    fn remote_relations_update_followers_of_local_users() {
        let mut n = Node::new(2);
        n.local(Change::User(2));
        assert_eq!(n.remote(1, 1, rel(1, 2, true, 5)), vec![Effect::Followers(2)]);
        assert_eq!(n.state.followers(2).collect::<Vec<_>>(), vec![1]);
        assert_eq!(n.remote(1, 2, rel(1, 2, false, 6)), vec![Effect::Followers(2)]);
        assert_eq!(n.state.followers(2).count(), 0);
    }

    #[test]
    fn feeds_are_ordered_the_same_whatever_the_arrival_order() {
        let mut a = Node::new(3);
        let mut b = Node::new(3);
        for n in [&mut a, &mut b] {
            n.local(Change::User(3));
            n.local(rel(3, 1, true, 0));
            n.local(rel(3, 2, true, 0));
        }
        a.remote(1, 1, post(1, "x", 30));
        a.remote(2, 1, post(2, "y", 20));
        b.remote(2, 1, post(2, "y", 20));
        b.remote(1, 1, post(1, "x", 30));
        assert_eq!(a.state.feed(3), b.state.feed(3));
        assert_eq!(&*a.state.feed(3)[0].text, "y");
    }

    #[test]
    fn a_snapshot_reproduces_the_state_exactly() {
        let mut n = Node::new(1);
        for u in [1, 4] {
            n.local(Change::User(u));
        }
        n.remote(2, 1, Change::User(2));
        n.local(rel(4, 1, true, 1));
        n.local(rel(1, 2, true, 1));
        n.remote(2, 2, rel(2, 1, true, 1));
        n.local(Change::Post(Post { user: 1, text: "a".into(), at_ms: 5, client_id: 77 }));
        n.remote(2, 3, post(2, "b", 6));
        n.state.apply(&Entry::PublishedUpto(2));
        let snap = n.state.snapshot();
        let mut other = Node::new(1);
        other.local(Change::User(9)); // whatever was there is replaced
        assert_eq!(other.state.apply(&Entry::Snapshot(Box::new(snap.clone()))), vec![Effect::Reset]);
        assert_eq!(other.state.snapshot(), snap);
        assert!(other.state.has_post_id(1, 77));
        assert!(!other.state.has_user(9));
        assert_eq!(other.state.feed(1).len(), 1);
        assert_eq!(other.state.backlog(4).len(), 1);
        assert_eq!(other.state.next_seq(), n.state.next_seq());
        assert!(!other.state.is_new_remote(&RemoteEvent { origin: 2, seq: 3, change: Change::User(2) }));
        // Both go on identically.
        let a = n.local(post(1, "c", 9));
        let b = other.local(post(1, "c", 9));
        assert_eq!(a, b);
        assert_eq!(n.state.snapshot(), other.state.snapshot());
    }

    #[test]
    fn post_ids_are_remembered_for_dedup() {
        let mut n = Node::new(1);
        n.local(Change::User(1));
        assert!(!n.state.has_post_id(1, 5));
        n.local(Change::Post(Post { user: 1, text: "x".into(), at_ms: 1, client_id: 5 }));
        assert!(n.state.has_post_id(1, 5));
        assert!(!n.state.has_post_id(1, 0), "id 0 means none");
        for i in 0..RECENT_POST_IDS as u64 {
            n.local(Change::Post(Post { user: 1, text: "y".into(), at_ms: 2, client_id: 100 + i }));
        }
        assert!(!n.state.has_post_id(1, 5), "only the latest ids are kept");
    }

    #[test]
    fn outbox_holds_what_other_clusters_need_until_published() {
        let mut n = Node::new(1);
        n.local(Change::User(1)); // seq 1: published
        n.local(Change::User(4)); // seq 2
        n.local(rel(1, 4, true, 1)); // seq 3: same cluster, not published
        n.local(rel(1, 2, true, 1)); // seq 4: followee in cluster 2
        n.local(post(1, "hi", 2)); // seq 5
        let seqs: Vec<u64> = n.state.outbox_after(0).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 4, 5]);
        n.state.apply(&Entry::PublishedUpto(4));
        let seqs: Vec<u64> = n.state.outbox_after(0).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![5]);
        assert_eq!(n.state.published_upto(), 4);
    }
}
