//! A snapshot in a repository as the source of a lazy restore
//! ([`crate::snapshot::lazy::PageSource`]): pages are read with
//! [`pmsnap_repo::Repo::read_pages`], every chunk checked. A storage error may pass and
//! is retried; damaged or missing content never does, and stops the VM.

use pmem_backend::PageRun;
use pmsnap_repo::{Manifest, Repo, RepoError};

use crate::snapshot::lazy::{FetchError, PageSource};

/// Snapshot `manifest` of `repo`, named `where_` in logs and errors.
pub struct RepoPageSource {
    repo: Repo,
    manifest: Manifest,
    describe: String,
    touch_order: bool,
}

impl std::fmt::Debug for RepoPageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl RepoPageSource {
    /// The snapshot of `manifest` in `repo`, found at `location` (for messages).
    pub fn new(repo: Repo, manifest: Manifest, location: &str) -> Self {
        let describe = format!("snapshot {:?} in repository {location}", manifest.name());
        Self {
            repo,
            manifest,
            describe,
            touch_order: true,
        }
    }

    /// The same, but without the snapshot's touch order as [`PageSource::first_pages`]
    /// (`restore --ignore-touch-order`: the fill goes in address order).
    pub fn without_touch_order(mut self) -> Self {
        self.touch_order = false;
        self
    }
}

impl PageSource for RepoPageSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn read(&self, first: u64, out: &mut [u8]) -> Result<(), FetchError> {
        self.repo
            .read_pages(&self.manifest, first, out)
            .map_err(|e| match e {
                RepoError::Storage { .. } => FetchError::Transient(e.to_string()),
                e => FetchError::Fatal(e.to_string()),
            })
    }

    /// The order the guest touched pages in after the snapshot, as the export recorded
    /// it (docs/repository.md, "Touch order").
    /// What this process's pack cache fetched (the restore's repository reads go through
    /// it for a bucket).
    fn fetched_bytes(&self) -> Option<u64> {
        self.repo.pack_cache().map(|c| c.stats().fetched_bytes)
    }

    fn first_pages(&self) -> Vec<PageRun> {
        if self.touch_order {
            self.manifest.touch_order().to_vec()
        } else {
            Vec::new()
        }
    }
}
