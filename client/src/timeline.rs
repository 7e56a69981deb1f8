//! The pure rules of timeline mode: which typed lines become posts, and
//! which received posts are shown.

use std::collections::{HashSet, VecDeque};

/// The longest post, in bytes, that the server accepts: the client refuses
/// up front what would be rejected anyway, and says why, instead of losing
/// it silently.
pub use sns_proto::rules::MAX_POST_BYTES;

/// What a line typed in timeline mode amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typed {
    /// Empty (or only whitespace): nothing to post.
    Blank,
    /// Too long to post; carries its length in bytes.
    TooLong(usize),
    /// A post, with its text exactly as typed minus the line ending.
    Post(String),
}

/// Classifies a typed line. The line ending (`\n`, `\r\n`) is not part of the
/// post; any other whitespace is, except that a line of nothing but
/// whitespace is no post at all.
pub fn classify(line: &str) -> Typed {
    let text = line.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        Typed::Blank
    } else if text.len() > MAX_POST_BYTES {
        Typed::TooLong(text.len())
    } else {
        Typed::Post(text.to_owned())
    }
}

/// Identity of a post for de-duplication: author, post time in whole seconds
/// (what the display shows) and text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PostKey {
    /// The author.
    pub user: String,
    /// Post time, seconds since the Unix epoch; `None` if the server sent none.
    pub seconds: Option<i64>,
    /// The post's text.
    pub text: String,
}

/// The posts already shown in this session.
///
/// After a failover the new server sends its backlog again, which mostly
/// repeats what was already on the screen; this set keeps every post on the
/// screen once. It lives as long as the session, which is bounded by what a
/// person reads in one sitting.
#[derive(Debug, Default)]
pub struct SeenPosts {
    shown: HashSet<PostKey>,
}

impl SeenPosts {
    /// Records `key`; true if it had not been seen before (so show it).
    pub fn first_sighting(&mut self, key: PostKey) -> bool {
        self.shown.insert(key)
    }
}

/// Most posts remembered while a server that never acknowledges (a course
/// server) leaves them unconfirmed; only needed to resend unsent ones.
const MAX_PENDING: usize = 1024;

/// One post typed in this session and not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<T> {
    /// The client's id for the post (`Message.postID`).
    pub id: u64,
    /// The post, as it goes on the wire.
    pub post: T,
    /// Whether it was written to a stream.
    pub sent: bool,
}

/// The posts typed in this session that the server has not acknowledged.
///
/// Our servers acknowledge each post once it is durable on the master and
/// its slave, and apply a post id at most once; so after a failover every
/// unacknowledged post is sent again and lands exactly once. A server that
/// never acknowledges (a course server) would apply a resent post twice, so
/// until the first acknowledgement only posts never sent are resent.
#[derive(Debug)]
pub struct PendingPosts<T> {
    queue: VecDeque<Pending<T>>,
    next_id: u64,
    acks_seen: bool,
}

impl<T: Clone> PendingPosts<T> {
    /// `seed` makes this session's ids differ from earlier sessions' (the
    /// server remembers recent ids per user); zero is never an id.
    pub fn new(seed: u64) -> Self {
        PendingPosts { queue: VecDeque::new(), next_id: (seed << 20) | 1, acks_seen: false }
    }

    /// Registers a new post built by `make(id)`; returns its id.
    pub fn add(&mut self, make: impl FnOnce(u64) -> T) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        if self.queue.len() >= MAX_PENDING
            && let Some(i) = self.queue.iter().position(|p| p.sent)
        {
            self.queue.remove(i);
        }
        self.queue.push_back(Pending { id, post: make(id), sent: false });
        id
    }

    /// The server acknowledged `id`. Returns the posts to send again now:
    /// on the first acknowledgement of the session, every other post that
    /// was sent but never confirmed (a server that acknowledges drops a
    /// repeated id, so one that did arrive is only confirmed, not doubled).
    pub fn ack(&mut self, id: u64) -> Vec<T> {
        let first = !self.acks_seen;
        self.acks_seen = true;
        self.queue.retain(|p| p.id != id);
        if first { self.queue.iter().filter(|p| p.sent).map(|p| p.post.clone()).collect() } else { Vec::new() }
    }

    /// Posts to write on a fresh stream, in typing order; marks them sent.
    pub fn to_send(&mut self) -> Vec<T> {
        let resend = self.acks_seen;
        self.queue
            .iter_mut()
            .filter(|p| resend || !p.sent)
            .map(|p| {
                p.sent = true;
                p.post.clone()
            })
            .collect()
    }

    /// The newest post.
    pub fn newest(&self) -> Option<&T> {
        self.queue.back().map(|p| &p.post)
    }

    /// Marks the newest post as written to the current stream.
    pub fn mark_last_sent(&mut self) {
        if let Some(p) = self.queue.back_mut() {
            p.sent = true;
        }
    }

    /// Posts still awaiting an acknowledgement that the server would give.
    pub fn awaiting_ack(&self) -> bool {
        self.queue.iter().any(|p| p.sent)
    }

    /// Posts that may not have been delivered, if the session ended now:
    /// every unacknowledged one when the server acknowledges; otherwise (a
    /// course server never confirms anything, and reporting all its posts
    /// would be false) those never sent.
    pub fn undelivered(&self) -> impl Iterator<Item = &T> {
        let acks = self.acks_seen;
        self.queue.iter().filter(move |p| acks || !p.sent).map(|p| &p.post)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_are_not_part_of_the_post() {
        assert_eq!(classify("hello\n"), Typed::Post("hello".into()));
        assert_eq!(classify("hello\r\n"), Typed::Post("hello".into()));
        assert_eq!(classify("hello\r"), Typed::Post("hello".into()));
        assert_eq!(classify("  two  words "), Typed::Post("  two  words ".into()));
    }

    #[test]
    fn empty_lines_are_ignored() {
        for line in ["", "\n", "\r\n", "   ", "\t\n"] {
            assert_eq!(classify(line), Typed::Blank, "{line:?}");
        }
    }

    #[test]
    fn posts_over_the_limit_are_refused_with_their_size() {
        let at_limit = "x".repeat(MAX_POST_BYTES);
        assert_eq!(classify(&at_limit), Typed::Post(at_limit.clone()));
        assert_eq!(classify(&format!("{at_limit}\n")), Typed::Post(at_limit.clone()));
        assert_eq!(classify(&format!("{at_limit}y")), Typed::TooLong(MAX_POST_BYTES + 1));
        // The limit is in bytes, not characters: 2,049 two-byte characters.
        assert_eq!(classify(&"é".repeat(2049)), Typed::TooLong(4098));
    }

    fn key(user: &str, seconds: i64, text: &str) -> PostKey {
        PostKey { user: user.into(), seconds: Some(seconds), text: text.into() }
    }

    #[test]
    fn unacknowledged_posts_are_resent_once_the_server_acknowledges() {
        let mut p = PendingPosts::new(7);
        let a = p.add(|id| format!("a{id}"));
        let b = p.add(|id| format!("b{id}"));
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        assert_eq!(p.to_send().len(), 2);
        // Before any acknowledgement (maybe a course server): nothing resent.
        assert!(p.to_send().is_empty());
        // The first acknowledgement brings back what was never confirmed.
        assert_eq!(p.ack(a), vec![format!("b{b}")]);
        // Now the server is known to deduplicate: b goes again.
        assert_eq!(p.to_send(), vec![format!("b{b}")]);
        assert!(p.awaiting_ack());
        assert_eq!(p.undelivered().count(), 1);
        assert!(p.ack(b).is_empty(), "only the first acknowledgement resends");
        assert!(!p.awaiting_ack());
        assert_eq!(p.undelivered().count(), 0);
    }

    #[test]
    fn sessions_number_posts_apart_and_never_zero() {
        let mut one = PendingPosts::<()>::new(1);
        let mut two = PendingPosts::<()>::new(2);
        assert_ne!(one.add(|_| ()), two.add(|_| ()));
        let mut zero = PendingPosts::<()>::new(0);
        assert_ne!(zero.add(|_| ()), 0);
    }

    #[test]
    fn a_post_is_shown_once() {
        let mut seen = SeenPosts::default();
        assert!(seen.first_sighting(key("1", 100, "p11")));
        assert!(seen.first_sighting(key("1", 101, "p12")));
        assert!(!seen.first_sighting(key("1", 100, "p11")), "resent backlog post");
        assert!(!seen.first_sighting(key("1", 101, "p12")));
    }

    #[test]
    fn posts_differing_in_any_part_are_distinct() {
        let mut seen = SeenPosts::default();
        assert!(seen.first_sighting(key("1", 100, "p")));
        assert!(seen.first_sighting(key("2", 100, "p")), "other author");
        assert!(seen.first_sighting(key("1", 101, "p")), "other time");
        assert!(seen.first_sighting(key("1", 100, "q")), "other text");
        assert!(seen.first_sighting(PostKey { user: "1".into(), seconds: None, text: "p".into() }));
    }
}
