//! Virtual-to-guest-physical translation of a process's pages: parse `/proc/PID/maps`
//! to choose and check ranges, read `/proc/PID/pagemap` and turn it into compact page
//! [`Run`]s.
//!
//! Inside the guest, a page frame number from pagemap *is* the guest-physical page the
//! VMM sees, so runs of consecutive frames become one [`Run`]. The guest kernel is built
//! without swap, compaction, THP and KSM, so a frame stays put while the process is
//! frozen (agent) or the pages are locked (library).
//!
//! pagemap entry (64 bits): bit 63 present, bit 62 swapped, bits 0-54 the frame number.
//! The kernel hides frame numbers from processes without `CAP_SYS_ADMIN` by reporting 0;
//! a present page with frame 0 is therefore refused with [`PagemapError::NoPfnAccess`].

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::protocol::{Run, VirtRange, PAGE_SIZE};

/// Present bit of a pagemap entry.
const PM_PRESENT: u64 = 1 << 63;
/// Swapped bit of a pagemap entry.
const PM_SWAPPED: u64 = 1 << 62;
/// The page is a file page or shared anonymous memory (bit 61).
const PM_FILE: u64 = 1 << 61;
/// The page is mapped exactly once (bit 56).
const PM_EXCLUSIVE: u64 = 1 << 56;
/// Frame number mask (bits 0-54).
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// Entries read per `pread` (512 KiB of pagemap, 256 MiB of address space): few syscalls
/// for the slow guest kernel, bounded memory.
const CHUNK_ENTRIES: usize = 65_536;

/// Errors of reading maps and pagemap.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// The process does not exist (or is gone).
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// Reading a /proc file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File that failed.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A line of /proc/PID/maps does not parse.
    #[error("malformed maps line {0:?}")]
    BadMapsLine(String),
    /// A requested range is not fully mapped.
    #[error("range {start:#x}-{end:#x} is not mapped in process {pid}")]
    NotMapped {
        /// Process.
        pid: u32,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// A requested range is empty or not page aligned.
    #[error("range {start:#x}-{end:#x} is empty or not page aligned")]
    BadRange {
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
    /// The kernel reported present pages with frame 0: no permission to see frames.
    #[error(
        "pagemap hides page frame numbers (present page at {0:#x} reads as frame 0): run as root"
    )]
    NoPfnAccess(u64),
    /// A page is swapped out; its content is not in guest RAM.
    #[error("page at {0:#x} is swapped out; pmsnap needs resident pages (disable swap)")]
    Swapped(u64),
    /// The process has nothing to save.
    #[error("process {0} has no writable private mappings")]
    NothingToSave(u32),
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Private (copy-on-write) rather than shared.
    pub private: bool,
    /// Inode of the backing file, 0 for anonymous memory.
    pub inode: u64,
    /// Path or pseudo name (`[heap]`, `[stack]`, ...), empty for anonymous mmaps.
    pub name: String,
}

impl Mapping {
    /// Whether the mapping belongs to the default save selection: writable private
    /// memory (heap, stack, anonymous mmaps, a program's data and bss), but never the
    /// kernel-provided special pages.
    pub fn is_default_candidate(&self) -> bool {
        let special = matches!(self.name.as_str(), "[vvar]" | "[vdso]" | "[vsyscall]")
            || self.name.starts_with("[vvar");
        self.write && self.private && self.read && !special
    }
}

/// Parse the text of /proc/PID/maps.
pub fn parse_maps(text: &str) -> Result<Vec<Mapping>, PagemapError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_maps_line)
        .collect()
}

fn parse_maps_line(line: &str) -> Result<Mapping, PagemapError> {
    let bad = || PagemapError::BadMapsLine(line.chars().take(200).collect());
    // address perms offset dev inode [name]; the name may contain spaces.
    let mut fields = line.splitn(6, ' ');
    let range = fields.next().ok_or_else(bad)?;
    let perms = fields.next().ok_or_else(bad)?.as_bytes();
    let _offset = fields.next().ok_or_else(bad)?;
    let _dev = fields.next().ok_or_else(bad)?;
    let inode = fields.next().ok_or_else(bad)?;
    let name = fields.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-').ok_or_else(bad)?;
    let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
    let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
    if perms.len() < 4 || end < start {
        return Err(bad());
    }
    Ok(Mapping {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        private: perms[3] == b'p',
        inode: inode.parse().map_err(|_| bad())?,
        name,
    })
}

/// Read and parse /proc/PID/maps.
pub fn read_maps(pid: u32) -> Result<Vec<Mapping>, PagemapError> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).map_err(|source| proc_error(pid, path, source))?;
    parse_maps(&text)
}

/// Map a /proc read error to "no such process" when that is what it means.
pub(crate) fn proc_error(pid: u32, path: String, source: std::io::Error) -> PagemapError {
    if source.kind() == std::io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
        PagemapError::NoProcess(pid)
    } else {
        PagemapError::Read { path, source }
    }
}

/// The default selection: every writable private mapping, adjacent ones merged.
pub fn default_ranges(maps: &[Mapping]) -> Vec<VirtRange> {
    let mut out: Vec<VirtRange> = Vec::new();
    for m in maps.iter().filter(|m| m.is_default_candidate()) {
        match out.last_mut() {
            Some(last) if last.end == m.start => last.end = m.end,
            _ => out.push(VirtRange {
                start: m.start,
                end: m.end,
            }),
        }
    }
    out
}

/// Check that each range is page aligned, non-empty and entirely covered by mappings
/// (which may be several adjacent ones).
pub fn check_ranges(pid: u32, maps: &[Mapping], ranges: &[VirtRange]) -> Result<(), PagemapError> {
    for r in ranges {
        if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
            return Err(PagemapError::BadRange {
                start: r.start,
                end: r.end,
            });
        }
        let mut at = r.start;
        // maps is sorted by address (the kernel prints it in order).
        for m in maps {
            if m.start <= at && at < m.end {
                at = m.end;
                if at >= r.end {
                    break;
                }
            }
        }
        if at < r.end {
            return Err(PagemapError::NotMapped {
                pid,
                start: r.start,
                end: r.end,
            });
        }
    }
    Ok(())
}

/// Decoded pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Resident in frame `pfn`.
    Present(u64),
    /// Never touched (or discarded): reads as zero.
    Absent,
    /// Swapped out.
    Swapped,
}

/// Decode one raw pagemap entry.
pub fn decode_entry(raw: u64) -> PageState {
    if raw & PM_PRESENT != 0 {
        PageState::Present(raw & PM_PFN_MASK)
    } else if raw & PM_SWAPPED != 0 {
        PageState::Swapped
    } else {
        PageState::Absent
    }
}

/// Whether a page of a *private* mapping is resident in memory of its own: present,
/// anonymous (not the page cache page of a file, whose content the file shares) and
/// mapped only here (not shared copy-on-write with a fork, not the shared zero page,
/// which has no mapping count). Such a page can be overwritten in place by a restore.
pub fn is_private_resident(raw: u64) -> bool {
    raw & PM_PRESENT != 0 && raw & PM_EXCLUSIVE != 0 && raw & PM_FILE == 0
}

/// Builds compact runs from pages fed in virtual address order.
#[derive(Debug, Default)]
pub struct RunBuilder {
    runs: Vec<Run>,
    pages: u64,
    present: u64,
}

impl RunBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add consecutive pages starting at `virt` with their raw pagemap entries.
    pub fn push_entries(&mut self, virt: u64, entries: &[u64]) -> Result<(), PagemapError> {
        for (i, &raw) in entries.iter().enumerate() {
            let va = virt + i as u64 * PAGE_SIZE;
            match decode_entry(raw) {
                PageState::Present(0) => return Err(PagemapError::NoPfnAccess(va)),
                PageState::Present(pfn) => self.push_page(va, Some(pfn)),
                PageState::Absent => self.push_page(va, None),
                PageState::Swapped => return Err(PagemapError::Swapped(va)),
            }
        }
        Ok(())
    }

    /// Add one page: `Some(pfn)` when present, `None` when absent.
    pub fn push_page(&mut self, va: u64, pfn: Option<u64>) {
        self.pages += 1;
        if pfn.is_some() {
            self.present += 1;
        }
        if let Some(last) = self.runs.last_mut() {
            let contiguous_va = last.virt_addr + last.count * PAGE_SIZE == va;
            let extends = match pfn {
                Some(p) => last.present && last.guest_phys_first_page + last.count == p,
                None => !last.present,
            };
            if contiguous_va && extends {
                last.count += 1;
                return;
            }
        }
        self.runs.push(Run {
            guest_phys_first_page: pfn.unwrap_or(0),
            count: 1,
            virt_addr: va,
            present: pfn.is_some(),
        });
    }

    /// Total pages added.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Present pages added.
    pub fn present_pages(&self) -> u64 {
        self.present
    }

    /// The runs.
    pub fn finish(self) -> Vec<Run> {
        self.runs
    }
}

/// An open /proc/PID/pagemap.
#[derive(Debug)]
pub struct Pagemap {
    pid: u32,
    file: File,
}

impl Pagemap {
    /// Open the pagemap of `pid` (`std::process::id()` for the calling process).
    pub fn open(pid: u32) -> Result<Self, PagemapError> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path).map_err(|source| proc_error(pid, path, source))?;
        Ok(Self { pid, file })
    }

    /// Raw entries of the pages of `range` (page aligned).
    pub fn entries(&self, range: VirtRange) -> Result<Vec<u64>, PagemapError> {
        let pages = ((range.end - range.start) / PAGE_SIZE) as usize;
        let mut out = vec![0u64; pages];
        let mut done = 0usize;
        while done < pages {
            let n = (pages - done).min(CHUNK_ENTRIES);
            let mut buf = vec![0u8; n * 8];
            let offset = (range.start / PAGE_SIZE + done as u64) * 8;
            self.file
                .read_exact_at(&mut buf, offset)
                .map_err(|source| {
                    proc_error(self.pid, format!("/proc/{}/pagemap", self.pid), source)
                })?;
            for (slot, b) in out[done..done + n].iter_mut().zip(buf.chunks_exact(8)) {
                *slot = u64::from_le_bytes(b.try_into().expect("chunks_exact(8)"));
            }
            done += n;
        }
        Ok(out)
    }

    /// Runs covering `ranges`, in order.
    pub fn runs(&self, ranges: &[VirtRange]) -> Result<RunBuilder, PagemapError> {
        let mut b = RunBuilder::new();
        for r in ranges {
            let entries = self.entries(*r)?;
            b.push_entries(r.start, &entries)?;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 08:01 1234 /usr/bin/prog
55d0c0a02000-55d0c0a05000 r-xp 00002000 08:01 1234 /usr/bin/prog
55d0c0a08000-55d0c0a09000 rw-p 00007000 08:01 1234 /usr/bin/prog
55d0c0a09000-55d0c0a0a000 rw-p 00000000 00:00 0 
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:05 99 /dev/shm/shared file
7f0000200000-7f0000201000 ---p 00000000 00:00 0 
7f0000201000-7f0000300000 rw-p 00000000 00:00 0 
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
7ffc00100000-7ffc00104000 r--p 00000000 00:00 0                          [vvar]
7ffc00104000-7ffc00106000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_maps_and_picks_default_ranges() {
        let maps = parse_maps(MAPS).expect("parse");
        assert_eq!(maps.len(), 12);
        assert_eq!(maps[5].name, "/dev/shm/shared file");
        assert!(!maps[5].private);
        assert_eq!(maps[4].name, "[heap]");
        assert_eq!(maps[3].name, "");
        assert_eq!(maps[3].inode, 0);
        let r = default_ranges(&maps);
        // prog data + bss merged, heap, anon mmap, stack; no text, shared, guard, vdso.
        assert_eq!(
            r,
            vec![
                VirtRange {
                    start: 0x55d0c0a08000,
                    end: 0x55d0c0a0a000
                },
                VirtRange {
                    start: 0x55d0c1000000,
                    end: 0x55d0c1021000
                },
                VirtRange {
                    start: 0x7f0000201000,
                    end: 0x7f0000300000
                },
                VirtRange {
                    start: 0x7ffc00000000,
                    end: 0x7ffc00021000
                },
            ]
        );
    }

    #[test]
    fn bad_maps_lines_are_errors() {
        for bad in [
            "zzz-1 rw-p 0 0:0 0",
            "1000 rw-p 0 0:0 0",
            "2000-1000 rw-p 0 0:0 0",
        ] {
            assert!(
                matches!(parse_maps(bad), Err(PagemapError::BadMapsLine(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn range_checks() {
        let maps = parse_maps(MAPS).expect("parse");
        let r = |start, end| VirtRange { start, end };
        // Spans two adjacent mappings.
        assert!(check_ranges(1, &maps, &[r(0x55d0c0a08000, 0x55d0c0a0a000)]).is_ok());
        // Hole between prog data and heap.
        assert!(matches!(
            check_ranges(1, &maps, &[r(0x55d0c0a08000, 0x55d0c1001000)]),
            Err(PagemapError::NotMapped { .. })
        ));
        assert!(matches!(
            check_ranges(1, &maps, &[r(0x1000, 0x2000)]),
            Err(PagemapError::NotMapped { .. })
        ));
        assert!(matches!(
            check_ranges(1, &maps, &[r(0x55d0c1000010, 0x55d0c1001000)]),
            Err(PagemapError::BadRange { .. })
        ));
        assert!(matches!(
            check_ranges(1, &maps, &[r(0x55d0c1000000, 0x55d0c1000000)]),
            Err(PagemapError::BadRange { .. })
        ));
    }

    #[test]
    fn entries_decode() {
        assert_eq!(
            decode_entry(PM_PRESENT | 0x1234),
            PageState::Present(0x1234)
        );
        // Bits 55-61 (soft-dirty, exclusive, ...) are not part of the frame number.
        assert_eq!(
            decode_entry(PM_PRESENT | (1 << 55) | (1 << 56) | 7),
            PageState::Present(7)
        );
        assert_eq!(decode_entry(PM_SWAPPED | 5), PageState::Swapped);
        assert_eq!(decode_entry(0), PageState::Absent);
    }

    #[test]
    fn private_resident_flags() {
        assert!(is_private_resident(PM_PRESENT | PM_EXCLUSIVE | 5));
        assert!(!is_private_resident(PM_PRESENT | 5), "shared or zero page");
        assert!(!is_private_resident(
            PM_PRESENT | PM_EXCLUSIVE | PM_FILE | 5
        ));
        assert!(!is_private_resident(PM_EXCLUSIVE));
    }

    #[test]
    fn runs_coalesce() {
        let p = |pfn| PM_PRESENT | pfn;
        let base = 0x10_0000;
        let mut b = RunBuilder::new();
        b.push_entries(
            base,
            &[p(100), p(101), p(102), 0, 0, p(200), p(300), p(301)],
        )
        .expect("push");
        // A second range right after continues the runs; a gap starts a new one.
        b.push_entries(base + 8 * PAGE_SIZE, &[p(302)])
            .expect("push");
        b.push_entries(base + 20 * PAGE_SIZE, &[p(303)])
            .expect("push");
        assert_eq!(b.pages(), 10);
        assert_eq!(b.present_pages(), 8);
        let runs = b.finish();
        let run = |first, count, va: u64, present| Run {
            guest_phys_first_page: first,
            count,
            virt_addr: va,
            present,
        };
        assert_eq!(
            runs,
            vec![
                run(100, 3, base, true),
                run(0, 2, base + 3 * PAGE_SIZE, false),
                run(200, 1, base + 5 * PAGE_SIZE, true),
                run(300, 3, base + 6 * PAGE_SIZE, true),
                run(303, 1, base + 20 * PAGE_SIZE, true),
            ]
        );
        // Descending frames never merge.
        let mut b = RunBuilder::new();
        b.push_entries(0, &[p(9), p(8)]).expect("push");
        assert_eq!(b.finish().len(), 2);
    }

    #[test]
    fn pfn_zero_and_swapped_are_errors() {
        let mut b = RunBuilder::new();
        assert!(matches!(
            b.push_entries(0x2000, &[PM_PRESENT | 1, PM_PRESENT]),
            Err(PagemapError::NoPfnAccess(0x3000))
        ));
        let mut b = RunBuilder::new();
        assert!(matches!(
            b.push_entries(0x2000, &[PM_SWAPPED]),
            Err(PagemapError::Swapped(0x2000))
        ));
    }

    #[test]
    fn real_process_pagemap() {
        pmsnap_testenv::require!(
            "real_process_pagemap",
            pmsnap_testenv::root_unavailable("frame numbers")
        );
        let len = 64 * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping; unmapped at the end of the test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // No huge pages, so untouched pages stay absent next to touched ones.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        let base = ptr as u64;
        // Touch the first 40 pages by writing; leave the rest untouched.
        for i in 0..40 {
            // SAFETY: inside the mapping.
            unsafe {
                (ptr as *mut u8)
                    .add(i * PAGE_SIZE as usize)
                    .write_volatile(1)
            };
        }
        let pid = std::process::id();
        let maps = read_maps(pid).expect("maps");
        let range = VirtRange {
            start: base,
            end: base + len as u64,
        };
        check_ranges(pid, &maps, &[range]).expect("mapped");
        assert!(default_ranges(&maps)
            .iter()
            .any(|r| r.start <= range.start && range.end <= r.end));
        let pm = Pagemap::open(pid).expect("open");
        let entries = pm.entries(range).expect("entries");
        for (i, e) in entries.iter().enumerate() {
            match decode_entry(*e) {
                PageState::Present(pfn) => {
                    assert!(i < 40, "page {i} present");
                    assert_ne!(pfn, 0);
                }
                PageState::Absent => assert!(i >= 40, "page {i} absent"),
                PageState::Swapped => panic!("swapped"),
            }
        }
        let b = pm.runs(&[range]).expect("runs");
        assert_eq!(b.pages(), 64);
        assert_eq!(b.present_pages(), 40);
        let runs = b.finish();
        let mut va = base;
        for r in &runs {
            assert_eq!(r.virt_addr, va, "runs cover the range in order");
            va += r.count * PAGE_SIZE;
        }
        assert_eq!(va, base + len as u64);
        let last = runs.last().expect("runs");
        assert!(!last.present);
        assert_eq!(last.count, 24);
        // Unmapped range is refused.
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(ptr, len) };
        let maps = read_maps(pid).expect("maps");
        assert!(matches!(
            check_ranges(pid, &maps, &[range]),
            Err(PagemapError::NotMapped { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn maps_parser_never_panics(text in "\\PC{0,200}") {
            let _ = parse_maps(&text);
        }

        /// Runs reproduce the pages exactly, in order, and are maximal (no two adjacent
        /// runs could have been one).
        #[test]
        fn runs_are_exact_and_maximal(
            pages in proptest::collection::vec(proptest::option::of(1u64..64), 1..300),
            base in 0u64..1000,
        ) {
            let mut b = RunBuilder::new();
            let va0 = base * PAGE_SIZE;
            for (i, p) in pages.iter().enumerate() {
                b.push_page(va0 + i as u64 * PAGE_SIZE, *p);
            }
            proptest::prop_assert_eq!(b.pages(), pages.len() as u64);
            proptest::prop_assert_eq!(
                b.present_pages(),
                pages.iter().filter(|p| p.is_some()).count() as u64
            );
            let runs = b.finish();
            let mut expanded = Vec::new();
            for r in &runs {
                proptest::prop_assert!(r.count >= 1);
                for k in 0..r.count {
                    proptest::prop_assert_eq!(
                        r.virt_addr + k * PAGE_SIZE,
                        va0 + expanded.len() as u64 * PAGE_SIZE
                    );
                    expanded.push(r.present.then_some(r.guest_phys_first_page + k));
                }
            }
            proptest::prop_assert_eq!(&expanded, &pages);
            for w in runs.windows(2) {
                let (a, c) = (w[0], w[1]);
                let mergeable = a.present == c.present
                    && (!a.present || a.guest_phys_first_page + a.count == c.guest_phys_first_page);
                proptest::prop_assert!(!mergeable, "runs {:?} and {:?} should be one", a, c);
            }
        }
    }

    #[test]
    fn missing_process() {
        // Pid numbers above pid_max do not exist.
        assert!(matches!(
            read_maps(0x7fff_fff0),
            Err(PagemapError::NoProcess(_))
        ));
        assert!(matches!(
            Pagemap::open(0x7fff_fff0),
            Err(PagemapError::NoProcess(_))
        ));
    }
}
