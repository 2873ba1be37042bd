//! The write-protect seam. Guest RAM pages named by a snapshot are write-protected so
//! that the first write to one reaches the fault handler before it lands. On tmpfs,
//! hugetlbfs and memfd mappings this is synchronous userfaultfd write-protect; a DAX
//! backend would implement the same trait differently.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

/// Guest page size the protection works in.
pub const PAGE_SIZE: u64 = 4096;

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): protect pages that were never touched too.
/// The userfaultfd crate's `FeatureFlags` does not name it, so the raw bit is used.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// Errors from the protection seam.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// userfaultfd could not be created (kernel too old, no permission, ...).
    #[error("cannot create userfaultfd with write-protect support: {0}")]
    Create(#[source] userfaultfd::Error),
    /// The guest RAM mapping could not be registered.
    #[error(
        "cannot register guest RAM with userfaultfd write-protect (the pool must be on \
         tmpfs, hugetlbfs or a memfd): {0}"
    )]
    Register(#[source] userfaultfd::Error),
    /// A page range lies outside guest RAM.
    #[error("pages {first}..{end} lie outside guest RAM ({pages} pages)")]
    OutOfRange {
        /// First page of the rejected range.
        first: u64,
        /// One past the last page of the rejected range.
        end: u64,
        /// Number of guest RAM pages.
        pages: u64,
    },
    /// UFFDIO_WRITEPROTECT failed.
    #[error("write-protect ioctl on pages {first}+{count} failed: {source}")]
    Ioctl {
        /// First page of the range.
        first: u64,
        /// Number of pages.
        count: u64,
        /// The ioctl's error.
        #[source]
        source: userfaultfd::Error,
    },
}

/// Write-protection of guest pages, by guest page number.
pub trait PageProtector: Send + Sync {
    /// Make pages `first..first + count` read-only for every writer of guest RAM.
    fn protect(&self, first: u64, count: u64) -> Result<(), ProtectError>;
    /// Make pages writable again and wake any writer blocked on them.
    fn unprotect(&self, first: u64, count: u64) -> Result<(), ProtectError>;
    /// Number of guest pages covered.
    fn pages(&self) -> u64;
}

/// One host mapping of a stretch of guest RAM pages.
#[derive(Debug, Clone, Copy)]
struct HostRange {
    host_base: usize,
    first_page: u64,
    pages: u64,
}

/// Synchronous userfaultfd write-protect over the host mappings of guest RAM (one per
/// guest memory region; guest RAM page numbers run through them in order).
///
/// Registered with `missing` as well (a lazy restore), it also reports accesses to
/// pages that are not in RAM yet, and [`UffdProtector::fill`] puts them in. A page
/// filled after any protection was asked for is filled write-protected: a write-protect
/// on a page that is not present leaves a marker that `UFFDIO_COPY` replaces, so a
/// plain copy would silently drop a snapshot's protection. Filling and protecting
/// exclude each other (`fill_lock`) so the choice cannot race a snapshot.
#[derive(Debug)]
pub struct UffdProtector {
    uffd: Uffd,
    ranges: Vec<HostRange>,
    pages: u64,
    /// Registered for missing-page faults too.
    missing: bool,
    /// Readers: fills; writer: protects (only taken when `missing`).
    fill_lock: RwLock<()>,
    /// Whether any page was ever protected (then every fill is write-protected; a page
    /// that needs no protection faults once and is released by the handler).
    protected_once: AtomicBool,
}

/// What [`UffdProtector::fill`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Pages copied in.
    pub copied: u64,
    /// Pages that were present already (left as they were; their waiters woken).
    pub present: u64,
}

/// Errors of [`UffdProtector::fill`].
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// A page range lies outside guest RAM or the data is not whole pages.
    #[error("fill of {len} bytes at page {first} does not fit guest RAM ({pages} pages)")]
    OutOfRange {
        /// First page.
        first: u64,
        /// Bytes of data.
        len: usize,
        /// Guest RAM pages.
        pages: u64,
    },
    /// UFFDIO_COPY failed (ENOMEM/ENOSPC: the pool's file system is full).
    #[error("UFFDIO_COPY of guest page {page} failed: {source}")]
    Copy {
        /// The page it failed at.
        page: u64,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

impl UffdProtector {
    /// Register `[host_base, host_base + len)` (the VMM's mapping of guest RAM) for
    /// write-protect faults. `len` must be a multiple of [`PAGE_SIZE`].
    pub fn new(host_base: *mut u8, len: usize) -> Result<Self, ProtectError> {
        Self::with_ranges(&[(host_base, len)])
    }

    /// Register several host mappings, guest RAM page 0 being the first byte of the
    /// first one.
    ///
    /// The userfaultfd is created with `user_mode_only(false)`: faults raised by KVM on
    /// behalf of a vCPU happen in kernel mode and would otherwise fail KVM_RUN with EFAULT.
    pub fn with_ranges(maps: &[(*mut u8, usize)]) -> Result<Self, ProtectError> {
        Self::register(maps, false)
    }

    /// [`Self::with_ranges`], registered for missing-page faults too: a lazy restore,
    /// whose RAM starts as holes that [`Self::fill`] fills.
    pub fn with_ranges_lazy(maps: &[(*mut u8, usize)]) -> Result<Self, ProtectError> {
        Self::register(maps, true)
    }

    fn register(maps: &[(*mut u8, usize)], missing: bool) -> Result<Self, ProtectError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(UFFD_FEATURE_WP_UNPOPULATED),
            )
            .create()
            .map_err(ProtectError::Create)?;
        let mut ranges = Vec::with_capacity(maps.len());
        let mut pages = 0;
        for &(host_base, len) in maps {
            let mode = if missing {
                RegisterMode::WRITE_PROTECT | RegisterMode::MISSING
            } else {
                RegisterMode::WRITE_PROTECT
            };
            uffd.register_with_mode(host_base.cast(), len, mode)
                .map_err(ProtectError::Register)?;
            let n = len as u64 / PAGE_SIZE;
            ranges.push(HostRange {
                host_base: host_base as usize,
                first_page: pages,
                pages: n,
            });
            pages += n;
        }
        Ok(Self {
            uffd,
            ranges,
            pages,
            missing,
            fill_lock: RwLock::new(()),
            protected_once: AtomicBool::new(false),
        })
    }

    /// Whether missing-page faults are reported (a lazy restore).
    pub fn lazy(&self) -> bool {
        self.missing
    }

    /// Put `data` (whole pages) into guest pages `first..` that are not present yet, with
    /// `UFFDIO_COPY`, waking whoever waits for them. Pages already present are left as
    /// they are (the VMM wrote them, or another fill did) and their waiters are woken.
    pub fn fill(&self, first: u64, data: &[u8]) -> Result<Filled, FillError> {
        let n = (data.len() / PAGE_SIZE as usize) as u64;
        let bad = || FillError::OutOfRange {
            first,
            len: data.len(),
            pages: self.pages,
        };
        if data.len() % PAGE_SIZE as usize != 0
            || first.checked_add(n).is_none_or(|e| e > self.pages)
        {
            return Err(bad());
        }
        let _shared = self.fill_lock.read().unwrap_or_else(|e| e.into_inner());
        let wp = self.protected_once.load(Ordering::Acquire);
        let mut out = Filled::default();
        let mut done = 0u64;
        while done < n {
            let page = first + done;
            let (host, in_range) = self.host_addr(page).ok_or_else(bad)?;
            let count = (n - done).min(in_range);
            let at = (done * PAGE_SIZE) as usize;
            let src = &data[at..at + (count * PAGE_SIZE) as usize];
            match copy(&self.uffd, src, host, wp) {
                Ok(bytes) => {
                    let pages = bytes as u64 / PAGE_SIZE;
                    out.copied += pages;
                    done += pages;
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Present already: keep it, and wake a fault that raced it.
                    if let Err(source) = self.uffd.wake(host.cast(), PAGE_SIZE as usize) {
                        log::warn!("waking waiters of guest page {page} failed: {source}");
                    }
                    out.present += 1;
                    done += 1;
                }
                Err(source) => return Err(FillError::Copy { page, source }),
            }
        }
        Ok(out)
    }

    /// The host address of guest page `page` and how many pages follow it in the same
    /// host mapping.
    fn host_addr(&self, page: u64) -> Option<(*mut u8, u64)> {
        self.ranges.iter().find_map(|r| {
            let off = page.checked_sub(r.first_page).filter(|&o| o < r.pages)?;
            Some((
                (r.host_base + (off * PAGE_SIZE) as usize) as *mut u8,
                r.pages - off,
            ))
        })
    }

    /// The userfaultfd, for the fault handler to read events from.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Guest page number of a host address inside the registered mappings.
    pub fn page_of(&self, host_addr: usize) -> Option<u64> {
        self.ranges.iter().find_map(|r| {
            let page = (host_addr.checked_sub(r.host_base)? as u64) / PAGE_SIZE;
            (page < r.pages).then_some(r.first_page + page)
        })
    }

    /// Apply `op` to the host address ranges backing pages `first..first + count`.
    fn each_host_range(
        &self,
        first: u64,
        count: u64,
        mut op: impl FnMut(*mut libc::c_void, usize) -> Result<(), userfaultfd::Error>,
    ) -> Result<(), ProtectError> {
        let end = first.checked_add(count).filter(|&e| e <= self.pages);
        let Some(end) = end else {
            return Err(ProtectError::OutOfRange {
                first,
                end: first.saturating_add(count),
                pages: self.pages,
            });
        };
        for r in &self.ranges {
            let lo = first.max(r.first_page);
            let hi = end.min(r.first_page + r.pages);
            if lo >= hi {
                continue;
            }
            let addr = r.host_base + ((lo - r.first_page) * PAGE_SIZE) as usize;
            op(addr as *mut libc::c_void, ((hi - lo) * PAGE_SIZE) as usize).map_err(|source| {
                ProtectError::Ioctl {
                    first,
                    count,
                    source,
                }
            })?;
        }
        Ok(())
    }
}

impl AsRawFd for UffdProtector {
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

/// One `UFFDIO_COPY` of `src` to `dst` (write-protected if `wp`), waking waiters.
/// Returns the bytes copied (fewer than asked when the kernel stopped early, EAGAIN);
/// EEXIST when the first page is present already.
fn copy(uffd: &Uffd, src: &[u8], dst: *mut u8, wp: bool) -> std::io::Result<usize> {
    let mut arg = userfaultfd_sys::uffdio_copy {
        dst: dst as u64,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: if wp {
            userfaultfd_sys::UFFDIO_COPY_MODE_WP
        } else {
            0
        },
        copy: 0,
    };
    // SAFETY: `arg` is a valid uffdio_copy for the duration of the call; `src` is
    // readable for `len` bytes; `dst` lies in a range registered on this userfaultfd
    // (the caller took it from `host_addr` and bounded `len` by its mapping). The kernel
    // writes only `arg.copy` and the destination pages it allocates.
    let rc = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            userfaultfd_sys::UFFDIO_COPY as _,
            &mut arg as *mut userfaultfd_sys::uffdio_copy,
        )
    };
    if rc == 0 {
        return Ok(src.len());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) if arg.copy > 0 => Ok(arg.copy as usize),
        // Interrupted before the first page: try again.
        Some(libc::EAGAIN) => Ok(0),
        _ => Err(err),
    }
}

impl PageProtector for UffdProtector {
    fn protect(&self, first: u64, count: u64) -> Result<(), ProtectError> {
        if self.missing {
            // No fill in between: a page filled from here on is filled protected.
            let _excl = self.fill_lock.write().unwrap_or_else(|e| e.into_inner());
            self.protected_once.store(true, Ordering::Release);
            return self
                .each_host_range(first, count, |addr, len| self.uffd.write_protect(addr, len));
        }
        self.each_host_range(first, count, |addr, len| self.uffd.write_protect(addr, len))
    }

    fn unprotect(&self, first: u64, count: u64) -> Result<(), ProtectError> {
        self.each_host_range(first, count, |addr, len| {
            self.uffd.remove_write_protection(addr, len, true)
        })
    }

    fn pages(&self) -> u64 {
        self.pages
    }
}
