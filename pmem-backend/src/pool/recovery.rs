//! Opening a pool: pick the superblock copy, check the file against its geometry, load
//! the catalog into the snapshot list and the reference index (validating every
//! reference), then replay the redirect log of the current generation: the preserves
//! made durable since the last commit. See `docs/pool-format.md` for why this recovers
//! every crash.

use super::{index, io_err, take_lock, Pool};
use crate::catalog::{self, Catalog};
use crate::error::{PoolError, Result};
use crate::mapping::Mapping;
use crate::persist::Persist;
use crate::redirect_log::LogRecord;
use crate::superblock::{self, LOG_RECORD_SIZE, SB_SIZE};
use crate::{Page, PAGE_SIZE};
use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Read;
use std::path::Path;

/// What recovery found when the pool was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    /// Redirect-log records replayed.
    pub replayed: u64,
    /// A last record whose block did not match its checksum: the preserve was in flight
    /// at the crash, its page was never written, so the record was dropped.
    pub torn_discarded: u64,
    /// Records that redirected a page no snapshot referenced (dropped).
    pub orphans_dropped: u64,
}

impl Pool {
    /// Open an existing pool with the msync persist seam.
    pub fn open(path: impl AsRef<Path>) -> Result<Pool> {
        Self::open_with(path, None)
    }

    /// Open an existing pool with a chosen persist seam (`None`: msync).
    pub fn open_with(path: impl AsRef<Path>, persist: Option<Box<dyn Persist>>) -> Result<Pool> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        take_lock(&file, path)?;
        // RAM with holes: a lazy copy back (finished below, once the catalog is in) or
        // a lazy restore from a repository (refused: only its source can fill them).
        let marker = std::fs::read_to_string(super::filling_marker(path)).ok();
        if let Some(m) = marker.as_deref() {
            if super::lazy_back::marker_snapshot(m).is_none() {
                return Err(PoolError::RamIncomplete {
                    path: path.to_path_buf(),
                    from: m.trim().to_string(),
                });
            }
        }
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut head = vec![0u8; (2 * SB_SIZE).min(len) as usize];
        file.read_exact(&mut head)
            .map_err(io_err("reading the superblock of", path))?;
        if len < 2 * SB_SIZE {
            let n = head.len().min(8);
            if head[..n] != superblock::SB_MAGIC[..n] || n == 0 {
                return Err(PoolError::NotAPool);
            }
            return Err(PoolError::Truncated {
                expected: 2 * SB_SIZE,
                actual: len,
            });
        }
        let a = superblock::decode(&head[..SB_SIZE as usize]);
        let b = superblock::decode(&head[SB_SIZE as usize..]);
        let sb = superblock::select(&a, &b)?;
        let geo = sb.geometry;
        // A longer file is accepted, and only `file_size` bytes of it are mapped: growing
        // the block area extends the file before it commits the superblock that says so,
        // and a crash in between leaves the file longer than `file_size` (see `grow.rs`).
        if len < geo.file_size {
            return Err(PoolError::Truncated {
                expected: geo.file_size,
                actual: len,
            });
        }
        // Before anything sized by the superblock is allocated (bookkeeping per page,
        // the catalog buffer): a sparse crafted file passes the length check above.
        geo.check_limits(superblock::host_memory_bytes())
            .map_err(PoolError::TooLarge)?;
        let t0 = std::time::Instant::now();
        let map = Mapping::new(&file, geo.file_size as usize).map_err(io_err("mapping", path))?;
        let mut pool = Pool::assemble(path, file, map, persist, sb);
        let t1 = t0.elapsed();
        let mut bytes = vec![0u8; sb.catalog_len as usize];
        pool.map
            .read_at(geo.meta_slot_offset(sb.catalog_slot), &mut bytes)
            .map_err(|e| PoolError::Corrupt(format!("catalog out of bounds: {e}")))?;
        let cat = catalog::decode(&bytes, sb.generation).map_err(PoolError::Corrupt)?;
        let t2 = t0.elapsed();
        pool.load(cat)?;
        let t3 = t0.elapsed();
        pool.replay_log()?;
        if let Some(m) = marker.as_deref() {
            pool.finish_interrupted_fill(m)?;
        }
        log::debug!(
            "pool {} opened: mapped after {t1:?}, catalog read after {t2:?}, loaded after {t3:?}, log replayed after {:?}",
            path.display(),
            t0.elapsed()
        );
        Ok(pool)
    }

    /// Build the in-memory state from a decoded catalog, validating every reference.
    fn load(&mut self, cat: Catalog) -> Result<()> {
        let c = |m: String| PoolError::Corrupt(m);
        let ram_pages = self.geo.ram_pages();
        let mut names = HashSet::new();
        let mut max_id = 0;
        for s in &cat.snapshots {
            if !names.insert(s.name.as_str()) {
                return Err(c(format!("catalog: two snapshots named {:?}", s.name)));
            }
            if s.id == 0 || s.id >= cat.next_snapshot_id || s.id <= max_id {
                return Err(c(format!(
                    "catalog: snapshot {:?} has bad id {}",
                    s.name, s.id
                )));
            }
            max_id = s.id;
            if let Some(r) = s.page_set.last() {
                if r.end() > ram_pages {
                    return Err(c(format!(
                        "catalog: snapshot {:?} covers pages beyond RAM",
                        s.name
                    )));
                }
            }
            for &b in &s.blob.blocks {
                let bad = u64::from(b) >= self.geo.block_count
                    || cat.block_crcs.contains_key(&b)
                    || !self.index.is_free(b);
                if bad {
                    return Err(c(format!(
                        "catalog: snapshot {:?} state blob uses block {b} twice or out of range",
                        s.name
                    )));
                }
                self.index.mark_blob(b);
            }
        }
        for v in cat.redirects.iter() {
            if !cat.block_crcs.contains_key(&v.block) || u64::from(v.block) >= self.geo.block_count
            {
                return Err(c(format!(
                    "catalog: page {} points to unknown block {}",
                    v.page, v.block
                )));
            }
        }
        let mut redirects = cat.redirects;
        let counts = index::count_refs(ram_pages, self.geo.block_count, &cat.snapshots, &redirects)
            .map_err(|m| c(format!("catalog: {m}")))?;
        self.index
            .load_counts(&counts)
            .map_err(|m| c(format!("catalog: {m}")))?;
        // Records no snapshot uses (none is written, but a block the counts do not hold
        // must not stay named): their blocks are free.
        for v in counts.dead {
            redirects.remove(v);
        }
        self.redirects = redirects;
        for (&b, &crc) in &cat.block_crcs {
            self.index.keep_block_crc(b, crc);
        }
        // (The free list is built once, after the log replay.)
        self.next_id = cat.next_snapshot_id.max(1);
        self.checkpoint_len = cat.checkpoint_len;
        self.catalog_version = cat.version;
        self.names = cat
            .snapshots
            .iter()
            .map(|s| (s.name.clone(), s.id))
            .collect();
        self.snapshots = cat.snapshots.into_iter().map(|s| (s.id, s)).collect();
        Ok(())
    }

    /// Replay the redirect log of the current generation (see `redirect_log.rs`).
    fn replay_log(&mut self) -> Result<()> {
        let gen = self.sb.generation;
        let mut records = Vec::new();
        for seq in 0..self.geo.log_capacity() as u32 {
            let mut b = [0u8; LOG_RECORD_SIZE as usize];
            self.map
                .read_at(
                    self.geo.log_offset + u64::from(seq) * LOG_RECORD_SIZE,
                    &mut b,
                )
                .map_err(|e| PoolError::Corrupt(format!("redirect log: {e}")))?;
            match LogRecord::decode(&b) {
                Some(r) if r.is_next(gen, seq) => records.push(r),
                _ => break,
            }
        }
        let n = records.len();
        for (i, r) in records.into_iter().enumerate() {
            let usable = r.page < self.geo.ram_pages()
                && u64::from(r.block) < self.geo.block_count
                && self.index.is_free(r.block);
            if !usable {
                return Err(PoolError::Corrupt(format!(
                    "redirect log record {i}: page {} / block {} out of range or block in use",
                    r.page, r.block
                )));
            }
            if i + 1 == n {
                // The last record may belong to a preserve the crash interrupted: its
                // block write torn. Then the page was never written (preserve had not
                // returned), so RAM still holds exactly the content the record describes
                // and the record can be dropped. If RAM no longer matches, the preserve
                // completed and the block went bad later: keep it, so verify reports it.
                let mut page: Page = [0; PAGE_SIZE];
                self.read_block(u64::from(r.block), &mut page)?;
                if crate::checksum::crc32c(&page) != r.block_crc && r.page < self.geo.ram_pages() {
                    let ram = self.read_ram_page(r.page)?;
                    if crate::checksum::crc32c(&ram) == r.block_crc {
                        self.recovery.torn_discarded += 1;
                        self.log_tail = i as u32;
                        break;
                    }
                }
            }
            self.log_tail = i as u32 + 1;
            if self.index.ram_refs(r.page) == 0 {
                self.recovery.orphans_dropped += 1;
                continue;
            }
            self.apply_redirect(r.page, r.block, r.block_crc);
            self.recovery.replayed += 1;
        }
        self.index.rebuild_free_list();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Snapshot;
    use crate::redirects::{Redirects, Version};
    use crate::superblock::SB_CRC_OFFSET;
    use crate::testutil::{pattern, small_pool, tmpdir};
    use crate::{PageLocation, PageRun, PoolOptions, SnapshotKind, SnapshotMeta};

    fn patch(path: &Path, off: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(bytes, off).expect("patch");
    }

    fn reseal_superblock(path: &Path, copy: u64, f: impl FnOnce(&mut [u8])) {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open");
        let mut s = vec![0u8; SB_SIZE as usize];
        file.read_exact_at(&mut s, copy * SB_SIZE).expect("read");
        f(&mut s);
        let crc = crate::checksum::crc32c(&s[..SB_CRC_OFFSET]);
        s[SB_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&s, copy * SB_SIZE).expect("write");
    }

    /// A crafted superblock that claims more RAM and blocks than the host has, on a
    /// sparse file as long as it claims: refused before the bookkeeping or the catalog
    /// buffer is allocated, with an error that says why.
    #[test]
    fn crafted_huge_geometry_is_refused_before_allocating() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        let mut sb = pool.sb;
        drop(pool);
        let host = crate::superblock::host_memory_bytes();
        // Twice the host's memory in blocks, with a catalog length to match the slot.
        let blocks = (2 * host / PAGE_SIZE as u64).min(u64::from(u32::MAX));
        let g = &mut sb.geometry;
        g.block_count = blocks;
        g.file_size = g.block_offset + blocks * PAGE_SIZE as u64;
        g.validate().expect("still a consistent layout");
        let sector = sb.encode();
        patch(&path, 0, &sector);
        patch(&path, SB_SIZE, &sector);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(sb.geometry.file_size).expect("sparse extend");
        drop(f);
        match Pool::open(&path) {
            Err(e @ PoolError::TooLarge(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("larger than this host's memory"), "{msg}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(0).expect("free the sparse file");
    }

    #[test]
    fn not_a_pool_and_truncated() {
        let d = tmpdir();
        let junk = d.path().join("junk");
        std::fs::write(&junk, vec![0x5a; 20000]).expect("write");
        assert!(matches!(Pool::open(&junk), Err(PoolError::NotAPool)));
        let empty = d.path().join("empty");
        std::fs::write(&empty, b"").expect("write");
        assert!(matches!(Pool::open(&empty), Err(PoolError::NotAPool)));
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        let size = pool.geometry().file_size;
        drop(pool);
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(size - 4096).expect("truncate");
        match Pool::open(&path) {
            Err(PoolError::Truncated { expected, actual }) => {
                assert_eq!((expected, actual), (size, size - 4096))
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
        f.set_len(100).expect("truncate hard");
        assert!(matches!(
            Pool::open(&path),
            Err(PoolError::Truncated { .. })
        ));
    }

    #[test]
    fn newer_version_is_refused() {
        let d = tmpdir();
        let (path, pool) = small_pool(&d, 16, PoolOptions::default());
        drop(pool);
        reseal_superblock(&path, 0, |s| s[8] = 3);
        match Pool::open(&path) {
            Err(
                e @ PoolError::NewerVersion {
                    found: 3,
                    supported: 2,
                },
            ) => {
                let m = e.to_string();
                assert!(m.contains("version 3") && m.contains("version 2"), "{m}");
                assert!(m.contains("newer pmsnap"), "{m}");
            }
            other => panic!("expected NewerVersion, got {other:?}"),
        }
    }

    #[test]
    fn corrupt_superblocks_and_catalog() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        drop(pool);
        // Generation 3 lives in copy 1; tearing it falls back to generation 2 (empty).
        patch(&path, SB_SIZE + 50, &[0xff]);
        let p = Pool::open(&path).expect("falls back to the other copy");
        assert_eq!(p.generation(), 2);
        assert!(p.list().is_empty());
        drop(p);
        patch(&path, 50, &[0xff]);
        match Pool::open(&path) {
            Err(PoolError::Corrupt(m)) => {
                assert!(m.contains("superblock") || m.contains("checksum"), "{m}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // A pool whose catalog record is damaged names the record.
        let d2 = tmpdir();
        let (path2, mut pool) = small_pool(&d2, 16, PoolOptions::default());
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        let off = pool.geo.meta_slot_offset(pool.sb.catalog_slot) + pool.sb.catalog_len - 3;
        drop(pool);
        patch(&path2, off, &[0x99]);
        match Pool::open(&path2) {
            Err(PoolError::Corrupt(m)) => assert!(m.contains("delta 1"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// A pool written before issue 16 (superblock format 1, one whole version 2 catalog
    /// per commit) opens as it is; its next commit writes a version 3 checkpoint into
    /// the other slot and a format 2 superblock, after which a pmsnap that knows only
    /// format 1 would refuse it (`NewerVersion`) rather than misread the deltas.
    #[test]
    fn a_format_1_pool_opens_and_its_next_commit_upgrades_it() {
        use std::os::unix::fs::FileExt;
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let meta = SnapshotMeta::default;
        for p in 0..16 {
            pool.write_ram_page(p, &pattern(p)).expect("fill");
        }
        pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 8)], meta())
            .expect("a");
        pool.write_ram_page(1, &pattern(100)).expect("preserve 1");
        pool.gc().expect("one checkpoint");
        pool.write_ram_page(2, &pattern(101))
            .expect("preserve 2, in the log");
        let (sb, next_id) = (pool.sb, pool.next_id);
        let mut cat = vec![0u8; sb.catalog_len as usize];
        pool.map
            .read_at(pool.geo.meta_slot_offset(sb.catalog_slot), &mut cat)
            .expect("read");
        let cat = catalog::decode(&cat, sb.generation).expect("decode");
        drop(pool);
        // What pmsnap wrote before: the same state as a version 2 catalog, and both
        // superblock copies in format 1.
        let old = catalog::encode_version(
            2,
            catalog::CheckpointParts {
                generation: sb.generation,
                next_snapshot_id: next_id,
                snapshots: cat.snapshots.iter(),
                redirects: &cat.redirects,
                dropped_blocks: &HashSet::new(),
                block_crcs: cat.block_crcs.iter().map(|(&b, &c)| (b, c)),
            },
        );
        patch(&path, sb.geometry.meta_slot_offset(sb.catalog_slot), &old);
        let len = old.len() as u64;
        reseal_superblock(&path, sb.generation % 2, |s| {
            s[8] = 1;
            s[112..120].copy_from_slice(&len.to_le_bytes());
        });
        reseal_superblock(&path, 1 - sb.generation % 2, |s| s[8] = 1);
        let version = |copy: u64| {
            let f = std::fs::File::open(&path).expect("open");
            let mut v = [0u8; 4];
            f.read_exact_at(&mut v, copy * SB_SIZE + 8).expect("read");
            u32::from_le_bytes(v)
        };
        assert_eq!((version(0), version(1)), (1, 1));
        let mut pool = Pool::open(&path).expect("a format 1 pool opens");
        assert_eq!((pool.catalog_version, pool.recovery().replayed), (2, 1));
        assert_eq!(pool.read_snapshot_page("a", 1).expect("a").1, pattern(1));
        assert_eq!(pool.read_snapshot_page("a", 2).expect("a").1, pattern(2));
        pool.snapshot("b", SnapshotKind::Vm, &[PageRun::new(4, 8)], meta())
            .expect("b");
        // That commit was a checkpoint, in the other slot, under a format 2 superblock.
        assert_ne!(pool.sb.catalog_slot, sb.catalog_slot);
        assert_eq!(pool.sb.catalog_len, pool.checkpoint_len);
        assert_eq!(pool.catalog_version, catalog::CATALOG_VERSION);
        let g = pool.sb.generation;
        assert_eq!(version(g % 2), superblock::FORMAT_VERSION);
        assert_eq!(
            version(1 - g % 2),
            1,
            "the previous generation stays as it was"
        );
        // The next commit is a delta again.
        pool.write_ram_page(5, &pattern(102)).expect("preserve 5");
        pool.delete("b").expect("delete b");
        assert!(pool.sb.catalog_len > pool.checkpoint_len);
        drop(pool);
        let pool = Pool::open(&path).expect("reopen the upgraded pool");
        assert_eq!(pool.list().len(), 1);
        for (p, seed) in [(1, 1), (2, 2), (5, 5), (6, 6)] {
            assert_eq!(pool.read_snapshot_page("a", p).expect("a").1, pattern(seed));
        }
        assert!(pool.verify(|_, _| {}).is_clean());
    }

    /// A redirect record naming a block the catalog's block table does not list, or a
    /// state blob's block, is refused; one no snapshot uses is dropped, its block free.
    #[test]
    fn catalog_redirects_to_bad_blocks_are_corrupt() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let meta = SnapshotMeta::default;
        pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 4)], meta())
            .expect("a");
        pool.write_ram_page(1, &pattern(6))
            .expect("preserve 1, then write");
        pool.snapshot(
            "b",
            SnapshotKind::Vm,
            &[PageRun::new(8, 2)],
            SnapshotMeta {
                state: vec![7; 10],
                ..meta()
            },
        )
        .expect("b");
        pool.gc()
            .expect("gc: the catalog in force is one checkpoint");
        let v = pool.redirects.iter().next().expect("a's record");
        let blob = pool.snapshots[&2].blob.blocks[0];
        let (gen, next_id, off) = (
            pool.sb.generation,
            pool.next_id,
            pool.geo.meta_slot_offset(pool.sb.catalog_slot),
        );
        let snaps: Vec<Snapshot> = pool.snapshots.values().cloned().collect();
        let blocks = pool.index.catalog_blocks(&HashSet::new());
        drop(pool);
        // Rewrite the catalog with one record changed, and open it.
        let open_with = |record: Version, table: &[(u32, u32)]| {
            let mut red = Redirects::new();
            red.add(record);
            let bytes = catalog::encode(catalog::CheckpointParts {
                generation: gen,
                next_snapshot_id: next_id,
                snapshots: snaps.iter(),
                redirects: &red,
                dropped_blocks: &HashSet::new(),
                block_crcs: table.iter().copied(),
            });
            patch(&path, off, &bytes);
            reseal_superblock(&path, gen % 2, |s| {
                s[112..120].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            });
            Pool::open(&path)
        };
        let unknown = Version { block: 12, ..v };
        match open_with(unknown, &blocks) {
            Err(PoolError::Corrupt(m)) => assert!(m.contains("unknown block 12"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let on_blob = Version { block: blob, ..v };
        let table = [(blob, 0)];
        match open_with(on_blob, &table) {
            Err(PoolError::Corrupt(m)) => assert!(m.contains("state blob"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Page 9 for ids up to 1: only a is in that range, and a does not cover page 9.
        let unused = Version { page: 9, ..v };
        let pool = open_with(unused, &blocks).expect("an unused record is dropped");
        assert!(pool.redirects.is_empty());
        assert!(pool.index.is_free(v.block));
        assert_eq!(pool.stats().pages_in_blocks, 0);
    }

    #[test]
    fn torn_last_log_record_block_is_discarded() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.write_ram_page(1, &pattern(5)).expect("write");
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        pool.preserve(0).expect("preserve");
        pool.preserve(1).expect("preserve");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 1).expect("loc") else {
            panic!("not preserved")
        };
        // The block of the last record never made it: as if the crash hit mid-preserve.
        pool.map
            .write_at(pool.geo.block_offset_of(b), &[0u8; 16])
            .expect("tear");
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        let r = pool.recovery();
        assert_eq!((r.replayed, r.torn_discarded), (1, 1));
        assert_eq!(
            pool.snapshot_page_location("a", 1).expect("loc"),
            PageLocation::Ram(1)
        );
        assert!(pool.is_protected(1));
        assert_eq!(pool.read_snapshot_page("a", 1).expect("read").1, pattern(5));
    }

    #[test]
    fn preserve_crash_with_only_the_record_landed_is_rolled_back() {
        use crate::{CrashSim, Tear};
        for (tear, redirected) in [
            (Tear::LastOnly, false),
            (Tear::Half, false),
            (Tear::Whole, true),
        ] {
            let d = tmpdir();
            let sim = CrashSim::new(0, None, Tear::Lost);
            let opts = PoolOptions {
                persist: Some(Box::new(sim.clone())),
                ..Default::default()
            };
            let (_, mut pool) = small_pool(&d, 16, opts);
            pool.write_ram_page(4, &pattern(77)).expect("write");
            pool.snapshot(
                "a",
                SnapshotKind::Vm,
                &[PageRun::new(0, 8)],
                SnapshotMeta::default(),
            )
            .expect("snapshot");
            sim.arm(1, tear);
            assert!(pool.preserve(4).is_err(), "crash inside preserve");
            drop(pool);
            let path = d.path().join("img");
            std::fs::write(&path, sim.durable_image()).expect("image");
            let pool = Pool::open(&path).expect("reopen");
            let r = pool.recovery();
            let loc = pool.snapshot_page_location("a", 4).expect("loc");
            assert_eq!(
                matches!(loc, PageLocation::Block(_)),
                redirected,
                "{tear:?}: {loc:?} {r:?}"
            );
            assert_eq!(
                r.torn_discarded,
                u64::from(tear == Tear::LastOnly),
                "{tear:?}"
            );
            assert_eq!(pool.is_protected(4), !redirected);
            assert_eq!(
                pool.read_snapshot_page("a", 4).expect("read").1,
                pattern(77)
            );
            assert!(pool.verify(|_, _| ()).is_clean());
        }
    }

    #[test]
    fn bad_last_block_after_the_page_changed_is_kept_and_reported() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 16, PoolOptions::default());
        pool.write_ram_page(1, &pattern(5)).expect("write");
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 4)],
            SnapshotMeta::default(),
        )
        .expect("snapshot");
        pool.write_ram_page(1, &pattern(6))
            .expect("preserve, then write");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 1).expect("loc") else {
            panic!("not preserved")
        };
        pool.map
            .write_at(pool.geo.block_offset_of(b), &[0u8; 16])
            .expect("bit rot");
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.recovery().torn_discarded, 0);
        assert_eq!(
            pool.snapshot_page_location("a", 1).expect("loc"),
            PageLocation::Block(b)
        );
        let rep = pool.verify(|_, _| ());
        assert!(
            matches!(
                rep.problems.as_slice(),
                [crate::Problem::BadPage { page: 1, .. }]
            ),
            "{:?}",
            rep.problems
        );
    }
}
