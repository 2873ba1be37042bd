//! The store's own `MAP_SHARED` mapping of the whole pool file.
//!
//! All access goes through bounds-checked copies (`read_at` / `write_at`) rather than
//! slices: the RAM area is mapped a second time by the VMM and written by the guest, so
//! handing out `&[u8]` over it would promise an immutability nobody can keep.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A read-write shared mapping of a file, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it to another
// thread moves the only handle that unmaps it. Concurrent access to the bytes is
// coordinated by the Pool's callers (&mut self for writes).
unsafe impl Send for Mapping {}
// SAFETY: `&Mapping` only allows copies in and out through raw pointers; writes need the
// Pool's `&mut self`, and reads of guest RAM race only with the guest, as in any VMM.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `file` (which must be at least that long) shared and read-write.
    pub fn new(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping at an address the kernel chooses; it aliases no Rust
        // object. The fd is valid for the call; the mapping outlives the fd's use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// Make the mapping cover the first `new_len` bytes of `file` (which must be at
    /// least that long; `new_len` at least the current length), for a pool whose block
    /// area grew. `mremap(MREMAP_MAYMOVE)` keeps the pages already faulted in; where the
    /// kernel refuses it (older kernels on hugetlbfs) a fresh mapping of the new length
    /// replaces this one. Either way the base address may change: `&mut self` means no
    /// reference into the mapping is alive, and callers must make sure no raw pointer
    /// taken earlier ([`Mapping::as_ptr`]) is used afterwards (the pool stops its
    /// pre-fault thread, the only other holder, first). On error the mapping is
    /// unchanged.
    pub fn grow(&mut self, file: &File, new_len: usize) -> io::Result<()> {
        if new_len < self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a mapping only grows",
            ));
        }
        if new_len == self.len {
            return Ok(());
        }
        // SAFETY: ptr/len are exactly this mapping (what mmap or an earlier mremap
        // returned); with MREMAP_MAYMOVE the kernel either moves it whole or leaves it
        // untouched on failure. No Rust reference into it exists (`&mut self`).
        let p = unsafe {
            libc::mremap(
                self.ptr.as_ptr().cast(),
                self.len,
                new_len,
                libc::MREMAP_MAYMOVE,
            )
        };
        if p != libc::MAP_FAILED {
            self.ptr =
                NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mremap gave NULL"))?;
            self.len = new_len;
            return Ok(());
        }
        let remap_err = io::Error::last_os_error();
        log::debug!("mremap of the pool mapping: {remap_err}; mapping it anew");
        // The old mapping is unmapped when the new one replaces it.
        *self = Mapping::new(file, new_len)?;
        Ok(())
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address, for msync and cache-line flushes.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, off: u64, n: usize) -> io::Result<usize> {
        let off = usize::try_from(off).map_err(|_| oob(off, n, self.len))?;
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(off),
            _ => Err(oob(off as u64, n, self.len)),
        }
    }

    /// Copy `buf.len()` bytes at `off` out of the mapping.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let off = self.check(off, buf.len())?;
        // SAFETY: `check` proved off..off+len lies inside the mapping, which is live for
        // `self`'s lifetime; `buf` is a distinct Rust allocation so the ranges don't overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copy `buf` into the mapping at `off`. Takes `&self` because the mapping is shared
    /// memory; the Pool serialises writers with `&mut self`.
    pub fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        let off = self.check(off, buf.len())?;
        // SAFETY: bounds checked as in `read_at`; the destination is shared file memory,
        // not a Rust object, so no reference is invalidated.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(off), buf.len())
        };
        Ok(())
    }

    /// Pre-fault `len` bytes at `off` into this mapping's page tables (`write`: ready for
    /// writing), so later accesses on the fault path take no page fault of their own.
    /// Best effort: kernels without MADV_POPULATE_* (before 5.14) just skip it.
    pub fn populate(&self, off: u64, len: u64, write: bool) {
        let page = crate::PAGE_SIZE as u64;
        let start = off & !(page - 1);
        let end = off.saturating_add(len).min(self.len as u64);
        if start >= end {
            return;
        }
        let advice = if write {
            libc::MADV_POPULATE_WRITE
        } else {
            libc::MADV_POPULATE_READ
        };
        // SAFETY: start is page aligned and start..end lies inside the live mapping;
        // populating page tables does not change the bytes any Rust code sees.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start as usize).cast(),
                (end - start) as usize,
                advice,
            )
        };
        if rc != 0 {
            log::debug!("madvise populate: {}", io::Error::last_os_error());
        }
    }

    /// Hint that the `len` bytes at `off` will be read (`write`: written) soon: one
    /// prefetch per cache line, so that their cache misses (and the TLB miss of their
    /// page) overlap with work on other bytes instead of stalling it. A hint only: it
    /// changes no byte and cannot fault; bytes outside the mapping are skipped.
    #[inline]
    pub fn prefetch(&self, off: u64, len: usize, write: bool) {
        let Ok(off) = self.check(off, len) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
            for line in (0..len).step_by(64) {
                // SAFETY: `check` proved the address lies inside the live mapping, and a
                // prefetch neither faults nor changes memory (PREFETCHW is a NOP on CPUs
                // without it).
                unsafe {
                    let p = self.ptr.as_ptr().add(off + line).cast::<i8>().cast_const();
                    if write {
                        _mm_prefetch::<_MM_HINT_ET0>(p);
                    } else {
                        _mm_prefetch::<_MM_HINT_T0>(p);
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (off, write);
    }

    /// Read one byte at `off` (nothing if out of range): faults the page into this
    /// mapping if it is not mapped yet. A read fault on a shared file mapping also maps
    /// the neighbouring pages that are in the page cache (fault-around, 64 KiB by
    /// default), writable where the mapping is (tmpfs tracks no dirty pages), so one
    /// touch can save the write faults of 16 pages; on a mapped page it costs one load.
    #[inline]
    pub fn touch(&self, off: u64) {
        if let Ok(off) = self.check(off, 1) {
            // SAFETY: in bounds (checked); a volatile read of shared memory that may
            // change under us is fine for a byte whose value is ignored.
            unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off)) };
        }
    }

    /// Which of the `pages` pages at `off` (page aligned) are in memory: one `mincore`
    /// call, one byte per page, bit 0 set where the page is in the page cache. On tmpfs
    /// that is every page with data except one swapped out; a punched hole never is.
    pub fn resident(&self, off: u64, pages: usize) -> io::Result<Vec<u8>> {
        let page = crate::PAGE_SIZE;
        let len = pages
            .checked_mul(page)
            .ok_or_else(|| oob(off, usize::MAX, self.len))?;
        let start = self.check(off, len)?;
        if start % page != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mincore of an unaligned offset",
            ));
        }
        let mut vec = vec![0u8; pages];
        if pages == 0 {
            return Ok(vec);
        }
        // SAFETY: start..start+len lies inside the live mapping (checked) and is page
        // aligned; `vec` has one byte for each of its pages. mincore only writes `vec`.
        let rc = unsafe {
            libc::mincore(
                self.ptr.as_ptr().add(start).cast(),
                len,
                vec.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec)
    }

    /// crc32c of `len` bytes at `off`, computed in place (no copy). Callers use it on
    /// bytes nobody writes concurrently: store-owned areas, or a write-protected RAM page.
    pub fn crc32c(&self, off: u64, len: usize) -> io::Result<u32> {
        let off = self.check(off, len)?;
        // SAFETY: bounds checked; the slice lives only for this call, during which the
        // caller guarantees no writer touches these bytes (see above).
        let s = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) };
        Ok(crate::checksum::crc32c(s))
    }

    /// The offsets of a copy of `len` bytes from `src` to `dst` within the mapping, both
    /// ranges checked to lie inside it and not to overlap.
    fn copy_ranges(&self, src: u64, dst: u64, len: usize) -> io::Result<(usize, usize)> {
        let s = self.check(src, len)?;
        let d = self.check(dst, len)?;
        if s < d + len && d < s + len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "overlapping copy",
            ));
        }
        Ok((s, d))
    }

    /// Copy `len` bytes within the mapping from `src` to `dst` (non-overlapping ranges).
    pub fn copy_within(&self, src: u64, dst: u64, len: usize) -> io::Result<()> {
        let (s, d) = self.copy_ranges(src, dst, len)?;
        // SAFETY: both ranges are inside the mapping (checked) and do not overlap (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(s), self.ptr.as_ptr().add(d), len)
        };
        Ok(())
    }

    /// Copy `len` bytes within the mapping from `src` to `dst` (non-overlapping) with
    /// non-temporal stores where the CPU has them: the destination's cache lines are
    /// neither read first nor kept, which saves a third of the memory traffic of
    /// copying into memory that is not in the cache. The stores are weakly ordered:
    /// call [`Mapping::store_fence`] before anything else relies on the bytes (another
    /// thread, a persist).
    pub fn copy_within_nt(&self, src: u64, dst: u64, len: usize) -> io::Result<()> {
        let (s, d) = self.copy_ranges(src, dst, len)?;
        #[cfg(target_arch = "x86_64")]
        if d % 16 == 0 && len % 64 == 0 {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
            // SAFETY: both ranges are inside the mapping and do not overlap (checked);
            // the destination is 16-byte aligned (checked) as MOVNTDQ requires, and SSE2
            // is part of x86_64.
            unsafe {
                let sp = self.ptr.as_ptr().add(s).cast::<__m128i>().cast_const();
                let dp = self.ptr.as_ptr().add(d).cast::<__m128i>();
                for i in (0..len / 16).step_by(4) {
                    let a = _mm_loadu_si128(sp.add(i));
                    let b = _mm_loadu_si128(sp.add(i + 1));
                    let c = _mm_loadu_si128(sp.add(i + 2));
                    let e = _mm_loadu_si128(sp.add(i + 3));
                    _mm_stream_si128(dp.add(i), a);
                    _mm_stream_si128(dp.add(i + 1), b);
                    _mm_stream_si128(dp.add(i + 2), c);
                    _mm_stream_si128(dp.add(i + 3), e);
                }
            }
            return Ok(());
        }
        // SAFETY: as in `copy_within`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(s), self.ptr.as_ptr().add(d), len)
        };
        Ok(())
    }

    /// Order every earlier non-temporal store ([`Mapping::copy_within_nt`]) before any
    /// later store (SFENCE).
    pub fn store_fence(&self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SFENCE has no operands and only orders stores.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        };
    }
}

fn oob(off: u64, n: usize, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("access {off}+{n} beyond the {len}-byte pool mapping"),
    )
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing uses the mapping after drop.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(8192).expect("set_len");
        let m = Mapping::new(&f, 8192).expect("map");
        m.write_at(8190, &[1, 2]).expect("in bounds");
        let mut b = [0u8; 2];
        m.read_at(8190, &mut b).expect("in bounds");
        assert_eq!(b, [1, 2]);
        assert!(m.write_at(8191, &[1, 2]).is_err());
        assert!(m.read_at(u64::MAX, &mut b).is_err());
        m.copy_within(8190, 0, 2).expect("copy");
        assert_eq!(
            m.crc32c(8190, 2).expect("crc"),
            crate::checksum::crc32c(&[1, 2])
        );
        assert!(m.crc32c(8191, 2).is_err());
        m.read_at(0, &mut b).expect("read");
        assert_eq!(b, [1, 2]);
        assert!(m.copy_within(0, 1, 2).is_err());
        assert!(m.resident(1, 1).is_err(), "unaligned");
        assert!(m.resident(4096, 2).is_err(), "beyond the end");
        assert_eq!(m.resident(0, 2).expect("mincore").len(), 2);
    }

    #[test]
    fn streaming_copy_matches_a_plain_one() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(4 * 4096).expect("set_len");
        let m = Mapping::new(&f, 4 * 4096).expect("map");
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write_at(0, &src).expect("write");
        m.prefetch(0, 4096, false);
        m.prefetch(4096, 4096, true);
        m.prefetch(u64::MAX - 10, 4096, false); // out of range: ignored
        m.touch(3 * 4096);
        m.touch(u64::MAX); // out of range: ignored
        m.copy_within_nt(0, 4096, 4096).expect("aligned");
        m.copy_within_nt(0, 2 * 4096 + 8, 100)
            .expect("unaligned, odd length");
        m.store_fence();
        let mut b = vec![0u8; 4096];
        m.read_at(4096, &mut b).expect("read");
        assert_eq!(b, src);
        let mut c = vec![0u8; 100];
        m.read_at(2 * 4096 + 8, &mut c).expect("read");
        assert_eq!(c, src[..100]);
        assert!(m.copy_within_nt(0, 64, 4096).is_err(), "overlapping");
        assert!(m.copy_within_nt(0, 4 * 4096 - 64, 4096).is_err(), "beyond");
    }

    #[test]
    fn grow_keeps_the_bytes_and_covers_the_new_length() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(8192).expect("set_len");
        let mut m = Mapping::new(&f, 8192).expect("map");
        m.write_at(8190, &[7, 8]).expect("write");
        assert!(m.grow(&f, 4096).is_err(), "never shrinks");
        m.grow(&f, 8192).expect("same length is a no-op");
        f.set_len(5 * 4096).expect("extend the file");
        m.grow(&f, 5 * 4096).expect("grow");
        assert_eq!(m.len(), 5 * 4096);
        let mut b = [0u8; 2];
        m.read_at(8190, &mut b).expect("old bytes");
        assert_eq!(b, [7, 8]);
        m.write_at(5 * 4096 - 2, &[9, 9])
            .expect("the new end is writable");
        assert!(m.write_at(5 * 4096 - 1, &[1, 1]).is_err());
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut b, 5 * 4096 - 2).expect("read file");
        assert_eq!(b, [9, 9], "shared: the write reached the file");
    }
}
