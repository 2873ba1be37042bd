//! Register state for entering the kernel directly in 64-bit mode: general registers
//! (entry point, stack, `boot_params` pointer), special registers (long mode, paging,
//! GDT) and FPU defaults, plus the boot GDT and identity page tables in guest memory.
//!
//! Entering in 64-bit mode matters on this host: real-mode and 16/32-bit boot code is
//! emulated instruction by instruction and is far slower than starting at the kernel's
//! 64-bit entry.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::gdt::{self, boot_gdt, segment_from_gdt};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// CR0: protected mode enable.
pub const X86_CR0_PE: u64 = 0x1;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 0x10;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 0x8000_0000;
/// CR4: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 0x20;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 0x100;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 0x400;

/// Errors writing the boot tables.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write the boot {what} into guest memory")]
    Write {
        /// Which table.
        what: &'static str,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// General registers of the boot vCPU: RIP at the 64-bit kernel entry, RSI pointing to
/// the zero page as the boot protocol requires.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU defaults (what FNINIT and a reset MXCSR give).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Write the boot GDT, an empty IDT and the identity page tables for the first 1 GiB
/// (2 MiB pages) into guest memory.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|source| RegsError::Write {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| RegsError::Write {
            what: "IDT",
            source,
        })?;
    let pt = |source| RegsError::Write {
        what: "page tables",
        source,
    };
    // PML4[0] -> PDPT, PDPT[0] -> PD; present | writable.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(pt)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(pt)?;
    for i in 0..512u64 {
        // present | writable | page size (2 MiB)
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(pt)?;
    }
    Ok(())
}

/// Special registers for 64-bit entry, starting from the vCPU's current ones (which
/// keep KVM's defaults for the APIC base and the like).
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let table = boot_gdt();
    let code = segment_from_gdt(table[gdt::BOOT_CODE_INDEX], gdt::BOOT_CODE_INDEX);
    let data = segment_from_gdt(table[gdt::DATA_INDEX], gdt::DATA_INDEX);
    let tss = segment_from_gdt(table[gdt::TSS_INDEX], gdt::TSS_INDEX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("anonymous memory")
    }

    #[test]
    fn tables_are_written_where_the_registers_point() {
        let m = mem();
        write_boot_tables(&m).expect("write");
        let s = boot_sregs(kvm_sregs::default());
        for (i, e) in boot_gdt().iter().enumerate() {
            let got: u64 = m
                .read_obj(GuestAddress(s.gdt.base + 8 * i as u64))
                .expect("read");
            assert_eq!(got, *e);
        }
        let pml4: u64 = m.read_obj(GuestAddress(s.cr3)).expect("read");
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START)).expect("read");
        assert_eq!(pdpte & !0xfff, PDE_START);
        let last: u64 = m.read_obj(GuestAddress(PDE_START + 511 * 8)).expect("read");
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.ss.selector, 0x18);
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn regs_point_at_entry_and_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
