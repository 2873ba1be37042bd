//! The repository's error type.

use std::io;

/// An error from a snapshot source (the pool, a test fake).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong with a repository. A damaged repository is input like any
/// other: it produces one of these, never a panic and never a wrong page.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage failed (`op` on object `key`).
    #[error("repository storage: {op} {key}: {source}")]
    Storage {
        /// The operation (`get`, `put`, ...).
        op: &'static str,
        /// The object key (or prefix for `list`).
        key: String,
        /// The storage's error.
        #[source]
        source: io::Error,
    },
    /// The snapshot source failed.
    #[error("snapshot source: {0}")]
    Source(#[source] SourceError),
    /// The storage holds something that is not a pmsnap repository.
    #[error("not a pmsnap repository: {0}")]
    NotARepo(String),
    /// The repository was written by a newer pmsnap.
    #[error("repository format version {found} is newer than this pmsnap supports ({supported})")]
    NewerVersion {
        /// The version found.
        found: u32,
        /// The highest version this build reads.
        supported: u32,
    },
    /// The snapshot's metadata is not acceptable.
    #[error("invalid snapshot metadata: {0}")]
    InvalidMeta(String),
    /// A snapshot of that name exists with different content.
    #[error("snapshot {0:?} already exists in the repository with different content")]
    Exists(String),
    /// No snapshot of that name.
    #[error("no snapshot {0:?} in the repository")]
    NotFound(String),
    /// The page is not part of the snapshot.
    #[error("page {page} is not part of snapshot {snapshot:?}")]
    NoSuchPage {
        /// The snapshot.
        snapshot: String,
        /// The page asked for.
        page: u64,
    },
    /// An object (manifest, index, pack, config) fails its checksum or does not decode.
    #[error("damaged repository object {object}: {detail}")]
    Corrupt {
        /// The object key.
        object: String,
        /// What is wrong.
        detail: String,
    },
    /// A pack (or its index) that a snapshot needs is missing.
    #[error(
        "snapshot {snapshot:?}: {what} is in pack {pack}, which is missing from the repository"
    )]
    PackMissing {
        /// The snapshot.
        snapshot: String,
        /// The pack id (hex).
        pack: String,
        /// Which content (`page N`, `state blob piece N`).
        what: String,
    },
    /// A chunk's stored bytes do not match their checksum or hash.
    #[error("snapshot {snapshot:?}: {what} is damaged in pack {pack} (chunk {entry}): {detail}")]
    ChunkDamaged {
        /// The snapshot.
        snapshot: String,
        /// The pack id (hex).
        pack: String,
        /// The chunk's number in the pack.
        entry: u32,
        /// Which content (`page N`, `state blob piece N`).
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// A concurrent garbage collection condemned content this export reused; nothing was
    /// committed and running the export again will store that content anew.
    #[error("a concurrent gc condemned {0} pack(s) this export reused; nothing was committed, run the export again")]
    Conflict(usize),
}

/// Result with [`RepoError`].
pub type Result<T> = std::result::Result<T, RepoError>;

pub(crate) fn storage_err(op: &'static str, key: &str) -> impl FnOnce(io::Error) -> RepoError {
    let key = key.to_string();
    move |source| RepoError::Storage { op, key, source }
}

pub(crate) fn corrupt(object: &str, detail: impl Into<String>) -> RepoError {
    RepoError::Corrupt {
        object: object.to_string(),
        detail: detail.into(),
    }
}
