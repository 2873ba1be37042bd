//! The guest agent end to end: a real Linux guest, real KVM, virtio-vsock, the VMM's
//! snapshot service and the store. One guest, restored from the suite's ready template
//! (a VM snapshot of a booted guest, so no boot here), serves every check, in order.

use std::time::Duration;

use pmsnap_tests::{ctl_json, ready_guest, require_kvm};

const CMD_TIMEOUT: Duration = Duration::from_secs(600);

#[test]
fn agent_saves_and_restores_process_memory_in_a_real_guest() {
    require_kvm!("agent_saves_and_restores_process_memory_in_a_real_guest");
    // Restored from the suite's ready template: no boot.
    let rg = ready_guest(&[]);
    let api = rg.api.clone();
    let mut g = rg.guest;
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
    assert!(out.contains("\"hp\""), "{out}");

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

    g.send_line("poweroff -f");
    let status = g.wait_exit(Duration::from_secs(120));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "stderr:\n{}",
        g.stderr()
    );
}
