//! Crash tests: for each representative sequence, crash at every persist point of the
//! operation under test (with the write in flight lost, torn in half, or complete), then
//! reopen the durable image and check that every committed snapshot reads back bit-exact,
//! nothing uncommitted appears, gc leaves no block leaked and verify is clean.

mod common;

use common::{materialise, pattern, small_opts, tmpdir, Model};
use pmem_backend::{CrashSim, PageRun, Pool, Tear, PAGE_SIZE};

const PAGES: u64 = 32;

/// A scenario: `setup` builds state (never crashes), `op` is the operation under test.
/// Each returns the model after it; `op` returns the model it would produce on success.
struct Scenario {
    name: &'static str,
    pages: u64,
    setup: fn(&mut Pool, &mut Model),
    op: fn(&mut Pool, &Model) -> (pmem_backend::Result<()>, Model),
}

fn count_blocks_referenced(pool: &Pool) -> u64 {
    let s = pool.stats();
    s.pages_in_blocks + s.blob_blocks
}

fn opts(sc: &Scenario, sim: &CrashSim) -> pmem_backend::PoolOptions {
    let mut o = small_opts(Some(Box::new(sim.clone())));
    o.block_count = Some((sc.pages * 2).max(64));
    o
}

fn run(sc: &Scenario) {
    // Counting run: how many persist calls setup and op make.
    let d = tmpdir();
    let sim = CrashSim::new(0, None, Tear::Lost);
    let mut pool = Pool::create(
        d.path().join("count"),
        sc.pages * PAGE_SIZE as u64,
        opts(sc, &sim),
    )
    .expect("create");
    let mut model = Model::new(sc.pages);
    (sc.setup)(&mut pool, &mut model);
    let setup_calls = sim.calls();
    let (res, _) = (sc.op)(&mut pool, &model);
    res.expect("op succeeds without a crash");
    let total = sim.calls();
    assert!(total > setup_calls, "{}: op made no persist call", sc.name);
    drop(pool);

    let mut outcomes = [0usize; 2];
    for n in setup_calls + 1..=total {
        for tear in Tear::ALL {
            let d = tmpdir();
            let sim = CrashSim::new(0, Some(n), tear);
            let mut pool = Pool::create(
                d.path().join("p"),
                sc.pages * PAGE_SIZE as u64,
                opts(sc, &sim),
            )
            .expect("create");
            let mut before = Model::new(sc.pages);
            (sc.setup)(&mut pool, &mut before);
            let (res, after) = (sc.op)(&mut pool, &before);
            assert!(
                res.is_err(),
                "{}: crash at persist {n} went unnoticed",
                sc.name
            );
            assert!(sim.crashed());
            drop(pool);
            let path = materialise(d.path(), "after-crash", &sim.durable_image());
            let ctx = format!("{} crash at persist {n}/{total} ({tear:?})", sc.name);
            let mut pool =
                Pool::open(&path).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
            // The outcome must be exactly the state before or exactly the state after.
            let which = match (before.check(&pool), after.check(&pool)) {
                (Ok(()), _) => 0,
                (_, Ok(())) => 1,
                (Err(a), Err(b)) => panic!("{ctx}: neither before ({a}) nor after ({b})"),
            };
            outcomes[which] += 1;
            let v = pool.verify(|_, _| {});
            assert!(v.is_clean(), "{ctx}: verify after reopen: {:?}", v.problems);
            pool.gc().unwrap_or_else(|e| panic!("{ctx}: gc: {e}"));
            let s = pool.stats();
            assert_eq!(
                s.blocks_used,
                count_blocks_referenced(&pool),
                "{ctx}: leaked blocks"
            );
            assert!(pool.verify(|_, _| {}).is_clean(), "{ctx}: verify after gc");
            // And the pool is fully usable: it survives another reopen unchanged.
            drop(pool);
            let pool = Pool::open(&path).expect("second reopen");
            let expect = if which == 0 { &before } else { &after };
            expect
                .check(&pool)
                .unwrap_or_else(|e| panic!("{ctx}: after gc+reopen: {e}"));
        }
    }
    eprintln!(
        "{}: {} crash points x 4 tears: {} rolled back, {} rolled forward",
        sc.name,
        total - setup_calls,
        outcomes[0],
        outcomes[1]
    );
}

fn base_setup(pool: &mut Pool, m: &mut Model) {
    m.fill(pool);
    m.snapshot(pool, "a", &[PageRun::new(0, 12)], vec![7; 300])
        .expect("a");
    m.snapshot(pool, "b", &[PageRun::new(8, 12)], Vec::new())
        .expect("b");
    m.write(pool, 2, 50).expect("write a-only page");
    m.write(pool, 9, 51).expect("write shared page");
    m.write(pool, 15, 52).expect("write b-only page");
}

#[test]
fn crash_during_snapshot() {
    run(&Scenario {
        name: "snapshot",
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| {
            let mut after = m.clone();
            let state: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
            let res = after
                .snapshot(pool, "c", &[PageRun::new(4, 8), PageRun::new(24, 3)], state)
                .map(|_| ());
            if res.is_err() {
                // The model records only on success; build "after" by hand.
                let mut a = m.clone();
                a.record_snapshot(
                    "c",
                    &[PageRun::new(4, 8), PageRun::new(24, 3)],
                    (0..6000u32).map(|i| i as u8).collect(),
                );
                return (res, a);
            }
            (res, after)
        },
    });
}

#[test]
fn crash_during_preserve_of_shared_page() {
    run(&Scenario {
        name: "preserve shared page",
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| {
            let mut after = m.clone();
            // Page 10 is referenced by both a and b as RAM(10).
            let res = pool.preserve(10).map(|did| assert!(did));
            after.ram[10] = m.ram[10];
            (res, after)
        },
    });
}

#[test]
fn crash_during_delete() {
    run(&Scenario {
        name: "delete",
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| {
            let mut after = m.clone();
            after.snaps.remove("a");
            (pool.delete("a").map(|_| ()), after)
        },
    });
}

#[test]
fn crash_during_gc() {
    run(&Scenario {
        name: "gc",
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| (pool.gc().map(|_| ()), m.clone()),
    });
}

#[test]
fn crash_during_preserve_that_compacts_a_full_log() {
    run(&Scenario {
        name: "preserve with log compaction",
        pages: 160,
        setup: |pool, m| {
            m.fill(pool);
            m.snapshot(pool, "a", &[PageRun::new(0, 160)], Vec::new())
                .expect("a");
            // 128 preserves fill the 128-record log; the next one must compact first.
            for p in 0..128 {
                m.write(pool, p, 5000 + p).expect("write");
            }
            assert_eq!(pool.stats().log_records, 128);
        },
        op: |pool, m| {
            let after = m.clone();
            (pool.preserve(150).map(|did| assert!(did)), after)
        },
    });
}

#[test]
fn crash_image_survives_untouched_reopen() {
    // Sanity of the harness itself: without a crash, the durable image equals a clean pool.
    let d = tmpdir();
    let sim = CrashSim::new(0, None, Tear::Lost);
    let mut pool = Pool::create(
        d.path().join("p"),
        PAGES * PAGE_SIZE as u64,
        small_opts(Some(Box::new(sim.clone()))),
    )
    .expect("create");
    let mut m = Model::new(PAGES);
    base_setup(&mut pool, &mut m);
    drop(pool);
    let path = materialise(d.path(), "img", &sim.durable_image());
    let pool = Pool::open(&path).expect("open image");
    m.check(&pool).expect("model matches");
    assert_eq!(pool.read_ram_page(9).expect("ram"), pattern(51));
}
