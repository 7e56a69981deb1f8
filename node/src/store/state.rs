//! The in-memory state of one server and the rules that change it.
//!
//! Pure: no files, no network, no clock. Every change arrives as an
//! [`Entry`] (a client write accepted by the cluster's master, an event from
//! another cluster, or an outbox mark) and [`State::apply`] returns the
//! [`Effect`]s the file views and live timeline streams must reflect. The
//! master journals entries in one order and its slave applies the same
//! entries in the same order, so both end in the same state and write the
//! same files.
//!
//! **Visibility follows the log, never clocks.** A follow is identified by
//! the sequence number of the follow op in the follower's cluster (its
//! [`FollowId`]). A post enters a follower's feed if and only if the follow
//! took effect before the post: for a follower in the author's cluster,
//! the follow was applied there first; for one in another cluster, the
//! follow had reached the author's cluster first. The author's cluster
//! decides: a post carries, for each other cluster, the followers there it
//! is for and the follow each saw it under, and the receiving cluster puts
//! it in a feed only if that follow is still the follower's current one.
//! The post's timestamp is the displayed time only.
//!
//! **Events between clusters are numbered per stream.** What origin `o`
//! sends to cluster `d` is numbered 1, 2, 3, … (`dest_seq`, within an
//! `epoch` that an operator's override of `o` starts anew). A receiver
//! applies `o`'s event n only after n-1; a later one waits in `held` (part
//! of the state, so journaled and replicated) until the gap closes; a
//! duplicate changes nothing. Posts go only to the clusters with followers
//! of the author.

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
/// How far past the next expected event of a stream an event may be and
/// still be held for the gap to close: a republication after a failover
/// re-sends at most the unconfirmed window of the publisher (8192 events),
/// so a jump beyond this is not a late event but a forged or broken one.
pub const HOLD_WINDOW: u64 = 1 << 16;
/// Events held per origin at most (the rest is refused).
pub const HOLD_MAX: usize = 4096;
/// Broker-confirmed outbox events kept, at most, for destinations whose
/// receipts do not cover them yet (see [`Entry::Receipt`]): what a
/// destination can still get again if the broker loses messages after
/// confirming them. Beyond this the oldest go (the broker still holds
/// them); receipts every second keep far fewer than this in use.
pub const RETAIN_MAX: usize = 32_768;

/// Identifies a follow: the seq of the follow op in the follower's cluster.
pub type FollowId = u64;

/// A post as it lives in memory; the text is shared by every feed holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    pub user: u32,
    pub text: Arc<str>,
    /// The displayed post time (ms); it decides nothing.
    pub at_ms: i64,
    /// The client's id for the post (0 = none): a resent post is ignored.
    pub client_id: u64,
}

/// A post in a feed, with the follow it arrived under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    pub post: Post,
    pub follow: FollowId,
    /// A digest of the feed up to and with this post (see [`feed_anchor`]):
    /// a resuming reader's `feedAnchor`, compared with it, tells whether
    /// this feed has the history the reader's position was counted in.
    pub anchor: u64,
}

impl FeedItem {
    /// The item after one whose anchor is `before` (0: the first).
    pub fn after(before: u64, post: Post, follow: FollowId) -> FeedItem {
        let anchor = feed_anchor(before, &post);
        FeedItem { post, follow, anchor }
    }
}

/// Builds a feed's items in order, each anchored on the one before.
pub fn feed_items(items: impl IntoIterator<Item = (Post, FollowId)>) -> Vec<FeedItem> {
    let mut before = 0;
    items
        .into_iter()
        .map(|(post, follow)| {
            let item = FeedItem::after(before, post, follow);
            before = item.anchor;
            item
        })
        .collect()
}

/// The anchor of feed position 0, before any post: what a stream opened
/// on an empty feed says its live posts continue after, so a reader that
/// gets none before a break can still resume from the feed's start (an
/// opening with position 0 and no anchor means "no position": it gets the
/// backlog, the last 20 posts).
pub const EMPTY_FEED_ANCHOR: u64 = 1;

/// The anchor of a feed whose previous post's anchor is `before` (0 for
/// the first post) once `post` is added: 64-bit FNV-1a over the previous
/// anchor and what a reader is shown of the post (author, time, text), so
/// two feeds share an anchor at a position only when they hold the same
/// posts up to it (but for a 2^-64 chance). Fixed here, never a hasher of
/// the standard library's: master and slave, and servers of different
/// builds, must compute the same value. Never 0 (0 means none).
pub fn feed_anchor(before: u64, post: &Post) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = post.text.as_bytes();
    for chunk in [
        &before.to_le_bytes()[..],
        &post.user.to_le_bytes(),
        &post.at_ms.to_le_bytes(),
        &(text.len() as u64).to_le_bytes(),
        text,
    ] {
        for b in chunk {
            h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
        }
    }
    h.max(1)
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
        /// When the client asked (display and logs only).
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

/// An event of cluster `origin` for this cluster, as it arrives here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEvent {
    pub origin: u32,
    /// The op's seq in its origin (a relation's [`FollowId`]).
    pub seq: u64,
    /// The origin's stream epoch (0 for events of earlier versions).
    pub epoch: u64,
    /// Position in the origin → this cluster stream (0: an event of an
    /// earlier version, applied as it comes).
    pub dest_seq: u64,
    pub change: Change,
    /// For a post: the followers here it is for, with the follow each was
    /// seen under in the origin.
    pub recipients: Vec<(u32, FollowId)>,
}

/// What one destination cluster gets of an outbox event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub dest: u32,
    pub dest_seq: u64,
    pub recipients: Vec<(u32, FollowId)>,
}

/// A local op other clusters need, waiting for the broker's confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEvent {
    pub seq: u64,
    pub epoch: u64,
    pub change: Change,
    pub deliveries: Vec<Delivery>,
}

impl OutEvent {
    /// The event as `delivery`'s destination receives it.
    pub fn for_delivery(&self, origin: u32, d: &Delivery) -> RemoteEvent {
        RemoteEvent {
            origin,
            seq: self.seq,
            epoch: self.epoch,
            dest_seq: d.dest_seq,
            change: self.change.clone(),
            recipients: d.recipients.clone(),
        }
    }
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Local(LocalOp),
    Remote(RemoteEvent),
    /// Outbox events up to this seq are confirmed by the broker.
    PublishedUpto(u64),
    /// Cluster `dest` applied this cluster's stream to it up to `applied`
    /// in `epoch`: confirmed outbox events it covers need not be kept.
    Receipt {
        dest: u32,
        epoch: u64,
        applied: u64,
    },
    /// Events up to `upto` in `epoch` of `origin`'s stream to this cluster
    /// are gone for good (its origin no longer keeps them): count them as
    /// applied, and go on after them.
    Gap {
        origin: u32,
        epoch: u64,
        upto: u64,
    },
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
    pub outbox: Vec<OutEvent>,
    /// origin -> (epoch, last dest_seq applied).
    pub applied: Vec<(u32, u64, u64)>,
    pub held: Vec<RemoteEvent>,
    pub epoch: u64,
    /// destination -> last dest_seq assigned (this epoch).
    pub sent: Vec<(u32, u64)>,
    /// destination -> (epoch, last dest_seq it applied), per its receipts.
    pub receipts: Vec<(u32, u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserSnapshot {
    pub user: u32,
    pub following: Vec<(u32, FollowId)>,
    pub followers: Vec<(u32, FollowId)>,
    pub timeline: Vec<Post>,
    pub feed: Vec<FeedItem>,
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
    /// A post was appended to `user`'s own timeline.
    TimelineAppend(u32),
    /// A post was appended to `user`'s feed, at index `at` of it (the
    /// state holds it: [`State::feed`]).
    Feed {
        user: u32,
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
            Outcome::Success => sns_proto::rules::SUCCESS,
            Outcome::AlreadyExists => sns_proto::rules::FAILURE_ALREADY_EXISTS,
            Outcome::NotExists => sns_proto::rules::FAILURE_NOT_EXISTS,
            Outcome::InvalidUsername => sns_proto::rules::FAILURE_INVALID_USERNAME,
            Outcome::NotAFollower => sns_proto::rules::FAILURE_NOT_A_FOLLOWER,
            Outcome::Invalid => sns_proto::rules::FAILURE_INVALID,
            Outcome::Unknown => sns_proto::rules::FAILURE_UNKNOWN,
        }
    }
}

/// Where a group of arriving events being decided has taken each origin's
/// stream so far (see [`State::arrival_in`]).
#[derive(Debug, Default)]
pub struct Group {
    /// origin -> (epoch, last dest_seq) the group's events reach.
    reached: HashMap<u32, (u64, u64)>,
    /// origin -> held events the group's events let through.
    drained: HashMap<u32, usize>,
    /// origin -> (epoch, dest_seq) of the group's events that wait for a gap.
    early: HashMap<u32, BTreeSet<(u64, u64)>>,
}

/// What a receiver makes of an arriving event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// The next of its stream: apply.
    Next,
    /// Later than the next: hold until the gap closes.
    Early,
    /// Already applied (or held): ignore.
    Duplicate,
    /// Cannot be valid: refuse (dead-letter), never apply.
    Invalid(String),
    /// Later than the next, with [`HOLD_MAX`] events of its stream held
    /// already: not taken now. Its origin keeps it until a receipt covers
    /// it and sends it again, so it is neither held nor dead-lettered.
    Full,
}

#[derive(Debug, Clone)]
pub struct State {
    cluster: u32,
    clusters: u32,
    users: BTreeSet<u32>,
    /// user (of this cluster) -> followee -> the follow.
    following: HashMap<u32, BTreeMap<u32, FollowId>>,
    /// user of this cluster -> each follower (any cluster) -> the follow.
    followers: HashMap<u32, BTreeMap<u32, FollowId>>,
    timelines: HashMap<u32, Vec<Post>>,
    feeds: HashMap<u32, Vec<FeedItem>>,
    next_seq: u64,
    published_upto: u64,
    /// Local events other clusters need, by seq: those not yet confirmed
    /// by the broker (seq > `published_upto`), and confirmed ones not yet
    /// covered by every destination's receipt (at most [`RETAIN_MAX`]).
    outbox: BTreeMap<u64, OutEvent>,
    /// destination -> (epoch, last dest_seq applied there), per receipts.
    receipts: BTreeMap<u32, (u64, u64)>,
    /// This cluster's outbound stream epoch.
    epoch: u64,
    /// destination -> last dest_seq assigned in `epoch`.
    sent: BTreeMap<u32, u64>,
    /// origin -> (epoch, last dest_seq applied).
    applied: HashMap<u32, (u64, u64)>,
    /// origin -> (epoch, dest_seq) -> event waiting for a gap to close.
    held: BTreeMap<u32, BTreeMap<(u64, u64), RemoteEvent>>,
    /// user -> the client ids of its latest posts, oldest first.
    recent_ids: HashMap<u32, VecDeque<u64>>,
    /// user -> the request ids of its latest other writes, oldest first.
    recent_requests: HashMap<u32, VecDeque<u64>>,
}

fn push_bounded(ids: &mut VecDeque<u64>, id: u64, max: usize) {
    if ids.len() == max {
        ids.pop_front();
    }
    ids.push_back(id);
}

impl State {
    pub fn new(cluster: u32, clusters: u32) -> Self {
        State {
            cluster,
            clusters,
            users: BTreeSet::new(),
            following: HashMap::new(),
            followers: HashMap::new(),
            timelines: HashMap::new(),
            feeds: HashMap::new(),
            next_seq: 1,
            published_upto: 0,
            outbox: BTreeMap::new(),
            receipts: BTreeMap::new(),
            epoch: 1,
            sent: BTreeMap::new(),
            applied: HashMap::new(),
            held: BTreeMap::new(),
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
                .chain(self.followers.keys())
                .chain(self.timelines.keys())
                .chain(self.feeds.keys())
                .chain(self.recent_requests.keys()),
        );
        let pairs = |m: Option<&BTreeMap<u32, FollowId>>| -> Vec<(u32, FollowId)> {
            m.map(|m| m.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
        };
        let ids = |m: &HashMap<u32, VecDeque<u64>>, u: u32| {
            m.get(&u).map(|d| d.iter().copied().collect()).unwrap_or_default()
        };
        Snapshot {
            users: self.users.iter().copied().collect(),
            local_users: local
                .into_iter()
                .map(|u| UserSnapshot {
                    user: u,
                    following: pairs(self.following.get(&u)),
                    followers: pairs(self.followers.get(&u)),
                    timeline: self.timeline(u).to_vec(),
                    feed: self.feed(u).to_vec(),
                    recent_post_ids: ids(&self.recent_ids, u),
                    recent_request_ids: ids(&self.recent_requests, u),
                })
                .collect(),
            next_seq: self.next_seq,
            published_upto: self.published_upto,
            outbox: self.outbox.values().cloned().collect(),
            applied: self.applied.iter().map(|(o, (e, s))| (*o, *e, *s)).collect::<BTreeSet<_>>().into_iter().collect(),
            held: self.held.values().flat_map(|h| h.values().cloned()).collect(),
            epoch: self.epoch,
            sent: self.sent.iter().map(|(d, s)| (*d, *s)).collect(),
            receipts: self.receipt_marks(),
        }
    }

    /// Replaces everything with `snap`.
    fn install(&mut self, snap: &Snapshot) {
        let mut fresh = State::new(self.cluster, self.clusters);
        fresh.users = snap.users.iter().copied().collect();
        for u in &snap.local_users {
            if !u.following.is_empty() {
                fresh.following.insert(u.user, u.following.iter().copied().collect());
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
        fresh.applied = snap.applied.iter().map(|(o, e, s)| (*o, (*e, *s))).collect();
        for ev in &snap.held {
            fresh.hold(ev.clone());
        }
        fresh.epoch = snap.epoch.max(1);
        fresh.sent = snap.sent.iter().copied().collect();
        fresh.receipts = snap.receipts.iter().map(|(d, e, s)| (*d, (*e, *s))).collect();
        *self = fresh;
    }

    pub fn cluster(&self) -> u32 {
        self.cluster
    }

    /// The epoch of this cluster's streams to the others.
    pub fn epoch(&self) -> u64 {
        self.epoch
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
        self.followers.get(&user).into_iter().flat_map(|m| m.keys().copied())
    }

    pub fn timeline(&self, user: u32) -> &[Post] {
        self.timelines.get(&user).map_or(&[], Vec::as_slice)
    }

    pub fn feed(&self, user: u32) -> &[FeedItem] {
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

    /// Events this cluster has numbered for other clusters (in this epoch).
    pub fn sent_total(&self) -> u64 {
        self.sent.values().sum()
    }

    /// How far this server has taken in other clusters' events: each
    /// stream's position, plus 2^40 for each epoch past the first (so the
    /// figure only grows when an origin starts a new epoch at 1, and is a
    /// plain count until one does), plus the events held. Two servers of
    /// one cluster apply the same log: the one further along has the
    /// larger figure.
    pub fn received_total(&self) -> u64 {
        let applied: u128 =
            self.applied.values().map(|&(epoch, n)| (u128::from(epoch.saturating_sub(1)) << 40) + u128::from(n)).sum();
        u64::try_from(applied + self.held_count() as u128).unwrap_or(u64::MAX)
    }

    /// Events held for a gap to close, over all origins.
    pub fn held_count(&self) -> usize {
        self.held.values().map(BTreeMap::len).sum()
    }

    /// Outbox events with seq greater than `after`, in order.
    pub fn outbox_after(&self, after: u64) -> impl Iterator<Item = &OutEvent> {
        self.outbox.range(after + 1..).map(|(_, e)| e)
    }

    /// Broker-confirmed outbox events kept for destinations' receipts.
    pub fn retained_count(&self) -> usize {
        self.outbox.range(..=self.published_upto).count()
    }

    /// What this server applied of each other cluster's stream: (origin,
    /// epoch, last dest_seq applied, events held), for every other cluster.
    pub fn stream_marks(&self) -> Vec<(u32, u64, u64, u64)> {
        (1..=self.clusters)
            .filter(|o| *o != self.cluster)
            .map(|o| {
                let (epoch, applied) = self.applied.get(&o).copied().unwrap_or((0, 0));
                (o, epoch, applied, self.held.get(&o).map_or(0, BTreeMap::len) as u64)
            })
            .collect()
    }

    /// Whether a receipt from `dest` could have come from this deployment
    /// (None) or why not: another cluster's, past what this cluster sent.
    pub fn check_receipt(&self, dest: u32, epoch: u64, applied: u64) -> Option<String> {
        if dest == self.cluster || dest == 0 || dest > self.clusters {
            return Some(format!(
                "receipt from cluster {dest} (this is cluster {} of {})",
                self.cluster, self.clusters
            ));
        }
        let sent = self.sent.get(&dest).copied().unwrap_or(0);
        if epoch > self.epoch || (epoch == self.epoch && applied > sent) {
            return Some(format!(
                "cluster {dest} reports event {applied} of epoch {epoch} applied; this cluster sent it {sent} of epoch {}",
                self.epoch
            ));
        }
        None
    }

    /// Whether a receipt from `dest` says more than the last one kept.
    pub fn receipt_advances(&self, dest: u32, epoch: u64, applied: u64) -> bool {
        (epoch, applied) > self.receipts.get(&dest).copied().unwrap_or((0, 0))
    }

    /// The receipts kept: (destination, epoch, last dest_seq applied).
    pub fn receipt_marks(&self) -> Vec<(u32, u64, u64)> {
        self.receipts.iter().map(|(d, (e, n))| (*d, *e, *n)).collect()
    }

    /// The last dest_seq of the current epoch for `dest` that the broker
    /// confirmed: the one before its first unconfirmed event, or the last
    /// numbered when none is unconfirmed.
    pub fn confirmed_to(&self, dest: u32) -> u64 {
        self.outbox
            .range(self.published_upto + 1..)
            .filter(|(_, e)| e.epoch == self.epoch)
            .find_map(|(_, e)| e.deliveries.iter().find(|d| d.dest == dest).map(|d| d.dest_seq.saturating_sub(1)))
            .unwrap_or_else(|| self.sent.get(&dest).copied().unwrap_or(0))
    }

    /// The confirmed events of the current epoch for `dest` after
    /// `applied`, up to `confirmed` and at most `max`, in stream order; and
    /// how many right after `applied` are no longer kept (they come before
    /// the first returned).
    pub fn resend_to(&self, dest: u32, applied: u64, confirmed: u64, max: usize) -> (Vec<RemoteEvent>, u64) {
        let mut out: Vec<RemoteEvent> = Vec::new();
        for e in self.outbox.range(..=self.published_upto).map(|(_, e)| e).filter(|e| e.epoch == self.epoch) {
            if out.len() >= max {
                break;
            }
            if let Some(d) =
                e.deliveries.iter().find(|d| d.dest == dest && d.dest_seq > applied && d.dest_seq <= confirmed)
            {
                out.push(e.for_delivery(self.cluster, d));
            }
        }
        let first = out.first().map_or(confirmed + 1, |e| e.dest_seq);
        (out, first.saturating_sub(applied + 1))
    }

    /// Whether `dest`'s receipt covers its copy `d` of an event of `epoch`.
    fn covered(&self, epoch: u64, d: &Delivery) -> bool {
        d.dest_seq == 0
            || self.receipts.get(&d.dest).is_some_and(|&(e, n)| e > epoch || (e == epoch && n >= d.dest_seq))
    }

    /// Drops confirmed outbox events every destination's receipt covers,
    /// oldest first, and the oldest beyond [`RETAIN_MAX`] whatever they are.
    fn trim_outbox(&mut self) {
        let mut retained = self.retained_count();
        while let Some((&seq, e)) = self.outbox.first_key_value() {
            if seq > self.published_upto {
                break;
            }
            if retained <= RETAIN_MAX && !e.deliveries.iter().all(|d| self.covered(e.epoch, d)) {
                break;
            }
            self.outbox.pop_first();
            retained -= 1;
        }
    }

    /// What this state makes of an arriving event of another cluster.
    pub fn arrival(&self, ev: &RemoteEvent) -> Arrival {
        self.arrival_in(ev, &Group::default())
    }

    /// [`State::arrival`] for an event of a group being decided, after the
    /// group's earlier events (`group`): a stream position they already
    /// reached is a duplicate, the one after it is next, and what they
    /// drained from the held events no longer counts against the bound.
    /// Without this, a receiver whose held events are at the bound would
    /// take one event per group even as the gap closes: the rest of a
    /// batch would look early, with no room to hold them.
    pub fn arrival_in(&self, ev: &RemoteEvent, group: &Group) -> Arrival {
        if ev.origin == self.cluster || ev.origin == 0 || ev.origin > self.clusters {
            return Arrival::Invalid(format!(
                "origin cluster {} (this is cluster {} of {})",
                ev.origin, self.cluster, self.clusters
            ));
        }
        if ev.dest_seq == 0 {
            return Arrival::Invalid(format!("origin {} event {} has no stream position", ev.origin, ev.seq));
        }
        let (epoch, last) = group
            .reached
            .get(&ev.origin)
            .copied()
            .unwrap_or_else(|| self.applied.get(&ev.origin).copied().unwrap_or((0, 0)));
        let held = self.held.get(&ev.origin);
        if ev.epoch < epoch || (ev.epoch == epoch && ev.dest_seq <= last) {
            return Arrival::Duplicate;
        }
        let early = group.early.get(&ev.origin);
        if held.is_some_and(|h| h.contains_key(&(ev.epoch, ev.dest_seq)))
            || early.is_some_and(|e| e.contains(&(ev.epoch, ev.dest_seq)))
        {
            return Arrival::Duplicate;
        }
        // A new epoch starts at 1; its later events wait for the first
        // like any other gap (they may come in the same batch).
        let next = if ev.epoch == epoch { last + 1 } else { 1 };
        if ev.dest_seq == next {
            return Arrival::Next;
        }
        if ev.dest_seq > next + HOLD_WINDOW {
            return Arrival::Invalid(format!(
                "origin {} event {} jumps past the window (next is {next})",
                ev.origin, ev.dest_seq
            ));
        }
        let waiting = held.map_or(0, BTreeMap::len) - group.drained.get(&ev.origin).copied().unwrap_or(0)
            + early.map_or(0, BTreeSet::len);
        if waiting >= HOLD_MAX {
            return Arrival::Full;
        }
        Arrival::Early
    }

    /// Whether a gap marker of `origin`'s stream would move it on: past
    /// what was applied (or into a newer epoch), and valid at all.
    pub fn gap_advances(&self, origin: u32, epoch: u64, upto: u64) -> bool {
        origin != self.cluster
            && origin != 0
            && origin <= self.clusters
            && upto > 0
            && (epoch, upto) > self.applied.get(&origin).copied().unwrap_or((0, 0))
    }

    /// Notes in `group` a gap marker it takes (see [`State::gap_advances`]):
    /// its stream moves on to `upto`, through whatever held or early
    /// events then follow; those at or before `upto` no longer count.
    pub fn skip_in(&self, origin: u32, epoch: u64, upto: u64, group: &mut Group) {
        let reached =
            group.reached.get(&origin).copied().unwrap_or_else(|| self.applied.get(&origin).copied().unwrap_or((0, 0)));
        if (epoch, upto) <= reached {
            return;
        }
        let gone = self.held.get(&origin).map_or(0, |h| h.range(..=(epoch, upto)).count());
        *group.drained.entry(origin).or_default() += gone;
        if let Some(early) = group.early.get_mut(&origin) {
            early.retain(|k| *k > (epoch, upto));
        }
        self.take_in_from(origin, epoch, upto, group);
    }

    /// Notes in `group` an event it takes (next or early, per
    /// [`State::arrival_in`]): a next one moves its stream on, through
    /// whatever held or early events then follow.
    pub fn take_in(&self, ev: &RemoteEvent, arrival: &Arrival, group: &mut Group) {
        let o = ev.origin;
        match arrival {
            Arrival::Early => {
                group.early.entry(o).or_default().insert((ev.epoch, ev.dest_seq));
            }
            Arrival::Next => self.take_in_from(o, ev.epoch, ev.dest_seq, group),
            Arrival::Duplicate | Arrival::Invalid(_) | Arrival::Full => {}
        }
    }

    /// Moves `origin`'s stream in `group` on to `last`, then through the
    /// held or early events that follow it.
    fn take_in_from(&self, origin: u32, epoch: u64, mut last: u64, group: &mut Group) {
        let held = self.held.get(&origin);
        loop {
            let key = (epoch, last + 1);
            if held.is_some_and(|h| h.contains_key(&key)) {
                *group.drained.entry(origin).or_default() += 1;
            } else if !group.early.get_mut(&origin).is_some_and(|e| e.remove(&key)) {
                break;
            }
            last += 1;
        }
        group.reached.insert(origin, (epoch, last));
    }

    /// Checks a FOLLOW of `target` by `user` (a known local user).
    pub fn check_follow(&self, user: u32, target: u32) -> Outcome {
        View::new(self, &Pending::default()).check_follow(user, target)
    }

    /// Checks an UNFOLLOW of `target` by `user`.
    pub fn check_unfollow(&self, user: u32, target: u32) -> Outcome {
        View::new(self, &Pending::default()).check_unfollow(user, target)
    }

    /// What a timeline shows on entry: up to [`BACKLOG`] most recent posts
    /// of users `user` follows now, that arrived under the current follow,
    /// oldest first.
    /// Each with its index in the feed.
    pub fn backlog(&self, user: u32) -> Vec<(usize, FeedItem)> {
        let follows = self.following.get(&user);
        let visible = |(_, i): &(usize, &FeedItem)| {
            i.post.user != user && follows.and_then(|m| m.get(&i.post.user)).is_some_and(|f| *f == i.follow)
        };
        let mut posts: Vec<(usize, FeedItem)> = self
            .feed(user)
            .iter()
            .enumerate()
            .rev()
            .filter(visible)
            .take(BACKLOG)
            .map(|(at, i)| (at, i.clone()))
            .collect();
        posts.reverse();
        posts
    }

    /// Applies one journal entry. Applying an entry that changes nothing
    /// (a duplicate event) yields no effects.
    pub fn apply(&mut self, entry: &Entry) -> Vec<Effect> {
        let mut effects = Vec::new();
        match entry {
            Entry::Local(op) => self.apply_local(op, &mut effects),
            // A journal of an earlier version holds events without a stream
            // position: they were accepted then, so they apply as they are.
            Entry::Remote(event) if event.dest_seq == 0 => self.apply_remote(event, &mut effects),
            Entry::Remote(event) => match self.arrival(event) {
                Arrival::Next => {
                    self.apply_remote(event, &mut effects);
                    self.drain_held(event.origin, &mut effects);
                }
                Arrival::Early => {
                    self.hold(event.clone());
                }
                Arrival::Duplicate | Arrival::Invalid(_) | Arrival::Full => {}
            },
            Entry::PublishedUpto(upto) => {
                if *upto > self.published_upto {
                    self.published_upto = *upto;
                    self.trim_outbox();
                }
            }
            Entry::Receipt { dest, epoch, applied } => {
                if self.receipt_advances(*dest, *epoch, *applied) {
                    self.receipts.insert(*dest, (*epoch, *applied));
                    self.trim_outbox();
                }
            }
            Entry::Gap { origin, epoch, upto } => {
                if self.gap_advances(*origin, *epoch, *upto) {
                    self.apply_held_through(*origin, *epoch, *upto, &mut effects);
                    self.applied.insert(*origin, (*epoch, *upto));
                    self.drain_held(*origin, &mut effects);
                }
            }
            Entry::Snapshot(snap) => {
                self.install(snap);
                effects.push(Effect::Reset);
            }
        }
        effects
    }

    /// Keeps an event until the gap before it closes. Held events are in
    /// stream order, an older epoch's first: once a newer epoch has begun,
    /// [`State::drain_held`] drops what is left of the old one.
    fn hold(&mut self, event: RemoteEvent) {
        self.held.entry(event.origin).or_default().insert((event.epoch, event.dest_seq), event);
    }

    /// Applies held events of `origin` that the gap no longer blocks.
    fn drain_held(&mut self, origin: u32, effects: &mut Vec<Effect>) {
        while let Some(next) = self.pop_held(origin) {
            match self.arrival(&next) {
                Arrival::Next => self.apply_remote(&next, effects),
                Arrival::Duplicate | Arrival::Invalid(_) | Arrival::Full => {}
                Arrival::Early => {
                    self.hold(next);
                    break;
                }
            }
        }
    }

    /// Applies, in stream order, the held events of `origin` at or before
    /// `upto` of `epoch`, for a gap marker that steps over the positions
    /// around them: the marker says what this cluster lacks is gone, and
    /// these it has. (Held events of an older epoch go, as a newer
    /// epoch's start drops them.)
    fn apply_held_through(&mut self, origin: u32, epoch: u64, upto: u64, effects: &mut Vec<Effect>) {
        while self.held.get(&origin).and_then(|h| h.first_key_value()).is_some_and(|(k, _)| *k <= (epoch, upto)) {
            let Some(event) = self.pop_held(origin) else { break };
            if event.epoch == epoch {
                self.apply_remote(&event, effects);
            }
        }
    }

    /// Takes the earliest held event of `origin` out.
    fn pop_held(&mut self, origin: u32) -> Option<RemoteEvent> {
        let held = self.held.get_mut(&origin)?;
        let (_, first) = held.pop_first()?;
        if held.is_empty() {
            self.held.remove(&origin);
        }
        Some(first)
    }

    fn apply_local(&mut self, op: &LocalOp, effects: &mut Vec<Effect>) {
        self.next_seq = self.next_seq.max(op.seq + 1);
        if op.request_id != 0
            && let Some(user) = op.change.requester()
        {
            push_bounded(self.recent_requests.entry(user).or_default(), op.request_id, RECENT_REQUEST_IDS);
        }
        // Where other clusters need to hear of it: each destination with
        // the followers there a post is for.
        let mut deliveries: BTreeMap<u32, Vec<(u32, FollowId)>> = BTreeMap::new();
        match &op.change {
            Change::User(user) => {
                self.add_user(*user, effects);
                for dest in (1..=self.clusters).filter(|c| *c != self.cluster) {
                    deliveries.insert(dest, vec![]);
                }
            }
            Change::Relation { follower, followee, follow, .. } => {
                let (follower, followee) = (*follower, *followee);
                let list = self.following.entry(follower).or_default();
                let changed =
                    if *follow { list.insert(followee, op.seq).is_none() } else { list.remove(&followee).is_some() };
                if changed {
                    effects.push(Effect::FollowList(follower));
                }
                if self.is_local(followee) {
                    self.set_follower(followee, follower, follow.then_some(op.seq), effects);
                } else {
                    deliveries.insert(cluster_of(followee, self.clusters), vec![]);
                }
            }
            Change::Post(post) => {
                if post.client_id != 0 {
                    push_bounded(self.recent_ids.entry(post.user).or_default(), post.client_id, RECENT_POST_IDS);
                }
                self.timelines.entry(post.user).or_default().push(post.clone());
                effects.push(Effect::TimelineAppend(post.user));
                let readers: Vec<(u32, FollowId)> = self
                    .followers
                    .get(&post.user)
                    .map(|m| m.iter().map(|(f, id)| (*f, *id)).collect())
                    .unwrap_or_default();
                for (reader, follow) in readers {
                    if reader == post.user {
                        continue;
                    }
                    if self.is_local(reader) {
                        self.add_to_feed(reader, post, follow, effects);
                    } else {
                        deliveries.entry(cluster_of(reader, self.clusters)).or_default().push((reader, follow));
                    }
                }
            }
        }
        if !deliveries.is_empty() {
            let deliveries = deliveries
                .into_iter()
                .map(|(dest, recipients)| {
                    let n = self.sent.entry(dest).or_default();
                    *n += 1;
                    Delivery { dest, dest_seq: *n, recipients }
                })
                .collect();
            let event = OutEvent { seq: op.seq, epoch: self.epoch, change: op.change.clone(), deliveries };
            self.outbox.insert(op.seq, event);
        }
    }

    fn apply_remote(&mut self, event: &RemoteEvent, effects: &mut Vec<Effect>) {
        if event.dest_seq != 0 {
            self.applied.insert(event.origin, (event.epoch, event.dest_seq));
        }
        match &event.change {
            Change::User(user) => self.add_user(*user, effects),
            Change::Relation { follower, followee, follow, .. } => {
                if self.is_local(*followee) {
                    self.set_follower(*followee, *follower, follow.then_some(event.seq), effects);
                }
            }
            Change::Post(post) => {
                if event.dest_seq == 0 {
                    // An event of an earlier version: its readers are the
                    // local followers of the author.
                    let readers: Vec<(u32, FollowId)> =
                        self.following.iter().filter_map(|(u, m)| m.get(&post.user).map(|f| (*u, *f))).collect();
                    for (reader, follow) in readers {
                        self.add_to_feed(reader, post, follow, effects);
                    }
                    return;
                }
                for &(reader, follow) in &event.recipients {
                    // Only under the follow the author's cluster saw: a
                    // follow since undone (or undone and made again) has
                    // not reached it.
                    let current = self.following.get(&reader).and_then(|m| m.get(&post.user));
                    if self.is_local(reader) && reader != post.user && current == Some(&follow) {
                        self.add_to_feed(reader, post, follow, effects);
                    }
                }
            }
        }
    }

    fn add_user(&mut self, user: u32, effects: &mut Vec<Effect>) {
        if self.users.insert(user) {
            effects.push(Effect::Users);
            if self.is_local(user) {
                effects.push(Effect::NewLocalUser(user));
            }
        }
    }

    /// Records `follower` following local `user` (Some(follow)) or not.
    fn set_follower(&mut self, user: u32, follower: u32, follow: Option<FollowId>, effects: &mut Vec<Effect>) {
        let set = self.followers.entry(user).or_default();
        let changed = match follow {
            Some(id) => set.insert(follower, id).is_none(),
            None => set.remove(&follower).is_some(),
        };
        if changed {
            effects.push(Effect::Followers(user));
        }
    }

    fn add_to_feed(&mut self, reader: u32, post: &Post, follow: FollowId, effects: &mut Vec<Effect>) {
        let feed = self.feeds.entry(reader).or_default();
        let before = feed.last().map_or(0, |i| i.anchor);
        feed.push(FeedItem::after(before, post.clone(), follow));
        effects.push(Effect::Feed { user: reader, at: feed.len() - 1 });
    }
}

/// What the writes decided so far in one group have changed: the next
/// write of the group is decided against the state with these on top
/// (they are journaled and applied together, once the group commits).
#[derive(Debug, Default)]
pub struct Pending {
    users: BTreeSet<u32>,
    /// (follower, followee) -> follows after the group.
    relations: HashMap<(u32, u32), bool>,
    requests: std::collections::HashSet<(u32, u64)>,
    posts: std::collections::HashSet<(u32, u64)>,
}

impl Pending {
    /// Notes a local op decided into the group.
    pub fn note(&mut self, op: &LocalOp) {
        if op.request_id != 0
            && let Some(user) = op.change.requester()
        {
            self.requests.insert((user, op.request_id));
        }
        match &op.change {
            Change::User(u) => {
                self.users.insert(*u);
            }
            Change::Relation { follower, followee, follow, .. } => {
                self.relations.insert((*follower, *followee), *follow);
            }
            Change::Post(p) => {
                if p.client_id != 0 {
                    self.posts.insert((p.user, p.client_id));
                }
            }
        }
    }
}

/// The state as a group of writes being decided sees it: committed state
/// with the group's earlier writes on top.
pub struct View<'a> {
    state: &'a State,
    pending: &'a Pending,
}

impl<'a> View<'a> {
    pub fn new(state: &'a State, pending: &'a Pending) -> View<'a> {
        View { state, pending }
    }

    pub fn has_user(&self, user: u32) -> bool {
        self.state.has_user(user) || self.pending.users.contains(&user)
    }

    pub fn has_request_id(&self, user: u32, id: u64) -> bool {
        id != 0 && (self.state.has_request_id(user, id) || self.pending.requests.contains(&(user, id)))
    }

    pub fn has_post_id(&self, user: u32, id: u64) -> bool {
        id != 0 && (self.state.has_post_id(user, id) || self.pending.posts.contains(&(user, id)))
    }

    fn follows(&self, user: u32, target: u32) -> bool {
        match self.pending.relations.get(&(user, target)) {
            Some(f) => *f,
            None => self.state.following.get(&user).is_some_and(|m| m.contains_key(&target)),
        }
    }

    /// Checks a FOLLOW of `target` by `user` (a known local user).
    pub fn check_follow(&self, user: u32, target: u32) -> Outcome {
        if !self.has_user(user) {
            Outcome::NotExists
        } else if target == user || (self.has_user(target) && self.follows(user, target)) {
            Outcome::AlreadyExists
        } else if !self.has_user(target) {
            Outcome::InvalidUsername
        } else {
            Outcome::Success
        }
    }

    /// Checks an UNFOLLOW of `target` by `user`.
    pub fn check_unfollow(&self, user: u32, target: u32) -> Outcome {
        if !self.has_user(user) {
            Outcome::NotExists
        } else if target == user || !self.has_user(target) {
            Outcome::InvalidUsername
        } else if !self.follows(user, target) {
            Outcome::NotAFollower
        } else {
            Outcome::Success
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(user: u32, text: &str, at_ms: i64) -> Change {
        Change::Post(Post { user, text: text.into(), at_ms, client_id: 0 })
    }

    fn rel(follower: u32, followee: u32, follow: bool) -> Change {
        Change::Relation { follower, followee, follow, at_ms: 0 }
    }

    /// A cluster of 3 that applies local ops with dense seqs.
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
        /// Every outbox event for cluster `dest`, as it arrives there.
        fn sent_to(&self, dest: u32) -> Vec<RemoteEvent> {
            self.state
                .outbox_after(0)
                .flat_map(|e| {
                    e.deliveries.iter().filter(|d| d.dest == dest).map(|d| e.for_delivery(self.state.cluster, d))
                })
                .collect()
        }
        /// Delivers what `from` sent here and not yet delivered.
        fn receive_from(&mut self, from: &Node) -> Vec<Effect> {
            from.sent_to(self.state.cluster).iter().flat_map(|e| self.state.apply(&Entry::Remote(e.clone()))).collect()
        }
        fn feed_texts(&self, user: u32) -> Vec<String> {
            self.state.feed(user).iter().map(|i| i.post.text.to_string()).collect()
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
        n.local(rel(1, 4, true));
        assert_eq!(n.state.check_follow(1, 4), Outcome::AlreadyExists);
        assert_eq!(n.state.check_unfollow(1, 4), Outcome::Success);
        assert_eq!(n.state.followers(4).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_group_decides_each_write_after_the_ones_before_it() {
        let mut n = Node::new(1);
        n.local(Change::User(1));
        let mut p = Pending::default();
        let v = View::new(&n.state, &p);
        assert_eq!(v.check_follow(1, 4), Outcome::InvalidUsername);
        p.note(&LocalOp { seq: 2, change: Change::User(4), request_id: 9 });
        let v = View::new(&n.state, &p);
        assert!(v.has_user(4) && v.has_request_id(4, 9));
        assert_eq!(v.check_follow(1, 4), Outcome::Success);
        p.note(&LocalOp::new(3, rel(1, 4, true)));
        let v = View::new(&n.state, &p);
        assert_eq!(v.check_follow(1, 4), Outcome::AlreadyExists);
        assert_eq!(v.check_unfollow(1, 4), Outcome::Success);
        p.note(&LocalOp::new(4, rel(1, 4, false)));
        assert_eq!(View::new(&n.state, &p).check_unfollow(1, 4), Outcome::NotAFollower);
        p.note(&LocalOp::new(5, Change::Post(Post { user: 1, text: "x".into(), at_ms: 0, client_id: 77 })));
        assert!(View::new(&n.state, &p).has_post_id(1, 77) && !n.state.has_post_id(1, 77));
    }

    #[test]
    fn local_posts_reach_local_followers_after_the_follow_by_order_not_time() {
        let mut n = Node::new(1);
        for u in [1, 4, 7] {
            n.local(Change::User(u));
        }
        // Timestamps far in the future and the past decide nothing.
        n.local(post(1, "before", i64::MAX / 2));
        n.local(rel(4, 1, true));
        n.local(rel(1, 1, true)); // never shows own posts
        let fx = n.local(post(1, "p11", -5));
        assert!(fx.contains(&Effect::Feed { user: 4, at: 0 }));
        assert_eq!(n.state.feed(4)[0].post, Post { user: 1, text: "p11".into(), at_ms: -5, client_id: 0 });
        assert_eq!(n.state.backlog(4).iter().map(|(_, i)| &*i.post.text).collect::<Vec<_>>(), vec!["p11"]);
        assert!(n.state.backlog(7).is_empty());
        assert!(n.state.backlog(1).is_empty());
        assert_eq!(n.state.timeline(1).len(), 2);
    }

    #[test]
    fn feed_anchors_are_fixed_values_of_the_posts_up_to_them() {
        // Clients keep anchors across failovers and server upgrades: the
        // function may never change (these values are its definition).
        let first = Post { user: 1, text: "hello".into(), at_ms: 1_744_336_636_000, client_id: 7 };
        let second = Post { user: 2, text: "".into(), at_ms: -5, client_id: 0 };
        assert_eq!(feed_anchor(0, &first), 0x1c52_aa15_8029_60f2);
        assert_eq!(feed_anchor(0x1c52_aa15_8029_60f2, &second), 0xed80_0ec3_ebe4_4149);
        // What it covers: the history before, author, time and text (not
        // the client's id).
        let other = |p: Post| feed_anchor(0, &p) != feed_anchor(0, &first);
        assert!(other(Post { user: 3, ..first.clone() }));
        assert!(other(Post { at_ms: 1, ..first.clone() }));
        assert!(other(Post { text: "hellp".into(), ..first.clone() }));
        assert!(!other(Post { client_id: 8, ..first.clone() }));
        assert_ne!(feed_anchor(1, &first), feed_anchor(0, &first));
        let items = feed_items([(first.clone(), 1), (second.clone(), 2)]);
        assert_eq!((items[0].anchor, items[1].anchor), (0x1c52_aa15_8029_60f2, 0xed80_0ec3_ebe4_4149));
    }

    #[test]
    fn backlog_is_the_last_twenty_of_the_current_follow() {
        let mut n = Node::new(1);
        n.local(Change::User(1));
        n.local(Change::User(4));
        n.local(rel(4, 1, true));
        for i in 0..30 {
            n.local(post(1, &format!("p{i}"), 100 - i));
        }
        let b = n.state.backlog(4);
        assert_eq!(b.len(), BACKLOG);
        assert_eq!((b[0].0, &*b[0].1.post.text), (10, "p10"), "in log order, whatever the timestamps");
        assert_eq!((b[19].0, &*b[19].1.post.text), (29, "p29"));
        n.local(rel(4, 1, false));
        assert!(n.state.backlog(4).is_empty(), "unfollowed authors disappear");
        n.local(rel(4, 1, true));
        assert!(n.state.backlog(4).is_empty(), "posts of an earlier follow stay hidden");
        n.local(post(1, "again", 0));
        assert_eq!(n.state.backlog(4).len(), 1);
    }

    #[test]
    fn a_remote_post_reaches_followers_whose_follow_reached_the_author_first() {
        let (mut a, mut b) = (Node::new(1), Node::new(2));
        a.local(Change::User(1));
        b.local(Change::User(2));
        b.local(Change::User(5));
        b.receive_from(&a);
        a.receive_from(&b);
        b.local(rel(2, 1, true));
        // A post made before the follow reached cluster 1: not for user 2.
        a.local(post(1, "before the follow arrived", i64::MAX / 2));
        b.receive_from(&a);
        assert!(b.feed_texts(2).is_empty());
        a.receive_from(&b);
        a.local(post(1, "after", -1));
        b.receive_from(&a);
        assert_eq!(b.feed_texts(2), vec!["after"]);
        // 2 unfollows and follows again before cluster 1 hears: a post for
        // the old follow is not shown under the new one.
        b.local(rel(2, 1, false));
        b.local(rel(2, 1, true));
        a.local(post(1, "for the old follow", 0));
        b.receive_from(&a);
        assert_eq!(b.feed_texts(2), vec!["after"]);
        a.receive_from(&b);
        a.local(post(1, "for the new follow", 0));
        b.receive_from(&a);
        assert_eq!(b.feed_texts(2), vec!["after", "for the new follow"]);
        assert_eq!(b.state.backlog(2).len(), 1, "the backlog shows the current follow's posts");
    }

    #[test]
    fn posts_go_only_to_clusters_with_followers() {
        let mut a = Node::new(1);
        a.local(Change::User(1));
        a.local(Change::User(4));
        a.local(post(1, "nobody reads", 0));
        assert!(a.state.outbox_after(1).all(|e| !matches!(e.change, Change::Post(_))));
        a.state.apply(&Entry::Remote(RemoteEvent {
            origin: 3,
            seq: 8,
            epoch: 1,
            dest_seq: 1,
            change: rel(3, 1, true),
            recipients: vec![],
        }));
        a.local(rel(4, 1, true));
        a.local(post(1, "read in 3", 0));
        let e = a.state.outbox_after(0).last().unwrap().clone();
        assert_eq!(e.deliveries, vec![Delivery { dest: 3, dest_seq: 3, recipients: vec![(3, 8)] }]);
        // Users go everywhere else; each stream is numbered from 1, and the
        // post follows the two users in stream 1 -> 3.
        let users: Vec<Vec<(u32, u64)>> = a
            .state
            .outbox_after(0)
            .filter(|e| matches!(e.change, Change::User(_)))
            .map(|e| e.deliveries.iter().map(|d| (d.dest, d.dest_seq)).collect())
            .collect();
        assert_eq!(users, vec![vec![(2, 1), (3, 1)], vec![(2, 2), (3, 2)]]);
    }

    #[test]
    fn streams_apply_in_order_hold_gaps_ignore_duplicates_and_refuse_the_impossible() {
        let mut n = Node::new(2);
        let ev = |dest_seq, user| RemoteEvent {
            origin: 1,
            seq: dest_seq * 10,
            epoch: 1,
            dest_seq,
            change: Change::User(user),
            recipients: vec![],
        };
        assert_eq!(n.state.apply(&Entry::Remote(ev(1, 1))), vec![Effect::Users]);
        assert!(n.state.apply(&Entry::Remote(ev(1, 1))).is_empty(), "a duplicate changes nothing");
        assert_eq!(n.state.arrival(&ev(3, 7)), Arrival::Early);
        assert!(n.state.apply(&Entry::Remote(ev(3, 7))).is_empty(), "held");
        assert_eq!(n.state.held_count(), 1);
        assert_eq!(n.state.arrival(&ev(3, 7)), Arrival::Duplicate, "already held");
        let fx = n.state.apply(&Entry::Remote(ev(2, 4)));
        assert_eq!(fx.iter().filter(|e| **e == Effect::Users).count(), 2, "the gap closed: 2 then the held 3");
        assert!(n.state.has_user(7) && n.state.held_count() == 0);
        // A forged event far ahead (seq i64::MAX) is refused, and later
        // good events still apply.
        let forged = RemoteEvent { dest_seq: i64::MAX as u64, ..ev(0, 99) };
        assert!(matches!(n.state.arrival(&forged), Arrival::Invalid(_)));
        n.state.apply(&Entry::Remote(forged));
        assert!(!n.state.has_user(99));
        n.state.apply(&Entry::Remote(ev(4, 10)));
        assert!(n.state.has_user(10));
        // Own cluster, unknown cluster: refused.
        assert!(matches!(n.state.arrival(&RemoteEvent { origin: 2, ..ev(5, 1) }), Arrival::Invalid(_)));
        assert!(matches!(n.state.arrival(&RemoteEvent { origin: 4, ..ev(5, 1) }), Arrival::Invalid(_)));
        // An event of the old epoch waits for a gap when the origin starts
        // a new one (an override).
        n.state.apply(&Entry::Remote(ev(7, 13)));
        assert_eq!(n.state.held_count(), 1);
        // A new epoch starts at 1.
        assert_eq!(n.state.arrival(&RemoteEvent { epoch: 5, ..ev(1, 11) }), Arrival::Next);
        // Its later events wait for the first, which may come in the same
        // batch.
        assert_eq!(n.state.arrival(&RemoteEvent { epoch: 5, ..ev(3, 11) }), Arrival::Early);
        let before = n.state.received_total();
        n.state.apply(&Entry::Remote(RemoteEvent { epoch: 5, ..ev(1, 11) }));
        assert!(n.state.received_total() > before, "a new epoch at 1 is further along, not back");
        assert_eq!(n.state.arrival(&ev(5, 12)), Arrival::Duplicate, "the old epoch is over");
        assert_eq!(n.state.held_count(), 0, "what was held of the old epoch can never apply");
        // Its position is free for the new epoch's event.
        assert_eq!(n.state.arrival(&RemoteEvent { epoch: 5, ..ev(7, 14) }), Arrival::Early);
    }

    #[test]
    fn remote_relations_update_followers_of_local_users() {
        let mut n = Node::new(2);
        n.local(Change::User(2));
        let r = |dest_seq, follow| RemoteEvent {
            origin: 1,
            seq: 40 + dest_seq,
            epoch: 1,
            dest_seq,
            change: rel(1, 2, follow),
            recipients: vec![],
        };
        assert_eq!(n.state.apply(&Entry::Remote(r(1, true))), vec![Effect::Followers(2)]);
        assert_eq!(n.state.followers(2).collect::<Vec<_>>(), vec![1]);
        assert_eq!(n.state.apply(&Entry::Remote(r(2, false))), vec![Effect::Followers(2)]);
        assert_eq!(n.state.followers(2).count(), 0);
    }

    #[test]
    fn a_snapshot_reproduces_the_state_exactly() {
        let (mut a, mut b) = (Node::new(1), Node::new(2));
        for u in [1, 4] {
            a.local(Change::User(u));
        }
        b.local(Change::User(2));
        a.receive_from(&b);
        b.receive_from(&a);
        a.local(rel(4, 1, true));
        a.local(rel(1, 2, true));
        b.receive_from(&a);
        b.local(rel(2, 1, true));
        a.receive_from(&b);
        a.local(Change::Post(Post { user: 1, text: "a".into(), at_ms: 5, client_id: 77 }));
        b.local(post(2, "b", 6));
        a.receive_from(&b);
        a.state.apply(&Entry::PublishedUpto(2));
        // Something held, too.
        a.state.apply(&Entry::Remote(RemoteEvent {
            origin: 3,
            seq: 9,
            epoch: 1,
            dest_seq: 2,
            change: Change::User(3),
            recipients: vec![],
        }));
        let snap = a.state.snapshot();
        let mut other = Node::new(1);
        other.local(Change::User(9)); // whatever was there is replaced
        assert_eq!(other.state.apply(&Entry::Snapshot(Box::new(snap.clone()))), vec![Effect::Reset]);
        assert_eq!(other.state.snapshot(), snap);
        assert!(other.state.has_post_id(1, 77));
        assert!(!other.state.has_user(9));
        assert_eq!(other.feed_texts(1), vec!["b"]);
        assert_eq!(other.state.backlog(4).len(), 1);
        assert_eq!(other.state.held_count(), 1);
        // Both go on identically.
        let x = a.local(post(1, "c", 9));
        let y = other.local(post(1, "c", 9));
        assert_eq!(x, y);
        assert_eq!(a.state.snapshot(), other.state.snapshot());
    }

    #[test]
    fn post_and_request_ids_are_remembered_for_dedup() {
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
        let seq = n.state.next_seq();
        n.state.apply(&Entry::Local(LocalOp { seq, change: Change::User(4), request_id: 33 }));
        assert!(n.state.has_request_id(4, 33) && !n.state.has_request_id(1, 33));
    }

    #[test]
    fn outbox_holds_what_other_clusters_need_until_published() {
        let mut n = Node::new(1);
        n.local(Change::User(1)); // seq 1: to 2 and 3
        n.local(Change::User(4)); // seq 2
        n.local(rel(1, 4, true)); // seq 3: same cluster, not published
        n.local(rel(1, 2, true)); // seq 4: followee in cluster 2
        n.local(post(1, "hi", 2)); // seq 5: no followers elsewhere
        let seqs: Vec<u64> = n.state.outbox_after(0).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 4]);
        n.state.apply(&Entry::PublishedUpto(2));
        let seqs: Vec<u64> = n.state.outbox_after(n.state.published_upto()).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4]);
        assert_eq!(n.state.published_upto(), 2);
        // The confirmed ones stay for the receipts (below).
        assert_eq!(n.state.retained_count(), 2);
    }

    fn outbox_seqs(n: &Node) -> Vec<u64> {
        n.state.outbox_after(0).map(|e| e.seq).collect()
    }

    #[test]
    fn confirmed_events_stay_until_every_destination_receipts_them() {
        let mut n = Node::new(1);
        n.local(Change::User(1)); // seq 1: stream position 1 to clusters 2 and 3
        n.local(Change::User(4)); // seq 2: position 2 to both
        n.local(rel(1, 2, true)); // seq 3: to cluster 2 only (position 3)
        n.state.apply(&Entry::PublishedUpto(2));
        assert_eq!(n.state.confirmed_to(2), 2, "position 3 is not confirmed yet");
        assert_eq!(n.state.confirmed_to(3), 2);
        // Receipts that cannot be this deployment's.
        assert!(n.state.check_receipt(1, 1, 0).is_some(), "from this cluster");
        assert!(n.state.check_receipt(4, 1, 0).is_some(), "beyond the cluster count");
        assert!(n.state.check_receipt(2, 1, 4).is_some(), "past what was sent");
        assert!(n.state.check_receipt(2, 2, 0).is_some(), "a later epoch");
        assert!(n.state.check_receipt(2, 1, 3).is_none());
        // What goes again to a destination that applied nothing, or one.
        let dest_seqs = |(evs, missing): (Vec<RemoteEvent>, u64)| (evs.iter().map(|e| e.dest_seq).collect(), missing);
        assert_eq!(dest_seqs(n.state.resend_to(2, 0, 2, 10)), (vec![1, 2], 0));
        assert_eq!(dest_seqs(n.state.resend_to(2, 1, 2, 10)), (vec![2], 0));
        assert_eq!(dest_seqs(n.state.resend_to(2, 0, 2, 1)), (vec![1], 0));
        let again = n.state.resend_to(3, 1, 2, 10).0;
        assert_eq!((again[0].origin, again[0].seq, again[0].change.clone()), (1, 2, Change::User(4)));
        // Cluster 2's receipt alone keeps both: cluster 3 has not said.
        n.state.apply(&Entry::Receipt { dest: 2, epoch: 1, applied: 2 });
        assert_eq!(outbox_seqs(&n), vec![1, 2, 3]);
        n.state.apply(&Entry::Receipt { dest: 3, epoch: 1, applied: 1 });
        assert_eq!(outbox_seqs(&n), vec![2, 3]);
        // An older receipt changes nothing.
        assert!(!n.state.receipt_advances(3, 1, 0));
        n.state.apply(&Entry::Receipt { dest: 3, epoch: 1, applied: 0 });
        assert_eq!(n.state.receipt_marks(), vec![(2, 1, 2), (3, 1, 1)]);
        n.state.apply(&Entry::Receipt { dest: 3, epoch: 1, applied: 2 });
        assert_eq!(outbox_seqs(&n), vec![3], "unconfirmed events stay whatever the receipts");
        // Gone for good: a receiver short of them is told how many.
        assert_eq!(dest_seqs(n.state.resend_to(3, 0, 2, 10)), (vec![], 2));
        n.state.apply(&Entry::PublishedUpto(3));
        assert_eq!(outbox_seqs(&n), vec![3]);
        // A snapshot carries the receipts and what they keep.
        let mut copy = State::new(1, 3);
        copy.apply(&Entry::Snapshot(Box::new(n.state.snapshot())));
        assert_eq!(copy.receipt_marks(), n.state.receipt_marks());
        assert_eq!(copy.retained_count(), 1);
        n.state.apply(&Entry::Receipt { dest: 2, epoch: 1, applied: 3 });
        assert!(outbox_seqs(&n).is_empty());
    }

    #[test]
    fn a_group_that_closes_a_gap_is_decided_as_if_it_came_in_order() {
        let mut n = Node::new(1);
        let ev = |q: u64| RemoteEvent {
            origin: 2,
            seq: q,
            epoch: 1,
            dest_seq: q,
            change: Change::User(2 + 3 * q as u32),
            recipients: vec![],
        };
        // Everything after event 1 came first: held, up to the bound.
        let top = HOLD_MAX as u64 + 1;
        for q in 2..=top {
            n.state.apply(&Entry::Remote(ev(q)));
        }
        assert_eq!(n.state.held_count(), HOLD_MAX);
        assert_eq!(n.state.arrival(&ev(top + 1)), Arrival::Full, "no room to hold more");
        // A group bringing event 1 first lets the held ones through: what
        // follows them in the group is next, not refused.
        let mut g = Group::default();
        let decide = |g: &mut Group, q: u64| {
            let a = n.state.arrival_in(&ev(q), g);
            n.state.take_in(&ev(q), &a, g);
            a
        };
        assert_eq!(decide(&mut g, 1), Arrival::Next);
        assert_eq!(decide(&mut g, top + 1), Arrival::Next);
        assert_eq!(decide(&mut g, 3), Arrival::Duplicate, "held, and let through by the group");
        assert_eq!(decide(&mut g, top + 1), Arrival::Duplicate, "a second copy in the group");
        // Out of order within the group: early, then let through.
        assert_eq!(decide(&mut g, top + 3), Arrival::Early);
        assert_eq!(decide(&mut g, top + 3), Arrival::Duplicate);
        assert_eq!(decide(&mut g, top + 2), Arrival::Next);
        assert_eq!(decide(&mut g, top + 4), Arrival::Next);
        // Applied in that order, the state agrees.
        for q in [1, top + 1, top + 3, top + 2, top + 4] {
            n.state.apply(&Entry::Remote(ev(q)));
        }
        assert_eq!((n.state.held_count(), n.state.stream_marks()[0].2), (0, top + 4));
    }

    #[test]
    fn a_gap_marker_steps_over_events_gone_for_good() {
        let mut n = Node::new(1);
        let ev = |epoch: u64, q: u64| RemoteEvent {
            origin: 2,
            seq: q,
            epoch,
            dest_seq: q,
            change: Change::User(2 + 3 * (10 * epoch + q) as u32),
            recipients: vec![],
        };
        n.state.apply(&Entry::Remote(ev(1, 1)));
        // 2 and 4 never come; 3 and 5..=7 wait for them.
        for q in [3, 5, 6, 7] {
            n.state.apply(&Entry::Remote(ev(1, q)));
        }
        assert_eq!(n.state.held_count(), 4);
        // Decided in a group first: what follows the hole is next.
        let mut g = Group::default();
        n.state.skip_in(2, 1, 4, &mut g);
        assert_eq!(n.state.arrival_in(&ev(1, 8), &g), Arrival::Next);
        assert_eq!(n.state.arrival_in(&ev(1, 6), &g), Arrival::Duplicate);
        // Markers that change nothing, or cannot be valid.
        assert!(!n.state.gap_advances(2, 1, 1), "behind what was applied");
        assert!(!n.state.gap_advances(1, 1, 9), "this cluster's own stream");
        assert!(!n.state.gap_advances(4, 1, 9), "beyond the cluster count");
        n.state.apply(&Entry::Gap { origin: 2, epoch: 1, upto: 4 });
        assert_eq!((n.state.held_count(), n.state.stream_marks()[0].2), (0, 7));
        assert!(n.state.has_user(2 + 3 * 17), "the held events applied");
        assert!(n.state.has_user(2 + 3 * 13), "a held event inside the hole applied, not dropped");
        assert!(!n.state.has_user(2 + 3 * 12), "a missing one stays missing");
        assert_eq!(n.state.arrival(&ev(1, 3)), Arrival::Duplicate, "a skipped one, late");
        // Into a newer epoch: its first events gone, the later ones go on.
        n.state.apply(&Entry::Remote(ev(2, 3)));
        assert_eq!(n.state.held_count(), 1);
        n.state.apply(&Entry::Gap { origin: 2, epoch: 2, upto: 2 });
        assert_eq!((n.state.held_count(), n.state.stream_marks()[0].1, n.state.stream_marks()[0].2), (0, 2, 3));
    }

    #[test]
    fn confirmed_events_kept_for_receipts_are_bounded() {
        let mut n = Node::new(1);
        let extra = 10;
        for i in 0..(RETAIN_MAX + extra) as u32 {
            n.local(Change::User(1 + 3 * i));
        }
        let last = n.state.next_seq() - 1;
        n.state.apply(&Entry::PublishedUpto(last));
        assert_eq!(n.state.retained_count(), RETAIN_MAX);
        assert_eq!(n.state.outbox_after(0).next().map(|e| e.seq), Some(extra as u64 + 1), "the oldest went");
        // A receiver short of the dropped ones is told they are gone.
        let (again, missing) = n.state.resend_to(2, 0, n.state.confirmed_to(2), 4);
        assert_eq!((again[0].dest_seq, missing), (extra as u64 + 1, extra as u64));
    }
}
