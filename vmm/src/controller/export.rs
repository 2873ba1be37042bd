//! Exporting a snapshot of the pool into a repository (crate `pmsnap-repo`,
//! docs/repository.md): offline from `pmsnap export`, and live from a running VMM
//! (`pmsnap ctl export`), where a snapshot is immutable, so the guest keeps running while
//! its pages are read: a page the guest writes meanwhile is preserved into a block first,
//! and the export reads the snapshot's content from there.
//!
//! A running VMM exports on its own thread, [`ExportWorker`], started before any seccomp
//! filter exists (a thread inherits its creator's filter, and every other thread kind is
//! refused `open`); it installs the `export` filter, which lets it write a repository
//! directory or talk to an S3 endpoint (TCP sockets, and the threads of the S3 client's
//! runtime, which inherit the filter) and nothing else beyond the common calls.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use pmem_backend::{Pool, SnapshotInfo};
use pmsnap_repo::{
    open_storage, ExportReport, Phase, Progress, Repo, RepoLocation, S3Options, SnapshotSource,
    SourceError, PAGE_SIZE,
};

use crate::snapshot::engine::lock_pool;

/// A pool's snapshot as the repository reads it: one page at a time under the pool lock,
/// so a live VMM's fault handler and API are held up for one page read at most.
pub struct PoolSource {
    pool: Arc<Mutex<Pool>>,
    info: SnapshotInfo,
    /// The name it gets in the repository.
    name: String,
}

impl std::fmt::Debug for PoolSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSource")
            .field("snapshot", &self.info.name)
            .field("as", &self.name)
            .finish()
    }
}

impl PoolSource {
    /// Snapshot `snapshot` of `pool`, to be stored as `as_name` (default: its own name).
    pub fn new(
        pool: Arc<Mutex<Pool>>,
        snapshot: &str,
        as_name: Option<&str>,
    ) -> Result<Self, pmem_backend::PoolError> {
        let info = lock_pool(&pool).inspect(snapshot)?;
        let name = as_name.unwrap_or(snapshot).to_string();
        Ok(Self { pool, info, name })
    }
}

impl SnapshotSource for PoolSource {
    fn meta(&mut self) -> Result<pmsnap_repo::SnapshotMeta, SourceError> {
        let i = &self.info;
        Ok(pmsnap_repo::SnapshotMeta {
            name: self.name.clone(),
            kind: i.kind,
            owner: i.owner,
            created_unix_ms: i.created_unix_ms,
            created_unix_ns: i.created_unix_ns,
            labels: i.labels.clone(),
            process: i.process.clone(),
            ram_size: lock_pool(&self.pool).ram_size(),
            runs: i.runs.clone(),
        })
    }

    fn read_page(&mut self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        let (_, data) = lock_pool(&self.pool)
            .read_snapshot_page(self.info.name.as_str(), page)
            .map_err(|e| Box::new(e) as SourceError)?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<u8>, SourceError> {
        lock_pool(&self.pool)
            .read_state(self.info.name.as_str())
            .map_err(|e| Box::new(e) as SourceError)
    }

    /// The pages the guest wrote after the snapshot, in the order the write faults
    /// preserved them (their blocks' allocation order): a lazy restore fetches them
    /// first. Read after the pages, so a live export sees the writes made meanwhile.
    fn touch_order(&mut self) -> Vec<pmem_backend::PageRun> {
        lock_pool(&self.pool)
            .preserved_in_order(self.info.name.as_str(), pmsnap_repo::MAX_TOUCH_PAGES)
            .unwrap_or_default()
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The pool has no such snapshot.
    #[error(transparent)]
    Pool(#[from] pmem_backend::PoolError),
    /// The repository refused or failed.
    #[error("repository {dir}: {source}")]
    Repo {
        /// The repository (directory or URL).
        dir: String,
        /// Cause (boxed: the repository's errors are large).
        #[source]
        source: Box<pmsnap_repo::RepoError>,
    },
    /// The repository could not be created or opened (a directory, or the S3 client).
    #[error("repository {dir}: {source}")]
    Dir {
        /// The repository (directory or URL).
        dir: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The export worker is not running.
    #[error("the export worker is not running")]
    NoWorker,
}

/// Export `snapshot` of `pool` into the repository `to` (a directory, created if
/// missing, or a bucket reached with `s3`), calling `progress` as it goes.
pub fn export_snapshot(
    pool: Arc<Mutex<Pool>>,
    snapshot: &str,
    as_name: Option<&str>,
    to: &RepoLocation,
    s3: &S3Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport, ExportError> {
    let mut src = PoolSource::new(pool, snapshot, as_name)?;
    let dir = to.to_string();
    let storage = open_storage(to, s3).map_err(|source| ExportError::Dir {
        dir: dir.clone(),
        source,
    })?;
    let repo = Repo::open_or_init(storage).map_err(|source| ExportError::Repo {
        dir: dir.clone(),
        source: Box::new(source),
    })?;
    repo.export(&mut src, progress)
        .map_err(|source| ExportError::Repo {
            dir,
            source: Box::new(source),
        })
}

/// Calls `log` with a line at every tenth of the pages (and not otherwise).
pub fn every_tenth(mut log: impl FnMut(String)) -> impl FnMut(Progress) {
    let mut last: Option<u64> = None;
    move |p: Progress| {
        if p.total == 0 || p.phase != Phase::Pages {
            return;
        }
        let tenth = p.done * 10 / p.total;
        if last != Some(tenth) {
            last = Some(tenth);
            log(format!(
                "{}% of {} pages, {} new bytes",
                tenth * 10,
                p.total,
                p.bytes_new
            ));
        }
    }
}

struct Job {
    snapshot: String,
    to: String,
    reply: mpsc::Sender<Result<ExportReport, String>>,
}

/// The running VMM's export thread: one export at a time, in the order asked.
pub struct ExportWorker {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for ExportWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportWorker")
    }
}

impl ExportWorker {
    /// Start the thread (from a thread without a seccomp filter: it installs its own).
    /// It ends when the worker is dropped, after the export in progress.
    pub fn spawn(pool: Arc<Mutex<Pool>>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("pmsnap-export".into())
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Export);
                for job in rx {
                    let name = job.snapshot.clone();
                    let mut progress = every_tenth(|line| log::info!("export of {name:?}: {line}"));
                    // The environment is read per export: AWS_* of the VMM process.
                    let res = RepoLocation::parse(&job.to)
                        .map_err(|e| e.to_string())
                        .and_then(|to| {
                            export_snapshot(
                                pool.clone(),
                                &job.snapshot,
                                None,
                                &to,
                                &S3Options::from_env(),
                                &mut progress,
                            )
                            .map_err(|e| {
                                // The whole cause chain, for the API's one message.
                                let mut m = e.to_string();
                                let mut src = std::error::Error::source(&e);
                                while let Some(s) = src {
                                    m.push_str(&format!(": {s}"));
                                    src = s.source();
                                }
                                m
                            })
                        });
                    let _ = job.reply.send(res);
                }
            })?;
        Ok(Self { tx: Mutex::new(tx) })
    }

    /// Export `snapshot` into the repository `to` (an absolute directory or
    /// `s3://BUCKET/PREFIX`) and wait for the report.
    pub fn export(&self, snapshot: &str, to: &str) -> Result<ExportReport, String> {
        let (reply, answer) = mpsc::channel();
        let job = Job {
            snapshot: snapshot.to_string(),
            to: to.to_string(),
            reply,
        };
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| ExportError::NoWorker.to_string())?;
        answer
            .recv()
            .map_err(|_| ExportError::NoWorker.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testutil::setup;

    #[test]
    fn a_live_export_reads_the_snapshot_not_what_the_guest_wrote_since() {
        let (dir, engine, ram) = setup(32);
        for p in 0..32 {
            ram.fill_page(p, p as u8 + 1);
        }
        engine
            .snapshot(
                "s",
                pmem_backend::SnapshotKind::Pages,
                &[pmem_backend::PageRun::new(0, 32)],
                Default::default(),
            )
            .expect("snapshot");
        for p in 0..16 {
            ram.fill_page(p, 0xee); // preserved first: the snapshot keeps its content
        }
        let worker = ExportWorker::spawn(engine.pool().clone()).expect("worker");
        let repo_dir = dir.path().join("repo");
        let rep = worker
            .export("s", &repo_dir.display().to_string())
            .expect("export");
        assert_eq!((rep.pages, rep.zero_pages), (32, 0));
        let repo = Repo::open_or_init(pmsnap_repo::DirStorage::new(&repo_dir).expect("dir"))
            .expect("repo");
        let m = repo.manifest("s").expect("manifest");
        for p in 0..32u64 {
            let page = repo.read_page(&m, p).expect("page");
            assert!(page.iter().all(|&b| b == p as u8 + 1), "page {p}");
        }
        let e = worker
            .export("nope", &repo_dir.display().to_string())
            .expect_err("unknown");
        assert!(e.contains("nope"), "{e}");
    }
}
