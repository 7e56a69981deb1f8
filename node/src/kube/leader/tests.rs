use super::fake::{LEASE, Shared, client};
use super::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        name: "sns".into(),
        namespace: "ops".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

/// Timings for the tests that run the loop in real time: the shortest
/// lease Kubernetes can express (whole seconds).
fn fast(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(600),
        retry_period: Duration::from_millis(50),
        ..config(identity)
    }
}

fn elector(server: &Shared, cfg: LeaseConfig) -> Elector {
    Elector::new(client(server), cfg)
}

fn take_calls(server: &Shared) -> Vec<String> {
    std::mem::take(&mut server.lock().unwrap().calls)
}

fn spec(server: &Shared) -> Value {
    server.lock().unwrap().lease.as_ref().unwrap()["spec"].clone()
}

/// Polls `cond` until it holds or 10 s pass.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn timings_that_allow_two_leaders_are_refused() {
    assert!(config("a").validate().is_ok());
    assert!(fast("a").validate().is_ok());
    let bad = [
        LeaseConfig { renew_deadline: Duration::from_secs(15), ..config("a") },
        LeaseConfig { retry_period: Duration::from_secs(10), ..config("a") },
        LeaseConfig { lease_duration: Duration::from_millis(1500), ..config("a") },
        LeaseConfig { lease_duration: Duration::ZERO, ..config("a") },
        config(""),
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
    }
}

#[tokio::test]
async fn acquires_by_creating_a_missing_lease() {
    let server = Shared::default();
    let mut a = elector(&server, config("a"));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Leader);
    assert_eq!(take_calls(&server), [format!("GET {LEASE}/sns"), format!("POST {LEASE}")]);
    let s = spec(&server);
    assert_eq!(s["holderIdentity"], "a");
    assert_eq!(s["leaseDurationSeconds"], 15);
    assert_eq!(s["leaseTransitions"], 0);
    assert_eq!(s["acquireTime"], s["renewTime"]);
}

#[tokio::test]
async fn does_not_lead_when_another_replica_creates_the_lease_first() {
    let server = Shared::default();
    server.lock().unwrap().race_after_get = Some("b".into());
    let mut a = elector(&server, config("a"));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Standby(None));
    assert_eq!(take_calls(&server), [format!("GET {LEASE}/sns"), format!("POST {LEASE}")]);
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"));
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Standby(Some("b".into())));
}

#[tokio::test]
async fn renews_its_own_lease_with_a_conditional_replace() {
    let server = Shared::default();
    let mut a = elector(&server, config("a"));
    a.try_acquire_or_renew().await.unwrap();
    let first = spec(&server);
    take_calls(&server);
    let read_version = server.lock().unwrap().version.to_string();
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Outcome::Leader);
    assert_eq!(take_calls(&server), [format!("GET {LEASE}/sns"), format!("PUT {LEASE}/sns")]);
    let renewed = spec(&server);
    assert_eq!(renewed["holderIdentity"], "a");
    assert_eq!(renewed["acquireTime"], first["acquireTime"], "a renewal keeps the acquire time");
    assert_eq!(renewed["leaseTransitions"], 0, "a renewal is no transition");
    assert_ne!(renewed["renewTime"], first["renewTime"]);
    assert_ne!(server.lock().unwrap().version.to_string(), read_version);
}

#[tokio::test]
async fn does_not_take_a_lease_its_holder_keeps_renewing() {
    let server = Shared::default();
    server.lock().unwrap().written_by("b", 15);
    let mut a = elector(&server, config("a"));
    let t0 = Instant::now();
    // b renews every 5 s; a looks every 2 s for a minute: never expired.
    for step in 0..30u64 {
        if step % 5 == 0 {
            server.lock().unwrap().written_by("b", 15);
        }
        let now = t0 + Duration::from_secs(2 * step);
        assert_eq!(a.attempt(now).await.unwrap(), Outcome::Standby(Some("b".into())), "at {}s", 2 * step);
    }
    assert!(take_calls(&server).iter().all(|c| c.starts_with("GET")), "a standby only reads");
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"));
}

#[tokio::test]
async fn takes_over_a_lease_not_renewed_for_its_duration() {
    let server = Shared::default();
    server.lock().unwrap().written_by("b", 15);
    server.lock().unwrap().lease.as_mut().unwrap()["spec"]["leaseTransitions"] = json!(4);
    let mut a = elector(&server, config("a"));
    let t0 = Instant::now();
    // Counted from when a first saw this version, not from its renewTime
    // (another machine's clock): a lease seen once is never expired.
    assert_eq!(a.attempt(t0).await.unwrap(), Outcome::Standby(Some("b".into())));
    assert_eq!(a.attempt(t0 + Duration::from_secs(14)).await.unwrap(), Outcome::Standby(Some("b".into())));
    assert!(take_calls(&server).iter().all(|c| c.starts_with("GET")));
    assert_eq!(a.attempt(t0 + Duration::from_secs(15)).await.unwrap(), Outcome::Leader);
    assert_eq!(take_calls(&server), [format!("GET {LEASE}/sns"), format!("PUT {LEASE}/sns")]);
    let s = spec(&server);
    assert_eq!(s["holderIdentity"], "a");
    assert_eq!(s["leaseTransitions"], 5);
    assert_eq!(s["acquireTime"], s["renewTime"]);
    assert_eq!(s["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn loses_the_race_when_another_replica_writes_between_read_and_write() {
    let server = Shared::default();
    server.lock().unwrap().written_by("b", 15);
    let mut a = elector(&server, config("a"));
    let t0 = Instant::now();
    assert_eq!(a.attempt(t0).await.unwrap(), Outcome::Standby(Some("b".into())));
    // Expired for a, but c takes it right after a reads it: a's replace
    // names the version it read and is refused.
    server.lock().unwrap().race_after_get = Some("c".into());
    assert_eq!(a.attempt(t0 + Duration::from_secs(16)).await.unwrap(), Outcome::Standby(None));
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("c"));
    // And c's fresh write restarts a's count.
    assert_eq!(a.attempt(t0 + Duration::from_secs(17)).await.unwrap(), Outcome::Standby(Some("c".into())));
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let server = Shared::default();
    let mut a = elector(&server, config("a"));
    a.try_acquire_or_renew().await.unwrap();
    let mut b = elector(&server, config("b"));
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Outcome::Standby(Some("a".into())));
    a.release().await.unwrap();
    assert_eq!(server.lock().unwrap().holder(), None);
    assert_eq!(spec(&server)["leaseDurationSeconds"], 1);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Outcome::Leader);
    assert_eq!(spec(&server)["leaseTransitions"], 1);
    // Releasing a lease someone else holds changes nothing.
    take_calls(&server);
    a.release().await.unwrap();
    assert_eq!(take_calls(&server), [format!("GET {LEASE}/sns")]);
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"));
}

#[tokio::test]
async fn the_leader_stops_when_another_replica_holds_the_lease() {
    let server = Shared::default();
    let (tx, mut leading) = watch::channel(false);
    let stop = CancellationToken::new();
    let run = tokio::spawn(elector(&server, fast("a")).run(tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l)).await.unwrap().unwrap();
    // Someone forces the lease over (e.g. a replica whose clock ran fast):
    // the leader sees it at its next renewal and stops at once.
    server.lock().unwrap().written_by("b", 15);
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| !*l)).await.unwrap().unwrap();
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"), "it does not write over b");
    stop.cancel();
    run.await.unwrap();
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"), "a standby releases nothing");
}

#[tokio::test]
async fn the_leader_stops_when_it_cannot_renew_within_the_deadline() {
    let server = Shared::default();
    let (tx, mut leading) = watch::channel(false);
    let stop = CancellationToken::new();
    // A longer lease than `fast`, so a loaded machine's scheduling delays
    // do not reach it: what is checked is that the leader stops before it.
    let cfg = LeaseConfig { lease_duration: Duration::from_secs(2), ..fast("a") };
    let run = tokio::spawn(elector(&server, cfg.clone()).run(tx, stop.clone()));
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| *l)).await.unwrap().unwrap();
    server.lock().unwrap().failing = true;
    let failing_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|l| !*l)).await.unwrap().unwrap();
    let after = failing_since.elapsed();
    // Not at the first failed renewal (retries come every 50 ms), and
    // before anyone could have taken the lease (2 s unchanged).
    assert!(after >= cfg.renew_deadline / 2, "stopped after {after:?}");
    assert!(after < cfg.lease_duration, "stopped after {after:?}");
    stop.cancel();
    run.await.unwrap();
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies_and_at_once_when_it_shuts_down() {
    let server = Shared::default();
    let (tx_a, mut a_leads) = watch::channel(false);
    let (tx_b, mut b_leads) = watch::channel(false);
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let a = tokio::spawn(elector(&server, fast("a")).run(tx_a, stop_a.clone()));
    tokio::time::timeout(Duration::from_secs(10), a_leads.wait_for(|l| *l)).await.unwrap().unwrap();
    let b = tokio::spawn(elector(&server, fast("b")).run(tx_b, stop_b.clone()));
    // b keeps trying while a renews, and never leads meanwhile.
    let renewals = server.lock().unwrap().version;
    eventually("a renews while b waits", || server.lock().unwrap().version >= renewals + 20).await;
    assert!(!*b_leads.borrow());
    assert!(*a_leads.borrow());

    // a dies without a word: b leads once the lease has not moved for its
    // duration.
    a.abort();
    let died = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), b_leads.wait_for(|l| *l)).await.unwrap().unwrap();
    let took = died.elapsed();
    assert!(took >= Duration::from_millis(900), "took over after {took:?}, before the lease expired");
    assert_eq!(server.lock().unwrap().holder().as_deref(), Some("b"));

    // b shuts down: it stops leading, releases, and c takes over on its
    // first try instead of waiting the lease out.
    stop_b.cancel();
    b.await.unwrap();
    assert!(!*b_leads.borrow());
    assert_eq!(server.lock().unwrap().holder(), None);
    let mut c = elector(&server, fast("c"));
    assert_eq!(c.try_acquire_or_renew().await.unwrap(), Outcome::Leader);
}

#[tokio::test]
async fn work_runs_only_while_leading() {
    let (tx, rx) = watch::channel(false);
    let started = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    struct Running(Arc<AtomicUsize>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let (s, r) = (started.clone(), running.clone());
    let stop = CancellationToken::new();
    let gate = tokio::spawn(async move {
        while_leading(rx, &stop, move || {
            let (s, r) = (s.clone(), r.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                r.fetch_add(1, Ordering::SeqCst);
                let _guard = Running(r);
                std::future::pending::<()>().await
            }
        })
        .await
    });
    tokio::task::yield_now().await;
    assert_eq!(started.load(Ordering::SeqCst), 0, "a standby does no work");
    tx.send_replace(true);
    eventually("work starts on leading", || running.load(Ordering::SeqCst) == 1).await;
    tx.send_replace(false);
    eventually("work stops when the lease is lost", || running.load(Ordering::SeqCst) == 0).await;
    tx.send_replace(true);
    eventually("work starts again", || running.load(Ordering::SeqCst) == 1).await;
    assert_eq!(started.load(Ordering::SeqCst), 2);
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), gate).await.unwrap().unwrap();
    assert_eq!(running.load(Ordering::SeqCst), 0, "the election's end stops the work");
}

#[tokio::test]
async fn work_that_ends_by_itself_ends_the_gate() {
    let (tx, rx) = watch::channel(true);
    let stop = CancellationToken::new();
    tokio::time::timeout(Duration::from_secs(10), while_leading(rx, &stop, || async {})).await.unwrap();
    drop(tx);
}

#[tokio::test]
async fn a_standby_stops_waiting_on_shutdown() {
    let (tx, rx) = watch::channel(false);
    let stop = CancellationToken::new();
    stop.cancel();
    let ran = AtomicUsize::new(0);
    let work = || {
        ran.fetch_add(1, Ordering::SeqCst);
        async {}
    };
    tokio::time::timeout(Duration::from_secs(10), while_leading(rx, &stop, work)).await.unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    drop(tx);
}
