//! vCPUs: configuration for boot, the per-vCPU thread with its explicit run state, exit
//! dispatch through the port-I/O and MMIO buses, and the handling of instructions the
//! host's KVM emulator cannot run.
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
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::x86_64::{msr, regs};
use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;
use crate::persist::{self, PersistError, VcpuState};
use crate::stop::{StopNotifier, VmStop};

/// How long `pause`/`resume` wait for each vCPU to acknowledge. Generous: a vCPU in the
/// middle of an emulated instruction stream on this host can take a while to notice.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Offset from SIGRTMIN of the signal that kicks a vCPU thread out of `KVM_RUN`.
pub const VCPU_KICK_SIGNAL_OFFSET: c_int = 0;

/// LAPIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors configuring or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on a vCPU failed.
    #[error("KVM {op} on vCPU {id} failed")]
    Kvm {
        /// Which vCPU.
        id: u8,
        /// The operation.
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set only {set} of {wanted} boot MSRs on vCPU {id}")]
    Msrs {
        /// Which vCPU.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// Writing the boot tables failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Registering the kick signal handler failed.
    #[error("cannot register the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// A vCPU did not acknowledge a request in time.
    #[error("vCPU {0} did not acknowledge {1} within {ACK_TIMEOUT:?}")]
    AckTimeout(u8, &'static str),
    /// The vCPU thread is gone.
    #[error("vCPU {0} is no longer running")]
    Gone(u8),
    /// The VM stopped (reset, shutdown, error); it cannot be resumed.
    #[error("vCPU {0} cannot resume: the VM has stopped")]
    Stopped(u8),
}

/// A request to a vCPU thread.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Leave the guest and wait (acknowledged with `Paused`).
    Pause,
    /// Continue running the guest (acknowledged with `Resumed`).
    Resume,
    /// End the thread.
    Exit,
    /// While paused: save this vCPU's state (reading the given MSRs); answered on the
    /// channel, not with a [`VcpuAck`].
    SaveState(Arc<Vec<u32>>, Sender<Result<VcpuState, PersistError>>),
    /// While paused: restore this state; answered on the channel.
    RestoreState(Box<VcpuState>, Sender<Result<(), PersistError>>),
}

/// A vCPU thread's answer to `Pause` / `Resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAck {
    /// Out of `KVM_RUN` with pending I/O completed; guest state is stable.
    Paused,
    /// Running the guest again.
    Resumed,
    /// The VM has stopped; the vCPU only waits for `Exit`.
    Stopped,
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

/// Set LINT0 to ExtINT (the legacy PIC's output) and LINT1 to NMI in a LAPIC register
/// page, as a BIOS would.
pub fn set_lint_modes(regs: &mut [std::os::raw::c_char; 1024]) {
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    }
}

/// What an instruction KVM failed to emulate is, and what the CPU would have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmulationFix {
    /// `int3`: a trap; inject #BP with RIP after the instruction.
    Int3 = 0,
    /// `ud2`: a fault; inject #UD with RIP at the instruction.
    Ud2 = 1,
    /// `fwait`: nothing to wait for without x87 exceptions pending; skip it.
    Fwait = 2,
}

/// Classify the bytes at RIP.
pub fn classify_instruction(bytes: &[u8]) -> Option<EmulationFix> {
    match bytes {
        [0xcc, ..] => Some(EmulationFix::Int3),
        [0x0f, 0x0b, ..] => Some(EmulationFix::Ud2),
        [0x9b, ..] => Some(EmulationFix::Fwait),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What to do after an exit.
enum Next {
    Continue,
    Stop(VmStop),
}

/// Exit counts of one vCPU, logged at debug level when its thread ends (exits are
/// the expensive part of device emulation on this host, ~40 us each).
#[derive(Debug, Default)]
struct ExitStats {
    runs: u64,
    by_port: std::collections::BTreeMap<u16, u64>,
    mmio: u64,
    /// Emulation failures fixed, by kind: int3, ud2, fwait.
    fixes: [u64; 3],
}

impl ExitStats {
    fn summary(&self) -> String {
        let mut ports: Vec<(&u16, &u64)> = self.by_port.iter().collect();
        ports.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = ports
            .iter()
            .take(8)
            .map(|(p, n)| format!("{p:#x}:{n}"))
            .collect();
        format!(
            "{} KVM_RUNs, {} port I/O exits (top ports {}), {} MMIO exits, \
             emulation fixes int3:{} ud2:{} fwait:{}",
            self.runs,
            self.by_port.values().sum::<u64>(),
            top.join(" "),
            self.mmio,
            self.fixes[0],
            self.fixes[1],
            self.fixes[2]
        )
    }
}

/// One vCPU with what it needs to run: its KVM fd, guest memory and the two buses.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    memory: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    emulation_fixes: u64,
    stats: ExitStats,
}

impl Vcpu {
    /// Create vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                op: "CREATE_VCPU",
                source,
            })?;
        Ok(Self {
            id,
            fd,
            memory: vm.memory().clone(),
            pio,
            mmio,
            emulation_fixes: 0,
            stats: ExitStats::default(),
        })
    }

    /// This vCPU's index (and APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd (for saving and restoring state).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm_err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, op, source }
    }

    /// Set CPUID, the boot MSRs and the LAPIC LINT modes; on the boot vCPU (`entry` is
    /// Some) also the registers for the 64-bit kernel entry. Application processors
    /// stay in KVM's wait-for-SIPI state and are started by the guest.
    /// Payload mode: enter guest user mode at the payload (see [`crate::payload`]) with
    /// this vCPU's share of the region, runnable at once (no INIT/SIPI for APs).
    pub fn enter_payload(&self, count: u64, base: u64, bytes: u64) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(self.kvm_err("GET_SREGS"))?;
        self.fd
            .set_sregs(&crate::payload::sregs(sregs))
            .map_err(self.kvm_err("SET_SREGS"))?;
        self.fd
            .set_regs(&crate::payload::regs(
                u64::from(self.id),
                count,
                base,
                bytes,
            ))
            .map_err(self.kvm_err("SET_REGS"))?;
        let runnable = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        self.fd
            .set_mp_state(runnable)
            .map_err(self.kvm_err("SET_MP_STATE"))
    }

    pub fn configure(&self, cpuid: &CpuId, entry: Option<u64>) -> Result<(), VcpuError> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.kvm_err("SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm_err("SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                wanted: msrs.as_slice().len(),
            });
        }
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("GET_LAPIC"))?;
        set_lint_modes(&mut lapic.regs);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("SET_LAPIC"))?;
        if let Some(entry) = entry {
            regs::write_boot_tables(&self.memory)?;
            let sregs = self.fd.get_sregs().map_err(self.kvm_err("GET_SREGS"))?;
            self.fd
                .set_sregs(&regs::boot_sregs(sregs))
                .map_err(self.kvm_err("SET_SREGS"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(self.kvm_err("SET_REGS"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("SET_FPU"))?;
        }
        Ok(())
    }

    /// Run the guest once and handle the exit.
    fn run_once(&mut self) -> Next {
        self.stats.runs += 1;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                *self.stats.by_port.entry(port).or_default() += 1;
                self.pio.read(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                *self.stats.by_port.entry(port).or_default() += 1;
                self.pio.write(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.stats.mmio += 1;
                self.mmio.read(addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.stats.mmio += 1;
                self.mmio.write(addr, data);
                Next::Continue
            }
            // With the in-kernel LAPIC, HLT is handled in KVM; an exit here is harmless.
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Next::Continue,
            Ok(VcpuExit::Shutdown) => {
                log::info!("vCPU {}: guest shutdown (triple fault or reset)", self.id);
                Next::Stop(VmStop::Shutdown)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                log::info!("vCPU {}: system event {kind}", self.id);
                Next::Stop(if kind == KVM_SYSTEM_EVENT_RESET {
                    VmStop::Reset
                } else {
                    VmStop::Shutdown
                })
            }
            Ok(VcpuExit::InternalError) => self.handle_internal_error(),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                self.id
            ))),
            Ok(other) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: unexpected KVM exit {other:?}",
                self.id
            ))),
            Err(e) if e.errno() == libc::EINTR => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                self.id
            ))),
        }
    }

    /// Read up to 15 instruction bytes at guest virtual `rip`, page by page through
    /// `KVM_TRANSLATE`. Returns what could be read (possibly nothing).
    fn read_instruction(&self, rip: u64) -> Vec<u8> {
        const MAX_INSN: u64 = 15;
        let mut out = Vec::new();
        let mut va = rip;
        while (out.len() as u64) < MAX_INSN {
            let in_page = 0x1000 - (va & 0xfff);
            let n = in_page.min(MAX_INSN - out.len() as u64) as usize;
            let Ok(t) = self.fd.translate_gva(va) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let mut buf = vec![0u8; n];
            if self
                .memory
                .read_slice(&mut buf, GuestAddress(t.physical_address))
                .is_err()
            {
                break;
            }
            out.extend_from_slice(&buf);
            va += n as u64;
        }
        out
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: for an emulation failure on int3/ud2/fwait do what the
    /// CPU would; anything else stops the VM with RIP and the instruction bytes.
    fn handle_internal_error(&mut self) -> Next {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which `internal` is the
        // member of the exit union KVM filled in; it is plain integers.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Next::Stop(VmStop::Error(format!(
                    "vCPU {}: KVM internal error {} and cannot read registers: {e}",
                    self.id, internal.suberror
                )))
            }
        };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM internal error (suberror {}) at RIP {:#x}",
                self.id, internal.suberror, regs.rip
            )));
        }
        let bytes = self.read_instruction(regs.rip);
        let Some(fix) = classify_instruction(&bytes) else {
            return Next::Stop(VmStop::Error(format!(
                "vCPU {}: KVM cannot emulate the instruction at RIP {:#x}: bytes [{}]",
                self.id,
                regs.rip,
                hex(&bytes)
            )));
        };
        self.emulation_fixes += 1;
        self.stats.fixes[fix as usize] += 1;
        // Rate-limited: the guest can trigger these at will.
        if self.emulation_fixes <= 8 || self.emulation_fixes.is_power_of_two() {
            log::debug!(
                "vCPU {}: emulated {fix:?} at RIP {:#x} ({} so far)",
                self.id,
                regs.rip,
                self.emulation_fixes
            );
        }
        match self.apply_fix(fix, regs) {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(VmStop::Error(format!(
                "vCPU {}: cannot emulate {fix:?} at RIP {:#x}: {e}",
                self.id, regs.rip
            ))),
        }
    }

    fn apply_fix(&self, fix: EmulationFix, mut r: kvm_bindings::kvm_regs) -> Result<(), VcpuError> {
        let (vector, advance) = match fix {
            EmulationFix::Int3 => (Some(3u8), 1),
            EmulationFix::Ud2 => (Some(6u8), 0),
            EmulationFix::Fwait => (None, 1),
        };
        if advance != 0 {
            r.rip += advance;
            self.fd.set_regs(&r).map_err(self.kvm_err("SET_REGS"))?;
        }
        if let Some(nr) = vector {
            let mut ev = self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm_err("GET_VCPU_EVENTS"))?;
            ev.exception.injected = 1;
            ev.exception.nr = nr;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            ev.exception.pending = 0;
            self.fd
                .set_vcpu_events(&ev)
                .map_err(self.kvm_err("SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }

    /// Complete an I/O or MMIO exit KVM is still waiting on (an `in` needs its result
    /// written back into the guest register) without running guest code, so the state
    /// read while paused is exact.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => log::debug!(
                "vCPU {}: completing pending I/O returned {other:?}",
                self.id
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The thread body: the state machine described in the module docs.
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
                    (VcpuRequest::SaveState(msrs, tx), State::Paused) => {
                        let _ = tx.send(persist::vcpu::save(&self.fd, self.id, &msrs));
                        None
                    }
                    (VcpuRequest::RestoreState(st, tx), State::Paused) => {
                        let _ = tx.send(persist::vcpu::restore(&self.fd, &st));
                        None
                    }
                    (VcpuRequest::SaveState(_, tx), _) => {
                        let _ = tx.send(Err(PersistError::Vcpu(format!(
                            "vCPU {} is not paused",
                            self.id
                        ))));
                        None
                    }
                    (VcpuRequest::RestoreState(_, tx), _) => {
                        let _ = tx.send(Err(PersistError::Vcpu(format!(
                            "vCPU {} is not paused",
                            self.id
                        ))));
                        None
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
                        Some(VcpuAck::Resumed)
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

    /// Wait for `expected` (or `Stopped`). A late answer to an earlier request that
    /// timed out is skipped, so it cannot be taken for this one.
    fn wait(&self, expected: VcpuAck, what: &'static str) -> Result<VcpuAck, VcpuError> {
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ack = self.ack.recv_timeout(left).map_err(|e| match e {
                RecvTimeoutError::Timeout => VcpuError::AckTimeout(self.id, what),
                RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
            })?;
            if ack == expected || ack == VcpuAck::Stopped {
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

    /// Resume every vCPU. Fails if the VM has stopped.
    pub fn resume(&self) -> Result<(), VcpuError> {
        for h in &self.handles {
            // Kicked too: a vCPU that was never paused may sit in an in-kernel HLT for
            // a long time and would otherwise not see the request.
            h.send(VcpuRequest::Resume)?;
        }
        let mut result = Ok(());
        for h in &self.handles {
            if h.wait(VcpuAck::Resumed, "resume")? == VcpuAck::Stopped && result.is_ok() {
                result = Err(VcpuError::Stopped(h.id));
            }
        }
        result
    }

    /// Save every vCPU's state; the vCPUs must be paused. Each thread saves its own
    /// vCPU, in parallel.
    pub fn save_states(&self, msrs: &Arc<Vec<u32>>) -> Result<Vec<VcpuState>, PersistError> {
        let mut answers = Vec::with_capacity(self.handles.len());
        for h in &self.handles {
            let (tx, rx) = mpsc::channel();
            h.send(VcpuRequest::SaveState(msrs.clone(), tx))
                .map_err(|e| PersistError::Vcpu(e.to_string()))?;
            answers.push((h.id, rx));
        }
        answers
            .into_iter()
            .map(|(id, rx)| {
                rx.recv_timeout(ACK_TIMEOUT)
                    .map_err(|_| PersistError::Vcpu(format!("vCPU {id} did not save its state")))?
            })
            .collect()
    }

    /// Restore every vCPU's state (one entry per vCPU, in id order); the vCPUs must be
    /// paused.
    pub fn restore_states(&self, states: &[VcpuState]) -> Result<(), PersistError> {
        if states.len() != self.handles.len() {
            return Err(PersistError::Mismatch {
                field: "vcpus",
                detail: format!("{} saved, {} running", states.len(), self.handles.len()),
            });
        }
        let mut answers = Vec::with_capacity(self.handles.len());
        for (h, st) in self.handles.iter().zip(states) {
            let (tx, rx) = mpsc::channel();
            h.send(VcpuRequest::RestoreState(Box::new(st.clone()), tx))
                .map_err(|e| PersistError::Vcpu(e.to_string()))?;
            answers.push((h.id, rx));
        }
        for (id, rx) in answers {
            rx.recv_timeout(ACK_TIMEOUT).map_err(|_| {
                PersistError::Vcpu(format!("vCPU {id} did not restore its state"))
            })??;
        }
        Ok(())
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
mod tests {
    use super::*;

    #[test]
    fn classifies_the_three_fixable_instructions() {
        assert_eq!(
            classify_instruction(&[0xcc, 0x90]),
            Some(EmulationFix::Int3)
        );
        assert_eq!(classify_instruction(&[0x0f, 0x0b]), Some(EmulationFix::Ud2));
        assert_eq!(classify_instruction(&[0x9b]), Some(EmulationFix::Fwait));
        assert_eq!(classify_instruction(&[0x0f, 0x01, 0xd0]), None); // xgetbv
        assert_eq!(classify_instruction(&[0x0f]), None);
        assert_eq!(classify_instruction(&[]), None);
        assert_eq!(hex(&[0x0f, 0xae, 0x27]), "0f ae 27");
    }

    #[test]
    fn exit_stats_summary_sorts_ports() {
        let mut s = ExitStats {
            runs: 10,
            ..Default::default()
        };
        s.by_port.insert(0x80, 2);
        s.by_port.insert(0x3f8, 5);
        s.mmio = 1;
        assert_eq!(
            s.summary(),
            "10 KVM_RUNs, 7 port I/O exits (top ports 0x3f8:5 0x80:2), 1 MMIO exits, \
             emulation fixes int3:0 ud2:0 fwait:0"
        );
    }

    #[test]
    fn lint_modes_keep_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Masked (bit 16) plus some delivery mode that must be replaced.
        regs[APIC_LVT0 + 1] = 0x05;
        regs[APIC_LVT0 + 2] = 0x01;
        set_lint_modes(&mut regs);
        let read = |off: usize| {
            u32::from_le_bytes([
                regs[off] as u8,
                regs[off + 1] as u8,
                regs[off + 2] as u8,
                regs[off + 3] as u8,
            ])
        };
        assert_eq!(read(APIC_LVT0), 0x1_0700);
        assert_eq!(read(APIC_LVT1), 0x400);
    }

    /// A one-vCPU VM in real mode running `code` at 0x1000, with `pio` as its port bus.
    /// None (after saying why) when KVM is missing.
    fn tiny_vm(code: &[u8], pio: Bus) -> Option<(Vm, Vcpu)> {
        use crate::vstate::kvm::KvmContext;
        if pmsnap_testenv::skip_or_fail("tiny_vm", pmsnap_testenv::kvm_unavailable()) {
            return None;
        }
        let kvm = KvmContext::new().expect("open KVM");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        mem.write_slice(code, GuestAddress(0x1000)).expect("code");
        let vm = Vm::new(&kvm, mem).expect("VM");
        let vcpu = Vcpu::new(&vm, 0, Arc::new(pio), Arc::new(Bus::new())).expect("vCPU");
        let mut sregs = vcpu.fd.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).expect("set sregs");
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.fd.set_regs(&regs).expect("set regs");
        Some((vm, vcpu))
    }

    #[test]
    fn pause_reaches_a_vcpu_halted_in_the_kernel() {
        // cli; hlt; jmp back: the vCPU sleeps inside KVM_RUN with no interrupt to wake
        // it, so only the kick signal can bring it out.
        let Some((_vm, vcpu)) = tiny_vm(&[0xfa, 0xf4, 0xeb, 0xfd], Bus::new()) else {
            return;
        };
        let (stop, stops) = StopNotifier::new().expect("notifier");
        let mut vcpus = Vcpus::start(vec![vcpu], &stop).expect("start");
        std::thread::sleep(Duration::from_millis(200));
        vcpus.pause().expect("pause a halted vCPU");
        vcpus.resume().expect("resume");
        vcpus.resume().expect("resume while running");
        vcpus.pause().expect("pause again");
        vcpus.stop();
        assert!(stops.try_recv().is_err(), "the VM must not have stopped");
        // Stopped threads are gone: requests now fail instead of hanging.
        assert!(matches!(vcpus.pause(), Err(VcpuError::Gone(0))));
    }

    #[derive(Default)]
    struct PortCounter(Arc<std::sync::atomic::AtomicU64>);
    impl crate::devices::bus::BusDevice for PortCounter {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            assert_eq!(data, [0x41]);
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A tiny VM looping `mov al, 0x41; out 0x80, al`, and the count of its port writes;
    /// `None` (after a printed reason) without KVM.
    fn port_loop_vm() -> Option<(Vm, Vcpu, Arc<std::sync::atomic::AtomicU64>)> {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut pio = Bus::new();
        pio.insert(
            Arc::new(std::sync::Mutex::new(PortCounter(count.clone()))),
            0x80,
            1,
        )
        .expect("insert");
        // mov al, 0x41; out 0x80, al; jmp back
        let (vm, vcpu) = tiny_vm(&[0xb0, 0x41, 0xe6, 0x80, 0xeb, 0xfa], pio)?;
        Some((vm, vcpu, count))
    }

    /// Wait up to 10 s for `done(count)`; returns the last count.
    fn wait_count(count: &std::sync::atomic::AtomicU64, done: impl Fn(u64) -> bool) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = count.load(std::sync::atomic::Ordering::SeqCst);
            if done(c) || std::time::Instant::now() >= deadline {
                return c;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn port_io_goes_through_the_bus_and_stops_while_paused() {
        use std::sync::atomic::Ordering::SeqCst;
        let Some((_vm, vcpu, count)) = port_loop_vm() else {
            return;
        };
        let (stop, _stops) = StopNotifier::new().expect("notifier");
        let vcpus = Vcpus::start(vec![vcpu], &stop).expect("start");
        assert!(
            wait_count(&count, |c| c >= 10) >= 10,
            "guest port writes reach the device"
        );
        vcpus.pause().expect("pause");
        let frozen = count.load(SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count.load(SeqCst), frozen, "no guest I/O while paused");
        vcpus.resume().expect("resume");
        assert!(
            wait_count(&count, |c| c > frozen) > frozen,
            "guest runs again after resume"
        );
    }

    #[test]
    fn a_vcpu_started_paused_runs_nothing_until_resumed() {
        use std::sync::atomic::Ordering::SeqCst;
        let Some((_vm, vcpu, count)) = port_loop_vm() else {
            return;
        };
        let (stop, _stops) = StopNotifier::new().expect("notifier");
        let mut vcpus = Vcpus::start_paused(vec![vcpu], &stop).expect("start paused");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(count.load(SeqCst), 0, "no guest instruction before resume");
        vcpus.pause().expect("pause while paused is a no-op");
        vcpus.resume().expect("resume");
        assert!(
            wait_count(&count, |c| c > 0) > 0,
            "the guest runs after resume"
        );
        vcpus.stop();
    }

    #[derive(Default)]
    struct PortLog(Arc<std::sync::Mutex<Vec<u8>>>);
    impl crate::devices::bus::BusDevice for PortLog {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.0.lock().expect("lock").extend_from_slice(data);
        }
    }

    /// Run a real-mode guest whose IVT sends #BP to a handler that logs 3 and returns,
    /// and #UD to one that logs 6 and halts; the code at 0x1000 is `int3; ud2`. Whether
    /// KVM executes these itself or fails to emulate them (this host), the guest must see
    /// CPU semantics: #BP as a trap (return after the int3), then #UD.
    #[test]
    fn int3_and_ud2_deliver_the_exceptions_the_cpu_would() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut pio = Bus::new();
        pio.insert(
            Arc::new(std::sync::Mutex::new(PortLog(log.clone()))),
            0x80,
            1,
        )
        .expect("insert");
        let Some((vm, mut vcpu)) = tiny_vm(&[0xcc, 0x0f, 0x0b], pio) else {
            return;
        };
        let mem = vm.memory();
        // IVT: vector 3 -> 0000:2000, vector 6 -> 0000:2100.
        mem.write_obj(0x0000_2000u32, GuestAddress(3 * 4))
            .expect("ivt");
        mem.write_obj(0x0000_2100u32, GuestAddress(6 * 4))
            .expect("ivt");
        // mov al, 3; out 0x80, al; iret
        mem.write_slice(&[0xb0, 0x03, 0xe6, 0x80, 0xcf], GuestAddress(0x2000))
            .expect("handler");
        // mov al, 6; out 0x80, al; cli; hlt; jmp back to hlt
        mem.write_slice(
            &[0xb0, 0x06, 0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd],
            GuestAddress(0x2100),
        )
        .expect("handler");
        let mut regs = vcpu.fd.get_regs().expect("regs");
        regs.rsp = 0x8000;
        vcpu.fd.set_regs(&regs).expect("regs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.lock().expect("lock").len() < 2 && std::time::Instant::now() < deadline {
            if let Next::Stop(why) = vcpu.run_once() {
                panic!("guest stopped: {why:?}");
            }
        }
        assert_eq!(*log.lock().expect("lock"), vec![3, 6]);
        eprintln!(
            "emulation fixes applied: {} ({})",
            vcpu.emulation_fixes,
            vcpu.stats.summary()
        );
    }

    /// `tiny_vm` switched to 64-bit ring 0 with the boot GDT and page tables, an IDT at
    /// 0x3000 sending #BP to 0x2000 and #UD to 0x2100, and RSP at 0x8000.
    fn tiny_long_mode_vm(code: &[u8], pio: Bus) -> Option<(Vm, Vcpu)> {
        let (vm, vcpu) = tiny_vm(code, pio)?;
        let mem = vm.memory();
        regs::write_boot_tables(mem).expect("boot tables");
        for (vector, handler) in [(3u64, 0x2000u64), (6, 0x2100)] {
            let gate = (handler & 0xffff)
                | (0x10 << 16)
                | (0x8e00u64 << 32)
                | ((handler >> 16) & 0xffff) << 48;
            mem.write_obj(gate, GuestAddress(0x3000 + vector * 16))
                .expect("idt");
            mem.write_obj(handler >> 32, GuestAddress(0x3000 + vector * 16 + 8))
                .expect("idt");
        }
        let mut sregs = regs::boot_sregs(vcpu.fd.get_sregs().expect("sregs"));
        sregs.idt.base = 0x3000;
        sregs.idt.limit = 7 * 16 - 1;
        vcpu.fd.set_sregs(&sregs).expect("set sregs");
        let mut r = regs::boot_regs(0x1000);
        r.rsp = 0x8000;
        vcpu.fd.set_regs(&r).expect("set regs");
        Some((vm, vcpu))
    }

    /// Run `vcpu` until the port log has `n` bytes or the guest stops.
    fn run_until_logged(
        vcpu: &mut Vcpu,
        log: &std::sync::Mutex<Vec<u8>>,
        n: usize,
    ) -> Option<VmStop> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.lock().expect("lock").len() < n && std::time::Instant::now() < deadline {
            if let Next::Stop(why) = vcpu.run_once() {
                return Some(why);
            }
        }
        None
    }

    fn port_log_bus() -> (Bus, Arc<std::sync::Mutex<Vec<u8>>>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut pio = Bus::new();
        pio.insert(
            Arc::new(std::sync::Mutex::new(PortLog(log.clone()))),
            0x80,
            1,
        )
        .expect("insert");
        (pio, log)
    }

    /// The same in 64-bit ring 0, where this host's KVM emulator gives up on int3 and
    /// ud2 and the VMM must inject the exceptions itself.
    #[test]
    fn kernel_mode_int3_and_ud2_deliver_the_exceptions_the_cpu_would() {
        let (pio, log) = port_log_bus();
        let Some((vm, mut vcpu)) = tiny_long_mode_vm(&[0xcc, 0x0f, 0x0b], pio) else {
            return;
        };
        let mem = vm.memory();
        // mov al, 3; out 0x80, al; iretq
        mem.write_slice(&[0xb0, 0x03, 0xe6, 0x80, 0x48, 0xcf], GuestAddress(0x2000))
            .expect("handler");
        // mov al, 6; out 0x80, al; cli; hlt; jmp back to hlt
        mem.write_slice(
            &[0xb0, 0x06, 0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd],
            GuestAddress(0x2100),
        )
        .expect("handler");
        let stop = run_until_logged(&mut vcpu, &log, 2);
        assert_eq!(stop, None, "guest must not stop");
        assert_eq!(*log.lock().expect("lock"), vec![3, 6]);
        eprintln!(
            "emulation fixes applied: {} ({})",
            vcpu.emulation_fixes,
            vcpu.stats.summary()
        );
    }

    /// `fwait` in kernel mode (the emulator gives up on it here) continues after it.
    #[test]
    fn kernel_mode_fwait_continues_after_it() {
        let (pio, log) = port_log_bus();
        // fwait; mov al, 9; out 0x80, al; cli; hlt
        let code = [0x9b, 0xb0, 0x09, 0xe6, 0x80, 0xfa, 0xf4];
        let Some((_vm, mut vcpu)) = tiny_long_mode_vm(&code, pio) else {
            return;
        };
        assert_eq!(run_until_logged(&mut vcpu, &log, 1), None);
        assert_eq!(*log.lock().expect("lock"), vec![9]);
        eprintln!("{}", vcpu.stats.summary());
    }

    /// An instruction the emulator cannot run (POPCNT in kernel mode on this host) stops
    /// the VM with RIP and the bytes; where the CPU runs it natively it just executes.
    #[test]
    fn unemulatable_instruction_is_reported_with_rip_and_bytes() {
        let (pio, log) = port_log_bus();
        // popcnt eax, ebx; mov al, 7; out 0x80, al; cli; hlt
        let code = [0xf3, 0x0f, 0xb8, 0xc3, 0xb0, 0x07, 0xe6, 0x80, 0xfa, 0xf4];
        let Some((_vm, mut vcpu)) = tiny_long_mode_vm(&code, pio) else {
            return;
        };
        match run_until_logged(&mut vcpu, &log, 1) {
            Some(VmStop::Error(msg)) => {
                eprintln!("stopped: {msg}");
                assert_eq!(
                    msg,
                    "vCPU 0: KVM cannot emulate the instruction at RIP 0x1000: \
                     bytes [f3 0f b8 c3 b0 07 e6 80 fa f4 00 00 00 00 00]"
                );
                assert!(log.lock().expect("lock").is_empty());
            }
            None => {
                eprintln!("ran natively");
                assert_eq!(*log.lock().expect("lock"), vec![7], "ran natively")
            }
            Some(other) => panic!("unexpected stop {other:?}"),
        }
    }

    #[test]
    fn stop_notifier_delivers_and_signals() {
        let (n, rx) = StopNotifier::new().expect("eventfd");
        let n2 = n.try_clone().expect("clone");
        n2.notify(VmStop::Reset);
        assert_eq!(n.eventfd().read().expect("readable"), 1);
        assert_eq!(rx.try_recv(), Ok(VmStop::Reset));
    }
}
