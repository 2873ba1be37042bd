//! Dirty tracking: which guest pages were written since a given snapshot.
//!
//! # Epochs, stored per page
//!
//! Time is cut into epochs: each snapshot start (and each reset after a rollback) opens a
//! new one, and a snapshot's dirty set is "every page written in its own epoch or a later
//! one". Rather than keeping one page set per epoch (or, as before, one bitmap per
//! snapshot), the tracker keeps for each guest page the epoch of its *latest* recorded
//! write. Only the latest write matters to every question asked: page `p` was written
//! since snapshot `S` exactly when its latest write falls in `S`'s epoch or later. So:
//!
//! - memory is one `u32` per guest page plus one per 64 pages (4.0 + 0.06 MiB for a
//!   4 GiB guest), whatever the number of snapshots and however much was written;
//! - a harvest stamps the harvested pages with the current epoch: its cost is the
//!   sources' own (their RAM-sized bitmaps) plus a store per written page;
//! - `dirty_since(S)` scans the per-64-page maxima and looks inside only the groups with
//!   a write in or after `S`'s epoch;
//! - start and reset are a harvest plus O(1) (an epoch counter and a name map), forget
//!   is O(1). The stamps are allocated (zeroed, lazily by the kernel) when the first
//!   snapshot is tracked by epoch and freed when the last one goes; epoch numbers are
//!   renumbered in one O(pages) pass before they would pass `u32::MAX`.
//!
//! `vmm/examples/dirty_scale.rs` measures this against the previous tracker
//! (docs/perf-scale.md).
//!
//! Each harvest takes the bitmaps of every source (KVM's dirty log and the VMM's own
//! writes, see [`crate::vstate::dirty`]), so "dirty since S" is exact for as long as S is
//! tracked in this VMM process.

use std::collections::HashMap;

use crate::vstate::dirty::{prefaulted, DirtyError, DirtySource};

/// Where a snapshot's dirty set starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    /// The pages whose latest write was recorded in this epoch or a later one.
    Epoch(u32),
    /// Every page: a snapshot made by an earlier VMM process.
    Unknown,
}

/// Pages written since each live snapshot.
pub struct DirtyTracker {
    sources: Vec<Box<dyn DirtySource>>,
    pages: u64,
    since: HashMap<String, Since>,
    /// How many entries of `since` are [`Since::Epoch`].
    by_epoch: usize,
    /// The epoch writes are recorded in now; 0 while no snapshot is tracked by epoch.
    epoch: u32,
    /// Epoch numbers are compacted before `epoch` would pass this.
    epoch_limit: u32,
    /// Per guest page, the epoch of its latest recorded write (0: none). Empty while no
    /// snapshot is tracked by epoch.
    last: Vec<u32>,
    /// Per group of 64 pages (one bitmap word), the highest `last` in the group.
    group_max: Vec<u32>,
}

impl std::fmt::Debug for DirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyTracker")
            .field("pages", &self.pages)
            .field("tracked", &self.since.len())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl DirtyTracker {
    /// A tracker over `pages` guest pages fed by `sources`.
    pub fn new(pages: u64, sources: Vec<Box<dyn DirtySource>>) -> Self {
        Self::with_epoch_limit(pages, sources, u32::MAX)
    }

    /// [`Self::new`] with epoch numbers compacted once they reach `epoch_limit` (tests
    /// use a small limit to exercise the compaction).
    fn with_epoch_limit(pages: u64, sources: Vec<Box<dyn DirtySource>>, epoch_limit: u32) -> Self {
        Self {
            sources,
            pages,
            since: HashMap::new(),
            by_epoch: 0,
            epoch: 0,
            epoch_limit,
            last: Vec::new(),
            group_max: Vec::new(),
        }
    }

    /// Fold everything written since the last harvest into the tracking of every
    /// snapshot (stamped with the current epoch).
    pub fn harvest(&mut self) -> Result<(), DirtyError> {
        for src in &mut self.sources {
            let bits = src.harvest()?;
            if self.last.is_empty() {
                src.recycle(bits);
                continue; // nothing tracked by epoch: the writes concern no snapshot
            }
            for (w, &word) in bits.iter().enumerate().take(self.group_max.len()) {
                if word == 0 {
                    continue;
                }
                // A run of set bits at a time; `last` ends at the last page.
                let base = w * 64;
                let mut bit = 0u32;
                while bit < 64 && word >> bit != 0 {
                    bit += (word >> bit).trailing_zeros();
                    let len = (word >> bit).trailing_ones();
                    let first = (base + bit as usize).min(self.last.len());
                    let end = (first + len as usize).min(self.last.len());
                    self.last[first..end].fill(self.epoch);
                    bit += len;
                }
                self.group_max[w] = self.epoch;
            }
            src.recycle(bits);
        }
        Ok(())
    }

    /// Start tracking writes from now on for snapshot `name` (call with vCPUs paused, or
    /// right after the snapshot's pages were protected).
    pub fn start(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        let epoch = self.open_epoch();
        self.set(name, Since::Epoch(epoch));
        Ok(())
    }

    /// [`Self::start`] of `name` and the end of `mark`'s tracking, with one harvest:
    /// returns the pages written since `mark` up to the start of `name` (what
    /// [`Self::dirty_since`] of `mark` would say), and `mark` is forgotten. On an error
    /// neither changed (the caller forgets `mark` as it sees fit).
    pub fn start_ending(&mut self, name: &str, mark: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        let since = self.harvest_then_start(mark, name)?;
        self.forget(mark);
        Ok(since)
    }

    /// Restart `name`'s tracking from now, with one harvest: returns the pages written
    /// since its previous start (what [`Self::dirty_since`] would have said). On an
    /// error nothing changed.
    pub fn restart(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest_then_start(name, name)
    }

    /// Harvest, take what `ending` says was written since its start, then (re)start
    /// `starting` from now. On an error `starting` is unchanged.
    fn harvest_then_start(
        &mut self,
        ending: &str,
        starting: &str,
    ) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest()?;
        let since = self.written_since(ending)?;
        let epoch = self.open_epoch();
        self.set(starting, Since::Epoch(epoch));
        Ok(since)
    }

    /// Start tracking `name` with everything marked written (a snapshot made by an
    /// earlier VMM process: what happened in between is unknown here).
    pub fn start_unknown(&mut self, name: &str) {
        self.set(name, Since::Unknown);
    }

    /// Record pages the VMM wrote outside both sources (through the store's mapping) as
    /// written, for every tracked snapshot.
    pub fn mark(&mut self, runs: &[(u64, u64)]) {
        if self.last.is_empty() {
            return;
        }
        for &(first, count) in runs {
            let end = first.saturating_add(count).min(self.pages);
            for p in first..end {
                self.last[p as usize] = self.epoch;
                self.group_max[(p / 64) as usize] = self.epoch;
            }
        }
    }

    /// Stop tracking `name`.
    pub fn forget(&mut self, name: &str) {
        if let Some(Since::Epoch(_)) = self.since.remove(name) {
            self.drop_epoch_tracking();
        }
    }

    /// Pages written since `name` was taken, as runs.
    pub fn dirty_since(&mut self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        self.harvest()?;
        self.written_since(name)
    }

    /// Pages recorded written since `name` was taken, as of the last harvest.
    fn written_since(&self, name: &str) -> Result<Vec<(u64, u64)>, DirtyError> {
        match self.since.get(name) {
            None => Err(DirtyError::Untracked(name.to_string())),
            Some(Since::Unknown) if self.pages == 0 => Ok(Vec::new()),
            Some(Since::Unknown) => Ok(vec![(0, self.pages)]),
            Some(&Since::Epoch(e)) => Ok(self.runs_since(e)),
        }
    }

    /// Reset `name`'s tracking to "nothing written" (after a rollback to it). Other
    /// snapshots keep theirs: what the rollback copied back was marked written for all
    /// of them before (`Engine::after_vmm_write`), and stays so.
    pub fn reset(&mut self, name: &str) -> Result<(), DirtyError> {
        self.harvest()?;
        if !self.since.contains_key(name) {
            return Err(DirtyError::Untracked(name.to_string()));
        }
        let epoch = self.open_epoch();
        self.set(name, Since::Epoch(epoch));
        Ok(())
    }

    /// Bytes of heap the tracker holds (its page stamps, group maxima and name map), not
    /// counting the sources.
    pub fn memory_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(String, Since)>() + 1; // + the map's control byte
        self.last.capacity() * 4
            + self.group_max.capacity() * 4
            + self.since.capacity() * entry
            + self.since.keys().map(String::capacity).sum::<usize>()
    }

    /// Track `name` from `since`, replacing what it had.
    fn set(&mut self, name: &str, since: Since) {
        let new = matches!(since, Since::Epoch(_));
        let old = self.since.insert(name.to_string(), since);
        let old = matches!(old, Some(Since::Epoch(_)));
        match (old, new) {
            (false, true) => self.by_epoch += 1,
            (true, false) => self.drop_epoch_tracking(),
            _ => {}
        }
    }

    /// One snapshot fewer is tracked by epoch; with none left, free the page stamps.
    fn drop_epoch_tracking(&mut self) {
        self.by_epoch -= 1;
        if self.by_epoch == 0 {
            self.last = Vec::new();
            self.group_max = Vec::new();
            self.epoch = 0;
        }
    }

    /// Open a new epoch (after a harvest, so everything written before is stamped with
    /// an older one) and return it.
    fn open_epoch(&mut self) -> u32 {
        if self.last.is_empty() {
            // Mapped now, not page by page at the first stamps, which may fall inside a
            // pause (see `prefaulted`).
            self.last = prefaulted(self.pages as usize);
            self.group_max = prefaulted(self.pages.div_ceil(64) as usize);
            self.epoch = 0;
        }
        if self.epoch >= self.epoch_limit {
            self.compact();
        }
        self.epoch = self.epoch.saturating_add(1);
        self.epoch
    }

    /// Renumber epochs densely, keeping every answer: an epoch becomes the number of
    /// tracked snapshots' epochs at or before it, so the order between any page stamp
    /// and any snapshot's epoch is kept, and stamps older than every tracked snapshot
    /// become 0.
    fn compact(&mut self) {
        let mut live: Vec<u32> = self
            .since
            .values()
            .filter_map(|s| match s {
                Since::Epoch(e) => Some(*e),
                Since::Unknown => None,
            })
            .collect();
        live.sort_unstable();
        live.dedup();
        let rank = |e: u32| live.partition_point(|&l| l <= e) as u32;
        for (g, max) in self.group_max.iter_mut().enumerate() {
            if *max == 0 {
                continue;
            }
            *max = rank(*max);
            let start = g * 64;
            let end = (start + 64).min(self.last.len());
            for stamp in &mut self.last[start..end] {
                *stamp = rank(*stamp);
            }
        }
        for s in self.since.values_mut() {
            if let Since::Epoch(e) = s {
                *e = rank(*e);
            }
        }
        self.epoch = rank(self.epoch);
    }

    /// The pages stamped with epoch `epoch` or later, as runs in page order.
    fn runs_since(&self, epoch: u32) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (g, &max) in self.group_max.iter().enumerate() {
            if max < epoch {
                continue;
            }
            let start = g * 64;
            let end = (start + 64).min(self.last.len());
            let word = group_mask(&self.last[start..end], epoch);
            // A run of set bits at a time, not a bit.
            let mut bit = 0u32;
            while bit < 64 && word >> bit != 0 {
                bit += (word >> bit).trailing_zeros();
                let len = (word >> bit).trailing_ones();
                let page = start as u64 + u64::from(bit);
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page => *count += u64::from(len),
                    _ => runs.push((page, u64::from(len))),
                }
                bit += len;
            }
        }
        runs
    }
}

/// Bit `i` set where `stamps[i] >= epoch` (at most 64 stamps).
fn group_mask(stamps: &[u32], epoch: u32) -> u64 {
    if let Ok(full) = <&[u32; 64]>::try_from(stamps) {
        // A fixed-length loop the compiler turns into vector compares.
        let mut word = 0u64;
        for (half, chunk) in full.chunks_exact(32).enumerate() {
            let mut bits = 0u32;
            for (i, &stamp) in chunk.iter().enumerate() {
                bits |= u32::from(stamp >= epoch) << i;
            }
            word |= u64::from(bits) << (half * 32);
        }
        return word;
    }
    let mut word = 0u64;
    for (i, &stamp) in stamps.iter().enumerate() {
        word |= u64::from(stamp >= epoch) << i;
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::dirty::{bitmap_runs, bitmap_words, or_bitmap_at, PageBitmap};
    use std::collections::BTreeSet;
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

    /// A tracker over `pages` pages fed by two fake sources (KVM's and the VMM's).
    fn tracker(pages: u64, limit: u32) -> (DirtyTracker, [Arc<Mutex<PageBitmap>>; 2]) {
        let kvm = Arc::new(Mutex::new(vec![0u64; bitmap_words(pages)]));
        let vmm = Arc::new(Mutex::new(vec![0u64; bitmap_words(pages)]));
        let t = DirtyTracker::with_epoch_limit(
            pages,
            vec![Box::new(Fake(kvm.clone())), Box::new(Fake(vmm.clone()))],
            limit,
        );
        (t, [kvm, vmm])
    }

    #[test]
    fn runs_from_bitmap() {
        assert_eq!(bitmap_runs(&[0, 0]), vec![]);
        assert_eq!(bitmap_runs(&[0b1110_0001]), vec![(0, 1), (5, 3)]);
        assert_eq!(bitmap_runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert_eq!(bitmap_runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
        assert_eq!(
            bitmap_runs(&[1 << 63, u64::MAX, 3, u64::MAX]),
            vec![(63, 67), (192, 64)]
        );
        assert_eq!(bitmap_words(0), 0);
        assert_eq!(bitmap_words(65), 2);
    }

    /// The word-wise OR puts every bit where the page-by-page loop put it, at any
    /// offset, and drops bits past the source's page count and past the target.
    #[test]
    fn or_at_an_offset_matches_page_by_page() {
        let src = [0x8000_0000_0000_0001u64, u64::MAX, 0b1011];
        for first in [0u64, 1, 63, 64, 70, 190] {
            for pages in [1u64, 64, 65, 130, 192] {
                let mut fast = vec![0u64; 5];
                or_bitmap_at(&mut fast, first, &src, pages);
                let mut slow = vec![0u64; 5];
                for p in 0..pages {
                    let set = src[(p / 64) as usize] & (1 << (p % 64)) != 0;
                    let at = first + p;
                    if set && at < 5 * 64 {
                        slow[(at / 64) as usize] |= 1 << (at % 64);
                    }
                }
                assert_eq!(fast, slow, "first {first} pages {pages}");
            }
        }
    }

    #[test]
    fn tracks_each_snapshot_from_its_own_start() {
        let (mut t, [kvm, vmm]) = tracker(100, u32::MAX);
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

    /// One harvest starts a snapshot and ends a mark: the mark's pages up to the start,
    /// the snapshot's from it on.
    #[test]
    fn start_ending_a_mark() {
        let (mut t, [kvm, vmm]) = tracker(100, u32::MAX);
        t.start("a").expect("a");
        t.start("\0mark").expect("mark");
        write(&kvm, 7);
        write(&vmm, 8);
        assert_eq!(t.start_ending("b", "\0mark").expect("b"), vec![(7, 2)]);
        assert!(matches!(
            t.dirty_since("\0mark"),
            Err(DirtyError::Untracked(_))
        ));
        write(&kvm, 9);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(9, 1)]);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(7, 3)]);
        assert!(matches!(
            t.start_ending("c", "\0none"),
            Err(DirtyError::Untracked(_))
        ));
        assert!(
            matches!(t.dirty_since("c"), Err(DirtyError::Untracked(_))),
            "not started when the mark is unknown"
        );
    }

    /// A restart answers up to itself and tracks from itself on; other snapshots keep
    /// their own start; an unknown name changes nothing.
    #[test]
    fn restart_a_mark() {
        let (mut t, [kvm, vmm]) = tracker(100, u32::MAX);
        t.start("\0mark").expect("mark");
        write(&kvm, 5);
        t.start("a").expect("a");
        write(&vmm, 6);
        assert_eq!(t.restart("\0mark").expect("restart"), vec![(5, 2)]);
        write(&kvm, 40);
        assert_eq!(t.restart("\0mark").expect("restart"), vec![(40, 1)]);
        assert_eq!(t.restart("\0mark").expect("restart"), vec![]);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(6, 1), (40, 1)]);
        assert!(matches!(t.restart("\0none"), Err(DirtyError::Untracked(_))));
        assert!(matches!(
            t.dirty_since("\0none"),
            Err(DirtyError::Untracked(_))
        ));
    }

    /// A rollback to one snapshot among many: the pages it copies back are VMM writes,
    /// dirty for every other snapshot; only the rolled-back one starts over.
    #[test]
    fn reset_of_one_snapshot_among_many() {
        let (mut t, [kvm, _]) = tracker(300, u32::MAX);
        t.start("s0").expect("s0");
        write(&kvm, 10);
        t.start("s1").expect("s1");
        write(&kvm, 20);
        t.start("s2").expect("s2");
        write(&kvm, 30);
        // Roll back to s1: pages 20 and 30 were written since; the rollback copies them
        // back (Engine::after_vmm_write marks them), then resets s1.
        assert_eq!(t.dirty_since("s1").expect("s1"), vec![(20, 1), (30, 1)]);
        t.mark(&[(20, 1), (30, 1)]);
        t.reset("s1").expect("reset s1");
        assert_eq!(t.dirty_since("s1").expect("s1"), vec![]);
        assert_eq!(
            t.dirty_since("s0").expect("s0"),
            vec![(10, 1), (20, 1), (30, 1)]
        );
        assert_eq!(
            t.dirty_since("s2").expect("s2"),
            vec![(20, 1), (30, 1)],
            "page 20, copied back by the rollback, is written since s2"
        );
        write(&kvm, 299);
        for s in ["s0", "s1", "s2"] {
            assert!(t.dirty_since(s).expect(s).ends_with(&[(299, 1)]), "{s}");
        }
        assert_eq!(t.dirty_since("s1").expect("s1"), vec![(299, 1)]);
        // A snapshot started before the reset keeps its older start.
        t.start("s3").expect("s3");
        write(&kvm, 5);
        t.reset("s0").expect("reset s0");
        assert_eq!(t.dirty_since("s0").expect("s0"), vec![]);
        assert_eq!(t.dirty_since("s3").expect("s3"), vec![(5, 1)]);
        assert_eq!(t.dirty_since("s1").expect("s1"), vec![(5, 1), (299, 1)]);
    }

    #[test]
    fn forget_the_oldest_middle_or_newest() {
        for gone in ["a", "b", "c"] {
            let (mut t, [kvm, vmm]) = tracker(128, u32::MAX);
            t.start("a").expect("a");
            write(&kvm, 1);
            t.start("b").expect("b");
            write(&vmm, 2);
            t.start("c").expect("c");
            write(&kvm, 3);
            t.forget(gone);
            write(&kvm, 127);
            let want = |s: &str| match s {
                "a" => vec![(1, 3), (127, 1)],
                "b" => vec![(2, 2), (127, 1)],
                _ => vec![(3, 1), (127, 1)],
            };
            for s in ["a", "b", "c"] {
                if s == gone {
                    assert!(matches!(t.dirty_since(s), Err(DirtyError::Untracked(_))));
                } else {
                    assert_eq!(t.dirty_since(s).expect(s), want(s), "{s} after {gone} went");
                }
            }
            // A snapshot started after the forget counts from its own start only.
            t.start("d").expect("d");
            write(&vmm, 64);
            assert_eq!(t.dirty_since("d").expect("d"), vec![(64, 1)]);
        }
    }

    #[test]
    fn memory_does_not_grow_with_snapshots_and_goes_with_the_last() {
        let (mut t, [kvm, _]) = tracker(1 << 16, u32::MAX);
        assert!(t.memory_bytes() < 1024, "nothing tracked: no page stamps");
        t.start("s0").expect("s0");
        let one = t.memory_bytes();
        assert!(one >= (1 << 16) * 4, "{one}: one stamp per page");
        for i in 1..200u64 {
            for p in 0..300 {
                write(&kvm, (i * 7919 + p * 31) % (1 << 16));
            }
            t.start(&format!("s{i}")).expect("start");
        }
        let many = t.memory_bytes();
        assert!(
            many - one < 200 * 64,
            "200 snapshots cost {} bytes more than one",
            many - one
        );
        for i in 0..200 {
            t.forget(&format!("s{i}"));
        }
        assert!(t.memory_bytes() < 1024 * 16, "{}", t.memory_bytes());
        write(&kvm, 9); // written while nothing is tracked
        t.start("again").expect("again");
        write(&kvm, 10);
        assert_eq!(t.dirty_since("again").expect("again"), vec![(10, 1)]);
    }

    #[test]
    fn compaction_keeps_every_answer() {
        let (mut t, [kvm, _]) = tracker(200, 4);
        t.start("a").expect("a");
        for i in 0..20u64 {
            write(&kvm, i);
            t.start("tmp").expect("tmp"); // restarting a name: a new epoch each time
        }
        t.start("b").expect("b");
        write(&kvm, 150);
        assert!(t.epoch <= 4, "epochs were compacted: {}", t.epoch);
        assert_eq!(t.dirty_since("a").expect("a"), vec![(0, 20), (150, 1)]);
        assert_eq!(t.dirty_since("tmp").expect("tmp"), vec![(150, 1)]);
        assert_eq!(t.dirty_since("b").expect("b"), vec![(150, 1)]);
    }

    /// The per-snapshot semantics the tracker must keep: one page set per snapshot
    /// (None: everything), every harvest and mark adding to all of them. This is what
    /// the tracker did before epochs.
    #[derive(Default)]
    struct Model {
        pages: u64,
        pending: [BTreeSet<u64>; 2],
        since: std::collections::HashMap<String, Option<BTreeSet<u64>>>,
    }

    impl Model {
        fn harvest(&mut self) {
            for src in &mut self.pending {
                for set in self.since.values_mut().flatten() {
                    set.extend(src.iter().copied());
                }
                src.clear();
            }
        }
        fn dirty_since(&mut self, name: &str) -> Option<Vec<(u64, u64)>> {
            self.harvest();
            let set = self.since.get(name)?;
            let all: BTreeSet<u64> = (0..self.pages).collect();
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &p in set.as_ref().unwrap_or(&all) {
                match runs.last_mut() {
                    Some((f, c)) if *f + *c == p => *c += 1,
                    _ => runs.push((p, 1)),
                }
            }
            Some(runs)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize, u64),
        Mark(u64, u64),
        Start(usize),
        StartUnknown(usize),
        Reset(usize),
        Forget(usize),
        Harvest,
        Check,
    }

    const PAGES: u64 = 200;
    const NAMES: usize = 6;

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            8 => (0..2usize, 0..PAGES).prop_map(|(s, p)| Op::Write(s, p)),
            2 => (0..PAGES + 10, 1..40u64).prop_map(|(f, c)| Op::Mark(f, c)),
            3 => (0..NAMES).prop_map(Op::Start),
            1 => (0..NAMES).prop_map(Op::StartUnknown),
            2 => (0..NAMES).prop_map(Op::Reset),
            2 => (0..NAMES).prop_map(Op::Forget),
            1 => Just(Op::Harvest),
            2 => Just(Op::Check),
        ]
    }

    fn check_all(
        t: &mut DirtyTracker,
        m: &mut Model,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        for n in 0..NAMES {
            let name = format!("s{n}");
            let got = t.dirty_since(&name).ok();
            proptest::prop_assert_eq!(got, m.dirty_since(&name), "dirty since {}", name);
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(400))]
        /// On random sequences of writes, marks, starts, resets and forgets, every live
        /// snapshot's dirty set equals the per-snapshot model's, with and without epoch
        /// compaction along the way.
        #[test]
        fn equals_one_set_per_snapshot(
            ops in proptest::collection::vec(op(), 0..120),
            limit in proptest::prop_oneof![proptest::strategy::Just(1u32), proptest::strategy::Just(3), proptest::strategy::Just(u32::MAX)],
        ) {
            let (mut t, srcs) = tracker(PAGES, limit);
            let mut m = Model { pages: PAGES, ..Default::default() };
            for op in ops {
                match op {
                    Op::Write(s, p) => {
                        write(&srcs[s], p);
                        m.pending[s].insert(p);
                    }
                    Op::Mark(f, c) => {
                        t.mark(&[(f, c)]);
                        for set in m.since.values_mut().flatten() {
                            set.extend(f..(f + c).min(PAGES));
                        }
                    }
                    Op::Start(n) => {
                        t.start(&format!("s{n}")).expect("start");
                        m.harvest();
                        m.since.insert(format!("s{n}"), Some(BTreeSet::new()));
                    }
                    Op::StartUnknown(n) => {
                        t.start_unknown(&format!("s{n}"));
                        m.since.insert(format!("s{n}"), None);
                    }
                    Op::Reset(n) => {
                        let name = format!("s{n}");
                        let got = t.reset(&name).is_ok();
                        m.harvest();
                        let known = m.since.contains_key(&name);
                        if known {
                            m.since.insert(name, Some(BTreeSet::new()));
                        }
                        proptest::prop_assert_eq!(got, known);
                    }
                    Op::Forget(n) => {
                        t.forget(&format!("s{n}"));
                        m.since.remove(&format!("s{n}"));
                    }
                    Op::Harvest => {
                        t.harvest().expect("harvest");
                        m.harvest();
                    }
                    Op::Check => check_all(&mut t, &mut m)?,
                }
                proptest::prop_assert_eq!(
                    t.by_epoch,
                    m.since.values().filter(|s| s.is_some()).count()
                );
            }
            check_all(&mut t, &mut m)?;
        }
    }
}
