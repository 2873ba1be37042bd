//! vCPUs: [configuration for boot](Vcpu::configure) (here), the per-vCPU thread with
//! its explicit run state ([`Vcpus`], `thread.rs`), exit dispatch through the port-I/O
//! and MMIO buses (`exits.rs`), and the handling of instructions the host's KVM
//! emulator cannot run ([`EmulationFix`], `emulation.rs`).

mod emulation;
mod exits;
#[cfg(test)]
mod tests;
mod thread;

use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;

use super::vm::Vm;
use crate::arch::x86_64::{msr, regs};
use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;

pub use emulation::{classify_instruction, EmulationFix};
pub use thread::{
    kick_signal, FdJob, Latch, PauseAnswers, VcpuAck, VcpuRequest, Vcpus, ACK_TIMEOUT,
    VCPU_KICK_SIGNAL_OFFSET,
};

/// LAPIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors configuring or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on a vCPU failed.
    #[error("KVM {op} on vCPU {id} failed")]
    Kvm {
        /// Which vCPU.
        id: u8,
        /// The operation.
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {id}")]
    Msrs {
        /// Which vCPU.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// Writing the boot tables failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Registering the kick signal handler failed.
    #[error("cannot register the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// A vCPU did not acknowledge a request in time.
    #[error("vCPU {0} did not acknowledge {1} within {ACK_TIMEOUT:?}")]
    AckTimeout(u8, &'static str),
    /// The vCPU thread is gone.
    #[error("vCPU {0} is no longer running")]
    Gone(u8),
    /// Work for a paused vCPU was refused: the vCPU is not paused (or its thread ended).
    #[error("vCPU {0} cannot {1}: it is not paused")]
    NotPaused(u8, &'static str),
    /// The VM stopped (reset, shutdown, error); it cannot be resumed.
    #[error("vCPU {0} cannot resume: the VM has stopped")]
    Stopped(u8),
}

/// Set LINT0 to ExtINT (the legacy PIC's output) and LINT1 to NMI in a LAPIC register
/// page, as a BIOS would.
pub fn set_lint_modes(regs: &mut [std::os::raw::c_char; 1024]) {
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    }
}

/// One vCPU with what it needs to run: its KVM fd, guest memory and the two buses.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    memory: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    emulation_fixes: u64,
    stats: exits::ExitStats,
}

impl Vcpu {
    /// Create vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                op: "CREATE_VCPU",
                source,
            })?;
        Ok(Self {
            id,
            fd,
            memory: vm.memory().clone(),
            pio,
            mmio,
            emulation_fixes: 0,
            stats: exits::ExitStats::default(),
        })
    }

    /// This vCPU's index (and APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd (for saving and restoring state).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, op, source }
    }

    /// Set CPUID, the boot MSRs and the LAPIC LINT modes; on the boot vCPU (`entry` is
    /// Some) also the registers for the 64-bit kernel entry. Application processors
    /// stay in KVM's wait-for-SIPI state and are started by the guest.
    pub fn configure(&self, cpuid: &CpuId, entry: Option<u64>) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.kvm_err("SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm_err("SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("GET_LAPIC"))?;
        set_lint_modes(&mut lapic.regs);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("SET_LAPIC"))?;
        if let Some(entry) = entry {
            regs::write_boot_tables(&self.memory)?;
            let sregs = self.fd.get_sregs().map_err(self.kvm_err("GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::boot_sregs(sregs))
                .map_err(self.kvm_err("SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.kvm_err("SET_REGS"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("SET_FPU"))?;
        }
        Ok(())
    }
}
