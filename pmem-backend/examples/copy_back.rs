//! Copy-back throughput (issue 16 part 4): a rollback or restore copies the pages a VM
//! snapshot holds in blocks back into RAM (`Pool::copy_back`: each block's crc32c
//! checked, RAM preserved first for any other snapshot, the RAM writes persisted as one
//! batch). The baseline is the physical floor measured in the same run: a memcpy of the
//! same number of bytes into memory that is already faulted in.
//!
//! `cargo run --release -p pmem-backend --example copy_back [-- MIB PERCENT]` (default
//! 1024 MiB of RAM, 10% of it in blocks). Prints two lines ending in `ratio=R goal>=0.5`
//! (throughput of the copy-back over the memcpy's): one with the pages written after
//! the snapshot in page order (their blocks lie in page order too), one with them
//! written in a shuffled order, as a guest writes them (each block a cold 4 KiB
//! somewhere else in the block area).

use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind};

const PAGE: usize = 4096;

/// Copy back every `step`-th page of a `mib` MiB pool, written after the snapshot in
/// page order or shuffled: the pages and the median time of 5 copy-backs.
fn copy_back(mib: u64, percent: u64, shuffled: bool) -> (usize, Duration) {
    let pages = mib * 256;
    let moved = pages * percent / 100;
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let mut pool =
        Pool::create(dir.path().join("p.pool"), mib << 20, PoolOptions::default()).expect("pool");
    // Every page written, so RAM is faulted in, like a running guest's.
    let mut page = [0u8; PAGE];
    for p in 0..pages {
        page[..8].copy_from_slice(&p.to_le_bytes());
        pool.write_ram_page(p, &page).expect("write");
    }
    pool.snapshot(
        "s",
        SnapshotKind::Vm,
        &[PageRun::new(0, pages)],
        Default::default(),
    )
    .expect("snapshot");
    // Every (100/percent)-th page written after the snapshot: preserved into a block.
    let step = 100 / percent.max(1);
    let mut written: Vec<u64> = (0..pages)
        .step_by(step as usize)
        .take(moved as usize)
        .collect();
    if shuffled {
        common::shuffle(&mut written);
    }
    let runs: Vec<PageRun> = written.iter().map(|&p| PageRun::new(p, 1)).collect();
    let mut rounds = Vec::new();
    for round in 0..5u8 {
        page.fill(round + 1);
        for &p in &written {
            pool.write_ram_page(p, &page)
                .expect("write after the snapshot");
        }
        let t = Instant::now();
        let back = pool.copy_back("s", &runs).expect("copy back");
        rounds.push(t.elapsed());
        assert_eq!(back.len(), written.len());
    }
    rounds.sort();
    (written.len(), rounds[rounds.len() / 2])
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = args.first().copied().unwrap_or(1024);
    let percent = args.get(1).copied().unwrap_or(10);
    let step = 100 / percent.max(1);
    let (n, in_order) = copy_back(mib, percent, false);
    let (_, shuffled) = copy_back(mib, percent, true);
    // The floor: the same bytes memcpy'd into faulted-in memory, median of 5.
    let bytes = n * PAGE;
    let src = vec![7u8; bytes];
    let mut dst = vec![1u8; bytes];
    let mut floor: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            t.elapsed()
        })
        .collect();
    floor.sort();
    let floor = floor[2];
    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    for (what, copy) in [("", in_order), (", written in shuffled order", shuffled)] {
        println!(
            "copy-back of {n} pages ({percent}% of {mib} MiB, every {step}th page{what}): {:.1} ms, \
             {:.2} GB/s ({:.2} us/page); memcpy of the same bytes: {:.1} ms, {:.2} GB/s; \
             ratio={:.2} goal>=0.5",
            copy.as_secs_f64() * 1e3,
            gbps(copy),
            copy.as_secs_f64() * 1e6 / n as f64,
            floor.as_secs_f64() * 1e3,
            gbps(floor),
            floor.as_secs_f64() / copy.as_secs_f64()
        );
    }
}
