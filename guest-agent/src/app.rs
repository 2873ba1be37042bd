//! The application library: a process saves and restores its own memory regions (the
//! vmsplice-style call), with no copy made in the guest.
//!
//! ```no_run
//! use guest_agent::app::{self, PageBuffer};
//! let mut buf = PageBuffer::new(64 << 20)?;
//! buf.fill(7);
//! let report = app::save("my-state", &[&buf])?;
//! println!("saved {} pages", report.pages);
//! buf.fill(0);
//! app::restore("my-state", &mut [&mut buf])?;
//! assert!(buf.iter().all(|&b| b == 7));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Rules for callers:
//! - regions must be page aligned in address and length ([`PageBuffer`] is);
//! - a region must stay mapped, and other threads must leave it alone, for the whole
//!   call;
//! - the calls go to the guest agent (`pmsnap-agent serve`) on its Unix socket
//!   (/run/pmsnap-agent.sock, or `PMSNAP_AGENT_SOCK`), which any user may use: the agent
//!   learns the caller's uid from the kernel, reads the caller's page map itself, and
//!   asks the VMM on the caller's behalf. Snapshots belong to the caller's uid: other
//!   users (root excepted) cannot see, restore or delete them, and the caller cannot
//!   see the host's;
//! - `save` sends the regions' virtual ranges; the agent records pages never touched as
//!   absent (zero). It writes nothing. The content saved is the content at the moment
//!   the VMM protects the pages (before it replies); later writes by anyone are
//!   preserved copy-before-write by the VMM;
//! - `restore` first makes every target page resident and private (one
//!   `MADV_POPULATE_WRITE` per region), then sends the ranges; it writes no content
//!   itself: the VMM copies the snapshot into those pages before it replies;
//! - pinning ([`Pin`]): with the default [`Pin::Auto`] the regions are `mlock`ed for the
//!   call only where the kernel could move pages ([`pages_can_move`]: swap,
//!   compaction, THP, KSM, NUMA balancing), and unlocked before returning (so
//!   `mlockall` users should lock again). The pmsnap guest kernel has none of these, so
//!   there the library does not lock: under this host's emulation `mlock` plus
//!   `munlock` of 64 MiB cost about 28 s of guest kernel time, a pagemap read about 2 s.
//!   [`Pin::Mlock`] forces locking, which needs `CAP_IPC_LOCK` or a large enough
//!   `RLIMIT_MEMLOCK`.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{compiler_fence, Ordering};
use std::time::{Duration, Instant};

use crate::client::{call_app, ClientError, SocketTransport, Transport};
use crate::pagemap::PagemapError;
use crate::protocol::{
    validate_name, AppRequest, ProtocolError, Reply, VirtRange, MAX_RANGES, PAGE_SIZE,
};

/// Errors of the application calls.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A region is empty or not page aligned.
    #[error("region {addr:#x}+{len:#x} is empty or not page aligned")]
    Unaligned {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// `mlock` failed.
    #[error(
        "mlock of {len} bytes at {addr:#x} failed: {source} (raise RLIMIT_MEMLOCK or run as root)"
    )]
    Lock {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Cause.
        source: std::io::Error,
    },
    /// A page is not resident although it is locked.
    #[error("page at {0:#x} is not resident after mlock")]
    NotResident(u64),
    /// Too many regions for one request.
    #[error("{0} regions exceed the protocol limit of {MAX_RANGES}")]
    TooManyRegions(usize),
    /// Translation failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// Invalid name and similar.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The VMM failed or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Allocating a buffer failed.
    #[error("mmap of {0} bytes failed: {1}")]
    Alloc(usize, std::io::Error),
}

/// How the library keeps the regions' guest-physical pages in place between reading
/// the page map and the VMM's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pin {
    /// `mlock` the regions when this kernel can move pages ([`pages_can_move`]),
    /// otherwise nothing: the caller is inside the call, so only its other threads
    /// could change the mapping, which the rules forbid.
    #[default]
    Auto,
    /// Always `mlock` (and `munlock` before returning).
    Mlock,
    /// Never lock.
    None,
}

/// Options of [`save_with_options`] and [`restore_with_options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// Pinning policy.
    pub pin: Pin,
}

/// Whether this kernel may move or drop a resident anonymous page behind a process's
/// back: swap in use, memory compaction, transparent huge pages, KSM or NUMA balancing.
/// The pmsnap guest kernel has none of them, so a page's frame stays put there and
/// `mlock` (whose per-page kernel work costs seconds per 64 MiB under this host's
/// emulation: measured 30 s for a save of 64 MiB with mlock and munlock) is not needed.
pub fn pages_can_move() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let swap_in_use = read("/proc/swaps").is_some_and(|s| s.lines().count() > 1);
    let compaction = std::path::Path::new("/proc/sys/vm/compact_memory").exists();
    let thp =
        read("/sys/kernel/mm/transparent_hugepage/enabled").is_some_and(|s| !s.contains("[never]"));
    let ksm = read("/sys/kernel/mm/ksm/run").is_some_and(|s| s.trim() != "0");
    let numa = read("/proc/sys/kernel/numa_balancing").is_some_and(|s| s.trim() != "0");
    swap_in_use || compaction || thp || ksm || numa
}

/// Result of a save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// Pages saved.
    pub pages: u64,
    /// Pages the VMM counted as present (the others were never touched: zero).
    pub present_pages: u64,
    /// Whether the regions were locked during the call.
    pub locked: bool,
    /// Duration of the whole call.
    pub elapsed: Duration,
}

/// Result of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Pages restored.
    pub pages: u64,
    /// Whether the regions were locked during the call.
    pub locked: bool,
    /// Duration of the whole call.
    pub elapsed: Duration,
}

/// Checked page-aligned regions, locked for the duration of a call when asked;
/// unlocked on drop (also on error paths).
struct Regions {
    ranges: Vec<VirtRange>,
    locked: bool,
}

impl Regions {
    fn new(regions: impl Iterator<Item = (u64, u64)>, pin: Pin) -> Result<Self, AppError> {
        let mut ranges = Vec::new();
        for (addr, len) in regions {
            if len == 0 || addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(AppError::Unaligned { addr, len });
            }
            ranges.push(VirtRange {
                start: addr,
                end: addr + len,
            });
        }
        if ranges.len() > MAX_RANGES {
            return Err(AppError::TooManyRegions(ranges.len()));
        }
        let lock = match pin {
            Pin::Auto => pages_can_move(),
            Pin::Mlock => true,
            Pin::None => false,
        };
        let mut out = Regions {
            ranges: Vec::new(),
            locked: lock,
        };
        for r in ranges {
            let (addr, len) = (r.start, r.end - r.start);
            // SAFETY: mlock only changes residency of our own mapped region (the caller
            // holds a reference to it); it does not touch the content.
            if lock && unsafe { libc::mlock(addr as *const libc::c_void, len as usize) } != 0 {
                return Err(AppError::Lock {
                    addr,
                    len,
                    source: std::io::Error::last_os_error(),
                });
            }
            // Pushed only once locked, so drop unlocks exactly what was locked.
            out.ranges.push(r);
        }
        Ok(out)
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        if !self.locked {
            return;
        }
        for r in &self.ranges {
            // SAFETY: unlocking a region we locked; it is still mapped (borrowed).
            unsafe { libc::munlock(r.start as *const libc::c_void, (r.end - r.start) as usize) };
        }
    }
}

/// The agent's socket (`PMSNAP_AGENT_SOCK`, default /run/pmsnap-agent.sock).
fn agent() -> SocketTransport {
    SocketTransport::agent()
}

/// Save `regions` of the calling process under `name` (in the caller's uid's name
/// space) through the guest agent.
pub fn save(name: &str, regions: &[&[u8]]) -> Result<SaveReport, AppError> {
    save_with(&mut agent(), name, regions)
}

/// [`save`] over a given transport to the agent.
pub fn save_with(
    t: &mut dyn Transport,
    name: &str,
    regions: &[&[u8]],
) -> Result<SaveReport, AppError> {
    save_with_options(t, name, regions, Options::default())
}

/// [`save`] over a given transport with options. The agent reads this process's page
/// map; pages never touched are saved as absent (they read as zero and restore as
/// zero); nothing is written.
pub fn save_with_options(
    t: &mut dyn Transport,
    name: &str,
    regions: &[&[u8]],
    opts: Options,
) -> Result<SaveReport, AppError> {
    let start = Instant::now();
    validate_name(name)?;
    let held = Regions::new(
        regions.iter().map(|r| (r.as_ptr() as u64, r.len() as u64)),
        opts.pin,
    )?;
    let reply = call_app(
        t,
        &AppRequest::Save {
            name: name.to_string(),
            pid: std::process::id(),
            ranges: held.ranges.clone(),
        },
    )?;
    let locked = held.locked;
    drop(held);
    match reply {
        Reply::Saved {
            pages,
            present_pages,
            ..
        } => Ok(SaveReport {
            pages,
            present_pages,
            locked,
            elapsed: start.elapsed(),
        }),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &Reply) -> AppError {
    let mut s = format!("{r:?}");
    s.truncate(200);
    AppError::Client(ClientError::Unexpected(s))
}

/// Restore snapshot `name` (of the caller's uid) into `regions` of the calling process
/// (total size must equal the snapshot's; pages are filled in order across the
/// regions).
pub fn restore(name: &str, regions: &mut [&mut [u8]]) -> Result<RestoreReport, AppError> {
    restore_with(&mut agent(), name, regions)
}

/// [`restore`] over a given transport to the agent.
pub fn restore_with(
    t: &mut dyn Transport,
    name: &str,
    regions: &mut [&mut [u8]],
) -> Result<RestoreReport, AppError> {
    restore_with_options(t, name, regions, Options::default())
}

/// Make every page of `regions` resident and private without changing its content:
/// one `MADV_POPULATE_WRITE` per region (write faults taken inside the kernel: in the
/// guest much cheaper than one user page fault per page, and a page-table walk for
/// pages already private); where that is unavailable (Linux before 5.14) or fails, one
/// byte per page is read and written back in user mode. The agent then finds nothing
/// left to touch.
fn populate(regions: &mut [&mut [u8]]) {
    for region in regions.iter_mut() {
        // SAFETY: populating pages of the caller's `&mut` region; the content does
        // not change (it is what a write of the same bytes would leave).
        let r = unsafe {
            libc::madvise(
                region.as_mut_ptr().cast(),
                region.len(),
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            for off in (0..region.len()).step_by(PAGE_SIZE as usize) {
                // Volatile, so the compiler cannot drop a store of the value just
                // loaded.
                let p: *mut u8 = &mut region[off];
                // SAFETY: p points into the caller's `&mut` region, valid for reads
                // and writes; the value written is the value read.
                unsafe { p.write_volatile(p.read_volatile()) };
            }
        }
    }
}

/// [`restore`] over a given transport with options.
pub fn restore_with_options(
    t: &mut dyn Transport,
    name: &str,
    regions: &mut [&mut [u8]],
    opts: Options,
) -> Result<RestoreReport, AppError> {
    let start = Instant::now();
    validate_name(name)?;
    // Pointers from `&mut` borrows: the VMM writes these pages while we hold them.
    let held = Regions::new(
        regions
            .iter_mut()
            .map(|r| (r.as_mut_ptr() as u64, r.len() as u64)),
        opts.pin,
    )?;
    populate(regions);
    let pages: u64 = held
        .ranges
        .iter()
        .map(|r| (r.end - r.start) / PAGE_SIZE)
        .sum();
    let reply = call_app(
        t,
        &AppRequest::Restore {
            name: name.to_string(),
            owner: None,
            pid: std::process::id(),
            ranges: held.ranges.clone(),
        },
    )?;
    // The content changed behind the compiler's back (the VMM wrote guest RAM while the
    // socket call ran); the regions' addresses escaped into that call, and this fence
    // keeps later reads from being moved before it.
    compiler_fence(Ordering::SeqCst);
    let locked = held.locked;
    drop(held);
    match reply {
        Reply::Restored { pages: vmm, .. } if vmm == pages => Ok(RestoreReport {
            pages,
            locked,
            elapsed: start.elapsed(),
        }),
        other => Err(unexpected(&other)),
    }
}

/// A page-aligned anonymous buffer (an `mmap`), convenient as a save/restore region.
#[derive(Debug)]
pub struct PageBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: PageBuffer owns its mapping exclusively, like a Vec<u8>.
unsafe impl Send for PageBuffer {}
// SAFETY: shared access is only through &[u8].
unsafe impl Sync for PageBuffer {}

impl PageBuffer {
    /// Map `len` bytes (rounded up to whole pages), zero, not yet resident. Huge pages
    /// are disabled for it so the page map stays at 4 KiB granularity.
    pub fn new(len: usize) -> Result<Self, AppError> {
        let len = len.div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(AppError::Alloc(len, std::io::Error::last_os_error()));
        }
        // SAFETY: advice on the mapping just made; failure (no THP) is harmless.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Like [`PageBuffer::new`], but every page is made resident and private up front
    /// with one `MADV_POPULATE_WRITE` call (Linux 5.14+; falls back to touching each
    /// page). In the guest this is much cheaper than one page fault per first write,
    /// because every fault is an emulated kernel entry and exit on the development hosts.
    pub fn populated(len: usize) -> Result<Self, AppError> {
        let mut b = Self::new(len)?;
        // SAFETY: populating our own fresh mapping; the content stays zero.
        let r = unsafe { libc::madvise(b.ptr.cast(), b.len, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            for i in (0..b.len).step_by(PAGE_SIZE as usize) {
                b[i] = 0;
            }
        }
        Ok(b)
    }
}

impl Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our live mapping, readable.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is our live mapping, writable, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no borrows outlive self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::LocalAgent;
    use crate::pagemap::Pagemap;
    use crate::protocol::{total_pages, ErrorCode, ErrorReply, GuestRequest, Request, Run};

    /// Records what reaches the VMM and answers like a VMM that accepts everything.
    struct Recorder(Vec<Request>);

    impl Transport for Recorder {
        fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
            let req = GuestRequest::decode(frame)?;
            req.validate(u64::MAX / 2)?;
            // SAFETY: geteuid has no preconditions.
            assert_eq!(req.uid, unsafe { libc::geteuid() }, "the caller's own uid");
            let req = req.op;
            let reply = match &req {
                Request::Save(s) => Reply::Saved {
                    name: s.name.clone(),
                    pages: total_pages(&s.runs),
                    present_pages: s.runs.iter().filter(|r| r.present).map(|r| r.count).sum(),
                },
                Request::Restore(r) if r.name == "missing" => {
                    Reply::Error(ErrorReply::new(ErrorCode::NotFound, "no snapshot missing"))
                }
                Request::Restore(r) => Reply::Restored {
                    name: r.name.clone(),
                    pages: total_pages(&r.runs),
                },
                _ => Reply::List(vec![]),
            };
            self.0.push(req);
            Ok(reply.encode()?)
        }
    }

    #[test]
    fn save_translates_own_regions() {
        pmsnap_testenv::require!(
            "save_translates_own_regions",
            pmsnap_testenv::root_unavailable("frame numbers and mlock")
        );
        let a = PageBuffer::new(16 * 4096).expect("alloc");
        let b = PageBuffer::new(3 * 4096).expect("alloc");
        let mut t = LocalAgent::new(Recorder(Vec::new()));
        let rep = save_with_options(&mut t, "app-1", &[&a, &b], Options { pin: Pin::Mlock })
            .expect("save");
        assert_eq!(rep.pages, 19);
        assert!(rep.locked);
        let Request::Save(s) = &t.vmm.0[0] else {
            panic!("not a save")
        };
        assert_eq!(s.pid, std::process::id());
        assert!(!s.comm.is_empty());
        // Runs cover a then b, in order, all present (mlock made them resident).
        let mut expect: Vec<(u64, u64)> = Vec::new();
        for r in &s.runs {
            assert!(r.present);
            assert_ne!(r.guest_phys_first_page, 0);
            expect.push((r.virt_addr, r.count));
        }
        let covered: u64 = s.runs.iter().map(|r| r.count).sum();
        assert_eq!(covered, 19);
        assert_eq!(s.runs[0].virt_addr, a.as_ptr() as u64);
        let last: &Run = s.runs.last().expect("runs");
        assert_eq!(
            last.virt_addr + last.count * PAGE_SIZE,
            b.as_ptr() as u64 + b.len() as u64
        );
    }

    #[test]
    fn unlocked_save_records_untouched_pages_as_absent() {
        pmsnap_testenv::require!(
            "unlocked_save_records_untouched_pages_as_absent",
            pmsnap_testenv::root_unavailable("frame numbers")
        );
        let mut a = PageBuffer::new(8 * 4096).expect("alloc");
        for i in 0..4 {
            a[i * 4096] = 1;
        }
        let mut t = LocalAgent::new(Recorder(Vec::new()));
        let rep =
            save_with_options(&mut t, "app-2", &[&a], Options { pin: Pin::None }).expect("save");
        assert!(!rep.locked);
        assert_eq!((rep.pages, rep.present_pages), (8, 4));
        let Request::Save(s) = &t.vmm.0[0] else {
            panic!("not a save")
        };
        let last = s.runs.last().expect("runs");
        assert!(!last.present);
        assert_eq!(last.count, 4);
        assert_eq!(last.virt_addr, a.as_ptr() as u64 + 4 * 4096);
        // Nothing was written or faulted in by the save.
        assert!(a[4 * 4096..].iter().all(|&x| x == 0));
    }

    #[test]
    fn restore_makes_targets_resident_without_changing_them() {
        pmsnap_testenv::require!(
            "restore_makes_targets_resident_without_changing_them",
            pmsnap_testenv::root_unavailable("frame numbers")
        );
        let mut a = PageBuffer::new(8 * 4096).expect("alloc");
        for i in 0..3 {
            a[i * 4096 + 5] = 9;
        }
        let mut t = LocalAgent::new(Recorder(Vec::new()));
        let opts = Options { pin: Pin::None };
        let rep = restore_with_options(&mut t, "r2", &mut [&mut a], opts).expect("restore");
        assert_eq!(rep.pages, 8);
        let Request::Restore(r) = &t.vmm.0[0] else {
            panic!("not a restore")
        };
        assert!(r
            .runs
            .iter()
            .all(|r| r.present && r.guest_phys_first_page != 0));
        // Content unchanged by the touching.
        assert!(a
            .iter()
            .enumerate()
            .all(|(i, &x)| x == u8::from(i % 4096 == 5 && i < 3 * 4096) * 9));
        let rep = restore_with_options(&mut t, "r2", &mut [&mut a], opts).expect("restore");
        assert_eq!(
            rep.pages, 8,
            "again, with every page private and resident now"
        );
    }

    #[test]
    fn restore_reports_and_refusals() {
        pmsnap_testenv::require!(
            "restore_reports_and_refusals",
            pmsnap_testenv::root_unavailable("frame numbers and mlock")
        );
        let mut a = PageBuffer::new(8 * 4096).expect("alloc");
        let mut t = LocalAgent::new(Recorder(Vec::new()));
        let rep = restore_with(&mut t, "r1", &mut [&mut a]).expect("restore");
        assert_eq!(rep.pages, 8);
        match restore_with(&mut t, "missing", &mut [&mut a]) {
            Err(AppError::Client(ClientError::Refused(e))) => {
                assert_eq!(e.code, ErrorCode::NotFound)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn populated_buffers_are_resident() {
        pmsnap_testenv::require!(
            "populated_buffers_are_resident",
            pmsnap_testenv::root_unavailable("frame numbers")
        );
        let b = PageBuffer::populated(32 * 4096).expect("alloc");
        assert!(b.iter().all(|&x| x == 0));
        let range = VirtRange {
            start: b.as_ptr() as u64,
            end: b.as_ptr() as u64 + b.len() as u64,
        };
        let built = Pagemap::open(std::process::id())
            .expect("pagemap")
            .runs(&[range])
            .expect("runs");
        assert_eq!(built.present_pages(), 32);
        let fresh = PageBuffer::new(32 * 4096).expect("alloc");
        let range = VirtRange {
            start: fresh.as_ptr() as u64,
            end: fresh.as_ptr() as u64 + fresh.len() as u64,
        };
        let built = Pagemap::open(std::process::id())
            .expect("pagemap")
            .runs(&[range])
            .expect("runs");
        assert_eq!(built.present_pages(), 0);
    }

    #[test]
    fn bad_arguments() {
        let a = PageBuffer::new(2 * 4096).expect("alloc");
        let mut t = LocalAgent::new(Recorder(Vec::new()));
        assert!(matches!(
            save_with(&mut t, "x", &[&a[1..4097]]),
            Err(AppError::Unaligned { .. })
        ));
        assert!(matches!(
            save_with(&mut t, "x", &[&a[..100]]),
            Err(AppError::Unaligned { .. })
        ));
        assert!(matches!(
            save_with(&mut t, "bad/name", &[&a]),
            Err(AppError::Protocol(ProtocolError::InvalidName(_)))
        ));
        assert!(t.vmm.0.is_empty(), "nothing sent");
    }
}
