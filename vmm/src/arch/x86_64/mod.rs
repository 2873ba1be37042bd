//! x86_64 boot setup: the guest physical memory map, boot_params and e820, the GDT and
//! identity page tables for a 64-bit entry, CPUID and MSR setup, and the MP table.

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
