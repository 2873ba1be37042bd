//! Whole-VM snapshots end to end, with ONE real Linux boot for the whole file: a shell
//! loop prints a counter; `ctl snapshot-vm`; let it run; `ctl rollback` makes the counter
//! continue from the snapshot's value; SIGKILL the VMM; `pmsnap restore` in a new
//! process continues from the snapshot again and its console answers; then the errors
//! of `pmsnap restore` (locked pool, missing vsock, unknown snapshot, wrong kind, wrong size).
//! The guest has a virtio-vsock device throughout, so its transport state is saved and
//! restored too.

use std::time::Duration;

use pmsnap_tests::{ctl_json, image, require_kvm, run_pmsnap, s, Guest, READY_TIMEOUT};

/// Counter values `C=N` printed in `text`, in order (partial lines ignored).
fn counters(text: &str) -> Vec<u64> {
    text.split("C=")
        .skip(1)
        .filter_map(|t| {
            let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
            let complete = t[digits.len()..].starts_with(['\r', '\n']);
            (complete && !digits.is_empty())
                .then(|| digits.parse().ok())
                .flatten()
        })
        .collect()
}

/// Wait until a counter value above `min` appears after byte `from`; returns it.
fn wait_counter_above(g: &Guest, from: usize, min: u64, timeout: Duration) -> Option<u64> {
    g.wait_until(from, timeout, |t| counters(t).iter().any(|&c| c > min))?;
    counters(&g.output()[from..]).into_iter().find(|&c| c > min)
}

struct RemoveOnDrop(std::path::PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn snapshot_rollback_sigkill_and_restore_in_a_new_vmm() {
    require_kvm!("snapshot_rollback_sigkill_and_restore_in_a_new_vmm");
    let (kernel, initrd) = image();
    let dir = tempfile::tempdir().expect("tmpdir");
    let pool = std::path::PathBuf::from(format!(
        "/dev/shm/pmsnap-vmstate-test-{}.pool",
        std::process::id()
    ));
    let _rm = RemoveOnDrop(pool.clone());
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let mut g = Guest::spawn(
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--pool",
            s(&pool),
            "--api-sock",
            s(&api),
            "--vsock-sock",
            s(&vsock),
        ],
        &[],
    );
    assert!(
        g.wait_for(0, "pmsnap-guest: ready", READY_TIMEOUT)
            .is_some(),
        "guest not ready; stderr:\n{}",
        g.stderr()
    );
    assert!(
        g.sync_shell(Duration::from_secs(120)),
        "shell does not answer"
    );
    let from = g.output_len();
    g.send_line("i=0; while true; do i=$((i+1)); echo C=$i; sleep 1; done &");
    assert!(wait_counter_above(&g, from, 1, Duration::from_secs(120)).is_some());

    // Snapshot: the counter value at the snapshot is the last one printed before it.
    let snap = ctl_json(&api, &["snapshot-vm", "s1"]);
    let at_snapshot = *counters(&g.output()[from..]).last().expect("a counter");
    let pause_us = snap["pause_us"].as_u64().expect("pause_us");
    eprintln!("snapshot-vm: {snap}");
    assert_eq!(snap["pages"].as_u64(), Some((256u64 << 20) / 4096));
    assert!(pause_us > 0 && pause_us < 5_000_000, "pause {pause_us} us");

    // Let it run well past the snapshot, then roll back.
    let ahead = wait_counter_above(&g, from, at_snapshot + 3, Duration::from_secs(120))
        .expect("counter keeps running after the snapshot");
    let before_rollback = g.output_len();
    let rb = ctl_json(&api, &["rollback", "s1"]);
    eprintln!("rollback: {rb}");
    assert!(
        rb["dirty_pages"].as_u64().expect("dirty") >= rb["pages_copied"].as_u64().expect("copied")
    );
    assert!(
        rb["pages_copied"].as_u64().expect("copied") > 0,
        "the guest wrote pages since"
    );
    let next = wait_counter_above(&g, before_rollback, 0, Duration::from_secs(120))
        .expect("counter runs after the rollback");
    assert!(
        next <= at_snapshot + 1 && next >= at_snapshot && next < ahead,
        "after rollback the counter continues from the snapshot's {at_snapshot}: got {next} (was at {ahead})"
    );

    // A chain of three VM snapshots taken while the counter runs: they share the pages
    // that did not change between them, and each one rolls back exactly, in any order.
    let mut chain: Vec<(&str, u64)> = Vec::new();
    for name in ["c1", "c2", "c3"] {
        let from = g.output_len();
        let seen = wait_counter_above(&g, from, 0, Duration::from_secs(120))
            .expect("counter runs before the chain snapshot");
        let snap = ctl_json(&api, &["snapshot-vm", name]);
        assert_eq!(
            snap["pages"].as_u64(),
            Some((256u64 << 20) / 4096),
            "{snap}"
        );
        let at = *counters(&g.output()[from..]).last().expect("a counter");
        assert!(at >= seen);
        chain.push((name, at));
        wait_counter_above(&g, g.output_len(), at + 1, Duration::from_secs(120))
            .expect("counter moves on after the snapshot");
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
    for (name, at) in [chain[1], chain[0], chain[2]] {
        let before = g.output_len();
        let rb = ctl_json(&api, &["rollback", name]);
        eprintln!("rollback {name}: {rb}");
        let next = wait_counter_above(&g, before, 0, Duration::from_secs(120))
            .expect("counter runs after the rollback");
        assert!(
            next >= at && next <= at + 1,
            "after rollback to {name} the counter continues from {at}: got {next}"
        );
    }

    // SIGKILL the VMM; restore the snapshot in a new process.
    let pid = g.pid() as i32;
    // SAFETY: kill(2) on our own child, not yet reaped (Guest reaps it in wait_exit).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(g.wait_exit(Duration::from_secs(10)).is_some());
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vsock);
    let api2 = dir.path().join("api2.sock");
    let mut r = Guest::spawn(
        &[
            "restore",
            "--pool",
            s(&pool),
            "--snapshot",
            "s1",
            "--api-sock",
            s(&api2),
            "--vsock-sock",
            s(&vsock),
        ],
        &[("RUST_LOG", "info")],
    );
    let first = wait_counter_above(&r, 0, 0, Duration::from_secs(120)).unwrap_or_else(|| {
        panic!(
            "restored guest prints no counter; console:\n{}\nstderr:\n{}",
            r.output(),
            r.stderr()
        )
    });
    assert!(
        first >= at_snapshot && first <= at_snapshot + 1,
        "restored counter continues from {at_snapshot}: got {first}"
    );
    assert!(
        r.sync_shell(Duration::from_secs(120)),
        "restored console answers"
    );
    // The guest still has its virtio-mmio (vsock) interrupt line after the restore.
    let from = r.output_len();
    r.send_line("echo VI-$(grep -c virtio /proc/interrupts)-END");
    let count = |t: &str| -> Option<u32> {
        t.split("VI-")
            .filter_map(|x| x.split_once("-END").and_then(|(d, _)| d.parse().ok()))
            .next()
    };
    assert!(r
        .wait_until(from, Duration::from_secs(60), |t| count(t).is_some())
        .is_some());
    let n = count(&r.output()[from..]).unwrap_or(0);
    assert!(n >= 1, "no virtio interrupt line in the restored guest");
    eprintln!(
        "restore log: {}",
        r.stderr()
            .lines()
            .find(|l| l.contains("restored snapshot"))
            .unwrap_or("")
    );
    // Snapshots keep working in the restored VMM.
    let pages = ctl_json(&api2, &["snapshot-pages", "--name", "pg", "--runs", "0:4"]);
    assert_eq!(pages["kind"], "pages");

    // Errors of `pmsnap restore`.
    let locked = run_pmsnap(&["restore", "--pool", s(&pool), "--snapshot", "s1"], &[]);
    locked.expect_error("locked");
    drop(r);
    run_pmsnap(&["restore", "--pool", s(&pool), "--snapshot", "s1"], &[])
        .expect_error("with --vsock-sock");
    run_pmsnap(&["restore", "--pool", s(&pool), "--snapshot", "nope"], &[])
        .expect_error("no snapshot");
    run_pmsnap(&["restore", "--pool", s(&pool), "--snapshot", "pg"], &[])
        .expect_error("a VM snapshot is needed");
    run_pmsnap(
        &[
            "restore",
            "--pool",
            s(&pool),
            "--snapshot",
            "s1",
            "--mem",
            "512M",
        ],
        &[],
    )
    .expect_error("256 MiB");
    run_pmsnap(
        &[
            "restore",
            "--pool",
            s(&pool),
            "--snapshot",
            "s1",
            "--vcpus",
            "1",
        ],
        &[],
    )
    .expect_error("vcpus");
}

#[test]
fn counter_parsing_ignores_partial_lines() {
    assert_eq!(counters("C=1\r\nC=2\nC=3"), vec![1, 2]);
    assert_eq!(counters("xC=10\r\nC=\n"), vec![10]);
}
