//! The pmsnap snapshot **repository**: exported snapshots (VM, page and process snapshots
//! of a pool, crate `pmem-backend`) stored outside the pool, deduplicated by content and
//! safe against crashes, on a directory today and on an object store later.
//!
//! # Layout
//!
//! A repository is a flat set of objects behind the [`Storage`] trait (a directory with
//! [`DirStorage`]):
//!
//! ```text
//! config              JSON: {"format":"pmsnap-repo","version":1,...}
//! packs/<pack id>     chunk content; pack id = BLAKE3 of the whole pack (64 hex digits)
//! index/<pack id>     the pack's index: chunk hash -> offset, length, crc32c
//! snapshots/<name>    one manifest per snapshot (name %-escaped), written last
//! gc/condemned        the garbage collector's list of packs to delete at its next run
//! ```
//!
//! **Chunks.** A snapshot's pages are 4 KiB chunks named by their BLAKE3 hash. A page
//! that is all zero is recorded as zero and never stored. The state blob (device and
//! vCPU state of a VM snapshot) is cut into 4 KiB pieces stored the same way (the last
//! piece may be shorter). A chunk already in the repository, or earlier in the same
//! export, is not stored again.
//!
//! **Packs** (`PMSRPACK`, version, chunk count, a 16-byte nonce that makes every pack
//! id unique to one write, then per chunk: hash, length, crc32c, content) group up to [`DEFAULT_PACK_SIZE`] bytes of chunks so a repository holds few
//! large objects; each pack is self-describing so its index could be rebuilt from it.
//! **Indexes** list each chunk's hash, offset, length and crc32c, so a reader fetches one
//! chunk with one ranged read. **Manifests** hold the snapshot's metadata, the packs it
//! uses (each pinned by the BLAKE3 of its index object), and a run-length page map: an
//! extent says "pages `first..first+count` are zero" or "are chunks `entry..` of pack
//! `k`"; an export writes new chunks in page order, so a fresh snapshot's map is a
//! handful of extents. Indexes, manifests and the condemned list are *sealed*: magic,
//! version, length, postcard body, BLAKE3 of all that.
//!
//! Every byte a reader returns is checked: the manifest's seal, the index's hash against
//! the manifest's pin, the chunk's crc32c and its BLAKE3 hash. A damaged or missing pack
//! is an error naming the pack and the page ([`RepoError::ChunkDamaged`],
//! [`RepoError::PackMissing`]), never a wrong page.
//!
//! # Crash safety
//!
//! The only write primitive is [`Storage::put`] of a whole object, atomic and durable
//! (temp file + fsync + rename + directory fsync on a directory; a PUT on an object
//! store). An export puts, in order: each pack, then its index, and, only after every
//! pack and index it references is in place, the manifest. A snapshot exists exactly
//! when its manifest does, so an export interrupted at any point (kill -9, power loss,
//! a full disk) leaves no partial snapshot, only packs and indexes no manifest
//! references. Running the export again loads every index, so it reuses every chunk of
//! every complete pack+index the interrupted run wrote and stores only the rest; a pack
//! whose index was never written is not trusted and is garbage. The garbage collector
//! deletes leftover packs once they are older than its grace period.
//!
//! # Garbage collection rule
//!
//! [`Repo::gc`] works in two phases across runs, so that it needs neither locks nor
//! conditional writes (an object store has neither across hosts):
//!
//! 1. **Condemn.** A pack (with its index) that no manifest references *and* whose
//!    objects are older than the grace period is put on `gc/condemned` with the time it
//!    was first condemned (kept while it stays on the list, so frequent runs do not
//!    postpone its deletion; a pack that becomes referenced again leaves the list).
//! 2. **Delete.** A later run, once a pack has been on the list for the grace period,
//!    lists the manifests again and deletes it if it is still unreferenced (index first,
//!    then pack).
//!
//! An export reads `gc/condemned` before loading the indexes and never reuses a
//! condemned pack. Just before writing its manifest it reads the list again and lists
//! the packs: if a pack it uses was condemned or deleted meanwhile it commits nothing and
//! fails with [`RepoError::Conflict`] (a rerun stores that content anew). So a pack is
//! deleted only if it was unreferenced when condemned, stayed on the list for the
//! grace period, and every export that could still commit a reference to it either saw
//! the condemnation or put its manifest before the deleting run listed the manifests.
//! Packs an export is still writing are young, so they are never condemned while the
//! export is running for less than the grace period (and if it runs longer, the final
//! check catches it). What this assumes: one gc at a time, a manifest put completes
//! within the grace period of the export's final check, and clocks agree to within the
//! grace period. A grace of zero condemns and deletes in one run: only for a repository
//! nothing else is writing.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod cache;
mod error;
mod export;
mod format;
mod manage;
mod meta;
mod pages;
mod read;
mod repo;
mod s3;
mod storage;
mod stream;

pub use cache::{CacheStats, PackCache, CACHE_BLOCK};
pub use error::{RepoError, Result, SourceError};
pub use export::{ExportReport, Phase, Progress, SnapshotSource};
pub use format::{hex, parse_hex, Hash32, MAX_TOUCH_PAGES, MAX_TOUCH_RUNS};
pub use manage::{GcReport, Problem, SnapshotSummary, VerifyReport};
pub use meta::{Manifest, SnapshotMeta};
pub use read::PrefetchReport;
pub use repo::{Repo, DEFAULT_PACK_SIZE, MAX_STATE_LEN, REPO_VERSION};
pub use s3::{open_storage, RepoLocation, S3Options, S3Storage};
pub use storage::{DirStorage, MemStorage, ObjectInfo, Storage};

/// Bytes per page and per chunk.
pub const PAGE_SIZE: usize = pmem_backend::PAGE_SIZE;
