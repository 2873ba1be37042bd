//! Reading from the repository: manifests, pages and state blobs, every byte checked,
//! and the cache of loaded pack indexes.

use std::collections::BTreeSet;
use std::io;
use std::sync::Arc;

use serde::Serialize;

use crate::cache::{blocks_of, BlockId, CACHE_BLOCK};
use crate::error::{corrupt, storage_err, RepoError, Result};
use crate::format::{
    blake, check_chunk, hex, index_key, manifest_key, name_from_key, pack_key, Hash32, PackIndex,
    Target,
};
use crate::meta::{find, Manifest};
use crate::repo::Repo;
use crate::PAGE_SIZE;

pub(crate) struct LoadedIndex {
    pub(crate) idx: PackIndex,
    pub(crate) hash: Hash32,
}

/// What [`Repo::prefetch`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefetchReport {
    /// Blocks the pages need.
    pub blocks: u64,
    /// Of those, blocks that were cached already.
    pub cached: u64,
    /// Blocks fetched now.
    pub fetched: u64,
    /// Bytes fetched now.
    pub bytes: u64,
    /// Blocks whose fetch failed (reading their pages reports why).
    pub failed: u64,
}

/// Blocks fetched per round of [`Repo::prefetch`] (bounds its memory: 64 MiB).
const PREFETCH_ROUND: usize = 64;

impl Repo {
    pub(crate) fn cache(&self, id: Hash32, li: LoadedIndex) -> Arc<LoadedIndex> {
        let li = Arc::new(li);
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, li.clone());
        li
    }

    /// The index of `pack` (cached after the first read).
    pub(crate) fn load_index(&self, pack: &Hash32) -> Result<Arc<LoadedIndex>> {
        if let Some(li) = self
            .indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pack)
        {
            return Ok(li.clone());
        }
        let key = index_key(pack);
        let data = self.storage.get(&key).map_err(storage_err("get", &key))?;
        let idx = PackIndex::decode(&key, pack, &data)?;
        Ok(self.cache(
            *pack,
            LoadedIndex {
                idx,
                hash: blake(&data),
            },
        ))
    }

    /// Load the indexes of these packs that are not loaded yet, all at once (concurrent
    /// GETs on an object store). Errors are left for [`Repo::load_index`] to report
    /// when the index is used.
    pub(crate) fn load_indexes(&self, packs: &[Hash32]) {
        let missing: Vec<Hash32> = {
            let have = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
            let set: BTreeSet<Hash32> = packs
                .iter()
                .filter(|p| !have.contains_key(*p))
                .copied()
                .collect();
            set.into_iter().collect()
        };
        let keys: Vec<String> = missing.iter().map(index_key).collect();
        for ((pack, key), data) in missing.iter().zip(&keys).zip(self.storage.get_many(&keys)) {
            let Ok(data) = data else { continue };
            if let Ok(idx) = PackIndex::decode(key, pack, &data) {
                self.cache(
                    *pack,
                    LoadedIndex {
                        idx,
                        hash: blake(&data),
                    },
                );
            }
        }
    }

    /// Load every index the snapshot uses, concurrently: afterwards a page read is one
    /// ranged read (or a cache hit) and nothing else. Damaged or missing indexes are
    /// reported by the page reads that need them.
    pub fn load_manifest_indexes(&self, m: &Manifest) {
        let packs: Vec<Hash32> = m.body.packs.iter().map(|p| p.pack).collect();
        self.load_indexes(&packs);
    }

    /// Fetch into the cache ([`Repo::with_cache`]) every block the given pages need and
    /// it lacks, with concurrent ranged reads (an object store keeps a bounded number in
    /// flight), in rounds of 64 blocks. Zero pages and pages not in the snapshot need
    /// nothing. Best effort: a block that cannot be fetched is counted in `failed`, and
    /// reading its pages reports the error precisely. Without a cache, does nothing.
    pub fn prefetch(&self, m: &Manifest, pages: &[u64]) -> Result<PrefetchReport> {
        let mut rep = PrefetchReport::default();
        let Some(cache) = self.cache.clone() else {
            return Ok(rep);
        };
        self.load_manifest_indexes(m);
        // Wanted blocks, in first-needed order, with their pack's length.
        let mut seen: BTreeSet<BlockId> = BTreeSet::new();
        let mut want: Vec<(BlockId, u64)> = Vec::new();
        for &page in pages {
            let Some((Target::Chunks { pack, entry }, off)) = find(&m.body.pages, page) else {
                continue;
            };
            let Ok((e, id)) = self.entry(m, pack, u64::from(entry) + off, "") else {
                continue;
            };
            let Ok(li) = self.load_index(&id) else {
                continue;
            };
            for b in blocks_of(&id, e.offset, u64::from(e.len)) {
                if seen.insert(b) {
                    rep.blocks += 1;
                    if cache.has(&b) {
                        rep.cached += 1;
                    } else {
                        want.push((b, li.idx.pack_len));
                    }
                }
            }
        }
        for round in want.chunks(PREFETCH_ROUND) {
            let reqs: Vec<(String, u64, u64)> = round
                .iter()
                .map(|((pack, b), plen)| {
                    let start = b * CACHE_BLOCK;
                    (
                        pack_key(pack),
                        start,
                        CACHE_BLOCK.min(plen.saturating_sub(start)),
                    )
                })
                .collect();
            for ((id, _), r) in round.iter().zip(self.storage.get_ranges(&reqs)) {
                match r {
                    Ok(d) => {
                        rep.fetched += 1;
                        rep.bytes += d.len() as u64;
                        if let Err(e) = cache.insert(id, d, false) {
                            log::warn!("cannot cache a block of pack {}: {e}", hex(&id.0));
                        }
                    }
                    Err(e) => {
                        rep.failed += 1;
                        log::debug!("prefetch of a block of pack {}: {e}", hex(&id.0));
                    }
                }
            }
        }
        Ok(rep)
    }

    /// `len` bytes at `off` of pack `pack` (`pack_len` bytes long): through the cache
    /// when there is one (missing blocks fetched whole and kept), else one ranged read.
    /// Also says whether any byte came from the cache (a failed check then retries
    /// without it).
    fn fetch_range(
        &self,
        pack: &Hash32,
        pack_len: u64,
        off: u64,
        len: u64,
        use_cache: bool,
    ) -> io::Result<(Vec<u8>, bool)> {
        let key = pack_key(pack);
        let cache = match &self.cache {
            Some(c) if use_cache => c,
            _ => return self.storage.get_range(&key, off, len).map(|d| (d, false)),
        };
        if off.checked_add(len).is_none_or(|end| end > pack_len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {off}+{len} past the end of {key} ({pack_len} bytes)"),
            ));
        }
        let blocks = blocks_of(pack, off, len);
        let mut out = Vec::with_capacity(len as usize);
        let mut from_cache = false;
        for id in blocks.iter().copied() {
            let bstart = id.1 * CACHE_BLOCK;
            let bend = (bstart + CACHE_BLOCK).min(pack_len);
            let (s, e) = (off.max(bstart), (off + len).min(bend));
            match cache.read(&id, s - bstart, (e - s) as usize) {
                // The common case, a chunk inside one block: no second copy.
                Some(d) if blocks.len() == 1 => return Ok((d, true)),
                Some(d) => {
                    from_cache = true;
                    out.extend_from_slice(&d);
                }
                None => {
                    // One fetch per block on this host: wait for anyone fetching it, then
                    // look again (cache.rs, "One fetch per block").
                    let _claim = cache.claim(&id);
                    if let Some(d) = cache.read_claimed(&id, s - bstart, (e - s) as usize) {
                        from_cache = true;
                        out.extend_from_slice(&d);
                        continue;
                    }
                    let blk = self.storage.get_range(&key, bstart, bend - bstart)?;
                    out.extend_from_slice(&blk[(s - bstart) as usize..(e - bstart) as usize]);
                    if let Err(e) = cache.insert(&id, blk, true) {
                        log::warn!("cannot cache a block of pack {}: {e}", hex(pack));
                    }
                }
            }
        }
        Ok((out, from_cache))
    }

    /// Names of the snapshots in the repository, sorted.
    pub fn snapshots(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self
            .list("snapshots/")?
            .into_iter()
            .filter_map(|o| name_from_key(&o.key))
            .collect();
        v.sort();
        Ok(v)
    }

    pub(crate) fn try_manifest(&self, name: &str) -> Result<Option<Manifest>> {
        let key = manifest_key(name);
        match self.storage.get(&key) {
            Ok(d) => Manifest::decode(&key, &d).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage_err("get", &key)(e)),
        }
    }

    /// The manifest of snapshot `name` (checked).
    pub fn manifest(&self, name: &str) -> Result<Manifest> {
        self.try_manifest(name)?
            .ok_or_else(|| RepoError::NotFound(name.to_string()))
    }

    /// The index entry for chunk `entry` of the manifest's pack `slot`, with the pack id.
    pub(crate) fn entry(
        &self,
        m: &Manifest,
        slot: u32,
        entry: u64,
        what: &str,
    ) -> Result<(crate::format::IndexEntry, Hash32)> {
        let pin = m.body.packs[slot as usize];
        let damaged = |detail: String| RepoError::ChunkDamaged {
            snapshot: m.name().to_string(),
            pack: hex(&pin.pack),
            entry: entry as u32,
            what: what.to_string(),
            detail,
        };
        let li = match self.load_index(&pin.pack) {
            Ok(li) => li,
            Err(RepoError::Storage { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::PackMissing {
                    snapshot: m.name().to_string(),
                    pack: hex(&pin.pack),
                    what: format!("{what} (its index is missing)"),
                })
            }
            Err(RepoError::Corrupt { object, detail }) => {
                return Err(damaged(format!("{object}: {detail}")))
            }
            Err(e) => return Err(e),
        };
        if li.hash != pin.index_hash {
            return Err(damaged(
                "the pack's index is not the one the manifest pinned".into(),
            ));
        }
        let e = usize::try_from(entry)
            .ok()
            .and_then(|i| li.idx.entries.get(i))
            .ok_or_else(|| damaged("chunk number beyond the pack's index".into()))?;
        Ok((*e, pin.pack))
    }

    /// Read and check one chunk.
    fn read_chunk(
        &self,
        m: &Manifest,
        slot: u32,
        entry: u64,
        len: usize,
        what: &str,
    ) -> Result<Vec<u8>> {
        let (e, pack) = self.entry(m, slot, entry, what)?;
        let damaged = |detail: String| RepoError::ChunkDamaged {
            snapshot: m.name().to_string(),
            pack: hex(&pack),
            entry: entry as u32,
            what: what.to_string(),
            detail,
        };
        if e.len as usize != len {
            return Err(damaged(format!("chunk is {} bytes, expected {len}", e.len)));
        }
        let mut data = self.pack_range(m, &pack, e.offset, u64::from(e.len), what, entry, true)?;
        if data.1 && check_chunk(&e, &data.0).is_err() {
            // A damaged cached block: drop it and read the storage itself.
            self.drop_cached(&pack, e.offset, u64::from(e.len));
            data = self.pack_range(m, &pack, e.offset, u64::from(e.len), what, entry, false)?;
        }
        let data = data.0;
        check_chunk(&e, &data).map_err(damaged)?;
        Ok(data)
    }

    /// `len` bytes at `offset` of `pack`, for chunk `entry` onwards of `m`'s `what`,
    /// through the pack cache when there is one and `use_cache`; says whether any byte
    /// came from the cache (a failed check then retries without it). A missing pack or
    /// a short one is named as such.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pack_range(
        &self,
        m: &Manifest,
        pack: &Hash32,
        offset: u64,
        len: u64,
        what: &str,
        entry: u64,
        use_cache: bool,
    ) -> Result<(Vec<u8>, bool)> {
        let pack_len = self.load_index(pack)?.idx.pack_len;
        self.fetch_range(pack, pack_len, offset, len, use_cache)
            .map_err(|err| self.range_error(m, pack, what, entry, err))
    }

    /// The error for a failed ranged read of `pack`, for chunk `entry` onwards of `m`'s
    /// `what`: a missing pack or a short one is named as such.
    pub(crate) fn range_error(
        &self,
        m: &Manifest,
        pack: &Hash32,
        what: &str,
        entry: u64,
        err: io::Error,
    ) -> RepoError {
        match err.kind() {
            io::ErrorKind::NotFound => RepoError::PackMissing {
                snapshot: m.name().to_string(),
                pack: hex(pack),
                what: what.to_string(),
            },
            io::ErrorKind::UnexpectedEof => RepoError::ChunkDamaged {
                snapshot: m.name().to_string(),
                pack: hex(pack),
                entry: entry as u32,
                what: what.to_string(),
                detail: "pack is truncated".into(),
            },
            _ => storage_err("get", &pack_key(pack))(err),
        }
    }

    /// Forget the cached blocks holding `len` bytes at `offset` of `pack`.
    pub(crate) fn drop_cached(&self, pack: &Hash32, offset: u64, len: u64) {
        if let Some(cache) = &self.cache {
            for b in blocks_of(pack, offset, len) {
                cache.remove(&b);
            }
        }
    }

    /// Guest page `page` of the snapshot, checked against its crc32c and BLAKE3 hash.
    pub fn read_page(&self, m: &Manifest, page: u64) -> Result<[u8; PAGE_SIZE]> {
        let mut out = [0u8; PAGE_SIZE];
        match find(&m.body.pages, page) {
            None => Err(RepoError::NoSuchPage {
                snapshot: m.name().to_string(),
                page,
            }),
            Some((Target::Zero, _)) => Ok(out),
            Some((Target::Chunks { pack, entry }, off)) => {
                let d = self.read_chunk(
                    m,
                    pack,
                    u64::from(entry) + off,
                    PAGE_SIZE,
                    &format!("page {page}"),
                )?;
                out.copy_from_slice(&d);
                Ok(out)
            }
        }
    }

    /// The snapshot's state blob, checked piece by piece and as a whole.
    pub fn read_state(&self, m: &Manifest) -> Result<Vec<u8>> {
        let len = m.body.state_len;
        let cap = usize::try_from(len)
            .map_err(|_| corrupt(&manifest_key(m.name()), "state too large"))?;
        let mut out = Vec::with_capacity(cap.min(64 << 20));
        let pieces = len.div_ceil(PAGE_SIZE as u64);
        for n in 0..pieces {
            let plen = (len - n * PAGE_SIZE as u64).min(PAGE_SIZE as u64) as usize;
            match find(&m.body.state, n) {
                Some((Target::Zero, _)) => out.resize(out.len() + plen, 0),
                Some((Target::Chunks { pack, entry }, off)) => {
                    let d = self.read_chunk(
                        m,
                        pack,
                        u64::from(entry) + off,
                        plen,
                        &format!("state blob piece {n}"),
                    )?;
                    out.extend_from_slice(&d);
                }
                None => return Err(corrupt(&manifest_key(m.name()), "state map incomplete")),
            }
        }
        if blake(&out) != m.body.state_hash {
            return Err(corrupt(
                &manifest_key(m.name()),
                "state blob does not match its hash",
            ));
        }
        Ok(out)
    }
}
