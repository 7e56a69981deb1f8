//! Conversions between the domain types of [`super::state`] and their
//! protobuf form (journal records, replication requests, broker messages).
//! Decoding validates: a message that decodes but makes no sense (user 0,
//! an unknown cluster, a post with a newline) is rejected here, once.

use super::state::{Change, Entry, LocalOp, Post, RemoteEvent, Snapshot, UserSnapshot};
use prost::Message as _;
use sns_proto::internal as pb;
use std::sync::Arc;

/// Longest post text accepted, in bytes. Posts are short status lines; the
/// cap keeps a single post from bloating every follower's feed file.
pub const MAX_POST_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a valid protobuf message: {0}")]
    Protobuf(String),
    #[error("message has no content")]
    Empty,
    #[error("invalid field: {0}")]
    Invalid(String),
}

/// Why a post text is refused.
pub fn check_post_text(text: &str) -> Result<(), String> {
    if text.len() > MAX_POST_BYTES {
        Err(format!("post is {} bytes; at most {MAX_POST_BYTES} are allowed", text.len()))
    } else if text.contains(['\n', '\r']) {
        Err("post must be a single line".to_string())
    } else {
        Ok(())
    }
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

pub fn snapshot_to_pb(s: &Snapshot, cluster: u32) -> pb::StateSnapshot {
    pb::StateSnapshot {
        cluster,
        users: s.users.clone(),
        local_users: s
            .local_users
            .iter()
            .map(|u| pb::UserState {
                user: u.user,
                following: u.following.iter().map(|(f, t)| pb::FollowEdge { followee: *f, since_ms: *t }).collect(),
                followers: u.followers.clone(),
                timeline: u.timeline.iter().map(post_to_pb).collect(),
                feed: u.feed.iter().map(post_to_pb).collect(),
                recent_post_ids: u.recent_post_ids.clone(),
                recent_request_ids: u.recent_request_ids.clone(),
            })
            .collect(),
        next_seq: s.next_seq,
        published_upto: s.published_upto,
        outbox: s.outbox.iter().map(event_to_pb).collect(),
        applied: s.applied.iter().map(|(o, q)| pb::OriginMark { origin: *o, seq: *q }).collect(),
    }
}

pub fn snapshot_from_pb(s: &pb::StateSnapshot, clusters: u32) -> Result<Snapshot, DecodeError> {
    let posts = |ps: &[pb::Post]| ps.iter().map(post_from_pb).collect::<Result<Vec<_>, _>>();
    Ok(Snapshot {
        users: s.users.iter().map(|u| user(*u)).collect::<Result<_, _>>()?,
        local_users: s
            .local_users
            .iter()
            .map(|u| {
                Ok(UserSnapshot {
                    user: user(u.user)?,
                    following: u.following.iter().map(|e| (e.followee, e.since_ms)).collect(),
                    followers: u.followers.clone(),
                    timeline: posts(&u.timeline)?,
                    feed: posts(&u.feed)?,
                    recent_post_ids: u.recent_post_ids.clone(),
                    recent_request_ids: u.recent_request_ids.clone(),
                })
            })
            .collect::<Result<_, DecodeError>>()?,
        next_seq: s.next_seq,
        published_upto: s.published_upto,
        outbox: s.outbox.iter().map(|e| event_from_pb(e, clusters)).collect::<Result<_, _>>()?,
        applied: s.applied.iter().map(|m| (m.origin, m.seq)).collect(),
    })
}

/// Encodes a snapshot for the wire (`InstallSnapshot` chunks).
pub fn encode_snapshot(s: &Snapshot, cluster: u32) -> Vec<u8> {
    snapshot_to_pb(s, cluster).encode_to_vec()
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
    pb::SyncEvent { origin_cluster: e.origin, seq: e.seq, kind: Some(kind) }
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
    Ok(RemoteEvent { origin: e.origin_cluster, seq: e.seq, change })
}

/// The AMQP `type` of a broker message whose body is a `SyncBatch`: a run
/// of one origin's events in seq order. A message without it holds one
/// `SyncEvent` (what a single-event publisher sends).
pub const BATCH_TYPE: &str = "tinysns.internal.v1.SyncBatch";

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
        // The journal does not know its cluster; 0 marks "this server's".
        Entry::Snapshot(s) => E::Snapshot(snapshot_to_pb(s, 0)),
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
        E::Snapshot(s) => Ok(Entry::Snapshot(Box::new(snapshot_from_pb(&s, clusters)?))),
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
            let e = RemoteEvent { origin: 2, seq: i as u64 + 1, change };
            assert_eq!(decode_event(&encode_event(&e), 3), Ok(e));
        }
    }

    #[test]
    fn journal_entries_round_trip() {
        for (i, change) in samples().into_iter().enumerate() {
            let local = Entry::Local(LocalOp { seq: i as u64 + 1, change: change.clone(), request_id: i as u64 });
            assert_eq!(decode_entry(&encode_entry(&local), 3), Ok(local));
            let remote = Entry::Remote(RemoteEvent { origin: 3, seq: 9, change });
            assert_eq!(decode_entry(&encode_entry(&remote), 3), Ok(remote));
        }
        let mark = Entry::PublishedUpto(42);
        assert_eq!(decode_entry(&encode_entry(&mark), 3), Ok(mark));
        let snap = Snapshot {
            users: vec![1, 2, 4],
            local_users: vec![UserSnapshot {
                user: 1,
                following: vec![(2, 7)],
                followers: vec![4],
                timeline: vec![Post { user: 1, text: "t".into(), at_ms: 3, client_id: 9 }],
                feed: vec![Post { user: 2, text: "f".into(), at_ms: 8, client_id: 0 }],
                recent_post_ids: vec![9],
                recent_request_ids: vec![77],
            }],
            next_seq: 12,
            published_upto: 10,
            outbox: vec![RemoteEvent { origin: 1, seq: 11, change: Change::User(4) }],
            applied: vec![(2, 5)],
        };
        let entry = Entry::Snapshot(Box::new(snap.clone()));
        assert_eq!(decode_entry(&encode_entry(&entry), 3), Ok(entry));
        assert_eq!(decode_snapshot(&encode_snapshot(&snap, 1), 1, 3), Ok(snap.clone()));
        assert!(decode_snapshot(&encode_snapshot(&snap, 2), 1, 3).is_err(), "another cluster's state");
    }

    #[test]
    fn broker_batches_round_trip_and_must_be_one_origin_in_order() {
        let ev = |origin, seq, user| event_to_pb(&RemoteEvent { origin, seq, change: Change::User(user) });
        let batch = vec![ev(2, 7, 4), ev(2, 9, 5)];
        assert_eq!(decode_message(&encode_batch(&batch), true, 3), Ok(batch));
        let single = encode_event(&RemoteEvent { origin: 1, seq: 3, change: Change::User(1) });
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
        let good = RemoteEvent { origin: 1, seq: 1, change: Change::User(1) };
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
        let big = pb::SyncEvent {
            origin_cluster: 1,
            seq: 1,
            kind: Some(pb::sync_event::Kind::Post(pb::Post {
                user: 1,
                text: "x".repeat(MAX_POST_BYTES + 1),
                at_ms: 0,
                client_id: 0,
            })),
        };
        assert!(event_from_pb(&big, 3).is_err());
    }

    #[test]
    fn post_text_rules() {
        assert!(check_post_text("fine").is_ok());
        assert!(check_post_text(&"x".repeat(MAX_POST_BYTES)).is_ok());
        assert!(check_post_text(&"x".repeat(MAX_POST_BYTES + 1)).is_err());
        assert!(check_post_text("two\nlines").is_err());
    }
}
