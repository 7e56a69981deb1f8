//! `tsc`, the Tiny SNS command-line client, as a library.
//!
//! The binary only parses flags and calls [`run`] with stdin and stdout;
//! tests call [`run`] with an in-memory input and output against
//! in-process fake servers.

pub mod backoff;
pub mod cli;
pub mod command;
pub mod console;
pub mod error;
pub mod input;
pub mod output;
pub mod session;
pub mod timeline;

pub use error::Error;
pub use session::{Config, Exit, Timing, run};
