//! Restore fidelity: VM snapshots taken at random moments of a busy 2-vCPU guest, every
//! one restored in a new VMM process, and a few rolled back in place, each checked.
//!
//! The guest (restored from the suite's ready template) gets a 3 s RCU stall timeout
//! ([`STALL_TIMEOUT_S`]) and a workload that keeps timers, the serial console, vsock and
//! process creation busy: `pmsnap-memtest churn` (changes 16 MiB step by step and prints
//! each step's checksum on the console) and a loop starting `pmsnap-agent list` (a
//! vsock round trip to the VMM's store) every half second. One VMM takes the snapshots
//! at random intervals; every restore happens more than twice the stall timeout after
//! its snapshot. A restored (or rolled-back) guest must:
//! - answer on its console within [`ANSWER_LIMIT`];
//! - continue the churn from the snapshot's step, with every checksum exact;
//! - after running longer than the stall timeout, have no RCU stall, lockup, clocksource
//!   or timer warning in its kernel log.
//!
//! `PMSNAP_FIDELITY_SNAPSHOTS=N` (default 50) sets the number of snapshots (the long
//! mode of docs/crash-test.md uses 200), `PMSNAP_FIDELITY_SEED` the random seed (printed
//! at the start), `PMSNAP_FIDELITY_ANSWER_S` the answer limit in seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::churn::{expected_checksums, Churn};
use pmsnap_testenv::Rng;
use pmsnap_tests::fidelity::{
    assert_checksums, check_checksums, churn_lines, kernel_warnings, set_stall_timeout, tail,
    STALL_TIMEOUT_S,
};
use pmsnap_tests::{ctl_json, ready_guest, require_kvm, restore_args, Guest};

const CMD: Duration = Duration::from_secs(120);
/// For the churn to start (it first touches 16 MiB, page faults the emulated guest kernel
/// takes its time over on a busy machine) or to print its next step.
const WAIT: Duration = Duration::from_secs(300);
/// Snapshots per run unless `PMSNAP_FIDELITY_SNAPSHOTS` says otherwise.
const DEFAULT_SNAPSHOTS: usize = 50;
/// In-place rollbacks checked in the first VMM.
const ROLLBACKS: usize = 3;
/// Default limit for a restored guest to answer on its console (from the start of
/// `pmsnap restore`).
const ANSWER_LIMIT: Duration = Duration::from_secs(10);
/// A restore or rollback happens at least this long after its snapshot.
const MIN_GAP: Duration = Duration::from_secs(2 * STALL_TIMEOUT_S + 1);

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn last_step(g: &Guest, from: usize, to: usize) -> Option<u64> {
    let out = g.output();
    churn_lines(&out[from.min(out.len())..to.min(out.len())])
        .last()
        .map(|l| l.0)
}

/// The first churn step printed after byte `from` continues a snapshot taken at step
/// `lo..=hi`: the next one, or the one after when the snapshot cut a line.
fn assert_continues(g: &Guest, from: usize, (lo, hi): (u64, u64), what: &str) {
    let first = |t: &str| churn_lines(t).first().map(|l| l.0);
    g.wait_until(from, WAIT, |t| first(t).is_some())
        .unwrap_or_else(|| {
            panic!(
                "{what}: no churn step after the restore; console tail:\n{}\nstderr:\n{}",
                tail(&g.output(), 3000),
                tail(&g.stderr(), 3000)
            )
        });
    let n = first(&g.output()[from..]).expect("a step");
    assert!(
        n > lo && n <= hi + 2,
        "{what}: churn continues at step {n}, the snapshot holds step {lo}..={hi}"
    );
}

/// The checks every restored or rolled-back guest passes, once it has run longer than
/// the stall timeout since `resumed`.
fn assert_healthy(g: &mut Guest, resumed: Instant, what: &str) {
    let ran = Duration::from_secs(STALL_TIMEOUT_S + 1);
    if let Some(left) = ran.checked_sub(resumed.elapsed()) {
        std::thread::sleep(left);
    }
    let w = kernel_warnings(g, CMD);
    assert!(
        w.is_empty(),
        "{what}: kernel warnings:\n{}\nconsole tail:\n{}",
        w.join("\n"),
        tail(&g.output(), 3000)
    );
}

struct Snap {
    name: String,
    steps: (u64, u64),
    at: Instant,
}

/// `ctl snapshot-vm` while the churn runs; the snapshot holds a step between the last
/// one printed before the request and the last one printed when it returned.
fn snapshot(g: &Guest, api: &Path, from: usize, name: &str) -> Snap {
    let before = g.output_len();
    let snap = ctl_json(api, &["snapshot-vm", name]);
    let at = Instant::now();
    assert_eq!(snap["name"], name, "{snap}");
    // What the guest printed before the pause may still be in the VMM's stdout pipe, not
    // yet read by the console pump: give it time to arrive, or a restored guest would
    // seem to skip the steps in flight. Steps printed after the snapshot only widen the
    // upper bound; the lower bound (`before`) is what was seen before the request.
    std::thread::sleep(Duration::from_millis(1000));
    let after = g.output_len();
    let lo = last_step(g, from, before).expect("a churn step before the snapshot");
    let hi = last_step(g, from, after).expect("a churn step");
    Snap {
        name: name.to_string(),
        steps: (lo, hi),
        at,
    }
}

#[test]
fn snapshots_of_a_busy_guest_restore_and_roll_back_healthy() {
    require_kvm!("snapshots_of_a_busy_guest_restore_and_roll_back_healthy");
    let count = env_num("PMSNAP_FIDELITY_SNAPSHOTS").map_or(DEFAULT_SNAPSHOTS, |n| n as usize);
    let answer_limit =
        env_num("PMSNAP_FIDELITY_ANSWER_S").map_or(ANSWER_LIMIT, Duration::from_secs);
    let seed = env_num("PMSNAP_FIDELITY_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64
            | 1
    });
    eprintln!("restore fidelity: {count} snapshots, seed {seed} (PMSNAP_FIDELITY_SEED)");
    let mut rng = Rng(seed);
    let t_start = Instant::now();

    let rg = ready_guest(&[("RUST_LOG", "info")]);
    let (api, vsock, pool) = (rg.api.clone(), rg.vsock.clone(), rg.pool.0.clone());
    let mut g = rg.guest;
    set_stall_timeout(&mut g, STALL_TIMEOUT_S, CMD);
    let w = kernel_warnings(&mut g, CMD);
    assert!(w.is_empty(), "warnings before any snapshot: {w:?}");
    let from = g.output_len();
    g.send_line(
        "pmsnap-memtest churn --interval-ms 300 & \
         (while :; do pmsnap-agent list >/dev/null 2>&1; sleep 0.5; done) &",
    );
    g.wait_until(from, WAIT, |t| churn_lines(t).len() >= 2)
        .unwrap_or_else(|| panic!("no churn steps; console:\n{}", tail(&g.output(), 3000)));

    // Snapshots at random moments (0.1 to 1 s apart).
    let mut snaps = Vec::with_capacity(count);
    let mut seg = from;
    for i in 0..count {
        std::thread::sleep(Duration::from_millis(100 + rng.below(900)));
        snaps.push(snapshot(&g, &api, seg, &format!("f{i}")));
        // Roll back in place a few times, evenly spread, after a gap.
        if ROLLBACKS > 0 && (i + 1) % (count / ROLLBACKS).max(1) == 0 && i + 1 < count {
            let k = rng.below(snaps.len() as u64) as usize;
            if let Some(wait) = MIN_GAP.checked_sub(snaps[k].at.elapsed()) {
                std::thread::sleep(wait);
            }
            // Paused around the rollback, so no line printed before it is taken for the
            // first one after it.
            ctl_json(&api, &["pause"]);
            std::thread::sleep(Duration::from_millis(200));
            assert_checksums(&g.output()[seg..], "first VMM");
            let before = g.output_len();
            let rb = ctl_json(&api, &["rollback", &snaps[k].name]);
            ctl_json(&api, &["resume"]);
            let resumed = Instant::now();
            let what = format!("rollback to {} (step {:?})", snaps[k].name, snaps[k].steps);
            eprintln!("{what}: {rb}");
            assert_continues(&g, before, snaps[k].steps, &what);
            assert_healthy(&mut g, resumed, &what);
            seg = before;
        }
    }
    let checked = assert_checksums(&g.output()[seg..], "first VMM");
    eprintln!(
        "{count} snapshots taken in {:?}, {checked} churn lines checked since the last rollback",
        t_start.elapsed()
    );
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGKILL) }, 0);
    assert!(g.wait_exit(Duration::from_secs(30)).is_some());
    drop(g);

    // Every snapshot, in random order, restored in a new VMM.
    let mut order: Vec<usize> = (0..count).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let (mut answers, mut gaps) = (Vec::new(), Vec::new());
    for (n, &i) in order.iter().enumerate() {
        let s = &snaps[i];
        let _ = std::fs::remove_file(&api);
        let _ = std::fs::remove_file(&vsock);
        if let Some(wait) = MIN_GAP.checked_sub(s.at.elapsed()) {
            std::thread::sleep(wait);
        }
        gaps.push(s.at.elapsed());
        let what = format!("restore {n} of {count}: {} (step {:?})", s.name, s.steps);
        let t0 = Instant::now();
        let mut r = Guest::spawn(&restore_args(&pool, &s.name, &api, &vsock), &[]);
        let answered = r.sync_shell(answer_limit);
        let answer = t0.elapsed();
        assert!(
            answered && answer <= answer_limit,
            "{what}: console did not answer within {answer_limit:?} ({answer:?}); console tail:\n{}\nstderr:\n{}",
            tail(&r.output(), 3000),
            tail(&r.stderr(), 3000)
        );
        answers.push(answer);
        assert_continues(&r, 0, s.steps, &what);
        assert_healthy(&mut r, t0, &what);
        assert_checksums(&r.output(), &what);
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(r.pid() as i32, libc::SIGKILL) }, 0);
        assert!(r.wait_exit(Duration::from_secs(30)).is_some());
    }
    answers.sort();
    gaps.sort();
    eprintln!(
        "restore fidelity: {count} snapshots restored in new VMMs and {ROLLBACKS} rolled back in place, all healthy; \
         answer median {:?} max {:?}; gap min {:?} max {:?}; total {:?}",
        answers[answers.len() / 2],
        answers[answers.len() - 1],
        gaps[0],
        gaps[gaps.len() - 1],
        t_start.elapsed()
    );
}

#[test]
fn churn_lines_skip_cut_and_unfinished_lines_and_checksums_are_checked() {
    let (a, b) = (Churn::line(1, 0xab), Churn::line(2, 0xcd));
    let text = format!("00000000000000ab\n{a}\r\n{b}\nC=3 S=00");
    assert_eq!(churn_lines(&text), vec![(1, 0xab), (2, 0xcd)]);
    let [(n, sum)] = expected_checksums(&[3])[..] else {
        panic!("one checksum")
    };
    assert_eq!(
        assert_checksums(&format!("{}\n", Churn::line(n, sum)), "good"),
        1
    );
    let bad = format!("{}\n", Churn::line(n, sum ^ 1));
    assert!(check_checksums(&bad).is_err());
}
