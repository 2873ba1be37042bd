//! The protected-page bitmap: one bit per RAM page, set while any snapshot references
//! RAM(p). Private to the store: callers ask [`crate::Pool::is_protected`], under the
//! store's lock like every other call.

/// Bitmap of write-protected RAM pages.
#[derive(Debug)]
pub(crate) struct ProtectionBitmap {
    words: Box<[u64]>,
    pages: u64,
}

impl ProtectionBitmap {
    /// All-clear bitmap for `pages` pages.
    pub(crate) fn new(pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        ProtectionBitmap {
            words: vec![0; n].into_boxed_slice(),
            pages,
        }
    }
    /// Pages covered.
    #[cfg(test)]
    fn pages(&self) -> u64 {
        self.pages
    }
    /// Whether page p is protected (false for pages beyond the RAM area).
    #[inline]
    pub(crate) fn get(&self, p: u64) -> bool {
        if p >= self.pages {
            return false;
        }
        self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }
    /// Set or clear page p (p must be in range; the store validates first).
    #[inline]
    pub(crate) fn set(&mut self, p: u64, on: bool) {
        if p >= self.pages {
            return;
        }
        let w = &mut self.words[(p / 64) as usize];
        let bit = 1u64 << (p % 64);
        if on {
            *w |= bit;
        } else {
            *w &= !bit;
        }
    }

    /// Set or clear pages `first..first+count` a word at a time (snapshot and delete of
    /// large runs cover up to all of RAM).
    pub(crate) fn set_range(&mut self, first: u64, count: u64, on: bool) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let w = &mut self.words[(p / 64) as usize];
            if on {
                *w |= mask;
            } else {
                *w &= !mask;
            }
            p += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_clear() {
        let mut b = ProtectionBitmap::new(130);
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

    #[test]
    fn set_range_matches_per_page() {
        for (first, count) in [
            (0, 130),
            (3, 61),
            (60, 10),
            (64, 64),
            (1, 1),
            (129, 5),
            (5, 0),
        ] {
            let mut a = ProtectionBitmap::new(130);
            let mut b = ProtectionBitmap::new(130);
            a.set_range(first, count, true);
            for p in first..(first + count).min(130) {
                b.set(p, true);
            }
            for p in 0..130 {
                assert_eq!(a.get(p), b.get(p), "set {first}+{count} page {p}");
            }
            a.set_range(first + 1, count / 2, false);
            for p in first + 1..(first + 1 + count / 2).min(130) {
                b.set(p, false);
            }
            for p in 0..130 {
                assert_eq!(a.get(p), b.get(p), "clear {first}+{count} page {p}");
            }
        }
    }
}
