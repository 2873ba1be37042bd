//! The zero page (`boot_params`): setup header, e820 memory map, command line and initrd.
//! Written into guest memory with linux-loader's `LinuxBootConfigurator`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{self, CMDLINE_START, EBDA_START, HIMEM_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// "HdrS": the magic of a Linux setup header.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Loader type "undefined/other" (0xff): we are not a registered boot loader.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment the kernel may be relocated to (16 MiB).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// Errors building the zero page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// More e820 entries than the zero page has room for.
    #[error("too many e820 entries")]
    TooManyE820Entries,
    /// An initrd must sit below 4 GiB for the 32-bit fields.
    #[error("initrd at {0:#x} is not below 4 GiB")]
    InitrdTooHigh(u64),
}

/// Where the initrd was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address (page aligned).
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The e820 map for `mem_bytes` of RAM: low RAM up to the EBDA, the EBDA and the
/// legacy BIOS/VGA area reserved, RAM from 1 MiB to the MMIO gap, and the rest above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in layout::ram_regions(mem_bytes) {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push(entry(start, r.end() - start, E820_RAM));
        }
    }
    map
}

/// Build the zero page. `header` is the bzImage's own setup header (None for an ELF
/// vmlinux, which has none: we then fill the fields the kernel checks).
pub fn build(
    header: Option<setup_header>,
    mem_bytes: u64,
    cmdline_len_with_nul: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len_with_nul as u32;
    if let Some(i) = initrd {
        let addr = u32::try_from(i.addr).map_err(|_| BootParamsError::InitrdTooHigh(i.addr))?;
        params.hdr.ramdisk_image = addr;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    let map = e820_map(mem_bytes);
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyE820Entries);
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};

    fn tuples(map: &[boot_e820_entry]) -> Vec<(u64, u64, u32)> {
        map.iter().map(|e| (e.addr, e.size, e.r#type)).collect()
    }

    #[test]
    fn e820_small_guest() {
        let mem = 256u64 << 20;
        assert_eq!(
            tuples(&e820_map(mem)),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, mem - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_gap() {
        let mem = 6u64 << 30;
        let map = tuples(&e820_map(mem));
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(map[3], (MMIO_GAP_END, mem - MMIO_GAP_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the reserved legacy hole is RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn zero_page_for_elf_kernel() {
        let initrd = InitrdPlacement {
            addr: 0x0f00_0000,
            size: 0x12345,
        };
        let p = build(None, 256 << 20, 100, Some(initrd)).expect("build");
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 100);
        assert_eq!({ hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12345);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        assert_eq!(
            (last.addr, last.size),
            (HIMEM_START, (256 << 20) - HIMEM_START)
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let h = setup_header {
            version: 0x20f,
            setup_sects: 27,
            ..Default::default()
        };
        let p = build(Some(h), 128 << 20, 10, None).expect("build");
        let hdr = p.hdr;
        assert_eq!((hdr.version, hdr.setup_sects), (0x20f, 27));
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0, 0));
    }

    #[test]
    fn initrd_above_4g_is_refused() {
        let initrd = InitrdPlacement {
            addr: 1 << 32,
            size: 1,
        };
        assert!(matches!(
            build(None, 8 << 30, 1, Some(initrd)),
            Err(BootParamsError::InitrdTooHigh(a)) if a == 1 << 32
        ));
    }
}
