//! The client session: login through the coordinator, command mode,
//! timeline mode, and failover to whichever server the coordinator names
//! when ours goes away.
//!
//! This is the only module that touches the protobuf types; everything it
//! prints is formatted by [`crate::output`].

use std::future::Future;
use std::io::Write;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local, Utc};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Id, Message, Request};
use tokio::io::AsyncBufRead;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::backoff::Backoff;
use crate::command::Command;
use crate::console::Console;
use crate::error::Error;
use crate::input::InputLines;
use crate::output;
use crate::timeline::{self, MAX_POST_BYTES, PendingPosts, PostKey, SeenPosts, Typed};

/// How long the client waits for things.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Connecting to a server (TCP + HTTP/2 handshake).
    pub connect: Duration,
    /// One unary call, and opening the timeline stream.
    pub rpc: Duration,
    /// How long a failover may take before the client gives up.
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
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> i32 {
        match self {
            Exit::EndOfInput => 0,
            Exit::ConnectionFailed => 1,
        }
    }
}

/// A command is re-run after at most this many failovers, then reported as
/// failed: one server dying is the case to handle; several in a row within
/// one command is an outage, and the prompt should come back.
const MAX_FAILOVERS_PER_COMMAND: u32 = 3;

/// A timeline stream that stayed open this long was working, so a failure
/// after it starts the backoff afresh; one that breaks sooner (a server
/// closing every stream it opens) gets ever longer pauses instead of a tight
/// reconnect loop.
const STABLE_STREAM: Duration = Duration::from_secs(2);

/// Runs a whole client session: login, banner, then commands read from
/// `input` until it ends. Output goes to `output`, one flushed line at a
/// time.
pub async fn run<R, W>(config: Config, input: R, output: W) -> Exit
where
    R: AsyncBufRead + Unpin,
    W: Write,
{
    let mut console = Console::new(output);
    let mut input = InputLines::new(input);
    let mut session = match Session::start(config).await {
        Ok(session) => session,
        Err(err) => {
            eprintln!("tsc: {err}");
            console.line(output::CONNECTION_FAILED);
            return Exit::ConnectionFailed;
        }
    };
    console.banner();
    loop {
        console.prompt();
        let line = match input.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => return Exit::EndOfInput,
            Err(err) => {
                eprintln!("tsc: cannot read input: {err}");
                return Exit::EndOfInput;
            }
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
            Command::Follow(_) | Command::Unfollow(_) | Command::List => session.execute(&command, &mut console).await,
        };
        if let Err(err) = outcome {
            eprintln!("tsc: giving up on failover: {err}");
            console.line(output::CONNECTION_FAILED);
            return Exit::ConnectionFailed;
        }
    }
}

/// A logged-in session with one server.
struct Session {
    config: Config,
    coordinator: CoordServiceClient<Channel>,
    server: SnsServiceClient<Channel>,
    /// The id of this session's next Login / Follow / UnFollow: kept by
    /// each retry of a command, so a server that already applied it
    /// answers as it did the first time.
    next_request: u64,
}

impl Session {
    /// Asks the coordinator for the user's server and logs in, once.
    async fn start(config: Config) -> Result<Session, Error> {
        let endpoint = endpoint(&config.coord_host, &config.coord_port.to_string(), config.tls.as_ref())?;
        // Lazy: the coordinator is asked again at every failover, and a lazy
        // channel reconnects by itself if the coordinator restarted meanwhile.
        let coordinator = CoordServiceClient::new(endpoint.connect_timeout(config.timing.connect).connect_lazy());
        let next_request = (session_seed() << 20) | 1;
        let (server, _) = attach(&config, &coordinator, next_request).await?;
        Ok(Session { config, coordinator, server, next_request: next_request + 1 })
    }

    fn username(&self) -> String {
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
                    self.fail_over(console).await?;
                }
                Err(err) => {
                    eprintln!("tsc: {err}");
                    console.line(output::UNKNOWN_REASON);
                    return Ok(());
                }
            }
        }
    }

    fn new_request_id(&mut self) -> u64 {
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
                Ok(Ok((server, address))) => {
                    self.server = server;
                    console.line(&output::reconnected(&address));
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

    /// Timeline mode, for the rest of the session.
    async fn timeline<R, W>(&mut self, input: &mut InputLines<R>, console: &mut Console<W>) -> Exit
    where
        R: AsyncBufRead + Unpin,
        W: Write,
    {
        console.line(output::SUCCESS);
        console.line(output::TIMELINE_ENTERED);
        let mut seen = SeenPosts::default();
        // Posts typed and not yet acknowledged: sent again after a failover.
        let mut pending = PendingPosts::new(session_seed());
        let mut backoff = Backoff::new(self.config.timing.backoff_min, self.config.timing.backoff_max);
        // Since when the server has been refusing the stream on purpose.
        let mut refused_since: Option<Instant> = None;
        loop {
            let opened = Instant::now();
            let err = match self.stream(input, console, &mut seen, &mut pending).await {
                StreamEnd::EndOfInput => {
                    // Whatever the server has not confirmed may be lost: say so.
                    for post in pending.undelivered_at_exit() {
                        console.line(&output::post_not_delivered(&post.msg));
                    }
                    return Exit::EndOfInput;
                }
                StreamEnd::Broken(err) => err,
            };
            if opened.elapsed() >= STABLE_STREAM {
                backoff.reset();
                refused_since = None;
            }
            if err.is_connection_lost() {
                refused_since = None;
                if opened.elapsed() < STABLE_STREAM {
                    sleep(backoff.next_delay()).await;
                }
                if let Err(err) = self.fail_over(console).await {
                    eprintln!("tsc: giving up on failover: {err}");
                    for post in pending.undelivered() {
                        console.line(&output::post_not_delivered(&post.msg));
                    }
                    console.line(output::CONNECTION_FAILED);
                    return Exit::ConnectionFailed;
                }
            } else {
                // The server is there but refuses the stream (say, because
                // it still holds our previous one). Retry on the same server
                // for as long as a failover may take.
                eprintln!("tsc: timeline refused: {err}");
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.config.timing.failover {
                    console.line(output::CONNECTION_FAILED);
                    return Exit::ConnectionFailed;
                }
                sleep(backoff.next_delay()).await;
            }
        }
    }

    /// One timeline stream: open it, send what is waiting, then show what
    /// arrives and post what is typed until input ends or the stream breaks.
    async fn stream<R, W>(
        &mut self,
        input: &mut InputLines<R>,
        console: &mut Console<W>,
        seen: &mut SeenPosts,
        pending: &mut PendingPosts<Message>,
    ) -> StreamEnd
    where
        R: AsyncBufRead + Unpin,
        W: Write,
    {
        let user = self.username();
        // Unbounded: sending never blocks the loop below (which must keep
        // showing posts), and what is queued is what one person types.
        let (outbox, outgoing) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive right here.
        let _ = outbox.send(message(&user, String::new()));
        let rpc = self.config.timing.rpc;
        let mut server = self.server.clone();
        let mut incoming = match timeout(rpc, server.timeline(UnboundedReceiverStream::new(outgoing))).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return StreamEnd::Broken(status.into()),
            Err(_) => return StreamEnd::Broken(Error::Timeout(rpc)),
        };
        for post in pending.to_send() {
            if outbox.send(post).is_err() {
                return StreamEnd::Broken(Error::StreamEnded);
            }
        }
        // Set at end of input: until when to wait for the last
        // acknowledgements (pushed back while they keep coming).
        let mut closing: Option<Instant> = None;
        loop {
            if let Some(deadline) = closing
                && (!pending.awaiting_ack() || Instant::now() >= deadline)
            {
                return StreamEnd::EndOfInput;
            }
            let wait_until = closing.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                // Server first: when both are ready and the stream has just
                // broken, the typed line stays unread until a new stream is
                // open rather than going into the dead one.
                biased;
                received = incoming.message() => match received {
                    Ok(Some(post)) if post.post_id != 0 && post.msg.is_empty() => {
                        for post in pending.ack(post.post_id) {
                            if outbox.send(post).is_err() {
                                return StreamEnd::Broken(Error::StreamEnded);
                            }
                        }
                        if closing.is_some() {
                            closing = Some(Instant::now() + self.config.timing.rpc);
                        }
                    }
                    Ok(Some(post)) => show(post, seen, console),
                    Ok(None) => return StreamEnd::Broken(Error::StreamEnded),
                    Err(status) => return StreamEnd::Broken(status.into()),
                },
                _ = sleep_until(wait_until), if closing.is_some() => {}
                typed = input.next_line(), if closing.is_none() => match typed {
                    Ok(Some(line)) => match timeline::classify(&line) {
                        Typed::Blank => {}
                        Typed::TooLong(bytes) => console.line(&output::post_too_long(bytes, MAX_POST_BYTES)),
                        Typed::Post(text) => {
                            pending.add(|id| Message { post_id: id, ..message(&user, text) });
                            if let Some(post) = pending.newest() {
                                if outbox.send(post.clone()).is_err() {
                                    return StreamEnd::Broken(Error::StreamEnded);
                                }
                                pending.mark_last_sent();
                            }
                        }
                    },
                    // Posts still in flight get a moment to be acknowledged.
                    Ok(None) => closing = Some(Instant::now() + self.config.timing.rpc),
                    Err(err) => {
                        eprintln!("tsc: cannot read input: {err}");
                        return StreamEnd::EndOfInput;
                    }
                },
            }
        }
    }
}

/// Why a timeline stream ended.
enum StreamEnd {
    EndOfInput,
    Broken(Error),
}

/// Asks the coordinator for the user's server, connects and logs in (with
/// request id `login`). Returns the logged-in client and the server's
/// `host:port`.
async fn attach(
    config: &Config,
    coordinator: &CoordServiceClient<Channel>,
    login: u64,
) -> Result<(SnsServiceClient<Channel>, String), Error> {
    let timing = &config.timing;
    let id = i32::try_from(config.user).map_err(|_| Error::UserOutOfRange(config.user))?;
    let mut ask = tonic::Request::new(Id { id });
    ask.set_timeout(timing.rpc);
    let (host, port) = if config.gateway {
        (config.coord_host.clone(), config.coord_port.to_string())
    } else {
        let info = unary(timing.rpc, coordinator.clone().get_server(ask)).await?;
        if info.hostname.is_empty() || info.port.is_empty() || info.server_id <= 0 {
            return Err(Error::NoServer(info.unavailable_reason));
        }
        (info.hostname, info.port)
    };
    let address = format!("{host}:{port}");
    let channel = connect(&host, &port, timing, config.tls.as_ref()).await?;
    let mut server = SnsServiceClient::new(channel);
    let reply = unary(timing.rpc, server.login(request(timing.rpc, config.user.to_string(), None, login))).await?;
    if reply.msg != "SUCCESS" {
        return Err(Error::LoginRefused(reply.msg));
    }
    Ok((server, address))
}

/// Connects to a server now (not lazily), so that a dead one is found out
/// before it is used.
async fn connect(
    host: &str,
    port: &str,
    timing: &Timing,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel, Error> {
    let endpoint = endpoint(host, port, tls)?
        .connect_timeout(timing.connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(timing.keepalive)
        .keep_alive_timeout(timing.keepalive);
    let address = format!("{host}:{port}");
    // The outer timeout also bounds the HTTP/2 handshake, which
    // `connect_timeout` (TCP only) does not.
    match timeout(timing.connect, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(source)) => Err(Error::Connect { address, source }),
        Err(_) => Err(Error::Timeout(timing.connect)),
    }
}

/// The endpoint of `host:port`, over TLS when `tls` is given.
fn endpoint(host: &str, port: &str, tls: Option<&tonic::transport::ClientTlsConfig>) -> Result<Endpoint, Error> {
    let plain = uri(host, port)?;
    let uri = if tls.is_some() { plain.replacen("http://", "https://", 1) } else { plain };
    let endpoint = Endpoint::from_shared(uri.clone()).map_err(|_| Error::InvalidAddress(uri.clone()))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()).map_err(|_| Error::InvalidAddress(uri)),
        None => Ok(endpoint),
    }
}

/// `http://host:port`, with IPv6 literals bracketed. The port must be a
/// number: it comes from the coordinator, and a garbled one must fail here
/// rather than connect somewhere unexpected.
fn uri(host: &str, port: &str) -> Result<String, Error> {
    if port.parse::<u16>().is_err() || host.is_empty() {
        return Err(Error::InvalidAddress(format!("{host}:{port}")));
    }
    if host.contains(':') && !host.starts_with('[') {
        Ok(format!("http://[{host}]:{port}"))
    } else {
        Ok(format!("http://{host}:{port}"))
    }
}

/// Awaits a unary call for at most `limit`.
async fn unary<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.into()),
        Err(_) => Err(Error::Timeout(limit)),
    }
}

/// A `Request` for `user` with request id `id` (0: none), with the
/// client's deadline passed on to the server (`grpc-timeout`) so it can drop
/// work nobody waits for.
fn request(limit: Duration, user: String, argument: Option<&String>, id: u64) -> tonic::Request<Request> {
    let mut request = tonic::Request::new(Request {
        username: user,
        arguments: argument.cloned().into_iter().collect(),
        request_id: id,
    });
    request.set_timeout(limit);
    request
}

/// A timeline message from `user`, stamped now.
fn message(user: &str, text: String) -> Message {
    Message { username: user.to_owned(), msg: text, timestamp: Some(SystemTime::now().into()), post_id: 0 }
}

/// Seeds this session's post ids, so a new session never reuses the ids of
/// an earlier one that the server still remembers.
fn session_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (u64::from(std::process::id()) << 32)) >> 8
}

/// Prints a received post unless this session has shown it already.
fn show<W: Write>(post: Message, seen: &mut SeenPosts, console: &mut Console<W>) {
    let key = PostKey { user: post.username, seconds: post.timestamp.map(|t| t.seconds), text: post.msg };
    // A post without a time (which our servers never send) is shown at the
    // time it arrives rather than at the epoch.
    let posted = post
        .timestamp
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now)
        .with_timezone(&Local);
    let line = output::post_line(&key.user, &key.text, &posted);
    if seen.first_sighting(key) {
        console.line(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_bracket_ipv6_and_reject_bad_ports() {
        assert_eq!(uri("127.0.0.1", "9000").ok().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(uri("tsd-1.sns", "9010").ok().as_deref(), Some("http://tsd-1.sns:9010"));
        assert_eq!(uri("::1", "9000").ok().as_deref(), Some("http://[::1]:9000"));
        assert_eq!(uri("[::1]", "9000").ok().as_deref(), Some("http://[::1]:9000"));
        assert!(uri("host", "").is_err());
        assert!(uri("host", "99999").is_err());
        assert!(uri("host", "90a").is_err());
        assert!(uri("", "9000").is_err());
    }

    #[test]
    fn requests_carry_the_argument_as_typed() {
        let req = request(Duration::from_secs(1), "1".into(), Some(&"../../etc".to_owned()), 7).into_inner();
        assert_eq!(req.username, "1");
        assert_eq!(req.arguments, ["../../etc"]);
        assert!(request(Duration::from_secs(1), "1".into(), None, 0).into_inner().arguments.is_empty());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::EndOfInput.code(), 0);
        assert_eq!(Exit::ConnectionFailed.code(), 1);
    }
}
