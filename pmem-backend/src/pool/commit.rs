//! The commit protocol: a new catalog generation is written into the metadata slot not
//! in use and persisted, then the superblock copy of the new generation is written and
//! persisted; only then is it the pool's state. A crash before the superblock lands
//! leaves the previous generation in force (see `docs/pool-format.md`). Every durable
//! write of the store goes through `persist_range` here.

use super::Pool;
use crate::catalog::{self, Snapshot};
use crate::error::{PoolError, Result};
use crate::superblock::{Geometry, Superblock, SB_SIZE};

impl Pool {
    /// Commit a new catalog generation: the current snapshots, plus `extra`, minus the
    /// snapshot with id `skip`, with `next_id`. Writes the catalog into the inactive slot,
    /// persists it, then writes and persists the superblock copy for the new generation.
    /// The in-memory state is not changed except for the superblock and the log tail.
    pub(super) fn commit(
        &mut self,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
    ) -> Result<()> {
        let gen = self.next_generation()?;
        let bytes = self.encode_catalog(gen, extra, skip, next_id);
        self.commit_catalog(gen, &bytes, self.geo)
    }

    /// The generation the next commit writes.
    pub(super) fn next_generation(&self) -> Result<u64> {
        self.sb
            .generation
            .checked_add(1)
            .ok_or_else(|| PoolError::Corrupt("generation counter exhausted".into()))
    }

    /// The catalog of generation `gen`: the current snapshots, plus `extra`, minus the
    /// snapshot with id `skip`, with `next_id`.
    pub(super) fn encode_catalog(
        &self,
        gen: u64,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
    ) -> Vec<u8> {
        let dropping = skip.and_then(|id| self.snapshots.iter().find(|s| s.id == id));
        let blocks = self.index.catalog_blocks(dropping);
        let snaps = self
            .snapshots
            .iter()
            .filter(|s| Some(s.id) != skip)
            .chain(extra);
        catalog::encode(gen, next_id, snaps, blocks.into_iter())
    }

    /// Commit `bytes` (encoded by `encode_catalog` for `gen`) as generation `gen`, whose
    /// superblock describes `geo` (the pool's geometry, except when the block area
    /// grows). The catalog goes into slot `gen % 2` and is persisted, then superblock copy
    /// `gen % 2` is written and persisted; only then do the superblock, the geometry and
    /// the log tail in memory change.
    pub(super) fn commit_catalog(&mut self, gen: u64, bytes: &[u8], geo: Geometry) -> Result<()> {
        if bytes.len() as u64 > geo.meta_slot_size {
            return Err(PoolError::MetadataFull {
                needed: bytes.len() as u64,
                capacity: geo.meta_slot_size,
            });
        }
        let slot = (gen % 2) as u32;
        let off = geo.meta_slot_offset(slot);
        self.write_persist(off, bytes, "catalog")?;
        let sb = Superblock {
            generation: gen,
            geometry: geo,
            catalog_slot: slot,
            catalog_len: bytes.len() as u64,
            ..self.sb
        };
        self.write_persist((gen % 2) * SB_SIZE, &sb.encode(), "superblock")?;
        self.sb = sb;
        self.geo = geo;
        self.log_tail = 0;
        Ok(())
    }

    /// Write bytes into the mapping and persist them.
    pub(super) fn write_persist(&self, off: u64, bytes: &[u8], what: &'static str) -> Result<()> {
        self.map
            .write_at(off, bytes)
            .map_err(|source| PoolError::Persist { what, source })?;
        self.persist_range(off, bytes.len() as u64, what)
    }

    /// The one path to durability.
    pub(super) fn persist_range(&self, off: u64, len: u64, what: &'static str) -> Result<()> {
        self.persist
            .persist(&self.map, off..off + len)
            .map_err(|source| PoolError::Persist { what, source })
    }

    /// Compact the redirect log into a new catalog generation (its records are in the
    /// catalog from then on).
    pub(super) fn compact(&mut self) -> Result<()> {
        self.commit(None, None, self.next_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::superblock::SbCopy;
    use crate::testutil::{pattern, small_pool, tmpdir};
    use crate::{PageRun, PoolOptions, SnapshotKind, SnapshotMeta};

    /// Superblock copy `copy` as it reads back from the pool.
    fn copy(pool: &Pool, copy: u64) -> SbCopy {
        let mut s = vec![0u8; SB_SIZE as usize];
        pool.map.read_at(copy * SB_SIZE, &mut s).expect("read");
        crate::superblock::decode(&s)
    }

    /// The catalog the current superblock points at.
    fn catalog(pool: &Pool) -> catalog::Catalog {
        let mut bytes = vec![0u8; pool.sb.catalog_len as usize];
        let off = pool.geo.meta_slot_offset(pool.sb.catalog_slot);
        pool.map.read_at(off, &mut bytes).expect("read");
        catalog::decode(&bytes, pool.sb.generation).expect("decode")
    }

    #[test]
    fn commit_alternates_slots_and_keeps_the_previous_generation() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let meta = SnapshotMeta::default;
        pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 4)], meta())
            .expect("a");
        pool.write_ram_page(1, &pattern(1))
            .expect("preserve, then write");
        assert_eq!(pool.log_tail, 1);
        let gen = pool.generation();
        pool.compact().expect("commit");
        assert_eq!(pool.generation(), gen + 1);
        assert_eq!(pool.log_tail, 0, "the log's records are in the catalog now");
        let new = pool.sb;
        assert_eq!(u64::from(new.catalog_slot), new.generation % 2);
        match (copy(&pool, new.generation % 2), copy(&pool, gen % 2)) {
            (SbCopy::Good(n), SbCopy::Good(old)) => {
                assert_eq!(n, new);
                assert_eq!(old.generation, gen);
                assert_ne!(old.catalog_slot, new.catalog_slot);
            }
            other => panic!("{other:?}"),
        }
        let cat = catalog(&pool);
        assert_eq!(cat.snapshots.len(), 1);
        assert_eq!(cat.snapshots[0].redirects.len(), 1);
        assert_eq!(cat.block_crcs.len(), 1);
        // Committing without "a" drops the block only "a" used from the catalog (the
        // in-memory state is the caller's to change).
        let id = pool.snapshots[0].id;
        pool.commit(None, Some(id), pool.next_id).expect("commit");
        let cat = catalog(&pool);
        assert!(cat.snapshots.is_empty() && cat.block_crcs.is_empty());
        assert_eq!(pool.snapshots.len(), 1);
    }

    #[test]
    fn a_catalog_too_large_for_its_slot_changes_nothing() {
        let d = tmpdir();
        let opts = PoolOptions {
            meta_slot_bytes: Some(4096),
            ..Default::default()
        };
        let (_, mut pool) = small_pool(&d, 8, opts);
        pool.snapshot(
            "a",
            SnapshotKind::Vm,
            &[PageRun::new(0, 2)],
            SnapshotMeta::default(),
        )
        .expect("a");
        let mut big = pool.snapshots[0].clone();
        big.name = "big".into();
        big.labels = (0..30)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect();
        let (sb, copies) = (pool.sb, [copy(&pool, 0), copy(&pool, 1)]);
        match pool.commit(Some(&big), None, pool.next_id + 1) {
            Err(PoolError::MetadataFull { needed, capacity }) => {
                assert!(needed > capacity && capacity == 4096, "{needed} {capacity}")
            }
            other => panic!("expected MetadataFull, got {other:?}"),
        }
        assert_eq!(pool.sb, sb);
        assert_eq!([copy(&pool, 0), copy(&pool, 1)], copies);
        assert_eq!(catalog(&pool).snapshots.len(), 1);
    }
}
