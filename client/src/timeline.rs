//! The pure rules of timeline mode: which typed lines become posts, and
//! which received posts are shown.

use std::collections::HashSet;

/// The longest post, in bytes, that the server accepts. Matches the server's
/// own limit so that the client refuses up front what would be rejected
/// anyway, and says why, instead of losing it silently.
pub const MAX_POST_BYTES: usize = 4096;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_endings_are_not_part_of_the_post() {
        assert_eq!(classify("hello\n"), Typed::Post("hello".into()));
        assert_eq!(classify("hello\r\n"), Typed::Post("hello".into()));
        assert_eq!(classify("hello\r"), Typed::Post("hello".into()));
        assert_eq!(
            classify("  two  words "),
            Typed::Post("  two  words ".into())
        );
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
        assert_eq!(
            classify(&format!("{at_limit}\n")),
            Typed::Post(at_limit.clone())
        );
        assert_eq!(
            classify(&format!("{at_limit}y")),
            Typed::TooLong(MAX_POST_BYTES + 1)
        );
        // The limit is in bytes, not characters: 2,049 two-byte characters.
        assert_eq!(classify(&"é".repeat(2049)), Typed::TooLong(4098));
    }

    fn key(user: &str, seconds: i64, text: &str) -> PostKey {
        PostKey {
            user: user.into(),
            seconds: Some(seconds),
            text: text.into(),
        }
    }

    #[test]
    fn a_post_is_shown_once() {
        let mut seen = SeenPosts::default();
        assert!(seen.first_sighting(key("1", 100, "p11")));
        assert!(seen.first_sighting(key("1", 101, "p12")));
        assert!(
            !seen.first_sighting(key("1", 100, "p11")),
            "resent backlog post"
        );
        assert!(!seen.first_sighting(key("1", 101, "p12")));
    }

    #[test]
    fn posts_differing_in_any_part_are_distinct() {
        let mut seen = SeenPosts::default();
        assert!(seen.first_sighting(key("1", 100, "p")));
        assert!(seen.first_sighting(key("2", 100, "p")), "other author");
        assert!(seen.first_sighting(key("1", 101, "p")), "other time");
        assert!(seen.first_sighting(key("1", 100, "q")), "other text");
        assert!(seen.first_sighting(PostKey {
            user: "1".into(),
            seconds: None,
            text: "p".into()
        }));
    }
}
