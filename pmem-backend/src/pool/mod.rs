//! The pool file and its snapshot store, one `Pool` in several files:
//! - here: the `Pool` itself, creating a pool file, the background pre-fault, raw page
//!   I/O and the accessors;
//! - `index.rs`: the in-memory reference counts, block usage, free list and protection
//!   bitmap (no file);
//! - `recovery.rs`: opening a pool (superblock, catalog, redirect-log replay);
//! - `commit.rs`: writing a catalog generation and its superblock;
//! - `store.rs`: the operations that change the store: snapshot, preserve, delete, gc;
//! - `grow.rs`: growing the block area of an open pool;
//! - `copy_back.rs`: restoring RAM from a snapshot;
//! - `read.rs`: reading snapshots, listings and statistics;
//! - `verify.rs`: re-reading and checking everything.

mod background;
mod commit;
mod copy_back;
mod grow;
mod index;
mod lazy_back;
mod read;
mod recovery;
mod store;
mod verify;

pub use background::BackgroundHold;
pub use grow::GrowReport;
pub use lazy_back::{LazyCopyBack, LazyPage};
pub use recovery::RecoveryReport;

pub use store::{GcReport, ProtectError};
pub use verify::{Problem, VerifyReport};

use crate::catalog::{Redirect, Snapshot};
use crate::error::{PoolError, Result};
use crate::lock::{lock_exclusive, still_linked, LockError};
use crate::mapping::Mapping;
use crate::persist::{MsyncPersist, Persist};
use crate::redirects::Redirects;
use crate::superblock::{self, Geometry, Superblock};
use crate::{Page, PageRun, PAGE_SIZE};
use background::{populate_until_stopped, Quiet};
use index::RefIndex;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Default redirect-log capacity (records): 1 MiB of log.
pub const DEFAULT_LOG_RECORDS: u64 = 32768;

/// Choices made at pool creation. `Default` gives sensible values.
#[derive(Debug, Default)]
pub struct PoolOptions {
    /// 4 KiB blocks for preserved pages and state blobs (default: as many as RAM pages).
    pub block_count: Option<u64>,
    /// Redirect-log capacity in records (default: 32768 or one per RAM page, whichever
    /// is larger, so compactions stay rare relative to the catalog size).
    pub log_records: Option<u64>,
    /// Bytes per metadata slot (default 1 MiB + 24 bytes per RAM page and per block: a
    /// block area full of preserved pages is a 28-byte-a-page checkpoint, and the room
    /// left decides how many commits append a delta before the next checkpoint).
    pub meta_slot_bytes: Option<u64>,
    /// The persist seam (default msync).
    pub persist: Option<Box<dyn Persist>>,
    /// Leave the RAM area unallocated (a hole in the file): guest RAM will come lazily
    /// from the source this names. A lazy restore fills guest RAM through userfaultfd
    /// (`UFFDIO_COPY`), which only fires for pages that are not in the file yet:
    /// allocating them here would make every page present, as zeros. The embedder must
    /// install a [`RamGate`] before the store reads RAM. Until it calls
    /// [`mark_ram_complete`], a marker file beside the pool ([`filling_marker`]) makes
    /// every later [`Pool::open`] refuse the pool: its RAM has holes that only the
    /// source could fill.
    pub lazy_ram: Option<String>,
}

/// The marker file of a pool whose RAM is still being filled lazily (see
/// [`PoolOptions::lazy_ram`]): `<pool>.filling`, holding the source's description.
pub fn filling_marker(pool: &Path) -> PathBuf {
    let mut s = pool.as_os_str().to_owned();
    s.push(".filling");
    PathBuf::from(s)
}

/// Every RAM page of the pool at `pool` is in place: remove its [`filling_marker`].
pub fn mark_ram_complete(pool: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(filling_marker(pool)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What the store calls before it reads guest RAM through its own mapping, when RAM may
/// still have holes (a lazy restore, see [`PoolOptions::lazy_ram`]). Reading a hole
/// through the store's mapping would allocate a zero page there, and the guest would
/// then see zeros instead of its memory: `ensure` must make the pages present first
/// (fetch them, or wait until they are), and return only once they are.
///
/// It is called with the pool borrowed mutably or not at all by the caller (under the
/// embedder's pool lock), so it must not need that lock itself.
pub trait RamGate: Send + Sync {
    /// Make the pages of `runs` present in RAM, or say why they cannot be. All of them
    /// are asked for before any is waited for (a copy-back passes many scattered runs).
    fn ensure(&self, runs: &[PageRun]) -> std::result::Result<(), String>;
}

/// Called first in every thread the pool starts (its pre-fault thread), once set: an
/// embedder that confines its threads (the VMM drops its user and group ids in each
/// thread it starts) does the same here.
pub static THREAD_START: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// An open pool: the file, its lock, the store's mapping, and the in-memory state of the
/// snapshot store. Not internally synchronised: share it behind a `Mutex` (see the crate
/// docs on threading).
///
/// Its fields are private to this module and its files; the reference counts are
/// private to `index.rs` and change only through its methods.
pub struct Pool {
    /// Where the pool was opened.
    path: PathBuf,
    /// The pool file; its open file description holds the lock.
    file: File,
    /// The store's own mapping of the whole file (shared with the pre-fault thread).
    map: Arc<Mapping>,
    /// The one path to durability (msync, or a crash simulator in tests).
    persist: Box<dyn Persist>,
    /// The layout, from the superblock.
    geo: Geometry,
    /// The superblock of the generation in force.
    sb: Superblock,
    /// The snapshots by id (so in creation order): the catalog's.
    snapshots: BTreeMap<u64, Snapshot>,
    /// Where their preserved pages are: the catalog's redirects, with those replayed or
    /// made since (one record per preserve, shared by its snapshots).
    redirects: Redirects,
    /// Snapshot ids by name (creating and deleting look a name up without walking every
    /// snapshot).
    names: HashMap<String, u64>,
    /// The redirects applied since the last commit (the redirect log's records of the
    /// current generation, less those recovery dropped): the next commit's delta.
    pending: Vec<Redirect>,
    /// Bytes of the checkpoint at the start of the catalog in force (the deltas follow).
    checkpoint_len: u64,
    /// Version of that checkpoint: below `CATALOG_VERSION` (an older pool), the next
    /// commit writes a checkpoint.
    catalog_version: u32,
    /// Id of the next snapshot.
    next_id: u64,
    /// Reference counts, block usage and protection (see `index.rs`).
    index: RefIndex,
    /// Redirect-log records of the current generation: where the next one goes.
    log_tail: u32,
    /// What opening found.
    recovery: RecoveryReport,
    /// The background pre-fault (see `start_prefault`): its stop flag and thread.
    prefault: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
    /// Holds that keep the pre-fault thread waiting (see [`Pool::hold_background`]).
    quiet: Arc<Quiet>,
    /// Called before any read of RAM while RAM may have holes (see [`RamGate`]).
    ram_gate: Option<Arc<dyn RamGate>>,
    /// Metadata and blocks still to be allocated, by the pre-fault thread (a pool
    /// created with `lazy_ram`).
    reserve_pending: bool,
    /// The snapshot a lazy copy back fills RAM from, while it fills (see
    /// [`Pool::copy_back_lazy`]).
    fill_pin: Option<lazy_back::FillPin>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The thread holds the mapping, and the mapping holds the file and so its flock:
        // stop it before the pool is considered closed, so a reopen finds it unlocked.
        self.stop_prefault();
    }
}

impl std::fmt::Debug for Pool {
    // Not derived: the per-page and per-block vectors would print millions of numbers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("path", &self.path)
            .field("geometry", &self.geo)
            .field("generation", &self.sb.generation)
            .field("snapshots", &self.snapshots.len())
            .field("free_blocks", &self.index.free_count())
            .field("log_tail", &self.log_tail)
            .finish_non_exhaustive()
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Take the pool's lock, then check that `path` still names the file: a prune that
/// claimed it between our open and our lock has removed it.
fn take_lock(file: &File, path: &Path) -> Result<()> {
    lock_exclusive(file).map_err(|e| match e {
        LockError::Held(pid) => PoolError::Locked {
            path: path.to_path_buf(),
            pid,
        },
        LockError::Io(source) => PoolError::Io {
            what: "locking",
            path: path.to_path_buf(),
            source,
        },
    })?;
    match still_linked(file, path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(PoolError::Removed(path.to_path_buf())),
        Err(source) => Err(PoolError::Io {
            what: "checking",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Allocate bytes `off..off + len` of the file now (extending it if needed), so a full
/// tmpfs fails here with ENOSPC instead of with a SIGBUS on some later write through the
/// mapping (a preserve, or a guest write). Filesystems without fallocate keep the sparse
/// file.
fn allocate(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let too_large = || std::io::Error::from_raw_os_error(libc::EFBIG);
    let off = libc::off_t::try_from(off).map_err(|_| too_large())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_large())?;
    // SAFETY: plain syscall on a valid fd owned by `file`; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, len) };
    match rc {
        0 | libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Fail now if the file system holding `file` has less than `bytes` free (a pool whose
/// space is allocated later, see [`PoolOptions::lazy_ram`]).
fn check_free_space(file: &File, bytes: u64, path: &Path) -> Result<()> {
    // SAFETY: a zeroed statvfs is a valid out-buffer; fstatvfs fills it from a valid fd.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd owned by `file`, valid pointer to `st` for the call.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err("checking free space for", path)(
            std::io::Error::last_os_error(),
        ));
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < bytes {
        return Err(PoolError::InvalidArgument(format!(
            "{} has {} MiB free; the pool needs {} MiB",
            path.display(),
            free >> 20,
            bytes >> 20
        )));
    }
    Ok(())
}

/// Allocate the whole file of a new pool (see `allocate`).
fn reserve_space(file: &File, size: u64, path: &Path) -> Result<()> {
    allocate(file, 0, size).map_err(io_err("reserving space for", path))
}

impl Pool {
    /// Create a new pool file at `path` (which must not exist) with `ram_bytes` of guest
    /// RAM (a multiple of 4 KiB).
    pub fn create(path: impl AsRef<Path>, ram_bytes: u64, options: PoolOptions) -> Result<Pool> {
        let path = path.as_ref();
        let ram_pages = ram_bytes / PAGE_SIZE as u64;
        let blocks = options.block_count.unwrap_or(ram_pages);
        let meta = options
            .meta_slot_bytes
            .unwrap_or_else(|| (1 << 20) + 24 * (ram_pages.saturating_add(blocks)));
        let geo = Geometry::plan(
            ram_bytes,
            blocks,
            options
                .log_records
                .unwrap_or(DEFAULT_LOG_RECORDS.max(ram_pages)),
            meta,
        )?;
        geo.check_limits(superblock::host_memory_bytes())
            .map_err(PoolError::InvalidArgument)?;
        // Owner-only: the pool holds the guest's memory.
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(PoolError::AlreadyExists(path.to_path_buf()))
            }
            Err(e) => return Err(io_err("creating", path)(e)),
        };
        take_lock(&file, path)?;
        file.set_len(geo.file_size)
            .map_err(io_err("sizing", path))?;
        if let Some(source) = &options.lazy_ram {
            std::fs::write(filling_marker(path), format!("{source}\n"))
                .map_err(io_err("writing the fill marker of", path))?;
            // Allocating metadata and blocks is O(RAM) (a block per RAM page by default):
            // a lazy restore must not wait for it before its vCPUs run. The space is
            // checked now and allocated by the pre-fault thread (`start_prefault`).
            check_free_space(&file, geo.file_size, path)?;
        } else {
            reserve_space(&file, geo.file_size, path)?;
        }
        let map = Mapping::new(&file, geo.file_size as usize).map_err(io_err("mapping", path))?;
        let sb = Superblock {
            generation: 0,
            geometry: geo,
            catalog_slot: 0,
            catalog_len: 0,
            created_unix_ns: now_ns(),
        };
        let mut pool = Pool::assemble(path, file, map, options.persist, sb);
        pool.reserve_pending = options.lazy_ram.is_some();
        if options.lazy_ram.is_none() {
            // Not on a lazy restore's way to running vCPUs (a few ms at 4 GiB).
            pool.index.prefault();
        }
        // Generations 1 and 2: the empty catalog, committed like any other, twice so that
        // both superblock copies are valid from the start (and byte 0 holds the magic).
        pool.commit(None, None, 1)?;
        pool.commit(None, None, 1)?;
        // A new pool is about to get its guest: pre-fault at once (`open` leaves it to
        // the caller, see `start_prefault`). A lazy restore starts it once its vCPUs run.
        if options.lazy_ram.is_none() {
            pool.start_prefault();
        }
        Ok(pool)
    }

    /// Pre-fault the store's own mapping in a background thread: metadata and blocks
    /// for writing, so that preserve (on the VMM's fault path) rarely page-faults
    /// itself. Not the RAM area: RAM is what the vCPUs write through KVM while this
    /// thread runs, and populating it here too stalled a running guest on this host
    /// (kvm_pvm, shadow paging): `MADV_POPULATE_READ` over guest RAM at nice 19, while
    /// both vCPUs took write-protect faults, left a vCPU and this thread spinning in
    /// `__get_user_pages` (state R) for seconds with no round of the payload completing
    /// (`vmm/tests/engine_payload.rs` `thousand_snapshots_and_deletes_under_writers`
    /// failed about every other run; 0 failures in 12 runs without the RAM pass). A
    /// preserve reads a RAM page through this mapping once, a minor fault at most. `create` starts it; `open` does not, so opening a pool (and
    /// so `pmsnap restore` up to running vCPUs, or `pmsnap store ls`) does not share the
    /// CPUs and the mmap lock with it: a VMM calls this once its vCPUs run. Populating
    /// only fills page tables, so it races harmlessly with the store's own accesses; the
    /// thread holds the mapping alive and is stopped and joined when the pool is
    /// dropped. It runs at the lowest CPU priority. Calling it again does nothing.
    pub fn start_prefault(&mut self) {
        if self.prefault.is_some() {
            return;
        }
        let geo = self.geo;
        let (bg, stop) = (self.map.clone(), Arc::new(AtomicBool::new(false)));
        let bg_stop = stop.clone();
        let quiet = self.quiet.clone();
        // A lazily created pool allocates its metadata and blocks here, first.
        let reserve = match self.reserve_pending {
            true => match self.file.try_clone() {
                Ok(f) => Some((f, self.path.clone())),
                Err(e) => {
                    log::error!(
                        "cannot allocate the block area of {}: {e}",
                        self.path.display()
                    );
                    None
                }
            },
            false => None,
        };
        self.reserve_pending = false;
        let spawned = std::thread::Builder::new()
            .name("pmsnap-prefault".into())
            .spawn(move || {
                if let Some(hook) = THREAD_START.get() {
                    hook();
                }
                // SAFETY: plain syscall on this thread (who 0 = the calling thread).
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
                    log::debug!("pre-fault thread keeps its priority");
                }
                if let Some((file, path)) = reserve {
                    let blocks = geo.file_size - geo.block_offset;
                    let res = allocate(&file, 0, geo.ram_offset)
                        .and_then(|()| allocate(&file, geo.block_offset, blocks));
                    if let Err(e) = res {
                        // Checked free at creation: only another user of the file
                        // system can have taken the space since.
                        log::error!(
                            "allocating the metadata and block area of {} failed: {e}; \
                             a preserve into an unallocated block fails if the file system \
                             stays full",
                            path.display()
                        );
                    }
                }
                populate_until_stopped(&bg, 0, geo.ram_offset, &bg_stop, &quiet);
                let blocks = geo.file_size - geo.block_offset;
                populate_until_stopped(&bg, geo.block_offset, blocks, &bg_stop, &quiet);
            });
        match spawned {
            Ok(t) => self.prefault = Some((stop, t)),
            // Only a speed-up: without a thread, accesses fault pages in as they come.
            Err(e) => log::debug!("no background pre-fault thread: {e}"),
        }
    }

    /// Keep the background pre-fault off the CPUs until the returned hold is dropped
    /// (it finishes its step in progress, at most 256 KiB, and waits): for the length of
    /// a guest's pause, whose every hand-off between threads would otherwise wait for
    /// that step on a kernel without preemption. The hold outlives a restart of the
    /// thread (growing the pool) and does not keep the pool from closing.
    pub fn hold_background(&self) -> BackgroundHold {
        self.quiet.hold()
    }

    /// Stop the pre-fault thread, if one runs, and wait for it (it stops within one
    /// 256 KiB step): afterwards nothing but the pool holds the mapping. Returns whether
    /// one ran.
    fn stop_prefault(&mut self) -> bool {
        let Some((stop, thread)) = self.prefault.take() else {
            return false;
        };
        stop.store(true, Ordering::Relaxed);
        self.quiet.wake();
        if thread.join().is_err() {
            log::warn!("the pool's pre-fault thread panicked");
        }
        true
    }

    fn assemble(
        path: &Path,
        file: File,
        map: Mapping,
        persist: Option<Box<dyn Persist>>,
        sb: Superblock,
    ) -> Pool {
        let persist = persist.unwrap_or_else(|| Box::new(MsyncPersist::for_file(&file)));
        let geo = sb.geometry;
        let map = Arc::new(map);
        Pool {
            path: path.to_path_buf(),
            file,
            map,
            persist,
            geo,
            sb,
            snapshots: BTreeMap::new(),
            redirects: Redirects::new(),
            names: HashMap::new(),
            pending: Vec::new(),
            checkpoint_len: 0,
            catalog_version: 0,
            next_id: 1,
            index: RefIndex::new(geo.ram_pages(), geo.block_count),
            log_tail: 0,
            recovery: RecoveryReport::default(),
            prefault: None,
            quiet: Arc::default(),
            ram_gate: None,
            reserve_pending: false,
            fill_pin: None,
        }
    }

    /// Install (or remove) the gate the store passes before it reads RAM pages that may
    /// not be present yet (see [`RamGate`]).
    pub fn set_ram_gate(&mut self, gate: Option<Arc<dyn RamGate>>) {
        self.ram_gate = gate;
    }

    /// Make the RAM pages of `runs` present before the store reads them (a no-op
    /// without a gate). An error names the span of the runs.
    pub(super) fn ensure_ram(&self, runs: &[PageRun]) -> Result<()> {
        match (&self.ram_gate, runs.first(), runs.last()) {
            (Some(g), Some(a), Some(z)) => {
                g.ensure(runs).map_err(|reason| PoolError::RamNotPresent {
                    first: a.first,
                    count: z.end() - a.first,
                    reason,
                })
            }
            _ => Ok(()),
        }
    }

    fn read_block(&self, b: u64, out: &mut Page) -> Result<()> {
        self.map
            .read_at(self.geo.block_offset_of(b), out)
            .map_err(|e| PoolError::Corrupt(format!("block {b}: {e}")))
    }

    fn check_page(&self, p: u64) -> Result<()> {
        if p >= self.geo.ram_pages() {
            return Err(PoolError::PageOutOfRange {
                first: p,
                count: 1,
                ram_pages: self.geo.ram_pages(),
            });
        }
        Ok(())
    }

    /// Copy RAM page p out through the store's mapping.
    pub fn read_ram_page(&self, p: u64) -> Result<Page> {
        self.check_page(p)?;
        self.ensure_ram(&[PageRun::new(p, 1)])?;
        let mut out: Page = [0; PAGE_SIZE];
        self.map
            .read_at(self.geo.ram_page_offset(p), &mut out)
            .map_err(|e| PoolError::Corrupt(format!("RAM page {p}: {e}")))?;
        Ok(out)
    }

    /// Write RAM page p through the store's mapping and persist it. If a snapshot still
    /// references RAM(p), the page is preserved first (copy before write), so this never
    /// changes a snapshot's content.
    pub fn write_ram_page(&mut self, p: u64, data: &Page) -> Result<()> {
        self.check_page(p)?;
        self.preserve(p)?;
        self.write_persist(self.geo.ram_page_offset(p), data, "RAM page")
    }

    /// The pool file (for the VMM to mmap the RAM area itself). The lock lives on this
    /// file's open file description; don't close it while the Pool lives.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Raw fd of the pool file.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    /// Path the pool was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Offset of the RAM area in the file (2 MiB aligned).
    pub fn ram_offset(&self) -> u64 {
        self.geo.ram_offset
    }
    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.geo.ram_size
    }
    /// Pages of guest RAM.
    pub fn ram_pages(&self) -> u64 {
        self.geo.ram_pages()
    }
    /// The layout.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// Current catalog generation.
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }
    /// What recovery did at open.
    pub fn recovery(&self) -> RecoveryReport {
        self.recovery
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{small_pool, tmpdir};

    /// Bytes of `[off, off + len)` of `file` that hold data (not holes), by SEEK_DATA.
    fn data_bytes(file: &File, off: u64, len: u64) -> u64 {
        let fd = file.as_raw_fd();
        let (mut at, end, mut n) = (off as i64, (off + len) as i64, 0u64);
        while at < end {
            // SAFETY: lseek on a valid fd; no memory is passed.
            let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
            if data < 0 || data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }.min(end);
            n += (hole - data) as u64;
            at = hole;
        }
        n
    }

    #[test]
    fn a_lazy_pool_leaves_ram_as_holes_and_is_refused_until_complete() {
        let d = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
        let path = d.path().join("lazy.pool");
        let opts = PoolOptions {
            lazy_ram: Some("snapshot s in repository /r".into()),
            ..PoolOptions::default()
        };
        let mut pool = Pool::create(&path, 256 * 4096, opts).expect("create");
        let geo = pool.geometry();
        assert_eq!(
            data_bytes(pool.file(), geo.ram_offset, geo.ram_size),
            0,
            "RAM is holes"
        );
        // Allocated pages (fallocated ones included, which SEEK_DATA calls holes).
        let allocated = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().expect("stat").blocks() * 512
        };
        let outside_ram = geo.ram_offset + (geo.file_size - geo.block_offset);
        assert!(
            allocated(pool.file()) < outside_ram / 2,
            "nothing allocated up front"
        );
        pool.start_prefault();
        pool.stop_prefault();
        let held = allocated(pool.file());
        assert!(
            held == outside_ram,
            "the pre-fault thread allocated metadata and blocks, not RAM: {held} bytes"
        );
        assert_eq!(
            data_bytes(pool.file(), geo.ram_offset, geo.ram_size),
            0,
            "RAM still holes"
        );
        drop(pool);
        let err = Pool::open(&path).expect_err("refused while filling");
        assert!(
            matches!(&err, PoolError::RamIncomplete { from, .. } if from.contains("repository /r")),
            "{err}"
        );
        mark_ram_complete(&path).expect("complete");
        Pool::open(&path).expect("opens once complete");
    }

    #[test]
    fn pool_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pool>();
        assert_send_sync::<std::sync::Mutex<Pool>>();
        let d = tmpdir();
        let (_, pool) = small_pool(&d, 16, PoolOptions::default());
        let dbg = format!("{pool:?}");
        assert!(dbg.contains("generation") && dbg.len() < 2000, "{dbg}");
    }

    #[test]
    fn create_layout_and_reopen() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 256, PoolOptions::default());
        assert_eq!(pool.ram_offset() % (2 << 20), 0);
        assert_eq!(pool.ram_size(), 1 << 20);
        assert_eq!(
            pool.geometry().block_count,
            256,
            "default: as many blocks as RAM pages"
        );
        assert_eq!(pool.generation(), 2);
        assert!(pool.raw_fd() >= 0);
        let md = pool.file().metadata().expect("stat");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            md.permissions().mode() & 0o777,
            0o600,
            "pool files are owner-only"
        );
        let len = md.len();
        assert_eq!(len, pool.geometry().file_size);
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.generation(), 2);
        assert!(pool.list().is_empty());
        assert!(matches!(
            Pool::create(&path, 1 << 20, PoolOptions::default()),
            Err(PoolError::AlreadyExists(_))
        ));
    }

    #[test]
    fn prefault_starts_with_create_or_when_asked_and_stops_with_the_pool() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 64, PoolOptions::default());
        assert!(pool.prefault.is_some(), "a new pool pre-faults at once");
        drop(pool);
        let mut pool = Pool::open(&path).expect("open");
        assert!(pool.prefault.is_none(), "opening leaves it to the caller");
        pool.start_prefault();
        let id = pool.prefault.as_ref().map(|(_, t)| t.thread().id());
        assert!(id.is_some());
        pool.start_prefault();
        assert_eq!(
            pool.prefault.as_ref().map(|(_, t)| t.thread().id()),
            id,
            "a second call starts no second thread"
        );
        drop(pool);
        // The thread held the mapping (and so the file and its lock): it is gone now.
        Pool::open(&path).expect("reopen after the pre-fault thread stopped");
    }

    /// A hold keeps the pre-fault thread waiting but never keeps the pool from closing:
    /// dropping the pool stops and joins the held thread (and so releases the file).
    #[test]
    fn a_held_prefault_still_stops_with_the_pool() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 64, PoolOptions::default());
        let hold = pool.hold_background();
        assert!(pool.quiet.is_held());
        assert!(pool.prefault.is_some());
        drop(pool);
        Pool::open(&path).expect("reopen: the held thread stopped with the pool");
        drop(hold);
    }

    #[test]
    fn second_opener_is_locked_out() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        match Pool::open(&path) {
            Err(e @ PoolError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("locked by another process"), "{msg}");
                if let PoolError::Locked { pid: Some(pid), .. } = e {
                    assert_eq!(pid, std::process::id());
                }
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(pool);
        Pool::open(&path).expect("open after close");
    }
}
