//! Attaching virtio devices to a VM being built: the MMIO slot, its interrupt (irqfd),
//! queue notifications (ioeventfd), and the event loop subscriber. The builder announces
//! each MMIO slot on the kernel command line.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;

use crate::builder::{BuildError, MmioSlot, VmBuilder};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::vsock::{AgentServiceFactory, Vsock};
use crate::event_loop::Subscriber;
use crate::persist::live::VirtioSlot;
use crate::snapshot::engine::Engine;
use crate::snapshot::process::{guest_phys_pages, ProcessService};
use crate::unix_socket::SocketFile;

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
    /// Building failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// An ioeventfd could not be registered.
    #[error("cannot register a queue notification with KVM: {0}")]
    IoEvent(#[source] kvm_ioctls::Error),
}

/// Attach a virtio-vsock device whose host side listens on `uds_path`, with the
/// snapshot service of `engine` on the agent protocol's port. Returns the device for the
/// event loop.
pub fn attach_vsock(
    builder: &mut VmBuilder,
    uds_path: &Path,
    engine: Arc<Engine>,
    mem_bytes: u64,
) -> Result<Subscriber, DeviceError> {
    attach_vsock_with_state(builder, uds_path, engine, mem_bytes).map(|(s, ..)| s)
}

/// [`attach_vsock`], also returning the transport and device for VM snapshots, and the
/// host socket file: the device lives as long as the VMM's state, so the caller removes
/// the file when the VM ends (see [`crate::unix_socket::RemoveOnDrop`]).
pub fn attach_vsock_with_state(
    builder: &mut VmBuilder,
    uds_path: &Path,
    engine: Arc<Engine>,
    mem_bytes: u64,
) -> Result<(Subscriber, VirtioSlot, SocketFile), DeviceError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::Vsock {
        path: uds_path.display().to_string(),
        source,
    };
    let mut vsock = Vsock::new(GUEST_CID, uds_path).map_err(|e| err(e.into()))?;
    let socket_file = vsock.muxer().socket_file().clone();
    engine.set_agent_socket(uds_path.to_path_buf());
    let service = Arc::new(Mutex::new(ProcessService::new(engine, mem_bytes)));
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
        MmioTransport::new(builder.memory().clone(), vsock.clone()).map_err(|e| err(e.into()))?;
    let irq = transport
        .interrupt()
        .eventfd()
        .try_clone()
        .map_err(BuildError::Eventfd)?;
    let notify: Vec<_> = transport
        .queue_events()
        .iter()
        .map(|e| e.try_clone())
        .collect::<Result<_, _>>()
        .map_err(BuildError::Eventfd)?;
    let transport = Arc::new(Mutex::new(transport));
    let slot: MmioSlot = builder.add_mmio_device(transport.clone())?;
    builder
        .vm()
        .register_irqfd(&irq, slot.irq)
        .map_err(BuildError::from)?;
    for (i, evt) in notify.iter().enumerate() {
        builder
            .vm()
            .fd()
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
    let state = VirtioSlot {
        transport,
        vsock: Some(vsock.clone()),
    };
    Ok((vsock, state, socket_file))
}
