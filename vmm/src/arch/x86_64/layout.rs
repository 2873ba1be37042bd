//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (unused, RAM)
//! 0x0000_0500  GDT (BOOT_GDT_START, 5 entries), IDT at 0x530
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer of the boot vCPU (grows down)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  MP table (EBDA), up to 0xa_0000
//! 0x000a_0000  VGA hole / BIOS area, not RAM in the e820 map
//! 0x0010_0000  kernel (ELF vmlinux at its physical load address, bzImage at 1 MiB)
//! ...          initrd at the top of low RAM, page aligned
//! 0xc000_0000  32-bit MMIO gap (1 GiB): virtio-mmio devices from MMIO_GAP_START,
//!              IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000  RAM above 4 GiB, when --mem is larger than the gap start
//! ```
//!
//! Guest RAM is at most two regions: `[0, min(mem, MMIO_GAP_START))` and, for the rest,
//! `[4 GiB, 4 GiB + mem - MMIO_GAP_START)`. The e820 map marks the legacy hole
//! `[EBDA_START, 1 MiB)` as reserved so the kernel never allocates the MP table or the
//! BIOS area.

/// Start of the GDT the boot vCPU is entered with.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) IDT the boot vCPU is entered with.
pub const BOOT_IDT_START: u64 = 0x530;
/// The zero page (`boot_params`) the kernel reads at entry (RSI points to it).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB) of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Where the kernel command line is written.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest kernel command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the MP floating pointer and configuration table are written.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of the area the MP table may use.
pub const MPTABLE_END: u64 = 0xa0000;
/// First byte above the legacy BIOS/VGA area: kernels are loaded at or above this.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap. RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First address handed out to MMIO devices (virtio-mmio).
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
/// Size of the MMIO window given to each virtio-mmio device.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// Start of the MMIO device window end (keeps clear of the IOAPIC and LAPIC pages).
pub const MMIO_DEVICES_END: u64 = IOAPIC_ADDR;
/// Address of the in-kernel IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Address of the local APICs.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// Address given to `KVM_SET_TSS_ADDR` (three pages just below the IOAPIC, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Address given to `KVM_SET_IDENTITY_MAP_ADDR` (the page after the TSS pages).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// First IRQ free for devices after the legacy ISA ones (virtio-mmio devices use 5..=23).
pub const IRQ_BASE: u32 = 5;
/// Last IRQ line of the IOAPIC.
pub const IRQ_MAX: u32 = 23;
/// IRQ of the COM1 serial port.
pub const SERIAL_IRQ: u32 = 4;
/// Port of the COM1 serial port.
pub const SERIAL_PORT: u64 = 0x3f8;
/// Number of ports of a 16550.
pub const SERIAL_PORT_LEN: u64 = 8;
/// First port of the i8042 keyboard controller (data at 0x60, command at 0x64).
pub const I8042_PORT: u64 = 0x60;
/// Ports of the i8042 (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;

// Compile-time checks of the fixed layout.
const _: () = assert!(MPTABLE_END <= HIMEM_START);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(KVM_IDENTITY_MAP_ADDR + 0x1000 <= KVM_TSS_ADDR);
const _: () = assert!(KVM_TSS_ADDR + 3 * 0x1000 <= MMIO_GAP_END);

/// A guest RAM region: guest physical start and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRegion {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The guest RAM regions for `mem_bytes` of RAM: below the MMIO gap first, the rest from
/// 4 GiB. The regions are contiguous in the pool file in this order.
pub fn ram_regions(mem_bytes: u64) -> Vec<RamRegion> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut regions = vec![RamRegion {
        start: 0,
        size: low,
    }];
    if mem_bytes > MMIO_GAP_START {
        regions.push(RamRegion {
            start: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
        });
    }
    regions
}

/// End of RAM below the MMIO gap (where the initrd goes at the top).
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(256 << 20),
            vec![RamRegion {
                start: 0,
                size: 256 << 20
            }]
        );
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn memory_up_to_the_gap_is_one_region() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
        assert_eq!(low_ram_end(MMIO_GAP_START), MMIO_GAP_START);
    }

    #[test]
    fn large_memory_is_split_around_the_gap() {
        let mem = 5u64 << 30;
        let r = ram_regions(mem);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RamRegion {
                start: 0,
                size: 3 << 30
            }
        );
        assert_eq!(
            r[1],
            RamRegion {
                start: 4 << 30,
                size: 2 << 30
            }
        );
        assert_eq!(r.iter().map(|r| r.size).sum::<u64>(), mem);
        assert_eq!(low_ram_end(mem), MMIO_GAP_START);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        // Boot structures are below the EBDA and in order.
        let areas = [
            (BOOT_GDT_START, 5 * 8),
            (BOOT_IDT_START, 0x8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, MPTABLE_END - MPTABLE_START),
        ];
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:#x?}", w);
        }
        // KVM's private pages and the APICs are inside the gap and above the devices.
        for a in [KVM_TSS_ADDR, KVM_IDENTITY_MAP_ADDR, IOAPIC_ADDR, APIC_ADDR] {
            assert!((MMIO_DEVICES_END..MMIO_GAP_END).contains(&a), "{a:#x}");
        }
    }
}
