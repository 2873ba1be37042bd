//! The fault handler's view of the store ([`StoreSink`]): preserve a page before its
//! first write, and what happens when the block area has no room for it.
//!
//! # When the block area is full
//!
//! Host-owned snapshots (VM snapshots, `ctl snapshot-process`, `--snapshot-at-ready`)
//! are never dropped to let the guest write. A preserve that finds no free block (or no
//! room in the catalog):
//! 1. drops guest-owned snapshots, oldest first, until the preserve succeeds (each drop
//!    logged, counted in the statistics and kept as an [`EngineEvent`]);
//! 2. if only host-owned snapshots hold blocks, leaves the page protected and waits: the
//!    vCPU (or VMM thread) that writes it stays blocked, the API reports the VM as
//!    `paused: block area full` ([`StoreSink::waiting`]), and the preserve is tried again
//!    when a snapshot is deleted or the block area grows ([`StoreSink::space_freed`]),
//!    and once a second.
//!
//! Other preserve failures (an I/O error) cannot be waited out: every snapshot that still
//! needs the page is dropped and logged, and the page is unprotected so the guest goes on.
//!
//! Guest-owned snapshots are bounded before this point by the guest quota (see
//! `controller::process`), so step 1 is rare and step 2 needs the host's own snapshots
//! to fill the block area.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use pmem_backend::{Owner, PageLocation, PageRun, Pool, PoolError};

use super::dirty::DirtyTracker;
use super::fault::PreserveSink;
use super::protect::PageProtector;

/// Events kept for the API (the newest; older ones are counted only).
pub const MAX_EVENTS: usize = 64;

/// How often a waiting preserve looks again even without a wake-up, and how often it
/// logs that it still waits.
const RETRY: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Lock the pool, ignoring poisoning: a panic elsewhere does not make the on-disk store
/// less consistent (every change commits atomically), so later calls may go on.
pub fn lock_pool(pool: &Mutex<Pool>) -> MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// Something the engine did on its own that an operator should see.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineEvent {
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What: `guest_snapshot_dropped` or `snapshot_dropped` (a failed preserve).
    pub kind: &'static str,
    /// The snapshot concerned (store name).
    pub snapshot: String,
    /// Why, for people.
    pub detail: String,
}

/// A preserve waiting for room in the block area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockWait {
    /// The guest page that needs a block.
    pub page: u64,
    /// Since when, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A pre-protection in progress (see `Engine::preprotect`).
#[derive(Debug, Default)]
pub(super) struct PreProtect {
    pub(super) runs: Vec<PageRun>,
    pub(super) unprotected: Vec<u64>,
    /// Set once the write-protect of `runs` has returned: before that, pages of `runs`
    /// the walk has not reached yet are writable without being in `unprotected`, so a
    /// snapshot must not rely on the record (`Engine::snapshot` leaves it armed).
    pub(super) walked: bool,
    /// Which `Engine::preprotect` call armed this record: only that call marks it walked
    /// (another one may have replaced the record meanwhile).
    pub(super) id: u64,
    /// Whether dirty tracking started (under `PRE_PROTECT_MARK`) before the walk: the
    /// snapshot then also protects again every page written since, whether or not the
    /// write raised a fault. Without it the record is not relied on.
    pub(super) tracked: bool,
}

/// The fault handler's view of the store: preserve before the first write.
pub(super) struct StoreSink {
    pool: Arc<Mutex<Pool>>,
    protector: Arc<dyn PageProtector>,
    dirty: Arc<Mutex<DirtyTracker>>,
    preserved: AtomicU64,
    /// While a pre-protection is armed: what was pre-protected, and every page the
    /// handler has made writable since (those must be protected again at the snapshot).
    armed: Mutex<Option<PreProtect>>,
    /// The id of the next pre-protection (ids are never reused, so a walk that returns
    /// late cannot mistake a newer record for its own).
    next_preprotect: AtomicU64,
    /// Signalled (with the pool mutex) when blocks may have become free.
    space: Condvar,
    /// Set when the engine goes away: a waiting preserve gives up.
    closing: AtomicBool,
    waiting: Mutex<Option<BlockWait>>,
    guest_dropped: AtomicU64,
    events: Mutex<VecDeque<EngineEvent>>,
}

/// How a preserve ended.
enum Preserved {
    Done,
    /// Failed; the snapshots that needed the page were dropped.
    Failed(PoolError),
    /// The engine is closing while the block area was full: the page stays protected.
    Closing(PoolError),
}

fn is_full(e: &PoolError) -> bool {
    matches!(
        e,
        PoolError::BlockAreaFull { .. } | PoolError::MetadataFull { .. }
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl StoreSink {
    pub(super) fn new(
        pool: Arc<Mutex<Pool>>,
        protector: Arc<dyn PageProtector>,
        dirty: Arc<Mutex<DirtyTracker>>,
    ) -> Self {
        Self {
            pool,
            protector,
            dirty,
            preserved: AtomicU64::new(0),
            armed: Mutex::new(None),
            next_preprotect: AtomicU64::new(1),
            space: Condvar::new(),
            closing: AtomicBool::new(false),
            waiting: Mutex::new(None),
            guest_dropped: AtomicU64::new(0),
            events: Mutex::new(VecDeque::new()),
        }
    }

    pub(super) fn armed(&self) -> MutexGuard<'_, Option<PreProtect>> {
        lock(&self.armed)
    }

    /// A fresh id for a pre-protection record.
    pub(super) fn next_preprotect_id(&self) -> u64 {
        self.next_preprotect.fetch_add(1, Ordering::Relaxed)
    }

    /// Pages preserved by the fault handler.
    pub(super) fn preserved(&self) -> u64 {
        self.preserved.load(Ordering::Relaxed)
    }

    /// Guest-owned snapshots dropped because the block area was full.
    pub(super) fn guest_dropped(&self) -> u64 {
        self.guest_dropped.load(Ordering::Relaxed)
    }

    /// The preserve waiting for room, if one is.
    pub(super) fn waiting(&self) -> Option<BlockWait> {
        *lock(&self.waiting)
    }

    /// The newest events, oldest first.
    pub(super) fn events(&self) -> Vec<EngineEvent> {
        lock(&self.events).iter().cloned().collect()
    }

    /// Blocks may have become free (a delete, a grown block area): a waiting preserve
    /// tries again now.
    pub(super) fn space_freed(&self) {
        self.space.notify_all();
    }

    /// The engine goes away: a waiting preserve gives up (the page stays protected).
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.space.notify_all();
    }

    /// Make `runs` writable, and remember them if a pre-protection is armed. Every
    /// unprotect of the engine goes through here, so an armed pre-protection always
    /// knows which of its pages lost their protection.
    pub(super) fn unprotect(&self, runs: &[PageRun]) {
        for r in runs {
            if let Err(e) = self.protector.unprotect(r.first, r.count) {
                warn!("unprotect of pages {}+{} failed: {e}", r.first, r.count);
            }
        }
        if let Some(pre) = self.armed().as_mut() {
            pre.unprotected
                .extend(runs.iter().flat_map(|r| r.first..r.first + r.count));
        }
    }

    fn event(&self, kind: &'static str, snapshot: &str, detail: String) {
        let mut events = lock(&self.events);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(EngineEvent {
            unix_ms: unix_ms(),
            kind,
            snapshot: snapshot.to_string(),
            detail,
        });
    }

    /// Delete snapshot `name` from `pool` on the engine's own initiative.
    fn drop_snapshot(&self, pool: &mut Pool, name: &str) -> bool {
        match pool.delete(name) {
            Ok(runs) => {
                self.unprotect(&runs);
                lock(&self.dirty).forget(name);
                true
            }
            Err(e) => {
                error!("cannot drop snapshot {name:?}: {e}");
                false
            }
        }
    }

    /// Drop the oldest guest-owned snapshot to make room; false when there is none.
    fn drop_oldest_guest(&self, pool: &mut Pool, page: u64) -> bool {
        let oldest = pool
            .list()
            .into_iter()
            .filter(|s| matches!(s.owner, Owner::Guest(_)))
            .min_by_key(|s| s.id);
        let Some(victim) = oldest else {
            return false;
        };
        if !self.drop_snapshot(pool, &victim.name) {
            return false;
        }
        self.guest_dropped.fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "block area full: guest page {page} needed a block; the oldest guest-owned \
             snapshot ({} pages, {} in blocks) was dropped, host-owned snapshots are kept",
            victim.pages, victim.pages_in_blocks
        );
        error!("guest snapshot {:?} dropped: {detail}", victim.name);
        self.event("guest_snapshot_dropped", &victim.name, detail);
        true
    }

    /// A failure that waiting cannot cure: drop every snapshot that still needs `page`
    /// in RAM, so none silently reads the new content later.
    fn drop_needing(&self, pool: &mut Pool, page: u64, reason: &PoolError) {
        let victims: Vec<String> = pool
            .list()
            .into_iter()
            .filter(|s| {
                matches!(
                    pool.snapshot_page_location(s.name.as_str(), page),
                    Ok(PageLocation::Ram(_))
                )
            })
            .map(|s| s.name)
            .collect();
        for name in &victims {
            if self.drop_snapshot(pool, name) {
                let detail = format!("cannot preserve guest page {page}: {reason}");
                error!("snapshot {name:?} dropped: {detail}");
                self.event("snapshot_dropped", name, detail);
            }
        }
    }

    /// Preserve `page`, following the policy of the module docs. Returns the pool guard
    /// (the caller unprotects under it) and the outcome.
    fn preserve_waiting<'a>(
        &'a self,
        mut pool: MutexGuard<'a, Pool>,
        page: u64,
    ) -> (MutexGuard<'a, Pool>, Preserved) {
        let mut waited: Option<(Instant, Instant)> = None; // (since, last log)
        loop {
            match pool.preserve(page) {
                Ok(fresh) => {
                    if fresh {
                        self.preserved.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some((since, _)) = waited {
                        *lock(&self.waiting) = None;
                        info!(
                            "block area has room again: guest page {page} preserved after \
                             waiting {:?}",
                            since.elapsed()
                        );
                    }
                    return (pool, Preserved::Done);
                }
                Err(e) if is_full(&e) => {
                    if self.drop_oldest_guest(&mut pool, page) {
                        continue;
                    }
                    if self.closing.load(Ordering::SeqCst) {
                        *lock(&self.waiting) = None;
                        return (pool, Preserved::Closing(e));
                    }
                    match &mut waited {
                        None => {
                            let now = Instant::now();
                            waited = Some((now, now));
                            *lock(&self.waiting) = Some(BlockWait {
                                page,
                                since_unix_ms: unix_ms(),
                            });
                            error!(
                                "{e}: only host-owned snapshots hold blocks, so the write to \
                                 guest page {page} waits (VM status \"paused: block area \
                                 full\"): delete a snapshot (pmsnap ctl delete NAME) or grow \
                                 the block area (pmsnap ctl pool grow SIZE)"
                            );
                        }
                        Some((since, last)) if last.elapsed() >= LOG_EVERY => {
                            *last = Instant::now();
                            warn!(
                                "still waiting for a free block for guest page {page} \
                                 ({:?}): delete a snapshot or grow the block area",
                                since.elapsed()
                            );
                        }
                        Some(_) => {}
                    }
                    pool = match self.space.wait_timeout(pool, RETRY) {
                        Ok((g, _)) => g,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
                Err(e) => {
                    self.drop_needing(&mut pool, page, &e);
                    return (pool, Preserved::Failed(e));
                }
            }
        }
    }
}

impl PreserveSink for StoreSink {
    fn before_write(&self, page: u64) -> Result<(), PoolError> {
        match self.preserve_waiting(lock_pool(&self.pool), page).1 {
            Preserved::Done => Ok(()),
            Preserved::Failed(e) | Preserved::Closing(e) => Err(e),
        }
    }

    /// Preserve and unprotect under one hold of the store lock: a snapshot cannot
    /// protect the page again in between (see the trait). When the engine closes while
    /// the block area is full, the page stays protected: unprotecting would let the
    /// write change a host snapshot's page (the VMM is stopping; nobody runs it again).
    fn before_write_then(&self, page: u64, unprotect: &mut dyn FnMut()) -> Result<(), PoolError> {
        let (pool, outcome) = self.preserve_waiting(lock_pool(&self.pool), page);
        let res = match outcome {
            Preserved::Done => Ok(()),
            Preserved::Failed(e) => Err(e),
            Preserved::Closing(e) => return Err(e),
        };
        unprotect();
        if let Some(pre) = self.armed().as_mut() {
            pre.unprotected.push(page);
        }
        drop(pool);
        res
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use pmem_backend::{Owner, PageLocation, PageRun, PoolOptions, SnapshotKind, SnapshotMeta};
    use pmsnap_testenv::poll_until;

    use crate::snapshot::engine::{lock_pool, Engine};
    use crate::snapshot::testutil::{setup_with, Ram};

    /// 64 guest pages, 4 blocks, every page filled with 1.
    fn small() -> (tempfile::TempDir, Engine, std::sync::Arc<Ram>) {
        let (dir, engine, ram) = setup_with(
            64,
            PoolOptions {
                block_count: Some(4),
                ..Default::default()
            },
        );
        for p in 0..64 {
            ram.fill_page(p, 1);
        }
        (dir, engine, ram)
    }

    fn snap(engine: &Engine, name: &str, owner: Owner, first: u64, count: u64) {
        let meta = SnapshotMeta {
            owner,
            process: matches!(owner, Owner::Guest(_)).then(|| pmem_backend::ProcessInfo {
                pid: 7,
                comm: "app".into(),
                run_vas: vec![0x40_0000],
            }),
            ..Default::default()
        };
        engine
            .snapshot(
                &owner.qualify(name),
                // Guests own process snapshots only.
                match owner {
                    Owner::Host => SnapshotKind::Pages,
                    Owner::Guest(_) => SnapshotKind::Process,
                },
                &[PageRun::new(first, count)],
                meta,
            )
            .expect("snapshot");
    }

    fn page(engine: &Engine, snap: &str, p: u64) -> (PageLocation, u8) {
        let (loc, data) = lock_pool(engine.pool())
            .read_snapshot_page(snap, p)
            .expect("read");
        (loc, data[0])
    }

    fn names(engine: &Engine) -> Vec<String> {
        lock_pool(engine.pool())
            .list()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn a_full_block_area_drops_guest_snapshots_oldest_first_and_keeps_host_ones() {
        let (_dir, engine, ram) = small();
        snap(&engine, "host", Owner::Host, 0, 4);
        snap(&engine, "old", Owner::Guest(1000), 10, 4);
        snap(&engine, "new", Owner::Guest(1000), 20, 4);
        for p in 10..14 {
            ram.fill_page(p, 2); // the 4 blocks now hold "old"'s pages
        }
        ram.fill_page(0, 3); // "host" needs a block: "old" goes, "new" stays
        assert_eq!(ram.word(0, 0), 0x0303_0303_0303_0303);
        assert!(matches!(
            page(&engine, "host", 0),
            (PageLocation::Block(_), 1)
        ));
        assert_eq!(names(&engine), ["host", "guest:1000/new"]);
        let stats = engine.stats();
        assert_eq!(stats.guest_snapshots_dropped, 1);
        let events = engine.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].kind, "guest_snapshot_dropped");
        assert_eq!(events[0].snapshot, "guest:1000/old");
        assert!(engine.waiting_for_blocks().is_none());
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    #[test]
    fn with_only_host_snapshots_a_write_waits_until_a_delete_frees_blocks() {
        let (_dir, engine, ram) = small();
        snap(&engine, "h1", Owner::Host, 0, 4);
        snap(&engine, "h2", Owner::Host, 4, 4);
        for p in 0..4 {
            ram.fill_page(p, 2); // all 4 blocks hold h1's pages
        }
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let (ram, done) = (ram.clone(), done.clone());
            std::thread::spawn(move || {
                ram.fill_page(4, 5);
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        let wait = poll_until(Duration::from_secs(5), || engine.waiting_for_blocks());
        assert_eq!(wait.map(|w| w.page), Some(4), "the write waits for a block");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "still waiting"
        );
        assert_eq!(page(&engine, "h2", 4), (PageLocation::Ram(4), 1));
        engine.delete("h1").expect("delete h1");
        writer.join().expect("writer");
        assert!(engine.waiting_for_blocks().is_none());
        assert!(matches!(
            page(&engine, "h2", 4),
            (PageLocation::Block(_), 1)
        ));
        assert_eq!(ram.word(4, 0), 0x0505_0505_0505_0505);
        assert_eq!(engine.stats().guest_snapshots_dropped, 0);
        assert!(engine.events().is_empty(), "no host snapshot was dropped");
    }

    /// Host snapshot `h1` of pages 0..8 whose pages 0..4 fill the 4 blocks, and a
    /// writer thread blocked writing page 4 (it waits for a block).
    fn writer_waiting(engine: &Engine, ram: &std::sync::Arc<Ram>) -> std::thread::JoinHandle<()> {
        snap(engine, "h1", Owner::Host, 0, 8);
        for p in 0..4 {
            ram.fill_page(p, 2);
        }
        let writer = {
            let ram = ram.clone();
            std::thread::spawn(move || ram.fill_page(4, 5))
        };
        assert!(poll_until(Duration::from_secs(5), || engine.waiting_for_blocks()).is_some());
        writer
    }

    #[test]
    fn a_waiting_write_goes_on_when_the_block_area_grows() {
        let (_dir, engine, ram) = small();
        let writer = writer_waiting(&engine, &ram);
        let grown = lock_pool(engine.pool()).grow_blocks(8).expect("grow");
        assert_eq!((grown.old_block_count, grown.new_block_count), (4, 8));
        engine.space_freed();
        writer.join().expect("writer");
        assert!(engine.waiting_for_blocks().is_none());
        assert!(matches!(
            page(&engine, "h1", 4),
            (PageLocation::Block(_), 1)
        ));
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    #[test]
    fn an_engine_dropped_while_a_write_waits_stops_without_hanging() {
        let (_dir, engine, ram) = small();
        let writer = writer_waiting(&engine, &ram);
        let t = std::time::Instant::now();
        drop(engine);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        // Closing the userfaultfd released the writer.
        writer.join().expect("writer");
    }
}
