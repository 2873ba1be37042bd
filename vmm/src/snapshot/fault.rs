//! The copy-before-write fault handler thread.
//!
//! A write to a write-protected guest page (by a vCPU through KVM, or by the VMM's own
//! device emulation) blocks the writer in the kernel and queues a userfaultfd event. This
//! thread reads the event, asks the [`PreserveSink`] to make the page's old content
//! durable, then removes the protection, which wakes the writer. The thread never writes
//! guest memory through the protected mapping, so it cannot fault itself.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use log::{error, warn};
use pmem_backend::PoolError;
use userfaultfd::{Event, EventBuffer, FaultKind};
use vmm_sys_util::eventfd::EventFd;

#[cfg(test)]
use super::protect::ProtectError;
use super::protect::{PageProtector, UffdProtector};

/// What the handler calls before letting a write to a protected page proceed.
pub trait PreserveSink: Send + Sync {
    /// Make the current content of guest page `page` durable for every snapshot that
    /// still references it in RAM. It may block (the store's sink waits for a free
    /// block while only host snapshots hold them). On error the sink must already have
    /// made the failure visible (for example dropped the snapshots that lose the page).
    fn before_write(&self, page: u64) -> Result<(), PoolError>;

    /// [`Self::before_write`], then `unprotect` (which makes the page writable and wakes
    /// the writer). A sink whose store can protect the page again concurrently (a new
    /// snapshot) must run both inside one critical section of that store: otherwise a
    /// snapshot taken between the preserve and the unprotect has its protection removed
    /// by this unprotect, and the next write changes its page without a preserve.
    fn before_write_then(&self, page: u64, unprotect: &mut dyn FnMut()) -> Result<(), PoolError> {
        let res = self.before_write(page);
        unprotect();
        res
    }
}

/// Where the handler sends accesses to guest pages that are not present yet (a lazy
/// restore registers guest RAM for missing-page faults too). `demand` must not block:
/// the faulting thread stays blocked in the kernel until the page is filled, which
/// wakes it.
pub trait MissingSink: Send + Sync {
    /// Page `page` was touched and is not present.
    fn demand(&self, page: u64);
}

/// How the handler thread waits for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Sleep in poll(2) until a fault or a stop request arrives (no CPU while idle).
    #[default]
    Blocking,
    /// Busy-poll the userfaultfd (one CPU at 100%, lowest latency).
    Spinning,
}

/// Placement options of the handler thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct HandlerOptions {
    /// How to wait for faults.
    pub mode: WaitMode,
    /// Pin the thread to this host CPU.
    pub cpu: Option<usize>,
}

/// Counters kept by the handler, readable from any thread.
#[derive(Debug, Default)]
pub struct FaultStats {
    faults: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// A copy of the handler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultStatsSnapshot {
    /// Write-protect faults handled.
    pub faults: u64,
    /// Faults whose preserve step failed.
    pub errors: u64,
    /// Time spent from reading a fault to removing its protection, summed.
    pub total_ns: u64,
    /// The longest single fault.
    pub max_ns: u64,
}

impl FaultStats {
    fn record(&self, ns: u64, ok: bool) {
        self.faults.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Read the counters.
    pub fn snapshot(&self) -> FaultStatsSnapshot {
        FaultStatsSnapshot {
            faults: self.faults.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }
}

/// A running fault handler thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    stop_evt: Arc<EventFd>,
    stats: Arc<FaultStats>,
    thread: Option<JoinHandle<()>>,
}

impl FaultHandler {
    /// Start the handler thread for `protector`'s userfaultfd.
    pub fn spawn(
        protector: Arc<UffdProtector>,
        sink: Arc<dyn PreserveSink>,
        opts: HandlerOptions,
    ) -> std::io::Result<Self> {
        Self::spawn_with_missing(protector, sink, None, opts)
    }

    /// [`Self::spawn`], passing missing-page faults to `missing` (a lazy restore).
    pub fn spawn_with_missing(
        protector: Arc<UffdProtector>,
        sink: Arc<dyn PreserveSink>,
        missing: Option<Arc<dyn MissingSink>>,
        opts: HandlerOptions,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let stats = Arc::new(FaultStats::default());
        let thread = {
            let (stop, stop_evt, stats) = (stop.clone(), stop_evt.clone(), stats.clone());
            std::thread::Builder::new()
                .name("pmsnap-fault".into())
                .spawn(move || {
                    if let Some(cpu) = opts.cpu {
                        pin_to_cpu(cpu);
                    }
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Fault);
                    run(
                        &protector,
                        sink.as_ref(),
                        missing.as_deref(),
                        opts.mode,
                        &stop,
                        &stop_evt,
                        &stats,
                    )
                })?
        };
        Ok(Self {
            stop,
            stop_evt,
            stats,
            thread: Some(thread),
        })
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<FaultStats> {
        self.stats.clone()
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.stop_evt.write(1) {
            warn!("cannot wake the fault handler to stop it: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the fault handler thread panicked");
            }
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`; an index past the set's size is ignored by libc.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        warn!(
            "cannot pin the fault handler to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn wait_readable(uffd_fd: i32, stop_fd: i32) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: uffd_fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    rc > 0 && fds[0].revents & libc::POLLIN != 0
}

fn run(
    protector: &UffdProtector,
    sink: &dyn PreserveSink,
    missing: Option<&dyn MissingSink>,
    mode: WaitMode,
    stop: &AtomicBool,
    stop_evt: &EventFd,
    stats: &FaultStats,
) {
    let uffd = protector.uffd();
    let mut buf = EventBuffer::new(64);
    while !stop.load(Ordering::Acquire) {
        if mode == WaitMode::Blocking && !wait_readable(uffd.as_raw_fd(), stop_evt.as_raw_fd()) {
            continue;
        }
        let events = match uffd.read_events(&mut buf) {
            Ok(events) => events,
            Err(e) => {
                error!("fault handler: reading userfaultfd failed, stopping: {e}");
                return;
            }
        };
        for event in events {
            match event {
                Ok(Event::Pagefault {
                    kind: FaultKind::WriteProtected,
                    addr,
                    ..
                }) => handle_wp_fault(protector, sink, addr as usize, stats),
                Ok(Event::Pagefault {
                    kind: FaultKind::Missing,
                    addr,
                    ..
                }) => match (missing, protector.page_of(addr as usize)) {
                    (Some(m), Some(page)) => m.demand(page),
                    _ => error!("fault handler: missing-page fault at {addr:p} with no lazy fill"),
                },
                Ok(other) => warn!("fault handler: unexpected userfaultfd event {other:?}"),
                Err(e) => error!("fault handler: bad userfaultfd event: {e}"),
            }
        }
    }
}

fn handle_wp_fault(
    protector: &UffdProtector,
    sink: &dyn PreserveSink,
    addr: usize,
    stats: &FaultStats,
) {
    let start = Instant::now();
    let Some(page) = protector.page_of(addr) else {
        error!("fault handler: write fault at {addr:#x} outside guest RAM");
        return;
    };
    let mut unprotect = || {
        if let Err(e) = protector.unprotect(page, 1) {
            error!("fault handler: unprotecting guest page {page} failed: {e}");
        }
    };
    let ok = match sink.before_write_then(page, &mut unprotect) {
        Ok(()) => true,
        Err(e) => {
            error!("fault handler: preserving guest page {page} failed: {e}");
            false
        }
    };
    stats.record(start.elapsed().as_nanos() as u64, ok);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmsnap_testenv::SharedMap;
    use std::sync::Mutex;

    /// A memfd-backed shared mapping, like guest RAM on tmpfs, plus a second mapping of
    /// the same file that is never registered (the store's view).
    pub(crate) struct TestRam {
        pub ram: SharedMap,
        pub shadow: SharedMap,
    }

    impl TestRam {
        pub fn new(pages: usize) -> Self {
            let len = pages * 4096;
            let fd = SharedMap::new_memfd(len);
            let (ram, shadow) = (
                SharedMap::from_fd(fd, 0, len, true),
                SharedMap::from_fd(fd, 0, len, true),
            );
            // SAFETY: the mappings hold their own reference to the file.
            unsafe { libc::close(fd) };
            Self { ram, shadow }
        }

        /// One byte of the store's view.
        fn shadow_byte(&self, off: usize) -> u8 {
            let mut b = [0u8];
            self.shadow.copy_out(off, &mut b);
            b[0]
        }
    }

    struct Recorder {
        ram: Arc<TestRam>,
        seen: Mutex<Vec<(u64, u8)>>,
    }
    impl PreserveSink for Recorder {
        fn before_write(&self, page: u64) -> Result<(), PoolError> {
            // Read the old content through the unregistered mapping, as the store does.
            let old = self.ram.shadow_byte(page as usize * 4096);
            self.seen.lock().expect("lock").push((page, old));
            Ok(())
        }
    }

    fn check_mode(mode: WaitMode) {
        let ram = Arc::new(TestRam::new(16));
        for p in 0..8 {
            ram.ram.fill_page(p, 0xaa);
        }
        let prot =
            Arc::new(UffdProtector::new(ram.ram.as_ptr(), ram.ram.len()).expect("uffd register"));
        assert_eq!(prot.pages(), 16);
        prot.protect(0, 16).expect("protect");
        let sink = Arc::new(Recorder {
            ram: ram.clone(),
            seen: Mutex::new(Vec::new()),
        });
        let handler = FaultHandler::spawn(
            prot.clone(),
            sink.clone(),
            HandlerOptions { mode, cpu: None },
        )
        .expect("spawn");
        let writer = {
            let ram = ram.clone();
            std::thread::spawn(move || {
                // Page 3 was populated, page 12 never touched (WP_UNPOPULATED covers it).
                for page in [3usize, 12, 3] {
                    // A single byte store: the write the fault handler must see first.
                    // SAFETY: inside the 16-page mapping.
                    unsafe { *ram.ram.as_ptr().add(page * 4096 + 5) = page as u8 };
                }
            })
        };
        writer.join().expect("writer");
        assert_eq!(
            *sink.seen.lock().expect("lock"),
            vec![(3, 0xaa), (12, 0)],
            "each protected page faults once, before the write lands"
        );
        assert_eq!(ram.shadow_byte(3 * 4096 + 5), 3);
        // The handler counts a fault after waking its writer: give it a moment.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while handler.stats().snapshot().faults < 2 && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let stats = handler.stats().snapshot();
        assert_eq!((stats.faults, stats.errors), (2, 0));
        assert!(stats.max_ns > 0 && stats.total_ns >= stats.max_ns);
        drop(handler);
    }

    #[test]
    fn blocking_handler_preserves_before_write() {
        check_mode(WaitMode::Blocking);
    }

    #[test]
    fn spinning_handler_preserves_before_write() {
        check_mode(WaitMode::Spinning);
    }

    #[test]
    fn out_of_range_pages_are_refused() {
        let ram = SharedMap::memfd(4 * 4096);
        let prot = UffdProtector::new(ram.as_ptr(), ram.len()).expect("uffd register");
        assert!(matches!(
            prot.protect(3, 2),
            Err(ProtectError::OutOfRange {
                first: 3,
                end: 5,
                pages: 4
            })
        ));
        assert!(prot.unprotect(u64::MAX, 2).is_err());
        assert_eq!(prot.page_of(ram.as_ptr() as usize + 4096 * 4), None);
        assert_eq!(prot.page_of(ram.as_ptr() as usize + 4096 * 3 + 7), Some(3));
    }
}
