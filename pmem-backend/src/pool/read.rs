//! Reading the store without changing it: finding a snapshot, where its pages are,
//! their content and its state blob (checked against their crc32c), which pages are
//! protected, listings and statistics.

use super::Pool;
use crate::catalog::Snapshot;
use crate::error::{PoolError, Result};
use crate::types::{PageLocation, PageRun, SnapshotInfo, SnapshotSel, Stats};
use crate::{Page, PAGE_SIZE};

impl Pool {
    /// The id of the snapshot `sel` names.
    pub(super) fn find(&self, sel: SnapshotSel<'_>) -> Result<u64> {
        match sel {
            SnapshotSel::Name(n) => self.names.get(n).copied(),
            SnapshotSel::Id(i) => self.snapshots.contains_key(&i).then_some(i),
        }
        .ok_or_else(|| PoolError::NoSuchSnapshot(sel.to_string()))
    }

    /// Where snapshot page p is, without reading it.
    pub fn snapshot_page_location<'a>(
        &self,
        sel: impl Into<SnapshotSel<'a>>,
        p: u64,
    ) -> Result<PageLocation> {
        let s = &self.snapshots[&self.find(sel.into())?];
        if !s.covers(p) {
            return Err(PoolError::PageNotInSnapshot {
                snapshot: s.name.clone(),
                page: p,
            });
        }
        Ok(match self.redirects.get(s, p) {
            Some(b) => PageLocation::Block(u64::from(b)),
            None => PageLocation::Ram(p),
        })
    }

    /// The snapshot's pages that were preserved into blocks (the guest wrote them after
    /// the snapshot), in the order their blocks were allocated, at most `max` pages, as
    /// runs in that order (consecutive pages merged). Blocks are taken lowest first, so
    /// on a block area that had nothing freed since the snapshot this is exactly the
    /// order of the guest's first writes; after frees, a reused lower block moves its
    /// page earlier. A lazy restore fetches these pages first (docs/repository.md).
    pub fn preserved_in_order<'a>(
        &self,
        sel: impl Into<SnapshotSel<'a>>,
        max: u64,
    ) -> Result<Vec<PageRun>> {
        let s = &self.snapshots[&self.find(sel.into())?];
        let mut by_block: Vec<(u32, u64)> = self
            .redirects
            .of(s)
            .iter()
            .map(|v| (v.block, v.page))
            .collect();
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if by_block.len() > max {
            // The lowest `max` blocks without sorting them all (this runs under the pool
            // lock of a live VMM).
            by_block.select_nth_unstable(max);
            by_block.truncate(max);
        }
        by_block.sort_unstable();
        Ok(crate::types::pages_to_runs(
            by_block.into_iter().map(|(_, p)| p),
        ))
    }

    /// `BadBlock` unless `actual` is the recorded crc32c of block `b`, which holds page
    /// `p` of snapshot `id`.
    pub(super) fn check_block_crc(&self, id: u64, p: u64, b: u64, actual: u32) -> Result<()> {
        let expected = u32::try_from(b)
            .ok()
            .and_then(|b| self.index.block_crc(b))
            .unwrap_or(0);
        if actual == expected {
            return Ok(());
        }
        Err(PoolError::BadBlock {
            snapshot: self.snapshots[&id].name.clone(),
            page: p,
            block: b,
            expected,
            actual,
        })
    }

    /// Read guest page p of a snapshot: where it is and its content. Block content is
    /// checked against its crc32c.
    pub fn read_snapshot_page<'a>(
        &self,
        sel: impl Into<SnapshotSel<'a>>,
        p: u64,
    ) -> Result<(PageLocation, Page)> {
        let sel = sel.into();
        let loc = self.snapshot_page_location(sel, p)?;
        match loc {
            PageLocation::Ram(p) => Ok((loc, self.read_ram_page(p)?)),
            PageLocation::Block(b) => {
                let mut page: Page = [0; PAGE_SIZE];
                self.read_block(b, &mut page)?;
                self.check_block_crc(self.find(sel)?, p, b, crate::checksum::crc32c(&page))?;
                Ok((loc, page))
            }
        }
    }

    /// Read a snapshot's state blob, checking its crc32c.
    pub fn read_state<'a>(&self, sel: impl Into<SnapshotSel<'a>>) -> Result<Vec<u8>> {
        let s = &self.snapshots[&self.find(sel.into())?];
        let mut out = Vec::with_capacity(s.blob.len as usize);
        for &b in &s.blob.blocks {
            let mut page: Page = [0; PAGE_SIZE];
            self.read_block(u64::from(b), &mut page)?;
            let take = (s.blob.len as usize - out.len()).min(PAGE_SIZE);
            out.extend_from_slice(&page[..take]);
        }
        if crate::checksum::crc32c(&out) != s.blob.crc {
            return Err(PoolError::Corrupt(format!(
                "snapshot {:?}: state blob fails its checksum",
                s.name
            )));
        }
        Ok(out)
    }

    /// Whether RAM page p is referenced by a snapshot (and so must stay write-protected).
    #[inline]
    pub fn is_protected(&self, p: u64) -> bool {
        self.index.is_protected(p)
    }

    /// Every RAM page any snapshot still references as RAM(p), as runs (the VMM
    /// re-protects these when it starts on an existing pool).
    pub fn protected_runs(&self) -> Vec<PageRun> {
        self.index.protected_runs()
    }

    /// The pages of `runs` that no snapshot references in RAM (so not write-protected by
    /// the store), as runs; pages beyond guest RAM are left out.
    pub fn unprotected_runs(&self, runs: &[PageRun]) -> Vec<PageRun> {
        let end = self.ram_pages();
        let within: Vec<PageRun> = crate::normalize_runs(runs)
            .into_iter()
            .filter(|r| r.first < end)
            .map(|r| PageRun::new(r.first, r.count.min(end - r.first)))
            .collect();
        self.index.unreferenced_runs(&within)
    }

    fn info(&self, s: &Snapshot, in_blocks: u64) -> SnapshotInfo {
        let pages = s.page_count();
        SnapshotInfo {
            id: s.id,
            name: s.name.clone(),
            owner: s.owner,
            kind: s.kind,
            created_unix_ms: s.created_unix_ns / 1_000_000,
            created_unix_ns: s.created_unix_ns,
            labels: s.labels.clone(),
            process: s.process.clone(),
            runs: s.runs.clone(),
            pages,
            pages_in_ram: pages - in_blocks,
            pages_in_blocks: in_blocks,
            state_len: s.blob.len,
        }
    }

    /// All snapshots, in creation order.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let count = self.redirects.counter();
        self.snapshots
            .values()
            .map(|s| self.info(s, count(s)))
            .collect()
    }

    /// One snapshot.
    pub fn inspect<'a>(&self, sel: impl Into<SnapshotSel<'a>>) -> Result<SnapshotInfo> {
        let s = &self.snapshots[&self.find(sel.into())?];
        Ok(self.info(s, self.redirects.count_of(s)))
    }

    /// Store-wide statistics.
    pub fn stats(&self) -> Stats {
        let c = self.index.counts();
        Stats {
            snapshots: self.snapshots.len() as u64,
            ram_pages: self.geo.ram_pages(),
            pages_in_ram: c.pages_in_ram,
            pages_in_blocks: c.pages_in_blocks,
            blob_blocks: c.blob_blocks,
            shared_bytes: c.shared_bytes,
            saved_bytes: c.saved_bytes,
            blocks_total: self.geo.block_count,
            blocks_used: self.geo.block_count - c.blocks_free,
            blocks_free: c.blocks_free,
            log_records: u64::from(self.log_tail),
            log_capacity: self.geo.log_capacity(),
            generation: self.sb.generation,
            per_snapshot: self.list(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, pattern, small_pool, tmpdir, vm};
    use crate::PoolOptions;

    #[test]
    fn snapshot_protects_and_reads_back() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 64, PoolOptions::default());
        fill(&mut pool, 0..64, 100);
        let id = vm(&mut pool, "a", &[PageRun::new(0, 8), PageRun::new(20, 4)]);
        assert!(pool.is_protected(0) && pool.is_protected(7) && pool.is_protected(23));
        assert!(!pool.is_protected(8) && !pool.is_protected(24));
        assert_eq!(
            pool.protected_runs(),
            vec![PageRun::new(0, 8), PageRun::new(20, 4)]
        );
        assert_eq!(
            pool.unprotected_runs(&[PageRun::new(4, 30), PageRun::new(60, 10)]),
            vec![
                PageRun::new(8, 12),
                PageRun::new(24, 10),
                PageRun::new(60, 4)
            ],
            "pages beyond RAM (64) are left out"
        );
        let (loc, page) = pool.read_snapshot_page("a", 3).expect("read");
        assert_eq!(loc, PageLocation::Ram(3));
        assert_eq!(page, pattern(103));
        assert_eq!(
            pool.read_snapshot_page(id, 21).expect("by id").1,
            pattern(121)
        );
        assert!(matches!(
            pool.read_snapshot_page("a", 10),
            Err(PoolError::PageNotInSnapshot { page: 10, .. })
        ));
        let s = pool.stats();
        assert_eq!(
            (
                s.snapshots,
                s.pages_in_ram,
                s.pages_in_blocks,
                s.shared_bytes
            ),
            (1, 12, 0, 0)
        );
    }

    #[test]
    fn preserved_pages_come_in_the_order_they_were_written() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 64, PoolOptions::default());
        fill(&mut pool, 0..64, 1);
        vm(&mut pool, "a", &[PageRun::new(0, 64)]);
        for p in [40, 41, 42, 7, 30, 31, 3] {
            assert!(pool.preserve(p).expect("preserve"));
        }
        let runs = |v: &[(u64, u64)]| {
            v.iter()
                .map(|&(f, c)| PageRun::new(f, c))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            pool.preserved_in_order("a", 100).expect("order"),
            runs(&[(40, 3), (7, 1), (30, 2), (3, 1)])
        );
        assert_eq!(
            pool.preserved_in_order("a", 4).expect("order"),
            runs(&[(40, 3), (7, 1)])
        );
        // A later snapshot has nothing preserved yet.
        vm(&mut pool, "b", &[PageRun::new(0, 64)]);
        assert!(pool.preserved_in_order("b", 100).expect("order").is_empty());
        assert!(pool.preserved_in_order("nope", 1).is_err());
    }
}
