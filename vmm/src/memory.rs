//! Guest memory types, shared by every layer above (arch, devices, vstate).  Guest RAM is one file-backed region of the pool, mapped
//! `MAP_SHARED`; the `AtomicBitmap` records the pages the VMM itself writes (device
//! emulation), which KVM's dirty log never sees.

use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as the whole VMM uses it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One guest memory region.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
