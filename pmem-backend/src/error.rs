//! The one error type of the pool and its store.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong when creating, opening or using a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// An I/O error on the pool file (open, resize, mmap, msync, ...).
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The pool file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A persist call (msync, or the crash simulator) failed; the operation was not made durable.
    #[error("persisting {what} failed")]
    Persist {
        /// What was being persisted.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process holds the pool's lock.
    #[error("pool {path} is locked by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Locked {
        /// The pool file.
        path: PathBuf,
        /// The holder, when /proc/locks tells.
        pid: Option<u32>,
    },
    /// The pool file was removed (by `pmsnap store prune`, which found it unlocked)
    /// between its open and its lock.
    #[error("pool {0} was removed while it was being opened (by `pmsnap store prune`?)")]
    Removed(PathBuf),
    /// `create` was asked to overwrite an existing file.
    #[error("{0} already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    /// The file does not start with a pool superblock.
    #[error("not a pmsnap pool (bad magic)")]
    NotAPool,
    /// The pool was written by a newer pmsnap.
    #[error(
        "pool format version {found} is newer than this pmsnap supports (version {supported}): \
         the pool was written by a newer pmsnap; open it with that pmsnap or a newer one"
    )]
    NewerVersion {
        /// Version found in the superblock.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// The file is shorter than its superblock says.
    #[error("pool is truncated: {actual} bytes, expected at least {expected}")]
    Truncated {
        /// Size the pool needs.
        expected: u64,
        /// Actual file size.
        actual: u64,
    },
    /// The superblock describes a pool this host could not hold (crafted or foreign);
    /// refused before anything is allocated for it.
    #[error("pool geometry refused: {0}")]
    TooLarge(String),
    /// A checksum or a structural check failed.
    #[error("pool is corrupt: {0}")]
    Corrupt(String),
    /// The block area has no room for the preserved copies.
    #[error("block area full: need {needed} blocks, {free} free of {total}")]
    BlockAreaFull {
        /// Blocks the operation needs.
        needed: u64,
        /// Blocks free.
        free: u64,
        /// Blocks in the pool.
        total: u64,
    },
    /// Growing the block area could not extend the pool file (no space left on its
    /// filesystem, a file size limit, ...). The pool is unchanged: same geometry, same
    /// file length.
    #[error(
        "cannot extend pool {path} to {size} bytes to grow its block area; the pool is unchanged"
    )]
    Extend {
        /// The pool file.
        path: PathBuf,
        /// The file size growing needed.
        size: u64,
        /// The underlying error (ENOSPC on a full tmpfs).
        #[source]
        source: io::Error,
    },
    /// The catalog no longer fits in its metadata slot.
    #[error("metadata area full: catalog needs {needed} bytes, slot holds {capacity}")]
    MetadataFull {
        /// Bytes the new catalog needs.
        needed: u64,
        /// Bytes per metadata slot.
        capacity: u64,
    },
    /// A page run names pages outside the RAM area.
    #[error("page run {first}+{count} is outside the RAM area of {ram_pages} pages")]
    PageOutOfRange {
        /// First page of the run.
        first: u64,
        /// Pages in the run.
        count: u64,
        /// Pages in the RAM area.
        ram_pages: u64,
    },
    /// A snapshot with this name exists already.
    #[error("a snapshot named {0:?} exists already")]
    DuplicateName(String),
    /// No snapshot with this name or id.
    #[error("no snapshot {0}")]
    NoSuchSnapshot(String),
    /// The snapshot does not cover this page.
    #[error("snapshot {snapshot:?} does not cover page {page}")]
    PageNotInSnapshot {
        /// Snapshot name.
        snapshot: String,
        /// Guest page number.
        page: u64,
    },
    /// A preserved block fails its checksum.
    #[error("snapshot {snapshot:?} page {page}: block {block} fails its checksum (stored {expected:#010x}, computed {actual:#010x})")]
    BadBlock {
        /// Snapshot name.
        snapshot: String,
        /// Guest page number.
        page: u64,
        /// Block number.
        block: u64,
        /// Stored crc32c.
        expected: u32,
        /// Computed crc32c.
        actual: u32,
    },
    /// An argument is invalid (bad name, label, size, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The protect callback of `snapshot_with` failed, or the commit after it did. Nothing
    /// was committed; the caller must remove write protection from `unprotect`.
    #[error("snapshot {name:?} not taken; {} page run(s) must be unprotected", unprotect.len())]
    SnapshotAborted {
        /// Snapshot name.
        name: String,
        /// Pages that the callback may have protected and that no snapshot references.
        unprotect: Vec<crate::PageRun>,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The pool's RAM was being filled lazily and the fill never finished (the VMM
    /// stopped first): it has holes only the source could fill.
    #[error(
        "pool {path} is incomplete: its guest RAM was being restored lazily from {from} \
         and the VMM stopped before every page was in; restore from the source again into \
         a new pool"
    )]
    RamIncomplete {
        /// The pool file.
        path: PathBuf,
        /// Where its RAM was coming from.
        from: String,
    },
    /// Guest RAM pages are not in the pool yet (a lazy restore is still filling them)
    /// and could not be brought in: reading them would have read zeros.
    #[error("guest RAM pages {first}+{count} are not present and cannot be fetched: {reason}")]
    RamNotPresent {
        /// First page of the range.
        first: u64,
        /// Pages in the range.
        count: u64,
        /// Why the fetch failed (it names the source).
        reason: String,
    },
}

/// Result with [`PoolError`].
pub type Result<T> = std::result::Result<T, PoolError>;
