//! The snapshot store's operations on an open [`Pool`]: snapshot, preserve, delete, gc,
//! page and state reads, listings and statistics.

use crate::bitmap::ProtectionBitmap;
use crate::catalog::{validate_name, BlobRef, Snapshot, MAX_LABELS, MAX_VALUE_LEN};
use crate::error::{PoolError, Result};
use crate::pool::{now_ns, BlockUse, Pool};
use crate::redirect_log::LogRecord;
use crate::superblock::LOG_RECORD_SIZE;
use crate::types::{
    normalize_runs, pages_to_runs, PageLocation, PageRun, SnapshotInfo, SnapshotKind, SnapshotMeta,
    SnapshotSel, Stats,
};
use crate::{Page, PAGE_SIZE};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Error type a protect callback returns.
pub type ProtectError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What [`Pool::gc`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blocks marked in use that no snapshot referenced, returned to the allocator.
    pub blocks_reclaimed: u64,
    /// RAM pages counted as referenced that no snapshot referenced (now unprotected).
    pub pages_unprotected: u64,
    /// Redirect-log records compacted into the new catalog.
    pub log_records_compacted: u64,
    /// Torn log records recovery discarded at open.
    pub torn_records_discarded: u64,
    /// Orphan log records recovery dropped at open.
    pub orphan_records_dropped: u64,
    /// Generation after gc's commit.
    pub generation: u64,
}

fn invalid(m: impl Into<String>) -> PoolError {
    PoolError::InvalidArgument(m.into())
}

fn validate_meta(kind: SnapshotKind, runs: &[PageRun], meta: &SnapshotMeta) -> Result<()> {
    if meta.labels.len() > MAX_LABELS {
        return Err(invalid(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in &meta.labels {
        validate_name("label key", k).map_err(invalid)?;
        if v.len() > MAX_VALUE_LEN {
            return Err(invalid(format!(
                "label {k:?}: value longer than {MAX_VALUE_LEN} bytes"
            )));
        }
    }
    match (kind, &meta.process) {
        (SnapshotKind::Process, Some(p)) => {
            if p.run_vas.len() != runs.len() {
                return Err(invalid(format!(
                    "{} runs but {} virtual addresses",
                    runs.len(),
                    p.run_vas.len()
                )));
            }
            if p.comm.len() > MAX_VALUE_LEN {
                return Err(invalid("command name too long"));
            }
        }
        (SnapshotKind::Process, None) => {
            return Err(invalid("a process snapshot needs process info"))
        }
        (SnapshotKind::Vm, Some(_)) => return Err(invalid("a vm snapshot takes no process info")),
        (SnapshotKind::Vm, None) => {}
    }
    Ok(())
}

impl Pool {
    pub(crate) fn find(&self, sel: SnapshotSel<'_>) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| match sel {
                SnapshotSel::Name(n) => s.name == n,
                SnapshotSel::Id(i) => s.id == i,
            })
            .ok_or_else(|| PoolError::NoSuchSnapshot(sel.to_string()))
    }

    fn alloc_blocks(&mut self, n: u64) -> Result<Vec<u32>> {
        if (self.free_blocks.len() as u64) < n {
            return Err(PoolError::BlockAreaFull {
                needed: n,
                free: self.free_blocks.len() as u64,
                total: self.geo.block_count,
            });
        }
        let at = self.free_blocks.len() - n as usize;
        let mut v = self.free_blocks.split_off(at);
        v.reverse();
        Ok(v)
    }

    fn free_block(&mut self, b: u32) {
        self.block_use[b as usize] = BlockUse::Free;
        self.block_refs[b as usize] = 0;
        self.page_blocks.remove(&b);
        self.free_blocks.push(b);
    }

    /// Write a state blob into freshly allocated blocks and persist them (runs of
    /// consecutive blocks are persisted with one call each).
    fn write_blob(&mut self, data: &[u8]) -> Result<BlobRef> {
        let blocks = self.alloc_blocks(data.len().div_ceil(PAGE_SIZE) as u64)?;
        let res = (|| {
            for (chunk, &b) in data.chunks(PAGE_SIZE).zip(&blocks) {
                let mut page: Page = [0; PAGE_SIZE];
                page[..chunk.len()].copy_from_slice(chunk);
                self.map
                    .write_at(self.geo.block_offset_of(u64::from(b)), &page)
                    .map_err(|source| PoolError::Persist {
                        what: "state blob",
                        source,
                    })?;
            }
            for r in pages_to_runs(blocks.iter().map(|&b| u64::from(b))) {
                self.persist_range(
                    self.geo.block_offset_of(r.first),
                    r.count * PAGE_SIZE as u64,
                    "state blob",
                )?;
            }
            Ok(())
        })();
        if let Err(e) = res {
            self.free_blocks.extend(blocks.iter().rev());
            return Err(e);
        }
        Ok(BlobRef {
            len: data.len() as u64,
            crc: crc32c::crc32c(data),
            blocks,
        })
    }

    /// Take a snapshot without a protect step (tests, offline use).
    pub fn snapshot(
        &mut self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
    ) -> Result<u64> {
        self.snapshot_with(name, kind, runs, meta, |_| Ok(()))
    }

    /// Take a snapshot: record RAM(p) references for every page in `runs`, with `meta`,
    /// writing no page data. Returns the new snapshot's id.
    ///
    /// Order: validate; write the state blob; mark the pages protected in the bitmap;
    /// call `protect(newly_protected_runs)` (the VMM write-protects those pages there);
    /// commit durably. `&mut self` is held throughout, so a fault handler that needs
    /// `preserve` waits for the commit and then finds the new snapshot's references.
    /// If `protect` or the commit fails, nothing is committed, the bitmap marks are
    /// rolled back, and [`PoolError::SnapshotAborted`] lists the runs to unprotect.
    pub fn snapshot_with<F>(
        &mut self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
        protect: F,
    ) -> Result<u64>
    where
        F: FnOnce(&[PageRun]) -> std::result::Result<(), ProtectError>,
    {
        validate_name("snapshot name", name).map_err(invalid)?;
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(PoolError::DuplicateName(name.to_string()));
        }
        validate_meta(kind, runs, &meta)?;
        let ram_pages = self.geo.ram_pages();
        for r in runs {
            if r.count == 0 || r.first.checked_add(r.count).is_none_or(|e| e > ram_pages) {
                return Err(PoolError::PageOutOfRange {
                    first: r.first,
                    count: r.count,
                    ram_pages,
                });
            }
        }
        let page_set = normalize_runs(runs);
        let blob = self.write_blob(&meta.state)?;
        let newly = pages_to_runs(
            page_set
                .iter()
                .flat_map(|r| r.first..r.end())
                .filter(|&p| self.ram_refs[p as usize] == 0),
        );
        for r in &newly {
            for p in r.first..r.end() {
                self.protected.set(p, true);
            }
        }
        let snap = Snapshot {
            id: self.next_id,
            name: name.to_string(),
            kind,
            created_unix_ns: now_ns(),
            labels: meta.labels,
            process: meta.process,
            runs: runs.to_vec(),
            page_set,
            redirects: BTreeMap::new(),
            blob,
        };
        let res = protect(&newly).and_then(|()| {
            self.commit(Some(&snap), None, snap.id + 1)
                .map_err(|e| Box::new(e) as ProtectError)
        });
        if let Err(source) = res {
            for r in &newly {
                for p in r.first..r.end() {
                    self.protected.set(p, false);
                }
            }
            self.free_blocks.extend(snap.blob.blocks.iter().rev());
            return Err(PoolError::SnapshotAborted {
                name: name.to_string(),
                unprotect: newly,
                source,
            });
        }
        for p in snap.pages() {
            self.ram_refs[p as usize] += 1;
        }
        for &b in &snap.blob.blocks {
            self.block_use[b as usize] = BlockUse::Blob;
            self.block_refs[b as usize] = 1;
        }
        self.next_id = snap.id + 1;
        let id = snap.id;
        self.snapshots.push(snap);
        Ok(id)
    }

    /// Preserve RAM page p before it is written: copy it into one new block, re-point
    /// every snapshot referencing RAM(p) to that block, and make the redirect durable.
    /// Returns `Ok(false)` if no snapshot references RAM(p) (nothing to do), `Ok(true)`
    /// once the redirect is durable; only then may the caller unprotect p.
    pub fn preserve(&mut self, p: u64) -> Result<bool> {
        if p >= self.geo.ram_pages() {
            return Err(PoolError::PageOutOfRange {
                first: p,
                count: 1,
                ram_pages: self.geo.ram_pages(),
            });
        }
        if self.ram_refs[p as usize] == 0 {
            return Ok(false);
        }
        if u64::from(self.log_tail) >= self.geo.log_capacity() {
            self.compact()?;
        }
        let b = self.alloc_blocks(1)?[0];
        let res = (|| {
            let mut page: Page = [0; PAGE_SIZE];
            self.map
                .read_at(self.geo.ram_page_offset(p), &mut page)
                .map_err(|source| PoolError::Persist {
                    what: "block",
                    source,
                })?;
            let block_crc = crc32c::crc32c(&page);
            self.write_persist(
                self.geo.block_offset_of(u64::from(b)),
                &page,
                "preserved block",
            )?;
            let rec = LogRecord {
                seq: self.log_tail,
                block: b,
                generation: self.sb.generation,
                page: p,
                block_crc,
            };
            let off = self.geo.log_offset + u64::from(self.log_tail) * LOG_RECORD_SIZE;
            self.write_persist(off, &rec.encode(), "redirect log record")?;
            Ok(block_crc)
        })();
        match res {
            Ok(crc) => {
                self.apply_redirect(p, b, crc);
                self.log_tail += 1;
                Ok(true)
            }
            Err(e) => {
                self.free_blocks.push(b);
                Err(e)
            }
        }
    }

    /// Compact the redirect log into a new catalog generation.
    fn compact(&mut self) -> Result<()> {
        self.commit(None, None, self.next_id)
    }

    /// Delete a snapshot: drop its references durably, free blocks nobody else uses,
    /// and return the RAM pages that are no longer protected (as runs).
    pub fn delete<'a>(&mut self, sel: impl Into<SnapshotSel<'a>>) -> Result<Vec<PageRun>> {
        let idx = self.find(sel.into())?;
        let id = self.snapshots[idx].id;
        self.commit(None, Some(id), self.next_id)?;
        let s = self.snapshots.remove(idx);
        let mut unprotected = Vec::new();
        if s.redirects.is_empty() {
            for p in s.pages() {
                self.unref_ram(p, &mut unprotected);
            }
        } else {
            let mut red = s.redirects.iter().peekable();
            for p in s.pages() {
                if red.peek().is_some_and(|(&rp, _)| rp == p) {
                    let (_, &b) = red.next().expect("peeked");
                    self.block_refs[b as usize] -= 1;
                    if self.block_refs[b as usize] == 0 {
                        self.free_block(b);
                    }
                } else {
                    self.unref_ram(p, &mut unprotected);
                }
            }
        }
        for &b in &s.blob.blocks {
            self.free_block(b);
        }
        Ok(pages_to_runs(unprotected))
    }

    fn unref_ram(&mut self, p: u64, unprotected: &mut Vec<u64>) {
        let r = &mut self.ram_refs[p as usize];
        *r -= 1;
        if *r == 0 {
            self.protected.set(p, false);
            unprotected.push(p);
        }
    }

    /// Reclaim anything unreferenced: recompute page and block usage from the snapshots,
    /// free what nothing references, compact the redirect log into a new generation, and
    /// report. (Block usage is derived from references at open, so blocks written by an
    /// operation a crash interrupted are already free after reopening; gc is the sweep
    /// that proves it and compacts.)
    pub fn gc(&mut self) -> Result<GcReport> {
        let compacted = u64::from(self.log_tail);
        self.commit(None, None, self.next_id)?;
        let mut ram = vec![0u32; self.ram_refs.len()];
        let mut blk = vec![0u32; self.block_refs.len()];
        for s in &self.snapshots {
            for p in s.pages() {
                match s.redirects.get(&p) {
                    Some(&b) => blk[b as usize] += 1,
                    None => ram[p as usize] += 1,
                }
            }
            for &b in &s.blob.blocks {
                blk[b as usize] += 1;
            }
        }
        let mut report = GcReport {
            log_records_compacted: compacted,
            torn_records_discarded: self.recovery.torn_discarded,
            orphan_records_dropped: self.recovery.orphans_dropped,
            generation: self.sb.generation,
            ..Default::default()
        };
        for (p, &n) in ram.iter().enumerate() {
            if n == 0 && self.ram_refs[p] != 0 {
                report.pages_unprotected += 1;
                self.protected.set(p as u64, false);
            }
        }
        self.ram_refs = ram;
        for (b, &n) in blk.iter().enumerate() {
            if n == 0 && self.block_use[b] != BlockUse::Free {
                report.blocks_reclaimed += 1;
                self.block_use[b] = BlockUse::Free;
                self.page_blocks.remove(&(b as u32));
            }
        }
        self.block_refs = blk;
        self.rebuild_free_list();
        Ok(report)
    }

    /// Where snapshot page p is, without reading it.
    pub fn snapshot_page_location<'a>(
        &self,
        sel: impl Into<SnapshotSel<'a>>,
        p: u64,
    ) -> Result<PageLocation> {
        let s = &self.snapshots[self.find(sel.into())?];
        if !s.covers(p) {
            return Err(PoolError::PageNotInSnapshot {
                snapshot: s.name.clone(),
                page: p,
            });
        }
        Ok(match s.redirects.get(&p) {
            Some(&b) => PageLocation::Block(u64::from(b)),
            None => PageLocation::Ram(p),
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
                let expected = self.page_blocks.get(&(b as u32)).copied().unwrap_or(0);
                let actual = crc32c::crc32c(&page);
                if actual != expected {
                    return Err(PoolError::BadBlock {
                        snapshot: self.snapshots[self.find(sel)?].name.clone(),
                        page: p,
                        block: b,
                        expected,
                        actual,
                    });
                }
                Ok((loc, page))
            }
        }
    }

    /// Read a snapshot's state blob, checking its crc32c.
    pub fn read_state<'a>(&self, sel: impl Into<SnapshotSel<'a>>) -> Result<Vec<u8>> {
        let s = &self.snapshots[self.find(sel.into())?];
        let mut out = Vec::with_capacity(s.blob.len as usize);
        for &b in &s.blob.blocks {
            let mut page: Page = [0; PAGE_SIZE];
            self.read_block(u64::from(b), &mut page)?;
            let take = (s.blob.len as usize - out.len()).min(PAGE_SIZE);
            out.extend_from_slice(&page[..take]);
        }
        if crc32c::crc32c(&out) != s.blob.crc {
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
        self.protected.get(p)
    }

    /// The protected-page bitmap, readable without the store's lock (fault path fast
    /// check; `preserve` under the lock stays the authority).
    pub fn protection_bitmap(&self) -> Arc<ProtectionBitmap> {
        Arc::clone(&self.protected)
    }

    /// Every RAM page any snapshot still references as RAM(p), as runs (the VMM
    /// re-protects these when it starts on an existing pool).
    pub fn protected_runs(&self) -> Vec<PageRun> {
        pages_to_runs(
            self.ram_refs
                .iter()
                .enumerate()
                .filter(|(_, &n)| n > 0)
                .map(|(p, _)| p as u64),
        )
    }

    fn info(&self, s: &Snapshot) -> SnapshotInfo {
        let pages = s.page_count();
        SnapshotInfo {
            id: s.id,
            name: s.name.clone(),
            kind: s.kind,
            created_unix_ns: s.created_unix_ns,
            labels: s.labels.clone(),
            process: s.process.clone(),
            runs: s.runs.clone(),
            pages,
            pages_in_ram: pages - s.redirects.len() as u64,
            pages_in_blocks: s.redirects.len() as u64,
            state_len: s.blob.len,
        }
    }

    /// All snapshots, in creation order.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|s| self.info(s)).collect()
    }

    /// One snapshot.
    pub fn inspect<'a>(&self, sel: impl Into<SnapshotSel<'a>>) -> Result<SnapshotInfo> {
        Ok(self.info(&self.snapshots[self.find(sel.into())?]))
    }

    /// Store-wide statistics.
    pub fn stats(&self) -> Stats {
        let page = PAGE_SIZE as u64;
        let mut shared = 0u64;
        let mut saved = 0u64;
        let mut in_ram = 0u64;
        for &n in &self.ram_refs {
            in_ram += u64::from(n > 0);
            shared += u64::from(n > 1) * page;
            saved += u64::from(n.saturating_sub(1)) * page;
        }
        let mut blob_blocks = 0;
        for (b, u) in self.block_use.iter().enumerate() {
            match u {
                BlockUse::Blob => blob_blocks += 1,
                BlockUse::Page => {
                    let n = self.block_refs[b];
                    shared += u64::from(n > 1) * page;
                    saved += u64::from(n.saturating_sub(1)) * page;
                }
                BlockUse::Free => {}
            }
        }
        let free = self.free_blocks.len() as u64;
        Stats {
            snapshots: self.snapshots.len() as u64,
            ram_pages: self.geo.ram_pages(),
            pages_in_ram: in_ram,
            pages_in_blocks: self.page_blocks.len() as u64,
            blob_blocks,
            shared_bytes: shared,
            saved_bytes: saved,
            blocks_total: self.geo.block_count,
            blocks_used: self.geo.block_count - free,
            blocks_free: free,
            log_records: u64::from(self.log_tail),
            log_capacity: self.geo.log_capacity(),
            generation: self.sb.generation,
            per_snapshot: self.list(),
        }
    }
}
