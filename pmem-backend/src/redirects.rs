//! The store's redirects, one per preserve, shared by the snapshots it re-pointed
//! (catalog version 4, issue 16).
//!
//! A preserve of page p copies RAM(p) into a block b and re-points every snapshot that
//! referenced RAM(p): exactly the snapshots covering p that were taken since p's previous
//! preserve. Snapshot ids only grow, so those are the snapshots covering p with an id in
//! `(u0, u1]`, where u0 is the newest snapshot id when p was last preserved and u1 the
//! newest id now. So one record `(p, u1) -> b` says where p is for all of them, and for
//! each page the records, ordered by `u`, cut the id axis into ranges: snapshot s finds p
//! in the first record of p with `u >= s.id`, or in RAM(p) when there is none.
//!
//! Memory and catalog bytes follow the preserves, not snapshots x preserved pages (each
//! snapshot kept its own page -> block map before: 1,000 snapshots of a guest rewriting
//! 70,000 pages held some 14 million entries, 646 MiB). A record whose snapshots are all
//! deleted is removed with its block; a deleted snapshot inside a record's range that
//! others still share leaves the record as it is (ids of deleted snapshots are never
//! reused, so nothing else can fall into the range).

use crate::catalog::Snapshot;
use std::collections::{BTreeMap, BTreeSet};

/// Longest page range [`Redirects::range_of`] answers by walking its records.
pub(crate) const RANGE_WALK_PAGES: u64 = 4096;

/// One redirect: page `page` of the snapshots covering it with ids in (the previous
/// record's `upto`, `upto`] is in block `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Guest page.
    pub page: u64,
    /// Newest snapshot id when the page was preserved.
    pub upto: u64,
    /// Block holding the page's content as those snapshots saw it.
    pub block: u32,
}

/// Every redirect of a store (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redirects {
    /// (page, upto) -> block.
    by_page: BTreeMap<(u64, u64), u32>,
    /// (upto, page) of each page's newest record: the pages preserved since snapshot s
    /// are those with `upto >= s.id`, found without walking older history.
    newest: BTreeSet<(u64, u64)>,
}

impl Redirects {
    /// No redirects.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.by_page.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_page.is_empty()
    }

    /// Every record, by page then `upto`.
    pub fn iter(&self) -> impl Iterator<Item = Version> + '_ {
        self.by_page
            .iter()
            .map(|(&(page, upto), &block)| Version { page, upto, block })
    }

    /// The newest record's `upto` for page p: snapshots covering p with a larger id
    /// reference RAM(p).
    pub fn newest_upto(&self, p: u64) -> Option<u64> {
        self.by_page
            .range((p, 0)..=(p, u64::MAX))
            .next_back()
            .map(|(&(_, u), _)| u)
    }

    /// The record of page p for snapshot id `id`, whether or not that snapshot covers p
    /// (callers check).
    pub fn lookup(&self, id: u64, p: u64) -> Option<Version> {
        self.by_page
            .range((p, id)..=(p, u64::MAX))
            .next()
            .map(|(&(page, upto), &block)| Version { page, upto, block })
    }

    /// The block snapshot `s` holds page p in, if it covers p and p was preserved
    /// since `s` was taken.
    pub fn get(&self, s: &Snapshot, p: u64) -> Option<u32> {
        if !s.covers(p) {
            return None;
        }
        self.lookup(s.id, p).map(|v| v.block)
    }

    /// Every record snapshot `s` uses, by page. Costs the pages preserved since `s` was
    /// taken (for a VM snapshot, exactly the pages it holds in blocks), not the history.
    pub fn of(&self, s: &Snapshot) -> Vec<Version> {
        let mut out: Vec<Version> = self
            .newest
            .range((s.id, 0)..)
            .filter(|&&(_, p)| s.covers(p))
            .filter_map(|&(_, p)| self.lookup(s.id, p))
            .collect();
        out.sort_unstable_by_key(|v| v.page);
        out
    }

    /// The records snapshot `s` uses for pages `first..end`, by page. Costs the records
    /// of that page range when it is short, else the pages preserved since `s` was
    /// taken (a restore of all of RAM of the newest snapshot must not walk the records
    /// of every older one).
    pub fn range_of(&self, s: &Snapshot, first: u64, end: u64) -> Vec<Version> {
        if end.saturating_sub(first) > RANGE_WALK_PAGES {
            let mut out: Vec<Version> = self
                .newest
                .range((s.id, 0)..)
                .filter(|&&(_, p)| p >= first && p < end && s.covers(p))
                .filter_map(|&(_, p)| self.lookup(s.id, p))
                .collect();
            out.sort_unstable_by_key(|v| v.page);
            return out;
        }
        let mut out = Vec::new();
        let mut last_page = None;
        for (&(page, upto), &block) in self.by_page.range((first, 0)..(end, 0)) {
            if upto < s.id || last_page == Some(page) {
                continue;
            }
            last_page = Some(page);
            if s.covers(page) {
                out.push(Version { page, upto, block });
            }
        }
        out
    }

    /// Pages snapshot `s` holds in blocks. Costs the pages preserved since `s` was taken;
    /// [`Self::counter`] answers for many snapshots at once.
    pub fn count_of(&self, s: &Snapshot) -> u64 {
        self.newest
            .range((s.id, 0)..)
            .filter(|&&(_, p)| s.covers(p))
            .count() as u64
    }

    /// [`Self::count_of`] for many snapshots (a listing of thousands): a snapshot whose
    /// one run covers every page with a record (a VM snapshot) is answered by a binary
    /// search over the pages' newest `upto`s, the others by [`Self::count_of`].
    pub fn counter(&self) -> impl Fn(&Snapshot) -> u64 + '_ {
        let uptos: Vec<u64> = self.newest.iter().map(|&(u, _)| u).collect();
        let end = self.by_page.keys().next_back().map_or(0, |&(p, _)| p + 1);
        move |s: &Snapshot| match s.page_set.as_slice() {
            [r] if r.first == 0 && r.end() >= end => {
                (uptos.len() - uptos.partition_point(|&u| u < s.id)) as u64
            }
            _ => self.count_of(s),
        }
    }

    /// Add the record of a preserve of page `v.page` while `v.upto` was the newest
    /// snapshot id. Its `upto` must be above the page's newest record's.
    pub fn add(&mut self, v: Version) {
        let prev = self.newest_upto(v.page);
        debug_assert!(prev.is_none_or(|u| u < v.upto), "records of a page grow");
        if let Some(u) = prev {
            self.newest.remove(&(u, v.page));
        }
        self.newest.insert((v.upto, v.page));
        self.by_page.insert((v.page, v.upto), v.block);
    }

    /// Remove a record (its snapshots are gone). Returns whether it was there.
    pub fn remove(&mut self, v: Version) -> bool {
        if self.by_page.remove(&(v.page, v.upto)).is_none() {
            return false;
        }
        if self.newest.remove(&(v.upto, v.page)) {
            if let Some(u) = self.newest_upto(v.page) {
                self.newest.insert((u, v.page));
            }
        }
        true
    }

    /// The `upto` of the record before `v` for its page (0 when it is the first): `v`
    /// covers snapshot ids in (that, `v.upto`].
    pub fn previous_upto(&self, v: Version) -> u64 {
        self.by_page
            .range((v.page, 0)..(v.page, v.upto))
            .next_back()
            .map_or(0, |(&(_, u), _)| u)
    }

    /// Keep only the records `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(Version) -> bool) {
        let drop: Vec<Version> = self.iter().filter(|&v| !keep(v)).collect();
        for v in drop {
            self.remove(v);
        }
    }

    /// Build from the per-snapshot redirect maps of a catalog before version 4 (each
    /// snapshot's `(page, block)` pairs, by page): for each page, the snapshots
    /// redirecting it ordered by id, each run of one block one record (`upto` its last
    /// snapshot). Fails unless every snapshot then sees exactly its own map (no store
    /// writes anything else) and no block serves two records.
    pub fn from_per_snapshot(
        snapshots: &[Snapshot],
        maps: &[Vec<(u64, u32)>],
    ) -> Result<Redirects, String> {
        let mut pairs: Vec<(u64, u64, u32)> = snapshots
            .iter()
            .zip(maps)
            .flat_map(|(s, m)| m.iter().map(move |&(p, b)| (p, s.id, b)))
            .collect();
        pairs.sort_unstable();
        let mut out = Redirects::new();
        let mut blocks = std::collections::HashSet::new();
        let mut i = 0;
        while i < pairs.len() {
            let (page, _, block) = pairs[i];
            let mut j = i;
            while j + 1 < pairs.len() && pairs[j + 1].0 == page && pairs[j + 1].2 == block {
                j += 1;
            }
            if !blocks.insert(block) {
                return Err(format!(
                    "block {block} holds page {page} for snapshots that are not consecutive, \
                     or another page too"
                ));
            }
            out.add(Version {
                page,
                upto: pairs[j].1,
                block,
            });
            i = j + 1;
        }
        for (s, m) in snapshots.iter().zip(maps) {
            let seen: Vec<(u64, u32)> = out.of(s).iter().map(|v| (v.page, v.block)).collect();
            if seen != *m {
                return Err(format!(
                    "snapshot {:?} references a page in place that an older snapshot holds \
                     a later preserve of",
                    s.name
                ));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::vm_record;
    use crate::types::PageRun;

    fn snap(id: u64, first: u64, count: u64) -> Snapshot {
        vm_record(id, &[PageRun::new(first, count)])
    }

    fn v(page: u64, upto: u64, block: u32) -> Version {
        Version { page, upto, block }
    }

    /// Snapshots 1..=3 cover pages 0..8, snapshot 4 only page 20. Page 5 is preserved
    /// after snapshot 2 (for 1 and 2) and again after 3 (for 3); page 6 once, after 3.
    #[test]
    fn a_snapshot_finds_the_first_record_at_or_above_its_id() {
        let s: Vec<Snapshot> = (1..=3)
            .map(|i| snap(i, 0, 8))
            .chain([snap(4, 20, 1)])
            .collect();
        let mut r = Redirects::new();
        r.add(v(5, 2, 10));
        r.add(v(5, 4, 11));
        r.add(v(6, 4, 12));
        assert_eq!(r.get(&s[0], 5), Some(10));
        assert_eq!(r.get(&s[1], 5), Some(10));
        assert_eq!(r.get(&s[2], 5), Some(11));
        assert_eq!(r.get(&s[3], 5), None, "4 does not cover page 5");
        assert_eq!(r.get(&s[0], 6), Some(12));
        assert_eq!(r.get(&s[0], 7), None, "page 7 is in RAM");
        assert_eq!(r.of(&s[0]), vec![v(5, 2, 10), v(6, 4, 12)]);
        assert_eq!(r.of(&s[2]), vec![v(5, 4, 11), v(6, 4, 12)]);
        assert!(r.of(&s[3]).is_empty());
        assert_eq!(r.count_of(&s[1]), 2);
        let count = r.counter();
        for x in &s {
            assert_eq!(count(x), r.count_of(x), "snapshot {}", x.id);
        }
        drop(count);
        assert_eq!(r.range_of(&s[2], 0, 6), vec![v(5, 4, 11)]);
        assert_eq!(r.range_of(&s[0], 6, 8), vec![v(6, 4, 12)]);
        // A long range takes the other path, with the same answers.
        let mut wide = snap(1, 0, 1 << 20);
        for id in [1, 2, 3] {
            wide.id = id;
            assert_eq!(
                r.range_of(&wide, 0, 1 << 20),
                r.range_of(&wide, 0, 8),
                "id {id}"
            );
            assert_eq!(r.range_of(&wide, 6, 1 << 20), r.range_of(&wide, 6, 8));
        }
        assert_eq!((r.newest_upto(5), r.newest_upto(7)), (Some(4), None));
        assert_eq!(r.previous_upto(v(5, 4, 11)), 2);
        assert_eq!(r.previous_upto(v(5, 2, 10)), 0);
        // Dropping page 5's newest record makes the older one the newest again.
        assert!(r.remove(v(5, 4, 11)));
        assert!(!r.remove(v(5, 4, 11)));
        assert_eq!(r.newest_upto(5), Some(2));
        assert_eq!(
            r.of(&s[2]),
            vec![v(6, 4, 12)],
            "3 no longer sees page 5 moved"
        );
        assert_eq!(r.of(&s[1]), vec![v(5, 2, 10), v(6, 4, 12)]);
        r.retain(|x| x.page != 6);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![v(5, 2, 10)]);
        assert_eq!(r.len(), 1);
    }

    /// Per-snapshot maps (catalogs before version 4) become one record per block, and a
    /// map no store could have written is refused.
    #[test]
    fn per_snapshot_maps_convert_to_shared_records() {
        let s: Vec<Snapshot> = (1..=4).map(|i| snap(i, 0, 8)).collect();
        let maps = vec![
            vec![(3, 30), (5, 50)],
            vec![(3, 30), (5, 51)],
            vec![(5, 51)],
            vec![],
        ];
        let r = Redirects::from_per_snapshot(&s, &maps).expect("convert");
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![v(3, 2, 30), v(5, 1, 50), v(5, 3, 51)]
        );
        for (x, m) in s.iter().zip(&maps) {
            let seen: Vec<(u64, u32)> = r.of(x).iter().map(|v| (v.page, v.block)).collect();
            assert_eq!(&seen, m);
        }
        // Snapshot 2 has page 3 in place while the older 1 has it in a block, but 3
        // has it in one too: no preserve order gives that.
        let bad = vec![vec![(3, 30)], vec![], vec![(3, 31)], vec![]];
        let e = Redirects::from_per_snapshot(&s, &bad).expect_err("refused");
        assert!(e.contains("in place"), "{e}");
        // One block for two pages.
        let bad = vec![vec![(3, 30), (4, 30)], vec![], vec![], vec![]];
        let e = Redirects::from_per_snapshot(&s, &bad).expect_err("refused");
        assert!(e.contains("block 30"), "{e}");
    }
}
