//! The client's terminal output.
//!
//! Every line is flushed at once: stdout is often a pipe (tests, scripts),
//! where Rust would otherwise hold output back and the reader would wait for
//! a line the user has already been "shown". Writes go through `io::Write`
//! rather than `println!`, which panics when stdout is a closed pipe.

use std::io::Write;

use crate::output::{BANNER, PROMPT};

/// Where the client prints; stdout in the binary, a buffer in tests.
#[derive(Debug)]
pub struct Console<W> {
    out: W,
}

impl<W: Write> Console<W> {
    /// Prints to `out`.
    pub fn new(out: W) -> Self {
        Console { out }
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
