//! Reading the user's lines from stdin (a pipe, or a terminal through the
//! line editor), and noticing Ctrl-C.

use std::io;
use std::mem;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;

use crate::terminal::Terminal;

/// What the user did next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Typed a line (without its line ending).
    Line(String),
    /// Ended the input: end of a pipe, Ctrl-D on a terminal.
    End,
    /// Pressed Ctrl-C.
    Interrupted,
}

/// Where the session's input comes from.
#[derive(Debug)]
enum Source<R> {
    Pipe(InputLines<R>),
    Terminal(Terminal),
}

/// The user's side of a session: lines, end of input, Ctrl-C.
#[derive(Debug)]
pub struct Input<R> {
    source: Source<R>,
    /// One message per Ctrl-C that arrives as a signal (on a pipe, or
    /// between two lines read by the editor).
    interrupts: Option<mpsc::UnboundedReceiver<()>>,
    /// [`Event::End`] was returned.
    ended: bool,
}

impl<R: AsyncBufRead + Unpin> Input<R> {
    /// Lines read from `reader` (a pipe, a file, a test's buffer).
    pub fn pipe(reader: R) -> Self {
        Input { source: Source::Pipe(InputLines::new(reader)), interrupts: None, ended: false }
    }

    /// Ctrl-C arrives as a message on `interrupts`.
    pub fn with_interrupts(mut self, interrupts: mpsc::UnboundedReceiver<()>) -> Self {
        self.interrupts = Some(interrupts);
        self
    }

    /// True when the line editor shows the prompt itself (so the session
    /// must not print it).
    pub fn shows_prompt(&self) -> bool {
        matches!(self.source, Source::Terminal(_))
    }

    /// The prompt shown by a line editor from the next line on.
    pub fn set_prompt(&mut self, prompt: &'static str) {
        if let Source::Terminal(terminal) = &mut self.source {
            terminal.set_prompt(prompt);
        }
    }

    /// The session is ending: a line editor gives the terminal back, and
    /// what is printed from now on goes straight to it.
    pub fn release(&mut self) {
        if let Source::Terminal(terminal) = &mut self.source {
            terminal.release();
        }
    }

    /// What the user does next. Cancel safe: nothing typed is lost when
    /// the call is dropped in a `select!`. A read error is said on stderr
    /// and ends the input. [`Event::End`] comes once; after it, this waits
    /// for Ctrl-C only.
    pub async fn next(&mut self) -> Event {
        let Input { source, interrupts, ended } = self;
        if *ended {
            interrupt(interrupts).await;
            return Event::Interrupted;
        }
        let line = async {
            match source {
                Source::Pipe(lines) => match lines.next_line().await {
                    Ok(Some(line)) => Event::Line(line),
                    Ok(None) => Event::End,
                    Err(err) => {
                        eprintln!("tsc: cannot read input: {err}");
                        Event::End
                    }
                },
                Source::Terminal(terminal) => terminal.next().await,
            }
        };
        let event = tokio::select! {
            biased;
            () = interrupt(interrupts) => Event::Interrupted,
            event = line => event,
        };
        *ended = event == Event::End;
        event
    }

    /// Completes at the next Ctrl-C (never, without a way to notice one);
    /// for waits that do not read lines. Cancel safe.
    pub async fn interrupted(&mut self) {
        interrupt(&mut self.interrupts).await;
    }
}

/// Completes at the next message on `interrupts`, if any ever comes.
async fn interrupt(interrupts: &mut Option<mpsc::UnboundedReceiver<()>>) {
    if let Some(interrupts) = interrupts
        && interrupts.recv().await.is_some()
    {
        return;
    }
    std::future::pending::<()>().await;
}

impl Input<tokio::io::Empty> {
    /// Lines read by the line editor.
    pub fn terminal(terminal: Terminal) -> Self {
        Input { source: Source::Terminal(terminal), interrupts: None, ended: false }
    }
}

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
