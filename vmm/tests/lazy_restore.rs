//! Lazy restore from a repository (`pmsnap restore --from REPO`), with the real binary on
//! real KVM and the pattern payload (tests/payload/pattern.S), which rewrites its 48 MiB
//! region every round on 2 vCPUs.
//!
//! - A VM snapshot is exported live while the guest runs; the VMM is killed and its pool
//!   deleted; a lazy restore from the repository into a new pool runs the guest on from
//!   the snapshot (every word it wrote is a later round of the same page), and every
//!   page arrives.
//! - A VM snapshot taken while most pages are still missing (`--fill on-demand`) holds
//!   exactly the guest's memory: its live export and a rollback to it agree byte for
//!   byte, and it is a valid continuation of the first snapshot.
//! - A damaged pack stops the VM with an error naming the pack; nothing else is mapped.
//! - The live export records the order the guest wrote pages in after the snapshot, and
//!   the restore's read-ahead fetches those pages first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pmsnap_repo::{DirStorage, Repo};

mod common;
use common::pattern::{guest_continued, MEM, MEM_ARG, PAGES, REGION_FIRST, WORDS};
use common::{kvm_missing, pmsnap_bin, ApiVmm};

fn pmsnap(args: &[&str]) -> Output {
    Command::new(pmsnap_bin())
        .args(args)
        .output()
        .expect("run pmsnap")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `pmsnap ctl --api-sock SOCK export NAME --to REPO` must succeed.
fn live_export(sock: &Path, name: &str, repo: &Path) {
    let o = pmsnap(&[
        "ctl",
        "--api-sock",
        s(sock),
        "--json",
        "export",
        name,
        "--to",
        s(repo),
    ]);
    assert!(
        o.status.success(),
        "export {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Snapshot `name`'s guest RAM as words and its vCPUs' payload rounds (r12), from the
/// repository.
fn from_repo(repo: &Path, name: &str) -> (Vec<u64>, Vec<u64>) {
    let repo = Repo::open_or_init(DirStorage::new(repo).expect("storage")).expect("repo");
    common::pattern::from_repository(&repo, name)
}

/// Guest RAM of a (paused) VMM's pool, read from the file (pages not filled yet read
/// as zeros).
fn ram_of(pool: &Path) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    // The RAM area's offset: superblock field ram_offset (bytes 40..48,
    // docs/pool-format.md); the VMM holds the pool's lock, so it cannot be opened.
    let mut b = [0u8; 8];
    let f = std::fs::File::open(pool).expect("open pool");
    f.read_exact_at(&mut b, 40).expect("superblock");
    common::pattern::read_ram(pool, u64::from_le_bytes(b))
}

/// Start a lazy restore of `name` from `repo` into a new pool `pool`.
fn restore_lazy(
    dir: &Path,
    tag: &str,
    repo: &Path,
    name: &str,
    pool: &Path,
    extra: &[&str],
) -> ApiVmm {
    let mut args = vec!["restore", name, "--from", s(repo), "--pool", s(pool)];
    args.extend_from_slice(extra);
    ApiVmm::spawn(dir, tag, args).unwrap_or_else(|e| panic!("{e}"))
}

fn wait_complete(vmm: &ApiVmm) -> vmm::snapshot::lazy::FillStats {
    pmsnap_testenv::poll_until(Duration::from_secs(60), || {
        vmm.api
            .status()
            .ok()
            .and_then(|s| s.lazy_fill)
            .filter(|f| f.complete)
    })
    .unwrap_or_else(|| panic!("the fill did not complete: {}", vmm.log_tail(20)))
}

struct Setup {
    dir: tempfile::TempDir,
    repo: PathBuf,
    v1: Vec<u64>,
    rounds: Vec<u64>,
}

/// A payload guest whose VM snapshot `v1` was exported live to a repository while it
/// ran; the VMM is killed and its pool removed.
fn exported_guest() -> Setup {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let pool = dir.path().join("a.pool");
    let repo = dir.path().join("repo");
    let mut vmm = ApiVmm::spawn_payload(dir.path(), "a", &pool, MEM_ARG, &[]);
    std::thread::sleep(Duration::from_millis(200));
    vmm.api.snapshot_vm("v1").expect("snapshot");
    live_export(&dir.path().join("a.sock"), "v1", &repo);
    vmm.child.kill().expect("kill");
    vmm.child.wait().expect("reap");
    std::fs::remove_file(&pool).expect("remove the pool");
    let (v1, rounds) = from_repo(&repo, "v1");
    assert!(
        rounds.iter().all(|&r| r > 0),
        "the guest ran before v1: {rounds:?}"
    );
    Setup {
        dir,
        repo,
        v1,
        rounds,
    }
}

#[test]
fn a_lazily_restored_guest_goes_on_and_a_mid_fill_snapshot_is_exact() {
    if kvm_missing("a_lazily_restored_guest_goes_on_and_a_mid_fill_snapshot_is_exact") {
        return;
    }
    let t = exported_guest();
    let d = t.dir.path();

    // The live export recorded the pages the guest wrote after v1 (the payload rewrites
    // its region every round), in that order.
    let repo = Repo::open_or_init(DirStorage::new(&t.repo).expect("storage")).expect("repo");
    let order = repo
        .manifest("v1")
        .expect("manifest")
        .touch_order()
        .to_vec();
    let hint: u64 = order.iter().map(|r| r.count).sum();
    let in_region = order
        .iter()
        .filter(|r| r.first >= REGION_FIRST as u64)
        .map(|r| r.count)
        .sum::<u64>();
    assert!(
        hint > 0 && in_region * 2 > hint,
        "the touch order holds the region's pages: {} runs, {hint} pages, {in_region} in the region",
        order.len()
    );

    // 1. Background fill: the guest runs on from v1 and every page arrives, the pages of
    // the touch order first.
    let pool = d.join("b.pool");
    let vmm = restore_lazy(d, "b", &t.repo, "v1", &pool, &[]);
    let fill = wait_complete(&vmm);
    assert_eq!(fill.pages, PAGES, "{fill:?}");
    assert!(fill.error.is_none(), "{fill:?}");
    assert_eq!(fill.hint_pages, hint, "{fill:?}");
    assert!(
        fill.hinted_pages > 0,
        "the read-ahead used the order: {fill:?}"
    );
    assert!(
        vmm.log()
            .contains("in the order the guest touched them after the snapshot"),
        "{}",
        vmm.log_tail(20)
    );
    assert!(
        !marker(&pool).exists(),
        "the fill marker goes once every page is in"
    );
    vmm.api.pause().expect("pause");
    let now = ram_of(&pool);
    let changed = guest_continued(&now, &t.v1, &t.rounds).unwrap_or_else(|e| panic!("{e}"));
    assert!(changed > 0, "the guest wrote after the restore");
    drop(vmm);

    // 2. On demand only: a snapshot taken while most pages are missing.
    let pool = d.join("c.pool");
    let vmm = restore_lazy(d, "c", &t.repo, "v1", &pool, &["--fill", "on-demand"]);
    std::thread::sleep(Duration::from_millis(200));
    vmm.api.pause().expect("pause");
    let before = vmm.api.status().expect("status").lazy_fill.expect("fill");
    assert!(
        !before.complete && before.present < PAGES,
        "pages are still missing: {before:?}"
    );
    assert!(
        before.demanded > 0,
        "the guest's touches were served: {before:?}"
    );
    vmm.api.snapshot_vm("v2").expect("snapshot mid-fill");
    vmm.api.resume().expect("resume");
    // The export reads every page of v2 through the store, missing ones included.
    let repo2 = d.join("repo2");
    live_export(&d.join("c.sock"), "v2", &repo2);
    std::thread::sleep(Duration::from_millis(100));
    vmm.api.pause().expect("pause");
    let back = vmm.api.rollback("v2").expect("rollback");
    assert!(back.pages_copied > 0, "the guest wrote since v2: {back:?}");
    let (v2, rounds2) = from_repo(&repo2, "v2");
    let ram = ram_of(&pool);
    if let Some((p, n)) = common::pattern::first_difference(&ram, &v2) {
        panic!("after the rollback, RAM differs from the export of v2 at page {p} ({n} pages)");
    }
    guest_continued(&v2, &t.v1, &t.rounds)
        .unwrap_or_else(|e| panic!("v2 is not a continuation of v1: {e}"));
    assert!(
        rounds2.iter().zip(&t.rounds).all(|(a, b)| a >= b),
        "v2's rounds {rounds2:?} are not older than v1's {:?}",
        t.rounds
    );
    assert_eq!(ram.len(), PAGES as usize * WORDS);
    let after = vmm.api.status().expect("status").lazy_fill.expect("fill");
    assert!(
        after.complete && !marker(&pool).exists(),
        "exporting v2 read every page through the store, which brought them all in: {after:?}"
    );
}

/// The fill marker of a lazily restored pool.
fn marker(pool: &Path) -> PathBuf {
    pmem_backend::filling_marker(pool)
}

#[test]
fn a_damaged_pack_stops_the_vm_with_an_error_naming_it() {
    if kvm_missing("a_damaged_pack_stops_the_vm_with_an_error_naming_it") {
        return;
    }
    let t = exported_guest();
    let d = t.dir.path();
    let pack_id = common::damage_largest_pack(&t.repo);

    let pool = d.join("b.pool");
    let mut vmm = restore_lazy(d, "b", &t.repo, "v1", &pool, &[]);
    let st = vmm
        .wait(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}: {}", vmm.log_tail(20)));
    assert_eq!(st.code(), Some(1), "{}", vmm.log_tail(20));
    let log = vmm.log();
    assert!(
        log.contains(&pack_id) && log.contains("lazy restore"),
        "the error names the pack: {}",
        vmm.log_tail(20)
    );
    assert!(!log.contains("panicked"), "{log}");
    // The pool it left has holes: nothing opens it as if it were whole.
    assert!(marker(&pool).exists());
    let o = pmsnap(&["store", "ls", "--pool", s(&pool)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("incomplete") && err.contains("repository"),
        "an unfilled pool is refused: {err}"
    );
}

/// `ram` read from a pool whose missing pages read as zeros, with those pages taken
/// from `from` (the payload never writes a page of zeros).
fn holes_as(mut ram: Vec<u64>, from: &[u64]) -> Vec<u64> {
    for (page, src) in ram.chunks_exact_mut(WORDS).zip(from.chunks_exact(WORDS)) {
        if page.iter().all(|&w| w == 0) {
            page.copy_from_slice(src);
        }
    }
    ram
}

/// RAM bytes the pool file holds (allocated), from its size on tmpfs: everything but
/// RAM is allocated at creation.
fn ram_allocated(pool: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(pool).expect("stat pool");
    (m.blocks() * 512).saturating_sub(m.len() - MEM)
}

#[test]
fn clones_of_one_snapshot_run_side_by_side_each_with_its_own_memory() {
    if kvm_missing("clones_of_one_snapshot_run_side_by_side_each_with_its_own_memory") {
        return;
    }
    let t = exported_guest();
    let d = t.dir.path();
    let pools: Vec<PathBuf> = (0..3).map(|i| d.join(format!("clone{i}.pool"))).collect();
    let clones: Vec<ApiVmm> = pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let tag = format!("clone{i}");
            let extra = ["--fill", "on-demand", "--block-area", "4M"];
            restore_lazy(d, &tag, &t.repo, "v1", p, &extra)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    for (i, (vmm, pool)) in clones.iter().zip(&pools).enumerate() {
        vmm.api.pause().expect("pause");
        let fill = vmm.api.status().expect("status").lazy_fill.expect("fill");
        assert!(
            fill.error.is_none() && !fill.complete,
            "clone {i}: {fill:?}"
        );
        let changed = guest_continued(&holes_as(ram_of(pool), &t.v1), &t.v1, &t.rounds)
            .unwrap_or_else(|e| panic!("clone {i}: {e}"));
        assert!(changed > 0, "clone {i} ran");
        // The payload rewrites its 48 MiB region; the 16 MiB below it it barely reads.
        let held = ram_allocated(pool);
        assert!(
            held < MEM - (8 << 20) && held >= fill.present * 4096 - (1 << 20),
            "clone {i} holds {held} bytes of RAM for {} pages present",
            fill.present
        );
    }
}
