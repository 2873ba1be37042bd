//! The vsock tx path driven by a hostile driver: the input is the start of guest memory,
//! holding the tx queue (descriptor table at 0x0, available ring at 0x100, used ring at
//! 0x200, 16 entries) and the buffers its descriptors point at. The rx queue is set up
//! by the harness with good buffers so replies (RESPONSE, RST, echoed data) flow back.
//! Processing must never panic or hang, whatever the descriptors say.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::vsock::{EchoService, Vsock, VsockService};
use vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use vmm::vstate::memory::GuestMemoryMmap;

const MEM: usize = 0x1_0000;
const INPUT_MAX: usize = 0x8000;
const QSIZE: u16 = 16;
const TX: u64 = 0x0;
const RX: u64 = 0x8000;
const EV: u64 = 0x8400;
const RX_BUFS: u64 = 0x9000;
const RX_BUF_LEN: u32 = 0x400;

static N: AtomicU64 = AtomicU64::new(0);

fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).expect("queue");
    q.try_set_desc_table_address(GuestAddress(base)).expect("desc");
    q.try_set_avail_ring_address(GuestAddress(base + 0x100)).expect("avail");
    q.try_set_used_ring_address(GuestAddress(base + 0x200)).expect("used");
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = data.len().min(INPUT_MAX);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fill");
    // Good rx buffers: 16 single-descriptor, device-writable chains.
    for i in 0..u64::from(QSIZE) {
        let d = RX + i * 16;
        mem.write_obj(RX_BUFS + i * u64::from(RX_BUF_LEN), GuestAddress(d)).expect("addr");
        mem.write_obj(RX_BUF_LEN, GuestAddress(d + 8)).expect("len");
        mem.write_obj(2u16, GuestAddress(d + 12)).expect("flags");
        mem.write_obj(i as u16, GuestAddress(RX + 0x104 + i * 2)).expect("ring");
    }
    mem.write_obj(QSIZE, GuestAddress(RX + 0x102)).expect("avail idx");
    let path = std::env::temp_dir().join(format!(
        "pmsnap-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut dev = Vsock::new(3, &path).expect("vsock");
    dev.register_service(52, Box::new(|_| Box::new(EchoService) as Box<dyn VsockService>))
        .expect("service");
    let irq = VirtioInterrupt::new().expect("interrupt");
    dev.activate(mem, vec![queue(RX), queue(TX), queue(EV)], 1 << 32, irq)
        .expect("activate");
    for _ in 0..3 {
        dev.process_queues();
    }
});
