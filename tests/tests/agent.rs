//! The guest agent end to end: a real Linux guest, real KVM, virtio-vsock, the VMM's
//! snapshot service and the store. One guest, restored from the suite's ready template
//! (a VM snapshot of a booted guest, so no boot here), serves every check, in order.

use std::time::{Duration, Instant};

use pmsnap_tests::{ctl_json, ready_guest, require_kvm, run_pmsnap};

/// Resident anonymous memory of process `pid` (its heap and stacks, not the guest RAM
/// and pool it maps shared), in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or_else(|| panic!("no RssAnon for pid {pid}"))
}

const CMD_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn agent_saves_and_restores_process_memory_in_a_real_guest() {
    require_kvm!("agent_saves_and_restores_process_memory_in_a_real_guest");
    // Restored from the suite's ready template: no boot.
    // A guest quota of 100 MiB: room for what the test saves below (about 84 MiB of
    // guest-owned snapshots) and one more 8 MiB save, not two.
    let rg = ready_guest(&[("PMSNAP_GUEST_QUOTA", "100M")]);
    let api = rg.api.clone();
    let mut g = rg.guest;
    // The operator's VM snapshot, kept in a repository as it is now: after every attack
    // below it must still hold exactly this.
    ctl_json(&api, &["snapshot-vm", "golden"]);
    let golden_repo = rg.dir.path().join("golden-repo");
    let exported = ctl_json(
        &api,
        &[
            "export",
            "golden",
            "--to",
            golden_repo.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(exported["pages"], 65536, "{exported}");
    let vmm_pid = g.pid();
    let rss_before = rss_kib(vmm_pid);
    let mut run = |cmd: &str| {
        let t = std::time::Instant::now();
        let r = g
            .run(cmd, CMD_TIMEOUT)
            .unwrap_or_else(|| panic!("{cmd:?} did not finish"));
        // Where the time goes: guest kernel work is slow on emulating hosts.
        eprintln!("{:>8.1} s  {cmd}", t.elapsed().as_secs_f64());
        r
    };

    // 64 MiB filled from a seed, saved (no copy), scribbled over, restored, checked.
    let (out, rc) = run("pmsnap-memtest fill-save-restore --mib 64 --seed 11 --name fsr 2>&1");
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("memtest: ok fill-save-restore 64 MiB"),
        "{out}"
    );
    // The same snapshot restored into a second, fresh process.
    let (out, rc) = run("pmsnap-memtest restore-check --mib 64 --seed 11 --name fsr 2>&1");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("memtest: ok"), "{out}");

    // A held process, saved twice without changes: the two saves share every page.
    // The holder prints its line once its buffer is filled; wait for it.
    let (out, rc) = run("pmsnap-memtest hold --mib 8 --seed 5 > /tmp/hold & \
         until [ -s /tmp/hold ]; do sleep 1; done; cat /tmp/hold");
    assert_eq!(rc, 0, "{out}");
    let hold = out
        .lines()
        .find(|l| l.starts_with("memtest: hold pid"))
        .unwrap_or_else(|| panic!("no hold line in {out}"));
    let words: Vec<&str> = hold.split_whitespace().collect();
    let (pid, range) = (words[3], words[5]);
    let addr = range.split('-').next().expect("range start");
    for name in ["h1", "h2"] {
        let (out, rc) = run(&format!(
            "pmsnap-agent save --pid {pid} --range {range} --name {name} 2>&1"
        ));
        assert_eq!(rc, 0, "save {name}: {out}");
    }
    // The host asks for a process snapshot: VMM -> agent (vsock) -> VMM.
    let hp = ctl_json(
        &api,
        &[
            "snapshot-process",
            "--pid",
            pid,
            "--name",
            "hp",
            "--range",
            range,
        ],
    );
    assert_eq!(hp["pages"], 2048, "8 MiB of the held process: {hp}");
    assert_eq!(hp["kind"], "process", "{hp}");
    let stats = ctl_json(&api, &["stats"]);
    let shared = stats["store"]["shared_bytes"]
        .as_u64()
        .expect("shared_bytes");
    assert!(
        shared >= 8 << 20,
        "two saves of an unchanged 8 MiB share it: {stats}"
    );
    // Deleting one leaves the other intact: scribble, restore h2, verify.
    let (out, rc) = run("pmsnap-agent rm h1 2>&1");
    assert_eq!(rc, 0, "{out}");
    let (out, rc) = run(&format!(
        "pmsnap-agent restore --name h2 --pid {pid} --range {range} 2>&1 && \
         pmsnap-memtest verify --pid {pid} --addr {addr} --mib 8 --seed 5 2>&1"
    ));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("memtest: ok verify"), "{out}");
    let (out, rc) = run("pmsnap-agent list --json");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("\"h2\"") && !out.contains("\"h1\""), "{out}");
    // The host's process snapshot belongs to the host: invisible from the guest.
    assert!(!out.contains("\"hp\""), "{out}");
    let (out, rc) = run("pmsnap-agent rm hp 2>&1");
    assert_ne!(rc, 0, "the guest cannot delete the host's snapshot: {out}");
    assert!(out.contains("NotFound"), "{out}");

    // Errors: each a clear one-line message and a non-zero exit.
    let cases = [
        (
            format!("pmsnap-agent restore --name nope --pid {pid} --range {range}"),
            "NotFound",
        ),
        (
            "pmsnap-agent save --pid 999999 --name ghost".to_string(),
            "999999",
        ),
        (
            format!("pmsnap-agent save --pid {pid} --range 0x1000-0x3000 --name unmapped"),
            "not mapped",
        ),
        (
            format!("pmsnap-agent restore --name fsr --pid {pid} --range {range}"),
            "SizeMismatch",
        ),
    ];
    for (cmd, want) in cases {
        let (out, rc) = run(&format!("{cmd} 2>&1"));
        assert_ne!(rc, 0, "{cmd}: {out}");
        assert!(out.contains("pmsnap-agent: error:"), "{cmd}: {out}");
        assert!(out.contains(want), "{cmd}: wanted {want:?} in {out}");
    }
    let stats = ctl_json(&api, &["stats"]);
    assert!(stats["faults"].as_u64().expect("faults") > 0, "{stats}");

    // The trust boundary (issue 12), as an unprivileged guest user (uid 65534).
    let nobody = |cmd: &str| format!("pmsnap-memtest as-uid 65534 {cmd} 2>&1");
    // Straight to the VMM's port from an unprivileged source port: refused (RST), for
    // root too (the source port is what counts), whatever uid the request claims.
    for cmd in [
        "pmsnap-memtest probe-vsock 2>&1".to_string(),
        nobody("pmsnap-memtest probe-vsock --claim-uid 0"),
    ] {
        let (out, rc) = run(&cmd);
        assert_eq!(rc, 0, "{cmd}: {out}");
        assert!(out.contains("memtest: probe refused"), "{cmd}: {out}");
    }
    // Through the agent: root's and the host's snapshots are invisible and untouchable.
    let (out, rc) = run(&nobody("pmsnap-agent list --json"));
    assert_eq!(rc, 0, "{out}");
    assert!(!out.contains("\"h2\"") && !out.contains("\"hp\""), "{out}");
    for (cmd, want) in [
        (nobody("pmsnap-agent rm h2"), "NotFound"),
        (nobody("pmsnap-agent rm hp"), "NotFound"),
        // Another user's process cannot be saved or restored into.
        (
            nobody(&format!(
                "pmsnap-agent save --pid {pid} --range {range} --name steal"
            )),
            "PermissionDenied",
        ),
        (
            nobody(&format!(
                "pmsnap-agent restore --name steal --pid {pid} --range {range}"
            )),
            "PermissionDenied",
        ),
        (
            nobody("pmsnap-agent save --pid 1 --name init"),
            "PermissionDenied",
        ),
    ] {
        let (out, rc) = run(&cmd);
        assert_ne!(rc, 0, "{cmd}: {out}");
        assert!(out.contains(want), "{cmd}: wanted {want:?} in {out}");
    }
    // The user's own process: saved and restored end to end through the agent.
    let (out, rc) = run(&nobody(
        "pmsnap-memtest fill-save-restore --mib 4 --seed 3 --name mine",
    ));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("memtest: ok fill-save-restore 4 MiB"), "{out}");
    // Root's process and the user's snapshot of the same name live side by side.
    let (out, rc) = run(&format!(
        "pmsnap-agent save --pid {pid} --range {range} --name mine 2>&1"
    ));
    assert_eq!(rc, 0, "root's own 'mine': {out}");
    let (out, rc) = run(&nobody("pmsnap-agent list --json"));
    assert_eq!(rc, 0, "{out}");
    let mine: serde_json::Value = serde_json::from_str(
        out.lines()
            .find(|l| l.starts_with('['))
            .unwrap_or_else(|| panic!("{out}")),
    )
    .expect("list json");
    let mine = mine.as_array().expect("array");
    assert_eq!(mine.len(), 1, "{out}");
    assert_eq!(
        (mine[0]["name"].as_str(), mine[0]["uid"].as_u64()),
        (Some("mine"), Some(65534))
    );
    // Root sees both guest uids' snapshots, and still not the host's.
    let (out, rc) = run("pmsnap-agent list --json");
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("\"uid\":65534") && out.contains("\"uid\":0"),
        "{out}"
    );
    assert!(!out.contains("\"hp\""), "{out}");
    // The host sees all of them, in separate name spaces.
    let list = ctl_json(&api, &["list"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    for want in ["hp", "guest:0/h2", "guest:0/mine", "guest:65534/mine"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }

    // The guest quota (issue 12): guest saves beyond it are refused with NoSpace; the
    // host's snapshots are neither counted nor touched, and the VMM goes on.
    let mut refused = None;
    for i in 1..=4 {
        let (out, rc) = run(&format!(
            "pmsnap-agent save --pid {pid} --range {range} --name q{i} 2>&1"
        ));
        if rc != 0 {
            refused = Some((i, out));
            break;
        }
    }
    let (i, out) = refused.expect("a save beyond the 100 MiB guest quota is refused");
    assert!(i >= 2, "the first 8 MiB save fits the quota: {out}");
    assert!(
        out.contains("NoSpace") && out.contains("guest quota exceeded"),
        "{out}"
    );
    let hp_after = ctl_json(&api, &["inspect", "hp"]);
    assert_eq!(
        hp_after["pages"], 2048,
        "the host's snapshot is intact: {hp_after}"
    );
    let (out, rc) = run(&format!(
        "pmsnap-agent rm q1 2>&1 && pmsnap-agent save --pid {pid} --range {range} --name q9 2>&1"
    ));
    assert_eq!(rc, 0, "a delete frees quota: {out}");
    // With the guest's quota used up, heavy guest writes: pages the host's snapshots
    // share are preserved into blocks, and none of those snapshots is dropped (the end
    // of the test compares `golden` byte for byte).
    let (out, rc) = run("dd if=/dev/urandom of=/tmp/heavy bs=1M count=8 2>&1; rm /tmp/heavy");
    assert_eq!(rc, 0, "{out}");
    let stats = ctl_json(&api, &["stats"]);
    assert_eq!(stats["guest_snapshots_dropped"], 0, "{stats}");
    assert!(
        stats["events"].as_array().is_some_and(Vec::is_empty),
        "nothing dropped: {stats}"
    );

    // Floods from guest root (issue 12): at most 8 connections at once, and a burst of
    // requests on one gets Busy beyond the rate limit; the VMM and the agent go on.
    let (out, rc) = run("pmsnap-memtest flood --connections 12 --requests 200 2>&1");
    assert_eq!(rc, 0, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("memtest: flood:"))
        .unwrap_or_else(|| panic!("{out}"));
    let num = |after: &str| -> u64 {
        line.split(after)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.trim_end_matches([',', ';']).parse().ok())
            .unwrap_or_else(|| panic!("{after:?} in {line}"))
    };
    let accepted = num("connections ");
    assert!((1..=8).contains(&accepted), "{line}");
    let (listed, busy) = (num("200: "), num("listed, "));
    assert!(listed >= 32 && busy > 0 && listed + busy == 200, "{line}");
    assert_eq!(ctl_json(&api, &["status"])["state"], "running");
    let (out, rc) = run("pmsnap-agent list --json");
    assert_eq!(rc, 0, "the agent still works after the floods: {out}");

    // Allocation bombs from guest root (issue 12): refused before any allocation.
    let (out, rc) = run("pmsnap-memtest bombs 2>&1");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("memtest: bombs: 4 refused of 4"), "{out}");

    // Fuzzing from inside (issue 12): mutated frames from guest root; the service still
    // answers, the host's snapshot is intact and the agent works.
    let (out, rc) = run("pmsnap-memtest fuzz --frames 300 --seed 7 2>&1");
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("final list answered"), "{out}");
    let hp_after = ctl_json(&api, &["inspect", "hp"]);
    assert_eq!(hp_after["pages"], 2048, "{hp_after}");
    let (out, rc) = run("pmsnap-agent list --json");
    assert_eq!(rc, 0, "the agent works after the fuzzing: {out}");

    // A hostile listener on the agent's port (issue 12): it accepts and trickles a byte a
    // second. The host's process snapshot waits for it, but status and VM snapshots are
    // answered meanwhile; when it goes, the waiting request fails cleanly.
    let (out, rc) = run("killall pmsnap-agent; sleep 1; \
         pmsnap-memtest slow-agent --seconds 120 > /tmp/slow 2>&1 & echo $! > /tmp/slow.pid; \
         until grep -q listening /tmp/slow; do sleep 1; done; cat /tmp/slow");
    assert_eq!(rc, 0, "{out}");
    let waiting = {
        let api = api.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let a = api.to_str().expect("utf-8").to_string();
            let out = run_pmsnap(
                &[
                    "ctl",
                    "--api-sock",
                    &a,
                    "snapshot-process",
                    "--pid",
                    "1",
                    "--name",
                    "slow",
                ],
                &[],
            );
            (out.status.success(), out.stderr, t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    assert_eq!(ctl_json(&api, &["status"])["state"], "running");
    ctl_json(&api, &["snapshot-vm", "during-slow"]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "status and a VM snapshot wait for the slow listener: {:?}",
        t.elapsed()
    );
    assert!(
        !waiting.is_finished(),
        "the process snapshot waits for the listener"
    );
    let (out, rc) = run("kill $(cat /tmp/slow.pid); sleep 1; echo killed");
    assert_eq!(rc, 0, "{out}");
    let (ok, stderr, waited) = waiting.join().expect("waiting thread");
    assert!(
        !ok,
        "a process snapshot from a hostile listener fails: {stderr}"
    );
    assert!(waited < Duration::from_secs(300), "{waited:?}");
    // The agent comes back; the guest answers.
    let (out, rc) = run(
        "pmsnap-agent serve --log /tmp/pmsnap-agent.log </dev/null >/dev/null 2>&1 & \
         sleep 2; pmsnap-agent list --json",
    );
    assert_eq!(rc, 0, "the agent serves again: {out}");

    // After every attack: the VMM's memory grew by less than 64 MiB, and the operator's
    // snapshot is there.
    let rss_after = rss_kib(vmm_pid);
    assert!(
        rss_after < rss_before + 64 * 1024,
        "VMM anonymous RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    ctl_json(&api, &["inspect", "golden"]);

    g.send_line("poweroff -f");
    let status = g.wait_exit(Duration::from_secs(120));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "stderr:\n{}",
        g.stderr()
    );
    // The pool is sound, and the operator's snapshot holds exactly what it held when it
    // was taken (compared with its export from then, page by page).
    let pool = rg.pool.0.to_str().expect("utf-8").to_string();
    let verify = run_pmsnap(&["store", "--pool", &pool, "verify"], &[]);
    assert!(
        verify.status.success(),
        "{}{}",
        verify.stdout,
        verify.stderr
    );
    let copy = rg.dir.path().join("golden-copy.pool");
    let copy_s = copy.to_str().expect("utf-8");
    let repo_s = golden_repo.to_str().expect("utf-8");
    let imp = run_pmsnap(
        &["import", "golden", "--from", repo_s, "--pool", copy_s],
        &[],
    );
    assert!(imp.status.success(), "{}", imp.stderr);
    let a = pmem_backend::Pool::open(&rg.pool.0).expect("pool");
    let b = pmem_backend::Pool::open(&copy).expect("copy");
    for page in 0..65536 {
        let x = a.read_snapshot_page("golden", page).expect("page").1;
        let y = b.read_snapshot_page("golden", page).expect("page").1;
        assert!(x == y, "golden page {page} changed");
    }
    drop(b);
    let _ = std::fs::remove_file(&copy);
}
