//! Turning a process's virtual memory into guest-physical page runs: `/proc/PID/maps`
//! says what is mapped, `/proc/PID/pagemap` says which physical frame backs each page
//! (bit 63 present, bits 0-54 the frame number; the frame is visible to root only).
//!
//! Inside the guest, "physical" is guest-physical, which is what the VMM needs. The
//! output is compact: one [`Run`] per stretch of pages that is contiguous both virtually
//! and physically, and one per stretch of pages never touched.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::protocol::{Run, PAGE_SIZE};

/// Pagemap bit: page present in RAM.
pub const PM_PRESENT: u64 = 1 << 63;
/// Pagemap bit: page swapped out.
pub const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap bits 0-54: page frame number.
pub const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Pagemap entries read per `pread` (64 KiB of entries, 32 MiB of address space).
const CHUNK_ENTRIES: usize = 8192;

/// Errors of reading a process's page map.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// A /proc file could not be read (no such process, or no permission).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A maps line did not parse.
    #[error("malformed maps line: {0:?}")]
    BadMapsLine(String),
    /// A requested range is not page aligned or empty.
    #[error("range {start:#x}-{end:#x} is empty or not page aligned")]
    BadRange {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// Part of a requested range is not mapped in the process.
    #[error("address {addr:#x} in range {start:#x}-{end:#x} is not mapped")]
    NotMapped {
        /// First unmapped address.
        addr: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A page is swapped out: its content is not in guest RAM.
    #[error("page at {0:#x} is swapped out")]
    Swapped(u64),
    /// A present page shows frame 0: the kernel hides frame numbers from non-root.
    #[error("page frame numbers are hidden (run as root / CAP_SYS_ADMIN)")]
    PfnHidden,
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// The four permission characters, e.g. `rw-p`.
    pub perms: String,
    /// Path or pseudo-name (`[heap]`, `[stack]`), empty for anonymous memory.
    pub name: String,
}

impl Mapping {
    /// Writable (so it can differ from what any file holds).
    pub fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }

    /// The kernel's special mappings, which are not the process's own memory.
    pub fn special(&self) -> bool {
        matches!(
            self.name.as_str(),
            "[vvar]" | "[vdso]" | "[vsyscall]" | "[vvar_vclock]"
        )
    }
}

/// Parse the text of `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>, PagemapError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || PagemapError::BadMapsLine(line.chars().take(200).collect());
        let mut fields = line.split_whitespace();
        let range = fields.next().ok_or_else(bad)?;
        let perms = fields.next().ok_or_else(bad)?;
        // offset, dev, inode, then the optional name (which may contain spaces).
        let (_, _, _) = (fields.next(), fields.next(), fields.next());
        let name = fields.collect::<Vec<_>>().join(" ");
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
        let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
        if end <= start || perms.len() != 4 {
            return Err(bad());
        }
        out.push(Mapping {
            start,
            end,
            perms: perms.to_owned(),
            name,
        });
    }
    Ok(out)
}

/// The ranges a whole-process save covers: every writable mapping except the kernel's
/// special ones, adjacent ones merged.
pub fn default_ranges(maps: &[Mapping]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter().filter(|m| m.writable() && !m.special()) {
        match out.last_mut() {
            Some(last) if last.1 == m.start => last.1 = m.end,
            _ => out.push((m.start, m.end)),
        }
    }
    out
}

/// Check that `[start, end)` is page aligned, non-empty and fully mapped.
pub fn check_range(maps: &[Mapping], start: u64, end: u64) -> Result<(), PagemapError> {
    if start >= end || start % PAGE_SIZE != 0 || end % PAGE_SIZE != 0 {
        return Err(PagemapError::BadRange { start, end });
    }
    let mut addr = start;
    while addr < end {
        let m = maps
            .iter()
            .find(|m| m.start <= addr && addr < m.end)
            .ok_or(PagemapError::NotMapped { addr, start, end })?;
        addr = m.end;
    }
    Ok(())
}

/// Builds compact runs from pagemap entries, page by page, in address order.
#[derive(Debug, Default)]
pub struct RunBuilder {
    runs: Vec<Run>,
}

impl RunBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add the page at `virt` with pagemap entry `entry`.
    pub fn push(&mut self, virt: u64, entry: u64) -> Result<(), PagemapError> {
        let present = entry & PM_PRESENT != 0;
        if !present && entry & PM_SWAPPED != 0 {
            return Err(PagemapError::Swapped(virt));
        }
        let pfn = entry & PM_PFN_MASK;
        if present && pfn == 0 {
            return Err(PagemapError::PfnHidden);
        }
        if let Some(last) = self.runs.last_mut() {
            let contiguous_virt = last.virt_addr + last.count * PAGE_SIZE == virt;
            let extends = contiguous_virt
                && last.present == present
                && (!present || last.guest_phys_first_page + last.count == pfn);
            if extends {
                last.count += 1;
                return Ok(());
            }
        }
        self.runs.push(Run {
            guest_phys_first_page: if present { pfn } else { 0 },
            count: 1,
            virt_addr: virt,
            present,
        });
        Ok(())
    }

    /// The runs built so far.
    pub fn finish(self) -> Vec<Run> {
        self.runs
    }
}

/// Read the runs of process `pid` over `ranges` (each `[start, end)`, page aligned and
/// mapped). The process should be frozen, or the answer may be stale when it returns.
pub fn read_runs(pid: u32, ranges: &[(u64, u64)]) -> Result<Vec<Run>, PagemapError> {
    let maps_path = format!("/proc/{pid}/maps");
    let io = |path: &str| {
        let path = path.to_owned();
        move |source| PagemapError::Io { path, source }
    };
    let maps = parse_maps(&std::fs::read_to_string(&maps_path).map_err(io(&maps_path))?)?;
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(io(&pm_path))?;
    let mut builder = RunBuilder::new();
    let mut buf = vec![0u8; CHUNK_ENTRIES * 8];
    for &(start, end) in ranges {
        check_range(&maps, start, end)?;
        let mut page = start / PAGE_SIZE;
        let end_page = end / PAGE_SIZE;
        while page < end_page {
            // Bounded by CHUNK_ENTRIES, so the cast cannot truncate.
            let n = (end_page - page).min(CHUNK_ENTRIES as u64) as usize;
            let bytes = &mut buf[..n * 8];
            pagemap
                .read_exact_at(bytes, page * 8)
                .map_err(io(&pm_path))?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(e.try_into().expect("chunks_exact(8)"));
                builder.push((page + i as u64) * PAGE_SIZE, entry)?;
            }
            page += n as u64;
        }
    }
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 1234 /usr/bin/cat
55d0c0a02000-55d0c0a06000 rw-p 00002000 08:01 1234 /usr/bin/cat
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0 [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0 [vdso]
7f0000010000-7f0000011000 rw-s 00000000 00:05 99 /dev/shm/a file
";

    #[test]
    fn parses_maps_and_picks_default_ranges() {
        let m = parse_maps(MAPS).expect("parse");
        assert_eq!(m.len(), 8);
        assert_eq!(m[2].name, "[heap]");
        assert_eq!(m[3].name, "");
        assert_eq!(m[7].name, "/dev/shm/a file");
        assert!(m[1].writable() && !m[0].writable());
        assert!(m[5].special());
        let r = default_ranges(&m);
        assert_eq!(
            r,
            vec![
                (0x55d0_c0a0_2000, 0x55d0_c0a0_6000),
                (0x55d0_c100_0000, 0x55d0_c102_1000),
                (0x7f00_0000_0000, 0x7f00_0000_1000),
                (0x7ffd_0000_0000, 0x7ffd_0002_1000),
                (0x7f00_0001_0000, 0x7f00_0001_1000),
            ]
        );
        assert!(parse_maps("zz-10 rw-p 0 0 0").is_err());
        assert!(parse_maps("2000-1000 rw-p 0 0 0").is_err());
        assert!(parse_maps("1000-2000").is_err());
    }

    #[test]
    fn range_checks() {
        let m = parse_maps(MAPS).expect("parse");
        // Spans two adjacent mappings.
        assert!(check_range(&m, 0x55d0_c0a0_0000, 0x55d0_c0a0_6000).is_ok());
        assert!(matches!(
            check_range(&m, 0x55d0_c0a0_0000, 0x55d0_c0a0_7000),
            Err(PagemapError::NotMapped {
                addr: 0x55d0_c0a0_6000,
                ..
            })
        ));
        assert!(matches!(
            check_range(&m, 0x1000, 0x1000),
            Err(PagemapError::BadRange { .. })
        ));
        assert!(matches!(
            check_range(&m, 0x55d0_c0a0_0010, 0x55d0_c0a0_2000),
            Err(PagemapError::BadRange { .. })
        ));
    }

    #[test]
    fn builder_compacts_runs() {
        let p = |pfn| PM_PRESENT | pfn;
        let base = 0x10_0000;
        let entries = [p(100), p(101), p(102), p(200), 0, 0, p(201), p(202)];
        let mut b = RunBuilder::new();
        for (i, &e) in entries.iter().enumerate() {
            b.push(base + i as u64 * PAGE_SIZE, e).expect("push");
        }
        // A gap in virtual addresses starts a new run even if frames continue.
        b.push(base + 20 * PAGE_SIZE, p(203)).expect("push");
        let runs = b.finish();
        let r = |first, count, page: u64, present| Run {
            guest_phys_first_page: first,
            count,
            virt_addr: base + page * PAGE_SIZE,
            present,
        };
        assert_eq!(
            runs,
            vec![
                r(100, 3, 0, true),
                r(200, 1, 3, true),
                r(0, 2, 4, false),
                r(201, 2, 6, true),
                r(203, 1, 20, true),
            ]
        );
        let mut b = RunBuilder::new();
        assert!(matches!(
            b.push(0, PM_SWAPPED),
            Err(PagemapError::Swapped(0))
        ));
        assert!(matches!(
            b.push(0, PM_PRESENT),
            Err(PagemapError::PfnHidden)
        ));
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn reads_own_memory() {
        const PAGES: usize = 64;
        let len = PAGES * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected,
        // and it is unmapped below before the test returns.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // Touch the first half only.
        // SAFETY: the first len/2 bytes lie inside the mapping created above.
        unsafe { std::ptr::write_bytes(addr.cast::<u8>(), 0xab, len / 2) };
        let start = addr as u64;
        let res = read_runs(std::process::id(), &[(start, start + len as u64)]);
        // SAFETY: unmapping exactly the mapping created above, no longer used.
        unsafe { libc::munmap(addr, len) };
        if !is_root() {
            eprintln!("reads_own_memory: not root, frame numbers hidden; checking the error");
            assert!(matches!(res, Err(PagemapError::PfnHidden)));
            return;
        }
        let runs = res.expect("read own pagemap as root");
        let present: u64 = runs.iter().filter(|r| r.present).map(|r| r.count).sum();
        let absent: u64 = runs.iter().filter(|r| !r.present).map(|r| r.count).sum();
        assert_eq!(present, PAGES as u64 / 2);
        assert_eq!(absent, PAGES as u64 / 2);
        assert_eq!(runs[0].virt_addr, start);
        let last = runs.last().expect("runs");
        assert!(!last.present);
        assert_eq!(last.virt_addr + last.count * PAGE_SIZE, start + len as u64);
        // Runs tile the range in order.
        let mut next = start;
        for r in &runs {
            assert_eq!(r.virt_addr, next);
            next += r.count * PAGE_SIZE;
        }
        // Unmapped memory is refused (the first pages are below mmap_min_addr, so
        // nothing can be mapped there).
        assert!(matches!(
            read_runs(std::process::id(), &[(0x1000, 0x3000)]),
            Err(PagemapError::NotMapped { addr: 0x1000, .. })
        ));
    }
}
