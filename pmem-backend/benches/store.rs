//! Store benchmarks, all in one run on a pool on /dev/shm (256 MiB RAM = 65,536 pages):
//! - snapshot of 65,536 pages given as runs vs copying 256 MiB into a preallocated buffer;
//! - preserve of one page vs a bare 4 KiB copy plus the same persist call;
//! - delete of a 65,536-page snapshot.
//!
//! Run: `cargo bench -p pmem-backend --bench store -- --warm-up-time 1 --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion};
use pmem_backend::mapping::Mapping;
use pmem_backend::{
    MsyncPersist, PageRun, Persist, Pool, PoolOptions, SnapshotKind, SnapshotMeta, PAGE_SIZE,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const PAGES: u64 = 65_536;
const RAM: u64 = PAGES * PAGE_SIZE as u64;

fn runs() -> Vec<PageRun> {
    // 16 runs of 4,096 pages: what a VM with a few memory regions would pass.
    (0..16).map(|i| PageRun::new(i * 4096, 4096)).collect()
}

fn snap(pool: &mut Pool, name: &str) {
    pool.snapshot(name, SnapshotKind::Vm, &runs(), SnapshotMeta::default())
        .expect("snapshot");
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("pmsnap-bench")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let mut pool =
        Pool::create(dir.path().join("pool"), RAM, PoolOptions::default()).expect("create pool");
    // Fill RAM so pages are real (not tmpfs holes).
    let ram_off = pool.ram_offset();
    let geo = pool.geometry();
    let map = Mapping::new(pool.file(), geo.file_size as usize).expect("bench mapping");
    // Pre-fault the bench's own mapping the way the store pre-faults its own.
    map.populate(0, geo.file_size, true);
    let fill: Vec<u8> = (0..RAM).map(|i| (i % 251) as u8).collect();
    map.write_at(ram_off, &fill).expect("fill RAM");

    let msync = MsyncPersist::for_file(pool.file());
    let mut g = c.benchmark_group("store");

    // Copy 256 MiB into a preallocated (pre-faulted) buffer.
    let mut dst = vec![1u8; RAM as usize];
    g.bench_function("copy_256MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(&fill);
            black_box(&dst);
        })
    });
    drop(dst);

    let mut n = 0u64;
    g.bench_function("snapshot_65536_pages_as_runs", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let name = format!("s{n}");
                let t = Instant::now();
                snap(&mut pool, &name);
                total += t.elapsed();
                pool.delete(name.as_str()).expect("delete");
            }
            total
        })
    });

    g.bench_function("delete_65536_page_snapshot", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let name = format!("d{n}");
                snap(&mut pool, &name);
                let t = Instant::now();
                black_box(pool.delete(name.as_str()).expect("delete"));
                total += t.elapsed();
            }
            total
        })
    });

    // Bare 4 KiB copy (RAM page -> block slot) plus the same msync persist preserve uses.
    let mut p = 0u64;
    g.bench_function("bare_4KiB_copy_plus_persist", |b| {
        b.iter(|| {
            let src = geo.ram_page_offset(p % PAGES);
            let dstoff = geo.block_offset_of(p % geo.block_count);
            map.copy_within(src, dstoff, PAGE_SIZE).expect("copy");
            msync
                .persist(&map, dstoff..dstoff + PAGE_SIZE as u64)
                .expect("persist");
            p += 1;
        })
    });

    // The persist call alone (msync of one 4 KiB page), to see how much of each figure
    // above is the syscall.
    g.bench_function("persist_4KiB_only", |b| {
        b.iter(|| {
            let dstoff = geo.block_offset_of(p % geo.block_count);
            msync
                .persist(&map, dstoff..dstoff + PAGE_SIZE as u64)
                .expect("persist");
            p += 1;
        })
    });

    // preserve(p) of protected pages, one snapshot over all RAM; when every page has been
    // preserved, delete and re-snapshot (untimed). Includes the amortised log compaction.
    snap(&mut pool, "live");
    let mut next = 0u64;
    g.bench_function("preserve_one_page", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == PAGES {
                    pool.delete("live").expect("delete");
                    snap(&mut pool, "live");
                    next = 0;
                }
                let t = Instant::now();
                let did = pool.preserve(next).expect("preserve");
                total += t.elapsed();
                assert!(did);
                next += 1;
            }
            total
        })
    });
    g.finish();
}

criterion_group!(store, benches);
criterion_main!(store);
