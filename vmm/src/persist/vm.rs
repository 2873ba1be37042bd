//! VM-wide state: the in-kernel PIC (master and slave), IOAPIC, PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::{Persist, PersistError};
use crate::vstate::vm::Vm;

/// In-kernel device state of the VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmKvmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (8254) with its flags.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Kvm {
        op,
        vcpu: None,
        source,
    }
}

fn chip(vm: &Vm, id: u32, op: &'static str) -> Result<kvm_irqchip, PersistError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.fd().get_irqchip(&mut c).map_err(kvm(op))?;
    Ok(c)
}

impl Persist for Vm {
    type State = VmKvmState;
    type Error = PersistError;

    fn save(&self) -> Result<VmKvmState, PersistError> {
        let clock = self.fd().get_clock().map_err(kvm("GET_CLOCK"))?;
        // Flags 0x2 (TSC_STABLE) say KVM runs its master clock for this VM.
        log::debug!(
            "KVM_GET_CLOCK: {} ns, flags {:#x}",
            clock.clock,
            clock.flags
        );
        Ok(VmKvmState {
            pic_master: chip(self, KVM_IRQCHIP_PIC_MASTER, "GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(self, KVM_IRQCHIP_PIC_SLAVE, "GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(self, KVM_IRQCHIP_IOAPIC, "GET_IRQCHIP (IOAPIC)")?,
            pit: self.fd().get_pit2().map_err(kvm("GET_PIT2"))?,
            clock,
        })
    }

    fn restore(&self, s: &VmKvmState) -> Result<(), PersistError> {
        for (c, want, what) in [
            (&s.pic_master, KVM_IRQCHIP_PIC_MASTER, "pic_master"),
            (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "pic_slave"),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC, "ioapic"),
        ] {
            if c.chip_id != want {
                return Err(PersistError::Mismatch {
                    field: what,
                    detail: format!("chip id {} saved, {want} expected", c.chip_id),
                });
            }
        }
        self.fd().set_pit2(&s.pit).map_err(kvm("SET_PIT2"))?;
        // Only the clock value: the flags KVM reports (TSC stable, realtime) are not
        // inputs KVM_SET_CLOCK accepts here.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd().set_clock(&clock).map_err(kvm("SET_CLOCK"))?;
        self.fd()
            .set_irqchip(&s.pic_master)
            .map_err(kvm("SET_IRQCHIP (PIC master)"))?;
        self.fd()
            .set_irqchip(&s.pic_slave)
            .map_err(kvm("SET_IRQCHIP (PIC slave)"))?;
        self.fd()
            .set_irqchip(&s.ioapic)
            .map_err(kvm("SET_IRQCHIP (IOAPIC)"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use crate::vstate::kvm::KvmContext;
    use vm_memory::GuestAddress;

    #[test]
    fn vm_state_round_trips_through_kvm() {
        pmsnap_testenv::require!(
            "vm_state_round_trips_through_kvm",
            pmsnap_testenv::kvm_unavailable()
        );
        let kvm = KvmContext::new().expect("KVM");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let vm = Vm::new(&kvm, mem).expect("VM");
        let mut s = vm.save().expect("save");
        assert_eq!(s.ioapic.chip_id, KVM_IRQCHIP_IOAPIC);
        // Change something visible in each piece, restore, read back.
        s.ioapic.chip.ioapic.id = 3 << 24;
        s.clock.clock += 5_000_000_000;
        vm.restore(&s).expect("restore");
        let back = vm.save().expect("save again");
        // SAFETY: as above.
        assert_eq!(unsafe { back.ioapic.chip.ioapic.id }, 3 << 24);
        assert!(back.clock.clock >= s.clock.clock, "clock set forward");
        let mut bad = s.clone();
        bad.pic_slave.chip_id = KVM_IRQCHIP_IOAPIC;
        assert!(matches!(
            vm.restore(&bad),
            Err(PersistError::Mismatch {
                field: "pic_slave",
                ..
            })
        ));
    }
}
