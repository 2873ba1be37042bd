//! A full block area never costs the host a snapshot, end to end on real KVM: the
//! pattern payload writes every page of a 16 MiB region on 2 vCPUs at full speed while
//! the pool's block area has room for only 64 pages. After a VM snapshot the writes
//! wait (status `paused: block area full`) instead of dropping it; `pmsnap ctl pool
//! grow` lets them go on; when it fills again, deleting a snapshot does.

use std::time::Duration;

use pmsnap_testenv::poll_until;
use vmm::api::VmState;

mod common;
use common::{kvm_missing, payload, pmsnap_bin, ApiVmm};

fn state(vmm: &ApiVmm) -> VmState {
    vmm.api.status().expect("status").state
}

fn wait_for(vmm: &ApiVmm, want: VmState, what: &str) {
    let got = poll_until(Duration::from_secs(60), || {
        (state(vmm) == want).then_some(())
    });
    assert!(
        got.is_some(),
        "{what}: state {:?}, not {want:?}; {:?}; {}",
        state(vmm),
        vmm.api.stats(),
        vmm.log_tail(20)
    );
}

#[test]
fn a_full_block_area_waits_for_grow_or_delete_and_drops_no_host_snapshot() {
    if kvm_missing("a_full_block_area_waits_for_grow_or_delete_and_drops_no_host_snapshot") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let pool = dir.path().join("p.pool");
    // 32 MiB of RAM: the payload's region is the 16 MiB above its code.
    let vmm = ApiVmm::spawn_payload(dir.path(), "vmm", &pool, "32M", &["--block-area", "256K"]);

    // The payload writes every region page each round: the first writes after the
    // snapshot need more than the 64 blocks there are, and only a host snapshot holds
    // them.
    vmm.api.snapshot_vm("base").expect("snapshot base");
    wait_for(&vmm, VmState::BlockAreaFull, "after the snapshot");
    let stats = vmm.api.stats().expect("stats");
    assert!(stats.block_wait.is_some(), "{stats:?}");
    assert_eq!(stats.snapshots, 1, "the host snapshot is kept");
    assert_eq!(stats.guest_snapshots_dropped, 0);
    assert!(
        stats.events.is_empty(),
        "nothing dropped: {:?}",
        stats.events
    );

    // Grow by 20 MiB: room for every page of RAM once; the writes go on.
    let grown = vmm
        .api
        .request_json(
            "POST",
            "/v1/pool/grow",
            Some(&serde_json::json!({ "add_bytes": 20 << 20 })),
        )
        .unwrap_or_else(|e| panic!("grow: {e}: {}", vmm.log_tail(30)));
    assert_eq!(grown["old_block_count"], 64, "{grown}");
    assert_eq!(grown["new_block_count"], 64 + 5120, "{grown}");
    wait_for(&vmm, VmState::Running, "after the grow");
    // Every region page written once since "base": 4096 pages preserved, 1,088 blocks
    // left, fewer than the second snapshot's writes need.
    let all = poll_until(Duration::from_secs(60), || {
        let s = vmm.api.stats().expect("stats");
        (s.preserved_pages >= 4096).then_some(s)
    });
    let stats = all.unwrap_or_else(|| panic!("the payload stalled: {}", vmm.log_tail(20)));
    assert!(stats.block_wait.is_none(), "{stats:?}");

    // A second snapshot fills the area again; deleting the first frees its blocks.
    vmm.api.snapshot_vm("second").expect("snapshot second");
    wait_for(&vmm, VmState::BlockAreaFull, "after the second snapshot");
    vmm.api.delete("base").expect("delete base");
    wait_for(&vmm, VmState::Running, "after the delete");
    let stats = vmm.api.stats().expect("stats");
    assert_eq!(stats.snapshots, 1);
    assert!(
        stats.events.is_empty(),
        "nothing dropped: {:?}",
        stats.events
    );
    drop(vmm);

    // The pool is sound and keeps the grown geometry.
    let out = std::process::Command::new(pmsnap_bin())
        .args(["store", "verify", "--pool"])
        .arg(&pool)
        .output()
        .expect("pmsnap store verify");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = pmem_backend::Pool::open(&pool).expect("open");
    assert_eq!(p.geometry().block_count, 64 + 5120);
    assert!(p.inspect("second").is_ok());
}

#[test]
fn a_pool_placed_on_a_numa_node_has_its_pages_there_and_a_missing_node_is_refused() {
    if kvm_missing("a_pool_placed_on_a_numa_node_has_its_pages_there") {
        return;
    }
    // This machine has one node: node 0 is where the pages go anyway, so this checks
    // the option, the query and the report, not a remote placement.
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let pool = dir.path().join("n.pool");
    let vmm = ApiVmm::spawn_payload(dir.path(), "numa", &pool, "32M", &["--pool-node", "0"]);
    let bin = payload(dir.path());
    let log = vmm.log_tail(40);
    let line = log
        .lines()
        .find(|l| l.contains("is on NUMA node 0: node0="))
        .unwrap_or_else(|| panic!("no placement line: {log}"));
    let pages: u64 = line
        .rsplit("node0=")
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let file_pages = std::fs::metadata(&pool).expect("pool").len() / 4096;
    assert_eq!(
        pages, file_pages,
        "every page of the pool file is on node 0"
    );
    drop(vmm);
    let out = std::process::Command::new(pmsnap_bin())
        .args(["run", "--mem", "32M", "--pool-node", "4095", "--payload"])
        .arg(&bin)
        .arg("--pool")
        .arg(dir.path().join("m.pool"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NUMA node 4095 has no memory here"), "{err}");
    assert!(!dir.path().join("m.pool").exists(), "nothing created");
}
