//! Every device of a VM, wired once, the same way for boot and restore: the port-I/O
//! bus (serial console, i8042), the MMIO bus with its slots (virtio-mmio transports,
//! announced on the kernel command line), their interrupts (irqfd), queue
//! notifications (ioeventfd) and the event loop subscribers. The builder owns one
//! [`DeviceManager`] per VM; the controller later sees the devices whose state VM
//! snapshots keep ([`DeviceManager::serial`], [`DeviceManager::virtio_slots`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::*;
use crate::controller::process::{guest_phys_pages, ProcessService};
use crate::controller::VirtioSlot;
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::legacy::{EventFdTrigger, SerialDevice, I8042};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::{AgentServiceFactory, Vsock};
use crate::event_loop::Subscriber;
use crate::stop::StopNotifier;
use crate::unix_socket::{RemoveOnDrop, SocketFile};
use crate::vstate::vm::{Vm, VmError};

/// The guest's vsock CID (2 is the host; 3 is the first guest CID).
pub const GUEST_CID: u64 = 3;

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// Errors while attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vsock device could not be created (socket path in use, ...).
    #[error("cannot create the vsock device on {path}")]
    Vsock {
        /// The host socket path.
        path: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A device could not be placed on a bus.
    #[error("cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// No MMIO window or IRQ left.
    #[error("no MMIO address or IRQ left for another device")]
    NoDeviceSlot,
    /// The kernel command line cannot take the device.
    #[error("cannot announce the device on the kernel command line: {0}")]
    Cmdline(String),
    /// Creating or cloning an eventfd.
    #[error("cannot create an eventfd")]
    Eventfd(#[source] std::io::Error),
    /// An irqfd could not be registered.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// An ioeventfd could not be registered.
    #[error("cannot register a queue notification with KVM: {0}")]
    IoEvent(#[source] kvm_ioctls::Error),
}

/// Where an MMIO device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical base address.
    pub addr: u64,
    /// Window size.
    pub len: u64,
    /// IOAPIC input (GSI) for its interrupt.
    pub irq: u32,
}

/// The devices of one VM.
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    next_mmio: u64,
    next_irq: u32,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<VirtioSlot>,
    subscribers: Vec<Subscriber>,
    agent_uds: Option<PathBuf>,
    socket_files: Vec<RemoveOnDrop>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("virtio", &self.virtio.len())
            .field("agent_uds", &self.agent_uds)
            .finish()
    }
}

impl DeviceManager {
    /// The legacy devices every VM has: the serial port (console output to `console`,
    /// interrupt through an irqfd) and the i8042 (a guest reset reports through `stop`).
    pub fn new(
        vm: &Vm,
        console: Box<dyn std::io::Write + Send>,
        stop: StopNotifier,
    ) -> Result<Self, DeviceError> {
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Eventfd)?),
            console,
        )));
        let irq = {
            let s = serial.lock().unwrap_or_else(|e| e.into_inner());
            s.irq_eventfd().try_clone().map_err(DeviceError::Eventfd)?
        };
        vm.register_irqfd(&irq, SERIAL_IRQ)?;
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(stop))),
            I8042_PORT,
            I8042_PORT_LEN,
        )?;
        Ok(Self {
            pio,
            mmio: Bus::new(),
            next_mmio: MMIO_DEVICES_START,
            next_irq: IRQ_BASE,
            serial,
            virtio: Vec::new(),
            subscribers: Vec::new(),
            agent_uds: None,
            socket_files: Vec::new(),
        })
    }

    /// The serial port (console input, VM state).
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    /// The port-I/O bus, to add more legacy devices before the vCPUs exist.
    pub fn pio_bus_mut(&mut self) -> &mut Bus {
        &mut self.pio
    }

    /// Place a device on the MMIO bus: the next free `MMIO_DEVICE_SIZE` window in the
    /// 32-bit gap and the next free IRQ, announced on the kernel command line
    /// (`virtio_mmio.device=4K@0x...:IRQ`; a restored guest ignores it).
    pub fn add_mmio_device(
        &mut self,
        cmdline: &mut Cmdline,
        dev: SharedDevice,
    ) -> Result<MmioSlot, DeviceError> {
        let addr = self.next_mmio;
        let irq = self.next_irq;
        if addr + MMIO_DEVICE_SIZE > MMIO_DEVICES_END || irq > IRQ_MAX {
            return Err(DeviceError::NoDeviceSlot);
        }
        self.mmio.insert(dev, addr, MMIO_DEVICE_SIZE)?;
        cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(addr), irq, None)
            .map_err(|e| DeviceError::Cmdline(e.to_string()))?;
        self.next_mmio += MMIO_DEVICE_SIZE;
        self.next_irq += 1;
        Ok(MmioSlot {
            addr,
            len: MMIO_DEVICE_SIZE,
            irq,
        })
    }

    /// Attach a virtio-vsock device whose host side listens on `uds_path`, with the
    /// snapshot service `service` on the agent protocol's port. The host socket file
    /// is removed when the device manager's owner (the running VM) goes.
    pub fn attach_vsock(
        &mut self,
        vm: &Vm,
        cmdline: &mut Cmdline,
        uds_path: &Path,
        service: ProcessService,
    ) -> Result<(), DeviceError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Vsock {
            path: uds_path.display().to_string(),
            source,
        };
        let mut vsock = Vsock::new(GUEST_CID, uds_path).map_err(|e| err(e.into()))?;
        let socket_file: SocketFile = vsock.muxer().socket_file().clone();
        // From here on, an error removes the socket file again.
        let socket_file = RemoveOnDrop(socket_file);
        let mem_bytes = service.mem_bytes();
        let service = Arc::new(Mutex::new(service));
        vsock
            .register_service(
                guest_agent::protocol::SNAPSHOT_SERVICE_PORT,
                Box::new(AgentServiceFactory::new(
                    service,
                    guest_phys_pages(mem_bytes),
                )),
            )
            .map_err(|e| err(e.into()))?;
        let vsock = Arc::new(Mutex::new(vsock));
        let transport =
            MmioTransport::new(vm.memory().clone(), vsock.clone()).map_err(|e| err(e.into()))?;
        let irq = transport
            .interrupt()
            .eventfd()
            .try_clone()
            .map_err(DeviceError::Eventfd)?;
        let notify: Vec<_> = transport
            .queue_events()
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<_, _>>()
            .map_err(DeviceError::Eventfd)?;
        let transport = Arc::new(Mutex::new(transport));
        let slot = self.add_mmio_device(cmdline, transport.clone())?;
        vm.register_irqfd(&irq, slot.irq)?;
        for (i, evt) in notify.iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY),
                    i as u32,
                )
                .map_err(DeviceError::IoEvent)?;
        }
        log::info!(
            "vsock: guest CID {GUEST_CID}, host socket {}, MMIO {:#x} IRQ {}",
            uds_path.display(),
            slot.addr,
            slot.irq
        );
        self.virtio.push(VirtioSlot {
            transport,
            vsock: Some(vsock.clone()),
        });
        self.subscribers.push(vsock);
        self.agent_uds = Some(uds_path.to_path_buf());
        self.socket_files.push(socket_file);
        Ok(())
    }

    /// The virtio devices in slot order (their transports' state is part of a VM
    /// snapshot).
    pub fn virtio_slots(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// Host socket of the vsock device, if there is one (to reach the guest agent).
    pub fn agent_uds(&self) -> Option<&Path> {
        self.agent_uds.as_deref()
    }

    /// The buses, shared by every vCPU once they are created.
    pub fn buses(&mut self) -> (Arc<Bus>, Arc<Bus>) {
        let pio = std::mem::take(&mut self.pio);
        let mmio = std::mem::take(&mut self.mmio);
        (Arc::new(pio), Arc::new(mmio))
    }

    /// The devices the event loop must serve (vsock), handed over once.
    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }
}
