//! The VMM's event loop on event-manager. The main thread runs it until the VM stops.
//! Built in: the stop notifications (vCPU exits, guest reset). Everything else (serial
//! input, later the API socket and the vsock device) is a subscriber added with
//! [`EventLoop::add_subscriber`].

use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

pub use event_manager::SubscriberId;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::stop::{StopNotifier, VmStop};

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

/// Signals that end the VM cleanly (pool removed, terminal restored).
pub const TERMINATION_SIGNALS: [c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The eventfd the termination handler writes to (-1: none yet) and the last signal.
static SIGNAL_EVENTFD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn termination_handler(num: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    LAST_SIGNAL.store(num, Ordering::SeqCst);
    let fd = SIGNAL_EVENTFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: `fd` is an eventfd kept open for the life of the process (leaked on
        // purpose in `SignalListener::install`); write(2) is async-signal-safe and reads
        // 8 bytes from a live local.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Subscriber turning SIGTERM/SIGINT/SIGHUP into a `VmStop::Terminated`.
struct SignalListener {
    evt: EventFd,
    stop: StopNotifier,
}

impl SignalListener {
    fn install(stop: StopNotifier) -> Result<Self, EventLoopError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Eventfd)?;
        // The handler's copy stays open forever, so the handler never writes to a
        // closed or reused fd.
        let handler_copy = evt.try_clone().map_err(EventLoopError::Eventfd)?;
        let fd = handler_copy.as_raw_fd();
        std::mem::forget(handler_copy);
        let old = SIGNAL_EVENTFD.swap(fd, Ordering::SeqCst);
        if old < 0 {
            for sig in TERMINATION_SIGNALS {
                register_signal_handler(sig, termination_handler)
                    .map_err(|e| EventLoopError::Manager(format!("signal {sig}: {e}")))?;
            }
        }
        Ok(Self { evt, stop })
    }
}

impl MutEventSubscriber for SignalListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop: cannot watch the signal eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let sig = LAST_SIGNAL.load(Ordering::SeqCst);
        log::info!("signal {sig} received, stopping the VM");
        self.stop.notify(VmStop::Terminated(sig));
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

    /// Make SIGTERM, SIGINT and SIGHUP stop the VM through this loop (so the pool is
    /// removed and the terminal restored) instead of killing the process.
    pub fn handle_termination_signals(&mut self) -> Result<(), EventLoopError> {
        let listener = SignalListener::install(self.stop_notifier()?)?;
        self.add_subscriber(Arc::new(Mutex::new(listener)));
        Ok(())
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
