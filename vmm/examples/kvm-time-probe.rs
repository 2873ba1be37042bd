//! What this host's KVM does with the guest's time sources, as restore needs them:
//! whether a written `IA32_TSC` reads back, whether `IA32_TSC_ADJUST` or the
//! `KVM_VCPU_TSC_CTRL`/`KVM_VCPU_TSC_OFFSET` vCPU attribute can move the guest TSC,
//! which flags `KVM_GET_CLOCK` reports and whether `KVM_SET_CLOCK` sticks, with the
//! vCPUs created all at once or one by one. Prints one line per finding.
//!
//! `cargo run -p vmm --example kvm-time-probe` (needs /dev/kvm). The figures for the
//! development machines are in docs/machine-notes.md.

use kvm_bindings::{kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs};
use kvm_bindings::{KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

// kvm-ioctls offers the vCPU device-attribute ioctls on aarch64 only.
vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, 0xAE, 0xe1, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, 0xAE, 0xe2, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, 0xAE, 0xe3, kvm_device_attr);

/// One device-attribute ioctl on a vCPU; Err(errno) on failure.
fn vcpu_attr(fd: &VcpuFd, req: std::os::raw::c_ulong, attr: &kvm_device_attr) -> Result<(), i32> {
    // SAFETY: `fd` is a vCPU fd, `attr` a valid kvm_device_attr whose `addr` (when the
    // ioctl uses it) points at a live u64, as the callers arrange.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, req, attr) };
    if rc == 0 {
        Ok(())
    } else {
        Err(vmm_sys_util::errno::Error::last().errno())
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// A TSC value far from the host's (about 100 s at 3 GHz past zero).
const OLD_TSC: u64 = 300_000_000_000;

fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64, String> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .map_err(|e| format!("{e:?}"))?;
    match fd.get_msrs(&mut m) {
        Ok(1) => Ok(m.as_slice()[0].data),
        Ok(n) => Err(format!("GET_MSRS read {n} of 1")),
        Err(e) => Err(e.to_string()),
    }
}

fn write_msr(fd: &VcpuFd, index: u32, data: u64) -> Result<(), String> {
    let m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|e| format!("{e:?}"))?;
    match fd.set_msrs(&m) {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("SET_MSRS wrote {n} of 1")),
        Err(e) => Err(e.to_string()),
    }
}

/// Host TSC (the guest TSC on a host where they are the same).
fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn clock(vm: &VmFd) -> String {
    match vm.get_clock() {
        Ok(c) => format!("clock {} ns, flags {:#x}", c.clock, c.flags),
        Err(e) => format!("GET_CLOCK failed: {e}"),
    }
}

fn new_vm(kvm: &Kvm) -> Result<VmFd, String> {
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    vm.create_irq_chip().map_err(|e| e.to_string())?;
    Ok(vm)
}

fn probe_tsc(vm: &VmFd) -> Result<(), String> {
    let fd = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let before = read_msr(&fd, MSR_IA32_TSC)?;
    println!(
        "IA32_TSC of a new vCPU: {before} (host TSC {}, guest - host = {})",
        host_tsc(),
        before as i128 - host_tsc() as i128
    );
    write_msr(&fd, MSR_IA32_TSC, OLD_TSC)?;
    let back = read_msr(&fd, MSR_IA32_TSC)?;
    let h = host_tsc();
    println!(
        "KVM_SET_MSRS(IA32_TSC = {OLD_TSC}) accepted; reads back {back} ({}; host TSC {h})",
        if back.abs_diff(OLD_TSC) < 1_000_000_000 {
            "kept"
        } else {
            "IGNORED: the guest TSC stays the host's"
        }
    );
    match read_msr(&fd, MSR_IA32_TSC_ADJUST) {
        Ok(adj) => {
            let r = write_msr(&fd, MSR_IA32_TSC_ADJUST, adj.wrapping_sub(OLD_TSC));
            let adj2 = read_msr(&fd, MSR_IA32_TSC_ADJUST);
            let tsc = read_msr(&fd, MSR_IA32_TSC)?;
            println!(
                "IA32_TSC_ADJUST reads {adj}; write -{OLD_TSC}: {r:?}, reads back {adj2:?}; IA32_TSC now {tsc} (host {})",
                host_tsc()
            );
        }
        Err(e) => println!("IA32_TSC_ADJUST does not read: {e}"),
    }
    let mut attr = kvm_device_attr {
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        ..Default::default()
    };
    match vcpu_attr(&fd, KVM_HAS_DEVICE_ATTR(), &attr) {
        Err(e) => println!("KVM_VCPU_TSC_CTRL/KVM_VCPU_TSC_OFFSET: not offered (errno {e})"),
        Ok(()) => {
            let mut off: u64 = 0;
            attr.addr = &mut off as *mut u64 as u64;
            // `attr.addr` points at `off`, which outlives the call.
            let got = vcpu_attr(&fd, KVM_GET_DEVICE_ATTR(), &attr);
            let want: u64 = off.wrapping_sub(1_000_000_000_000);
            attr.addr = &want as *const u64 as u64;
            let set = vcpu_attr(&fd, KVM_SET_DEVICE_ATTR(), &attr);
            let tsc = read_msr(&fd, MSR_IA32_TSC)?;
            println!(
                "KVM_VCPU_TSC_OFFSET offered: get {got:?} = {off}, set offset - 1e12: {set:?}; IA32_TSC now {tsc} (host {})",
                host_tsc()
            );
        }
    }
    match fd.get_tsc_khz() {
        Ok(k) => println!("KVM_GET_TSC_KHZ: {k}"),
        Err(e) => println!("KVM_GET_TSC_KHZ failed: {e}"),
    }
    // KVMCLOCK_CTRL needs the guest to have enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW).
    println!(
        "KVM_KVMCLOCK_CTRL before the guest enabled kvmclock: {:?}",
        fd.kvmclock_ctrl()
    );
    Ok(())
}

fn probe_clock(kvm: &Kvm) -> Result<(), String> {
    println!(
        "KVM_CAP_ADJUST_CLOCK: {:#x}",
        kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_ADJUST_CLOCK))
    );
    for all_first in [true, false] {
        let vm = new_vm(kvm)?;
        println!("new VM, no vCPU: {}", clock(&vm));
        let mut fds = Vec::new();
        if all_first {
            for id in 0..2 {
                fds.push(vm.create_vcpu(id).map_err(|e| e.to_string())?);
            }
            for fd in &fds {
                write_msr(fd, MSR_IA32_TSC, OLD_TSC)?;
            }
        } else {
            for id in 0..2 {
                let fd = vm.create_vcpu(id).map_err(|e| e.to_string())?;
                write_msr(&fd, MSR_IA32_TSC, OLD_TSC)?;
                fds.push(fd);
            }
        }
        println!(
            "2 vCPUs {}, IA32_TSC written on each: {}",
            if all_first {
                "created first"
            } else {
                "created one by one"
            },
            clock(&vm)
        );
        let want = 42_000_000_000;
        let r = vm.set_clock(&kvm_clock_data {
            clock: want,
            ..Default::default()
        });
        println!(
            "KVM_SET_CLOCK({want}): {r:?}; then {} (wanted about {want})",
            clock(&vm)
        );
    }
    Ok(())
}

fn main() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("kvm-time-probe: cannot open /dev/kvm: {e}");
            std::process::exit(2);
        }
    };
    let res = new_vm(&kvm)
        .and_then(|vm| probe_tsc(&vm))
        .and_then(|()| probe_clock(&kvm));
    if let Err(e) = res {
        eprintln!("kvm-time-probe: {e}");
        std::process::exit(1);
    }
}
