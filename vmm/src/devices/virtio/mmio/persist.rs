//! The transport's saved state ([`MmioState`]): the register file and the queue
//! configuration, with the ring positions the device reports. Saved with the VM and put
//! back in place at a rollback or restore; the state is untrusted (it comes from a file)
//! and is checked as if the driver had written it. rust-vmm's `virtio-queue-ser` (0.14.0)
//! pins `virtio-queue = "=0.17.0"` while we use 0.18.0, and it saves a `Queue`, not the
//! register file the driver wrote: the transport keeps its own [`QueueSnapshot`].

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::*;
use crate::state::{DeviceStateError, Persist};

/// Saved configuration of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// Saved state of a transport: the register file and the queue configuration.
/// Device-specific state is the device's own business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device id, checked on restore.
    pub device_type: u32,
    /// Driver status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub features_sel: u32,
    /// DriverFeaturesSel.
    pub acked_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// One entry per queue.
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// Save the register file and queue configuration (positions come from the device).
    pub fn save_state(&self) -> MmioState {
        let positions = lock(&self.device).queue_positions();
        MmioState {
            device_type: self.device_type,
            status: self.status,
            features_sel: self.features_sel,
            acked_features_sel: self.acked_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let (next_avail, next_used) = positions.get(i).copied().unwrap_or((0, 0));
                    QueueSnapshot {
                        size: q.size,
                        ready: q.ready,
                        desc: q.desc,
                        driver: q.driver,
                        device: q.device,
                        next_avail,
                        next_used,
                    }
                })
                .collect(),
        }
    }

    /// Rebuild a transport for a fresh `device` from saved `state`, re-activating the
    /// device when the driver had it running. The state is untrusted (it comes from a
    /// file): everything is checked as if the driver had written it.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(mem, device)?;
        t.restore_in_place(state)?;
        Ok(t)
    }

    /// Put saved `state` into this transport (VM rollback in place, or a fresh
    /// transport): an active device is reset first (vsock drops its connections), then
    /// the state is checked and applied as in [`Self::restore`].
    pub fn restore_in_place(&mut self, state: &MmioState) -> Result<(), MmioError> {
        self.reset();
        let t = self;
        let bad = |m: String| Err(MmioError::BadState(m));
        if state.device_type != t.device_type {
            return bad(format!(
                "device type {} saved, {} present",
                state.device_type, t.device_type
            ));
        }
        if state.queues.len() != t.queues.len() {
            return bad(format!("{} queues saved", state.queues.len()));
        }
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_NEEDS_RESET
            | VIRTIO_CONFIG_S_FAILED;
        if state.status & !known != 0 {
            return bad(format!("unknown status bits {:#x}", state.status));
        }
        t.acked_features = state.acked_features;
        if state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !t.features_acceptable() {
            return bad(format!("features {:#x} not offered", state.acked_features));
        }
        t.features_sel = state.features_sel;
        t.acked_features_sel = state.acked_features_sel;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        for (q, s) in t.queues.iter_mut().zip(&state.queues) {
            *q = QueueConfig {
                size: s.size,
                ready: s.ready,
                desc: s.desc,
                driver: s.driver,
                device: s.device,
            };
        }
        let running = VIRTIO_CONFIG_S_DRIVER_OK;
        let broken = VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED;
        if state.status & running != 0 && state.status & broken == 0 {
            let positions: Vec<_> = state
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            t.activate_at(Some(&positions))
                .map_err(|e| MmioError::BadState(format!("re-activation failed: {e}")))?;
        }
        t.status = state.status;
        t.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }
}

impl Persist for Mutex<MmioTransport> {
    type State = MmioState;
    type Error = DeviceStateError;

    fn save(&self) -> Result<MmioState, DeviceStateError> {
        Ok(self.lock().unwrap_or_else(|e| e.into_inner()).save_state())
    }

    fn restore(&self, state: &MmioState) -> Result<(), DeviceStateError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_in_place(state)
            .map_err(|e| DeviceStateError::new("virtio-mmio", e))
    }
}
