//! The virtio-vsock device: config space, activation, and moving packets between the
//! virtqueues and the muxer. No epoll here: the event handler calls
//! [`Vsock::process_tx`] / [`Vsock::process_rx`], and so can tests.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;

use super::connection::VsockServiceFactory;
use super::muxer::{MuxerError, VsockMuxer};
use super::packet::{parse_guest_header, VsockHeader, HDR_LEN};
use crate::devices::virtio::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
};
use crate::guest_warn;
use crate::memory::GuestMemoryMmap;

/// virtio device id of vsock.
pub const VSOCK_DEVICE_ID: u32 = 19;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the rx queue (device to driver).
pub const RXQ: usize = 0;
/// Index of the tx queue (driver to device).
pub const TXQ: usize = 1;
/// Index of the event queue.
pub const EVQ: usize = 2;

/// Errors of creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0, 1, 2 and `u32::MAX` (and above) are reserved.
    #[error("guest cid {0} is reserved or out of range (use 3..=4294967294)")]
    BadCid(u64),
    /// The host side could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

/// A packet read from the tx queue: header, op and payload.
type TxPacket = (VsockHeader, super::packet::Op, Vec<u8>);

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: VsockMuxer,
    queue_evts: Vec<EventFd>,
    queue_max: [u16; 3],
    active: Option<Active>,
    /// Wakes the event loop when device state changed off-loop (reset on a vCPU thread)
    /// so it applies the muxer's fd changes (closing dropped streams).
    pub(super) wake_evt: EventFd,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("muxer", &self.muxer)
            .field("active", &self.active.is_some())
            .finish()
    }
}

/// Why a tx chain could not be turned into a packet.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("descriptor chain: {0:?}")]
    Chain(virtio_queue::Error),
    #[error("header: {0}")]
    Header(super::packet::PacketError),
    #[error("chain holds {have} payload bytes, header says {want}")]
    ShortPayload { have: usize, want: u32 },
    #[error("read: {0}")]
    Io(std::io::Error),
}

impl Vsock {
    /// A device for a guest with `guest_cid`, listening for host programs on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let queue_evts = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            guest_cid,
            muxer: VsockMuxer::new(guest_cid, uds_path)?,
            queue_evts,
            queue_max: [QUEUE_SIZE; 3],
            active: None,
            wake_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Serve guest connections to host port `port` with `factory` (the snapshot
    /// service, for instance).
    pub fn register_service(
        &mut self,
        port: u32,
        factory: Box<dyn VsockServiceFactory>,
    ) -> Result<(), VsockError> {
        Ok(self.muxer.register_service(port, factory)?)
    }

    /// The host side.
    pub fn muxer(&mut self) -> &mut VsockMuxer {
        &mut self.muxer
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    fn read_tx_chain(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        guest_cid: u64,
    ) -> Result<TxPacket, (Option<VsockHeader>, TxError)> {
        let mut r = Reader::new(mem, chain).map_err(|e| (None, TxError::Chain(e)))?;
        let mut hb = [0u8; HDR_LEN];
        r.read_exact(&mut hb).map_err(|e| (None, TxError::Io(e)))?;
        let raw = VsockHeader::parse(&hb).map_err(|e| (None, TxError::Header(e)))?;
        let (hdr, op) =
            parse_guest_header(&hb, guest_cid).map_err(|e| (Some(raw), TxError::Header(e)))?;
        if r.available_bytes() < hdr.len as usize {
            return Err((
                Some(hdr),
                TxError::ShortPayload {
                    have: r.available_bytes(),
                    want: hdr.len,
                },
            ));
        }
        let mut data = vec![0u8; hdr.len as usize];
        r.read_exact(&mut data)
            .map_err(|e| (Some(hdr), TxError::Io(e)))?;
        Ok((hdr, op, data))
    }

    /// Take every packet the guest queued on the tx queue and hand it to the muxer.
    /// Returns whether used buffers were returned (the caller signals the guest).
    pub fn process_tx(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        let chains: Vec<_> = match a.queues[TXQ].iter(&a.mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                guest_warn!("vsock: tx queue unusable: {e}");
                return false;
            }
        };
        let used = !chains.is_empty();
        for chain in chains {
            let head = chain.head_index();
            let res = Self::read_tx_chain(&a.mem, chain, self.guest_cid);
            if let Err(e) = a.queues[TXQ].add_used(&a.mem, head, 0) {
                guest_warn!("vsock: tx used ring: {e}");
            }
            match res {
                Ok((hdr, op, data)) => self.muxer.send_from_guest(&hdr, op, &data),
                Err((hdr, e)) => {
                    guest_warn!("vsock: refusing guest packet: {e}");
                    if let Some(hdr) = hdr {
                        self.muxer.reset_guest_packet(&hdr);
                    }
                }
            }
        }
        used
    }

    /// Fill guest rx buffers with packets the muxer has waiting. Returns whether used
    /// buffers were returned.
    pub fn process_rx(&mut self) -> bool {
        let Some(a) = &mut self.active else {
            return false;
        };
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let chain = match a.queues[RXQ].iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    guest_warn!("vsock: rx queue unusable: {e}");
                    None
                }
            };
            // No buffer: wait for the guest to add some and notify.
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut w = match Writer::new(&a.mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                Ok(_) | Err(_) => {
                    guest_warn!("vsock: rx buffer unusable (too small or outside memory)");
                    if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, 0) {
                        guest_warn!("vsock: rx used ring: {e}");
                    }
                    used = true;
                    continue;
                }
            };
            let Some((hdr, data)) = self.muxer.recv_for_guest(w.available_bytes() - HDR_LEN) else {
                // Nothing after all: give the buffer back to the available ring.
                a.queues[RXQ].go_to_previous_position();
                break;
            };
            let mut len = HDR_LEN + data.len();
            if let Err(e) = w
                .write_all(&hdr.to_bytes())
                .and_then(|()| w.write_all(&data))
            {
                // Cannot happen after the size check; if it does, the packet is lost.
                guest_warn!("vsock: writing rx packet: {e}");
                len = w.bytes_written();
            }
            // len <= available bytes of one chain, which virtio-queue bounds to u32.
            if let Err(e) = a.queues[RXQ].add_used(&a.mem, head, len as u32) {
                guest_warn!("vsock: rx used ring: {e}");
            }
            used = true;
        }
        used
    }

    /// Signal the guest that used buffers are on `queue`, if it wants to know.
    pub fn signal_used(&mut self, queue: usize) {
        let Some(a) = &mut self.active else {
            return;
        };
        let needed = a.queues[queue].needs_notification(&a.mem).unwrap_or(true);
        if needed {
            if let Err(e) = a.interrupt.trigger(VIRTIO_MMIO_INT_VRING) {
                log::warn!("vsock: interrupt: {e}");
            }
        }
    }

    /// Tell the guest that every connection is gone (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`
    /// on the event queue), as after a snapshot restore: guest sockets are reset and the
    /// guest re-reads its CID. Returns false when the device is not active or the guest
    /// has no event buffer posted.
    pub fn send_transport_reset(&mut self) -> bool {
        const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
        let Some(a) = &mut self.active else {
            return false;
        };
        let chain = match a.queues[EVQ].iter(&a.mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                guest_warn!("vsock: event queue unusable: {e}");
                None
            }
        };
        let Some(chain) = chain else {
            log::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let len = match Writer::new(&a.mem, chain) {
            Ok(mut w) => match w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if let Err(e) = a.queues[EVQ].add_used(&a.mem, head, len) {
            guest_warn!("vsock: event used ring: {e}");
        }
        self.signal_used(EVQ);
        len == 4
    }

    /// Run both directions once: tx, then rx (tx often produces replies), then signal.
    pub fn process_queues(&mut self) {
        if self.process_tx() {
            self.signal_used(TXQ);
        }
        if self.process_rx() {
            self.signal_used(RXQ);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VSOCK_DEVICE_ID
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!("vsock: guest wrote read-only config at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        if let Err(e) = self.wake_evt.write(1) {
            log::warn!("vsock: cannot wake the event loop after reset: {e}");
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect()
        })
    }
}
