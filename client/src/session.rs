//! The client session: login through the coordinator, command mode,
//! timeline mode, and failover to whichever server the coordinator names
//! when ours goes away.
//!
//! Timeline mode lives in `feed.rs`, the calls themselves in
//! [`crate::connect`]; everything printed is formatted by
//! [`crate::output`].

use std::io::Write;
use std::time::{Duration, SystemTime};

use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use tokio::io::AsyncBufRead;
use tokio::time::{Instant, sleep, timeout_at};
use tonic::transport::Channel;

use crate::command::Command;
use crate::connect::{self, attach, request, unary};
use crate::console::Console;
use crate::error::Error;
use crate::input::{Event, Input};
use crate::output;
use sns_proto::backoff::Backoff;

/// How long the client waits for things.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Connecting to a server (TCP + HTTP/2 handshake).
    pub connect: Duration,
    /// One unary call, and opening the timeline stream.
    pub rpc: Duration,
    /// How long a failover may take before the client gives up
    /// (`--reconnect-timeout`).
    pub failover: Duration,
    /// First pause between failover attempts.
    pub backoff_min: Duration,
    /// Longest pause between failover attempts.
    pub backoff_max: Duration,
    /// HTTP/2 ping period on an open timeline stream: a server host that
    /// vanishes without closing the connection (a lost pod, a cut network)
    /// is noticed within two periods.
    pub keepalive: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            // A live server on a LAN answers in milliseconds; these only
            // bound how long a hung one can freeze the prompt.
            connect: Duration::from_secs(2),
            rpc: Duration::from_secs(5),
            // The coordinator declares a server dead after 10 s (two missed
            // 5 s heartbeats); 60 s leaves room for a slow promotion and is
            // the course's own patience between steps.
            failover: Duration::from_secs(60),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            keepalive: Duration::from_secs(5),
        }
    }
}

/// Everything a session needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Coordinator host name or address.
    pub coord_host: String,
    /// Coordinator port.
    pub coord_port: u16,
    /// The user this client logs in as.
    pub user: u32,
    /// Send every call to the coordinator's gateway instead of to the
    /// server address it hands out.
    pub gateway: bool,
    /// Timeouts and backoff.
    pub timing: Timing,
    /// Talk TLS to the coordinator and the servers (`--tls`), checking
    /// their certificates against this configuration's roots.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// End of input: the user is done.
    EndOfInput,
    /// No server could be reached (`connection failed: -1` was printed).
    ConnectionFailed,
    /// Ctrl-C.
    Interrupted,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            Exit::EndOfInput => 0,
            Exit::ConnectionFailed => 1,
            // What a shell reports for a process ended by SIGINT.
            Exit::Interrupted => 130,
        }
    }
}

/// A command is re-run after at most this many failovers, then reported as
/// failed: one server dying is the case to handle; several in a row within
/// one command is an outage, and the prompt should come back.
const MAX_FAILOVERS_PER_COMMAND: u32 = 3;

/// Runs a whole session on piped input: login, banner, then commands read
/// from `input` until it ends. Output goes to `output`, one flushed line at
/// a time; diagnostics to stderr.
pub async fn run<R, W>(config: Config, input: R, output: W) -> Exit
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    run_with(config, Input::pipe(input), Console::new(output)).await
}

/// Runs a whole session on any input (a pipe or the line editor, with or
/// without Ctrl-C) and console.
pub async fn run_with<R, W>(config: Config, mut input: Input<R>, mut console: Console<W>) -> Exit
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    let started = tokio::select! {
        started = Session::start(config) => started,
        () = input.interrupted() => return Exit::Interrupted,
    };
    let mut session = match started {
        Ok(session) => session,
        Err(err) => {
            console.note(&err.to_string());
            console.line(output::CONNECTION_FAILED);
            return Exit::ConnectionFailed;
        }
    };
    console.banner();
    loop {
        if !input.shows_prompt() {
            console.prompt();
        }
        input.set_prompt(output::PROMPT);
        let line = match input.next().await {
            Event::Line(line) => line,
            Event::End => return Exit::EndOfInput,
            Event::Interrupted => return Exit::Interrupted,
        };
        let command = Command::parse(&line);
        let outcome = match command {
            Command::Empty => Ok(()),
            Command::MissingArgument => {
                console.line(output::NO_ARGUMENTS);
                Ok(())
            }
            Command::Unknown => {
                console.line(output::INVALID_COMMAND);
                Ok(())
            }
            Command::Timeline => return session.timeline(&mut input, &mut console).await,
            Command::Follow(_) | Command::Unfollow(_) | Command::List => tokio::select! {
                outcome = session.execute(&command, &mut console) => outcome,
                () = input.interrupted() => return Exit::Interrupted,
            },
        };
        if let Err(err) = outcome {
            console.note(&format!("giving up reconnecting: {err}"));
            console.line(output::CONNECTION_FAILED);
            return Exit::ConnectionFailed;
        }
    }
}

/// A logged-in session with one server.
pub(crate) struct Session {
    pub(crate) config: Config,
    pub(crate) coordinator: CoordServiceClient<Channel>,
    pub(crate) server: SnsServiceClient<Channel>,
    /// Where `server` is, as told to the user.
    pub(crate) server_at: String,
    /// The id of this session's next Login / Follow / UnFollow: kept by
    /// each retry of a command, so a server that already applied it
    /// answers as it did the first time.
    next_request: u64,
}

impl Session {
    /// Asks the coordinator for the user's server and logs in, once.
    async fn start(config: Config) -> Result<Session, Error> {
        let coordinator = connect::coordinator(&config)?;
        let next_request = (session_seed() << 20) | 1;
        let attached = attach(&config, &coordinator, next_request).await?;
        Ok(Session {
            config,
            coordinator,
            server: attached.server,
            server_at: attached.shown_as,
            next_request: next_request + 1,
        })
    }

    pub(crate) fn username(&self) -> String {
        self.config.user.to_string()
    }

    /// Runs FOLLOW, UNFOLLOW or LIST and prints its result. A server that is
    /// gone is replaced and the command re-run; `Err` only when no
    /// replacement could be found.
    async fn execute<W: Write>(&mut self, command: &Command, console: &mut Console<W>) -> Result<(), Error> {
        let mut failovers = 0;
        let id = self.new_request_id();
        loop {
            match self.send(command, id).await {
                Ok(lines) => {
                    for line in &lines {
                        console.line(line);
                    }
                    return Ok(());
                }
                Err(err) if err.is_connection_lost() && failovers < MAX_FAILOVERS_PER_COMMAND => {
                    failovers += 1;
                    console.note(&output::server_lost(&self.server_at, &err));
                    self.fail_over(console).await?;
                }
                Err(err) => {
                    console.note(&err.to_string());
                    console.line(output::UNKNOWN_REASON);
                    return Ok(());
                }
            }
        }
    }

    pub(crate) fn new_request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        id
    }

    /// One attempt at a unary command (request id `id`); the lines to print
    /// on success.
    async fn send(&self, command: &Command, id: u64) -> Result<Vec<String>, Error> {
        let rpc = self.config.timing.rpc;
        let mut server = self.server.clone();
        let user = self.username();
        let status = match command {
            Command::Follow(target) => unary(rpc, server.follow(request(rpc, user, Some(target), id))).await?,
            Command::Unfollow(target) => unary(rpc, server.un_follow(request(rpc, user, Some(target), id))).await?,
            Command::List => {
                let list = unary(rpc, server.list(request(rpc, user, None, 0))).await?;
                return Ok(output::list_lines(list.all_users, list.followers).into());
            }
            // `run` sends only the three commands above here.
            Command::Timeline | Command::Empty | Command::MissingArgument | Command::Unknown => {
                return Ok(vec![output::INVALID_COMMAND.to_owned()]);
            }
        };
        Ok(vec![output::status_line(&status.msg).to_owned()])
    }

    /// Polls the coordinator until it names a server that accepts our login,
    /// then switches to it. `Err` once the failover budget is spent.
    async fn fail_over<W: Write>(&mut self, console: &mut Console<W>) -> Result<(), Error> {
        let timing = self.config.timing.clone();
        let deadline = Instant::now() + timing.failover;
        let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
        loop {
            // Until the coordinator notices the death it may name the dead
            // server again, or a live one that is not (yet) the master; both
            // fail here and just mean "ask again".
            let login = self.new_request_id();
            let last_error = match timeout_at(deadline, attach(&self.config, &self.coordinator, login)).await {
                Ok(Ok(attached)) => {
                    self.server = attached.server;
                    console.line(&output::reconnected(&attached.shown_as));
                    self.server_at = attached.shown_as;
                    return Ok(());
                }
                Ok(Err(err)) => err,
                Err(_) => return Err(Error::Timeout(timing.failover)),
            };
            let pause = backoff.next_delay();
            if Instant::now() + pause >= deadline {
                return Err(last_error);
            }
            sleep(pause).await;
        }
    }
}

/// Seeds this session's request and post ids, so a new session never
/// reuses the ids of an earlier one that the server still remembers.
pub(crate) fn session_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32)) >> 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::EndOfInput.code(), 0);
        assert_eq!(Exit::ConnectionFailed.code(), 1);
        assert_eq!(Exit::Interrupted.code(), 130);
    }
}
