//! Helpers shared by the unit tests.

use crate::catalog::{BlobRef, Snapshot};
use crate::types::normalize_runs;
use crate::{Owner, Page, PageRun, Pool, PoolOptions, SnapshotKind, SnapshotMeta, PAGE_SIZE};
use std::path::PathBuf;

/// A temp directory on /dev/shm when there is one (where pools live), else the default.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pmsnap-test")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

/// A fresh pool of `ram_pages` pages in `dir`, with small metadata.
pub fn small_pool(dir: &tempfile::TempDir, ram_pages: u64, opts: PoolOptions) -> (PathBuf, Pool) {
    let path = dir.path().join("pool");
    let pool = Pool::create(&path, ram_pages * PAGE_SIZE as u64, opts).expect("create pool");
    (path, pool)
}

/// A page filled with a pattern derived from `seed`.
pub fn pattern(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

/// A VM snapshot of `runs` with default metadata; its id.
pub fn vm(pool: &mut Pool, name: &str, runs: &[PageRun]) -> u64 {
    pool.snapshot(name, SnapshotKind::Vm, runs, SnapshotMeta::default())
        .expect("snapshot")
}

/// Write `pattern(seed + p)` into each RAM page p of `pages` (preserving first).
pub fn fill(pool: &mut Pool, pages: std::ops::Range<u64>, seed: u64) {
    for p in pages {
        pool.write_ram_page(p, &pattern(seed + p)).expect("write");
    }
}

/// A catalog record of a host VM snapshot `s{id}` of `runs`, with no state blob (for
/// tests of the catalog, the index and the redirects, which need no pool).
pub fn vm_record(id: u64, runs: &[PageRun]) -> Snapshot {
    Snapshot {
        id,
        name: format!("s{id}"),
        owner: Owner::Host,
        kind: SnapshotKind::Vm,
        created_unix_ns: id,
        labels: Vec::new(),
        process: None,
        runs: runs.to_vec(),
        page_set: normalize_runs(runs),
        blob: BlobRef::default(),
    }
}
