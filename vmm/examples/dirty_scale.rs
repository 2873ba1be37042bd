//! How dirty tracking scales with the number of snapshots (issue 16, part 2): harvest
//! cost, `dirty since` cost and tracker memory with many snapshots against one, for the
//! engine's tracker (`vmm::snapshot::dirty::DirtyTracker`, an epoch per snapshot) and,
//! as the baseline measured in the same run, the tracker it replaced (one RAM-sized
//! bitmap per snapshot, every harvest ORed into all of them; kept here only).
//!
//! `cargo run --release -p vmm --example dirty_scale` (a 4 GiB guest, 1,000 snapshots,
//! 10-20 s here, most of it the old tracker's); `-- --mib M --snapshots N --rounds R` to
//! change the sizes.
//!
//! The guest RAM is real anonymous memory behind vm-memory (`GuestMemoryMmap` with its
//! `AtomicBitmap`), written through vm-memory, and the tracker's source is the VMM's own
//! write log (`VmmWriteLog`), one of the two sources the VMM runs (KVM's dirty log needs
//! a running VM and hands the tracker the same kind of bitmap). Between two snapshots 1%
//! of the pages are written, in 16-page clusters drawn from a working set of 10% of RAM.
//! Each line ends with `ratio=R goal<=G`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestMemoryMmap;
use vmm::snapshot::dirty::DirtyTracker;
use vmm::vstate::dirty::{
    bitmap_runs, bitmap_words, DirtyError, DirtySource, PageBitmap, VmmWriteLog,
};

const PAGE: u64 = 4096;
const CLUSTER: u64 = 16;

/// The tracker before issue 16 (vmm/src/snapshot/dirty.rs at b1623ba), the baseline.
struct OldTracker {
    sources: Vec<Box<dyn DirtySource>>,
    pages: u64,
    since: HashMap<String, PageBitmap>,
}

impl OldTracker {
    fn new(pages: u64, sources: Vec<Box<dyn DirtySource>>) -> Self {
        Self {
            sources,
            pages,
            since: HashMap::new(),
        }
    }

    fn harvest(&mut self) -> Result<(), DirtyError> {
        for src in &mut self.sources {
            let bits = src.harvest()?;
            for map in self.since.values_mut() {
                for (dst, src) in map.iter_mut().zip(&bits) {
                    *dst |= src;
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        self.since
            .insert(name.to_string(), vec![0; bitmap_words(self.pages)]);
        Ok(())
    }

    fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest()?;
        self.since
            .get(name)
            .map(|b| bitmap_runs(b))
            .ok_or_else(|| DirtyError::Untracked(name.to_string()))
    }

    /// Heap bytes, counted as `DirtyTracker::memory_bytes` counts its own.
    fn memory_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(String, PageBitmap)>() + 1;
        self.since.capacity() * entry
            + self
                .since
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity() * 8)
                .sum::<usize>()
    }
}

/// What the measurement needs of a tracker.
trait Tracker {
    fn start(&mut self, name: &str) -> Result<(), DirtyError>;
    fn harvest(&mut self) -> Result<(), DirtyError>;
    fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError>;
    fn memory_bytes(&self) -> usize;
}

impl Tracker for DirtyTracker {
    fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        DirtyTracker::start(self, name)
    }
    fn harvest(&mut self) -> Result<(), DirtyError> {
        DirtyTracker::harvest(self)
    }
    fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        DirtyTracker::dirty_since(self, name)
    }
    fn memory_bytes(&self) -> usize {
        DirtyTracker::memory_bytes(self)
    }
}

impl Tracker for OldTracker {
    fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        OldTracker::start(self, name)
    }
    fn harvest(&mut self) -> Result<(), DirtyError> {
        OldTracker::harvest(self)
    }
    fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        OldTracker::dirty_since(self, name)
    }
    fn memory_bytes(&self) -> usize {
        OldTracker::memory_bytes(self)
    }
}

/// xorshift64*: the write pattern only needs to be spread and repeatable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The guest: its RAM and the clusters its working set is made of.
struct Guest {
    mem: GuestMemoryMmap,
    pages: u64,
    working_set: Vec<u64>,
    rng: Rng,
}

impl Guest {
    fn new(mib: u64) -> Self {
        let pages = mib << 20 >> 12;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)])
            .expect("anonymous guest memory");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let clusters = pages / CLUSTER;
        let mut working_set: Vec<u64> = (0..clusters / 10).map(|_| rng.next() % clusters).collect();
        working_set.sort_unstable();
        working_set.dedup();
        let g = Self {
            mem,
            pages,
            working_set,
            rng,
        };
        // Fault the working set in once, so that later figures (and the RSS) are the
        // trackers', not the first touch of guest memory.
        for i in 0..g.working_set.len() {
            g.write_cluster(g.working_set[i], 0);
        }
        VmmWriteLog::new(g.mem.clone()).harvest().expect("clear");
        g
    }

    fn write_cluster(&self, cluster: u64, value: u64) {
        for p in cluster * CLUSTER..(cluster + 1) * CLUSTER {
            self.mem
                .write_obj(value, GuestAddress(p * PAGE))
                .expect("write guest memory");
        }
    }

    /// What the guest writes between two snapshots: 1% of its pages.
    fn write_epoch(&mut self, value: u64) {
        let n = (self.pages / 100).div_ceil(CLUSTER);
        for _ in 0..n {
            let c = self.working_set[(self.rng.next() % self.working_set.len() as u64) as usize];
            self.write_cluster(c, value);
        }
    }

    fn source(&self) -> Vec<Box<dyn DirtySource>> {
        vec![Box::new(VmmWriteLog::new(self.mem.clone()))]
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Set glibc's mmap threshold (allocations of `bytes` or more get their own mapping).
fn mmap_threshold(bytes: i32) {
    // SAFETY: mallopt only changes the allocator's tuning; no allocation is in flight.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// One case's figures.
struct Figures {
    harvest: Duration,
    since_newest: Duration,
    since_oldest: Duration,
    oldest_pages: u64,
    memory: usize,
    rss: u64,
}

/// Take `snapshots` snapshots of `guest` with a tracker made by `make`, 1% written
/// between two, then time harvests and `dirty since` queries over `rounds` more rounds (after
/// `rounds` untimed ones).
fn measure<T: Tracker>(
    guest: &mut Guest,
    snapshots: usize,
    rounds: usize,
    make: impl FnOnce(u64, Vec<Box<dyn DirtySource>>) -> T,
) -> Figures {
    // While the tracker is built, allocations of 64 KiB and more get their own mappings,
    // returned to the kernel when freed, so the RSS growth is this tracker's own (with
    // glibc's dynamic threshold it could reuse the freed heap of the case before).
    mmap_threshold(64 << 10);
    let rss0 = rss_bytes();
    let mut t = make(guest.pages, guest.source());
    for i in 0..snapshots {
        guest.write_epoch(i as u64);
        t.start(&format!("s{i}")).expect("start");
    }
    let newest = format!("s{}", snapshots - 1);
    let mut harvests = Vec::new();
    let mut newest_q = Vec::new();
    let mut oldest_q = Vec::new();
    let mut oldest_pages = 0;
    // Untimed rounds first: both cases then run on warm memory (the first stamps or ORs
    // into freshly allocated memory fault its pages in).
    for r in 0..rounds {
        guest.write_epoch(r as u64);
        t.harvest().expect("harvest");
        t.dirty_since(&newest).expect("dirty since the newest");
    }
    let rss = rss_bytes().saturating_sub(rss0);
    // The timed rounds allocate their temporary bitmaps from the heap, as a long-running
    // VMM does once glibc's dynamic threshold has risen above their size, rather than
    // mapping and faulting in fresh memory for each.
    mmap_threshold(32 << 20);
    for r in 0..rounds {
        guest.write_epoch(r as u64);
        let s = Instant::now();
        t.harvest().expect("harvest");
        harvests.push(s.elapsed());
        guest.write_epoch(r as u64);
        let s = Instant::now();
        let runs = t.dirty_since(&newest).expect("dirty since the newest");
        newest_q.push(s.elapsed());
        assert!(!runs.is_empty(), "the newest snapshot sees the writes");
        let s = Instant::now();
        let runs = t.dirty_since("s0").expect("dirty since the oldest");
        oldest_q.push(s.elapsed());
        oldest_pages = runs.iter().map(|r| r.1).sum();
    }
    let figures = Figures {
        harvest: median(harvests),
        since_newest: median(newest_q),
        since_oldest: median(oldest_q),
        oldest_pages,
        memory: t.memory_bytes(),
        rss,
    };
    drop(t);
    figures
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn mib(b: f64) -> String {
    format!("{:.2} MiB", b / (1u64 << 20) as f64)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

fn report(label: &str, n: usize, many: &Figures, one: &Figures) {
    let line = |what: &str, a: Duration, b: Duration| {
        println!(
            "{label}: {what}, {n} vs 1 snapshots: {} vs {} ratio={:.2} goal<=2",
            us(a),
            us(b),
            ratio(a.as_secs_f64(), b.as_secs_f64())
        );
    };
    line("harvest", many.harvest, one.harvest);
    line(
        "dirty since the newest snapshot",
        many.since_newest,
        one.since_newest,
    );
    println!(
        "{label}: dirty since the oldest snapshot, {n} vs 1 snapshots: {} ({} pages) vs {} ({} pages) ratio={:.2} goal<=none",
        us(many.since_oldest),
        many.oldest_pages,
        us(one.since_oldest),
        one.oldest_pages,
        ratio(many.since_oldest.as_secs_f64(), one.since_oldest.as_secs_f64())
    );
    let above = many.memory as f64 - one.memory as f64;
    println!(
        "{label}: memory, {n} vs 1 snapshots: {} vs {} (RSS growth {} vs {}) ratio={:.2} goal<=none",
        mib(many.memory as f64),
        mib(one.memory as f64),
        mib(many.rss as f64),
        mib(one.rss as f64),
        ratio(many.memory as f64, one.memory as f64)
    );
    println!(
        "{label}: memory above one snapshot with {n}: {} of 64 MiB allowed ratio={:.3} goal<=1",
        mib(above),
        above / (64u64 << 20) as f64
    );
}

fn main() {
    let mut mib_size = 4096u64;
    let mut snapshots = 1000usize;
    let mut rounds = 21usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{a} needs a number"))
        };
        match a.as_str() {
            "--mib" => mib_size = value(),
            "--snapshots" => snapshots = value() as usize,
            "--rounds" => rounds = value() as usize,
            _ => panic!("unknown argument {a}: --mib M --snapshots N --rounds R"),
        }
    }
    assert!(snapshots >= 1 && rounds >= 1);
    let mut guest = Guest::new(mib_size);
    println!(
        "guest: {mib_size} MiB ({} pages), 1% of pages written between snapshots in {CLUSTER}-page clusters from a working set of {} pages, VMM write log as the source, median of {rounds}",
        guest.pages,
        guest.working_set.len() as u64 * CLUSTER
    );
    // The source alone: what any tracker pays to read the write log.
    let mut source = VmmWriteLog::new(guest.mem.clone());
    let mut alone = Vec::new();
    mmap_threshold(32 << 20); // as in the timed rounds of `measure`
    for r in 0..rounds {
        guest.write_epoch(r as u64);
        let s = Instant::now();
        source.harvest().expect("harvest");
        alone.push(s.elapsed());
    }
    println!(
        "source alone (VmmWriteLog::harvest, no tracker): {}",
        us(median(alone))
    );
    // One case run and thrown away: in a fresh process the first case measured was
    // about 1.3x slower than the same case measured later, whichever case came first.
    measure(&mut guest, 1, rounds, DirtyTracker::new);
    // The new tracker first, while the heap is fresh (the RSS figures are cleanest).
    let new_one = measure(&mut guest, 1, rounds, DirtyTracker::new);
    let new_many = measure(&mut guest, snapshots, rounds, DirtyTracker::new);
    let old_one = measure(&mut guest, 1, rounds, OldTracker::new);
    let t = Instant::now();
    let old_many = measure(&mut guest, snapshots, rounds, OldTracker::new);
    let old_setup = t.elapsed();
    report("epoch tracker", snapshots, &new_many, &new_one);
    report("old per-snapshot tracker", snapshots, &old_many, &old_one);
    println!(
        "old per-snapshot tracker: taking the {snapshots} snapshots and measuring took {:.1} s",
        old_setup.as_secs_f64()
    );
}
