//! Restoring RAM from a snapshot (a rollback or a restore): which pages a snapshot holds
//! in blocks rather than in place, and copying them back into RAM.

use super::Pool;
use crate::error::{PoolError, Result};
use crate::redirects::{Version, RANGE_WALK_PAGES};
use crate::types::{normalize_runs, pages_to_runs, PageRun, RunBuilder, SnapshotSel};
use crate::PAGE_SIZE;

/// How many pages ahead the copy-back loop prefetches a block, and how much of it: the
/// first cache lines only. Prefetching all 64 lines of a page held the line-fill
/// buffers the loop's own loads and stores need, and was slower on pages in the order a
/// guest writes them (`examples/copy_back.rs`, 10% of 1 GiB: about 1.3 against 1.5-2.2
/// us a page; no prefetch 1.6).
const COPY_PREFETCH_AHEAD: usize = 2;
const COPY_PREFETCH_BYTES: usize = 256;

/// Pages of a copy back below which it runs in one thread: starting a thread costs tens
/// of microseconds, a page about one.
const COPY_PAGES_PER_THREAD: usize = 1024;

/// Threads for a copy back of `pages` pages: one per CPU this process may use, at most
/// [`COPY_MAX_THREADS`], and one per [`COPY_PAGES_PER_THREAD`] pages.
fn copy_threads(pages: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    threads_for(pages, cpus)
}

/// At most this many copy threads: beyond a few, copies share memory bandwidth rather
/// than add to it.
const COPY_MAX_THREADS: usize = 4;

fn threads_for(pages: usize, cpus: usize) -> usize {
    cpus.min(COPY_MAX_THREADS)
        .min(pages / COPY_PAGES_PER_THREAD)
        .max(1)
}

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
        let idx = self.find(sel.into())?;
        Ok(self
            .preserved_blocks(idx, runs)?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }

    /// [`Pool::preserved_pages`] of snapshot `idx`, each with the block holding its
    /// content (read from the same records: no lookup per page).
    pub(super) fn preserved_blocks(&self, idx: u64, runs: &[PageRun]) -> Result<Vec<(u64, u32)>> {
        let s = &self.snapshots[&idx];
        let norm = normalize_runs(runs);
        for &r in &norm {
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
        }
        // A long run is answered by a walk over every record since the snapshot (see
        // `Redirects::range_of`): with two or more (a rollback's written runs), one walk
        // over the span of all runs, kept where inside one, costs less than a walk each.
        let long = norm.iter().filter(|r| r.count > RANGE_WALK_PAGES).count();
        let pick = |v: &Version| (v.page, v.block);
        if long < 2 {
            let mut out = Vec::new();
            for r in &norm {
                out.extend(
                    self.redirects
                        .range_of(s, r.first, r.end())
                        .iter()
                        .map(pick),
                );
            }
            return Ok(out);
        }
        let (first, end) = (norm[0].first, norm[norm.len() - 1].end());
        let mut runs = norm.iter().peekable();
        let mut out = Vec::new();
        for v in self.redirects.range_of(s, first, end) {
            while runs.peek().is_some_and(|r| r.end() <= v.page) {
                runs.next();
            }
            if runs.peek().is_some_and(|r| r.contains(v.page)) {
                out.push(pick(&v));
            }
        }
        Ok(out)
    }

    /// Make RAM hold snapshot `sel`'s content for the pages of `runs` (a rollback or a
    /// restore): the pages it holds in blocks are checked against their crc32c and
    /// copied into RAM(p), each after RAM(p) was preserved for any other snapshot that
    /// still references it; pages it references in place already hold it. The RAM
    /// writes are persisted as one batch at the end (no snapshot references them in
    /// place any more, so their order does not matter). Returns the pages written,
    /// ascending. A bad block fails with `BadBlock` naming the page; the pages copied
    /// by then are written and persisted (every page was preserved for the others
    /// first). A copy of many pages runs in several threads ([`copy_threads`]), each
    /// over its own part of the pages, so pages after a bad one may be written too.
    pub fn copy_back<'a>(
        &mut self,
        sel: impl Into<SnapshotSel<'a>>,
        runs: &[PageRun],
    ) -> Result<Vec<u64>> {
        let t0 = std::time::Instant::now();
        let idx = self.find(sel.into())?;
        let work = self.preserved_blocks(idx, runs)?;
        // Populating a RAM hole through this mapping would make it present as zeros:
        // with RAM still filling lazily, the pages come in through the gate first.
        self.ensure_ram(&pages_to_runs(work.iter().map(|&(p, _)| p)))?;
        // First preserve every page for the others (a no-op for a page no other
        // snapshot references in place, the usual case): the copy loop below then only
        // moves bytes.
        self.preserve_for_others(idx, &work)?;
        let t1 = t0.elapsed();
        // The copy is split into page-ordered parts, one thread each, where there are
        // CPUs to spare and enough pages to pay for a thread (the vCPUs are paused or
        // not started yet: the CPUs are otherwise idle). Each part writes its pages and
        // fences its own non-temporal stores; the parts' pages are persisted together.
        let parts = copy_threads(work.len());
        let results = self.copy_in_parts(idx, &work, parts);
        let t3 = t0.elapsed();
        let done: Vec<PageRun> = results
            .iter()
            .flat_map(|(d, _)| d.iter().copied())
            .collect();
        self.persist_ram_runs(&done)?;
        log::debug!(
            "copy back of {} pages ({} runs, {parts} threads): preserved after {t1:?}, \
             copied after {t3:?}, persisted after {:?}",
            work.len(),
            done.len(),
            t0.elapsed()
        );
        let res = results.into_iter().try_for_each(|(_, r)| r);
        res.map(|()| work.into_iter().map(|(p, _)| p).collect())
    }

    /// [`Pool::copy_part`] of `work` split into `parts` parts of consecutive pages, all
    /// but the first in threads of their own (or in this one where no thread can be
    /// started): each part's result, in page order.
    fn copy_in_parts(
        &self,
        idx: u64,
        work: &[(u64, u32)],
        parts: usize,
    ) -> Vec<(Vec<PageRun>, Result<()>)> {
        if parts <= 1 || work.len() < 2 {
            return vec![self.copy_part(idx, work)];
        }
        std::thread::scope(|sc| {
            let mut chunks = work.chunks(work.len().div_ceil(parts));
            let first = chunks.next().unwrap_or(&[]);
            let spawned: Vec<_> = chunks
                .map(|c| {
                    let t = std::thread::Builder::new()
                        .name("copy-back".into())
                        .spawn_scoped(sc, move || self.copy_part(idx, c));
                    (c, t)
                })
                .collect();
            let mut out = vec![self.copy_part(idx, first)];
            for (c, t) in spawned {
                out.push(match t {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(_) => self.copy_part(idx, c),
                });
            }
            out
        })
    }

    /// Copy the blocks of `work` (page, block; ascending) into RAM, each checked against
    /// its crc32c: the runs written, and the first error (the pages after it are left).
    /// Ends with a store fence: the copies' non-temporal stores are ordered before the
    /// caller's persist and before anyone (the resumed guest) reads the pages.
    ///
    /// The RAM pages are mapped in the store's mapping before they are written (two
    /// pages ahead), a read fault per 64 KiB (fault-around maps the neighbours, see
    /// `Mapping::touch`): a write fault per page costs more than the copy itself. In a
    /// rollback they are mapped already and a touch is one load, where
    /// `MADV_POPULATE_WRITE` of runs walked every page (the VMM's 10% rollback of
    /// 1 GiB: 5-17 ms). Not the blocks either: they are mapped already in a rollback
    /// (the store wrote them), and in a new process the crc's reads fault them in with
    /// their neighbours. Copying back 100 runs of 262 pages of 1 GiB, blocks in shuffled
    /// order: 0.97-1.08 against 1.05-1.20 us a page with populate in the same process,
    /// 1.69-1.79 against 1.94-1.97 in a new one.
    fn copy_part(&self, idx: u64, work: &[(u64, u32)]) -> (Vec<PageRun>, Result<()>) {
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
                self.map.prefetch(
                    self.geo.block_offset_of(u64::from(b2)),
                    COPY_PREFETCH_BYTES,
                    false,
                );
                self.touch_ram(p2, &mut last_window);
            }
            self.copy_block_to_ram_streaming(idx, p, u64::from(b))?;
            done.push(p);
            Ok(())
        });
        self.map.store_fence();
        (done.runs, res)
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

    /// Preserve the pages of `work` ([`Pool::preserved_blocks`] of snapshot `idx`) for
    /// every other snapshot that references them in place, before `idx`'s content
    /// replaces them in RAM. `preserve` re-points the other snapshots only, so the
    /// blocks of `work` stay `idx`'s.
    pub(super) fn preserve_for_others(&mut self, idx: u64, work: &[(u64, u32)]) -> Result<()> {
        for &(p, b) in work {
            self.preserve(p)?;
            debug_assert_eq!(self.redirects.get(&self.snapshots[&idx], p), Some(b));
        }
        Ok(())
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

    /// Two or more long runs (a rollback's) are answered by one walk: the same pages as
    /// page by page.
    #[test]
    fn preserved_pages_of_several_long_runs() {
        let d = tmpdir();
        let pages = 3 * RANGE_WALK_PAGES + 300;
        let (_, mut pool) = small_pool(&d, pages, PoolOptions::default());
        let all = [PageRun::new(0, pages)];
        vm(&mut pool, "a", &all);
        for p in (0..pages).step_by(97) {
            pool.write_ram_page(p, &pattern(p)).expect("write");
        }
        vm(&mut pool, "b", &all);
        for p in (5..pages).step_by(89) {
            pool.write_ram_page(p, &pattern(p + 1)).expect("write");
        }
        let long = RANGE_WALK_PAGES + 10;
        let runs = [
            PageRun::new(pages - long, long),
            PageRun::new(3, long),
            PageRun::new(long + 100, 50),
        ];
        for name in ["a", "b"] {
            let want: Vec<u64> = normalize_runs(&runs)
                .iter()
                .flat_map(|r| r.first..r.end())
                .filter(|&p| {
                    pool.snapshot_page_location(name, p).expect("covered") != PageLocation::Ram(p)
                })
                .collect();
            assert!(!want.is_empty());
            assert_eq!(
                pool.preserved_pages(name, &runs).expect(name),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn threads_follow_the_cpus_and_the_pages() {
        assert_eq!(threads_for(100, 8), 1, "too few pages for a second thread");
        assert_eq!(threads_for(2 * COPY_PAGES_PER_THREAD, 8), 2);
        assert_eq!(threads_for(1 << 20, 2), 2, "no more than the CPUs");
        assert_eq!(threads_for(1 << 20, 64), COPY_MAX_THREADS);
        assert_eq!(threads_for(1 << 20, 0), 1);
    }

    /// Copied in parts (threads), every page is back and a bad block in a later part is
    /// named, the pages of the other parts written and reported.
    #[test]
    fn a_copy_in_parts_writes_every_page_and_names_a_bad_block() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 64, PoolOptions::default());
        fill(&mut pool, 0..64, 1);
        let all = [PageRun::new(0, 64)];
        vm(&mut pool, "a", &all);
        fill(&mut pool, 0..64, 2);
        let idx = pool.find("a".into()).expect("a");
        let work = pool.preserved_blocks(idx, &all).expect("blocks");
        assert_eq!(work.len(), 64);
        let parts = pool.copy_in_parts(idx, &work, 3);
        assert_eq!(parts.len(), 3);
        let done: Vec<PageRun> = parts.iter().flat_map(|(d, _)| d.clone()).collect();
        assert_eq!(normalize_runs(&done), all.to_vec());
        assert!(parts.iter().all(|(_, r)| r.is_ok()));
        for p in 0..64 {
            let want = pool.read_snapshot_page("a", p).expect("a").1;
            assert_eq!(pool.read_ram_page(p).expect("ram"), want, "page {p}");
        }
        // Page 50's block damaged: the third part stops there, the others finish.
        fill(&mut pool, 0..64, 3);
        let b = work[50].1;
        pool.map
            .write_at(pool.geo.block_offset_of(u64::from(b)), &[0xee; 8])
            .expect("damage");
        let parts = pool.copy_in_parts(idx, &work, 3);
        assert!(parts[0].1.is_ok() && parts[1].1.is_ok());
        assert!(matches!(
            parts[2].1,
            Err(PoolError::BadBlock { page: 50, .. })
        ));
        let done: Vec<PageRun> = parts.iter().flat_map(|(d, _)| d.clone()).collect();
        assert_eq!(normalize_runs(&done), vec![PageRun::new(0, 50)]);
        assert_eq!(pool.read_ram_page(51).expect("ram"), pattern(3 + 51));
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
