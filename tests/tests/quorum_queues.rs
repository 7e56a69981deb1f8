//! A deployment on quorum queues (`--queue-type quorum`), against the real
//! broker: posts cross clusters exactly once, also after the receiving
//! cluster's master (and so the consumer of its queue) is killed and its
//! slave's synchronizer takes the queue over; the queues really are quorum
//! queues (the broker refuses to declare them classic); a synchronizer of
//! the same deployment configured for classic queues fails with a clear
//! reason instead of running on the wrong kind of queue.

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use sns_e2e::load::{self, WriterReport};
use sns_e2e::nodes::{assert_exactly_once, master_of, rt, wait_master};
use sns_e2e::{DEADLINE, Deployment, check_convergence, eventually};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// The broker's answer to declaring `queue` durable with `x-queue-type`
/// `queue_type` (None: accepted).
async fn declare_as(queue: &str, queue_type: &str) -> anyhow::Result<Option<String>> {
    let conn = lapin::Connection::connect(&sns_e2e::amqp_url(), lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.into()));
    let answer = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: false, durable: true, ..Default::default() }, args)
        .await;
    let _ = conn.close(0, "".into()).await;
    Ok(answer.err().map(|e| e.to_string()))
}

#[test]
fn quorum_queues_carry_posts_exactly_once_across_a_failover() -> anyhow::Result<()> {
    let mut d = Deployment::builder().clusters(2).servers(2).queue_type("quorum").start()?;
    let rt = rt();
    let deadline = Instant::now() + Duration::from_secs(60);
    // User 1 is in cluster 1, user 2 in cluster 2; 2 follows 1.
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = rt.block_on(load::writer(d.coord_port, 1, stop.clone(), 30, deadline));
    assert_eq!(before.acked.len(), 30);
    let followers = BTreeMap::from([(1, vec![2])]);
    assert_exactly_once(&d, &[(2, 1), (2, 2)], std::slice::from_ref(&before), &followers)?;

    // The queues are quorum queues: the broker refuses them as classic.
    let queue = format!("{}.cluster.2", d.name);
    let refused = rt.block_on(declare_as(&queue, "classic"))?;
    let refused = refused.ok_or_else(|| anyhow::anyhow!("{queue} accepted as classic: it is not a quorum queue"))?;
    assert!(refused.contains("PRECONDITION_FAILED"), "{refused}");

    // The consumer of cluster 2's queue moves with its master.
    let (m, term) = rt.block_on(master_of(d.coord_port, 2)).ok_or_else(|| anyhow::anyhow!("no master in 2"))?;
    d.command(&format!("kill server-2-{m}"))?;
    d.command(&format!("kill sync-2-{m}"))?;
    wait_master(&rt, &d, 2, 3 - m, term)?;
    let after = rt.block_on(load::writer(d.coord_port, 1, stop, 30, Instant::now() + DEADLINE));
    assert_eq!(after.acked.len(), 30);
    let all = WriterReport { user: 1, acked: [before.acked, after.acked].concat(), ..Default::default() };
    assert_exactly_once(&d, &[(2, 3 - m)], &[all], &followers)?;
    d.command(&format!("start server-2-{m}"))?;
    d.command(&format!("start sync-2-{m}"))?;
    check_convergence(&d, &[(1, 1), (1, 2), (2, 1), (2, 2)], &[])?;

    // A synchronizer of this deployment told to use classic queues says why
    // it cannot, and does not run on them. It is kept away from the running
    // deployment's coordinator and servers (port 1 refuses at once): it
    // only meets the broker.
    let mut sync = std::process::Command::new(sns_e2e::bin("sns-node"))
        .args(["synchronizer", "-h", "127.0.0.1", "-k", "1", "-p", "0", "-i", "2", "--clusters", "2"])
        .args(["--server-addr", "127.0.0.1:1"])
        .args(["--deployment", &d.name, "--queue-type", "classic", "--amqp-url", &sns_e2e::amqp_url()])
        .args(["--heartbeat-interval", "500ms"])
        .env("SNS_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = sync.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let found = eventually("the classic synchronizer to explain the refusal", || {
        seen.extend(rx.try_iter());
        seen.iter().find(|l| l.contains("as a classic queue")).cloned()
    });
    let _ = sync.kill();
    let _ = sync.wait();
    let line = found.map_err(|e| anyhow::anyhow!("{e}; its log: {seen:#?}"))?;
    assert!(line.contains("delete_queue"), "the reason says how to change the type: {line}");
    Ok(())
}
