//! Clients that can reach only the coordinator (as through `kubectl
//! port-forward`): `tsc --gateway` talks to the coordinator's gateway, which
//! forwards to each user's master, across a failover.

use sns_e2e::{Client, Deployment};

const OK: &str = "Command completed successfully";

fn gateway_client(d: &Deployment, user: &str) -> anyhow::Result<Client> {
    let port = d.coord_port.to_string();
    let mut c = Client::with_args(&["-h", "127.0.0.1", "-k", &port, "-u", user, "--gateway"], user)?;
    c.expect_line("=====================================")?;
    Ok(c)
}

#[test]
fn clients_work_through_the_coordinator_gateway_across_a_failover() -> anyhow::Result<()> {
    let mut d = Deployment::start(2, 2)?;
    let mut c1 = gateway_client(&d, "1")?;
    let mut c2 = gateway_client(&d, "2")?;
    c1.poll_list(&[1, 2], &[])?;
    c1.run("FOLLOW 2", OK)?;
    c2.run("FOLLOW 1", OK)?;
    c2.poll_list(&[1, 2], &[1])?;
    c1.run("FOLLOW ../../etc", "Command failed with invalid username")?;
    c1.run("TIMELINE", OK)?;
    c1.expect_line("Now you are in the timeline")?;
    c2.run("TIMELINE", OK)?;
    c2.expect_line("Now you are in the timeline")?;
    c2.send("before the kill")?;
    c1.expect_post(2, "before the kill")?;

    let reply = d.command("kill master-2")?;
    assert!(reply.starts_with("killed server-2-"), "{reply}");
    c2.expect("a reconnection through the gateway", |l| {
        // Names the server behind the gateway, not the gateway alone.
        l.starts_with("Reconnected to server 127.0.0.1:")
            && l.ends_with(&format!(" via the gateway 127.0.0.1:{}", d.coord_port))
            && !l.starts_with(&format!("Reconnected to server 127.0.0.1:{} ", d.coord_port))
    })?;
    c2.send("after the kill")?;
    c1.expect_post(2, "after the kill")?;
    c1.send("to the promoted slave")?;
    c2.expect_post(1, "to the promoted slave")?;
    Ok(())
}
