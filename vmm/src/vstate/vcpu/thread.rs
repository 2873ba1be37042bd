//! The vCPU threads: one per vCPU, each with its explicit run state, driven by
//! [`VcpuRequest`] messages, and [`Vcpus`], the handle that pauses, resumes and stops
//! them all.
//!
//! State machine of a vCPU thread (driven by [`VcpuRequest`] messages):
//!
//! ```text
//!            Pause                  Exit
//!  Running ─────────▶ Paused ─────────────▶ Exiting (thread ends)
//!     ▲  ◀───────────   │
//!     │     Resume      │ Exit
//!     │                 ▼
//!     └─ guest stops ─▶ Stopped (reset, shutdown or an error was reported; waits for Exit)
//! ```
//!
//! A request is always sent before the thread is kicked with [`kick_signal`]; the kick's
//! handler sets `kvm_run.immediate_exit`, so a kick that lands before `KVM_RUN` starts
//! still makes it return at once (`EINTR`) and the request is seen. No lock is held
//! while the controller waits for an acknowledgement.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::exits::Next;
use super::{Vcpu, VcpuError};
use crate::stop::StopNotifier;

/// How long `pause`/`resume` wait for each vCPU to acknowledge. Generous: a vCPU in the
/// middle of an emulated instruction stream on this host can take a while to notice.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Offset from SIGRTMIN of the signal that kicks a vCPU thread out of `KVM_RUN`.
pub const VCPU_KICK_SIGNAL_OFFSET: c_int = 0;

/// Work a paused vCPU thread does with its fd: gets the vCPU's index and fd.
pub type FdJob = Box<dyn FnOnce(u8, &VcpuFd) + Send>;

/// What [`Vcpus::pause_then`] returns: each vCPU's answer (or why it has none) and when
/// the last vCPU left the guest.
pub type PauseAnswers<R> = (Vec<Result<R, VcpuError>>, Instant);

/// A request to a vCPU thread.
pub enum VcpuRequest {
    /// Leave the guest and wait (acknowledged with `Paused`).
    Pause,
    /// Continue running the guest (acknowledged with `Resumed`).
    Resume,
    /// End the thread.
    Exit,
    /// While paused: run this with the vCPU's fd on its own thread (saving or
    /// restoring its state). Not run (dropped) when the vCPU is not paused, which the
    /// caller sees as its answer channel closing.
    WithFd(FdJob),
    /// `Pause`, then wait until every vCPU of the request has left the guest (the
    /// latch), then run the job as `WithFd` does, then acknowledge `Paused`: a pause and
    /// a state capture in one round trip (see [`Vcpus::pause_then`]).
    PauseThen(Arc<Latch>, FdJob),
}

impl std::fmt::Debug for VcpuRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VcpuRequest::Pause => "Pause",
            VcpuRequest::Resume => "Resume",
            VcpuRequest::Exit => "Exit",
            VcpuRequest::WithFd(_) => "WithFd",
            VcpuRequest::PauseThen(..) => "PauseThen",
        })
    }
}

/// A vCPU thread's answer to `Pause` / `Resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    /// Out of `KVM_RUN` with pending I/O completed; guest state is stable.
    Paused,
    /// Running the guest again: when the thread took the request and turned to
    /// `KVM_RUN` (the end of the guest's pause, as near as user space sees it).
    Resumed(Instant),
    /// The VM has stopped; the vCPU only waits for `Exit`.
    Stopped,
}

/// The meeting point of the vCPUs of one [`VcpuRequest::PauseThen`]: each arrives once
/// it has left the guest, and none goes on before all have (so no vCPU's state is read
/// while another can still change it, by an IPI say) or [`ACK_TIMEOUT`] has passed (a
/// vCPU thread that died: the request then fails on its acknowledgement).
#[derive(Debug)]
pub struct Latch {
    /// Arrivals still to come, and when the last one came.
    left: Mutex<(usize, Option<Instant>)>,
    all_in: Condvar,
}

impl Latch {
    fn new(count: usize) -> Self {
        Self {
            left: Mutex::new((count, None)),
            all_in: Condvar::new(),
        }
    }

    /// Count one arrival; the last one notes the time and lets everyone go on.
    fn arrive(&self) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        left.0 = left.0.saturating_sub(1);
        if left.0 == 0 {
            left.1 = Some(Instant::now());
            self.all_in.notify_all();
        }
    }

    fn arrive_and_wait(&self) {
        self.arrive();
        let left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .all_in
            .wait_timeout_while(left, ACK_TIMEOUT, |left| left.0 > 0);
    }

    /// When the last one arrived.
    fn all_arrived_at(&self) -> Option<Instant> {
        self.left.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN_PTR.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to its own `kvm_run`
        // mapping and cleared before the `VcpuFd` (and with it the mapping) is dropped; a
        // single byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal number used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + VCPU_KICK_SIGNAL_OFFSET
}

fn register_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler));
    result.map_err(VcpuError::Signal)
}

impl Vcpu {
    fn thread_main(
        mut self,
        rx: Receiver<VcpuRequest>,
        ack: Sender<VcpuAck>,
        stop: StopNotifier,
        paused: bool,
    ) {
        #[derive(PartialEq)]
        enum State {
            Running,
            Paused,
            Stopped,
            Exiting,
        }
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        // Starting paused, the vCPU enters the guest only after a Resume.
        let mut state = if paused {
            State::Paused
        } else {
            State::Running
        };
        while state != State::Exiting {
            let request = if state == State::Running {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => Some(VcpuRequest::Exit),
                }
            } else {
                Some(rx.recv().unwrap_or(VcpuRequest::Exit))
            };
            if let Some(request) = request {
                let reply = match (request, &state) {
                    (VcpuRequest::Exit, _) => {
                        state = State::Exiting;
                        None
                    }
                    (VcpuRequest::WithFd(job), State::Paused) => {
                        job(self.id, &self.fd);
                        None
                    }
                    (VcpuRequest::WithFd(_), _) => None,
                    // Before the `Stopped` answer: a stopped vCPU arrives at the latch
                    // too, or the others would wait for it until the latch times out.
                    (VcpuRequest::PauseThen(latch, job), _) => {
                        if state == State::Running {
                            self.complete_pending_io();
                            state = State::Paused;
                        }
                        latch.arrive_and_wait();
                        if state == State::Stopped {
                            Some(VcpuAck::Stopped)
                        } else {
                            job(self.id, &self.fd);
                            Some(VcpuAck::Paused)
                        }
                    }
                    (_, State::Stopped) => Some(VcpuAck::Stopped),
                    (VcpuRequest::Pause, State::Running) => {
                        self.complete_pending_io();
                        state = State::Paused;
                        Some(VcpuAck::Paused)
                    }
                    (VcpuRequest::Pause, _) => Some(VcpuAck::Paused),
                    (VcpuRequest::Resume, _) => {
                        state = State::Running;
                        Some(VcpuAck::Resumed(Instant::now()))
                    }
                };
                if let Some(reply) = reply {
                    let _ = ack.send(reply);
                }
                continue;
            }
            if let Next::Stop(why) = self.run_once() {
                // Errors are printed once, by whoever ends the VMM.
                log::debug!("vCPU {}: stopping: {why:?}", self.id);
                stop.notify(why);
                state = State::Stopped;
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        log::debug!("vCPU {}: {}", self.id, self.stats.summary());
    }
}

/// `job` as a vCPU thread runs it, sending its result to the returned receiver (closed
/// unanswered when the thread drops the job instead).
fn answering<R, F>(job: &F) -> (FdJob, Receiver<R>)
where
    R: Send + 'static,
    F: Fn(u8, &VcpuFd) -> R + Clone + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let job = job.clone();
    let boxed: FdJob = Box::new(move |id, fd| {
        let _ = tx.send(job(id, fd));
    });
    (boxed, rx)
}

struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuRequest>,
    ack: Receiver<VcpuAck>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    fn send(&self, r: VcpuRequest) -> Result<(), VcpuError> {
        self.tx.send(r).map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(t) = &self.thread {
            // A failed kick means the thread has already ended; the ack wait reports it.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    /// Wait for an answer of `expected`'s kind (or `Stopped`). A late answer to an
    /// earlier request that timed out is skipped, so it cannot be taken for this one.
    fn wait(&self, expected: VcpuAck, what: &'static str) -> Result<VcpuAck, VcpuError> {
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ack = self.ack.recv_timeout(left).map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::AckTimeout(self.id, what),
                RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
            })?;
            if std::mem::discriminant(&ack) == std::mem::discriminant(&expected)
                || ack == VcpuAck::Stopped
            {
                return Ok(ack);
            }
        }
    }
}

/// The running vCPU threads: pause, resume and stop them all.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
}

impl std::fmt::Debug for Vcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpus")
            .field("count", &self.handles.len())
            .finish()
    }
}

impl Vcpus {
    /// Start one thread per vCPU, running. Stops are reported through `stop`.
    pub fn start(vcpus: Vec<Vcpu>, stop: &StopNotifier) -> Result<Self, VcpuError> {
        Self::start_in(vcpus, stop, false)
    }

    /// Start one thread per vCPU, paused: no guest instruction runs before
    /// [`Vcpus::resume`] (a restore that waits for `POST /resume`).
    pub fn start_paused(vcpus: Vec<Vcpu>, stop: &StopNotifier) -> Result<Self, VcpuError> {
        Self::start_in(vcpus, stop, true)
    }

    fn start_in(vcpus: Vec<Vcpu>, stop: &StopNotifier, paused: bool) -> Result<Self, VcpuError> {
        register_kick_handler()?;
        let mut handles = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            let id = vcpu.id;
            let (tx, rx) = mpsc::channel();
            let (ack_tx, ack) = mpsc::channel();
            let notifier = stop.try_clone().map_err(|e| VcpuError::Spawn(id, e))?;
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Vcpu);
                    vcpu.thread_main(rx, ack_tx, notifier, paused)
                })
                .map_err(|e| VcpuError::Spawn(id, e))?;
            handles.push(VcpuHandle {
                id,
                tx,
                ack,
                thread: Some(thread),
            });
        }
        Ok(Self { handles })
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// True when there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Pause every vCPU and wait until all have left the guest. A stopped VM counts as
    /// paused. Requests go to all vCPUs first so they pause in parallel.
    pub fn pause(&self) -> Result<(), VcpuError> {
        for h in &self.handles {
            h.send(VcpuRequest::Pause)?;
        }
        for h in &self.handles {
            h.wait(VcpuAck::Paused, "pause")?;
        }
        Ok(())
    }

    /// Let vCPUs that wait paused run, without waiting for their acknowledgement: the
    /// end of a restore, which like [`Vcpus::start`] need not wait. On this machine's two
    /// cores the acknowledgement of a vCPU that has just entered the guest often arrives
    /// one scheduler tick (4 ms) later, most of the difference between restoring into
    /// paused threads and starting them running. The `Resumed` answers left queued are
    /// skipped by the next wait. Fails only if a vCPU thread has ended.
    pub fn release(&self) -> Result<(), VcpuError> {
        for h in &self.handles {
            h.send(VcpuRequest::Resume)?;
        }
        Ok(())
    }

    /// Resume every vCPU and wait for each to acknowledge. Returns when the last one
    /// went back to the guest, which is the end of the guest's pause: the
    /// acknowledgements themselves can reach this thread a scheduler tick later on a
    /// host whose CPUs the vCPUs keep busy (see [`Vcpus::release`]). Fails if the VM
    /// has stopped.
    pub fn resume(&self) -> Result<Instant, VcpuError> {
        for h in &self.handles {
            // Kicked too: a vCPU that was never paused may sit in an in-kernel HLT for
            // a long time and would otherwise not see the request.
            h.send(VcpuRequest::Resume)?;
        }
        let mut result = Ok(None::<Instant>);
        for h in &self.handles {
            let ack = h.wait(VcpuAck::Resumed(Instant::now()), "resume")?;
            result = match (result, ack) {
                (Ok(last), VcpuAck::Resumed(at)) => Ok(Some(last.map_or(at, |l| l.max(at)))),
                (Ok(_), _) => Err(VcpuError::Stopped(h.id)),
                (err, _) => err,
            };
        }
        result.map(|last| last.unwrap_or_else(Instant::now))
    }

    /// Run `job` on every vCPU's own thread, in parallel, with the vCPU's index and fd
    /// (saving or restoring vCPU state: KVM wants those ioctls from the vCPU's thread).
    /// The vCPUs must be paused. Returns the answers in vCPU order.
    pub fn with_each_fd<R, F>(&self, what: &'static str, job: F) -> Result<Vec<R>, VcpuError>
    where
        R: Send + 'static,
        F: Fn(u8, &VcpuFd) -> R + Clone + Send + 'static,
    {
        let mut answers = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let (job, rx) = answering(&job);
            h.send(VcpuRequest::WithFd(job))?;
            answers.push((h.id, rx));
        }
        answers
            .into_iter()
            .map(|(id, rx)| {
                rx.recv_timeout(ACK_TIMEOUT).map_err(|e| match e {
                    RecvTimeoutError::Timeout => VcpuError::AckTimeout(id, what),
                    RecvTimeoutError::Disconnected => VcpuError::NotPaused(id, what),
                })
            })
            .collect()
    }

    /// Pause every vCPU and run `job` on each one's own thread as soon as all have left
    /// the guest: a pause and a state capture in one round trip with the vCPU threads,
    /// not two (on this 2-CPU host each hand-off to a sleeping thread costs tens to
    /// hundreds of microseconds of the guest's pause, docs/perf-vm.md). Fails as
    /// [`Vcpus::pause`] does when a vCPU does not pause; otherwise the vCPUs are paused,
    /// and each answer is `job`'s or, for a vCPU of a stopped VM, `NotPaused`. Also
    /// returns when the last vCPU left the guest.
    pub fn pause_then<R, F>(&self, what: &'static str, job: F) -> Result<PauseAnswers<R>, VcpuError>
    where
        R: Send + 'static,
        F: Fn(u8, &VcpuFd) -> R + Clone + Send + 'static,
    {
        let latch = Arc::new(Latch::new(self.handles.len()));
        let mut answers = Vec::with_capacity(self.handles.len());
        for (i, h) in self.handles.iter().enumerate() {
            let (job, rx) = answering(&job);
            let sent = h.send(VcpuRequest::PauseThen(latch.clone(), job));
            if let Err(e) = sent {
                // Arrive for the vCPUs that will not, so those already asked go on.
                (i..self.handles.len()).for_each(|_| latch.arrive());
                return Err(e);
            }
            answers.push((h.id, rx));
        }
        for h in &self.handles {
            h.wait(VcpuAck::Paused, "pause")?;
        }
        let answers = answers
            .into_iter()
            .map(|(id, rx)| rx.try_recv().map_err(|_| VcpuError::NotPaused(id, what)))
            .collect();
        Ok((answers, latch.all_arrived_at().unwrap_or_else(Instant::now)))
    }

    /// Tell every vCPU thread to exit and join them. Idempotent.
    pub fn stop(&mut self) {
        for h in &self.handles {
            let _ = h.send(VcpuRequest::Exit);
        }
        for h in &mut self.handles {
            if let Some(t) = h.thread.take() {
                if t.join().is_err() {
                    log::error!("vCPU {} thread panicked", h.id);
                }
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod latch_tests {
    use super::*;

    /// No one passes the latch before the last arrival, and the time noted is the last
    /// arrival's.
    #[test]
    fn nobody_passes_the_latch_before_the_last_arrival() {
        let latch = Arc::new(Latch::new(3));
        let passed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let (l, p) = (latch.clone(), passed.clone());
                std::thread::spawn(move || {
                    l.arrive_and_wait();
                    p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(passed.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(latch.all_arrived_at().is_none());
        let before = Instant::now();
        latch.arrive_and_wait();
        waiters.into_iter().for_each(|w| w.join().expect("waiter"));
        assert_eq!(passed.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(latch.all_arrived_at().expect("all in") >= before);
    }
}
