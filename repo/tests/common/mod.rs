//! Test helpers: an in-memory snapshot source and a storage that fails after N puts.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pmem_backend::{Owner, PageRun, ProcessInfo, SnapshotKind};
use pmsnap_repo::{ObjectInfo, SnapshotMeta, SnapshotSource, SourceError, Storage, PAGE_SIZE};

pub type Page = [u8; PAGE_SIZE];

pub use pmsnap_testenv::Rng;

/// A page of random bytes from `rng`.
pub fn random_page(rng: &mut Rng) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for c in p.chunks_mut(8) {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    p
}

/// A snapshot held in memory.
#[derive(Debug, Clone)]
pub struct FakeSource {
    pub meta: SnapshotMeta,
    pub pages: BTreeMap<u64, Page>,
    pub state: Vec<u8>,
}

impl SnapshotSource for FakeSource {
    fn meta(&mut self) -> Result<SnapshotMeta, SourceError> {
        Ok(self.meta.clone())
    }
    fn read_page(&mut self, page: u64, buf: &mut Page) -> Result<(), SourceError> {
        *buf = *self
            .pages
            .get(&page)
            .ok_or_else(|| format!("fake source has no page {page}"))?;
        Ok(())
    }
    fn state(&mut self) -> Result<Vec<u8>, SourceError> {
        Ok(self.state.clone())
    }
}

/// A VM snapshot of `n` pages: every 5th page zero, every 7th a copy of one fixed page,
/// the rest random; a state blob of 3 pieces and a bit, one of them zero.
pub fn vm(name: &str, n: u64, seed: u64) -> FakeSource {
    let mut rng = Rng(seed | 1);
    let fixed = random_page(&mut Rng(0xfeed));
    let mut pages = BTreeMap::new();
    for p in 0..n {
        let page = if p % 5 == 0 {
            [0u8; PAGE_SIZE]
        } else if p % 7 == 0 {
            fixed
        } else {
            random_page(&mut rng)
        };
        pages.insert(p, page);
    }
    let mut state = Vec::new();
    state.extend_from_slice(&random_page(&mut rng));
    state.extend_from_slice(&[0u8; PAGE_SIZE]);
    state.extend_from_slice(&random_page(&mut rng));
    state.extend_from_slice(b"tail of the device state");
    FakeSource {
        meta: SnapshotMeta {
            name: name.into(),
            kind: SnapshotKind::Vm,
            owner: Owner::Host,
            created_unix_ms: 1_700_000_000_000,
            created_unix_ns: 1_700_000_000_000_000_000,
            labels: vec![("boot".into(), "image-1".into())],
            process: None,
            ram_size: n * PAGE_SIZE as u64,
            runs: vec![PageRun::new(0, n)],
        },
        pages,
        state,
    }
}

/// A guest-owned process snapshot with two runs.
pub fn process(uid: u32, name: &str, seed: u64) -> FakeSource {
    let mut rng = Rng(seed | 1);
    let runs = vec![PageRun::new(100, 10), PageRun::new(300, 5)];
    let mut pages = BTreeMap::new();
    for r in &runs {
        for p in r.first..r.end() {
            pages.insert(
                p,
                if p % 4 == 0 {
                    [0; PAGE_SIZE]
                } else {
                    random_page(&mut rng)
                },
            );
        }
    }
    FakeSource {
        meta: SnapshotMeta {
            name: Owner::Guest(uid).qualify(name),
            kind: SnapshotKind::Process,
            owner: Owner::Guest(uid),
            created_unix_ms: 5,
            created_unix_ns: 5_000_000,
            labels: vec![],
            process: Some(ProcessInfo {
                pid: 42,
                comm: "postgres".into(),
                run_vas: vec![0x7f00_0000_0000, 0x7f00_1000_0000],
            }),
            ram_size: 1024 * PAGE_SIZE as u64,
            runs,
        },
        pages,
        state: Vec::new(),
    }
}

/// A storage whose puts fail from the `n`th on (a crash: nothing after it is written).
#[derive(Debug)]
pub struct FailAfter<S> {
    pub inner: Arc<S>,
    pub left: AtomicUsize,
}

impl<S> FailAfter<S> {
    pub fn new(inner: Arc<S>, n: usize) -> Self {
        FailAfter {
            inner,
            left: AtomicUsize::new(n),
        }
    }
}

impl<S: Storage> Storage for FailAfter<S> {
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let ok = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
            .is_ok();
        if ok {
            self.inner.put(key, data)
        } else {
            Err(io::Error::other("injected crash"))
        }
    }
    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        self.inner.delete(key)
    }
    fn exists(&self, key: &str) -> io::Result<bool> {
        self.inner.exists(key)
    }
}

/// Check every page and the state blob of `src` read back from `repo` byte for byte.
pub fn assert_reads_back(repo: &pmsnap_repo::Repo, src: &FakeSource) {
    let m = repo.manifest(&src.meta.name).unwrap();
    assert_eq!(m.meta(), &src.meta);
    assert_eq!(m.pages(), src.pages.len() as u64);
    for (p, want) in &src.pages {
        let got = repo.read_page(&m, *p).unwrap();
        assert!(got == *want, "page {p} differs");
    }
    assert_eq!(repo.read_state(&m).unwrap(), src.state);
}

pub fn no_progress() -> impl FnMut(pmsnap_repo::Progress) {
    |_| {}
}
