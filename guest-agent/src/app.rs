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
//! - a region must stay mapped for the whole call. The library `mlock`s each region
//!   during the call, which makes every page resident and private (a write fault on
//!   writable private memory, never the shared zero page) and pins it, so the
//!   guest-physical pages it reports cannot move before the VMM has acted; the regions
//!   are unlocked again before the call returns (so `mlockall` users should re-lock);
//! - `restore` writes nothing itself: the VMM copies the snapshot into the pinned pages
//!   before it replies. Other threads must not use the regions during the call;
//! - `save` records the content at the moment the VMM protects the pages (before it
//!   replies); later writes by anyone are preserved copy-before-write by the VMM.
//!
//! `mlock` needs `CAP_IPC_LOCK` or a large enough `RLIMIT_MEMLOCK` (root in the guest).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{compiler_fence, Ordering};
use std::time::{Duration, Instant};

use crate::client::{call, ClientError, SocketTransport, Transport};
use crate::ops::comm_of;
use crate::pagemap::{Pagemap, PagemapError};
use crate::protocol::{
    total_pages, validate_name, ProtocolError, Reply, Request, RestoreRequest, SaveRequest,
    VirtRange, MAX_RUNS, PAGE_SIZE,
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
    /// Too many runs for one request.
    #[error("{0} page runs exceed the protocol limit of {MAX_RUNS}")]
    TooManyRuns(usize),
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

/// Result of a save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// Pages saved.
    pub pages: u64,
    /// Pages the VMM counted as present.
    pub present_pages: u64,
    /// Runs sent.
    pub runs: usize,
    /// Duration of the whole call.
    pub elapsed: Duration,
}

/// Result of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Pages restored.
    pub pages: u64,
    /// Runs sent.
    pub runs: usize,
    /// Duration of the whole call.
    pub elapsed: Duration,
}

/// Locks regions for the duration of a call; unlocks on drop (also on error paths).
struct Locked(Vec<VirtRange>);

impl Locked {
    fn lock(regions: impl Iterator<Item = (u64, u64)>) -> Result<Self, AppError> {
        let mut locked = Locked(Vec::new());
        for (addr, len) in regions {
            if len == 0 || addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(AppError::Unaligned { addr, len });
            }
            // SAFETY: mlock only changes residency of our own mapped region (the caller
            // holds a reference to it); it does not touch the content.
            if unsafe { libc::mlock(addr as *const libc::c_void, len as usize) } != 0 {
                return Err(AppError::Lock {
                    addr,
                    len,
                    source: std::io::Error::last_os_error(),
                });
            }
            locked.0.push(VirtRange {
                start: addr,
                end: addr + len,
            });
        }
        Ok(locked)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        for r in &self.0 {
            // SAFETY: unlocking a region we locked; it is still mapped (borrowed).
            unsafe { libc::munlock(r.start as *const libc::c_void, (r.end - r.start) as usize) };
        }
    }
}

/// Translate the locked regions of this process into runs (all must be present).
fn own_runs(locked: &Locked) -> Result<Vec<crate::protocol::Run>, AppError> {
    let runs = Pagemap::open(std::process::id())?.runs(&locked.0)?.finish();
    if let Some(r) = runs.iter().find(|r| !r.present) {
        return Err(AppError::NotResident(r.virt_addr));
    }
    if runs.len() > MAX_RUNS {
        return Err(AppError::TooManyRuns(runs.len()));
    }
    Ok(runs)
}

/// Save `regions` of the calling process under `name` through the VMM's snapshot
/// service (vsock, or `PMSNAP_TRANSPORT` in tests).
pub fn save(name: &str, regions: &[&[u8]]) -> Result<SaveReport, AppError> {
    save_with(&mut SocketTransport::from_env()?, name, regions)
}

/// [`save`] over a given transport.
pub fn save_with(
    t: &mut dyn Transport,
    name: &str,
    regions: &[&[u8]],
) -> Result<SaveReport, AppError> {
    let start = Instant::now();
    validate_name(name)?;
    let locked = Locked::lock(regions.iter().map(|r| (r.as_ptr() as u64, r.len() as u64)))?;
    let runs = own_runs(&locked)?;
    let pid = std::process::id();
    let nruns = runs.len();
    let reply = call(
        t,
        &Request::Save(SaveRequest {
            name: name.to_string(),
            pid,
            comm: comm_of(pid).unwrap_or_default(),
            runs,
        }),
    )?;
    drop(locked);
    match reply {
        Reply::Saved {
            pages,
            present_pages,
            ..
        } => Ok(SaveReport {
            pages,
            present_pages,
            runs: nruns,
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

/// Restore snapshot `name` into `regions` of the calling process (total size must equal
/// the snapshot's; pages are filled in order across the regions).
pub fn restore(name: &str, regions: &mut [&mut [u8]]) -> Result<RestoreReport, AppError> {
    restore_with(&mut SocketTransport::from_env()?, name, regions)
}

/// [`restore`] over a given transport.
pub fn restore_with(
    t: &mut dyn Transport,
    name: &str,
    regions: &mut [&mut [u8]],
) -> Result<RestoreReport, AppError> {
    let start = Instant::now();
    validate_name(name)?;
    // Pointers from `&mut` borrows: the VMM writes these pages while we hold them.
    let locked = Locked::lock(
        regions
            .iter_mut()
            .map(|r| (r.as_mut_ptr() as u64, r.len() as u64)),
    )?;
    let runs = own_runs(&locked)?;
    let (pages, nruns) = (total_pages(&runs), runs.len());
    let reply = call(
        t,
        &Request::Restore(RestoreRequest {
            name: name.to_string(),
            runs,
        }),
    )?;
    // The content changed behind the compiler's back (the VMM wrote guest RAM while the
    // socket call ran); the regions' addresses escaped into that call, and this fence
    // keeps later reads from being moved before it.
    compiler_fence(Ordering::SeqCst);
    drop(locked);
    match reply {
        Reply::Restored { pages: vmm, .. } if vmm == pages => Ok(RestoreReport {
            pages,
            runs: nruns,
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
    use crate::protocol::{ErrorCode, ErrorReply, Run};

    /// Records the request and answers like a VMM that accepts everything.
    struct Recorder(Vec<Request>);

    impl Transport for Recorder {
        fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
            let req = Request::decode(frame)?;
            req.validate(u64::MAX / 2)?;
            let reply = match &req {
                Request::Save(s) => Reply::Saved {
                    name: s.name.clone(),
                    pages: total_pages(&s.runs),
                    present_pages: total_pages(&s.runs),
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

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn save_translates_own_regions() {
        if !is_root() {
            eprintln!("skipping: frame numbers and mlock need root");
            return;
        }
        let a = PageBuffer::new(16 * 4096).expect("alloc");
        let b = PageBuffer::new(3 * 4096).expect("alloc");
        let mut t = Recorder(Vec::new());
        let rep = save_with(&mut t, "app-1", &[&a, &b]).expect("save");
        assert_eq!(rep.pages, 19);
        let Request::Save(s) = &t.0[0] else {
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
    fn restore_reports_and_refusals() {
        if !is_root() {
            eprintln!("skipping: frame numbers and mlock need root");
            return;
        }
        let mut a = PageBuffer::new(8 * 4096).expect("alloc");
        let mut t = Recorder(Vec::new());
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
        if !is_root() {
            eprintln!("skipping: frame numbers need root");
            return;
        }
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
        let mut t = Recorder(Vec::new());
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
        assert!(t.0.is_empty(), "nothing sent");
    }
}
