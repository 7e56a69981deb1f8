//! The client against the real coordinator and servers of `sns-node`,
//! started in-process on loopback: exact output of every command, startup
//! failures, and failover in both modes.
//!
//! Each node runs on its own tokio runtime so that a test can "kill" it:
//! shutting that runtime down drops its listener and every connection at
//! once, which the client sees as it would see a SIGKILLed process. Nodes
//! heartbeat every 100 ms, so a master that is gone is replaced in a
//! fraction of a second rather than the course's ten.
//!
//! Other users act straight on a server through raw gRPC calls (login,
//! follow, a timeline stream with chosen post times), as a course client
//! would, so that what the client under test prints is known to the byte.
//! A pass-through [`Tap`] in front of the coordinator lets a test cut a
//! node off from it (a partition), or see when the client asks it for a
//! new server; every answer still comes from the real coordinator.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Local};
use futures_util::{Stream, StreamExt};
use sns_client::console::Console;
use sns_client::input::Input;
use sns_client::output::post_line;
use sns_client::{Config, Exit, Timing};
use sns_e2e::nodes;
use sns_node::coordinator::{self, CoordinatorConfig};
use sns_node::server::{self, ServerConfig};
use sns_proto::csce438::coord_service_client::CoordServiceClient;
use sns_proto::csce438::coord_service_server::{CoordService, CoordServiceServer};
use sns_proto::csce438::sns_service_client::SnsServiceClient;
use sns_proto::csce438::{Confirmation, Id, Message, Request, ServerInfo, ServerList};
use sns_proto::internal::coord_admin_client::CoordAdminClient;
use sns_proto::internal::coord_admin_server::{CoordAdmin, CoordAdminServer};
use sns_proto::internal::{
    InSyncReply, InSyncRequest, LeaseRequest, PromoteReply, PromoteRequest, RoleUpdate, RoutingTable, ServerStatus,
    SwitchoverReply, SwitchoverRequest, TableRequest,
};
use sns_proto::prost_types::Timestamp;
use tempfile::TempDir;
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Response, Status, Streaming};

/// How long a test waits for something that should happen soon.
const PATIENCE: Duration = Duration::from_secs(15);

/// Heartbeat period of every node. A killed master is replaced at once (the
/// coordinator probes a server whose lease stream drops); one that merely
/// stops heartbeating, cut off from the coordinator, within
/// `HEARTBEAT * MISSED`: either way in well under a second.
const HEARTBEAT: Duration = Duration::from_millis(100);

/// Heartbeats a node may miss before the coordinator declares it dead.
/// Three rather than the course's two: the tests run in parallel on small
/// machines, and a heartbeat delayed past a 200 ms window would depose a
/// live master in the middle of a test that expects no failover.
const MISSED: u32 = 3;
/// The master's lease: at most half of `HEARTBEAT * MISSED`.
const LEASE: Duration = Duration::from_millis(150);

/// Locks a mutex, ignoring poisoning (a panicking test fails anyway).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `probe` until it yields a value; panics with `what` after
/// [`PATIENCE`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- hosting

/// Something listening on 127.0.0.1 on a runtime of its own.
struct Hosted {
    port: u16,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Hosted {
    /// Binds a free port and runs `serve` on it.
    fn start<F, Fut, E>(name: &'static str, serve: F) -> Hosted
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("local address").port();
        listener.set_nonblocking(true).expect("non-blocking listener");
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            // A node that cannot start shows up as a test timing out; say why.
            if let Err(err) = serve(listener).await {
                eprintln!("{name} on port {port} stopped: {err}");
            }
        });
        Hosted { port, runtime: Some(runtime) }
    }

    /// Kills it: listener and connections close at once.
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

/// A lazily connecting channel to a loopback port.
fn channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}")).expect("loopback URI").connect_lazy()
}

// ------------------------------------------------------------- deployment

/// A real coordinator, and the directory its servers keep their files in.
struct Deployment {
    coordinator: Hosted,
    clusters: u32,
    data: TempDir,
}

impl Deployment {
    fn start(clusters: u32) -> Deployment {
        let config = CoordinatorConfig {
            clusters,
            gateway: false,
            heartbeat: HEARTBEAT,
            missed: MISSED,
            lease: LEASE,
            data_dir: None,
            secret: None,
        };
        let coordinator = Hosted::start("coordinator", move |listener| {
            // Never cancelled: a test stops a node by killing its runtime.
            coordinator::run(config, listener, CancellationToken::new())
        });
        Deployment { coordinator, clusters, data: tempfile::tempdir().expect("temporary directory") }
    }

    fn coordinator(&self) -> u16 {
        self.coordinator.port
    }

    /// The configuration of server `id` of `cluster`, heartbeating to this
    /// deployment's coordinator.
    fn server_config(&self, cluster: u32, id: u32) -> ServerConfig {
        ServerConfig {
            cluster,
            id,
            clusters: self.clusters,
            coord_host: "127.0.0.1".into(),
            coord_port: self.coordinator.port,
            advertise_host: "127.0.0.1".into(),
            data_dir: self.data.path().join(format!("cluster_{cluster}")).join(id.to_string()),
            heartbeat: HEARTBEAT,
            disk_stall_limit: None,
            secret: None,
            source_address: None,
            commit_delay: sns_node::server::DEFAULT_COMMIT_DELAY,
            resend_after: sns_node::server::DEFAULT_RESEND_AFTER,
            compact_at: sns_node::store::log::COMPACT_AT,
        }
    }

    /// Server 1 of `cluster`, once the coordinator names it as the
    /// cluster's master.
    async fn master(&self, cluster: u32) -> Hosted {
        let server = start_server(self.server_config(cluster, 1));
        // User `cluster` belongs to cluster `cluster`.
        self.await_master(cluster, &server).await;
        server
    }

    /// Master (server 1) and slave (server 2) of cluster 1, and the link
    /// through which the master reaches the coordinator. Returns once the
    /// master forwards every write to the slave, so that what is written
    /// afterwards survives the master's death.
    async fn pair(&self) -> (Tap, Hosted, Hosted) {
        let link = Tap::start(self.coordinator.port);
        let master = start_server(ServerConfig { coord_port: link.port, ..self.server_config(1, 1) });
        self.await_master(1, &master).await;
        let slave = start_server(self.server_config(1, 2));
        let (master_port, slave_address) = (master.port, format!("127.0.0.1:{}", slave.port));
        let forwards = || {
            let slave_address = slave_address.clone();
            // Named, and recorded as holding every acknowledged write (so
            // it takes over when the master dies).
            async move {
                status(master_port).await.filter(|s| s.slave == slave_address && s.in_sync.contains(&2)).map(|_| ())
            }
        };
        eventually("the master to learn of its slave", forwards).await;
        // An answer to a heartbeat sent before the slave registered can reach
        // the master after the coordinator's push that named the slave, and
        // take the slave away again until the next heartbeat (a node bug:
        // writes in that window are not forwarded). The master sends each
        // heartbeat only once it has taken in the answer to the previous one,
        // so after two more every stale answer is in; then the slave is back.
        let beats = link.heartbeats();
        eventually("two more heartbeats of the master", || {
            std::future::ready((link.heartbeats() >= beats + 2).then_some(()))
        })
        .await;
        eventually("the master to forward writes to its slave", forwards).await;
        (link, master, slave)
    }

    /// Waits until the coordinator sends `user` to `server`.
    async fn await_master(&self, user: u32, server: &Hosted) {
        let (coordinator, port) = (self.coordinator.port, server.port);
        let what = format!("the coordinator to name port {port} the master for user {user}");
        eventually(
            &what,
            || async move { named_master(coordinator, user).await.filter(|(_, p)| *p == port).map(|_| ()) },
        )
        .await;
    }
}

fn start_server(config: ServerConfig) -> Hosted {
    Hosted::start("server", move |listener| server::run(config, listener, CancellationToken::new()))
}

/// The address of the server the coordinator names for `user`, if any.
async fn named_master(coordinator: u16, user: u32) -> Option<(String, u16)> {
    let info = nodes::get_server(coordinator, user).await.ok()?;
    if info.server_id > 0 { Some((info.hostname, info.port.parse().ok()?)) } else { None }
}

/// What a server says about itself (our internal `Replica.Status`).
async fn status(server: u16) -> Option<ServerStatus> {
    nodes::status_at("127.0.0.1", &server.to_string()).await.ok()
}

/// Waits until `server` holds at least `count` posts.
async fn await_posts(server: u16, count: u64) {
    let what = format!("{count} posts on port {server}");
    eventually(&what, || async move { status(server).await.filter(|s| s.posts >= count).map(|_| ()) }).await;
}

// ------------------------------------------------------- the coordinator tap

/// A pass-through in front of the real coordinator, for one node or client.
/// Every call, lease streams included, goes to the coordinator unchanged;
/// the tap only counts `GetServer` asks (so a test knows when the client
/// has noticed a death) and can cut the link: open lease streams end and
/// every call fails, as over a broken network, until the link is restored.
struct Tap {
    port: u16,
    link: Arc<Link>,
    _hosted: Hosted,
}

#[derive(Default)]
struct Link {
    asks: AtomicUsize,
    /// Heartbeats answered.
    beats: AtomicUsize,
    hold: AtomicBool,
    held: AtomicUsize,
    release: tokio::sync::Notify,
    cut: AtomicBool,
    /// Cancelled when the link is cut; replaced when it is restored.
    severed: Mutex<CancellationToken>,
}

impl Tap {
    fn start(coordinator: u16) -> Tap {
        let link = Arc::new(Link::default());
        let shared = Arc::clone(&link);
        let hosted = Hosted::start("tap", move |listener| {
            // One connection to the coordinator, made on the tap's runtime.
            let service = TapService { coordinator: channel(coordinator), link: shared };
            Server::builder()
                .add_service(CoordServiceServer::new(service.clone()))
                .add_service(CoordAdminServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
        });
        Tap { port: hosted.port, link, _hosted: hosted }
    }

    fn asks(&self) -> usize {
        self.link.asks.load(Ordering::SeqCst)
    }

    fn heartbeats(&self) -> usize {
        self.link.beats.load(Ordering::SeqCst)
    }

    fn cut(&self, cut: bool) {
        self.link.cut.store(cut, Ordering::SeqCst);
        let mut severed = lock(&self.link.severed);
        if cut {
            severed.cancel();
        } else {
            *severed = CancellationToken::new();
        }
    }
}

#[derive(Clone)]
struct TapService {
    coordinator: Channel,
    link: Arc<Link>,
}

impl TapService {
    /// A channel to the coordinator, unless the link is cut.
    fn pass(&self) -> Result<Channel, Status> {
        if self.link.cut.load(Ordering::SeqCst) {
            return Err(Status::unavailable("link to the coordinator cut by the test"));
        }
        Ok(self.coordinator.clone())
    }

    fn coordinator(&self) -> Result<CoordServiceClient<Channel>, Status> {
        self.pass().map(CoordServiceClient::new)
    }
}

#[tonic::async_trait]
impl CoordService for TapService {
    async fn heartbeat(&self, request: tonic::Request<ServerInfo>) -> Result<Response<Confirmation>, Status> {
        let answer = self.coordinator()?.heartbeat(request.into_inner()).await;
        if self.link.hold.load(Ordering::SeqCst) {
            let released = self.link.release.notified();
            self.link.held.fetch_add(1, Ordering::SeqCst);
            released.await;
        }
        self.link.beats.fetch_add(1, Ordering::SeqCst);
        answer
    }

    async fn get_server(&self, request: tonic::Request<Id>) -> Result<Response<ServerInfo>, Status> {
        self.link.asks.fetch_add(1, Ordering::SeqCst);
        self.coordinator()?.get_server(request.into_inner()).await
    }

    async fn get_slave(&self, request: tonic::Request<Id>) -> Result<Response<ServerInfo>, Status> {
        self.coordinator()?.get_slave(request.into_inner()).await
    }

    async fn get_follower_server(&self, request: tonic::Request<Id>) -> Result<Response<ServerInfo>, Status> {
        self.coordinator()?.get_follower_server(request.into_inner()).await
    }

    async fn get_all_follower_servers(&self, request: tonic::Request<Id>) -> Result<Response<ServerList>, Status> {
        self.coordinator()?.get_all_follower_servers(request.into_inner()).await
    }
}

#[tonic::async_trait]
impl CoordAdmin for TapService {
    async fn table(&self, request: tonic::Request<TableRequest>) -> Result<Response<RoutingTable>, Status> {
        CoordAdminClient::new(self.pass()?).table(request.into_inner()).await
    }

    async fn set_in_sync(&self, request: tonic::Request<InSyncRequest>) -> Result<Response<InSyncReply>, Status> {
        CoordAdminClient::new(self.pass()?).set_in_sync(request.into_inner()).await
    }

    async fn promote(&self, request: tonic::Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        CoordAdminClient::new(self.pass()?).promote(request.into_inner()).await
    }

    async fn switchover(
        &self,
        request: tonic::Request<SwitchoverRequest>,
    ) -> Result<Response<SwitchoverReply>, Status> {
        CoordAdminClient::new(self.pass()?).switchover(request.into_inner()).await
    }

    type LeaseStream = Pin<Box<dyn Stream<Item = Result<RoleUpdate, Status>> + Send>>;

    async fn lease(&self, request: tonic::Request<LeaseRequest>) -> Result<Response<Self::LeaseStream>, Status> {
        let severed = lock(&self.link.severed).clone();
        let lease = CoordAdminClient::new(self.pass()?).lease(request.into_inner()).await?.into_inner();
        Ok(Response::new(Box::pin(lease.take_until(severed.cancelled_owned()))))
    }
}

// ------------------------------------------------------------- other users

/// A request without a request id, as a course client sends it.
fn request(user: u32, argument: Option<u32>) -> Request {
    nodes::request(user, argument, 0)
}

/// Logs `user` in straight at `server`.
async fn login(server: u16, user: u32) {
    let reply = SnsServiceClient::new(channel(server)).login(request(user, None)).await;
    assert_eq!(reply.expect("login").into_inner().msg, "SUCCESS", "login of {user}");
}

/// `user` follows `followee`, straight at `server`.
async fn follow(server: u16, user: u32, followee: u32) {
    let reply = SnsServiceClient::new(channel(server)).follow(request(user, Some(followee))).await;
    assert_eq!(reply.expect("follow").into_inner().msg, "SUCCESS", "{user} follows {followee}");
}

fn message(user: u32, text: &str, seconds: Option<i64>) -> Message {
    Message {
        username: user.to_string(),
        msg: text.to_owned(),
        timestamp: seconds.map(|seconds| Timestamp { seconds, nanos: 0 }),
        // No post id: a course client's post, which the server does not
        // acknowledge.
        ..Message::default()
    }
}

/// A timeline stream opened straight at a server, as a course client opens
/// one: posts with chosen times, and reads what the server sends.
struct RawTimeline {
    user: u32,
    outbox: mpsc::UnboundedSender<Message>,
    inbox: Streaming<Message>,
}

impl RawTimeline {
    async fn open(server: u16, user: u32) -> RawTimeline {
        let (outbox, outgoing) = mpsc::unbounded_channel();
        outbox.send(message(user, "", None)).expect("opening queued");
        let opened = SnsServiceClient::new(channel(server)).timeline(UnboundedReceiverStream::new(outgoing)).await;
        RawTimeline { user, outbox, inbox: opened.expect("timeline opened").into_inner() }
    }

    /// Posts `text`, stamped `seconds` after the epoch.
    fn post(&self, text: &str, seconds: i64) {
        self.outbox.send(message(self.user, text, Some(seconds))).expect("stream open");
    }

    /// The next post the server sends.
    async fn next(&mut self) -> Message {
        match tokio::time::timeout(PATIENCE, self.inbox.message()).await {
            Ok(Ok(Some(post))) => post,
            other => panic!("no post for user {}: {other:?}", self.user),
        }
    }
}

/// A whole second a little ahead: posts stamped from here on are later than
/// every follow made so far (a timeline shows only posts made after the
/// follow began), and the time they are shown with is known exactly.
fn next_second() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970");
    i64::try_from(now.as_secs()).expect("before 2262") + 1
}

/// The line the client prints for a post, in this machine's time zone.
fn shown(user: u32, seconds: i64, text: &str) -> String {
    let at = DateTime::from_timestamp(seconds, 0).expect("valid time");
    post_line(&user.to_string(), text, &at.with_timezone(&Local))
}

// ------------------------------------------------------------------ client

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
            assert!(Instant::now() < deadline, "timed out waiting for {needle:?}; screen:\n{}", self.text());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
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

fn config(coordinator: u16, user: u32, timing: Timing) -> Config {
    Config { coord_host: "127.0.0.1".into(), coord_port: coordinator, user, gateway: false, timing, tls: None }
}

/// A whole session of `user` with everything typed up front.
async fn session(coordinator: u16, user: u32, typed: &str) -> (Exit, String) {
    let screen = Screen::default();
    let run = sns_client::run(config(coordinator, user, fast_timing()), typed.as_bytes(), screen.clone());
    let Ok(exit) = tokio::time::timeout(PATIENCE, run).await else {
        panic!("session of {user} did not end; screen:\n{}", screen.text())
    };
    (exit, screen.text())
}

/// A running client: type into `keyboard`, read `screen`, await `exit`.
struct Client {
    keyboard: DuplexStream,
    screen: Screen,
    exit: JoinHandle<Exit>,
}

impl Client {
    fn start(coordinator: u16, user: u32, timing: Timing) -> Client {
        let (keyboard, stdin) = tokio::io::duplex(1 << 16);
        let screen = Screen::default();
        let exit = tokio::spawn(sns_client::run(
            config(coordinator, user, timing),
            tokio::io::BufReader::new(stdin),
            screen.clone(),
        ));
        Client { keyboard, screen, exit }
    }

    async fn type_line(&mut self, line: &str) {
        self.keyboard.write_all(format!("{line}\n").as_bytes()).await.expect("typing");
    }

    /// Ends the input and returns how the client exited.
    async fn finish(self) -> (Exit, String) {
        drop(self.keyboard);
        let Ok(Ok(exit)) = tokio::time::timeout(PATIENCE, self.exit).await else {
            panic!("client did not exit; screen:\n{}", self.screen.text())
        };
        (exit, self.screen.text())
    }
}

const BANNER: &str = "========= TINY SNS CLIENT =========\n Command Lists and Format:\n FOLLOW <username>\n UNFOLLOW <username>\n LIST\n TIMELINE\n=====================================\n";

const FAILED: &str = "connection failed: -1\n";

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn commands_print_the_course_lines() {
    let sns = Deployment::start(1);
    let _server = sns.master(1).await;
    let coordinator = sns.coordinator();
    let logged_in = (Exit::EndOfInput, format!("{BANNER}Cmd> "));
    let followed = (Exit::EndOfInput, format!("{BANNER}Cmd> Command completed successfully\nCmd> "));
    assert_eq!(session(coordinator, 1, "").await, logged_in);
    assert_eq!(session(coordinator, 3, "follow 1\n").await, followed);
    assert_eq!(session(coordinator, 2, "FOLLOW 1\n").await, followed);
    // 10 sorts after 2 and 3 only when sorted as a number.
    assert_eq!(session(coordinator, 10, "").await, logged_in);

    let typed = [
        "LIST",
        "follow 2",
        "FOLLOW 1",
        "Follow 2",
        "FOLLOW",
        "",
        "bogus 2",
        "follow 7",
        "follow ../../etc",
        "UnFollow 3",
        "unfollow 1",
        "unfollow 7",
        "follow 3",
        "unfollow 3",
        "list",
    ];
    let (exit, screen) = session(coordinator, 1, &(typed.join("\n") + "\n")).await;

    assert_eq!(exit, Exit::EndOfInput);
    // The server never answers FAILURE_NOT_EXISTS to a client that has just
    // logged in (only to a caller it does not know), so that line cannot
    // occur here; its text is unit-tested in `output`.
    let expected = format!(
        "{BANNER}\
Cmd> Command completed successfully\nAll users: 1, 2, 3, 10, \nFollowers: 2, 3, \n\
Cmd> Command completed successfully\n\
Cmd> Input username already exists, command failed\n\
Cmd> Input username already exists, command failed\n\
Cmd> Invalid Input -- No Arguments Given\n\
Cmd> \
Cmd> Command failed with invalid command\n\
Cmd> Command failed with invalid username\n\
Cmd> Command failed with invalid username\n\
Cmd> Command failed with not a follower\n\
Cmd> Command failed with invalid username\n\
Cmd> Command failed with invalid username\n\
Cmd> Command completed successfully\n\
Cmd> Command completed successfully\n\
Cmd> Command completed successfully\nAll users: 1, 2, 3, 10, \nFollowers: 2, 3, \n\
Cmd> "
    );
    assert_eq!(screen, expected);

    // The server kept exactly what succeeded: 1 follows 2, and not 3.
    let list = |followers: &str| {
        let lists = format!("All users: 1, 2, 3, 10, \nFollowers: {followers}\n");
        (Exit::EndOfInput, format!("{BANNER}Cmd> Command completed successfully\n{lists}Cmd> "))
    };
    assert_eq!(session(coordinator, 2, "LIST\n").await, list("1, "));
    assert_eq!(session(coordinator, 3, "LIST\n").await, list(""));
}

#[tokio::test]
async fn no_server_means_connection_failed() {
    // Two clusters, and a server for cluster 2 only: none for user 1.
    let sns = Deployment::start(2);
    let _cluster_2 = sns.master(2).await;
    let tap = Tap::start(sns.coordinator());
    assert_eq!(session(tap.port, 1, "LIST\n").await, (Exit::ConnectionFailed, FAILED.to_owned()));
    assert_eq!(tap.asks(), 1, "startup asks the coordinator once");
}

#[tokio::test]
async fn a_login_the_server_refuses_means_connection_failed() {
    // A real server refuses (FAILURE_INVALID) to log in a user of another
    // cluster. The coordinator only sends a user to another cluster's server
    // when the two disagree on the number of clusters: here it counts one
    // and the server two, so it sends user 2 to a server that takes 2 for a
    // user of cluster 2.
    let sns = Deployment::start(1);
    let server = start_server(ServerConfig { clusters: 2, ..sns.server_config(1, 1) });
    sns.await_master(2, &server).await;
    assert_eq!(session(sns.coordinator(), 2, "LIST\n").await, (Exit::ConnectionFailed, FAILED.to_owned()));
    // The same server logs in a user of its own cluster.
    assert_eq!(session(sns.coordinator(), 1, "").await, (Exit::EndOfInput, format!("{BANNER}Cmd> ")));
}

#[tokio::test]
async fn unreachable_coordinator_or_server_means_connection_failed() {
    // The coordinator names a server the client cannot reach: it advertises
    // 127.0.0.2 but listens on 127.0.0.1 only, so the connection is refused.
    // (A killed server would not do: the coordinator probes a server whose
    // lease drops, and stops naming a dead one at once.)
    let mut sns = Deployment::start(1);
    let server = start_server(ServerConfig { advertise_host: "127.0.0.2".into(), ..sns.server_config(1, 1) });
    sns.await_master(1, &server).await;
    assert_eq!(named_master(sns.coordinator(), 1).await, Some(("127.0.0.2".into(), server.port)));
    assert_eq!(session(sns.coordinator(), 1, "LIST\n").await, (Exit::ConnectionFailed, FAILED.to_owned()));

    sns.coordinator.kill();
    assert_eq!(session(sns.coordinator(), 1, "LIST\n").await, (Exit::ConnectionFailed, FAILED.to_owned()));
}

#[tokio::test]
async fn a_command_fails_over_to_the_new_master_and_runs_once_more() {
    let sns = Deployment::start(1);
    let (_link, mut a, b) = sns.pair().await;
    login(a.port, 3).await;
    let mut client = Client::start(sns.coordinator(), 1, fast_timing());
    client.type_line("LIST").await;
    client.screen.wait_for("Followers: \nCmd> ").await;

    a.kill();
    client.type_line("FOLLOW 3").await;
    let reconnected = format!("Cmd> Reconnected to server 127.0.0.1:{}\nCommand completed successfully\nCmd> ", b.port);
    client.screen.wait_for(&reconnected).await;
    client.type_line("LIST").await;
    client.type_line("FOLLOW 3").await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let list = "Command completed successfully\nAll users: 1, 3, \nFollowers: \n";
    let expected =
        format!("{BANNER}Cmd> {list}{reconnected}{list}Cmd> Input username already exists, command failed\nCmd> ");
    assert_eq!(screen, expected);
    // The slave, now master, had user 3 from before the death, and the
    // follow took effect there.
    let lists = "All users: 1, 3, \nFollowers: 1, \n";
    let expected = format!("{BANNER}Cmd> Command completed successfully\n{lists}Cmd> ");
    assert_eq!(session(sns.coordinator(), 3, "LIST\n").await, (Exit::EndOfInput, expected));
}

#[tokio::test]
async fn an_unavailable_answer_means_find_the_master() {
    let sns = Deployment::start(1);
    let (link, a, b) = sns.pair().await;
    login(a.port, 4).await;
    let mut client = Client::start(sns.coordinator(), 1, fast_timing());
    client.type_line("follow 4").await;
    client.screen.wait_for("Command completed successfully\nCmd> ").await;

    // A partition: A misses its heartbeats and B is promoted. When it heals,
    // A's next heartbeat tells it so: A is alive, still holds the client's
    // connection, and is a slave that answers writes with `unavailable`.
    link.cut(true);
    sns.await_master(1, &b).await;
    link.cut(false);
    let a_port = a.port;
    eventually("A to learn it is no longer the master", || async move {
        status(a_port).await.filter(|s| !s.is_master && s.term > 1).map(|_| ())
    })
    .await;
    let refused = SnsServiceClient::new(channel(a_port)).un_follow(request(1, Some(4))).await;
    assert_eq!(refused.map(|r| r.into_inner().msg).map_err(|s| s.code()), Err(tonic::Code::Unavailable));

    client.type_line("UNFOLLOW 4").await;
    client.type_line("unfollow 4").await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\n\
Cmd> Reconnected to server 127.0.0.1:{}\nCommand completed successfully\n\
Cmd> Command failed with not a follower\nCmd> ",
        b.port
    );
    assert_eq!(screen, expected);
}

#[tokio::test]
async fn a_write_to_a_deposed_master_is_retried_on_the_new_one() {
    let sns = Deployment::start(1);
    let (link, a, b) = sns.pair().await;
    login(a.port, 4).await;
    let mut client = Client::start(sns.coordinator(), 1, fast_timing());
    client.screen.wait_for("Cmd> ").await;

    // A partition: B is promoted while A, cut off from the coordinator,
    // still believes it is the master and holds the client's connection.
    link.cut(true);
    sns.await_master(1, &b).await;
    let b_port = b.port;
    eventually(
        "B to learn it is the master",
        || async move { status(b_port).await.filter(|s| s.is_master).map(|_| ()) },
    )
    .await;
    assert!(status(a.port).await.is_some_and(|s| s.is_master), "A still believes it is the master");

    // The write reaches A, whose forward B refuses (it knows a newer term):
    // A must not acknowledge it, and the client must run it on B, once.
    client.type_line("FOLLOW 4").await;
    client.type_line("follow 4").await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}Cmd> Reconnected to server 127.0.0.1:{}\nCommand completed successfully\n\
Cmd> Input username already exists, command failed\nCmd> ",
        b.port
    );
    assert_eq!(screen, expected);
    let lists = "All users: 1, 4, \nFollowers: 1, \n";
    let expected = format!("{BANNER}Cmd> Command completed successfully\n{lists}Cmd> ");
    assert_eq!(session(sns.coordinator(), 4, "LIST\n").await, (Exit::EndOfInput, expected));
}

#[tokio::test]
async fn the_client_gives_up_when_the_coordinator_is_gone_too() {
    let mut sns = Deployment::start(1);
    let mut server = sns.master(1).await;
    let timing = Timing { failover: Duration::from_secs(1), ..fast_timing() };
    let mut client = Client::start(sns.coordinator(), 1, timing);
    client.screen.wait_for("Cmd> ").await;

    server.kill();
    sns.coordinator.kill();
    client.type_line("LIST").await;
    let Ok(Ok(exit)) = tokio::time::timeout(PATIENCE, &mut client.exit).await else {
        panic!("client did not give up: {}", client.screen.text())
    };
    assert_eq!(exit, Exit::ConnectionFailed);
    assert_eq!(client.screen.text(), format!("{BANNER}Cmd> {FAILED}"));
}

#[tokio::test]
async fn timeline_shows_posts_and_sends_typed_lines() {
    let sns = Deployment::start(1);
    let server = sns.master(1).await;
    for user in [1, 2, 3] {
        login(server.port, user).await;
    }
    follow(server.port, 1, 2).await;
    follow(server.port, 1, 3).await;
    follow(server.port, 2, 1).await;
    let t0 = next_second();
    // 2 both posts and reads what 1 posts.
    let mut two = RawTimeline::open(server.port, 2).await;
    let three = RawTimeline::open(server.port, 3).await;
    // Feeds are in the order posts were made (the log's): make them one
    // after the other.
    two.post("p21", t0);
    await_posts(server.port, 1).await;
    three.post("p31", t0 + 1);
    await_posts(server.port, 2).await;

    let mut client = Client::start(sns.coordinator(), 1, fast_timing());
    client.type_line("timeline").await;
    client.screen.wait_for(&shown(3, t0 + 1, "p31")).await;
    two.post("live", t0 + 2);
    client.screen.wait_for(&shown(2, t0 + 2, "live")).await;

    let typed_from = next_second() - 1;
    client.type_line("hello world").await;
    client.type_line("").await;
    client.type_line(&"x".repeat(5000)).await;
    client.type_line("after").await;
    // The blank line and the oversized one were never sent: "after" comes
    // right after "hello world".
    let received = [two.next().await, two.next().await];
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\nNow you are in the timeline\n{}\n{}\n{}\n\
Post too long (5000 bytes, at most 4096), not sent\n",
        shown(2, t0, "p21"),
        shown(3, t0 + 1, "p31"),
        shown(2, t0 + 2, "live"),
    );
    assert_eq!(screen, expected);
    let texts = received.each_ref().map(|m| (m.username.as_str(), m.msg.as_str()));
    assert_eq!(texts, [("1", "hello world"), ("1", "after")]);
    for post in &received {
        let at = post.timestamp.as_ref().map(|t| t.seconds);
        assert!(at.is_some_and(|at| at >= typed_from), "stamped when typed: {post:?}");
    }
    assert_eq!(status(server.port).await.map(|s| s.posts), Some(5), "p21 p31 live and 1's two posts");
}

#[tokio::test]
async fn timeline_fails_over_without_repeats_or_lost_posts() {
    let sns = Deployment::start(1);
    let (_link, mut a, b) = sns.pair().await;
    for user in [1, 2, 3] {
        login(a.port, user).await;
    }
    follow(a.port, 1, 2).await;
    follow(a.port, 1, 3).await;
    follow(a.port, 2, 1).await;
    let t0 = next_second();
    let two = RawTimeline::open(a.port, 2).await;
    two.post("p21", t0);
    two.post("p22", t0 + 1);
    await_posts(b.port, 2).await;

    // The client reaches the coordinator through a tap, which tells when it
    // asks for a new server and holds it off while the test arranges what
    // it finds there.
    let tap = Tap::start(sns.coordinator());
    let mut client = Client::start(tap.port, 1, fast_timing());
    client.type_line("TIMELINE").await;
    client.screen.wait_for(&shown(2, t0 + 1, "p22")).await;
    client.type_line("before").await;
    await_posts(b.port, 3).await;
    // A writes one post at a time and acknowledges each as soon as it is
    // written, on the stream the client reads its feed from: once the client
    // shows a post made after "before", it holds A's acknowledgement, and
    // nothing of its own is left unconfirmed when A dies.
    two.post("p23", t0 + 2);
    client.screen.wait_for(&shown(2, t0 + 2, "p23")).await;

    tap.cut(true);
    let asks = tap.asks();
    a.kill();
    eventually("the client to ask for another server", || std::future::ready((tap.asks() > asks).then_some(()))).await;
    // No stream is open: this post must wait for the next one.
    client.type_line("while down").await;
    // B takes over, and gets a post the client has not seen.
    sns.await_master(1, &b).await;
    let three = RawTimeline::open(b.port, 3).await;
    three.post("p31", t0 + 3);
    await_posts(b.port, 5).await;

    tap.cut(false);
    client.screen.wait_for(&shown(3, t0 + 3, "p31")).await;
    // What 1 posted before and during the failover is on B, once each.
    let mut two = RawTimeline::open(b.port, 2).await;
    let received = [two.next().await, two.next().await];
    let texts = received.each_ref().map(|m| (m.username.as_str(), m.msg.as_str()));
    assert_eq!(texts, [("1", "before"), ("1", "while down")]);
    three.post("p32", t0 + 4);
    client.screen.wait_for(&shown(3, t0 + 4, "p32")).await;
    let (exit, screen) = client.finish().await;

    assert_eq!(exit, Exit::EndOfInput);
    // B resent p21, p22 and p23 with its backlog; each is shown once.
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\nNow you are in the timeline\n{}\n{}\n{}\n\
Reconnected to server 127.0.0.1:{}\n{}\n{}\n",
        shown(2, t0, "p21"),
        shown(2, t0 + 1, "p22"),
        shown(2, t0 + 2, "p23"),
        b.port,
        shown(3, t0 + 3, "p31"),
        shown(3, t0 + 4, "p32"),
    );
    assert_eq!(screen, expected);
    assert_eq!(status(b.port).await.map(|s| s.posts), Some(7), "p21 p22 before p23 p31 'while down' p32, once each");
}

#[tokio::test]
/// A heartbeat answer computed before the slave registered, delivered after
/// the lease push that named the slave, must not take the slave away from
/// the master (which would then acknowledge writes the slave never got).
async fn a_late_heartbeat_answer_does_not_undo_a_newer_role() {
    let sns = Deployment::start(1);
    let link = Tap::start(sns.coordinator());
    let a = start_server(ServerConfig { coord_port: link.port, ..sns.server_config(1, 1) });
    sns.await_master(1, &a).await;
    // Hold the answer to A's next heartbeat (computed by the coordinator now, before B exists).
    link.link.hold.store(true, Ordering::SeqCst);
    let l = &link;
    eventually("a held heartbeat answer", || {
        std::future::ready((l.link.held.load(Ordering::SeqCst) >= 1).then_some(()))
    })
    .await;
    link.link.hold.store(false, Ordering::SeqCst);
    let b = start_server(sns.server_config(1, 2));
    let (a_port, b_addr) = (a.port, format!("127.0.0.1:{}", b.port));
    let named = || {
        let b_addr = b_addr.clone();
        async move { status(a_port).await.filter(|s| s.slave == b_addr).map(|_| ()) }
    };
    eventually("the lease push naming B as A's slave", named).await;
    // Deliver the stale answer, and wait until A has it.
    let delivered = l.link.beats.load(Ordering::SeqCst) + 1;
    link.link.release.notify_waiters();
    eventually("the stale answer delivered", || {
        std::future::ready((l.link.beats.load(Ordering::SeqCst) >= delivered).then_some(()))
    })
    .await;
    let sa = status(a_port).await.unwrap();
    assert_eq!(sa.slave, b_addr, "the late answer took the slave away");
    // So an acknowledged write is on the slave too.
    login(a.port, 4).await;
    let (sa, sb) = (status(a.port).await.unwrap(), status(b.port).await.unwrap());
    assert_eq!(sb.users, sa.users, "the slave lacks a write the master acknowledged");
    assert_eq!(sb.next_seq, sa.next_seq);
}

#[tokio::test]
async fn ctrl_c_while_reconnecting_reports_the_posts_not_delivered() {
    let sns = Deployment::start(1);
    let mut server = sns.master(1).await;
    let (mut keyboard, stdin) = tokio::io::duplex(1 << 16);
    let (interrupt, interrupts) = mpsc::unbounded_channel();
    let (screen, notes) = (Screen::default(), Screen::default());
    let input = Input::pipe(tokio::io::BufReader::new(stdin)).with_interrupts(interrupts);
    let console = Console::with_notes(screen.clone(), Box::new(notes.clone()));
    let exit = tokio::spawn(sns_client::run_with(config(sns.coordinator(), 1, fast_timing()), input, console));
    keyboard.write_all(b"TIMELINE\n").await.expect("typing");
    screen.wait_for("Now you are in the timeline\n").await;

    server.kill();
    notes.wait_for("tsc: server lost, reconnecting").await;
    // The second line is refused on the screen, so once that shows the
    // first has been read: it is a post waiting for a server.
    keyboard.write_all(format!("lost post\n{}\n", "x".repeat(5000)).as_bytes()).await.expect("typing");
    screen.wait_for("Post too long").await;
    interrupt.send(()).expect("client running");
    let Ok(Ok(exit)) = tokio::time::timeout(PATIENCE, exit).await else { panic!("no exit: {}", screen.text()) };

    assert_eq!(exit, Exit::Interrupted);
    let expected = format!(
        "{BANNER}Cmd> Command completed successfully\nNow you are in the timeline\n\
Post too long (5000 bytes, at most 4096), not sent\nPost not delivered: lost post\n"
    );
    assert_eq!(screen.text(), expected);
}
