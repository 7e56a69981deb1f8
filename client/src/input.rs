//! Reading the user's lines from stdin (a terminal or a pipe).

use std::io;
use std::mem;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Line reader over any async buffered input.
///
/// Unlike `tokio::io::Lines` it never fails on bytes that are not UTF-8 (they
/// become U+FFFD rather than ending the session), and it keeps a partial line
/// across cancellations, so [`InputLines::next_line`] can sit in a
/// `tokio::select!` beside the timeline stream without losing keystrokes.
#[derive(Debug)]
pub struct InputLines<R> {
    reader: R,
    pending: Vec<u8>,
    at_end: bool,
}

impl<R: AsyncBufRead + Unpin> InputLines<R> {
    /// Reads lines from `reader`.
    pub fn new(reader: R) -> Self {
        InputLines { reader, pending: Vec::new(), at_end: false }
    }

    /// The next line without its line ending (`\n` or `\r\n`); `None` at end
    /// of input. A last line without a newline is still a line.
    ///
    /// Cancel safe: bytes of an unfinished line stay buffered for the next
    /// call.
    pub async fn next_line(&mut self) -> io::Result<Option<String>> {
        if self.at_end {
            return Ok(None);
        }
        self.reader.read_until(b'\n', &mut self.pending).await?;
        // `read_until` stops short of a newline only at end of input.
        if self.pending.last() != Some(&b'\n') {
            self.at_end = true;
            if self.pending.is_empty() {
                return Ok(None);
            }
        }
        let mut line = mem::take(&mut self.pending);
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(Some(String::from_utf8_lossy(&line).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::InputLines;

    async fn all_lines(bytes: &[u8]) -> Vec<String> {
        let mut input = InputLines::new(bytes);
        let mut lines = Vec::new();
        while let Ok(Some(line)) = input.next_line().await {
            lines.push(line);
        }
        lines
    }

    #[tokio::test]
    async fn splits_lines_and_strips_endings() {
        assert_eq!(all_lines(b"LIST\nfollow 2\r\n\nlast").await, ["LIST", "follow 2", "", "last"]);
        assert_eq!(all_lines(b"").await, Vec::<String>::new());
        assert_eq!(all_lines(b"one\n").await, ["one"]);
    }

    #[tokio::test]
    async fn invalid_utf8_does_not_end_the_input() {
        assert_eq!(all_lines(b"a\xffb\nnext\n").await, ["a\u{fffd}b", "next"]);
    }

    #[tokio::test]
    async fn stays_at_end_after_end_of_input() {
        let mut input = InputLines::new(&b"x"[..]);
        assert_eq!(input.next_line().await.ok().flatten().as_deref(), Some("x"));
        assert!(matches!(input.next_line().await, Ok(None)));
        assert!(matches!(input.next_line().await, Ok(None)));
    }
}
