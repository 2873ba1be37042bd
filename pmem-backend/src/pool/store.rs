//! The snapshot store's operations that change it: snapshot, preserve (copy before
//! write), delete and gc. Restoring RAM from a snapshot is in `copy_back.rs`, reading
//! in `read.rs`.

use super::{now_ns, Pool};
use crate::catalog::{
    validate_name, validate_owned_name, BlobRef, Redirect, Snapshot, MAX_LABELS, MAX_VALUE_LEN,
};
use crate::error::{PoolError, Result};
use crate::redirect_log::LogRecord;
use crate::redirects::Version;
use crate::superblock::LOG_RECORD_SIZE;
use crate::types::{
    normalize_runs, pages_to_runs, Owner, PageRun, SnapshotKind, SnapshotMeta, SnapshotSel,
};
use crate::{Page, PAGE_SIZE};

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
    if meta.owner != Owner::Host && kind != SnapshotKind::Process {
        return Err(invalid(format!(
            "a {} snapshot cannot belong to {}: guests own process snapshots only",
            kind.as_str(),
            meta.owner
        )));
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
        (SnapshotKind::Vm | SnapshotKind::Pages, Some(_)) => {
            return Err(invalid("only a process snapshot takes process info"))
        }
        (SnapshotKind::Vm | SnapshotKind::Pages, None) => {}
    }
    Ok(())
}

impl Pool {
    /// Write a state blob into freshly allocated blocks and persist them (runs of
    /// consecutive blocks are persisted with one call each).
    fn write_blob(&mut self, data: &[u8]) -> Result<BlobRef> {
        let blocks = self
            .index
            .alloc_blocks(data.len().div_ceil(PAGE_SIZE) as u64)?;
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
            self.index.unalloc(&blocks);
            return Err(e);
        }
        Ok(BlobRef {
            len: data.len() as u64,
            crc: crate::checksum::crc32c(data),
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
        validate_owned_name(meta.owner, name).map_err(invalid)?;
        if self.names.contains_key(name) {
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
        let next_id = self
            .next_id
            .checked_add(1)
            .ok_or_else(|| PoolError::Corrupt("snapshot id counter exhausted".into()))?;
        let blob = self.write_blob(&meta.state)?;
        let newly = self.index.unreferenced_runs(&page_set);
        self.index.set_protected(&newly, true);
        let snap = Snapshot {
            id: self.next_id,
            name: name.to_string(),
            owner: meta.owner,
            kind,
            created_unix_ns: now_ns(),
            labels: meta.labels,
            process: meta.process,
            runs: runs.to_vec(),
            page_set,
            blob,
        };
        let res = protect(&newly).and_then(|()| {
            self.commit(Some(&snap), None, next_id)
                .map_err(|e| Box::new(e) as ProtectError)
        });
        if let Err(source) = res {
            self.index.set_protected(&newly, false);
            self.index.unalloc(&snap.blob.blocks);
            return Err(PoolError::SnapshotAborted {
                name: name.to_string(),
                unprotect: newly,
                source,
            });
        }
        self.index.add_snapshot_refs(&snap);
        for &b in &snap.blob.blocks {
            self.index.mark_blob(b);
        }
        self.next_id = next_id;
        let id = snap.id;
        self.names.insert(snap.name.clone(), id);
        self.snapshots.insert(id, snap);
        Ok(id)
    }

    /// Preserve RAM page p before it is written: copy it into one new block, re-point
    /// every snapshot referencing RAM(p) to that block, and make the redirect durable.
    /// Returns `Ok(false)` if no snapshot references RAM(p) (nothing to do), `Ok(true)`
    /// once the redirect is durable; only then may the caller unprotect p. On `Err`, p
    /// is still RAM(p) for its snapshots: a caller that unprotects it anyway must first
    /// drop those snapshots (the VMM does, see the crate docs).
    pub fn preserve(&mut self, p: u64) -> Result<bool> {
        if p >= self.geo.ram_pages() {
            return Err(PoolError::PageOutOfRange {
                first: p,
                count: 1,
                ram_pages: self.geo.ram_pages(),
            });
        }
        if self.index.ram_refs(p) == 0 {
            return Ok(false);
        }
        if u64::from(self.log_tail) >= self.geo.log_capacity() {
            self.compact()?;
        }
        // The page is about to be read: a lazily restored RAM must have it first.
        self.ensure_ram(&[PageRun::new(p, 1)])?;
        let b = self.index.alloc_block()?;
        let res = (|| {
            // One copy, RAM -> block, then the crc over the block in place: the block is
            // store-owned and nothing else writes it.
            let boff = self.geo.block_offset_of(u64::from(b));
            let io = |source| PoolError::Persist {
                what: "preserved block",
                source,
            };
            self.map
                .copy_within(self.geo.ram_page_offset(p), boff, PAGE_SIZE)
                .map_err(io)?;
            let block_crc = self.map.crc32c(boff, PAGE_SIZE).map_err(io)?;
            let rec = LogRecord {
                seq: self.log_tail,
                block: b,
                generation: self.sb.generation,
                page: p,
                block_crc,
            };
            let off = self.geo.log_offset + u64::from(self.log_tail) * LOG_RECORD_SIZE;
            self.map.write_at(off, &rec.encode()).map_err(io)?;
            // Block and record in one unordered batch. If the crash leaves the record
            // without its block, recovery sees the block's crc fail while RAM still
            // matches the record (the page was not written: we had not returned), and
            // drops the record; see `Pool::replay_log`.
            let ranges = [boff..boff + PAGE_SIZE as u64, off..off + LOG_RECORD_SIZE];
            self.persist
                .persist_batch(&self.map, &ranges)
                .map_err(|source| PoolError::Persist {
                    what: "preserved block and redirect record",
                    source,
                })?;
            Ok(block_crc)
        })();
        match res {
            Ok(crc) => {
                self.apply_redirect(p, b, crc);
                self.log_tail += 1;
                Ok(true)
            }
            Err(e) => {
                self.index.unalloc(&[b]);
                Err(e)
            }
        }
    }

    /// Point every snapshot that references RAM(p) at block b (in memory only), and
    /// keep the redirect for the next commit's delta. Those snapshots are the ones
    /// covering p taken since p's newest record, so one record `(p, newest id) -> b`
    /// says it for all of them (`redirects.rs`): O(log), whatever the sharing. The
    /// caller has checked that `ram_refs(p) > 0`, so there is a snapshot.
    pub(super) fn apply_redirect(&mut self, p: u64, b: u32, crc: u32) {
        let n = self.index.ram_refs(p);
        let upto = self.snapshots.keys().next_back().copied().unwrap_or(0);
        self.redirects.add(Version {
            page: p,
            upto,
            block: b,
        });
        self.index.apply_redirect(p, b, crc, n);
        self.pending.push(Redirect {
            page: p,
            block: b,
            crc,
        });
    }

    /// Delete a snapshot: drop its references durably, free blocks nobody else uses,
    /// and return the RAM pages that are no longer protected (as runs).
    pub fn delete<'a>(&mut self, sel: impl Into<SnapshotSel<'a>>) -> Result<Vec<PageRun>> {
        let id = self.find(sel.into())?;
        // The source of a lazy copy back still filling: its blocks fill RAM's holes.
        self.unpin_for_delete(id)?;
        self.commit(None, Some(id), self.next_id)?;
        let s = self.snapshots.remove(&id).expect("found above");
        self.names.remove(&s.name);
        let records = self.redirects.of(&s);
        let unprotected = self.index.release(&s, &records);
        for v in records {
            if self.index.is_free(v.block) {
                self.redirects.remove(v);
            }
        }
        Ok(unprotected)
    }

    /// Reclaim anything unreferenced: recompute page and block usage from the snapshots,
    /// free what nothing references, compact the redirect log and every delta into a new
    /// checkpoint (the whole catalog, in the other metadata slot), and report. (Block
    /// usage is derived from references at open, so blocks written by an operation a
    /// crash interrupted are already free after reopening; gc is the sweep that proves it
    /// and compacts.)
    pub fn gc(&mut self) -> Result<GcReport> {
        let compacted = u64::from(self.log_tail);
        self.commit_geo(None, None, self.next_id, self.geo, true)?;
        let (pages_unprotected, blocks_reclaimed) = self
            .index
            .recount(self.snapshots.values(), &self.redirects)?;
        let index = &self.index;
        self.redirects.retain(|v| !index.is_free(v.block));
        Ok(GcReport {
            blocks_reclaimed,
            pages_unprotected,
            log_records_compacted: compacted,
            torn_records_discarded: self.recovery.torn_discarded,
            orphan_records_dropped: self.recovery.orphans_dropped,
            generation: self.sb.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, pattern, small_pool, tmpdir, vm};
    use crate::{PageLocation, PoolOptions, ProcessInfo};
    use std::sync::{mpsc, Arc, Mutex};

    #[test]
    fn preserve_shares_one_block_between_snapshots() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 32, PoolOptions::default());
        fill(&mut pool, 0..32, 7);
        vm(&mut pool, "a", &[PageRun::new(0, 16)]);
        vm(&mut pool, "b", &[PageRun::new(8, 16)]);
        assert_eq!(pool.stats().shared_bytes, 8 * 4096);
        assert!(pool.preserve(10).expect("preserve"));
        assert!(!pool.is_protected(10));
        assert!(!pool.preserve(10).expect("second preserve is a no-op"));
        assert!(!pool.preserve(30).expect("never protected"));
        let la = pool.snapshot_page_location("a", 10).expect("loc");
        let lb = pool.snapshot_page_location("b", 10).expect("loc");
        assert!(matches!(la, PageLocation::Block(_)));
        assert_eq!(la, lb, "both snapshots point at the same block");
        pool.write_ram_page(10, &pattern(999)).expect("write");
        assert_eq!(pool.read_snapshot_page("a", 10).expect("a").1, pattern(17));
        assert_eq!(pool.read_snapshot_page("b", 10).expect("b").1, pattern(17));
        let s = pool.stats();
        assert_eq!((s.pages_in_blocks, s.blocks_used), (1, 1));
        assert_eq!(s.shared_bytes, 8 * 4096);
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.recovery().replayed, 1);
        assert_eq!(pool.read_snapshot_page("b", 10).expect("b").1, pattern(17));
        assert_eq!(pool.read_ram_page(10).expect("ram"), pattern(999));
        assert!(pool.verify(|_, _| {}).is_clean());
    }

    /// A preserve re-points exactly the snapshots referencing RAM(p), found newest first:
    /// the newest only, all of them, or only the oldest (the walk goes to it).
    #[test]
    fn preserve_repoints_exactly_the_snapshots_referencing_the_page() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 32, PoolOptions::default());
        fill(&mut pool, 0..32, 7);
        vm(&mut pool, "a", &[PageRun::new(0, 12)]);
        pool.write_ram_page(3, &pattern(100))
            .expect("a's page 3 preserved");
        vm(&mut pool, "b", &[PageRun::new(0, 8)]);
        vm(&mut pool, "c", &[PageRun::new(4, 4)]);
        for i in 0..5 {
            vm(&mut pool, &format!("x{i}"), &[PageRun::new(20, 2)]);
        }
        let loc = |pool: &Pool, s: &str, p| pool.snapshot_page_location(s, p).expect("loc");
        let a3 = loc(&pool, "a", 3);
        // Page 3: b only (a has its block, c does not cover it).
        pool.write_ram_page(3, &pattern(101)).expect("b's page 3");
        assert!(matches!(loc(&pool, "b", 3), PageLocation::Block(_)));
        assert_eq!(loc(&pool, "a", 3), a3, "a keeps its older block");
        // Page 5: a, b and c share one block.
        pool.write_ram_page(5, &pattern(102)).expect("page 5");
        let b5 = loc(&pool, "b", 5);
        assert!(matches!(b5, PageLocation::Block(_)));
        assert_eq!((loc(&pool, "a", 5), loc(&pool, "c", 5)), (b5, b5));
        // Page 10: only the oldest, behind five newer snapshots.
        pool.write_ram_page(10, &pattern(103)).expect("page 10");
        assert!(matches!(loc(&pool, "a", 10), PageLocation::Block(_)));
        assert!(!pool.is_protected(3) && !pool.is_protected(5) && !pool.is_protected(10));
        for (s, p, seed) in [("a", 3, 10), ("b", 3, 100), ("c", 5, 12), ("a", 10, 17)] {
            assert_eq!(
                pool.read_snapshot_page(s, p).expect("read").1,
                pattern(seed)
            );
        }
        assert!(pool.verify(|_, _| {}).is_clean());
    }

    #[test]
    fn overlapping_runs_count_each_page_once() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        fill(&mut pool, 0..16, 30);
        let meta = SnapshotMeta {
            process: Some(ProcessInfo {
                pid: 1,
                comm: "two-mappings".into(),
                run_vas: vec![0x1000, 0x9000],
            }),
            ..SnapshotMeta::default()
        };
        pool.snapshot(
            "p",
            SnapshotKind::Process,
            &[PageRun::new(0, 4), PageRun::new(2, 4)],
            meta,
        )
        .expect("snapshot");
        assert_eq!(pool.inspect("p").expect("inspect").pages, 6);
        assert_eq!(
            pool.stats().shared_bytes,
            0,
            "one snapshot shares nothing with itself"
        );
        pool.write_ram_page(3, &pattern(1)).expect("write");
        assert_eq!(pool.stats().blocks_used, 1);
        assert_eq!(
            pool.read_snapshot_page("p", 3).expect("read").1,
            pattern(33)
        );
        assert_eq!(
            pool.delete("p").expect("delete"),
            vec![PageRun::new(0, 3), PageRun::new(4, 2)]
        );
        assert_eq!(pool.stats().blocks_used, 0);
    }

    #[test]
    fn write_ram_page_preserves_first() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 8, PoolOptions::default());
        fill(&mut pool, 0..8, 1);
        vm(&mut pool, "a", &[PageRun::new(0, 8)]);
        pool.write_ram_page(2, &pattern(50)).expect("write");
        assert_eq!(pool.read_snapshot_page("a", 2).expect("read").1, pattern(3));
        assert_eq!(pool.read_ram_page(2).expect("ram"), pattern(50));
    }

    #[test]
    fn delete_unprotects_and_frees() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 32, PoolOptions::default());
        vm(&mut pool, "a", &[PageRun::new(0, 16)]);
        vm(&mut pool, "b", &[PageRun::new(8, 16)]);
        pool.preserve(9).expect("shared page");
        pool.preserve(2).expect("a-only page");
        pool.preserve(20).expect("b-only page");
        assert_eq!(pool.stats().blocks_used, 3);
        let freed = pool.delete("a").expect("delete");
        assert_eq!(freed, vec![PageRun::new(0, 2), PageRun::new(3, 5)]);
        assert_eq!(
            pool.stats().blocks_used,
            2,
            "block of page 2 freed, shared block kept"
        );
        assert!(matches!(
            pool.snapshot_page_location("b", 9),
            Ok(PageLocation::Block(_))
        ));
        let freed = pool.delete("b").expect("delete");
        assert_eq!(
            freed,
            vec![
                PageRun::new(8, 1),
                PageRun::new(10, 10),
                PageRun::new(21, 3)
            ]
        );
        let s = pool.stats();
        assert_eq!((s.blocks_used, s.pages_in_ram, s.snapshots), (0, 0, 0));
        assert!(pool.protected_runs().is_empty());
        assert!(matches!(
            pool.delete("b"),
            Err(PoolError::NoSuchSnapshot(_))
        ));
    }

    #[test]
    fn argument_errors() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        vm(&mut pool, "a", &[PageRun::new(0, 1)]);
        let m = SnapshotMeta::default;
        assert!(matches!(
            pool.snapshot("a", SnapshotKind::Vm, &[], m()),
            Err(PoolError::DuplicateName(n)) if n == "a"
        ));
        assert!(matches!(
            pool.snapshot("b", SnapshotKind::Vm, &[PageRun::new(10, 7)], m()),
            Err(PoolError::PageOutOfRange {
                first: 10,
                count: 7,
                ram_pages: 16
            })
        ));
        assert!(matches!(
            pool.snapshot("b", SnapshotKind::Vm, &[PageRun::new(u64::MAX, 2)], m()),
            Err(PoolError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            pool.snapshot("bad name", SnapshotKind::Vm, &[], m()),
            Err(PoolError::InvalidArgument(_))
        ));
        assert!(matches!(
            pool.snapshot("p", SnapshotKind::Process, &[PageRun::new(0, 1)], m()),
            Err(PoolError::InvalidArgument(_))
        ));
        let bad_vas = SnapshotMeta {
            process: Some(ProcessInfo {
                pid: 1,
                comm: "x".into(),
                run_vas: vec![],
            }),
            ..m()
        };
        assert!(matches!(
            pool.snapshot("p", SnapshotKind::Process, &[PageRun::new(0, 1)], bad_vas),
            Err(PoolError::InvalidArgument(_))
        ));
        let bad_label = SnapshotMeta {
            labels: vec![("a b".into(), "v".into())],
            ..m()
        };
        assert!(pool
            .snapshot("p", SnapshotKind::Vm, &[], bad_label)
            .is_err());
        assert!(matches!(
            pool.preserve(16),
            Err(PoolError::PageOutOfRange { .. })
        ));
        assert_eq!(pool.list().len(), 1, "no failed snapshot was recorded");
    }

    #[test]
    fn process_snapshot_metadata_and_state_roundtrip() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let state: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let meta = SnapshotMeta {
            owner: crate::Owner::Guest(1000),
            labels: vec![("app".into(), "redis".into())],
            state: state.clone(),
            process: Some(ProcessInfo {
                pid: 77,
                comm: "redis-server".into(),
                run_vas: vec![0x5555_0000, 0x7fff_0000],
            }),
        };
        // A guest-owned snapshot must be named in its owner's name space.
        let wrong = pool.snapshot(
            "p1",
            SnapshotKind::Process,
            &[PageRun::new(4, 2)],
            meta.clone(),
        );
        assert!(
            matches!(wrong, Err(PoolError::InvalidArgument(_))),
            "{wrong:?}"
        );
        pool.snapshot(
            "guest:1000/p1",
            SnapshotKind::Process,
            &[PageRun::new(4, 2), PageRun::new(1, 1)],
            meta,
        )
        .expect("snapshot");
        // The host's "p1" is another name space: no collision.
        let host = SnapshotMeta {
            process: Some(ProcessInfo {
                pid: 1,
                comm: "init".into(),
                run_vas: vec![0x1000],
            }),
            ..Default::default()
        };
        // Guests own process snapshots only.
        let guest_vm = SnapshotMeta {
            owner: crate::Owner::Guest(1000),
            ..Default::default()
        };
        assert!(matches!(
            pool.snapshot(
                "guest:1000/vm",
                SnapshotKind::Vm,
                &[PageRun::new(7, 1)],
                guest_vm
            ),
            Err(PoolError::InvalidArgument(_))
        ));
        pool.snapshot("p1", SnapshotKind::Process, &[PageRun::new(7, 1)], host)
            .expect("host p1");
        assert_eq!(pool.stats().blob_blocks, 3);
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(
            pool.inspect("p1").expect("host p1").owner,
            crate::Owner::Host
        );
        let info = pool.inspect("guest:1000/p1").expect("inspect");
        assert_eq!(info.owner, crate::Owner::Guest(1000));
        assert_eq!(info.kind, SnapshotKind::Process);
        assert_eq!(info.pages, 3);
        assert_eq!(info.labels, vec![("app".to_string(), "redis".to_string())]);
        let p = info.process.expect("process info");
        assert_eq!((p.pid, p.comm.as_str()), (77, "redis-server"));
        assert_eq!(p.run_vas, vec![0x5555_0000, 0x7fff_0000]);
        assert_eq!(info.runs, vec![PageRun::new(4, 2), PageRun::new(1, 1)]);
        assert_eq!(pool.read_state("guest:1000/p1").expect("state"), state);
        assert!(info.created_unix_ns > 0);
        assert_eq!(info.created_unix_ms, info.created_unix_ns / 1_000_000);
    }

    #[test]
    fn block_area_full_names_the_numbers() {
        let d = tmpdir();
        let opts = PoolOptions {
            block_count: Some(2),
            ..Default::default()
        };
        let (_, mut pool) = small_pool(&d, 8, opts);
        vm(&mut pool, "a", &[PageRun::new(0, 8)]);
        pool.preserve(0).expect("1");
        pool.preserve(1).expect("2");
        match pool.preserve(2) {
            Err(PoolError::BlockAreaFull {
                needed: 1,
                free: 0,
                total: 2,
            }) => {}
            other => panic!("expected BlockAreaFull, got {other:?}"),
        }
        assert!(
            pool.is_protected(2),
            "a failed preserve leaves the page protected"
        );
        let big = SnapshotMeta {
            state: vec![1; 3 * PAGE_SIZE],
            ..Default::default()
        };
        assert!(matches!(
            pool.snapshot("b", SnapshotKind::Vm, &[], big),
            Err(PoolError::BlockAreaFull {
                needed: 3,
                free: 0,
                total: 2
            })
        ));
    }

    #[test]
    fn metadata_full_is_reported() {
        let d = tmpdir();
        let opts = PoolOptions {
            meta_slot_bytes: Some(4096),
            ..Default::default()
        };
        let (_, mut pool) = small_pool(&d, 8, opts);
        let labels: Vec<(String, String)> = (0..30)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        let meta = SnapshotMeta {
            labels,
            ..Default::default()
        };
        match pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 1)], meta) {
            Err(PoolError::SnapshotAborted {
                source, unprotect, ..
            }) => {
                assert!(
                    source.to_string().contains("metadata area full"),
                    "{source}"
                );
                assert_eq!(unprotect, vec![PageRun::new(0, 1)]);
            }
            other => panic!("expected abort, got {other:?}"),
        }
        assert!(!pool.is_protected(0));
    }

    #[test]
    fn protect_callback_sees_only_new_pages_and_failure_rolls_back() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        vm(&mut pool, "a", &[PageRun::new(0, 4)]);
        let mut seen = Vec::new();
        pool.snapshot_with(
            "b",
            SnapshotKind::Vm,
            &[PageRun::new(2, 4)],
            SnapshotMeta::default(),
            |r| {
                seen = r.to_vec();
                Ok(())
            },
        )
        .expect("snapshot b");
        assert_eq!(seen, vec![PageRun::new(4, 2)]);
        let gen = pool.generation();
        let err = pool
            .snapshot_with(
                "c",
                SnapshotKind::Vm,
                &[PageRun::new(5, 4)],
                SnapshotMeta::default(),
                |_| Err("uffd says no".into()),
            )
            .expect_err("callback failure aborts");
        match err {
            PoolError::SnapshotAborted { unprotect, .. } => {
                assert_eq!(unprotect, vec![PageRun::new(6, 3)])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(pool.generation(), gen, "nothing committed");
        assert!(pool.is_protected(5) && !pool.is_protected(6) && !pool.is_protected(8));
        assert!(pool.inspect("c").is_err());
    }

    #[test]
    fn fault_during_snapshot_is_credited_to_the_new_snapshot() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        fill(&mut pool, 0..16, 40);
        let pool = Arc::new(Mutex::new(pool));
        let (tx, rx) = mpsc::channel();
        let mut guard = pool.lock().expect("lock");
        let p2 = Arc::clone(&pool);
        let mut handle = None;
        guard
            .snapshot_with(
                "s",
                SnapshotKind::Vm,
                &[PageRun::new(0, 16)],
                SnapshotMeta::default(),
                |newly| {
                    // Page 5 is being protected: a "vCPU write" to it faults now, and the
                    // handler blocks on the store lock until the commit is done.
                    assert!(newly.iter().any(|r| r.contains(5)));
                    handle = Some(std::thread::spawn(move || {
                        tx.send(()).expect("send");
                        let mut p = p2.lock().expect("lock");
                        let did = p.preserve(5).expect("preserve");
                        p.map
                            .write_at(p.geo.ram_page_offset(5), &pattern(1))
                            .expect("guest write");
                        did
                    }));
                    rx.recv().expect("handler started");
                    Ok(())
                },
            )
            .expect("snapshot");
        drop(guard);
        assert!(
            handle.expect("spawned").join().expect("join"),
            "the fault preserved the page"
        );
        let pool = pool.lock().expect("lock");
        assert!(matches!(
            pool.snapshot_page_location("s", 5),
            Ok(PageLocation::Block(_))
        ));
        assert_eq!(
            pool.read_snapshot_page("s", 5).expect("read").1,
            pattern(45)
        );
    }

    #[test]
    fn log_full_compacts_and_gc_reports() {
        let d = tmpdir();
        let opts = PoolOptions {
            log_records: Some(128),
            ..Default::default()
        };
        let (path, mut pool) = small_pool(&d, 300, opts);
        fill(&mut pool, 0..300, 3);
        vm(&mut pool, "a", &[PageRun::new(0, 300)]);
        let gen = pool.generation();
        for p in 0..200 {
            assert!(pool.preserve(p).expect("preserve"));
        }
        assert!(pool.generation() > gen, "log filled and was compacted");
        assert_eq!(pool.stats().log_records, 200 - 128);
        drop(pool);
        let mut pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.recovery().replayed, 72);
        for p in [0, 127, 128, 199, 250] {
            assert_eq!(
                pool.read_snapshot_page("a", p).expect("read").1,
                pattern(3 + p)
            );
        }
        let r = pool.gc().expect("gc");
        assert_eq!(r.log_records_compacted, 72);
        assert_eq!((r.blocks_reclaimed, r.pages_unprotected), (0, 0));
        assert_eq!(pool.stats().log_records, 0);
        assert!(pool.verify(|_, _| {}).is_clean());
    }

    #[test]
    fn gc_reclaims_inconsistent_in_memory_usage() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 8, PoolOptions::default());
        vm(&mut pool, "a", &[PageRun::new(0, 2)]);
        // Simulate a leak: a block marked used and a page counted with no referrer.
        pool.index.simulate_leak(6, 5);
        let r = pool.gc().expect("gc");
        assert_eq!((r.blocks_reclaimed, r.pages_unprotected), (1, 1));
        assert!(!pool.is_protected(6) && pool.is_protected(1));
        assert_eq!(pool.stats().blocks_free, 8);
    }
}
