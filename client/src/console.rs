//! The client's terminal output.
//!
//! Every line is flushed at once: stdout is often a pipe (tests, scripts),
//! where Rust would otherwise hold output back and the reader would wait for
//! a line the user has already been "shown". Writes go through `io::Write`
//! rather than `println!`, which panics when stdout is a closed pipe.

use std::io::Write;

use crate::output::{BANNER, PROMPT};

/// Where the client prints; stdout in the binary, a buffer in tests.
/// Diagnostics (what the course client never printed) go to stderr, so
/// that stdout on a pipe stays exactly the course's.
pub struct Console<W> {
    out: W,
    /// Where diagnostics go instead of stderr (the line editor's printer).
    notes: Option<Box<dyn Write + Send>>,
}

impl<W> std::fmt::Debug for Console<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl<W: Write> Console<W> {
    /// Prints to `out`, diagnostics to stderr.
    pub fn new(out: W) -> Self {
        Console { out, notes: None }
    }

    /// Prints to `out`, diagnostics to `notes`.
    pub fn with_notes(out: W, notes: Box<dyn Write + Send>) -> Self {
        Console { out, notes: Some(notes) }
    }

    /// Prints one diagnostic line, `tsc: <text>`.
    pub fn note(&mut self, text: &str) {
        match &mut self.notes {
            Some(notes) => {
                let _ = writeln!(notes, "tsc: {text}");
                let _ = notes.flush();
            }
            None => eprintln!("tsc: {text}"),
        }
    }

    /// Prints one line.
    pub fn line(&mut self, text: &str) {
        // If stdout is gone there is nobody left to tell; keep serving stdin
        // (the user may still be posting) rather than crash.
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    /// Prints the command prompt, without a newline.
    pub fn prompt(&mut self) {
        let _ = self.out.write_all(PROMPT.as_bytes());
        let _ = self.out.flush();
    }

    /// Prints the banner shown after login.
    pub fn banner(&mut self) {
        let _ = self.out.write_all(BANNER.as_bytes());
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::Console;

    #[test]
    fn lines_prompt_and_banner_are_written_verbatim() {
        let mut buf = Vec::new();
        let mut console = Console::new(&mut buf);
        console.banner();
        console.prompt();
        console.line("Command completed successfully");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("========= TINY SNS CLIENT ========="));
        assert!(text.ends_with("=====================================\nCmd> Command completed successfully\n"));
    }
}
