//! The pmsnap pool file and its persistent copy-on-write snapshot store.
//!
//! A pool is one file: two superblock copies, a redirect log, two metadata slots (the
//! catalog), the guest RAM area and a block area of preserved 4 KiB page copies. See
//! `docs/pool-format.md` for the format and the crash-consistency argument.
//!
//! # Threading
//!
//! [`Pool`] is `Send` but not internally synchronised: every mutating operation takes
//! `&mut self`. Share it between the VMM's threads as `Arc<Mutex<Pool>>`. The fault
//! handler locks and calls [`Pool::preserve`]. [`Pool::snapshot_with`] holds the
//! lock across mark + protect callback + commit, so a fault on a freshly protected page
//! waits for the commit and its `preserve` then credits the block to the new snapshot.
//! Never write guest RAM through the VMM's protected mapping while holding the lock (the
//! fault would wait for the lock you hold).
//!
//! The fault handler's flow for a write fault on page p: lock; `preserve(p)`; unlock;
//! then remove the write protection and wake the writer, whether `preserve` returned
//! `Ok(true)` (p was referenced; its old content is now durable in a block) or
//! `Ok(false)` (no snapshot references p any more, e.g. it was deleted or a snapshot
//! was aborted). On `Err` the page must stay protected. At VMM start on an existing
//! pool, write-protect [`Pool::protected_runs`].

pub mod catalog;
pub mod codec;
mod error;
mod lock;
pub mod mapping;
pub mod persist;
mod pool;
pub mod redirect_log;
pub mod superblock;
mod types;

pub use error::{PoolError, Result};
pub use lock::{claim_unused, PoolUse, UnusedPool};
pub use persist::{CrashSim, MsyncPersist, Persist, Tear};
pub use pool::{
    GcReport, Pool, PoolOptions, Problem, ProtectError, RecoveryReport, VerifyReport,
    DEFAULT_LOG_RECORDS,
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
