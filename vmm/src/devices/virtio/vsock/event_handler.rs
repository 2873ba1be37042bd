//! Event-loop wiring of the vsock device: the queue notify eventfds, the Unix listening
//! socket and every host stream, registered with event-manager. Add the device to the
//! VMM's `EventManager` as `Arc<Mutex<Vsock>>` (the same `Arc` the MMIO transport holds).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVQ, RXQ, TXQ};
use super::muxer::FdChange;
use crate::guest_warn;

impl Vsock {
    fn apply_fd_changes(&mut self, ops: &mut EventOps) {
        let batch = self.muxer().take_fd_changes();
        for change in &batch.changes {
            let res = match *change {
                FdChange::Add(fd, set) => ops.add(Events::new_raw(fd, set)),
                FdChange::Modify(fd, set) => ops.modify(Events::new_raw(fd, set)),
                FdChange::Remove(fd) => ops.remove(Events::empty_raw(fd)),
            };
            if let Err(e) = res {
                log::warn!("vsock: event loop registration {change:?}: {e:?}");
            }
        }
        // `batch` drops here: the streams removed above close only now.
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<_> = self
            .queue_events_raw()
            .into_iter()
            .map(|fd| (fd, EventSet::IN))
            .collect();
        fds.push((self.muxer().listener_fd(), EventSet::IN));
        fds.push((self.wake_evt.as_raw_fd(), EventSet::IN));
        for (fd, set) in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::error!("vsock: cannot register fd {fd} with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let q = self.queue_events_raw();
        if fd == q[RXQ] || fd == q[TXQ] || fd == q[EVQ] {
            let idx = q.iter().position(|&f| f == fd).unwrap_or(EVQ);
            if let Err(e) = self.queue_evt(idx).read() {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    guest_warn!("vsock: queue {idx} eventfd read: {e}");
                }
            }
        } else if fd == self.wake_evt.as_raw_fd() {
            // Only here to apply fd changes below.
            let _ = self.wake_evt.read();
        } else if fd == self.muxer().listener_fd() {
            self.muxer().accept_host_streams();
        } else {
            self.muxer().handle_fd_event(fd, events.event_set());
        }
        self.process_queues();
        self.apply_fd_changes(ops);
    }
}

impl Vsock {
    fn queue_events_raw(&self) -> [i32; 3] {
        use crate::devices::virtio::VirtioDevice;
        let e = self.queue_events();
        [e[RXQ].as_raw_fd(), e[TXQ].as_raw_fd(), e[EVQ].as_raw_fd()]
    }

    fn queue_evt(&self, idx: usize) -> &vmm_sys_util::eventfd::EventFd {
        use crate::devices::virtio::VirtioDevice;
        &self.queue_events()[idx]
    }
}
