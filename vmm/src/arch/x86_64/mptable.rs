//! An Intel MultiProcessor Specification 1.4 table, so a kernel without ACPI finds the
//! application processors, the IOAPIC and how ISA IRQs are wired.
//!
//! The table sits in the last KiB of base memory (the EBDA at `MPTABLE_START`), one of
//! the places Linux scans for the `_MP_` floating pointer. It holds: one processor entry
//! per vCPU (APIC ID = vCPU index), one ISA bus, the IOAPIC, IOAPIC pins 0..=23 wired 1:1
//! to ISA IRQs, and LINT0 = ExtINT / LINT1 = NMI on the local APICs.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, IRQ_MAX, MPTABLE_END, MPTABLE_START};
use crate::memory::GuestMemoryMmap;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 signature, FPU and APIC feature bits: what the kernel expects of a modern CPU.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Number of fixed (non-processor) entries: bus, IOAPIC, IRQ routes, two local interrupts.
const FIXED_ENTRIES: usize = 1 + 1 + (IRQ_MAX as usize + 1) + 2;

/// Bytes left in the EBDA for processor entries.
const CPU_ENTRY_SPACE: usize = (MPTABLE_END - MPTABLE_START) as usize
    - FLOATING_POINTER_LEN
    - HEADER_LEN
    - FIXED_ENTRIES * SMALL_ENTRY_LEN;
/// The most vCPUs the table has room for in the EBDA.
pub const MAX_CPUS: usize = CPU_ENTRY_SPACE / PROCESSOR_ENTRY_LEN;

/// Errors building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero vCPUs, or more than fit.
    #[error("the MP table holds 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(usize),
    /// Writing it into guest memory failed.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The IOAPIC's ID: the first one after the vCPUs' APIC IDs.
pub fn ioapic_id(num_cpus: usize) -> u8 {
    num_cpus as u8
}

/// Build the floating pointer followed by the configuration table, as they go at
/// `MPTABLE_START`.
pub fn build(num_cpus: usize) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(num_cpus));
    }
    let table_addr = MPTABLE_START as u32 + FLOATING_POINTER_LEN as u32;
    let ioapic = ioapic_id(num_cpus);

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu as u8);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        // irqflag 0: polarity and trigger conform to the ISA bus (active high, edge).
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = (num_cpus + FIXED_ENTRIES) as u16;

    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, filled below
    table.extend_from_slice(b"PMSNAP  ");
    table.extend_from_slice(b"PMSNAP VMM  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 1 paragraph, rev 1.4, checksum, features
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Build the table and write it at `MPTABLE_START`.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: usize) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_lengths() {
        for n in [1, 2, 4, MAX_CPUS] {
            let b = build(n).expect("build");
            assert!(b.len() as u64 <= MPTABLE_END - MPTABLE_START);
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
            assert_eq!(ptr as u64, MPTABLE_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]) as usize;
            assert_eq!(count, n + FIXED_ENTRIES);
            assert_eq!(len, HEADER_LEN + n * 20 + FIXED_ENTRIES * 8);
        }
    }

    #[test]
    fn processors_bsp_and_ioapic() {
        let b = build(2).expect("build");
        let e = &b[16 + HEADER_LEN..];
        // cpu 0: BSP + enabled; cpu 1: enabled only.
        assert_eq!(&e[0..4], &[ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(&e[20..24], &[ENTRY_PROCESSOR, 1, APIC_VERSION, 1]);
        let rest = &e[40..];
        assert_eq!(&rest[0..8], b"\x01\x00ISA   ");
        assert_eq!(rest[8], ENTRY_IOAPIC);
        assert_eq!(rest[9], ioapic_id(2));
        assert_eq!(
            u32::from_le_bytes(rest[12..16].try_into().expect("4")),
            0xfec0_0000
        );
        // IRQ 4 (serial) routed to IOAPIC pin 4.
        let irq4 = &rest[16 + 4 * 8..16 + 5 * 8];
        assert_eq!(irq4, &[ENTRY_IO_INTERRUPT, 0, 0, 0, 0, 4, 2, 4]);
        let locals = &rest[16 + 24 * 8..];
        assert_eq!(locals[1], INT_TYPE_EXTINT);
        assert_eq!(locals[9], INT_TYPE_NMI);
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(build(0), Err(MptableError::CpuCount(0))));
        assert!(matches!(
            build(MAX_CPUS + 1),
            Err(MptableError::CpuCount(_))
        ));
    }
}
