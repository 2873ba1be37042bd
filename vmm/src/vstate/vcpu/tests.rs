//! Tests of vCPU setup, exits, emulation fixes and the thread state machine.

use std::sync::Arc;
use std::time::Duration;

use super::emulation::hex;
use vm_memory::{Bytes, GuestAddress};

use super::exits::{ExitStats, Next};
use super::*;
use crate::stop::{StopNotifier, VmStop};

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
    let asked = std::time::Instant::now();
    let back = vcpus.resume().expect("resume");
    assert!(
        back >= asked && back <= std::time::Instant::now(),
        "the vCPU went back to the guest between the request and the answer"
    );
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

/// `pause_then` stops the guest and runs the job on the vCPU's thread in the same
/// request: the job sees the vCPU out of the guest (its RIP inside the loop), no guest
/// I/O follows, the stop time lies between request and answer, and the vCPUs are
/// paused as after `pause` (a resume runs the guest again; a second `pause_then` on the
/// paused vCPU answers too).
#[test]
fn pause_then_runs_the_job_once_the_guest_has_stopped() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some((_vm, vcpu, count)) = port_loop_vm() else {
        return;
    };
    let (stop, _stops) = StopNotifier::new().expect("notifier");
    let mut vcpus = Vcpus::start(vec![vcpu], &stop).expect("start");
    assert!(wait_count(&count, |c| c >= 10) >= 10, "guest runs");
    let asked = std::time::Instant::now();
    let (answers, stopped) = vcpus
        .pause_then("read RIP", |id, fd| (id, fd.get_regs().map(|r| r.rip)))
        .expect("pause_then");
    let answered = std::time::Instant::now();
    assert!(
        asked <= stopped && stopped <= answered,
        "stop time within the request"
    );
    assert_eq!(answers.len(), 1);
    let (id, rip) = answers.into_iter().next().expect("one").expect("answered");
    assert_eq!(id, 0);
    let rip = rip.expect("GET_REGS");
    assert!((0x1000..0x1006).contains(&rip), "RIP {rip:#x} in the loop");
    let frozen = count.load(SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count.load(SeqCst), frozen, "no guest I/O after pause_then");
    let (again, _) = vcpus
        .pause_then("read RIP", |_, fd| fd.get_regs().map(|r| r.rip))
        .expect("pause_then while paused");
    assert_eq!(
        again[0].as_ref().ok().and_then(|r| r.as_ref().ok()),
        Some(&rip)
    );
    vcpus.resume().expect("resume");
    assert!(
        wait_count(&count, |c| c > frozen) > frozen,
        "guest runs again after resume"
    );
    vcpus.stop();
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

#[test]
fn released_vcpus_run_and_their_unread_answers_do_not_confuse_pause() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some((_vm, vcpu, count)) = port_loop_vm() else {
        return;
    };
    let (stop, _stops) = StopNotifier::new().expect("notifier");
    let mut vcpus = Vcpus::start_paused(vec![vcpu], &stop).expect("start paused");
    vcpus.release().expect("release");
    assert!(
        wait_count(&count, |c| c > 0) > 0,
        "the guest runs after release"
    );
    // The Resumed answer nobody read is skipped: pause waits for Paused itself.
    vcpus.pause().expect("pause after release");
    let frozen = count.load(SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count.load(SeqCst), frozen, "no guest I/O while paused");
    vcpus.resume().expect("resume");
    assert!(
        wait_count(&count, |c| c > frozen) > frozen,
        "guest runs again after resume"
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
fn run_until_logged(vcpu: &mut Vcpu, log: &std::sync::Mutex<Vec<u8>>, n: usize) -> Option<VmStop> {
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
