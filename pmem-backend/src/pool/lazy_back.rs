//! Lazy copy back: a restore that would copy many preserved pages back into RAM leaves
//! them as holes instead, for the embedder to fill on first access and in the
//! background from the snapshot's blocks (the VMM does it with userfaultfd, see
//! `vmm/src/snapshot/lazy.rs`), so the guest runs before the copy is done.
//!
//! What keeps it sound:
//! - **Nothing else needs the old RAM.** Every page is preserved first for any other
//!   snapshot that still references it in place, as [`Pool::copy_back`] does, so a hole
//!   only ever stands for the snapshot's own content.
//! - **The content stays.** The snapshot's blocks are what fills the holes. Blocks are
//!   freed only when the last snapshot referencing them is deleted, so a delete of the
//!   snapshot waits until every hole is filled (through the [`super::RamGate`]) before it
//!   goes on: the snapshot is pinned while it is the fill's source.
//! - **A crash leaves a pool that opens whole.** Before the first punch, a marker beside
//!   the pool ([`super::filling_marker`]) names the snapshot. [`Pool::open`] finds it and
//!   fills every hole left in RAM from that snapshot's blocks, then removes the marker.
//!   A hole is only ever a page no one wrote since the punch (a write to a hole fills it
//!   first), so the snapshot's content is what it holds, for the guest and for any
//!   snapshot taken since that references it in place. A pool's RAM is allocated when it
//!   is created, so every hole is one this module punched.
//! - **A punch that leaves data is no hole.** A hole punched into part of a huge page of
//!   tmpfs can be zeroed rather than freed; each page is checked after its punch
//!   (`SEEK_DATA`) and one that is still data is copied back at once.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{filling_marker, Pool};
use crate::error::{PoolError, Result};
use crate::types::{pages_to_runs, PageRun, SnapshotSel};
use crate::PAGE_SIZE;

/// First line of the fill marker of a lazy copy back, followed by the snapshot's id.
const MARKER_TAG: &str = "copy-back of snapshot id ";

/// A RAM page left as a hole by [`Pool::copy_back_lazy`], and where its content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyPage {
    /// Guest page.
    pub page: u64,
    /// Block holding its content.
    pub block: u64,
    /// Offset of that block in the pool file.
    pub block_offset: u64,
    /// crc32c of the block's content, as the catalog records it.
    pub crc: u32,
}

/// What [`Pool::copy_back_lazy`] did: the pages left to fill, and those copied at once.
#[derive(Debug, Clone, Default)]
pub struct LazyCopyBack {
    /// The snapshot whose content fills the holes.
    pub snapshot: String,
    /// Pages left as holes, ascending, each with its block.
    pub holes: Vec<LazyPage>,
    /// Pages whose punch left data (copied back at once instead), ascending.
    pub copied: Vec<u64>,
}

impl LazyCopyBack {
    /// The holes as runs of pages.
    pub fn hole_runs(&self) -> Vec<PageRun> {
        pages_to_runs(self.holes.iter().map(|h| h.page))
    }
}

/// The snapshot a lazy copy back fills RAM from (see [`Pool::copy_back_lazy`]).
#[derive(Debug, Clone)]
pub(super) struct FillPin {
    /// Its id.
    pub(super) id: u64,
    /// The pages left as holes.
    pub(super) runs: Vec<PageRun>,
}

/// `lseek(off, whence)` on `file` (`SEEK_DATA` or `SEEK_HOLE`); `u64::MAX` when there
/// is no such byte at or after `off` (ENXIO).
///
/// On tmpfs, pages allocated by `fallocate` and never written count as holes, and the
/// kernel walks the page cache from `off` to the answer (about 90 ns a page): a call
/// costs the distance it travels.
fn seek(file: &File, off: u64, whence: libc::c_int) -> std::io::Result<u64> {
    let at =
        libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd owned by `file`; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(u64::MAX),
            _ => Err(e),
        };
    }
    Ok(r as u64)
}

/// Whether byte `off` of `file` is in a hole: one page-cache lookup when it is (the
/// case after a punch), a walk to the next hole when it is not.
fn is_hole(file: &File, off: u64) -> std::io::Result<bool> {
    Ok(seek(file, off, libc::SEEK_HOLE)? == off)
}

/// Whether a RAM page just punched still has data, from its `mincore` byte: in memory
/// means data. Not in memory means a hole only where `absent_is_hole` (tmpfs without
/// swap, [`mincore_absent_is_hole`]); elsewhere `is_hole` (a `SEEK_HOLE`) decides.
fn page_has_data(
    mincore: u8,
    absent_is_hole: bool,
    is_hole: impl FnOnce() -> std::io::Result<bool>,
) -> std::io::Result<bool> {
    if mincore & 1 != 0 {
        Ok(true)
    } else if absent_is_hole {
        Ok(false)
    } else {
        Ok(!is_hole()?)
    }
}

/// Whether a page of `file` that `mincore` reports not in memory is a hole: on tmpfs
/// (whose `mincore` looks the page up in the page cache) when no swap area is listed in
/// `/proc/swaps` (a swapped-out page is data not in memory). Not on hugetlbfs, whose
/// `mincore` reads only this process's page tables.
fn mincore_absent_is_hole(file: &File) -> bool {
    use crate::persist::{fs_type, TMPFS_MAGIC};
    let tmpfs = fs_type(file) == Some(TMPFS_MAGIC);
    let no_swap = std::fs::read_to_string("/proc/swaps")
        .is_ok_and(|s| s.lines().skip(1).all(|l| l.trim().is_empty()));
    tmpfs && no_swap
}

/// Punch bytes `off..off + len` of `file` out (the file keeps its size).
fn punch(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    let too_large = || std::io::Error::from_raw_os_error(libc::EFBIG);
    let off = libc::off_t::try_from(off).map_err(|_| too_large())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_large())?;
    // SAFETY: plain syscall on a valid fd owned by `file`; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Write the fill marker of a lazy copy back of snapshot `id` durably.
fn write_marker(pool: &Path, id: u64, name: &str) -> std::io::Result<()> {
    let path = filling_marker(pool);
    let mut f = File::create(&path)?;
    writeln!(f, "{MARKER_TAG}{id}")?;
    writeln!(
        f,
        "(snapshot {name:?} of this pool; opening the pool finishes the copy)"
    )?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The snapshot id a fill marker names, if it is one of a lazy copy back.
pub(super) fn marker_snapshot(marker: &str) -> Option<u64> {
    marker
        .lines()
        .next()?
        .strip_prefix(MARKER_TAG)?
        .trim()
        .parse()
        .ok()
}

impl Pool {
    /// Make RAM hold snapshot `sel`'s content for the pages of `runs`, as
    /// [`Pool::copy_back`] does, but lazily: each page the snapshot holds in a block is
    /// preserved for the other snapshots that still reference RAM(p) in place, then
    /// punched out of RAM, to be filled from its block by the embedder (see the module
    /// docs). Returns those pages with their blocks.
    ///
    /// The embedder must install a [`super::RamGate`] that fills the holes before the
    /// store reads RAM, and call [`super::mark_ram_complete`] once every hole is filled.
    /// Until then the snapshot cannot be deleted without the holes being filled first,
    /// and a reopened pool fills them itself. Refused while RAM may still have holes
    /// (a gate is installed).
    pub fn copy_back_lazy<'a>(
        &mut self,
        sel: impl Into<SnapshotSel<'a>>,
        runs: &[PageRun],
    ) -> Result<LazyCopyBack> {
        if self.ram_gate.is_some() || self.fill_pin.is_some() {
            return Err(PoolError::InvalidArgument(
                "a lazy copy back needs all of RAM in place (a lazy fill is running)".into(),
            ));
        }
        let idx = self.find(sel.into())?;
        let work = self.preserved_blocks(idx, runs)?;
        let name = self.snapshots[&idx].name.clone();
        let mut out = LazyCopyBack {
            snapshot: name.clone(),
            ..LazyCopyBack::default()
        };
        if work.is_empty() {
            return Ok(out);
        }
        let t0 = std::time::Instant::now();
        self.preserve_for_others(idx, &work)?;
        let mut holes = Vec::with_capacity(work.len());
        for &(p, b) in &work {
            let crc = self.index.block_crc(b).ok_or_else(|| {
                PoolError::Corrupt(format!("block {b} of page {p} has no checksum"))
            })?;
            holes.push(LazyPage {
                page: p,
                block: u64::from(b),
                block_offset: self.geo.block_offset_of(u64::from(b)),
                crc,
            });
        }
        let path = self.path.clone();
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| PoolError::Io { what, path, source }
        };
        let t1 = t0.elapsed();
        write_marker(&self.path, idx, &name).map_err(io("writing the fill marker of"))?;
        let t2 = t0.elapsed();
        let runs = pages_to_runs(work.iter().map(|&(p, _)| p));
        self.fill_pin = Some(FillPin {
            id: idx,
            runs: runs.clone(),
        });
        for r in &runs {
            let off = self.geo.ram_page_offset(r.first);
            punch(&self.file, off, r.count * PAGE_SIZE as u64)
                .map_err(io("punching RAM pages out of"))?;
        }
        let t3 = t0.elapsed();
        // A punch into part of a huge page may zero it rather than free it: such a page
        // is no hole (userfaultfd would never ask for it), so it is copied now. Checked
        // with one `mincore` of the store's mapping per run: a page in the page cache is
        // data. A page that is not may still be data swapped out (or, on hugetlbfs, data
        // not mapped here), so there each such page is checked again with `SEEK_HOLE`
        // (one call a page: a run at once with `SEEK_DATA` would walk on past its end
        // over pages allocated and never written, which count as holes too).
        let absent_is_hole = mincore_absent_is_hole(&self.file);
        let mut holes = holes.into_iter();
        for r in &runs {
            let resident = self
                .map
                .resident(self.geo.ram_page_offset(r.first), r.count as usize)
                .map_err(io("checking RAM holes in"))?;
            for in_memory in resident {
                let h = holes.next().ok_or_else(|| {
                    PoolError::Corrupt(format!("run {r:?} has more pages than its holes"))
                })?;
                debug_assert!(r.contains(h.page));
                let off = self.geo.ram_page_offset(h.page);
                let hole = !page_has_data(in_memory, absent_is_hole, || is_hole(&self.file, off))
                    .map_err(io("checking RAM holes in"))?;
                if hole {
                    out.holes.push(h);
                } else {
                    self.fill_from_block(idx, h)?;
                    out.copied.push(h.page);
                }
            }
        }
        log::debug!(
            "lazy copy back of {name:?}: {} pages in {} runs; preserved after {t1:?}, marker \
             after {t2:?}, punched after {t3:?}, holes checked after {:?} (mincore {})",
            work.len(),
            runs.len(),
            t0.elapsed(),
            if absent_is_hole {
                "alone"
            } else {
                "and SEEK_HOLE"
            }
        );
        if !out.copied.is_empty() {
            self.persist_ram(&out.copied)?;
            let runs = pages_to_runs(out.holes.iter().map(|h| h.page));
            self.fill_pin = Some(FillPin { id: idx, runs });
        }
        if out.holes.is_empty() {
            self.finish_lazy_copy_back()?;
        }
        Ok(out)
    }

    /// Copy hole `h`'s block into RAM through the store's mapping, checked.
    fn fill_from_block(&self, idx: u64, h: LazyPage) -> Result<()> {
        self.copy_block_to_ram(idx, h.page, h.block)
    }

    /// Persist RAM pages `pages` (ascending) as one batch.
    fn persist_ram(&self, pages: &[u64]) -> Result<()> {
        self.persist_ram_runs(&pages_to_runs(pages.iter().copied()))
    }

    /// Every hole of the lazy copy back is filled: unpin its snapshot and remove the
    /// marker.
    fn finish_lazy_copy_back(&mut self) -> Result<()> {
        self.fill_pin = None;
        super::mark_ram_complete(&self.path).map_err(|source| PoolError::Io {
            what: "removing the fill marker of",
            path: self.path.clone(),
            source,
        })
    }

    /// Before snapshot `id` is deleted: if it is the source of a lazy copy back still
    /// filling, fill every hole first (through the gate) and end the copy back.
    pub(super) fn unpin_for_delete(&mut self, id: u64) -> Result<()> {
        let Some(pin) = self.fill_pin.as_ref().filter(|p| p.id == id) else {
            return Ok(());
        };
        if self.ram_gate.is_none() {
            // No one fills the holes: do it here, as opening the pool would.
            self.fill_holes_from(id)?;
        } else {
            let runs = pin.runs.clone();
            self.ensure_ram(&runs)?;
        }
        self.finish_lazy_copy_back()
    }

    /// Fill every hole of RAM among snapshot `id`'s preserved pages from its blocks,
    /// persisted. Returns how many were filled. The RAM area's holes are walked once,
    /// extent by extent. Pages allocated and never written count as holes there too,
    /// but none is among the snapshot's preserved pages: a preserve reads RAM(p), which
    /// makes the page written (zeroed) on tmpfs, and the write it preserved for follows.
    fn fill_holes_from(&self, id: u64) -> Result<u64> {
        let s = &self.snapshots[&id];
        let io = |source| PoolError::Io {
            what: "checking RAM holes in",
            path: self.path.clone(),
            source,
        };
        let page = PAGE_SIZE as u64;
        let start = self.geo.ram_page_offset(0);
        let end = start + self.geo.ram_size;
        let mut filled = Vec::new();
        let mut off = start;
        while off < end {
            let hole = seek(&self.file, off, libc::SEEK_HOLE).map_err(io)?;
            if hole >= end {
                break;
            }
            let data = seek(&self.file, hole, libc::SEEK_DATA)
                .map_err(io)?
                .min(end);
            let (first, last) = ((hole - start) / page, (data - start).div_ceil(page));
            for v in self.redirects.range_of(s, first, last) {
                let (p, b) = (v.page, v.block);
                let h = LazyPage {
                    page: p,
                    block: u64::from(b),
                    block_offset: self.geo.block_offset_of(u64::from(b)),
                    crc: 0,
                };
                self.fill_from_block(id, h)?;
                filled.push(p);
            }
            off = data.max(hole + page);
        }
        self.persist_ram(&filled)?;
        Ok(filled.len() as u64)
    }

    /// At open, with a fill marker `marker` beside the pool: finish a lazy copy back a
    /// crash interrupted (fill its holes from the snapshot it names, then remove the
    /// marker). Any other marker (a lazy restore from a repository, whose holes only
    /// that source can fill) refuses the pool.
    pub(super) fn finish_interrupted_fill(&mut self, marker: &str) -> Result<()> {
        let incomplete = || PoolError::RamIncomplete {
            path: self.path.clone(),
            from: marker.trim().to_string(),
        };
        let Some(id) = marker_snapshot(marker) else {
            return Err(incomplete());
        };
        if self.snapshots.contains_key(&id) {
            let n = self.fill_holes_from(id)?;
            log::info!(
                "pool {}: finished an interrupted lazy copy back of {:?}: {n} pages filled",
                self.path.display(),
                self.snapshots[&id].name
            );
        } else if self.ram_has_hole()? {
            // Its snapshot is gone (deleted once the fill was complete, the marker's
            // removal cut short): RAM must then be whole.
            return Err(incomplete());
        }
        self.finish_lazy_copy_back()
    }

    /// Whether any page of the RAM area is a hole.
    fn ram_has_hole(&self) -> Result<bool> {
        let start = self.geo.ram_page_offset(0);
        let end = start + self.geo.ram_size;
        // (Pages allocated and never written count as holes: a false alarm refuses the
        // pool, never the other way round.)
        let hole = seek(&self.file, start, libc::SEEK_HOLE).map_err(|source| PoolError::Io {
            what: "checking RAM holes in",
            path: self.path.clone(),
            source,
        })?;
        Ok(hole < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, pattern, small_pool, tmpdir, vm};
    use crate::{PoolOptions, RamGate};
    use std::sync::{Arc, Mutex};

    /// RAM page p read from the file (a hole reads as zeros), and whether it is a hole.
    fn file_page(pool: &Pool, p: u64) -> (Vec<u8>, bool) {
        use std::os::unix::fs::FileExt;
        let off = pool.geo.ram_page_offset(p);
        let mut b = vec![0u8; PAGE_SIZE];
        pool.file.read_exact_at(&mut b, off).expect("read");
        (b, is_hole(&pool.file, off).expect("seek"))
    }

    /// A pool with snapshots a (all 32 pages) and b (taken after pages 3, 4, 5 and 20
    /// were rewritten), then 4 rewritten again: a holds 3, 4, 5 and 20 in blocks.
    fn two_snapshots(d: &tempfile::TempDir) -> (std::path::PathBuf, Pool) {
        let (path, mut pool) = small_pool(d, 32, PoolOptions::default());
        fill(&mut pool, 0..32, 1);
        let all = [PageRun::new(0, 32)];
        vm(&mut pool, "a", &all);
        for p in [3, 4, 5, 20] {
            pool.write_ram_page(p, &pattern(1000 + p)).expect("write");
        }
        vm(&mut pool, "b", &all);
        pool.write_ram_page(4, &pattern(2000)).expect("write again");
        (path, pool)
    }

    #[test]
    fn the_preserved_pages_become_holes_and_reopening_fills_them() {
        let d = tmpdir();
        let (path, mut pool) = two_snapshots(&d);
        let want: Vec<_> = (0..32)
            .map(|p| pool.read_snapshot_page("a", p).expect("a").1)
            .collect();
        let back = pool
            .copy_back_lazy("a", &[PageRun::new(0, 32)])
            .expect("lazy copy back");
        let holes: Vec<u64> = back.holes.iter().map(|h| h.page).collect();
        assert_eq!(
            holes,
            vec![3, 4, 5, 20],
            "exactly the pages a holds in blocks"
        );
        assert_eq!(
            back.hole_runs(),
            vec![PageRun::new(3, 3), PageRun::new(20, 1)]
        );
        assert!(
            filling_marker(&path).exists(),
            "the marker is written before a punch"
        );
        for p in 0..32 {
            let (data, hole) = file_page(&pool, p);
            assert_eq!(hole, holes.contains(&p), "page {p}");
            if !hole {
                assert_eq!(data, want[p as usize].to_vec(), "page {p} in place");
            }
        }
        // b's pages 3 and 5 were in RAM: preserved for it before the punch.
        assert_eq!(pool.read_snapshot_page("b", 3).expect("b").1, pattern(1003));
        assert_eq!(pool.read_snapshot_page("b", 5).expect("b").1, pattern(1005));
        // A crash now: the pool opens whole, RAM holding a's content.
        drop(pool);
        let pool = Pool::open(&path).expect("reopen finishes the copy back");
        assert!(!filling_marker(&path).exists());
        for p in 0..32 {
            let (data, hole) = file_page(&pool, p);
            assert!(!hole, "page {p}");
            assert_eq!(data, want[p as usize].to_vec(), "page {p}");
        }
        assert_eq!(
            pool.read_snapshot_page("b", 20).expect("b").1,
            pattern(1020)
        );
        assert!(pool.verify(|_, _| ()).is_clean());
    }

    #[test]
    fn a_page_written_after_the_punch_is_kept_by_the_reopen() {
        let d = tmpdir();
        let (path, mut pool) = two_snapshots(&d);
        pool.copy_back_lazy("a", &[PageRun::new(0, 32)])
            .expect("lazy copy back");
        // Filled (as the VMM's fill would) and then written: no hole any more.
        pool.write_ram_page(4, &pattern(5000))
            .expect("write over a hole");
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.read_ram_page(4).expect("ram"), pattern(5000));
        assert_eq!(
            pool.read_ram_page(3).expect("ram"),
            pool.read_snapshot_page("a", 3).expect("a").1
        );
    }

    /// A gate that records what it was asked for and fills it from snapshot a's blocks
    /// with a second handle on the pool file (as the VMM's filler does).
    struct Gate {
        asked: Mutex<Vec<PageRun>>,
        file: std::fs::File,
        back: LazyCopyBack,
        ram_offset: u64,
    }

    impl RamGate for Gate {
        fn ensure(&self, runs: &[PageRun]) -> std::result::Result<(), String> {
            use std::os::unix::fs::FileExt;
            self.asked.lock().expect("lock").extend_from_slice(runs);
            for h in &self.back.holes {
                if runs.iter().any(|r| r.contains(h.page)) {
                    let mut b = vec![0u8; PAGE_SIZE];
                    self.file
                        .read_exact_at(&mut b, h.block_offset)
                        .map_err(|e| e.to_string())?;
                    let off = self.ram_offset + h.page * PAGE_SIZE as u64;
                    self.file.write_all_at(&b, off).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }
    }

    #[test]
    fn deleting_the_source_fills_every_hole_first() {
        let d = tmpdir();
        let (path, mut pool) = two_snapshots(&d);
        let want: Vec<_> = (0..32)
            .map(|p| pool.read_snapshot_page("a", p).expect("a").1)
            .collect();
        let back = pool
            .copy_back_lazy("a", &[PageRun::new(0, 32)])
            .expect("lazy copy back");
        let gate = Arc::new(Gate {
            asked: Mutex::new(Vec::new()),
            file: pool.file.try_clone().expect("dup"),
            back: back.clone(),
            ram_offset: pool.ram_offset(),
        });
        pool.set_ram_gate(Some(gate.clone()));
        let again = pool.copy_back_lazy("a", &[PageRun::new(0, 32)]);
        assert!(again.is_err(), "one lazy copy back at a time");
        pool.delete("b").expect("delete another snapshot");
        assert!(
            gate.asked.lock().expect("lock").is_empty(),
            "b is no source"
        );
        pool.delete("a").expect("delete the source");
        assert_eq!(*gate.asked.lock().expect("lock"), back.hole_runs());
        assert!(!filling_marker(&path).exists(), "the copy back is over");
        for p in 0..32 {
            let (data, hole) = file_page(&pool, p);
            assert!(!hole, "page {p}");
            assert_eq!(data, want[p as usize].to_vec(), "page {p}");
        }
    }

    #[test]
    fn without_a_gate_a_delete_of_the_source_fills_the_holes_itself() {
        let d = tmpdir();
        let (_, mut pool) = two_snapshots(&d);
        let want = pool.read_snapshot_page("a", 20).expect("a").1;
        pool.copy_back_lazy("a", &[PageRun::new(0, 32)])
            .expect("lazy copy back");
        pool.delete("a").expect("delete");
        let (data, hole) = file_page(&pool, 20);
        assert!(!hole);
        assert_eq!(data, want.to_vec());
    }

    #[test]
    fn a_page_in_memory_after_its_punch_is_data_and_swap_needs_a_second_look() {
        let never = || -> std::io::Result<bool> { panic!("no SEEK_HOLE needed") };
        assert!(page_has_data(1, true, never).expect("in memory"));
        assert!(page_has_data(0x81, false, never).expect("in memory, swap on"));
        assert!(!page_has_data(0, true, never).expect("not in memory, tmpfs, no swap"));
        assert!(page_has_data(0, false, || Ok(false)).expect("swapped out: data"));
        assert!(!page_has_data(0, false, || Ok(true)).expect("a hole"));
        assert!(page_has_data(0, false, || Err(std::io::Error::other("x"))).is_err());
        // This machine's test pools: tmpfs, and whatever /proc/swaps says.
        let d = tmpdir();
        let f = File::create(d.path().join("f")).expect("file");
        let swaps = std::fs::read_to_string("/proc/swaps").expect("/proc/swaps");
        let no_swap = swaps.lines().skip(1).all(|l| l.trim().is_empty());
        let on_tmpfs = d.path().starts_with("/dev/shm");
        assert_eq!(mincore_absent_is_hole(&f), on_tmpfs && no_swap);
    }

    #[test]
    fn mincore_sees_a_punched_page_as_out_of_memory() {
        let d = tmpdir();
        let (_, mut pool) = two_snapshots(&d);
        let back = pool
            .copy_back_lazy("a", &[PageRun::new(0, 32)])
            .expect("lazy copy back");
        let res = pool
            .map
            .resident(pool.geo.ram_page_offset(0), 32)
            .expect("mincore");
        for p in 0..32u64 {
            let hole = back.holes.iter().any(|h| h.page == p);
            assert_eq!(res[p as usize] & 1 == 0, hole, "page {p}");
        }
    }

    #[test]
    fn a_marker_of_a_repository_restore_still_refuses_the_pool() {
        let d = tmpdir();
        let (path, pool) = two_snapshots(&d);
        drop(pool);
        std::fs::write(filling_marker(&path), "snapshot s in repository /r\n").expect("marker");
        let err = Pool::open(&path).expect_err("refused");
        assert!(matches!(err, PoolError::RamIncomplete { .. }), "{err}");
        assert_eq!(marker_snapshot("snapshot s in repository /r"), None);
        assert_eq!(
            marker_snapshot("copy-back of snapshot id 7\n(x)\n"),
            Some(7)
        );
    }
}
