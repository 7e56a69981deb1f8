//! Randomized fault schedules, seeded and reproducible: while clients make
//! acknowledged writes in every cluster (posts, follows and unfollows,
//! logins; each writer's posts carry its client clock, a day or 30 s
//! behind or ahead, or no time) and a reader checks that no LIST misses
//! what was acknowledged before it or what an earlier LIST showed, a
//! schedule kills, restarts, pauses and partitions servers (from the
//! coordinator: a master, or a slave, sometimes with its master killed
//! while it is cut off; or a master from its slave, sometimes with the
//! master then killed or cut off from the coordinator too),
//! synchronizers and the coordinator (paused too, past the masters' leases,
//! sometimes with a master killed meanwhile; restarted on a clock 30 s or a
//! day off, as masters and slaves are), with double faults restarted in the
//! worst order, a full disk on one server and on the coordinator (which
//! then may promote nobody; sometimes restarted on it, or with a master
//! killed meanwhile), a hung disk on the coordinator (its master or slave
//! killed meanwhile) and on another server (frozen:
//! writes neither end nor fail; sometimes killed while hung, or its master
//! killed or the coordinator restarted while it hangs), a damaged journal,
//! a journal that lost its last records (zeroed, or cut at a record
//! boundary so that it opens whole, while its server was down: a master
//! restarted at once, sometimes with the coordinator restarted right after
//! it, or a slave back first while the whole cluster was down), and planned
//! switchovers (alone, with the target hanging right after, with the old
//! master killed right after, with the coordinator restarted in the middle
//! of one), and restarts the broker (sometimes with a
//! master or its synchronizer killed while it is down) or cuts it off
//! without a reset (every broker link goes silent and new connections are
//! never answered: briefly, with a master killed meanwhile, or until a
//! synchronizer's heartbeats gave up on its link). Faults overlap:
//! one step in three holds a second fault for the whole of the step's
//! fault (in another cluster, its master or slave killed or paused; in any
//! cluster, a synchronizer killed or paused; or the broker stopped, cut
//! off without a reset, or out of disk: its free-disk alarm blocks every
//! connection that publishes), and
//! one step in four is followed at once by the next, as soon as every
//! cluster serves again and before its slaves are back in sync (a slave
//! killed or paused, a master restarted, a synchronizer or the coordinator
//! disturbed while a slave still catches up). At the
//! end, every acknowledged write must be on every server (all in sync by
//! then), a timeline reader that reopened its stream throughout (resuming
//! after the last post it got, as `tsc` does after a failover) must have
//! got every acknowledged post of its followees once, at feed positions
//! that follow one another with none skipped, master and slave files
//! byte-identical, no two servers must have
//! acknowledged writes in one term, and traffic between clusters must
//! still flow. All the while a hostile client of the broker taps every
//! message the nodes publish and publishes random ones again (old and new,
//! in any order, sometimes to another cluster's key, with a byte flipped,
//! or as bytes that decode as nothing): receivers must ignore the copies
//! and dead-letter the forgeries, and every check above must still hold.
//!
//! `SNS_FAULT_SCHEDULES` (default 3) and `SNS_FAULT_STEPS` (default 6) set
//! the length; `SNS_FAULT_SEED` replays a run (every failure names its
//! seed); `SNS_FAULT_ONLY` (e.g. `SilentBroker,KillMaster`) keeps the
//! steps' own faults to those named, and `SNS_FAULT_BACKGROUND` (e.g.
//! `BrokerOutOfDisk`) holds one of the second faults it names on every
//! step. The full disks need tmpfs mounts and the hung disk a loop mount
//! (root); where mounting is refused those faults are left out, saying so.
//! `SNS_FAULT_REPLAY=0` leaves the replaying client out.

use anyhow::{Context, Result, anyhow, bail};
use sns_e2e::broker::{Broker, DiskAlarm, Replayed, Replayer, StandIn, StoppedBroker};
use sns_e2e::disk;
use sns_e2e::load::{self, Writer, WriterReport};
use sns_e2e::nodes::{
    assert_exactly_once, assert_one_master_per_term, get_server, master_of, rt, running, server_node, status, table,
    wait_lease_from_current_run,
};
use sns_e2e::{Deployment, KillOnDrop, Rng, check_convergence, eventually_within, spec_files};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

const CLUSTERS: u32 = 3;
/// Writers (one per cluster) post; everyone of them follows the others.
const WRITERS: [u32; 3] = [1, 2, 3];
/// Users that follow and unfollow users of other clusters.
const CHURNERS: [u32; 3] = [4, 5, 6];
const TARGETS: [u32; 3] = [7, 8, 9];
/// How long the deployment may take to heal after a fault (a double fault
/// restarted in the worst order, a rebuild from a snapshot).
const HEAL: Duration = Duration::from_secs(30);
/// Room for every file a server writes in a run, the full-disk server's
/// limit.
const TMPFS: u64 = 64 << 20;
/// The coordinator's disk: room for its records, not much more.
const COORDINATOR_TMPFS: u64 = 1 << 20;

/// A cluster drawn by the schedule's generator.
trait DrawCluster {
    fn cluster(&mut self) -> u32;
}

impl DrawCluster for Rng {
    fn cluster(&mut self) -> u32 {
        self.below(u64::from(CLUSTERS)) as u32 + 1
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillMaster,
    /// The master killed and started again at once: back within its term
    /// while the coordinator may or may not have promoted its slave.
    RestartMaster,
    KillSlave,
    /// Kill the master, write on the new one alone, kill it, restart the
    /// stale server first (or, half the time, in the good order).
    DoubleKill,
    PauseMaster,
    PauseSlave,
    PartitionMaster,
    /// The slave cut off from the coordinator (not from its master) until
    /// the coordinator gives it up, then writes: the master records it out
    /// of sync. Half the time the master is then killed and the slave
    /// healed first: it must not be promoted (it may lack acknowledged
    /// writes), and the cluster waits for the old master.
    PartitionSlave,
    KillSynchronizer,
    RestartCoordinator,
    DiskFull,
    DamagedJournal,
    /// A planned switchover to the slave.
    Switchover,
    /// The target hangs just as the switchover is asked for: the old
    /// master must take the role back.
    SwitchoverTargetHangs,
    /// The old master is killed right after it handed over.
    SwitchoverThenKillOld,
    /// The coordinator restarted in the middle of a switchover: once the
    /// master stepped down for a target that hangs (the promotion may or
    /// may not be recorded yet), or at once after asking, the target
    /// healthy. The new run must leave one master serving, whichever it
    /// is, and nothing acknowledged lost.
    SwitchoverCoordinatorRestarts,
    /// A synchronizer hangs (SIGSTOP) holding its broker connection, its
    /// deliveries and the queue's single-consumer slot, then resumes.
    PauseSynchronizer,
    /// A server's disk hangs (frozen: writes neither end nor fail), then
    /// answers again.
    DiskHung,
    /// The master is killed, the last records of its journal are zeroed
    /// (acknowledged writes a lying disk lost; they read as a torn tail) or
    /// cut off at a record boundary (it opens whole), and it is restarted
    /// at once: only its slave holds them.
    LostTail,
    /// The coordinator hangs (SIGSTOP): briefly, or until a master's lease
    /// ran out, sometimes with that master killed meanwhile; then resumes.
    PauseCoordinator,
    /// The coordinator, a master or a slave restarted on a wall clock 30 s
    /// or a day behind or ahead (libfaketime); a later restart puts it back
    /// on the true clock, a step the other way.
    SkewedClock,
    /// The broker stopped and started again (the local RabbitMQ's app):
    /// servers go on acknowledging writes, their outboxes wait. One time in
    /// three the master is killed meanwhile (its slave's synchronizer must
    /// publish what it never could), one in three the master's
    /// synchronizer.
    RestartBroker,
    /// The master and its slave cut off from each other (nftables), both
    /// still reaching the coordinator: the master goes on alone once the
    /// slave is recorded out of sync. Sometimes the master is killed and
    /// restarted meanwhile, or also cut off from the coordinator until its
    /// lease runs out: the slave, lacking acknowledged writes, must not be
    /// promoted either way.
    CutMasterFromSlave,
    /// The broker cut off without a reset (its stand-in swallows whatever
    /// its open links carry and never answers new connections), then
    /// back: briefly, with the master killed meanwhile (its slave's
    /// synchronizer must connect through the silence), or until the
    /// master's synchronizer dropped its link on missed heartbeats.
    SilentBroker,
    /// The coordinator's disk full (a tmpfs, or the loop mount below): it
    /// cannot write its records, so it may change no master and no in-sync
    /// set. One time in five each: writes just go on; or the master is
    /// killed meanwhile; or the
    /// coordinator is restarted on the full disk first (it cannot write its
    /// run's epoch) and then the master killed: nobody may be promoted
    /// before the disk has room, then the in-sync slave is; or it is
    /// restarted on the full disk and again on a clock a day behind (its
    /// epoch below the one the nodes obey): the masters go on serving; or
    /// a switchover is asked, which it cannot record: abandoned, and the
    /// master that stepped down for it serves again.
    CoordinatorDiskFull,
    /// The coordinator's disk hangs (frozen: its records writes neither end
    /// nor fail), then answers again. Meanwhile the master is killed (no
    /// promotion may happen before the write of it ends: the slave keeps
    /// its role, `GetServer` says why), or the slave is (the cluster's
    /// writes wait for the record that it lacks them).
    CoordinatorDiskHung,
    /// The broker loses messages it confirmed: the cluster's synchronizers
    /// killed, another cluster posts, the cluster's queue is purged, and
    /// (half the time) that other cluster's master is killed before the
    /// synchronizers come back: the receipts must get the lost events
    /// published again, by a new master from its replicated outbox.
    LostMessages,
}

const FAULTS: [Fault; 27] = [
    Fault::KillMaster,
    Fault::RestartMaster,
    Fault::KillSlave,
    Fault::DoubleKill,
    Fault::PauseMaster,
    Fault::PauseSlave,
    Fault::PartitionMaster,
    Fault::PartitionSlave,
    Fault::KillSynchronizer,
    Fault::RestartCoordinator,
    Fault::DiskFull,
    Fault::DamagedJournal,
    Fault::Switchover,
    Fault::SwitchoverTargetHangs,
    Fault::SwitchoverThenKillOld,
    Fault::SwitchoverCoordinatorRestarts,
    Fault::PauseSynchronizer,
    Fault::DiskHung,
    Fault::LostTail,
    Fault::PauseCoordinator,
    Fault::SkewedClock,
    Fault::CutMasterFromSlave,
    Fault::RestartBroker,
    Fault::SilentBroker,
    Fault::LostMessages,
    Fault::CoordinatorDiskFull,
    Fault::CoordinatorDiskHung,
];

/// The faults that may strike before the last one healed (a slave still
/// catching up, or not yet recorded in sync): none of them needs an in-sync
/// slave to make progress.
const RESTLESS: [Fault; 7] = [
    Fault::KillSlave,
    Fault::PauseSlave,
    Fault::RestartMaster,
    Fault::KillSynchronizer,
    Fault::PauseSynchronizer,
    Fault::RestartCoordinator,
    Fault::SkewedClock,
];

/// The faults of `list` that `SNS_FAULT_ONLY` names (comma-separated, as
/// in [`Fault`]: `SilentBroker,KillMaster`), to soak a few; all of them
/// when it is unset.
fn only(list: &[Fault]) -> Vec<Fault> {
    named("SNS_FAULT_ONLY", list).unwrap_or_else(|| list.to_vec())
}

/// The background faults to draw from, and whether every step holds one:
/// those `SNS_FAULT_BACKGROUND` names (as in [`Background`], e.g.
/// `BrokerOutOfDisk`), on every step, to soak a few; else all of them, on
/// one step in three.
fn backgrounds() -> (Vec<Background>, bool) {
    match named("SNS_FAULT_BACKGROUND", &BACKGROUNDS) {
        Some(kinds) => {
            assert!(!kinds.is_empty(), "SNS_FAULT_BACKGROUND names no background fault of {BACKGROUNDS:?}");
            (kinds, true)
        }
        None => (BACKGROUNDS.to_vec(), false),
    }
}

/// The items of `list` that the environment variable `var` names
/// (comma-separated, as their `Debug` spells them); None when it is unset.
fn named<T: Copy + std::fmt::Debug>(var: &str, list: &[T]) -> Option<Vec<T>> {
    let names = std::env::var(var).ok()?;
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    Some(list.iter().copied().filter(|x| names.contains(&format!("{x:?}").as_str())).collect())
}

/// A fault held for the whole of a step's fault, so that two faults
/// overlap (ended after it): in another cluster, or for a synchronizer in
/// the same one.
#[derive(Debug, Clone, Copy)]
enum Background {
    KillMaster,
    PauseMaster,
    KillSlave,
    PauseSlave,
    KillSynchronizer,
    PauseSynchronizer,
    /// The broker stopped (every cluster's synchronizers lose it).
    StopBroker,
    /// The broker cut off without a reset (every link goes silent).
    SilenceBroker,
    /// The broker out of disk (its free-disk alarm): it blocks every
    /// connection that publishes, so nothing crosses clusters.
    BrokerOutOfDisk,
}

const BACKGROUNDS: [Background; 9] = [
    Background::KillMaster,
    Background::PauseMaster,
    Background::KillSlave,
    Background::PauseSlave,
    Background::KillSynchronizer,
    Background::PauseSynchronizer,
    Background::StopBroker,
    Background::SilenceBroker,
    Background::BrokerOutOfDisk,
];

/// A background fault in progress, and what ends it.
struct Held {
    name: String,
    undo: Undo,
}

enum Undo {
    Nothing,
    /// A launcher command.
    Command(String),
    Broker(StoppedBroker),
    Alarm(DiskAlarm),
    /// The broker's stand-in relays again.
    Restore,
}

/// The servers whose disks the schedule can fill or hang, if any (mounting
/// needs root).
#[derive(Debug, Clone, Copy, Default)]
struct Disks {
    full: Option<(u32, u32)>,
    hung: Option<(u32, u32)>,
    coordinator: CoordinatorDisk,
}

/// Where the coordinator keeps its records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum CoordinatorDisk {
    /// The deployment's directory: no disk fault there.
    #[default]
    Plain,
    /// A small tmpfs the schedule can fill.
    Tmpfs,
    /// A loop-mounted ext4 the schedule can fill or hang.
    Freezable,
}

#[derive(Debug, Default)]
struct Totals {
    schedules: u64,
    faults: BTreeMap<String, u64>,
    posts: usize,
    relation_ops: usize,
    logins: usize,
    lists: usize,
    /// Writers per client clock.
    clocks: BTreeMap<String, u64>,
    checked_relations: usize,
    /// Journal compactions the servers logged.
    compactions: usize,
    /// What the schedules' replayers did, together.
    replayed: Replayed,
}

#[test]
fn randomized_fault_schedules_lose_no_acknowledged_write() -> Result<()> {
    let schedules = env_u64("SNS_FAULT_SCHEDULES").unwrap_or(3);
    anyhow::ensure!(!only(&FAULTS).is_empty(), "SNS_FAULT_ONLY names no fault of {FAULTS:?}");
    let steps = env_u64("SNS_FAULT_STEPS").unwrap_or(6);
    let seed = env_u64("SNS_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    eprintln!("fault schedules: {schedules} x {steps} steps, seed {seed} (replay: SNS_FAULT_SEED={seed})");
    let mut totals = Totals::default();
    for i in 0..schedules {
        let s = seed.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        run_schedule(s, steps, &mut totals).with_context(|| {
            format!("schedule {i} failed (seed {s}); replay it with SNS_FAULT_SEED={seed} SNS_FAULT_STEPS={steps}")
        })?;
        totals.schedules += 1;
    }
    let faults: u64 = totals.faults.values().sum();
    eprintln!("fault schedules: the replayers {:?}", totals.replayed);
    eprintln!(
        "fault schedules passed: {} schedules, {faults} faults {:?}; checked {} acknowledged posts, {} follow/unfollow ({} final relations), {} logins, {} reads; writers' clocks {:?}; {} journal compactions",
        totals.schedules,
        totals.faults,
        totals.posts,
        totals.relation_ops,
        totals.checked_relations,
        totals.logins,
        totals.lists,
        totals.clocks,
        totals.compactions
    );
    Ok(())
}

/// The last acknowledged state of each (follower, followee) pair, and the
/// answers that contradict it.
#[derive(Debug, Default)]
struct Relations {
    state: BTreeMap<(u32, u32), Option<bool>>,
    ops: usize,
    violations: Vec<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    /// Stops the timeline watcher, which outlives the writers: it must get
    /// their last posts.
    stop_watch: Arc<AtomicBool>,
    watched: Arc<Mutex<Vec<String>>>,
    watch: tokio::task::JoinHandle<Vec<String>>,
    /// Acknowledged posts per writer, as they happen.
    progress: BTreeMap<u32, Arc<AtomicUsize>>,
    writers: Vec<tokio::task::JoinHandle<WriterReport>>,
    churn: tokio::task::JoinHandle<Relations>,
    logins: tokio::task::JoinHandle<Vec<u32>>,
    reads: tokio::task::JoinHandle<Reads>,
}

/// The user whose timeline the watcher holds: it follows the other writers.
const WATCHED: u32 = WRITERS[0];

/// Holds [`WATCHED`]'s timeline as `tsc` does across failovers, and
/// reopens it every 0.3–1.5 s besides (and after every break, or a call
/// that hangs: a paused server), each time on the server the coordinator
/// names, resuming after the last post it got, or after where the stream
/// said its live posts start when none came (its feed position and
/// anchor). Each post's text goes into `got` in arrival order; the
/// returned violations are streams that did not start where asked, and
/// posts that did not come at the position right after the previous one
/// (one skipped, or one sent twice).
async fn watch(
    port: u16,
    stop: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<String>>>,
    opened: Arc<AtomicBool>,
    deadline: Instant,
) -> Vec<String> {
    use tokio_stream::wrappers::UnboundedReceiverStream;
    let mut violations = Vec::new();
    let (mut position, mut anchor) = (0u64, 0u64);
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        round += 1;
        let call = Duration::from_secs(2);
        let Ok(Ok(mut sns)) = tokio::time::timeout(call, load::attach(port, WATCHED)).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let opening = sns_proto::csce438::Message {
            username: WATCHED.to_string(),
            feed_position: position,
            feed_anchor: anchor,
            ..Default::default()
        };
        let _ = tx.send(opening);
        let Ok(Ok(response)) = tokio::time::timeout(call, sns.timeline(UnboundedReceiverStream::new(rx))).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        opened.store(true, Ordering::SeqCst);
        match sns_proto::rules::feed_start(response.metadata()) {
            Some(start) if start == (position, anchor) || (position, anchor) == (0, 0) => (position, anchor) = start,
            other => violations
                .push(format!("asked to resume after ({position}, {anchor}), the stream started at {other:?}")),
        }
        let mut inbound = response.into_inner();
        let until = Instant::now() + Duration::from_millis(300 + round * 397 % 1200);
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            match tokio::time::timeout(Duration::from_millis(100), inbound.message()).await {
                Err(_) => {}
                Ok(Ok(Some(m))) if !m.msg.is_empty() => {
                    if m.feed_position != position + 1 {
                        violations.push(format!(
                            "{:?} came at feed position {} right after position {position}",
                            m.msg, m.feed_position
                        ));
                    }
                    (position, anchor) = (m.feed_position, m.feed_anchor);
                    got.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(m.msg);
                }
                Ok(Ok(Some(_))) => {}
                // Broken (a failover, a server that stopped serving): reopen.
                Ok(_) => break,
            }
        }
    }
    violations
}

/// What the reader saw that contradicts acknowledged writes.
#[derive(Debug, Default)]
struct Reads {
    lists: usize,
    violations: Vec<String>,
}

/// What a writer's clock may be off by, in seconds (None: it sends no
/// time): the time a post carries must never decide who sees it.
const CLOCKS: [Option<i64>; 5] = [None, Some(-86_400), Some(-30), Some(30), Some(86_400)];

/// Starts the writers (each with its client clock: see [`CLOCKS`]), the
/// follow churn, the logins and the reader.
fn start_load(rt: &Runtime, d: &Deployment, clocks: [Option<i64>; 3]) -> Result<Load> {
    let port = d.coord_port;
    let deadline = Instant::now() + Duration::from_secs(600);
    rt.block_on(async {
        for u in WRITERS.iter().chain(&CHURNERS).chain(&TARGETS) {
            load::attach(port, *u).await?;
        }
        for &u in &WRITERS {
            for &t in WRITERS.iter().filter(|t| **t != u) {
                let mut msg = String::new();
                // The followee may not have reached u's cluster yet.
                while msg != "SUCCESS" && Instant::now() < deadline {
                    msg = load::command(port, u, true, t, deadline).await?;
                }
            }
        }
        // A post reaches a follower only if the follow reached the author's
        // cluster first.
        for &u in &WRITERS {
            let others: Vec<u32> = WRITERS.iter().copied().filter(|f| *f != u).collect();
            load::wait_followers(port, u, &others, deadline).await?;
        }
        anyhow::Ok(())
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    // The watcher's first stream is open before any post is made: its
    // positions start at 1.
    let (stop_watch, watched, opened) = (Arc::default(), Arc::<Mutex<Vec<String>>>::default(), Arc::default());
    let watch = rt.spawn(watch(port, Arc::clone(&stop_watch), Arc::clone(&watched), Arc::clone(&opened), deadline));
    rt.block_on(async {
        while !opened.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut progress = BTreeMap::new();
    let mut writers = Vec::new();
    for (&u, clock) in WRITERS.iter().zip(clocks) {
        let counter = Arc::new(AtomicUsize::new(0));
        progress.insert(u, counter.clone());
        let w = Writer {
            coord_port: port,
            user: u,
            stop: stop.clone(),
            max: 1_000_000,
            deadline,
            progress: counter,
            pad: 0,
            // A steady load that keeps the files of a long run small.
            pace: Duration::from_millis(5),
            clock,
        };
        writers.push(rt.spawn(w.run()));
    }
    let churn = rt.spawn(churn(port, stop.clone(), deadline));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let logins = rt.spawn(logins(port, stop.clone(), deadline, acked.clone()));
    let reads = rt.spawn(reads(port, stop.clone(), deadline, acked));
    Ok(Load { stop, stop_watch, watched, watch, progress, writers, churn, logins, reads })
}

/// Follows and unfollows users of other clusters, one answered operation
/// at a time, checking each answer against the acknowledged past.
async fn churn(port: u16, stop: Arc<AtomicBool>, deadline: Instant) -> Relations {
    let mut r = Relations::default();
    let mut round = 0usize;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let follower = CHURNERS[round % CHURNERS.len()];
        let followee = TARGETS[(round / CHURNERS.len()) % TARGETS.len()];
        round += 1;
        let known = r.state.get(&(follower, followee)).copied().flatten();
        let follow = !known.unwrap_or(false);
        // Each attempt keeps one request id: a retry answers as the first.
        let answer = load::command(port, follower, follow, followee, Instant::now() + Duration::from_secs(20)).await;
        r.ops += 1;
        let now = match answer.as_deref() {
            Ok("SUCCESS") => Some(follow),
            Ok("FAILURE_ALREADY_EXISTS") if follow => {
                if known == Some(false) {
                    r.violations.push(format!(
                        "{follower} -> {followee}: follow answered already-exists after an acknowledged unfollow"
                    ));
                }
                Some(true)
            }
            Ok("FAILURE_NOT_A_FOLLOWER") if !follow => {
                if known == Some(true) {
                    r.violations.push(format!(
                        "{follower} -> {followee}: unfollow answered not-a-follower after an acknowledged follow"
                    ));
                }
                Some(false)
            }
            // The followee may not have reached the follower's cluster yet.
            Ok("FAILURE_INVALID_USERNAME") => known,
            Ok(other) => {
                r.violations.push(format!("{follower} -> {followee}: unexpected answer {other}"));
                known
            }
            // No answer within the deadline: it may or may not have happened.
            Err(_) => None,
        };
        r.state.insert((follower, followee), now);
    }
    r
}

/// Logs in new users, one at a time; returns those acknowledged.
async fn logins(port: u16, stop: Arc<AtomicBool>, deadline: Instant, shared: Arc<Mutex<Vec<u32>>>) -> Vec<u32> {
    let mut acked = Vec::new();
    let mut next = 10u32;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if load::attach(port, next).await.is_ok() {
            acked.push(next);
            shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(next);
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acked
}

/// Reads while the faults strike: LIST in each cluster in turn, as that
/// cluster's writer. An answer must show every login of that cluster
/// acknowledged before the LIST was sent (no stale read, whichever server
/// answers after a failover), and every user an earlier answer in that
/// cluster showed (users are never removed: no read goes back in time). A
/// refused or unanswered LIST says nothing.
async fn reads(port: u16, stop: Arc<AtomicBool>, deadline: Instant, logins: Arc<Mutex<Vec<u32>>>) -> Reads {
    let mut r = Reads::default();
    let mut seen: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    let mut round = 0u32;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        let c = round % CLUSTERS + 1;
        round += 1;
        let before: Vec<u32> = logins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .copied()
            .filter(|&u| sns_node::ids::cluster_of(u, CLUSTERS) == c)
            .collect();
        if let Ok((users, _)) = load::list(port, WRITERS[c as usize - 1]).await {
            r.lists += 1;
            let users: BTreeSet<u32> = users.iter().filter_map(|u| u.parse().ok()).collect();
            let missing: Vec<u32> = before.iter().copied().filter(|u| !users.contains(u)).collect();
            if !missing.is_empty() {
                r.violations.push(format!("LIST in cluster {c} lacks logins acknowledged before it: {missing:?}"));
            }
            let earlier = seen.entry(c).or_default();
            let gone: Vec<u32> = earlier.difference(&users).copied().collect();
            if !gone.is_empty() {
                r.violations.push(format!("LIST in cluster {c} lacks users an earlier LIST there showed: {gone:?}"));
            }
            *earlier = users;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r
}

/// Server ids of `cluster`: (master, slave), per the coordinator.
/// A planned switchover of cluster `c` to server `to`, which must succeed
/// (the schedule heals between faults, so the slave is in sync).
fn switchover(d: &mut Deployment, c: u32, to: u32) -> Result<()> {
    let reply = d.command(&format!("switchover {c} server-{c}-{to}"))?;
    anyhow::ensure!(
        reply.starts_with(&format!("switched over: cluster {c}: server {to} is master")),
        "switchover of cluster {c}: {reply}"
    );
    Ok(())
}

fn roles(rt: &Runtime, d: &Deployment, cluster: u32) -> Option<(u32, u32)> {
    let (m, _) = rt.block_on(master_of(d.coord_port, cluster))?;
    Some((m, 3 - m))
}

/// Whether every cluster has a master serving and a slave recorded in sync
/// and synced under its term.
fn healthy(rt: &Runtime, d: &Deployment) -> Option<()> {
    rt.block_on(async {
        let nodes = table(d.coord_port).await.ok()?;
        for c in 1..=CLUSTERS {
            let servers: Vec<_> = nodes.iter().filter(|n| n.kind == "server" && n.cluster == c).collect();
            let master = servers.iter().find(|n| n.is_master && n.alive)?;
            let slave = servers.iter().find(|n| n.id != master.id && n.alive && n.in_sync)?;
            let (ms, ss) = (status(master).await.ok()?, status(slave).await.ok()?);
            if !(ms.is_master && ms.lease_valid && ss.synced_term == ms.term && ms.in_sync.len() == 2) {
                return None;
            }
        }
        let syncs = nodes.iter().filter(|n| n.kind == "synchronizer" && n.alive).count();
        (syncs == (CLUSTERS * 2) as usize).then_some(())
    })
}

fn wait_healthy(rt: &Runtime, d: &Deployment) -> Result<()> {
    eventually_within("every cluster to have a master and an in-sync slave again", HEAL, || healthy(rt, d))
}

/// Kills cluster `c`'s master `m` while a fault holds, and waits until its
/// slave `s` took over and the cluster's writer made a few more posts.
fn master_killed_meanwhile(
    rng: &mut Rng,
    rt: &Runtime,
    d: &mut Deployment,
    load: &Load,
    c: u32,
    (m, s): (u32, u32),
) -> Result<()> {
    cmd(d, &format!("kill server-{c}-{m}"))?;
    wait_master_is(rt, d, c, s)?;
    progress(load, WRITERS[c as usize - 1], 1 + rng.below(10) as usize)
}

/// Waits until writer `user` made `n` more acknowledged posts.
fn progress(load: &Load, user: u32, n: usize) -> Result<()> {
    let counter = &load.progress[&user];
    let target = counter.load(Ordering::SeqCst) + n;
    eventually_within(&format!("writer {user} to make {n} more posts"), HEAL, || {
        (counter.load(Ordering::SeqCst) >= target).then_some(())
    })
}

fn wait_master_is(rt: &Runtime, d: &Deployment, cluster: u32, id: u32) -> Result<()> {
    eventually_within(&format!("server {cluster}/{id} to be master"), HEAL, || {
        (roles(rt, d, cluster)?.0 == id).then_some(())
    })
}

fn cmd(d: &mut Deployment, line: &str) -> Result<()> {
    let reply = d.command(line)?;
    if reply.starts_with("error:") {
        bail!("{line}: {reply}");
    }
    Ok(())
}

/// Applies one fault and ends it, one time in three with a second fault
/// (a [`Background`]) held for its whole length; returns their names for the
/// totals. After a step that did not wait for the deployment to heal
/// (`rested` false), only a fault of [`RESTLESS`] strikes.
fn inject(
    rng: &mut Rng,
    rt: &Runtime,
    d: &mut Deployment,
    load: &Load,
    disks: Disks,
    broker: &StandIn,
    rested: bool,
) -> Result<Vec<String>> {
    let c = rng.cluster();
    let (all, restless) = (only(&FAULTS), only(&RESTLESS));
    // With none of the faults that may strike early left, the step waits.
    if !rested && restless.is_empty() {
        wait_healthy(rt, d)?;
    }
    let rested = rested || restless.is_empty();
    let fault = if rested {
        all[rng.below(all.len() as u64) as usize]
    } else {
        restless[rng.below(restless.len() as u64) as usize]
    };
    // The clusters this fault leaves alone (a disk fault strikes where the
    // disk is, and waits for that cluster's writer).
    let elsewhere = match fault {
        Fault::DiskFull => disks.full.map(|(dc, _)| dc),
        Fault::DiskHung => disks.hung.map(|(hc, _)| hc),
        _ => None,
    };
    let (kinds, always) = backgrounds();
    let kind = kinds[rng.below(kinds.len() as u64) as usize];
    // (A silent broker may wait for its cluster's master's synchronizer
    // to drop its link: a background fault must not have killed or
    // paused it.)
    let syncs = |f: Fault| {
        matches!(
            f,
            Fault::KillSynchronizer
                | Fault::PauseSynchronizer
                | Fault::RestartBroker
                | Fault::LostMessages
                | Fault::SilentBroker
        )
    };
    let candidates: Vec<u32> = match kind {
        // One broker, stopped once at a time, silenced once at a time.
        // (The lost messages are purged on the broker itself.)
        // (A lost message must first be confirmed, which a broker out of
        // disk never does.)
        Background::StopBroker | Background::BrokerOutOfDisk
            if matches!(fault, Fault::RestartBroker | Fault::LostMessages) =>
        {
            vec![]
        }
        // The lost messages come from another cluster, whose master may be
        // killed: a server of its own killed or paused would stand in the
        // way of the promotion the step waits for (seed
        // 1796064334374409259 paused that slave).
        Background::KillMaster | Background::PauseMaster | Background::KillSlave | Background::PauseSlave
            if fault == Fault::LostMessages =>
        {
            vec![]
        }
        Background::SilenceBroker if fault == Fault::SilentBroker => vec![],
        // Synchronizers acknowledge nothing: the fault's own cluster's may
        // be disturbed too, unless the fault disturbs them itself.
        Background::KillSynchronizer | Background::PauseSynchronizer => {
            (1..=CLUSTERS).filter(|&b| b != c || !syncs(fault)).collect()
        }
        _ => (1..=CLUSTERS).filter(|&b| b != c && Some(b) != elsewhere).collect(),
    };
    let held = match candidates.len() {
        0 => None,
        n if rng.below(3) == 0 || always => {
            let b = candidates[rng.below(n as u64) as usize];
            Some(hold(kind, b == c, rng, rt, d, b, broker)?)
        }
        _ => None,
    };
    let name = strike(fault, c, rng, rt, d, load, disks, broker)?;
    let mut names = vec![if rested { name } else { format!("{name} (before the last fault healed)") }];
    if let Some(h) = held {
        match h.undo {
            Undo::Nothing => {}
            Undo::Command(line) => cmd(d, &line)?,
            Undo::Broker(stopped) => stopped.start()?,
            Undo::Alarm(alarm) => alarm.clear()?,
            Undo::Restore => broker.restore(),
        }
        names.push(h.name);
    }
    Ok(names)
}

/// Begins a fault of `kind` in cluster `b` (`same`: the cluster of the
/// step's own fault), to be ended by what it returns.
fn hold(
    kind: Background,
    same: bool,
    rng: &mut Rng,
    rt: &Runtime,
    d: &mut Deployment,
    b: u32,
    broker: &StandIn,
) -> Result<Held> {
    let (m, s) = roles(rt, d, b).ok_or_else(|| anyhow!("cluster {b} has no master before the fault"))?;
    let which = if rng.below(2) == 0 { m } else { s };
    if matches!(kind, Background::StopBroker | Background::BrokerOutOfDisk) {
        let stop = matches!(kind, Background::StopBroker);
        let what = if stop { "broker stopped" } else { "broker out of disk" };
        if !sns_e2e::broker::local() {
            let name = format!("meanwhile: {what} (left out: AMQP_URL names a remote broker)");
            return Ok(Held { name, undo: Undo::Nothing });
        }
        let undo = if stop { Undo::Broker(StoppedBroker::stop()?) } else { Undo::Alarm(DiskAlarm::raise()?) };
        return Ok(Held { name: format!("meanwhile: {what}"), undo });
    }
    if let Background::SilenceBroker = kind {
        broker.silence();
        return Ok(Held { name: "meanwhile: broker cut off without a reset".into(), undo: Undo::Restore });
    }
    let (stop, go, target, what) = match kind {
        Background::KillMaster => ("kill", "start", format!("server-{b}-{m}"), "master killed"),
        Background::PauseMaster => ("pause", "resume", format!("server-{b}-{m}"), "master paused"),
        Background::KillSlave => ("kill", "start", format!("server-{b}-{s}"), "slave killed"),
        Background::PauseSlave => ("pause", "resume", format!("server-{b}-{s}"), "slave paused"),
        Background::KillSynchronizer => ("kill", "start", format!("sync-{b}-{which}"), "synchronizer killed"),
        Background::PauseSynchronizer => ("pause", "resume", format!("sync-{b}-{which}"), "synchronizer paused"),
        Background::StopBroker | Background::SilenceBroker | Background::BrokerOutOfDisk => {
            unreachable!("handled above")
        }
    };
    cmd(d, &format!("{stop} {target}"))?;
    let place = if same { "the same" } else { "another" };
    Ok(Held { name: format!("meanwhile in {place} cluster: {what}"), undo: Undo::Command(format!("{go} {target}")) })
}

/// Applies `fault` to cluster `c` and ends it; returns its name.
#[allow(clippy::too_many_arguments, reason = "the schedule's whole context")]
fn strike(
    fault: Fault,
    c: u32,
    rng: &mut Rng,
    rt: &Runtime,
    d: &mut Deployment,
    load: &Load,
    disks: Disks,
    broker: &StandIn,
) -> Result<String> {
    let writer = WRITERS[c as usize - 1];
    let (m, s) = roles(rt, d, c).ok_or_else(|| anyhow!("cluster {c} has no master before the fault"))?;
    let name = match fault {
        Fault::KillMaster => {
            cmd(d, &format!("kill server-{c}-{m}"))?;
            progress(load, writer, 1 + rng.below(30) as usize)?;
            cmd(d, &format!("start server-{c}-{m}"))?;
            "kill master"
        }
        Fault::RestartMaster => {
            cmd(d, &format!("kill server-{c}-{m}"))?;
            cmd(d, &format!("start server-{c}-{m}"))?;
            progress(load, writer, 1 + rng.below(10) as usize)?;
            "restart master at once"
        }
        Fault::KillSlave => {
            cmd(d, &format!("kill server-{c}-{s}"))?;
            progress(load, writer, 1 + rng.below(30) as usize)?;
            cmd(d, &format!("start server-{c}-{s}"))?;
            "kill slave"
        }
        Fault::DoubleKill => {
            cmd(d, &format!("kill server-{c}-{m}"))?;
            wait_master_is(rt, d, c, s)?;
            // The new master writes alone: the old one falls out of sync.
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("kill server-{c}-{s}"))?;
            if rng.below(2) == 0 {
                // The worst order: the stale server first. It must not be
                // promoted; the coordinator says why.
                cmd(d, &format!("start server-{c}-{m}"))?;
                let reason = eventually_within("the cluster to wait for its in-sync server", HEAL, || {
                    let live = rt.block_on(server_node(d.coord_port, c, m)).is_some_and(|n| n.alive);
                    let info = rt.block_on(get_server(d.coord_port, writer)).ok()?;
                    (live && !info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
                })?;
                if rt.block_on(master_of(d.coord_port, c)).is_some() {
                    bail!("cluster {c} has a master while it says: {reason}");
                }
                cmd(d, &format!("start server-{c}-{s}"))?;
                "double fault, stale server back first"
            } else {
                cmd(d, &format!("start server-{c}-{s}"))?;
                cmd(d, &format!("start server-{c}-{m}"))?;
                "double fault"
            }
        }
        Fault::PauseMaster => {
            cmd(d, &format!("pause server-{c}-{m}"))?;
            if rng.below(2) == 0 {
                // Long enough to be replaced.
                wait_master_is(rt, d, c, s)?;
            } else {
                // A stall shorter than the lease.
                std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
            }
            cmd(d, &format!("resume server-{c}-{m}"))?;
            "pause master"
        }
        Fault::PauseSlave => {
            cmd(d, &format!("pause server-{c}-{s}"))?;
            // The master must go on without it.
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("resume server-{c}-{s}"))?;
            "pause slave"
        }
        Fault::PartitionMaster => {
            cmd(d, &format!("partition server-{c}-{m}"))?;
            wait_master_is(rt, d, c, s)?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("heal server-{c}-{m}"))?;
            "partition master from coordinator"
        }
        Fault::PartitionSlave => {
            let slave = rt
                .block_on(server_node(d.coord_port, c, s))
                .ok_or_else(|| anyhow!("server {c}/{s} is not in the routing table"))?;
            cmd(d, &format!("partition server-{c}-{s}"))?;
            eventually_within(&format!("the coordinator to give up slave {c}/{s}"), HEAL, || {
                rt.block_on(server_node(d.coord_port, c, s)).filter(|n| !n.alive).map(|_| ())
            })?;
            // Acknowledged without the slave: recorded out of sync first.
            progress(load, writer, 1 + rng.below(20) as usize)?;
            eventually_within(&format!("slave {c}/{s} to be recorded out of sync"), HEAL, || {
                rt.block_on(server_node(d.coord_port, c, s)).filter(|n| !n.in_sync).map(|_| ())
            })?;
            if rng.below(2) == 0 {
                cmd(d, &format!("heal server-{c}-{s}"))?;
                "partition slave from coordinator"
            } else {
                cmd(d, &format!("kill server-{c}-{m}"))?;
                cmd(d, &format!("heal server-{c}-{s}"))?;
                // Back, live, and still a slave once the coordinator has
                // given up on the old master: it lacks acknowledged writes.
                let why = eventually_within(&format!("cluster {c} to wait for its old master"), HEAL, || {
                    let info = rt.block_on(get_server(d.coord_port, c)).ok()?;
                    info.unavailable_reason
                        .contains("no live server holding every acknowledged write")
                        .then_some(info.unavailable_reason)
                })?;
                let st = rt.block_on(status(&slave))?;
                if st.is_master {
                    bail!("slave {c}/{s}, recorded out of sync, was promoted ({why})");
                }
                cmd(d, &format!("start server-{c}-{m}"))?;
                wait_master_is(rt, d, c, m)?;
                "partition slave from coordinator, master killed, slave healed first"
            }
        }
        Fault::KillSynchronizer | Fault::PauseSynchronizer => {
            let (stop, go, name) = if fault == Fault::KillSynchronizer {
                ("kill", "start", "kill synchronizer")
            } else {
                ("pause", "resume", "pause synchronizer")
            };
            let which = if rng.below(2) == 0 { m } else { s };
            cmd(d, &format!("{stop} sync-{c}-{which}"))?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("{go} sync-{c}-{which}"))?;
            name
        }
        Fault::RestartCoordinator => {
            cmd(d, "restart coordinator")?;
            "restart coordinator"
        }
        Fault::PauseCoordinator => {
            // Nobody renews a lease or changes a role while the coordinator
            // hangs. Once it answers again, with every node's last heartbeat
            // long past, it must promote nobody who misses a write.
            let master = rt
                .block_on(server_node(d.coord_port, c, m))
                .ok_or_else(|| anyhow!("server {c}/{m} is not in the routing table"))?;
            cmd(d, "pause coordinator")?;
            let mode = rng.below(3);
            if mode == 0 {
                // A stall shorter than the lease.
                std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
            } else {
                eventually_within(&format!("master {c}/{m}'s lease to run out"), HEAL, || {
                    let st = rt.block_on(status(&master)).ok()?;
                    (!st.lease_valid).then_some(())
                })?;
            }
            if mode == 2 {
                cmd(d, &format!("kill server-{c}-{m}"))?;
            }
            cmd(d, "resume coordinator")?;
            match mode {
                0 => "pause coordinator",
                1 => "pause coordinator past the lease",
                _ => {
                    wait_master_is(rt, d, c, s)?;
                    cmd(d, &format!("start server-{c}-{m}"))?;
                    "pause coordinator past the lease, master killed"
                }
            }
        }
        Fault::SkewedClock => {
            let offset = ["-1d", "+1d", "-30s", "+30s"][rng.below(4) as usize];
            let (name, what) = match rng.below(3) {
                0 => ("coordinator".to_string(), "coordinator"),
                1 => (format!("server-{c}-{m}"), "master"),
                _ => (format!("server-{c}-{s}"), "slave"),
            };
            let reply = d.command_reply(&format!("restart {name} --clock {offset}"))?;
            if reply.contains("needs libfaketime") {
                return Ok("skewed clock (left out: no libfaketime)".into());
            }
            anyhow::ensure!(reply.contains("on a clock"), "restart {name} --clock {offset}: {reply}");
            progress(load, writer, 1 + rng.below(20) as usize)?;
            return Ok(format!("{what} restarted on a clock {offset} off"));
        }
        Fault::CutMasterFromSlave => {
            let reply = d.command_reply(&format!("partition server-{c}-{m} server-{c}-{s}"))?;
            if reply.contains("needs nftables and root") {
                return Ok("cut master from slave (left out: no nftables or not root)".into());
            }
            anyhow::ensure!(reply.starts_with("partitioned"), "partition server-{c}-{m} server-{c}-{s}: {reply}");
            // The writer goes on, so the slave falls out of sync.
            eventually_within(&format!("server {c}/{s} recorded out of sync"), HEAL, || {
                rt.block_on(server_node(d.coord_port, c, s)).filter(|n| !n.in_sync).map(|_| ())
            })?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            let mode = rng.below(3);
            if mode > 0 {
                if mode == 1 {
                    cmd(d, &format!("kill server-{c}-{m}"))?;
                } else {
                    cmd(d, &format!("partition server-{c}-{m}"))?;
                }
                // Nobody may serve: the master is gone (or cannot renew its
                // lease) and the slave lacks acknowledged writes.
                let reason = eventually_within("the cluster to wait for its in-sync server", HEAL, || {
                    let info = rt.block_on(get_server(d.coord_port, writer)).ok()?;
                    (!info.unavailable_reason.is_empty()).then_some(info.unavailable_reason)
                })?;
                if let Some((id, _)) = rt.block_on(master_of(d.coord_port, c)) {
                    bail!("cluster {c} has master {id} while it says: {reason}");
                }
                cmd(d, &format!("{} server-{c}-{m}", if mode == 1 { "start" } else { "heal" }))?;
                wait_master_is(rt, d, c, m)?;
                progress(load, writer, 1 + rng.below(10) as usize)?;
            }
            cmd(d, &format!("heal server-{c}-{m} server-{c}-{s}"))?;
            match mode {
                0 => "cut master from slave",
                1 => "cut master from slave, master killed",
                _ => "cut master from slave, then from the coordinator",
            }
        }
        Fault::RestartBroker => {
            if !sns_e2e::broker::local() {
                return Ok("broker restart (left out: AMQP_URL names a remote broker)".into());
            }
            let broker = StoppedBroker::stop()?;
            // Servers do not need the broker to acknowledge writes.
            progress(load, writer, 1 + rng.below(20) as usize)?;
            let mode = rng.below(3);
            match mode {
                1 => master_killed_meanwhile(rng, rt, d, load, c, (m, s))?,
                2 => {
                    cmd(d, &format!("kill sync-{c}-{m}"))?;
                    progress(load, writer, 1 + rng.below(10) as usize)?;
                }
                _ => {}
            }
            broker.start()?;
            match mode {
                1 => {
                    cmd(d, &format!("start server-{c}-{m}"))?;
                    "broker restart, master killed meanwhile"
                }
                2 => {
                    cmd(d, &format!("start sync-{c}-{m}"))?;
                    "broker restart, master's synchronizer killed meanwhile"
                }
                _ => "broker restart",
            }
        }
        Fault::LostMessages => {
            for id in [1, 2] {
                cmd(d, &format!("kill sync-{c}-{id}"))?;
            }
            // Another cluster's posts wait in this cluster's queue, confirmed
            // (or on their way), and the broker loses what is there.
            let others: Vec<u32> = (1..=CLUSTERS).filter(|&o| o != c).collect();
            let o = others[rng.below(others.len() as u64) as usize];
            progress(load, WRITERS[o as usize - 1], 1 + rng.below(20) as usize)?;
            let lost = rt.block_on(async {
                let broker = Broker::connect(&d.name).await?;
                let n = broker.purge(c).await?;
                broker.close().await?;
                anyhow::Ok(n)
            })?;
            eprintln!("fault schedules: the broker lost {lost} messages to cluster {c}");
            let killed = rng.below(2) == 1;
            if killed {
                let (om, os) = roles(rt, d, o).ok_or_else(|| anyhow!("cluster {o} has no master"))?;
                master_killed_meanwhile(rng, rt, d, load, o, (om, os))?;
                cmd(d, &format!("start server-{o}-{om}"))?;
            }
            for id in [1, 2] {
                cmd(d, &format!("start sync-{c}-{id}"))?;
            }
            if killed { "broker lost messages, their origin's master killed meanwhile" } else { "broker lost messages" }
        }
        Fault::SilentBroker => {
            let sync = format!("sync-{c}-{m}");
            let downs = d.log(&sync).matches("synchronizer link down").count();
            broker.silence();
            // Servers do not need the broker to acknowledge writes.
            progress(load, writer, 1 + rng.below(20) as usize)?;
            let mode = rng.below(3);
            match mode {
                1 => master_killed_meanwhile(rng, rt, d, load, c, (m, s))?,
                2 => {
                    eventually_within(&format!("{sync} to drop its silent broker link"), HEAL, || {
                        (d.log(&sync).matches("synchronizer link down").count() > downs).then_some(())
                    })?;
                }
                _ => {}
            }
            broker.restore();
            match mode {
                1 => {
                    cmd(d, &format!("start server-{c}-{m}"))?;
                    "broker cut off without a reset, master killed meanwhile"
                }
                2 => "broker cut off without a reset until a synchronizer dropped its link",
                _ => "broker cut off without a reset",
            }
        }
        Fault::DiskFull => {
            let Some((dc, ds)) = disks.full else { return Ok("full disk (left out: no tmpfs)".into()) };
            let dir = d.server_dir(dc, ds);
            let (dm, _) = roles(rt, d, dc).ok_or_else(|| anyhow!("cluster {dc} has no master"))?;
            disk::fill(&dir)?;
            if dm == ds {
                // The full master steps down; its slave takes over.
                wait_master_is(rt, d, dc, 3 - ds)?;
            } else {
                progress(load, WRITERS[dc as usize - 1], 1 + rng.below(20) as usize)?;
            }
            disk::unfill(&dir)?;
            if dm == ds { "full disk on a master" } else { "full disk on a slave" }
        }
        Fault::CoordinatorDiskFull => {
            if disks.coordinator == CoordinatorDisk::Plain {
                return Ok("coordinator disk full (left out: no tmpfs)".into());
            }
            let dir = d.coordinator_dir();
            disk::fill(&dir)?;
            let mode = rng.below(5);
            let full = (|| {
                if mode == 4 {
                    // A switchover it cannot record: abandoned, saying
                    // so, and the master (which stepped down for it)
                    // serves again, the disk still full.
                    let reply = d.command_reply(&format!("switchover {c} server-{c}-{s}"))?;
                    anyhow::ensure!(reply.starts_with("error:"), "a switchover the coordinator cannot record: {reply}");
                    wait_master_is(rt, d, c, m)?;
                    return progress(load, writer, 1 + rng.below(20) as usize);
                }
                if mode == 2 || mode == 3 {
                    // Restarted on the full disk, it routes all the same.
                    let term = rt.block_on(master_of(d.coord_port, c)).map(|(_, t)| t);
                    cmd(d, "restart coordinator")?;
                    eventually_within("the coordinator restarted on a full disk to route to the master", HEAL, || {
                        (rt.block_on(master_of(d.coord_port, c)).map(|(id, t)| (id, Some(t))) == Some((m, term)))
                            .then_some(())
                    })?;
                }
                if mode == 3 {
                    // Again, a day behind: its epoch falls below the run
                    // the nodes obey (whose epoch it could not write
                    // down); they must obey it all the same.
                    let reply = d.command_reply("restart coordinator --clock -1d")?;
                    if reply.contains("needs libfaketime") {
                        return progress(load, writer, 1 + rng.below(20) as usize);
                    }
                    anyhow::ensure!(reply.contains("on a clock"), "restart coordinator --clock -1d: {reply}");
                    let what = "the coordinator restarted a day behind";
                    wait_lease_from_current_run(rt, d, (c, m), what, HEAL)?;
                }
                if mode == 0 || mode == 3 {
                    return progress(load, writer, 1 + rng.below(20) as usize);
                }
                // (This cluster's refusals: another's may be refused too.)
                let refusals = |d: &Deployment| {
                    let cluster = format!("cluster={c} ");
                    let log = d.log("coordinator");
                    log.lines()
                        .filter(|l| l.contains("cannot write the coordinator's records") && l.contains(&cluster))
                        .count()
                };
                let before = refusals(d);
                cmd(d, &format!("kill server-{c}-{m}"))?;
                eventually_within("the coordinator to say it cannot record a promotion", HEAL, || {
                    (refusals(d) > before).then_some(())
                })?;
                let slave = rt
                    .block_on(server_node(d.coord_port, c, s))
                    .ok_or_else(|| anyhow!("server {c}/{s} is not in the routing table"))?;
                let st = rt.block_on(status(&slave))?;
                if st.is_master || rt.block_on(master_of(d.coord_port, c)).is_some() {
                    bail!("cluster {c} got a master the coordinator could not record: {st:?}");
                }
                Ok(())
            })();
            disk::unfill(&dir)?;
            full?;
            match mode {
                0 => "coordinator disk full",
                3 => "coordinator restarted on a full disk, then a day behind",
                4 => "coordinator disk full, switchover asked",
                _ => {
                    wait_master_is(rt, d, c, s)?;
                    cmd(d, &format!("start server-{c}-{m}"))?;
                    if mode == 1 {
                        "coordinator disk full, master killed"
                    } else {
                        "coordinator restarted on a full disk, master killed"
                    }
                }
            }
        }
        Fault::CoordinatorDiskHung => {
            if disks.coordinator != CoordinatorDisk::Freezable {
                return Ok("coordinator disk hung (left out: no loop mount)".into());
            }
            let stalls = |d: &Deployment| d.log("coordinator").matches("has not finished").count();
            let stalled = stalls(d);
            let master_dies = rng.below(2) == 0;
            d.freeze_coordinator()?;
            let hung = (|| {
                let victim = if master_dies { m } else { s };
                cmd(d, &format!("kill server-{c}-{victim}"))?;
                eventually_within("the coordinator to say its records write hangs", HEAL, || {
                    (stalls(d) > stalled).then_some(())
                })?;
                if master_dies {
                    // The write that hangs may be another cluster's change,
                    // with this cluster's promotion queued behind it: give
                    // a wrong promotion two seconds (four leases) from the
                    // master's death to show.
                    eventually_within(&format!("the coordinator to see master {c}/{m} dead"), HEAL, || {
                        rt.block_on(server_node(d.coord_port, c, m)).filter(|n| !n.alive).map(|_| ())
                    })?;
                    let dead = Instant::now();
                    let slave = rt
                        .block_on(server_node(d.coord_port, c, s))
                        .ok_or_else(|| anyhow!("server {c}/{s} is not in the routing table"))?;
                    eventually_within("two seconds without a promotion", HEAL, || {
                        let st = rt.block_on(status(&slave)).ok()?;
                        if st.is_master || rt.block_on(master_of(d.coord_port, c)).is_some() {
                            return Some(Err(anyhow!(
                                "cluster {c} got a master the coordinator could not record: {st:?}"
                            )));
                        }
                        (dead.elapsed() > Duration::from_secs(2)).then_some(Ok(()))
                    })??;
                    // Clients hear why, whichever cluster's write hangs.
                    let why = rt.block_on(get_server(d.coord_port, c))?.unavailable_reason;
                    if !why.contains("has not finished") {
                        bail!("cluster {c} without a master while the coordinator's disk hangs says: {why:?}");
                    }
                }
                anyhow::Ok(())
            })();
            d.thaw_coordinator()?;
            hung?;
            if master_dies {
                wait_master_is(rt, d, c, s)?;
                cmd(d, &format!("start server-{c}-{m}"))?;
                "coordinator disk hung, master killed"
            } else {
                cmd(d, &format!("start server-{c}-{s}"))?;
                "coordinator disk hung, slave killed"
            }
        }
        Fault::DiskHung => {
            let Some((hc, hs)) = disks.hung else { return Ok("hung disk (left out: no loop mount)".into()) };
            let (hm, _) = roles(rt, d, hc).ok_or_else(|| anyhow!("cluster {hc} has no master"))?;
            d.freeze(hc, hs)?;
            // Two times in three a second fault while the disk hangs: the
            // coordinator restarts within the stall (it must not promote
            // what the hung server's heartbeats rule out), or, once the
            // hang has been dealt with, the hung old master is killed (it
            // lingers in the kernel until the thaw, holding its directory)
            // or the hung slave's master is (the slave lacks acknowledged
            // writes: never promoted).
            let second = rng.below(3);
            let restarted = (second == 0).then(|| cmd(d, "restart coordinator"));
            let hung = if hm == hs {
                // Past the stall limit the hung master steps down.
                wait_master_is(rt, d, hc, 3 - hs)
            } else {
                progress(load, WRITERS[hc as usize - 1], 1 + rng.below(20) as usize)
            };
            let killed = (second == 1 && hung.is_ok()).then(|| {
                let victim = if hm == hs { hs } else { hm };
                let name = format!("server-{hc}-{victim}");
                let pid = d.status().map(|procs| procs.get(&name).copied().flatten());
                (name.clone(), pid.and_then(|pid| cmd(d, &format!("kill {name}")).map(|()| pid)))
            });
            d.thaw(hc, hs)?;
            hung?;
            let restarted = restarted.transpose()?.is_some();
            match killed {
                None if restarted && hm == hs => "hung disk on a master, coordinator restarted",
                None if restarted => "hung disk on a slave, coordinator restarted",
                None if hm == hs => "hung disk on a master",
                None => "hung disk on a slave",
                Some((name, pid)) => {
                    if let Some(pid) = pid? {
                        eventually_within(&format!("{name} (pid {pid}) to end once the disk answers"), HEAL, || {
                            (!running(pid)).then_some(())
                        })?;
                    }
                    cmd(d, &format!("start {name}"))?;
                    if hm == hs { "hung disk on a master, then killed" } else { "hung disk on a slave, master killed" }
                }
            }
        }
        Fault::DamagedJournal => {
            // Only a server with an in-sync peer: the peer rebuilds it.
            cmd(d, &format!("kill server-{c}-{s}"))?;
            let path = d.server_dir(c, s).join("journal.log");
            let len = std::fs::metadata(&path)?.len();
            disk::flip(&path, len / 2, 4)?;
            cmd(d, &format!("start server-{c}-{s}"))?;
            "damaged journal"
        }
        Fault::LostTail if rng.below(2) == 0 => {
            cmd(d, &format!("kill server-{c}-{m}"))?;
            let whole = rng.below(2) == 0;
            lose_tail(d, c, m, 1 + rng.below(8) as usize, whole)?;
            cmd(d, &format!("start server-{c}-{m}"))?;
            // One time in two the coordinator restarts right away: while the
            // restarted master checks its slave, or hands the cluster over.
            let restarted = rng.below(2) == 0;
            if restarted {
                cmd(d, "restart coordinator")?;
            }
            return Ok(format!(
                "lost journal tail{} on a master{}",
                if whole { " (whole records)" } else { "" },
                if restarted { ", coordinator restarted" } else { "" }
            ));
        }
        Fault::LostTail => {
            // The whole cluster down, the slave's tail lost, the slave back
            // first: it must not be promoted over the master.
            cmd(d, &format!("kill server-{c}-{m}"))?;
            cmd(d, &format!("kill server-{c}-{s}"))?;
            let whole = rng.below(2) == 0;
            lose_tail(d, c, s, 1 + rng.below(8) as usize, whole)?;
            cmd(d, &format!("start server-{c}-{s}"))?;
            // A torn tail is seen as such; whole records lost are not, but
            // a restarted server nobody synced is not promoted either.
            let why = if whole { "restarted and not yet synced" } else { "lost its end" };
            eventually_within("the cluster to wait for the server that may hold more", HEAL, || {
                let info = rt.block_on(get_server(d.coord_port, writer)).ok()?;
                info.unavailable_reason.contains(why).then_some(())
            })?;
            cmd(d, &format!("start server-{c}-{m}"))?;
            return Ok(format!(
                "lost journal tail{} on a slave, cluster down, slave back first",
                if whole { " (whole records)" } else { "" }
            ));
        }
        Fault::Switchover => {
            switchover(d, c, s)?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            "switchover"
        }
        Fault::SwitchoverTargetHangs => {
            cmd(d, &format!("pause server-{c}-{s}"))?;
            // Promoted (the coordinator had not yet missed it) or refused
            // (it had): either way the old master ends up serving.
            let reply = d.command_reply(&format!("switchover {c}"))?;
            anyhow::ensure!(
                reply.starts_with("switched over") || reply.contains("not live"),
                "switchover to a hung target: {reply}"
            );
            wait_master_is(rt, d, c, m)?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("resume server-{c}-{s}"))?;
            "switchover, target hangs"
        }
        Fault::SwitchoverThenKillOld => {
            switchover(d, c, s)?;
            cmd(d, &format!("kill server-{c}-{m}"))?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            cmd(d, &format!("start server-{c}-{m}"))?;
            "switchover, old master killed"
        }
        Fault::SwitchoverCoordinatorRestarts => {
            let hangs = rng.below(2) == 0;
            let old = rt
                .block_on(server_node(d.coord_port, c, m))
                .ok_or_else(|| anyhow!("server {c}/{m} is not in the routing table"))?;
            if hangs {
                cmd(d, &format!("pause server-{c}-{s}"))?;
            }
            // Asked from a process of its own: the restart cuts its call.
            let mut asking = KillOnDrop(
                d.switchover_command(c, Some(s))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()?,
            );
            let mut stepped_down = false;
            if hangs {
                // Until the master stepped down (not at all when the
                // coordinator had already missed the target and refused).
                stepped_down = eventually_within("the master to step down", Duration::from_secs(2), || {
                    rt.block_on(status(&old)).ok().filter(|st| !st.is_master).map(drop)
                })
                .is_ok();
                std::thread::sleep(Duration::from_millis(rng.below(200)));
            } else {
                std::thread::sleep(Duration::from_millis(rng.below(100)));
            }
            cmd(d, "restart coordinator")?;
            if hangs {
                std::thread::sleep(Duration::from_millis(rng.below(1500)));
                cmd(d, &format!("resume server-{c}-{s}"))?;
            }
            // The asking process may have reached the new run (then it
            // waits for the switchover's end): bounded either way (killed
            // when dropped).
            eventually_within("sns-node switchover to end after the coordinator's restart", HEAL, || {
                asking.0.try_wait().ok().flatten()
            })?;
            progress(load, writer, 1 + rng.below(20) as usize)?;
            match (hangs, stepped_down) {
                (true, true) => "switchover, target hangs, coordinator restarted after the master stepped down",
                (true, false) => "switchover, target hangs, coordinator restarted (the master never stepped down)",
                _ => "switchover, coordinator restarted",
            }
        }
    };
    Ok(name.to_string())
}

/// Zeros the last `records` records of stopped server `c`/`id`'s journal
/// (or all of them, if it has fewer), or with `whole` cuts the file before
/// them, at a record boundary.
fn lose_tail(d: &Deployment, c: u32, id: u32, records: usize, whole: bool) -> Result<()> {
    let path = d.server_dir(c, id).join("journal.log");
    let starts = disk::journal_records(&path)?;
    match starts.get(starts.len().saturating_sub(records)) {
        // The file's length back at an earlier flush: it opens whole.
        Some(&at) if whole => disk::truncate_at(&path, at),
        Some(&at) => disk::zero_from(&path, at),
        None => Ok(()),
    }
}

fn run_schedule(seed: u64, steps: u64, totals: &mut Totals) -> Result<()> {
    let mut rng = Rng(seed);
    let full_at = (rng.cluster(), rng.below(2) as u32 + 1);
    // Another server's disk can hang.
    let hung_at = loop {
        let at = (rng.cluster(), rng.below(2) as u32 + 1);
        if at != full_at {
            break at;
        }
    };
    // Every disk, else the full ones alone (a loop mount may be refused
    // where a tmpfs is not), else none.
    let tries = [
        Disks { full: Some(full_at), hung: Some(hung_at), coordinator: CoordinatorDisk::Freezable },
        Disks { full: Some(full_at), hung: None, coordinator: CoordinatorDisk::Tmpfs },
        Disks::default(),
    ];
    // Every broker link goes through a stand-in, so the broker can be cut
    // off without a reset.
    let rt = rt();
    let broker = StandIn::start(&rt, true)?;
    let mut started = None;
    for disks in tries {
        // Events the broker loses go out again a second after the receiver
        // shows it is stuck (three by default).
        let mut builder = Deployment::builder()
            .clusters(CLUSTERS)
            .servers(2)
            .broker(&broker.url, None)
            .env("SNS_RESEND_AFTER", "1s")
            // Journals compacted every few hundred posts, not every 64 MiB:
            // every fault also meets a journal that is one snapshot.
            .env("SNS_COMPACT_AT", "16384");
        if let Some((c, s)) = disks.full {
            builder = builder.tmpfs(c, s, TMPFS);
        }
        if let Some((c, s)) = disks.hung {
            builder = builder.freezable(c, s);
        }
        builder = match disks.coordinator {
            CoordinatorDisk::Plain => builder,
            CoordinatorDisk::Tmpfs => builder.coordinator_tmpfs(COORDINATOR_TMPFS),
            CoordinatorDisk::Freezable => builder.freezable_coordinator(),
        };
        match builder.start() {
            Ok(d) => {
                started = Some((d, disks));
                break;
            }
            Err(e) => match disk::mount_refused(&e) {
                Some(why) => eprintln!("fault schedules: a disk fault is left out: {why}"),
                None => return Err(e),
            },
        }
    }
    let (mut d, disks) = started.ok_or_else(|| anyhow!("no deployment started"))?;
    wait_healthy(&rt, &d)?;
    let clocks = [0; 3].map(|_| CLOCKS[rng.below(CLOCKS.len() as u64) as usize]);
    for clock in clocks {
        let label = clock.map_or("no time".to_string(), |off| format!("{off:+} s"));
        *totals.clocks.entry(label).or_default() += 1;
    }
    let load = start_load(&rt, &d, clocks)?;
    // A hostile client of the broker replays and forges the deployment's
    // messages through every step (`SNS_FAULT_REPLAY=0`: not).
    let replayer = (std::env::var("SNS_FAULT_REPLAY").as_deref() != Ok("0"))
        .then(|| Replayer::start(&rt, &d.name, CLUSTERS, seed));
    let stepped = (|| -> Result<()> {
        let mut rested = true;
        for step in 0..steps {
            let began = Instant::now();
            let names =
                inject(&mut rng, &rt, &mut d, &load, disks, &broker, rested).with_context(|| format!("step {step}"))?;
            for n in &names {
                *totals.faults.entry(n.clone()).or_default() += 1;
            }
            let name = names.join("; ");
            // One step in four (never two in a row), the next fault strikes
            // as soon as every cluster serves again, before the slaves are
            // back in sync.
            rested = !rested || rng.below(4) != 0;
            if rested {
                wait_healthy(&rt, &d).with_context(|| format!("healing after step {step} ({name})"))?;
            }
            for &w in &WRITERS {
                progress(&load, w, 1).with_context(|| format!("after step {step} ({name})"))?;
            }
            eprintln!("fault schedules: step {step}: {name} ({:.1} s)", began.elapsed().as_secs_f64());
        }
        Ok(())
    })();
    if let Err(e) = stepped {
        // A step that failed (not only a failed check) keeps the files and
        // logs, so the race behind it can be read afterwards.
        d.keep();
        return Err(e);
    }
    if let Some(replayer) = replayer {
        let r = replayer.stop(&rt)?;
        // It did what it is there for, or the schedule proves nothing of it.
        anyhow::ensure!(
            r.captured > 0 && r.copies > 0 && r.flipped + r.misrouted + r.garbage > 0,
            "the replayer tried nothing: {r:?}"
        );
        totals.replayed.add(&r);
    }
    load.stop.store(true, Ordering::SeqCst);
    let reports: Vec<WriterReport> = load.writers.into_iter().map(|w| rt.block_on(w)).collect::<Result<_, _>>()?;
    let relations = rt.block_on(load.churn)?;
    let logins = rt.block_on(load.logins)?;
    let reads = rt.block_on(load.reads)?;
    anyhow::ensure!(reads.lists > 0, "no LIST was answered during the schedule");
    anyhow::ensure!(reads.violations.is_empty(), "reads contradicting acknowledged writes: {:?}", reads.violations);
    anyhow::ensure!(
        relations.violations.is_empty(),
        "answers contradicting acknowledged writes: {:?}",
        relations.violations
    );
    wait_healthy(&rt, &d)?;
    // Traffic between clusters still flows: a last post reaches every
    // follower in the other clusters.
    let last = rt.block_on(load::writer(d.coord_port, 1, Arc::new(AtomicBool::new(false)), 1, Instant::now() + HEAL));
    anyhow::ensure!(last.acked.len() == 1, "a last post after the schedule was not acknowledged");
    let all: Vec<(u32, u32)> = (1..=CLUSTERS).flat_map(|c| [(c, 1), (c, 2)]).collect();
    let followers: BTreeMap<u32, Vec<u32>> =
        WRITERS.iter().map(|&u| (u, WRITERS.iter().copied().filter(|f| *f != u).collect())).collect();
    let mut checked: Vec<WriterReport> = reports.clone();
    checked.push(last);
    // The watcher gets every acknowledged post of its followees, once.
    let followed: Vec<&String> = reports.iter().filter(|r| r.user != WATCHED).flat_map(|r| &r.acked).collect();
    let unshown = |watched: &Mutex<Vec<String>>| -> Vec<String> {
        let got = watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let got: BTreeSet<&String> = got.iter().collect();
        followed.iter().filter(|t| !got.contains(*t)).map(|t| t.to_string()).collect()
    };
    let all_shown = eventually_within("the timeline watcher to get every post of its followees", HEAL, || {
        unshown(&load.watched).is_empty().then_some(())
    });
    load.stop_watch.store(true, Ordering::SeqCst);
    let skipped = rt.block_on(load.watch)?;
    let checking = Instant::now();
    let verdict = (|| -> Result<usize> {
        all_shown.with_context(|| {
            let missing = unshown(&load.watched);
            format!(
                "{} of {} posts never shown (the first: {:?}); positions: {:?}",
                missing.len(),
                followed.len(),
                &missing[..missing.len().min(5)],
                &skipped[..skipped.len().min(5)]
            )
        })?;
        anyhow::ensure!(skipped.is_empty(), "the timeline watcher's feed positions: {skipped:?}");
        let got = load.watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let distinct: BTreeSet<&String> = got.iter().collect();
        anyhow::ensure!(distinct.len() == got.len(), "the timeline watcher got a post twice");
        drop(got);
        assert_exactly_once(&d, &all, &checked, &followers)?;
        check_no_gap(&rt, &d)?;
        check_timelines(&d, &checked)?;
        check_logins(&d, &logins)?;
        let relations_checked = check_relations(&d, &relations)?;
        check_convergence(&d, &all, &[])?;
        Ok(relations_checked)
    })();
    eprintln!("fault schedules: checked in {:.1} s", checking.elapsed().as_secs_f64());
    let relations_checked = match verdict {
        Ok(n) => n,
        Err(e) => {
            // Its files and logs are the evidence: keep them.
            d.keep();
            return Err(e);
        }
    };
    assert_one_master_per_term(&d);
    totals.posts += checked.iter().map(|r| r.acked.len()).sum::<usize>();
    totals.relation_ops += relations.ops;
    totals.checked_relations += relations_checked;
    totals.logins += logins.len();
    totals.lists += reads.lists;
    totals.compactions += all
        .iter()
        .map(|(c, id)| d.log(&format!("server-{c}-{id}")).matches("journal compacted").count())
        .sum::<usize>();
    Ok(())
}

/// Every acknowledged post exactly once in its author's timeline, on both
/// servers of the author's cluster.
fn check_timelines(d: &Deployment, reports: &[WriterReport]) -> Result<()> {
    for r in reports {
        let c = sns_node::ids::cluster_of(r.user, CLUSTERS);
        for s in [1, 2] {
            let files = spec_files(&d.server_dir(c, s))?;
            let timeline =
                sns_node::store::record::decode_posts(files.get(&format!("{}_timeline.txt", r.user)).map_or("", |t| t));
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for p in &timeline {
                *counts.entry(p.text.as_str()).or_default() += 1;
            }
            for text in &r.acked {
                let n = counts.get(text.as_str()).copied().unwrap_or(0);
                anyhow::ensure!(n == 1, "server {c}/{s}: timeline of {} has {text:?} {n} times", r.user);
            }
        }
    }
    Ok(())
}

/// No server holds another cluster's events waiting for a gap to close:
/// every stream between clusters is whole (a gap left at the end means an
/// event was marked published that some cluster never got).
fn check_no_gap(rt: &Runtime, d: &Deployment) -> Result<()> {
    for c in 1..=CLUSTERS {
        for s in [1, 2] {
            let node = rt
                .block_on(server_node(d.coord_port, c, s))
                .ok_or_else(|| anyhow!("server {c}/{s} not in the table"))?;
            let st = rt.block_on(status(&node))?;
            anyhow::ensure!(
                st.held == 0,
                "server {c}/{s} holds {} events of other clusters for a gap that never closed",
                st.held
            );
        }
    }
    Ok(())
}

/// Every acknowledged login is a user on every server.
fn check_logins(d: &Deployment, logins: &[u32]) -> Result<()> {
    for c in 1..=CLUSTERS {
        for s in [1, 2] {
            let files = spec_files(&d.server_dir(c, s))?;
            let users: BTreeSet<u32> =
                sns_node::store::record::decode_ids(files.get("all_users.txt").map_or("", |t| t)).into_iter().collect();
            let missing: Vec<&u32> = logins.iter().filter(|u| !users.contains(u)).collect();
            anyhow::ensure!(missing.is_empty(), "server {c}/{s} lacks acknowledged logins {missing:?}");
        }
    }
    Ok(())
}

/// Each pair's last acknowledged follow state is in the follow list on both
/// servers of the follower's cluster and in the followers file on both of
/// the followee's. Returns how many pairs had a known state.
fn check_relations(d: &Deployment, r: &Relations) -> Result<usize> {
    let mut checked = 0;
    let mut last = String::new();
    let ok = eventually_within("relations to settle", HEAL, || {
        checked = 0;
        for (&(follower, followee), state) in &r.state {
            let Some(follows) = state else { continue };
            checked += 1;
            for (user, file, other) in [(follower, "follow_list", followee), (followee, "followers", follower)] {
                let c = sns_node::ids::cluster_of(user, CLUSTERS);
                for s in [1, 2] {
                    let files = spec_files(&d.server_dir(c, s)).ok()?;
                    let ids =
                        sns_node::store::record::decode_ids(files.get(&format!("{user}_{file}.txt")).map_or("", |t| t));
                    if ids.contains(&other) != *follows {
                        last = format!(
                            "server {c}/{s}: {user}_{file}.txt is {ids:?}; {follower} follows {followee}: {follows}"
                        );
                        return None;
                    }
                }
            }
        }
        Some(())
    });
    ok.map_err(|e| anyhow!("{e}: {last}"))?;
    Ok(checked)
}
