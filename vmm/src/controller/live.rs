//! The running VM's whole state as VM snapshots, rollback and restore see it: captured
//! while paused, applied while paused. [`LiveVm::apply`] is the one place a saved state
//! goes back into a VM, for a rollback and for `pmsnap restore` alike.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::Vsock;
use crate::persist::vcpu::VcpuState;
use crate::persist::{Persist, PersistError, VmState};
use crate::vstate::control::VcpuControl;
use crate::vstate::vm::Vm;

/// Capture and apply the whole VM's state (vCPUs, VM, devices). Called with the vCPUs
/// paused, but for [`VmPersist::pause_capture`], which pauses them.
pub trait VmPersist: Send + Sync {
    /// Capture the state (the vCPUs are paused).
    fn capture(&self) -> Result<VmState, PersistError>;
    /// Pause the running vCPUs and capture the state, with the vCPU threads saving
    /// their state as soon as all have left the guest (one round trip with them, not a
    /// pause and then a capture). The outer error: the vCPUs did not pause. Otherwise
    /// they are paused, with the state (or why it could not be captured) and when the
    /// last vCPU left the guest.
    #[allow(clippy::type_complexity)]
    fn pause_capture(&self) -> Result<(Result<VmState, PersistError>, Instant), PersistError>;
    /// Apply a validated state.
    fn apply(&self, state: &VmState) -> Result<(), PersistError>;
    /// Number of vCPUs (for validation).
    fn vcpu_count(&self) -> usize;
    /// Guest RAM in bytes (for validation).
    fn mem_bytes(&self) -> u64;
}

/// The MSRs KVM says it can save and restore (`KVM_GET_MSR_INDEX_LIST`). Those a vCPU
/// then cannot read are dropped at the first save.
pub fn msr_index_list() -> Result<Vec<u32>, PersistError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| PersistError::Kvm {
        op: "open /dev/kvm",
        vcpu: None,
        source,
    })?;
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| PersistError::Kvm {
            op: "GET_MSR_INDEX_LIST",
            vcpu: None,
            source,
        })?;
    Ok(list.as_slice().to_vec())
}

/// A virtio-mmio device as VM snapshots see it: the transport (saved and restored) and,
/// for vsock, the device (told to reset its connections after a restore).
#[derive(Clone)]
pub struct VirtioSlot {
    /// The transport on the MMIO bus.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The vsock device behind it, if it is one.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot")
            .field("vsock", &self.vsock.is_some())
            .finish()
    }
}

/// Put saved transport states back into `slots` (same count and order, checked) and
/// reset vsock connections, as Firecracker does: the guest drops its sockets and the
/// agent reconnects.
pub fn restore_virtio(
    slots: &[VirtioSlot],
    states: &[crate::devices::virtio::mmio::MmioState],
) -> Result<(), PersistError> {
    if slots.len() != states.len() {
        return Err(PersistError::Mismatch {
            field: "mmio",
            detail: format!(
                "snapshot has {} virtio devices, this VM {}",
                states.len(),
                slots.len()
            ),
        });
    }
    for (slot, st) in slots.iter().zip(states) {
        slot.transport.restore(st)?;
        if let Some(v) = &slot.vsock {
            v.restore(&())?;
        }
    }
    Ok(())
}

/// A running VM: its vCPU threads, KVM VM and devices.
pub struct LiveVm {
    vcpus: Arc<VcpuControl>,
    vm: Arc<Vm>,
    serial: Arc<Mutex<SerialDevice>>,
    msrs: Mutex<Arc<Vec<u32>>>,
    mem_bytes: u64,
    virtio: Vec<VirtioSlot>,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm")
            .field("mem_bytes", &self.mem_bytes)
            .finish()
    }
}

impl LiveVm {
    /// The VM whose vCPUs `vcpus` control, with its virtio devices in slot order.
    pub fn new(
        vcpus: Arc<VcpuControl>,
        vm: Arc<Vm>,
        serial: Arc<Mutex<SerialDevice>>,
        mem_bytes: u64,
        virtio: Vec<VirtioSlot>,
    ) -> Result<Self, PersistError> {
        Ok(Self {
            vcpus,
            vm,
            serial,
            msrs: Mutex::new(Arc::new(msr_index_list()?)),
            mem_bytes,
            virtio,
        })
    }

    /// The MSR indices a save reads.
    fn msrs(&self) -> Arc<Vec<u32>> {
        self.msrs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The whole state from the vCPUs' saved with `msrs` and the rest read now (the
    /// vCPUs are paused).
    fn assemble(&self, vcpus: Vec<VcpuState>, msrs: &[u32]) -> Result<VmState, PersistError> {
        let vm = self.vm.save()?;
        // Keep only the MSRs that read back, so later saves skip the probing.
        if let Some(v0) = vcpus.first() {
            if v0.msrs.len() < msrs.len() {
                let kept: Vec<u32> = v0.msrs.iter().map(|m| m.index).collect();
                *self.msrs.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(kept);
            }
        }
        Ok(VmState {
            mem_bytes: self.mem_bytes,
            vcpus,
            vm,
            serial: self.serial.save()?,
            mmio: self
                .virtio
                .iter()
                .map(|v| v.transport.save())
                .collect::<Result<_, _>>()?,
        })
    }
}

impl VmPersist for LiveVm {
    fn capture(&self) -> Result<VmState, PersistError> {
        let msrs = self.msrs();
        let vcpus = crate::persist::vcpu::save_all(&self.vcpus.vcpus(), &msrs)?;
        self.assemble(vcpus, &msrs)
    }

    fn pause_capture(&self) -> Result<(Result<VmState, PersistError>, Instant), PersistError> {
        let msrs = self.msrs();
        let (vcpus, stopped) = crate::persist::vcpu::pause_and_save_all(&self.vcpus, &msrs)?;
        Ok((vcpus.and_then(|v| self.assemble(v, &msrs)), stopped))
    }

    fn apply(&self, state: &VmState) -> Result<(), PersistError> {
        state.validate(self.vcpu_count(), self.mem_bytes)?;
        if state.mmio.len() != self.virtio.len() {
            return Err(PersistError::Mismatch {
                field: "mmio",
                detail: format!(
                    "snapshot has {} virtio devices, this VM {}",
                    state.mmio.len(),
                    self.virtio.len()
                ),
            });
        }
        self.vm.restore(&state.vm)?;
        crate::persist::vcpu::restore_all(&self.vcpus.vcpus(), &state.vcpus)?;
        self.serial.restore(&state.serial)?;
        restore_virtio(&self.virtio, &state.mmio)?;
        Ok(())
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.vcpus().len()
    }

    fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }
}
