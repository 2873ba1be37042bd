//! How the VM ends: why it stopped ([`VmStop`]) and where vCPUs and devices report it
//! ([`StopNotifier`], read by the event loop). Below every layer that reports a stop.

use std::sync::mpsc::{self, Receiver, Sender};

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped, as reported by a vCPU or a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStop {
    /// The guest asked for a reset (i8042 0xFE, `reboot`, `poweroff -f` with the
    /// image's patch): a clean end, exit status 0.
    Reset,
    /// KVM reported a shutdown (triple fault) or a system-event shutdown: exit status 0.
    Shutdown,
    /// The VMM cannot continue: one line saying why; exit status 1.
    Error(String),
    /// The VMM received a termination signal (SIGTERM, SIGINT, SIGHUP); exit status
    /// 128 + signal, after cleaning up.
    Terminated(i32),
}

/// Where vCPU threads report that the VM stopped: a channel plus an eventfd the event
/// loop waits on.
#[derive(Debug)]
pub struct StopNotifier {
    evt: EventFd,
    tx: Sender<VmStop>,
}

impl StopNotifier {
    /// A notifier and the receiving end for the event loop.
    pub fn new() -> std::io::Result<(Self, Receiver<VmStop>)> {
        let (tx, rx) = mpsc::channel();
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok((Self { evt, tx }, rx))
    }

    /// The eventfd that becomes readable when a stop is reported.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// A second handle to the same channel and eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
            tx: self.tx.clone(),
        })
    }

    /// Report a stop. Failure means the event loop is already gone; nothing to do then.
    pub fn notify(&self, why: VmStop) {
        let _ = self.tx.send(why);
        let _ = self.evt.write(1);
    }
}
