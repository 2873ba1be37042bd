//! Reading a list of pages in order, as an import does ([`Repo::read_page_list`]), fast:
//! pages whose chunks lie close together in one pack form a **span**, read with one
//! ranged read (or from the pack cache's blocks), and several workers fetch and check
//! spans at once while the caller's thread hands the checked pages out in order,
//! straight from the fetched buffers.
//!
//! Nothing is trusted more than on the page-by-page path (`read.rs`): every chunk's
//! length, crc32c and BLAKE3 hash are checked before it is handed out; a span read
//! partly from the cache that fails a check has its blocks dropped and is read from the
//! storage once more; a damaged or missing pack is an error naming the pack, the chunk
//! and the page, reported after the good pages before it and never as a wrong page.
//!
//! Memory is bounded: at most [`WORKERS`] + [`AHEAD`] spans of at most [`SPAN_MAX`]
//! bytes (plus a chunk) are held at once, whatever the snapshot's size.
//!
//! With a pack cache, spans are aligned to its blocks: a span fetches the whole blocks
//! its chunks start in (and the tail of a chunk that crosses into the next block), the
//! blocks it fetched whole go into the cache's files once its chunks are
//! checked, and a span that needs a block an earlier span is fetching waits for it to be
//! cached instead of fetching it again. So each block is fetched once, and a later
//! import or lazy restore of shared content fetches nothing; the pages themselves come
//! from memory, never read back from the cache's files.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::cache::{BlockId, CACHE_BLOCK};
use crate::error::{RepoError, Result};
use crate::format::{check_chunk, hex, pack_key, Hash32, IndexEntry, Target};
use crate::meta::{find, Manifest};
use crate::read::LoadedIndex;
use crate::repo::Repo;
use crate::PAGE_SIZE;

/// Most bytes of a pack one span covers (one ranged read).
pub(crate) const SPAN_MAX: u64 = 4 << 20;
/// Longest stretch of unneeded bytes between two chunks of one span.
const GAP_MAX: u64 = 64 << 10;
/// Spans fetched and checked at once (ranged reads in flight, and checking threads).
pub(crate) const WORKERS: usize = 8;
/// Checked spans that may wait for the caller beyond those being worked on.
const AHEAD: u64 = 4;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Most ranges of packs one span reads (a page repeated from elsewhere, or from
/// another pack, is in another range rather than ending the span).
const MAX_RANGES: usize = 4;
/// Most pages in one span.
const MAX_PAGES: usize = 2048;

/// Pages read together: their chunks lie in a few ranges of packs.
struct Span {
    ranges: Vec<Range>,
    /// Per page: its range, the chunk's number in the pack and its index entry.
    chunks: Vec<(usize, u64, IndexEntry)>,
}

/// Chunks of one pack close together, read with one ranged read (or from the cache).
struct Range {
    slot: u32,
    pack: Hash32,
    pack_len: u64,
    /// The first chunk's offset (the window starts there, or at its cache block).
    first: u64,
    /// From the lowest chunk's content to the end of the highest one's.
    lo: u64,
    hi: u64,
    /// The highest chunk's offset.
    last_start: u64,
    /// Cache blocks it needs that an earlier span is fetching, with that span's
    /// number: it waits for them to be cached rather than fetch them again.
    waits: Vec<(BlockId, u64)>,
}

/// The next stretch of the page list: `at` is the index of its first page.
struct Planned {
    at: usize,
    kind: Kind,
}

enum Kind {
    /// This many zero pages.
    Zeros(usize),
    Span(Span),
    /// The page at `at` cannot be read; nothing after it is planned.
    Fail(RepoError),
}

/// A planned stretch after its work: what the caller hands out.
enum Done {
    Zeros(usize),
    /// Checked pages: page `i` is `bufs[k][o..o + PAGE_SIZE]` with `(k, o) = offs[i]`;
    /// then, if a chunk of the span failed, the error (the pages before it are good).
    Pages {
        bufs: Vec<Vec<u8>>,
        offs: Vec<(usize, usize)>,
        then: Option<RepoError>,
    },
    Fail(RepoError),
}

/// Cuts the page list into spans, in order.
struct Planner<'a> {
    repo: &'a Repo,
    m: &'a Manifest,
    pages: &'a [u64],
    next: usize,
    /// Spans aligned to cache blocks (there is a cache).
    aligned: bool,
    /// Indexes already checked against the manifest's pin, by pack slot.
    slots: HashMap<u32, Arc<LoadedIndex>>,
    failed: bool,
    /// Cache blocks being fetched, and the sequence number of the span fetching each.
    inflight: HashMap<BlockId, u64>,
}

impl Planner<'_> {
    /// The index entry of chunk `entry` of pack slot `slot`, its pack and the pack's
    /// length; errors (a missing or damaged index) named for `page`.
    fn locate(&mut self, slot: u32, entry: u64, page: u64) -> Result<(IndexEntry, Hash32, u64)> {
        if let Some(li) = self.slots.get(&slot) {
            if let Some(e) = usize::try_from(entry)
                .ok()
                .and_then(|i| li.idx.entries.get(i))
            {
                return Ok((*e, li.idx.pack, li.idx.pack_len));
            }
        }
        // First use of the slot, or an entry beyond its index: the checked way, which
        // names the problem.
        let (e, pack) = self
            .repo
            .entry(self.m, slot, entry, &format!("page {page}"))?;
        let li = self.repo.load_index(&pack)?;
        let pack_len = li.idx.pack_len;
        self.slots.insert(slot, li);
        Ok((e, pack, pack_len))
    }

    /// Whether chunk `e` of pack slot `slot` can join range `s`: same pack, not far past
    /// its last byte, inside its window (SPAN_MAX bytes from its first chunk, or from
    /// that chunk's cache block; a chunk behind it in the window, such as a repeated
    /// page, joins too).
    fn joins(&self, s: &Range, slot: u32, e: &IndexEntry) -> bool {
        let start = if self.aligned {
            s.first / CACHE_BLOCK * CACHE_BLOCK
        } else {
            s.first
        };
        let end = e.offset.saturating_add(u64::from(e.len));
        slot == s.slot
            && e.offset >= start
            && e.offset <= s.hi.saturating_add(GAP_MAX)
            && if self.aligned {
                e.offset < start + SPAN_MAX
            } else {
                end <= start + SPAN_MAX
            }
    }

    /// The next stretch, planned as number `seq`; its span claims the cache blocks
    /// nobody is fetching.
    fn next_planned(&mut self, seq: u64) -> Option<Planned> {
        let mut p = self.plan_next()?;
        let Kind::Span(s) = &mut p.kind else {
            return Some(p);
        };
        for r in s.ranges.iter_mut().filter(|_| self.aligned) {
            // Claim the blocks it fetches whole; wait for those others are fetching.
            let (flo, fhi) = aligned_range(r);
            for id in span_blocks(r.pack, flo, fhi) {
                let end = (id.1 * CACHE_BLOCK + CACHE_BLOCK).min(r.pack_len);
                match self.inflight.get(&id) {
                    Some(&owner) if owner != seq => r.waits.push((id, owner)),
                    Some(_) => {}
                    None if end <= fhi => {
                        self.inflight.insert(id, seq);
                    }
                    None => {}
                }
            }
        }
        Some(p)
    }

    fn plan_next(&mut self) -> Option<Planned> {
        if self.failed || self.next >= self.pages.len() {
            return None;
        }
        let at = self.next;
        let mut span: Option<Span> = None;
        let mut zeros = 0usize;
        while let Some(&page) = self.pages.get(self.next) {
            let open = span.is_some() || zeros > 0;
            let fail = |e| Planned {
                at,
                kind: Kind::Fail(e),
            };
            match find(&self.m.body.pages, page) {
                None if open => break,
                None => {
                    self.failed = true;
                    return Some(fail(RepoError::NoSuchPage {
                        snapshot: self.m.name().to_string(),
                        page,
                    }));
                }
                Some((Target::Zero, _)) if span.is_some() => break,
                Some((Target::Zero, _)) => zeros += 1,
                Some((Target::Chunks { .. }, _)) if zeros > 0 => break,
                Some((Target::Chunks { pack: slot, entry }, off)) => {
                    let entry = u64::from(entry) + off;
                    let (e, pack, pack_len) = match self.locate(slot, entry, page) {
                        Ok(x) => x,
                        // Hand out what came before; the error comes next.
                        Err(_) if open => break,
                        Err(err) => {
                            self.failed = true;
                            return Some(fail(err));
                        }
                    };
                    let end = e.offset.saturating_add(u64::from(e.len));
                    let s = span.get_or_insert_with(|| Span {
                        ranges: Vec::new(),
                        chunks: Vec::new(),
                    });
                    if s.chunks.len() >= MAX_PAGES {
                        break;
                    }
                    let k = match s.ranges.iter().position(|r| self.joins(r, slot, &e)) {
                        Some(k) => {
                            let r = &mut s.ranges[k];
                            r.lo = r.lo.min(e.offset);
                            r.hi = r.hi.max(end);
                            r.last_start = r.last_start.max(e.offset);
                            k
                        }
                        None if s.ranges.len() < MAX_RANGES => {
                            s.ranges.push(Range {
                                slot,
                                pack,
                                pack_len,
                                first: e.offset,
                                lo: e.offset,
                                hi: end,
                                last_start: e.offset,
                                waits: Vec::new(),
                            });
                            s.ranges.len() - 1
                        }
                        None => break,
                    };
                    s.chunks.push((k, entry, e));
                }
            }
            self.next += 1;
        }
        let kind = match span {
            Some(s) => Kind::Span(s),
            None => Kind::Zeros(zeros),
        };
        Some(Planned { at, kind })
    }
}

/// What the workers and the caller share.
struct State<'a> {
    planner: Planner<'a>,
    /// Sequence number of the next planned stretch.
    next_seq: u64,
    /// The caller has taken every stretch before this one.
    taken: u64,
    done: BTreeMap<u64, (usize, Done)>,
    /// The planner has nothing more.
    planned_all: bool,
    /// The caller gave up (an error): workers stop.
    stop: bool,
    /// Workers still running.
    workers: usize,
}

impl State<'_> {
    /// Span `seq` is done with the blocks it claimed (they are cached, or it failed).
    fn release(&mut self, seq: u64) {
        self.planner.inflight.retain(|_, owner| *owner != seq);
    }
}

struct Shared<'a> {
    state: Mutex<State<'a>>,
    cv: Condvar,
}

impl<'a> Shared<'a> {
    fn lock(&self) -> MutexGuard<'_, State<'a>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn wait<'g>(&self, g: MutexGuard<'g, State<'a>>) -> MutexGuard<'g, State<'a>> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a worker out when it ends, even by a panic, and releases the blocks of the
/// span it had, so nobody waits for work nobody will do.
struct WorkerGone<'s, 'a> {
    shared: &'s Shared<'a>,
    seq: Option<u64>,
}

impl Drop for WorkerGone<'_, '_> {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        g.workers -= 1;
        if let Some(seq) = self.seq {
            g.release(seq);
        }
        drop(g);
        self.shared.cv.notify_all();
    }
}

impl Repo {
    /// Read the given pages in order, calling `f` with each, every chunk checked. Pages
    /// whose chunks lie close together in one pack are read together (one ranged read
    /// of up to 4 MiB, or the pack cache's blocks; blocks fetched whole are added to the
    /// cache), and 8 workers fetch and check such spans at once, a bounded distance
    /// ahead of `f`. The first error (of a read, in page order, or of `f`) ends it.
    pub fn read_page_list(
        &self,
        m: &Manifest,
        pages: &[u64],
        f: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]) -> Result<()>,
    ) -> Result<()> {
        self.load_manifest_indexes(m);
        let shared = Shared {
            state: Mutex::new(State {
                planner: Planner {
                    repo: self,
                    m,
                    pages,
                    next: 0,
                    aligned: self.cache.is_some(),
                    slots: HashMap::new(),
                    failed: false,
                    inflight: HashMap::new(),
                },
                next_seq: 0,
                taken: 0,
                done: BTreeMap::new(),
                planned_all: false,
                stop: false,
                workers: WORKERS,
            }),
            cv: Condvar::new(),
        };
        std::thread::scope(|s| {
            for _ in 0..WORKERS {
                s.spawn(|| self.stream_worker(m, pages, &shared));
            }
            let res = hand_out(pages, &shared, f);
            shared.lock().stop = true;
            shared.cv.notify_all();
            res
        })
    }

    /// A worker: plan the next stretch, read and check it, file the result; until the
    /// plan is done or the caller stops.
    fn stream_worker(&self, m: &Manifest, pages: &[u64], shared: &Shared<'_>) {
        let mut gone = WorkerGone { shared, seq: None };
        loop {
            let (seq, planned) = {
                let mut g = shared.lock();
                loop {
                    if g.stop || g.planned_all {
                        return;
                    }
                    if g.next_seq < g.taken + WORKERS as u64 + AHEAD {
                        let seq = g.next_seq;
                        match g.planner.next_planned(seq) {
                            Some(p) => {
                                g.next_seq += 1;
                                break (seq, p);
                            }
                            None => {
                                g.planned_all = true;
                                shared.cv.notify_all();
                                return;
                            }
                        }
                    }
                    g = shared.wait(g);
                }
            };
            gone.seq = Some(seq);
            let done = match planned.kind {
                Kind::Zeros(n) => Done::Zeros(n),
                Kind::Fail(e) => Done::Fail(e),
                Kind::Span(s) => self.read_span(m, &pages[planned.at..], &s, shared),
            };
            let mut g = shared.lock();
            g.release(seq);
            g.done.insert(seq, (planned.at, done));
            gone.seq = None;
            drop(g);
            shared.cv.notify_all();
        }
    }

    /// Read and check span `s` (whose pages are the first of `pages`): its buffers,
    /// where each page is in them, and the error if a chunk failed (the pages before it
    /// are good).
    fn read_span(&self, m: &Manifest, pages: &[u64], s: &Span, shared: &Shared<'_>) -> Done {
        let what = |i: usize| format!("page {}", pages[i]);
        let mut bufs = Vec::with_capacity(s.ranges.len());
        let mut bad: Option<(usize, RepoError)> = None;
        for (k, r) in s.ranges.iter().enumerate() {
            // This range's chunks, as (page index, entry number, index entry).
            let mine: Vec<(usize, u64, &IndexEntry)> = (s.chunks.iter().enumerate())
                .filter(|(_, c)| c.0 == k)
                .map(|(i, c)| (i, c.1, &c.2))
                .collect();
            let (base, buf, failed) = self.read_range(r, &mine, shared);
            bufs.push((base, buf));
            let failed = failed.map(|(i, e)| {
                let e = match e {
                    Ok(detail) => RepoError::ChunkDamaged {
                        snapshot: m.name().to_string(),
                        pack: hex(&r.pack),
                        entry: s.chunks[i].1 as u32,
                        what: what(i),
                        detail,
                    },
                    Err(io) => self.range_error(m, &r.pack, &what(i), s.chunks[i].1, io),
                };
                (i, e)
            });
            if let Some((i, e)) = failed {
                if bad.as_ref().is_none_or(|b| i < b.0) {
                    bad = Some((i, e));
                }
            }
        }
        let good = bad.as_ref().map_or(s.chunks.len(), |b| b.0);
        let offs = s.chunks[..good]
            .iter()
            .map(|(k, _, e)| (*k, (e.offset - bufs[*k].0) as usize))
            .collect();
        Done::Pages {
            bufs: bufs.into_iter().map(|b| b.1).collect(),
            offs,
            then: bad.map(|b| b.1),
        }
    }

    /// Read and check range `r` for its chunks `mine` (page index, entry number,
    /// entry): `(base, buffer from base, the first failure)`, a failure being the page
    /// index and why (a check's detail, or the read's error). Waits first for the
    /// blocks earlier spans are fetching to be cached.
    #[allow(clippy::type_complexity)]
    fn read_range(
        &self,
        r: &Range,
        mine: &[(usize, u64, &IndexEntry)],
        shared: &Shared<'_>,
    ) -> (
        u64,
        Vec<u8>,
        Option<(usize, std::result::Result<String, io::Error>)>,
    ) {
        if !r.waits.is_empty() {
            let mut g = shared.lock();
            // (Once released, a block may be claimed again by a later span: only the
            // span it waits for counts, or two spans could wait for each other.)
            while !g.stop
                && r.waits
                    .iter()
                    .any(|(b, o)| g.planner.inflight.get(b) == Some(o))
            {
                g = shared.wait(g);
            }
        }
        let first = mine.first().map_or(0, |c| c.0);
        let (flo, fhi) = if self.cache.is_some() {
            aligned_range(r)
        } else {
            (r.lo, r.hi)
        };
        let (mut base, mut buf, mut fetched) = match self.gather_span(r, flo, fhi) {
            Ok(x) => x,
            Err(e) => return (0, Vec::new(), Some((first, Err(e)))),
        };
        let mut bad = check_chunks(mine, base, &buf);
        if bad.is_some() && fetched != Some((flo, fhi)) {
            // Some bytes came from the cache: drop its blocks and read the storage itself.
            if let Some(cache) = &self.cache {
                for b in span_blocks(r.pack, flo, fhi) {
                    cache.remove(&b);
                }
            }
            buf = match self.fetch_range_of(r, flo, fhi) {
                Ok(d) => d,
                Err(e) => return (0, Vec::new(), Some((first, Err(e)))),
            };
            (base, fetched) = (flo, Some((flo, fhi)));
            bad = check_chunks(mine, base, &buf);
        }
        if let (None, Some((lo, hi))) = (&bad, fetched) {
            self.cache_blocks(r, lo, &buf[(lo - base) as usize..(hi - base) as usize]);
        }
        (base, buf, bad.map(|(i, d)| (i, Ok(d))))
    }

    /// The span's bytes: `(base, buffer from base, the range of the pack fetched now)`.
    /// With a cache, the blocks of `flo..fhi` it has come from there and the rest with
    /// one ranged read; without, bytes `flo..fhi` with one ranged read.
    #[allow(clippy::type_complexity)]
    fn gather_span(
        &self,
        s: &Range,
        flo: u64,
        fhi: u64,
    ) -> io::Result<(u64, Vec<u8>, Option<(u64, u64)>)> {
        let Some(cache) = &self.cache else {
            return Ok((flo, self.fetch_range_of(s, flo, fhi)?, Some((flo, fhi))));
        };
        let blocks: Vec<(u64, Option<Arc<Vec<u8>>>)> = span_blocks(s.pack, flo, fhi)
            .map(|id| {
                let start = id.1 * CACHE_BLOCK;
                let len = CACHE_BLOCK.min(s.pack_len.saturating_sub(start)) as usize;
                (start, cache.block(&id, len))
            })
            .collect();
        let mut missing = blocks.iter().filter(|b| b.1.is_none()).map(|b| b.0);
        let Some(mlo) = missing.next() else {
            // All cached: copy out just the chunks' bytes.
            let mut buf = Vec::with_capacity((s.hi - s.lo) as usize);
            for (start, d) in &blocks {
                let d = d.as_deref().map_or(&[][..], |d| &d[..]);
                let from = (s.lo.saturating_sub(*start) as usize).min(d.len());
                let to = (s.hi.saturating_sub(*start) as usize).clamp(from, d.len());
                buf.extend_from_slice(&d[from..to]);
            }
            return Ok((s.lo, buf, None));
        };
        let mlast = missing.next_back().unwrap_or(mlo);
        let mhi = (mlast + CACHE_BLOCK).min(fhi);
        let got = self.fetch_range_of(s, mlo, mhi)?;
        if (mlo, mhi) == (flo, fhi) {
            return Ok((flo, got, Some((flo, fhi))));
        }
        let mut buf = Vec::with_capacity((fhi - flo) as usize);
        for (start, d) in &blocks {
            let end = (start + CACHE_BLOCK).min(fhi);
            match d {
                Some(d) if *start < mlo || *start >= mhi => {
                    buf.extend_from_slice(&d[..(end - start) as usize])
                }
                _ => buf.extend_from_slice(&got[(start - mlo) as usize..(end - mlo) as usize]),
            }
        }
        Ok((flo, buf, Some((mlo, mhi))))
    }

    /// Bytes `lo..hi` of the span's pack with one ranged read.
    fn fetch_range_of(&self, s: &Range, lo: u64, hi: u64) -> io::Result<Vec<u8>> {
        if hi > s.pack_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {lo}..{hi} past the end of the pack ({} bytes)",
                    s.pack_len
                ),
            ));
        }
        let d = self.storage.get_range(&pack_key(&s.pack), lo, hi - lo)?;
        if let Some(cache) = &self.cache {
            cache.count_fetched(d.len() as u64);
        }
        Ok(d)
    }

    /// Put the whole blocks among `data`, bytes `lo..` of a checked range's pack, into
    /// the cache (not in its memory: a copy of every block costs more than the rare
    /// span that reads one back from its file).
    fn cache_blocks(&self, s: &Range, lo: u64, data: &[u8]) {
        let Some(cache) = &self.cache else { return };
        let hi = lo + data.len() as u64;
        for id in span_blocks(s.pack, lo, hi) {
            let start = id.1 * CACHE_BLOCK;
            let end = (start + CACHE_BLOCK).min(s.pack_len);
            if start < lo || end > hi || cache.has(&id) {
                continue;
            }
            let d = &data[(start - lo) as usize..(end - lo) as usize];
            if let Err(e) = cache.store(&id, d) {
                log::warn!("cannot cache a block of pack {}: {e}", hex(&s.pack));
            }
        }
    }
}

/// The caller's side: each stretch in order, to `f`.
fn hand_out(
    pages: &[u64],
    shared: &Shared<'_>,
    f: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]) -> Result<()>,
) -> Result<()> {
    for seq in 0.. {
        let (at, done) = {
            let mut g = shared.lock();
            loop {
                if let Some(d) = g.done.remove(&seq) {
                    g.taken = seq + 1;
                    shared.cv.notify_all();
                    break d;
                }
                if g.planned_all && seq >= g.next_seq {
                    return Ok(());
                }
                if g.workers == 0 {
                    return Err(RepoError::Source("a page reader thread failed".into()));
                }
                g = shared.wait(g);
            }
        };
        match done {
            Done::Zeros(n) => {
                for &p in &pages[at..at + n] {
                    f(p, &ZERO_PAGE)?;
                }
            }
            Done::Pages { bufs, offs, then } => {
                for (&p, &(k, o)) in pages[at..].iter().zip(&offs) {
                    let page: &[u8; PAGE_SIZE] = bufs[k][o..o + PAGE_SIZE]
                        .try_into()
                        .expect("a checked chunk is one page long");
                    f(p, page)?;
                }
                if let Some(e) = then {
                    return Err(e);
                }
            }
            Done::Fail(e) => return Err(e),
        }
    }
    Ok(())
}

/// The bytes of the pack range `r` reads with a cache: its chunks widened to whole
/// blocks (those its chunks start in), and the tail of a chunk crossing into the next.
fn aligned_range(r: &Range) -> (u64, u64) {
    let block_end = (r.last_start / CACHE_BLOCK + 1) * CACHE_BLOCK;
    (
        r.lo / CACHE_BLOCK * CACHE_BLOCK,
        r.hi.max(block_end.min(r.pack_len)),
    )
}

/// The cache blocks bytes `lo..hi` of pack `pack` touch.
fn span_blocks(pack: Hash32, lo: u64, hi: u64) -> impl Iterator<Item = BlockId> {
    let last = hi.saturating_sub(1) / CACHE_BLOCK;
    (lo / CACHE_BLOCK..=last).map(move |b| (pack, b))
}

/// The first of the chunks (page index, entry number, entry; bytes `base..` in `buf`)
/// that fails its checks: its page index and why.
fn check_chunks(
    chunks: &[(usize, u64, &IndexEntry)],
    base: u64,
    buf: &[u8],
) -> Option<(usize, String)> {
    chunks.iter().find_map(|&(i, _, e)| {
        if e.len as usize != PAGE_SIZE {
            return Some((i, format!("chunk is {} bytes, expected {PAGE_SIZE}", e.len)));
        }
        let at = e.offset.checked_sub(base).map(|a| a as usize);
        match at.and_then(|at| buf.get(at..at + PAGE_SIZE)) {
            Some(data) => check_chunk(e, data).err().map(|d| (i, d)),
            None => Some((i, "pack is truncated".into())),
        }
    })
}
