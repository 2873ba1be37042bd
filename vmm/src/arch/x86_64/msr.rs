//! MSRs set on every vCPU before boot: the syscall/sysenter MSRs cleared, the TSC at 0,
//! fast strings enabled and MTRRs on with write-back as the default type (so the kernel
//! does not map all RAM uncached).
//!
//! Quirk: `MSR_IA32_ARCH_CAPABILITIES` (0x10a) accepts only 0 on this host, so it is not
//! set at all (KVM's default is kept).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// STAR (SYSCALL segments).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit SYSCALL entry).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compat SYSCALL entry).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL RFLAGS mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE: fast string operations.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRR enable bit of IA32_MTRR_DEF_TYPE.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Write-back memory type.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;
/// IA32_ARCH_CAPABILITIES: never set (see the module docs).
pub const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// The (index, value) pairs set at boot.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// The boot MSRs as the `KVM_SET_MSRS` argument.
pub fn boot_msrs() -> Msrs {
    Msrs::from_entries(&boot_msr_entries()).expect("11 entries are far below the FAM limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_content() {
        let m = boot_msr_entries();
        assert_eq!(m.len(), boot_msrs().as_slice().len());
        assert!(m.iter().all(|e| e.index != MSR_IA32_ARCH_CAPABILITIES));
        let get = |i| m.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_LSTAR), Some(0));
        let mut idx: Vec<u32> = m.iter().map(|e| e.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), m.len(), "no MSR set twice");
    }
}
