//! What a person using `tsc` sees beyond the course's output: TIMELINE
//! succeeds only once the stream is open; a lost cluster in timeline mode
//! reads what is typed meanwhile and reports each post it could not deliver
//! (nothing is left over for the shell); connection errors name the address
//! and what to check; with `--gateway` a reconnection names the server
//! behind the gateway; a timeline reconnected after a failover shows every
//! post made while it was away; and on a terminal, line editing, history,
//! Ctrl-C and Ctrl-D, while the same keys through a pipe keep the course's
//! behaviour.

use std::process::Command;

use anyhow::Result;
use sns_e2e::pty::Pty;
use sns_e2e::{Client, Deployment, amqp_url, bin, eventually};

const OK: &str = "Command completed successfully";
const IN_TIMELINE: &str = "Now you are in the timeline";
const FAILED: &str = "connection failed: -1";
/// The banner's lines, as the harness reports them.
const BANNER_LINES: usize = 7;

/// `tsc` for `user` of `d` with `extra` flags, through pipes.
fn client(d: &Deployment, user: &str, extra: &[&str]) -> Result<Client> {
    let port = d.coord_port.to_string();
    let mut args = vec!["-h", "127.0.0.1", "-k", &port, "-u", user];
    args.extend_from_slice(extra);
    let mut c = Client::with_args(&args, user)?;
    c.expect_line("=====================================")?;
    Ok(c)
}

/// `tsc` for `user` of `d` with `extra` flags, as a command line.
fn tsc(d: &Deployment, user: &str, extra: &[&str]) -> Command {
    let mut command = Command::new(bin("tsc"));
    command.args(["-h", "127.0.0.1", "-k", &d.coord_port.to_string(), "-u", user]).args(extra);
    command
}

/// The port server `id` of `cluster` listens on.
fn server_port(d: &Deployment, cluster: u32, id: u32) -> Result<u16> {
    let file = d.dir().join("logs").join(format!("server-{cluster}-{id}.port"));
    Ok(std::fs::read_to_string(file)?.trim().parse()?)
}

/// Kills every server of cluster 1 (slave first, so that nothing is
/// promoted).
fn kill_cluster_1(d: &mut Deployment) -> Result<()> {
    if d.servers > 1 {
        d.command("kill slave-1")?;
    }
    d.command("kill master-1")?;
    Ok(())
}

#[test]
fn timeline_succeeds_only_once_its_stream_is_open() -> Result<()> {
    let mut d = Deployment::start(1, 1)?;
    let mut c = client(&d, "1", &["--reconnect-timeout", "2s"])?;
    c.run("LIST", OK)?;
    c.expect_line("Followers: ")?;
    kill_cluster_1(&mut d)?;
    // The coordinator has no server for user 1 now: the stream never opens.
    c.send("TIMELINE")?;
    c.expect_line(FAILED)?;
    assert_eq!(c.wait_exit()?, 1);
    assert_eq!(c.lines()[BANNER_LINES..], [OK, "All users: 1, ", "Followers: ", FAILED]);
    assert!(c.stderr().contains("server lost, reconnecting"), "stderr: {}", c.stderr());
    assert!(c.stderr().contains("giving up reconnecting after 2s"), "stderr: {}", c.stderr());
    Ok(())
}

#[test]
fn posts_typed_while_the_cluster_is_down_are_read_and_reported() -> Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let mut c = client(&d, "1", &["--reconnect-timeout", "3s"])?;
    c.run("TIMELINE", OK)?;
    c.expect_line(IN_TIMELINE)?;
    kill_cluster_1(&mut d)?;
    eventually("tsc to say it is reconnecting", || c.stderr().contains("server lost, reconnecting").then_some(()))?;
    c.send("typed meanwhile")?;
    // A command word in timeline mode is a post like any other line.
    c.send("LIST")?;
    c.expect_line("Post not delivered: typed meanwhile")?;
    c.expect_line("Post not delivered: LIST")?;
    c.expect_line(FAILED)?;
    assert_eq!(c.wait_exit()?, 1);
    let shown = c.lines()[BANNER_LINES..].to_vec();
    assert_eq!(shown, [OK, IN_TIMELINE, "Post not delivered: typed meanwhile", "Post not delivered: LIST", FAILED]);
    Ok(())
}

#[test]
fn nothing_typed_in_timeline_mode_is_left_for_the_shell() -> Result<()> {
    let mut d = Deployment::start(1, 1)?;
    let client = tsc(&d, "1", &["--reconnect-timeout", "3s"]);
    let line = format!("{client:?}");
    // The shell reads the terminal after tsc: whatever tsc left unread
    // would be its next line.
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("{line}; echo AFTER=$?; read x; echo LEFTOVER=$x"));
    let mut t = Pty::spawn(sh)?;
    t.expect("Cmd> ")?;
    t.type_keys("TIMELINE\r")?;
    t.expect(IN_TIMELINE)?;
    kill_cluster_1(&mut d)?;
    t.expect("server lost, reconnecting")?;
    t.type_keys("typed meanwhile\rLIST\r")?;
    t.expect("Post not delivered: typed meanwhile")?;
    t.expect("Post not delivered: LIST")?;
    t.expect(FAILED)?;
    t.expect("AFTER=1")?;
    t.type_keys("fresh\r")?;
    t.expect("LEFTOVER=fresh")?;
    Ok(())
}

#[test]
fn ctrl_c_reports_posts_not_yet_delivered() -> Result<()> {
    let mut d = Deployment::start(1, 1)?;
    // Ctrl-C, not the reconnect timeout, ends this session.
    let mut t = Pty::spawn(tsc(&d, "1", &["--reconnect-timeout", "60s"]))?;
    t.expect("Cmd> ")?;
    t.type_keys("TIMELINE\r")?;
    t.expect(IN_TIMELINE)?;
    kill_cluster_1(&mut d)?;
    t.expect("server lost, reconnecting")?;
    t.type_keys("unsent post\r\x03")?;
    t.expect("Post not delivered: unsent post")?;
    assert_eq!(t.wait_exit()?, 130);
    Ok(())
}

#[test]
fn a_terminal_gets_line_editing_and_history_a_pipe_does_not() -> Result<()> {
    let d = Deployment::start(1, 1)?;
    let mut t = Pty::spawn(tsc(&d, "1", &[]))?;
    t.expect("Cmd> ")?;
    // "IST", Ctrl-A (start of line), "L": LIST. The terminal's own line
    // discipline knows no Ctrl-A.
    t.type_keys("IST\x01L\r")?;
    t.expect("All users: 1, ")?;
    // Up arrow: LIST again, from history.
    t.type_keys("\x1b[A\r")?;
    t.expect("All users: 1, ")?;
    t.type_keys("TIMELINE\r")?;
    t.expect(IN_TIMELINE)?;
    // Ctrl-D on an empty line leaves timeline mode and the client.
    t.type_keys("\x04")?;
    assert_eq!(t.wait_exit()?, 0);

    // Through a pipe the same keys are bytes of the line, as in the course.
    let mut c = client(&d, "1", &[])?;
    c.send("IST\x01L")?;
    c.send("\x1b[A")?;
    c.close();
    assert_eq!(c.wait_exit()?, 0);
    let invalid = "Command failed with invalid command";
    assert_eq!(c.lines()[BANNER_LINES..], [invalid, invalid]);
    assert!(c.stderr().is_empty(), "stderr: {}", c.stderr());
    Ok(())
}

#[test]
fn connection_errors_name_the_address_and_what_to_check() -> Result<()> {
    let d = Deployment::start(1, 1)?;
    let server = server_port(&d, 1, 1)?.to_string();
    let mut cases = vec![
        // Nothing listens on port 1.
        ("1".to_owned(), "is the coordinator running"),
        // A server, not the coordinator.
        (server, "is not the coordinator"),
    ];
    // The broker, when it is on this machine: not gRPC at all.
    if amqp_url().contains("@127.0.0.1:5672") {
        cases.push(("5672".to_owned(), "does not speak gRPC"));
    }
    for (port, hint) in cases {
        let mut c = Client::with_args(&["-h", "127.0.0.1", "-k", &port, "-u", "1"], "1")?;
        assert_eq!(c.wait_exit()?, 1, "-k {port}");
        assert_eq!(c.lines(), [FAILED], "-k {port}");
        let said = c.stderr();
        assert!(said.contains(&format!("the coordinator at 127.0.0.1:{port}")), "-k {port}: {said}");
        assert!(said.contains(hint), "-k {port}: {said}");
        assert!(said.contains("-k/--port"), "-k {port}: {said}");
    }
    Ok(())
}

#[test]
fn a_reconnection_through_the_gateway_names_the_server_behind_it() -> Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let slave = server_port(&d, 1, 2)?;
    let mut c = client(&d, "1", &["--gateway"])?;
    c.run("LIST", OK)?;
    d.command("kill master-1")?;
    c.send("LIST")?;
    let want = format!("Reconnected to server 127.0.0.1:{slave} via the gateway 127.0.0.1:{}", d.coord_port);
    c.expect_line(&want)?;
    c.expect_line(OK)?;
    Ok(())
}

#[test]
fn tsc_tells_its_version() -> Result<()> {
    let out = Command::new(bin("tsc")).arg("--version").output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("tsc {}\n", env!("CARGO_PKG_VERSION")));
    Ok(())
}

/// A timeline that reconnects after a failover shows every post made
/// while it was away, in order, not only the backlog's last 20: `tsc` asks
/// the new master for the feed after the last post it showed
/// (`feedPosition`), and master and slave hold the same feeds. The reader
/// is paused (SIGSTOP) across the failover so that the posts are made
/// before it can reconnect.
#[test]
fn a_timeline_reconnected_after_a_failover_shows_every_post_made_meanwhile() -> Result<()> {
    reconnected_timeline_shows_every_post(1)
}

/// The same for a reader that had shown no post before the failover: it
/// resumes from where its stream said live posts would start (the
/// stream's metadata; here the empty feed's start).
#[test]
fn a_timeline_that_had_shown_nothing_before_a_failover_shows_every_post_made_meanwhile() -> Result<()> {
    reconnected_timeline_shows_every_post(0)
}

/// A reader in TIMELINE, shown `before` posts, is paused across a failover
/// while 50 posts are made: once resumed it shows all 50.
fn reconnected_timeline_shows_every_post(before: usize) -> Result<()> {
    let mut d = Deployment::start(1, 2)?;
    let rt = sns_e2e::nodes::rt();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut reader = client(&d, "2", &[])?;
    rt.block_on(sns_e2e::load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    reader.run("TIMELINE", OK)?;
    reader.expect_line(IN_TIMELINE)?;
    let stop = || std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let first = rt.block_on(sns_e2e::load::writer(d.coord_port, 1, stop(), before, deadline));
    for text in &first.acked {
        reader.expect_post(1, text)?;
    }
    let pid = reader.pid().to_string();
    let signal = |sig: &str| Command::new("kill").args([sig, &pid]).status();
    anyhow::ensure!(signal("-STOP")?.success(), "cannot pause tsc");
    let away = (|| {
        let (_, term) = eventually("a master", || rt.block_on(sns_e2e::nodes::master_of(d.coord_port, 1)))?;
        d.command("kill master-1")?;
        eventually("a new master", || {
            rt.block_on(sns_e2e::nodes::master_of(d.coord_port, 1)).filter(|(_, t)| *t > term)
        })?;
        anyhow::Ok(rt.block_on(sns_e2e::load::writer(d.coord_port, 1, stop(), 50, deadline)))
    })();
    anyhow::ensure!(signal("-CONT")?.success(), "cannot resume tsc");
    let away = away?;
    assert_eq!(away.acked.len(), 50);
    for text in &away.acked {
        reader.expect_post(1, text)?;
    }
    Ok(())
}
