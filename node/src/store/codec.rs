//! Conversions between the domain types of [`super::state`] and their
//! protobuf form (journal records, replication requests, broker messages).
//! Decoding validates: a message that decodes but makes no sense (user 0,
//! an unknown cluster, a post with a newline) is rejected here, once.

use super::state::{
    Change, Delivery, Entry, FollowId, LocalOp, OutEvent, Post, RemoteEvent, Snapshot, UserSnapshot, feed_items,
};
use prost::Message as _;
use sns_proto::internal as pb;
use std::sync::Arc;

pub use sns_proto::rules::{MAX_POST_BYTES, check_post_text};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a valid protobuf message: {0}")]
    Protobuf(String),
    #[error("message has no content")]
    Empty,
    #[error("invalid field: {0}")]
    Invalid(String),
}

fn user(id: u32) -> Result<u32, DecodeError> {
    if id == 0 { Err(DecodeError::Invalid("user id 0".into())) } else { Ok(id) }
}

fn change_from_user(u: &pb::UserAdded) -> Result<Change, DecodeError> {
    Ok(Change::User(user(u.user)?))
}

fn change_from_relation(r: &pb::Relation) -> Result<Change, DecodeError> {
    Ok(Change::Relation { follower: user(r.follower)?, followee: user(r.followee)?, follow: r.follow, at_ms: r.at_ms })
}

fn post_from_pb(p: &pb::Post) -> Result<Post, DecodeError> {
    check_post_text(&p.text).map_err(DecodeError::Invalid)?;
    Ok(Post { user: user(p.user)?, text: Arc::from(p.text.as_str()), at_ms: p.at_ms, client_id: p.client_id })
}

fn change_from_post(p: &pb::Post) -> Result<Change, DecodeError> {
    post_from_pb(p).map(Change::Post)
}

fn relation_to_pb(follower: u32, followee: u32, follow: bool, at_ms: i64) -> pb::Relation {
    pb::Relation { follower, followee, follow, at_ms }
}

fn post_to_pb(p: &Post) -> pb::Post {
    pb::Post { user: p.user, text: p.text.to_string(), at_ms: p.at_ms, client_id: p.client_id }
}

fn edges(pairs: &[(u32, FollowId)]) -> Vec<pb::FollowEdge> {
    pairs.iter().map(|(user, follow_id)| pb::FollowEdge { user: *user, follow_id: *follow_id }).collect()
}

fn recipients_to_pb(r: &[(u32, FollowId)]) -> Vec<pb::Recipient> {
    r.iter().map(|(user, follow_id)| pb::Recipient { user: *user, follow_id: *follow_id }).collect()
}

fn recipients_from_pb(r: &[pb::Recipient]) -> Result<Vec<(u32, FollowId)>, DecodeError> {
    r.iter().map(|r| Ok((user(r.user)?, r.follow_id))).collect()
}

/// The snapshot formats: what a server reads (`ServerStatus.snapshot_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFormat {
    /// Every feed and timeline holds copies of its posts: a post with many
    /// followers is written once per follower.
    Copies,
    /// A table of posts, which feeds and timelines refer to by runs of
    /// consecutive indexes (format 3; format 2, plain indexes, is read but
    /// no longer written).
    Tabled,
}

impl SnapshotFormat {
    /// The newest this version reads.
    pub const NEWEST: SnapshotFormat = SnapshotFormat::Tabled;

    /// As `ServerStatus.snapshot_format` says it.
    pub fn number(self) -> u32 {
        match self {
            SnapshotFormat::Copies => 0,
            SnapshotFormat::Tabled => 3,
        }
    }

    /// The format for a server that reads up to `number` (unknown, newer
    /// numbers: the newest this version writes).
    pub fn readable_by(number: u32) -> SnapshotFormat {
        // A reader of format 2 alone would find no references it knows in
        // format 3 and read empty feeds: it gets copies.
        if number >= 3 { SnapshotFormat::Tabled } else { SnapshotFormat::Copies }
    }
}

/// Indexes as runs of consecutive ones: each run's start as the difference
/// from where the run before it ended (0 before the first), and its length.
fn index_runs(refs: impl IntoIterator<Item = u32>) -> (Vec<i64>, Vec<u32>) {
    let (mut starts, mut lengths) = (Vec::new(), Vec::<u32>::new());
    let mut end = 0i64; // One past the last index of the run in progress.
    for r in refs {
        let r = i64::from(r);
        match lengths.last_mut() {
            Some(n) if r == end => *n += 1,
            previous => {
                let ended = if previous.is_some() { end } else { 0 };
                starts.push(r - ended);
                lengths.push(1);
            }
        }
        end = r + 1;
    }
    (starts, lengths)
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// `refs` as [`index_runs`] when that encodes shorter than the plain
/// indexes (equal: plain).
fn shorter_runs(refs: &[u32]) -> Option<(Vec<i64>, Vec<u32>)> {
    let (starts, lengths) = index_runs(refs.iter().copied());
    let zigzag = |v: i64| ((v << 1) ^ (v >> 63)) as u64;
    let plain: usize = refs.iter().map(|r| varint_len(u64::from(*r))).sum();
    let runs: usize =
        starts.iter().map(|d| varint_len(zigzag(*d))).chain(lengths.iter().map(|n| varint_len(u64::from(*n)))).sum();
    (runs < plain).then_some((starts, lengths))
}

/// The indexes of [`index_runs`]' runs, each below `table`.
fn indexes_of_runs(starts: &[i64], lengths: &[u32], table: usize, what: &str) -> Result<Vec<u32>, DecodeError> {
    let bad = |why: String| Err(DecodeError::Invalid(format!("a {what}'s runs: {why}")));
    if starts.len() != lengths.len() {
        return bad(format!("{} starts for {} lengths", starts.len(), lengths.len()));
    }
    let mut refs = Vec::new();
    let mut end = 0i64;
    for (d, n) in starts.iter().zip(lengths) {
        let start = end.checked_add(*d).filter(|s| *s >= 0);
        let stop = start.and_then(|s| s.checked_add(i64::from(*n)));
        match (start, stop) {
            (Some(start), Some(stop)) if *n > 0 && stop <= table as i64 => {
                refs.extend(start as u32..stop as u32);
                end = stop;
            }
            _ => return bad(format!("a run of {n} at {end} {d:+} in a table of {table}")),
        }
    }
    Ok(refs)
}

/// Equal follow ids as runs: each id and how many times in a row.
fn follow_runs(ids: impl IntoIterator<Item = u64>) -> (Vec<u64>, Vec<u32>) {
    let (mut values, mut lengths) = (Vec::<u64>::new(), Vec::<u32>::new());
    for id in ids {
        match (values.last(), lengths.last_mut()) {
            (Some(v), Some(n)) if *v == id => *n += 1,
            _ => {
                values.push(id);
                lengths.push(1);
            }
        }
    }
    (values, lengths)
}

/// The table of posts of a tabled snapshot: each distinct post once, in
/// the order first met (users in order, timeline before feed), so equal
/// states encode to equal bytes.
#[derive(Default)]
struct PostTable<'a> {
    index: std::collections::HashMap<(u32, i64, u64, &'a str), u32>,
    posts: Vec<pb::Post>,
}

impl<'a> PostTable<'a> {
    fn refer(&mut self, p: &'a Post) -> u32 {
        let posts = &mut self.posts;
        *self.index.entry((p.user, p.at_ms, p.client_id, &p.text)).or_insert_with(|| {
            posts.push(post_to_pb(p));
            (posts.len() - 1) as u32
        })
    }
}

pub fn snapshot_to_pb(s: &Snapshot, cluster: u32, format: SnapshotFormat) -> pb::StateSnapshot {
    let mut table = PostTable::default();
    let local_users = s
        .local_users
        .iter()
        .map(|u| {
            let mut user = pb::UserState {
                user: u.user,
                following: edges(&u.following),
                followers: vec![],
                recent_post_ids: u.recent_post_ids.clone(),
                recent_request_ids: u.recent_request_ids.clone(),
                follower_edges: edges(&u.followers),
                ..Default::default()
            };
            match format {
                SnapshotFormat::Copies => {
                    user.timeline = u.timeline.iter().map(post_to_pb).collect();
                    user.feed = u.feed.iter().map(|i| post_to_pb(&i.post)).collect();
                    user.feed_follow_ids = u.feed.iter().map(|i| i.follow).collect();
                }
                SnapshotFormat::Tabled => {
                    // Runs, or plain indexes where they are shorter (a feed
                    // of many followees' posts interleaved).
                    let timeline: Vec<u32> = u.timeline.iter().map(|p| table.refer(p)).collect();
                    match shorter_runs(&timeline) {
                        Some(runs) => (user.timeline_run_starts, user.timeline_run_lengths) = runs,
                        None => user.timeline_refs = timeline,
                    }
                    let feed: Vec<u32> = u.feed.iter().map(|i| table.refer(&i.post)).collect();
                    match shorter_runs(&feed) {
                        Some(runs) => (user.feed_run_starts, user.feed_run_lengths) = runs,
                        None => user.feed_refs = feed,
                    }
                    let follows: Vec<u64> = u.feed.iter().map(|i| i.follow).collect();
                    let (ids, lengths) = follow_runs(follows.iter().copied());
                    let listed: usize = follows.iter().map(|f| varint_len(*f)).sum();
                    let in_runs: usize = ids
                        .iter()
                        .map(|f| varint_len(*f))
                        .chain(lengths.iter().map(|n| varint_len(u64::from(*n))))
                        .sum();
                    if in_runs < listed {
                        (user.feed_follow_run_ids, user.feed_follow_run_lengths) = (ids, lengths);
                    } else {
                        user.feed_follow_ids = follows;
                    }
                }
            }
            user
        })
        .collect();
    pb::StateSnapshot {
        cluster,
        users: s.users.clone(),
        local_users,
        posts: table.posts,
        next_seq: s.next_seq,
        published_upto: s.published_upto,
        outbox: vec![],
        applied: s.applied.iter().map(|(o, e, q)| pb::OriginMark { origin: *o, seq: *q, epoch: *e }).collect(),
        outbox_events: s.outbox.iter().map(|e| outbox_event_to_pb(e, cluster)).collect(),
        held: s.held.iter().map(event_to_pb).collect(),
        epoch: s.epoch,
        sent: s.sent.iter().map(|(d, q)| pb::OriginMark { origin: *d, seq: *q, epoch: s.epoch }).collect(),
        receipts: s.receipts.iter().map(|(d, e, q)| pb::OriginMark { origin: *d, seq: *q, epoch: *e }).collect(),
    }
}

pub fn snapshot_from_pb(s: &pb::StateSnapshot, clusters: u32) -> Result<Snapshot, DecodeError> {
    let posts = |ps: &[pb::Post]| ps.iter().map(post_from_pb).collect::<Result<Vec<_>, _>>();
    // A tabled snapshot's posts: decoded once, shared by every feed that
    // refers to one (one text in memory, as when they were first applied).
    let table = posts(&s.posts)?;
    // Format 2's plain indexes, or format 3's runs of them.
    let refs = |plain: &[u32], starts: &[i64], lengths: &[u32], what: &str| -> Result<Vec<u32>, DecodeError> {
        match (plain.is_empty(), starts.is_empty() && lengths.is_empty()) {
            (_, true) => Ok(plain.to_vec()),
            (true, false) => indexes_of_runs(starts, lengths, table.len(), what),
            (false, false) => Err(DecodeError::Invalid(format!("a {what} both indexed and in runs"))),
        }
    };
    let refer = |copies: &[pb::Post], refs: &[u32], what: &str| -> Result<Vec<Post>, DecodeError> {
        if refs.is_empty() {
            return posts(copies);
        }
        if !copies.is_empty() {
            return Err(DecodeError::Invalid(format!("a {what} both copied and referred to")));
        }
        refs.iter()
            .map(|i| {
                table.get(*i as usize).cloned().ok_or_else(|| {
                    DecodeError::Invalid(format!("a {what} refers to post {i} of a table of {}", table.len()))
                })
            })
            .collect()
    };
    let pairs =
        |es: &[pb::FollowEdge]| es.iter().map(|e| Ok((user(e.user)?, e.follow_id))).collect::<Result<Vec<_>, _>>();
    let mut outbox: Vec<OutEvent> =
        s.outbox_events.iter().map(|e| outbox_event_from_pb(e, clusters)).collect::<Result<_, _>>()?;
    // An earlier version's outbox: its events, to every other cluster.
    for e in &s.outbox {
        let ev = event_from_pb(e, clusters)?;
        let deliveries = (1..=clusters)
            .filter(|c| *c != ev.origin)
            .map(|dest| Delivery { dest, dest_seq: 0, recipients: vec![] })
            .collect();
        outbox.push(OutEvent { seq: ev.seq, epoch: 0, change: ev.change, deliveries });
    }
    Ok(Snapshot {
        users: s.users.iter().map(|u| user(*u)).collect::<Result<_, _>>()?,
        local_users: s
            .local_users
            .iter()
            .map(|u| {
                let feed_refs = refs(&u.feed_refs, &u.feed_run_starts, &u.feed_run_lengths, "feed")?;
                let feed = refer(&u.feed, &feed_refs, "feed")?;
                let follow_runs = u.feed_follow_run_ids.iter().zip(&u.feed_follow_run_lengths);
                if !u.feed_follow_run_ids.is_empty() || !u.feed_follow_run_lengths.is_empty() {
                    if !u.feed_follow_ids.is_empty() {
                        return Err(DecodeError::Invalid("follow ids both listed and in runs".into()));
                    }
                    let runs = follow_runs.clone().map(|(_, n)| u64::from(*n)).sum::<u64>();
                    if u.feed_follow_run_ids.len() != u.feed_follow_run_lengths.len() || runs != feed.len() as u64 {
                        return Err(DecodeError::Invalid(format!(
                            "{} follow runs of {runs} ids for a feed of {}",
                            u.feed_follow_run_ids.len(),
                            feed.len()
                        )));
                    }
                }
                let run_ids = follow_runs.flat_map(|(id, n)| std::iter::repeat_n(*id, *n as usize));
                let follows = u.feed_follow_ids.iter().copied().chain(run_ids).chain(std::iter::repeat(0));
                // Earlier versions kept followers without follow ids.
                let followers = if u.follower_edges.is_empty() {
                    u.followers.iter().map(|f| Ok((user(*f)?, 0))).collect::<Result<Vec<_>, DecodeError>>()?
                } else {
                    pairs(&u.follower_edges)?
                };
                Ok(UserSnapshot {
                    user: user(u.user)?,
                    following: pairs(&u.following)?,
                    followers,
                    timeline: refer(
                        &u.timeline,
                        &refs(&u.timeline_refs, &u.timeline_run_starts, &u.timeline_run_lengths, "timeline")?,
                        "timeline",
                    )?,
                    feed: feed_items(feed.into_iter().zip(follows)),
                    recent_post_ids: u.recent_post_ids.clone(),
                    recent_request_ids: u.recent_request_ids.clone(),
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        next_seq: s.next_seq,
        published_upto: s.published_upto,
        outbox,
        applied: s.applied.iter().map(|m| (m.origin, m.epoch, m.seq)).collect(),
        held: s.held.iter().map(|e| event_from_pb(e, clusters)).collect::<Result<_, _>>()?,
        epoch: s.epoch,
        sent: s.sent.iter().map(|m| (m.origin, m.seq)).collect(),
        receipts: s.receipts.iter().map(|m| (m.origin, m.epoch, m.seq)).collect(),
    })
}

fn outbox_event_to_pb(e: &OutEvent, origin: u32) -> pb::OutboxEvent {
    let event =
        RemoteEvent { origin, seq: e.seq, epoch: e.epoch, dest_seq: 0, change: e.change.clone(), recipients: vec![] };
    pb::OutboxEvent {
        event: Some(event_to_pb(&event)),
        deliveries: e
            .deliveries
            .iter()
            .map(|d| pb::Delivery { dest: d.dest, dest_seq: d.dest_seq, recipients: recipients_to_pb(&d.recipients) })
            .collect(),
    }
}

fn outbox_event_from_pb(e: &pb::OutboxEvent, clusters: u32) -> Result<OutEvent, DecodeError> {
    let pb_event = e.event.as_ref().ok_or(DecodeError::Empty)?;
    // The journal does not know its cluster: an outbox event's origin is
    // this server's, whatever is written there.
    let ev = event_from_pb(&pb::SyncEvent { origin_cluster: 1, ..pb_event.clone() }, clusters.max(1))?;
    let deliveries = e
        .deliveries
        .iter()
        .map(|d| Ok(Delivery { dest: d.dest, dest_seq: d.dest_seq, recipients: recipients_from_pb(&d.recipients)? }))
        .collect::<Result<_, DecodeError>>()?;
    Ok(OutEvent { seq: ev.seq, epoch: ev.epoch, change: ev.change, deliveries })
}

/// An outbox event as published to one destination.
pub fn delivery_to_pb(e: &OutEvent, origin: u32, d: &Delivery) -> pb::SyncEvent {
    pb::SyncEvent { dest_cluster: d.dest, ..event_to_pb(&e.for_delivery(origin, d)) }
}

/// Encodes a snapshot for the wire (`InstallSnapshot` chunks), in a
/// `format` the receiver reads.
pub fn encode_snapshot(s: &Snapshot, cluster: u32, format: SnapshotFormat) -> Vec<u8> {
    snapshot_to_pb(s, cluster, format).encode_to_vec()
}

/// Decodes a snapshot sent by the master of `cluster`.
pub fn decode_snapshot(body: &[u8], cluster: u32, clusters: u32) -> Result<Snapshot, DecodeError> {
    let msg = pb::StateSnapshot::decode(body).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    if msg.cluster != cluster {
        return Err(DecodeError::Invalid(format!("snapshot of cluster {} sent to cluster {cluster}", msg.cluster)));
    }
    snapshot_from_pb(&msg, clusters)
}

pub fn local_op_to_pb(op: &LocalOp) -> pb::LocalOp {
    use pb::local_op::Kind;
    let kind = match &op.change {
        Change::User(u) => Kind::Login(pb::UserAdded { user: *u }),
        Change::Relation { follower, followee, follow, at_ms } => {
            Kind::Relation(relation_to_pb(*follower, *followee, *follow, *at_ms))
        }
        Change::Post(p) => Kind::Post(post_to_pb(p)),
    };
    pb::LocalOp { seq: op.seq, kind: Some(kind), request_id: op.request_id }
}

pub fn local_op_from_pb(op: &pb::LocalOp) -> Result<LocalOp, DecodeError> {
    use pb::local_op::Kind;
    let change = match op.kind.as_ref().ok_or(DecodeError::Empty)? {
        Kind::Login(u) => change_from_user(u)?,
        Kind::Relation(r) => change_from_relation(r)?,
        Kind::Post(p) => change_from_post(p)?,
    };
    if op.seq == 0 {
        return Err(DecodeError::Invalid("seq 0".into()));
    }
    Ok(LocalOp { seq: op.seq, change, request_id: op.request_id })
}

pub fn event_to_pb(e: &RemoteEvent) -> pb::SyncEvent {
    use pb::sync_event::Kind;
    let kind = match &e.change {
        Change::User(u) => Kind::User(pb::UserAdded { user: *u }),
        Change::Relation { follower, followee, follow, at_ms } => {
            Kind::Relation(relation_to_pb(*follower, *followee, *follow, *at_ms))
        }
        Change::Post(p) => Kind::Post(post_to_pb(p)),
    };
    pb::SyncEvent {
        origin_cluster: e.origin,
        seq: e.seq,
        kind: Some(kind),
        epoch: e.epoch,
        dest_cluster: 0,
        dest_seq: e.dest_seq,
        recipients: recipients_to_pb(&e.recipients),
    }
}

/// Validates a decoded broker event for a deployment of `clusters` clusters.
pub fn event_from_pb(e: &pb::SyncEvent, clusters: u32) -> Result<RemoteEvent, DecodeError> {
    use pb::sync_event::Kind;
    if e.origin_cluster == 0 || e.origin_cluster > clusters {
        return Err(DecodeError::Invalid(format!("origin cluster {} of {clusters}", e.origin_cluster)));
    }
    if e.seq == 0 {
        return Err(DecodeError::Invalid("seq 0".into()));
    }
    let change = match e.kind.as_ref().ok_or(DecodeError::Empty)? {
        Kind::User(u) => change_from_user(u)?,
        Kind::Relation(r) => change_from_relation(r)?,
        Kind::Post(p) => change_from_post(p)?,
    };
    Ok(RemoteEvent {
        origin: e.origin_cluster,
        seq: e.seq,
        epoch: e.epoch,
        dest_seq: e.dest_seq,
        change,
        recipients: recipients_from_pb(&e.recipients)?,
    })
}

/// The AMQP `type` of a broker message whose body is a `SyncBatch`: a run
/// of one origin's events in seq order. A message without it holds one
/// `SyncEvent` (what a single-event publisher sends).
pub const BATCH_TYPE: &str = "tinysns.internal.v1.SyncBatch";
/// The AMQP type of a stream receipt (one `StreamReceipt`).
pub const RECEIPT_TYPE: &str = "tinysns.internal.v1.StreamReceipt";
/// The AMQP type of a gap marker (one `StreamGap`).
pub const GAP_TYPE: &str = "tinysns.internal.v1.StreamGap";

/// Encodes events as a `SyncBatch` broker message body.
pub fn encode_batch(events: &[pb::SyncEvent]) -> Vec<u8> {
    let len: usize = events.iter().map(|e| prost::encoding::message::encoded_len(1, e)).sum();
    let mut buf = Vec::with_capacity(len);
    for e in events {
        prost::encoding::message::encode(1, e, &mut buf);
    }
    buf
}

/// Decodes and validates a broker message body: a batch (`batch`, see
/// [`BATCH_TYPE`]) must hold events of one origin with increasing seqs.
pub fn decode_message(body: &[u8], batch: bool, clusters: u32) -> Result<Vec<pb::SyncEvent>, DecodeError> {
    let events = if batch {
        pb::SyncBatch::decode(body).map_err(|e| DecodeError::Protobuf(e.to_string()))?.events
    } else {
        vec![pb::SyncEvent::decode(body).map_err(|e| DecodeError::Protobuf(e.to_string()))?]
    };
    let first = events.first().ok_or(DecodeError::Empty)?;
    let (origin, mut last) = (first.origin_cluster, 0);
    for e in &events {
        event_from_pb(e, clusters)?;
        if e.origin_cluster != origin || e.seq <= last {
            return Err(DecodeError::Invalid(format!(
                "batch out of order: event {}:{} after {origin}:{last}",
                e.origin_cluster, e.seq
            )));
        }
        last = e.seq;
    }
    Ok(events)
}

pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    entry_to_pb(entry).encode_to_vec()
}

pub fn entry_to_pb(entry: &Entry) -> pb::JournalEntry {
    use pb::journal_entry::Entry as E;
    let e = match entry {
        Entry::Local(op) => E::Local(local_op_to_pb(op)),
        Entry::Remote(ev) => E::Remote(event_to_pb(ev)),
        Entry::PublishedUpto(n) => E::PublishedUpto(*n),
        Entry::Gap { origin, epoch, upto } => {
            E::Gap(pb::StreamGap { origin_cluster: *origin, epoch: *epoch, upto: *upto, ..Default::default() })
        }
        Entry::Receipt { dest, epoch, applied } => E::Receipt(pb::StreamReceipt {
            from_cluster: *dest,
            epoch: *epoch,
            applied: *applied,
            ..Default::default()
        }),
        // The journal does not know its cluster; 0 marks "this server's".
        Entry::Snapshot(s) => E::RunSnapshot(snapshot_to_pb(s, 0, SnapshotFormat::Tabled)),
    };
    pb::JournalEntry { entry: Some(e) }
}

pub fn decode_entry(body: &[u8], clusters: u32) -> Result<Entry, DecodeError> {
    let msg = pb::JournalEntry::decode(body).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
    entry_from_pb(msg, clusters)
}

pub fn entry_from_pb(msg: pb::JournalEntry, clusters: u32) -> Result<Entry, DecodeError> {
    use pb::journal_entry::Entry as E;
    match msg.entry.ok_or(DecodeError::Empty)? {
        E::Local(op) => Ok(Entry::Local(local_op_from_pb(&op)?)),
        E::Remote(ev) => Ok(Entry::Remote(event_from_pb(&ev, clusters)?)),
        E::PublishedUpto(n) => Ok(Entry::PublishedUpto(n)),
        E::Receipt(r) => Ok(Entry::Receipt { dest: r.from_cluster, epoch: r.epoch, applied: r.applied }),
        E::Gap(g) => Ok(Entry::Gap { origin: g.origin_cluster, epoch: g.epoch, upto: g.upto }),
        E::Snapshot(s) | E::TabledSnapshot(s) | E::RunSnapshot(s) => {
            Ok(Entry::Snapshot(Box::new(snapshot_from_pb(&s, clusters)?)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_event(e: &RemoteEvent) -> Vec<u8> {
        event_to_pb(e).encode_to_vec()
    }

    /// A single-event broker message, through the consumer's decoder.
    fn decode_event(body: &[u8], clusters: u32) -> Result<RemoteEvent, DecodeError> {
        event_from_pb(&decode_message(body, false, clusters)?[0], clusters)
    }

    fn re(origin: u32, seq: u64, change: Change) -> RemoteEvent {
        RemoteEvent { origin, seq, epoch: 1, dest_seq: seq, change, recipients: vec![] }
    }

    fn samples() -> Vec<Change> {
        vec![
            Change::User(7),
            Change::Relation { follower: 1, followee: 2, follow: true, at_ms: 5 },
            Change::Relation { follower: 1, followee: 2, follow: false, at_ms: 6 },
            Change::Post(Post { user: 3, text: "héllo".into(), at_ms: 1_700_000_000_123, client_id: 42 }),
        ]
    }

    #[test]
    fn events_round_trip() {
        for (i, change) in samples().into_iter().enumerate() {
            let e = RemoteEvent { recipients: vec![(4, 17), (7, 2)], ..re(2, i as u64 + 1, change) };
            assert_eq!(decode_event(&encode_event(&e), 3), Ok(e));
        }
    }

    #[test]
    fn journal_entries_round_trip() {
        for (i, change) in samples().into_iter().enumerate() {
            let local = Entry::Local(LocalOp { seq: i as u64 + 1, change: change.clone(), request_id: i as u64 });
            assert_eq!(decode_entry(&encode_entry(&local), 3), Ok(local));
            let remote = Entry::Remote(re(3, 9, change));
            assert_eq!(decode_entry(&encode_entry(&remote), 3), Ok(remote));
        }
        let mark = Entry::PublishedUpto(42);
        assert_eq!(decode_entry(&encode_entry(&mark), 3), Ok(mark));
        let receipt = Entry::Receipt { dest: 2, epoch: 3, applied: 77 };
        assert_eq!(decode_entry(&encode_entry(&receipt), 3), Ok(receipt));
        let gap = Entry::Gap { origin: 3, epoch: 2, upto: 41 };
        assert_eq!(decode_entry(&encode_entry(&gap), 3), Ok(gap));
        let snap = Snapshot {
            users: vec![1, 2, 4],
            local_users: vec![UserSnapshot {
                user: 1,
                following: vec![(2, 7)],
                followers: vec![(4, 3), (2, 11)],
                timeline: vec![Post { user: 1, text: "t".into(), at_ms: 3, client_id: 9 }],
                feed: feed_items([(Post { user: 2, text: "f".into(), at_ms: 8, client_id: 0 }, 7)]),
                recent_post_ids: vec![9],
                recent_request_ids: vec![77],
            }],
            next_seq: 12,
            published_upto: 10,
            outbox: vec![OutEvent {
                seq: 11,
                epoch: 1,
                change: Change::User(4),
                deliveries: vec![
                    Delivery { dest: 2, dest_seq: 5, recipients: vec![] },
                    Delivery { dest: 3, dest_seq: 4, recipients: vec![(3, 1)] },
                ],
            }],
            applied: vec![(2, 1, 5)],
            held: vec![re(3, 8, Change::User(9))],
            epoch: 1,
            sent: vec![(2, 5), (3, 4)],
            receipts: vec![(2, 1, 4), (3, 1, 2)],
        };
        let entry = Entry::Snapshot(Box::new(snap.clone()));
        assert_eq!(decode_entry(&encode_entry(&entry), 3), Ok(entry));
        for format in [SnapshotFormat::Copies, SnapshotFormat::Tabled] {
            assert_eq!(decode_snapshot(&encode_snapshot(&snap, 1, format), 1, 3), Ok(snap.clone()), "{format:?}");
            assert!(decode_snapshot(&encode_snapshot(&snap, 2, format), 1, 3).is_err(), "another cluster's state");
        }
        // A journal an earlier version compacted (copies, under `snapshot`).
        use pb::journal_entry::Entry as E;
        let earlier = pb::JournalEntry { entry: Some(E::Snapshot(snapshot_to_pb(&snap, 0, SnapshotFormat::Copies))) };
        assert_eq!(decode_entry(&earlier.encode_to_vec(), 3), Ok(Entry::Snapshot(Box::new(snap))));
    }

    /// One author, `followers` local followers, `posts` posts: each post
    /// in the author's timeline and in every follower's feed.
    fn fan_out(followers: u32, posts: i64) -> Snapshot {
        let post = |i: i64| Post { user: 1, text: format!("post number {i}").into(), at_ms: 1_000 + i, client_id: 0 };
        let mut local_users = vec![UserSnapshot {
            user: 1,
            following: vec![],
            followers: (0..followers).map(|f| (4 + 3 * f, u64::from(f) + 1)).collect(),
            timeline: (0..posts).map(post).collect(),
            feed: vec![],
            recent_post_ids: vec![],
            recent_request_ids: vec![],
        }];
        for f in 0..followers {
            local_users.push(UserSnapshot {
                user: 4 + 3 * f,
                following: vec![(1, u64::from(f) + 1)],
                followers: vec![],
                timeline: vec![],
                feed: feed_items((0..posts).map(|i| (post(i), u64::from(f) + 1))),
                recent_post_ids: vec![],
                recent_request_ids: vec![],
            });
        }
        let users = local_users.iter().map(|u| u.user).collect();
        Snapshot {
            users,
            local_users,
            next_seq: 1,
            published_upto: 0,
            outbox: vec![],
            applied: vec![],
            held: vec![],
            epoch: 1,
            sent: vec![],
            receipts: vec![],
        }
    }

    #[test]
    fn a_tabled_snapshot_holds_each_post_once() {
        let snap = fan_out(20, 50);
        let copies = encode_snapshot(&snap, 1, SnapshotFormat::Copies);
        let tabled = encode_snapshot(&snap, 1, SnapshotFormat::Tabled);
        // 50 posts in 21 places: copies hold 1,050 posts, the table 50 and
        // 1,050 small indexes.
        assert!(tabled.len() * 5 < copies.len(), "{} vs {}", tabled.len(), copies.len());
        let decoded = decode_snapshot(&tabled, 1, 3).unwrap();
        assert_eq!(decoded, snap);
        // Decoded once, the posts share their text, as applied posts do.
        let first = |u: usize| decoded.local_users[u].feed[0].post.text.clone();
        assert!(Arc::ptr_eq(&first(1), &first(20)));
        assert!(Arc::ptr_eq(&first(1), &decoded.local_users[0].timeline[0].text));
        // Equal states, equal bytes (replicas compare their files).
        assert_eq!(encode_snapshot(&decoded, 1, SnapshotFormat::Tabled), tabled);
        // A feed out of the table's order (here: reversed, with mixed
        // follow ids) is written as plain indexes, and reads back.
        let mut mixed = fan_out(3, 20);
        let reversed: Vec<(Post, u64)> =
            mixed.local_users[1].feed.iter().rev().enumerate().map(|(i, f)| (f.post.clone(), i as u64 % 3)).collect();
        mixed.local_users[1].feed = feed_items(reversed);
        let pb = snapshot_to_pb(&mixed, 1, SnapshotFormat::Tabled);
        assert_eq!(pb.local_users[1].feed_refs.len(), 20);
        assert_eq!(pb.local_users[1].feed_follow_ids.len(), 20);
        assert!(pb.local_users[1].feed_run_starts.is_empty() && pb.local_users[2].feed_refs.is_empty());
        assert_eq!(decode_snapshot(&pb.encode_to_vec(), 1, 3), Ok(mixed));
        // Identical posts (same author, time, id and text) are one entry.
        let mut twice = fan_out(1, 1);
        let again = twice.local_users[0].timeline[0].clone();
        twice.local_users[0].timeline.push(again);
        assert_eq!(snapshot_to_pb(&twice, 1, SnapshotFormat::Tabled).posts.len(), 1);
        assert_eq!(decode_snapshot(&encode_snapshot(&twice, 1, SnapshotFormat::Tabled), 1, 3), Ok(twice));
    }

    #[test]
    fn a_tabled_snapshot_with_bad_references_is_refused() {
        let snap = fan_out(2, 3);
        let tabled = || snapshot_to_pb(&snap, 1, SnapshotFormat::Tabled);
        let refused = |pb: pb::StateSnapshot| decode_snapshot(&pb.encode_to_vec(), 1, 3).unwrap_err().to_string();
        // Each feed is one run of the 3 posts.
        assert_eq!(
            (tabled().local_users[1].feed_run_starts.clone(), tabled().local_users[1].feed_run_lengths.clone()),
            (vec![0], vec![3])
        );
        let mut pb = tabled();
        pb.local_users[1].feed_run_lengths[0] = 4;
        assert!(refused(pb).contains("a feed's runs: a run of 4 at 0 +0 in a table of 3"));
        let mut pb = tabled();
        pb.local_users[1].feed_run_lengths[0] = 0;
        assert!(refused(pb).contains("a run of 0"));
        let mut pb = tabled();
        pb.local_users[1].feed_run_starts[0] = -1;
        assert!(refused(pb).contains("a run of 3 at 0 -1"));
        let mut pb = tabled();
        pb.local_users[1].feed_run_starts.push(0);
        assert!(refused(pb).contains("2 starts for 1 lengths"));
        let mut pb = tabled();
        pb.local_users[1].feed_follow_run_lengths[0] = 2;
        assert!(refused(pb).contains("1 follow runs of 2 ids for a feed of 3"));
        let mut pb = tabled();
        pb.local_users[1].feed_refs = vec![0, 1, 2];
        assert!(refused(pb).contains("both indexed and in runs"));
        let mut pb = tabled();
        pb.local_users[0].timeline.push(post_to_pb(&snap.local_users[0].timeline[0]));
        assert!(refused(pb).contains("a timeline both copied and referred to"));
        // A table post is checked like any post.
        let mut pb = tabled();
        pb.posts[1].text = "two\nlines".into();
        assert!(decode_snapshot(&pb.encode_to_vec(), 1, 3).is_err());
    }

    /// Format 2: the same table, plain indexes.
    fn plain_indexes(mut pb: pb::StateSnapshot) -> pb::StateSnapshot {
        let table = pb.posts.len();
        for u in &mut pb.local_users {
            u.feed_refs = indexes_of_runs(&u.feed_run_starts, &u.feed_run_lengths, table, "feed").unwrap();
            u.timeline_refs =
                indexes_of_runs(&u.timeline_run_starts, &u.timeline_run_lengths, table, "timeline").unwrap();
            u.feed_follow_ids = u
                .feed_follow_run_ids
                .iter()
                .zip(&u.feed_follow_run_lengths)
                .flat_map(|(id, n)| std::iter::repeat_n(*id, *n as usize))
                .collect();
            for v in [&mut u.feed_run_starts, &mut u.timeline_run_starts] {
                v.clear();
            }
            for v in [&mut u.feed_run_lengths, &mut u.timeline_run_lengths, &mut u.feed_follow_run_lengths] {
                v.clear();
            }
            u.feed_follow_run_ids.clear();
        }
        pb
    }

    #[test]
    fn a_journal_compacted_with_plain_indexes_still_reads() {
        let snap = fan_out(3, 4);
        let pb = plain_indexes(snapshot_to_pb(&snap, 0, SnapshotFormat::Tabled));
        assert_eq!(pb.local_users[2].feed_refs, vec![0, 1, 2, 3]);
        use pb::journal_entry::Entry as E;
        let entry = pb::JournalEntry { entry: Some(E::TabledSnapshot(pb)) };
        assert_eq!(decode_entry(&entry.encode_to_vec(), 3), Ok(Entry::Snapshot(Box::new(snap))));
    }

    #[test]
    fn index_runs_give_back_their_indexes() {
        let cases: [&[u32]; 7] =
            [&[], &[0], &[5, 6, 7], &[3, 2, 1, 0], &[0, 1, 9, 10, 4, 5, 5], &[7, 0, 7, 0], &[u32::MAX - 1]];
        for refs in cases {
            let (starts, lengths) = index_runs(refs.iter().copied());
            let table = refs.iter().map(|r| *r as usize + 1).max().unwrap_or(0);
            assert_eq!(indexes_of_runs(&starts, &lengths, table, "feed").unwrap(), refs, "{starts:?} {lengths:?}");
        }
        assert_eq!(index_runs([4, 5, 6, 10, 11]), (vec![4, 3], vec![3, 2]));
        // Interleaved indexes are shorter plain; consecutive ones in runs.
        assert_eq!(shorter_runs(&[0, 200, 1, 201, 2, 202]), None);
        assert_eq!(shorter_runs(&(300..400).collect::<Vec<_>>()), Some((vec![300], vec![100])));
        assert_eq!(shorter_runs(&[]), None);
        assert_eq!(follow_runs([7, 7, 7, 2, 7]), (vec![7, 2, 7], vec![3, 1, 1]));
    }

    #[test]
    fn snapshot_formats_are_chosen_by_what_the_receiver_reads() {
        assert_eq!(SnapshotFormat::readable_by(0), SnapshotFormat::Copies, "an earlier version says nothing");
        assert_eq!(SnapshotFormat::readable_by(SnapshotFormat::NEWEST.number()), SnapshotFormat::NEWEST);
        assert_eq!(SnapshotFormat::readable_by(9), SnapshotFormat::Tabled, "a later version reads ours");
        // Format 2 readers know plain indexes only: they get copies.
        assert_eq!(SnapshotFormat::readable_by(2), SnapshotFormat::Copies);
    }

    #[test]
    fn a_delivery_names_its_destination() {
        let e = OutEvent {
            seq: 4,
            epoch: 2,
            change: Change::User(1),
            deliveries: vec![Delivery { dest: 3, dest_seq: 9, recipients: vec![] }],
        };
        let pb = delivery_to_pb(&e, 1, &e.deliveries[0]);
        assert_eq!((pb.origin_cluster, pb.seq, pb.epoch, pb.dest_cluster, pb.dest_seq), (1, 4, 2, 3, 9));
    }

    #[test]
    fn broker_batches_round_trip_and_must_be_one_origin_in_order() {
        let ev = |origin, seq, user| event_to_pb(&re(origin, seq, Change::User(user)));
        let batch = vec![ev(2, 7, 4), ev(2, 9, 5)];
        assert_eq!(decode_message(&encode_batch(&batch), true, 3), Ok(batch));
        let single = encode_event(&re(1, 3, Change::User(1)));
        assert_eq!(decode_message(&single, false, 3), Ok(vec![ev(1, 3, 1)]));
        assert_eq!(decode_message(&encode_batch(&[]), true, 3), Err(DecodeError::Empty));
        assert!(decode_message(&encode_batch(&[ev(2, 9, 4), ev(2, 9, 5)]), true, 3).is_err(), "seq repeated");
        assert!(decode_message(&encode_batch(&[ev(2, 9, 4), ev(3, 10, 5)]), true, 3).is_err(), "two origins");
        assert!(decode_message(&encode_batch(&[ev(2, 9, 4), ev(2, 10, 0)]), true, 3).is_err(), "user 0");
        assert!(decode_message(b"\xff\xff", true, 3).is_err());
    }

    #[test]
    fn malformed_events_are_rejected() {
        assert!(matches!(decode_event(b"\xff\xff\xff", 3), Err(DecodeError::Protobuf(_))));
        assert_eq!(decode_event(&[], 3), Err(DecodeError::Invalid("origin cluster 0 of 3".into())));
        let good = re(1, 1, Change::User(1));
        assert!(decode_event(&encode_event(&good), 3).is_ok());
        let mut far = event_to_pb(&good);
        far.origin_cluster = 4;
        assert!(event_from_pb(&far, 3).is_err());
        let mut zero = event_to_pb(&good);
        zero.kind = Some(pb::sync_event::Kind::User(pb::UserAdded { user: 0 }));
        assert!(event_from_pb(&zero, 3).is_err());
        let mut none = event_to_pb(&good);
        none.kind = None;
        assert_eq!(event_from_pb(&none, 3), Err(DecodeError::Empty));
        let mut big = event_to_pb(&good);
        big.kind = Some(pb::sync_event::Kind::Post(pb::Post {
            user: 1,
            text: "x".repeat(MAX_POST_BYTES + 1),
            at_ms: 0,
            client_id: 0,
        }));
        assert!(event_from_pb(&big, 3).is_err());
    }
}
