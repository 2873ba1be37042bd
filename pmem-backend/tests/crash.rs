//! Crash tests: for each representative sequence, crash at every persist point of the
//! operation under test (with the write in flight lost, torn in half, or complete), then
//! reopen the durable image and check that every committed snapshot reads back bit-exact,
//! nothing uncommitted appears, a commit appends over whatever the crash left past the
//! catalog in force, gc leaves no block leaked and verify is clean. The operations'
//! commits are of both kinds: a delta appended to the catalog in force, or a checkpoint
//! written into the other slot (see `pool/commit.rs`); each scenario says which.

mod common;

use common::{materialise, pattern, small_opts, superblock_at, superblock_of, tmpdir, Model};
use pmem_backend::{CrashSim, PageRun, Pool, SnapshotKind, SnapshotMeta, Tear, PAGE_SIZE};

const PAGES: u64 = 32;

/// How the operation under test commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commit {
    /// No commit (a preserve that only appends to the redirect log).
    None,
    /// A delta record appended in the slot in force.
    Append,
    /// A checkpoint into the other slot.
    Checkpoint,
}

/// A scenario: `setup` builds state (never crashes), `op` is the operation under test.
/// Each returns the model after it; `op` returns the model it would produce on success.
struct Scenario {
    name: &'static str,
    pages: u64,
    /// Metadata slot size (default: `small_opts`'s 64 KiB).
    meta_slot: Option<u64>,
    /// How `op` commits (checked on the run without a crash).
    commit: Commit,
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
    if let Some(m) = sc.meta_slot {
        o.meta_slot_bytes = Some(m);
    }
    o
}

fn run(sc: &Scenario) {
    // Counting run: how many persist calls setup and op make.
    let d = tmpdir();
    let sim = CrashSim::new(0, None, Tear::Lost);
    let count = d.path().join("count");
    let mut pool =
        Pool::create(&count, sc.pages * PAGE_SIZE as u64, opts(sc, &sim)).expect("create");
    let mut model = Model::new(sc.pages);
    (sc.setup)(&mut pool, &mut model);
    let setup_calls = sim.calls();
    let sb = superblock_at(&count);
    let (res, _) = (sc.op)(&mut pool, &model);
    res.expect("op succeeds without a crash");
    let total = sim.calls();
    let after = superblock_at(&count);
    let commit = match (
        after.generation - sb.generation,
        after.catalog_slot != sb.catalog_slot,
    ) {
        (0, _) => Commit::None,
        (_, false) => Commit::Append,
        (_, true) => Commit::Checkpoint,
    };
    assert_eq!(commit, sc.commit, "{}: how the op commits", sc.name);
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
            // A commit appends where the crash may have left a torn record or a whole
            // one never made current; then it is read back like any other.
            let sb = superblock_of(&sim.durable_image());
            pool.snapshot(
                "zz",
                SnapshotKind::Vm,
                &[PageRun::new(0, 1)],
                SnapshotMeta::default(),
            )
            .unwrap_or_else(|e| panic!("{ctx}: snapshot after reopen: {e}"));
            let sb2 = superblock_at(&path);
            assert_eq!(
                (sb2.catalog_slot, sb2.catalog_len > sb.catalog_len),
                (sb.catalog_slot, true),
                "{ctx}: appended after the catalog in force"
            );
            drop(pool);
            let mut pool = Pool::open(&path).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            pool.delete("zz")
                .unwrap_or_else(|e| panic!("{ctx}: delete after reopen: {e}"));
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
        meta_slot: None,
        commit: Commit::Append,
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
        meta_slot: None,
        commit: Commit::None,
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
        meta_slot: None,
        commit: Commit::Append,
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| {
            let mut after = m.clone();
            after.snaps.remove("a");
            (pool.delete("a").map(|_| ()), after)
        },
    });
}

/// Three snapshots of the same pages share each page preserved after them: one redirect
/// record (catalog version 4) whose id range holds all three; a fourth, taken after,
/// has a record of its own for page 5.
fn shared_setup(pool: &mut Pool, m: &mut Model) {
    m.fill(pool);
    for name in ["a", "b", "c"] {
        m.snapshot(pool, name, &[PageRun::new(0, 12)], Vec::new())
            .expect(name);
    }
    m.write(pool, 5, 60).expect("page 5, shared by a, b and c");
    m.write(pool, 6, 61).expect("page 6, shared by a, b and c");
    m.snapshot(pool, "d", &[PageRun::new(4, 8)], Vec::new())
        .expect("d");
    m.write(pool, 5, 62).expect("page 5 again, for d");
}

/// Deleting a snapshot in the middle of a shared record's range keeps the record (and its
/// block) for the others.
#[test]
fn crash_during_delete_inside_a_shared_range() {
    run(&Scenario {
        name: "delete inside a shared range",
        meta_slot: None,
        commit: Commit::Append,
        pages: PAGES,
        setup: shared_setup,
        op: |pool, m| {
            let mut after = m.clone();
            after.snaps.remove("b");
            (pool.delete("b").map(|_| ()), after)
        },
    });
}

/// Deleting the newest snapshot of a shared record's range (the id the record is keyed
/// by) keeps the record for the older ones, and d keeps its own.
#[test]
fn crash_during_delete_of_a_shared_range_s_newest() {
    run(&Scenario {
        name: "delete the newest of a shared range",
        meta_slot: None,
        commit: Commit::Append,
        pages: PAGES,
        setup: |pool, m| {
            shared_setup(pool, m);
            pool.delete("a").expect("a");
            m.snaps.remove("a");
        },
        op: |pool, m| {
            let mut after = m.clone();
            after.snaps.remove("c");
            (pool.delete("c").map(|_| ()), after)
        },
    });
}

#[test]
fn crash_during_gc() {
    run(&Scenario {
        name: "gc",
        meta_slot: None,
        commit: Commit::Checkpoint,
        pages: PAGES,
        setup: base_setup,
        op: |pool, m| (pool.gc().map(|_| ()), m.clone()),
    });
}

#[test]
fn crash_during_preserve_that_compacts_a_full_log() {
    run(&Scenario {
        name: "preserve with log compaction",
        meta_slot: None,
        commit: Commit::Append,
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

/// Labels making a snapshot record of about 6 KiB.
fn big_labels() -> Vec<(String, String)> {
    (0..30)
        .map(|i| (format!("k{i}"), "v".repeat(200)))
        .collect()
}

/// A commit whose delta does not fit the slot in force writes a checkpoint into the
/// other slot: crash at each of its persist points.
#[test]
fn crash_during_a_checkpoint_the_full_slot_forces() {
    run(&Scenario {
        name: "checkpoint forced by a full slot",
        pages: PAGES,
        meta_slot: Some(16 * 1024),
        commit: Commit::Checkpoint,
        setup: |pool, m| {
            base_setup(pool, m);
            // Deltas until the slot has less room than the op's record needs.
            let mut i = 0;
            while 16 * 1024 - superblock_at(pool.path()).catalog_len >= 6000 {
                let name = format!("f{i}");
                m.snapshot(pool, &name, &[PageRun::new(20, 4)], Vec::new())
                    .expect("filler");
                pool.delete(name.as_str()).expect("filler delete");
                m.snaps.remove(&name);
                i += 1;
            }
            assert!(i > 10, "{i} fillers");
        },
        op: |pool, m| {
            let mut after = m.clone();
            after.record_snapshot("c", &[PageRun::new(4, 8)], Vec::new());
            let meta = SnapshotMeta {
                labels: big_labels(),
                ..SnapshotMeta::default()
            };
            let res = pool
                .snapshot("c", SnapshotKind::Vm, &[PageRun::new(4, 8)], meta)
                .map(|_| ());
            (res, after)
        },
    });
}

/// The first delta after a checkpoint (gc), deleting a snapshot whose blocks are shared.
#[test]
fn crash_during_the_first_append_after_a_checkpoint() {
    run(&Scenario {
        name: "append after a checkpoint",
        pages: PAGES,
        meta_slot: None,
        commit: Commit::Append,
        setup: |pool, m| {
            base_setup(pool, m);
            pool.gc().expect("gc");
            m.write(pool, 10, 53)
                .expect("write shared page, in the log");
        },
        op: |pool, m| {
            let mut after = m.clone();
            after.snaps.remove("b");
            (pool.delete("b").map(|_| ()), after)
        },
    });
}

/// A delta torn in half by the crash: the bytes past the catalog in force are not
/// zero, the pool is the state before, and the next commit writes over them.
#[test]
fn a_torn_delta_is_ignored_and_written_over() {
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
    let sb = superblock_at(pool.path());
    // The delta's persist is the first of a snapshot without a state blob.
    sim.arm(1, Tear::Half);
    let meta = SnapshotMeta {
        labels: big_labels(),
        ..SnapshotMeta::default()
    };
    pool.snapshot("c", SnapshotKind::Vm, &[PageRun::new(4, 8)], meta)
        .expect_err("crashed");
    drop(pool);
    let image = sim.durable_image();
    assert_eq!(superblock_of(&image), sb, "the old superblock is in force");
    let tail = sb.geometry.meta_slot_offset(sb.catalog_slot) + sb.catalog_len;
    let torn = &image[tail as usize..tail as usize + 1024];
    assert!(torn.iter().any(|&b| b != 0), "half a delta is on the media");
    let path = materialise(d.path(), "img", &image);
    let mut pool = Pool::open(&path).expect("open");
    m.check(&pool).expect("the state before");
    m.snapshot(&mut pool, "d", &[PageRun::new(1, 2)], Vec::new())
        .expect("a commit over the torn record");
    // d's delta went where the torn one was, and reads back whole.
    let now = superblock_at(&path);
    assert_eq!(now.catalog_slot, sb.catalog_slot);
    let file = std::fs::read(&path).expect("read");
    let (delta, len) = pmem_backend::catalog::decode_delta(
        &file[tail as usize..],
        pmem_backend::catalog::CATALOG_VERSION,
    )
    .expect("the new delta");
    assert_eq!(delta.generation, sb.generation + 1);
    assert_eq!(now.catalog_len, sb.catalog_len + len as u64);
    drop(pool);
    let pool = Pool::open(&path).expect("reopen");
    m.check(&pool).expect("with d");
    assert!(pool.verify(|_, _| {}).is_clean());
}

/// One step of [`long_history`].
#[derive(Debug, Clone)]
enum Step {
    Snap(String, PageRun),
    Write(u64, u64),
    Delete(String),
    Gc,
    Grow(u64),
}

/// Many commits crossing several checkpoints (a 3 KiB slot): snapshots, writes,
/// deletes, a name deleted and created again, gc, and a growth of the block area in
/// the middle.
fn long_history() -> Vec<Step> {
    let mut h = Vec::new();
    let mut live: Vec<String> = Vec::new();
    for round in 0..48u64 {
        let name = format!("s{round}");
        h.push(Step::Snap(name.clone(), PageRun::new((round * 5) % 24, 8)));
        live.push(name);
        for k in 0..3 {
            h.push(Step::Write(
                (round * 7 + k * 3) % PAGES,
                10_000 + round * 10 + k,
            ));
        }
        if live.len() > 3 {
            h.push(Step::Delete(live.remove(0)));
        }
        if round % 5 == 4 {
            // Delete and recreate the same name over other pages.
            h.push(Step::Delete("keep".into()));
            h.push(Step::Snap("keep".into(), PageRun::new(round % 16, 16)));
        }
        if round == 2 {
            h.push(Step::Snap("keep".into(), PageRun::new(0, 16)));
        }
        if round == 30 {
            h.push(Step::Gc);
        }
        if round == 24 {
            h.push(Step::Grow(96));
        }
    }
    h
}

/// Apply `step`: the result and the model it leads to.
fn apply(pool: &mut Pool, m: &Model, step: &Step) -> (pmem_backend::Result<()>, Model) {
    let mut after = m.clone();
    let res = match step {
        Step::Snap(name, run) => {
            after.record_snapshot(name, &[*run], Vec::new());
            // A label, so that the deltas fill the small slot sooner.
            let meta = SnapshotMeta {
                labels: vec![("note".into(), "x".repeat(100))],
                ..SnapshotMeta::default()
            };
            pool.snapshot(name, SnapshotKind::Vm, &[*run], meta)
                .map(|_| ())
        }
        Step::Write(p, seed) => {
            after.ram[*p as usize] = *seed;
            pool.write_ram_page(*p, &pattern(*seed))
        }
        Step::Delete(name) => {
            after.snaps.remove(name);
            pool.delete(name.as_str()).map(|_| ())
        }
        Step::Gc => pool.gc().map(|_| ()),
        Step::Grow(n) => pool.grow_blocks(*n).map(|_| ()),
    };
    (res, after)
}

fn history_opts(sim: &CrashSim) -> pmem_backend::PoolOptions {
    let mut o = small_opts(Some(Box::new(sim.clone())));
    o.meta_slot_bytes = Some(3 * 1024);
    o
}

/// Crash at every persist point of a long history (each with one of the four tears),
/// reopen, check the state is that before or after the step that crashed, then run the
/// rest of the history on the reopened pool and check the end.
#[test]
fn crash_anywhere_in_a_long_history() {
    let steps = long_history();
    // Without a crash: how many persists, and how many checkpoints.
    let d = tmpdir();
    let sim = CrashSim::new(0, None, Tear::Lost);
    let path = d.path().join("count");
    let mut pool =
        Pool::create(&path, PAGES * PAGE_SIZE as u64, history_opts(&sim)).expect("create");
    let mut m = Model::new(PAGES);
    m.fill(&mut pool);
    let start = sim.calls();
    let (mut checkpoints, mut appends) = (0, 0);
    for step in &steps {
        let sb = superblock_at(&path);
        let (res, after) = apply(&mut pool, &m, step);
        res.unwrap_or_else(|e| panic!("{step:?}: {e}"));
        m = after;
        let now = superblock_at(&path);
        if now.generation > sb.generation {
            if now.catalog_slot == sb.catalog_slot {
                appends += 1;
            } else {
                checkpoints += 1;
            }
        }
    }
    m.check(&pool).expect("end of the history");
    let total = sim.calls();
    assert!(
        checkpoints >= 5 && appends >= 80,
        "{checkpoints} checkpoints, {appends} appends"
    );
    drop(pool);

    let mut outcomes = [0u64; 2];
    for n in start + 1..=total {
        let tear = Tear::ALL[(n % 4) as usize];
        let d = tmpdir();
        let sim = CrashSim::new(0, None, Tear::Lost);
        let mut pool = Pool::create(
            d.path().join("p"),
            PAGES * PAGE_SIZE as u64,
            history_opts(&sim),
        )
        .expect("create");
        let mut m = Model::new(PAGES);
        m.fill(&mut pool);
        sim.arm(n - sim.calls(), tear);
        let mut at = 0;
        let (before, after) = loop {
            let (res, after) = apply(&mut pool, &m, &steps[at]);
            if sim.crashed() {
                assert!(
                    res.is_err(),
                    "crash at {n} in {:?} went unnoticed",
                    steps[at]
                );
                break (m.clone(), after);
            }
            res.unwrap_or_else(|e| panic!("{:?}: {e}", steps[at]));
            m = after;
            at += 1;
        };
        drop(pool);
        let ctx = format!("crash at persist {n}/{total} ({tear:?}) in {:?}", steps[at]);
        let path = materialise(d.path(), "img", &sim.durable_image());
        let mut pool = Pool::open(&path).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
        let forward = match (before.check(&pool), after.check(&pool)) {
            (Ok(()), _) => false,
            (_, Ok(())) => true,
            (Err(a), Err(b)) => {
                // A write's RAM page may be torn itself (it is plain guest memory): the
                // snapshots are intact; put the old content back and check again.
                let Step::Write(p, _) = steps[at] else {
                    panic!("{ctx}: neither before ({a}) nor after ({b})")
                };
                pool.write_ram_page(p, &pattern(before.ram[p as usize]))
                    .expect("rewrite");
                before.check(&pool).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                false
            }
        };
        outcomes[usize::from(forward)] += 1;
        m = if forward { after } else { before };
        let v = pool.verify(|_, _| {});
        assert!(v.is_clean(), "{ctx}: verify: {:?}", v.problems);
        // The rest of the history on the reopened pool (the crashed step again, unless
        // it rolled forward: a snapshot of the same name would be refused).
        let skip = usize::from(forward && !matches!(steps[at], Step::Gc | Step::Grow(_)));
        for step in &steps[at + skip..] {
            let step = match step {
                Step::Grow(n) if pool.geometry().block_count >= *n => continue,
                s => s,
            };
            let (res, after) = apply(&mut pool, &m, step);
            res.unwrap_or_else(|e| panic!("{ctx}: then {step:?}: {e}"));
            m = after;
        }
        drop(pool);
        let pool = Pool::open(&path).unwrap_or_else(|e| panic!("{ctx}: final reopen: {e}"));
        m.check(&pool)
            .unwrap_or_else(|e| panic!("{ctx}: at the end: {e}"));
        assert!(pool.verify(|_, _| {}).is_clean(), "{ctx}: final verify");
    }
    eprintln!(
        "long history: {} crash points ({checkpoints} checkpoints, {appends} appends): \
         {} rolled back, {} rolled forward",
        total - start,
        outcomes[0],
        outcomes[1]
    );
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
