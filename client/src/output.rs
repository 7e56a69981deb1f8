//! The exact text the client prints: banner, prompt, status lines, LIST
//! results, timeline posts.
//!
//! Pure formatting, kept apart from the session so that the course's output
//! format (which end-to-end tests compare byte for byte) is unit tested.

use std::cmp::Ordering;
use std::fmt::Display;

use chrono::{DateTime, TimeZone};

/// Printed once after a successful login.
pub const BANNER: &str = "\
========= TINY SNS CLIENT =========
 Command Lists and Format:
 FOLLOW <username>
 UNFOLLOW <username>
 LIST
 TIMELINE
=====================================
";

/// The command-mode prompt (no newline: the user types on the same line).
pub const PROMPT: &str = "Cmd> ";

/// The course client's one and only failure message for "no usable server".
pub const CONNECTION_FAILED: &str = "connection failed: -1";

/// FOLLOW / UNFOLLOW typed without a username.
pub const NO_ARGUMENTS: &str = "Invalid Input -- No Arguments Given";

/// An unknown command word; also the text for `FAILURE_INVALID`.
pub const INVALID_COMMAND: &str = "Command failed with invalid command";

/// `SUCCESS`.
pub const SUCCESS: &str = "Command completed successfully";

/// Anything the client cannot interpret, `FAILURE_UNKNOWN` included.
pub const UNKNOWN_REASON: &str = "Command failed with unknown reason";

/// Printed after TIMELINE's success line.
pub const TIMELINE_ENTERED: &str = "Now you are in the timeline";

/// C's `ctime()` layout without its trailing newline; `%e` pads the day with
/// a space, as `ctime` does.
const CTIME_FORMAT: &str = "%a %b %e %H:%M:%S %Y";

/// The line printed for a `Reply.msg` status word.
pub fn status_line(status: &str) -> &'static str {
    use sns_proto::rules as r;
    match status {
        r::SUCCESS => SUCCESS,
        r::FAILURE_ALREADY_EXISTS => "Input username already exists, command failed",
        r::FAILURE_NOT_EXISTS => "Input username does not exists, command failed",
        r::FAILURE_INVALID_USERNAME => "Command failed with invalid username",
        r::FAILURE_NOT_A_FOLLOWER => "Command failed with not a follower",
        r::FAILURE_INVALID => INVALID_COMMAND,
        _ => UNKNOWN_REASON,
    }
}

/// The three lines of a successful LIST. Both lists are sorted numerically
/// here as well, although the server already sorts them, so that the output
/// never depends on that (`10` comes after `2`).
pub fn list_lines(mut all_users: Vec<String>, mut followers: Vec<String>) -> [String; 3] {
    sort_numerically(&mut all_users);
    sort_numerically(&mut followers);
    [SUCCESS.to_owned(), listed("All users: ", &all_users), listed("Followers: ", &followers)]
}

/// `label` then every item followed by `, ` (the course's format, trailing
/// separator included).
fn listed(label: &str, items: &[String]) -> String {
    let mut line = String::from(label);
    for item in items {
        line.push_str(item);
        line.push_str(", ");
    }
    line
}

/// Numeric ids in numeric order; anything that is not a number (which a
/// correct server never sends) goes last, in text order.
fn sort_numerically(items: &mut [String]) {
    items.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    });
}

/// A timeline post: `<user> (<ctime>) >> <text>`. The caller picks the time
/// zone (local time at run time, a fixed one in tests).
pub fn post_line<Tz>(user: &str, text: &str, posted: &DateTime<Tz>) -> String
where
    Tz: TimeZone,
    Tz::Offset: Display,
{
    format!("{user} ({}) >> {text}", posted.format(CTIME_FORMAT))
}

/// Why a typed post was not sent.
pub fn post_too_long(bytes: usize, limit: usize) -> String {
    format!("Post too long ({bytes} bytes, at most {limit}), not sent")
}

/// A post the client could not confirm as delivered when it gave up.
pub fn post_not_delivered(text: &str) -> String {
    format!("Post not delivered: {text}")
}

/// The diagnostic (stderr) when the server stops answering and the client
/// starts looking for another.
pub fn server_lost(address: &str, why: &dyn Display) -> String {
    format!("server lost, reconnecting… (was {address}: {why})")
}

/// The one line announcing a successful failover.
pub fn reconnected(address: &str) -> String {
    format!("Reconnected to server {address}")
}

#[cfg(test)]
mod tests {
    use chrono::{FixedOffset, NaiveDate, Utc};

    use super::*;

    #[test]
    fn every_status_word_has_its_line() {
        let cases = [
            ("SUCCESS", "Command completed successfully"),
            ("FAILURE_ALREADY_EXISTS", "Input username already exists, command failed"),
            ("FAILURE_NOT_EXISTS", "Input username does not exists, command failed"),
            ("FAILURE_INVALID_USERNAME", "Command failed with invalid username"),
            ("FAILURE_NOT_A_FOLLOWER", "Command failed with not a follower"),
            ("FAILURE_INVALID", "Command failed with invalid command"),
            ("FAILURE_UNKNOWN", "Command failed with unknown reason"),
            ("", "Command failed with unknown reason"),
            ("success", "Command failed with unknown reason"),
            ("SOMETHING_NEW", "Command failed with unknown reason"),
        ];
        for (status, line) in cases {
            assert_eq!(status_line(status), line, "{status:?}");
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn list_has_a_trailing_separator_after_every_user() {
        let [ok, all, followers] = list_lines(strings(&["1", "2", "3"]), strings(&["2"]));
        assert_eq!(ok, "Command completed successfully");
        assert_eq!(all, "All users: 1, 2, 3, ");
        assert_eq!(followers, "Followers: 2, ");
    }

    #[test]
    fn list_of_nobody_prints_bare_labels() {
        let [_, all, followers] = list_lines(Vec::new(), Vec::new());
        assert_eq!(all, "All users: ");
        assert_eq!(followers, "Followers: ");
    }

    #[test]
    fn list_sorts_numerically_not_as_text() {
        let [_, all, followers] = list_lines(strings(&["10", "2", "1", "33", "3"]), strings(&["12", "4", "100"]));
        assert_eq!(all, "All users: 1, 2, 3, 10, 33, ");
        assert_eq!(followers, "Followers: 4, 12, 100, ");
    }

    #[test]
    fn list_puts_non_numbers_last() {
        let [_, all, _] = list_lines(strings(&["b", "10", "a", "9"]), Vec::new());
        assert_eq!(all, "All users: 9, 10, a, b, ");
    }

    #[test]
    fn post_time_is_formatted_like_ctime() {
        let at = NaiveDate::from_ymd_opt(2025, 4, 11).and_then(|d| d.and_hms_opt(2, 3, 56)).map(|t| t.and_utc());
        let Some(at) = at else { panic!("a valid date") };
        assert_eq!(post_line("1", "p11", &at), "1 (Fri Apr 11 02:03:56 2025) >> p11");
    }

    #[test]
    fn single_digit_days_are_space_padded_like_ctime() {
        let Some(at) = DateTime::from_timestamp(1_743_472_236, 0) else { panic!("a valid timestamp") };
        // 2025-04-01 01:50:36 UTC.
        assert_eq!(post_line("4", "hi", &at), "4 (Tue Apr  1 01:50:36 2025) >> hi");
    }

    #[test]
    fn post_time_is_shown_in_the_given_time_zone() {
        let Some(at) = DateTime::<Utc>::from_timestamp(1_744_336_936, 0) else { panic!("a valid timestamp") };
        let Some(cdt) = FixedOffset::west_opt(5 * 3600) else { panic!("a valid offset") };
        // Same instant, 2025-04-11 02:02:16 UTC, shown five hours earlier.
        assert_eq!(post_line("2", "x", &at), "2 (Fri Apr 11 02:02:16 2025) >> x");
        assert_eq!(post_line("2", "x", &at.with_timezone(&cdt)), "2 (Thu Apr 10 21:02:16 2025) >> x");
    }

    #[test]
    fn fixed_lines() {
        assert_eq!(post_too_long(5000, 4096), "Post too long (5000 bytes, at most 4096), not sent");
        assert_eq!(reconnected("10.0.0.7:9010"), "Reconnected to server 10.0.0.7:9010");
        assert_eq!(server_lost("10.0.0.7:9010", &"gone"), "server lost, reconnecting… (was 10.0.0.7:9010: gone)");
        assert!(BANNER.starts_with("========= TINY SNS CLIENT =========\n"));
        assert!(BANNER.ends_with("\n=====================================\n"));
        assert_eq!(BANNER.lines().count(), 7);
    }
}
