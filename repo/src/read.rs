//! Reading from the repository: manifests, pages and state blobs, every byte checked,
//! and the cache of loaded pack indexes.

use std::io;
use std::sync::Arc;

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
        let data = self.pack_range(m, &pack, e.offset, u64::from(e.len), what, entry)?;
        check_chunk(&e, &data).map_err(damaged)?;
        Ok(data)
    }

    /// `len` bytes at `offset` of `pack`, for chunk `entry` onwards of `m`'s `what`: a
    /// missing pack or a short one is named as such.
    pub(crate) fn pack_range(
        &self,
        m: &Manifest,
        pack: &Hash32,
        offset: u64,
        len: u64,
        what: &str,
        entry: u64,
    ) -> Result<Vec<u8>> {
        let key = pack_key(pack);
        match self.storage.get_range(&key, offset, len) {
            Ok(d) => Ok(d),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Err(RepoError::PackMissing {
                snapshot: m.name().to_string(),
                pack: hex(pack),
                what: what.to_string(),
            }),
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                Err(RepoError::ChunkDamaged {
                    snapshot: m.name().to_string(),
                    pack: hex(pack),
                    entry: entry as u32,
                    what: what.to_string(),
                    detail: "pack is truncated".into(),
                })
            }
            Err(err) => Err(storage_err("get", &key)(err)),
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
