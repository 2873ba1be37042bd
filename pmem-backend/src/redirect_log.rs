//! The redirect log: one 32-byte record per `preserve`, appended and persisted before
//! the page may be written. Records belong to the catalog generation they were written
//! under; a commit compacts them into the new catalog, which makes them stale at once
//! (their generation no longer matches), so the log never needs clearing.
//!
//! Record layout (little-endian):
//! `seq u32 | block u32 | generation u64 | page u64 | block_crc u32 | crc u32`,
//! where `crc` is crc32c of the first 28 bytes.

use crate::superblock::LOG_RECORD_SIZE;

/// One redirect: guest page `page` was copied to block `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    /// Position in the log (0-based, contiguous within a generation).
    pub seq: u32,
    /// Block holding the preserved copy.
    pub block: u32,
    /// Catalog generation the record applies to.
    pub generation: u64,
    /// Guest page that was preserved.
    pub page: u64,
    /// crc32c of the block's 4 KiB.
    pub block_crc: u32,
}

impl LogRecord {
    /// Encode with the record checksum.
    pub fn encode(&self) -> [u8; LOG_RECORD_SIZE as usize] {
        let mut b = [0u8; LOG_RECORD_SIZE as usize];
        b[0..4].copy_from_slice(&self.seq.to_le_bytes());
        b[4..8].copy_from_slice(&self.block.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.page.to_le_bytes());
        b[24..28].copy_from_slice(&self.block_crc.to_le_bytes());
        let crc = crate::checksum::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode, or None if the checksum fails (never written, torn, or corrupt).
    pub fn decode(b: &[u8; LOG_RECORD_SIZE as usize]) -> Option<Self> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if crate::checksum::crc32c(&b[..28]) != u32_at(28) {
            return None;
        }
        Some(LogRecord {
            seq: u32_at(0),
            block: u32_at(4),
            generation: u64_at(8),
            page: u64_at(16),
            block_crc: u32_at(24),
        })
    }

    /// Whether this record is the `seq`-th of generation `generation`.
    pub fn is_next(&self, generation: u64, seq: u32) -> bool {
        self.generation == generation && self.seq == seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_torn_records() {
        let r = LogRecord {
            seq: 3,
            block: 9,
            generation: 77,
            page: 1 << 40,
            block_crc: 0xfeed,
        };
        let b = r.encode();
        assert_eq!(LogRecord::decode(&b), Some(r));
        assert!(r.is_next(77, 3) && !r.is_next(76, 3) && !r.is_next(77, 4));
        for i in 0..32 {
            let mut t = b;
            t[i] ^= 1;
            assert_eq!(LogRecord::decode(&t), None, "flip at {i}");
        }
        let mut half = [0u8; 32];
        half[..16].copy_from_slice(&b[..16]);
        assert_eq!(LogRecord::decode(&half), None);
        assert_eq!(LogRecord::decode(&[0u8; 32]), None);
    }
}
