//! Managing the repository: listing ([`Repo::ls`], [`SnapshotSummary`]), verifying
//! ([`Repo::verify`], [`VerifyReport`], [`Problem`]), removing ([`Repo::remove`]) and
//! garbage collection ([`Repo::gc`], [`GcReport`], the condemned list).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pmem_backend::{Owner, SnapshotKind};
use serde::{Deserialize, Serialize};

use crate::error::{storage_err, RepoError, Result};
use crate::format::{
    blake, check_pack, decode, encode, index_key, manifest_key, name_from_key, pack_key, seal,
    unseal, Hash32, PackIndex, Target, CONDEMNED_MAGIC,
};
use crate::meta::Manifest;
use crate::read::LoadedIndex;
use crate::repo::{unix_ms, Repo};
use crate::PAGE_SIZE;

const CONDEMNED_KEY: &str = "gc/condemned";

#[derive(Debug, Serialize, Deserialize)]
struct Condemned {
    written_unix_ms: u64,
    /// Each pack with the time it was first condemned (kept across rewrites of the list
    /// while it stays unreferenced, so frequent gc runs do not postpone deletion).
    packs: Vec<(Hash32, u64)>,
}

/// One line of `repo ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotSummary {
    /// Snapshot name.
    pub name: String,
    /// Kind (`None` when the manifest is damaged).
    pub kind: Option<SnapshotKind>,
    /// Owner (`None` when the manifest is damaged).
    pub owner: Option<Owner>,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Export time, ms since the Unix epoch.
    pub exported_unix_ms: u64,
    /// Pages.
    pub pages: u64,
    /// All-zero pages.
    pub zero_pages: u64,
    /// State blob length.
    pub state_len: u64,
    /// Pages times 4096 plus the state length.
    pub logical_bytes: u64,
    /// Content bytes of the distinct chunks it references.
    pub stored_bytes: u64,
    /// Of those, bytes also referenced by another snapshot.
    pub shared_bytes: u64,
    /// Of those, bytes only this snapshot references (what `rm` + `gc` would free).
    pub unique_bytes: u64,
    /// Why the manifest (or an index it needs) could not be read.
    pub error: Option<String>,
}

/// One problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The damaged or missing object (`packs/<id>`, `index/<id>`, `snapshots/<name>`).
    pub object: String,
    /// The chunk in the pack, when the problem is one chunk.
    pub chunk: Option<u32>,
    /// What is wrong.
    pub detail: String,
    /// Snapshots whose content it affects.
    pub snapshots: Vec<String>,
}

/// What `verify` checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Manifests checked.
    pub snapshots: u64,
    /// Packs read in full.
    pub packs: u64,
    /// Chunks checked.
    pub chunks: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Packs no manifest references (garbage for gc, not damage).
    pub unreferenced_packs: u64,
    /// Everything damaged or missing.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Packs deleted (with their indexes).
    pub deleted_packs: u64,
    /// Objects deleted (packs and indexes).
    pub deleted_objects: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Unreferenced packs on the condemned list after this run: a run at least the grace
    /// period after each was first condemned deletes it.
    pub condemned_packs: u64,
    /// Bytes of the condemned packs.
    pub condemned_bytes: u64,
    /// Unreferenced packs kept because they are younger than the grace period.
    pub young_packs: u64,
    /// Packs kept because a manifest references them.
    pub referenced_packs: u64,
}

/// A manifest with the size of each chunk it references.
type SizedRefs = (Manifest, HashMap<(Hash32, u64), u64>);

impl Repo {
    /// The condemned list (empty if none).
    pub(crate) fn condemned(&self) -> Result<HashSet<Hash32>> {
        match self.storage.get(CONDEMNED_KEY) {
            Ok(d) => {
                let c: Condemned =
                    decode(CONDEMNED_KEY, unseal(CONDEMNED_KEY, CONDEMNED_MAGIC, &d)?)?;
                Ok(c.packs.into_iter().map(|(id, _)| id).collect())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashSet::new()),
            Err(e) => Err(storage_err("get", CONDEMNED_KEY)(e)),
        }
    }

    /// Chunks (pack, entry) a manifest references, bounded by each pack's chunk count
    /// (`entries`, `None` when its index is unreadable: nothing counted), so a hostile
    /// manifest cannot make this loop for long; also the number of references beyond
    /// the chunk counts (damage).
    fn chunk_refs(
        m: &Manifest,
        entries: &dyn Fn(&Hash32) -> Option<u64>,
    ) -> (HashSet<(Hash32, u64)>, u64) {
        let mut s = HashSet::new();
        let mut beyond = 0u64;
        for e in m.body.pages.iter().chain(m.body.state.iter()) {
            if let Target::Chunks { pack, entry } = e.target {
                let id = m.body.packs[pack as usize].pack;
                let Some(n) = entries(&id) else { continue };
                let start = u64::from(entry);
                let end = start.saturating_add(e.count);
                for i in start..end.min(n) {
                    s.insert((id, i));
                }
                beyond += end - end.min(n).max(start);
            }
        }
        (s, beyond)
    }

    /// Per snapshot: pages, stored bytes and bytes shared with other snapshots. A damaged
    /// manifest is listed with its error.
    pub fn ls(&self) -> Result<Vec<SnapshotSummary>> {
        let mut loaded: Vec<(String, std::result::Result<SizedRefs, String>)> = Vec::new();
        let mut refcount: HashMap<(Hash32, u64), u32> = HashMap::new();
        for name in self.snapshots()? {
            let r = self.manifest(&name).and_then(|m| {
                let mut idx: HashMap<Hash32, Arc<LoadedIndex>> = HashMap::new();
                for pin in &m.body.packs {
                    idx.insert(pin.pack, self.load_index(&pin.pack)?);
                }
                let count = |id: &Hash32| idx.get(id).map(|li| li.idx.entries.len() as u64);
                let mut sized = HashMap::new();
                for (pack, entry) in Self::chunk_refs(&m, &count).0 {
                    let len = idx
                        .get(&pack)
                        .and_then(|li| li.idx.entries.get(usize::try_from(entry).ok()?))
                        .map(|e| u64::from(e.len))
                        .unwrap_or(0);
                    sized.insert((pack, entry), len);
                }
                Ok((m, sized))
            });
            if let Ok((_, sized)) = &r {
                for k in sized.keys() {
                    *refcount.entry(*k).or_default() += 1;
                }
            }
            loaded.push((name, r.map_err(|e| e.to_string())));
        }
        Ok(loaded
            .into_iter()
            .map(|(name, r)| match r {
                Ok((m, sized)) => {
                    let stored: u64 = sized.values().sum();
                    let shared: u64 = sized
                        .iter()
                        .filter(|(k, _)| refcount.get(*k).copied().unwrap_or(0) > 1)
                        .map(|(_, l)| l)
                        .sum();
                    SnapshotSummary {
                        name,
                        kind: Some(m.meta.kind),
                        owner: Some(m.meta.owner),
                        created_unix_ms: m.meta.created_unix_ms,
                        exported_unix_ms: m.body.exported_unix_ms,
                        pages: m.pages(),
                        zero_pages: m.zero_pages(),
                        state_len: m.body.state_len,
                        logical_bytes: m
                            .pages()
                            .saturating_mul(PAGE_SIZE as u64)
                            .saturating_add(m.body.state_len),
                        stored_bytes: stored,
                        shared_bytes: shared,
                        unique_bytes: stored - shared,
                        error: None,
                    }
                }
                Err(e) => SnapshotSummary {
                    name,
                    kind: None,
                    owner: None,
                    created_unix_ms: 0,
                    exported_unix_ms: 0,
                    pages: 0,
                    zero_pages: 0,
                    state_len: 0,
                    logical_bytes: 0,
                    stored_bytes: 0,
                    shared_bytes: 0,
                    unique_bytes: 0,
                    error: Some(e),
                },
            })
            .collect())
    }

    /// Remove snapshot `name` (its manifest). Its content stays until [`Repo::gc`].
    pub fn remove(&self, name: &str) -> Result<()> {
        let key = manifest_key(name);
        if !self
            .storage
            .exists(&key)
            .map_err(storage_err("exists", &key))?
        {
            return Err(RepoError::NotFound(name.to_string()));
        }
        self.storage
            .delete(&key)
            .map_err(storage_err("delete", &key))
    }

    /// Check every object: every manifest, index and pack (each pack read in full, every
    /// chunk's crc32c and BLAKE3 hash), and every reference from a manifest. Reports
    /// every problem, naming the object and the snapshots affected; fails only when the
    /// storage itself fails.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        let packs = self.list_ids("packs/")?;
        let idx_objs = self.list_ids("index/")?;
        let mut problems: Vec<Problem> = Vec::new();
        let mut prob = |object: String, chunk: Option<u32>, detail: String| {
            problems.push(Problem {
                object,
                chunk,
                detail,
                snapshots: Vec::new(),
            })
        };

        if let Err(e) = self.condemned() {
            prob(CONDEMNED_KEY.into(), None, e.to_string());
        }

        // Indexes (read afresh, not from the cache).
        let mut indexes: HashMap<Hash32, (PackIndex, Hash32)> = HashMap::new();
        for id in idx_objs.keys() {
            let key = index_key(id);
            match self.storage.get(&key) {
                Ok(d) => {
                    rep.bytes += d.len() as u64;
                    match PackIndex::decode(&key, id, &d) {
                        Ok(i) => {
                            indexes.insert(*id, (i, blake(&d)));
                        }
                        Err(e) => prob(key, None, e.to_string()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(storage_err("get", &key)(e)),
            }
        }

        // Packs, in full. Damaged chunks: (pack, Some(entry)) or whole pack (None).
        let mut bad_chunks: HashMap<Hash32, HashSet<u32>> = HashMap::new();
        let mut bad_packs: HashSet<Hash32> = HashSet::new();
        for id in packs.keys() {
            let key = pack_key(id);
            let data = match self.storage.get(&key) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(storage_err("get", &key)(e)),
            };
            rep.packs += 1;
            rep.bytes += data.len() as u64;
            let idx = indexes.get(id).map(|(i, _)| i);
            if let Some(i) = idx {
                rep.chunks += i.entries.len() as u64;
            }
            for (entry, detail) in check_pack(id, &data, idx) {
                match entry {
                    Some(e) => {
                        bad_chunks.entry(*id).or_default().insert(e);
                    }
                    None => {
                        bad_packs.insert(*id);
                    }
                }
                prob(key.clone(), entry, detail);
            }
        }

        // Manifests and their references.
        let mut referenced: HashSet<Hash32> = HashSet::new();
        let mut affects: BTreeMap<(String, Option<u32>), Vec<String>> = BTreeMap::new();
        for o in self.list("snapshots/")? {
            let Some(name) = name_from_key(&o.key) else {
                continue;
            };
            rep.snapshots += 1;
            let m = match self.storage.get(&o.key) {
                Ok(d) => match Manifest::decode(&o.key, &d) {
                    Ok(m) => m,
                    Err(e) => {
                        prob(o.key.clone(), None, e.to_string());
                        continue;
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(storage_err("get", &o.key)(e)),
            };
            for pin in &m.body.packs {
                referenced.insert(pin.pack);
                let pk = pack_key(&pin.pack);
                let ik = index_key(&pin.pack);
                if !packs.contains_key(&pin.pack) {
                    prob(
                        pk.clone(),
                        None,
                        format!("missing (snapshot {name:?} uses it)"),
                    );
                }
                match indexes.get(&pin.pack) {
                    None if !idx_objs.contains_key(&pin.pack) => prob(
                        ik.clone(),
                        None,
                        format!("missing (snapshot {name:?} uses it)"),
                    ),
                    None => {} // damaged: already reported
                    Some((_, h)) if *h != pin.index_hash => prob(
                        ik.clone(),
                        None,
                        format!("is not the index snapshot {name:?} pinned"),
                    ),
                    Some(_) => {}
                }
                if bad_packs.contains(&pin.pack) || !packs.contains_key(&pin.pack) {
                    affects
                        .entry((pk.clone(), None))
                        .or_default()
                        .push(name.clone());
                }
                if !indexes.contains_key(&pin.pack) {
                    affects.entry((ik, None)).or_default().push(name.clone());
                }
            }
            let count = |id: &Hash32| indexes.get(id).map(|(i, _)| i.entries.len() as u64);
            let (refs, beyond) = Self::chunk_refs(&m, &count);
            if beyond > 0 {
                prob(
                    o.key.clone(),
                    None,
                    format!("references {beyond} chunk(s) beyond their packs' indexes"),
                );
            }
            for (pack, entry) in refs {
                if let Ok(e) = u32::try_from(entry) {
                    if bad_chunks.get(&pack).is_some_and(|s| s.contains(&e)) {
                        let v = affects.entry((pack_key(&pack), Some(e))).or_default();
                        if !v.contains(&name) {
                            v.push(name.clone());
                        }
                    }
                }
            }
        }
        for id in packs.keys().chain(idx_objs.keys()).collect::<HashSet<_>>() {
            if !referenced.contains(id) && packs.contains_key(id) {
                rep.unreferenced_packs += 1;
            }
        }
        for p in &mut problems {
            if let Some(v) = affects.get(&(p.object.clone(), p.chunk)) {
                p.snapshots = v.clone();
            }
            if p.chunk.is_some() {
                if let Some(v) = affects.get(&(p.object.clone(), None)) {
                    for n in v {
                        if !p.snapshots.contains(n) {
                            p.snapshots.push(n.clone());
                        }
                    }
                }
            }
        }
        rep.problems = problems;
        Ok(rep)
    }

    /// Collect unreferenced content older than `grace`, by the two-phase rule of the crate
    /// docs ("Garbage collection rule"): delete what an earlier run condemned at least
    /// `grace` ago and is still unreferenced, then condemn what is unreferenced and older
    /// than `grace` now. Fails (deleting nothing) if a manifest cannot be read.
    pub fn gc(&self, grace: Duration) -> Result<GcReport> {
        self.gc_at(grace, SystemTime::now())
    }

    /// [`Repo::gc`] with `now` as the current time (tests, tools with their own clock).
    pub fn gc_at(&self, grace: Duration, now: SystemTime) -> Result<GcReport> {
        let mut rep = GcReport::default();
        let older = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age >= grace);

        // 1. The previous condemned list (a damaged one is ignored: that only delays).
        let previous = match self.storage.get(CONDEMNED_KEY) {
            Ok(d) => match unseal(CONDEMNED_KEY, CONDEMNED_MAGIC, &d)
                .and_then(|b| decode::<Condemned>(CONDEMNED_KEY, b))
            {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("gc: ignoring {CONDEMNED_KEY}: {e}");
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(storage_err("get", CONDEMNED_KEY)(e)),
        };

        // 2. References, listed after reading the list.
        let mut referenced: HashSet<Hash32> = HashSet::new();
        for o in self.list("snapshots/")? {
            if name_from_key(&o.key).is_none() {
                continue;
            }
            let d = match self.storage.get(&o.key) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(storage_err("get", &o.key)(e)),
            };
            let m = Manifest::decode(&o.key, &d)?;
            referenced.extend(m.body.packs.iter().map(|p| p.pack));
        }

        // Every pack and index object, by pack id, listed once.
        let mut objs: HashMap<Hash32, Vec<crate::storage::ObjectInfo>> = HashMap::new();
        for prefix in ["packs/", "index/"] {
            for (id, o) in self.list_ids(prefix)? {
                objs.entry(id).or_default().push(o);
            }
        }

        let delete = |id: &Hash32,
                      objs: &mut HashMap<Hash32, Vec<crate::storage::ObjectInfo>>,
                      rep: &mut GcReport|
         -> Result<()> {
            let Some(mut list) = objs.remove(id) else {
                return Ok(());
            };
            // The index first: an export never loads an index whose pack is gone.
            list.sort_by_key(|o| !o.key.starts_with("index/"));
            for o in list {
                self.storage
                    .delete(&o.key)
                    .map_err(storage_err("delete", &o.key))?;
                rep.deleted_objects += 1;
                rep.freed_bytes += o.size;
            }
            rep.deleted_packs += 1;
            self.indexes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            Ok(())
        };

        // 3. Delete what was condemned at least `grace` ago and is still unreferenced.
        let mut since: HashMap<Hash32, u64> = HashMap::new();
        if let Some(c) = &previous {
            for &(id, at) in &c.packs {
                if referenced.contains(&id) {
                    continue;
                }
                if older(UNIX_EPOCH + Duration::from_millis(at)) {
                    delete(&id, &mut objs, &mut rep)?;
                } else {
                    since.insert(id, at);
                }
            }
        }

        // 4. Condemn what is unreferenced and older than `grace` now.
        let mut ids: HashMap<Hash32, (SystemTime, u64)> = HashMap::new();
        for (id, list) in &objs {
            for o in list {
                let e = ids.entry(*id).or_insert((o.modified, 0));
                e.0 = e.0.max(o.modified);
                e.1 += o.size;
            }
        }
        let mut condemn: Vec<Hash32> = Vec::new();
        for (id, (modified, size)) in &ids {
            if referenced.contains(id) {
                rep.referenced_packs += 1;
            } else if older(*modified) {
                condemn.push(*id);
                rep.condemned_bytes += size;
            } else {
                rep.young_packs += 1;
            }
        }
        condemn.sort();
        rep.condemned_packs = condemn.len() as u64;
        if condemn.is_empty() {
            if previous.is_some() {
                self.storage
                    .delete(CONDEMNED_KEY)
                    .map_err(storage_err("delete", CONDEMNED_KEY))?;
            }
        } else {
            let c = Condemned {
                written_unix_ms: unix_ms(now),
                packs: condemn
                    .iter()
                    .map(|id| (*id, since.get(id).copied().unwrap_or(unix_ms(now))))
                    .collect(),
            };
            self.put(CONDEMNED_KEY, &seal(CONDEMNED_MAGIC, &encode(&c)))?;
        }

        // 5. A zero grace deletes at once (nothing else may be writing the repository).
        if grace.is_zero() && !condemn.is_empty() {
            for id in &condemn {
                delete(id, &mut objs, &mut rep)?;
            }
            rep.condemned_packs = 0;
            rep.condemned_bytes = 0;
            self.storage
                .delete(CONDEMNED_KEY)
                .map_err(storage_err("delete", CONDEMNED_KEY))?;
        }
        Ok(rep)
    }
}
