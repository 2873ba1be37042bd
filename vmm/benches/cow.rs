//! Copy-before-write engine benchmark (no KVM needed): a pool with 256 MiB of guest RAM
//! on /dev/shm, the real engine (userfaultfd write protection, fault handler thread,
//! store sink) and a bare userfaultfd round trip for comparison.
//!
//! Run: `cargo bench -p vmm --bench cow` (optional argument: repeats, default 5).
//!
//! (a) Pause time of a snapshot of all 65,536 pages through `Engine::snapshot` (protect
//!     + record in the store) versus a memcpy of those 256 MiB into a pre-faulted buffer.
//! (b) Per-page cost of the first write to a protected page: a writer thread touches N
//!     protected, populated pages in order; the engine's store sink (preserve into a
//!     block, then unprotect) versus the same fault handler with a no-op sink (fault +
//!     unprotect only).
//! (c) Handler placement: blocking or spinning wait, writer and handler pinned to the
//!     same CPU or to different CPUs.
//!
//! Each figure is the median of the repeats.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind, SnapshotMeta};
use pmsnap_testenv::SharedMap;
use vmm::snapshot::engine::Engine;
use vmm::snapshot::fault::{FaultHandler, HandlerOptions, PreserveSink, WaitMode};
use vmm::snapshot::protect::{PageProtector, UffdProtector};

const RAM: u64 = 256 << 20;
const PAGES: u64 = RAM / 4096;
/// Pages the writer touches in (b) and (c).
const FAULT_PAGES: u64 = 16384;

/// The pool's RAM area, mapped as the VMM maps it (the test crates' one mapping helper).
type Map = SharedMap;

/// Write one word into each of pages `first..first + count`.
fn touch(map: &Map, first: u64, count: u64, value: u64) {
    for p in first..first + count {
        map.write_word(p, 0, value);
    }
}

fn pin_current(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside the set for cpu < CPU_SETSIZE (we use 0 and 1).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sets the calling thread's affinity from a valid set of the given size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity({cpu})");
}

/// Time a writer thread (optionally pinned) touching `count` pages from `first`.
fn timed_writer(map: &Arc<Map>, first: u64, count: u64, cpu: Option<usize>) -> Duration {
    let map = map.clone();
    std::thread::spawn(move || {
        if let Some(c) = cpu {
            pin_current(c);
        }
        let t = Instant::now();
        touch(&map, first, count, 0x5a5a);
        t.elapsed()
    })
    .join()
    .expect("writer")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The engine on a fresh pool, with its RAM mapping populated.
struct EngineRig {
    engine: Engine,
    ram: Arc<Map>,
    _dir: tempfile::TempDir,
}

fn engine_rig(opts: HandlerOptions) -> EngineRig {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let pool = Pool::create(dir.path().join("bench.pool"), RAM, PoolOptions::default())
        .expect("create pool");
    let ram = Arc::new(Map::new(pool.file(), pool.ram_offset(), RAM as usize, true));
    touch(&ram, 0, PAGES, 1);
    let prot = Arc::new(UffdProtector::new(ram.as_ptr(), RAM as usize).expect("uffd register"));
    let engine = Engine::start(Arc::new(Mutex::new(pool)), prot, Vec::new(), opts).expect("engine");
    EngineRig {
        engine,
        ram,
        _dir: dir,
    }
}

struct NoopSink;
impl PreserveSink for NoopSink {
    fn before_write(&self, _page: u64) -> Result<(), pmem_backend::PoolError> {
        Ok(())
    }
}

/// The bare round trip: the same handler thread with a no-op sink, on a tmpfs file.
struct BareRig {
    prot: Arc<UffdProtector>,
    ram: Arc<Map>,
    // Dropped first: stops the handler before the mapping goes.
    handler: Option<FaultHandler>,
    _dir: tempfile::TempDir,
}

fn bare_rig(opts: HandlerOptions) -> BareRig {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("bare"))
        .expect("file");
    file.set_len(RAM).expect("size");
    let ram = Arc::new(Map::new(&file, 0, RAM as usize, true));
    touch(&ram, 0, PAGES, 1);
    let prot = Arc::new(UffdProtector::new(ram.as_ptr(), RAM as usize).expect("uffd register"));
    let handler = FaultHandler::spawn(prot.clone(), Arc::new(NoopSink), opts).expect("handler");
    BareRig {
        prot,
        ram,
        handler: Some(handler),
        _dir: dir,
    }
}

impl Drop for BareRig {
    fn drop(&mut self) {
        self.handler.take();
    }
}

/// Median ns per first write to a protected page with the engine's store sink.
fn engine_fault_ns(rig: &EngineRig, repeats: usize, writer_cpu: Option<usize>) -> f64 {
    let runs = [PageRun::new(0, FAULT_PAGES)];
    let mut v = Vec::new();
    for i in 0..repeats {
        let name = format!("f{i}");
        rig.engine
            .snapshot(&name, SnapshotKind::Pages, &runs, SnapshotMeta::default())
            .expect("snapshot");
        let t = timed_writer(&rig.ram, 0, FAULT_PAGES, writer_cpu);
        v.push(t.as_nanos() as f64 / FAULT_PAGES as f64);
        rig.engine.delete(&name).expect("delete");
    }
    median(v)
}

/// Median ns per first write to a protected page with the no-op sink.
fn bare_fault_ns(rig: &BareRig, repeats: usize, writer_cpu: Option<usize>) -> f64 {
    let mut v = Vec::new();
    for _ in 0..repeats {
        rig.prot.protect(0, FAULT_PAGES).expect("protect");
        let t = timed_writer(&rig.ram, 0, FAULT_PAGES, writer_cpu);
        v.push(t.as_nanos() as f64 / FAULT_PAGES as f64);
    }
    median(v)
}

/// Median ns per write to unprotected, populated pages (the floor).
fn plain_write_ns(rig: &BareRig, repeats: usize) -> f64 {
    rig.prot.unprotect(0, PAGES).expect("unprotect");
    median(
        (0..repeats)
            .map(|_| {
                timed_writer(&rig.ram, 0, FAULT_PAGES, None).as_nanos() as f64 / FAULT_PAGES as f64
            })
            .collect(),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

fn main() {
    // cargo bench passes `--bench`; a plain number sets the repeats, `a`, `b` or `c`
    // picks sections (default: all).
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5).max(1);
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["a", "b", "c"].contains(a))
        .collect();
    let want = |s: &str| picked.is_empty() || picked.contains(&s);
    if !Path::new("/dev/shm").is_dir() {
        println!("SKIPPED cow bench: /dev/shm is missing");
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cow bench: {} MiB guest RAM on /dev/shm, {repeats} repeats (medians), {cpus} CPUs, \
         load {}",
        RAM >> 20,
        loadavg().trim()
    );

    if want("a") {
        section_a(repeats);
    }
    if want("b") {
        section_b(repeats);
    }
    if want("c") {
        section_c(repeats, cpus);
    }
    println!();
    println!("load after: {}", loadavg().trim());
}

/// (a) Snapshot pause versus copy.
fn section_a(repeats: usize) {
    let rig = engine_rig(HandlerOptions::default());
    let all = [PageRun::new(0, PAGES)];
    let mut snap = Vec::new();
    for i in 0..repeats {
        let name = format!("a{i}");
        let t = Instant::now();
        rig.engine
            .snapshot(&name, SnapshotKind::Pages, &all, SnapshotMeta::default())
            .expect("snapshot");
        snap.push(t.elapsed().as_secs_f64() * 1e3);
        rig.engine.delete(&name).expect("delete");
    }
    let snap_ms = median(snap);
    // Pre-protected: the protect walk happens before the pause while the guest runs
    // (here 1% of the pages are written in between, each faulting once); the pause is
    // the snapshot that follows, which re-protects only those pages.
    let written = PAGES / 100;
    let mut pre = Vec::new();
    for i in 0..repeats {
        let name = format!("p{i}");
        rig.engine.preprotect(&all).expect("preprotect");
        for p in 0..written {
            // SAFETY: page p * 97 % PAGES lies inside the RAM mapping.
            unsafe { *rig.ram.as_ptr().add(((p * 97) % PAGES) as usize * 4096) = 2 };
        }
        let t = Instant::now();
        rig.engine
            .snapshot(&name, SnapshotKind::Pages, &all, SnapshotMeta::default())
            .expect("snapshot");
        pre.push(t.elapsed().as_secs_f64() * 1e3);
        rig.engine.delete(&name).expect("delete");
    }
    let pre_ms = median(pre);
    let mut buf = vec![0u8; RAM as usize];
    buf.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let mut copy = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        // SAFETY: the mapping is RAM bytes long, `buf` is a distinct RAM-byte buffer.
        unsafe { std::ptr::copy_nonoverlapping(rig.ram.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        copy.push(t.elapsed().as_secs_f64() * 1e3);
    }
    std::hint::black_box(&buf);
    drop(buf);
    let copy_ms = median(copy);
    // The share of the write-protect ioctl alone, on a populated tmpfs mapping.
    let bare = bare_rig(HandlerOptions::default());
    let mut wp = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        bare.prot.protect(0, PAGES).expect("protect");
        wp.push(t.elapsed().as_secs_f64() * 1e3);
        bare.prot.unprotect(0, PAGES).expect("unprotect");
    }
    drop(bare);
    let wp_ms = median(wp);
    // The share of the store's record alone (no protection).
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let mut pool = Pool::create(dir.path().join("rec.pool"), RAM, PoolOptions::default())
        .expect("create pool");
    let mut rec = Vec::new();
    for i in 0..repeats {
        let name = format!("r{i}");
        let t = Instant::now();
        pool.snapshot_with(
            &name,
            SnapshotKind::Pages,
            &all,
            SnapshotMeta::default(),
            |_| Ok(()),
        )
        .expect("record");
        rec.push(t.elapsed().as_secs_f64() * 1e3);
        pool.delete(name.as_str()).expect("delete");
    }
    drop(pool);
    let rec_ms = median(rec);
    println!();
    println!("(a) pause for a snapshot of {PAGES} pages (256 MiB)");
    println!("    Engine::snapshot (protect + record)   {snap_ms:9.2} ms");
    println!("      of which the bare protect ioctl     {wp_ms:9.2} ms");
    println!("      of which the store record alone     {rec_ms:9.2} ms");
    println!("    memcpy of 256 MiB (pre-faulted dst)   {copy_ms:9.2} ms");
    println!(
        "    ratio snapshot / copy                  {:9.3}   (goal <= 0.200)",
        snap_ms / copy_ms
    );
    println!("    pre-protected, {written} pages written before the pause:");
    println!("      pause (Engine::snapshot after Engine::preprotect) {pre_ms:9.2} ms");
    println!(
        "      ratio pause / copy                   {:9.3}   (goal <= 0.200)",
        pre_ms / copy_ms
    );

    // The store rewrites its whole catalog on each commit, redirects included: with a
    // snapshot whose pages were all preserved, every later snapshot commits more.
    rig.engine
        .snapshot("full", SnapshotKind::Pages, &all, SnapshotMeta::default())
        .expect("snapshot");
    touch(&rig.ram, 0, PAGES, 2);
    let mut loaded = Vec::new();
    for i in 0..repeats {
        let name = format!("l{i}");
        let t = Instant::now();
        rig.engine
            .snapshot(&name, SnapshotKind::Pages, &all, SnapshotMeta::default())
            .expect("snapshot");
        loaded.push(t.elapsed().as_secs_f64() * 1e3);
        rig.engine.delete(&name).expect("delete");
    }
    let loaded_ms = median(loaded);
    println!(
        "    the same with a fully preserved 65,536-page snapshot in the pool: {loaded_ms:.2} ms \
         (ratio {:.3})",
        loaded_ms / copy_ms
    );
}

/// (b) First write to a protected page: store sink versus bare round trip.
fn section_b(repeats: usize) {
    let rig = engine_rig(HandlerOptions::default());
    let store = engine_fault_ns(&rig, repeats, None);
    drop(rig);
    let bare = bare_rig(HandlerOptions::default());
    let bare_ns = bare_fault_ns(&bare, repeats, None);
    let plain = plain_write_ns(&bare, repeats);
    drop(bare);
    println!();
    println!("(b) first write to a protected page, {FAULT_PAGES} pages in order, per page");
    println!("    engine (store sink: preserve + unprotect)  {store:9.0} ns");
    println!("    bare uffd round trip (no-op sink)          {bare_ns:9.0} ns");
    println!("    unprotected write (floor)                  {plain:9.0} ns");
    println!(
        "    ratio engine / bare                         {:9.2}   (goal <= 1.30)",
        store / bare_ns
    );
}

/// (c) Handler placement.
fn section_c(repeats: usize, cpus: usize) {
    println!();
    println!("(c) handler placement, per page (handler pinned via HandlerOptions.cpu)");
    println!(
        "    {:<10} {:<22} {:>10} {:>10} {:>7}",
        "wait", "placement", "bare ns", "engine ns", "ratio"
    );
    let placements: Vec<(&str, Option<usize>, Option<usize>)> = if cpus >= 2 {
        vec![
            ("unpinned", None, None),
            ("same CPU (0/0)", Some(0), Some(0)),
            ("different CPUs (0/1)", Some(0), Some(1)),
        ]
    } else {
        vec![
            ("unpinned", None, None),
            ("same CPU (0/0)", Some(0), Some(0)),
        ]
    };
    for mode in [WaitMode::Blocking, WaitMode::Spinning] {
        for &(label, hcpu, wcpu) in &placements {
            let opts = HandlerOptions { mode, cpu: hcpu };
            let bare = bare_rig(opts);
            let b = bare_fault_ns(&bare, repeats, wcpu);
            drop(bare);
            let rig = engine_rig(opts);
            let e = engine_fault_ns(&rig, repeats, wcpu);
            drop(rig);
            println!(
                "    {:<10} {:<22} {:>10.0} {:>10.0} {:>7.2}",
                format!("{mode:?}"),
                label,
                b,
                e,
                e / b
            );
        }
    }
}
