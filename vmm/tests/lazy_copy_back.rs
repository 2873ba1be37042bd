//! Lazy copy back (`pmsnap restore --copy-back lazy`), with the real binary on real KVM
//! and the pattern payload (tests/payload/pattern.S), which rewrites its 48 MiB region
//! every round on 2 vCPUs: after a VM snapshot the guest goes on writing, so nearly
//! every page of the region is preserved into a block, and a restore of that snapshot
//! has thousands of pages to copy back.
//!
//! - Restored lazily (the pages punched out of RAM and filled from their blocks on
//!   first access and in the background), the guest goes on from the snapshot, every
//!   page arrives and the fill marker goes.
//! - VM snapshots taken while pages are still missing (`--fill on-demand`) are exact,
//!   also after the VMM is killed mid-fill: reopening the pool fills the holes from the
//!   restored snapshot's blocks, and a restore of each snapshot gives its content byte
//!   for byte.

use std::path::Path;
use std::time::Duration;

use pmem_backend::Pool;

mod common;
use common::pattern::{first_difference, guest_continued, read_ram, MEM_ARG, WORDS};
use common::{kvm_missing, ApiVmm};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Guest RAM of a (paused) VMM's pool, read from the file: pages still missing read as
/// zeros.
fn ram_of(pool: &Path) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    // The RAM area's offset: superblock field ram_offset (bytes 40..48,
    // docs/pool-format.md); the VMM holds the pool's lock, so it cannot be opened.
    let mut b = [0u8; 8];
    let f = std::fs::File::open(pool).expect("open pool");
    f.read_exact_at(&mut b, 40).expect("superblock");
    read_ram(pool, u64::from_le_bytes(b))
}

/// `ram` with its all-zero pages (holes of a lazy copy back) taken from `from` (the
/// payload never writes a page of zeros, and the pages below its region that are zero
/// stay so).
fn holes_as(mut ram: Vec<u64>, from: &[u64]) -> Vec<u64> {
    for (page, src) in ram.chunks_exact_mut(WORDS).zip(from.chunks_exact(WORDS)) {
        if page.iter().all(|&w| w == 0) {
            page.copy_from_slice(src);
        }
    }
    ram
}

/// The payload's rounds (r12) in VM snapshot `name`'s saved registers.
fn rounds_of(pool: &Path, name: &str) -> Vec<u64> {
    let p = Pool::open(pool).expect("open the pool");
    let blob = p.read_state(name).expect("state");
    let st = vmm::persist::VmState::decode(&blob).expect("decode");
    st.vcpus.iter().map(|v| v.regs.r12).collect()
}

fn restore(dir: &Path, tag: &str, pool: &Path, name: &str, extra: &[&str]) -> ApiVmm {
    let mut args = vec!["restore", name, "--pool", s(pool)];
    args.extend_from_slice(extra);
    ApiVmm::spawn(dir, tag, args).unwrap_or_else(|e| panic!("{e}"))
}

fn kill(mut vmm: ApiVmm) {
    vmm.child.kill().expect("kill -9");
    vmm.child.wait().expect("reap");
}

#[test]
fn a_lazy_copy_back_goes_on_and_snapshots_and_crashes_mid_fill_are_exact() {
    if kvm_missing("a_lazy_copy_back_goes_on_and_snapshots_and_crashes_mid_fill_are_exact") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let d = dir.path();
    let pool = d.join("a.pool");

    // v1, then the guest rewrites its region: v1's pages go into blocks.
    // Room for the blocks of v1, v2 and v3 and the restores' preserves.
    let vmm = ApiVmm::spawn_payload(d, "a", &pool, MEM_ARG, &["--block-area", "256M"]);
    std::thread::sleep(Duration::from_millis(200));
    vmm.api.pause().expect("pause");
    vmm.api.snapshot_vm("v1").expect("snapshot v1");
    let v1 = ram_of(&pool);
    vmm.api.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(1500));
    kill(vmm);
    let rounds = rounds_of(&pool, "v1");
    assert!(
        rounds.iter().all(|&r| r > 0),
        "the guest ran before v1: {rounds:?}"
    );
    let in_blocks = {
        let p = Pool::open(&pool).expect("open");
        let runs = p.inspect("v1").expect("v1").runs;
        p.preserved_pages("v1", &runs).expect("pages").len()
    };
    assert!(
        in_blocks > 4096,
        "v1 has many pages to copy back: {in_blocks}"
    );

    // 1. Lazily, in the background: the guest goes on from v1 and every page arrives.
    let vmm = restore(d, "b", &pool, "v1", &["--copy-back", "lazy"]);
    let fill = pmsnap_testenv::poll_until(Duration::from_secs(60), || {
        vmm.api
            .status()
            .ok()
            .and_then(|s| s.lazy_fill)
            .filter(|f| f.complete)
    })
    .unwrap_or_else(|| panic!("the fill did not complete: {}", vmm.log_tail(20)));
    assert!(fill.error.is_none(), "{fill:?}");
    // Each hole is copied in once (a demand and the read-ahead racing for one page
    // count it once copied and once already present).
    let copied = fill.demanded + fill.background_pages;
    assert!(
        copied <= in_blocks as u64 && copied + fill.already_present >= in_blocks as u64,
        "the pages in blocks, and only they, were filled: {fill:?}"
    );
    assert_eq!(fill.present, fill.pages, "{fill:?}");
    assert!(
        vmm.log().contains(&format!("{in_blocks} arrive lazily")),
        "{}",
        vmm.log_tail(10)
    );
    assert!(!pmem_backend::filling_marker(&pool).exists());
    vmm.api.pause().expect("pause");
    let changed = guest_continued(&ram_of(&pool), &v1, &rounds).unwrap_or_else(|e| panic!("{e}"));
    assert!(changed > 0, "the guest wrote after the restore");
    kill(vmm);

    // 2. On demand only, started paused: v2 is taken before the guest touched anything
    // (nearly every page of v1's blocks still a hole), v3 after it ran for a moment,
    // then the VMM is killed mid-fill.
    let vmm = restore(
        d,
        "c",
        &pool,
        "v1",
        &["--copy-back", "lazy", "--fill", "on-demand", "--paused"],
    );
    let mid = vmm.api.status().expect("status").lazy_fill.expect("fill");
    assert!(
        !mid.complete && mid.pages - mid.present > 2000,
        "pages still missing: {mid:?}"
    );
    vmm.api.snapshot_vm("v2").expect("snapshot mid-fill");
    // A snapshot's content: RAM now, its holes holding v1's content (what fills them).
    let v2 = holes_as(ram_of(&pool), &v1);
    vmm.api.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(5));
    vmm.api.pause().expect("pause");
    let late = vmm.api.status().expect("status").lazy_fill.expect("fill");
    assert!(
        !late.complete && late.demanded > 0,
        "the guest ran, pages still missing: {late:?}"
    );
    vmm.api.snapshot_vm("v3").expect("snapshot mid-fill");
    let v3 = holes_as(ram_of(&pool), &v1);
    guest_continued(&v3, &v1, &rounds).unwrap_or_else(|e| panic!("v3 from v1: {e}"));
    kill(vmm);
    assert!(
        pmem_backend::filling_marker(&pool).exists(),
        "killed mid-fill"
    );

    // 3. Each snapshot restores exactly (the first restore's open finishes the fill).
    for (name, want) in [("v3", &v3), ("v2", &v2), ("v1", &v1)] {
        let vmm = restore(d, name, &pool, name, &["--paused"]);
        let ram = ram_of(&pool);
        if let Some((p, n)) = first_difference(&ram, want) {
            panic!("restored {name} differs at page {p} ({n} pages)");
        }
        kill(vmm);
        assert!(!pmem_backend::filling_marker(&pool).exists());
    }
    let o = std::process::Command::new(common::pmsnap_bin())
        .args(["store", "verify", "--pool", s(&pool)])
        .output()
        .expect("verify");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}
