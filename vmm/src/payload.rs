//! Payload mode: instead of Linux, run a small flat binary entirely in guest user mode.
//!
//! On this host KVM emulates guest kernel code but runs guest user code natively (see
//! docs/machine-notes.md), so a payload entered directly at CPL 3 writes guest memory at full
//! speed. The tests of the copy-before-write engine use this: a payload that writes a
//! known pattern into a large region on every vCPU while snapshots are taken.
//!
//! The VMM builds everything the payload needs before the first instruction: a GDT with
//! user segments and a TSS, identity page tables with user pages over all of guest RAM
//! (2 MiB pages), and every vCPU's registers: RIP at the payload, CS/SS at DPL 3,
//! interrupts off. Port I/O from user mode is allowed by the TSS's I/O permission
//! bitmap, not by IOPL: this host's KVM clears IOPL for guest user mode (measured: RFLAGS
//! came back 0x10002 and the `out` raised #GP), while it honours the bitmap.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{Vcpu, VcpuError};

/// Where the GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Where the TSS goes (zeroed; only needed to make TR valid).
pub const TSS_ADDR: u64 = 0x1000;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// TSS limit: the 104-byte TSS, an 8 KiB I/O bitmap and its terminating byte.
const TSS_LIMIT: u64 = 0x68 + 8192;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of up to [`MAX_PD`] page directories, one per GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Page directories available: payload mode covers guest RAM up to this many GiB.
pub const MAX_PD: u64 = 4;
/// Stacks grow down from here, one page per vCPU.
pub const STACK_TOP: u64 = 0x80000;
/// Where the payload's code is loaded.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Largest payload accepted.
pub const MAX_CODE: u64 = 0x10_0000;

/// GDT selectors.
const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// Where the work region starts: above the payload's code.
pub const REGION_BASE: u64 = 16 << 20;

/// The region the payload's vCPUs write: from [`REGION_BASE`] to the end of low RAM,
/// trimmed so every vCPU gets the same number of pages. Returns (base, bytes).
pub fn region(ram_bytes: u64, vcpus: u64) -> Result<(u64, u64), PayloadError> {
    let top = ram_bytes.min(crate::arch::x86_64::layout::MMIO_GAP_START);
    let pages = top.saturating_sub(REGION_BASE) / 4096;
    let per_vcpu = pages / vcpus.max(1);
    if per_vcpu == 0 {
        return Err(PayloadError::Ram(ram_bytes));
    }
    Ok((REGION_BASE, per_vcpu * vcpus * 4096))
}

/// Port the payload reports its rounds on: `(vcpu << 24) | round`.
pub const PROGRESS_PORT: u64 = 0x510;

/// The port-I/O device behind [`PROGRESS_PORT`]: remembers each vCPU's last round and
/// logs progress at debug level.
#[derive(Debug, Default)]
pub struct PayloadProgress {
    rounds: std::collections::BTreeMap<u32, u32>,
}

impl PayloadProgress {
    /// Last round reported by each vCPU.
    pub fn rounds(&self) -> &std::collections::BTreeMap<u32, u32> {
        &self.rounds
    }
}

impl crate::devices::bus::BusDevice for PayloadProgress {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        let (vcpu, round) = (v >> 24, v & 0xff_ffff);
        self.rounds.insert(vcpu, round);
        if round % 16 == 0 {
            log::debug!("payload: vCPU {vcpu} finished round {round}");
        }
    }
}

/// Errors of payload setup.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The payload is empty or larger than [`MAX_CODE`].
    #[error("payload is {0} bytes; it must be 1..={MAX_CODE} bytes")]
    Size(u64),
    /// Guest RAM is too small or too large for payload mode.
    #[error("payload mode needs 17 MiB..={MAX_PD} GiB of guest RAM, got {0} bytes")]
    Ram(u64),
    /// Writing the tables or the code into guest memory failed.
    #[error("cannot write payload setup into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A GDT descriptor from its parts (flags: the high nibble of byte 6, access byte).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The GDT: null, kernel code, kernel data, user data, user code, TSS (two slots).
pub fn gdt() -> [u64; 7] {
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 0x08 kernel code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // 0x10 kernel data
        gdt_entry(0xc0f3, 0, 0xfffff), // 0x18 user data, DPL 3
        gdt_entry(0xa0fb, 0, 0xfffff), // 0x20 user code, 64-bit, DPL 3
        gdt_entry(0x008b, TSS_ADDR as u32, TSS_LIMIT as u32), // 0x28 64-bit TSS, busy
        0,                             // upper half of the TSS descriptor
    ]
}

/// Write the GDT, TSS, page tables and `code` into guest memory.
pub fn write_setup(mem: &GuestMemoryMmap, ram_bytes: u64, code: &[u8]) -> Result<(), PayloadError> {
    if code.is_empty() || code.len() as u64 > MAX_CODE {
        return Err(PayloadError::Size(code.len() as u64));
    }
    if !((REGION_BASE + (1 << 20))..=MAX_PD << 30).contains(&ram_bytes) {
        return Err(PayloadError::Ram(ram_bytes));
    }
    for (i, e) in gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    // TSS with an I/O permission bitmap right after it that allows every port.
    mem.write_slice(&[0u8; TSS_LIMIT as usize + 1], GuestAddress(TSS_ADDR))?;
    mem.write_obj(0x68u16, GuestAddress(TSS_ADDR + 0x66))?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + TSS_LIMIT))?;
    // Present | writable | user for the upper levels; plus page-size for 2 MiB leaves.
    const UPPER: u64 = 0x7;
    const LEAF_2M: u64 = 0x87;
    mem.write_obj(PDPT_ADDR | UPPER, GuestAddress(PML4_ADDR))?;
    let gibs = ram_bytes.div_ceil(1 << 30);
    for g in 0..MAX_PD {
        let entry = if g < gibs {
            (PD_ADDR + g * 0x1000) | UPPER
        } else {
            0
        };
        mem.write_obj(entry, GuestAddress(PDPT_ADDR + g * 8))?;
    }
    for g in 0..gibs {
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            let entry = if addr < ram_bytes { addr | LEAF_2M } else { 0 };
            mem.write_obj(entry, GuestAddress(PD_ADDR + g * 0x1000 + i * 8))?;
        }
    }
    mem.write_slice(code, GuestAddress(CODE_ADDR))?;
    Ok(())
}

fn segment(selector: u16, type_: u8, dpl: u8, l: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for user-mode entry, starting from what KVM reported.
pub fn sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let data = segment(SEL_USER_DATA, 3, 3, 0, 1, 1);
    sregs.cs = segment(SEL_USER_CODE, 11, 3, 1, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        g: 0,
        ..segment(SEL_TSS, 11, 0, 0, 0, 0)
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of::<[u64; 7]>() - 1) as u16;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = (1 << 31) | (1 << 4) | 1; // PG | ET | PE
    sregs.efer = (1 << 10) | (1 << 8); // LMA | LME
    sregs
}

/// General registers of vCPU `index` of `count`: the payload's calling convention.
pub fn regs(index: u64, count: u64, region_base: u64, region_bytes: u64) -> kvm_regs {
    kvm_regs {
        rip: CODE_ADDR,
        rsp: STACK_TOP - index * 0x1000,
        rflags: 0x2 | (3 << 12), // reserved bit 1, IOPL 3 (cleared by this host), IF off
        rdi: index,
        rsi: count,
        rdx: region_base,
        rcx: region_bytes,
        ..Default::default()
    }
}

/// Put `vcpu` (one of `count`) in guest user mode at the payload with its share of the
/// region at `base` (`bytes` long), runnable at once (no INIT/SIPI for APs).
pub fn enter(vcpu: &Vcpu, count: u64, base: u64, bytes: u64) -> Result<(), VcpuError> {
    let id = vcpu.id();
    let fd = vcpu.fd();
    let kvm = |op| move |source| VcpuError::Kvm { id, op, source };
    let s = fd.get_sregs().map_err(kvm("GET_SREGS"))?;
    fd.set_sregs(&sregs(s)).map_err(kvm("SET_SREGS"))?;
    fd.set_regs(&regs(u64::from(id), count, base, bytes))
        .map_err(kvm("SET_REGS"))?;
    let runnable = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    fd.set_mp_state(runnable).map_err(kvm("SET_MP_STATE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_have_the_expected_encodings() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_f300_0000_ffff);
        assert_eq!(g[4], 0x00af_fb00_0000_ffff);
        assert_eq!(g[5], 0x0000_8b00_1000_2068);
    }

    #[test]
    fn page_tables_map_ram_with_user_pages() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        write_setup(&mem, 64 << 20, &[0x90, 0xf4]).expect("setup");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).expect("pml4");
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pdpt1: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 8)).expect("pdpt");
        assert_eq!(pdpt1, 0, "only the first GiB is mapped for 64 MiB");
        let pd1: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).expect("pd");
        assert_eq!(pd1, (2 << 20) | 0x87);
        let pd32: u64 = mem.read_obj(GuestAddress(PD_ADDR + 32 * 8)).expect("pd");
        assert_eq!(pd32, 0, "nothing past guest RAM is mapped");
        let code: u16 = mem.read_obj(GuestAddress(CODE_ADDR)).expect("code");
        assert_eq!(code, 0xf490);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        assert!(matches!(
            write_setup(&mem, 8 << 20, &[]),
            Err(PayloadError::Size(0))
        ));
        assert!(matches!(
            write_setup(&mem, 1 << 20, &[1]),
            Err(PayloadError::Ram(_))
        ));
        assert_eq!(region(64 << 20, 2).expect("region"), (16 << 20, 48 << 20));
        assert_eq!(region(64 << 20 | 4096, 2).expect("region").1, 48 << 20);
        assert!(region(16 << 20, 1).is_err());
    }

    #[test]
    fn registers_enter_user_mode() {
        let s = sregs(kvm_sregs::default());
        assert_eq!((s.cs.dpl, s.cs.l, s.cs.selector & 3), (3, 1, 3));
        assert_eq!(s.ss.dpl, 3);
        assert_eq!(s.efer & 0x500, 0x500);
        let r = regs(1, 2, 32 << 20, 256 << 20);
        assert_eq!((r.rdi, r.rsi, r.rdx, r.rcx), (1, 2, 32 << 20, 256 << 20));
        assert_eq!(r.rflags & 0x3200, 0x3000, "IOPL 3, IF clear");
    }
}
