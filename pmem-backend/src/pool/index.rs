//! The reference index: the in-memory counts behind every store operation, with no file.
//!
//! For each RAM page, how many snapshots reference it in place (RAM(p)); for each block,
//! how many snapshots reference it and what it holds; the crc32c of every block holding
//! a preserved page; the free list; and the protection bitmap. None of it is stored by
//! itself: [`Pool::open`](super::Pool::open) derives it from the catalog and the redirect
//! log, so a crash cannot leak a page or a block across a reopen.
//!
//! A snapshot covering all of RAM (every VM snapshot) is counted once, in `ram_base`,
//! not once per page: page p's count is `ram_refs[p] + ram_base`, in wrapping
//! arithmetic, and a page preserved while k such snapshots existed stores -k. Taking a
//! VM snapshot then costs the protection bitmap (a bit per page, a word at a time), not
//! a count per page: at 4 GiB that was about 1 ms of its pause.
//!
//! Invariants between two store operations (see `RefIndex::check` in the tests):
//! - page p is protected exactly when its count is above 0;
//! - a `Free` block has no references, no crc and is on the free list (once); a `Page`
//!   block has at least one reference and a crc; a `Blob` block has one reference and
//!   no crc; neither is on the free list.
//!
//! The snapshots themselves (`catalog::Snapshot`) and their redirects
//! (`redirects::Redirects`) live in the pool; the index is told about them
//! (`add_snapshot_refs`, `load_counts`, `release`, `recount`) and never keeps them.

use crate::catalog::Snapshot;
use crate::error::{PoolError, Result};
use crate::redirects::{Redirects, Version};
use crate::types::{pages_to_runs, PageRun, RunBuilder};
use crate::PAGE_SIZE;
use std::collections::{BTreeMap, HashSet};

/// References counted from snapshots and their redirects (`count_refs`).
pub(super) struct Counts {
    /// Per RAM page: snapshots referencing RAM(p).
    pub ram: Vec<u32>,
    /// Per block: snapshots whose redirect record names it.
    pub blocks: Vec<u32>,
    /// Records no snapshot uses (every snapshot of their range deleted).
    pub dead: Vec<Version>,
}

/// Count every reference of `snapshots` (in id order) given their redirects: RAM(p) for
/// each page a snapshot covers, less the snapshots a record re-points to its block. The
/// coverage is summed run by run (a difference array), and a record's snapshots are
/// counted by binary search among the snapshots covering all of RAM plus a walk over
/// the others in its id range, so the cost is pages + runs + records (x the partial
/// snapshots in a record's range), not snapshots x pages.
pub(super) fn count_refs<'a>(
    ram_pages: u64,
    block_count: u64,
    snapshots: impl IntoIterator<Item = &'a Snapshot>,
    redirects: &Redirects,
) -> std::result::Result<Counts, String> {
    let mut diff = vec![0u32; ram_pages as usize + 1];
    let mut full = Vec::new();
    let mut partial = Vec::new();
    for s in snapshots {
        for r in &s.page_set {
            diff[r.first as usize] = diff[r.first as usize].wrapping_add(1);
            diff[r.end() as usize] = diff[r.end() as usize].wrapping_sub(1);
        }
        if s.page_set.len() == 1 && s.page_set[0] == PageRun::new(0, ram_pages) {
            full.push(s.id);
        } else {
            partial.push(s);
        }
    }
    let mut ram = Vec::with_capacity(ram_pages as usize);
    let mut at = 0u32;
    for d in &diff[..ram_pages as usize] {
        at = at.wrapping_add(*d);
        ram.push(at);
    }
    drop(diff);
    let mut blocks = vec![0u32; block_count as usize];
    let mut dead = Vec::new();
    let mut prev = (u64::MAX, 0u64);
    for v in redirects.iter() {
        let lo = if prev.0 == v.page { prev.1 + 1 } else { 1 };
        prev = (v.page, v.upto);
        if v.page >= ram_pages || u64::from(v.block) >= block_count {
            return Err(format!(
                "redirect of page {} to block {} out of range",
                v.page, v.block
            ));
        }
        let in_full =
            full.partition_point(|&id| id <= v.upto) - full.partition_point(|&id| id < lo);
        let from = partial.partition_point(|s| s.id < lo);
        let in_partial = partial[from..]
            .iter()
            .take_while(|s| s.id <= v.upto)
            .filter(|s| s.covers(v.page))
            .count();
        let n = u32::try_from(in_full + in_partial).map_err(|_| "too many snapshots")?;
        if n == 0 {
            dead.push(v);
            continue;
        }
        let b = &mut blocks[v.block as usize];
        if *b != 0 {
            return Err(format!("block {} holds two redirected pages", v.block));
        }
        *b = n;
        let r = &mut ram[v.page as usize];
        *r = r
            .checked_sub(n)
            .ok_or_else(|| format!("page {}: more snapshots redirected than cover it", v.page))?;
    }
    Ok(Counts { ram, blocks, dead })
}

/// What a block holds. Derived from references, like everything here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockUse {
    Free,
    Page,
    Blob,
}

/// The reference counts of an open pool (see the module docs).
#[derive(Debug)]
pub(super) struct RefIndex {
    /// Per RAM page: snapshots referencing RAM(p), less `ram_base` (wrapping).
    ram_refs: Vec<u32>,
    /// Snapshots covering all of RAM, counted for every page at once (module docs).
    ram_base: u32,
    /// One bit per RAM page, set while `ram_refs[p] > 0`.
    protected: ProtectionBitmap,
    /// Per block: snapshots referencing it (page blocks) or 1 (blob blocks).
    block_refs: Vec<u32>,
    block_use: Vec<BlockUse>,
    /// crc32c of each block holding a preserved page.
    page_blocks: BTreeMap<u32, u32>,
    /// Free blocks, the next one to allocate last.
    free_blocks: Vec<u32>,
}

/// Store-wide numbers the index can tell (part of [`crate::Stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RefCounts {
    pub pages_in_ram: u64,
    pub pages_in_blocks: u64,
    pub blob_blocks: u64,
    pub shared_bytes: u64,
    pub saved_bytes: u64,
    pub blocks_free: u64,
}

impl RefIndex {
    /// Nothing referenced, every block free.
    pub(super) fn new(ram_pages: u64, block_count: u64) -> Self {
        let blocks = block_count as usize;
        let mut index = RefIndex {
            ram_refs: vec![0; ram_pages as usize],
            ram_base: 0,
            protected: ProtectionBitmap::new(ram_pages),
            block_refs: vec![0; blocks],
            block_use: vec![BlockUse::Free; blocks],
            page_blocks: BTreeMap::new(),
            free_blocks: Vec::new(),
        };
        index.rebuild_free_list();
        index
    }

    /// Fault in the counts' memory now (one write per 4 KiB), so that the first snapshot
    /// does not: a VM snapshot of a new 4 GiB pool otherwise takes a page fault per 4 KiB
    /// of `ram_refs` while the vCPUs are paused (1,024 of them, each also an
    /// mmu-notifier round through KVM, the largest part of that pause measured).
    pub(super) fn prefault(&mut self) {
        fn touch<T: Copy>(v: &mut [T]) {
            let step = (4096 / std::mem::size_of::<T>()).max(1);
            for i in (0..v.len()).step_by(step) {
                let x = v[i];
                // SAFETY: `i` is in bounds; writing back what is there changes nothing
                // but cannot be optimised away.
                unsafe { std::ptr::write_volatile(&mut v[i], x) };
            }
        }
        touch(&mut self.ram_refs);
        touch(&mut self.block_refs);
        touch(&mut self.block_use);
        touch(&mut self.protected.words);
    }

    fn block_count(&self) -> u64 {
        self.block_use.len() as u64
    }

    // --- Reading -------------------------------------------------------------------

    /// Snapshots referencing RAM(p).
    pub(super) fn ram_refs(&self, p: u64) -> u32 {
        self.ram_refs[p as usize].wrapping_add(self.ram_base)
    }

    /// Every page's count, in page order.
    fn all_ram_refs(&self) -> impl Iterator<Item = u32> + '_ {
        let base = self.ram_base;
        self.ram_refs.iter().map(move |&n| n.wrapping_add(base))
    }

    /// Whether `page_set` is all of RAM (such a snapshot is counted in `ram_base`).
    fn is_all_of_ram(&self, page_set: &[PageRun]) -> bool {
        matches!(page_set, [r] if r.first == 0 && r.count == self.ram_refs.len() as u64)
    }

    /// Whether page p is marked protected (false beyond RAM).
    #[inline]
    pub(super) fn is_protected(&self, p: u64) -> bool {
        self.protected.get(p)
    }

    /// Every page some snapshot references as RAM(p), as runs.
    pub(super) fn protected_runs(&self) -> Vec<PageRun> {
        pages_to_runs(
            self.all_ram_refs()
                .enumerate()
                .filter(|&(_, n)| n > 0)
                .map(|(p, _)| p as u64),
        )
    }

    /// Whether block b holds nothing (b must be in range).
    pub(super) fn is_free(&self, b: u32) -> bool {
        self.block_use[b as usize] == BlockUse::Free
    }

    /// The recorded crc32c of block b, if it holds a preserved page.
    pub(super) fn block_crc(&self, b: u32) -> Option<u32> {
        self.page_blocks.get(&b).copied()
    }

    /// Blocks on the free list.
    pub(super) fn free_count(&self) -> u64 {
        self.free_blocks.len() as u64
    }

    /// The blocks of `records` (those of the snapshot a commit deletes) that only that
    /// snapshot references: they leave the catalog with it.
    pub(super) fn dropped_blocks(&self, records: &[Version]) -> HashSet<u32> {
        records
            .iter()
            .map(|v| v.block)
            .filter(|&b| self.block_refs[b as usize] == 1)
            .collect()
    }

    /// The (block, crc32c) list a catalog holds: every block holding a preserved page,
    /// less `dropped` ([`Self::dropped_blocks`]).
    pub(super) fn catalog_blocks(&self, dropped: &HashSet<u32>) -> Vec<(u32, u32)> {
        self.page_blocks
            .iter()
            .filter(|(b, _)| !dropped.contains(b))
            .map(|(&b, &c)| (b, c))
            .collect()
    }

    /// Pages and blocks in use, and what sharing saves.
    pub(super) fn counts(&self) -> RefCounts {
        let page = PAGE_SIZE as u64;
        let mut c = RefCounts {
            pages_in_blocks: self.page_blocks.len() as u64,
            blocks_free: self.free_count(),
            ..RefCounts::default()
        };
        for n in self.all_ram_refs() {
            c.pages_in_ram += u64::from(n > 0);
            c.shared_bytes += u64::from(n > 1) * page;
            c.saved_bytes += u64::from(n.saturating_sub(1)) * page;
        }
        for (b, u) in self.block_use.iter().enumerate() {
            match u {
                BlockUse::Blob => c.blob_blocks += 1,
                BlockUse::Page => {
                    let n = self.block_refs[b];
                    c.shared_bytes += u64::from(n > 1) * page;
                    c.saved_bytes += u64::from(n.saturating_sub(1)) * page;
                }
                BlockUse::Free => {}
            }
        }
        c
    }

    // --- Building it at open ---------------------------------------------------------

    /// Mark block b as holding (part of) a state blob.
    pub(super) fn mark_blob(&mut self, b: u32) {
        self.block_use[b as usize] = BlockUse::Blob;
        self.block_refs[b as usize] = 1;
    }

    /// Count a new snapshot's references: RAM(p) for every page it covers (nothing of
    /// it is preserved yet). Its blob blocks are marked apart ([`Self::mark_blob`]). A
    /// snapshot of all of RAM (a VM snapshot: a quarter of a million pages per GiB) is
    /// counted once, in `ram_base`; any other run by run. Protection is the caller's:
    /// it has protected the snapshot's unreferenced runs ([`Self::unreferenced_runs`],
    /// [`Self::set_protected`]), so every page of the snapshot is protected already.
    pub(super) fn add_snapshot_refs(&mut self, s: &Snapshot) {
        if self.is_all_of_ram(&s.page_set) {
            self.ram_base += 1;
            return;
        }
        for r in &s.page_set {
            self.add_ram_refs(r.first, r.count);
        }
    }

    /// Take the counts of an opened pool ([`count_refs`]): RAM references and
    /// protection, and the page blocks (blob blocks are marked already; a record naming
    /// one is corrupt). The free list is not updated.
    pub(super) fn load_counts(&mut self, c: &Counts) -> std::result::Result<(), String> {
        for (b, &n) in c.blocks.iter().enumerate() {
            if n > 0 {
                if self.block_use[b] == BlockUse::Blob {
                    return Err(format!("block {b} holds a state blob and a page"));
                }
                self.block_use[b] = BlockUse::Page;
                self.block_refs[b] = n;
            }
        }
        let mut runs = RunBuilder::default();
        for (p, &n) in c.ram.iter().enumerate() {
            if n > 0 {
                runs.push(p as u64);
            }
        }
        self.ram_refs.copy_from_slice(&c.ram);
        self.ram_base = 0;
        self.set_protected(&runs.runs, true);
        Ok(())
    }

    /// One more snapshot references RAM pages `first..first + count` in place.
    fn add_ram_refs(&mut self, first: u64, count: u64) {
        for refs in &mut self.ram_refs[first as usize..(first + count) as usize] {
            *refs = refs.wrapping_add(1);
        }
    }

    /// Keep the catalog's crc of block b if the block holds a preserved page. A listed
    /// block nobody references is not kept: it simply becomes free.
    pub(super) fn keep_block_crc(&mut self, b: u32, crc: u32) {
        if u64::from(b) < self.block_count() && self.block_use[b as usize] == BlockUse::Page {
            self.page_blocks.insert(b, crc);
        }
    }

    /// Recompute the free list from block usage (ascending allocation order).
    pub(super) fn rebuild_free_list(&mut self) {
        self.free_blocks = (0..self.block_count() as u32)
            .rev()
            .filter(|&b| self.block_use[b as usize] == BlockUse::Free)
            .collect();
    }

    // --- Changing it -------------------------------------------------------------------

    /// The block area grew to `block_count` blocks (more than now): the new blocks are
    /// free, and are allocated after every block free already (lowest first, as ever).
    pub(super) fn grow_blocks(&mut self, block_count: u64) {
        let old = self.block_count();
        debug_assert!(block_count >= old && block_count <= u64::from(u32::MAX));
        let n = block_count as usize;
        self.block_refs.resize(n, 0);
        self.block_use.resize(n, BlockUse::Free);
        let mut free: Vec<u32> = (old as u32..block_count as u32).rev().collect();
        free.extend_from_slice(&self.free_blocks);
        self.free_blocks = free;
    }

    /// Take `n` blocks off the free list (lowest first). They stay `Free` until marked
    /// used; give them back with [`Self::unalloc`] if the operation fails.
    pub(super) fn alloc_blocks(&mut self, n: u64) -> Result<Vec<u32>> {
        if self.free_count() < n {
            return Err(self.full(n));
        }
        let at = self.free_blocks.len() - n as usize;
        let mut v = self.free_blocks.split_off(at);
        v.reverse();
        Ok(v)
    }

    /// One block, as [`Self::alloc_blocks`] (the fault path: no vector).
    pub(super) fn alloc_block(&mut self) -> Result<u32> {
        self.free_blocks.pop().ok_or_else(|| self.full(1))
    }

    fn full(&self, needed: u64) -> PoolError {
        PoolError::BlockAreaFull {
            needed,
            free: self.free_count(),
            total: self.block_count(),
        }
    }

    /// Put blocks taken by `alloc_blocks` back, so they are allocated again in the same
    /// order.
    pub(super) fn unalloc(&mut self, blocks: &[u32]) {
        self.free_blocks.extend(blocks.iter().rev());
    }

    /// Set or clear the protection of `runs` (a snapshot marks its new pages before its
    /// protect step and clears them again if it aborts).
    pub(super) fn set_protected(&mut self, runs: &[PageRun], on: bool) {
        for r in runs {
            self.protected.set_range(r.first, r.count, on);
        }
    }

    /// The runs of `page_set` (ascending, disjoint, inside RAM) that no snapshot
    /// references yet: what a new snapshot of it has to protect. Read from the
    /// protection bitmap, a word (64 pages) at a time.
    pub(super) fn unreferenced_runs(&self, page_set: &[PageRun]) -> Vec<PageRun> {
        let mut newly = RunBuilder::default();
        for r in page_set {
            self.protected.push_clear(r.first, r.count, &mut newly);
        }
        newly.runs
    }

    /// Page p, referenced in place by `n` snapshots (all of them), is now preserved in
    /// block b (taken by `alloc_block`) with crc32c `crc`: the references move from
    /// RAM(p) to b, and p is no longer protected.
    pub(super) fn apply_redirect(&mut self, p: u64, b: u32, crc: u32, n: u32) {
        debug_assert_eq!(n, self.ram_refs(p));
        self.block_refs[b as usize] = n;
        self.block_use[b as usize] = BlockUse::Page;
        self.page_blocks.insert(b, crc);
        self.ram_refs[p as usize] = 0u32.wrapping_sub(self.ram_base);
        self.protected.set(p, false);
    }

    /// Drop every reference of snapshot `s` (deleted), whose redirect records are
    /// `records` (by page): blocks nothing references any more go back to the free
    /// list, and pages no snapshot references any more are unprotected and returned, as
    /// runs.
    pub(super) fn release(&mut self, s: &Snapshot, records: &[Version]) -> Vec<PageRun> {
        let mut unprotected = RunBuilder::default();
        if self.is_all_of_ram(&s.page_set) && self.ram_base > 0 {
            // Counted in the base: one less for every page, then one back for each page
            // it held in a block (its count never included s).
            self.ram_base -= 1;
            for v in records {
                self.block_refs[v.block as usize] -= 1;
                if self.block_refs[v.block as usize] == 0 {
                    self.free_block(v.block);
                }
                let n = &mut self.ram_refs[v.page as usize];
                *n = n.wrapping_add(1);
            }
            let base = self.ram_base;
            for (p, &n) in self.ram_refs.iter().enumerate() {
                if n.wrapping_add(base) == 0 && self.protected.get(p as u64) {
                    unprotected.push(p as u64);
                }
            }
        } else if records.is_empty() {
            for r in &s.page_set {
                let base = self.ram_base;
                let refs = &mut self.ram_refs[r.first as usize..r.end() as usize];
                for (i, n) in refs.iter_mut().enumerate() {
                    *n = n.wrapping_sub(1);
                    if n.wrapping_add(base) == 0 {
                        unprotected.push(r.first + i as u64);
                    }
                }
            }
        } else {
            let mut red = records.iter().peekable();
            for p in s.pages() {
                if red.peek().is_some_and(|v| v.page == p) {
                    let b = red.next().expect("peeked").block;
                    self.block_refs[b as usize] -= 1;
                    if self.block_refs[b as usize] == 0 {
                        self.free_block(b);
                    }
                } else {
                    let n = &mut self.ram_refs[p as usize];
                    *n = n.wrapping_sub(1);
                    if n.wrapping_add(self.ram_base) == 0 {
                        unprotected.push(p);
                    }
                }
            }
        }
        for &b in &s.blob.blocks {
            self.free_block(b);
        }
        let runs = unprotected.runs;
        self.set_protected(&runs, false);
        runs
    }

    fn free_block(&mut self, b: u32) {
        self.block_use[b as usize] = BlockUse::Free;
        self.block_refs[b as usize] = 0;
        self.page_blocks.remove(&b);
        self.free_blocks.push(b);
    }

    /// Recount every reference from `snapshots` and their redirects (gc): pages counted
    /// as referenced that none references are unprotected, blocks in use that none
    /// references are freed. Returns (pages unprotected, blocks reclaimed).
    pub(super) fn recount<'a>(
        &mut self,
        snapshots: impl IntoIterator<Item = &'a Snapshot> + Clone,
        redirects: &Redirects,
    ) -> Result<(u64, u64)> {
        let c = count_refs(
            self.ram_refs.len() as u64,
            self.block_count(),
            snapshots.clone(),
            redirects,
        )
        .map_err(PoolError::Corrupt)?;
        let (ram, mut blk) = (c.ram, c.blocks);
        for s in snapshots {
            for &b in &s.blob.blocks {
                blk[b as usize] += 1;
            }
        }
        let (mut unprotected, mut reclaimed) = (0, 0);
        for (p, &n) in ram.iter().enumerate() {
            if n == 0 && self.ram_refs(p as u64) != 0 {
                unprotected += 1;
                self.protected.set(p as u64, false);
            }
        }
        self.ram_refs = ram;
        self.ram_base = 0;
        for (b, &n) in blk.iter().enumerate() {
            if n == 0 && self.block_use[b] != BlockUse::Free {
                reclaimed += 1;
                self.block_use[b] = BlockUse::Free;
                self.page_blocks.remove(&(b as u32));
            }
        }
        self.block_refs = blk;
        self.rebuild_free_list();
        Ok((unprotected, reclaimed))
    }

    /// Break the counts as a lost update would: page `p` counted (and protected) with
    /// no referrer, block `b` in use with none (for gc's tests).
    #[cfg(test)]
    pub(super) fn simulate_leak(&mut self, p: u64, b: u32) {
        self.block_use[b as usize] = BlockUse::Page;
        self.free_blocks.retain(|&f| f != b);
        self.ram_refs[p as usize] = 1u32.wrapping_sub(self.ram_base);
        self.protected.set(p, true);
    }
}

/// One bit per RAM page, set while any snapshot references RAM(p). Only the index
/// changes it; [`crate::Pool::is_protected`] reads it.
#[derive(Debug)]
struct ProtectionBitmap {
    words: Box<[u64]>,
    pages: u64,
}

impl ProtectionBitmap {
    /// All-clear bitmap for `pages` pages.
    fn new(pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        ProtectionBitmap {
            words: vec![0; n].into_boxed_slice(),
            pages,
        }
    }

    /// Whether page p is protected (false for pages beyond the RAM area).
    #[inline]
    fn get(&self, p: u64) -> bool {
        if p >= self.pages {
            return false;
        }
        self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Set or clear page p (ignored beyond the RAM area).
    #[inline]
    fn set(&mut self, p: u64, on: bool) {
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

    /// Push the clear pages of `first..first+count` (inside the bitmap) onto `out`. The
    /// whole words inside the range go by runs of words: the first snapshot of a 4 GiB
    /// guest reads 16,384 words (all clear), the next ones as many (all set), inside
    /// the pause.
    fn push_clear(&self, first: u64, count: u64, out: &mut RunBuilder) {
        let end = first.saturating_add(count).min(self.pages);
        let (a, b) = (first.div_ceil(64), end / 64);
        if first >= end || a >= b {
            self.push_clear_bits(first, end, out);
            return;
        }
        self.push_clear_bits(first, a * 64, out);
        let words = &self.words[a as usize..b as usize];
        let mut i = 0;
        while i < words.len() {
            let same = |v: u64| words[i..].iter().position(|&w| w != v);
            match words[i] {
                u64::MAX => i += same(u64::MAX).unwrap_or(words.len() - i),
                0 => {
                    let n = same(0).unwrap_or(words.len() - i);
                    out.push_run(PageRun::new((a + i as u64) * 64, n as u64 * 64));
                    i += n;
                }
                _ => {
                    let p = (a + i as u64) * 64;
                    self.push_clear_bits(p, p + 64, out);
                    i += 1;
                }
            }
        }
        self.push_clear_bits(b * 64, end, out);
    }

    /// [`Self::push_clear`] of pages `first..end`, a word at a time.
    fn push_clear_bits(&self, first: u64, end: u64, out: &mut RunBuilder) {
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let clear = !self.words[(p / 64) as usize] >> bit;
            let clear = if n == 64 {
                clear
            } else {
                clear & ((1u64 << n) - 1)
            };
            let mut c = clear;
            while c != 0 {
                let i = u64::from(c.trailing_zeros());
                let len = u64::from((!(c >> i)).trailing_zeros()).min(n - i);
                out.push_run(PageRun::new(p + i, len));
                c &= !(if len == 64 {
                    u64::MAX
                } else {
                    ((1u64 << len) - 1) << i
                });
            }
            p += n;
        }
    }

    /// Set or clear pages `first..first+count`: the whole words inside in one fill
    /// (snapshot and delete of large runs cover up to all of RAM).
    fn set_range(&mut self, first: u64, count: u64, on: bool) {
        let end = first.saturating_add(count).min(self.pages);
        let (a, b) = (first.div_ceil(64), end / 64);
        if first >= end || a >= b {
            self.set_bits(first, end, on);
            return;
        }
        self.set_bits(first, a * 64, on);
        self.words[a as usize..b as usize].fill(if on { u64::MAX } else { 0 });
        self.set_bits(b * 64, end, on);
    }

    /// [`Self::set_range`] of pages `first..end`, a word at a time.
    fn set_bits(&mut self, first: u64, end: u64, on: bool) {
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
    use crate::catalog::BlobRef;

    fn snap(id: u64, runs: &[PageRun], blob: &[u32]) -> Snapshot {
        let mut s = crate::testutil::vm_record(id, runs);
        s.blob = BlobRef {
            len: blob.len() as u64,
            crc: 0,
            blocks: blob.to_vec(),
        };
        s
    }

    impl RefIndex {
        /// The invariants of the module docs.
        fn check(&self) -> std::result::Result<(), String> {
            for (p, n) in self.all_ram_refs().enumerate() {
                if self.protected.get(p as u64) != (n > 0) {
                    return Err(format!("page {p}: {n} refs, protected {}", n == 0));
                }
            }
            let mut on_list = vec![0u32; self.block_use.len()];
            for &b in &self.free_blocks {
                on_list[b as usize] += 1;
            }
            for (b, u) in self.block_use.iter().enumerate() {
                let (refs, crc) = (
                    self.block_refs[b],
                    self.page_blocks.contains_key(&(b as u32)),
                );
                let ok = match u {
                    BlockUse::Free => refs == 0 && !crc && on_list[b] == 1,
                    BlockUse::Page => refs >= 1 && crc && on_list[b] == 0,
                    BlockUse::Blob => refs == 1 && !crc && on_list[b] == 0,
                };
                if !ok {
                    return Err(format!(
                        "block {b}: {u:?}, {refs} refs, crc {crc}, {} times free",
                        on_list[b]
                    ));
                }
            }
            Ok(())
        }

        /// A new snapshot as `Pool::snapshot_with` records it once committed: its new
        /// pages protected, its references counted, its blob blocks marked.
        fn take(&mut self, s: &Snapshot) -> Vec<PageRun> {
            let newly = self.unreferenced_runs(&s.page_set);
            self.set_protected(&newly, true);
            self.add_snapshot_refs(s);
            for &b in &s.blob.blocks {
                self.mark_blob(b);
            }
            newly
        }

        /// Preserve page p for `snaps` as `Pool::preserve` does.
        fn preserve(&mut self, snaps: &[Snapshot], red: &mut Redirects, p: u64, crc: u32) -> u32 {
            let b = self.alloc_block().expect("a free block");
            let upto = snaps.last().expect("a snapshot").id;
            red.add(Version {
                page: p,
                upto,
                block: b,
            });
            self.apply_redirect(p, b, crc, self.ram_refs(p));
            b
        }

        /// Delete a snapshot as `Pool::delete` does.
        fn delete(&mut self, s: &Snapshot, red: &mut Redirects) -> Vec<PageRun> {
            let records = red.of(s);
            let runs = self.release(s, &records);
            for v in records {
                if self.is_free(v.block) {
                    red.remove(v);
                }
            }
            runs
        }
    }

    #[test]
    fn new_index_is_empty_and_allocates_lowest_first() {
        let mut ix = RefIndex::new(100, 8);
        ix.check().expect("invariants");
        assert!(ix.protected_runs().is_empty() && !ix.is_protected(0));
        assert_eq!(ix.free_count(), 8);
        let got = ix.alloc_blocks(3).expect("alloc");
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(ix.alloc_block().expect("alloc"), 3);
        ix.unalloc(&[3]);
        ix.unalloc(&got);
        ix.check().expect("all back on the list");
        assert_eq!(ix.alloc_blocks(4).expect("again"), vec![0, 1, 2, 3]);
        assert!(matches!(
            ix.alloc_blocks(5),
            Err(PoolError::BlockAreaFull {
                needed: 5,
                free: 4,
                total: 8
            })
        ));
        assert_eq!(ix.alloc_blocks(4).expect("the rest"), vec![4, 5, 6, 7]);
        assert!(matches!(
            ix.alloc_block(),
            Err(PoolError::BlockAreaFull {
                needed: 1,
                free: 0,
                total: 8
            })
        ));
    }

    #[test]
    fn snapshots_preserve_and_release_keep_the_counts() {
        let mut ix = RefIndex::new(32, 16);
        let blob = ix.alloc_blocks(1).expect("blob block");
        let mut snaps = vec![snap(1, &[PageRun::new(0, 16)], &blob)];
        assert_eq!(ix.take(&snaps[0]), vec![PageRun::new(0, 16)]);
        ix.check().expect("after a");
        snaps.push(snap(2, &[PageRun::new(8, 16)], &[]));
        assert_eq!(
            ix.take(&snaps[1]),
            vec![PageRun::new(16, 8)],
            "only the pages a does not hold yet"
        );
        ix.check().expect("after b");
        assert_eq!((ix.ram_refs(9), ix.ram_refs(2), ix.ram_refs(30)), (2, 1, 0));
        let mut red = Redirects::new();
        let shared = ix.preserve(&snaps, &mut red, 9, 0x99);
        let a_only = ix.preserve(&snaps, &mut red, 2, 0x22);
        assert_eq!(red.get(&snaps[0], 9), Some(shared));
        assert_eq!(red.get(&snaps[1], 9), Some(shared));
        assert_eq!(red.get(&snaps[0], 2), Some(a_only));
        assert_eq!(red.get(&snaps[1], 2), None, "b does not cover page 2");
        ix.check().expect("after preserves");
        assert!(!ix.is_protected(9) && !ix.is_protected(2) && ix.is_protected(3));
        assert_eq!(ix.block_crc(shared), Some(0x99));
        let c = ix.counts();
        assert_eq!(
            (
                c.pages_in_ram,
                c.pages_in_blocks,
                c.blob_blocks,
                c.blocks_free
            ),
            (22, 2, 1, 13)
        );
        // Pages 8 and 10..16 are shared in place, page 9 in its block.
        assert_eq!(c.shared_bytes, 8 * PAGE_SIZE as u64);
        assert_eq!(c.saved_bytes, 8 * PAGE_SIZE as u64);
        assert_eq!(
            ix.catalog_blocks(&ix.dropped_blocks(&red.of(&snaps[0]))),
            vec![(shared, 0x99)],
            "a's own block goes with a, the shared one stays"
        );
        let a = snaps.remove(0);
        assert_eq!(
            ix.delete(&a, &mut red),
            vec![PageRun::new(0, 2), PageRun::new(3, 5)]
        );
        ix.check().expect("after deleting a");
        assert!(ix.is_free(a_only) && ix.is_free(blob[0]) && !ix.is_free(shared));
        assert_eq!(ix.catalog_blocks(&HashSet::new()), vec![(shared, 0x99)]);
        assert_eq!(red.len(), 1, "a's own record went with its block");
        let b = snaps.remove(0);
        assert_eq!(
            ix.delete(&b, &mut red),
            vec![PageRun::new(8, 1), PageRun::new(10, 14)]
        );
        ix.check().expect("after deleting b");
        assert!(red.is_empty());
        assert_eq!(ix.counts(), RefIndex::new(32, 16).counts());
        assert_eq!(ix.free_count(), 16);
    }

    /// What `Pool::open` rebuilds from the snapshots and the catalog's crc list equals
    /// what the operations had built.
    #[test]
    fn rebuilding_from_the_snapshots_gives_the_same_index() {
        let mut ix = RefIndex::new(64, 32);
        let mut snaps = Vec::new();
        let mut red = Redirects::new();
        for (id, runs) in [
            (1, vec![PageRun::new(0, 40)]),
            (2, vec![PageRun::new(10, 5), PageRun::new(30, 30)]),
            (3, vec![PageRun::new(12, 1)]),
        ] {
            let blob = ix.alloc_blocks(id).expect("blob");
            snaps.push(snap(id, &runs, &blob));
            ix.take(&snaps[snaps.len() - 1]);
            for p in [12, 13, 35, 50 + id] {
                if ix.ram_refs(p) > 0 {
                    ix.preserve(&snaps, &mut red, p, p as u32);
                }
            }
        }
        for p in [14, 31, 38] {
            let b = ix.preserve(&snaps, &mut red, p, p as u32);
            assert_eq!(ix.block_refs[b as usize], 2, "page {p} shared by 1 and 2");
        }
        ix.check().expect("built by operations");
        let mut re = RefIndex::new(64, 32);
        for s in &snaps {
            for &b in &s.blob.blocks {
                re.mark_blob(b);
            }
        }
        let counts = count_refs(64, 32, &snaps, &red).expect("counts");
        assert!(counts.dead.is_empty());
        re.load_counts(&counts).expect("load");
        for (b, crc) in ix.catalog_blocks(&HashSet::new()) {
            re.keep_block_crc(b, crc);
        }
        re.keep_block_crc(31, 7); // listed but unreferenced: dropped
        re.rebuild_free_list();
        re.check().expect("rebuilt");
        assert_eq!(
            re.all_ram_refs().collect::<Vec<_>>(),
            ix.all_ram_refs().collect::<Vec<_>>()
        );
        assert_eq!(re.block_refs, ix.block_refs);
        assert_eq!(re.block_use, ix.block_use);
        assert_eq!(re.page_blocks, ix.page_blocks);
        assert_eq!(re.protected.words, ix.protected.words);
        let mut free = ix.free_blocks.clone();
        free.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(re.free_blocks, free);
    }

    #[test]
    fn grown_blocks_are_free_and_allocated_after_the_old_free_ones() {
        let mut ix = RefIndex::new(8, 4);
        let snaps = vec![snap(1, &[PageRun::new(0, 8)], &[])];
        ix.take(&snaps[0]);
        let b0 = ix.preserve(&snaps, &mut Redirects::new(), 0, 10);
        let got = ix.alloc_blocks(2).expect("two of the three free");
        ix.unalloc(&got);
        assert_eq!((b0, got.as_slice()), (0, &[1, 2][..]));
        ix.grow_blocks(7);
        ix.check().expect("invariants after growing");
        assert_eq!(ix.free_count(), 6);
        assert!(ix.is_free(6) && !ix.is_free(0));
        assert_eq!(
            ix.alloc_blocks(6).expect("all free blocks"),
            vec![1, 2, 3, 4, 5, 6]
        );
        assert!(matches!(
            ix.alloc_block(),
            Err(PoolError::BlockAreaFull {
                needed: 1,
                free: 0,
                total: 7
            })
        ));
    }

    #[test]
    fn recount_repairs_a_leak() {
        let mut ix = RefIndex::new(8, 8);
        let snaps = vec![snap(1, &[PageRun::new(0, 2)], &[])];
        ix.take(&snaps[0]);
        ix.simulate_leak(6, 5);
        assert!(ix.check().is_err());
        let red = Redirects::new();
        assert_eq!(ix.recount(&snaps, &red).expect("recount"), (1, 1));
        ix.check().expect("repaired");
        assert!(!ix.is_protected(6) && ix.is_protected(1));
        assert_eq!(ix.free_count(), 8);
        assert_eq!(
            ix.recount(&snaps, &red).expect("recount"),
            (0, 0),
            "nothing more to repair"
        );
    }

    /// Snapshots of all of RAM are counted in the base: counts, protection and what a
    /// delete unprotects match a recount from the snapshots, whatever the order of
    /// full and partial snapshots, preserves and deletes.
    #[test]
    fn snapshots_of_all_of_ram_are_counted_once_and_stay_exact() {
        let pages = 40;
        let all = [PageRun::new(0, pages)];
        let mut ix = RefIndex::new(pages, 32);
        let mut red = Redirects::new();
        let mut snaps: Vec<Snapshot> = Vec::new();
        let agree = |ix: &RefIndex, snaps: &[Snapshot], red: &Redirects, when: &str| {
            ix.check().unwrap_or_else(|e| panic!("{when}: {e}"));
            let c = count_refs(pages, 32, snaps, red).expect("counts");
            assert_eq!(ix.all_ram_refs().collect::<Vec<_>>(), c.ram, "{when}");
        };
        snaps.push(snap(1, &all, &[]));
        assert_eq!(ix.take(&snaps[0]), all.to_vec());
        assert_eq!((ix.ram_base, ix.ram_refs(7)), (1, 1), "counted once");
        ix.preserve(&snaps, &mut red, 5, 5);
        assert_eq!(ix.ram_refs(5), 0);
        agree(&ix, &snaps, &red, "a full snapshot, page 5 preserved");
        snaps.push(snap(2, &[PageRun::new(0, 10)], &[]));
        assert_eq!(ix.take(&snaps[1]), vec![PageRun::new(5, 1)]);
        snaps.push(snap(3, &all, &[]));
        assert_eq!(ix.take(&snaps[2]), Vec::<PageRun>::new());
        assert_eq!((ix.ram_refs(5), ix.ram_refs(6), ix.ram_refs(20)), (2, 3, 2));
        for p in [6, 20, 5] {
            ix.preserve(&snaps, &mut red, p, p as u32);
        }
        agree(&ix, &snaps, &red, "three snapshots, pages preserved");
        // Delete the first full snapshot: it held 5 in a block of its own.
        let s1 = snaps.remove(0);
        assert_eq!(ix.delete(&s1, &mut red), Vec::<PageRun>::new());
        agree(&ix, &snaps, &red, "first full snapshot deleted");
        ix.preserve(&snaps, &mut red, 30, 30);
        // The partial one: pages 0..10 but 5 and 6 (in blocks) keep the other's count.
        let s2 = snaps.remove(0);
        assert_eq!(ix.delete(&s2, &mut red), Vec::<PageRun>::new());
        agree(&ix, &snaps, &red, "partial deleted");
        // The last: every page still in RAM is unprotected, none in a block is listed.
        let s3 = snaps.remove(0);
        let in_ram: Vec<u64> = (0..pages).filter(|&p| ix.ram_refs(p) > 0).collect();
        assert_eq!(ix.delete(&s3, &mut red), pages_to_runs(in_ram));
        agree(&ix, &snaps, &red, "all deleted");
        assert_eq!(ix.counts(), RefIndex::new(pages, 32).counts());
        assert!(red.is_empty() && ix.protected_runs().is_empty());
        // A recount resets the base and keeps the counts.
        snaps.push(snap(4, &all, &[]));
        ix.take(&snaps[0]);
        ix.preserve(&snaps, &mut red, 3, 3);
        assert_eq!(ix.recount(&snaps, &red).expect("recount"), (0, 0));
        assert_eq!(ix.ram_base, 0);
        agree(&ix, &snaps, &red, "recounted");
    }

    #[test]
    fn bitmap_push_clear_matches_per_page() {
        let mut b = ProtectionBitmap::new(200);
        for (first, count) in [(0, 3), (5, 60), (70, 1), (128, 64), (199, 1)] {
            b.set_range(first, count, true);
        }
        for (first, count) in [
            (0, 200),
            (1, 199),
            (64, 64),
            (63, 2),
            (190, 10),
            (4, 0),
            (128, 72),
            (64, 136),
            (3, 125),
        ] {
            let mut got = RunBuilder::default();
            b.push_clear(first, count, &mut got);
            let want = pages_to_runs((first..first + count).filter(|&p| !b.get(p)));
            assert_eq!(got.runs, want, "{first}+{count}");
        }
        let mut got = RunBuilder::default();
        ProtectionBitmap::new(200).push_clear(0, 200, &mut got);
        assert_eq!(got.runs, vec![PageRun::new(0, 200)]);
    }

    #[test]
    fn bitmap_set_get_clear() {
        let mut b = ProtectionBitmap::new(130);
        assert!(!b.get(129));
        b.set(129, true);
        b.set(0, true);
        assert!(b.get(129) && b.get(0) && !b.get(1));
        b.set(129, false);
        assert!(!b.get(129));
        b.set(500, true);
        assert!(!b.get(500));
        assert_eq!(b.pages, 130);
    }

    #[test]
    fn bitmap_set_range_matches_per_page() {
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
