//! Text encodings of the files a server keeps (SPEC §4).
//!
//! Id lists (`all_users.txt`, `<u>_follow_list.txt`, `<u>_followers.txt`)
//! hold one decimal id per line. Post files (`<u>_timeline.txt`,
//! `<u>_following.txt`) hold four-line records:
//! `T <YYYY-MM-DD HH:MM:SS UTC>`, `U <user>`, `W <text>`, blank.
//! Readers skip a torn or malformed record instead of failing, so a file cut
//! short by a crash never breaks reading.

use chrono::{DateTime, Datelike, NaiveDateTime, Timelike, Utc};
use std::fmt::Write as _;

const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S UTC";

/// One post as stored in a timeline or feed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostRecord {
    pub user: u32,
    pub text: String,
    /// Seconds since the Unix epoch (the files keep whole seconds).
    pub at_secs: i64,
}

/// Renders a millisecond timestamp as the `T` line value.
pub fn format_time(at_ms: i64) -> String {
    let mut out = String::with_capacity(TIME_LEN);
    write_time(&mut out, at_ms);
    out
}

/// Length of a `T` line value for a year of four digits.
const TIME_LEN: usize = "YYYY-MM-DD HH:MM:SS UTC".len();

/// Appends the `T` line value of a millisecond timestamp to `out`. Views
/// rewrite many records, so years of four digits (all real ones) skip
/// chrono's format-string interpreter; the result is the same.
fn write_time(out: &mut String, at_ms: i64) {
    let t = DateTime::<Utc>::from_timestamp_millis(at_ms).unwrap_or_default();
    let year = t.year();
    if !(0..=9999).contains(&year) {
        let _ = write!(out, "{}", t.format(TIME_FORMAT));
        return;
    }
    let fields = [(year as u32, 4, '-'), (t.month(), 2, '-'), (t.day(), 2, ' ')];
    let fields = fields.into_iter().chain([(t.hour(), 2, ':'), (t.minute(), 2, ':'), (t.second(), 2, ' ')]);
    for (v, width, sep) in fields {
        for i in (0..width).rev() {
            out.push(char::from(b'0' + (v / 10u32.pow(i) % 10) as u8));
        }
        out.push(sep);
    }
    out.push_str("UTC");
}

/// Appends one post record (four lines) to `out`.
pub fn encode_post(out: &mut String, user: u32, text: &str, at_ms: i64) {
    // `text` never holds a newline: the server rejects such posts.
    out.push_str("T ");
    write_time(out, at_ms);
    let _ = write!(out, "\nU {user}\nW {text}\n\n");
}

/// Parses every complete, well-formed post record of a file.
pub fn decode_posts(data: &str) -> Vec<PostRecord> {
    let mut posts = Vec::new();
    let mut lines = data.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(time) = line.strip_prefix("T ") else {
            continue;
        };
        let (Some(u), Some(w)) = (lines.next(), lines.next()) else {
            break;
        };
        let blank = lines.next();
        let parsed = NaiveDateTime::parse_from_str(time, TIME_FORMAT).ok();
        let user = u.strip_prefix("U ").and_then(|s| s.parse().ok());
        let text = w.strip_prefix("W ").or_else(|| (w == "W").then_some(""));
        match (parsed, user, text, blank) {
            (Some(t), Some(user), Some(text), Some("")) => {
                posts.push(PostRecord { user, text: text.to_string(), at_secs: t.and_utc().timestamp() })
            }
            // A record cut short by a crash is the last one: stop there.
            (_, _, _, None) => break,
            _ => {}
        }
    }
    posts
}

/// Renders an id list, one id per line.
pub fn encode_ids<'a>(ids: impl IntoIterator<Item = &'a u32>) -> String {
    let mut out = String::new();
    for id in ids {
        let _ = writeln!(out, "{id}");
    }
    out
}

/// Parses an id list, skipping lines that are not ids.
pub fn decode_ids(data: &str) -> Vec<u32> {
    data.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_record_round_trips() {
        let mut out = String::new();
        encode_post(&mut out, 4, "hello world", 1_744_336_636_789);
        assert_eq!(out, "T 2025-04-11 01:57:16 UTC\nU 4\nW hello world\n\n");
        encode_post(&mut out, 1, "", 0);
        let posts = decode_posts(&out);
        assert_eq!(
            posts,
            vec![
                PostRecord { user: 4, text: "hello world".into(), at_secs: 1_744_336_636 },
                PostRecord { user: 1, text: String::new(), at_secs: 0 },
            ]
        );
    }

    #[test]
    fn fast_time_format_matches_chrono() {
        let chrono = |ms| DateTime::<Utc>::from_timestamp_millis(ms).unwrap().format(TIME_FORMAT).to_string();
        for ms in [0, 999, 1_744_336_636_789, 951_782_400_000, 4_102_444_799_999, -1, 253_402_300_800_000] {
            assert_eq!(format_time(ms), chrono(ms), "{ms}");
        }
    }

    #[test]
    fn torn_tail_is_skipped() {
        let mut out = String::new();
        encode_post(&mut out, 1, "a", 1_000);
        encode_post(&mut out, 2, "b", 2_000);
        for cut in 1..out.len() {
            let posts = decode_posts(&out[..cut]);
            assert!(posts.len() <= 2);
            if cut >= out.len() / 2 {
                assert_eq!(posts[0].text, "a", "cut at {cut}");
            }
        }
    }

    #[test]
    fn garbage_records_are_skipped() {
        let data = "T nonsense\nU 1\nW x\n\nT 2025-01-01 00:00:00 UTC\nU 2\nW ok\n\n";
        let posts = decode_posts(data);
        assert_eq!(posts.len(), 1);
        assert_eq!(posts[0].user, 2);
    }

    #[test]
    fn id_lists_round_trip() {
        let ids = [1u32, 2, 10];
        let text = encode_ids(&ids);
        assert_eq!(text, "1\n2\n10\n");
        assert_eq!(decode_ids(&text), ids);
        assert_eq!(decode_ids("1\nx\n\n3"), vec![1, 3]);
    }
}
