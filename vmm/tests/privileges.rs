//! `--uid/--gid`: once set up, every thread of a running VMM runs as the given user and
//! group (no supplementary groups), with its seccomp filter on, and the VM still works:
//! VM snapshot, rollback, stats, a live export into a directory that user may write.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use pmsnap_testenv::poll_until;

mod common;
use common::{kvm_missing, ApiVmm};

const NOBODY: u32 = 65534;

/// (thread name, uid line, gid line, groups line) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status = std::fs::read_to_string(t.expect("task").path().join("status"));
        let Ok(status) = status else { continue }; // a thread that just ended
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| {
                    l[k.len()..]
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Uid:"),
            field("Gid:"),
            field("Groups:"),
        ));
    }
    out
}

#[test]
fn every_vmm_thread_runs_as_the_given_user_and_the_vm_works() {
    if kvm_missing("every_vmm_thread_runs_as_the_given_user_and_the_vm_works")
        || pmsnap_testenv::skip_or_fail(
            "every_vmm_thread_runs_as_the_given_user_and_the_vm_works",
            pmsnap_testenv::root_unavailable("changing user ids"),
        )
    {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let pool = dir.path().join("p.pool");
    let vmm = ApiVmm::spawn_payload(
        dir.path(),
        "vmm",
        &pool,
        "32M",
        &["--uid", "65534", "--gid", "65534"],
    );
    let pid = vmm.child.id();
    let want = format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}");
    // The main thread drops just after the API socket is served: wait for it.
    let all_dropped = poll_until(Duration::from_secs(10), || {
        let t = threads(pid);
        t.iter().all(|(_, uid, _, _)| *uid == want).then_some(t)
    });
    let t = all_dropped.unwrap_or_else(|| panic!("threads not all dropped: {:?}", threads(pid)));
    for (name, uid, gid, groups) in &t {
        assert_eq!(uid, &want, "{name}");
        assert_eq!(gid, &want, "{name}");
        assert_eq!(groups, "", "{name}: supplementary groups dropped");
    }
    let names: Vec<&str> = t.iter().map(|(n, ..)| n.as_str()).collect();
    for expected in [
        "vcpu0",
        "vcpu1",
        "pmsnap-fault",
        "pmsnap-api",
        "pmsnap-export",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let sock = std::fs::metadata(dir.path().join("vmm.sock")).expect("socket");
    assert_eq!(sock.uid(), NOBODY, "the API socket belongs to the user");

    // The VM works as that user (seccomp on): snapshot, rollback, stats, live export.
    vmm.api.snapshot_vm("v").expect("snapshot");
    std::thread::sleep(Duration::from_millis(200));
    vmm.api.rollback("v").expect("rollback");
    assert!(vmm.api.stats().expect("stats").faults > 0);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("out dir");
    std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let rep = vmm
        .api
        .request_json(
            "POST",
            "/v1/snapshots/v/export",
            Some(&serde_json::json!({ "to": out.join("repo").display().to_string() })),
        )
        .unwrap_or_else(|e| panic!("export: {e}: {}", vmm.log_tail(20)));
    assert_eq!(rep["pages"], 8192, "{rep}");
    let config = std::fs::metadata(out.join("repo/config")).expect("repo config");
    assert_eq!(config.uid(), NOBODY, "the export wrote as the user");
    assert!(
        vmm.child.id() == pid && vmm.api.status().is_ok(),
        "{}",
        vmm.log_tail(20)
    );
    drop(vmm);
    assert!(Path::new(&pool).exists(), "a given pool is kept");
}
