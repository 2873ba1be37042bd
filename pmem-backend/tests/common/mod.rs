//! Helpers shared by the integration tests: temp pools, page patterns, and a plain
//! model of what each snapshot must contain.

#![allow(dead_code)]

use pmem_backend::{Page, PageRun, Pool, PoolOptions, SnapshotKind, SnapshotMeta, PAGE_SIZE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A temp dir on /dev/shm when available.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("pmsnap-it")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir")
}

/// A page whose bytes derive from `seed`.
pub fn pattern(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    for (i, c) in p.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

/// What the pool must contain: RAM page seeds and, per snapshot, its page seeds and
/// state blob.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub ram: Vec<u64>,
    pub snaps: BTreeMap<String, (BTreeMap<u64, u64>, Vec<u8>)>,
}

impl Model {
    pub fn new(pages: u64) -> Self {
        Model {
            ram: (0..pages).map(|p| 1000 + p).collect(),
            snaps: BTreeMap::new(),
        }
    }

    /// Fill the pool's RAM with the model's seeds.
    pub fn fill(&self, pool: &mut Pool) {
        for (p, &s) in self.ram.iter().enumerate() {
            pool.write_ram_page(p as u64, &pattern(s))
                .expect("fill RAM");
        }
    }

    pub fn snapshot(
        &mut self,
        pool: &mut Pool,
        name: &str,
        runs: &[PageRun],
        state: Vec<u8>,
    ) -> pmem_backend::Result<u64> {
        let meta = SnapshotMeta {
            owner: pmem_backend::Owner::Host,
            labels: vec![("test".into(), name.into())],
            state: state.clone(),
            process: None,
        };
        let id = pool.snapshot(name, SnapshotKind::Vm, runs, meta)?;
        self.record_snapshot(name, runs, state);
        Ok(id)
    }

    pub fn record_snapshot(&mut self, name: &str, runs: &[PageRun], state: Vec<u8>) {
        let pages = runs
            .iter()
            .flat_map(|r| r.first..r.first + r.count)
            .map(|p| (p, self.ram[p as usize]))
            .collect();
        self.snaps.insert(name.to_string(), (pages, state));
    }

    /// Write a new seed into RAM page p (preserving first).
    pub fn write(&mut self, pool: &mut Pool, p: u64, seed: u64) -> pmem_backend::Result<()> {
        pool.write_ram_page(p, &pattern(seed))?;
        self.ram[p as usize] = seed;
        Ok(())
    }

    /// Check that `pool` holds exactly these snapshots, bit-exact, with the invariants.
    pub fn check(&self, pool: &Pool) -> Result<(), String> {
        let names: Vec<String> = pool.list().into_iter().map(|s| s.name).collect();
        let want: Vec<String> = self.snaps.keys().cloned().collect();
        let mut sorted = names.clone();
        sorted.sort();
        if sorted != want {
            return Err(format!("snapshots {names:?}, expected {want:?}"));
        }
        for (name, (pages, state)) in &self.snaps {
            let info = pool.inspect(name.as_str()).map_err(|e| e.to_string())?;
            if info.pages != pages.len() as u64 {
                return Err(format!(
                    "{name}: {} pages, expected {}",
                    info.pages,
                    pages.len()
                ));
            }
            for (&p, &seed) in pages {
                let (loc, data) = pool
                    .read_snapshot_page(name.as_str(), p)
                    .map_err(|e| e.to_string())?;
                if data != pattern(seed) {
                    return Err(format!("{name} page {p} ({loc:?}) differs"));
                }
                if let pmem_backend::PageLocation::Ram(_) = loc {
                    if !pool.is_protected(p) {
                        return Err(format!("{name} page {p} is RAM(p) but not protected"));
                    }
                }
            }
            let got = pool.read_state(name.as_str()).map_err(|e| e.to_string())?;
            if &got != state {
                return Err(format!("{name}: state blob differs"));
            }
        }
        Ok(())
    }
}

/// Write `image` to a new pool file in `dir` and return its path.
pub fn materialise(dir: &Path, name: &str, image: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, image).expect("write image");
    p
}

/// Options for small pools.
pub fn small_opts(persist: Option<Box<dyn pmem_backend::Persist>>) -> PoolOptions {
    PoolOptions {
        block_count: Some(64),
        log_records: Some(128),
        meta_slot_bytes: Some(64 * 1024),
        persist,
        ..PoolOptions::default()
    }
}

/// The superblock in force in the first 8 KiB of a pool (file or durable image).
pub fn superblock_of(head: &[u8]) -> pmem_backend::superblock::Superblock {
    use pmem_backend::superblock::{decode, select, SB_SIZE};
    let n = SB_SIZE as usize;
    select(&decode(&head[..n]), &decode(&head[n..2 * n])).expect("a superblock in force")
}

/// The superblock in force in the pool file at `path` (an open pool's file shows what
/// the store wrote through its mapping).
pub fn superblock_at(path: &Path) -> pmem_backend::superblock::Superblock {
    use std::io::Read;
    let mut head = vec![0u8; 8192];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .expect("read the superblocks");
    superblock_of(&head)
}
