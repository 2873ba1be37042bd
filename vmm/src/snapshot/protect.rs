//! The write-protect seam. Guest RAM pages named by a snapshot are write-protected so
//! that the first write to one reaches the fault handler before it lands. On tmpfs,
//! hugetlbfs and memfd mappings this is synchronous userfaultfd write-protect; a DAX
//! backend would implement the same trait differently.

use std::os::fd::{AsRawFd, RawFd};

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
#[derive(Debug)]
pub struct UffdProtector {
    uffd: Uffd,
    ranges: Vec<HostRange>,
    pages: u64,
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
            uffd.register_with_mode(host_base.cast(), len, RegisterMode::WRITE_PROTECT)
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

impl PageProtector for UffdProtector {
    fn protect(&self, first: u64, count: u64) -> Result<(), ProtectError> {
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
