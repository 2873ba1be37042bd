//! A snapshot in a repository as the source of a lazy restore
//! ([`crate::snapshot::lazy::PageSource`]): pages are read with
//! [`pmsnap_repo::Repo::read_pages`], every chunk checked. A storage error may pass and
//! is retried; damaged or missing content never does, and stops the VM.

use pmsnap_repo::{Manifest, Repo, RepoError};

use crate::snapshot::lazy::{FetchError, PageSource};

/// Snapshot `manifest` of `repo`, named `where_` in logs and errors.
pub struct RepoPageSource {
    repo: Repo,
    manifest: Manifest,
    describe: String,
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
        }
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
}
