//! The [`Persist`] trait every stateful piece of the VM implements (each device in its
//! folder's `persist.rs`, the KVM VM and vCPUs in `crate::persist`), as Firecracker's
//! snapshot crate has it. Below every layer that has state, so each keeps its own;
//! `crate::persist` gathers them into the VM state blob.

/// Save and restore in place, the way each piece of the VM keeps its state.
pub trait Persist {
    /// The saved state.
    type State;
    /// Why saving or restoring failed.
    type Error;
    /// Capture the state (the VM is paused).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Put `state` back (the VM is paused).
    fn restore(&self, state: &Self::State) -> Result<(), Self::Error>;
}

/// A device refused its saved state, or could not save it.
#[derive(Debug, thiserror::Error)]
#[error("device {device}: {source}")]
pub struct DeviceStateError {
    /// Which device.
    pub device: &'static str,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl DeviceStateError {
    /// `device` failed because of `source`.
    pub fn new(
        device: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            device,
            source: source.into(),
        }
    }
}
