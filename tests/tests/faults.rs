//! Combined faults inside a cluster, one regression test per way they used
//! to lose acknowledged writes: a double fault restarted in the worst
//! order, a full disk on the master and on the slave, a master whose
//! journal failed after its forward, a hung disk, a server killed on a hung
//! disk, a hung slave and then its master killed, a journal damaged in the
//! middle, a master that lost the tail of its journal, a coordinator on a
//! hung disk (also during a switchover), a master cut off from the
//! coordinator, a master and its slave
//! cut off from each other, writes retried after a failover. Real
//! processes, real files, real ENOSPC from a small tmpfs, a real frozen
//! file system, real flipped bytes; every wait polls with a deadline.

use sns_e2e::disk::{self, damaged_files};
use sns_e2e::load::{self, WriterReport};
use sns_e2e::nodes::{
    assert_exactly_once, assert_one_master_per_term, get_server, healths, master_of, promote_cli, request, rt, running,
    server_node, sns_at, status, wait_lease_from_current_run, wait_master, wait_synced_slave,
};
use sns_e2e::{DEADLINE, Deployment, check_convergence, eventually, eventually_within, feed_of_2_holds, spec_files};
use sns_proto::csce438::Message;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

const BOTH: [(u32, u32); 2] = [(1, 1), (1, 2)];

/// One cluster of two servers, users 1 and 2 logged in, 2 following 1.
fn cluster_of_two(builder: sns_e2e::DeploymentBuilder) -> anyhow::Result<(Deployment, Runtime)> {
    let d = match builder.clusters(1).servers(2).start() {
        Ok(d) => d,
        Err(e) => {
            if let Some(why) = disk::mount_refused(&e) {
                return Err(anyhow::anyhow!("SKIP:{why}"));
            }
            return Err(e);
        }
    };
    let rt = rt();
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(async {
        load::attach(d.coord_port, 1).await?;
        load::attach(d.coord_port, 2).await?;
        anyhow::ensure!(load::command(d.coord_port, 2, true, 1, deadline).await? == "SUCCESS");
        anyhow::Ok(())
    })?;
    Ok((d, rt))
}

/// [`cluster_of_two`] with both data directories on small tmpfs mounts, or
/// None (the test skips, recorded) where mounting is refused.
fn cluster_on_tmpfs(test: &str) -> anyhow::Result<Option<(Deployment, Runtime)>> {
    // Room for the journals and views of these tests, little more.
    const SIZE: u64 = 2 << 20;
    let builder = Deployment::builder().tmpfs(1, 1, SIZE).tmpfs(1, 2, SIZE);
    cluster_or_skip(test, builder, "a full disk needs a tmpfs mount")
}

/// [`cluster_of_two`] from `builder`, or None (the test skips, recorded,
/// saying it `needs` what was refused) where a mount was refused.
fn cluster_or_skip(
    test: &str,
    builder: sns_e2e::DeploymentBuilder,
    needs: &str,
) -> anyhow::Result<Option<(Deployment, Runtime)>> {
    match cluster_of_two(builder) {
        Err(e) if e.to_string().starts_with("SKIP:") => {
            sns_e2e::skip(test, &format!("{needs}: {}", &e.to_string()[5..]));
            Ok(None)
        }
        other => other.map(Some),
    }
}

/// The master and the slave of cluster 1, once the slave is in sync.
fn pair(rt: &Runtime, d: &Deployment) -> anyhow::Result<(u32, u32, u64)> {
    let (m, term) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    let s = 3 - m;
    wait_in_sync(rt, d, s)?;
    Ok((m, s, term))
}

/// A settled cluster of two: the deployment, (master, slave, term), and
/// the posts made before the fault.
type Settled = (Deployment, Runtime, (u32, u32, u64), WriterReport);

/// A cluster of two whose coordinator keeps its records on a 1 MiB tmpfs
/// (to fill), its pair settled and ten posts made: the deployment, the
/// (master, slave, term) and those posts; None (the test skipped, saying
/// why) where mounting is refused.
fn on_coordinator_tmpfs(test: &str) -> anyhow::Result<Option<Settled>> {
    let builder = Deployment::builder().coordinator_tmpfs(1 << 20);
    let Some((d, rt)) = cluster_or_skip(test, builder, "a full disk needs a tmpfs mount")? else { return Ok(None) };
    let roles = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    Ok(Some((d, rt, roles, before)))
}

/// Waits until server `id` of cluster 1 is a synced slave recorded in sync.
fn wait_in_sync(rt: &Runtime, d: &Deployment, id: u32) -> anyhow::Result<()> {
    wait_synced_slave(rt, d, 1, id)?;
    eventually(&format!("server 1/{id} recorded in sync"), || {
        rt.block_on(server_node(d.coord_port, 1, id)).filter(|n| n.in_sync && n.alive).map(|_| ())
    })
}

fn posts(rt: &Runtime, d: &Deployment, n: usize) -> WriterReport {
    sized_posts(rt, d, n, 0)
}

/// Posts of about `pad` bytes each: a full disk fails them (small ones fit
/// in the slack of a page the journal already has).
fn sized_posts(rt: &Runtime, d: &Deployment, n: usize, pad: usize) -> WriterReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    let stop = Arc::new(AtomicBool::new(false));
    rt.block_on(load::writer_padded(d.coord_port, 1, stop, n, deadline, Arc::default(), pad))
}

fn follows(d: &Deployment, s: u32) -> anyhow::Result<String> {
    Ok(spec_files(&d.server_dir(1, s))?.get("1_follow_list.txt").cloned().unwrap_or_default())
}

/// User 1's acknowledged posts (`acked`) are each exactly once in user 2's
/// feed on both servers, whose files are byte-identical, and no term had
/// two masters.
fn all_once_and_identical(d: &Deployment, acked: Vec<String>) -> anyhow::Result<()> {
    let all = WriterReport { user: 1, acked, ..Default::default() };
    assert_exactly_once(d, &BOTH, &[all], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(d, &BOTH, &[])?;
    assert_one_master_per_term(d);
    Ok(())
}

/// Defect: kill the master, write on the promoted slave alone, kill it,
/// restart the stale server first. The stale server used to become master
/// and wipe the good one. Now it is never promoted; the cluster waits for
/// the up-to-date server, which then rebuilds the stale one.
#[test]
fn a_stale_server_is_never_promoted_and_the_up_to_date_one_wins() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (stale, good, term) = pair(&rt, &d)?;
    d.command(&format!("kill server-1-{stale}"))?;
    wait_master(&rt, &d, 1, good, term)?;
    // Acknowledged by `good` alone: first it had `stale` recorded out of sync.
    let deadline = Instant::now() + DEADLINE;
    assert_eq!(rt.block_on(load::command(d.coord_port, 1, true, 2, deadline))?, "SUCCESS");
    let node = rt.block_on(server_node(d.coord_port, 1, stale)).expect("stale server registered");
    assert!(!node.in_sync, "the coordinator records the stale server out of sync before the write is acknowledged");
    d.command(&format!("kill server-1-{good}"))?;
    d.command(&format!("start server-1-{stale}"))?;
    // The stale server is live, and the cluster has no master: it says why.
    let reason = eventually("the coordinator to explain why cluster 1 has no master", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        let live = rt.block_on(server_node(d.coord_port, 1, stale)).is_some_and(|n| n.alive);
        (live && info.port.is_empty() && !info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
    })?;
    assert!(reason.contains("no live server holding every acknowledged write"), "{reason}");
    let s = rt.block_on(status(&node))?;
    assert!(!s.is_master, "{s:?}");
    // Its health says so: alive, not ready (not synced under any master),
    // not serving clients.
    assert_eq!(rt.block_on(healths(d.coord_port, 1, stale))?, (true, false, false), "stale server's health");
    // Writes are refused, clearly.
    let refused = rt.block_on(async {
        let mut sns = sns_at(&node.host, &node.port).await?;
        anyhow::Ok(sns.follow(request(2, Some(1), 0)).await)
    })?;
    let status_code = refused.expect_err("a server that is not master refuses writes");
    assert_eq!(status_code.code(), tonic::Code::Unavailable, "{status_code:?}");
    // Without accepting the loss, an operator cannot promote it either.
    let out = promote_cli(&d, 1, stale, false)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--accept-data-loss"), "{out:?}");
    // The up-to-date server returns: it is master again, and the stale
    // one catches up from it.
    d.command(&format!("start server-1-{good}"))?;
    wait_master(&rt, &d, 1, good, 0)?;
    wait_in_sync(&rt, &d, stale)?;
    for s in [stale, good] {
        // Views follow the journal within a flush period.
        eventually(&format!("server 1/{s} to show the acknowledged follow"), || {
            (follows(&d, s).ok()? == "2\n").then_some(())
        })?;
    }
    check_convergence(&d, &BOTH, &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// The override: an operator promotes the stale server, accepting the loss
/// of what it lacks; the cluster serves again and the other server follows
/// it.
#[test]
fn an_operator_can_promote_a_stale_server_accepting_the_loss() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (stale, good, term) = pair(&rt, &d)?;
    d.command(&format!("kill server-1-{stale}"))?;
    wait_master(&rt, &d, 1, good, term)?;
    let deadline = Instant::now() + DEADLINE;
    assert_eq!(rt.block_on(load::command(d.coord_port, 1, true, 2, deadline))?, "SUCCESS");
    let out = promote_stale_back_first(&rt, &mut d, stale, good)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(&format!("server {stale} is the master of cluster 1")), "{stdout}");
    assert!(stdout.contains("warning:"), "the loss is spelled out: {stdout}");
    assert!(d.log("coordinator").contains("operator override"), "the override is logged");
    let term = wait_master(&rt, &d, 1, stale, term)?;
    // It serves: a new write is acknowledged.
    assert_eq!(rt.block_on(load::command(d.coord_port, 2, false, 1, deadline))?, "SUCCESS");
    // The other server comes back as its slave and takes its state.
    d.command(&format!("start server-1-{good}"))?;
    wait_in_sync(&rt, &d, good)?;
    check_convergence(&d, &BOTH, &[])?;
    let (m, t) = rt.block_on(master_of(d.coord_port, 1)).expect("master");
    assert_eq!((m, t), (stale, term));
    Ok(())
}

/// The override in a deployment of two clusters. The stale server lacks
/// posts that the lost master had already published to cluster 2, under
/// stream positions it will number again. The posts it takes once promoted
/// must still reach cluster 2: a receiver that took them for copies of what
/// it already applied would hide them from their readers for good.
#[test]
fn posts_after_an_override_reach_the_other_clusters() -> anyhow::Result<()> {
    let mut d = Deployment::builder().clusters(2).servers(2).start()?;
    let rt = rt();
    let deadline = Instant::now() + DEADLINE;
    // 2 (cluster 2) follows 1 (cluster 1).
    rt.block_on(load::follow_until_done(d.coord_port, 2, 1, deadline))?;
    let (stale, good, term) = pair(&rt, &d)?;
    d.command(&format!("kill server-1-{stale}"))?;
    // Acknowledged by `good` alone, and published to cluster 2.
    let lost = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 5, deadline));
    assert_eq!(lost.acked.len(), 5);
    feed_of_2_holds(&d, &lost.acked, "the posts only the lost master held")?;
    let out = promote_stale_back_first(&rt, &mut d, stale, good)?;
    assert!(out.status.success(), "{out:?}");
    wait_master(&rt, &d, 1, stale, term)?;
    let after = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 5, deadline));
    assert_eq!(after.acked.len(), 5);
    feed_of_2_holds(&d, &after.acked, "the posts made after the override")?;
    // The other server of cluster 1 follows the promoted one.
    d.command(&format!("start server-1-{good}"))?;
    wait_in_sync(&rt, &d, good)?;
    for c in [1, 2] {
        // (The posts the override lost stay in cluster 2's feeds: the
        // goal state's "every feed post is in its author's timeline" no
        // longer holds, so only master and slave are compared.)
        eventually(&format!("the servers of cluster {c} to hold identical files"), || {
            let (a, b) = (spec_files(&d.server_dir(c, 1)).ok()?, spec_files(&d.server_dir(c, 2)).ok()?);
            (a == b).then_some(())
        })?;
    }
    // What cluster 2 applied before stays, once each; nothing is held.
    feed_of_2_holds(&d, &[lost.acked, after.acked].concat(), "every post")?;
    for s in [1, 2] {
        let node = rt.block_on(server_node(d.coord_port, 2, s)).expect("server of cluster 2");
        assert_eq!(rt.block_on(status(&node))?.held, 0, "server 2/{s} holds nothing for a gap");
    }
    Ok(())
}

/// A timeline reader that reconnects after the override resumes where its
/// position says only if the new master's feed has the history that
/// position was counted in: it had shown the posts the override lost,
/// and posts made since take their positions. Resuming by position alone
/// (a client that sends no anchor, as before) skips those: the control
/// below shows it. With the anchor the reader gets the backlog, which has
/// them.
#[test]
fn a_reader_resuming_after_an_override_misses_none_of_the_posts_that_took_the_lost_ones_places() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    // (2 follows 1.)
    let deadline = Instant::now() + DEADLINE;
    let (stale, good, term) = pair(&rt, &d)?;
    let kept = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 3, deadline));
    d.command(&format!("kill server-1-{stale}"))?;
    let lost = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 2, deadline));
    assert_eq!((kept.acked.len(), lost.acked.len()), (3, 2));
    // The reader has shown all five: it holds the last one's position and
    // anchor.
    let shown = rt.block_on(load::read_feed(d.coord_port, 2, (0, 0), |got| got.len() >= 5))?.posts;
    let texts: Vec<&String> = shown.iter().map(|(t, ..)| t).collect();
    assert_eq!(texts, [&kept.acked[..], &lost.acked[..]].concat().iter().collect::<Vec<_>>());
    let (_, position, anchor) = shown.last().cloned().expect("five posts");
    assert_eq!(position, 5);
    assert_ne!(anchor, 0, "every post comes with its anchor");
    let out = promote_stale_back_first(&rt, &mut d, stale, good)?;
    assert!(out.status.success(), "{out:?}");
    wait_master(&rt, &d, 1, stale, term)?;
    // Three posts in the new history: the first two take positions 4 and 5.
    let after = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 3, deadline));
    assert_eq!(after.acked.len(), 3);
    let has = |got: &[(String, u64, u64)], text: &String| got.iter().any(|(t, ..)| t == text);
    // Control: by position alone the stream goes on after position 5, so
    // only the third reaches the reader.
    let blind = rt.block_on(load::read_feed(d.coord_port, 2, (position, 0), |got| has(got, &after.acked[2])))?.posts;
    assert!(has(&blind, &after.acked[2]), "{blind:?}");
    assert!(!has(&blind, &after.acked[0]), "resuming by position alone skips it: {blind:?}");
    // With the anchor: the feed's history changed, so the backlog, with
    // every post of the new history.
    let resumed = rt.block_on(load::read_feed(d.coord_port, 2, (position, anchor), |got| {
        after.acked.iter().all(|t| has(got, t))
    }))?;
    // It says where its live posts continue: after the new history's last.
    let resumed_start = resumed.start;
    let resumed = resumed.posts;
    for text in kept.acked.iter().chain(&after.acked) {
        assert!(has(&resumed, text), "{text} missing from {resumed:?}");
    }
    for text in &lost.acked {
        assert!(!has(&resumed, text), "the override lost {text}, yet {resumed:?}");
    }
    // The new positions count in the new history: resuming from the last
    // one, with its anchor, goes on after it (nothing more to send).
    let (_, position, anchor) = resumed.last().cloned().expect("posts");
    assert_eq!(position, 6);
    assert_eq!(resumed_start, Some((position, anchor)));
    let more = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 1, deadline));
    let next = rt.block_on(load::read_feed(d.coord_port, 2, (position, anchor), |got| has(got, &more.acked[0])))?;
    assert_eq!(next.start, Some((position, anchor)), "resumed where asked");
    assert_eq!(next.posts.iter().map(|(t, p, _)| (t, *p)).collect::<Vec<_>>(), [(&more.acked[0], 7)]);
    Ok(())
}

/// Kills `good`, starts `stale` first (cluster 1 then has no master) and
/// promotes it with the operator's override; returns the promotion's
/// output.
fn promote_stale_back_first(
    rt: &Runtime,
    d: &mut Deployment,
    stale: u32,
    good: u32,
) -> anyhow::Result<std::process::Output> {
    d.command(&format!("kill server-1-{good}"))?;
    d.command(&format!("start server-1-{stale}"))?;
    eventually("cluster 1 without a master", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        (!info.unavailable_reason.is_empty()).then_some(())
    })?;
    promote_cli(d, 1, stale, true)
}

/// Defect: the master's disk fills up. The post that hit ENOSPC used to be
/// half in the journal, applied by the slave, and its sequence number
/// reused by the next acknowledged post. Now the failed append leaves no
/// trace, the master steps down, the slave takes over, and every
/// acknowledged post is exactly once on both servers.
#[test]
fn a_full_disk_on_the_master_loses_nothing_and_forks_nothing() -> anyhow::Result<()> {
    let Some((mut d, rt)) = cluster_on_tmpfs("a_full_disk_on_the_master_loses_nothing_and_forks_nothing")? else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 20);
    disk::fill(&d.server_dir(1, m))?;
    // Posts go on: the one that hits the full disk fails over.
    let during = sized_posts(&rt, &d, 20, 3000);
    assert_eq!((before.acked.len(), during.acked.len()), (20, 20));
    assert!(during.failovers > 0, "the full master stopped taking writes");
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let old = rt.block_on(server_node(d.coord_port, 1, m)).expect("old master");
    let st = rt.block_on(status(&old))?;
    assert!(!st.is_master && !st.unwritable.is_empty(), "{st:?}");
    assert!(st.damage.is_empty(), "the failed append was cut back: {st:?}");
    // Restarted with the disk still full it reads a clean journal; with
    // room again it catches up.
    d.command(&format!("kill server-1-{m}"))?;
    disk::unfill(&d.server_dir(1, m))?;
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    let after = posts(&rt, &d, 5);
    assert!(new_term > term);
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// Defect: the master's disk hangs (every write blocks, none fails). Its
/// writes used to hang with it, for as long as the disk did, while its
/// heartbeats kept it master. Now after the stall limit (configured to 2 s
/// here) it says it cannot write, its in-sync slave takes over, and
/// writers go on there; once the disk answers, the old master finishes the
/// write it was in and rejoins as a slave, and every acknowledged post is
/// exactly once on both.
#[test]
fn a_hung_disk_on_the_master_is_failed_over_and_loses_nothing() -> anyhow::Result<()> {
    let builder = Deployment::builder().env("SNS_DISK_STALL_LIMIT", "2s");
    let Some((d, rt)) = cluster_on_freezable("a_hung_disk_on_the_master_is_failed_over_and_loses_nothing", builder)?
    else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    d.freeze(1, m)?;
    let hung = Instant::now();
    let during = posts(&rt, &d, 10);
    let new_term = wait_master(&rt, &d, 1, s, term);
    let old = rt.block_on(server_node(d.coord_port, 1, m)).expect("old master");
    let st = rt.block_on(status(&old));
    let taken_over = hung.elapsed();
    d.thaw(1, m)?;
    let (new_term, st) = (new_term?, st?);
    assert_eq!((before.acked.len(), during.acked.len()), (10, 10), "{during:?}");
    assert!(new_term > term);
    assert!(!st.is_master && st.unwritable.contains("after 2s: the disk is hung"), "the old master says why: {st:?}");
    eprintln!("hung master replaced after {} ms", taken_over.as_millis());
    // Once its disk answers it rejoins as the slave.
    wait_in_sync(&rt, &d, m)?;
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// A freezable cluster of two, or None (the test skips, recorded) where a
/// loop mount is refused.
fn cluster_on_freezable(
    test: &str,
    builder: sns_e2e::DeploymentBuilder,
) -> anyhow::Result<Option<(Deployment, Runtime)>> {
    cluster_or_skip(test, builder.freezable(1, 1).freezable(1, 2), "a hung disk needs a loop-mounted ext4")
}

/// A cluster of two whose coordinator's disk can be frozen, or None (the
/// test skips, recorded) where a loop mount is refused.
fn cluster_on_freezable_coordinator(test: &str) -> anyhow::Result<Option<(Deployment, Runtime)>> {
    cluster_or_skip(test, Deployment::builder().freezable_coordinator(), "a hung disk needs a loop mount")
}

/// A hung disk on the slave, then the master dies: a double fault. Writers
/// must not wait for the hung slave (the master drops it from the in-sync
/// set after the forward timeout and acknowledges alone), and the slave,
/// lacking acknowledged writes, must never be promoted, hung or thawed:
/// the cluster waits for the master, which then rebuilds it.
#[test]
fn a_hung_slave_is_dropped_and_never_promoted_when_the_master_dies() -> anyhow::Result<()> {
    let Some((mut d, rt)) =
        cluster_on_freezable("a_hung_slave_is_dropped_and_never_promoted_when_the_master_dies", Deployment::builder())?
    else {
        return Ok(());
    };
    let (m, s, _) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    d.freeze(1, s)?;
    let during = posts(&rt, &d, 10);
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    let ms = rt.block_on(status(&master));
    let hung = eventually("the hung slave to say it cannot write", || {
        rt.block_on(status(&slave)).ok().filter(|st| st.unwritable.contains("hung"))
    });
    d.command(&format!("kill server-1-{m}"))?;
    let no_master = eventually("the coordinator to explain why cluster 1 has no master", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        let dead = rt.block_on(server_node(d.coord_port, 1, m)).is_some_and(|n| !n.alive);
        (dead && info.port.is_empty() && !info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
    });
    d.thaw(1, s)?;
    assert_eq!((before.acked.len(), during.acked.len()), (10, 10), "{during:?}");
    assert_eq!(during.failovers, 0, "no writer waited for a failover: {during:?}");
    let ms = ms?;
    assert!(ms.is_master && ms.in_sync == vec![m], "the hung slave is recorded out of sync: {ms:?}");
    hung?;
    let no_master = no_master?;
    assert!(
        no_master.contains(&format!("no live server holding every acknowledged write (in sync: [{m}])")),
        "{no_master}"
    );
    // Thawed, it can write again, and it is still not promoted.
    eventually("the thawed slave to take writes again", || {
        rt.block_on(status(&slave)).ok().filter(|st| st.unwritable.is_empty())
    })?;
    let info = rt.block_on(get_server(d.coord_port, 1))?;
    assert!(info.port.is_empty(), "the stale slave was promoted: {info:?}");
    assert!(!rt.block_on(status(&slave))?.is_master);
    d.command(&format!("start server-1-{m}"))?;
    wait_master(&rt, &d, 1, m, 0)?;
    wait_in_sync(&rt, &d, s)?;
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// The command that runs process `pid` (its arguments, environment and
/// working directory), asked for any free port: what a replacement pod on
/// another address would run against the same volume.
fn same_command_elsewhere(pid: u32) -> anyhow::Result<std::process::Command> {
    let read = |what: &str| std::fs::read(format!("/proc/{pid}/{what}"));
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
    };
    let args = split(read("cmdline")?);
    let env = split(read("environ")?);
    let mut cmd = std::process::Command::new(&args[0]);
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "-p" => {
                rest.next();
                cmd.args(["-p", "0"]);
            }
            "--port-file" | "--metrics-port" | "--metrics-port-file" => {
                rest.next();
            }
            _ => {
                cmd.arg(arg);
            }
        }
    }
    cmd.env_clear()
        .envs(env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(std::fs::read_link(format!("/proc/{pid}/cwd"))?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    Ok(cmd)
}

/// Restarts (or starts) `name` on a clock `offset` off through the
/// launcher; false (the test skipped, saying why) where libfaketime is
/// missing.
fn on_skewed_clock(d: &mut Deployment, test: &str, verb: &str, name: &str, offset: &str) -> anyhow::Result<bool> {
    let reply = d.command_reply(&format!("{verb} {name} --clock {offset}"))?;
    if reply.contains("needs libfaketime") {
        sns_e2e::skip(test, "libfaketime is not installed (Debian package faketime; scripts/ensure-faketime.sh)");
        return Ok(false);
    }
    anyhow::ensure!(reply.contains(&format!("on a clock {offset} off")), "{verb} {name} --clock {offset}: {reply}");
    Ok(true)
}

/// Defect: a coordinator's epoch (which orders its answers after an
/// earlier run's) was its start time by its own clock. Restarted on a
/// clock a day behind (a clock stepped back, or a new pod on a machine
/// whose clock lags), its answers ordered before the previous run's, and
/// every node ignored them: no lease was renewed, and the cluster refused
/// reads and writes until the clock caught up. Now the state file keeps
/// each run's epoch and the next run answers above it: the master serves
/// on leases the skewed coordinator grants, and a failover under it works.
#[test]
fn a_coordinator_restarted_on_a_clock_a_day_behind_keeps_the_cluster_serving() -> anyhow::Result<()> {
    let test = "a_coordinator_restarted_on_a_clock_a_day_behind_keeps_the_cluster_serving";
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    if !on_skewed_clock(&mut d, test, "restart", "coordinator", "-1d")? {
        return Ok(());
    }
    eventually("the skewed coordinator to answer", || rt.block_on(master_of(d.coord_port, 1)))?;
    wait_lease_from_current_run(&rt, &d, (1, m), "the restarted coordinator", DEADLINE)?;
    let during = posts(&rt, &d, 10);
    assert_eq!(during.acked.len(), 10, "{during:?}");
    // A failover under the skewed coordinator: the slave adopts its answers.
    d.command(&format!("kill server-1-{m}"))?;
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let after = posts(&rt, &d, 10);
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((s, new_term)));
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())?;
    let log = d.log("coordinator");
    assert!(log.contains("clock is behind the previous coordinator run"), "the skew is logged: {log}");
    Ok(())
}

/// Defect: a coordinator restarted on a full disk cannot write its run's
/// epoch down; restarted again on a clock a day behind, the disk still
/// full, its epoch fell below the run before's, whose answers every node
/// had adopted. They ignored it: no lease was renewed, and the cluster
/// refused reads and writes until the clock caught up. Now each server
/// reports the newest epoch it adopted and the coordinator orders its
/// answers after it: the master keeps serving, and says nothing changed.
#[test]
fn a_coordinator_restarted_behind_an_epoch_it_could_not_record_keeps_the_cluster_serving() -> anyhow::Result<()> {
    let test = "a_coordinator_restarted_behind_an_epoch_it_could_not_record_keeps_the_cluster_serving";
    let Some((mut d, rt, (m, _, term), before)) = on_coordinator_tmpfs(test)? else { return Ok(()) };
    disk::fill(&d.coordinator_dir())?;
    let full = (|| {
        d.command("restart coordinator")?;
        wait_lease_from_current_run(&rt, &d, (1, m), "the coordinator restarted on a full disk", DEADLINE)?;
        if !on_skewed_clock(&mut d, test, "restart", "coordinator", "-1d")? {
            return Ok(None);
        }
        let what = "the coordinator restarted a day behind, its disk still full";
        wait_lease_from_current_run(&rt, &d, (1, m), what, DEADLINE)?;
        anyhow::Ok(Some(posts(&rt, &d, 10)))
    })();
    disk::unfill(&d.coordinator_dir())?;
    let Some(during) = full? else { return Ok(()) };
    assert_eq!(during.acked.len(), 10, "{during:?}");
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((m, term)), "the same master, the same term");
    let log = d.log("coordinator");
    assert!(log.contains("cannot write this run's epoch"), "the unwritten epoch is logged");
    assert!(log.contains("this run orders its answers after it"), "the raised epoch is logged");
    all_once_and_identical(&d, [before.acked, during.acked].concat())
}

/// Defect: a coordinator restarted on a full disk heard the master before
/// the slave (paused meanwhile), so the master's role named no slave. Its
/// next write needed the slave recorded out of sync, which a coordinator
/// that cannot write never does; the master kept asking with the role it
/// began with, even once the slave was back in the routing table, and
/// acknowledged nothing until the disk had room. Now it goes on with the
/// current role of its term: the slave back, it forwards to it and
/// acknowledges.
#[test]
fn a_master_whose_slave_returns_while_the_coordinator_cannot_write_acknowledges_again() -> anyhow::Result<()> {
    let test = "a_master_whose_slave_returns_while_the_coordinator_cannot_write_acknowledges_again";
    let Some((mut d, rt, (m, s, term), before)) = on_coordinator_tmpfs(test)? else { return Ok(()) };
    disk::fill(&d.coordinator_dir())?;
    let stuck = (|| {
        d.command(&format!("pause server-1-{s}"))?;
        d.command("restart coordinator")?;
        // The restarted coordinator knows the master only: its role names
        // no slave (the routing table shows none).
        eventually("the master to be routed to, with no slave", || {
            let master = rt.block_on(master_of(d.coord_port, 1))?;
            let slave = rt.block_on(server_node(d.coord_port, 1, s)).filter(|n| n.alive);
            (master == (m, term) && slave.is_none()).then_some(())
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let write = rt.spawn(load::writer(d.coord_port, 1, stop, 1, Instant::now() + Duration::from_secs(60)));
        // With the in-sync slave paused and the coordinator unable to
        // record it out of sync, nothing may be acknowledged: watch for
        // two seconds.
        let watched = Instant::now();
        eventually("two seconds without an acknowledgement", || {
            if write.is_finished() {
                return Some(Err(anyhow::anyhow!("a post was acknowledged without the in-sync slave")));
            }
            (watched.elapsed() > Duration::from_secs(2)).then_some(Ok(()))
        })??;
        d.command(&format!("resume server-1-{s}"))?;
        anyhow::Ok(rt.block_on(write)?)
    })();
    disk::unfill(&d.coordinator_dir())?;
    let during = stuck?;
    assert_eq!(during.acked.len(), 1, "acknowledged once the slave was back, the disk still full: {during:?}");
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((m, term)), "the same master, the same term");
    wait_in_sync(&rt, &d, s)?;
    all_once_and_identical(&d, [before.acked, during.acked].concat())
}

/// Defect: a master killed while its disk hangs cannot exit: its last
/// journal write is still in the kernel, and the process lingers, holding
/// its port and files, until the disk answers. A replacement started
/// meanwhile on another address (a new pod on the same volume) used to
/// open the same directory beside it; once the disk came back the old
/// write landed in the replacement's journal, out of order. Now the
/// directory is locked by its server: the replacement is refused with the
/// holder's pid (so is the launcher's own restart on the same ports: the
/// lock is taken before any port is bound), the cluster goes on on the slave, and once the old process
/// has ended the server starts, rejoins and every acknowledged post is
/// exactly once on both servers.
#[test]
fn a_server_killed_on_a_hung_disk_is_never_run_twice_and_loses_nothing() -> anyhow::Result<()> {
    let Some((mut d, rt)) = cluster_on_freezable(
        "a_server_killed_on_a_hung_disk_is_never_run_twice_and_loses_nothing",
        Deployment::builder(),
    )?
    else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let name = format!("server-1-{m}");
    let pid = d.status()?[&name].expect("the master runs");
    let mut replacement = same_command_elsewhere(pid)?;
    let before = posts(&rt, &d, 10);
    // The master's disk hangs under a write; the slave takes over.
    d.freeze(1, m)?;
    let during = posts(&rt, &d, 10);
    let new_term = wait_master(&rt, &d, 1, s, term);
    let killed = d.command(&format!("kill {name}"));
    let still_there = running(pid);
    // The launcher's own restart, on the same ports: refused for the
    // directory (not for a port the old process still holds).
    let restarted = d.command(&format!("start {name}")).map_err(|e| e.to_string());
    let mut second = replacement.spawn();
    let refused = second.as_mut().map_err(|e| anyhow::anyhow!("{e}")).and_then(|child| {
        eventually("the second server on the directory to be refused", || child.try_wait().ok().flatten())
    });
    if refused.is_err()
        && let Ok(child) = second.as_mut()
    {
        let _ = child.kill();
    }
    let meanwhile = posts(&rt, &d, 5);
    d.thaw(1, m)?;
    let (new_term, killed) = (new_term?, killed?);
    assert!(still_there, "SIGKILL cannot end a process whose write hangs in the kernel; {killed}");
    assert!(killed.contains("has not exited"), "the launcher says the process is still there: {killed}");
    let refused = refused?;
    let out = second?.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!refused.success(), "{said}");
    assert!(said.contains(&format!("in use by process {pid}")), "the refusal names the holder: {said}");
    let restarted = restarted.err().unwrap_or_default();
    assert!(
        restarted.contains(&format!("in use by process {pid}")),
        "the launcher's restart names the holder: {restarted}"
    );
    assert_eq!((before.acked.len(), during.acked.len(), meanwhile.acked.len()), (10, 10, 5), "{during:?}");
    // The old process ends once its write does; then the server starts.
    eventually("the killed server to end once its disk answers", || (!running(pid)).then_some(()))?;
    d.command(&format!("start {name}"))?;
    wait_in_sync(&rt, &d, m)?;
    let after = posts(&rt, &d, 5);
    assert!(new_term > term);
    all_once_and_identical(&d, [before.acked, during.acked, meanwhile.acked, after.acked].concat())
}

/// A timeline session of `user` on its master: where to send posts, and
/// what comes back.
async fn session(
    coord_port: u16,
    user: u32,
) -> anyhow::Result<(mpsc::UnboundedSender<Message>, tonic::Streaming<Message>)> {
    let mut sns = load::attach(coord_port, user).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Message { username: user.to_string(), ..Default::default() })?;
    let inbound = sns.timeline(UnboundedReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

/// Sends post `id` on a session; whether it was acknowledged (false: the
/// stream failed or ended first).
async fn post_on(
    (tx, inbound): &mut (mpsc::UnboundedSender<Message>, tonic::Streaming<Message>),
    user: u32,
    text: &str,
    id: u64,
) -> bool {
    let post = Message {
        username: user.to_string(),
        msg: text.to_string(),
        timestamp: None,
        post_id: id,
        feed_position: 0,
        feed_anchor: 0,
    };
    if tx.send(post).is_err() {
        return false;
    }
    load::await_ack(inbound, id, Duration::from_secs(5)).await
}

/// The master's journal write fails (a full disk) while its forward of the
/// same write reached the slave, and nothing can replace it meanwhile (the
/// coordinator is down): once it has room again and the coordinator is
/// back, it keeps its role in the same term, its slave alive and in sync.
/// That slave holds a write under the sequence number the master reuses
/// for its next one, another post: the master must replace what the slave
/// holds (a snapshot) before it forwards anything again, or the two would
/// fork. Every acknowledged post, the failed one retried with its id among
/// them, is then exactly once on both, and the files are byte-identical.
#[test]
fn a_master_whose_journal_failed_after_its_forward_keeps_its_term_and_forks_nothing() -> anyhow::Result<()> {
    const ID: u64 = 9_000_000_001;
    let test = "a_master_whose_journal_failed_after_its_forward_keeps_its_term_and_forks_nothing";
    let Some((mut d, rt)) = cluster_on_tmpfs(test)? else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    let mut open = rt.block_on(session(d.coord_port, 1))?;
    d.command("kill coordinator")?;
    disk::fill(&d.server_dir(1, m))?;
    // Within the master's lease it journals while forwarding: a post may
    // fit in the slack of the journal's last page; the next one fails.
    let mut fitted = vec![];
    let mut cut_back = None;
    for i in 0..4 {
        let text = format!("1-cut-back-{i}{}", ".".repeat(3000));
        if !rt.block_on(post_on(&mut open, 1, &text, ID + i)) {
            cut_back = Some((text, ID + i));
            break;
        }
        fitted.push(text);
    }
    let failed = eventually("the master to say it cannot write", || {
        rt.block_on(status(&master)).ok().filter(|st| !st.unwritable.is_empty())
    });
    let (ms, ss) = (rt.block_on(status(&master)), rt.block_on(status(&slave)));
    disk::unfill(&d.server_dir(1, m))?;
    let (text, id) = cut_back.expect("a post of 3 kB fails on a full disk");
    failed?;
    let (ms, ss) = (ms?, ss?);
    assert!(ss.next_seq == ms.next_seq + 1, "the slave holds the write the master cut back: {ss:?} / {ms:?}");
    eventually("the master to take writes again", || {
        rt.block_on(status(&master)).ok().filter(|st| st.unwritable.is_empty())
    })?;
    d.command("start coordinator")?;
    // Another post first: the master numbers it with the cut-back one's
    // seq, which the slave holds with other content (a slave skips records
    // it already holds, as retried forwards). Then the retry, same id.
    let snapshots = |d: &Deployment| d.log(&format!("server-1-{s}")).matches("installed the master's snapshot").count();
    let installed = snapshots(&d);
    let other = posts(&rt, &d, 1);
    let retried = eventually("the failed post to be acknowledged when retried", || {
        let mut open = rt.block_on(session(d.coord_port, 1)).ok()?;
        rt.block_on(post_on(&mut open, 1, &text, id)).then_some(())
    });
    let (now_master, now_term) = rt.block_on(master_of(d.coord_port, 1)).expect("a master");
    retried?;
    assert_eq!((now_master, now_term), (m, term), "the master kept its role in its term");
    wait_in_sync(&rt, &d, s)?;
    assert!(snapshots(&d) > installed, "the slave's cut-back write was replaced by a snapshot");
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, fitted, other.acked, vec![text], after.acked].concat())
}

/// Defect: the slave's disk fills up. Every write used to stall for a
/// minute. Now the slave says so at once, the master records it out of
/// sync and goes on (no writer ever waits for a failover), and the slave is
/// rebuilt once it has room again.
#[test]
fn a_full_disk_on_the_slave_is_dropped_at_once_and_rebuilt() -> anyhow::Result<()> {
    let Some((d, rt)) = cluster_on_tmpfs("a_full_disk_on_the_slave_is_dropped_at_once_and_rebuilt")? else {
        return Ok(());
    };
    let (m, s, _) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    disk::fill(&d.server_dir(1, s))?;
    let during = sized_posts(&rt, &d, 20, 3000);
    assert_eq!(during.acked.len(), 20);
    assert_eq!(during.failovers, 0, "the master never stalled past the writer's patience: {during:?}");
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    let ms = rt.block_on(status(&master))?;
    assert!(ms.is_master && ms.in_sync == vec![m], "the slave is recorded out of sync: {ms:?}");
    assert!(ms.degraded.contains("out of sync"), "{ms:?}");
    let ss = rt.block_on(status(&slave))?;
    assert!(ss.unwritable.contains("No space left"), "the slave says why: {ss:?}");
    disk::unfill(&d.server_dir(1, s))?;
    wait_in_sync(&rt, &d, s)?;
    all_once_and_identical(&d, [before.acked, during.acked].concat())
}

/// The coordinator's disk fills up; restarted on it, the coordinator
/// starts and routes all the same. Then the master dies. The coordinator
/// cannot write down a new term, so it must not promote: a promotion it
/// had not recorded would be forgotten by its next restart, which would
/// hand the cluster back to the old master with the new one's writes
/// missing. It says why and waits; once it has room it promotes the
/// in-sync slave, and restarted it remembers that promotion.
#[test]
fn a_coordinator_that_cannot_write_its_records_promotes_nobody_until_it_can() -> anyhow::Result<()> {
    let test = "a_coordinator_that_cannot_write_its_records_promotes_nobody_until_it_can";
    let Some((mut d, rt, (m, s, term), before)) = on_coordinator_tmpfs(test)? else { return Ok(()) };
    disk::fill(&d.coordinator_dir())?;
    // Restarted on the full disk, it starts and routes all the same (the
    // epoch of its run goes with the first change it can write).
    d.command("restart coordinator")?;
    let routed = eventually("the coordinator restarted on a full disk to route to the master", || {
        (rt.block_on(master_of(d.coord_port, 1))? == (m, term)).then_some(())
    });
    d.command(&format!("kill server-1-{m}"))?;
    let refused = eventually("the coordinator to say it cannot record the promotion", || {
        d.log("coordinator").lines().find(|l| l.contains("cannot write the coordinator's records")).map(str::to_string)
    });
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    let (st, master) = (rt.block_on(status(&slave)), rt.block_on(master_of(d.coord_port, 1)));
    disk::unfill(&d.coordinator_dir())?;
    routed?;
    assert!(d.log("coordinator").contains("cannot write this run's epoch"), "the unwritten epoch is logged");
    let refused = refused?;
    assert!(refused.contains("No space left"), "{refused}");
    let st = st?;
    assert!(!st.is_master && st.term == term, "promoted without a record of it: {st:?}");
    assert_eq!(master, None, "the coordinator routes to no master while it cannot record one");
    // With room again it promotes the slave, and a restart keeps that.
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let during = posts(&rt, &d, 10);
    d.command("restart coordinator")?;
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((s, new_term)), "the restarted coordinator remembers");
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// Defect: a planned switchover asked while the coordinator cannot write
/// its records (a full disk). The master stepped down, the promotion could
/// not be recorded, and the coordinator retried it every 250 ms: the
/// cluster had no master, and took no write, until the disk had room. Now
/// the switchover is abandoned at the first failed write, saying why, and
/// the old master serves again in its term, the disk still full.
#[test]
fn a_switchover_the_coordinator_cannot_record_leaves_the_old_master_serving() -> anyhow::Result<()> {
    let test = "a_switchover_the_coordinator_cannot_record_leaves_the_old_master_serving";
    let Some((mut d, rt, (m, s, term), before)) = on_coordinator_tmpfs(test)? else { return Ok(()) };
    wait_in_sync(&rt, &d, s)?;
    disk::fill(&d.coordinator_dir())?;
    let reply = d.command_reply("switchover 1");
    // Writes go on, on the old master, with the disk still full.
    let during = posts(&rt, &d, 5);
    let master = rt.block_on(master_of(d.coord_port, 1));
    disk::unfill(&d.coordinator_dir())?;
    let reply = reply?;
    assert!(
        reply.starts_with("error:") && reply.contains("cannot write the promotion of server"),
        "the switchover is abandoned, saying why: {reply}"
    );
    assert_eq!(during.acked.len(), 5, "the cluster took no write after the abandoned switchover: {reply}");
    assert_eq!(master, Some((m, term)), "the old master serves again in its term: {reply}");
    let after = posts(&rt, &d, 5);
    wait_in_sync(&rt, &d, s)?;
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// The coordinator's disk hangs (frozen: its writes neither end nor fail),
/// then the master dies. The coordinator cannot make the promotion durable,
/// so it promotes nobody while the disk hangs, and says why; it answers
/// heartbeats and the routing table meanwhile. Once the disk answers it
/// promotes the in-sync slave, and nothing acknowledged is lost.
#[test]
fn a_coordinator_on_a_hung_disk_promotes_nobody_until_it_answers() -> anyhow::Result<()> {
    let Some((mut d, rt)) =
        cluster_on_freezable_coordinator("a_coordinator_on_a_hung_disk_promotes_nobody_until_it_answers")?
    else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    d.freeze_coordinator()?;
    let hung = (|| {
        d.command(&format!("kill server-1-{m}"))?;
        let reason = eventually("the coordinator to say its records write hangs", || {
            let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
            info.unavailable_reason.contains("has not finished").then_some(info.unavailable_reason)
        })?;
        let slave = rt.block_on(server_node(d.coord_port, 1, s)).filter(|n| n.alive);
        let st = rt.block_on(status(&slave.ok_or_else(|| anyhow::anyhow!("the slave is not live"))?))?;
        anyhow::Ok((reason, st, rt.block_on(master_of(d.coord_port, 1))))
    })();
    d.thaw_coordinator()?;
    let (reason, st, master) = hung?;
    assert!(reason.contains("hung disk"), "{reason}");
    assert!(!st.is_master && st.term == term, "promoted without a record of it: {st:?}");
    assert_eq!(master, None, "the coordinator routes to no master while it cannot record one");
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let during = posts(&rt, &d, 10);
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((s, new_term)));
    all_once_and_identical(&d, [before.acked, during.acked].concat())
}

/// The coordinator's disk hangs and then the slave dies. Before the master
/// acknowledges a write without its in-sync slave, the coordinator must
/// durably record that the slave lacks it (else a restarted coordinator
/// could promote the slave and lose the write): so while the records write
/// hangs (past the master's call timeout), the master acknowledges
/// nothing. Once the disk answers, the
/// slave is recorded out of sync, the post is acknowledged (or, its
/// outcome unknown, retried with its id), the master keeps its term, and
/// the slave, restarted, is rebuilt: every post exactly once.
#[test]
fn a_coordinator_on_a_hung_disk_when_the_slave_dies_lets_the_master_acknowledge_nothing_until_it_answers()
-> anyhow::Result<()> {
    const ID: u64 = 9_000_000_201;
    let Some((mut d, rt)) = cluster_on_freezable_coordinator(
        "a_coordinator_on_a_hung_disk_when_the_slave_dies_lets_the_master_acknowledge_nothing_until_it_answers",
    )?
    else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    let (tx, mut inbound) = rt.block_on(session(d.coord_port, 1))?;
    let text = "1-while-the-coordinator-disk-hangs";
    let stalls = |d: &Deployment| d.log("coordinator").matches("has not finished").count();
    let stalled = stalls(&d);
    d.freeze_coordinator()?;
    let hung = (|| {
        d.command(&format!("kill server-1-{s}"))?;
        tx.send(Message { username: "1".into(), msg: text.into(), post_id: ID, ..Default::default() })?;
        let ack = rt.spawn(async move { load::await_ack(&mut inbound, ID, Duration::from_secs(60)).await });
        eventually("the coordinator to say its records write hangs", || (stalls(&d) > stalled).then_some(()))?;
        // The disk hangs on past the master's call timeout (5 s): its first
        // request to record the slave out of sync fails, and it must ask
        // again rather than acknowledge. Watch for an answer meanwhile.
        let until = Instant::now() + Duration::from_secs(6);
        while !ack.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::Ok((ack.is_finished(), ack))
    })();
    d.thaw_coordinator()?;
    let (answered_while_hung, ack) = hung?;
    let acked = rt.block_on(ack)?;
    assert!(!(answered_while_hung && acked), "the post was acknowledged before the slave was recorded out of sync");
    if !acked {
        eventually("the post to be acknowledged when retried", || {
            let mut open = rt.block_on(session(d.coord_port, 1)).ok()?;
            rt.block_on(post_on(&mut open, 1, text, ID)).then_some(())
        })?;
    }
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((m, term)), "the master keeps its term");
    let during = posts(&rt, &d, 5);
    d.command(&format!("start server-1-{s}"))?;
    wait_in_sync(&rt, &d, s)?;
    all_once_and_identical(&d, [before.acked, vec![text.to_string()], during.acked].concat())
}

/// A switchover asked while the coordinator's disk hangs (frozen: the
/// promotion's records write neither ends nor fails). The master has
/// stepped down and the promotion may still land, so the coordinator can
/// neither give the role back nor promote anyone: the cluster has no
/// master until the disk answers (a limit in the README), and nobody
/// acknowledges a write meanwhile. Once the disk answers the promotion
/// lands under a newer term, the post sent meanwhile is acknowledged when
/// retried with its id, and every post is exactly once.
#[test]
fn a_switchover_asked_while_the_coordinators_disk_hangs_acknowledges_nothing_until_the_promotion_lands()
-> anyhow::Result<()> {
    const ID: u64 = 9_000_000_301;
    let Some((d, rt)) = cluster_on_freezable_coordinator(
        "a_switchover_asked_while_the_coordinators_disk_hangs_acknowledges_nothing_until_the_promotion_lands",
    )?
    else {
        return Ok(());
    };
    let (m, s, term) = pair(&rt, &d)?;
    wait_in_sync(&rt, &d, s)?;
    let before = posts(&rt, &d, 10);
    let mut open = rt.block_on(session(d.coord_port, 1))?;
    let text = "1-while-the-switchover-waits-for-the-disk";
    let stalls = |d: &Deployment| d.log("coordinator").matches("has not finished").count();
    let stalled = stalls(&d);
    d.freeze_coordinator()?;
    let hung = (|| {
        let switchover = d
            .switchover_command(1, Some(s))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        eventually("the coordinator to say its records write hangs", || (stalls(&d) > stalled).then_some(()))?;
        // The old master stepped down: the post is not acknowledged, by it
        // or by anyone.
        let (tx, inbound) = &mut open;
        tx.send(Message { username: "1".into(), msg: text.into(), post_id: ID, ..Default::default() })?;
        let acked = rt.block_on(load::await_ack(inbound, ID, Duration::from_secs(3)));
        let master = rt.block_on(master_of(d.coord_port, 1));
        let slave = rt.block_on(server_node(d.coord_port, 1, s)).filter(|n| n.alive);
        let st = rt.block_on(status(&slave.ok_or_else(|| anyhow::anyhow!("the target is not live"))?))?;
        anyhow::Ok((switchover, acked, master, st))
    })();
    d.thaw_coordinator()?;
    let (switchover, acked_while_hung, master_while_hung, target) = hung?;
    assert!(!acked_while_hung, "a write was acknowledged while the cluster's master was being changed");
    assert_eq!(master_while_hung, None, "the coordinator routes to no master while the promotion is unrecorded");
    assert!(!target.is_master && target.term == term, "promoted without a record of it: {target:?}");
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let out = switchover.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Done, or still under way when the command stopped waiting; never
    // abandoned, since the promotion landed.
    assert!(out.status.success() || said.contains("still under way"), "{said}");
    eventually("the post to be acknowledged when retried", || {
        let mut open = rt.block_on(session(d.coord_port, 1)).ok()?;
        rt.block_on(post_on(&mut open, 1, text, ID)).then_some(())
    })?;
    let during = posts(&rt, &d, 5);
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((s, new_term)));
    all_once_and_identical(&d, [before.acked, vec![text.to_string()], during.acked].concat())?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// The coordinator hangs (SIGSTOP) until the master's lease runs out, and
/// the master dies meanwhile. While it hangs nobody acts as master: the
/// master refuses writes once its lease is gone, and a post sent then is
/// never acknowledged nor stored. Once the coordinator answers again, with
/// every node's last heartbeat long past, it promotes the in-sync slave
/// under a newer term, and every acknowledged post is exactly once.
#[test]
fn a_paused_coordinator_lets_the_lease_run_out_and_then_promotes_the_in_sync_slave() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let mut open = rt.block_on(session(d.coord_port, 1))?;
    let refused = "1-while-the-coordinator-hangs";
    d.command("pause coordinator")?;
    let paused = (|| {
        eventually("the master's lease to run out", || rt.block_on(status(&master)).ok().filter(|st| !st.lease_valid))?;
        let acked = rt.block_on(post_on(&mut open, 1, refused, 9_000_000_101));
        d.command(&format!("kill server-1-{m}"))?;
        anyhow::Ok(acked)
    })();
    d.command("resume coordinator")?;
    assert!(!paused?, "a master without a lease acknowledged a post");
    let new_term = wait_master(&rt, &d, 1, s, term)?;
    let during = posts(&rt, &d, 10);
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((s, new_term)));
    for id in [m, s] {
        let files = spec_files(&d.server_dir(1, id))?;
        assert!(!files.values().any(|f| f.contains(refused)), "server {id} stored the refused post");
    }
    all_once_and_identical(&d, [before.acked, during.acked].concat())
}

/// Defect: a master restarted in the term it had (its slave was out of
/// sync, so nobody replaced it) numbered its snapshots from 1 again, and a
/// slave that had installed a higher-numbered one of that term from the
/// master's previous run refused them all as stale: the cluster never got
/// an in-sync slave back. (Found by the fault schedules: a hung slave,
/// then its master killed.) Now a restarted master numbers on above its
/// previous run, and its slave is brought back.
#[test]
fn a_master_restarted_in_its_term_brings_its_slave_back() -> anyhow::Result<()> {
    restarted_in_its_term("a_master_restarted_in_its_term_brings_its_slave_back", None)
}

/// Defect: a master restarted in its term numbered its snapshots from its
/// clock, above its previous run's as long as the clock had not stepped
/// back. Restarted on a clock a day behind, its snapshots were numbered
/// below the one its slave had installed from its previous run, and the
/// slave refused them all as stale: the cluster never got an in-sync slave
/// back (until the clock caught up). Now a master numbers its snapshot
/// above the one its slave reports installed under the same term.
#[test]
fn a_master_restarted_in_its_term_on_a_clock_a_day_behind_brings_its_slave_back() -> anyhow::Result<()> {
    restarted_in_its_term("a_master_restarted_in_its_term_on_a_clock_a_day_behind_brings_its_slave_back", Some("-1d"))
}

/// The slave installs a snapshot of term 1 and falls out of sync again;
/// the master dies (nobody can replace it) and restarts in its term, on a
/// clock `clock` off when given: it must bring its slave back, with no
/// snapshot refused as stale.
fn restarted_in_its_term(test: &str, clock: Option<&str>) -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    // The slave misses writes and is brought back: a second snapshot of
    // this term installed there.
    d.command(&format!("pause server-1-{s}"))?;
    let before = posts(&rt, &d, 5);
    d.command(&format!("resume server-1-{s}"))?;
    wait_in_sync(&rt, &d, s)?;
    // Out of sync again, and then the master dies: nobody can replace it.
    d.command(&format!("pause server-1-{s}"))?;
    let during = posts(&rt, &d, 5);
    d.command(&format!("kill server-1-{m}"))?;
    let refusals = |d: &Deployment| d.log(&format!("server-1-{s}")).matches("refused a stale snapshot").count();
    let refused = refusals(&d);
    d.command(&format!("resume server-1-{s}"))?;
    match clock {
        Some(offset) => {
            if !on_skewed_clock(&mut d, test, "start", &format!("server-1-{m}"), offset)? {
                return Ok(());
            }
        }
        None => {
            d.command(&format!("start server-1-{m}"))?;
        }
    }
    eventually("the restarted master to serve in its term", || {
        (rt.block_on(master_of(d.coord_port, 1))? == (m, term)).then_some(())
    })?;
    wait_in_sync(&rt, &d, s)?;
    assert_eq!(refusals(&d), refused, "the restarted master's snapshots were refused as older than its previous run's");
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, during.acked, after.acked].concat())
}

/// Defect: the last records of a master's journal lost (read back as
/// zeros, as a disk that acknowledged a flush it never made leaves them
/// after a power loss), and the master back before the coordinator missed
/// it. Its journal read as an append a crash interrupted: it cut the tail,
/// served on as master of its term, and installed its shorter state on its
/// slave, which held the lost records: acknowledged posts were gone from
/// both. Now a master restarted in its term compares itself with its
/// in-sync slave before it serves; finding the slave ahead, it hands the
/// cluster over to it, and the slave rebuilds it.
#[test]
fn a_master_that_lost_the_tail_of_its_journal_hands_over_to_the_slave_that_holds_it() -> anyhow::Result<()> {
    // Heartbeats far apart: the master is back before it could be missed.
    let (mut d, rt) = cluster_of_two(Deployment::builder().heartbeat(Duration::from_secs(3)))?;
    let (m, s, term) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 20);
    d.command(&format!("kill server-1-{m}"))?;
    lose_journal_tail(&d, m, 5)?;
    d.command(&format!("start server-1-{m}"))?;
    let log = d.log(&format!("server-1-{m}"));
    assert!(log.contains("cutting a torn tail"), "the lost records read as a torn tail: {log}");
    let after = posts(&rt, &d, 5);
    let (now, _) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    wait_in_sync(&rt, &d, 3 - now)?;
    all_once_and_identical(&d, [written.acked, after.acked].concat())?;
    let (master, new_term) = rt.block_on(master_of(d.coord_port, 1)).unwrap_or_default();
    assert!(master == s && new_term > term, "the slave took over under a newer term: {master}, {new_term}");
    let log = d.log(&format!("server-1-{m}"));
    assert!(log.contains("handing the cluster over"), "the restarted master says why it handed over: {log}");
    Ok(())
}

/// The same loss on a master whose journal was just compacted: every
/// record after the header is zeroed, the snapshot the compaction wrote
/// included, so the master restarts with nothing. It must not take that
/// for a cluster that never had a write: it hands over to its slave, which
/// rebuilds it.
#[test]
fn a_master_that_lost_its_compacted_journal_hands_over_to_the_slave_that_holds_it() -> anyhow::Result<()> {
    let builder = Deployment::builder().heartbeat(Duration::from_secs(3)).env("SNS_COMPACT_AT", "4096");
    let (mut d, rt) = cluster_of_two(builder)?;
    let (m, s, term) = pair(&rt, &d)?;
    // Follows and unfollows grow the journal, not the state.
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(async {
        for i in 0..300 {
            let said = load::command(d.coord_port, 2, i % 2 == 1, 1, deadline).await?;
            anyhow::ensure!(said == "SUCCESS", "{said}");
        }
        anyhow::Ok(())
    })?;
    eventually("the master to compact its journal", || {
        d.log(&format!("server-1-{m}")).contains("journal compacted").then_some(())
    })?;
    let written = posts(&rt, &d, 20).acked;
    d.command(&format!("kill server-1-{m}"))?;
    let path = d.server_dir(1, m).join("journal.log");
    let starts = disk::journal_records(&path)?;
    anyhow::ensure!(starts.len() >= 2, "{} records in {}", starts.len(), path.display());
    disk::zero_from(&path, starts[0])?;
    d.command(&format!("start server-1-{m}"))?;
    let after = posts(&rt, &d, 5);
    let (now, _) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    wait_in_sync(&rt, &d, 3 - now)?;
    all_once_and_identical(&d, [written, after.acked].concat())?;
    let (master, new_term) = rt.block_on(master_of(d.coord_port, 1)).unwrap_or_default();
    assert!(master == s && new_term > term, "the slave took over under a newer term: {master}, {new_term}");
    let log = d.log(&format!("server-1-{m}"));
    assert!(log.contains("cutting a torn tail") && log.contains("handing the cluster over"), "{log}");
    Ok(())
}

/// Posts with many followers in one cluster: each is in eleven places of
/// the state. Snapshots used to copy it into each, outweighing the journal
/// (which holds it once), so such a journal never compacted. With a table
/// of posts it compacts; the whole cluster then restarts from its
/// compacted journals, and every post is once in every feed on both.
#[test]
fn a_journal_of_posts_with_many_followers_compacts_and_restarts_whole() -> anyhow::Result<()> {
    let builder = Deployment::builder().env("SNS_COMPACT_AT", "4096");
    let (mut d, rt) = cluster_of_two(builder)?;
    let (m, s, _) = pair(&rt, &d)?;
    // Users 3..=11 follow 1 too (2 already does).
    let followers: Vec<u32> = (2..=11).collect();
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(async {
        for f in 3..=11 {
            load::follow_until_done(d.coord_port, f, 1, deadline).await?;
        }
        anyhow::Ok(())
    })?;
    // About 60 bytes of journal each: well past 4 KiB, and past twice
    // the size a compaction leaves.
    let written = posts(&rt, &d, 300);
    assert_eq!(written.acked.len(), 300);
    for id in [m, s] {
        eventually(&format!("server {id} to compact its journal"), || {
            d.log(&format!("server-1-{id}")).contains("journal compacted").then_some(())
        })?;
    }
    d.command(&format!("kill server-1-{s}"))?;
    d.command(&format!("kill server-1-{m}"))?;
    d.command(&format!("start server-1-{m}"))?;
    d.command(&format!("start server-1-{s}"))?;
    let (now, _) = eventually("a master", || rt.block_on(master_of(d.coord_port, 1)))?;
    wait_in_sync(&rt, &d, 3 - now)?;
    let after = posts(&rt, &d, 5);
    let all = WriterReport { user: 1, acked: [written.acked, after.acked].concat(), ..Default::default() };
    assert_exactly_once(&d, &BOTH, &[all], &BTreeMap::from([(1, followers)]))?;
    check_convergence(&d, &BOTH, &[])?;
    for id in [m, s] {
        let log = d.log(&format!("server-1-{id}"));
        assert!(!log.contains("journal damaged"), "server {id} read its compacted journal: {log}");
    }
    Ok(())
}

/// The same loss with the slave down too: the restarted master cannot ask
/// it. Without the check it served what its journal kept and had the slave
/// recorded out of sync at its first write: the lost posts were gone for
/// good. Now it serves nothing, saying why, until the slave is back; the
/// slave then takes over and rebuilds it.
#[test]
fn a_master_that_lost_the_tail_of_its_journal_waits_for_its_in_sync_slave() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder().heartbeat(Duration::from_secs(3)))?;
    let (m, s, term) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 20);
    d.command(&format!("kill server-1-{s}"))?;
    d.command(&format!("kill server-1-{m}"))?;
    lose_journal_tail(&d, m, 5)?;
    d.command(&format!("start server-1-{m}"))?;
    let refused = refuses_waiting_for_its_slave(&rt, &d, m, term)?;
    assert!(refused.message().contains("lost its end at start-up"), "{refused:?}");
    // The coordinator names it and says why it waits (from its heartbeats).
    eventually("GetServer to say why the master waits", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        (info.server_id == m as i32 && info.unavailable_reason.contains("waits for in-sync servers")).then_some(())
    })?;
    // Restarted again, its journal opens whole: the cut is remembered.
    d.command(&format!("kill server-1-{m}"))?;
    d.command(&format!("start server-1-{m}"))?;
    let refused = refuses_waiting_for_its_slave(&rt, &d, m, term)?;
    assert!(refused.message().contains("lost its end at start-up"), "{refused:?}");
    the_slave_back_takes_over(&rt, &mut d, (m, s, term), written)
}

/// Waits until restarted master `m` (still master of `term`) refuses
/// reads, saying it waits for its in-sync slave; returns the refusal.
fn refuses_waiting_for_its_slave(rt: &Runtime, d: &Deployment, m: u32, term: u64) -> anyhow::Result<tonic::Status> {
    let refused = eventually("the restarted master to refuse, waiting for its slave", || {
        rt.block_on(async {
            let node = server_node(d.coord_port, 1, m).await.filter(|n| n.alive && n.is_master && n.term == term)?;
            let mut sns = sns_at(&node.host, &node.port).await.ok()?;
            let refused = sns.list(request(1, None, 0)).await.err()?;
            refused.message().contains("waits for in-sync servers").then_some(refused)
        })
    })?;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    Ok(refused)
}

/// Master `m`, refusing as [`refuses_waiting_for_its_slave`], acknowledges
/// no write; slave `s` comes back, holds more, and takes over under a
/// newer term; every acknowledged post (`written`, and some after) is once
/// on both servers.
fn the_slave_back_takes_over(
    rt: &Runtime,
    d: &mut Deployment,
    (m, s, term): (u32, u32, u64),
    written: WriterReport,
) -> anyhow::Result<()> {
    let node = rt.block_on(server_node(d.coord_port, 1, m)).expect("the restarted master");
    let login = rt.block_on(async {
        let mut sns = sns_at(&node.host, &node.port).await?;
        anyhow::Ok(sns.login(request(9, None, 0)).await)
    })?;
    assert!(login.is_err(), "a master that cannot vouch for its journal acknowledged a write: {login:?}");
    d.command(&format!("start server-1-{s}"))?;
    wait_master(rt, d, 1, s, term)?;
    wait_in_sync(rt, d, m)?;
    let after = posts(rt, d, 5);
    all_once_and_identical(d, [written.acked, after.acked].concat())
}

/// A slave gone for good (killed, or removed by a scale-down) while no
/// write came: after ten heartbeats (at least 10 s) its master has it
/// recorded out of sync all the same, so a later restart of the master
/// within its term does not wait for it (a restarted master waits for the
/// in-sync servers it cannot reach) and serves alone at once. Before that
/// grace the slave stays in sync: master and slave may have gone down
/// together, and the slave may hold what the master's disk lost.
#[test]
fn a_master_restarted_after_its_slave_is_gone_serves_alone() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 10);
    d.command(&format!("kill server-1-{s}"))?;
    let killed = Instant::now();
    eventually_within("the gone slave recorded out of sync with no write", Duration::from_secs(30), || {
        rt.block_on(server_node(d.coord_port, 1, s)).filter(|n| !n.alive && !n.in_sync).map(|_| ())
    })?;
    // Informative, as timings are: the grace is 10 s with these heartbeats.
    eprintln!("gone slave recorded out of sync {:?} after it was killed", killed.elapsed());
    d.command(&format!("restart server-1-{m}"))?;
    wait_master(&rt, &d, 1, m, 0)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)).map(|(_, t)| t), Some(term), "it keeps its term");
    let alone = posts(&rt, &d, 5);
    assert_eq!((alone.acked.len(), alone.failovers), (5, 0), "{alone:?}");
    d.command(&format!("start server-1-{s}"))?;
    wait_in_sync(&rt, &d, s)?;
    all_once_and_identical(&d, [written.acked, alone.acked].concat())
}

/// The same loss at a record boundary: the file system kept the journal's
/// length of an earlier flush, so it ends after a whole record and opens
/// whole, and the slave is down too. The restarted master used to take a
/// journal that opened whole for proof it had lost nothing: it served,
/// and once the slave was back it overwrote it, lost posts and all, with
/// its shorter state. Now a master restarted within its term serves
/// nothing until an in-sync server has told it what it holds; the slave,
/// back, holds more and takes over.
#[test]
fn a_master_whose_journal_lost_whole_records_waits_for_its_in_sync_slave() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder().heartbeat(Duration::from_secs(3)))?;
    let (m, s, term) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 20);
    d.command(&format!("kill server-1-{s}"))?;
    d.command(&format!("kill server-1-{m}"))?;
    truncate_journal_tail(&d, m, 5)?;
    d.command(&format!("start server-1-{m}"))?;
    let refused = refuses_waiting_for_its_slave(&rt, &d, m, term)?;
    assert!(refused.message().contains("restarted within its term"), "{refused:?}");
    let log = d.log(&format!("server-1-{m}"));
    assert!(!log.contains("torn tail"), "the journal opened whole: {log}");
    the_slave_back_takes_over(&rt, &mut d, (m, s, term), written)
}

/// The slave's journal lost its last records, and the whole cluster was
/// down: the slave came back first. It used to be promoted (it is in sync,
/// and the master was gone) and then rebuild the master from its shorter
/// state: acknowledged posts were lost. Now the coordinator promotes it
/// only where no other in-sync server could hold more, says why the
/// cluster waits, and the master, back, keeps its term and rebuilds it.
#[test]
fn a_slave_that_lost_the_tail_of_its_journal_is_not_promoted_while_its_master_may_hold_more() -> anyhow::Result<()> {
    let d = slave_back_first_waits(lose_journal_tail, "lost its end")?;
    for id in [1, 2] {
        assert!(!d.server_dir(1, id).join("journal.cut").exists(), "server 1/{id} left a cut tail unsettled");
    }
    Ok(())
}

/// The same with the slave's journal shortened at a record boundary: it
/// opens whole. The slave back first used to be promoted (it is in sync,
/// and the master was gone) and then rebuild the master from its shorter
/// state. Now a server that restarted is promoted only where no other
/// in-sync server could hold more, until a master has synced it.
#[test]
fn a_slave_whose_journal_lost_whole_records_is_not_promoted_while_its_master_may_hold_more() -> anyhow::Result<()> {
    slave_back_first_waits(truncate_journal_tail, "restarted and not yet synced").map(drop)
}

/// The whole cluster down, `lose` takes the last five records of the
/// slave's journal, the slave comes back first: it is not promoted, the
/// cluster says why (`reason`), and the master, back, keeps its term,
/// rebuilds it, and every acknowledged post is there once.
fn slave_back_first_waits(
    lose: fn(&Deployment, u32, usize) -> anyhow::Result<()>,
    reason: &str,
) -> anyhow::Result<Deployment> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 20);
    d.command(&format!("kill server-1-{m}"))?;
    d.command(&format!("kill server-1-{s}"))?;
    lose(&d, s, 5)?;
    d.command(&format!("start server-1-{s}"))?;
    eventually("the restarted slave to register", || {
        rt.block_on(server_node(d.coord_port, 1, s)).filter(|n| n.alive).map(|_| ())
    })?;
    let why = eventually("cluster 1 to wait for the server that may hold more", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        info.unavailable_reason.contains(reason).then_some(info.unavailable_reason)
    })?;
    assert!(why.contains(&format!("[{s}]")), "{why}");
    assert_ne!(rt.block_on(master_of(d.coord_port, 1)).map(|(id, _)| id), Some(s), "the slave was promoted");
    d.command(&format!("start server-1-{m}"))?;
    wait_in_sync(&rt, &d, s)?;
    assert_eq!(rt.block_on(master_of(d.coord_port, 1)), Some((m, term)), "the master keeps its term");
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [written.acked, after.acked].concat())?;
    Ok(d)
}

/// Shortens stopped `server`'s journal by its last `records` records, at a
/// record boundary: acknowledged writes a disk lost whole (the file's
/// length back at an earlier flush). It opens whole.
fn truncate_journal_tail(d: &Deployment, server: u32, records: usize) -> anyhow::Result<()> {
    let path = d.server_dir(1, server).join("journal.log");
    let starts = disk::journal_records(&path)?;
    anyhow::ensure!(starts.len() > 4 * records, "{} records in {}", starts.len(), path.display());
    disk::truncate_at(&path, starts[starts.len() - records])
}

/// Zeros the last `records` records of stopped `server`'s journal, in
/// place: acknowledged writes a disk lost, reading as a torn tail.
fn lose_journal_tail(d: &Deployment, server: u32, records: usize) -> anyhow::Result<()> {
    let path = d.server_dir(1, server).join("journal.log");
    let starts = disk::journal_records(&path)?;
    anyhow::ensure!(starts.len() > 4 * records, "{} records in {}", starts.len(), path.display());
    disk::zero_from(&path, starts[starts.len() - records])
}

/// The middle of `server`'s journal.
fn journal_middle(d: &Deployment, server: u32) -> anyhow::Result<(std::path::PathBuf, u64)> {
    let path = d.server_dir(1, server).join("journal.log");
    let len = std::fs::metadata(&path)?.len();
    Ok((path, len / 2))
}

/// Defect: four bytes flipped in the middle of a stopped slave's journal.
/// It used to keep what preceded the damage and drop the rest. Now it
/// serves nothing, is rebuilt from the master, and keeps the damaged file
/// aside.
#[test]
fn a_damaged_journal_is_rebuilt_from_an_in_sync_peer_and_kept_aside() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (_, s, _) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 30);
    wait_synced_slave(&rt, &d, 1, s)?;
    d.command(&format!("kill server-1-{s}"))?;
    let (path, offset) = journal_middle(&d, s)?;
    disk::flip(&path, offset, 4)?;
    d.command(&format!("start server-1-{s}"))?;
    wait_in_sync(&rt, &d, s)?;
    let log = d.log(&format!("server-1-{s}"));
    assert!(log.contains("journal damaged") && log.contains(&path.display().to_string()), "{log}");
    assert_eq!(damaged_files(&d.server_dir(1, s)).len(), 1, "the damaged journal is kept aside");
    assert_exactly_once(&d, &BOTH, &[written], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(&d, &BOTH, &[])?;
    Ok(())
}

/// Both servers down, the master's journal damaged, and it comes back
/// first: it is not promoted (it lost writes), says which file and where,
/// and waits; the slave returns, takes over, and rebuilds it.
#[test]
fn a_damaged_server_back_first_waits_for_its_in_sync_peer() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, _) = pair(&rt, &d)?;
    let written = posts(&rt, &d, 30);
    d.command(&format!("kill server-1-{s}"))?;
    d.command(&format!("kill server-1-{m}"))?;
    let (path, offset) = journal_middle(&d, m)?;
    disk::flip(&path, offset, 4)?;
    d.command(&format!("start server-1-{m}"))?;
    let node = eventually("the damaged server to register", || {
        rt.block_on(server_node(d.coord_port, 1, m)).filter(|n| n.alive && n.damaged)
    })?;
    let reason = eventually("cluster 1 to wait for an in-sync server", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        (!info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
    })?;
    assert!(reason.contains("in sync"), "{reason}");
    eventually("the damaged server recorded out of sync", || {
        rt.block_on(server_node(d.coord_port, 1, m)).filter(|n| !n.in_sync).map(|_| ())
    })?;
    let st = rt.block_on(status(&node))?;
    assert!(st.damage.contains(&path.display().to_string()) && st.damage.contains("offset"), "{st:?}");
    assert!(!st.is_master);
    d.command(&format!("start server-1-{s}"))?;
    wait_master(&rt, &d, 1, s, 0)?;
    wait_in_sync(&rt, &d, m)?;
    assert_eq!(damaged_files(&d.server_dir(1, m)).len(), 1);
    assert_exactly_once(&d, &BOTH, &[written], &BTreeMap::from([(1, vec![2])]))?;
    check_convergence(&d, &BOTH, &[])?;
    assert_one_master_per_term(&d);
    Ok(())
}

/// Defect: a master cut off from the coordinator (not from its clients)
/// used to go on answering reads from state nobody committed, and its
/// clients hung. Now it stops serving once its lease runs out, answers
/// UNAVAILABLE (so clients ask the coordinator), never acknowledges a
/// write, and rejoins as slave when the partition heals.
#[test]
fn a_master_cut_off_from_the_coordinator_stops_serving_and_rejoins() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let old = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let reply = d.command(&format!("partition server-1-{m}"))?;
    assert!(reply.starts_with("partitioned"), "{reply}");
    // It stops serving on its own, and says so.
    let refused = eventually("the cut-off master to stop serving reads", || {
        rt.block_on(async {
            let mut sns = sns_at(&old.host, &old.port).await.ok()?;
            sns.list(request(1, None, 0)).await.err()
        })
    })?;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("ask the coordinator"), "{refused:?}");
    // A login sent straight to it is never acknowledged.
    let login = rt.block_on(async {
        let mut sns = sns_at(&old.host, &old.port).await?;
        anyhow::Ok(sns.login(request(9, None, 0)).await)
    })?;
    assert!(login.is_err(), "a cut-off master acknowledged a write: {login:?}");
    // The slave takes over; clients go on there.
    wait_master(&rt, &d, 1, s, term)?;
    let deadline = Instant::now() + DEADLINE;
    rt.block_on(load::attach(d.coord_port, 7))?;
    assert_eq!(rt.block_on(load::command(d.coord_port, 7, true, 1, deadline))?, "SUCCESS");
    d.command(&format!("heal server-1-{m}"))?;
    wait_in_sync(&rt, &d, m)?;
    check_convergence(&d, &BOTH, &[])?;
    for server in [m, s] {
        let users = spec_files(&d.server_dir(1, server))?.get("all_users.txt").cloned().unwrap_or_default();
        assert_eq!(users, "1\n2\n7\n", "server 1/{server}: the refused login left nothing, the new one is there");
    }
    assert_one_master_per_term(&d);
    Ok(())
}

/// Cuts servers 1/`a` and 1/`b` off from each other through the launcher,
/// or None (the test skips, recorded) where nftables or root is missing.
fn cut_apart(d: &mut Deployment, test: &str, a: u32, b: u32) -> anyhow::Result<Option<()>> {
    let reply = d.command_reply(&format!("partition server-1-{a} server-1-{b}"))?;
    if reply.contains("needs nftables and root") {
        sns_e2e::skip(test, &format!("a partition between two servers needs nftables and root: {reply}"));
        return Ok(None);
    }
    anyhow::ensure!(reply == format!("partitioned server-1-{a} from server-1-{b}"), "{reply}");
    Ok(Some(()))
}

/// A master and its slave cut off from each other, both still reaching the
/// coordinator and clients still reaching the master: the master
/// acknowledges writes once the coordinator has recorded the slave out of
/// sync. Killed then, it is not replaced by the slave, which is alive,
/// heartbeating and lacks those writes; it comes back and serves them.
/// Once the cut heals, the slave catches up over the same connections and
/// is in sync again, with every acknowledged write.
#[test]
fn a_master_cut_off_from_its_slave_acknowledges_alone_and_the_slave_is_never_promoted_over_it() -> anyhow::Result<()> {
    let test = "a_master_cut_off_from_its_slave_acknowledges_alone_and_the_slave_is_never_promoted_over_it";
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, _) = pair(&rt, &d)?;
    let before = posts(&rt, &d, 10);
    if cut_apart(&mut d, test, m, s)?.is_none() {
        return Ok(());
    }
    // The first write finds the slave gone (its forward waits a patience).
    let during = posts(&rt, &d, 10);
    assert_eq!((before.acked.len(), during.acked.len()), (10, 10), "{during:?}");
    assert_eq!(during.failovers, 0, "the master went on serving: {during:?}");
    // Meanwhile the master tries to catch the slave up (at 200 ms, 400 ms,
    // 800 ms, ...). Informative: a try must not hold writes back for the
    // patience its unanswered call waits (500 ms here); not asserted, as
    // timings never are.
    let meanwhile = posts(&rt, &d, 2000);
    assert_eq!((meanwhile.acked.len(), meanwhile.failovers), (2000, 0), "{meanwhile:?}");
    eprintln!("cut off from its slave: longest write pause {:?}", meanwhile.longest_gap);
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    let ms = rt.block_on(status(&master))?;
    assert!(ms.is_master && ms.in_sync == vec![m], "the cut slave is recorded out of sync: {ms:?}");
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    assert!(slave.alive && !slave.in_sync, "the slave still heartbeats, out of sync: {slave:?}");
    d.command(&format!("kill server-1-{m}"))?;
    let no_master = eventually("the coordinator to explain why cluster 1 has no master", || {
        let info = rt.block_on(get_server(d.coord_port, 1)).ok()?;
        let dead = rt.block_on(server_node(d.coord_port, 1, m)).is_some_and(|n| !n.alive);
        (dead && info.port.is_empty() && !info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
    })?;
    assert!(
        no_master.contains(&format!("no live server holding every acknowledged write (in sync: [{m}])")),
        "{no_master}"
    );
    let st = rt.block_on(status(&slave))?;
    assert!(!st.is_master, "the slave that lacks acknowledged writes was promoted: {st:?}");
    // Back, still cut off: it serves alone again.
    d.command(&format!("start server-1-{m}"))?;
    wait_master(&rt, &d, 1, m, 0)?;
    let back = posts(&rt, &d, 5);
    assert_eq!(back.acked.len(), 5, "{back:?}");
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("slave");
    assert!(!slave.in_sync, "a slave it cannot reach is not in sync: {slave:?}");
    let reply = d.command(&format!("heal server-1-{m} server-1-{s}"))?;
    assert_eq!(reply, format!("healed server-1-{m} and server-1-{s}"));
    wait_in_sync(&rt, &d, s)?;
    let after = posts(&rt, &d, 5);
    all_once_and_identical(&d, [before.acked, during.acked, meanwhile.acked, back.acked, after.acked].concat())
}

/// Defect: a write made durable just before its master died, retried on
/// the new master, used to answer "already exists". Now a retry with the
/// same request id answers as the first attempt did.
#[test]
fn a_retried_write_answers_as_the_first_attempt() -> anyhow::Result<()> {
    let (mut d, rt) = cluster_of_two(Deployment::builder())?;
    let (m, s, term) = pair(&rt, &d)?;
    let master = rt.block_on(server_node(d.coord_port, 1, m)).expect("master");
    rt.block_on(async {
        let mut sns = sns_at(&master.host, &master.port).await?;
        assert_eq!(sns.login(request(3, None, 11)).await?.into_inner().msg, "SUCCESS");
        assert_eq!(sns.follow(request(1, Some(3), 12)).await?.into_inner().msg, "SUCCESS");
        assert_eq!(sns.un_follow(request(2, Some(1), 13)).await?.into_inner().msg, "SUCCESS");
        anyhow::Ok(())
    })?;
    // The master dies before the client hears back; the client retries on
    // the new master with the same ids.
    d.command(&format!("kill server-1-{m}"))?;
    wait_master(&rt, &d, 1, s, term)?;
    let promoted = rt.block_on(server_node(d.coord_port, 1, s)).expect("new master");
    rt.block_on(async {
        let mut sns = sns_at(&promoted.host, &promoted.port).await?;
        assert_eq!(sns.login(request(3, None, 11)).await?.into_inner().msg, "SUCCESS");
        assert_eq!(sns.follow(request(1, Some(3), 12)).await?.into_inner().msg, "SUCCESS");
        assert_eq!(sns.un_follow(request(2, Some(1), 13)).await?.into_inner().msg, "SUCCESS");
        // A new request is judged afresh.
        assert_eq!(sns.follow(request(1, Some(3), 14)).await?.into_inner().msg, "FAILURE_ALREADY_EXISTS");
        assert_eq!(sns.un_follow(request(2, Some(1), 15)).await?.into_inner().msg, "FAILURE_NOT_A_FOLLOWER");
        anyhow::Ok(())
    })?;
    // Applied once: 1 follows 3 once, 2 follows nobody.
    let files = spec_files(&d.server_dir(1, s))?;
    assert_eq!(files.get("1_follow_list.txt").map(String::as_str), Some("3\n"));
    assert_eq!(files.get("2_follow_list.txt").map(String::as_str), Some(""));
    assert_eq!(files.get("3_followers.txt").map(String::as_str), Some("1\n"));
    Ok(())
}

/// A master gives up on a forward after its patience; the slave then hears
/// a reset stream, and its handler used to be dropped wherever it stood —
/// possibly after the journal append and before memory saw the records.
/// The slave's journal then held writes its memory lacked: it numbered
/// later writes over them, and replayed into another state after a restart
/// (in the fault schedules, a post published twice under two stream
/// positions). Forwards abandoned at every point of their way must leave
/// memory and journal agreeing.
#[test]
fn a_forward_abandoned_by_its_master_leaves_journal_and_memory_agreeing() -> anyhow::Result<()> {
    use sns_node::store::codec;
    use sns_node::store::state::{Change, Entry, LocalOp};
    use sns_proto::internal::ReplicateRequest;
    use sns_proto::internal::replica_client::ReplicaClient;

    const FORWARDS: u32 = 40;
    let d = Deployment::start(1, 2)?;
    let rt = rt();
    let (_, s, term) = pair(&rt, &d)?;
    let slave = rt.block_on(server_node(d.coord_port, 1, s)).expect("the slave in the table");
    let mut replica = {
        let _runtime = rt.enter();
        ReplicaClient::new(sns_e2e::secret::channel(&slave.host, &slave.port)?)
    };
    for i in 0..FORWARDS {
        // What the master would forward next: a Login at the slave's next
        // seq, under the master's term; given up on after 0 to 2 ms.
        let next = rt.block_on(status(&slave))?.next_seq;
        let op = LocalOp { seq: next, change: Change::User(1000 + i), request_id: 0 };
        let mut req = tonic::Request::new(ReplicateRequest {
            term,
            entries: vec![codec::entry_to_pb(&Entry::Local(op))],
            published_upto: 0,
            cluster: 1,
            from_server: 3 - s,
            receipts: vec![],
        });
        req.set_timeout(Duration::from_micros(u64::from(i) * 100));
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_micros(u64::from(i) * 100), replica.replicate(req)).await
        });
    }
    // Memory and a replay of the journal (a copy of it, opened as a
    // restarted server would) agree once the last forward settled.
    let journal = d.server_dir(1, s).join("journal.log");
    let mut last = String::new();
    let agreed = sns_e2e::eventually_within("the slave's journal and memory to agree", Duration::from_secs(10), || {
        let memory = rt.block_on(status(&slave)).ok()?;
        let copy = tempfile::tempdir().ok()?;
        std::fs::copy(&journal, copy.path().join("journal.log")).ok()?;
        let replayed = sns_node::store::Disk::open(copy.path(), 1, 1).ok()?;
        let replay = (replayed.state().next_seq(), replayed.state().users().len() as u32);
        last = format!(
            "memory: next seq {}, {} users; journal: next seq {}, {} users",
            memory.next_seq, memory.users, replay.0, replay.1
        );
        (replay == (memory.next_seq, memory.users)).then_some(memory)
    });
    let memory = agreed.map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
    eprintln!("{} of {FORWARDS} abandoned forwards were applied: {last}", memory.users);
    Ok(())
}
