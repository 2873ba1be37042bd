//! Restoring RAM from a snapshot (a rollback or a restore): which pages a snapshot holds
//! in blocks rather than in place, and copying them back into RAM.

use super::Pool;
use crate::error::{PoolError, Result};
use crate::types::{normalize_runs, pages_to_runs, PageRun, RunBuilder, SnapshotSel};
use crate::PAGE_SIZE;

/// How many pages ahead the copy-back loop prefetches a block, and how much of it: the
/// first cache lines only. Prefetching all 64 lines of a page held the line-fill
/// buffers the loop's own loads and stores need, and was slower on pages in the order a
/// guest writes them (`examples/copy_back.rs`, 10% of 1 GiB: about 1.3 against 1.5-2.2
/// us a page; no prefetch 1.6).
const COPY_PREFETCH_AHEAD: usize = 2;
const COPY_PREFETCH_BYTES: usize = 256;

/// Pages one read fault maps in the store's mapping (the kernel's default fault-around
/// of 64 KiB): the copy-back loop touches one RAM page per such window.
const TOUCH_PAGES: u64 = 16;

impl Pool {
    /// The pages among `runs` (any order, may overlap) that snapshot `sel` holds in
    /// blocks rather than in place, ascending: what a copy back to RAM has to copy.
    /// Costs the number of such pages, not the number of pages in `runs`. Fails with
    /// `PageNotInSnapshot` (naming the first one) if `runs` has a page the snapshot does
    /// not cover.
    pub fn preserved_pages<'a>(
        &self,
        sel: impl Into<SnapshotSel<'a>>,
        runs: &[PageRun],
    ) -> Result<Vec<u64>> {
        let s = &self.snapshots[&self.find(sel.into())?];
        let mut out = Vec::new();
        for r in normalize_runs(runs) {
            // The page set is merged, so a covered run lies inside one of its runs.
            let i = s.page_set.partition_point(|x| x.first <= r.first);
            let inside = i > 0 && s.page_set[i - 1].end() >= r.end();
            if !inside {
                let page = if i > 0 && s.page_set[i - 1].contains(r.first) {
                    s.page_set[i - 1].end()
                } else {
                    r.first
                };
                return Err(PoolError::PageNotInSnapshot {
                    snapshot: s.name.clone(),
                    page,
                });
            }
            out.extend(
                self.redirects
                    .range_of(s, r.first, r.end())
                    .iter()
                    .map(|v| v.page),
            );
        }
        Ok(out)
    }

    /// Make RAM hold snapshot `sel`'s content for the pages of `runs` (a rollback or a
    /// restore): the pages it holds in blocks are checked against their crc32c and
    /// copied into RAM(p), each after RAM(p) was preserved for any other snapshot that
    /// still references it; pages it references in place already hold it. The RAM
    /// writes are persisted as one batch at the end (no snapshot references them in
    /// place any more, so their order does not matter). Returns the pages written,
    /// ascending. A bad block fails with `BadBlock` naming the page; the pages before it
    /// are written (and every page was preserved for the others first).
    pub fn copy_back<'a>(
        &mut self,
        sel: impl Into<SnapshotSel<'a>>,
        runs: &[PageRun],
    ) -> Result<Vec<u64>> {
        let t0 = std::time::Instant::now();
        let idx = self.find(sel.into())?;
        let pages = self.preserved_pages(SnapshotSel::Id(idx), runs)?;
        // Populating a RAM hole through this mapping would make it present as zeros:
        // with RAM still filling lazily, the pages come in through the gate first.
        self.ensure_ram(&pages_to_runs(pages.iter().copied()))?;
        // First preserve every page for the others (a no-op for a page no other
        // snapshot references in place, the usual case), noting its block: the copy
        // loop below then only moves bytes.
        let mut work: Vec<(u64, u64)> = Vec::with_capacity(pages.len());
        for &p in &pages {
            work.push((p, u64::from(self.preserve_for_others(idx, p)?)));
        }
        let t1 = t0.elapsed();
        // The RAM pages are mapped in this mapping before they are written (below, two
        // pages ahead), a read fault per 64 KiB (fault-around maps the neighbours, see
        // `Mapping::touch`): a write fault per page costs more than the copy itself. In
        // a rollback they are mapped already and a touch is one load, where
        // `MADV_POPULATE_WRITE` of runs walked every page (the VMM's 10% rollback of
        // 1 GiB: 5-17 ms). Not the blocks either: they are mapped already in a rollback
        // (the store wrote them), and in a new process the crc's reads fault them in
        // with their neighbours. Copying back 100 runs of 262 pages of 1 GiB, blocks in
        // shuffled order: 0.97-1.08 against 1.05-1.20 us a page with populate in the
        // same process, 1.69-1.79 against 1.94-1.97 in a new one.
        let mut done = RunBuilder::default();
        let mut last_window = u64::MAX;
        for &(p, _) in work.iter().take(COPY_PREFETCH_AHEAD) {
            self.touch_ram(p, &mut last_window);
        }
        let res = work.iter().enumerate().try_for_each(|(i, &(p, b))| {
            // The blocks of a guest's pages lie in the order it wrote them, not in page
            // order: each is a cold 4 KiB somewhere in the block area. Touching the
            // start of a later one now overlaps its TLB miss and first cache misses
            // with this page's crc and copy, and starts the hardware prefetcher on it.
            if let Some(&(p2, b2)) = work.get(i + COPY_PREFETCH_AHEAD) {
                self.map
                    .prefetch(self.geo.block_offset_of(b2), COPY_PREFETCH_BYTES, false);
                self.touch_ram(p2, &mut last_window);
            }
            self.copy_block_to_ram_streaming(idx, p, b)?;
            done.push(p);
            Ok(())
        });
        // The copies' non-temporal stores, ordered before the persist and before
        // anyone (the resumed guest) reads the pages.
        self.map.store_fence();
        let t3 = t0.elapsed();
        self.persist_ram_runs(&done.runs)?;
        log::debug!(
            "copy back of {} pages ({} runs): preserved after {t1:?}, copied after {t3:?}, \
             persisted after {:?}",
            pages.len(),
            done.runs.len(),
            t0.elapsed()
        );
        res.map(|()| pages)
    }

    /// Touch RAM page `p` in the store's mapping unless it lies in the fault-around
    /// window `last` (updated) already touched: one read fault maps the window.
    fn touch_ram(&self, p: u64, last: &mut u64) {
        let off = self.geo.ram_page_offset(p);
        // The kernel's windows are aligned in the address space, not in the file.
        let window = (self.map.as_ptr() as u64 + off) / (TOUCH_PAGES * PAGE_SIZE as u64);
        if window != *last {
            *last = window;
            self.map.touch(off);
        }
    }

    /// Preserve page `p` for every other snapshot that references it in place, before
    /// snapshot `idx`'s content replaces it in RAM; the block holding `idx`'s content.
    pub(super) fn preserve_for_others(&mut self, idx: u64, p: u64) -> Result<u32> {
        // `preserve` re-points other snapshots only: this one's redirect of p stays.
        self.preserve(p)?;
        self.redirects
            .get(&self.snapshots[&idx], p)
            .ok_or_else(|| PoolError::Corrupt(format!("page {p} lost its block during copy back")))
    }

    /// Copy block `block` (snapshot `idx`'s content of page `p`) into RAM page `p`
    /// through the store's mapping, after checking its crc.
    pub(super) fn copy_block_to_ram(&self, idx: u64, p: u64, block: u64) -> Result<()> {
        self.check_and_copy_block(idx, p, block, false)
    }

    /// [`Pool::copy_block_to_ram`] with non-temporal stores into RAM (no read of the
    /// destination's cache lines first): for a copy of many pages, which must call
    /// `self.map.store_fence()` once after the last.
    fn copy_block_to_ram_streaming(&self, idx: u64, p: u64, block: u64) -> Result<()> {
        self.check_and_copy_block(idx, p, block, true)
    }

    fn check_and_copy_block(&self, idx: u64, p: u64, block: u64, streaming: bool) -> Result<()> {
        let boff = self.geo.block_offset_of(block);
        let io = |e: std::io::Error| PoolError::Corrupt(format!("block {block}: {e}"));
        // The crc pass brings the block into the cache; the copy reads it from there.
        let actual = self.map.crc32c(boff, PAGE_SIZE).map_err(io)?;
        self.check_block_crc(idx, p, block, actual)?;
        let ram = self.geo.ram_page_offset(p);
        if streaming {
            self.map.copy_within_nt(boff, ram, PAGE_SIZE)
        } else {
            self.map.copy_within(boff, ram, PAGE_SIZE)
        }
        .map_err(io)
    }

    /// Persist the RAM pages of `runs`, copied back, as one batch.
    pub(super) fn persist_ram_runs(&self, runs: &[PageRun]) -> Result<()> {
        let ranges: Vec<std::ops::Range<u64>> = runs
            .iter()
            .map(|r| {
                let off = self.geo.ram_page_offset(r.first);
                off..off + r.count * PAGE_SIZE as u64
            })
            .collect();
        self.persist
            .persist_batch(&self.map, &ranges)
            .map_err(|source| PoolError::Persist {
                what: "RAM pages copied back",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, pattern, small_pool, tmpdir, vm};
    use crate::{PageLocation, PoolOptions};

    #[test]
    fn copy_back_restores_preserved_pages_and_keeps_later_snapshots() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 32, PoolOptions::default());
        fill(&mut pool, 0..32, 1);
        let all = [PageRun::new(0, 32)];
        vm(&mut pool, "a", &all);
        for p in [3, 4, 5, 20] {
            pool.write_ram_page(p, &pattern(1000 + p)).expect("write");
        }
        vm(&mut pool, "b", &all);
        pool.write_ram_page(4, &pattern(2000)).expect("write again");
        let written = pool.copy_back("a", &all).expect("copy back");
        assert_eq!(written, vec![3, 4, 5, 20], "only the preserved pages");
        for p in 0..32 {
            let want = pool.read_snapshot_page("a", p).expect("a").1;
            assert_eq!(pool.read_ram_page(p).expect("ram"), want, "page {p}");
        }
        // b still sees what RAM held when it was taken: preserved before the copy.
        for p in [3, 5, 20] {
            assert_eq!(
                pool.read_snapshot_page("b", p).expect("b").1,
                pattern(1000 + p)
            );
        }
        assert_eq!(pool.read_snapshot_page("b", 4).expect("b").1, pattern(1004));
        assert!(pool.verify(|_, _| ()).is_clean());
        // Copying a back preserved 3 and 5 for b. Only the runs asked for are copied;
        // doing it twice gives the same.
        pool.write_ram_page(21, &pattern(3000)).expect("write");
        for _ in 0..2 {
            let first = [PageRun::new(0, 10)];
            assert_eq!(pool.copy_back("b", &first).expect("b"), vec![3, 4, 5]);
            for p in 3..6 {
                assert_eq!(pool.read_ram_page(p).expect("ram"), pattern(1000 + p));
            }
            assert_eq!(pool.read_ram_page(21).expect("ram"), pattern(3000));
        }
    }

    #[test]
    fn copy_back_names_a_bad_block() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        fill(&mut pool, 0..16, 1);
        vm(&mut pool, "a", &[PageRun::new(0, 16)]);
        pool.write_ram_page(2, &pattern(7)).expect("write");
        pool.write_ram_page(9, &pattern(8)).expect("write");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 9).expect("loc") else {
            panic!("9 not preserved")
        };
        pool.map
            .write_at(pool.geo.block_offset_of(b), &[0xee; 8])
            .expect("damage");
        match pool.copy_back("a", &[PageRun::new(0, 16)]) {
            Err(PoolError::BadBlock { page: 9, block, .. }) => assert_eq!(block, b),
            other => panic!("expected BadBlock for page 9, got {other:?}"),
        }
        assert_eq!(
            pool.read_ram_page(2).expect("ram"),
            pool.read_snapshot_page("a", 2).expect("a").1,
            "the page before the bad one was copied"
        );
        assert_eq!(
            pool.read_ram_page(9).expect("ram"),
            pattern(8),
            "9 untouched"
        );
    }

    #[test]
    fn preserved_pages_lists_exactly_the_redirected_pages() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 64, PoolOptions::default());
        vm(&mut pool, "a", &[PageRun::new(0, 20), PageRun::new(30, 10)]);
        for p in [3, 4, 19, 31, 39] {
            pool.write_ram_page(p, &pattern(p)).expect("write");
        }
        vm(&mut pool, "b", &[PageRun::new(0, 64)]);
        pool.write_ram_page(4, &pattern(99)).expect("write again");
        pool.write_ram_page(50, &pattern(50)).expect("write");
        let brute = |pool: &Pool, name: &str, runs: &[PageRun]| -> Vec<u64> {
            let mut v: Vec<u64> = normalize_runs(runs)
                .iter()
                .flat_map(|r| r.first..r.end())
                .filter(|&p| {
                    pool.snapshot_page_location(name, p).expect("covered") != PageLocation::Ram(p)
                })
                .collect();
            v.dedup();
            v
        };
        let a_runs = [PageRun::new(30, 10), PageRun::new(0, 20)];
        assert_eq!(
            pool.preserved_pages("a", &a_runs).expect("a"),
            vec![3, 4, 19, 31, 39]
        );
        assert_eq!(brute(&pool, "a", &a_runs), vec![3, 4, 19, 31, 39]);
        let some = [PageRun::new(4, 10), PageRun::new(2, 3), PageRun::new(35, 5)];
        assert_eq!(
            pool.preserved_pages("a", &some).expect("a"),
            brute(&pool, "a", &some)
        );
        let all = [PageRun::new(0, 64)];
        assert_eq!(pool.preserved_pages("b", &all).expect("b"), vec![4, 50]);
        assert_eq!(brute(&pool, "b", &all), vec![4, 50]);
        for (runs, page) in [
            (vec![PageRun::new(15, 10)], 20),
            (vec![PageRun::new(25, 2)], 25),
            (vec![PageRun::new(0, 3), PageRun::new(39, 2)], 40),
        ] {
            match pool.preserved_pages("a", &runs) {
                Err(PoolError::PageNotInSnapshot { page: p, .. }) => {
                    assert_eq!(p, page, "{runs:?}")
                }
                other => panic!("{runs:?}: expected PageNotInSnapshot, got {other:?}"),
            }
        }
        assert!(matches!(
            pool.preserved_pages("zz", &all),
            Err(PoolError::NoSuchSnapshot(_))
        ));
    }
}
