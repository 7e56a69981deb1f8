//! `tsc`, the Tiny SNS command-line client, as a library.
//!
//! The binary only parses flags and calls [`run_with`] with the terminal's
//! line editor or stdin, and stdout; tests call [`run`] with an in-memory
//! input and output against in-process nodes.

pub mod cli;
pub mod command;
pub mod connect;
pub mod console;
pub mod error;
mod feed;
pub mod input;
pub mod output;
pub mod session;
pub mod terminal;
pub mod timeline;

pub use error::Error;
pub use session::{Config, Exit, Timing, run, run_with};
