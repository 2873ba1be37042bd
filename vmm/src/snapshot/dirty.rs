//! Dirty tracking: which guest pages were written since a given snapshot.
//!
//! Each harvest takes the bitmaps of every source (KVM's dirty log and the VMM's own
//! writes, see [`crate::vstate::dirty`]) and ORs the result into the bitmap of every live
//! snapshot, so "dirty since S" is exact for as long as S is tracked in this VMM process.

use std::collections::HashMap;

use crate::vstate::dirty::{bitmap_runs, bitmap_words, DirtyError, DirtySource, PageBitmap};

/// Pages written since each live snapshot.
pub struct DirtyTracker {
    sources: Vec<Box<dyn DirtySource>>,
    pages: u64,
    since: HashMap<String, PageBitmap>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("pages", &self.pages)
            .field("tracked", &self.since.len())
            .finish()
    }
}

impl DirtyTracker {
    /// A tracker over `pages` guest pages fed by `sources`.
    pub fn new(pages: u64, sources: Vec<Box<dyn DirtySource>>) -> Self {
        Self {
            sources,
            pages,
            since: HashMap::new(),
        }
    }

    /// Fold everything written since the last harvest into every tracked snapshot.
    pub fn harvest(&mut self) -> Result<(), DirtyError> {
        for src in &mut self.sources {
            let bits = src.harvest()?;
            for map in self.since.values_mut() {
                for (dst, src) in map.iter_mut().zip(&bits) {
                    *dst |= src;
                }
            }
        }
        Ok(())
    }

    /// Start tracking writes from now on for snapshot `name` (call with vCPUs paused, or
    /// right after the snapshot's pages were protected).
    pub fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        self.since
            .insert(name.to_string(), vec![0; bitmap_words(self.pages)]);
        Ok(())
    }

    /// Start tracking `name` with everything marked written (a snapshot made by an
    /// earlier VMM process: what happened in between is unknown here).
    pub fn start_unknown(&mut self, name: &str) {
        let mut all = vec![u64::MAX; bitmap_words(self.pages)];
        if self.pages % 64 != 0 {
            if let Some(last) = all.last_mut() {
                *last = (1u64 << (self.pages % 64)) - 1;
            }
        }
        self.since.insert(name.to_string(), all);
    }

    /// Record pages the VMM wrote outside both sources (through the store's mapping) as
    /// written, for every tracked snapshot.
    pub fn mark(&mut self, runs: &[(u64, u64)]) {
        for map in self.since.values_mut() {
            for &(first, count) in runs {
                for p in first..(first + count).min(self.pages) {
                    map[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
    }

    /// Stop tracking `name`.
    pub fn forget(&mut self, name: &str) {
        self.since.remove(name);
    }

    /// Pages written since `name` was taken, as runs.
    pub fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest()?;
        self.since
            .get(name)
            .map(|b| bitmap_runs(b))
            .ok_or_else(|| DirtyError::Untracked(name.to_string()))
    }

    /// Reset `name`'s bitmap to "nothing written" (after a rollback to it).
    pub fn reset(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        match self.since.get_mut(name) {
            Some(b) => {
                b.fill(0);
                Ok(())
            }
            None => Err(DirtyError::Untracked(name.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Fake(Arc<Mutex<PageBitmap>>);
    impl DirtySource for Fake {
        fn harvest(&mut self) -> Result<PageBitmap, DirtyError> {
            let mut b = self.0.lock().expect("lock");
            let out = b.clone();
            b.fill(0);
            Ok(out)
        }
    }

    fn write(b: &Arc<Mutex<PageBitmap>>, page: u64) {
        b.lock().expect("lock")[(page / 64) as usize] |= 1 << (page % 64);
    }

    #[test]
    fn runs_from_bitmap() {
        assert_eq!(bitmap_runs(&[0, 0]), vec![]);
        assert_eq!(bitmap_runs(&[0b1110_0001]), vec![(0, 1), (5, 3)]);
        assert_eq!(bitmap_runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert_eq!(bitmap_runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
        assert_eq!(bitmap_words(0), 0);
        assert_eq!(bitmap_words(65), 2);
    }

    #[test]
    fn tracks_each_snapshot_from_its_own_start() {
        let kvm = Arc::new(Mutex::new(vec![0u64; 2]));
        let vmm = Arc::new(Mutex::new(vec![0u64; 2]));
        let mut t = DirtyTracker::new(
            100,
            vec![Box::new(Fake(kvm.clone())), Box::new(Fake(vmm.clone()))],
        );
        write(&kvm, 1); // before any snapshot: never reported
        t.start("a").expect("start a");
        write(&kvm, 2);
        write(&vmm, 70); // a device write, seen only by the VMM bitmap
        t.start("b").expect("start b");
        write(&kvm, 3);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(2, 2), (70, 1)]);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(3, 1)]);
        t.reset("a").expect("reset");
        write(&vmm, 4);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(4, 1)]);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(3, 2)]);
        t.mark(&[(90, 2)]);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(4, 1), (90, 2)]);
        t.forget("a");
        assert!(matches!(t.dirty_since("a"), Err(DirtyError::Untracked(_))));
        t.start_unknown("old");
        assert_eq!(t.dirty_since("old").expect("old"), vec![(0, 100)]);
    }
}
