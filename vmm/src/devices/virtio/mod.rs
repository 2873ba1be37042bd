//! virtio devices: the virtio-mmio transport ([`mmio::MmioTransport`]), the device trait
//! every virtio device implements ([`VirtioDevice`]), the interrupt object the transport
//! and the device share ([`VirtioInterrupt`]), and the virtio-vsock device ([`vsock`]).
//!
//! How a device reaches the guest: the VMM wraps it in an `MmioTransport`, inserts the
//! transport on the MMIO bus at a 4 KiB window, registers the transport's interrupt
//! `EventFd` with KVM as an irqfd on the device's IRQ, and tells the kernel about the
//! window with [`cmdline_device`]. Queue notifications arrive as MMIO writes to
//! `QueueNotify`; the transport turns each into a write on the queue's `EventFd`, which
//! the device's event handler (on the VMM's event loop) waits on. Registering the same
//! `EventFd`s with KVM as ioeventfds later removes that MMIO exit without changing the
//! device.

pub mod mmio;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Size of the MMIO window of one virtio-mmio device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Format the kernel command-line word that announces one virtio-mmio device:
/// `virtio_mmio.device=4K@0xd0000000:5` (needs `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn cmdline_device(size: u64, base: u64, irq: u32) -> String {
    let size = if size % 1024 == 0 {
        format!("{}K", size / 1024)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

/// Errors of device activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver left a queue the device needs not ready.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// The device was activated twice without a reset.
    #[error("device already activated")]
    AlreadyActive,
    /// Anything else the device could not set up.
    #[error("activation failed: {0}")]
    Other(String),
}

/// The interrupt line of one virtio-mmio device: the `InterruptStatus` bits the guest
/// reads, and the `EventFd` the VMM registers with KVM as an irqfd.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl VirtioInterrupt {
    /// A new interrupt with its own non-blocking `EventFd`.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Raise the interrupt for a reason (`VIRTIO_MMIO_INT_VRING` for used buffers,
    /// `VIRTIO_MMIO_INT_CONFIG` for a configuration or status change).
    pub fn trigger(&self, reason: u32) -> io::Result<()> {
        self.status.fetch_or(reason, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current `InterruptStatus` bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clear the bits the guest acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The `EventFd` to register with KVM as irqfd (`VmFd::register_irqfd(evt, gsi)`).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Put back saved `InterruptStatus` bits (snapshot restore).
    fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// A virtio device behind a transport. The transport owns the register state machine
/// and the queue configuration; the device owns what the queues carry.
pub trait VirtioDevice: Send {
    /// virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One `EventFd` per queue, signalled when the driver notifies that queue. The
    /// transport clones them at creation; the device's event handler reads them.
    fn queue_events(&self) -> &[EventFd];
    /// Read device-specific configuration space at `offset` (unknown bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device-specific configuration space (read-only devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device with the queues the driver configured (already validated by the
    /// transport against guest memory) and the features the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stop the device and drop the queues (driver wrote 0 to `Status`).
    fn reset(&mut self);
    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// `(next_avail, next_used)` of each queue while active, for snapshots; empty when
    /// not active.
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
}

/// Allows at most `burst` log lines per `period_secs` from one call site, so a guest
/// cannot flood the host log. Counts what it suppressed and reports it with the next
/// line let through.
#[derive(Debug)]
pub struct LogRateLimiter {
    window: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU32,
    burst: u32,
    period_secs: u64,
}

impl LogRateLimiter {
    /// A limiter for `burst` lines per `period_secs`.
    pub const fn new(burst: u32, period_secs: u64) -> Self {
        Self {
            window: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU32::new(0),
            burst,
            period_secs,
        }
    }

    /// `Some(suppressed_so_far)` if a line may be logged now.
    pub fn check(&self) -> Option<u32> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let window = now / self.period_secs.max(1);
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `log::warn!` limited to 10 lines per 5 s per call site, for paths the guest drives.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::devices::virtio::LogRateLimiter =
            $crate::devices::virtio::LogRateLimiter::new(10, 5);
        if let Some(suppressed) = LIMITER.check() {
            if suppressed > 0 {
                log::warn!("({} similar lines suppressed)", suppressed);
            }
            log::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_word() {
        assert_eq!(
            cmdline_device(MMIO_WINDOW_SIZE, 0xc000_0000, 5),
            "virtio_mmio.device=4K@0xc0000000:5"
        );
        assert_eq!(
            cmdline_device(0x200, 0xd000_1000, 12),
            "virtio_mmio.device=512@0xd0001000:12"
        );
    }

    #[test]
    fn interrupt_status_and_eventfd() {
        let irq = VirtioInterrupt::new().expect("eventfd");
        irq.trigger(VIRTIO_MMIO_INT_VRING).expect("trigger");
        irq.trigger(VIRTIO_MMIO_INT_CONFIG).expect("trigger");
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.eventfd().read().expect("signalled"), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn rate_limiter_caps_a_burst() {
        let l = LogRateLimiter::new(3, 3600);
        let allowed = (0..10).filter(|_| l.check().is_some()).count();
        // Only fails if the test straddles an hour boundary, where 3 more may pass.
        assert!(allowed == 3 || allowed == 6, "{allowed}");
    }
}
