//! The copy-before-write engine: joins the snapshot store in the pool, the write-protect
//! seam, the fault handler and dirty tracking. Nothing here knows the control API, VM
//! state or the guest agent: the controller (`crate::controller`) builds those on top.
//!
//! Consistency of a page snapshot: each page's content is the content it had at the
//! moment that page became write-protected (the store marks the pages, the protect
//! callback write-protects them, then the store commits, all under the store lock, so a
//! write racing with the snapshot either lands before the protection, and is part of the
//! snapshot, or faults and is preserved into it). With the vCPUs paused around the
//! snapshot, all pages share one instant.
//!
//! # The copy-before-write path, step by step
//!
//! 1. [`Engine::snapshot`] marks the pages in the store and, under the store lock,
//!    write-protects them ([`UffdProtector::protect`], `UFFDIO_WRITEPROTECT`) before the
//!    store commits ([`Pool::snapshot_with`]).
//! 2. A vCPU (or the VMM) writes a protected page: the kernel blocks the writer and
//!    queues a write-protect fault on the userfaultfd.
//! 3. The fault handler thread ([`super::fault`], `handle_fault`) reads the fault and calls
//!    [`PreserveSink::before_write_then`] on `StoreSink`.
//! 4. `StoreSink` locks the pool and calls [`Pool::preserve`]: the page's current
//!    content is copied into a block and every snapshot that referenced the page in RAM
//!    is redirected to that block (durable before it returns).
//! 5. Still under the pool lock, the handler's unprotect callback clears the protection
//!    of that one page (`UFFDIO_WRITEPROTECT` without the WP bit), which also wakes the
//!    writer. Doing it under the lock means no snapshot can protect the page again in
//!    between and lose the next write.
//! 6. If the block area is full, guest-owned snapshots are dropped oldest first; if only
//!    host-owned ones hold blocks, the write waits for a delete or a grown block area
//!    (see [`super::sink`]). Any other failure (an I/O error) drops every snapshot that
//!    still needs the page, and the page is unprotected so the guest goes on.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{info, warn};
use pmem_backend::{
    normalize_runs, pages_to_runs, PageRun, Pool, PoolError, SnapshotKind, SnapshotMeta,
};

use super::dirty::DirtyTracker;
use super::fault::{FaultHandler, FaultStats, HandlerOptions, MissingSink};
use super::lazy::LazyFill;
use super::protect::{PageProtector, UffdProtector};
pub use super::sink::{BlockWait, EngineEvent};
use super::sink::{PreProtect, StoreSink};
use crate::vstate::dirty::{DirtyError, DirtySource};

pub use super::sink::lock_pool;

/// The engine. Shared (as `Arc<Engine>`) by the controller, the guest agent service
/// and the VMM.
pub struct Engine {
    pool: Arc<Mutex<Pool>>,
    protector: Arc<dyn PageProtector>,
    sink: Arc<StoreSink>,
    faults: Arc<FaultStats>,
    dirty: Arc<Mutex<DirtyTracker>>,
    /// The lazy fill of a lazy restore, while there is one.
    lazy: Option<Arc<LazyFill>>,
    // Last, so the handler thread stops before the rest goes away.
    _handler: Option<FaultHandler>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("preserved_pages", &self.preserved_pages())
            .finish()
    }
}

/// Why `dirty since` cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum DirtySinceError {
    /// The store has no such snapshot.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Dirty tracking failed or does not know the snapshot.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}

/// Engine and store statistics.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Write-protect faults handled.
    pub faults: u64,
    /// Total and longest time in the fault handler, in nanoseconds.
    pub fault_total_ns: u64,
    /// Longest single fault.
    pub fault_max_ns: u64,
    /// Pages preserved by the fault handler since start.
    pub preserved_pages: u64,
    /// Guest-owned snapshots dropped because the block area was full.
    pub guest_snapshots_dropped: u64,
    /// The store's own counts.
    pub store: pmem_backend::Stats,
}

/// Errors of engine start-up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Re-protecting pages named by snapshots already in the pool failed.
    #[error("cannot re-protect the pages of existing snapshots: {0}")]
    Reprotect(#[source] super::protect::ProtectError),
    /// The fault handler thread could not start.
    #[error("cannot start the fault handler thread: {0}")]
    Handler(#[source] std::io::Error),
}

impl Engine {
    /// Start the engine on an open pool whose RAM area is mapped at the protector's
    /// range: re-protect every page an existing snapshot references, start the fault
    /// handler, and start dirty tracking.
    pub fn start(
        pool: Arc<Mutex<Pool>>,
        protector: Arc<UffdProtector>,
        dirty_sources: Vec<Box<dyn DirtySource>>,
        opts: HandlerOptions,
    ) -> Result<Self, EngineError> {
        Self::start_with(pool, protector, dirty_sources, opts, None)
    }

    /// [`Self::start`] for a lazy restore: guest RAM arrives through `lazy`, which the
    /// fault handler sends missing pages to and the store passes before it reads RAM.
    pub fn start_with(
        pool: Arc<Mutex<Pool>>,
        protector: Arc<UffdProtector>,
        dirty_sources: Vec<Box<dyn DirtySource>>,
        opts: HandlerOptions,
        lazy: Option<Arc<LazyFill>>,
    ) -> Result<Self, EngineError> {
        if let Some(l) = &lazy {
            let gate: Arc<dyn pmem_backend::RamGate> = l.clone();
            lock_pool(&pool).set_ram_gate(Some(gate));
        }
        let (runs, names, pages) = {
            let p = lock_pool(&pool);
            let names: Vec<String> = p.list().into_iter().map(|s| s.name).collect();
            (p.protected_runs(), names, p.ram_pages())
        };
        let t = Instant::now();
        for r in &runs {
            protector
                .protect(r.first, r.count)
                .map_err(EngineError::Reprotect)?;
        }
        if !names.is_empty() {
            info!(
                "re-protected {} pages of {} existing snapshots in {:?}",
                runs.iter().map(|r| r.count).sum::<u64>(),
                names.len(),
                t.elapsed()
            );
        }
        let protector_dyn: Arc<dyn PageProtector> = protector.clone();
        let mut dirty = DirtyTracker::new(pages, dirty_sources);
        for n in &names {
            dirty.start_unknown(n);
        }
        let dirty = Arc::new(Mutex::new(dirty));
        let sink = Arc::new(StoreSink::new(
            pool.clone(),
            protector_dyn.clone(),
            dirty.clone(),
        ));
        let missing = lazy.clone().map(|l| l as Arc<dyn MissingSink>);
        let handler = FaultHandler::spawn_with_missing(protector, sink.clone(), missing, opts)
            .map_err(EngineError::Handler)?;
        Ok(Self {
            pool,
            protector: protector_dyn,
            sink,
            faults: handler.stats(),
            dirty,
            lazy,
            _handler: Some(handler),
        })
    }

    /// Harvest the dirty logs now, while the vCPUs may run: a snapshot taken next (with
    /// the vCPUs paused) then harvests only what was written in between. The first
    /// harvest of a VM reports every page (KVM starts with all bits set) and clears
    /// KVM's log over all of RAM, which at 4 GiB is a walk over a million mappings:
    /// better before a pause than in it. Harvesting early loses nothing: the writes are
    /// stamped with the epoch in force, as the snapshot's own harvest would stamp them.
    pub fn harvest_dirty(&self) -> Result<(), DirtyError> {
        self.dirty().harvest()
    }

    /// Reset the dirty tracking of `name` to "nothing written" (after a rollback to it).
    pub fn reset_dirty(&self, name: &str) -> Result<(), DirtyError> {
        self.dirty().reset(name)
    }

    /// The pool, for callers that read snapshots (restore, export).
    pub fn pool(&self) -> &Arc<Mutex<Pool>> {
        &self.pool
    }

    fn dirty(&self) -> MutexGuard<'_, DirtyTracker> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a snapshot of `runs` (guest RAM page numbers). Writes no page data.
    pub fn snapshot(
        &self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
    ) -> Result<pmem_backend::SnapshotInfo, PoolError> {
        let t = Instant::now();
        let mut pool = lock_pool(&self.pool);
        let locked = t.elapsed();
        // A duplicate name must not touch the existing snapshot's dirty tracking (start
        // would reset it, and the failure path would forget it). Checked under the pool
        // lock, which is held until the snapshot is in, so no other creation can race.
        if pool.inspect(name).is_ok() {
            return Err(PoolError::DuplicateName(name.to_string()));
        }
        let protector = self.protector.clone();
        // Taken under the pool lock: the handler records under it too, so the list of
        // pages it made writable is complete here.
        let pre = {
            let mut armed = self.sink.armed();
            if armed.as_ref().is_some_and(|p| p.walked && p.tracked) {
                armed.take()
            } else {
                None // still being walked (another request's): protect all newly here
            }
        };
        let armed_at = t.elapsed();
        // Track writes from before the pages are protected: a write in between is counted
        // as dirty (harmless for rollback) rather than missed. Lock order: pool, then
        // dirty. With a pre-protection record, the same harvest also gives every page
        // written since the pre-protection began, as the dirty sources saw it (KVM's
        // dirty log and the VMM's own writes): protected again with the pages the
        // handler made writable. The faults alone are not relied on: a write that raced
        // the walk while the vCPUs ran once went unpreserved (docs/perf-vm.md). One
        // harvest, not two: each reads RAM-sized bitmaps inside the pause.
        let pre = {
            let mut dirty = self.dirty();
            match pre {
                None => {
                    if let Err(e) = dirty.start(name) {
                        warn!("dirty tracking for {name:?} could not start: {e}");
                    }
                    None
                }
                Some(p) => match dirty.start_ending(name, PRE_PROTECT_MARK) {
                    Ok(w) => Some((
                        p,
                        w.into_iter()
                            .map(|(f, c)| PageRun::new(f, c))
                            .collect::<Vec<_>>(),
                    )),
                    Err(e) => {
                        warn!("pre-protection not used for {name:?}: dirty tracking failed: {e}");
                        dirty.forget(PRE_PROTECT_MARK);
                        if let Err(e) = dirty.start(name) {
                            warn!("dirty tracking for {name:?} could not start: {e}");
                        }
                        None
                    }
                },
            }
        };
        let before_store = t.elapsed();
        let mut walk = (0u64, 0usize, std::time::Duration::ZERO); // pages, runs, time
        let res = pool.snapshot_with(name, kind, runs, meta, |newly| {
            let t = Instant::now();
            let runs = to_protect(newly, pre.as_ref().map(|(p, w)| (p, w.as_slice())));
            walk.1 = runs.len();
            for r in runs {
                walk.0 += r.count;
                protector.protect(r.first, r.count)?;
            }
            walk.2 = t.elapsed();
            Ok(())
        });
        log::debug!(
            "snapshot {name:?}: pool lock {locked:?}, pre-protection record {:?}, dirty harvest \
             {:?} ({}), write-protect {} pages in {} runs {:?}, store total {:?}",
            armed_at - locked,
            before_store - armed_at,
            if pre.is_some() { "used" } else { "none" },
            walk.0,
            walk.1,
            walk.2,
            t.elapsed()
        );
        match res {
            Ok(id) => pool.inspect(id),
            Err(e) => {
                // As in delete: unprotect while no other snapshot can protect these pages.
                if let PoolError::SnapshotAborted { unprotect, .. } = &e {
                    self.sink.unprotect(unprotect);
                }
                drop(pool);
                self.dirty().forget(name);
                Err(e)
            }
        }
    }

    /// Write-protect `runs` ahead of a snapshot of them, while the vCPUs still run, so
    /// that the snapshot itself (typically with the vCPUs paused) only has to protect
    /// again the pages written in between. The kernel's write-protect walk over every
    /// page table entry is most of a snapshot's cost; this moves it out of the pause.
    /// Pages written meanwhile fault once and become writable again (nothing to
    /// preserve yet); the handler records them, and dirty tracking, started before the
    /// walk, records every write whether it faulted or not. Pre-protected pages that no
    /// snapshot takes fault once later and are released then.
    pub fn preprotect(&self, runs: &[PageRun]) -> Result<(), PoolError> {
        let runs = normalize_runs(runs);
        let id = {
            // The mark and the record are set together (lock order: armed, then dirty),
            // so the record in force always began no later than the mark it relies on.
            let mut armed = self.sink.armed();
            let id = self.sink.next_preprotect_id();
            let tracked = match self.dirty().start(PRE_PROTECT_MARK) {
                Ok(()) => true,
                Err(e) => {
                    warn!("pre-protection: dirty tracking did not start, not relied on: {e}");
                    false
                }
            };
            *armed = Some(PreProtect {
                runs: runs.clone(),
                unprotected: Vec::new(),
                walked: false,
                id,
                tracked,
            });
            id
        };
        self.protect_or_disarm(&runs)?;
        // Walk again over what was written during the walk before: each such page
        // faulted once and became writable, or was written through a mapping the walk
        // raced. At 4 GiB the first walk takes 130-180 ms, the guest writes 1,000-2,000
        // pages in it, and protecting those again took 130-240 us inside the pause. Each
        // walk is much shorter than the one before; the pause then protects only what is
        // written during the last.
        for _ in 0..PRE_PROTECT_AGAIN_ROUNDS {
            let again = self.written_during_preprotect(id);
            let pages: u64 = again.iter().map(|r| r.count).sum();
            self.protect_or_disarm(&again)?;
            if pages <= PRE_PROTECT_AGAIN_ENOUGH {
                break;
            }
        }
        mark_walked(&mut self.sink.armed(), id);
        Ok(())
    }

    /// Write-protect `runs`; on a failure no pre-protection stays armed.
    fn protect_or_disarm(&self, runs: &[PageRun]) -> Result<(), PoolError> {
        for r in runs {
            if let Err(e) = self.protector.protect(r.first, r.count) {
                *self.sink.armed() = None;
                return Err(PoolError::InvalidArgument(e.to_string()));
            }
        }
        Ok(())
    }

    /// The pages of pre-protection `id` written or made writable since its mark began,
    /// with the mark restarted and the record's list of pages made writable emptied in
    /// the same step (under the record's lock, which the handler's recording takes):
    /// what they report from now on is what the next walk has not covered. Empty when
    /// the record is not `id`'s any more or dirty tracking failed (then nothing
    /// changed, and the snapshot protects those pages again itself).
    fn written_during_preprotect(&self, id: u64) -> Vec<PageRun> {
        let mut armed = self.sink.armed();
        let Some(pre) = armed.as_mut().filter(|p| p.id == id && p.tracked) else {
            return Vec::new();
        };
        let written = match self.dirty().restart(PRE_PROTECT_MARK) {
            Ok(w) => w,
            Err(e) => {
                warn!("pre-protection: dirty harvest between walks failed: {e}");
                return Vec::new();
            }
        };
        // Unsorted, with repeats: `normalize_runs` sorts and merges.
        let mut again: Vec<PageRun> = std::mem::take(&mut pre.unprotected)
            .into_iter()
            .map(|p| PageRun::new(p, 1))
            .collect();
        again.extend(written.into_iter().map(|(f, c)| PageRun::new(f, c)));
        intersect(&pre.runs, &normalize_runs(&again))
    }

    /// Delete a snapshot; pages no other snapshot references become writable again.
    pub fn delete(&self, name: &str) -> Result<u64, PoolError> {
        // Unprotect before the lock is released: a snapshot taken right after the delete
        // may protect some of these pages again, and must keep that protection.
        let runs = {
            let mut pool = lock_pool(&self.pool);
            let runs = pool.delete(name)?;
            self.sink.unprotect(&runs);
            runs
        };
        self.dirty().forget(name);
        self.sink.space_freed();
        Ok(runs.iter().map(|r| r.count).sum())
    }

    /// Pages written since snapshot `name` was taken (by vCPUs or by the VMM).
    pub fn dirty_since(&self, name: &str) -> Result<Vec<PageRun>, DirtySinceError> {
        lock_pool(&self.pool).inspect(name)?;
        Ok(self
            .dirty()
            .dirty_since(name)?
            .into_iter()
            .map(|(f, c)| PageRun::new(f, c))
            .collect())
    }

    /// The VMM wrote `pages` through the store's own mapping (restore): record them as
    /// dirty for every tracked snapshot, and drop stale write protection on pages that
    /// no snapshot references any more (the store preserved them before the write).
    pub fn after_vmm_write(&self, pages: &[u64]) {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let runs: Vec<(u64, u64)> = pages_to_runs(sorted)
            .into_iter()
            .map(|r| (r.first, r.count))
            .collect();
        self.dirty().mark(&runs);
        // One unprotect per run of such pages, not per page. Every written page gets
        // it, protected or not: the ioctl also makes KVM drop its mappings of the range
        // (an mmu-notifier invalidation), and a shadow-paging KVM (this host's kvm_pvm)
        // needs that after the VMM rewrote guest page tables behind its back: skipping
        // it for pages known to be unprotected crashed the guest after a rollback.
        let pool = lock_pool(&self.pool);
        let mut stale: Vec<PageRun> = Vec::new();
        for &(first, count) in &runs {
            for p in first..first + count {
                if !pool.is_protected(p) {
                    match stale.last_mut() {
                        Some(r) if r.first + r.count == p => r.count += 1,
                        _ => stale.push(PageRun::new(p, 1)),
                    }
                }
            }
        }
        self.sink.unprotect(&stale);
    }

    /// The lazy fill, for a lazily restored VM.
    pub fn lazy(&self) -> Option<&Arc<LazyFill>> {
        self.lazy.as_ref()
    }

    /// Pages preserved by the fault handler since start.
    pub fn preserved_pages(&self) -> u64 {
        self.sink.preserved()
    }

    /// Blocks may have become free outside [`Engine::delete`] (the block area grew): a
    /// write waiting for a block tries again now.
    pub fn space_freed(&self) {
        self.sink.space_freed();
    }

    /// The write waiting for a free block, if one is (see [`super::sink`]).
    pub fn waiting_for_blocks(&self) -> Option<BlockWait> {
        self.sink.waiting()
    }

    /// What the engine did on its own lately (dropped snapshots), oldest first.
    pub fn events(&self) -> Vec<EngineEvent> {
        self.sink.events()
    }

    /// Engine and store statistics.
    pub fn stats(&self) -> EngineStats {
        let f = self.faults.snapshot();
        EngineStats {
            faults: f.faults,
            fault_total_ns: f.total_ns,
            fault_max_ns: f.max_ns,
            preserved_pages: self.preserved_pages(),
            guest_snapshots_dropped: self.sink.guest_dropped(),
            store: lock_pool(&self.pool).stats(),
        }
    }
}

impl Drop for Engine {
    /// Before the fault handler is stopped and joined: a preserve waiting for a free
    /// block must give up, or the join would wait for it.
    fn drop(&mut self) {
        self.sink.close();
        if let Some(l) = &self.lazy {
            l.stop();
        }
    }
}

/// The name dirty tracking knows a pre-protection by (no snapshot name has a NUL).
const PRE_PROTECT_MARK: &str = "\0pre-protect";

/// At most this many walks over the pages written during the walk before.
const PRE_PROTECT_AGAIN_ROUNDS: usize = 3;

/// A walk over this few pages is short enough that the guest writes next to nothing
/// during it: no further walk.
const PRE_PROTECT_AGAIN_ENOUGH: u64 = 64;

/// The runs a snapshot must write-protect: its newly referenced pages, less those a
/// pre-protection already covers and that were not made writable (`pre.unprotected`)
/// or written (`written`) since it began.
fn to_protect(newly: &[PageRun], pre: Option<(&PreProtect, &[PageRun])>) -> Vec<PageRun> {
    let Some((pre, written)) = pre else {
        return newly.to_vec();
    };
    let mut pages: Vec<u64> = Vec::new();
    let mut out: Vec<PageRun> = Vec::new();
    for n in newly {
        // The parts of `n` outside every pre-protected run.
        let mut at = n.first;
        let end = n.first + n.count;
        for p in pre
            .runs
            .iter()
            .filter(|p| p.first < end && p.first + p.count > n.first)
        {
            if p.first > at {
                out.push(PageRun::new(at, p.first - at));
            }
            at = at.max(p.first + p.count);
        }
        if at < end {
            out.push(PageRun::new(at, end - at));
        }
        pages.extend(pre.unprotected.iter().filter(|&&p| p >= n.first && p < end));
    }
    pages.sort_unstable();
    pages.dedup();
    out.extend(pages.into_iter().map(|p| PageRun::new(p, 1)));
    out.extend(intersect(&normalize_runs(newly), &normalize_runs(written)));
    normalize_runs(&out)
}

/// The walk of pre-protection `id` has returned: its record, if still the one armed,
/// can be relied on. Another request may have armed its own meanwhile, whose walk may
/// not have returned yet.
fn mark_walked(armed: &mut Option<PreProtect>, id: u64) {
    if let Some(pre) = armed.as_mut().filter(|p| p.id == id) {
        pre.walked = true;
    }
}

/// The pages in both `a` and `b` (each sorted, without overlaps), as runs.
fn intersect(a: &[PageRun], b: &[PageRun]) -> Vec<PageRun> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let first = a[i].first.max(b[j].first);
        let end = a[i].end().min(b[j].end());
        if first < end {
            out.push(PageRun::new(first, end - first));
        }
        if a[i].end() < b[j].end() {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::fault::PreserveSink;
    use crate::snapshot::testutil::setup;
    use pmem_backend::PageLocation;

    /// A page snapshot of `runs` (first page, count).
    fn snap(
        engine: &Engine,
        name: &str,
        runs: &[(u64, u64)],
    ) -> Result<pmem_backend::SnapshotInfo, PoolError> {
        let runs: Vec<PageRun> = runs.iter().map(|&(f, c)| PageRun::new(f, c)).collect();
        engine.snapshot(name, SnapshotKind::Pages, &runs, Default::default())
    }

    fn page_of(engine: &Engine, snap: &str, p: u64) -> (PageLocation, u8) {
        let (loc, data) = lock_pool(engine.pool())
            .read_snapshot_page(snap, p)
            .expect("read snapshot page");
        assert!(data.iter().all(|&b| b == data[0]), "page {p} is uniform");
        (loc, data[0])
    }

    #[test]
    fn writes_after_a_snapshot_are_preserved_first_and_shared() {
        let (_dir, engine, ram) = setup(64);
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        let created = snap(&engine, "a", &[(0, 16)]).expect("snapshot a");
        assert_eq!(created.pages, 16);
        ram.fill_page(3, 2); // faults: preserved for a
        ram.fill_page(40, 2); // not protected: no fault
        snap(&engine, "b", &[(0, 8)]).expect("snapshot b");
        ram.fill_page(5, 3); // shared by a and b: one block for both
        ram.fill_page(3, 4); // a has it in a block already, b references RAM
        assert_eq!(
            page_of(&engine, "a", 3),
            (PageLocation::Block(page_block(&engine, "a", 3)), 1)
        );
        assert_eq!(page_of(&engine, "b", 3).1, 2);
        assert_eq!(page_of(&engine, "a", 5).1, 1);
        assert_eq!(page_of(&engine, "b", 5).1, 1);
        assert_eq!(
            page_block(&engine, "a", 5),
            page_block(&engine, "b", 5),
            "a page shared by two snapshots is preserved once"
        );
        assert_eq!(page_of(&engine, "a", 6), (PageLocation::Ram(6), 1));
        // The handler counts a fault after it has unprotected the page, which lets the
        // writer go on: wait for the count instead of racing it.
        let stats = settled_stats(&engine, 3);
        assert_eq!((stats.faults, stats.preserved_pages), (3, 3));
        // Delete a: pages only a referenced become writable without a fault.
        engine.delete("a").expect("delete a");
        ram.fill_page(12, 9);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(engine.stats().faults, 3, "page 12 is no longer protected");
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    /// Stats once the handler has counted `faults` faults (or after 5 s).
    fn settled_stats(engine: &Engine, faults: u64) -> EngineStats {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let stats = engine.stats();
            if stats.faults >= faults || Instant::now() >= deadline {
                return stats;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn page_block(engine: &Engine, snap: &str, p: u64) -> u64 {
        match lock_pool(engine.pool())
            .snapshot_page_location(snap, p)
            .expect("location")
        {
            PageLocation::Block(b) => b,
            other => panic!("page {p} of {snap} is {other:?}, not in a block"),
        }
    }

    #[test]
    fn to_protect_skips_pre_protected_pages_not_written_since() {
        let pre = PreProtect {
            runs: vec![PageRun::new(0, 10), PageRun::new(20, 5)],
            unprotected: vec![3, 3, 21, 40],
            walked: true,
            id: 1,
            tracked: true,
        };
        assert_eq!(
            to_protect(&[PageRun::new(0, 30)], Some((&pre, &[]))),
            vec![
                PageRun::new(3, 1),
                PageRun::new(10, 10),
                PageRun::new(21, 1),
                PageRun::new(25, 5)
            ]
        );
        assert_eq!(
            to_protect(&[PageRun::new(5, 2)], None),
            vec![PageRun::new(5, 2)]
        );
        assert_eq!(to_protect(&[PageRun::new(5, 2)], Some((&pre, &[]))), vec![]);
        // Written since the pre-protection began: protected again, within `newly` only.
        assert_eq!(
            to_protect(
                &[PageRun::new(0, 8), PageRun::new(20, 4)],
                Some((&pre, &[PageRun::new(6, 16), PageRun::new(50, 2)]))
            ),
            vec![PageRun::new(3, 1), PageRun::new(6, 2), PageRun::new(20, 2)]
        );
    }

    #[test]
    fn intersect_keeps_the_pages_in_both() {
        let a = [
            PageRun::new(0, 10),
            PageRun::new(20, 10),
            PageRun::new(40, 1),
        ];
        let b = [PageRun::new(5, 20), PageRun::new(29, 12)];
        assert_eq!(
            intersect(&a, &b),
            vec![
                PageRun::new(5, 5),
                PageRun::new(20, 5),
                PageRun::new(29, 1),
                PageRun::new(40, 1)
            ]
        );
        assert_eq!(intersect(&a, &[]), vec![]);
    }

    /// A guest write during the pre-protection that left its page writable without a
    /// fault reaching the handler (as a write through a mapping KVM kept across the
    /// walk would): dirty tracking saw it, so the snapshot protects the page again and
    /// the next write is preserved first.
    #[test]
    fn a_write_during_pre_protection_without_a_fault_is_protected_again() {
        let (_dir, engine, ram, written) = setup_with_guest_writes(64);
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        engine
            .preprotect(&[PageRun::new(0, 64)])
            .expect("preprotect");
        // The write bypasses the handler: the protection goes, nothing records it but
        // the dirty source.
        engine.protector.unprotect(9, 1).expect("unprotect");
        ram.fill_page(9, 2);
        written.lock().expect("lock").push(9);
        assert_eq!(engine.stats().faults, 0);
        snap(&engine, "s", &[(0, 64)]).expect("snapshot");
        ram.fill_page(9, 3);
        assert_eq!(
            page_of(&engine, "s", 9).1,
            2,
            "the write after the snapshot is preserved"
        );
        assert!(matches!(page_of(&engine, "s", 9).0, PageLocation::Block(_)));
        assert_eq!(page_of(&engine, "s", 10), (PageLocation::Ram(10), 1));
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    /// Between walks: the pages made writable (by a fault or a delete) and the pages
    /// dirty tracking saw written since the pre-protection began, within its runs; both
    /// start over, so a second call reports only what came after the first.
    #[test]
    fn a_walk_again_covers_what_was_written_during_the_walk_before() {
        let (_dir, engine, ram, written) = setup_with_guest_writes(64);
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        snap(&engine, "doomed", &[(40, 2)]).expect("snapshot");
        engine
            .preprotect(&[PageRun::new(0, 32)])
            .expect("preprotect");
        let id = engine.sink.armed().as_ref().map(|p| p.id).expect("armed");
        ram.fill_page(3, 2); // faults: made writable, recorded
        engine.protector.unprotect(9, 1).expect("unprotect");
        ram.fill_page(9, 2); // no fault: only dirty tracking saw it
        written.lock().expect("lock").extend([9, 50]); // 50: outside the runs
        engine.delete("doomed").expect("delete"); // makes 40, 41 writable: outside too
        assert_eq!(
            engine.written_during_preprotect(id),
            vec![PageRun::new(3, 1), PageRun::new(9, 1)]
        );
        assert_eq!(engine.written_during_preprotect(id), vec![]);
        ram.fill_page(3, 3); // not protected again yet: no fault
        written.lock().expect("lock").push(3);
        assert_eq!(
            engine.written_during_preprotect(id),
            vec![PageRun::new(3, 1)]
        );
        assert_eq!(
            engine.written_during_preprotect(id + 1),
            vec![],
            "not its record"
        );
        // The walk again, then the snapshot, which protects only what came after.
        engine
            .protect_or_disarm(&[PageRun::new(3, 1), PageRun::new(9, 1)])
            .expect("walk");
        mark_walked(&mut engine.sink.armed(), id);
        snap(&engine, "s", &[(0, 32)]).expect("snapshot");
        ram.fill_page(3, 9);
        ram.fill_page(9, 9);
        assert_eq!(page_of(&engine, "s", 3).1, 3);
        assert_eq!(page_of(&engine, "s", 9).1, 2);
        assert!(matches!(page_of(&engine, "s", 9).0, PageLocation::Block(_)));
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    /// The walk of one pre-protection returning while another request's record is
    /// armed (its walk still going) must not mark that record walked.
    #[test]
    fn only_its_own_walk_marks_a_pre_protection_walked() {
        let (_dir, engine, _ram) = setup(64);
        engine.preprotect(&[PageRun::new(0, 8)]).expect("first");
        let first = engine
            .sink
            .armed()
            .as_ref()
            .map(|p| (p.id, p.walked, p.tracked));
        assert_eq!(first, Some((1, true, true)));
        // A snapshot takes the record; the next pre-protection still gets a new id, so
        // the first walk, were it still going, could not mark it walked.
        snap(&engine, "s", &[(0, 8)]).expect("snapshot");
        assert!(engine.sink.armed().is_none());
        engine.preprotect(&[PageRun::new(8, 8)]).expect("second");
        assert_eq!(engine.sink.armed().as_ref().map(|p| p.id), Some(2));
        let mut other = Some(PreProtect {
            id: 3,
            ..Default::default()
        });
        mark_walked(&mut other, 2);
        assert!(!other.as_ref().expect("armed").walked);
        mark_walked(&mut other, 3);
        assert!(other.as_ref().expect("armed").walked);
    }

    #[test]
    fn a_pre_protected_snapshot_still_preserves_every_page() {
        let (_dir, engine, ram) = setup(64);
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        engine
            .preprotect(&[PageRun::new(0, 32)])
            .expect("preprotect");
        ram.fill_page(3, 2); // faults once, becomes writable again: recorded
        ram.fill_page(5, 2);
        snap(&engine, "doomed", &[(40, 2)]).expect("snapshot");
        engine.delete("doomed").expect("delete"); // unprotects 40, 41 (outside the runs)
        engine
            .snapshot(
                "s",
                SnapshotKind::Pages,
                &[PageRun::new(0, 32)],
                Default::default(),
            )
            .expect("snapshot");
        ram.fill_page(3, 9); // protected again by the snapshot: preserved first
        ram.fill_page(7, 9); // pre-protected, never written: still protected
        ram.fill_page(31, 9);
        assert_eq!(page_of(&engine, "s", 3).1, 2);
        assert_eq!(page_of(&engine, "s", 5), (PageLocation::Ram(5), 2));
        assert_eq!(page_of(&engine, "s", 7).1, 1);
        assert_eq!(page_of(&engine, "s", 31).1, 1);
        assert!(matches!(page_of(&engine, "s", 7).0, PageLocation::Block(_)));
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    /// A snapshot taken while another request's pre-protection is still being walked
    /// must not count on it: the pages the walk has not reached are writable.
    #[test]
    fn a_pre_protection_still_being_walked_is_not_relied_on() {
        let (_dir, engine, ram) = setup(64);
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        // Armed as `preprotect` arms before its walk, and no walk yet.
        *engine.sink.armed() = Some(PreProtect {
            runs: vec![PageRun::new(0, 32)],
            unprotected: Vec::new(),
            walked: false,
            id: 1,
            tracked: true,
        });
        snap(&engine, "s", &[(0, 8)]).expect("snapshot");
        assert!(engine.sink.armed().is_some(), "left armed for its owner");
        ram.fill_page(4, 7); // must be preserved: the snapshot protected it itself
        assert_eq!(page_of(&engine, "s", 4).1, 1);
        assert!(matches!(page_of(&engine, "s", 4).0, PageLocation::Block(_)));
    }

    #[test]
    fn bad_requests_get_typed_errors() {
        let (_dir, engine, _ram) = setup(16);
        snap(&engine, "a", &[(0, 4)]).expect("snapshot");
        let dup = snap(&engine, "a", &[(4, 1)]).expect_err("duplicate");
        assert!(matches!(dup, PoolError::DuplicateName(_)), "{dup}");
        let outside = snap(&engine, "b", &[(10, 7)]).expect_err("outside RAM");
        assert!(
            matches!(outside, PoolError::PageOutOfRange { .. }),
            "{outside}"
        );
        let unknown = engine.delete("zz").expect_err("unknown");
        assert!(matches!(unknown, PoolError::NoSuchSnapshot(_)), "{unknown}");
        let unknown = engine.dirty_since("zz").expect_err("unknown");
        assert!(
            matches!(unknown, DirtySinceError::Pool(PoolError::NoSuchSnapshot(_))),
            "{unknown}"
        );
        assert!(
            !lock_pool(engine.pool()).is_protected(10),
            "a refused snapshot protects nothing"
        );
    }

    #[test]
    fn the_store_sink_unprotects_while_holding_the_store_lock() {
        let (_dir, engine, _ram) = setup(16);
        snap(&engine, "a", &[(0, 4)]).expect("snapshot");
        let mut locked_during_unprotect = None;
        engine
            .sink
            .before_write_then(2, &mut || {
                locked_during_unprotect = Some(engine.pool().try_lock().is_err());
            })
            .expect("preserve");
        assert_eq!(
            locked_during_unprotect,
            Some(true),
            "a snapshot must not be able to protect the page between preserve and unprotect"
        );
        assert!(
            !lock_pool(engine.pool()).is_protected(2),
            "page 2 was preserved"
        );
    }

    /// An engine over `pages` pages whose dirty tracking's one source reports the pages
    /// pushed onto the returned list (guest writes that raise no fault).
    fn setup_with_guest_writes(
        pages: u64,
    ) -> (
        tempfile::TempDir,
        Engine,
        Arc<crate::snapshot::testutil::Ram>,
        Arc<Mutex<Vec<u64>>>,
    ) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let (dir, engine, ram) = crate::snapshot::testutil::setup_with_sources(
            pages,
            Default::default(),
            vec![Box::new(GuestWrites(written.clone(), pages))],
        );
        (dir, engine, ram, written)
    }

    /// A dirty source fed by hand: the pages a test wrote into RAM as the guest.
    struct GuestWrites(Arc<Mutex<Vec<u64>>>, u64);
    impl DirtySource for GuestWrites {
        fn harvest(&mut self) -> Result<crate::vstate::dirty::PageBitmap, DirtyError> {
            let mut out = vec![0u64; crate::vstate::dirty::bitmap_words(self.1)];
            for p in self.0.lock().expect("lock").drain(..) {
                out[(p / 64) as usize] |= 1 << (p % 64);
            }
            Ok(out)
        }
    }

    fn dirty_pages(engine: &Engine, name: &str) -> Vec<u64> {
        let runs = engine.dirty_since(name).expect("dirty since");
        runs.iter()
            .flat_map(|r| r.first..r.first + r.count)
            .collect()
    }

    /// The controller's rollback sequence (dirty since, copy back, after_vmm_write,
    /// reset) on three snapshots: the rolled-back one starts over, and the pages the
    /// rollback wrote are dirty for the others, whose content they changed.
    #[test]
    fn a_rollback_leaves_its_copied_back_pages_dirty_for_the_other_snapshots() {
        let (_dir, engine, ram, written) = setup_with_guest_writes(32);
        let guest_write = |p: u64, v: u8| {
            ram.fill_page(p, v);
            written.lock().expect("lock").push(p);
        };
        for p in 0..32 {
            ram.fill_page(p, 1);
        }
        snap(&engine, "a", &[(0, 32)]).expect("a");
        guest_write(3, 2);
        snap(&engine, "b", &[(0, 32)]).expect("b");
        guest_write(5, 3);
        snap(&engine, "c", &[(0, 32)]).expect("c");
        guest_write(7, 4);
        assert_eq!(dirty_pages(&engine, "b"), vec![5, 7]);
        let dirty = engine.dirty_since("b").expect("dirty since b");
        let back = lock_pool(engine.pool())
            .copy_back("b", &dirty)
            .expect("copy back");
        assert_eq!(back, vec![5, 7]);
        engine.after_vmm_write(&back);
        engine.reset_dirty("b").expect("reset b");
        assert_eq!((ram.word(5, 0) as u8, ram.word(7, 0) as u8), (1, 1));
        assert_eq!(dirty_pages(&engine, "b"), Vec::<u64>::new());
        assert_eq!(dirty_pages(&engine, "a"), vec![3, 5, 7]);
        assert_eq!(
            dirty_pages(&engine, "c"),
            vec![5, 7],
            "page 5 held 3 when c was taken and holds 1 now"
        );
        guest_write(9, 5);
        assert_eq!(dirty_pages(&engine, "b"), vec![9]);
        assert_eq!(dirty_pages(&engine, "c"), vec![5, 7, 9]);
    }

    #[test]
    fn a_duplicate_name_keeps_the_existing_snapshots_dirty_tracking() {
        let (_dir, engine, _ram) = setup(16);
        snap(&engine, "a", &[(0, 4)]).expect("snapshot");
        engine.after_vmm_write(&[5]);
        let dup = snap(&engine, "a", &[(8, 1)]).expect_err("duplicate");
        assert!(matches!(dup, PoolError::DuplicateName(_)), "{dup}");
        let runs = engine.dirty_since("a").expect("a is still tracked");
        assert_eq!(
            runs,
            vec![PageRun::new(5, 1)],
            "page 5 is still dirty since a"
        );
    }
}
