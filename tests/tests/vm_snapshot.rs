//! Whole-VM snapshots end to end. The guest is not booted: it is restored from the
//! suite's ready template (itself a VM snapshot, so this is a restore test too). In it,
//! `pmsnap-memtest churn` changes a 16 MiB buffer step by step and prints the step and
//! a checksum of all 16 MiB (`guest_agent::churn`); every line is checked against the
//! same rule replayed here, so "the counter continues from the snapshot" also means
//! "the memory is exactly the snapshot's". `ctl snapshot-vm`; let it run; `ctl rollback`
//! continues from the snapshot's step; a chain of three snapshots shares pages and each
//! rolls back exactly; SIGKILL the VMM; `pmsnap restore` in a new process continues from
//! the snapshot again, its console answers, and the guest agent serves saves (guest- and
//! host-initiated) into the store; then the errors of `pmsnap restore` (locked pool,
//! missing vsock, unknown snapshot, wrong kind, wrong size).

use std::time::Duration;

use guest_agent::churn::{expected_checksums, Churn};
use pmsnap_tests::fidelity::{assert_checksums, check_checksums, churn_lines};
use pmsnap_tests::{ctl_json, ready_guest, require_kvm, restore_args, run_pmsnap, s, Guest};

const WAIT: Duration = Duration::from_secs(300);
const CMD_TIMEOUT: Duration = Duration::from_secs(600);

/// Wait until a churn step above `min` appears after byte `from`; returns the first one.
fn wait_step_above(g: &Guest, from: usize, min: u64, timeout: Duration) -> Option<u64> {
    let above = |t: &str| churn_lines(t).into_iter().map(|l| l.0).find(|&n| n > min);
    g.wait_until(from, timeout, |t| above(t).is_some())?;
    above(&g.output()[from..])
}

/// The last complete churn step in the output from `from` to `to`.
fn last_step(g: &Guest, from: usize, to: usize) -> Option<u64> {
    let out = g.output();
    churn_lines(&out[from..to.min(out.len())])
        .last()
        .map(|l| l.0)
}

/// `ctl snapshot-vm NAME` while the churn runs; returns the answer and the bounds of the
/// step the snapshot holds: at least the last step printed before the request, at most
/// the last printed when it returned.
fn snapshot_vm(
    g: &Guest,
    api: &std::path::Path,
    from: usize,
    name: &str,
) -> (serde_json::Value, u64, u64) {
    let before = g.output_len();
    let snap = ctl_json(api, &["snapshot-vm", name]);
    let after = g.output_len();
    let lo = last_step(g, from, before).expect("a churn step before the snapshot");
    let hi = last_step(g, from, after).expect("a churn step");
    (snap, lo, hi)
}

/// The first step printed after byte `from` continues the snapshot taken at step
/// `lo..=hi`: the next one (or, when the snapshot cut a line, the one after).
fn assert_continues(g: &Guest, from: usize, (lo, hi): (u64, u64), ahead: u64, what: &str) -> u64 {
    let first = wait_step_above(g, from, 0, WAIT).unwrap_or_else(|| {
        panic!(
            "{what}: no churn step printed; console:\n{}\nstderr:\n{}",
            &g.output()[from..],
            g.stderr()
        )
    });
    assert!(
        first > lo && first <= hi + 2 && first < ahead,
        "{what}: the churn continues from the snapshot's step {lo}..={hi}: got {first} (was at {ahead})"
    );
    first
}

#[test]
fn snapshot_rollback_sigkill_and_restore_in_a_new_vmm() {
    require_kvm!("snapshot_rollback_sigkill_and_restore_in_a_new_vmm");
    let rg = ready_guest(&[]);
    let (api, vsock, pool) = (rg.api.clone(), rg.vsock.clone(), rg.pool.0.clone());
    let mut g = rg.guest;
    let from = g.output_len();
    g.send_line("pmsnap-memtest churn --interval-ms 500 &");
    assert!(
        wait_step_above(&g, from, 1, WAIT).is_some(),
        "no churn steps (an image older than `pmsnap-memtest churn`? run images/build.sh); console:\n{}",
        &g.output()[from..]
    );

    // Snapshot; let it run well past; roll back: the churn continues from the snapshot.
    let (snap, lo, hi) = snapshot_vm(&g, &api, from, "s1");
    let pause_us = snap["pause_us"].as_u64().expect("pause_us");
    eprintln!("snapshot-vm: {snap} (step {lo}..={hi})");
    assert_eq!(snap["pages"].as_u64(), Some((256u64 << 20) / 4096));
    assert!(pause_us > 0 && pause_us < 5_000_000, "pause {pause_us} us");
    let s1 = (lo, hi);
    let ahead = wait_step_above(&g, from, hi + 4, WAIT).expect("churn runs after the snapshot");
    let mut segments = vec![from];
    let before_rollback = g.output_len();
    segments.push(before_rollback);
    let rb = ctl_json(&api, &["rollback", "s1"]);
    eprintln!("rollback: {rb}");
    let copied = rb["pages_copied"].as_u64().expect("copied");
    assert!(rb["dirty_pages"].as_u64().expect("dirty") >= copied);
    assert!(copied > 0, "the guest wrote pages since: {rb}");
    assert_continues(&g, before_rollback, s1, ahead, "rollback s1");

    // A chain of three VM snapshots taken while the churn runs: they share the pages that
    // did not change between them, and each one rolls back exactly, in any order.
    let mut chain = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let at = g.output_len();
        wait_step_above(&g, at, 0, WAIT).expect("churn runs before the chain snapshot");
        let (snap, lo, hi) = snapshot_vm(&g, &api, at, name);
        assert_eq!(
            snap["pages"].as_u64(),
            Some((256u64 << 20) / 4096),
            "{snap}"
        );
        chain.push((name, (lo, hi)));
        wait_step_above(&g, g.output_len(), hi + 1, WAIT).expect("churn moves on");
    }
    let stats = ctl_json(&api, &["stats"]);
    let per: Vec<&serde_json::Value> = stats["store"]["per_snapshot"]
        .as_array()
        .expect("per_snapshot")
        .iter()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with('c')))
        .collect();
    assert_eq!(per.len(), 3, "{stats}");
    assert!(
        stats["store"]["shared_bytes"]
            .as_u64()
            .expect("shared_bytes")
            >= 3 * (256 << 20) / 4,
        "three snapshots of a mostly idle guest share most pages: {stats}"
    );
    for (name, bounds) in [chain[1], chain[0], chain[2]] {
        let ahead = wait_step_above(&g, g.output_len(), 0, WAIT).expect("churn runs");
        let before = g.output_len();
        segments.push(before);
        let rb = ctl_json(&api, &["rollback", name]);
        eprintln!("rollback {name}: {rb}");
        assert_continues(
            &g,
            before,
            bounds,
            ahead.max(bounds.1 + 3),
            &format!("rollback {name}"),
        );
    }
    // Every step printed in every stretch between rollbacks came with its exact checksum.
    let out = g.output();
    segments.push(out.len());
    let checked: usize = segments
        .windows(2)
        .map(|w| assert_checksums(&out[w[0]..w[1]], "first VMM"))
        .sum();
    eprintln!("{checked} churn lines checked in the first VMM");
    assert!(checked >= 10, "{checked} lines");

    // SIGKILL the VMM; restore s1 in a new process.
    // SAFETY: kill(2) on our own child, not yet reaped (Guest reaps it in wait_exit).
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGKILL) }, 0);
    assert!(g.wait_exit(Duration::from_secs(30)).is_some());
    drop(g);
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vsock);
    let api2 = rg.dir.path().join("api2.sock");
    let mut r = Guest::spawn(
        &restore_args(&pool, "s1", &api2, &vsock),
        &[("RUST_LOG", "info")],
    );
    assert_continues(&r, 0, s1, ahead, "restore s1");
    assert!(r.sync_shell(WAIT), "restored console answers");
    // The guest still has its virtio-mmio (vsock) interrupt line after the restore.
    let (out, rc) = r
        .run("grep -c virtio /proc/interrupts", CMD_TIMEOUT)
        .expect("grep finishes");
    assert_eq!(rc, 0, "{out}");
    let n: u32 = out
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .next()
        .unwrap_or(0);
    assert!(
        n >= 1,
        "no virtio interrupt line in the restored guest: {out}"
    );
    eprintln!(
        "restore log: {}",
        r.stderr()
            .lines()
            .find(|l| l.contains("restored snapshot"))
            .unwrap_or("")
    );

    // The guest agent serves saves after the restore (its vsock connections were reset):
    // one the guest asks for, one the host asks for (served by the agent's listener).
    let (out, rc) = r
        .run(
            "pmsnap-memtest hold --mib 4 --seed 7 > /tmp/hold & \
             until [ -s /tmp/hold ]; do sleep 1; done; cat /tmp/hold",
            CMD_TIMEOUT,
        )
        .expect("hold starts");
    assert_eq!(rc, 0, "{out}");
    let hold = out
        .lines()
        .find_map(|l| {
            l.split_once("memtest: hold pid")
                .map(|(_, h)| h.to_string())
        })
        .unwrap_or_else(|| panic!("no hold line in {out}"));
    let words: Vec<&str> = hold.split_whitespace().collect();
    let (pid, range) = (words[0], words[2]);
    let (out, rc) = r
        .run(
            &format!("pmsnap-agent save --pid {pid} --range {range} --name after-restore 2>&1"),
            CMD_TIMEOUT,
        )
        .expect("save finishes");
    assert_eq!(rc, 0, "pmsnap-agent save after restore: {out}");
    let hp = ctl_json(
        &api2,
        &[
            "snapshot-process",
            "--pid",
            pid,
            "--name",
            "host-after-restore",
            "--range",
            range,
        ],
    );
    assert_eq!(hp["pages"], 1024, "4 MiB of the held process: {hp}");
    let list = ctl_json(&api2, &["list"]);
    let list = list
        .as_array()
        .or_else(|| list["snapshots"].as_array())
        .expect("a list");
    // The agent's save belongs to guest root: listed in its guest name space.
    for name in ["guest:0/after-restore", "host-after-restore"] {
        let snap = list
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no snapshot {name} in {list:?}"));
        assert_eq!(snap["kind"], "process", "{snap}");
        assert_eq!(snap["pages"], 1024, "{snap}");
    }
    // Snapshots of guest pages keep working in the restored VMM too.
    let pages = ctl_json(&api2, &["snapshot-pages", "--name", "pg", "--runs", "0:4"]);
    assert_eq!(pages["kind"], "pages");
    let n = assert_checksums(&r.output(), "restored VMM");
    eprintln!("{n} churn lines checked in the restored VMM");
    assert!(n >= 1);

    // Errors of `pmsnap restore`.
    let p = s(&pool);
    run_pmsnap(&["restore", "--pool", p, "--snapshot", "s1"], &[]).expect_error("locked");
    drop(r);
    run_pmsnap(&["restore", "--pool", p, "--snapshot", "s1"], &[])
        .expect_error("with --vsock-sock");
    run_pmsnap(&["restore", "--pool", p, "--snapshot", "nope"], &[]).expect_error("no snapshot");
    run_pmsnap(&["restore", "--pool", p, "--snapshot", "pg"], &[])
        .expect_error("a VM snapshot is needed");
    run_pmsnap(
        &["restore", "--pool", p, "--snapshot", "host-after-restore"],
        &[],
    )
    .expect_error("a VM snapshot is needed");
    run_pmsnap(
        &["restore", "--pool", p, "--snapshot", "s1", "--mem", "512M"],
        &[],
    )
    .expect_error("256 MiB");
    run_pmsnap(
        &["restore", "--pool", p, "--snapshot", "s1", "--vcpus", "1"],
        &[],
    )
    .expect_error("vcpus");
}

#[test]
fn churn_line_parsing_ignores_cut_and_unfinished_lines() {
    let a = Churn::line(1, 0xab);
    let b = Churn::line(2, 0xcd);
    // A leading tail of a cut line and an unfinished last line are not lines.
    let text = format!("00000000000000ab\n{a}\r\n{b}\nC=3 S=00");
    assert_eq!(churn_lines(&text), vec![(1, 0xab), (2, 0xcd)]);
    assert_eq!(churn_lines(&a), vec![]);
}

#[test]
fn checksum_check_catches_a_wrong_checksum() {
    let [(n, sum)] = expected_checksums(&[3])[..] else {
        panic!("one checksum")
    };
    assert_eq!(
        check_checksums(&format!("{}\n", Churn::line(n, sum))),
        Ok(1)
    );
    let bad = format!("{}\n{}\n", Churn::line(n, sum), Churn::line(n, sum ^ 1));
    let err = check_checksums(&bad).expect_err("a wrong checksum fails the check");
    assert!(err.contains("step 3"), "{err}");
}
