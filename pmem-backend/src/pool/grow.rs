//! Growing the block area of an open pool (`pmsnap ctl pool grow`): when the block area
//! fills and only host-owned snapshots remain, a faulting vCPU waits until the operator
//! deletes a snapshot or grows the block area. The block area is the last area of the
//! file, so growing it extends the file and the block count and moves nothing: guest
//! RAM, its offset, the log, the metadata slots and every snapshot stay as they are.
//!
//! The steps, in this order (see "Growing the block area" in `docs/pool-format.md`):
//! 1. extend the file to the new size and allocate it (a full tmpfs fails here, ENOSPC,
//!    and the file gets its old length back), and make the new length durable;
//! 2. make the store's mapping cover the new blocks (the pre-fault thread, the only
//!    other holder of the mapping, is stopped first and started again after);
//! 3. commit a new generation whose superblock has the new `block_count` and
//!    `file_size` (the usual commit: a catalog delta or checkpoint, then the superblock);
//! 4. only then hand the new blocks to the allocator, so no block outside the committed
//!    block area is ever written.
//!
//! A crash before step 3's superblock is durable leaves a file longer than the
//! superblock's `file_size`, which `open` accepts (it maps `file_size` bytes and ignores
//! the rest): the pool is simply not grown, and a later growth reuses the space.

use super::{allocate, io_err, Pool};
use crate::catalog::CATALOG_BYTES_PER_BLOCK;
use crate::error::{PoolError, Result};
use crate::superblock::{self, Geometry};
use crate::PAGE_SIZE;
use std::sync::Arc;

/// What [`Pool::grow_blocks`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GrowReport {
    /// Blocks before.
    pub old_block_count: u64,
    /// Blocks now.
    pub new_block_count: u64,
    /// File size (superblock) before.
    pub old_file_size: u64,
    /// File size now.
    pub new_file_size: u64,
    /// Generation of the commit that grew the pool.
    pub generation: u64,
}

/// The bounds on the block count of a grown pool, given the catalog now.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// What the metadata slot can describe: the blocks in use plus one per
    /// `CATALOG_BYTES_PER_BLOCK` bytes the slot has beyond the current catalog.
    metadata: u64,
    /// RAM plus block area at most the host's memory and swap (what `open` accepts,
    /// `Geometry::check_limits`).
    host: u64,
}

impl Limits {
    /// The largest block count possible: also at most 2^32-1 (32-bit block numbers).
    fn max(&self) -> u64 {
        self.metadata.min(self.host).min(u64::from(u32::MAX))
    }
}

fn invalid(m: String) -> PoolError {
    PoolError::InvalidArgument(m)
}

impl Pool {
    /// The largest block count [`Pool::grow_blocks`] would accept now; at most the
    /// current count when the pool cannot grow. It depends on the catalog: deleting
    /// snapshots can raise it (see [`Pool::grow_blocks`] for the rule).
    pub fn max_block_count(&self) -> u64 {
        let catalog_len = self
            .encode_catalog(self.sb.generation, None, None, self.next_id)
            .len() as u64;
        self.limits(catalog_len).max()
    }

    fn limits(&self, catalog_len: u64) -> Limits {
        let used = self.geo.block_count - self.index.free_count();
        let room = self.geo.meta_slot_size.saturating_sub(catalog_len);
        let host =
            superblock::host_memory_bytes().saturating_sub(self.geo.ram_size) / PAGE_SIZE as u64;
        Limits {
            metadata: used.saturating_add(room / CATALOG_BYTES_PER_BLOCK),
            host,
        }
    }

    /// Grow the block area to `new_block_count` blocks, online: the file is extended,
    /// the store's mapping covers the new blocks, and a new generation with the new
    /// `block_count` and `file_size` is committed; then the new blocks are free for
    /// preserves and state blobs. Guest RAM, its offset and every snapshot are left as
    /// they are, and the VMM's own mapping of the RAM area stays valid. A crash at any
    /// point leaves either the old or the grown pool (see the module docs).
    ///
    /// Refused with [`PoolError::InvalidArgument`], before anything changes, when
    /// - `new_block_count` is not larger than the current count;
    /// - it exceeds the format's 2^32-1 blocks (block numbers are 32 bits);
    /// - the metadata slot could not hold the catalog of the grown pool once its block
    ///   area is full: the catalog now (as the next commit would write it) plus
    ///   [`CATALOG_BYTES_PER_BLOCK`] (28) bytes for every block free after growing,
    ///   which is what a block holding a preserved page adds (its block-table entry
    ///   and its redirect record, however many snapshots share it). So the largest
    ///   count is `used blocks + (meta_slot_size - catalog length) / 28`;
    /// - RAM plus the grown block area would be more than this host's memory and swap,
    ///   a pool `open` would refuse.
    ///
    /// Each message says the largest block count possible ([`Pool::max_block_count`]).
    ///
    /// If the file cannot be extended (ENOSPC on a full tmpfs, a file size limit), the
    /// error is [`PoolError::Extend`] and the pool is unchanged, file length included.
    /// An error after the extension (mapping, or the commit's persist) leaves the pool
    /// at its old block count, with the file possibly longer, as after a crash there.
    ///
    /// The pre-fault thread ([`Pool::start_prefault`]), if running, is stopped for the
    /// remap and started again afterwards. Takes `&mut self`: in the VMM, call it under
    /// the pool's lock like any store operation; it holds the lock for the time the
    /// filesystem takes to allocate the new space.
    pub fn grow_blocks(&mut self, new_block_count: u64) -> Result<GrowReport> {
        let old = self.geo;
        if new_block_count <= old.block_count {
            return Err(invalid(format!(
                "the block area has {} blocks; growing it needs a larger count than {}",
                old.block_count, new_block_count
            )));
        }
        let gen = self.next_generation()?;
        // The whole catalog (a checkpoint) of the state now, the log's redirects
        // included, under the next generation: its length is the base of the metadata
        // limit. (The growth's commit itself appends a delta when the slot has room.)
        let catalog = self.encode_catalog(gen, None, None, self.next_id);
        let limits = self.limits(catalog.len() as u64);
        let largest = if limits.max() > old.block_count {
            format!("the largest block count possible now is {}", limits.max())
        } else {
            format!(
                "this pool cannot grow now: the limit is {} blocks and it has {}",
                limits.max(),
                old.block_count
            )
        };
        if new_block_count > u64::from(u32::MAX) {
            return Err(invalid(format!(
                "{new_block_count} blocks: block numbers are 32 bits, a pool has at most {} \
                 blocks; {largest}",
                u32::MAX
            )));
        }
        if new_block_count > limits.metadata {
            let free_after = new_block_count - (old.block_count - self.index.free_count());
            let needed = (catalog.len() as u64)
                .saturating_add(free_after.saturating_mul(CATALOG_BYTES_PER_BLOCK));
            return Err(invalid(format!(
                "{new_block_count} blocks would not fit the metadata slot: once they are all \
                 in use the catalog needs up to {needed} bytes ({} now plus \
                 {CATALOG_BYTES_PER_BLOCK} per free block, its block-table entry and one \
                 redirect), and a slot holds {}; {largest}",
                catalog.len(),
                old.meta_slot_size
            )));
        }
        let geo = old
            .with_block_count(new_block_count)
            .map_err(|e| invalid(format!("{e}; {largest}")))?;
        geo.check_limits(superblock::host_memory_bytes())
            .map_err(|e| invalid(format!("{e}; {largest}")))?;
        let prefaulting = self.stop_prefault();
        let res = self.extend_and_commit(geo);
        if prefaulting {
            self.start_prefault();
        }
        res?;
        log::info!(
            "pool {}: block area grown from {} to {} blocks (file {} -> {} bytes)",
            self.path.display(),
            old.block_count,
            geo.block_count,
            old.file_size,
            geo.file_size
        );
        Ok(GrowReport {
            old_block_count: old.block_count,
            new_block_count: geo.block_count,
            old_file_size: old.file_size,
            new_file_size: geo.file_size,
            generation: self.sb.generation,
        })
    }

    /// Steps 1 to 4 of the module docs, the pre-fault thread stopped.
    fn extend_and_commit(&mut self, geo: Geometry) -> Result<()> {
        if geo.file_size > self.geo.file_size {
            self.extend_file(geo.file_size)?;
        }
        // `validate` (in `with_block_count`) checked that the size fits a usize.
        let len = geo.file_size as usize;
        if self.map.len() < len {
            let map = Arc::get_mut(&mut self.map).ok_or_else(|| PoolError::Io {
                what: "remapping",
                path: self.path.clone(),
                source: std::io::Error::other("the store's mapping is still shared"),
            })?;
            map.grow(&self.file, len)
                .map_err(io_err("remapping", &self.path))?;
        }
        self.commit_geo(None, None, self.next_id, geo, false)?;
        self.index.grow_blocks(geo.block_count);
        Ok(())
    }

    /// Extend the file to `size` bytes, allocate the new part and make the new length
    /// durable (before a superblock that needs it can be). On failure the file gets its
    /// old length back, and the error is [`PoolError::Extend`].
    fn extend_file(&self, size: u64) -> Result<()> {
        let before = self
            .file
            .metadata()
            .map_err(io_err("stat", &self.path))?
            .len();
        let from = self.geo.file_size;
        let res = (|| {
            if before < size {
                self.file.set_len(size)?;
            }
            allocate(&self.file, from, size - from)?;
            // No-op on tmpfs and hugetlbfs; elsewhere the length is metadata that msync
            // of the superblock does not promise to write.
            self.file.sync_data()
        })();
        if let Err(source) = res {
            if before < size {
                if let Err(e) = self.file.set_len(before) {
                    // A longer file is still a valid pool (open ignores the excess).
                    log::warn!(
                        "pool {}: could not shorten the file back to {before} bytes: {e}",
                        self.path.display()
                    );
                }
            }
            return Err(PoolError::Extend {
                path: self.path.clone(),
                size,
                source,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, pattern, small_pool, tmpdir, vm};
    use crate::{PageRun, PoolOptions};

    fn prefault_thread(pool: &Pool) -> Option<std::thread::ThreadId> {
        pool.prefault.as_ref().map(|(_, t)| t.thread().id())
    }

    /// The pre-fault thread holds the mapping: growing stops it (or the remap could not
    /// take the mapping for itself), remaps, and starts a new one over the new geometry;
    /// a pool that had none gets none.
    #[test]
    fn grow_restarts_the_prefault_thread_only_if_it_ran() {
        let d = tmpdir();
        let opts = PoolOptions {
            block_count: Some(8),
            ..Default::default()
        };
        let (path, mut pool) = small_pool(&d, 16, opts);
        let before = prefault_thread(&pool);
        assert!(before.is_some(), "create starts it");
        pool.grow_blocks(600).expect("grow");
        let after = prefault_thread(&pool);
        assert!(after.is_some() && after != before, "a new thread");
        assert_eq!(pool.map.len() as u64, pool.geo.file_size);
        drop(pool);
        let mut pool = Pool::open(&path).expect("open");
        assert!(prefault_thread(&pool).is_none());
        pool.grow_blocks(601).expect("grow again");
        assert!(prefault_thread(&pool).is_none(), "none started");
        assert_eq!(pool.geo.block_count, 601);
    }

    /// The in-memory state after growing is what opening the grown pool rebuilds.
    #[test]
    fn grown_state_equals_the_reopened_state() {
        let d = tmpdir();
        let opts = PoolOptions {
            block_count: Some(4),
            ..Default::default()
        };
        let (path, mut pool) = small_pool(&d, 16, opts);
        fill(&mut pool, 0..16, 1);
        vm(&mut pool, "a", &[PageRun::new(0, 16)]);
        fill(&mut pool, 0..4, 100);
        assert!(matches!(
            pool.preserve(4),
            Err(PoolError::BlockAreaFull { .. })
        ));
        pool.grow_blocks(10).expect("grow");
        assert_eq!(pool.log_tail, 0, "the growth's commit compacted the log");
        fill(&mut pool, 4..8, 100);
        let stats = pool.stats();
        assert_eq!((stats.blocks_total, stats.blocks_free), (10, 2));
        drop(pool);
        let pool = Pool::open(&path).expect("reopen");
        assert_eq!(pool.stats(), stats);
        for p in 0..16 {
            assert_eq!(
                pool.read_snapshot_page("a", p).expect("a").1,
                pattern(1 + p)
            );
        }
    }
}
