//! The running VM as the snapshot engine sees it for whole-VM state: capture while
//! paused, apply while paused.

use std::sync::{Arc, Mutex};

use super::{Persist, PersistError, VmState};
use crate::devices::legacy::SerialDevice;
use crate::vstate::control::VcpuControl;
use crate::vstate::vm::Vm;

/// Capture and apply the whole VM's state (vCPUs, VM, devices). Both are called with
/// the vCPUs paused.
pub trait VmPersist: Send + Sync {
    /// Capture the state.
    fn capture(&self) -> Result<VmState, PersistError>;
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

/// A running VM: its vCPU threads, KVM VM and devices.
pub struct LiveVm {
    vcpus: Arc<VcpuControl>,
    vm: Arc<Vm>,
    serial: Arc<Mutex<SerialDevice>>,
    msrs: Mutex<Arc<Vec<u32>>>,
    mem_bytes: u64,
    virtio_devices: usize,
}

impl std::fmt::Debug for LiveVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVm")
            .field("mem_bytes", &self.mem_bytes)
            .finish()
    }
}

impl LiveVm {
    /// The VM whose vCPUs `vcpus` control. `virtio_devices` counts the virtio-mmio
    /// devices attached: their state is not captured yet, so with any, capture refuses
    /// (a rollback would leave the guest driver and the device out of step).
    pub fn new(
        vcpus: Arc<VcpuControl>,
        vm: Arc<Vm>,
        serial: Arc<Mutex<SerialDevice>>,
        mem_bytes: u64,
        virtio_devices: usize,
    ) -> Result<Self, PersistError> {
        Ok(Self {
            vcpus,
            vm,
            serial,
            msrs: Mutex::new(Arc::new(msr_index_list()?)),
            mem_bytes,
            virtio_devices,
        })
    }
}

impl VmPersist for LiveVm {
    fn capture(&self) -> Result<VmState, PersistError> {
        if self.virtio_devices > 0 {
            return Err(PersistError::Device {
                device: "virtio-mmio",
                reason: "saving virtio device state is not implemented yet; VM snapshots \
                         need a VM without --vsock-sock"
                    .into(),
            });
        }
        let msrs = self.msrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let vm = self.vm.save()?;
        let vcpus = self.vcpus.vcpus().save_states(&msrs)?;
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
            mmio: Vec::new(),
        })
    }

    fn apply(&self, state: &VmState) -> Result<(), PersistError> {
        state.validate(self.vcpu_count(), self.mem_bytes)?;
        self.vm.restore(&state.vm)?;
        self.vcpus.vcpus().restore_states(&state.vcpus)?;
        self.serial.restore(&state.serial)?;
        Ok(())
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.vcpus().len()
    }

    fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }
}

/// Connect whole-VM snapshots to a started VM's engine. Without it (no KVM MSR list),
/// VM snapshots are refused with a clear error and the VM still runs.
pub fn attach(
    running: &crate::builder::RunningVm,
    serial: Arc<Mutex<SerialDevice>>,
    mem_bytes: u64,
    virtio_devices: usize,
) {
    match LiveVm::new(
        running.control().clone(),
        running.vm_arc(),
        serial,
        mem_bytes,
        virtio_devices,
    ) {
        Ok(live) => running.engine().set_vm_persist(Arc::new(live)),
        Err(e) => log::warn!("VM snapshots unavailable: {e}"),
    }
}
