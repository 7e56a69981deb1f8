//! RabbitMQ restarts mid-run: synchronizers reconnect by themselves, the
//! outbox they could not publish meanwhile goes out afterwards, and every
//! acknowledged post reaches the other cluster exactly once.
//!
//! This restarts the shared local broker, so it is its own test binary
//! (cargo runs test binaries one after another) and it skips, saying why,
//! where it cannot control the broker (no rabbitmqctl, or a remote
//! AMQP_URL).

use sns_e2e::load;
use sns_e2e::{Deployment, check_convergence, eventually, spec_files};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl").args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").status()?;
    anyhow::ensure!(status.success(), "rabbitmqctl {args:?} failed: {status}");
    Ok(())
}

/// The broker's app, stopped; started again when dropped, whatever happens,
/// so a failing test never leaves the machine without its broker.
struct StoppedBroker(bool);

impl StoppedBroker {
    fn stop() -> anyhow::Result<StoppedBroker> {
        rabbitmqctl(&["stop_app"])?;
        Ok(StoppedBroker(true))
    }

    fn start(mut self) -> anyhow::Result<()> {
        self.0 = false;
        rabbitmqctl(&["start_app"])?;
        rabbitmqctl(&["await_startup"])
    }
}

impl Drop for StoppedBroker {
    fn drop(&mut self) {
        if self.0 {
            let _ = rabbitmqctl(&["start_app"]);
        }
    }
}

#[test]
fn synchronizers_ride_through_a_broker_restart() -> anyhow::Result<()> {
    let local = sns_e2e::amqp_url().contains("@127.0.0.1") || sns_e2e::amqp_url().contains("@localhost");
    if !local || Command::new("rabbitmqctl").arg("--help").env("PATH", "/usr/sbin:/usr/bin").output().is_err() {
        eprintln!(
            "SKIPPED: the broker is not a local RabbitMQ this test can restart (rabbitmqctl missing or AMQP_URL remote)"
        );
        return Ok(());
    }
    let d = Deployment::start(2, 2)?;
    let rt = tokio::runtime::Runtime::new()?;
    let deadline = Instant::now() + Duration::from_secs(90);
    rt.block_on(async {
        load::attach(d.coord_port, 1).await?;
        load::attach(d.coord_port, 2).await?;
        let mut msg = String::new();
        while msg != "SUCCESS" && Instant::now() < deadline {
            msg = load::command(d.coord_port, 2, true, 1, deadline).await?;
        }
        anyhow::Ok(())
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));

    let broker = StoppedBroker::stop()?;
    // Writes go on while the broker is down: servers do not need it.
    let during = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 20, deadline));
    broker.start()?;
    let after = rt.block_on(load::writer(d.coord_port, 1, stop, 20, deadline));

    let acked: Vec<String> = [before, during, after].into_iter().flat_map(|r| r.acked).collect();
    assert_eq!(acked.len(), 60);
    // User 2 (cluster 2) follows user 1 (cluster 1): every post crossed the
    // broker, exactly once, to both servers of cluster 2.
    let mut last = String::new();
    eventually("all 60 posts in user 2's feed on both servers of cluster 2", || {
        for s in [1, 2] {
            let files = spec_files(&d.server_dir(2, s)).ok()?;
            let feed = sns_node::store::record::decode_posts(files.get("2_following.txt").map_or("", |t| t));
            for text in &acked {
                let n = feed.iter().filter(|p| p.user == 1 && p.text == *text).count();
                if n != 1 {
                    last = format!("server 2/{s}: {text:?} appears {n} times");
                    return None;
                }
            }
        }
        Some(())
    })
    .map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
    check_convergence(&d, &[(1, 1), (1, 2), (2, 1), (2, 2)], &[])?;
    assert!(
        d.log("sync-1-1").contains("synchronizer link down") || d.log("sync-1-2").contains("synchronizer link down")
    );
    Ok(())
}
