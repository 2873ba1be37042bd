//! Per-vCPU state, saved and restored in Firecracker's order.
//!
//! Save: MP state first (`KVM_GET_MP_STATE` accepts pending APIC events and may change
//! LAPIC state), then registers, special registers, XSAVE, XCRs, debug registers, LAPIC,
//! MSRs, and vCPU events last. Restore: MP state first, then registers, special
//! registers, XSAVE, XCRs, debug registers, LAPIC before MSRs (the TSC deadline MSR is
//! only accepted with the LAPIC in place, and after `IA32_TSC`), vCPU events last.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use std::sync::Arc;
use std::time::Instant;

use super::PersistError;
use crate::vstate::control::VcpuControl;
use crate::vstate::vcpu::Vcpus;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// IA32_ARCH_CAPABILITIES: KVM here accepts only 0 from userspace for it.
pub const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;
/// MSR_KVM_SYSTEM_TIME_NEW: guest-physical address of the vCPU's kvmclock page, bit 0
/// set once the guest enabled kvmclock.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// MSR_KVM_SYSTEM_TIME: the same, the guest's older interface.
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
/// A restored IA32_TSC that reads back further than this from the saved value was not
/// restored (a correct restore reads back within microseconds of cycles).
const TSC_TOLERANCE_MS: u64 = 100;
/// Most MSRs per KVM_GET/SET_MSRS call (KVM's own limit is higher; the FAM wrapper's is 256).
const MSR_CHUNK: usize = 200;

/// The saved state of one vCPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC ID).
    pub id: u8,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE (and extended) state, which also covers what KVM_GET_FPU reports: the
    /// legacy 4 KiB `kvm_xsave` region as 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (None where KVM lacks KVM_CAP_XCRS).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs, in the order they are restored.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
}

fn kvm(op: &'static str, id: u8) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Kvm {
        op,
        vcpu: Some(id),
        source,
    }
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, PersistError> {
    Msrs::from_entries(entries).map_err(|e| PersistError::Encode(format!("MSR list: {e:?}")))
}

/// Read the MSRs in `indices` that KVM lets this vCPU read. An index KVM refuses is
/// dropped (KVM stops at the first one it cannot read), so the result lists only MSRs
/// that read back; callers keep its indices for the next save.
pub fn read_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: Vec<u32> = indices.to_vec();
    while !rest.is_empty() {
        let n = rest.len().min(MSR_CHUNK);
        let entries: Vec<kvm_msr_entry> = rest[..n]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("GET_MSRS", id))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(n)]);
        if read < n {
            log::debug!(
                "vCPU {id}: MSR {:#x} does not read back; not saved",
                rest[read]
            );
            rest.drain(..=read);
        } else {
            rest.drain(..n);
        }
    }
    Ok(out)
}

/// Order MSRs for restore: IA32_TSC before IA32_TSC_DEADLINE (KVM computes the
/// deadline relative to the TSC), and a zero deadline becomes the TSC value so a timer
/// that was armed fires right after restore instead of never (as Firecracker does).
pub fn order_msrs(msrs: &mut Vec<kvm_msr_entry>) {
    let tsc = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data);
    if let Some(pos) = msrs.iter().position(|m| m.index == MSR_IA32_TSC_DEADLINE) {
        let mut d = msrs.remove(pos);
        if d.data == 0 {
            if let Some(t) = tsc {
                d.data = t;
            }
        }
        msrs.push(d);
    }
}

/// Save vCPU `id`'s state. The vCPU must not be in KVM_RUN (paused, or not started).
pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, PersistError> {
    let mp_state = fd.get_mp_state().map_err(kvm("GET_MP_STATE", id))?;
    let regs = fd.get_regs().map_err(kvm("GET_REGS", id))?;
    let sregs = fd.get_sregs().map_err(kvm("GET_SREGS", id))?;
    // The legacy 4 KiB area holds all the state a guest running with `noxsave` (the
    // default command line) uses.
    let xsave = fd
        .get_xsave()
        .map_err(kvm("GET_XSAVE", id))?
        .region
        .to_vec();
    let xcrs = fd.get_xcrs().ok();
    let debug_regs = fd.get_debug_regs().map_err(kvm("GET_DEBUGREGS", id))?;
    let lapic = fd.get_lapic().map_err(kvm("GET_LAPIC", id))?;
    let mut msrs = read_msrs(fd, id, msr_indices)?;
    order_msrs(&mut msrs);
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS", id))?;
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
    })
}

/// Write MSRs, skipping IA32_ARCH_CAPABILITIES when KVM refuses its value (it accepts
/// only 0 from userspace here). Any other refusal is an error naming the MSR.
fn write_msrs(fd: &VcpuFd, id: u8, msrs: &[kvm_msr_entry]) -> Result<(), PersistError> {
    let mut rest: Vec<kvm_msr_entry> = msrs.to_vec();
    while !rest.is_empty() {
        let n = rest.len().min(MSR_CHUNK);
        let set = fd
            .set_msrs(&msrs_of(&rest[..n])?)
            .map_err(kvm("SET_MSRS", id))?;
        if set >= n {
            rest.drain(..n);
            continue;
        }
        let bad = rest[set];
        if bad.index == MSR_IA32_ARCH_CAPABILITIES {
            log::debug!(
                "vCPU {id}: IA32_ARCH_CAPABILITIES {:#x} not accepted; left as KVM set it",
                bad.data
            );
            rest.drain(..=set);
            continue;
        }
        return Err(PersistError::Mismatch {
            field: "vcpu.msrs",
            detail: format!(
                "vCPU {id}: KVM refuses MSR {:#x} = {:#x}",
                bad.index, bad.data
            ),
        });
    }
    Ok(())
}

/// Whether the guest had enabled kvmclock on this vCPU when the state was saved.
fn kvmclock_enabled(msrs: &[kvm_msr_entry]) -> bool {
    msrs.iter().any(|m| {
        (m.index == MSR_KVM_SYSTEM_TIME_NEW || m.index == MSR_KVM_SYSTEM_TIME) && m.data & 1 == 1
    })
}

/// How far the vCPU's IA32_TSC is from the value the state asked for, in TSC cycles
/// (positive: the TSC is ahead), when that is more than [`TSC_TOLERANCE_MS`]; None when
/// the TSC was restored or the state has none.
fn tsc_skew(
    fd: &VcpuFd,
    id: u8,
    msrs: &[kvm_msr_entry],
) -> Result<Option<(i128, u32)>, PersistError> {
    let Some(saved) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.data)
    else {
        return Ok(None);
    };
    let now = read_msrs(fd, id, &[MSR_IA32_TSC])?
        .first()
        .map(|m| m.data)
        .ok_or(PersistError::Mismatch {
            field: "vcpu.msrs",
            detail: format!("vCPU {id}: IA32_TSC does not read back"),
        })?;
    // Without a frequency, assume 1 GHz: the warning then still names the cycles.
    let khz = fd.get_tsc_khz().unwrap_or(1_000_000).max(1);
    let skew = i128::from(now) - i128::from(saved);
    let tolerance = i128::from(khz) * i128::from(TSC_TOLERANCE_MS);
    Ok((skew.abs() > tolerance).then_some((skew, khz)))
}

/// The TSC-deadline a state holds for `tsc` moved by `skew` TSC cycles (wrapping, as the
/// TSC does): the same time left to run on a TSC that is `skew` away from the saved one.
pub fn shifted_deadline(deadline: u64, skew: i128) -> u64 {
    deadline.wrapping_add(skew as u64)
}

/// Move an armed LAPIC TSC-deadline by `skew`, the distance between the TSC KVM kept
/// and the one the state asked for, so the timer has the time left that it had at the
/// snapshot. Without it, a TSC that is behind the saved one (the host rebooted since)
/// leaves the timer armed for the far future and that vCPU's ticks stop; one that is
/// ahead fires it at once, which is harmless. A zero deadline (disarmed) stays zero.
fn rebase_tsc_deadline(
    fd: &VcpuFd,
    id: u8,
    msrs: &[kvm_msr_entry],
    skew: i128,
) -> Result<(), PersistError> {
    let Some(deadline) = msrs
        .iter()
        .find(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data != 0)
        .map(|m| m.data)
    else {
        return Ok(());
    };
    let moved = shifted_deadline(deadline, skew);
    log::debug!("vCPU {id}: TSC deadline {deadline:#x} moved to {moved:#x}");
    write_msrs(
        fd,
        id,
        &[kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            data: moved,
            ..Default::default()
        }],
    )
}

/// Tell KVM the vCPU was stopped by the host (`KVM_KVMCLOCK_CTRL`): the guest's
/// kvmclock page gets PVCLOCK_GUEST_STOPPED, which makes the guest's RCU stall and soft
/// lockup checks skip the one check that would count the time the VM sat unused. Does
/// nothing for a guest that never enabled kvmclock.
fn mark_guest_stopped(fd: &VcpuFd, id: u8, msrs: &[kvm_msr_entry]) {
    if !kvmclock_enabled(msrs) {
        return;
    }
    if let Err(e) = fd.kvmclock_ctrl() {
        log::warn!("vCPU {id}: KVM_KVMCLOCK_CTRL failed ({e}); the guest may report an RCU stall for the time it was stopped");
    }
}

/// Restore `state` into a vCPU whose CPUID is already set. The vCPU must not be in
/// KVM_RUN. Afterwards the vCPU is marked as stopped by the host for the guest's
/// kvmclock (see `mark_guest_stopped`), and an IA32_TSC that did not take the saved
/// value is reported with a warning: on hosts where the guest TSC is the host's, a guest
/// whose clocksource is `tsc` sees its time jump by the time the snapshot sat unused
/// (docs/machine-notes.md, "Guest time").
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), PersistError> {
    let id = state.id;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("SET_MP_STATE", id))?;
    fd.set_regs(&state.regs).map_err(kvm("SET_REGS", id))?;
    fd.set_sregs(&state.sregs).map_err(kvm("SET_SREGS", id))?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(PersistError::Mismatch {
            field: "vcpu.xsave",
            detail: format!(
                "vCPU {id}: {} words saved, {} expected",
                state.xsave.len(),
                xsave.region.len()
            ),
        });
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: `xsave` is a complete legacy 4 KiB `kvm_xsave` (no trailing extension
    // area is used), which is exactly what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("SET_XSAVE", id))?;
    if let Some(x) = &state.xcrs {
        fd.set_xcrs(x).map_err(kvm("SET_XCRS", id))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("SET_DEBUGREGS", id))?;
    fd.set_lapic(&state.lapic).map_err(kvm("SET_LAPIC", id))?;
    write_msrs(fd, id, &state.msrs)?;
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kvm("SET_VCPU_EVENTS", id))?;
    if let Some((skew, khz)) = tsc_skew(fd, id, &state.msrs)? {
        let secs = skew as f64 / (f64::from(khz) * 1000.0);
        let effect = if skew > 0 {
            format!("jumps forward by {secs:.1} s")
        } else {
            format!(
                "stands still for {:.1} s, until the host's TSC (behind: rebooted since?) passes the snapshot's",
                -secs
            )
        };
        log::warn!(
            "vCPU {id}: IA32_TSC was not restored: KVM keeps the host's TSC, {secs:+.1} s from the snapshot's ({skew:+} cycles at {khz} kHz). kvm-clock is restored; the time of a guest whose clocksource is tsc {effect}"
        );
        rebase_tsc_deadline(fd, id, &state.msrs, skew)?;
    }
    mark_guest_stopped(fd, id, &state.msrs);
    Ok(())
}

/// Save the state of every vCPU of `vcpus` (paused), each on its own thread, reading
/// the MSRs `msr_indices`.
pub fn save_all(
    vcpus: &Vcpus,
    msr_indices: &Arc<Vec<u32>>,
) -> Result<Vec<VcpuState>, PersistError> {
    let msrs = msr_indices.clone();
    vcpus
        .with_each_fd("save its state", move |id, fd| save(fd, id, &msrs))
        .map_err(PersistError::VcpuThread)?
        .into_iter()
        .collect()
}

/// Pause the running `vcpus` and save each one's state on its own thread as soon as
/// all have left the guest (see [`VcpuControl::pause_then`]). The outer error: they did
/// not pause. Otherwise they are paused, with the states (or the first error saving
/// them) and when the last vCPU left the guest.
#[allow(clippy::type_complexity)]
pub fn pause_and_save_all(
    vcpus: &VcpuControl,
    msr_indices: &Arc<Vec<u32>>,
) -> Result<(Result<Vec<VcpuState>, PersistError>, Instant), PersistError> {
    let msrs = msr_indices.clone();
    let (answers, stopped) = vcpus
        .pause_then("save its state", move |id, fd| save(fd, id, &msrs))
        .map_err(PersistError::VcpuThread)?;
    let states = answers
        .into_iter()
        .map(|a| a.map_err(PersistError::VcpuThread).and_then(|s| s))
        .collect();
    Ok((states, stopped))
}

/// Put `states` (one per vCPU, in id order) into the paused `vcpus`, each on its own
/// thread. Every vCPU exists before any state goes in (as Firecracker does): KVM then
/// sees all vCPUs' TSC writes as one synchronized set.
pub fn restore_all(vcpus: &Vcpus, states: &[VcpuState]) -> Result<(), PersistError> {
    if states.len() != vcpus.len() {
        return Err(PersistError::Mismatch {
            field: "vcpus",
            detail: format!("{} saved, {} running", states.len(), vcpus.len()),
        });
    }
    let states = Arc::new(states.to_vec());
    vcpus
        .with_each_fd("restore its state", move |id, fd| {
            restore(fd, &states[usize::from(id)])
        })
        .map_err(PersistError::VcpuThread)?
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn shifted_deadline_keeps_the_time_left_and_wraps() {
        assert_eq!(shifted_deadline(1_000, 500), 1_500);
        assert_eq!(shifted_deadline(1_000, -400), 600);
        assert_eq!(shifted_deadline(u64::MAX, 2), 1, "wraps like the TSC");
        assert_eq!(shifted_deadline(5, -6), u64::MAX);
    }

    /// A state whose TSC is far from the host's and whose LAPIC timer is armed 5 s
    /// ahead: after restore the timer is still about 5 s ahead of the vCPU's TSC, whether
    /// this host restores the TSC (the deadline is kept) or keeps its own (the deadline
    /// is moved by the difference).
    #[test]
    fn restore_keeps_the_lapic_timer_s_time_left() {
        use crate::vstate::kvm::{KvmContext, KVM_PATH};
        if !std::path::Path::new(KVM_PATH).exists() {
            eprintln!("SKIPPED: {KVM_PATH} is missing on this host");
            return;
        }
        let kvm = KvmContext::new().expect("KVM");
        let vm = kvm.kvm().create_vm().expect("VM");
        vm.create_irq_chip().expect("irqchip");
        let fd = vm.create_vcpu(0).expect("vCPU");
        fd.set_cpuid2(&kvm.supported_cpuid().expect("CPUID"))
            .expect("set CPUID");
        // Spurious-vector register: APIC software-enabled; LVT timer: TSC-deadline mode.
        let mut lapic = fd.get_lapic().expect("LAPIC");
        let put = |l: &mut kvm_lapic_state, off: usize, v: u32| {
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = *b as std::os::raw::c_char;
            }
        };
        put(&mut lapic, 0xf0, 0x1ff);
        put(&mut lapic, 0x320, (0b10 << 17) | 0xec);
        fd.set_lapic(&lapic).expect("set LAPIC");
        let khz = u64::from(fd.get_tsc_khz().expect("TSC kHz"));
        let mut st = save(&fd, 0, &[MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]).expect("save");
        // As if saved on a host whose TSC was 1000 s ahead of this one's.
        let saved_tsc = st.msrs[0].data + 1000 * khz * 1000;
        st.msrs = vec![
            kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: saved_tsc,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_IA32_TSC_DEADLINE,
                data: saved_tsc + 5 * khz * 1000,
                ..Default::default()
            },
        ];
        restore(&fd, &st).expect("restore");
        let back = read_msrs(&fd, 0, &[MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]).expect("read");
        let (tsc, deadline) = (back[0].data, back[1].data);
        let left_ms = (i128::from(deadline) - i128::from(tsc)) / i128::from(khz);
        assert!(
            (4_000..=5_000).contains(&left_ms),
            "the timer has {left_ms} ms left (TSC {tsc}, deadline {deadline}), 5000 expected"
        );
    }

    #[test]
    fn tsc_deadline_goes_after_tsc_and_zero_becomes_tsc() {
        let mut m = vec![
            e(MSR_IA32_TSC_DEADLINE, 0),
            e(0x1b, 5),
            e(MSR_IA32_TSC, 777),
        ];
        order_msrs(&mut m);
        let idx: Vec<u32> = m.iter().map(|x| x.index).collect();
        assert_eq!(idx, vec![0x1b, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE]);
        assert_eq!(m[2].data, 777);
        let mut m = vec![e(MSR_IA32_TSC_DEADLINE, 9), e(MSR_IA32_TSC, 777)];
        order_msrs(&mut m);
        assert_eq!(m[1].data, 9, "an armed deadline is kept");
    }
}
