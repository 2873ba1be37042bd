//! Instructions this host's KVM cannot emulate (`KVM_INTERNAL_ERROR_EMULATION` on int3,
//! ud2 and fwait in emulated guest kernel code, see docs/machine-notes.md): do what the
//! CPU would have done; anything else stops the VM with RIP and the instruction bytes.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use vm_memory::{Bytes, GuestAddress};

use super::exits::Next;
use super::{Vcpu, VcpuError};
use crate::stop::VmStop;

/// What an instruction KVM failed to emulate is, and what the CPU would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmulationFix {
    /// `int3`: a trap; inject #BP with RIP after the instruction.
    Int3 = 0,
    /// `ud2`: a fault; inject #UD with RIP at the instruction.
    Ud2 = 1,
    /// `fwait`: nothing to wait for without x87 exceptions pending; skip it.
    Fwait = 2,
}

/// Classify the bytes at RIP.
pub fn classify_instruction(bytes: &[u8]) -> Option<EmulationFix> {
    match bytes {
        [0xcc, ..] => Some(EmulationFix::Int3),
        [0x0f, 0x0b, ..] => Some(EmulationFix::Ud2),
        [0x9b, ..] => Some(EmulationFix::Fwait),
        _ => None,
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Vcpu {
    /// Read up to 15 instruction bytes at guest virtual `rip`, page by page through
    /// `KVM_TRANSLATE`. Returns what could be read (possibly nothing).
    fn read_instruction(&self, rip: u64) -> Vec<u8> {
        const MAX_INSN: u64 = 15;
        let mut out = Vec::new();
        let mut va = rip;
        while (out.len() as u64) < MAX_INSN {
            let in_page = 0x1000 - (va & 0xfff);
            let n = in_page.min(MAX_INSN - out.len() as u64) as usize;
            let Ok(t) = self.fd.translate_gva(va) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let mut buf = vec![0u8; n];
            if self
                .memory
                .read_slice(&mut buf, GuestAddress(t.physical_address))
                .is_err()
            {
                break;
            }
            out.extend_from_slice(&buf);
            va += n as u64;
        }
        out
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: for an emulation failure on int3/ud2/fwait do what the
    /// CPU would; anything else stops the VM with RIP and the instruction bytes.
    pub(super) fn handle_internal_error(&mut self) -> Next {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which `internal` is the
        // member of the exit union KVM filled in; it is plain integers.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Next::Stop(VmStop::Error(format!(
                    "vCPU {}: KVM internal error {} and cannot read registers: {e}",
                    self.id, internal.suberror
                )))
            }
        };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM internal error (suberror {}) at RIP {:#x}",
                self.id, internal.suberror, regs.rip
            )));
        }
        let bytes = self.read_instruction(regs.rip);
        let Some(fix) = classify_instruction(&bytes) else {
            return Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM cannot emulate the instruction at RIP {:#x}: bytes [{}]",
                self.id,
                regs.rip,
                hex(&bytes)
            )));
        };
        self.emulation_fixes += 1;
        self.stats.fixes[fix as usize] += 1;
        // Rate-limited: the guest can trigger these at will.
        if self.emulation_fixes <= 8 || self.emulation_fixes.is_power_of_two() {
            log::debug!(
                "vCPU {}: emulated {fix:?} at RIP {:#x} ({} so far)",
                self.id,
                regs.rip,
                self.emulation_fixes
            );
        }
        match self.apply_fix(fix, regs) {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: cannot emulate {fix:?} at RIP {:#x}: {e}",
                self.id, regs.rip
            ))),
        }
    }

    fn apply_fix(&self, fix: EmulationFix, mut r: kvm_bindings::kvm_regs) -> Result<(), VcpuError> {
        let (vector, advance) = match fix {
            EmulationFix::Int3 => (Some(3u8), 1),
            EmulationFix::Ud2 => (Some(6u8), 0),
            EmulationFix::Fwait => (None, 1),
        };
        if advance != 0 {
            r.rip += advance;
            self.fd.set_regs(&r).map_err(self.kvm_err("SET_REGS"))?;
        }
        if let Some(nr) = vector {
            let mut ev = self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm_err("GET_VCPU_EVENTS"))?;
            ev.exception.injected = 1;
            ev.exception.nr = nr;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            ev.exception.pending = 0;
            self.fd
                .set_vcpu_events(&ev)
                .map_err(self.kvm_err("SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}
