//! The pmsnap pool file and its persistent copy-on-write snapshot store.
//!
//! A pool is one file: two superblock copies, a redirect log, two metadata slots (the
//! catalog), the guest RAM area and a block area of preserved 4 KiB page copies. See
//! `docs/pool-format.md` for the format and the crash-consistency argument.
//!
//! # Threading
//!
//! [`Pool`] is `Send` and `Sync` but not internally synchronised: every mutating
//! operation takes `&mut self`. The VMM shares it between its threads as
//! `Arc<Mutex<Pool>>` and calls it only under that lock, [`Pool::is_protected`]
//! included. [`Pool::snapshot_with`] holds the lock across mark + protect callback +
//! commit, so a fault on a freshly protected page waits for the commit and its
//! `preserve` then credits the block to the new snapshot. Never write guest RAM through
//! the VMM's protected mapping while holding the lock (the fault would wait for the lock
//! you hold).
//!
//! # The VMM's write-fault path
//!
//! What the VMM does for a write fault on guest page p: its handler thread
//! (`handle_wp_fault` in `vmm/src/snapshot/fault.rs`) calls
//! `StoreSink::before_write_then` (`vmm/src/snapshot/engine.rs`), which
//!
//! 1. locks the pool;
//! 2. calls [`Pool::preserve`]`(p)`:
//!    - `Ok(true)`: p was referenced; its old content is now durable in a block;
//!    - `Ok(false)`: no snapshot references RAM(p) (none took it, it was deleted, its
//!      snapshot was aborted, or p was only pre-protected ahead of a snapshot): nothing
//!      to keep;
//!    - `Err`: the page cannot be kept. The engine drops ([`Pool::delete`]) every
//!      snapshot that still holds p as RAM(p) ([`Pool::snapshot_page_location`]), logging
//!      each drop (or a failed delete) as an error, and unprotects the runs each delete
//!      returns, so that no snapshot later reads the new content as its own;
//! 3. still holding the lock, and whatever `preserve` returned, removes the write
//!    protection of p (`UFFDIO_WRITEPROTECT` clearing the protection, without
//!    `DONTWAKE`, so the same ioctl wakes the blocked writer): the guest goes on even
//!    after an error. Unprotecting under the lock is what keeps a snapshot from
//!    protecting p again between the preserve and the unprotect (which would then remove
//!    the new snapshot's protection, and p's next write would go unpreserved). If a
//!    pre-protection is armed (`Engine::preprotect`), p is recorded so that the coming
//!    snapshot protects it again;
//! 4. unlocks. The handler then logs a preserve error and counts the fault.
//!
//! At VMM start on an existing pool, the engine write-protects [`Pool::protected_runs`]
//! before it starts the handler (`Engine::start`).

pub mod catalog;
pub mod checksum;
pub mod codec;
mod error;
mod lock;
pub mod mapping;
pub mod persist;
mod pool;
pub mod redirect_log;
pub mod redirects;
pub mod superblock;
mod types;

pub use error::{PoolError, Result};
pub use lock::{claim_unused, PoolUse, UnusedPool};
pub use persist::{CrashSim, MsyncPersist, Persist, Tear};
pub use pool::{
    filling_marker, mark_ram_complete, BackgroundHold, GcReport, GrowReport, LazyCopyBack,
    LazyPage, Pool, PoolOptions, Problem, ProtectError, RamGate, RecoveryReport, VerifyReport,
    DEFAULT_LOG_RECORDS, THREAD_START,
};
pub use types::{
    normalize_runs, pages_to_runs, Owner, PageLocation, PageRun, ProcessInfo, SnapshotInfo,
    SnapshotKind, SnapshotMeta, SnapshotSel, Stats,
};

/// Bytes per guest page and per block.
pub const PAGE_SIZE: usize = 4096;

/// One 4 KiB page.
pub type Page = [u8; PAGE_SIZE];

#[cfg(test)]
mod testutil;
