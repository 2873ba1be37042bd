//! Guest memory types, shared by every layer above (arch, devices, vstate). Guest RAM is
//! one file-backed region of the pool, mapped `MAP_SHARED`; its bitmap ([`WriteLog`])
//! records the pages the VMM itself writes (device emulation), which KVM's dirty log
//! never sees.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// Guest memory as the whole VMM uses it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<WriteLog>;
/// One guest memory region.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<WriteLog>;

/// vm-memory's `AtomicBitmap` of the pages the VMM wrote, with one flag more: set by
/// every write. A dirty harvest (inside a snapshot's pause) then reads the RAM-sized
/// bitmap only when the VMM wrote something since the last one, which most pauses of a
/// busy guest find it did not: the vCPUs write, and KVM's log has those.
#[derive(Debug, Default)]
pub struct WriteLog {
    bits: AtomicBitmap,
    written: AtomicBool,
}

impl WriteLog {
    /// Whether a write was marked since the last call; clears the flag. Call before
    /// [`Self::get_and_reset`]: a write that marks its pages after this call leaves the
    /// flag set for the next one, so none is missed.
    pub fn take_written(&self) -> bool {
        self.written.swap(false, Ordering::AcqRel)
    }

    /// The bitmap of written pages (bit `n`: page `n` of the region), cleared.
    pub fn get_and_reset(&self) -> Vec<u64> {
        self.bits.get_and_reset()
    }
}

impl<'a> WithBitmapSlice<'a> for WriteLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for WriteLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.bits.mark_dirty(offset, len);
        if len > 0 {
            // After the bits: whoever clears the flag and then reads the bits sees them.
            self.written.store(true, Ordering::Release);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.bits.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for WriteLog {
    fn with_len(len: usize) -> Self {
        Self {
            bits: AtomicBitmap::with_len(len),
            written: AtomicBool::new(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// Writes through guest memory (and through a slice of its bitmap) set the flag
    /// and the pages' bits; taking the flag clears it; reads leave both alone.
    #[test]
    fn a_write_sets_the_flag_and_its_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 12)]).expect("memory");
        let region: &vm_memory::MmapRegion<WriteLog> = mem.iter().next().expect("region");
        assert!(!region.bitmap().take_written());
        mem.write_obj(7u64, GuestAddress(5 << 12)).expect("write");
        mem.write_slice(&[1u8; 4097], GuestAddress((9 << 12) + 4095))
            .expect("write");
        assert!(region.bitmap().take_written());
        assert!(!region.bitmap().take_written(), "taken once");
        let bits = region.bitmap().get_and_reset();
        assert_eq!(
            bits,
            vec![(1 << 5) | (0b11 << 9)],
            "page 5, and pages 9 and 10"
        );
        let _: u64 = mem.read_obj(GuestAddress(20 << 12)).expect("read");
        assert!(!region.bitmap().take_written(), "a read marks nothing");
        region.bitmap().slice_at(3 << 12).mark_dirty(4096, 1);
        assert!(region.bitmap().take_written());
        assert_eq!(region.bitmap().get_and_reset(), vec![1 << 4]);
    }
}
