//! The VMM's event loop on event-manager. The main thread runs it until the VM stops.
//! Built in: the stop notifications (vCPU exits, guest reset). Everything else (serial
//! input, later the API socket and the vsock device) is a subscriber added with
//! [`EventLoop::add_subscriber`].

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

pub use event_manager::SubscriberId;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::vstate::vcpu::{StopNotifier, VmStop};

/// A subscriber as the event loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// event-manager failed (epoll).
    #[error("event loop: {0}")]
    Manager(String),
    /// Creating the stop notifier failed.
    #[error("cannot create the VM stop eventfd")]
    Eventfd(#[source] std::io::Error),
}

/// Subscriber on the stop eventfd: records the first stop reason.
struct StopListener {
    notifier: StopNotifier,
    rx: Receiver<VmStop>,
    first: Arc<Mutex<Option<VmStop>>>,
}

impl MutEventSubscriber for StopListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.notifier.eventfd(), EventSet::IN)) {
            log::error!("event loop: cannot watch the stop eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.notifier.eventfd().read();
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok(why) = self.rx.try_recv() {
            log::debug!("event loop: VM stop reported: {why:?}");
            if first.is_none() {
                *first = Some(why);
            }
        }
    }
}

/// The event loop.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    notifier: StopNotifier,
    stopped: Arc<Mutex<Option<VmStop>>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    /// A loop with the stop listener installed. Hand clones of [`Self::stop_notifier`]
    /// to whatever can stop the VM (vCPUs, the i8042, the console escape, the API).
    pub fn new() -> Result<Self, EventLoopError> {
        let manager = EventManager::new().map_err(|e| EventLoopError::Manager(format!("{e:?}")))?;
        let (notifier, rx) = StopNotifier::new().map_err(EventLoopError::Eventfd)?;
        let stopped = Arc::new(Mutex::new(None));
        let mut l = Self {
            manager,
            notifier: notifier.try_clone().map_err(EventLoopError::Eventfd)?,
            stopped: stopped.clone(),
        };
        l.add_subscriber(Arc::new(Mutex::new(StopListener {
            notifier,
            rx,
            first: stopped,
        })));
        Ok(l)
    }

    /// A handle for reporting that the VM stopped.
    pub fn stop_notifier(&self) -> Result<StopNotifier, EventLoopError> {
        self.notifier.try_clone().map_err(EventLoopError::Eventfd)
    }

    /// Add a subscriber; its `init` registers its fds.
    pub fn add_subscriber(&mut self, s: Subscriber) -> SubscriberId {
        self.manager.add_subscriber(s)
    }

    /// Run until some part reports a stop; returns the first reason reported.
    pub fn run_until_stopped(&mut self) -> Result<VmStop, EventLoopError> {
        loop {
            if let Some(why) = self
                .stopped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Ok(why);
            }
            self.manager
                .run()
                .map_err(|e| EventLoopError::Manager(format!("{e:?}")))?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    struct Counter {
        evt: EventFd,
        seen: Arc<Mutex<u64>>,
        stop: StopNotifier,
    }
    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).expect("add");
        }
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            let n = self.evt.read().expect("read");
            *self.seen.lock().expect("lock") += n;
            self.stop.notify(VmStop::Error("test stop".into()));
        }
    }

    #[test]
    fn subscribers_run_and_stop_ends_the_loop() {
        let mut l = EventLoop::new().expect("loop");
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let seen = Arc::new(Mutex::new(0));
        l.add_subscriber(Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().expect("clone"),
            seen: seen.clone(),
            stop: l.stop_notifier().expect("notifier"),
        })));
        evt.write(3).expect("write");
        let why = l.run_until_stopped().expect("run");
        assert_eq!(why, VmStop::Error("test stop".into()));
        assert_eq!(*seen.lock().expect("lock"), 3);
    }

    #[test]
    fn first_stop_wins() {
        let mut l = EventLoop::new().expect("loop");
        let n = l.stop_notifier().expect("notifier");
        n.notify(VmStop::Reset);
        n.notify(VmStop::Shutdown);
        assert_eq!(l.run_until_stopped().expect("run"), VmStop::Reset);
    }
}
