//! Repository throughput on any REPO (docs/perf-s3.md): export a synthetic VM snapshot
//! of MIB MiB whose pages are all distinct and non-zero (what a guest that uses all its
//! RAM looks like), read it all back through a fresh pack cache and again without a cache
//! (checking every page; the read's CPU time is `cpu_ms`), then export a second snapshot
//! in which 1% of the pages changed. Prints one JSON line per step.
//!
//! `cargo run --release -p pmsnap-repo --example s3bench -- REPO MIB CACHE_DIR`
//! (REPO: a directory or s3://BUCKET/PREFIX with the usual AWS_* environment).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use pmem_backend::{Owner, PageRun, SnapshotKind};
use pmsnap_repo::{
    open_storage, PackCache, Repo, RepoLocation, S3Options, SnapshotMeta, SnapshotSource,
    SourceError, PAGE_SIZE,
};

/// Pages from a counter: page p is xorshift output seeded by (p, generation of p).
struct Synthetic {
    name: String,
    pages: u64,
    /// Pages `p` with `p % 100 == 0` have this generation (the rest 0).
    changed_gen: u64,
}

impl SnapshotSource for Synthetic {
    fn meta(&mut self) -> Result<SnapshotMeta, SourceError> {
        Ok(SnapshotMeta {
            name: self.name.clone(),
            kind: SnapshotKind::Vm,
            owner: Owner::Host,
            created_unix_ms: 1_700_000_000_000,
            created_unix_ns: 1_700_000_000_000_000_000,
            labels: Vec::new(),
            process: None,
            ram_size: self.pages * PAGE_SIZE as u64,
            runs: vec![PageRun::new(0, self.pages)],
        })
    }
    fn read_page(&mut self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        let generation = if page % 100 == 0 { self.changed_gen } else { 0 };
        let mut rng = pmsnap_testenv::Rng((page << 8 | generation) * 2 + 1);
        for c in buf.chunks_mut(8) {
            c.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        Ok(())
    }
    fn state(&mut self) -> Result<Vec<u8>, SourceError> {
        Ok(vec![7u8; 9000])
    }
}

/// CPU time (user + system) this process used so far, in ms: the read's own cost, apart
/// from what the object store server and the rest of a shared machine take.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime
    // the 13th, in clock ticks of 1/100 s.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0] + f[1]) * 10
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, mib, cache_dir) = match &args[..] {
        [_, u, m, c] => (u.clone(), m.parse::<u64>().unwrap(), c.clone()),
        _ => panic!("usage: s3bench REPO MIB CACHE_DIR"),
    };
    let pages = mib * 256;
    let loc = RepoLocation::parse(&url).unwrap();
    let open = || Repo::open_or_init(open_storage(&loc, &S3Options::from_env()).unwrap()).unwrap();

    let repo = open();
    let t = Instant::now();
    let mut a = Synthetic {
        name: "a".into(),
        pages,
        changed_gen: 0,
    };
    let r = repo.export(&mut a, &mut |_| {}).unwrap();
    let ms = t.elapsed().as_millis();
    println!(
        "{{\"step\":\"full export\",\"ms\":{ms},\"bytes_written\":{},\"packs\":{}}}",
        r.bytes_written, r.packs_written
    );

    // Read every page back, as `pmsnap import` does: through a fresh pack cache (the
    // default), then with none (`--cache-mib 0`: nothing written to the cache directory).
    let all: Vec<u64> = (0..pages).collect();
    for cached in [true, false] {
        let cache = cached.then(|| Arc::new(PackCache::open(&cache_dir, 4 << 30).unwrap()));
        let reader = match &cache {
            Some(c) => open().with_cache(c.clone()),
            None => open(),
        };
        let (t, cpu) = (Instant::now(), cpu_ms());
        let m = reader.manifest("a").unwrap();
        let mut sum = 0u64;
        let mut bytes = 0u64;
        reader
            .read_page_list(&m, &all, &mut |_, d| {
                sum = sum.wrapping_add(u64::from(d[0]));
                bytes += PAGE_SIZE as u64;
                Ok(())
            })
            .unwrap();
        let ms = t.elapsed().as_millis();
        let (step, fetched) = match &cache {
            Some(c) => ("full read", c.stats().fetched_bytes),
            None => ("full read, no cache", bytes),
        };
        println!(
            "{{\"step\":\"{step}\",\"ms\":{ms},\"cpu_ms\":{},\"fetched_bytes\":{fetched},\"checksum\":{sum}}}",
            cpu_ms() - cpu,
        );
    }

    let t = Instant::now();
    let mut b = Synthetic {
        name: "b".into(),
        pages,
        changed_gen: 1,
    };
    let r = open().export(&mut b, &mut |_| {}).unwrap();
    let ms = t.elapsed().as_millis();
    println!(
        "{{\"step\":\"incremental export\",\"ms\":{ms},\"bytes_written\":{},\"packs\":{}}}",
        r.bytes_written, r.packs_written
    );
}
