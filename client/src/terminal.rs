//! The line editor used when stdin and stdout are a terminal: editing keys,
//! history (Up/Down), Ctrl-C and Ctrl-D as keys rather than signals.
//!
//! `rustyline` blocks, so it runs on a thread of its own and reads a line
//! only when asked: nothing typed ahead is consumed before the session wants
//! it, and the prompt is the one of the mode the session is in when it asks.
//! While a line is being edited, output goes through rustyline's external
//! printer, which prints above the line being typed and redraws it (a post
//! arriving in timeline mode does not garble what the user is typing).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};

use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;

use crate::input::Event;

/// The printer half, shared by stdout and stderr writers.
type Printer = Arc<Mutex<Box<dyn ExternalPrinter + Send>>>;

/// A line editor on the process's terminal.
#[derive(Debug)]
pub struct Terminal {
    requests: std_mpsc::Sender<&'static str>,
    replies: mpsc::UnboundedReceiver<Event>,
    /// A line was asked for and not yet received.
    asked: bool,
    prompt: &'static str,
    /// Set once the session is ending: output goes straight to the
    /// terminal, not through the editor (which prints on its own thread,
    /// maybe after the process is gone).
    released: Arc<AtomicBool>,
    #[cfg(unix)]
    saved: Option<nix::sys::termios::Termios>,
}

impl Terminal {
    /// The editor, and writers for stdout and stderr that print above the
    /// line being edited; `None` unless stdin and stdout are both terminals
    /// (`tsc | tee log` keeps the plain, course-exact behaviour).
    pub fn open() -> Option<(Terminal, TermWriter, TermWriter)> {
        use std::io::IsTerminal;
        if !io::stdin().is_terminal() || !io::stdout().is_terminal() {
            return None;
        }
        #[cfg(unix)]
        let saved = nix::sys::termios::tcgetattr(io::stdin()).ok();
        let (requests, asks) = std_mpsc::channel::<&'static str>();
        let (answer, replies) = mpsc::unbounded_channel();
        let (ready, printer) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut editor = match DefaultEditor::new() {
                Ok(editor) => editor,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            match editor.create_external_printer() {
                Ok(p) => {
                    let boxed: Box<dyn ExternalPrinter + Send> = Box::new(p);
                    let _ = ready.send(Ok(boxed));
                }
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            }
            while let Ok(prompt) = asks.recv() {
                let event = match editor.readline(prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                        }
                        Event::Line(line)
                    }
                    Err(ReadlineError::Interrupted) => Event::Interrupted,
                    Err(ReadlineError::Eof) => Event::End,
                    Err(err) => {
                        eprintln!("tsc: cannot read the terminal: {err}");
                        Event::End
                    }
                };
                if answer.send(event).is_err() {
                    return;
                }
            }
        });
        let printer: Printer = Arc::new(Mutex::new(printer.recv().ok()?.ok()?));
        let released = Arc::new(AtomicBool::new(false));
        let terminal = Terminal {
            requests,
            replies,
            asked: false,
            prompt: "",
            released: Arc::clone(&released),
            #[cfg(unix)]
            saved,
        };
        let out = TermWriter::new(&printer, &released, Stream::Stdout);
        let err = TermWriter::new(&printer, &released, Stream::Stderr);
        Some((terminal, out, err))
    }

    /// The prompt of the lines asked for from now on.
    pub fn set_prompt(&mut self, prompt: &'static str) {
        self.prompt = prompt;
    }

    /// The next line (or Ctrl-C, or Ctrl-D). Cancel safe: a line being
    /// typed stays asked for, and the next call receives it.
    pub async fn next(&mut self) -> Event {
        if !self.asked {
            if self.requests.send(self.prompt).is_err() {
                return Event::End;
            }
            self.asked = true;
        }
        let event = self.replies.recv().await.unwrap_or(Event::End);
        self.asked = false;
        event
    }

    /// The session is ending, maybe while a line is being edited (the
    /// editor cannot be stopped, nor is it waited for): leaves the terminal
    /// as it was found and prints straight to it from now on, so the last
    /// lines are on the screen before the process exits.
    pub fn release(&mut self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        #[cfg(unix)]
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(io::stdin(), nix::sys::termios::SetArg::TCSANOW, saved);
        }
        if self.asked {
            // End the half-typed line, so what follows starts on its own.
            let mut out = io::stdout();
            let _ = out.write_all(b"\n");
            let _ = out.flush();
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.release();
    }
}

/// Which of the process's streams a [`TermWriter`] stands for.
#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Writes whole lines through the line editor's printer (straight to its
/// stream once the terminal is released).
pub struct TermWriter {
    printer: Printer,
    released: Arc<AtomicBool>,
    stream: Stream,
    pending: Vec<u8>,
}

impl std::fmt::Debug for TermWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TermWriter").field("pending", &self.pending.len()).finish()
    }
}

impl TermWriter {
    fn new(printer: &Printer, released: &Arc<AtomicBool>, stream: Stream) -> Self {
        TermWriter { printer: Arc::clone(printer), released: Arc::clone(released), stream, pending: Vec::new() }
    }
}

impl Write for TermWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending);
        if self.released.load(Ordering::SeqCst) {
            return match self.stream {
                Stream::Stdout => io::stdout().write_all(&bytes).and_then(|()| io::stdout().flush()),
                Stream::Stderr => io::stderr().write_all(&bytes),
            };
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        // Only this thread's two writers share the lock, one at a time; it
        // is never held across an await.
        let mut printer = self.printer.lock().unwrap_or_else(PoisonError::into_inner);
        printer.print(text).map_err(io::Error::other)
    }
}

/// Drops what was typed on the terminal and not read yet, so that a shell
/// started after the client does not run it as a command. Does nothing
/// when stdin is not a terminal.
pub fn discard_typeahead() {
    #[cfg(unix)]
    {
        use std::io::IsTerminal;
        if io::stdin().is_terminal() {
            let _ = nix::sys::termios::tcflush(io::stdin(), nix::sys::termios::FlushArg::TCIFLUSH);
        }
    }
}
