//! Dirty tracking: which guest pages were written since a given snapshot.
//!
//! Two sources feed it. KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` with
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) sees every vCPU write; the VMM's own writes into
//! guest RAM (device emulation) never reach KVM's log, so vm-memory's `AtomicBitmap` on
//! the guest memory region records those. Each harvest takes both bitmaps (and clears
//! them) and ORs the result into the bitmap of every live snapshot, so "dirty since S"
//! is exact for as long as S is tracked in this VMM process.

use std::collections::HashMap;
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

/// Turn a bitmap into runs `(first_page, count)` of set bits, in page order.
pub fn bitmap_runs(bitmap: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
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

/// A source of "pages written since the last harvest", cleared by each harvest.
pub trait DirtySource: Send {
    /// Pages written since the previous call, as a bitmap over all guest pages.
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
        Ok(Self {
            vm,
            slots,
            total_pages,
            manual_protect,
        })
    }
}

impl DirtySource for KvmDirtyLog {
    fn harvest(&mut self) -> Result<PageBitmap, DirtyError> {
        let mut out = vec![0u64; bitmap_words(self.total_pages)];
        for s in &self.slots {
            let mut bits = vec![0u64; bitmap_words(s.pages)];
            let mut log = kvm_dirty_log {
                slot: s.slot,
                ..Default::default()
            };
            log.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
            // SAFETY: `bits` is large enough for the slot's pages and outlives the call;
            // the ioctl only writes the bitmap.
            let rc = unsafe { ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
            if rc < 0 {
                return Err(DirtyError::Kvm {
                    op: "KVM_GET_DIRTY_LOG",
                    slot: s.slot,
                    source: std::io::Error::last_os_error(),
                });
            }
            if self.manual_protect && bits.iter().any(|&w| w != 0) {
                // Re-protect exactly what was reported, so writes after this point show up
                // in the next harvest.
                // The range reaches the slot's end, so num_pages need not be a multiple of 64.
                let mut clear = kvm_clear_dirty_log {
                    slot: s.slot,
                    num_pages: u32::try_from(s.pages).unwrap_or(u32::MAX),
                    first_page: 0,
                    ..Default::default()
                };
                clear.__bindgen_anon_1.dirty_bitmap = bits.as_mut_ptr().cast();
                // SAFETY: as above; the ioctl reads the bitmap.
                let rc = unsafe { ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
                if rc < 0 {
                    return Err(DirtyError::Kvm {
                        op: "KVM_CLEAR_DIRTY_LOG",
                        slot: s.slot,
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
            for (first, count) in bitmap_runs(&bits) {
                for page in s.first_page + first..s.first_page + first + count {
                    out[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
        }
        Ok(out)
    }
}

/// Pages written since each live snapshot.
pub struct DirtyTracker {
    sources: Vec<Box<dyn DirtySource>>,
    pages: u64,
    since: HashMap<String, PageBitmap>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("pages", &self.pages)
            .field("tracked", &self.since.len())
            .finish()
    }
}

impl DirtyTracker {
    /// A tracker over `pages` guest pages fed by `sources`.
    pub fn new(pages: u64, sources: Vec<Box<dyn DirtySource>>) -> Self {
        Self {
            sources,
            pages,
            since: HashMap::new(),
        }
    }

    /// Fold everything written since the last harvest into every tracked snapshot.
    pub fn harvest(&mut self) -> Result<(), DirtyError> {
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

    /// Start tracking writes from now on for snapshot `name` (call with vCPUs paused, or
    /// right after the snapshot's pages were protected).
    pub fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        self.since
            .insert(name.to_string(), vec![0; bitmap_words(self.pages)]);
        Ok(())
    }

    /// Start tracking `name` with everything marked written (a snapshot made by an
    /// earlier VMM process: what happened in between is unknown here).
    pub fn start_unknown(&mut self, name: &str) {
        let mut all = vec![u64::MAX; bitmap_words(self.pages)];
        if self.pages % 64 != 0 {
            if let Some(last) = all.last_mut() {
                *last = (1u64 << (self.pages % 64)) - 1;
            }
        }
        self.since.insert(name.to_string(), all);
    }

    /// Record pages the VMM wrote outside both sources (through the store's mapping) as
    /// written, for every tracked snapshot.
    pub fn mark(&mut self, runs: &[(u64, u64)]) {
        for map in self.since.values_mut() {
            for &(first, count) in runs {
                for p in first..(first + count).min(self.pages) {
                    map[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
    }

    /// Stop tracking `name`.
    pub fn forget(&mut self, name: &str) {
        self.since.remove(name);
    }

    /// Pages written since `name` was taken, as runs.
    pub fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest()?;
        self.since
            .get(name)
            .map(|b| bitmap_runs(b))
            .ok_or_else(|| DirtyError::Untracked(name.to_string()))
    }

    /// Reset `name`'s bitmap to "nothing written" (after a rollback to it).
    pub fn reset(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        match self.since.get_mut(name) {
            Some(b) => {
                b.fill(0);
                Ok(())
            }
            None => Err(DirtyError::Untracked(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Fake(Arc<Mutex<PageBitmap>>);
    impl DirtySource for Fake {
        fn harvest(&mut self) -> Result<PageBitmap, DirtyError> {
            let mut b = self.0.lock().expect("lock");
            let out = b.clone();
            b.fill(0);
            Ok(out)
        }
    }

    fn write(b: &Arc<Mutex<PageBitmap>>, page: u64) {
        b.lock().expect("lock")[(page / 64) as usize] |= 1 << (page % 64);
    }

    #[test]
    fn runs_from_bitmap() {
        assert_eq!(bitmap_runs(&[0, 0]), vec![]);
        assert_eq!(bitmap_runs(&[0b1110_0001]), vec![(0, 1), (5, 3)]);
        assert_eq!(bitmap_runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert_eq!(bitmap_runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
        assert_eq!(bitmap_words(0), 0);
        assert_eq!(bitmap_words(65), 2);
    }

    #[test]
    fn tracks_each_snapshot_from_its_own_start() {
        let kvm = Arc::new(Mutex::new(vec![0u64; 2]));
        let vmm = Arc::new(Mutex::new(vec![0u64; 2]));
        let mut t = DirtyTracker::new(
            100,
            vec![Box::new(Fake(kvm.clone())), Box::new(Fake(vmm.clone()))],
        );
        write(&kvm, 1); // before any snapshot: never reported
        t.start("a").expect("start a");
        write(&kvm, 2);
        write(&vmm, 70); // a device write, seen only by the VMM bitmap
        t.start("b").expect("start b");
        write(&kvm, 3);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(2, 2), (70, 1)]);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(3, 1)]);
        t.reset("a").expect("reset");
        write(&vmm, 4);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(4, 1)]);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(3, 2)]);
        t.mark(&[(90, 2)]);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(4, 1), (90, 2)]);
        t.forget("a");
        assert!(matches!(t.dirty_since("a"), Err(DirtyError::Untracked(_))));
        t.start_unknown("old");
        assert_eq!(t.dirty_since("old").expect("old"), vec![(0, 100)]);
    }
}
