//! The simulation's runs: thousands of schedules against the real code,
//! and each seeded bug found.

use super::*;

/// Schedules per CI run: enough to hit every fault at every phase many
/// times over (each schedule is ~6 s of protocol time).
fn schedules() -> u64 {
    std::env::var("TANDEM_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

#[derive(Default)]
struct Totals {
    ran: u64,
    committed: u64,
    replies: u64,
    takeovers: u64,
    degrades: u64,
}

/// Runs seeds `from..to` on two threads; every violation with its seed.
fn explore(
    from: u64,
    to: u64,
    bugs: Bugs,
    stop_at_first: bool,
) -> (Totals, Vec<(u64, Vec<String>)>) {
    let found = parking_lot::Mutex::new(Vec::new());
    let totals = parking_lot::Mutex::new(Totals::default());
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for lane in 0..2u64 {
            let (found, totals, stop) = (&found, &totals, &stop);
            scope.spawn(move || {
                let mut seed = from + lane;
                while seed < to && !stop.load(Ordering::Relaxed) {
                    let out = run(&Schedule::from_seed(seed), bugs);
                    {
                        let mut t = totals.lock();
                        t.ran += 1;
                        t.committed += out.committed;
                        t.replies += out.replies;
                        t.takeovers += out.takeovers;
                        t.degrades += out.degrades;
                    }
                    if !out.violations.is_empty() {
                        found.lock().push((seed, out.violations));
                        if stop_at_first {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    seed += 2;
                }
            });
        }
    });
    (totals.into_inner(), found.into_inner())
}

#[test]
fn the_protocol_holds_under_thousands_of_adversarial_schedules() {
    let n = schedules();
    let t = std::time::Instant::now();
    let (totals, found) = explore(0, n, Bugs::default(), false);
    eprintln!(
        "simulation: {} schedules in {:.1} s, {} with a violation; {} epochs committed, {} replies released, {} takeovers, {} degrades",
        totals.ran,
        t.elapsed().as_secs_f64(),
        found.len(),
        totals.committed,
        totals.replies,
        totals.takeovers,
        totals.degrades,
    );
    if let Some((seed, v)) = found.first() {
        panic!(
            "seed {seed}: {v:#?}\nschedule: {:#?}\nreplay: TANDEM_SIM_SEED={seed} cargo test -p tandem-replication --lib sim::tests::replay -- --nocapture",
            Schedule::from_seed(*seed)
        );
    }
    assert_eq!(totals.ran, n);
    // The faults must bite: takeovers happen, and so does work.
    assert!(
        totals.takeovers > n / 20,
        "only {} takeovers",
        totals.takeovers
    );
    assert!(totals.committed > n * 10 && totals.replies > n * 100);
}

/// The simulation must be able to fail: with each bug a fix removed put
/// back, some schedule breaks an invariant.
fn finds(bugs: Bugs) -> (u64, Vec<String>) {
    let (totals, found) = explore(0, 4000, bugs, true);
    let ran = totals.ran;
    let (seed, v) = found
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{bugs:?}: no violation in {ran} schedules"));
    eprintln!("{bugs:?}: seed {seed} after {ran} schedules: {v:?}");
    (seed, v)
}

#[test]
fn it_finds_a_takeover_that_does_not_wait_for_the_fence() {
    let (_, v) = finds(Bugs {
        take_over_on_suspicion: true,
        ..Bugs::default()
    });
    assert!(v.iter().any(|v| v.contains("two running copies")), "{v:?}");
}

#[test]
fn it_finds_heartbeats_only_when_idle() {
    let (_, v) = finds(Bugs {
        heartbeats_only_when_idle: true,
        ..Bugs::default()
    });
    assert!(
        v.iter()
            .any(|v| v.contains("never silenced") || v.contains("two running copies")),
        "{v:?}"
    );
}

#[test]
fn it_finds_one_way_liveness() {
    let (_, v) = finds(Bugs {
        one_way_liveness: true,
        ..Bugs::default()
    });
    assert!(v.iter().any(|v| v.contains("two running copies")), "{v:?}");
}

#[test]
fn it_finds_a_replica_shared_by_two_vms() {
    let (_, v) = finds(Bugs {
        ignore_identity: true,
        ..Bugs::default()
    });
    assert!(v.iter().any(|v| v.contains("another VM")), "{v:?}");
}

/// The rule tandemd enforced before the simulation found it too short.
#[test]
fn it_finds_a_takeover_rule_without_the_lease_grace() {
    let (_, v) = finds(Bugs {
        takeover_without_lease_grace: true,
        ..Bugs::default()
    });
    assert!(v.iter().any(|v| v.contains("two running copies")), "{v:?}");
}

/// Unprotect that lets the guest run on without the backup's word.
#[test]
fn it_finds_an_unconfirmed_unprotect() {
    let (_, v) = finds(Bugs {
        unconfirmed_bye: true,
        ..Bugs::default()
    });
    assert!(v.iter().any(|v| v.contains("two running copies")), "{v:?}");
}

/// The degrade policy releasing output while the backup is still armed.
#[test]
fn it_finds_a_degrade_without_the_backups_word() {
    let (_, v) = finds(Bugs {
        degrade_without_bye: true,
        ..Bugs::default()
    });
    assert!(
        v.iter()
            .any(|v| v.contains("two running copies") || v.contains("committed output lost")),
        "{v:?}"
    );
}

/// Replays one seed (`TANDEM_SIM_SEED`), printing its schedule and outcome.
#[test]
fn replay() {
    let Some(seed) = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    else {
        return;
    };
    let s = Schedule::from_seed(seed);
    eprintln!("{s:#?}");
    let out = run(&s, Bugs::default());
    eprintln!("{out:#?}");
    assert!(out.violations.is_empty());
}
