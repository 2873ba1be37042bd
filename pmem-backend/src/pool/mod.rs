//! The pool file: creation, opening (superblock selection, catalog load, redirect-log
//! replay), the commit protocol, and raw page I/O. The snapshot operations on top live
//! in `store.rs`, verification in `verify.rs`.

mod index;
mod store;
mod verify;

pub use store::{GcReport, ProtectError};
pub use verify::{Problem, VerifyReport};

use crate::catalog::{self, Catalog, Snapshot};
use crate::error::{PoolError, Result};
use crate::lock::{lock_exclusive, still_linked, LockError};
use crate::mapping::Mapping;
use crate::persist::{MsyncPersist, Persist};
use crate::redirect_log::LogRecord;
use crate::superblock::{self, Geometry, Superblock, LOG_RECORD_SIZE, SB_SIZE};
use crate::{Page, PAGE_SIZE};
use index::RefIndex;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
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
    /// Bytes per metadata slot (default 1 MiB + 16 bytes per RAM page and per block).
    pub meta_slot_bytes: Option<u64>,
    /// The persist seam (default msync).
    pub persist: Option<Box<dyn Persist>>,
}

/// What recovery found when the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// Redirect-log records replayed.
    pub replayed: u64,
    /// A last record whose block did not match its checksum: the preserve was in flight
    /// at the crash, its page was never written, so the record was dropped.
    pub torn_discarded: u64,
    /// Records that redirected a page no snapshot referenced (dropped).
    pub orphans_dropped: u64,
}

/// An open pool: the file, its lock, the store's mapping, and the in-memory state of the
/// snapshot store. Not internally synchronised: share it behind a `Mutex` (see the crate
/// docs on threading).
pub struct Pool {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) map: Arc<Mapping>,
    pub(crate) persist: Box<dyn Persist>,
    pub(crate) geo: Geometry,
    pub(crate) sb: Superblock,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) next_id: u64,
    /// Reference counts, block usage and protection (see `index.rs`).
    index: RefIndex,
    pub(crate) log_tail: u32,
    pub(crate) recovery: RecoveryReport,
    /// The background pre-fault (see `start_prefault`): its stop flag and thread.
    prefault: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The thread holds the mapping, and the mapping holds the file and so its flock:
        // stop it before the pool is considered closed, so a reopen finds it unlocked.
        if let Some((stop, thread)) = self.prefault.take() {
            stop.store(true, Ordering::Relaxed);
            if thread.join().is_err() {
                log::warn!("the pool's pre-fault thread panicked");
            }
        }
    }
}

/// Pre-fault `len` bytes at `off` for writing in 4 MiB steps, stopping early when asked. Small
/// steps: each one holds the process's mmap lock for reading, and a thread that wants it
/// for writing (any mmap or munmap) waits for the step in progress.
fn populate_until_stopped(map: &Mapping, off: u64, len: u64, stop: &AtomicBool) {
    const STEP: u64 = 4 << 20;
    let mut at = off;
    while at < off + len && !stop.load(Ordering::Relaxed) {
        let n = STEP.min(off + len - at);
        map.populate(at, n, true);
        at += n;
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

pub(crate) fn now_ns() -> u64 {
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

/// Allocate the whole file now, so a full tmpfs fails here with ENOSPC instead of with a
/// SIGBUS on some later write through the mapping (a preserve, or a guest write).
/// Filesystems without fallocate keep the sparse file.
fn reserve_space(file: &File, size: u64, path: &Path) -> Result<()> {
    let len = libc::off_t::try_from(size)
        .map_err(|_| PoolError::InvalidArgument("pool too large".into()))?;
    // SAFETY: plain syscall on a valid fd owned by `file`; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 | libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(PoolError::Io {
            what: "reserving space for",
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e),
        }),
    }
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
            .unwrap_or_else(|| (1 << 20) + 16 * (ram_pages.saturating_add(blocks)));
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
        reserve_space(&file, geo.file_size, path)?;
        let map = Mapping::new(&file, geo.file_size as usize).map_err(io_err("mapping", path))?;
        let sb = Superblock {
            generation: 0,
            geometry: geo,
            catalog_slot: 0,
            catalog_len: 0,
            created_unix_ns: now_ns(),
        };
        let mut pool = Pool::assemble(path, file, map, options.persist, sb);
        // Generations 1 and 2: the empty catalog, committed like any other, twice so that
        // both superblock copies are valid from the start (and byte 0 holds the magic).
        pool.commit(None, None, 1)?;
        pool.commit(None, None, 1)?;
        // A new pool is about to get its guest: pre-fault at once (`open` leaves it to
        // the caller, see `start_prefault`).
        pool.start_prefault();
        Ok(pool)
    }

    /// Open an existing pool with the msync persist seam.
    pub fn open(path: impl AsRef<Path>) -> Result<Pool> {
        Self::open_with(path, None)
    }

    /// Open an existing pool with a chosen persist seam (`None`: msync).
    pub fn open_with(path: impl AsRef<Path>, persist: Option<Box<dyn Persist>>) -> Result<Pool> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        take_lock(&file, path)?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut head = vec![0u8; (2 * SB_SIZE).min(len) as usize];
        file.read_exact(&mut head)
            .map_err(io_err("reading the superblock of", path))?;
        if len < 2 * SB_SIZE {
            let n = head.len().min(8);
            if head[..n] != superblock::SB_MAGIC[..n] || n == 0 {
                return Err(PoolError::NotAPool);
            }
            return Err(PoolError::Truncated {
                expected: 2 * SB_SIZE,
                actual: len,
            });
        }
        let a = superblock::decode(&head[..SB_SIZE as usize]);
        let b = superblock::decode(&head[SB_SIZE as usize..]);
        let sb = superblock::select(&a, &b)?;
        let geo = sb.geometry;
        if len < geo.file_size {
            return Err(PoolError::Truncated {
                expected: geo.file_size,
                actual: len,
            });
        }
        // Before anything sized by the superblock is allocated (bookkeeping per page,
        // the catalog buffer): a sparse crafted file passes the length check above.
        geo.check_limits(superblock::host_memory_bytes())
            .map_err(PoolError::TooLarge)?;
        let t0 = std::time::Instant::now();
        let map = Mapping::new(&file, geo.file_size as usize).map_err(io_err("mapping", path))?;
        let mut pool = Pool::assemble(path, file, map, persist, sb);
        let t1 = t0.elapsed();
        let mut bytes = vec![0u8; sb.catalog_len as usize];
        pool.map
            .read_at(geo.meta_slot_offset(sb.catalog_slot), &mut bytes)
            .map_err(|e| PoolError::Corrupt(format!("catalog out of bounds: {e}")))?;
        let cat = catalog::decode(&bytes, sb.generation).map_err(PoolError::Corrupt)?;
        let t2 = t0.elapsed();
        pool.load(cat)?;
        let t3 = t0.elapsed();
        pool.replay_log()?;
        log::debug!(
            "pool {} opened: mapped after {t1:?}, catalog read after {t2:?}, loaded after {t3:?}, log replayed after {:?}",
            path.display(),
            t0.elapsed()
        );
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
        let spawned = std::thread::Builder::new()
            .name("pmsnap-prefault".into())
            .spawn(move || {
                // SAFETY: plain syscall on this thread (who 0 = the calling thread).
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
                    log::debug!("pre-fault thread keeps its priority");
                }
                populate_until_stopped(&bg, 0, geo.ram_offset, &bg_stop);
                let blocks = geo.file_size - geo.block_offset;
                populate_until_stopped(&bg, geo.block_offset, blocks, &bg_stop);
            });
        match spawned {
            Ok(t) => self.prefault = Some((stop, t)),
            // Only a speed-up: without a thread, accesses fault pages in as they come.
            Err(e) => log::debug!("no background pre-fault thread: {e}"),
        }
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
            snapshots: Vec::new(),
            next_id: 1,
            index: RefIndex::new(geo.ram_pages(), geo.block_count),
            log_tail: 0,
            recovery: RecoveryReport::default(),
            prefault: None,
        }
    }

    /// Build the in-memory state from a decoded catalog, validating every reference.
    fn load(&mut self, cat: Catalog) -> Result<()> {
        let c = |m: String| PoolError::Corrupt(m);
        let ram_pages = self.geo.ram_pages();
        let mut names = HashSet::new();
        let mut max_id = 0;
        for s in &cat.snapshots {
            if !names.insert(s.name.as_str()) {
                return Err(c(format!("catalog: two snapshots named {:?}", s.name)));
            }
            if s.id == 0 || s.id >= cat.next_snapshot_id || s.id <= max_id {
                return Err(c(format!(
                    "catalog: snapshot {:?} has bad id {}",
                    s.name, s.id
                )));
            }
            max_id = s.id;
            if let Some(r) = s.page_set.last() {
                if r.end() > ram_pages {
                    return Err(c(format!(
                        "catalog: snapshot {:?} covers pages beyond RAM",
                        s.name
                    )));
                }
            }
            for (&p, &b) in &s.redirects {
                if !cat.block_crcs.contains_key(&b) || u64::from(b) >= self.geo.block_count {
                    return Err(c(format!(
                        "catalog: snapshot {:?} page {p} points to unknown block {b}",
                        s.name
                    )));
                }
            }
            for &b in &s.blob.blocks {
                let bad = u64::from(b) >= self.geo.block_count
                    || cat.block_crcs.contains_key(&b)
                    || !self.index.is_free(b);
                if bad {
                    return Err(c(format!(
                        "catalog: snapshot {:?} state blob uses block {b} twice or out of range",
                        s.name
                    )));
                }
                self.index.mark_blob(b);
            }
        }
        for s in &cat.snapshots {
            self.index.add_snapshot_refs(s);
        }
        for (&b, &crc) in &cat.block_crcs {
            self.index.keep_block_crc(b, crc);
        }
        // (The free list is built once, after the log replay.)
        self.next_id = cat.next_snapshot_id.max(1);
        self.snapshots = cat.snapshots;
        Ok(())
    }

    /// Replay the redirect log of the current generation (see `redirect_log.rs`).
    fn replay_log(&mut self) -> Result<()> {
        let gen = self.sb.generation;
        let mut records = Vec::new();
        for seq in 0..self.geo.log_capacity() as u32 {
            let mut b = [0u8; LOG_RECORD_SIZE as usize];
            self.map
                .read_at(
                    self.geo.log_offset + u64::from(seq) * LOG_RECORD_SIZE,
                    &mut b,
                )
                .map_err(|e| PoolError::Corrupt(format!("redirect log: {e}")))?;
            match LogRecord::decode(&b) {
                Some(r) if r.is_next(gen, seq) => records.push(r),
                _ => break,
            }
        }
        let n = records.len();
        for (i, r) in records.into_iter().enumerate() {
            let usable = r.page < self.geo.ram_pages()
                && u64::from(r.block) < self.geo.block_count
                && self.index.is_free(r.block);
            if !usable {
                return Err(PoolError::Corrupt(format!(
                    "redirect log record {i}: page {} / block {} out of range or block in use",
                    r.page, r.block
                )));
            }
            if i + 1 == n {
                // The last record may belong to a preserve the crash interrupted: its
                // block write torn. Then the page was never written (preserve had not
                // returned), so RAM still holds exactly the content the record describes
                // and the record can be dropped. If RAM no longer matches, the preserve
                // completed and the block went bad later: keep it, so verify reports it.
                let mut page: Page = [0; PAGE_SIZE];
                self.read_block(u64::from(r.block), &mut page)?;
                if crc32c::crc32c(&page) != r.block_crc && r.page < self.geo.ram_pages() {
                    let ram = self.read_ram_page(r.page)?;
                    if crc32c::crc32c(&ram) == r.block_crc {
                        self.recovery.torn_discarded += 1;
                        self.log_tail = i as u32;
                        break;
                    }
                }
            }
            self.log_tail = i as u32 + 1;
            if self.index.ram_refs(r.page) == 0 {
                self.recovery.orphans_dropped += 1;
                continue;
            }
            self.apply_redirect(r.page, r.block, r.block_crc);
            self.recovery.replayed += 1;
        }
        self.index.rebuild_free_list();
        Ok(())
    }

    /// Point every snapshot that references RAM(p) at block b (in memory only).
    pub(crate) fn apply_redirect(&mut self, p: u64, b: u32, crc: u32) {
        let mut n = 0;
        for s in &mut self.snapshots {
            if s.covers(p) && !s.redirects.contains_key(&p) {
                s.redirects.insert(p, b);
                n += 1;
            }
        }
        self.index.apply_redirect(p, b, crc, n);
    }

    /// Commit a new catalog generation: the current snapshots, plus `extra`, minus the
    /// snapshot with id `skip`, with `next_id`. Writes the catalog into the inactive slot,
    /// persists it, then writes and persists the superblock copy for the new generation.
    /// The in-memory state is not changed except for the superblock and the log tail.
    pub(crate) fn commit(
        &mut self,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
    ) -> Result<()> {
        let gen = self
            .sb
            .generation
            .checked_add(1)
            .ok_or_else(|| PoolError::Corrupt("generation counter exhausted".into()))?;
        let dropping = skip.and_then(|id| self.snapshots.iter().find(|s| s.id == id));
        let blocks = self.index.catalog_blocks(dropping);
        let snaps = self
            .snapshots
            .iter()
            .filter(|s| Some(s.id) != skip)
            .chain(extra);
        let bytes = catalog::encode(gen, next_id, snaps, blocks.into_iter());
        if bytes.len() as u64 > self.geo.meta_slot_size {
            return Err(PoolError::MetadataFull {
                needed: bytes.len() as u64,
                capacity: self.geo.meta_slot_size,
            });
        }
        let slot = (gen % 2) as u32;
        let off = self.geo.meta_slot_offset(slot);
        self.write_persist(off, &bytes, "catalog")?;
        let sb = Superblock {
            generation: gen,
            catalog_slot: slot,
            catalog_len: bytes.len() as u64,
            ..self.sb
        };
        self.write_persist((gen % 2) * SB_SIZE, &sb.encode(), "superblock")?;
        self.sb = sb;
        self.log_tail = 0;
        Ok(())
    }

    /// Write bytes into the mapping and persist them.
    pub(crate) fn write_persist(&self, off: u64, bytes: &[u8], what: &'static str) -> Result<()> {
        self.map
            .write_at(off, bytes)
            .map_err(|source| PoolError::Persist { what, source })?;
        self.persist_range(off, bytes.len() as u64, what)
    }

    /// The one path to durability.
    pub(crate) fn persist_range(&self, off: u64, len: u64, what: &'static str) -> Result<()> {
        self.persist
            .persist(&self.map, off..off + len)
            .map_err(|source| PoolError::Persist { what, source })
    }

    pub(crate) fn read_block(&self, b: u64, out: &mut Page) -> Result<()> {
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
    use crate::superblock::SB_CRC_OFFSET;
    use crate::testutil::{pattern, small_pool, tmpdir};
    use crate::{PageRun, SnapshotKind, SnapshotMeta};

    fn patch(path: &Path, off: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(bytes, off).expect("patch");
    }

    fn reseal_superblock(path: &Path, copy: u64, f: impl FnOnce(&mut [u8])) {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        let mut s = vec![0u8; SB_SIZE as usize];
        file.read_exact_at(&mut s, copy * SB_SIZE).expect("read");
        f(&mut s);
        let crc = crc32c::crc32c(&s[..SB_CRC_OFFSET]);
        s[SB_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&s, copy * SB_SIZE).expect("write");
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

    /// A crafted superblock that claims more RAM and blocks than the host has, on a
    /// sparse file as long as it claims: refused before the bookkeeping or the catalog
    /// buffer is allocated, with an error that says why.
    #[test]
    fn crafted_huge_geometry_is_refused_before_allocating() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        let mut sb = pool.sb;
        drop(pool);
        let host = crate::superblock::host_memory_bytes();
        // Twice the host's memory in blocks, with a catalog length to match the slot.
        let blocks = (2 * host / PAGE_SIZE as u64).min(u64::from(u32::MAX));
        let g = &mut sb.geometry;
        g.block_count = blocks;
        g.file_size = g.block_offset + blocks * PAGE_SIZE as u64;
        g.validate().expect("still a consistent layout");
        let sector = sb.encode();
        patch(&path, 0, &sector);
        patch(&path, SB_SIZE, &sector);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(sb.geometry.file_size).expect("sparse extend");
        drop(f);
        match Pool::open(&path) {
            Err(e @ PoolError::TooLarge(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("larger than this host's memory"), "{msg}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(0).expect("free the sparse file");
    }

    #[test]
    fn not_a_pool_and_truncated() {
        let d = tmpdir();
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![0x5a; 20000]).expect("write");
        assert!(matches!(Pool::open(&junk), Err(PoolError::NotAPool)));
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        assert!(matches!(Pool::open(&empty), Err(PoolError::NotAPool)));
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        let size = pool.geometry().file_size;
        drop(pool);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(size - 4096).expect("truncate");
        match Pool::open(&path) {
            Err(PoolError::Truncated { expected, actual }) => {
                assert_eq!((expected, actual), (size, size - 4096))
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        f.set_len(100).expect("truncate hard");
        assert!(matches!(
            Pool::open(&path),
            Err(PoolError::Truncated { .. })
        ));
    }

    #[test]
    fn newer_version_is_refused() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        drop(pool);
        reseal_superblock(&path, 0, |s| s[8] = 2);
        assert!(matches!(
            Pool::open(&path),
            Err(PoolError::NewerVersion {
                found: 2,
                supported: 1
            })
        ));
    }

    #[test]
    fn corrupt_superblocks_and_catalog() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        drop(pool);
        // Generation 3 lives in copy 1; tearing it falls back to generation 2 (empty).
        patch(&path, SB_SIZE + 50, &[0xff]);
        let p = Pool::open(&path).expect("falls back to the other copy");
        assert_eq!(p.generation(), 2);
        assert!(p.list().is_empty());
        drop(p);
        patch(&path, 50, &[0xff]);
        match Pool::open(&path) {
            Err(PoolError::Corrupt(m)) => {
                assert!(m.contains("superblock") || m.contains("checksum"), "{m}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // A pool whose catalog record is damaged names the record.
        let d2 = tmpdir();
        let (path2, mut pool) = small_pool(&d2, 16, PoolOptions::default());
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        let off = pool.geo.meta_slot_offset(pool.sb.catalog_slot) + pool.sb.catalog_len - 3;
        drop(pool);
        patch(&path2, off, &[0x99]);
        match Pool::open(&path2) {
            Err(PoolError::Corrupt(m)) => assert!(m.contains("record 1"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// `load` counts references run by run and relies on every redirect lying inside
    /// its snapshot's pages: a catalog breaking that is refused.
    #[test]
    fn catalog_redirect_outside_its_snapshot_is_corrupt() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let meta = SnapshotMeta::default;
        pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 4)], meta())
            .expect("a");
        pool.write_ram_page(1, &pattern(6))
            .expect("preserve 1, then write");
        // The next commit puts a's redirect of page 1 into the catalog.
        pool.snapshot("b", SnapshotKind::Vm, &[PageRun::new(8, 2)], meta())
            .expect("b");
        assert_eq!(pool.snapshots[0].redirects.len(), 1);
        // Rewrite the catalog (same length) with a's redirect moved to page 9, which a
        // does not cover (b does).
        let mut a = pool.snapshots[0].clone();
        let b = a.redirects.pop_first().map(|(_, b)| b).expect("redirect");
        a.redirects.insert(9, b);
        let blocks = pool.index.catalog_blocks(None);
        let bytes = catalog::encode(
            pool.sb.generation,
            pool.next_id,
            [&a, &pool.snapshots[1]].into_iter(),
            blocks.into_iter(),
        );
        assert_eq!(bytes.len() as u64, pool.sb.catalog_len);
        let off = pool.geo.meta_slot_offset(pool.sb.catalog_slot);
        drop(pool);
        patch(&path, off, &bytes);
        match Pool::open(&path) {
            Err(PoolError::Corrupt(m)) => {
                assert!(m.contains("redirect of page 9 it does not cover"), "{m}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn torn_last_log_record_block_is_discarded() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.write_ram_page(1, &pattern(5)).expect("write");
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        pool.preserve(0).expect("preserve");
        pool.preserve(1).expect("preserve");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 1).expect("loc") else {
            panic!("not preserved")
        };
        // The block of the last record never made it: as if the crash hit mid-preserve.
        pool.map
            .write_at(pool.geo.block_offset_of(b), &[0u8; 16])
            .expect("tear");
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        let r = pool.recovery();
        assert_eq!((r.replayed, r.torn_discarded), (1, 1));
        assert_eq!(
            pool.snapshot_page_location("a", 1).expect("loc"),
            PageLocation::Ram(1)
        );
        assert!(pool.is_protected(1));
        assert_eq!(pool.read_snapshot_page("a", 1).expect("read").1, pattern(5));
    }

    #[test]
    fn preserve_crash_with_only_the_record_landed_is_rolled_back() {
        use crate::{CrashSim, Tear};
        for (tear, redirected) in [
            (Tear::LastOnly, false),
            (Tear::Half, false),
            (Tear::Whole, true),
        ] {
            let d = tmpdir();
            let sim = CrashSim::new(0, None, Tear::Lost);
            let opts = PoolOptions {
                persist: Some(Box::new(sim.clone())),
                ..Default::default()
            };
            let (_, mut pool) = small_pool(&d, 16, opts);
            pool.write_ram_page(4, &pattern(77)).expect("write");
            pool.snapshot(
                "a",
                SnapshotKind::Vm,
                &[PageRun::new(0, 8)],
                SnapshotMeta::default(),
            )
            .expect("snapshot");
            sim.arm(1, tear);
            assert!(pool.preserve(4).is_err(), "crash inside preserve");
            drop(pool);
            let path = d.path().join("img");
            std::fs::write(&path, sim.durable_image()).expect("image");
            let pool = Pool::open(&path).expect("reopen");
            let r = pool.recovery();
            let loc = pool.snapshot_page_location("a", 4).expect("loc");
            assert_eq!(
                matches!(loc, PageLocation::Block(_)),
                redirected,
                "{tear:?}: {loc:?} {r:?}"
            );
            assert_eq!(
                r.torn_discarded,
                u64::from(tear == Tear::LastOnly),
                "{tear:?}"
            );
            assert_eq!(pool.is_protected(4), !redirected);
            assert_eq!(
                pool.read_snapshot_page("a", 4).expect("read").1,
                pattern(77)
            );
            assert!(pool.verify(|_, _| ()).is_clean());
        }
    }

    #[test]
    fn bad_last_block_after_the_page_changed_is_kept_and_reported() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.write_ram_page(1, &pattern(5)).expect("write");
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        pool.write_ram_page(1, &pattern(6))
            .expect("preserve, then write");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 1).expect("loc") else {
            panic!("not preserved")
        };
        pool.map
            .write_at(pool.geo.block_offset_of(b), &[0u8; 16])
            .expect("bit rot");
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.recovery().torn_discarded, 0);
        assert_eq!(
            pool.snapshot_page_location("a", 1).expect("loc"),
            PageLocation::Block(b)
        );
        let rep = pool.verify(|_, _| ());
        assert!(
            matches!(
                rep.problems.as_slice(),
                [crate::Problem::BadPage { page: 1, .. }]
            ),
            "{:?}",
            rep.problems
        );
    }

    use crate::PageLocation;
}
