//! The i8042 keyboard controller, reduced to what a VMM needs: the guest's CPU reset
//! command (0xFE to port 0x64), which Linux uses for `reboot=k` and which the image's
//! `poweroff -f` patch also uses. A reset ends the VM cleanly (exit status 0).
//!
//! It has no state, so unlike the serial port and the virtio devices it has no
//! `persist.rs`: vm-superio's `I8042Device` holds only the reset trigger, reads return 0
//! whatever was written before, and a command other than reset is ignored. A restored VM
//! gets a new one that answers the guest exactly as the saved one would have.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;
use crate::stop::{StopNotifier, VmStop};

/// Trigger that reports a guest reset to the event loop.
#[derive(Debug)]
pub struct ResetTrigger(pub StopNotifier);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.notify(VmStop::Reset);
        Ok(())
    }
}

/// The i8042 on the port-I/O bus at 0x60..=0x64.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    /// An i8042 whose reset command is reported through `stop`.
    pub fn new(stop: StopNotifier) -> Self {
        Self {
            dev: I8042Device::new(ResetTrigger(stop)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            // Status 0: output buffer empty, input buffer empty: the guest may write.
            *b = self.dev.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let ([value], Ok(off)) = (data, u8::try_from(offset)) {
            let Ok(()) = self.dev.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reports_a_reset() {
        let (n, rx) = StopNotifier::new().expect("eventfd");
        let mut d = I8042::new(n.try_clone().expect("clone"));
        let mut status = [0xffu8];
        d.read(0x60, 4, &mut status);
        assert_eq!(status, [0]);
        d.write(0x60, 0, &[0xfe]); // data port: not a command
        d.write(0x60, 4, &[0xd1]); // another command
        assert!(rx.try_recv().is_err());
        d.write(0x60, 4, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(VmStop::Reset));
        assert_eq!(n.eventfd().read().expect("signalled"), 1);
    }
}
