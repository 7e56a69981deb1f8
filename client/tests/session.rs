//! The client against in-process fake coordinator and servers: exact output
//! of every command, startup failures, and failover in both modes.
//!
//! Each fake runs on its own tokio runtime so that a test can "kill" it:
//! shutting that runtime down drops its listener and every connection at
//! once, which the client sees as it would see a crashed process.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Local};
use sns_client::output::post_line;
use sns_client::{Config, Exit, Timing};
use sns_proto::csce438::coord_service_server::{CoordService, CoordServiceServer};
use sns_proto::csce438::sns_service_server::{SnsService, SnsServiceServer};
use sns_proto::csce438::{
    Confirmation, Id, ListReply, Message, Reply, Request, ServerInfo, ServerList,
};
use sns_proto::prost_types::Timestamp;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::transport::Server;
use tonic::{Response, Status, Streaming};

/// How long a test waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(15);

/// The user every test logs in as.
const USER: u32 = 1;

/// Locks a mutex, ignoring poisoning (a panicking test fails anyway).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `check` until it holds; panics with `what` after [`PATIENCE`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- hosting

/// A fake listening on 127.0.0.1 on its own runtime.
struct Hosted {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Hosted {
    fn start<F, Fut>(serve: F) -> Hosted
    where
        F: FnOnce(TcpListenerStream) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
    {
        let Ok(listener) = std::net::TcpListener::bind("127.0.0.1:0") else {
            panic!("bind")
        };
        let Ok(addr) = listener.local_addr() else {
            panic!("local addr")
        };
        let Ok(()) = listener.set_nonblocking(true) else {
            panic!("nonblocking")
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build();
        let Ok(runtime) = runtime else {
            panic!("runtime")
        };
        runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                panic!("listener")
            };
            let _ = serve(TcpListenerStream::new(listener)).await;
        });
        Hosted {
            addr,
            runtime: Some(runtime),
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Kills the fake: listener and connections close at once.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------- coordinator

#[derive(Clone, Default)]
struct FakeCoordinator {
    /// (host, port) of the server it names; `None` = no live server.
    target: Arc<Mutex<Option<(String, String)>>>,
    asks: Arc<AtomicUsize>,
}

impl FakeCoordinator {
    fn point_at(&self, port: Option<String>) {
        *lock(&self.target) = port.map(|p| ("127.0.0.1".to_owned(), p));
    }

    fn asks(&self) -> usize {
        self.asks.load(Ordering::SeqCst)
    }

    fn host(&self) -> Hosted {
        let me = self.clone();
        Hosted::start(move |incoming| {
            Server::builder()
                .add_service(CoordServiceServer::new(me))
                .serve_with_incoming(incoming)
        })
    }
}

#[tonic::async_trait]
impl CoordService for FakeCoordinator {
    async fn heartbeat(
        &self,
        _: tonic::Request<ServerInfo>,
    ) -> Result<Response<Confirmation>, Status> {
        Ok(Response::new(Confirmation::default()))
    }

    async fn get_server(
        &self,
        request: tonic::Request<Id>,
    ) -> Result<Response<ServerInfo>, Status> {
        assert_eq!(request.get_ref().id, USER as i32);
        self.asks.fetch_add(1, Ordering::SeqCst);
        let info = match lock(&self.target).clone() {
            Some((hostname, port)) => ServerInfo {
                server_id: 1,
                hostname,
                port,
                r#type: "server".into(),
                cluster_id: 1,
                is_master: true,
                ..ServerInfo::default()
            },
            None => ServerInfo::default(),
        };
        Ok(Response::new(info))
    }

    async fn get_slave(&self, _: tonic::Request<Id>) -> Result<Response<ServerInfo>, Status> {
        Ok(Response::new(ServerInfo {
            server_id: -1,
            ..ServerInfo::default()
        }))
    }

    async fn get_follower_server(
        &self,
        _: tonic::Request<Id>,
    ) -> Result<Response<ServerInfo>, Status> {
        Ok(Response::new(ServerInfo::default()))
    }

    async fn get_all_follower_servers(
        &self,
        _: tonic::Request<Id>,
    ) -> Result<Response<ServerList>, Status> {
        Ok(Response::new(ServerList::default()))
    }
}

// --------------------------------------------------------------- server

#[derive(Default)]
struct ServerState {
    /// `"<method> <username> <arguments...>"` for every unary call.
    calls: Vec<String>,
    /// Reply.msg for Follow/UnFollow by argument; SUCCESS otherwise.
    replies: HashMap<String, String>,
    login_reply: Option<String>,
    /// Answer every call with `unavailable`, like a server that is not the master.
    not_master: bool,
    all_users: Vec<String>,
    followers: Vec<String>,
    /// Sent on every timeline opening.
    backlog: Vec<Message>,
    /// Every message received on timeline streams, openings included.
    received: Vec<Message>,
    /// Sender of the latest timeline stream, to push live posts.
    live: Option<mpsc::UnboundedSender<Result<Message, Status>>>,
}

#[derive(Clone, Default)]
struct FakeServer {
    state: Arc<Mutex<ServerState>>,
}

impl FakeServer {
    fn state(&self) -> MutexGuard<'_, ServerState> {
        lock(&self.state)
    }

    fn host(&self) -> Hosted {
        let me = self.clone();
        Hosted::start(move |incoming| {
            Server::builder()
                .add_service(SnsServiceServer::new(me))
                .serve_with_incoming(incoming)
        })
    }

    fn record(&self, method: &str, request: &Request) -> Result<(), Status> {
        let mut state = self.state();
        if state.not_master {
            return Err(Status::unavailable("not the master"));
        }
        let mut call = format!("{method} {}", request.username);
        for argument in &request.arguments {
            call.push(' ');
            call.push_str(argument);
        }
        state.calls.push(call);
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    fn posts(&self) -> Vec<String> {
        self.state()
            .received
            .iter()
            .map(|m| m.msg.clone())
            .collect()
    }

    fn reply_for(&self, request: &Request) -> Reply {
        let state = self.state();
        let argument = request.arguments.first().cloned().unwrap_or_default();
        let msg = state
            .replies
            .get(&argument)
            .cloned()
            .unwrap_or_else(|| "SUCCESS".into());
        Reply { msg }
    }
}

#[tonic::async_trait]
impl SnsService for FakeServer {
    async fn login(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        self.record("login", request.get_ref())?;
        let msg = self
            .state()
            .login_reply
            .clone()
            .unwrap_or_else(|| "SUCCESS".into());
        Ok(Response::new(Reply { msg }))
    }

    async fn list(&self, request: tonic::Request<Request>) -> Result<Response<ListReply>, Status> {
        self.record("list", request.get_ref())?;
        let state = self.state();
        Ok(Response::new(ListReply {
            all_users: state.all_users.clone(),
            followers: state.followers.clone(),
        }))
    }

    async fn follow(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        self.record("follow", request.get_ref())?;
        Ok(Response::new(self.reply_for(request.get_ref())))
    }

    async fn un_follow(&self, request: tonic::Request<Request>) -> Result<Response<Reply>, Status> {
        self.record("unfollow", request.get_ref())?;
        Ok(Response::new(self.reply_for(request.get_ref())))
    }

    type TimelineStream = UnboundedReceiverStream<Result<Message, Status>>;

    async fn timeline(
        &self,
        request: tonic::Request<Streaming<Message>>,
    ) -> Result<Response<Self::TimelineStream>, Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut state = self.state();
            if state.not_master {
                return Err(Status::unavailable("not the master"));
            }
            for post in &state.backlog {
                let _ = tx.send(Ok(post.clone()));
            }
            state.live = Some(tx);
        }
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                lock(&state).received.push(message);
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

fn post(user: &str, seconds: i64, text: &str) -> Message {
    Message {
        username: user.into(),
        msg: text.into(),
        timestamp: Some(Timestamp { seconds, nanos: 0 }),
    }
}

/// The line the client prints for `post`, in this machine's time zone.
fn shown(user: &str, seconds: i64, text: &str) -> String {
    let Some(at) = DateTime::from_timestamp(seconds, 0) else {
        panic!("bad time")
    };
    post_line(user, text, &at.with_timezone(&Local))
}

// --------------------------------------------------------------- client

/// What the client printed.
#[derive(Clone, Default)]
struct Screen(Arc<Mutex<Vec<u8>>>);

impl Write for Screen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Screen {
    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }

    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?}; screen:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A running client: type into `keyboard`, read `screen`, await `exit`.
struct Client {
    keyboard: DuplexStream,
    screen: Screen,
    exit: JoinHandle<Exit>,
}

fn fast_timing() -> Timing {
    Timing {
        connect: Duration::from_secs(1),
        rpc: Duration::from_secs(2),
        failover: Duration::from_secs(20),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        keepalive: Duration::from_secs(5),
    }
}

impl Client {
    fn start(coordinator: &Hosted, timing: Timing) -> Client {
        let config = Config {
            coord_host: "127.0.0.1".into(),
            coord_port: coordinator.addr.port(),
            user: USER,
            timing,
        };
        let (keyboard, stdin) = tokio::io::duplex(1 << 16);
        let screen = Screen::default();
        let exit = tokio::spawn(sns_client::run(
            config,
            tokio::io::BufReader::new(stdin),
            screen.clone(),
        ));
        Client {
            keyboard,
            screen,
            exit,
        }
    }

    async fn type_line(&mut self, line: &str) {
        let Ok(()) = self
            .keyboard
            .write_all(format!("{line}\n").as_bytes())
            .await
        else {
            panic!("typing")
        };
    }

    /// Ends the input and returns how the client exited.
    async fn finish(self) -> (Exit, String) {
        drop(self.keyboard);
        let exit = tokio::time::timeout(PATIENCE, self.exit).await;
        let Ok(Ok(exit)) = exit else {
            panic!("client did not exit; screen:\n{}", self.screen.text())
        };
        (exit, self.screen.text())
    }
}

const BANNER: &str = "========= TINY SNS CLIENT =========\n Command Lists and Format:\n FOLLOW <username>\n UNFOLLOW <username>\n LIST\n TIMELINE\n=====================================\n";

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn commands_print_the_course_lines() {
    let server = FakeServer::default();
    {
        let mut state = server.state();
        state.all_users = ["10", "2", "1", "3"].map(String::from).to_vec();
        state.followers = ["3", "2"].map(String::from).to_vec();
        state
            .replies
            .insert("1".into(), "FAILURE_ALREADY_EXISTS".into());
        state
            .replies
            .insert("9".into(), "FAILURE_NOT_A_FOLLOWER".into());
        state
            .replies
            .insert("../../etc".into(), "FAILURE_INVALID_USERNAME".into());
        state
            .replies
            .insert("7".into(), "FAILURE_NOT_EXISTS".into());
    }
    let hosted_server = server.host();
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_server.port()));
    let hosted_coordinator = coordinator.host();

    let mut client = Client::start(&hosted_coordinator, fast_timing());
    for line in [
        "LIST",
        "follow 2",
        "FOLLOW 1",
        "FOLLOW",
        "",
        "bogus 2",
        "UnFollow 9",
        "follow ../../etc",
        "unfollow 7",
    ] {
        client.type_line(line).await;
    }
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}\
Cmd> Command completed successfully\nAll users: 1, 2, 3, 10, \nFollowers: 2, 3, \n\
Cmd> Command completed successfully\n\
Cmd> Input username already exists, command failed\n\
Cmd> Invalid Input -- No Arguments Given\n\
Cmd> \
Cmd> Command failed with invalid command\n\
Cmd> Command failed with not a follower\n\
Cmd> Command failed with invalid username\n\
Cmd> Input username does not exists, command failed\n\
Cmd> "
    );
    assert_eq!(screen, expected);
    assert_eq!(
        server.calls(),
        [
            "login 1",
            "list 1",
            "follow 1 2",
            "follow 1 1",
            "unfollow 1 9",
            "follow 1 ../../etc",
            "unfollow 1 7"
        ]
    );
}

#[tokio::test]
async fn no_server_means_connection_failed() {
    let coordinator = FakeCoordinator::default();
    let hosted = coordinator.host();
    let client = Client::start(&hosted, fast_timing());
    let (exit, screen) = client.finish().await;
    assert_eq!(
        (exit, screen.as_str()),
        (Exit::ConnectionFailed, "connection failed: -1\n")
    );
    assert_eq!(coordinator.asks(), 1, "startup asks the coordinator once");
}

#[tokio::test]
async fn refused_login_means_connection_failed() {
    let server = FakeServer::default();
    server.state().login_reply = Some("FAILURE_UNKNOWN".into());
    let hosted_server = server.host();
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_server.port()));
    let hosted = coordinator.host();
    let (exit, screen) = Client::start(&hosted, fast_timing()).finish().await;
    assert_eq!(
        (exit, screen.as_str()),
        (Exit::ConnectionFailed, "connection failed: -1\n")
    );
}

#[tokio::test]
async fn unreachable_coordinator_or_server_means_connection_failed() {
    let mut dead = FakeServer::default().host();
    let dead_port = dead.port();
    dead.kill();
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(dead_port));
    let mut hosted = coordinator.host();
    let (exit, screen) = Client::start(&hosted, fast_timing()).finish().await;
    assert_eq!(
        (exit, screen.as_str()),
        (Exit::ConnectionFailed, "connection failed: -1\n")
    );

    hosted.kill();
    let (exit, screen) = Client::start(&hosted, fast_timing()).finish().await;
    assert_eq!(
        (exit, screen.as_str()),
        (Exit::ConnectionFailed, "connection failed: -1\n")
    );
}

#[tokio::test]
async fn a_command_fails_over_to_the_new_master_and_runs_once_more() {
    let (a, b) = (FakeServer::default(), FakeServer::default());
    let (mut hosted_a, hosted_b) = (a.host(), b.host());
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_a.port()));
    let hosted_coordinator = coordinator.host();
    let mut client = Client::start(&hosted_coordinator, fast_timing());
    client.type_line("LIST").await;
    client.screen.wait_for("Followers: \nCmd> ").await;

    hosted_a.kill();
    let asks = coordinator.asks();
    client.type_line("FOLLOW 3").await;
    // Like the real coordinator before it notices the death, keep naming
    // the dead server for a few polls.
    eventually("the client polling the coordinator", || {
        coordinator.asks() >= asks + 3
    })
    .await;
    coordinator.point_at(Some(hosted_b.port()));
    let reconnected = format!(
        "Cmd> Reconnected to server 127.0.0.1:{}\nCommand completed successfully\nCmd> ",
        hosted_b.port()
    );
    client.screen.wait_for(&reconnected).await;

    client.type_line("LIST").await;
    let (exit, screen) = client.finish().await;
    assert_eq!(exit, Exit::EndOfInput);
    assert_eq!(screen.matches("Reconnected").count(), 1, "{screen}");
    assert_eq!(a.calls(), ["login 1", "list 1"]);
    assert_eq!(b.calls(), ["login 1", "follow 1 3", "list 1"]);
}

#[tokio::test]
async fn an_unavailable_answer_means_find_the_master() {
    let (a, b) = (FakeServer::default(), FakeServer::default());
    let (hosted_a, hosted_b) = (a.host(), b.host());
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_a.port()));
    let hosted_coordinator = coordinator.host();
    let mut client = Client::start(&hosted_coordinator, fast_timing());
    client.screen.wait_for("Cmd> ").await;

    // A is alive but demoted: it answers `unavailable`, logins included.
    a.state().not_master = true;
    let asks = coordinator.asks();
    client.type_line("UNFOLLOW 4").await;
    eventually("the client polling the coordinator", || {
        coordinator.asks() >= asks + 2
    })
    .await;
    coordinator.point_at(Some(hosted_b.port()));
    client
        .screen
        .wait_for(&format!(
            "Reconnected to server 127.0.0.1:{}\n",
            hosted_b.port()
        ))
        .await;
    let (_, screen) = client.finish().await;
    let expected = format!(
        "Cmd> Reconnected to server 127.0.0.1:{}\nCommand completed successfully\nCmd> ",
        hosted_b.port()
    );
    assert!(screen.ends_with(&expected), "{screen}");
    assert_eq!(b.calls(), ["login 1", "unfollow 1 4"]);
}

#[tokio::test]
async fn the_client_gives_up_when_the_coordinator_is_gone_too() {
    let server = FakeServer::default();
    let mut hosted_server = server.host();
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_server.port()));
    let mut hosted_coordinator = coordinator.host();
    let timing = Timing {
        failover: Duration::from_secs(1),
        ..fast_timing()
    };
    let mut client = Client::start(&hosted_coordinator, timing);
    client.screen.wait_for("Cmd> ").await;

    hosted_server.kill();
    hosted_coordinator.kill();
    client.type_line("LIST").await;
    let exit = tokio::time::timeout(PATIENCE, &mut client.exit).await;
    let Ok(Ok(exit)) = exit else {
        panic!("client did not give up: {}", client.screen.text())
    };
    assert_eq!(exit, Exit::ConnectionFailed);
    assert!(
        client
            .screen
            .text()
            .ends_with("Cmd> connection failed: -1\n"),
        "{}",
        client.screen.text()
    );
}

#[tokio::test]
async fn timeline_shows_posts_and_sends_typed_lines() {
    let server = FakeServer::default();
    server.state().backlog = vec![
        post("2", 1_744_336_936, "p21"),
        post("3", 1_744_336_999, "p31"),
    ];
    let hosted_server = server.host();
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_server.port()));
    let hosted_coordinator = coordinator.host();
    let mut client = Client::start(&hosted_coordinator, fast_timing());

    client.type_line("timeline").await;
    client
        .screen
        .wait_for(&shown("3", 1_744_336_999, "p31"))
        .await;
    let live = server.state().live.clone();
    let Some(live) = live else {
        panic!("no stream")
    };
    let Ok(()) = live.send(Ok(post("2", 1_744_337_000, "live"))) else {
        panic!("stream gone")
    };
    client
        .screen
        .wait_for(&shown("2", 1_744_337_000, "live"))
        .await;

    client.type_line("hello world").await;
    client.type_line("").await;
    client.type_line(&"x".repeat(5000)).await;
    client.type_line("after").await;
    eventually("the posts to arrive", || server.posts().len() >= 3).await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\nNow you are in the timeline\n{}\n{}\n{}\n\
Post too long (5000 bytes, at most 4096), not sent\n",
        shown("2", 1_744_336_936, "p21"),
        shown("3", 1_744_336_999, "p31"),
        shown("2", 1_744_337_000, "live"),
    );
    assert_eq!(screen, expected);
    let received = server.state().received.clone();
    let texts: Vec<_> = received.iter().map(|m| m.msg.as_str()).collect();
    assert_eq!(
        texts,
        ["", "hello world", "after"],
        "opening first, then the posts"
    );
    assert!(
        received
            .iter()
            .all(|m| m.username == "1" && m.timestamp.is_some())
    );
}

#[tokio::test]
async fn timeline_fails_over_without_repeats_or_lost_posts() {
    let (a, b) = (FakeServer::default(), FakeServer::default());
    a.state().backlog = vec![post("2", 1000, "p21"), post("2", 1001, "p22")];
    // B resends the backlog A already showed, plus a post made meanwhile.
    b.state().backlog = vec![
        post("2", 1000, "p21"),
        post("2", 1001, "p22"),
        post("3", 1002, "p31"),
    ];
    let (mut hosted_a, hosted_b) = (a.host(), b.host());
    let coordinator = FakeCoordinator::default();
    coordinator.point_at(Some(hosted_a.port()));
    let hosted_coordinator = coordinator.host();
    let mut client = Client::start(&hosted_coordinator, fast_timing());
    client.type_line("TIMELINE").await;
    client.screen.wait_for(&shown("2", 1001, "p22")).await;
    client.type_line("before").await;
    eventually("the first post to reach A", || {
        a.posts().contains(&"before".to_owned())
    })
    .await;

    hosted_a.kill();
    let asks = coordinator.asks();
    eventually("the client noticing the death", || {
        coordinator.asks() > asks
    })
    .await;
    client.type_line("while down").await;
    eventually("a few more polls", || coordinator.asks() >= asks + 3).await;
    coordinator.point_at(Some(hosted_b.port()));
    client.screen.wait_for(&shown("3", 1002, "p31")).await;
    eventually("the kept post to reach B", || {
        b.posts().contains(&"while down".to_owned())
    })
    .await;

    let live = b.state().live.clone();
    let Some(live) = live else {
        panic!("no stream on B")
    };
    let Ok(()) = live.send(Ok(post("3", 1003, "p32"))) else {
        panic!("stream gone")
    };
    client.screen.wait_for(&shown("3", 1003, "p32")).await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\nNow you are in the timeline\n{}\n{}\n\
Reconnected to server 127.0.0.1:{}\n{}\n{}\n",
        shown("2", 1000, "p21"),
        shown("2", 1001, "p22"),
        hosted_b.port(),
        shown("3", 1002, "p31"),
        shown("3", 1003, "p32"),
    );
    assert_eq!(screen, expected);
    assert_eq!(
        b.posts(),
        ["", "while down"],
        "B gets an opening, then the kept post"
    );
}
