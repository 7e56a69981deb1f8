//! The protocol rules client and servers share, written once: what a user
//! id is, how long a post may be, and the status words of `Reply.msg`.

/// `Reply.msg` status words (SPEC §2).
pub const SUCCESS: &str = "SUCCESS";
pub const FAILURE_ALREADY_EXISTS: &str = "FAILURE_ALREADY_EXISTS";
pub const FAILURE_NOT_EXISTS: &str = "FAILURE_NOT_EXISTS";
pub const FAILURE_INVALID_USERNAME: &str = "FAILURE_INVALID_USERNAME";
pub const FAILURE_NOT_A_FOLLOWER: &str = "FAILURE_NOT_A_FOLLOWER";
pub const FAILURE_INVALID: &str = "FAILURE_INVALID";
pub const FAILURE_UNKNOWN: &str = "FAILURE_UNKNOWN";

/// Response metadata of `Timeline`: the feed position (and its
/// `feedAnchor`) after which the stream's live posts come, as decimal
/// integers. The backlog, if any, comes first, at positions up to it. A
/// client that reconnects resumes after the last live post it got, or
/// after this position when it got none, so posts made while it was away
/// are not left to the backlog's last 20. Course clients ignore it.
pub const FEED_POSITION_KEY: &str = "sns-feed-position";
pub const FEED_ANCHOR_KEY: &str = "sns-feed-anchor";

/// Writes where a timeline stream's live posts continue the feed
/// (position, anchor) into its response metadata.
pub fn put_feed_start(metadata: &mut tonic::metadata::MetadataMap, (position, anchor): (u64, u64)) {
    for (key, value) in [(FEED_POSITION_KEY, position), (FEED_ANCHOR_KEY, anchor)] {
        if let Ok(value) = value.to_string().parse() {
            metadata.insert(key, value);
        }
    }
}

/// Where a timeline stream's live posts continue the feed (position,
/// anchor), from its response metadata; None from a server that does not
/// say (a course server).
pub fn feed_start(metadata: &tonic::metadata::MetadataMap) -> Option<(u64, u64)> {
    let read = |key: &str| metadata.get(key)?.to_str().ok()?.parse::<u64>().ok();
    Some((read(FEED_POSITION_KEY)?, read(FEED_ANCHOR_KEY)?))
}

/// Longest post text accepted, in bytes. Posts are short status lines; the
/// cap keeps a single post from bloating every follower's feed file.
pub const MAX_POST_BYTES: usize = 4096;

/// Why a post text is refused, if it is: too long, or more than one line
/// (a post record is one `W` line).
pub fn check_post_text(text: &str) -> Result<(), String> {
    if text.len() > MAX_POST_BYTES {
        Err(format!("post is {} bytes; at most {MAX_POST_BYTES} are allowed", text.len()))
    } else if text.contains(['\n', '\r']) {
        Err("post must be a single line".to_string())
    } else {
        Ok(())
    }
}

/// The last second of year 9999: a post time past it is absurd.
const LAST_SECOND: i64 = 253_402_300_799;

/// A client's post time (seconds, nanos) in ms, if it is a time a post can
/// have (after 1970, within year 9999); None means "use the server's
/// clock". The time is only displayed: it never decides who sees a post.
pub fn post_time_ms(seconds: i64, nanos: i32) -> Option<i64> {
    (seconds > 0 && seconds <= LAST_SECOND).then(|| seconds * 1000 + i64::from(nanos.clamp(0, 999_999_999) / 1_000_000))
}

/// A user id: canonical decimal, positive, fits in 31 bits (the course's
/// `int32` ids): no sign, no leading zeros, no spaces. Anything else —
/// `abc`, `0`, `007`, `-1`, `../../etc` — is not a user, a file name or a
/// broker key.
pub fn parse_user(text: &str) -> Option<u32> {
    let canonical =
        !text.is_empty() && text.len() <= 10 && text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
    canonical.then(|| text.parse::<u32>().ok()).flatten().filter(|u| *u <= i32::MAX as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_canonical_positive_31_bit_integers() {
        assert_eq!(parse_user("1"), Some(1));
        assert_eq!(parse_user("2147483647"), Some(2_147_483_647));
        for bad in ["", "0", "007", "-1", "+1", " 1", "1 ", "abc", "../../etc", "2147483648", "99999999999"] {
            assert_eq!(parse_user(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn absurd_post_times_are_replaced() {
        assert_eq!(post_time_ms(1, 5_000_000), Some(1005));
        assert_eq!(post_time_ms(LAST_SECOND, 0), Some(LAST_SECOND * 1000));
        for (s, n) in [(0, 0), (-5, 0), (LAST_SECOND + 1, 0), (i64::MAX, 999_999_999)] {
            assert_eq!(post_time_ms(s, n), None, "{s} {n}");
        }
    }

    #[test]
    fn posts_are_single_lines_of_bounded_size() {
        assert!(check_post_text("hello").is_ok());
        assert!(check_post_text(&"x".repeat(MAX_POST_BYTES)).is_ok());
        assert!(check_post_text(&"x".repeat(MAX_POST_BYTES + 1)).is_err());
        assert!(check_post_text("two\nlines").is_err());
        assert!(check_post_text("cr\r").is_err());
    }
}
