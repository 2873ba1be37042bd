//! The protected-page bitmap: one bit per RAM page, set while any snapshot references
//! RAM(p). Atomic, so the fault path can ask without taking the store's lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free bitmap of write-protected RAM pages. Only the store sets and clears bits
/// (under its own `&mut self`); anyone holding an `Arc` of it may read.
#[derive(Debug)]
pub struct ProtectionBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl ProtectionBitmap {
    /// All-clear bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        ProtectionBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }
    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Whether page p is protected (false for pages beyond the RAM area).
    #[inline]
    pub fn get(&self, p: u64) -> bool {
        if p >= self.pages {
            return false;
        }
        self.words[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }
    /// Set or clear page p (p must be in range; the store validates first).
    #[inline]
    pub(crate) fn set(&self, p: u64, on: bool) {
        if p >= self.pages {
            return;
        }
        let w = &self.words[(p / 64) as usize];
        let bit = 1u64 << (p % 64);
        if on {
            w.fetch_or(bit, Ordering::AcqRel);
        } else {
            w.fetch_and(!bit, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear() {
        let b = ProtectionBitmap::new(130);
        assert!(!b.get(129));
        b.set(129, true);
        b.set(0, true);
        assert!(b.get(129) && b.get(0) && !b.get(1));
        b.set(129, false);
        assert!(!b.get(129));
        b.set(500, true);
        assert!(!b.get(500));
        assert_eq!(b.pages(), 130);
    }
}
