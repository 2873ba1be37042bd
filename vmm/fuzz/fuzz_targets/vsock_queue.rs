//! The whole vsock tx/rx path driven by a hostile driver: the input is guest memory
//! holding the three virtqueues (descriptor tables, rings, buffers). Processing must
//! never panic or hang, whatever the descriptors point at.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::vsock::{EchoService, Vsock, VsockService};
use vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use vmm::vstate::memory::GuestMemoryMmap;

const MEM: usize = 0x1_0000;
const QSIZE: u16 = 16;

static N: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fill");
    let dir = std::env::temp_dir().join(format!(
        "pmsnap-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut dev = Vsock::new(3, &dir).expect("vsock");
    dev.register_service(52, Box::new(|_| Box::new(EchoService) as Box<dyn VsockService>))
        .expect("service");
    let queues = (0..3u64)
        .map(|i| {
            let base = i * 0x3000;
            let mut q = Queue::new(QSIZE).expect("queue");
            q.try_set_desc_table_address(GuestAddress(base)).expect("desc");
            q.try_set_avail_ring_address(GuestAddress(base + 0x1000)).expect("avail");
            q.try_set_used_ring_address(GuestAddress(base + 0x2000)).expect("used");
            q.set_ready(true);
            q
        })
        .collect();
    let irq = VirtioInterrupt::new().expect("interrupt");
    dev.activate(mem, queues, 1 << 32, irq).expect("activate");
    for _ in 0..3 {
        dev.process_queues();
    }
});
