//! The commit protocol. The catalog in force is a checkpoint followed by delta records
//! (`catalog.rs`), in the metadata slot the superblock names, `catalog_len` bytes long.
//! A commit of generation g+1 either
//! - **appends** its delta record right after those bytes, in the same slot, and
//!   persists it; or, when the deltas would outgrow the checkpoint (or the slot),
//! - writes a **checkpoint** (the whole catalog) into the *other* slot and persists it;
//!
//! then writes superblock copy (g+1) % 2, with the new `catalog_len` (and slot), and
//! persists it; only then is it the pool's state. Either way the bytes the superblock of
//! generation g covers are never written, so a crash before the new superblock lands
//! leaves generation g in force, whole; a torn delta lies beyond its `catalog_len` and
//! is never read (see `docs/pool-format.md`). Every durable write of the store goes
//! through `persist_range` here.

use super::Pool;
use crate::catalog::{self, Snapshot, CATALOG_VERSION};
use crate::error::{PoolError, Result};
use crate::superblock::{Geometry, Superblock, SB_SIZE};

/// Delta records may fill at least this many bytes after a checkpoint before a commit
/// writes a new checkpoint (beyond it, as many bytes as the checkpoint has), so small
/// catalogs are not rewritten every few commits.
pub const MIN_DELTA_BYTES: u64 = 64 << 10;

impl Pool {
    /// Commit a new catalog generation: the current snapshots, plus `extra`, minus the
    /// snapshot with id `skip`, with `next_id`, and the redirects made since the last
    /// commit. Appends a delta record, or writes a checkpoint when the deltas have grown
    /// past it (see the module docs). The in-memory state is not changed except for the
    /// superblock, the log tail and the pending redirects.
    pub(super) fn commit(
        &mut self,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
    ) -> Result<()> {
        self.commit_geo(extra, skip, next_id, self.geo, false)
    }

    /// As [`Self::commit`], with the superblock describing `geo` (the pool's geometry,
    /// except when the block area grows), and a checkpoint however short the deltas are
    /// when `checkpoint` is set (gc).
    pub(super) fn commit_geo(
        &mut self,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
        geo: Geometry,
        checkpoint: bool,
    ) -> Result<()> {
        let gen = self.next_generation()?;
        if !checkpoint && self.catalog_version == CATALOG_VERSION && self.sb.catalog_len > 0 {
            let delta = catalog::encode_delta(gen, next_id, &self.pending, skip, extra);
            if self.delta_fits(delta.len() as u64, geo) {
                return self.append_delta(gen, &delta, geo);
            }
        }
        let bytes = self.encode_catalog(gen, extra, skip, next_id);
        self.commit_checkpoint(gen, &bytes, geo)
    }

    /// Whether a delta of `len` bytes goes after the catalog in force: the deltas stay
    /// within max(checkpoint, `MIN_DELTA_BYTES`) bytes, and the slot has room.
    fn delta_fits(&self, len: u64, geo: Geometry) -> bool {
        let deltas = self.sb.catalog_len - self.checkpoint_len;
        deltas + len <= self.checkpoint_len.max(MIN_DELTA_BYTES)
            && self.sb.catalog_len + len <= geo.meta_slot_size
    }

    /// The generation the next commit writes.
    pub(super) fn next_generation(&self) -> Result<u64> {
        self.sb
            .generation
            .checked_add(1)
            .ok_or_else(|| PoolError::Corrupt("generation counter exhausted".into()))
    }

    /// The whole catalog (a checkpoint) of generation `gen`: the current snapshots, plus
    /// `extra`, minus the snapshot with id `skip`, with `next_id`.
    pub(super) fn encode_catalog(
        &self,
        gen: u64,
        extra: Option<&Snapshot>,
        skip: Option<u64>,
        next_id: u64,
    ) -> Vec<u8> {
        let dropped = match skip.and_then(|id| self.snapshots.get(&id)) {
            Some(s) => self.index.dropped_blocks(&self.redirects.of(s)),
            None => Default::default(),
        };
        let blocks = self.index.catalog_blocks(&dropped);
        let snaps = self
            .snapshots
            .values()
            .filter(|s| Some(s.id) != skip)
            .chain(extra);
        catalog::encode(catalog::CheckpointParts {
            generation: gen,
            next_snapshot_id: next_id,
            snapshots: snaps,
            redirects: &self.redirects,
            dropped_blocks: &dropped,
            block_crcs: blocks.into_iter(),
        })
    }

    /// Append `delta` (encoded for `gen`) after the catalog in force and persist it;
    /// then write and persist superblock copy `gen % 2` covering it.
    fn append_delta(&mut self, gen: u64, delta: &[u8], geo: Geometry) -> Result<()> {
        let off = geo.meta_slot_offset(self.sb.catalog_slot) + self.sb.catalog_len;
        self.write_persist(off, delta, "catalog delta")?;
        let sb = Superblock {
            generation: gen,
            geometry: geo,
            catalog_len: self.sb.catalog_len + delta.len() as u64,
            ..self.sb
        };
        self.commit_superblock(sb)
    }

    /// Commit `bytes` (a checkpoint encoded by `encode_catalog` for `gen`) as generation
    /// `gen`, whose superblock describes `geo`. The checkpoint goes into the slot not in
    /// force and is persisted, then superblock copy `gen % 2` is written and persisted.
    fn commit_checkpoint(&mut self, gen: u64, bytes: &[u8], geo: Geometry) -> Result<()> {
        if bytes.len() as u64 > geo.meta_slot_size {
            return Err(PoolError::MetadataFull {
                needed: bytes.len() as u64,
                capacity: geo.meta_slot_size,
            });
        }
        let slot = 1 - self.sb.catalog_slot;
        self.write_persist(geo.meta_slot_offset(slot), bytes, "catalog")?;
        let sb = Superblock {
            generation: gen,
            geometry: geo,
            catalog_slot: slot,
            catalog_len: bytes.len() as u64,
            ..self.sb
        };
        self.commit_superblock(sb)?;
        self.checkpoint_len = bytes.len() as u64;
        self.catalog_version = CATALOG_VERSION;
        Ok(())
    }

    /// Write and persist superblock copy `generation % 2`; then it is in force: the
    /// superblock, the geometry, the log tail and the pending redirects change in memory.
    fn commit_superblock(&mut self, sb: Superblock) -> Result<()> {
        self.write_persist((sb.generation % 2) * SB_SIZE, &sb.encode(), "superblock")?;
        self.sb = sb;
        self.geo = sb.geometry;
        self.log_tail = 0;
        self.pending.clear();
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
    fn deltas_append_in_place_and_checkpoints_go_to_the_other_slot() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 16, PoolOptions::default());
        let meta = SnapshotMeta::default;
        pool.snapshot("a", SnapshotKind::Vm, &[PageRun::new(0, 4)], meta())
            .expect("a");
        pool.write_ram_page(1, &pattern(1))
            .expect("preserve, then write");
        assert_eq!((pool.log_tail, pool.pending.len()), (1, 1));
        let (gen, old) = (pool.generation(), pool.sb);
        pool.compact().expect("commit");
        assert_eq!(pool.generation(), gen + 1);
        assert_eq!(pool.log_tail, 0, "the log's records are in the catalog now");
        assert!(pool.pending.is_empty());
        let new = pool.sb;
        assert_eq!(new.catalog_slot, old.catalog_slot, "a delta, in place");
        assert!(new.catalog_len > old.catalog_len && new.catalog_len - old.catalog_len < 100);
        match (copy(&pool, new.generation % 2), copy(&pool, gen % 2)) {
            (SbCopy::Good(n), SbCopy::Good(o)) => assert_eq!((n, o), (new, old)),
            other => panic!("{other:?}"),
        }
        let cat = catalog(&pool);
        assert_eq!((cat.snapshots.len(), cat.deltas), (1, 3));
        assert_eq!(cat.redirects.len(), 1);
        assert_eq!(cat.block_crcs.len(), 1);
        // The previous generation's catalog is a prefix of this one, still whole.
        let mut prev = vec![0u8; old.catalog_len as usize];
        pool.map
            .read_at(pool.geo.meta_slot_offset(old.catalog_slot), &mut prev)
            .expect("read");
        let prev = catalog::decode(&prev, gen).expect("the old generation decodes");
        assert!(prev.redirects.is_empty());
        // gc writes a checkpoint into the other slot.
        pool.gc().expect("gc");
        let cp = pool.sb;
        assert_ne!(cp.catalog_slot, new.catalog_slot);
        assert_eq!(cp.catalog_len, pool.checkpoint_len);
        let cat2 = catalog(&pool);
        assert_eq!((cat2.deltas, &cat2.snapshots), (0, &cat.snapshots));
        assert_eq!(cat2.redirects, cat.redirects);
        // A commit without "a" drops the block only "a" used from the catalog (the
        // in-memory state is the caller's to change).
        pool.commit(None, Some(1), pool.next_id).expect("commit");
        let cat = catalog(&pool);
        assert!(cat.snapshots.is_empty() && cat.block_crcs.is_empty());
        assert_eq!(cat.deltas, 1);
        assert_eq!(pool.snapshots.len(), 1);
    }

    /// Deltas stay within max(checkpoint, MIN_DELTA_BYTES): past that the commit writes
    /// a checkpoint, so a commit's amortised cost follows its change.
    #[test]
    fn deltas_past_their_bound_are_checkpointed() {
        let d = tmpdir();
        let (path, mut pool) = small_pool(&d, 64, PoolOptions::default());
        let meta = SnapshotMeta::default;
        let (mut checkpoints, mut slot) = (0, pool.sb.catalog_slot);
        for i in 0..1500u64 {
            let name = format!("s{i}");
            pool.snapshot(&name, SnapshotKind::Vm, &[PageRun::new(i % 60, 4)], meta())
                .expect("snapshot");
            if i % 3 != 0 {
                pool.delete(name.as_str()).expect("delete");
            }
            let deltas = pool.sb.catalog_len - pool.checkpoint_len;
            assert!(
                deltas <= pool.checkpoint_len.max(MIN_DELTA_BYTES),
                "{deltas}"
            );
            if pool.sb.catalog_slot != slot {
                checkpoints += 1;
                slot = pool.sb.catalog_slot;
            }
        }
        assert!((2..10).contains(&checkpoints), "{checkpoints} checkpoints");
        let listed = pool.list();
        assert_eq!(listed.len(), 500);
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.list(), listed);
        assert!(pool.verify(|_, _| {}).is_clean());
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
        let mut big = pool.snapshots[&1].clone();
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
