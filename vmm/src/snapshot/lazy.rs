//! Lazy restore: the vCPUs run before guest RAM is there.
//!
//! The pool's RAM starts as holes ([`pmem_backend::PoolOptions::lazy_ram`]) and the
//! guest RAM mapping is registered for missing-page faults as well as write-protect
//! ([`UffdProtector::with_ranges_lazy`]). Pages come from a [`PageSource`] (a snapshot
//! in a repository) three ways, all through one filler thread:
//!
//! - **On first access.** A vCPU (through KVM) or a device touching a hole blocks in the
//!   kernel; the fault handler thread passes the page to [`LazyFill::demand`] and goes
//!   on. The filler serves demands first: it reads the page and puts it in with
//!   `UFFDIO_COPY`, which wakes the vCPU; then the holes next to it in its aligned
//!   64 KiB window, before the background fill goes on.
//! - **In the background.** Between demands it first reads the pages the source says
//!   the guest touches first ([`PageSource::first_pages`]: the order the guest wrote
//!   pages after the snapshot, recorded at export), in that order, then fills the rest
//!   in page order, 256 KiB at a time, until every page is present (unless started on
//!   demand only, as clones are).
//! - **Before the store reads RAM.** The store reads guest pages through its own mapping
//!   (preserve, copy-back, export); a hole read there would become a zero page that the
//!   guest then sees. The store calls [`LazyFill`] as its [`RamGate`] first, which
//!   queues the pages and waits until they are in. The filler never takes the pool lock,
//!   so a gate waiting under it cannot deadlock.
//!
//! A page is filled write-protected once any protection was asked for (see
//! [`UffdProtector::fill`]), so a snapshot taken mid-fill keeps every page's content.
//! A page the source cannot give (a damaged or missing pack) is never filled with
//! anything else: the fill stops, and the error goes to the `on_fatal` callback (the
//! VMM stops with it). Errors the source calls transient are retried with backoff, and
//! [`LazyFill::stats`] says what the fill waits for meanwhile.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use pmem_backend::{PageRun, RamGate};

use super::fault::MissingSink;
use super::protect::{PageProtector, UffdProtector, PAGE_SIZE};

/// Pages read for one background step (256 KiB).
const BATCH: u64 = 64;
/// Pages around a demanded one that come with it (an aligned 64 KiB window).
const WINDOW: u64 = 16;
/// First-touch latencies kept for the percentiles.
const MAX_SAMPLES: usize = 1 << 16;
/// Most runs of [`PageSource::first_pages`] used (more are ignored).
const MAX_HINT_RUNS: usize = 1 << 16;

/// Why a source could not give pages.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying: the storage did not answer, or answered with an error that may
    /// pass.
    #[error("{0}")]
    Transient(String),
    /// Never retried: the content is damaged or missing. Nothing is filled; the VM stops.
    #[error("{0}")]
    Fatal(String),
}

/// Where lazily restored pages come from.
pub trait PageSource: Send + Sync {
    /// What it is, for logs and errors ("snapshot NAME in repository REPO").
    fn describe(&self) -> String;
    /// Guest pages `first..first + out.len() / 4096` into `out`, checked.
    fn read(&self, first: u64, out: &mut [u8]) -> Result<(), FetchError>;
    /// Pages the guest is expected to touch first, in that order (read ahead before the
    /// address-order fill). Runs beyond guest RAM are ignored.
    fn first_pages(&self) -> Vec<PageRun> {
        Vec::new()
    }
    /// Bytes fetched from remote storage so far, if the source counts them.
    fn fetched_bytes(&self) -> Option<u64> {
        None
    }
}

/// How the fill runs.
#[derive(Debug, Clone, Copy)]
pub struct FillOptions {
    /// Fill every page in the background (else only what is touched: clones).
    pub background: bool,
}

impl Default for FillOptions {
    fn default() -> Self {
        Self { background: true }
    }
}

/// What the fill has done, for the API and the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FillStats {
    /// The source.
    pub source: String,
    /// Guest pages.
    pub pages: u64,
    /// Pages present.
    pub present: u64,
    /// Whether every page is present.
    pub complete: bool,
    /// Whether the rest is filled in the background.
    pub background: bool,
    /// Pages read because something touched them (a vCPU, a device or the store).
    pub demanded: u64,
    /// Missing-page faults: first touches of a hole by a vCPU or a device, each of which
    /// waited until its page was in (whichever thread put it there; `demanded` counts
    /// only those the demand thread read).
    #[serde(default)]
    pub faults: u64,
    /// Pages read by the background fill.
    pub background_pages: u64,
    /// Pages found present already when their turn came (written by the VMM).
    pub already_present: u64,
    /// Pages the source said the guest touches first (the snapshot's recorded touch
    /// order), read ahead in that order before the rest; 0 without one.
    #[serde(default)]
    pub hint_pages: u64,
    /// Of the background pages, those read because of that order.
    #[serde(default)]
    pub hinted_pages: u64,
    /// Bytes this VMM fetched from the repository's storage (an `s3://` repository,
    /// through the host's pack cache; `None` for a directory, read in place).
    #[serde(default)]
    pub fetched_bytes: Option<u64>,
    /// Time from a first touch to its page being in: median and 99th percentile, in
    /// microseconds (0 until something was touched).
    pub first_touch_p50_us: u64,
    /// See `first_touch_p50_us`.
    pub first_touch_p99_us: u64,
    /// Milliseconds from start until every page was present (while filling: so far).
    pub elapsed_ms: u64,
    /// What the fill is waiting for (a transient source error being retried).
    pub waiting: Option<String>,
    /// Why the fill stopped for good, if it did.
    pub error: Option<String>,
}

/// Queued work and its outcome, under one lock.
#[derive(Default)]
struct Queue {
    /// Demanded runs (first page, count) with when they were asked for.
    demand: VecDeque<(u64, u64, Instant)>,
    /// Holes next to a demanded page (its aligned window), read after the demands and
    /// before the background fill.
    prefetch: VecDeque<(u64, u64)>,
    /// Runs the guest is expected to touch first, read after the windows of touched
    /// pages and before the address-order fill.
    hint: VecDeque<(u64, u64)>,
    hint_pages: u64,
    hinted_pages: u64,
    /// Next page the background fill looks at.
    cursor: u64,
    stop: bool,
    waiting: Option<String>,
    error: Option<String>,
    samples: Vec<u32>,
    demanded: u64,
    background_pages: u64,
    already_present: u64,
    done_at: Option<Duration>,
}

/// What a filler thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Pages something waits for (a vCPU, a device, the store).
    Demand,
    /// Read-ahead and the background fill.
    Ahead,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Demand => "demand",
            Role::Ahead => "ahead",
        }
    }
}

/// Called once with the error when the fill cannot go on.
pub type OnFatal = Box<dyn FnOnce(String) + Send>;

/// A running lazy fill. Dropping it stops the filler thread (pages still missing then
/// stay missing: drop it only with the VM).
pub struct LazyFill {
    protector: Arc<UffdProtector>,
    source: Arc<dyn PageSource>,
    pages: u64,
    background: bool,
    present: Vec<AtomicU64>,
    remaining: AtomicU64,
    faults: AtomicU64,
    complete: AtomicBool,
    queue: Mutex<Queue>,
    /// Wakes the filler (work queued, stop) and the gate's waiters (pages in, error).
    cond: Condvar,
    started: Instant,
    on_fatal: Mutex<Option<OnFatal>>,
    on_complete: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFill")
            .field("pages", &self.pages)
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl LazyFill {
    /// A fill of the protector's pages from `source`. Nothing runs until [`Self::start`];
    /// demands queue up meanwhile.
    pub fn new(
        protector: Arc<UffdProtector>,
        source: Arc<dyn PageSource>,
        opts: FillOptions,
        on_fatal: OnFatal,
    ) -> Arc<Self> {
        let pages = protector.pages();
        let mut queue = Queue::default();
        if opts.background {
            for r in source.first_pages().into_iter().take(MAX_HINT_RUNS) {
                let end = r.end().min(pages);
                if r.first < end {
                    queue.hint.push_back((r.first, end - r.first));
                    queue.hint_pages += end - r.first;
                }
            }
            if queue.hint_pages > 0 {
                info!(
                    "lazy restore: reading {} pages ({} runs) first, in the order the guest \
                     touched them after the snapshot",
                    queue.hint_pages,
                    queue.hint.len()
                );
            }
        }
        Arc::new(Self {
            protector,
            source,
            pages,
            background: opts.background,
            present: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            remaining: AtomicU64::new(pages),
            faults: AtomicU64::new(0),
            complete: AtomicBool::new(pages == 0),
            queue: Mutex::new(queue),
            cond: Condvar::new(),
            started: Instant::now(),
            on_fatal: Mutex::new(Some(on_fatal)),
            on_complete: Mutex::new(None),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// A fill of only the pages of `missing` (a lazy copy back: the rest of RAM is in
    /// place); otherwise as [`Self::new`].
    pub fn new_partial(
        protector: Arc<UffdProtector>,
        source: Arc<dyn PageSource>,
        opts: FillOptions,
        on_fatal: OnFatal,
        missing: &[PageRun],
    ) -> Arc<Self> {
        let fill = Self::new(protector, source, opts, on_fatal);
        for w in &fill.present {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        let mut holes = 0;
        for r in pmem_backend::normalize_runs(missing) {
            for p in r.first..r.end().min(fill.pages) {
                fill.present[(p / 64) as usize].fetch_and(!(1 << (p % 64)), Ordering::Relaxed);
                holes += 1;
            }
        }
        fill.remaining.store(holes, Ordering::Release);
        fill.complete.store(holes == 0, Ordering::Release);
        fill
    }

    /// Call `f` once, from the filler thread, when every page is present (the VMM
    /// removes the pool's fill marker then).
    pub fn when_complete(&self, f: Box<dyn FnOnce() + Send>) {
        *self.on_complete.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Start the filler threads: one serves pages something waits for, the other
    /// reads ahead (the windows of touched pages, then the background fill), so a touch
    /// never queues behind a read-ahead.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        self.start_demand()?;
        self.start_ahead()
    }

    /// Start the thread that serves touched pages. It must run before anything can
    /// touch guest RAM: restoring vCPU state already does (KVM writes the kvm-clock
    /// page), and would wait for it forever.
    pub fn start_demand(self: &Arc<Self>) -> std::io::Result<()> {
        self.spawn(Role::Demand)
    }

    /// Start the read-ahead and background thread (once the vCPUs run, so that it does
    /// not compete with getting them running).
    pub fn start_ahead(self: &Arc<Self>) -> std::io::Result<()> {
        self.spawn(Role::Ahead)
    }

    fn spawn(self: &Arc<Self>, role: Role) -> std::io::Result<()> {
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name(format!("pmsnap-fill-{}", role.name()))
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Fill);
                me.run(role);
            })?;
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(t);
        Ok(())
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether page `p` is present.
    pub fn is_present(&self, p: u64) -> bool {
        self.complete.load(Ordering::Acquire)
            || self
                .present
                .get((p / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (p % 64)) != 0)
    }

    /// Whether every page is present.
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Record pages `first..first + count` as present; returns how many were not before.
    fn mark(&self, first: u64, count: u64) -> u64 {
        let mut newly = 0u64;
        let mut p = first;
        let end = first + count;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let old = self.present[(p / 64) as usize].fetch_or(mask, Ordering::AcqRel);
            newly += u64::from((mask & !old).count_ones());
            p += n;
        }
        if newly > 0 && self.remaining.fetch_sub(newly, Ordering::AcqRel) == newly {
            self.complete.store(true, Ordering::Release);
        }
        newly
    }

    /// The first page at or after `from` that is not present, if any.
    fn next_missing(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < self.present.len() {
            let free = !self.present[w].load(Ordering::Acquire) & mask;
            if free != 0 {
                let p = w as u64 * 64 + u64::from(free.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            w += 1;
            mask = !0;
        }
        None
    }

    /// The run of holes starting at `first` (at most `max` pages, not past `end`).
    fn hole_run(&self, first: u64, end: u64, max: u64) -> u64 {
        let mut n = 0;
        while n < max && first + n < end && !self.is_present(first + n) {
            n += 1;
        }
        n
    }

    /// Queue pages `first..first + count` ahead of the background fill.
    fn push_demand(&self, first: u64, count: u64) {
        let mut q = self.queue();
        q.demand.push_back((first, count, Instant::now()));
        drop(q);
        self.cond.notify_all();
    }

    /// What the fill has done.
    pub fn stats(&self) -> FillStats {
        let q = self.queue();
        let mut s = q.samples.clone();
        s.sort_unstable();
        let pct = |p: usize| {
            s.get((s.len() * p / 100).min(s.len().saturating_sub(1)))
                .map_or(0, |&v| u64::from(v))
        };
        FillStats {
            source: self.source.describe(),
            pages: self.pages,
            present: self.pages - self.remaining.load(Ordering::Acquire),
            complete: self.complete(),
            background: self.background,
            demanded: q.demanded,
            faults: self.faults.load(Ordering::Relaxed),
            background_pages: q.background_pages,
            already_present: q.already_present,
            hint_pages: q.hint_pages,
            hinted_pages: q.hinted_pages,
            fetched_bytes: self.source.fetched_bytes(),
            first_touch_p50_us: pct(50),
            first_touch_p99_us: pct(99),
            elapsed_ms: q
                .done_at
                .unwrap_or_else(|| self.started.elapsed())
                .as_millis() as u64,
            waiting: q.waiting.clone(),
            error: q.error.clone(),
        }
    }

    /// A filler thread.
    fn run(&self, role: Role) {
        let mut buf = vec![0u8; (BATCH * PAGE_SIZE) as usize];
        while let Some((first, count, asked)) = self.next_job(role) {
            let data = &mut buf[..(count * PAGE_SIZE) as usize];
            if !self.fetch(first, data) {
                return;
            }
            match self.protector.fill(first, data) {
                Ok(f) => {
                    // Counted before the pages are marked present, so that whoever sees
                    // the fill complete (the status) sees every page of it counted.
                    {
                        let mut q = self.queue();
                        q.already_present += f.present;
                        match asked {
                            Some(t) => {
                                q.demanded += f.copied;
                                if q.samples.len() < MAX_SAMPLES {
                                    q.samples.push(t.elapsed().as_micros() as u32);
                                }
                            }
                            None => q.background_pages += f.copied,
                        }
                    }
                    self.mark(first, count);
                    let mut q = self.queue();
                    let finished = self.complete() && q.done_at.is_none();
                    if finished {
                        q.done_at = Some(self.started.elapsed());
                        info!(
                            "lazy restore complete: {} pages from {} in {:?} ({} on first touch)",
                            self.pages,
                            self.source.describe(),
                            self.started.elapsed(),
                            q.demanded
                        );
                    }
                    drop(q);
                    if finished {
                        let f = self
                            .on_complete
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        if let Some(f) = f {
                            f();
                        }
                    }
                }
                Err(e) => {
                    self.fail(format!("cannot put guest RAM in place: {e}"));
                    return;
                }
            }
            self.cond.notify_all();
        }
    }

    /// The next run `role` fills: for [`Role::Demand`] a demanded one, for
    /// [`Role::Ahead`] a window to read ahead or the next background batch. Waits for
    /// work; `None` once stopped or failed.
    fn next_job(&self, role: Role) -> Option<(u64, u64, Option<Instant>)> {
        let mut q = self.queue();
        loop {
            if q.stop || q.error.is_some() {
                return None;
            }
            if role == Role::Ahead {
                if let Some(job) = self.ahead_job(&mut q) {
                    return Some(job);
                }
                q = self.cond.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            while let Some((first, count, asked)) = q.demand.pop_front() {
                let end = first + count;
                let Some(p) = self.next_missing(first).filter(|&p| p < end) else {
                    continue;
                };
                if count == 1 {
                    // The page alone (its toucher waits), then the rest of its aligned
                    // window: a guest that touched one page tends to touch the next.
                    let until = ((p / WINDOW + 1) * WINDOW).min(self.pages);
                    if p + 1 < until {
                        q.prefetch.push_back((p + 1, until - p - 1));
                    }
                    return Some((p, 1, Some(asked)));
                }
                let n = self.hole_run(p, end, BATCH).max(1);
                if p + n < end {
                    // The rest of a long run stays first in line.
                    q.demand.push_front((p + n, end - p - n, asked));
                }
                return Some((p, n, Some(asked)));
            }
            q = self.cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A read-ahead job: the rest of a touched page's window, else the next run of the
    /// source's touch order, else the next background batch (when filling in the
    /// background).
    fn ahead_job(&self, q: &mut Queue) -> Option<(u64, u64, Option<Instant>)> {
        while let Some((first, count)) = q.prefetch.pop_front() {
            let end = first + count;
            if let Some(p) = self.next_missing(first).filter(|&p| p < end) {
                return Some((p, self.hole_run(p, end, BATCH).max(1), None));
            }
        }
        if !self.background || self.complete() {
            return None;
        }
        while let Some((first, count)) = q.hint.pop_front() {
            let end = first + count;
            if let Some(p) = self.next_missing(first).filter(|&p| p < end) {
                let n = self.hole_run(p, end, BATCH).max(1);
                if p + n < end {
                    q.hint.push_front((p + n, end - p - n));
                }
                q.hinted_pages += n;
                return Some((p, n, None));
            }
        }
        let p = self.next_missing(q.cursor).or_else(|| {
            // Wrap: pages before the cursor that a demand skipped.
            self.next_missing(0)
        })?;
        let n = self.hole_run(p, self.pages, BATCH);
        q.cursor = p + n;
        Some((p, n, None))
    }

    /// Read pages into `data`, retrying transient errors with backoff until stopped.
    /// False when the fill must end (stopped, or a fatal error, already reported).
    fn fetch(&self, first: u64, data: &mut [u8]) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.source.read(first, data) {
                Ok(()) => {
                    if self.queue().waiting.take().is_some() {
                        info!("lazy restore: {} answers again", self.source.describe());
                    }
                    return true;
                }
                Err(FetchError::Fatal(msg)) => {
                    self.fail(format!(
                        "guest pages {first}+{} cannot be restored: {msg}",
                        data.len() as u64 / PAGE_SIZE
                    ));
                    return false;
                }
                Err(FetchError::Transient(msg)) => {
                    let why = format!(
                        "guest pages {first}+{} wait for {}: {msg} (retrying every {backoff:?})",
                        data.len() as u64 / PAGE_SIZE,
                        self.source.describe()
                    );
                    let mut q = self.queue();
                    if q.waiting.is_none() {
                        warn!("lazy restore: {why}");
                    }
                    q.waiting = Some(why);
                    let (q, _) = self
                        .cond
                        .wait_timeout_while(q, backoff, |q| !q.stop)
                        .unwrap_or_else(|e| e.into_inner());
                    if q.stop {
                        return false;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// The fill cannot go on: record why, wake every waiter, and report it once.
    fn fail(&self, msg: String) {
        let full = format!("lazy restore from {} failed: {msg}", self.source.describe());
        error!("{full}");
        // Reported before any waiter learns of it, so whoever sees the error can count on
        // the VMM stopping.
        let cb = self
            .on_fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(cb) = cb {
            cb(full);
        }
        self.queue().error = Some(msg);
        self.cond.notify_all();
    }

    /// Stop the filler threads and wait for them.
    pub fn stop(&self) {
        self.queue().stop = true;
        self.cond.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.join().is_err() {
                error!("a lazy fill thread panicked");
            }
        }
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MissingSink for LazyFill {
    fn demand(&self, page: u64) {
        if page < self.pages {
            self.faults.fetch_add(1, Ordering::Relaxed);
            self.push_demand(page, 1);
        }
    }
}

impl RamGate for LazyFill {
    fn ensure(&self, runs: &[PageRun]) -> Result<(), String> {
        let holes = |r: &PageRun| {
            let end = r.end().min(self.pages);
            self.next_missing(r.first).is_some_and(|p| p < end)
        };
        if self.complete() || !runs.iter().any(holes) {
            return Ok(());
        }
        // Every run with holes is queued at once, then waited for.
        let mut q = self.queue();
        let now = Instant::now();
        for r in runs.iter().filter(|r| holes(r)) {
            let end = r.end().min(self.pages);
            q.demand.push_back((r.first, end - r.first, now));
        }
        self.cond.notify_all();
        loop {
            if let Some(e) = &q.error {
                return Err(e.clone());
            }
            if !runs.iter().any(holes) {
                return Ok(());
            }
            if q.stop {
                return Err("the lazy fill was stopped".into());
            }
            q = self.cond.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::engine::{lock_pool, Engine};
    use crate::snapshot::fault::HandlerOptions;
    use pmem_backend::{Pool, PoolError, PoolOptions, SnapshotKind};
    use pmsnap_testenv::{poll_until, SharedMap};

    /// The byte every byte of source page `p` holds.
    fn byte(p: u64) -> u8 {
        (p % 251) as u8 + 1
    }

    /// A source double: page p is all `byte(p)`; `fatal` pages fail for good, and the
    /// first `transient` reads fail with a transient error.
    #[derive(Default)]
    struct TestSource {
        fatal: Option<u64>,
        transient: AtomicU64,
        reads: AtomicU64,
        /// What `first_pages` says.
        first: Vec<PageRun>,
        /// Every read asked for, (first page, pages), in order.
        log: Mutex<Vec<(u64, u64)>>,
    }

    impl PageSource for TestSource {
        fn describe(&self) -> String {
            "the test source".into()
        }
        fn read(&self, first: u64, out: &mut [u8]) -> Result<(), FetchError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let n = out.len() as u64 / PAGE_SIZE;
            self.log.lock().expect("log").push((first, n));
            if self.fatal.is_some_and(|f| f >= first && f < first + n) {
                return Err(FetchError::Fatal("pack 00ff is damaged".into()));
            }
            if self
                .transient
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
                .is_ok()
            {
                return Err(FetchError::Transient("storage timed out".into()));
            }
            for (i, page) in out.chunks_mut(PAGE_SIZE as usize).enumerate() {
                page.fill(byte(first + i as u64));
            }
            Ok(())
        }
        fn first_pages(&self) -> Vec<PageRun> {
            self.first.clone()
        }
    }

    struct Lazy {
        source: Arc<TestSource>,
        _dir: tempfile::TempDir,
        engine: Engine,
        ram: Arc<SharedMap>,
        fill: Arc<LazyFill>,
        fatal: Arc<Mutex<Option<String>>>,
    }

    fn lazy(pages: u64, source: TestSource, background: bool) -> Lazy {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
        let opts = PoolOptions {
            lazy_ram: Some("the test source".into()),
            ..PoolOptions::default()
        };
        let pool = Pool::create(dir.path().join("p.pool"), pages * 4096, opts).expect("pool");
        let len = pool.ram_size() as usize;
        let ram = Arc::new(SharedMap::new(pool.file(), pool.ram_offset(), len, true));
        let prot = Arc::new(UffdProtector::with_ranges_lazy(&[(ram.as_ptr(), len)]).expect("uffd"));
        let fatal = Arc::new(Mutex::new(None));
        let f2 = fatal.clone();
        let source = Arc::new(source);
        let fill = LazyFill::new(
            prot.clone(),
            source.clone(),
            FillOptions { background },
            Box::new(move |msg| *f2.lock().expect("lock") = Some(msg)),
        );
        let engine = Engine::start_with(
            Arc::new(Mutex::new(pool)),
            prot,
            Vec::new(),
            HandlerOptions::default(),
            Some(fill.clone()),
        )
        .expect("engine");
        Lazy {
            source,
            _dir: dir,
            engine,
            ram,
            fill,
            fatal,
        }
    }

    /// One byte of guest page `p` read through the guest's (registered) mapping.
    fn guest_byte(ram: &SharedMap, p: u64, off: usize) -> u8 {
        // SAFETY: inside the mapping; a volatile read, as a vCPU's access would be.
        unsafe { std::ptr::read_volatile(ram.as_ptr().add(p as usize * 4096 + off)) }
    }

    #[test]
    fn touched_pages_arrive_first_and_the_rest_in_the_background() {
        let l = lazy(512, TestSource::default(), true);
        // Touched before the filler runs: the toucher waits in the kernel until then.
        let toucher = {
            let ram = l.ram.clone();
            std::thread::spawn(move || guest_byte(&ram, 300, 17))
        };
        let queued = poll_until(Duration::from_secs(10), || {
            (!l.fill.queue().demand.is_empty()).then_some(())
        });
        assert!(queued.is_some(), "the fault handler passed the touch on");
        assert!(!l.fill.is_present(300), "nothing is filled before start");
        // The demand thread alone first: the read-ahead thread would race it to page 300.
        l.fill.start_demand().expect("start the demand thread");
        assert_eq!(toucher.join().expect("toucher"), byte(300));
        // Counted just after the copy that woke the toucher.
        let counted = poll_until(Duration::from_secs(10), || {
            (l.fill.stats().demanded >= 1).then_some(())
        });
        assert!(counted.is_some(), "page 300 came on demand");
        l.fill.start_ahead().expect("start the read-ahead thread");
        assert!(poll_until(Duration::from_secs(10), || l.fill.complete().then_some(())).is_some());
        for p in 0..512 {
            assert_eq!(guest_byte(&l.ram, p, 4095), byte(p), "page {p}");
        }
        let s = l.fill.stats();
        assert_eq!((s.pages, s.present), (512, 512));
        assert!(s.complete && s.error.is_none());
        assert_eq!(s.demanded + s.background_pages + s.already_present, 512);
        assert_eq!(s.faults, 1, "one missing-page fault: the touch of page 300");
        assert!(s.first_touch_p99_us >= s.first_touch_p50_us && s.first_touch_p50_us > 0);
    }

    #[test]
    fn a_snapshot_taken_mid_fill_keeps_every_page() {
        let l = lazy(256, TestSource::default(), false);
        l.fill.start().expect("start");
        assert_eq!(guest_byte(&l.ram, 3, 0), byte(3)); // present before the snapshot
        l.engine
            .snapshot(
                "mid",
                SnapshotKind::Pages,
                &[PageRun::new(0, 256)],
                Default::default(),
            )
            .expect("snapshot mid-fill");
        // Page 3 is present and protected; page 100 is a hole whose protection must
        // survive its fill: both are preserved before the write lands.
        l.ram.fill_page(3, 0xee);
        l.ram.fill_page(100, 0xee);
        assert!(
            !l.fill.complete(),
            "on demand only: most pages are still holes"
        );
        let pool = lock_pool(l.engine.pool());
        for p in [3u64, 100, 200, 255] {
            let (_, data) = pool.read_snapshot_page("mid", p).expect("read");
            assert!(data.iter().all(|&b| b == byte(p)), "snapshot page {p}");
        }
        assert!(
            l.fill.is_present(200),
            "the store's read brought page 200 in"
        );
        drop(pool);
        assert_eq!(guest_byte(&l.ram, 3, 9), 0xee);
        assert_eq!(guest_byte(&l.ram, 100, 9), 0xee);
        assert!(lock_pool(l.engine.pool()).verify(|_, _| ()).is_clean());
    }

    #[test]
    fn a_page_the_source_cannot_give_is_never_filled_with_anything_else() {
        let src = TestSource {
            fatal: Some(70),
            ..TestSource::default()
        };
        let l = lazy(128, src, false);
        l.fill.start().expect("start");
        assert_eq!(guest_byte(&l.ram, 10, 0), byte(10));
        let err = lock_pool(l.engine.pool())
            .read_ram_page(70)
            .expect_err("page 70 cannot be read");
        assert!(
            matches!(&err, PoolError::RamNotPresent { first: 70, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("pack 00ff is damaged"), "{err}");
        assert!(!l.fill.is_present(70));
        let fatal = l.fatal.lock().expect("lock").clone();
        let fatal = fatal.expect("reported");
        assert!(
            fatal.contains("the test source") && fatal.contains("pack 00ff"),
            "{fatal}"
        );
        assert!(l.fill.stats().error.is_some());
    }

    #[test]
    fn transient_errors_are_retried_and_reported_meanwhile() {
        let src = TestSource {
            transient: AtomicU64::new(3),
            ..TestSource::default()
        };
        let l = lazy(64, src, true);
        l.fill.start().expect("start");
        let waited = poll_until(Duration::from_secs(2), || l.fill.stats().waiting);
        assert!(waited.is_some_and(|w| w.contains("storage timed out")));
        assert!(poll_until(Duration::from_secs(10), || l.fill.complete().then_some(())).is_some());
        assert!(l.fill.stats().waiting.is_none(), "cleared once it answers");
        for p in 0..64 {
            assert_eq!(guest_byte(&l.ram, p, 1), byte(p), "page {p}");
        }
    }

    #[test]
    fn the_touch_order_is_read_first_in_that_order() {
        let order = vec![
            PageRun::new(400, 8),
            PageRun::new(100, 4),
            PageRun::new(7, 1),
            PageRun::new(510, 9),  // cut at the end of RAM
            PageRun::new(9000, 3), // beyond RAM: ignored
        ];
        let src = TestSource {
            first: order.clone(),
            ..TestSource::default()
        };
        let l = lazy(512, src, true);
        assert_eq!(l.fill.stats().hint_pages, 15);
        l.fill.start().expect("start");
        assert!(poll_until(Duration::from_secs(10), || l.fill.complete().then_some(())).is_some());
        let log = l.source.log.lock().expect("log").clone();
        assert_eq!(
            log[..4],
            [(400, 8), (100, 4), (7, 1), (510, 2)],
            "the order first, before any address-order batch: {log:?}"
        );
        assert_eq!(log[4], (0, 7), "then the rest from page 0: {log:?}");
        for p in 0..512 {
            assert_eq!(guest_byte(&l.ram, p, 4000), byte(p), "page {p}");
        }
        let s = l.fill.stats();
        assert_eq!((s.hint_pages, s.hinted_pages, s.demanded), (15, 15, 0));
        assert_eq!(s.background_pages, 512);

        // On demand only (clones), the order is not read ahead.
        let src = TestSource {
            first: order,
            ..TestSource::default()
        };
        let l = lazy(512, src, false);
        l.fill.start().expect("start");
        assert_eq!(guest_byte(&l.ram, 200, 0), byte(200));
        let s = l.fill.stats();
        assert_eq!((s.hint_pages, s.hinted_pages), (0, 0));
        assert!(!l.source.log.lock().expect("log").contains(&(400, 8)));
    }
}
