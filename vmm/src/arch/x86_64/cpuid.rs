//! CPUID for each vCPU: KVM's supported list with per-vCPU topology and the features the
//! guest kernel must not use on this host taken out.
//!
//! Quirks (see docs/vmm.md):
//! - On this host (`kvm_pvm`, guest kernel code emulated) `KVM_SET_CPUID2` is mostly
//!   ignored: guest kernel code sees the host's CPUID except a few bits (CX16, the
//!   hypervisor bit). The kernel command line therefore carries the real masks
//!   (`noxsave clearcpuid=...`). We still set CPUID properly so the same VMM is correct
//!   on hardware virtualization, and we clear the same features here so both agree.
//! - XSAVE is cleared because the emulator cannot run XSAVE/XRSTOR; AVX, AVX2, FMA, F16C
//!   and AVX-512 depend on XSAVE-managed state and go with it.
//! - POPCNT, CX16 (CMPXCHG16B) and SMAP (STAC/CLAC) are cleared because the emulator
//!   cannot run those instructions in guest kernel mode.
//! - ERMS and FSRM are cleared so the kernel copies with `rep movsq` rather than
//!   `rep movsb`, which the emulator runs one iteration at a time.
//! - The architectural PMU (leaf 0xa) is hidden: there is no vPMU to emulate.
//! - KVM's paravirtual send-IPI (`KVM_FEATURE_PV_SEND_IPI`, leaf 0x40000001) is hidden:
//!   on this host a guest that sends an NMI through that hypercall (the RCU stall report's
//!   backtrace request) never gets past the `vmcall`, with interrupts off. The guest
//!   then sends IPIs through its APIC (docs/machine-notes.md, "Paravirtual IPIs").

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX bits.
mod leaf1_ecx {
    pub const FMA: u32 = 12;
    pub const CX16: u32 = 13;
    pub const POPCNT: u32 = 23;
    pub const XSAVE: u32 = 26;
    pub const OSXSAVE: u32 = 27;
    pub const AVX: u32 = 28;
    pub const F16C: u32 = 29;
    pub const HYPERVISOR: u32 = 31;
}
/// Leaf 1 EDX: hyper-threading / multi-core package.
const LEAF1_EDX_HTT: u32 = 28;
/// Leaf 7 subleaf 0 EBX bits.
mod leaf7_ebx {
    pub const AVX2: u32 = 5;
    pub const ERMS: u32 = 9;
    pub const AVX512F: u32 = 16;
    pub const AVX512DQ: u32 = 17;
    pub const SMAP: u32 = 20;
    pub const AVX512IFMA: u32 = 21;
    pub const AVX512CD: u32 = 28;
    pub const AVX512BW: u32 = 30;
    pub const AVX512VL: u32 = 31;
}
/// Leaf 7 subleaf 0 EDX: fast short `rep movsb`.
const LEAF7_EDX_FSRM: u32 = 4;
/// Leaf 7 subleaf 0 ECX: AVX-512 VBMI and friends (bits 1, 6, 11, 12, 14).
const LEAF7_ECX_AVX512_MASK: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);

/// KVM's paravirtual feature leaf (EAX: `KVM_FEATURE_*` bits).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// `KVM_FEATURE_PV_SEND_IPI`: send IPIs with the `KVM_HC_SEND_IPI` hypercall.
const KVM_FEATURE_PV_SEND_IPI: u32 = 11;

/// Leaf 0xb / 0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

fn clear(reg: &mut u32, bits: &[u32]) {
    for b in bits {
        *reg &= !(1 << b);
    }
}

/// Bits needed to number `n` things (the APIC ID shift of a topology level).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fix up one entry for vCPU `cpu` of `count`.
fn fix_entry(e: &mut kvm_cpuid_entry2, cpu: u32, count: u32) {
    match e.function {
        0x1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package.
            e.ebx = (e.ebx & 0x0000_ffff) | (cpu << 24) | ((count & 0xff) << 16);
            if count > 1 {
                e.edx |= 1 << LEAF1_EDX_HTT;
            }
            use leaf1_ecx::*;
            clear(&mut e.ecx, &[FMA, CX16, POPCNT, XSAVE, OSXSAVE, AVX, F16C]);
            e.ecx |= 1 << HYPERVISOR;
        }
        0x4 => {
            // Deterministic cache parameters: every vCPU is a core of one package with
            // one thread per core; the last level cache (level 3) is shared by all.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
        }
        0x7 if e.index == 0 => {
            use leaf7_ebx::*;
            clear(
                &mut e.ebx,
                &[
                    AVX2, ERMS, AVX512F, AVX512DQ, SMAP, AVX512IFMA, AVX512CD, AVX512BW, AVX512VL,
                ],
            );
            e.ecx &= !LEAF7_ECX_AVX512_MASK;
            clear(&mut e.edx, &[LEAF7_EDX_FSRM]);
        }
        0xa => {
            // No architectural performance monitoring.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (one thread per core), level 1 = core
            // (all vCPUs), then an invalid level terminating the list.
            let (eax, ebx, level_type) = match e.index {
                0 => (0, 1, LEVEL_TYPE_SMT),
                1 => (bits_for(count), count, LEVEL_TYPE_CORE),
                _ => (0, 0, 0),
            };
            e.eax = eax;
            e.ebx = ebx;
            e.ecx = (e.index & 0xff) | (level_type << 8);
            e.edx = cpu;
        }
        KVM_CPUID_FEATURES => clear(&mut e.eax, &[KVM_FEATURE_PV_SEND_IPI]),
        0x8000_0008 => {
            // AMD: ECX[7:0] number of cores - 1, ECX[15:12] APIC ID bits for cores.
            e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (bits_for(count) << 12);
        }
        0x8000_001e => {
            // AMD extended APIC ID: EAX APIC ID, EBX core ID (one thread per core),
            // ECX one node.
            e.eax = cpu;
            e.ebx = cpu & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

/// Apply the per-vCPU fixups to a copy of KVM's supported CPUID for vCPU `cpu` of
/// `count` vCPUs.
pub fn for_vcpu(supported: &CpuId, cpu: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        fix_entry(e, u32::from(cpu), u32::from(count.max(1)));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    fn supported() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0, 0x00a00f11, 0x0800, !(1 << 31), 0),
            entry(0x4, 0, (1 << 5) | 1, 0, 0, 0),
            entry(0x4, 3, (3 << 5) | 3, 0, 0, 0),
            entry(0x7, 0, 0, u32::MAX, u32::MAX, u32::MAX),
            entry(0xa, 0, 0x0700_0002, 1, 2, 3),
            entry(0xb, 0, 9, 9, 9, 9),
            entry(0xb, 1, 9, 9, 9, 9),
            entry(0xb, 2, 9, 9, 9, 9),
            entry(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
            entry(0x8000_001e, 0, 7, 7, 7, 0),
            entry(0x4000_0001, 0, 0x01ff_ffff, 0, 0, 0),
        ])
        .expect("small cpuid")
    }

    #[test]
    fn leaf1_apic_id_count_and_masks() {
        let c = for_vcpu(&supported(), 1, 2);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        for b in [13, 23, 26, 27, 28] {
            assert_eq!(l1.ecx & (1 << b), 0, "ecx bit {b}");
        }
        assert_ne!(l1.ecx & 1, 0, "SSE3 untouched");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
    }

    #[test]
    fn leaf7_masks() {
        let l7 = get(&for_vcpu(&supported(), 0, 1), 7, 0);
        for b in [5, 9, 16, 20, 30, 31] {
            assert_eq!(l7.ebx & (1 << b), 0, "ebx bit {b}");
        }
        assert_ne!(l7.ebx & (1 << 0), 0, "FSGSBASE untouched");
        assert_eq!(l7.edx & (1 << 4), 0, "FSRM");
    }

    #[test]
    fn topology_leaves() {
        let c = for_vcpu(&supported(), 2, 3);
        let smt = get(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = get(&c, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8, end.edx), (0, 0, 2));
        let l1cache = get(&c, 4, 0);
        assert_eq!((l1cache.eax >> 26, (l1cache.eax >> 14) & 0xfff), (2, 0));
        let l3 = get(&c, 4, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (2, 2));
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 3);
        let amd = get(&c, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 2);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 2);
        assert_eq!(get(&c, 0xa, 0).eax, 0);
    }

    #[test]
    fn kvm_pv_send_ipi_hidden_other_pv_features_kept() {
        let kvm = get(&for_vcpu(&supported(), 0, 2), 0x4000_0001, 0);
        assert_eq!(kvm.eax & (1 << 11), 0, "PV_SEND_IPI");
        assert_eq!(
            kvm.eax,
            0x01ff_ffff & !(1 << 11),
            "the others kept (kvmclock...)"
        );
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(
            [
                bits_for(1),
                bits_for(2),
                bits_for(3),
                bits_for(4),
                bits_for(5)
            ],
            [0, 1, 2, 2, 3]
        );
    }
}
