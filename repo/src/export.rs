//! Exporting a snapshot into the repository: [`SnapshotSource`] (what an export reads),
//! its progress ([`Phase`], [`Progress`]) and result ([`ExportReport`]), and
//! [`Repo::export`] with the pack writer and page-map builder it uses.

use std::collections::HashMap;
use std::time::SystemTime;

use pmem_backend::{normalize_runs, PageRun};
use serde::Serialize;

use crate::error::{storage_err, RepoError, Result, SourceError};
use crate::format::{
    blake, encode, index_key, manifest_key, pack_key, seal, Extent, Hash32, ManifestBody,
    ManifestExt, MetaBody, PackBuilder, PackPin, Target, INDEX_MAGIC, MANIFEST_MAGIC,
    MAX_TOUCH_PAGES, MAX_TOUCH_RUNS,
};
use crate::meta::{find, Manifest, SnapshotMeta};
use crate::read::LoadedIndex;
use crate::repo::{unix_ms, Repo, MAX_STATE_LEN};
use crate::PAGE_SIZE;

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
    /// The pages the guest touched first after the snapshot, in that order, if known
    /// (called after the pages were read). Recorded in the manifest, cut to
    /// [`crate::MAX_TOUCH_RUNS`] runs and [`crate::MAX_TOUCH_PAGES`] pages; runs outside
    /// the snapshot are dropped.
    fn touch_order(&mut self) -> Vec<PageRun> {
        Vec::new()
    }
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
        let sealed = seal(INDEX_MAGIC, &encode(&idx));
        let ik = index_key(&id);
        self.report.bytes_written += (bytes.len() + sealed.len()) as u64;
        let hash = blake(&sealed);
        // The pack, then its index, in the background on an object store (a bounded
        // number of packs in flight); the export waits for all before its final check.
        self.repo
            .storage
            .put_queued(vec![(pk.clone(), bytes), (ik, sealed)])
            .map_err(storage_err("put", &pk))?;
        self.report.packs_written += 1;
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

/// `order` cut to what a manifest may hold: runs inside the snapshot's (normalized)
/// `runs`, at most [`MAX_TOUCH_RUNS`] runs and [`MAX_TOUCH_PAGES`] pages.
fn bounded_touch_order(order: Vec<PageRun>, runs: &[PageRun]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut total = 0u64;
    for r in order {
        if out.len() >= MAX_TOUCH_RUNS || total >= MAX_TOUCH_PAGES {
            break;
        }
        let i = runs.partition_point(|s| s.first <= r.first);
        let Some(s) = i.checked_sub(1).map(|i| runs[i]) else {
            continue;
        };
        let end = r.end().min(s.end());
        if r.count == 0 || end <= r.first {
            continue;
        }
        let count = (end - r.first).min(MAX_TOUCH_PAGES - total);
        out.push((r.first, count));
        total += count;
    }
    out
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl Repo {
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
        let r = self.export_inner(source, progress);
        if r.is_err() {
            // Uploads still in flight finish (or fail) before the error is returned, so
            // nothing of this export is written afterwards.
            let _ = self.storage.wait_queued();
        }
        r
    }

    fn export_inner(
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
        // All at once (concurrent GETs on an object store); the loop below finds them
        // loaded, or reports what was wrong.
        let usable: Vec<Hash32> = idx_ids
            .keys()
            .filter(|id| packs.contains_key(*id) && !condemned.contains(*id))
            .copied()
            .collect();
        self.load_indexes(&usable);
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
        self.storage
            .wait_queued()
            .map_err(storage_err("put", "packs/"))?;
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
        let touch_order = bounded_touch_order(source.touch_order(), &runs);
        let mut sealed_body = encode(&manifest);
        if !touch_order.is_empty() {
            // After the body: format 1 readers stop there (docs/repository.md).
            sealed_body.extend(encode(&ManifestExt { touch_order }));
        }
        let sealed = seal(MANIFEST_MAGIC, &sealed_body);
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
}
