//! The KVM VM: created with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and
//! guest RAM registered as memslots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::kvm::KvmContext;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::memory::GuestMemoryMmap;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl on the VM failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// A VM with its guest memory.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    memory: GuestMemoryMmap,
    manual_dirty_protect: bool,
}

impl Vm {
    /// Create the VM: TSS and identity-map pages, in-kernel irqchip, PIT2 (speaker
    /// port as a dummy so port 0x61 needs no device), and one memslot per guest RAM
    /// region (slot i = region i).
    pub fn new(ctx: &KvmContext, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = ctx.kvm().create_vm().map_err(kvm("CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm("SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm("SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm("CREATE_PIT2"))?;
        // Dirty logging on every RAM slot (pages written since a snapshot); manual
        // protect must be enabled before the slots exist.
        let manual_dirty_protect = crate::vstate::dirty::enable_manual_protect(&fd);
        for (slot, region) in memory.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range is a live mapping owned by `memory`, which the `Vm`
            // keeps (and every vCPU thread holds a clone of) for as long as the VM fd
            // exists, so KVM never sees the mapping go away under it.
            unsafe { fd.set_user_memory_region(r) }.map_err(kvm("SET_USER_MEMORY_REGION"))?;
        }
        Ok(Self {
            fd,
            memory,
            manual_dirty_protect,
        })
    }

    /// The KVM VM fd (for creating vCPUs, ioeventfds, dirty logs).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// KVM's dirty log over the RAM memslots, as a dirty-tracking source.
    pub fn dirty_log(
        &self,
    ) -> Result<crate::vstate::dirty::KvmDirtyLog, crate::vstate::dirty::DirtyError> {
        let mut slots = Vec::new();
        let mut first_page = 0;
        for (slot, region) in self.memory.iter().enumerate() {
            let pages = region.len() / 4096;
            slots.push(crate::vstate::dirty::DirtySlot {
                slot: slot as u32,
                first_page,
                pages,
            });
            first_page += pages;
        }
        crate::vstate::dirty::KvmDirtyLog::new(
            &self.fd,
            slots,
            first_page,
            self.manual_dirty_protect,
        )
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Connect `evt` to IOAPIC input `gsi`: writing to the eventfd raises the interrupt
    /// without going through the VMM.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(kvm("IRQFD"))
    }
}
