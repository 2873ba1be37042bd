//! Property test: random sequences of snapshot / write (preserve, then change the RAM
//! page) / delete / delete-and-recreate / gc / crash-and-reopen, checked after every
//! step against a plain in-memory model of what each snapshot must contain. The
//! metadata slot is small (4 KiB), so a sequence crosses checkpoints as well as appending
//! deltas, and crashes land in both.

mod common;

use common::{materialise, tmpdir, Model};
use pmem_backend::{CrashSim, PageRun, Pool, PoolOptions, Tear, PAGE_SIZE};
use proptest::prelude::*;

const PAGES: u64 = 16;
const MAX_LIVE: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Snapshot(Vec<(u64, u64)>),
    Write(u64, u64),
    Delete(usize),
    /// Delete a snapshot and take a new one under the same name (another page set).
    Recreate(usize, Vec<(u64, u64)>),
    /// gc: a checkpoint.
    Gc,
    /// Arm a crash `k` persists ahead, run the inner op, reopen from the durable image.
    Crash(u64, u8, Box<Op>),
}

fn plain_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..PAGES, 1..5u64), 1..4).prop_map(Op::Snapshot),
        10 => (0..PAGES, any::<u64>()).prop_map(|(p, s)| Op::Write(p, s)),
        2 => any::<usize>().prop_map(Op::Delete),
        2 => (any::<usize>(), prop::collection::vec((0..PAGES, 1..5u64), 1..4))
            .prop_map(|(i, v)| Op::Recreate(i, v)),
        1 => Just(Op::Gc),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => plain_op(),
        1 => (1..6u64, 0..4u8, plain_op()).prop_map(|(k, t, o)| Op::Crash(k, t, Box::new(o))),
    ]
}

fn clamp_runs(v: &[(u64, u64)]) -> Vec<PageRun> {
    v.iter()
        .map(|&(f, c)| PageRun::new(f, c.min(PAGES - f)))
        .collect()
}

struct World {
    dir: tempfile::TempDir,
    pool: Pool,
    sim: CrashSim,
    model: Model,
    next_name: u64,
    reopens: u64,
}

impl World {
    fn new() -> Self {
        let dir = tmpdir();
        let sim = CrashSim::new(0, None, Tear::Lost);
        let opts = PoolOptions {
            block_count: Some(PAGES * (MAX_LIVE as u64 + 2)),
            log_records: Some(128),
            meta_slot_bytes: Some(4 * 1024),
            persist: Some(Box::new(sim.clone())),
            ..PoolOptions::default()
        };
        let mut pool =
            Pool::create(dir.path().join("pool"), PAGES * PAGE_SIZE as u64, opts).expect("create");
        let model = Model::new(PAGES);
        model.fill(&mut pool);
        World {
            dir,
            pool,
            sim,
            model,
            next_name: 0,
            reopens: 0,
        }
    }

    /// Apply a plain op to pool and model. Returns the model as it would be after, and
    /// for an op of two commits (recreate), the model between them.
    fn apply(&mut self, op: &Op) -> (pmem_backend::Result<()>, Model, Option<Model>) {
        let mut after = self.model.clone();
        let mut mid = None;
        let res = match op {
            Op::Snapshot(v) => {
                if self.model.snaps.len() >= MAX_LIVE {
                    return (Ok(()), after, None);
                }
                let runs = clamp_runs(v);
                let name = format!("s{}", self.next_name);
                self.next_name += 1;
                after.record_snapshot(&name, &runs, Vec::new());
                let meta = pmem_backend::SnapshotMeta {
                    // A label of some size, so that deltas fill the slot sooner.
                    labels: vec![("test".into(), format!("{name}-{}", "x".repeat(60)))],
                    ..Default::default()
                };
                self.pool
                    .snapshot(&name, pmem_backend::SnapshotKind::Vm, &runs, meta)
                    .map(|_| ())
            }
            Op::Write(p, seed) => {
                after.ram[*p as usize] = *seed;
                self.pool.write_ram_page(*p, &common::pattern(*seed))
            }
            Op::Delete(i) => {
                if self.model.snaps.is_empty() {
                    return (Ok(()), after, None);
                }
                let name = self
                    .model
                    .snaps
                    .keys()
                    .nth(i % self.model.snaps.len())
                    .cloned()
                    .expect("non-empty");
                after.snaps.remove(&name);
                self.pool.delete(name.as_str()).map(|_| ())
            }
            Op::Recreate(i, v) => {
                // Two commits: the crash tests check each is atomic; here the name must
                // come back with the new pages.
                if self.model.snaps.is_empty() {
                    return (Ok(()), after, None);
                }
                let name = self
                    .model
                    .snaps
                    .keys()
                    .nth(i % self.model.snaps.len())
                    .cloned()
                    .expect("non-empty");
                let runs = clamp_runs(v);
                after.snaps.remove(&name);
                mid = Some(after.clone());
                after.record_snapshot(&name, &runs, Vec::new());
                self.pool.delete(name.as_str()).and_then(|_| {
                    self.pool
                        .snapshot(
                            &name,
                            pmem_backend::SnapshotKind::Vm,
                            &runs,
                            Default::default(),
                        )
                        .map(|_| ())
                })
            }
            Op::Gc => self.pool.gc().map(|_| ()),
            Op::Crash(..) => unreachable!("crash ops are not nested"),
        };
        (res, after, mid)
    }

    fn reopen(&mut self) {
        self.reopens += 1;
        let image = self.sim.durable_image();
        let path = materialise(self.dir.path(), &format!("img{}", self.reopens), &image);
        let sim = CrashSim::from_image(image, None, Tear::Lost);
        // Drop the old pool (and its lock) before opening the image.
        let old = std::mem::replace(
            &mut self.pool,
            Pool::open_with(&path, Some(Box::new(sim.clone()))).expect("reopen after crash"),
        );
        drop(old);
        self.sim = sim;
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Crash(k, t, inner) => {
                let tear = Tear::ALL[*t as usize];
                self.sim.arm(*k, tear);
                let before = self.model.clone();
                let (res, after, mid) = self.apply(inner);
                if !self.sim.crashed() {
                    // The op finished before the crash point: crash right after it.
                    self.sim.disarm();
                    res.map_err(|e| TestCaseError::fail(format!("{inner:?}: {e}")))?;
                    self.model = after;
                    self.reopen();
                    self.model.check(&self.pool).map_err(TestCaseError::fail)?;
                    return Ok(());
                }
                prop_assert!(res.is_err(), "crash went unnoticed by {:?}", inner);
                self.reopen();
                // Atomic ops leave exactly the old or the new state. A crashed write left
                // the snapshots intact; the RAM page may or may not have been written.
                let ok_before = before.check(&self.pool);
                let ok_after = after.check(&self.pool);
                let ok_mid = mid.as_ref().map(|m| m.check(&self.pool));
                match (ok_before, ok_after) {
                    (Ok(()), _) => self.model = before.clone(),
                    (_, Ok(())) => self.model = after.clone(),
                    _ if ok_mid == Some(Ok(())) => self.model = mid.expect("checked"),
                    (Err(a), Err(b)) => {
                        return Err(TestCaseError::fail(format!(
                            "after crash in {inner:?}: {a} / {b}"
                        )))
                    }
                }
                if let Op::Write(p, _) = **inner {
                    // Resynchronise the model's RAM with what survived. The RAM write itself
                    // may be torn (it is a plain guest-memory write); the snapshots are not
                    // affected because the page was preserved first. Put a known value back.
                    let data = self.pool.read_ram_page(p).expect("read");
                    let (old, new) = (before.ram[p as usize], after.ram[p as usize]);
                    if data == common::pattern(new) {
                        self.model.ram[p as usize] = new;
                    } else {
                        if data != common::pattern(old) {
                            prop_assert!(
                                !self.pool.is_protected(p),
                                "torn write to a protected page {}",
                                p
                            );
                            self.pool
                                .write_ram_page(p, &common::pattern(old))
                                .expect("rewrite");
                        }
                        self.model.ram[p as usize] = old;
                    }
                }
                let v = self.pool.verify(|_, _| ());
                prop_assert!(v.is_clean(), "verify after crash: {:?}", v.problems);
                Ok(())
            }
            plain => {
                let (res, after, _) = self.apply(plain);
                res.map_err(|e| TestCaseError::fail(format!("{plain:?}: {e}")))?;
                self.model = after;
                self.model.check(&self.pool).map_err(TestCaseError::fail)
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op)?;
        }
        w.pool.gc().expect("gc");
        let s = w.pool.stats();
        prop_assert_eq!(s.blocks_used, s.pages_in_blocks + s.blob_blocks);
        let clean = w.pool.verify(|_, _| ()).is_clean();
        prop_assert!(clean);
        // Every page still protected is referenced as RAM(p) by some snapshot, and vice versa.
        let mut want = vec![false; PAGES as usize];
        for info in w.pool.list() {
            for r in &info.runs {
                for p in r.first..r.first + r.count {
                    if let Ok(pmem_backend::PageLocation::Ram(_)) = w.pool.snapshot_page_location(info.name.as_str(), p) {
                        want[p as usize] = true;
                    }
                }
            }
        }
        for p in 0..PAGES {
            prop_assert_eq!(w.pool.is_protected(p), want[p as usize], "page {}", p);
        }
        w.model.check(&w.pool).map_err(TestCaseError::fail)?;
    }
}
