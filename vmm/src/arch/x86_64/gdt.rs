//! The boot GDT and the segment registers derived from it.
//!
//! The kernel's 64-bit entry expects flat code/data segments with the selectors
//! `0x10` (code) and `0x18` (data), as the Linux boot protocol documents; the TSS entry
//! exists only because VMX-style entry checks want a usable TR.

use kvm_bindings::kvm_segment;

/// Index of the 64-bit code segment (selector 0x08).
pub const CODE_INDEX: usize = 1;
/// Index of the 64-bit code segment the boot protocol names (selector 0x10).
pub const BOOT_CODE_INDEX: usize = 2;
/// Index of the data segment (selector 0x18).
pub const DATA_INDEX: usize = 3;
/// Index of the TSS (selector 0x20).
pub const TSS_INDEX: usize = 4;

/// Build a GDT descriptor from its flags (access byte in bits 0..8, flags nibble in
/// bits 12..16), base and limit, in the layout the CPU reads.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, code64 (0x08), code64 (0x10), data (0x18), TSS (0x20).
pub fn boot_gdt() -> [u64; 5] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The KVM segment register value that loading selector `index * 8` from a GDT holding
/// `entry` at `index` produces.
pub fn segment_from_gdt(entry: u64, index: usize) -> kvm_segment {
    let g = bit(entry, 55);
    let raw_limit = limit(entry);
    // With the granularity bit set the limit counts 4 KiB pages.
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base: base(entry),
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(entry, 47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g,
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(bit(entry, 47) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_encode_like_the_cpu_reads_them() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        // Well-known encodings of flat 64-bit code and 32-bit-style flat data.
        assert_eq!(gdt[CODE_INDEX], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[BOOT_CODE_INDEX], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[DATA_INDEX], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[TSS_INDEX], 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x809b, 0x1234_5678, 0xabcde);
        assert_eq!(base(e), 0x1234_5678);
        assert_eq!(limit(e), 0xabcde);
    }

    #[test]
    fn code_segment_is_long_mode_ring0() {
        let cs = segment_from_gdt(boot_gdt()[BOOT_CODE_INDEX], BOOT_CODE_INDEX);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.present, cs.s, cs.g),
            (1, 0, 0, 1, 1, 1)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(boot_gdt()[DATA_INDEX], DATA_INDEX);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x18, 0x3, 1, 0));
        let tss = segment_from_gdt(boot_gdt()[TSS_INDEX], TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x20, 0xb, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }
}
