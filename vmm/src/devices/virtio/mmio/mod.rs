//! The virtio-mmio transport, virtio 1.x modern interface only (`Version` = 2).
//!
//! The transport owns the register file and the driver state machine; queues are
//! configured here and handed to the device at `DRIVER_OK`, after they were checked
//! against guest memory. A driver that breaks the protocol (bits set out of order,
//! bad queue sizes or addresses) gets `DEVICE_NEEDS_RESET` and a configuration-change
//! interrupt, as the spec asks; nothing it writes can panic the VMM.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
};
use crate::devices::bus::BusDevice;
use crate::guest_warn;
use crate::memory::GuestMemoryMmap;

mod persist;
pub use persist::{MmioState, QueueSnapshot};

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("pmsn").
pub const VENDOR_ID: u32 = 0x6e73_6d70;

/// Register offsets (virtio 1.x, section 4.2.2).
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Errors of building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared a queue size virtio-queue refuses.
    #[error("device queue {index} has invalid max size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum.
        size: u16,
    },
    /// The device has not one notify `EventFd` per queue.
    #[error("device has {events} queue events for {queues} queues")]
    QueueEvents {
        /// Number of event fds.
        events: usize,
        /// Number of queues.
        queues: usize,
    },
    /// An eventfd could not be created or cloned.
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// A saved state does not fit this device or guest memory.
    #[error("cannot restore virtio-mmio state: {0}")]
    BadState(String),
}

/// Queue configuration as the driver writes it, applied to a `Queue` only at
/// activation so bad values are judged once, all together.
#[derive(Debug, Clone, Copy, Default)]
struct QueueConfig {
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    queue_max: Vec<u16>,
    queues: Vec<QueueConfig>,
    device_type: u32,
    avail_features: u64,
    status: u32,
    features_sel: u32,
    acked_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

fn lock(dev: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A poisoned device lock means another thread panicked inside device code; the
    // state is still the best there is and the VMM is going down anyway.
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl MmioTransport {
    /// Wrap `device`. `mem` is the guest memory the queues live in. The transport creates
    /// the device's interrupt; register [`MmioTransport::interrupt`]'s eventfd as irqfd.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, queue_max, queue_evts) = {
            let d = lock(&device);
            let evts = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()?;
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
                evts,
            )
        };
        if queue_evts.len() != queue_max.len() {
            return Err(MmioError::QueueEvents {
                events: queue_evts.len(),
                queues: queue_max.len(),
            });
        }
        for (index, &size) in queue_max.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(MmioError::QueueMaxSize { index, size });
            }
        }
        let queues = queue_max
            .iter()
            .map(|&size| QueueConfig {
                size,
                ..Default::default()
            })
            .collect();
        Ok(Self {
            device,
            mem,
            interrupt: VirtioInterrupt::new()?,
            queue_evts,
            queue_max,
            queues,
            device_type,
            avail_features,
            status: 0,
            features_sel: 0,
            acked_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
        })
    }

    /// The interrupt shared with the device; `interrupt().eventfd()` is the irqfd.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The driver status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The queue notify eventfds, in queue order (for ioeventfd registration at
    /// `base + 0x50` with datamatch = queue index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has(VIRTIO_CONFIG_S_FEATURES_OK) && !self.has(VIRTIO_CONFIG_S_DRIVER_OK)
    }

    fn fail(&mut self, why: &str) {
        guest_warn!(
            "virtio-mmio (device type {}): {why}; device needs reset",
            self.device_type
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG) {
            guest_warn!("virtio-mmio: cannot signal interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        {
            let mut d = lock(&self.device);
            if d.is_activated() {
                d.reset();
            }
        }
        self.status = 0;
        self.features_sel = 0;
        self.acked_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for (q, &max) in self.queues.iter_mut().zip(&self.queue_max) {
            *q = QueueConfig {
                size: max,
                ..Default::default()
            };
        }
        self.interrupt.clear();
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            // The driver gave up on the device; keep it inert until reset.
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            guest_warn!("virtio-mmio: status write {new:#x} ignored until reset");
            return;
        }
        let old = self.status;
        if new & old != old {
            return self.fail("driver cleared status bits without a reset");
        }
        let added = new & !old;
        // The bits must be set in the order the spec gives (3.1.1); each may come in
        // its own write or together with the ones before it.
        let order = [
            VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_DRIVER,
            VIRTIO_CONFIG_S_FEATURES_OK,
            VIRTIO_CONFIG_S_DRIVER_OK,
        ];
        let known = order.iter().fold(0, |a, b| a | b);
        if added & !known != 0 {
            return self.fail("driver set unknown status bits");
        }
        let mut have = old;
        for bit in order {
            if added & bit == 0 {
                continue;
            }
            let prereq = order
                .iter()
                .take_while(|&&b| b != bit)
                .fold(0, |a, b| a | b);
            if have & prereq != prereq {
                return self.fail("driver set status bits out of order");
            }
            match bit {
                VIRTIO_CONFIG_S_FEATURES_OK if !self.features_acceptable() => {
                    // Leave FEATURES_OK clear: the driver re-reads it and gives up.
                    guest_warn!(
                        "virtio-mmio: refusing driver features {:#x} (offered {:#x})",
                        self.acked_features,
                        self.avail_features
                    );
                    self.status = have;
                    return;
                }
                VIRTIO_CONFIG_S_DRIVER_OK => {
                    if let Err(e) = self.activate() {
                        self.status = have;
                        return self.fail(&format!("activation failed: {e}"));
                    }
                }
                _ => {}
            }
            have |= bit;
        }
        self.status = have;
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.avail_features == 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Build and check the queues, then hand them to the device.
    fn activate(&mut self) -> Result<(), ActivateError> {
        self.activate_at(None)
    }

    /// `activate`, with the ring positions of a restored snapshot.
    fn activate_at(&mut self, positions: Option<&[(u16, u16)]>) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (cfg, &max)) in self.queues.iter().zip(&self.queue_max).enumerate() {
            let bad = |what: &str| ActivateError::Other(format!("queue {i}: {what}"));
            let mut q = Queue::new(max).map_err(|e| bad(&format!("{e:?}")))?;
            if cfg.ready {
                q.try_set_size(cfg.size)
                    .map_err(|_| bad(&format!("size {} invalid (max {max})", cfg.size)))?;
                q.try_set_desc_table_address(GuestAddress(cfg.desc))
                    .map_err(|_| bad("descriptor table misaligned"))?;
                q.try_set_avail_ring_address(GuestAddress(cfg.driver))
                    .map_err(|_| bad("driver area misaligned"))?;
                q.try_set_used_ring_address(GuestAddress(cfg.device))
                    .map_err(|_| bad("device area misaligned"))?;
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(bad("rings are not inside guest memory"));
                }
                if let Some(&(next_avail, next_used)) = positions.and_then(|p| p.get(i)) {
                    q.set_next_avail(next_avail);
                    q.set_next_used(next_used);
                }
            }
            queues.push(q);
        }
        lock(&self.device).activate(
            self.mem.clone(),
            queues,
            self.acked_features,
            self.interrupt.clone(),
        )?;
        // Some drivers post buffers and notify before DRIVER_OK, when notifications
        // are ignored: have the device look at every queue once now.
        for evt in &self.queue_evts {
            if let Err(e) = evt.write(1) {
                log::warn!("virtio-mmio: queue eventfd after activation: {e}");
            }
        }
        Ok(())
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queue_max
                .get(self.queue_sel as usize)
                .map_or(0, |&m| u32::from(m)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: length reads as all ones ("does not exist").
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let set_half = |slot: &mut u64, high: bool| {
            *slot = if high {
                (*slot & 0xffff_ffff) | (u64::from(v) << 32)
            } else {
                (*slot & !0xffff_ffff) | u64::from(v)
            };
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.acked_features_sel = v,
            reg::DRIVER_FEATURES => {
                if !self.has(VIRTIO_CONFIG_S_DRIVER) || self.has(VIRTIO_CONFIG_S_FEATURES_OK) {
                    guest_warn!("virtio-mmio: feature write outside feature negotiation");
                    return;
                }
                match self.acked_features_sel {
                    0 => set_half(&mut self.acked_features, false),
                    1 => set_half(&mut self.acked_features, true),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                if !self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
                    return;
                }
                match self.queue_evts.get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            guest_warn!("virtio-mmio: queue notify eventfd: {e}");
                        }
                    }
                    None => guest_warn!("virtio-mmio: notify of nonexistent queue {v}"),
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_config_allowed() {
                    guest_warn!("virtio-mmio: queue register write outside queue setup");
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    guest_warn!("virtio-mmio: queue register write for nonexistent queue");
                    return;
                };
                match offset {
                    // Truncation is deliberate: a value above u16 can never be valid and
                    // is refused at activation anyway, so map it to 0 (invalid).
                    reg::QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
                    reg::QUEUE_READY => q.ready = v == 1,
                    reg::QUEUE_DESC_LOW => set_half(&mut q.desc, false),
                    reg::QUEUE_DESC_HIGH => set_half(&mut q.desc, true),
                    reg::QUEUE_DRIVER_LOW => set_half(&mut q.driver, false),
                    reg::QUEUE_DRIVER_HIGH => set_half(&mut q.driver, true),
                    reg::QUEUE_DEVICE_LOW => set_half(&mut q.device, false),
                    _ => set_half(&mut q.device, true),
                }
            }
            _ => guest_warn!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(out) if offset % 4 == 0 => *out = self.read_reg(offset).to_le_bytes(),
            _ => {
                guest_warn!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Config writes may change what the driver reads; bump the generation so a
            // multi-read of config space notices.
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(v) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(v)),
            _ => guest_warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x10_0000;

    #[derive(Default)]
    struct Activation {
        queues: Vec<(u16, u64, u64, u64, bool)>,
        positions: Vec<(u16, u16)>,
        features: u64,
    }

    struct Dummy {
        evts: Vec<EventFd>,
        max: Vec<u16>,
        config: [u8; 8],
        activated: Option<Activation>,
        resets: usize,
        require_all_ready: bool,
    }

    impl Dummy {
        fn new() -> Self {
            Self {
                evts: (0..2)
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                    .collect(),
                max: vec![16, 8],
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activated: None,
                resets: 0,
                require_all_ready: true,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
            acked_features: u64,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), ActivateError> {
            if let Some(i) = queues.iter().position(|q| !q.ready()) {
                if self.require_all_ready {
                    return Err(ActivateError::QueueNotReady(i));
                }
            }
            self.activated = Some(Activation {
                queues: queues
                    .iter()
                    .map(|q| {
                        (
                            q.size(),
                            q.desc_table(),
                            q.avail_ring(),
                            q.used_ring(),
                            q.ready(),
                        )
                    })
                    .collect(),
                // Pretend the device made progress, so restore has positions to carry.
                positions: queues
                    .iter()
                    .map(|q| {
                        (
                            q.next_avail().wrapping_add(3),
                            q.next_used().wrapping_add(2),
                        )
                    })
                    .collect(),
                features: acked_features,
            });
            Ok(())
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn queue_positions(&self) -> Vec<(u16, u16)> {
            self.activated
                .as_ref()
                .map_or_else(Vec::new, |a| a.positions.clone())
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::new(mem, dev.clone()).expect("transport");
        (t, dev)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(0, off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, reg::STATUS, 0);
        wr(t, reg::STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        wr(
            t,
            reg::STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, reg::STATUS, 0b1011);
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, idx);
        wr(t, reg::QUEUE_NUM, size);
        wr(t, reg::QUEUE_DESC_LOW, base as u32);
        wr(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;

    #[test]
    fn identity_registers_and_config() {
        let (mut t, _) = setup();
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0b101);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 2];
        t.read(0, 0x103, &mut b);
        assert_eq!(b, [4, 5]);
        // Narrow register reads return 0 instead of half a register.
        let mut b = [0xffu8; 2];
        t.read(0, reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn full_driver_sequence_activates_and_notifies() {
        let (mut t, dev) = setup();
        negotiate(&mut t, V1 | 0b100);
        assert_eq!(rd(&mut t, reg::STATUS), 0b1011);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 4, 0x2_0000);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Notify before DRIVER_OK is ignored.
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert!(dev.lock().expect("lock").evts[1].read().is_err());
        wr(&mut t, reg::STATUS, 0b1111);
        assert_eq!(rd(&mut t, reg::STATUS), 0b1111);
        // Activation has the device look at every queue once.
        for evt in &dev.lock().expect("lock").evts {
            assert_eq!(evt.read().expect("kicked at activation"), 1);
        }
        {
            let d = dev.lock().expect("lock");
            let a = d.activated.as_ref().expect("activated");
            assert_eq!(a.features, V1 | 0b100);
            assert_eq!(a.queues[0], (16, 0x1_0000, 0x1_1000, 0x1_2000, true));
            assert_eq!(a.queues[1], (4, 0x2_0000, 0x2_1000, 0x2_2000, true));
        }
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(
            dev.lock().expect("lock").evts[1].read().expect("notified"),
            1
        );
        wr(&mut t, reg::QUEUE_NOTIFY, 9); // nonexistent queue: ignored
                                          // Queue config is frozen after DRIVER_OK.
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        // Interrupt status and ack.
        t.interrupt().trigger(1).expect("irq");
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset.
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        let d = dev.lock().expect("lock");
        assert!(d.activated.is_none());
        assert_eq!(d.resets, 1);
    }

    #[test]
    fn features_without_version_1_or_unoffered_are_refused() {
        let (mut t, _) = setup();
        negotiate(&mut t, 0b1);
        assert_eq!(rd(&mut t, reg::STATUS), 0b0011, "legacy driver refused");
        negotiate(&mut t, V1 | 0b10);
        assert_eq!(rd(&mut t, reg::STATUS), 0b0011, "unoffered feature refused");
        negotiate(&mut t, V1);
        assert_eq!(rd(&mut t, reg::STATUS), 0b1011);
        // Feature writes after FEATURES_OK do not change the accepted set.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0b101);
        assert_eq!(t.acked_features, V1);
    }

    #[test]
    fn out_of_order_status_needs_reset() {
        for seq in [
            &[VIRTIO_CONFIG_S_DRIVER][..],
            &[1, 1 | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_DRIVER],
            &[1, 3, 1],    // clears a bit
            &[1, 3, 0x13], // unknown bit
        ] {
            let (mut t, dev) = setup();
            for &s in seq {
                wr(&mut t, reg::STATUS, s);
            }
            assert_ne!(
                rd(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
                0,
                "{seq:?}"
            );
            assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
            assert!(dev.lock().expect("lock").activated.is_none());
            // Further status writes are ignored until reset; reset recovers.
            wr(&mut t, reg::STATUS, 0b1111);
            assert!(dev.lock().expect("lock").activated.is_none());
            wr(&mut t, reg::STATUS, 0);
            assert_eq!(rd(&mut t, reg::STATUS), 0);
            negotiate(&mut t, V1);
            assert_eq!(rd(&mut t, reg::STATUS), 0b1011);
        }
    }

    #[test]
    fn bad_queues_fail_activation() {
        let cases: [(u32, u64, &str); 5] = [
            (32, 0x1_0000, "size above max"),
            (12, 0x1_0000, "size not a power of two"),
            (0, 0x1_0000, "size zero"),
            (16, 0x1_0008, "misaligned descriptor table"),
            (16, MEM_SIZE as u64 - 0x100, "rings outside memory"),
        ];
        for (size, base, what) in cases {
            let (mut t, dev) = setup();
            negotiate(&mut t, V1);
            setup_queue(&mut t, 0, size, base);
            setup_queue(&mut t, 1, 8, 0x3_0000);
            wr(&mut t, reg::STATUS, 0b1111);
            let st = rd(&mut t, reg::STATUS);
            assert_eq!(st & VIRTIO_CONFIG_S_DRIVER_OK, 0, "{what}");
            assert_ne!(st & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{what}");
            assert!(dev.lock().expect("lock").activated.is_none(), "{what}");
        }
        // Huge addresses (high half) are refused too.
        let (mut t, _) = setup();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0xffff_ffff_0000_0000);
        setup_queue(&mut t, 1, 8, 0x3_0000);
        wr(&mut t, reg::STATUS, 0b1111);
        assert_ne!(rd(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        // A device refusing a not-ready queue also ends in NEEDS_RESET.
        let (mut t, dev) = setup();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, reg::STATUS, 0b1111);
        assert_ne!(rd(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(dev.lock().expect("lock").activated.is_none());
    }

    #[test]
    fn queue_writes_outside_setup_phase_are_ignored() {
        let (mut t, _) = setup();
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        negotiate(&mut t, V1);
        wr(&mut t, reg::QUEUE_SEL, 5);
        wr(&mut t, reg::QUEUE_READY, 1); // nonexistent queue
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        wr(&mut t, reg::QUEUE_NUM, 0x1_0010); // above u16: stored as invalid
        assert_eq!(t.queues[0].size, 0);
    }

    #[test]
    fn failed_bit_keeps_device_inert() {
        let (mut t, dev) = setup();
        negotiate(&mut t, V1);
        wr(&mut t, reg::STATUS, 0b1011 | VIRTIO_CONFIG_S_FAILED);
        assert_ne!(rd(&mut t, reg::STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
        assert!(dev.lock().expect("lock").activated.is_none());
    }

    // The saved state (persist.rs).

    fn running() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mut t, dev) = setup();
        negotiate(&mut t, V1 | 0b100);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 4, 0x2_0000);
        wr(&mut t, reg::STATUS, 0b1111);
        assert_eq!(rd(&mut t, reg::STATUS), 0b1111);
        (t, dev)
    }

    #[test]
    fn state_round_trip_reactivates_at_saved_positions() {
        let (t, _) = running();
        t.interrupt().trigger(VIRTIO_MMIO_INT_CONFIG).expect("irq");
        let state = t.save_state();
        assert_eq!(state.queues[0].next_avail, 3);
        assert_eq!(state.queues[1].next_used, 2);
        let json = serde_json::to_string(&state).expect("serialize");
        let state: MmioState = serde_json::from_str(&json).expect("deserialize");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
        let dev2 = Arc::new(Mutex::new(Dummy::new()));
        let mut t2 = MmioTransport::restore(mem, dev2.clone(), &state).expect("restore");
        assert_eq!(rd(&mut t2, reg::STATUS), 0b1111);
        assert_eq!(rd(&mut t2, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        let d = dev2.lock().expect("lock");
        let a = d.activated.as_ref().expect("re-activated");
        assert_eq!(a.features, V1 | 0b100);
        assert_eq!(a.queues[1], (4, 0x2_0000, 0x2_1000, 0x2_2000, true));
        // The dummy adds (3, 2) to what it was given: given (3, 2), reports (6, 4).
        assert_eq!(a.positions, vec![(6, 4), (6, 4)]);
    }

    #[test]
    fn restore_in_place_resets_then_reactivates_the_same_device() {
        let (mut t, dev) = running();
        let state = t.save_state();
        // The driver moves on: resets the device and leaves it unconfigured.
        wr(&mut t, reg::STATUS, 0);
        assert!(dev.lock().expect("lock").activated.is_none());
        t.restore_in_place(&state).expect("restore in place");
        assert_eq!(rd(&mut t, reg::STATUS), 0b1111);
        {
            let d = dev.lock().expect("lock");
            let a = d.activated.as_ref().expect("re-activated");
            assert_eq!(a.queues[0], (16, 0x1_0000, 0x1_1000, 0x1_2000, true));
        }
        // Restoring over a running device resets it first.
        let resets = dev.lock().expect("lock").resets;
        t.restore_in_place(&state).expect("again");
        assert_eq!(dev.lock().expect("lock").resets, resets + 1);
        assert!(dev.lock().expect("lock").activated.is_some());
    }

    #[test]
    fn hostile_states_are_refused() {
        let (t, _) = running();
        let good = t.save_state();
        let mem = || GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
        type Mutation = Box<dyn Fn(&mut MmioState)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("device type", Box::new(|s| s.device_type = 19)),
            ("queue count", Box::new(|s| s.queues.truncate(1))),
            ("status bits", Box::new(|s| s.status |= 0x10)),
            ("features", Box::new(|s| s.acked_features = 0b10)),
            (
                "ring outside memory",
                Box::new(|s| s.queues[0].desc = 1 << 40),
            ),
            ("queue size", Box::new(|s| s.queues[1].size = 3)),
        ];
        for (what, f) in cases {
            let mut st = good.clone();
            f(&mut st);
            let dev = Arc::new(Mutex::new(Dummy::new()));
            let r = MmioTransport::restore(mem(), dev.clone(), &st);
            assert!(matches!(r, Err(MmioError::BadState(_))), "{what}");
            assert!(dev.lock().expect("lock").activated.is_none(), "{what}");
        }
        // A device that was never started restores inert.
        let (fresh, _) = setup();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::restore(mem(), dev.clone(), &fresh.save_state()).expect("restore");
        assert_eq!(t.status(), 0);
        assert!(dev.lock().expect("lock").activated.is_none());
    }
}
