//! Legacy PC devices on the port-I/O bus: the COM1 16550 serial console and the i8042
//! (only its CPU-reset command), plus the host-terminal side of the console.

pub mod i8042;
pub mod serial;
pub mod terminal;
pub mod watch;

pub use i8042::I8042;
pub use serial::{SerialDevice, StdinInput};
pub use terminal::RawModeGuard;

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio interrupt trigger backed by an eventfd (registered with KVM as an
/// irqfd, so triggering raises the guest IRQ without a VMM round trip).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
