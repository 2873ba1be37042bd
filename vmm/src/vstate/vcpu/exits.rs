//! Running a vCPU once and dispatching its exit: port I/O and MMIO to the buses, stops
//! to the VM, emulation failures to [`super::emulation`].

use kvm_bindings::KVM_SYSTEM_EVENT_RESET;
use kvm_ioctls::VcpuExit;

use super::Vcpu;
use crate::stop::VmStop;

/// What to do after an exit.
pub(super) enum Next {
    /// Run the guest again.
    Continue,
    /// The VM stopped.
    Stop(VmStop),
}

/// Exit counts of one vCPU, logged at debug level when its thread ends (exits are
/// the expensive part of device emulation on this host, ~40 us each).
#[derive(Debug, Default)]
pub(super) struct ExitStats {
    pub(super) runs: u64,
    pub(super) by_port: std::collections::BTreeMap<u16, u64>,
    pub(super) mmio: u64,
    /// Emulation failures fixed, by kind: int3, ud2, fwait.
    pub(super) fixes: [u64; 3],
}

impl ExitStats {
    pub(super) fn summary(&self) -> String {
        let mut ports: Vec<(&u16, &u64)> = self.by_port.iter().collect();
        ports.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = ports
            .iter()
            .take(8)
            .map(|(p, n)| format!("{p:#x}:{n}"))
            .collect();
        format!(
            "{} KVM_RUNs, {} port I/O exits (top ports {}), {} MMIO exits, \
             emulation fixes int3:{} ud2:{} fwait:{}",
            self.runs,
            self.by_port.values().sum::<u64>(),
            top.join(" "),
            self.mmio,
            self.fixes[0],
            self.fixes[1],
            self.fixes[2]
        )
    }
}

impl Vcpu {
    /// Run the guest once and handle the exit.
    pub(super) fn run_once(&mut self) -> Next {
        self.stats.runs += 1;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                *self.stats.by_port.entry(port).or_default() += 1;
                self.pio.read(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                *self.stats.by_port.entry(port).or_default() += 1;
                self.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.stats.mmio += 1;
                self.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.stats.mmio += 1;
                self.mmio.write(addr, data);
                Next::Continue
            }
            // With the in-kernel LAPIC, HLT is handled in KVM; an exit here is harmless.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Next::Continue,
            Ok(VcpuExit::Shutdown) => {
                log::info!("vCPU {}: guest shutdown (triple fault or reset)", self.id);
                Next::Stop(VmStop::Shutdown)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                log::info!("vCPU {}: system event {kind}", self.id);
                Next::Stop(if kind == KVM_SYSTEM_EVENT_RESET {
                    VmStop::Reset
                } else {
                    VmStop::Shutdown
                })
            }
            Ok(VcpuExit::InternalError) => self.handle_internal_error(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                self.id
            ))),
            Ok(other) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: unexpected KVM exit {other:?}",
                self.id
            ))),
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.id
            ))),
        }
    }

    /// Complete an I/O or MMIO exit KVM is still waiting on (an `in` needs its result
    /// written back into the guest register) without running guest code, so the state
    /// read while paused is exact.
    pub(super) fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!(
                "vCPU {}: completing pending I/O returned {other:?}",
                self.id
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }
}
