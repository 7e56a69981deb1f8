//! The reference scenarios of SPEC §7, end to end: the real launcher, real
//! nodes, the real broker, real `tsc` processes, exact client output, and
//! the SPEC §6 convergence check over every live server's files.

use sns_e2e::{Deployment, check_convergence};

const OK: &str = "Command completed successfully";

/// Scenario 1: one cluster, users 1 and 4.
#[test]
fn scenario_1_one_cluster() -> anyhow::Result<()> {
    let d = Deployment::start(1, 2)?;
    let mut c1 = d.client("1")?;
    c1.expect_line("========= TINY SNS CLIENT =========")?;
    c1.expect_line("=====================================")?;
    let mut c4 = d.client("4")?;
    c4.expect_line("=====================================")?;

    c1.run("LIST", OK)?;
    c1.expect_line("All users: 1, 4, ")?;
    c1.expect_line("Followers: ")?;
    c1.run("FOLLOW 4", OK)?;
    c4.run("follow 1", OK)?;
    c1.poll_list(&[1, 4], &[4])?;
    c4.poll_list(&[1, 4], &[1])?;

    c1.run("TIMELINE", OK)?;
    c1.expect_line("Now you are in the timeline")?;
    c1.send("p11")?;
    c1.send("p12")?;
    c4.run("TIMELINE", OK)?;
    c4.expect_line("Now you are in the timeline")?;
    c4.expect_post(1, "p11")?;
    c4.expect_post(1, "p12")?;
    c4.send("p41")?;
    c4.send("p42")?;
    c1.expect_post(4, "p41")?;
    c1.expect_post(4, "p42")?;
    // Nobody sees their own posts.
    assert!(c1.posts_seen().iter().all(|(a, _)| a == "4"), "{:?}", c1.posts_seen());
    assert!(c4.posts_seen().iter().all(|(a, _)| a == "1"), "{:?}", c4.posts_seen());

    check_convergence(&d, &[(1, 1), (1, 2)], &[(4, 1, "p11"), (4, 1, "p12"), (1, 4, "p41"), (1, 4, "p42")])?;
    Ok(())
}

/// Scenarios 2 and 3: three clusters, propagation through the broker, then
/// the master of cluster 2 is killed and user 5 joins cluster 2.
#[test]
fn scenarios_2_and_3_three_clusters_and_failover() -> anyhow::Result<()> {
    let mut d = Deployment::start(3, 2)?;
    let mut c = Vec::new();
    for u in ["1", "2", "3"] {
        let mut client = d.client(u)?;
        client.expect_line("=====================================")?;
        c.push(client);
    }
    for client in c.iter_mut() {
        client.poll_list(&[1, 2, 3], &[])?;
    }
    for (i, others) in [("1", ["2", "3"]), ("2", ["1", "3"]), ("3", ["1", "2"])].iter().enumerate() {
        for o in others.1 {
            c[i].run(&format!("FOLLOW {o}"), OK)?;
        }
        assert_eq!(others.0, c[i].user);
    }
    c[0].poll_list(&[1, 2, 3], &[2, 3])?;
    c[1].poll_list(&[1, 2, 3], &[1, 3])?;
    c[2].poll_list(&[1, 2, 3], &[1, 2])?;

    for (i, posts) in [(0, ["p11", "p12"]), (1, ["p21", "p22"])] {
        c[i].run("TIMELINE", OK)?;
        c[i].expect_line("Now you are in the timeline")?;
        for p in posts {
            c[i].send(p)?;
        }
    }
    // 1 and 2 see each other's posts live.
    c[0].expect_post(2, "p21")?;
    c[1].expect_post(1, "p12")?;
    c[2].run("TIMELINE", OK)?;
    c[2].expect_line("Now you are in the timeline")?;
    let cursor_posts = ["p11", "p12", "p21", "p22"];
    sns_e2e::eventually("user 3 to see p11 p12 p21 p22", || {
        let seen: Vec<String> = c[2].posts_seen().into_iter().map(|(_, t)| t).collect();
        cursor_posts.iter().all(|p| seen.iter().any(|s| s == p)).then_some(())
    })?;
    c[2].send("p31")?;
    c[2].send("p32")?;
    for i in [0, 1] {
        c[i].expect_post(3, "p31")?;
        c[i].expect_post(3, "p32")?;
    }
    let all = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)];
    let feeds_2 = [
        (1, 2, "p21"),
        (1, 2, "p22"),
        (1, 3, "p31"),
        (1, 3, "p32"),
        (2, 1, "p11"),
        (2, 1, "p12"),
        (2, 3, "p31"),
        (3, 1, "p11"),
        (3, 2, "p22"),
    ];
    check_convergence(&d, &all, &feeds_2)?;

    // Scenario 3: kill the master of cluster 2 (server 1).
    let reply = d.command("kill master-2")?;
    assert!(reply.starts_with("killed server-2-1"), "{reply}");
    // User 2's client notices, reconnects to the promoted slave by itself
    // and stays in timeline mode.
    c[1].expect("a reconnection notice", |l| l.starts_with("Reconnected to server "))?;
    let mut c5 = d.client("5")?;
    c5.expect_line("=====================================")?;
    c5.poll_list(&[1, 2, 3, 5], &[])?;
    for o in ["1", "2", "3"] {
        c5.run(&format!("FOLLOW {o}"), OK)?;
    }
    // Users 1, 2, 3 follow 5 from second clients (their first ones are in
    // timeline mode).
    let mut seconds = Vec::new();
    for u in ["1", "2", "3"] {
        let mut s = d.client(u)?;
        s.run("FOLLOW 5", OK)?;
        seconds.push(s);
    }
    c5.poll_list(&[1, 2, 3, 5], &[1, 2, 3])?;
    seconds[0].poll_list(&[1, 2, 3, 5], &[2, 3, 5])?;
    seconds[1].poll_list(&[1, 2, 3, 5], &[1, 3, 5])?;
    seconds[2].poll_list(&[1, 2, 3, 5], &[1, 2, 5])?;

    c5.run("TIMELINE", OK)?;
    c5.expect_line("Now you are in the timeline")?;
    c5.send("p51")?;
    c5.send("p52")?;
    for i in [0, 1, 2] {
        c[i].expect_post(5, "p51")?;
        c[i].expect_post(5, "p52")?;
    }
    c[2].send("p33")?;
    c[2].send("p34")?;
    c[1].send("p23")?;
    c[1].send("p24")?;
    c5.expect_post(3, "p33")?;
    c5.expect_post(3, "p34")?;
    for i in [0, 2] {
        c[i].expect_post(2, "p23")?;
        c[i].expect_post(2, "p24")?;
    }
    // User 5 followed after the first posts: it never sees them.
    let seen5: Vec<String> = c5.posts_seen().into_iter().map(|(_, t)| t).collect();
    for old in ["p11", "p12", "p21", "p22", "p31", "p32"] {
        assert!(!seen5.iter().any(|s| s == old), "user 5 saw {old}: {seen5:?}");
    }
    // Nothing from before the kill is lost: the live servers hold it all.
    let live = [(1, 1), (1, 2), (2, 2), (3, 1), (3, 2)];
    let mut feeds_3 = feeds_2.to_vec();
    feeds_3.extend([
        (5, 3, "p33"),
        (5, 3, "p34"),
        (5, 2, "p23"),
        (1, 5, "p51"),
        (3, 5, "p52"),
        (3, 2, "p24"),
        (1, 2, "p24"),
    ]);
    check_convergence(&d, &live, &feeds_3)?;
    let tl = std::fs::read_to_string(d.server_dir(2, 2).join("2_timeline.txt"))?;
    for p in ["p21", "p22", "p23", "p24"] {
        assert!(tl.contains(&format!("W {p}\n")), "server 2/2 lost {p}: {tl}");
    }
    Ok(())
}
