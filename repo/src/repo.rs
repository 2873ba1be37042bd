//! The repository: export, read, list, verify, remove, gc.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pmem_backend::{normalize_runs, Owner, PageRun, ProcessInfo, SnapshotKind};
use serde::{Deserialize, Serialize};

use crate::error::{corrupt, storage_err, RepoError, Result, SourceError};
use crate::format::{
    blake, check_chunk, check_pack, decode, encode, hex, index_key, manifest_key, name_from_key,
    pack_key, parse_hex, seal, unseal, Extent, Hash32, ManifestBody, MetaBody, PackBuilder,
    PackIndex, PackPin, Target, CONDEMNED_MAGIC, INDEX_MAGIC, MANIFEST_MAGIC,
};
use crate::storage::Storage;
use crate::PAGE_SIZE;

/// Pack size an export aims for (a pack is closed before it would exceed this).
pub const DEFAULT_PACK_SIZE: usize = 16 << 20;
/// The longest state blob a snapshot may have (a VM's device and vCPU state is far
/// smaller); bounds what reading a hostile manifest allocates.
pub const MAX_STATE_LEN: u64 = 1 << 30;
/// The repository format version this build writes and reads.
pub const REPO_VERSION: u32 = 1;

const CONFIG_KEY: &str = "config";
const CONDEMNED_KEY: &str = "gc/condemned";
const FORMAT_NAME: &str = "pmsnap-repo";

#[derive(Debug, Serialize, Deserialize)]
struct Config {
    format: String,
    version: u32,
    chunk_size: u32,
    created_unix_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Condemned {
    written_unix_ms: u64,
    /// Each pack with the time it was first condemned (kept across rewrites of the list
    /// while it stays unreferenced, so frequent gc runs do not postpone deletion).
    packs: Vec<(Hash32, u64)>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Public value types

/// A snapshot's metadata as given to and returned by the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The store name (`guest:UID/NAME` for guest-owned snapshots, [`Owner::qualify`]).
    pub name: String,
    /// VM, pages or process.
    pub kind: SnapshotKind,
    /// Who it belongs to (must agree with the name).
    pub owner: Owner,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Creation time, ns since the Unix epoch.
    pub created_unix_ns: u64,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Process details (process snapshots only).
    pub process: Option<ProcessInfo>,
    /// Guest RAM size in bytes (0 if unknown); every page must lie below it.
    pub ram_size: u64,
    /// The runs as given at snapshot time (a VM snapshot: all of RAM).
    pub runs: Vec<PageRun>,
}

impl SnapshotMeta {
    fn to_body(&self) -> Result<MetaBody> {
        let bad = |m: String| Err(RepoError::InvalidMeta(m));
        if self.name.is_empty() || self.name.len() > 255 || self.name.chars().any(char::is_control)
        {
            return bad(format!(
                "name {:?} must be 1-255 bytes without control characters",
                self.name
            ));
        }
        match Owner::split(&self.name) {
            Some((o, rest)) if o == self.owner && !rest.is_empty() => {}
            _ => {
                return bad(format!(
                    "name {:?} does not belong to owner {}",
                    self.name, self.owner
                ))
            }
        }
        if (self.kind == SnapshotKind::Process) != self.process.is_some() {
            return bad("process details are required for, and only for, process snapshots".into());
        }
        if let Some(p) = &self.process {
            if p.run_vas.len() != self.runs.len() {
                return bad("process snapshot needs one virtual address per run".into());
            }
        }
        if self.ram_size % PAGE_SIZE as u64 != 0 {
            return bad(format!(
                "guest RAM size {} is not a multiple of 4096",
                self.ram_size
            ));
        }
        let ram_pages = self.ram_size / PAGE_SIZE as u64;
        for r in &self.runs {
            if r.count == 0 || r.first.checked_add(r.count).is_none() {
                return bad(format!("bad run {}+{}", r.first, r.count));
            }
            if self.ram_size != 0 && r.end() > ram_pages {
                return bad(format!(
                    "run {}+{} beyond guest RAM ({ram_pages} pages)",
                    r.first, r.count
                ));
            }
        }
        let (owner_tag, owner_uid) = match self.owner {
            Owner::Host => (0, 0),
            Owner::Guest(u) => (1, u),
        };
        Ok(MetaBody {
            name: self.name.clone(),
            kind: match self.kind {
                SnapshotKind::Process => 1,
                SnapshotKind::Vm => 2,
                SnapshotKind::Pages => 3,
            },
            owner_tag,
            owner_uid,
            created_unix_ms: self.created_unix_ms,
            created_unix_ns: self.created_unix_ns,
            labels: self.labels.clone(),
            process: self
                .process
                .as_ref()
                .map(|p| (p.pid, p.comm.clone(), p.run_vas.clone())),
            ram_size: self.ram_size,
            runs: self.runs.iter().map(|r| (r.first, r.count)).collect(),
        })
    }

    fn from_body(key: &str, b: &MetaBody) -> Result<SnapshotMeta> {
        let kind = match b.kind {
            1 => SnapshotKind::Process,
            2 => SnapshotKind::Vm,
            3 => SnapshotKind::Pages,
            k => return Err(corrupt(key, format!("unknown snapshot kind {k}"))),
        };
        let owner = match (b.owner_tag, b.owner_uid) {
            (0, 0) => Owner::Host,
            (1, u) => Owner::Guest(u),
            _ => return Err(corrupt(key, "unknown owner")),
        };
        let meta = SnapshotMeta {
            name: b.name.clone(),
            kind,
            owner,
            created_unix_ms: b.created_unix_ms,
            created_unix_ns: b.created_unix_ns,
            labels: b.labels.clone(),
            process: b.process.as_ref().map(|(pid, comm, vas)| ProcessInfo {
                pid: *pid,
                comm: comm.clone(),
                run_vas: vas.clone(),
            }),
            ram_size: b.ram_size,
            runs: b.runs.iter().map(|&(f, c)| PageRun::new(f, c)).collect(),
        };
        meta.to_body()
            .map_err(|e| corrupt(key, format!("metadata refused: {e}")))?;
        Ok(meta)
    }
}

/// What an export reads: the snapshot's metadata, pages and state blob. The pool's
/// adapter implements it; tests use an in-memory fake.
pub trait SnapshotSource {
    /// The snapshot's metadata (called once, first).
    fn meta(&mut self) -> std::result::Result<SnapshotMeta, SourceError>;
    /// The content of guest page `page` (one of the metadata's runs).
    fn read_page(
        &mut self,
        page: u64,
        buf: &mut [u8; PAGE_SIZE],
    ) -> std::result::Result<(), SourceError>;
    /// The state blob (empty for snapshots without one).
    fn state(&mut self) -> std::result::Result<Vec<u8>, SourceError>;
}

/// Which part of an export is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Loading the repository's indexes.
    Indexes,
    /// Reading, hashing and storing pages.
    Pages,
    /// Storing the state blob.
    State,
    /// Writing the last pack and the manifest.
    Commit,
}

/// Export progress, reported every few hundred pages and at each phase change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// Units done in this phase (pages; indexes).
    pub done: u64,
    /// Units in this phase.
    pub total: u64,
    /// Content bytes newly stored so far.
    pub bytes_new: u64,
}

/// What an export did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// The snapshot name.
    pub name: String,
    /// Pages in the snapshot.
    pub pages: u64,
    /// Of those, all-zero pages (not stored).
    pub zero_pages: u64,
    /// State blob length.
    pub state_len: u64,
    /// Chunks newly stored.
    pub chunks_new: u64,
    /// Content bytes newly stored.
    pub bytes_new: u64,
    /// Content bytes not stored because the repository (or this export) already held them.
    pub bytes_skipped: u64,
    /// All object bytes written (packs, indexes, manifest).
    pub bytes_written: u64,
    /// Packs written.
    pub packs_written: u64,
    /// The snapshot was already in the repository with identical content: nothing done.
    pub no_op: bool,
}

/// A snapshot's manifest, as read from the repository (checked).
#[derive(Debug, Clone)]
pub struct Manifest {
    body: ManifestBody,
    meta: SnapshotMeta,
}

impl Manifest {
    fn decode(key: &str, data: &[u8]) -> Result<Manifest> {
        let body: ManifestBody = decode(key, unseal(key, MANIFEST_MAGIC, data)?)?;
        let meta = SnapshotMeta::from_body(key, &body.meta)?;
        if manifest_key(&meta.name) != key {
            return Err(corrupt(key, "manifest holds another snapshot's name"));
        }
        let npacks = body.packs.len() as u64;
        let check_extents = |ext: &[Extent], what: &str| -> Result<Vec<PageRun>> {
            let mut runs: Vec<PageRun> = Vec::new();
            let mut prev_end = 0u64;
            for (i, e) in ext.iter().enumerate() {
                let end = e.first.checked_add(e.count);
                let ok = e.count > 0
                    && end.is_some()
                    && (i == 0 || e.first >= prev_end)
                    && match e.target {
                        Target::Zero => true,
                        Target::Chunks { pack, entry } => {
                            u64::from(pack) < npacks
                                && u64::from(entry)
                                    .checked_add(e.count)
                                    .is_some_and(|x| x <= 1 << 32)
                        }
                    };
                if !ok {
                    return Err(corrupt(key, format!("bad {what} extent {i}")));
                }
                prev_end = end.unwrap_or(0);
                match runs.last_mut() {
                    Some(r) if r.end() == e.first => r.count += e.count,
                    _ => runs.push(PageRun::new(e.first, e.count)),
                }
            }
            Ok(runs)
        };
        if check_extents(&body.pages, "page")? != normalize_runs(&meta.runs) {
            return Err(corrupt(key, "page map does not cover the snapshot's pages"));
        }
        if body.state_len > MAX_STATE_LEN {
            return Err(corrupt(key, "state blob length out of range"));
        }
        let pieces = body.state_len.div_ceil(PAGE_SIZE as u64);
        let want: Vec<PageRun> = if pieces == 0 {
            vec![]
        } else {
            vec![PageRun::new(0, pieces)]
        };
        if check_extents(&body.state, "state")? != want {
            return Err(corrupt(key, "state map does not cover the state blob"));
        }
        Ok(Manifest { body, meta })
    }

    /// The snapshot name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// The metadata.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }
    /// Pages in the snapshot.
    pub fn pages(&self) -> u64 {
        self.body
            .pages
            .iter()
            .fold(0u64, |a, e| a.saturating_add(e.count))
    }
    /// All-zero pages.
    pub fn zero_pages(&self) -> u64 {
        self.body
            .pages
            .iter()
            .filter(|e| e.target == Target::Zero)
            .fold(0u64, |a, e| a.saturating_add(e.count))
    }
    /// The pages, as disjoint ascending runs.
    pub fn page_runs(&self) -> Vec<PageRun> {
        normalize_runs(&self.meta.runs)
    }
    /// Whether the page is part of the snapshot.
    pub fn contains(&self, page: u64) -> bool {
        find(&self.body.pages, page).is_some()
    }
    /// Whether the page is all zero (`None`: not part of the snapshot). Lazy restore
    /// can map such pages without reading anything.
    pub fn is_zero(&self, page: u64) -> Option<bool> {
        find(&self.body.pages, page).map(|(t, _)| t == Target::Zero)
    }
    /// State blob length.
    pub fn state_len(&self) -> u64 {
        self.body.state_len
    }
    /// When it was exported, ms since the Unix epoch.
    pub fn exported_unix_ms(&self) -> u64 {
        self.body.exported_unix_ms
    }
    /// The packs it uses (hex ids).
    pub fn packs(&self) -> Vec<String> {
        self.body.packs.iter().map(|p| hex(&p.pack)).collect()
    }
}

/// The target of piece `n` in `ext` and its offset in the extent.
fn find(ext: &[Extent], n: u64) -> Option<(Target, u64)> {
    let i = ext.partition_point(|e| e.first <= n);
    let e = ext.get(i.checked_sub(1)?)?;
    (n - e.first < e.count).then_some((e.target, n - e.first))
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

// ---------------------------------------------------------------------------------------
// The repository

/// A manifest with the size of each chunk it references.
type SizedRefs = (Manifest, HashMap<(Hash32, u64), u64>);

struct LoadedIndex {
    idx: PackIndex,
    hash: Hash32,
}

/// A snapshot repository on some [`Storage`].
pub struct Repo {
    storage: Arc<dyn Storage>,
    pack_size: usize,
    indexes: Mutex<HashMap<Hash32, Arc<LoadedIndex>>>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("storage", &self.storage)
            .field("pack_size", &self.pack_size)
            .finish_non_exhaustive()
    }
}

/// How a chunk is located while exporting.
#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: Hash32,
    entry: u32,
}

/// Export state: packs being written and the page map being built.
struct Writer<'r> {
    repo: &'r Repo,
    known: HashMap<Hash32, Loc>,
    builder: PackBuilder,
    pending: HashMap<Hash32, u32>,
    pending_slot: Option<u32>,
    slots: Vec<PackPin>,
    slot_of: HashMap<Hash32, u32>,
    report: ExportReport,
}

impl Writer<'_> {
    fn slot(&mut self, pack: Hash32) -> Result<u32> {
        if let Some(&s) = self.slot_of.get(&pack) {
            return Ok(s);
        }
        let li = self.repo.load_index(&pack)?;
        let s = self.slots.len() as u32;
        self.slots.push(PackPin {
            pack,
            index_hash: li.hash,
        });
        self.slot_of.insert(pack, s);
        Ok(s)
    }

    /// Where chunk `data` is (storing it if new): (slot, entry).
    fn place(&mut self, data: &[u8]) -> Result<(u32, u32)> {
        let hash = blake(data);
        if let (Some(&e), Some(s)) = (self.pending.get(&hash), self.pending_slot) {
            self.report.bytes_skipped += data.len() as u64;
            return Ok((s, e));
        }
        if let Some(loc) = self.known.get(&hash).copied() {
            self.report.bytes_skipped += data.len() as u64;
            return Ok((self.slot(loc.pack)?, loc.entry));
        }
        if !self.builder.is_empty()
            && self.builder.bytes.len() + data.len() + 40 > self.repo.pack_size
        {
            self.flush()?;
        }
        let s = match self.pending_slot {
            Some(s) => s,
            None => {
                let s = self.slots.len() as u32;
                self.slots.push(PackPin {
                    pack: [0; 32],
                    index_hash: [0; 32],
                });
                self.pending_slot = Some(s);
                s
            }
        };
        let e = self.builder.push(hash, data);
        self.pending.insert(hash, e);
        self.report.chunks_new += 1;
        self.report.bytes_new += data.len() as u64;
        Ok((s, e))
    }

    /// Write the pack being built and its index.
    fn flush(&mut self) -> Result<()> {
        let Some(slot) = self.pending_slot.take() else {
            return Ok(());
        };
        let b = std::mem::replace(&mut self.builder, PackBuilder::new());
        let (bytes, idx) = b.finish();
        let id = idx.pack;
        let pk = pack_key(&id);
        self.repo.put(&pk, &bytes)?;
        let sealed = seal(INDEX_MAGIC, &encode(&idx));
        let ik = index_key(&id);
        self.repo.put(&ik, &sealed)?;
        self.report.bytes_written += (bytes.len() + sealed.len()) as u64;
        self.report.packs_written += 1;
        let hash = blake(&sealed);
        for (i, e) in idx.entries.iter().enumerate() {
            self.known.entry(e.hash).or_insert(Loc {
                pack: id,
                entry: i as u32,
            });
        }
        self.pending.clear();
        self.repo.cache(id, LoadedIndex { idx, hash });
        // The same pack content may already be pinned (identical packs have one id).
        if let Some(&other) = self.slot_of.get(&id) {
            // Point the reserved slot at the same pack; harmless duplication.
            self.slots[slot as usize] = self.slots[other as usize];
        } else {
            self.slots[slot as usize] = PackPin {
                pack: id,
                index_hash: hash,
            };
            self.slot_of.insert(id, slot);
        }
        Ok(())
    }
}

/// Append piece `n` with `target` to `ext`, extending the last extent when it continues.
fn push_extent(ext: &mut Vec<Extent>, n: u64, target: Target) {
    if let Some(last) = ext.last_mut() {
        if last.first + last.count == n {
            let continues = match (last.target, target) {
                (Target::Zero, Target::Zero) => true,
                (Target::Chunks { pack: a, entry: ea }, Target::Chunks { pack: b, entry: eb }) => {
                    a == b && u64::from(ea) + last.count == u64::from(eb)
                }
                _ => false,
            };
            if continues {
                last.count += 1;
                return;
            }
        }
    }
    ext.push(Extent {
        first: n,
        count: 1,
        target,
    });
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Repo {
    /// Open the repository on `storage`, creating it (its `config`) if the storage holds
    /// none.
    pub fn open_or_init(storage: impl Storage + 'static) -> Result<Repo> {
        let storage: Arc<dyn Storage> = Arc::new(storage);
        match storage.get(CONFIG_KEY) {
            Ok(data) => {
                let c: Config = serde_json::from_slice(&data)
                    .map_err(|e| RepoError::NotARepo(format!("config does not parse: {e}")))?;
                if c.format != FORMAT_NAME {
                    return Err(RepoError::NotARepo(format!(
                        "config says format {:?}",
                        c.format
                    )));
                }
                if c.version > REPO_VERSION {
                    return Err(RepoError::NewerVersion {
                        found: c.version,
                        supported: REPO_VERSION,
                    });
                }
                if c.chunk_size != PAGE_SIZE as u32 {
                    return Err(RepoError::NotARepo(format!(
                        "chunk size {} unsupported",
                        c.chunk_size
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let c = Config {
                    format: FORMAT_NAME.into(),
                    version: REPO_VERSION,
                    chunk_size: PAGE_SIZE as u32,
                    created_unix_ms: unix_ms(SystemTime::now()),
                };
                let data = serde_json::to_vec_pretty(&c)
                    .map_err(|e| storage_err("put", CONFIG_KEY)(io::Error::other(e)))?;
                storage
                    .put(CONFIG_KEY, &data)
                    .map_err(storage_err("put", CONFIG_KEY))?;
            }
            Err(e) => return Err(storage_err("get", CONFIG_KEY)(e)),
        }
        Ok(Repo {
            storage,
            pack_size: DEFAULT_PACK_SIZE,
            indexes: Mutex::new(HashMap::new()),
        })
    }

    /// Use packs of about `bytes` (at least one chunk each) for later exports.
    pub fn with_pack_size(mut self, bytes: usize) -> Repo {
        self.pack_size = bytes.clamp(PAGE_SIZE + 64, 1 << 30);
        self
    }

    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.storage.put(key, data).map_err(storage_err("put", key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<crate::storage::ObjectInfo>> {
        self.storage
            .list(prefix)
            .map_err(storage_err("list", prefix))
    }

    fn list_ids(&self, prefix: &str) -> Result<HashMap<Hash32, crate::storage::ObjectInfo>> {
        Ok(self
            .list(prefix)?
            .into_iter()
            .filter_map(|o| Some((parse_hex(o.key.strip_prefix(prefix)?)?, o)))
            .collect())
    }

    fn cache(&self, id: Hash32, li: LoadedIndex) -> Arc<LoadedIndex> {
        let li = Arc::new(li);
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, li.clone());
        li
    }

    /// The index of `pack` (cached after the first read).
    fn load_index(&self, pack: &Hash32) -> Result<Arc<LoadedIndex>> {
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

    /// The condemned list (empty if none).
    fn condemned(&self) -> Result<HashSet<Hash32>> {
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

    // -----------------------------------------------------------------------------------
    // Export

    /// Export a snapshot: store its new content and then its manifest. See the crate docs
    /// for what is stored and why an interrupted export is harmless.
    ///
    /// A snapshot of the same name already in the repository is refused
    /// ([`RepoError::Exists`]) unless its content and metadata are identical, in which
    /// case nothing is written and the report says `no_op`.
    pub fn export(
        &self,
        source: &mut dyn SnapshotSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<ExportReport> {
        let meta = source.meta().map_err(RepoError::Source)?;
        let body = meta.to_body()?;
        let mkey = manifest_key(&meta.name);
        let runs = normalize_runs(&meta.runs);
        let total: u64 = runs.iter().map(|r| r.count).sum();

        if let Some(existing) = self.try_manifest(&meta.name)? {
            return self.compare_existing(&existing, &body, &runs, total, source);
        }

        // Condemned packs are read before the indexes, so none of them is reused.
        let condemned = self.condemned()?;
        let packs = self.list_ids("packs/")?;
        let idx_ids = self.list_ids("index/")?;
        let mut known: HashMap<Hash32, Loc> = HashMap::new();
        let n_idx = idx_ids.len() as u64;
        for (i, id) in idx_ids.keys().enumerate() {
            if !packs.contains_key(id) || condemned.contains(id) {
                continue;
            }
            match self.load_index(id) {
                Ok(li) => {
                    for (e, ent) in li.idx.entries.iter().enumerate() {
                        known.entry(ent.hash).or_insert(Loc {
                            pack: *id,
                            entry: e as u32,
                        });
                    }
                }
                // A damaged index is ignored: its chunks are stored again if needed.
                Err(e) => log::warn!("export: ignoring {}: {e}", index_key(id)),
            }
            if i % 64 == 0 {
                progress(Progress {
                    phase: Phase::Indexes,
                    done: i as u64,
                    total: n_idx,
                    bytes_new: 0,
                });
            }
        }

        let mut w = Writer {
            repo: self,
            known,
            builder: PackBuilder::new(),
            pending: HashMap::new(),
            pending_slot: None,
            slots: Vec::new(),
            slot_of: HashMap::new(),
            report: ExportReport {
                name: meta.name.clone(),
                pages: total,
                ..Default::default()
            },
        };

        let mut pages_ext: Vec<Extent> = Vec::new();
        let mut buf = [0u8; PAGE_SIZE];
        let mut done = 0u64;
        for r in &runs {
            for p in r.first..r.end() {
                source.read_page(p, &mut buf).map_err(RepoError::Source)?;
                let target = if is_zero(&buf) {
                    w.report.zero_pages += 1;
                    Target::Zero
                } else {
                    let (pack, entry) = w.place(&buf)?;
                    Target::Chunks { pack, entry }
                };
                push_extent(&mut pages_ext, p, target);
                done += 1;
                if done % 256 == 0 || done == total {
                    progress(Progress {
                        phase: Phase::Pages,
                        done,
                        total,
                        bytes_new: w.report.bytes_new,
                    });
                }
            }
        }

        let state = source.state().map_err(RepoError::Source)?;
        if state.len() as u64 > MAX_STATE_LEN {
            return Err(RepoError::InvalidMeta(format!(
                "state blob of {} bytes (at most {MAX_STATE_LEN})",
                state.len()
            )));
        }
        let pieces = state.len().div_ceil(PAGE_SIZE) as u64;
        let mut state_ext: Vec<Extent> = Vec::new();
        for (n, piece) in state.chunks(PAGE_SIZE).enumerate() {
            let target = if piece.len() == PAGE_SIZE && is_zero(piece) {
                Target::Zero
            } else {
                let (pack, entry) = w.place(piece)?;
                Target::Chunks { pack, entry }
            };
            push_extent(&mut state_ext, n as u64, target);
        }
        progress(Progress {
            phase: Phase::State,
            done: pieces,
            total: pieces,
            bytes_new: w.report.bytes_new,
        });

        w.flush()?;
        progress(Progress {
            phase: Phase::Commit,
            done: 0,
            total: 1,
            bytes_new: w.report.bytes_new,
        });

        // The final check (crate docs, "Garbage collection rule"): first the condemned
        // list, then the packs listing.
        let condemned = self.condemned()?;
        let present = self.list_ids("packs/")?;
        let lost = w
            .slots
            .iter()
            .filter(|s| condemned.contains(&s.pack) || !present.contains_key(&s.pack))
            .count();
        if lost > 0 {
            return Err(RepoError::Conflict(lost));
        }
        if self
            .storage
            .exists(&mkey)
            .map_err(storage_err("exists", &mkey))?
        {
            return Err(RepoError::Exists(meta.name.clone()));
        }

        let manifest = ManifestBody {
            meta: body,
            exported_unix_ms: unix_ms(SystemTime::now()),
            packs: w.slots.clone(),
            pages: pages_ext,
            state_len: state.len() as u64,
            state_hash: blake(&state),
            state: state_ext,
        };
        let sealed = seal(MANIFEST_MAGIC, &encode(&manifest));
        self.put(&mkey, &sealed)?;
        let mut report = w.report;
        report.bytes_written += sealed.len() as u64;
        report.state_len = state.len() as u64;
        progress(Progress {
            phase: Phase::Commit,
            done: 1,
            total: 1,
            bytes_new: report.bytes_new,
        });
        Ok(report)
    }

    /// The export of a name that exists: a no-op if identical, else `Exists`.
    fn compare_existing(
        &self,
        existing: &Manifest,
        body: &MetaBody,
        runs: &[PageRun],
        total: u64,
        source: &mut dyn SnapshotSource,
    ) -> Result<ExportReport> {
        let name = existing.name().to_string();
        let differs = || Err(RepoError::Exists(name.clone()));
        if existing.body.meta != *body {
            return differs();
        }
        let mut report = ExportReport {
            name: name.clone(),
            pages: total,
            no_op: true,
            ..Default::default()
        };
        let mut buf = [0u8; PAGE_SIZE];
        for r in runs {
            for p in r.first..r.end() {
                source.read_page(p, &mut buf).map_err(RepoError::Source)?;
                let zero = is_zero(&buf);
                let same = match find(&existing.body.pages, p) {
                    Some((Target::Zero, _)) => zero,
                    Some((Target::Chunks { pack, entry }, off)) => {
                        let (e, _) = self.entry(
                            existing,
                            pack,
                            u64::from(entry) + off,
                            &format!("page {p}"),
                        )?;
                        !zero && e.hash == blake(&buf)
                    }
                    None => false,
                };
                if !same {
                    return differs();
                }
                if zero {
                    report.zero_pages += 1;
                } else {
                    report.bytes_skipped += PAGE_SIZE as u64;
                }
            }
        }
        let state = source.state().map_err(RepoError::Source)?;
        if state.len() as u64 != existing.body.state_len
            || blake(&state) != existing.body.state_hash
        {
            return differs();
        }
        report.state_len = state.len() as u64;
        report.bytes_skipped += state.len() as u64;
        Ok(report)
    }

    // -----------------------------------------------------------------------------------
    // Reading

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

    fn try_manifest(&self, name: &str) -> Result<Option<Manifest>> {
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
    fn entry(
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
        let key = pack_key(&pack);
        let data = match self.storage.get_range(&key, e.offset, u64::from(e.len)) {
            Ok(d) => d,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::PackMissing {
                    snapshot: m.name().to_string(),
                    pack: hex(&pack),
                    what: what.to_string(),
                })
            }
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(damaged("pack is truncated".into()))
            }
            Err(err) => return Err(storage_err("get", &key)(err)),
        };
        check_chunk(&e, &data).map_err(damaged)?;
        Ok(data)
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

    // -----------------------------------------------------------------------------------
    // Management

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_and_find() {
        let mut v = Vec::new();
        push_extent(&mut v, 0, Target::Zero);
        push_extent(&mut v, 1, Target::Zero);
        push_extent(&mut v, 2, Target::Chunks { pack: 0, entry: 5 });
        push_extent(&mut v, 3, Target::Chunks { pack: 0, entry: 6 });
        push_extent(&mut v, 4, Target::Chunks { pack: 0, entry: 6 });
        push_extent(&mut v, 9, Target::Zero);
        assert_eq!(v.len(), 4);
        assert_eq!(find(&v, 3), Some((Target::Chunks { pack: 0, entry: 5 }, 1)));
        assert_eq!(find(&v, 5), None);
        assert_eq!(find(&v, 9), Some((Target::Zero, 0)));
        assert_eq!(find(&v, 10), None);
        assert_eq!(find(&[], 0), None);
    }

    #[test]
    fn meta_validation() {
        let good = SnapshotMeta {
            name: "guest:5/x".into(),
            kind: SnapshotKind::Process,
            owner: Owner::Guest(5),
            created_unix_ms: 1,
            created_unix_ns: 1_000_000,
            labels: vec![],
            process: Some(ProcessInfo {
                pid: 1,
                comm: "sh".into(),
                run_vas: vec![0x1000],
            }),
            ram_size: 1 << 20,
            runs: vec![PageRun::new(3, 4)],
        };
        let b = good.to_body().unwrap();
        assert_eq!(SnapshotMeta::from_body("k", &b).unwrap(), good);
        let mut m = good.clone();
        m.owner = Owner::Host;
        assert!(m.to_body().is_err());
        let mut m = good.clone();
        m.runs = vec![PageRun::new(255, 2)];
        assert!(m.to_body().is_err());
        let mut m = good.clone();
        m.process = None;
        assert!(m.to_body().is_err());
        let mut m = good;
        m.runs.push(PageRun::new(100, 1));
        assert!(m.to_body().is_err());
    }
}
