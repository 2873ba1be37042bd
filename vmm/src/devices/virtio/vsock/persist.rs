//! The vsock device's state across a VM snapshot: none is kept. As Firecracker does,
//! a restored (or rolled-back) device tells the guest its transport was reset: the guest
//! drops its sockets and the agent reconnects. Host connections of the old VMM cannot
//! be carried over anyway.

use std::sync::Mutex;

use super::Vsock;
use crate::state::{DeviceStateError, Persist};

impl Persist for Mutex<Vsock> {
    type State = ();
    type Error = DeviceStateError;

    fn save(&self) -> Result<(), DeviceStateError> {
        Ok(())
    }

    /// Send the guest a transport-reset event (after the transport was restored).
    fn restore(&self, _: &()) -> Result<(), DeviceStateError> {
        if !self
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_transport_reset()
        {
            log::info!("vsock: no transport reset sent (device inactive or no event buffer)");
        }
        Ok(())
    }
}
