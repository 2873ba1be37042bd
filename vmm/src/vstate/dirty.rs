//! The sources of dirty tracking: which guest pages were written since the last harvest.
//!
//! Two sources exist. KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) sees every vCPU write; the VMM's own writes into
//! guest RAM (device emulation) never reach KVM's log, so the guest memory region's
//! bitmap (`crate::memory::WriteLog`, vm-memory's `AtomicBitmap` with a written flag)
//! records those ([`VmmWriteLog`]). The snapshot engine's
//! `DirtyTracker` (crate::snapshot::dirty) harvests both.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemoryMmap, WriteLog};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVMIO};
use kvm_ioctls::VmFd;
use vmm_sys_util::{ioctl::ioctl_with_ref, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Errors from dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// A KVM dirty-log ioctl failed.
    #[error("{op} on memslot {slot} failed: {source}")]
    Kvm {
        /// Which ioctl.
        op: &'static str,
        /// The memslot.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM file descriptor could not be duplicated.
    #[error("cannot duplicate the VM file descriptor: {0}")]
    Dup(#[source] std::io::Error),
    /// The snapshot is not tracked by this VMM process.
    #[error("no dirty tracking for snapshot {0:?} in this VMM process")]
    Untracked(String),
}

/// A page bitmap: bit `p % 64` of word `p / 64` is guest page `p`.
pub type PageBitmap = Vec<u64>;

/// Words needed for a bitmap of `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// OR the first `pages` bits of `bits` (a bitmap whose bit 0 is page `first_page`) into
/// `out` (a bitmap of pages from 0), word by word: a harvest after which all of a 4 GiB
/// guest's pages are dirty (the first, as KVM starts with every bit set) costs 16,384
/// words, not a million pages. Bits beyond `out` are dropped.
pub fn or_bitmap_at(out: &mut [u64], first_page: u64, bits: &[u64], pages: u64) {
    let shift = (first_page % 64) as u32;
    let base = (first_page / 64) as usize;
    for (w, &word) in bits.iter().enumerate().take(bitmap_words(pages)) {
        let tail = pages - w as u64 * 64;
        let word = if tail < 64 {
            word & ((1u64 << tail) - 1)
        } else {
            word
        };
        if word == 0 {
            continue;
        }
        let at = base + w;
        if let Some(o) = out.get_mut(at) {
            *o |= word << shift;
        }
        if shift != 0 {
            if let Some(o) = out.get_mut(at + 1) {
                *o |= word >> (64 - shift);
            }
        }
    }
}

/// Turn a bitmap into runs `(first_page, count)` of set bits, in page order.
pub fn bitmap_runs(bitmap: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        if word == u64::MAX {
            // A full word extends the run or starts one: 64 pages at once.
            let page = w as u64 * 64;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 64,
                _ => runs.push((page, 64)),
            }
            continue;
        }
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            let page = w as u64 * 64 + bit;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == page => *count += 1,
                _ => runs.push((page, 1)),
            }
            bits &= bits - 1;
        }
    }
    runs
}

/// A zeroed vector of `len` elements whose memory is already mapped: each of its pages
/// is written once here. A page fault (or the `mmap` of a fresh allocation) in the VMM
/// process waits for the mm's lock, which write-protect walks and the pool's pre-fault
/// thread hold for milliseconds while a big guest runs: a harvest inside a snapshot's
/// pause that allocated and faulted in fresh bitmaps took 20-30 ms at 4 GiB
/// (docs/perf-vm.md, docs/machine-notes.md). Buffers used inside pauses are made with
/// this, once, and reused.
pub fn prefaulted<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut v = vec![T::default(); len];
    let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
    for i in (0..len).step_by(step) {
        // SAFETY: `i < len`, a valid element; volatile so the store is not elided
        // (the compiler knows the memory is zero already).
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), T::default()) };
    }
    v
}

/// The bitmap a source handed out last and got back (`spare`), zeroed, if it has
/// `words` words; otherwise a new one.
fn reuse_zeroed(spare: &mut Option<PageBitmap>, words: usize) -> PageBitmap {
    match spare.take() {
        Some(mut b) if b.len() == words => {
            b.fill(0);
            b
        }
        _ => vec![0u64; words],
    }
}

/// A source of "pages written since the last harvest", cleared by each harvest.
pub trait DirtySource: Send {
    /// Hand back a bitmap [`DirtySource::harvest`] returned, once read: a source may
    /// keep it and fill it again next time instead of allocating (and faulting in) a
    /// new one.
    fn recycle(&mut self, _bits: PageBitmap) {}

    /// Pages written since the previous call, as a bitmap over all guest pages, or an
    /// empty bitmap when the source knows that nothing was written.
    fn harvest(&mut self) -> Result<PageBitmap, DirtyError>;
}

/// One KVM memslot with dirty logging on, and where its pages sit in guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct DirtySlot {
    /// KVM memslot number.
    pub slot: u32,
    /// Guest RAM page (pool RAM-area page) of the slot's first page.
    pub first_page: u64,
    /// Pages in the slot.
    pub pages: u64,
}

/// Enable `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (manual protect, initially all set) on a VM.
/// Must run before memslots with `KVM_MEM_LOG_DIRTY_PAGES` are added. Returns false when
/// the host lacks it: then `KVM_GET_DIRTY_LOG` clears as it reads, which is also exact.
pub fn enable_manual_protect(vm: &VmFd) -> bool {
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [
            u64::from(
                kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                    | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET,
            ),
            0,
            0,
            0,
        ],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// KVM's dirty log over a VM's guest RAM memslots.
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: File,
    slots: Vec<DirtySlot>,
    total_pages: u64,
    manual_protect: bool,
    /// Whether KVM writes each slot's log straight into the harvest's bitmap: the slots
    /// tile the guest's pages in order, each starting at a multiple of 64 pages and
    /// all but the last a multiple of 64 long (always, for RAM sizes in MiB). Saves a
    /// zeroing and an OR pass over a RAM-sized bitmap in each harvest, inside pauses.
    direct: bool,
    /// Without `direct`: per slot, the buffer KVM writes its log into (allocated once,
    /// mapped).
    slot_bits: Vec<Vec<u64>>,
    /// A bitmap handed back by [`DirtySource::recycle`], filled again next time.
    spare: Option<PageBitmap>,
}

impl KvmDirtyLog {
    /// Track `slots` of `vm`. `manual_protect` is what [`enable_manual_protect`] returned.
    pub fn new(
        vm: &VmFd,
        slots: Vec<DirtySlot>,
        total_pages: u64,
        manual_protect: bool,
    ) -> Result<Self, DirtyError> {
        // SAFETY: dup of a valid, open fd; the result is checked and owned by the File.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(DirtyError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let vm = unsafe { File::from_raw_fd(fd) };
        let direct = slots_tile_words(&slots, total_pages);
        let slot_bits = if direct {
            Vec::new()
        } else {
            slots
                .iter()
                .map(|s| prefaulted(bitmap_words(s.pages)))
                .collect()
        };
        Ok(Self {
            vm,
            slots,
            total_pages,
            manual_protect,
            direct,
            slot_bits,
            spare: Some(prefaulted(bitmap_words(total_pages))),
        })
    }
}

impl DirtySource for KvmDirtyLog {
    fn recycle(&mut self, bits: PageBitmap) {
        if !bits.is_empty() {
            self.spare = Some(bits);
        }
    }

    fn harvest(&mut self) -> Result<PageBitmap, DirtyError> {
        let words = bitmap_words(self.total_pages);
        if self.direct {
            // Every word is written by KVM: no zeroing.
            let mut out = match self.spare.take() {
                Some(b) if b.len() == words => b,
                _ => prefaulted(words),
            };
            for s in &self.slots {
                let at = (s.first_page / 64) as usize;
                let bits = &mut out[at..at + bitmap_words(s.pages)];
                fetch_slot_log(&self.vm, s, self.manual_protect, bits)?;
            }
            return Ok(out);
        }
        let mut out = reuse_zeroed(&mut self.spare, words);
        for (s, bits) in self.slots.iter().zip(self.slot_bits.iter_mut()) {
            fetch_slot_log(&self.vm, s, self.manual_protect, bits)?;
            or_bitmap_at(&mut out, s.first_page, bits, s.pages);
        }
        Ok(out)
    }
}

/// Whether `slots` tile pages `0..total_pages` in order with every slot starting on a
/// bitmap word and all but the last ending on one, so that each slot's log can be
/// written in place into a bitmap of all pages (KVM writes whole words of a slot's log,
/// with the bits past its end clear).
fn slots_tile_words(slots: &[DirtySlot], total_pages: u64) -> bool {
    let mut next = 0u64;
    for (i, s) in slots.iter().enumerate() {
        let last = i + 1 == slots.len();
        if s.first_page != next || s.first_page % 64 != 0 || (!last && s.pages % 64 != 0) {
            return false;
        }
        next += s.pages;
    }
    next == total_pages
}

/// Read KVM's log of slot `s` into `bits` (at least the slot's words) and, with manual
/// protect, clear in KVM exactly what was read, so writes after this point show up in
/// the next read.
fn fetch_slot_log(
    vm: &File,
    s: &DirtySlot,
    manual_protect: bool,
    bits: &mut [u64],
) -> Result<(), DirtyError> {
    assert!(bits.len() >= bitmap_words(s.pages), "a slot's log fits");
    let failed = |op| DirtyError::Kvm {
        op,
        slot: s.slot,
        source: std::io::Error::last_os_error(),
    };
    let mut log = kvm_dirty_log {
        slot: s.slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
    // SAFETY: `bits` holds the slot's words (checked above) and outlives the call; the
    // ioctl only writes the bitmap.
    let rc = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if rc < 0 {
        return Err(failed("KVM_GET_DIRTY_LOG"));
    }
    if manual_protect && bits.iter().any(|&w| w != 0) {
        // The range reaches the slot's end, so num_pages need not be a multiple of 64.
        let mut clear = kvm_clear_dirty_log {
            slot: s.slot,
            num_pages: u32::try_from(s.pages).unwrap_or(u32::MAX),
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
        // SAFETY: as above; the ioctl reads the bitmap.
        let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(failed("KVM_CLEAR_DIRTY_LOG"));
        }
    }
    Ok(())
}

/// The VMM's own writes into guest RAM (device emulation through vm-memory), which
/// KVM's dirty log does not see, as a dirty-tracking source.
#[derive(Debug)]
pub struct VmmWriteLog {
    mem: GuestMemoryMmap,
    /// A bitmap handed back by [`DirtySource::recycle`], filled again next time.
    spare: Option<PageBitmap>,
}

impl VmmWriteLog {
    /// Track writes made through `mem` (a clone shares the regions and their bitmaps).
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let pages: u64 = mem.iter().map(|r| r.len() / 4096).sum();
        Self {
            mem,
            spare: Some(prefaulted(bitmap_words(pages))),
        }
    }
}

impl DirtySource for VmmWriteLog {
    fn recycle(&mut self, bits: PageBitmap) {
        if !bits.is_empty() {
            self.spare = Some(bits);
        }
    }

    /// Reads a region's RAM-sized bitmap only when its written flag says the VMM wrote
    /// there since the last harvest; empty when it wrote nowhere.
    fn harvest(&mut self) -> Result<PageBitmap, DirtyError> {
        let total: u64 = self.mem.iter().map(|r| r.len() / 4096).sum();
        let mut out: PageBitmap = Vec::new();
        let mut first = 0u64;
        for region in self.mem.iter() {
            let pages = region.len() / 4096;
            let mapping: &vm_memory::MmapRegion<WriteLog> = region;
            if mapping.bitmap().take_written() {
                if out.is_empty() {
                    out = reuse_zeroed(&mut self.spare, bitmap_words(total));
                }
                let bits = mapping.bitmap().get_and_reset();
                or_bitmap_at(&mut out, first, &bits, pages);
            }
            first += pages;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(first_page: u64, pages: u64) -> DirtySlot {
        DirtySlot {
            slot: 0,
            first_page,
            pages,
        }
    }

    /// A slot's log is written in place only where its words are its own alone.
    #[test]
    fn slots_tile_words_only_on_word_boundaries() {
        assert!(slots_tile_words(&[slot(0, 100)], 100));
        assert!(slots_tile_words(
            &[slot(0, 786_432), slot(786_432, 262_144)],
            1_048_576
        ));
        assert!(slots_tile_words(&[slot(0, 128), slot(128, 5)], 133));
        assert!(!slots_tile_words(&[slot(0, 100), slot(100, 28)], 128));
        assert!(!slots_tile_words(&[slot(64, 64)], 128), "a gap");
        assert!(
            !slots_tile_words(&[slot(0, 64), slot(0, 64)], 128),
            "overlap"
        );
        assert!(!slots_tile_words(&[slot(0, 64)], 128), "short of the end");
        assert!(slots_tile_words(&[], 0));
    }
}
