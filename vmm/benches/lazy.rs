//! Lazy-restore benchmark (no KVM needed): first-touch latency of a page that comes from
//! a repository on disk, against the floor, a `UFFDIO_COPY` of a page already in memory,
//! measured in the same run; and the time until every page is in.
//!
//! Run: `cargo bench -p vmm --bench lazy [-- DIR]` (DIR: where the repository goes,
//! default /var/tmp, a disk). Prints one line per figure.
//!
//! Setup: 256 MiB of random guest RAM in a pool on /dev/shm, a page snapshot of all of it
//! exported to a repository in DIR. Then, each in a new lazy pool (RAM as holes):
//! (a) floor: a handler thread sleeping in poll(2), as the VMM's does, answers each
//!     missing-page fault with `UFFDIO_COPY` from a buffer in memory; a toucher thread times its first touch of 4,096 pages spread
//!     out (one per 16-page window, so nothing comes along with another);
//! (b) the real fill (`LazyFill` over `RepoPageSource`, fault handler thread, filler
//!     thread, every chunk checked), on demand only, the same touches;
//! (c) the real fill in the background: time until every page is in.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind};
use pmsnap_repo::{DirStorage, Repo};
use pmsnap_testenv::{poll_until, Rng, SharedMap};
use userfaultfd::{Event, FaultKind};
use vmm::controller::export::export_snapshot;
use vmm::controller::repo_source::RepoPageSource;
use vmm::snapshot::engine::Engine;
use vmm::snapshot::fault::HandlerOptions;
use vmm::snapshot::lazy::{FillOptions, LazyFill};
use vmm::snapshot::protect::UffdProtector;

const RAM: u64 = 256 << 20;
const PAGES: u64 = RAM / 4096;
/// Pages touched for the latency figures: one in each 16-page window of the first 4,096.
const TOUCHES: u64 = 4096;

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort_unstable();
    (v[v.len() / 2], v[(v.len() * 99 / 100).min(v.len() - 1)])
}

/// A new pool on /dev/shm with RAM as holes, its RAM mapped as the VMM maps it.
fn lazy_pool(dir: &Path, tag: &str) -> (Pool, Arc<SharedMap>) {
    let opts = PoolOptions {
        lazy_ram: Some("bench".into()),
        block_count: Some(1024),
        ..PoolOptions::default()
    };
    let pool = Pool::create(dir.join(format!("{tag}.pool")), RAM, opts).expect("pool");
    let ram = Arc::new(SharedMap::new(
        pool.file(),
        pool.ram_offset(),
        RAM as usize,
        true,
    ));
    (pool, ram)
}

/// Time the first touch of each page in `pages`, in order, from a new thread.
fn touches(ram: &Arc<SharedMap>, pages: Vec<u64>) -> Vec<Duration> {
    let ram = ram.clone();
    std::thread::spawn(move || {
        pages
            .iter()
            .map(|&p| {
                let t = Instant::now();
                std::hint::black_box(ram.word(p, 0));
                t.elapsed()
            })
            .collect()
    })
    .join()
    .expect("toucher")
}

fn spread_pages() -> Vec<u64> {
    let mut rng = Rng(7);
    let mut v: Vec<u64> = (0..TOUCHES).map(|i| i * 16 + rng.below(16)).collect();
    // Random order, so the fill cannot guess the next one.
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// (a): UFFDIO_COPY from memory, one page per fault.
fn floor(dir: &Path) -> (Duration, Duration) {
    let (_pool, ram) = lazy_pool(dir, "floor");
    let prot =
        Arc::new(UffdProtector::with_ranges_lazy(&[(ram.as_ptr(), RAM as usize)]).expect("uffd"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = {
        let (prot, stop) = (prot.clone(), stop.clone());
        std::thread::spawn(move || {
            let page = vec![0x5au8; 4096];
            let mut buf = userfaultfd::EventBuffer::new(16);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Sleep in poll(2) as the VMM's fault handler does (no busy loop).
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(prot.uffd()),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                let Ok(events) = prot.uffd().read_events(&mut buf) else {
                    continue;
                };
                for e in events {
                    if let Ok(Event::Pagefault {
                        kind: FaultKind::Missing,
                        addr,
                        ..
                    }) = e
                    {
                        let p = prot.page_of(addr as usize).expect("in RAM");
                        prot.fill(p, &page).expect("fill");
                    }
                }
            }
        })
    };
    let r = percentiles(touches(&ram, spread_pages()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    handler.join().expect("handler");
    r
}

/// A lazy fill of the exported snapshot into a new pool, with the real engine.
fn real(
    dir: &Path,
    repo_dir: &Path,
    tag: &str,
    background: bool,
) -> (Engine, Arc<SharedMap>, Arc<LazyFill>) {
    let (pool, ram) = lazy_pool(dir, tag);
    let repo = Repo::open_or_init(DirStorage::new(repo_dir).expect("dir")).expect("repo");
    let m = repo.manifest("all").expect("manifest");
    let prot =
        Arc::new(UffdProtector::with_ranges_lazy(&[(ram.as_ptr(), RAM as usize)]).expect("uffd"));
    let fill = LazyFill::new(
        prot.clone(),
        Arc::new(RepoPageSource::new(
            repo,
            m,
            &repo_dir.display().to_string(),
        )),
        FillOptions { background },
        Box::new(|msg| panic!("{msg}")),
    );
    let engine = Engine::start_with(
        Arc::new(Mutex::new(pool)),
        prot,
        Vec::new(),
        HandlerOptions::default(),
        Some(fill.clone()),
    )
    .expect("engine");
    fill.start().expect("start");
    (engine, ram, fill)
}

fn main() {
    let disk = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let shm = tempfile::tempdir_in("/dev/shm").expect("tmpdir on /dev/shm");
    let repo_dir = tempfile::tempdir_in(&disk).expect("repository dir");
    // 256 MiB of random RAM, snapshotted and exported.
    let src = Pool::create(shm.path().join("src.pool"), RAM, PoolOptions::default()).expect("pool");
    let ram = SharedMap::new(src.file(), src.ram_offset(), RAM as usize, true);
    let mut rng = Rng(1);
    for p in 0..PAGES {
        for w in 0..512 {
            ram.write_word(p, w, rng.next_u64());
        }
    }
    let src = Arc::new(Mutex::new(src));
    {
        let mut s = src.lock().expect("lock");
        s.snapshot(
            "all",
            SnapshotKind::Pages,
            &[PageRun::new(0, PAGES)],
            Default::default(),
        )
        .expect("snapshot");
    }
    let t = Instant::now();
    let to = pmsnap_repo::RepoLocation::Dir(repo_dir.path().to_path_buf());
    let s3 = pmsnap_repo::S3Options::from_env();
    export_snapshot(src, "all", None, &to, &s3, &mut |_| ()).expect("export");
    println!(
        "setup: 256 MiB of random pages exported to {} in {:?}",
        disk.display(),
        t.elapsed()
    );

    // The source alone: one page read from the repository (ranged read, crc32c, BLAKE3).
    let reads = {
        let repo =
            Repo::open_or_init(DirStorage::new(repo_dir.path()).expect("dir")).expect("repo");
        let m = repo.manifest("all").expect("manifest");
        let mut page = vec![0u8; 4096];
        spread_pages()
            .into_iter()
            .map(|p| {
                let t = Instant::now();
                repo.read_pages(&m, p, &mut page).expect("read");
                t.elapsed()
            })
            .collect()
    };
    let (s50, s99) = percentiles(reads);
    println!("one page read from the repository alone: p50 {s50:?} p99 {s99:?}");
    let (f50, f99) = floor(shm.path());
    println!("first touch, UFFDIO_COPY of a page in memory (floor): p50 {f50:?} p99 {f99:?}");
    let (_e, ram, _fill) = real(shm.path(), repo_dir.path(), "demand", false);
    let (r50, r99) = percentiles(touches(&ram, spread_pages()));
    println!(
        "first touch, page from the repository (real fill, on demand): p50 {r50:?} p99 {r99:?} \
         ratio p50={:.1} p99={:.1}",
        r50.as_secs_f64() / f50.as_secs_f64(),
        r99.as_secs_f64() / f99.as_secs_f64()
    );
    let t = Instant::now();
    let (_e2, _ram2, fill) = real(shm.path(), repo_dir.path(), "bg", true);
    poll_until(Duration::from_secs(600), || fill.complete().then_some(())).expect("complete");
    let all = t.elapsed();
    println!(
        "every page in (background fill of 256 MiB from the repository): {all:?}, {:.0} MiB/s",
        256.0 / all.as_secs_f64()
    );
}
