//! How the store's costs grow with its history (issue 16): each line compares an
//! operation on a pool with little history against the same operation with a lot, in
//! the same run, and ends with `ratio=R goal<=G`. The goal is the issue's: cost follows
//! the change, not the history. A line over its goal is a known limit, measured here
//! so that the work on it has a baseline; the example does not fail on it.
//!
//! `cargo run --release -p pmem-backend --example scale -- --quick` (under a minute).
//! Without `--quick` the sizes are 4x larger.

use std::path::Path;
use std::time::{Duration, Instant};

use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind};

const PAGE: u64 = 4096;

fn pool(dir: &Path, name: &str, ram_pages: u64) -> Pool {
    Pool::create(
        dir.join(name),
        ram_pages * PAGE,
        PoolOptions {
            block_count: Some(ram_pages * 2),
            ..Default::default()
        },
    )
    .expect("create pool")
}

fn snap(p: &mut Pool, name: &str, first: u64, count: u64) {
    p.snapshot(
        name,
        SnapshotKind::Pages,
        &[PageRun::new(first, count)],
        Default::default(),
    )
    .expect("snapshot");
}

/// Median of `reps` timings of `f`.
fn median(reps: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut v: Vec<Duration> = (0..reps).map(|_| f()).collect();
    v.sort();
    v[v.len() / 2]
}

fn line(what: &str, small: Duration, big: Duration, goal: f64) {
    let ratio = big.as_secs_f64() / small.as_secs_f64().max(1e-9);
    println!(
        "{what}: {:.0} us vs {:.0} us ratio={ratio:.2} goal<={goal}",
        small.as_secs_f64() * 1e6,
        big.as_secs_f64() * 1e6
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 4 };
    let many = 250 * scale; // existing snapshots
    let ram_pages = 16384 * scale as u64; // 64 MiB (256 MiB full)
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let reps = 9;
    println!(
        "pool: {} MiB of RAM, {many} existing snapshots in the large case, median of {reps}",
        (ram_pages * PAGE) >> 20
    );

    // 1. Creating (and deleting) a 64-page snapshot with 1 vs `many` existing ones.
    let mut a = pool(dir.path(), "a.pool", ram_pages);
    let mut b = pool(dir.path(), "b.pool", ram_pages);
    snap(&mut a, "old0", 0, 64);
    for i in 0..many as u64 {
        snap(&mut b, &format!("old{i}"), (i * 64) % ram_pages, 64);
    }
    let n = std::cell::Cell::new(0u64);
    let create = |p: &mut Pool| {
        median(reps, || {
            n.set(n.get() + 1);
            let name = format!("new{}", n.get());
            let t = Instant::now();
            snap(p, &name, ram_pages - 64, 64);
            let d = t.elapsed();
            p.delete(name.as_str()).expect("delete");
            d
        })
    };
    let (c1, cn) = (create(&mut a), create(&mut b));
    line(
        &format!("snapshot create, {many} vs 1 existing"),
        c1,
        cn,
        2.0,
    );
    let delete = |p: &mut Pool| {
        median(reps, || {
            n.set(n.get() + 1);
            let name = format!("del{}", n.get());
            snap(p, &name, ram_pages - 64, 64);
            let t = Instant::now();
            p.delete(name.as_str()).expect("delete");
            t.elapsed()
        })
    };
    let (d1, dn) = (delete(&mut a), delete(&mut b));
    line(
        &format!("snapshot delete, {many} vs 1 existing"),
        d1,
        dn,
        2.0,
    );

    // 2. Preserving a page no other snapshot shares, with 1 vs `many` snapshots in the
    // store (each preserve commits to the redirect log).
    let preserve = |p: &mut Pool, base: &str| {
        let mut page = 0;
        median(reps, || {
            n.set(n.get() + 1);
            let name = format!("{base}{}", n.get());
            page = (page + 1) % 64;
            let target = ram_pages - 128 + page;
            snap(p, &name, target, 1);
            let t = Instant::now();
            p.preserve(target).expect("preserve");
            let d = t.elapsed();
            p.delete(name.as_str()).expect("delete");
            d
        })
    };
    let (p1, pn) = (preserve(&mut a, "pa"), preserve(&mut b, "pb"));
    line(
        &format!("preserve one page, {many} vs 1 snapshots"),
        p1,
        pn,
        2.0,
    );

    // 3. Creating a snapshot after one snapshot had all of RAM preserved (its redirect
    // map is part of every catalog commit) vs after none.
    let mut c = pool(dir.path(), "c.pool", ram_pages);
    snap(&mut c, "full", 0, ram_pages);
    for page in 0..ram_pages {
        c.preserve(page).expect("preserve");
    }
    let mut d = pool(dir.path(), "d.pool", ram_pages);
    snap(&mut d, "full", 0, ram_pages);
    let (e0, ef) = (create(&mut d), create(&mut c));
    line(
        &format!("snapshot create, {ram_pages} vs 0 preserved pages in the store"),
        e0,
        ef,
        2.0,
    );
}
