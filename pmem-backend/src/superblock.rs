//! The superblock (two copies) and the pool geometry it describes.
//!
//! Each copy is a 4 KiB sector; the crc32c in its last 4 bytes covers bytes 0..4092, so
//! the checksum position does not depend on the format version. Generation g is written
//! to copy g % 2; open picks the valid copy with the highest generation.

use crate::codec::{DecodeError, Reader, Writer};
use crate::error::{PoolError, Result};
use crate::PAGE_SIZE;

/// Magic at byte 0 of each superblock copy.
pub const SB_MAGIC: [u8; 8] = *b"PMSNAPPL";
/// Newest format version this build reads and the one it writes. Version 2 (issue 16):
/// the catalog in force is a checkpoint followed by delta records (catalog version 3),
/// and `catalog_len` covers both. A version 1 pool (one whole catalog per commit) is
/// read as it is, and its next commit writes a version 3 checkpoint and a version 2
/// superblock; from then on a pmsnap that knows only version 1 refuses the pool
/// (`NewerVersion`) instead of misreading it.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest format version this build reads.
pub const FORMAT_VERSION_MIN: u32 = 1;
/// Bytes per superblock copy.
pub const SB_SIZE: u64 = 4096;
/// Bytes of header fields in use (the rest of the sector is zero).
pub const SB_HEADER_LEN: u32 = 128;
/// Offset of the crc32c in a copy.
pub const SB_CRC_OFFSET: usize = 4092;
/// Alignment of the RAM area (so hugetlbfs can back it).
pub const RAM_ALIGN: u64 = 2 << 20;
/// Bytes per redirect-log record.
pub const LOG_RECORD_SIZE: u64 = 32;

/// Where everything is in the pool file; fixed at creation, except that the block area
/// (the last area) can grow: `Pool::grow_blocks` raises `block_count` and `file_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// File size.
    pub file_size: u64,
    /// Offset of the redirect log.
    pub log_offset: u64,
    /// Bytes of redirect log.
    pub log_size: u64,
    /// Offset of metadata slot 0 (slot 1 follows it).
    pub meta_offset: u64,
    /// Bytes per metadata slot.
    pub meta_slot_size: u64,
    /// Offset of guest RAM (2 MiB aligned).
    pub ram_offset: u64,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// Offset of the block area (2 MiB aligned).
    pub block_offset: u64,
    /// 4 KiB blocks in the block area.
    pub block_count: u64,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

impl Geometry {
    /// Lay out a new pool. Sizes are rounded up to 4 KiB.
    pub fn plan(
        ram_size: u64,
        block_count: u64,
        log_records: u64,
        meta_slot_size: u64,
    ) -> Result<Self> {
        let page = PAGE_SIZE as u64;
        let bad = |m: &str| PoolError::InvalidArgument(m.to_string());
        if ram_size == 0 || ram_size % page != 0 {
            return Err(bad("RAM size must be a non-zero multiple of 4 KiB"));
        }
        if ram_size / page > u32::MAX as u64 || block_count > u32::MAX as u64 {
            return Err(bad(
                "RAM size or block count too large (at most 2^32-1 pages)",
            ));
        }
        if log_records == 0 || log_records > u32::MAX as u64 {
            return Err(bad("redirect log needs between 1 and 2^32-1 records"));
        }
        let ovf = || bad("pool size overflows");
        let log_offset = 2 * SB_SIZE;
        let log_size = align_up(log_records * LOG_RECORD_SIZE, page).ok_or_else(ovf)?;
        let meta_offset = log_offset + log_size;
        let meta_slot_size = align_up(meta_slot_size.max(page), page).ok_or_else(ovf)?;
        let meta_end = meta_slot_size
            .checked_mul(2)
            .and_then(|m| m.checked_add(meta_offset))
            .ok_or_else(ovf)?;
        let ram_offset = align_up(meta_end, RAM_ALIGN).ok_or_else(ovf)?;
        let block_offset = align_up(ram_offset.checked_add(ram_size).ok_or_else(ovf)?, RAM_ALIGN)
            .ok_or_else(ovf)?;
        let blocks_end = block_count
            .checked_mul(page)
            .and_then(|b| b.checked_add(block_offset))
            .ok_or_else(ovf)?;
        let file_size = align_up(blocks_end, RAM_ALIGN).ok_or_else(ovf)?;
        let g = Geometry {
            file_size,
            log_offset,
            log_size,
            meta_offset,
            meta_slot_size,
            ram_offset,
            ram_size,
            block_offset,
            block_count,
        };
        g.validate().map_err(|e| bad(&e))?;
        Ok(g)
    }

    /// Check that the areas are aligned, ordered, non-overlapping and inside the file.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let page = PAGE_SIZE as u64;
        let aligned = [
            self.log_offset,
            self.log_size,
            self.meta_offset,
            self.meta_slot_size,
            self.ram_size,
            self.block_offset,
        ];
        if aligned.iter().any(|v| v % page != 0) {
            return Err("superblock layout: an area is not 4 KiB aligned".into());
        }
        if self.ram_offset % RAM_ALIGN != 0 {
            return Err("superblock layout: RAM area is not 2 MiB aligned".into());
        }
        if self.ram_size == 0
            || self.ram_size / page > u32::MAX as u64
            || self.block_count > u32::MAX as u64
        {
            return Err("superblock layout: RAM or block area size out of range".into());
        }
        if self.log_size < LOG_RECORD_SIZE
            || self.log_size / LOG_RECORD_SIZE > u32::MAX as u64
            || self.meta_slot_size == 0
        {
            return Err("superblock layout: empty log or metadata slot".into());
        }
        let ends = (|| {
            let log_end = self.log_offset.checked_add(self.log_size)?;
            let meta_end = self
                .meta_slot_size
                .checked_mul(2)?
                .checked_add(self.meta_offset)?;
            let ram_end = self.ram_offset.checked_add(self.ram_size)?;
            let block_end = self
                .block_count
                .checked_mul(page)?
                .checked_add(self.block_offset)?;
            Some((log_end, meta_end, ram_end, block_end))
        })();
        let Some((log_end, meta_end, ram_end, block_end)) = ends else {
            return Err("superblock layout: area end overflows".into());
        };
        let ordered = 2 * SB_SIZE <= self.log_offset
            && log_end <= self.meta_offset
            && meta_end <= self.ram_offset
            && ram_end <= self.block_offset
            && block_end <= self.file_size;
        if !ordered {
            return Err("superblock layout: areas overlap or lie beyond the file".into());
        }
        if usize::try_from(self.file_size).is_err() {
            return Err("superblock layout: file too large for this address space".into());
        }
        Ok(())
    }

    /// Check that a pool of this geometry is one this host could have made, before any
    /// memory is allocated for it. `validate` only checks that the areas are consistent;
    /// a crafted (sparse) file can still claim terabytes of RAM and blocks, and opening
    /// it would allocate bookkeeping (about 9 bytes per page) and read a catalog as large
    /// as its metadata slot. Two bounds make that cost small and known:
    /// - RAM plus block area at most `host_bytes` (the pool lives on tmpfs or hugetlbfs,
    ///   so it cannot be larger than the host's memory and swap);
    /// - a metadata slot at most [`max_meta_slot_size`] for that many pages (the catalog
    ///   of a full pool needs about 16 bytes per page; `create` reserves that plus 1 MiB).
    pub fn check_limits(&self, host_bytes: u64) -> std::result::Result<(), String> {
        let page = PAGE_SIZE as u64;
        let pool_bytes = self
            .block_count
            .checked_mul(page)
            .and_then(|b| b.checked_add(self.ram_size))
            .ok_or("superblock layout: RAM plus block area overflows")?;
        if pool_bytes > host_bytes {
            return Err(format!(
                "RAM ({} MiB) plus block area ({} MiB) is larger than this host's memory \
                 and swap ({} MiB): not a pool this host could hold",
                self.ram_size >> 20,
                (self.block_count * page) >> 20,
                host_bytes >> 20
            ));
        }
        let max_meta = max_meta_slot_size(self.ram_pages() + self.block_count);
        if self.meta_slot_size > max_meta {
            return Err(format!(
                "metadata slot of {} bytes is larger than a pool of this size can need \
                 ({max_meta} bytes at most)",
                self.meta_slot_size
            ));
        }
        Ok(())
    }

    /// The same layout with `block_count` blocks. The block area is the last area of the
    /// file, so only it and the file size change (rounded up to 2 MiB, as at creation);
    /// RAM, its offset, the log and the metadata slots stay where they are. Errors say
    /// why the result would not be a valid layout (more than 2^32-1 blocks, overflow).
    pub fn with_block_count(&self, block_count: u64) -> std::result::Result<Geometry, String> {
        if block_count > u64::from(u32::MAX) {
            return Err(format!(
                "{block_count} blocks: block numbers are 32 bits, at most {} blocks",
                u32::MAX
            ));
        }
        let file_size = block_count
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| b.checked_add(self.block_offset))
            .and_then(|end| align_up(end, RAM_ALIGN))
            .ok_or_else(|| format!("{block_count} blocks: pool size overflows"))?;
        let g = Geometry {
            block_count,
            file_size,
            ..*self
        };
        g.validate()?;
        Ok(g)
    }

    /// Pages in the RAM area.
    pub fn ram_pages(&self) -> u64 {
        self.ram_size / PAGE_SIZE as u64
    }
    /// Records the redirect log holds.
    pub fn log_capacity(&self) -> u64 {
        self.log_size / LOG_RECORD_SIZE
    }
    /// File offset of RAM page p.
    pub fn ram_page_offset(&self, p: u64) -> u64 {
        self.ram_offset + p * PAGE_SIZE as u64
    }
    /// File offset of block b.
    pub fn block_offset_of(&self, b: u64) -> u64 {
        self.block_offset + b * PAGE_SIZE as u64
    }
    /// File offset of metadata slot s (0 or 1).
    pub fn meta_slot_offset(&self, slot: u32) -> u64 {
        self.meta_offset + u64::from(slot) * self.meta_slot_size
    }
}

/// The largest metadata slot a pool of `pages` pages (RAM plus blocks) may have: 64 bytes
/// per page plus 64 MiB, four times what its catalog can fill (`create` sizes slots at
/// 16 bytes per page plus 1 MiB unless told otherwise).
pub fn max_meta_slot_size(pages: u64) -> u64 {
    pages.saturating_mul(64).saturating_add(64 << 20)
}

/// Bytes of memory and swap on this host: the most a pool on tmpfs or hugetlbfs can
/// hold. Falls back to `u64::MAX` (no bound) only when the kernel does not say.
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let phys = match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        _ => return u64::MAX,
    };
    let swap = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("SwapTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    phys.saturating_add(swap.saturating_mul(1024))
}

/// One superblock copy's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Commit sequence number; higher wins.
    pub generation: u64,
    /// The layout.
    pub geometry: Geometry,
    /// Metadata slot holding this generation's catalog.
    pub catalog_slot: u32,
    /// Bytes of that catalog in force: its checkpoint and the delta records after it
    /// (anything written beyond, such as a torn append, is not part of it).
    pub catalog_len: u64,
    /// Pool creation time (ns since the Unix epoch).
    pub created_unix_ns: u64,
}

impl Superblock {
    /// Encode into a full 4 KiB sector with its crc.
    pub fn encode(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut w = Writer::with_capacity(SB_SIZE as usize);
        w.bytes(&SB_MAGIC);
        w.u32(FORMAT_VERSION);
        w.u32(SB_HEADER_LEN);
        w.u64(self.generation);
        w.u64(g.file_size);
        w.u32(PAGE_SIZE as u32);
        w.u32(0); // flags
        for v in [
            g.ram_offset,
            g.ram_size,
            g.block_offset,
            g.block_count,
            g.log_offset,
            g.log_size,
            g.meta_offset,
            g.meta_slot_size,
        ] {
            w.u64(v);
        }
        w.u32(self.catalog_slot);
        w.u32(0); // reserved
        w.u64(self.catalog_len);
        w.u64(self.created_unix_ns);
        debug_assert_eq!(w.buf.len(), SB_HEADER_LEN as usize);
        w.buf.resize(SB_CRC_OFFSET, 0);
        let crc = crate::checksum::crc32c(&w.buf);
        w.u32(crc);
        w.buf
    }
}

/// Result of looking at one superblock sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SbCopy {
    /// No magic: never written, or not a pool.
    NoMagic,
    /// Magic present, crc wrong (torn or corrupt).
    BadCrc,
    /// Valid crc but a newer format.
    Newer(u32),
    /// Valid crc, our version, but fields make no sense.
    Invalid(String),
    /// A good copy.
    Good(Superblock),
}

/// Decode one 4 KiB sector.
pub fn decode(sector: &[u8]) -> SbCopy {
    if sector.len() < SB_SIZE as usize || sector[..8] != SB_MAGIC {
        return SbCopy::NoMagic;
    }
    let stored = u32::from_le_bytes([sector[4092], sector[4093], sector[4094], sector[4095]]);
    if crate::checksum::crc32c(&sector[..SB_CRC_OFFSET]) != stored {
        return SbCopy::BadCrc;
    }
    match decode_fields(sector) {
        Ok(Ok(sb)) => SbCopy::Good(sb),
        Ok(Err(v)) => SbCopy::Newer(v),
        Err(e) => SbCopy::Invalid(e.to_string()),
    }
}

fn decode_fields(
    sector: &[u8],
) -> std::result::Result<std::result::Result<Superblock, u32>, DecodeError> {
    let mut r = Reader::new(sector, "superblock");
    r.take(8)?;
    let version = r.u32()?;
    if version > FORMAT_VERSION {
        return Ok(Err(version));
    }
    if version < FORMAT_VERSION_MIN {
        return Err(DecodeError::Invalid(format!(
            "superblock: format version {version}"
        )));
    }
    let _header_len = r.u32()?;
    let generation = r.u64()?;
    let file_size = r.u64()?;
    let page_size = r.u32()?;
    let _flags = r.u32()?;
    if page_size != PAGE_SIZE as u32 {
        return Err(DecodeError::Invalid(format!(
            "superblock: page size {page_size}, expected 4096"
        )));
    }
    let mut v = [0u64; 8];
    for x in &mut v {
        *x = r.u64()?;
    }
    let [ram_offset, ram_size, block_offset, block_count, log_offset, log_size, meta_offset, meta_slot_size] =
        v;
    let catalog_slot = r.u32()?;
    let _ = r.u32()?;
    let catalog_len = r.u64()?;
    let created_unix_ns = r.u64()?;
    let geometry = Geometry {
        file_size,
        log_offset,
        log_size,
        meta_offset,
        meta_slot_size,
        ram_offset,
        ram_size,
        block_offset,
        block_count,
    };
    geometry.validate().map_err(DecodeError::Invalid)?;
    if catalog_slot > 1 || catalog_len > meta_slot_size {
        return Err(DecodeError::Invalid(
            "superblock: catalog slot or length out of range".into(),
        ));
    }
    Ok(Ok(Superblock {
        generation,
        geometry,
        catalog_slot,
        catalog_len,
        created_unix_ns,
    }))
}

/// Pick the current superblock from the two copies, or say why there is none.
pub fn select(a: &SbCopy, b: &SbCopy) -> Result<Superblock> {
    let good: Vec<&Superblock> = [a, b]
        .into_iter()
        .filter_map(|c| match c {
            SbCopy::Good(sb) => Some(sb),
            _ => None,
        })
        .collect();
    // A copy in a newer format means a newer pmsnap has committed to this pool: refuse
    // rather than silently go back to an older generation.
    for c in [a, b] {
        if let SbCopy::Newer(v) = c {
            return Err(PoolError::NewerVersion {
                found: *v,
                supported: FORMAT_VERSION,
            });
        }
    }
    if let Some(best) = good.into_iter().max_by_key(|s| s.generation) {
        return Ok(*best);
    }
    match (a, b) {
        (SbCopy::NoMagic, SbCopy::NoMagic) => Err(PoolError::NotAPool),
        (SbCopy::Invalid(e), _) | (_, SbCopy::Invalid(e)) => Err(PoolError::Corrupt(e.clone())),
        _ => Err(PoolError::Corrupt(
            "no superblock copy passes its checksum".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(gen: u64) -> Superblock {
        Superblock {
            generation: gen,
            geometry: Geometry::plan(4 << 20, 1024, 128, 65536).expect("plan"),
            catalog_slot: (gen % 2) as u32,
            catalog_len: 64,
            created_unix_ns: 42,
        }
    }

    #[test]
    fn plan_aligns_and_orders() {
        let g = Geometry::plan(4 << 20, 1000, 100, 5000).expect("plan");
        assert_eq!(g.ram_offset % RAM_ALIGN, 0);
        assert_eq!(g.block_offset % RAM_ALIGN, 0);
        assert_eq!(g.meta_slot_size, 8192);
        assert_eq!(g.log_size, 4096);
        assert!(g.file_size >= g.block_offset + 1000 * 4096);
        assert_eq!(g.file_size % RAM_ALIGN, 0);
        assert!(Geometry::plan(4097, 1, 1, 1).is_err());
        assert!(Geometry::plan(0, 1, 1, 1).is_err());
        assert!(Geometry::plan(4096, 1, 0, 1).is_err());
    }

    #[test]
    fn limits_bound_pool_size_and_metadata_slot() {
        let g = Geometry::plan(1 << 30, 1 << 18, 1024, 1 << 20).expect("plan");
        // 1 GiB RAM + 1 GiB blocks: fits a 4 GiB host, not a 1 GiB one.
        assert_eq!(g.check_limits(4 << 30), Ok(()));
        let e = g.check_limits(1 << 30).expect_err("larger than the host");
        assert!(
            e.contains("1024 MiB") && e.contains("larger than this host"),
            "{e}"
        );
        // A slot far larger than the catalog of 2^19 pages can fill.
        let mut big_meta = g;
        big_meta.meta_slot_size = max_meta_slot_size(g.ram_pages() + g.block_count) + 4096;
        let e = big_meta.check_limits(u64::MAX).expect_err("slot too large");
        assert!(e.contains("metadata slot"), "{e}");
        // The largest geometry validate accepts (2^32-1 pages each) overflows nothing.
        let mut huge = g;
        huge.ram_size = (u64::from(u32::MAX)) * 4096;
        huge.block_count = u64::from(u32::MAX);
        assert!(huge.check_limits(1 << 40).is_err());
        assert!(
            host_memory_bytes() >= 64 << 20,
            "host memory reads as too small"
        );
    }

    #[test]
    fn with_block_count_moves_only_the_end() {
        let g = Geometry::plan(4 << 20, 1000, 100, 5000).expect("plan");
        let h = g.with_block_count(3000).expect("more blocks");
        assert_eq!(h.block_count, 3000);
        assert_eq!(h.file_size % RAM_ALIGN, 0);
        assert!(h.file_size >= h.block_offset + 3000 * 4096 && h.file_size > g.file_size);
        assert_eq!(
            Geometry {
                block_count: g.block_count,
                file_size: g.file_size,
                ..h
            },
            g,
            "nothing else moved"
        );
        assert_eq!(
            g.with_block_count(1001).expect("same 2 MiB").file_size,
            g.file_size,
            "a count that fits the padding keeps the file size"
        );
        let e = g
            .with_block_count(u64::from(u32::MAX) + 1)
            .expect_err("33-bit block numbers");
        assert!(e.contains("at most 4294967295 blocks"), "{e}");
        g.with_block_count(u64::from(u32::MAX))
            .expect("the format's largest count is a valid layout");
    }

    #[test]
    fn encode_decode_roundtrip() {
        let s = sb(7);
        let bytes = s.encode();
        assert_eq!(bytes.len(), SB_SIZE as usize);
        assert_eq!(decode(&bytes), SbCopy::Good(s));
    }

    #[test]
    fn classification_of_copies() {
        let mut bytes = sb(3).encode();
        bytes[20] ^= 1;
        assert_eq!(decode(&bytes), SbCopy::BadCrc);
        assert_eq!(decode(&[0u8; 4096]), SbCopy::NoMagic);
        let mut newer = sb(3).encode();
        newer[8] = 9;
        let crc = crate::checksum::crc32c(&newer[..SB_CRC_OFFSET]);
        newer[SB_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&newer), SbCopy::Newer(9));
        let mut bad_layout = sb(3).encode();
        bad_layout[40] = 1; // ram_offset no longer aligned
        let crc = crate::checksum::crc32c(&bad_layout[..SB_CRC_OFFSET]);
        bad_layout[SB_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bad_layout), SbCopy::Invalid(_)));
    }

    #[test]
    fn select_prefers_highest_good_generation() {
        let a = SbCopy::Good(sb(4));
        let b = SbCopy::Good(sb(5));
        assert_eq!(select(&a, &b).expect("select").generation, 5);
        assert_eq!(select(&SbCopy::BadCrc, &a).expect("select").generation, 4);
        assert!(matches!(
            select(&SbCopy::NoMagic, &SbCopy::NoMagic),
            Err(PoolError::NotAPool)
        ));
        assert!(matches!(
            select(&SbCopy::BadCrc, &SbCopy::NoMagic),
            Err(PoolError::Corrupt(_))
        ));
        assert!(matches!(
            select(&SbCopy::Newer(3), &SbCopy::NoMagic),
            Err(PoolError::NewerVersion {
                found: 3,
                supported: 2
            })
        ));
    }
}
