//! Regression test of issue 15 (a VM snapshot that restores into a stalled guest), made
//! smaller than the pool it was found with: a busy guest with a 3 s RCU stall timeout is
//! snapshotted, left for several stall timeouts, then restored in a new VMM and rolled
//! back in place. Each time the guest's clock must carry on from the snapshot (before
//! the fix its `tsc` clocksource, which this host cannot restore, jumped by the gap),
//! its shell must answer, and its kernel log must stay free of RCU stall, lockup,
//! clocksource and timer warnings.

use std::time::{Duration, Instant};

use pmsnap_tests::fidelity::{
    kernel_warnings, last_line, set_stall_timeout, tail, uptime, STALL_TIMEOUT_S,
};
use pmsnap_tests::{ctl_json, ready_guest, require_kvm, restore_args, Guest};

const CMD: Duration = Duration::from_secs(120);
/// Time the snapshot sits unused before the restore: several stall timeouts.
const GAP: Duration = Duration::from_secs(4 * STALL_TIMEOUT_S);
/// Slack for guest time that passes around the restore (the clock runs from the moment
/// the VMM sets it; commands through the emulated console take a while).
const SLACK_S: f64 = 2.0;

/// Check that guest time moved by no more than the host time that passed while the
/// guest could run (`ran`) plus slack, i.e. the guest did not see `GAP`.
fn assert_no_jump(what: &str, before: f64, after: f64, ran: Duration) {
    let moved = after - before;
    eprintln!(
        "{what}: guest uptime {before:.2} -> {after:.2} s (+{moved:.2} s) while the guest could run {:.2} s; gap {GAP:?}",
        ran.as_secs_f64()
    );
    assert!(
        moved >= 0.0 && moved <= ran.as_secs_f64() + SLACK_S,
        "{what}: guest time moved {moved:.2} s, but the guest could run only {:.2} s: it saw the {GAP:?} gap",
        ran.as_secs_f64()
    );
}

fn assert_clean(g: &mut Guest, what: &str) {
    let w = kernel_warnings(g, CMD);
    assert!(
        w.is_empty(),
        "{what}: kernel warnings after the restore:\n{}\nconsole tail:\n{}",
        w.join("\n"),
        tail(&g.output(), 3000)
    );
}

#[test]
fn guest_time_and_rcu_survive_a_gap_across_restore_and_rollback() {
    require_kvm!("guest_time_and_rcu_survive_a_gap_across_restore_and_rollback");
    let rg = ready_guest(&[("RUST_LOG", "info")]);
    let (api, vsock, pool) = (rg.api.clone(), rg.vsock.clone(), rg.pool.0.clone());
    let mut g = rg.guest;
    let (out, rc) = g
        .run(
            "cat /sys/devices/system/clocksource/clocksource0/current_clocksource",
            CMD,
        )
        .expect("clocksource");
    assert_eq!((last_line(&out), rc), ("kvm-clock", 0), "guest clocksource");
    set_stall_timeout(&mut g, STALL_TIMEOUT_S, CMD);
    assert_clean(&mut g, "before any snapshot");
    // Start a process every 0.1 s: each exit queues RCU callbacks, so grace periods are
    // in flight when the snapshot is taken. (Not a spinning loop: on a loaded host a
    // guest whose vCPUs spin starves its own RCU kthread, a stall of its own.)
    g.send_line("(while :; do sleep 0.1; done) &");
    std::thread::sleep(Duration::from_secs(1));

    // Restore in a new VMM after the gap.
    let before = uptime(&mut g, CMD);
    let read = Instant::now();
    let snap = ctl_json(&api, &["snapshot-vm", "gap"]);
    let pre = read.elapsed();
    assert_eq!(snap["name"], "gap", "{snap}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGKILL) }, 0);
    assert!(g.wait_exit(Duration::from_secs(30)).is_some());
    drop(g);
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vsock);
    std::thread::sleep(GAP);
    let t0 = Instant::now();
    let mut r = Guest::spawn(
        &restore_args(&pool, "gap", &api, &vsock),
        &[("RUST_LOG", "info")],
    );
    let after = uptime(&mut r, CMD);
    assert_no_jump("restore", before, after, pre + t0.elapsed());
    std::thread::sleep(Duration::from_secs(STALL_TIMEOUT_S + 1));
    assert_clean(&mut r, "restore after the gap");

    // Roll back in place after the gap: the same.
    let before = uptime(&mut r, CMD);
    let read = Instant::now();
    ctl_json(&api, &["snapshot-vm", "gap2"]);
    let pre = read.elapsed();
    std::thread::sleep(GAP);
    let t0 = Instant::now();
    let rb = ctl_json(&api, &["rollback", "gap2"]);
    eprintln!("rollback: {rb}");
    let after = uptime(&mut r, CMD);
    assert_no_jump("rollback", before, after, pre + t0.elapsed());
    std::thread::sleep(Duration::from_secs(STALL_TIMEOUT_S + 1));
    assert_clean(&mut r, "rollback after the gap");
}
