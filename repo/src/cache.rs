//! A local, size-limited cache of pack ranges fetched from a remote repository
//! ([`PackCache`]), shared by every process of a host that uses the same directory, so
//! several imports or restores of snapshots that share content fetch each range once.
//!
//! The unit is a **block**: the aligned [`CACHE_BLOCK`] bytes of a pack (the last block
//! of a pack is shorter), stored as the file `DIR/<pack id>.<block number>`, written to
//! a temporary file and renamed into place, so a reader sees a whole block or none.
//! Cached bytes are not trusted more than fetched ones: every chunk read through the
//! cache is checked (crc32c and BLAKE3) as always, and a block that fails the check is
//! dropped and fetched again once.
//!
//! The 32 most recently used blocks are also kept in the process's memory, so that the
//! chunks of one block are copied out of memory rather than each read from its file.
//!
//! **One fetch per block on a host.** A reader that misses a block claims it first: an
//! exclusive `flock` on `DIR/.fetch-<pack id>.<block number>` ([`PackCache::claim`]),
//! then looks again, and fetches only if the block is still missing. Another process
//! (or thread) that misses the same block meanwhile waits on the lock and then finds the
//! block, so clones restored at once fetch each block once rather than once each. The
//! lock file is removed before it is unlocked; a waiter that then holds the lock of the
//! removed file looks again like everyone else, so that cannot cause a second fetch
//! unless the block was evicted in between. A process killed mid-fetch releases its
//! lock with its descriptors.
//!
//! Eviction is least-recently-used by modification time (a hit touches the file): when
//! this process's count of the directory's bytes passes the limit it lists the
//! directory and deletes the oldest blocks until the total is 90% of the limit. Another
//! process sharing the directory may delete a block between a lookup and its read: that
//! is a miss, never an error.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::format::{hex, Hash32};

/// Bytes per cached block of a pack: the unit of a ranged download.
pub const CACHE_BLOCK: u64 = 1 << 20;

/// Blocks also kept in this process's memory (most recently used), so consecutive
/// chunk reads of one block cost a copy, not a file open and read.
const MEM_BLOCKS: usize = 32;

/// What a cache did since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Reads served from the directory.
    pub hits: u64,
    /// Reads that had to fetch their block.
    pub misses: u64,
    /// Bytes fetched from the storage into the cache.
    pub fetched_bytes: u64,
    /// Blocks evicted by this process.
    pub evicted: u64,
    /// Misses that waited for another process or thread fetching the same block.
    pub waited: u64,
}

/// A directory of cached pack blocks, at most about `limit` bytes.
#[derive(Debug)]
pub struct PackCache {
    dir: PathBuf,
    limit: u64,
    /// Bytes in the directory as this process last counted them (plus its inserts).
    used: Mutex<u64>,
    hits: AtomicU64,
    misses: AtomicU64,
    fetched: AtomicU64,
    evicted: AtomicU64,
    waited: AtomicU64,
    tmp: AtomicU64,
    /// Most recently used blocks in memory, most recent last.
    mem: Mutex<VecDeque<(BlockId, Arc<Vec<u8>>)>>,
}

/// One block of one pack.
pub(crate) type BlockId = (Hash32, u64);

impl PackCache {
    /// Use (and create) `dir`, keeping at most about `limit` bytes in it.
    pub fn open(dir: impl Into<PathBuf>, limit: u64) -> io::Result<PackCache> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(e.kind(), format!("cache directory {}: {e}", dir.display()))
        })?;
        let c = PackCache {
            dir,
            limit,
            used: Mutex::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            tmp: AtomicU64::new(0),
            mem: Mutex::new(VecDeque::new()),
        };
        let total: u64 = c.entries()?.iter().map(|e| e.1).sum();
        *c.lock_used() = total;
        c.evict_if_needed()?;
        Ok(c)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Counters since [`PackCache::open`].
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fetched_bytes: self.fetched.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            waited: self.waited.load(Ordering::Relaxed),
        }
    }

    fn lock_used(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, (pack, block): &BlockId) -> PathBuf {
        self.dir.join(format!("{}.{block}", hex(pack)))
    }

    /// Whether the block is in the directory now.
    pub(crate) fn has(&self, id: &BlockId) -> bool {
        self.path(id).is_file()
    }

    fn lock_mem(&self) -> std::sync::MutexGuard<'_, VecDeque<(BlockId, Arc<Vec<u8>>)>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, id: &BlockId, data: Arc<Vec<u8>>) {
        let mut mem = self.lock_mem();
        mem.retain(|(i, _)| i != id);
        if mem.len() >= MEM_BLOCKS {
            mem.pop_front();
        }
        mem.push_back((*id, data));
    }

    /// Block `id` if it is among the recently used blocks kept in memory.
    fn mem_block(&self, id: &BlockId) -> Option<Arc<Vec<u8>>> {
        self.lock_mem()
            .iter()
            .rev()
            .find(|(i, _)| i == id)
            .map(|(_, d)| d.clone())
    }

    /// The whole cached block `id` if it is `len` bytes long (a block of another length
    /// is a miss), from memory or from its file (then kept in memory).
    pub(crate) fn block(&self, id: &BlockId, len: usize) -> Option<Arc<Vec<u8>>> {
        let data = self.mem_block(id).or_else(|| {
            let f = fs::File::open(self.path(id)).ok()?;
            let mut d = Vec::with_capacity(len);
            io::Read::read_to_end(&mut &f, &mut d).ok()?;
            // Recently used: eviction goes by modification time.
            let _ = f.set_modified(SystemTime::now());
            let d = Arc::new(d);
            self.remember(id, d.clone());
            Some(d)
        });
        match data {
            Some(d) if d.len() == len => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(d)
            }
            _ => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// `len` bytes at `off` inside cached block `id`, or None on a miss (absent, or
    /// shorter than asked).
    pub(crate) fn read(&self, id: &BlockId, off: u64, len: usize) -> Option<Vec<u8>> {
        self.read_counted(id, off, len, true)
    }

    /// [`Self::read`] after [`Self::claim`]: a hit counts as one (the block came from
    /// another fetch), a miss does not count again.
    pub(crate) fn read_claimed(&self, id: &BlockId, off: u64, len: usize) -> Option<Vec<u8>> {
        let r = self.read_counted(id, off, len, false);
        if r.is_some() {
            // The first look counted a miss; it turned out a hit.
            self.misses.fetch_sub(1, Ordering::Relaxed);
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Wait until no other process or thread of this host fetches block `id`, and claim
    /// it until the returned guard is dropped (see the module docs). `None` if the lock
    /// file cannot be made or locked: the caller then fetches unclaimed, as before.
    pub(crate) fn claim(&self, id: &BlockId) -> Option<BlockClaim> {
        let path = self.dir.join(format!(".fetch-{}.{}", hex(&id.0), id.1));
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            self.waited.fetch_add(1, Ordering::Relaxed);
            flock(&file, libc::LOCK_EX).ok()?;
        }
        Some(BlockClaim { file, path })
    }

    fn read_counted(&self, id: &BlockId, off: u64, len: usize, count: bool) -> Option<Vec<u8>> {
        let hit = |r: bool| {
            if count {
                let c = if r { &self.hits } else { &self.misses };
                c.fetch_add(1, Ordering::Relaxed);
            }
        };
        let slice = |d: &[u8]| -> Option<Vec<u8>> {
            let s = usize::try_from(off).ok()?;
            d.get(s..s.checked_add(len)?).map(<[u8]>::to_vec)
        };
        if let Some(d) = self.mem_block(id) {
            let r = slice(&d);
            hit(r.is_some());
            return r;
        }
        let data = fs::File::open(self.path(id)).and_then(|f| {
            let mut d = Vec::new();
            io::Read::read_to_end(&mut &f, &mut d)?;
            // Recently used: eviction goes by modification time.
            let _ = f.set_modified(SystemTime::now());
            Ok(d)
        });
        let Ok(data) = data else {
            hit(false);
            return None;
        };
        let r = slice(&data);
        self.remember(id, Arc::new(data));
        hit(r.is_some());
        r
    }

    /// Count `bytes` fetched from the storage for this cache's blocks.
    pub(crate) fn count_fetched(&self, bytes: u64) {
        self.fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Store block `id` (fetched: counted in the stats), then evict if over the limit.
    /// With `in_memory` it is also one of the blocks kept in memory (a block read now;
    /// not one prefetched for later, which would push out the blocks being read).
    pub(crate) fn insert(&self, id: &BlockId, data: Vec<u8>, in_memory: bool) -> io::Result<()> {
        self.count_fetched(data.len() as u64);
        self.store(id, &data)?;
        if in_memory {
            self.remember(id, Arc::new(data));
        }
        Ok(())
    }

    /// Store block `id` (not counted as fetched: the caller counts what it fetched),
    /// then evict if over the limit.
    pub(crate) fn store(&self, id: &BlockId, data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.tmp.fetch_add(1, Ordering::Relaxed)
        ));
        let res = fs::write(&tmp, data).and_then(|()| fs::rename(&tmp, self.path(id)));
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res?;
        *self.lock_used() += data.len() as u64;
        self.evict_if_needed()
    }

    /// Drop a block (it failed a check).
    pub(crate) fn remove(&self, id: &BlockId) {
        self.lock_mem().retain(|(i, _)| i != id);
        let _ = fs::remove_file(self.path(id));
    }

    /// The cached blocks: (path, size, modified).
    fn entries(&self) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(md) = e.metadata() {
                if md.is_file() {
                    v.push((e.path(), md.len(), md.modified()?));
                }
            }
        }
        Ok(v)
    }

    fn evict_if_needed(&self) -> io::Result<()> {
        let mut used = self.lock_used();
        if *used <= self.limit {
            return Ok(());
        }
        let mut entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.2);
        let target = self.limit / 10 * 9;
        for (path, size, _) in entries {
            if total <= target {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
            total -= size;
        }
        *used = total;
        Ok(())
    }
}

/// A claim on fetching one block ([`PackCache::claim`]): the lock file is removed, then
/// unlocked (closed), when it is dropped.
#[derive(Debug)]
pub(crate) struct BlockClaim {
    file: fs::File,
    path: PathBuf,
}

impl Drop for BlockClaim {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        // Closing the file (dropped next) unlocks it; said here for the reader.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

/// `flock(2)` on `file` (std's `File::lock` is newer than the workspace's MSRV),
/// retried when a signal interrupts it.
fn flock(file: &fs::File, op: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid descriptor owned by `file`, which outlives the call;
        // no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The blocks of a pack of `pack_len` bytes that range `off..off+len` touches.
pub(crate) fn blocks_of(pack: &Hash32, off: u64, len: u64) -> BTreeSet<BlockId> {
    if len == 0 {
        return BTreeSet::new();
    }
    (off / CACHE_BLOCK..=(off + len - 1) / CACHE_BLOCK)
        .map(|b| (*pack, b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_cached_read_and_evicted_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let c = PackCache::open(d.path(), 3 * 1000).unwrap();
        let a = ([1u8; 32], 0);
        assert_eq!(c.read(&a, 0, 10), None);
        c.insert(&a, vec![7u8; 1000], true).unwrap();
        assert_eq!(c.read(&a, 990, 10), Some(vec![7u8; 10]));
        assert_eq!(c.read(&a, 995, 10), None, "past the block's end");
        // Make a the oldest, then overflow: a goes first.
        let f = fs::File::options().write(true).open(c.path(&a)).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        for i in 1..4u64 {
            c.insert(&([1u8; 32], i), vec![i as u8; 1000], false)
                .unwrap();
        }
        assert!(!c.has(&a), "oldest evicted");
        assert!(c.has(&([1u8; 32], 3)));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.fetched_bytes), (1, 2, 4000));
        assert!(s.evicted >= 1);
        // A second handle on the same directory sees the blocks.
        let c2 = PackCache::open(d.path(), 1 << 20).unwrap();
        assert_eq!(c2.read(&([1u8; 32], 3), 0, 3), Some(vec![3u8; 3]));
        assert_eq!(blocks_of(&[0; 32], CACHE_BLOCK - 1, 2).len(), 2);
        assert_eq!(blocks_of(&[0; 32], 0, CACHE_BLOCK).len(), 1);
    }

    #[test]
    fn a_claimed_block_is_fetched_once_by_whoever_claims_it_first() {
        let d = tempfile::tempdir().unwrap();
        // Two handles on one directory, as two processes would have.
        let (c1, c2) = (
            Arc::new(PackCache::open(d.path(), 1 << 20).unwrap()),
            PackCache::open(d.path(), 1 << 20).unwrap(),
        );
        let id = ([2u8; 32], 5);
        assert_eq!(c1.read(&id, 0, 4), None);
        let claim = c1.claim(&id).expect("claim");
        // The other one misses too, and waits for the claim meanwhile.
        assert_eq!(c2.read(&id, 0, 4), None);
        let waiter = std::thread::spawn(move || {
            let _claim = c2.claim(&id).expect("claim after the first");
            let got = c2.read_claimed(&id, 0, 4);
            (got, c2.stats())
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "the second claim waits for the first"
        );
        c1.insert(&id, vec![9u8; 100], true).unwrap();
        drop(claim);
        let (got, s2) = waiter.join().unwrap();
        assert_eq!(got, Some(vec![9u8; 4]), "found what the first one fetched");
        assert_eq!(
            (s2.hits, s2.misses, s2.waited, s2.fetched_bytes),
            (1, 0, 1, 0)
        );
        assert_eq!(c1.stats().fetched_bytes, 100);
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".fetch-"))
            .collect();
        assert!(left.is_empty(), "lock files are removed: {left:?}");
    }
}
