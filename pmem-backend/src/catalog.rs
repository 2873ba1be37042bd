//! The catalog: every committed snapshot (name, metadata, runs, redirects, state-blob
//! location) plus the checksum of every preserved block. Since version 3 (issue 16) it
//! is a *checkpoint* (the whole state, as versions 1 and 2 were) followed by *delta
//! records*, one per commit since the checkpoint, each saying only what that commit
//! changed (the redirects it compacted from the redirect log, the snapshot it deleted,
//! the snapshot it added). A commit appends its delta; when the deltas have grown past
//! the checkpoint's size, or the slot has no room for the next one, the commit writes a
//! new checkpoint into the other slot instead (`pool/commit.rs`). Every record carries
//! its own crc32c.
//!
//! Version 4 keeps the redirects apart from the snapshots, one record per preserve
//! shared by the snapshots it re-pointed (`redirects.rs`), instead of a page -> block
//! map in every snapshot: checkpoints follow the preserved pages, not snapshots x pages.

use crate::codec::{DecodeError, Reader, Writer};
use crate::redirects::{Redirects, Version};
use crate::types::{normalize_runs, Owner, PageRun, ProcessInfo, SnapshotKind};
use std::collections::{BTreeMap, HashSet};

/// Magic at the start of a catalog.
pub const CATALOG_MAGIC: [u8; 8] = *b"PMSCATLG";
/// Catalog format version written. Version 2 adds each snapshot's owner (issue 12);
/// version 3 lets delta records follow the checkpoint (issue 16; its snapshot records
/// are encoded as in version 2); version 4 moves the redirects out of the snapshot
/// records into one shared record list (issue 16).
pub const CATALOG_VERSION: u32 = 4;
/// Oldest catalog version read: version 1 catalogs (no owner) are read with every
/// snapshot host-owned; version 1 and 2 catalogs are a checkpoint with no deltas.
/// Older catalogs' per-snapshot redirects are turned into shared records as they are
/// read, and the next commit rewrites the catalog as a version 4 checkpoint.
pub const CATALOG_VERSION_MIN: u32 = 1;
/// Bytes of the catalog header.
pub const CATALOG_HEADER_LEN: usize = 64;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Record type: the block checksum table.
pub const REC_BLOCK_TABLE: u32 = 1;
/// Record type: one snapshot.
pub const REC_SNAPSHOT: u32 = 2;
/// Record type: what one commit changed (version 3, after the checkpoint).
pub const REC_DELTA: u32 = 3;
/// Record type: the shared redirects (version 4).
pub const REC_REDIRECTS: u32 = 4;
/// Bytes of a delta record's header.
pub const DELTA_HEADER_LEN: usize = 24;

/// Catalog bytes a block adds when it holds a preserved page: its block-table entry
/// (block u32, crc32c u32) and its redirect record (page u64, upto u64, block u32),
/// however many snapshots share it (since version 4); a state-blob block adds 4 (its
/// number in the blob's list). Growing the block area reserves this much metadata-slot
/// room per free block (`Pool::grow_blocks`).
pub const CATALOG_BYTES_PER_BLOCK: u64 = 8 + 20;

/// Longest snapshot name / label key.
pub const MAX_NAME_LEN: usize = 64;
/// Longest label value / command name.
pub const MAX_VALUE_LEN: usize = 256;
/// Most labels per snapshot.
pub const MAX_LABELS: usize = 64;

/// Check a snapshot name or label key: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting
/// with `-` or `.` (so it can't pass for a flag or a hidden file in exports).
pub fn validate_name(what: &str, s: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("{what} {s:?} must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if s.starts_with(['-', '.']) || !s.chars().all(ok_char) {
        return Err(format!(
            "{what} {s:?} may contain only A-Z a-z 0-9 . _ - and must not start with - or ."
        ));
    }
    Ok(())
}

/// Check a store name against its owner: a plain name ([`validate_name`]) for the
/// host, `guest:UID/NAME` with a valid NAME for guest uid UID.
pub fn validate_owned_name(owner: Owner, s: &str) -> Result<(), String> {
    match (owner, Owner::split(s)) {
        (Owner::Host, Some((Owner::Host, n))) => validate_name("snapshot name", n),
        (Owner::Guest(uid), Some((Owner::Guest(u), n))) if u == uid => {
            validate_name("snapshot name", n)
        }
        _ => Err(format!(
            "snapshot name {s:?} is not in the name space of its owner ({owner})"
        )),
    }
}

/// Where a snapshot's state blob lives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlobRef {
    /// Length in bytes.
    pub len: u64,
    /// crc32c of the whole blob.
    pub crc: u32,
    /// Blocks holding it, in order.
    pub blocks: Vec<u32>,
}

/// One snapshot as the store keeps it in memory and in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id.
    pub id: u64,
    /// Unique name (`guest:UID/NAME` for guest-owned snapshots).
    pub name: String,
    /// Who it belongs to.
    pub owner: Owner,
    /// Process or vm.
    pub kind: SnapshotKind,
    /// Creation time (ns since the Unix epoch).
    pub created_unix_ns: u64,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Process details.
    pub process: Option<ProcessInfo>,
    /// Runs as given.
    pub runs: Vec<PageRun>,
    /// The distinct pages covered: `runs` sorted and merged. Derived, not stored.
    /// Where each page is (RAM or a block) is in the store's shared redirects.
    pub page_set: Vec<PageRun>,
    /// State blob.
    pub blob: BlobRef,
}

impl Snapshot {
    /// Distinct pages covered.
    pub fn page_count(&self) -> u64 {
        self.page_set.iter().map(|r| r.count).sum()
    }
    /// Whether the snapshot covers guest page p.
    pub fn covers(&self, p: u64) -> bool {
        let i = self.page_set.partition_point(|r| r.first <= p);
        i > 0 && self.page_set[i - 1].contains(p)
    }
    /// Every page covered, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.page_set.iter().flat_map(|r| r.first..r.end())
    }

    /// Bytes [`Self::encode`] writes in the current version (older ones add the
    /// snapshot's redirects).
    fn encoded_len(&self) -> usize {
        let str16 = |s: &str| 2 + s.len();
        8 + 1
            + 1
            + str16(&self.name)
            + 8
            + 5
            + self.process.as_ref().map_or(0, |p| 4 + str16(&p.comm))
            + 4
            + self
                .labels
                .iter()
                .map(|(k, v)| str16(k) + str16(v))
                .sum::<usize>()
            + 4
            + 24 * self.runs.len()
            + 8
            + 4
            + 4
            + 4 * self.blob.blocks.len()
    }

    /// Encode in catalog version `version`; before version 4 a snapshot record carries
    /// its own redirects, `map` (page, block), by page.
    fn encode(&self, w: &mut Writer, version: u32, map: &[(u64, u32)]) {
        w.u64(self.id);
        w.u8(self.kind.code());
        w.u8(u8::from(self.process.is_some()));
        w.str16(&self.name);
        w.u64(self.created_unix_ns);
        if version >= 2 {
            let (tag, uid) = self.owner.code();
            w.u8(tag);
            w.u32(uid);
        }
        if let Some(p) = &self.process {
            w.u32(p.pid);
            w.str16(&p.comm);
        }
        w.u32(self.labels.len() as u32);
        for (k, v) in &self.labels {
            w.str16(k);
            w.str16(v);
        }
        w.u32(self.runs.len() as u32);
        for (i, r) in self.runs.iter().enumerate() {
            w.u64(r.first);
            w.u64(r.count);
            w.u64(
                self.process
                    .as_ref()
                    .and_then(|p| p.run_vas.get(i).copied())
                    .unwrap_or(0),
            );
        }
        if version < 4 {
            w.u32(map.len() as u32);
            for &(p, b) in map {
                w.u64(p);
                w.u32(b);
            }
        }
        w.u64(self.blob.len);
        w.u32(self.blob.crc);
        w.u32(self.blob.blocks.len() as u32);
        for &b in &self.blob.blocks {
            w.u32(b);
        }
    }

    /// Decode a snapshot record of catalog version `version`, with its own redirects
    /// (page, block), by page, before version 4 (none from version 4 on).
    fn decode(r: &mut Reader<'_>, version: u32) -> Result<(Self, Vec<(u64, u32)>), DecodeError> {
        let inv = |m: String| DecodeError::Invalid(m);
        let id = r.u64()?;
        let kind =
            SnapshotKind::from_code(r.u8()?).ok_or_else(|| inv("unknown snapshot kind".into()))?;
        let has_process = r.u8()? != 0;
        let name = r.str16()?;
        let created_unix_ns = r.u64()?;
        let owner = if version >= 2 {
            let (tag, uid) = (r.u8()?, r.u32()?);
            Owner::from_code(tag, uid)
                .ok_or_else(|| inv(format!("snapshot {name:?}: unknown owner {tag}/{uid}")))?
        } else {
            Owner::Host
        };
        validate_owned_name(owner, &name).map_err(inv)?;
        let mut process = if has_process {
            let pid = r.u32()?;
            let comm = r.str16()?;
            Some(ProcessInfo {
                pid,
                comm,
                run_vas: Vec::new(),
            })
        } else {
            None
        };
        let nl = r.count(4)?;
        if nl > MAX_LABELS {
            return Err(inv(format!("snapshot {name:?}: {nl} labels")));
        }
        let mut labels = Vec::with_capacity(nl);
        for _ in 0..nl {
            labels.push((r.str16()?, r.str16()?));
        }
        let nr = r.count(24)?;
        let mut runs = Vec::with_capacity(nr);
        for _ in 0..nr {
            let first = r.u64()?;
            let count = r.u64()?;
            let va = r.u64()?;
            if count == 0 || first.checked_add(count).is_none() {
                return Err(inv(format!("snapshot {name:?}: bad run {first}+{count}")));
            }
            runs.push(PageRun { first, count });
            if let Some(p) = process.as_mut() {
                p.run_vas.push(va);
            }
        }
        let mut redirects = BTreeMap::new();
        if version < 4 {
            for _ in 0..r.count(12)? {
                let p = r.u64()?;
                let b = r.u32()?;
                if redirects.insert(p, b).is_some() {
                    return Err(inv(format!("snapshot {name:?}: page {p} redirected twice")));
                }
            }
        }
        let len = r.u64()?;
        let crc = r.u32()?;
        let nb = r.count(4)?;
        let mut blocks = Vec::with_capacity(nb);
        for _ in 0..nb {
            blocks.push(r.u32()?);
        }
        if len.div_ceil(crate::PAGE_SIZE as u64) != nb as u64 {
            return Err(inv(format!(
                "snapshot {name:?}: state blob of {len} bytes in {nb} blocks"
            )));
        }
        let page_set = normalize_runs(&runs);
        let s = Snapshot {
            id,
            name,
            owner,
            kind,
            created_unix_ns,
            labels,
            process,
            runs,
            page_set,
            blob: BlobRef { len, crc, blocks },
        };
        if let Some(&p) = redirects.keys().find(|&&p| !s.covers(p)) {
            return Err(inv(format!(
                "snapshot {:?}: redirect of page {p} it does not cover",
                s.name
            )));
        }
        Ok((s, redirects.into_iter().collect()))
    }
}

/// A decoded catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Generation it was committed under (that of its last delta, or of the checkpoint
    /// when no delta follows it).
    pub generation: u64,
    /// Version of the checkpoint (a version below 3 has no deltas and is rewritten as a
    /// version 3 checkpoint at the next commit).
    pub version: u32,
    /// Bytes of the checkpoint; the delta records follow it.
    pub checkpoint_len: u64,
    /// Delta records applied after the checkpoint.
    pub deltas: u64,
    /// Next snapshot id to hand out.
    pub next_snapshot_id: u64,
    /// Snapshots, in id order.
    pub snapshots: Vec<Snapshot>,
    /// Where their preserved pages are.
    pub redirects: Redirects,
    /// crc32c of every block holding a preserved page.
    pub block_crcs: BTreeMap<u32, u32>,
}

/// Start a record in `w`: room for its header, filled in by [`end_record`] once the
/// payload that follows is written (in place: a checkpoint of millions of redirects is
/// not copied from buffer to buffer).
fn begin_record(w: &mut Writer) -> usize {
    let at = w.buf.len();
    w.buf.resize(at + RECORD_HEADER_LEN, 0);
    at
}

/// Fill in the header of the record begun at `at`: its type, the payload written since,
/// and their checksums.
fn end_record(w: &mut Writer, at: usize, kind: u32) {
    let payload = &w.buf[at + RECORD_HEADER_LEN..];
    let mut h = Writer::with_capacity(RECORD_HEADER_LEN);
    h.u32(kind);
    h.u32(u32::try_from(payload.len()).expect("catalog records are bounded by the metadata slot"));
    h.u32(crate::checksum::crc32c(payload));
    let hc = crate::checksum::crc32c(&h.buf);
    h.u32(hc);
    w.buf[at..at + RECORD_HEADER_LEN].copy_from_slice(&h.buf);
}

/// What a checkpoint holds, borrowed from the store (commits don't clone snapshots).
#[allow(missing_debug_implementations)] // two of its parts are iterators
pub struct CheckpointParts<'a, S, B> {
    /// Generation it is committed under.
    pub generation: u64,
    /// Next snapshot id to hand out.
    pub next_snapshot_id: u64,
    /// The snapshots, in id order.
    pub snapshots: S,
    /// The redirects, less the records whose block is in `dropped_blocks` (those only a
    /// snapshot the commit deletes uses).
    pub redirects: &'a Redirects,
    /// Blocks left out (see `redirects`).
    pub dropped_blocks: &'a HashSet<u32>,
    /// (block, crc32c) of every block holding a preserved page.
    pub block_crcs: B,
}

/// Encode a catalog checkpoint from its parts.
pub fn encode<'a, S, B>(parts: CheckpointParts<'a, S, B>) -> Vec<u8>
where
    S: Iterator<Item = &'a Snapshot>,
    B: ExactSizeIterator<Item = (u32, u32)>,
{
    encode_version(CATALOG_VERSION, parts)
}

/// Encode a checkpoint in catalog version `version` (tests write older pools with it).
pub(crate) fn encode_version<'a, S, B>(version: u32, parts: CheckpointParts<'a, S, B>) -> Vec<u8>
where
    S: Iterator<Item = &'a Snapshot>,
    B: ExactSizeIterator<Item = (u32, u32)>,
{
    let CheckpointParts {
        generation,
        next_snapshot_id,
        snapshots,
        redirects,
        dropped_blocks,
        block_crcs,
    } = parts;
    let kept = |v: &Version| !dropped_blocks.contains(&v.block);
    let mut w = Writer::with_capacity(
        CATALOG_HEADER_LEN + RECORD_HEADER_LEN + 4 + block_crcs.len() * 8 + (1 << 16),
    );
    w.buf.resize(CATALOG_HEADER_LEN, 0);
    let at = begin_record(&mut w);
    w.u32(block_crcs.len() as u32);
    for (b, c) in block_crcs {
        w.u32(b);
        w.u32(c);
    }
    end_record(&mut w, at, REC_BLOCK_TABLE);
    let mut count = 1u32;
    if version >= 4 {
        w.buf.reserve(RECORD_HEADER_LEN + 4 + 20 * redirects.len());
        let at = begin_record(&mut w);
        let n_at = w.buf.len();
        w.u32(0);
        let mut n = 0u32;
        for v in redirects.iter().filter(kept) {
            w.u64(v.page);
            w.u64(v.upto);
            w.u32(v.block);
            n += 1;
        }
        w.buf[n_at..n_at + 4].copy_from_slice(&n.to_le_bytes());
        end_record(&mut w, at, REC_REDIRECTS);
        count += 1;
    }
    for s in snapshots {
        let map: Vec<(u64, u32)> = if version < 4 {
            redirects
                .of(s)
                .iter()
                .filter(|v| kept(v))
                .map(|v| (v.page, v.block))
                .collect()
        } else {
            Vec::new()
        };
        w.buf
            .reserve(RECORD_HEADER_LEN + s.encoded_len() + 4 + 12 * map.len());
        let at = begin_record(&mut w);
        s.encode(&mut w, version, &map);
        end_record(&mut w, at, REC_SNAPSHOT);
        count += 1;
    }
    let body_len = (w.buf.len() - CATALOG_HEADER_LEN) as u64;
    let mut h = Writer::with_capacity(CATALOG_HEADER_LEN);
    h.bytes(&CATALOG_MAGIC);
    h.u32(version);
    h.u32(count);
    h.u64(generation);
    h.u64(next_snapshot_id);
    h.u64(body_len);
    h.buf.resize(60, 0);
    let crc = crate::checksum::crc32c(&h.buf);
    h.u32(crc);
    w.buf[..CATALOG_HEADER_LEN].copy_from_slice(&h.buf);
    w.buf
}

/// Decode a catalog (a checkpoint and the delta records after it), checking every
/// checksum; `bytes` is exactly the catalog in force (the superblock's `catalog_len`).
/// The generation of the last record must be `expected_generation`. Errors name the
/// failing record.
pub fn decode(bytes: &[u8], expected_generation: u64) -> Result<Catalog, String> {
    let mut cat = decode_checkpoint(bytes)?;
    let rest = &bytes[cat.checkpoint_len as usize..];
    if cat.version < 3 && !rest.is_empty() {
        return Err(format!(
            "catalog: {} bytes after the last record",
            rest.len()
        ));
    }
    if !rest.is_empty() {
        apply_deltas(&mut cat, rest)?;
    }
    if cat.generation != expected_generation {
        return Err(format!(
            "catalog: generation {}, superblock says {expected_generation}",
            cat.generation
        ));
    }
    Ok(cat)
}

/// Decode the checkpoint at the start of `bytes` (its header says how long it is).
fn decode_checkpoint(bytes: &[u8]) -> Result<Catalog, String> {
    let e = |m: String| format!("catalog: {m}");
    if bytes.len() < CATALOG_HEADER_LEN {
        return Err(e("shorter than its header".into()));
    }
    let (head, body) = bytes.split_at(CATALOG_HEADER_LEN);
    if head[..8] != CATALOG_MAGIC {
        return Err(e("bad magic".into()));
    }
    let stored = u32::from_le_bytes([head[60], head[61], head[62], head[63]]);
    if crate::checksum::crc32c(&head[..60]) != stored {
        return Err(e("header checksum mismatch".into()));
    }
    let mut r = Reader::new(head, "catalog header");
    let hdr = (|| -> Result<_, DecodeError> {
        r.take(8)?;
        Ok((r.u32()?, r.u32()?, r.u64()?, r.u64()?, r.u64()?))
    })()
    .map_err(|x| e(x.to_string()))?;
    let (version, count, generation, next_snapshot_id, body_len) = hdr;
    if !(CATALOG_VERSION_MIN..=CATALOG_VERSION).contains(&version) {
        return Err(e(format!(
            "unknown catalog version {version} (this build reads {CATALOG_VERSION_MIN} to \
             {CATALOG_VERSION}): the pool was written by a newer pmsnap"
        )));
    }
    if body_len > body.len() as u64 {
        return Err(e(format!(
            "body is {} bytes, header says {body_len}",
            body.len()
        )));
    }
    let body = &body[..body_len as usize];
    let mut cat = Catalog {
        generation,
        version,
        checkpoint_len: CATALOG_HEADER_LEN as u64 + body_len,
        next_snapshot_id,
        ..Default::default()
    };
    let mut r = Reader::new(body, "catalog");
    // Before version 4: each snapshot's own redirects, turned into shared records below.
    let mut maps = Vec::new();
    for i in 0..count {
        let rec = (|| -> Result<_, DecodeError> {
            let h = r.take(RECORD_HEADER_LEN)?;
            let mut hr = Reader::new(h, "record header");
            let kind = hr.u32()?;
            let len = hr.u32()? as usize;
            let pcrc = hr.u32()?;
            let hcrc = hr.u32()?;
            Ok((h, kind, len, pcrc, hcrc))
        })()
        .map_err(|x| e(format!("record {i}: {x}")))?;
        let (h, kind, len, pcrc, hcrc) = rec;
        if crate::checksum::crc32c(&h[..12]) != hcrc {
            return Err(e(format!("record {i}: header checksum mismatch")));
        }
        let payload = r.take(len).map_err(|x| e(format!("record {i}: {x}")))?;
        if crate::checksum::crc32c(payload) != pcrc {
            return Err(e(format!("record {i}: payload checksum mismatch")));
        }
        let mut pr = Reader::new(payload, "catalog record");
        match kind {
            REC_BLOCK_TABLE => {
                let n = pr.count(8).map_err(|x| e(format!("block table: {x}")))?;
                for _ in 0..n {
                    let (b, c) = (pr.u32(), pr.u32());
                    let (b, c) = (
                        b.map_err(|x| e(x.to_string()))?,
                        c.map_err(|x| e(x.to_string()))?,
                    );
                    if cat.block_crcs.insert(b, c).is_some() {
                        return Err(e(format!("block table lists block {b} twice")));
                    }
                }
            }
            REC_SNAPSHOT => {
                let (s, map) = Snapshot::decode(&mut pr, version)
                    .map_err(|x| e(format!("record {i} (snapshot): {x}")))?;
                cat.snapshots.push(s);
                maps.push(map);
            }
            REC_REDIRECTS if version >= 4 => {
                cat.redirects = decode_redirects(&mut pr, next_snapshot_id)
                    .map_err(|x| e(format!("record {i} (redirects): {x}")))?;
            }
            other => return Err(e(format!("record {i}: unknown type {other}"))),
        }
        if pr.remaining() != 0 {
            return Err(e(format!("record {i}: {} trailing bytes", pr.remaining())));
        }
    }
    if r.remaining() != 0 {
        return Err(e(format!("{} bytes after the last record", r.remaining())));
    }
    if version < 4 {
        cat.redirects = Redirects::from_per_snapshot(&cat.snapshots, &maps)
            .map_err(|x| e(format!("upgrading version {version} redirects: {x}")))?;
    }
    Ok(cat)
}

/// Decode the shared redirect records: strictly ascending by (page, upto), each `upto`
/// an id already handed out, no block twice.
fn decode_redirects(r: &mut Reader<'_>, next_snapshot_id: u64) -> Result<Redirects, String> {
    let n = r.count(20).map_err(|x| x.to_string())?;
    let mut out = Redirects::new();
    let mut blocks = HashSet::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let x = (|| Ok::<_, DecodeError>((r.u64()?, r.u64()?, r.u32()?)))()
            .map_err(|x| x.to_string())?;
        let (page, upto, block) = x;
        if last.is_some_and(|l| l >= (page, upto)) {
            return Err(format!("record of page {page} upto {upto} out of order"));
        }
        if upto == 0 || upto >= next_snapshot_id {
            return Err(format!("page {page}: snapshot id {upto} never handed out"));
        }
        if !blocks.insert(block) {
            return Err(format!("block {block} in two records"));
        }
        last = Some((page, upto));
        out.add(Version { page, upto, block });
    }
    Ok(out)
}

/// One redirect a commit compacts from the redirect log: every snapshot that referenced
/// RAM(`page`) when it was preserved now references Block(`block`), whose 4 KiB have
/// crc32c `crc`. Applied in order, to the snapshots of the catalog as it stands before
/// the delta's deletion and addition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    /// Guest page preserved.
    pub page: u64,
    /// Block holding its copy.
    pub block: u32,
    /// crc32c of the block.
    pub crc: u32,
}

/// What one commit changed: a decoded delta record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// The commit's generation.
    pub generation: u64,
    /// Next snapshot id after the commit.
    pub next_snapshot_id: u64,
    /// Redirects compacted from the log, applied first.
    pub redirects: Vec<Redirect>,
    /// Ids of the snapshots deleted, applied second.
    pub deleted: Vec<u64>,
    /// Snapshots added, applied last.
    pub added: Vec<Snapshot>,
}

/// Encode the delta record of one commit: header (type, payload length, generation,
/// payload crc32c, header crc32c) and payload (next snapshot id, redirects, deleted ids,
/// added snapshots). Its size follows the change, not the catalog.
pub fn encode_delta(
    generation: u64,
    next_snapshot_id: u64,
    redirects: &[Redirect],
    deleted: Option<u64>,
    added: Option<&Snapshot>,
) -> Vec<u8> {
    let mut p = Writer::with_capacity(20 + redirects.len() * 16 + 256);
    p.u64(next_snapshot_id);
    p.u32(u32::try_from(redirects.len()).expect("the redirect log holds fewer than 2^32"));
    for r in redirects {
        p.u64(r.page);
        p.u32(r.block);
        p.u32(r.crc);
    }
    p.u32(u32::from(deleted.is_some()));
    if let Some(id) = deleted {
        p.u64(id);
    }
    p.u32(u32::from(added.is_some()));
    if let Some(s) = added {
        let mut w = Writer::with_capacity(s.encoded_len());
        s.encode(&mut w, CATALOG_VERSION, &[]);
        p.u32(u32::try_from(w.buf.len()).expect("a snapshot record is small"));
        p.bytes(&w.buf);
    }
    let mut w = Writer::with_capacity(DELTA_HEADER_LEN + p.buf.len());
    w.u32(REC_DELTA);
    w.u32(u32::try_from(p.buf.len()).expect("delta records are bounded by the metadata slot"));
    w.u64(generation);
    w.u32(crate::checksum::crc32c(&p.buf));
    let hc = crate::checksum::crc32c(&w.buf);
    w.u32(hc);
    w.bytes(&p.buf);
    w.buf
}

/// Decode the delta record at the start of `bytes`, which follows a checkpoint of
/// catalog version `version` (its added snapshots are encoded in that version): the
/// delta and its length. Every failure (a checksum, a record running past `bytes`, a
/// wrong type) is an error: the bytes given are all in force (a torn append is never
/// part of them, see `pool/commit.rs`).
pub fn decode_delta(bytes: &[u8], version: u32) -> Result<(Delta, usize), String> {
    if bytes.len() < DELTA_HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than a delta header",
            bytes.len()
        ));
    }
    let h = &bytes[..DELTA_HEADER_LEN];
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if crate::checksum::crc32c(&h[..20]) != u32_at(20) {
        return Err("header checksum mismatch".into());
    }
    if u32_at(0) != REC_DELTA {
        return Err(format!("type {}, not a delta", u32_at(0)));
    }
    let len = u32_at(4) as usize;
    let mut g = [0u8; 8];
    g.copy_from_slice(&h[8..16]);
    let generation = u64::from_le_bytes(g);
    let payload = bytes
        .get(DELTA_HEADER_LEN..DELTA_HEADER_LEN + len)
        .ok_or_else(|| format!("payload of {len} bytes runs past the catalog"))?;
    if crate::checksum::crc32c(payload) != u32_at(16) {
        return Err("payload checksum mismatch".into());
    }
    let mut r = Reader::new(payload, "catalog delta");
    let delta = (|| -> Result<Delta, DecodeError> {
        let mut d = Delta {
            generation,
            next_snapshot_id: r.u64()?,
            ..Default::default()
        };
        let n = r.count(16)?;
        d.redirects.reserve(n);
        for _ in 0..n {
            d.redirects.push(Redirect {
                page: r.u64()?,
                block: r.u32()?,
                crc: r.u32()?,
            });
        }
        for _ in 0..r.count(8)? {
            d.deleted.push(r.u64()?);
        }
        for _ in 0..r.count(4)? {
            let n = r.count(1)?;
            let mut sr = Reader::new(r.take(n)?, "snapshot in a delta");
            let (s, map) = Snapshot::decode(&mut sr, version)?;
            if !map.is_empty() {
                return Err(DecodeError::Invalid(format!(
                    "snapshot {:?} added with redirects",
                    s.name
                )));
            }
            d.added.push(s);
            if sr.remaining() != 0 {
                return Err(DecodeError::Invalid(format!(
                    "{} trailing bytes after a snapshot",
                    sr.remaining()
                )));
            }
        }
        Ok(d)
    })()
    .map_err(|x| x.to_string())?;
    if r.remaining() != 0 {
        return Err(format!("{} trailing bytes", r.remaining()));
    }
    Ok((delta, DELTA_HEADER_LEN + len))
}

/// Apply a delta's redirects as the store applied them, in log order: a preserve of
/// page p re-pointed the snapshots covering p taken since p's newest record, if there
/// were any (else its block holds nothing), and its record's `upto` is the newest
/// snapshot id (`Pool::apply_redirect`). `snaps` is the catalog as it stands before the
/// delta's deletion and addition.
fn apply_redirects(
    snaps: &BTreeMap<u64, Snapshot>,
    redirects: &[Redirect],
    shared: &mut Redirects,
    block_crcs: &mut BTreeMap<u32, u32>,
) -> Result<(), String> {
    let Some(&upto) = snaps.keys().next_back() else {
        return Ok(());
    };
    for r in redirects {
        let since = shared.newest_upto(r.page).unwrap_or(0);
        if !snaps.range(since + 1..).any(|(_, s)| s.covers(r.page)) {
            continue;
        }
        if block_crcs.insert(r.block, r.crc).is_some() {
            return Err(format!(
                "preserve of page {} into block {}, which holds a page already",
                r.page, r.block
            ));
        }
        shared.add(Version {
            page: r.page,
            upto,
            block: r.block,
        });
    }
    Ok(())
}

/// Drop the records of `records` (a deleted snapshot's) that no snapshot left in
/// `snaps` uses (none in their id range covers their page), and their blocks from
/// `block_crcs`: what `Pool::delete` frees.
fn drop_unused(
    snaps: &BTreeMap<u64, Snapshot>,
    records: Vec<Version>,
    shared: &mut Redirects,
    block_crcs: &mut BTreeMap<u32, u32>,
) {
    for v in records {
        let from = shared.previous_upto(v) + 1;
        if !snaps.range(from..=v.upto).any(|(_, s)| s.covers(v.page)) {
            shared.remove(v);
            block_crcs.remove(&v.block);
        }
    }
}

/// Apply the delta records in `bytes` (all of them, back to back) to the checkpoint
/// `cat`, in order. Each delta's generation must be above the previous one's.
fn apply_deltas(cat: &mut Catalog, mut bytes: &[u8]) -> Result<(), String> {
    let mut snaps: BTreeMap<u64, Snapshot> = BTreeMap::new();
    for s in cat.snapshots.drain(..) {
        let id = s.id;
        if snaps.insert(id, s).is_some() {
            return Err(format!("catalog: two snapshots with id {id}"));
        }
    }
    let mut i = 0u64;
    while !bytes.is_empty() {
        let e = |m: String| format!("catalog: delta {i}: {m}");
        let (d, len) = decode_delta(bytes, cat.version).map_err(e)?;
        bytes = &bytes[len..];
        if d.generation <= cat.generation {
            return Err(e(format!(
                "generation {} after generation {}",
                d.generation, cat.generation
            )));
        }
        if d.next_snapshot_id < cat.next_snapshot_id {
            return Err(e(format!(
                "next snapshot id goes back from {} to {}",
                cat.next_snapshot_id, d.next_snapshot_id
            )));
        }
        apply_redirects(
            &snaps,
            &d.redirects,
            &mut cat.redirects,
            &mut cat.block_crcs,
        )
        .map_err(e)?;
        for id in &d.deleted {
            let s = snaps
                .remove(id)
                .ok_or_else(|| e(format!("deletes snapshot id {id}, which does not exist")))?;
            let records = cat.redirects.of(&s);
            drop_unused(&snaps, records, &mut cat.redirects, &mut cat.block_crcs);
        }
        for s in d.added {
            if s.id >= d.next_snapshot_id {
                return Err(e(format!(
                    "adds snapshot id {} but the next id is {}",
                    s.id, d.next_snapshot_id
                )));
            }
            let id = s.id;
            if snaps.insert(id, s).is_some() {
                return Err(e(format!("adds snapshot id {id}, which exists")));
            }
        }
        cat.generation = d.generation;
        cat.next_snapshot_id = d.next_snapshot_id;
        cat.deltas += 1;
        i += 1;
    }
    cat.snapshots = snaps.into_values().collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shared redirects from (page, upto, block) triples.
    fn reds(list: &[(u64, u64, u32)]) -> Redirects {
        let mut r = Redirects::new();
        for &(page, upto, block) in list {
            r.add(Version { page, upto, block });
        }
        r
    }

    /// A checkpoint of catalog version `version`.
    fn enc_v(
        version: u32,
        generation: u64,
        next_snapshot_id: u64,
        snapshots: &[&Snapshot],
        redirects: &Redirects,
        blocks: &[(u32, u32)],
    ) -> Vec<u8> {
        encode_version(
            version,
            CheckpointParts {
                generation,
                next_snapshot_id,
                snapshots: snapshots.iter().copied(),
                redirects,
                dropped_blocks: &HashSet::new(),
                block_crcs: blocks.iter().copied(),
            },
        )
    }

    fn snap() -> Snapshot {
        let runs = vec![PageRun::new(5, 3), PageRun::new(0, 2)];
        Snapshot {
            id: 3,
            name: "web-1".into(),
            owner: Owner::Host,
            kind: SnapshotKind::Process,
            created_unix_ns: 99,
            labels: vec![("app".into(), "nginx".into())],
            process: Some(ProcessInfo {
                pid: 42,
                comm: "nginx".into(),
                run_vas: vec![0x7f00_0000, 0x1000],
            }),
            page_set: normalize_runs(&runs),
            runs,
            blob: BlobRef {
                len: 5000,
                crc: 7,
                blocks: vec![1, 2],
            },
        }
    }

    #[test]
    fn roundtrip() {
        let s = snap();
        for x in [&s, &vm(4, 0, 9)] {
            let mut w = Writer::default();
            x.encode(&mut w, CATALOG_VERSION, &[]);
            assert_eq!(
                w.buf.len(),
                x.encoded_len(),
                "the encoder's reservation is exact"
            );
        }
        let r = reds(&[(6, 3, 11)]);
        let bytes = enc_v(CATALOG_VERSION, 9, 4, &[&s], &r, &[(11, 0xabc)]);
        let c = decode(&bytes, 9).expect("decode");
        assert_eq!(c.snapshots, vec![s]);
        assert_eq!(c.redirects, r);
        assert_eq!(c.next_snapshot_id, 4);
        assert_eq!(c.block_crcs, BTreeMap::from([(11, 0xabc)]));
        assert!(decode(&bytes, 8)
            .expect_err("wrong gen")
            .contains("generation"));
    }

    /// `CATALOG_BYTES_PER_BLOCK` is what the encoder really spends per preserved page,
    /// however many snapshots share it.
    #[test]
    fn a_preserved_block_costs_the_catalog_the_same_for_any_sharing() {
        let mut s = snap();
        s.runs = vec![PageRun::new(0, 1000)];
        s.page_set = normalize_runs(&s.runs);
        s.process = None;
        s.kind = SnapshotKind::Vm;
        let empty = enc_v(CATALOG_VERSION, 1, 4, &[&s], &Redirects::new(), &[]).len();
        let list: Vec<(u64, u64, u32)> = (0..100).map(|p| (p * 3, 3, 500 + p as u32)).collect();
        let table: Vec<(u32, u32)> = list.iter().map(|&(_, _, b)| (b, 0)).collect();
        let full = enc_v(CATALOG_VERSION, 1, 4, &[&s], &reds(&list), &table).len();
        assert_eq!((full - empty) as u64, 100 * CATALOG_BYTES_PER_BLOCK);
        // Ten snapshots sharing every record: the same bytes per record.
        let many: Vec<Snapshot> = (0..10)
            .map(|i| {
                let mut t = s.clone();
                t.id = 3 + i;
                t.name = format!("s{i}");
                t
            })
            .collect();
        let refs: Vec<&Snapshot> = many.iter().collect();
        let list: Vec<(u64, u64, u32)> = (0..100).map(|p| (p * 3, 12, 500 + p as u32)).collect();
        let e10 = enc_v(CATALOG_VERSION, 1, 13, &refs, &Redirects::new(), &[]).len();
        let f10 = enc_v(CATALOG_VERSION, 1, 13, &refs, &reds(&list), &table).len();
        assert_eq!((f10 - e10) as u64, 100 * CATALOG_BYTES_PER_BLOCK);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let s = snap();
        let bytes = enc_v(
            CATALOG_VERSION,
            1,
            4,
            &[&s],
            &reds(&[(6, 3, 11)]),
            &[(11, 1)],
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b, 1).is_err(), "flip at {i} undetected");
        }
        assert!(decode(&bytes[..bytes.len() - 1], 1).is_err());
    }

    #[test]
    fn owners_round_trip_and_old_catalogs_are_host_owned() {
        let mut g = snap();
        g.owner = Owner::Guest(1000);
        g.name = "guest:1000/web-1".into();
        g.id = 4;
        let h = snap();
        let r = reds(&[(6, 3, 11)]);
        let bytes = enc_v(CATALOG_VERSION, 2, 5, &[&h, &g], &r, &[(11, 1)]);
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().expect("4")),
            4,
            "block table, redirects, two snapshots"
        );
        let c = decode(&bytes, 2).expect("decode");
        assert_eq!(c.snapshots, vec![h.clone(), g.clone()]);
        // A version 1 catalog (no owner field) reads with every snapshot host-owned,
        // and its per-snapshot redirects as shared records.
        let v1 = enc_v(1, 2, 5, &[&h], &r, &[(11, 1)]);
        let c = decode(&v1, 2).expect("decode v1");
        assert_eq!(c.snapshots[0].owner, Owner::Host);
        assert_eq!(c.snapshots, vec![h.clone()]);
        assert_eq!(c.redirects, r);
        // A guest-style name in a version 1 catalog is not a valid host name.
        let v1g = enc_v(1, 2, 5, &[&g], &r, &[(11, 1)]);
        assert!(decode(&v1g, 2)
            .expect_err("bad name")
            .contains("name space"));
        // A version 2 catalog (issue 12, before issue 16) reads as a checkpoint.
        let v2 = enc_v(2, 2, 5, &[&h, &g], &r, &[(11, 1)]);
        let c2 = decode(&v2, 2).expect("decode v2");
        assert_eq!((c2.version, c2.deltas), (2, 0));
        assert_eq!(c2.snapshots, vec![h, g]);
        assert_eq!(c2.redirects, r);
        // No delta may follow a version 1 or 2 checkpoint.
        let mut v2d = v2.clone();
        v2d.extend(encode_delta(3, 5, &[], None, None));
        assert!(decode(&v2d, 3)
            .expect_err("delta after v2")
            .contains("after the last record"));
        // A newer catalog is refused with a clear error.
        let mut v5 = bytes.clone();
        v5[8..12].copy_from_slice(&5u32.to_le_bytes());
        let crc = crate::checksum::crc32c(&v5[..60]);
        v5[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&v5, 2).expect_err("v5").contains("newer pmsnap"));
    }

    fn vm(id: u64, first: u64, count: u64) -> Snapshot {
        crate::testutil::vm_record(id, &[PageRun::new(first, count)])
    }

    fn red(page: u64, block: u32, crc: u32) -> Redirect {
        Redirect { page, block, crc }
    }

    #[test]
    fn delta_roundtrip() {
        let s = snap();
        let bytes = encode_delta(7, 9, &[red(3, 4, 5), red(1 << 40, 8, 9)], Some(2), Some(&s));
        let (d, len) = decode_delta(&bytes, CATALOG_VERSION).expect("decode");
        assert_eq!(len, bytes.len());
        assert_eq!(
            d,
            Delta {
                generation: 7,
                next_snapshot_id: 9,
                redirects: vec![red(3, 4, 5), red(1 << 40, 8, 9)],
                deleted: vec![2],
                added: vec![s],
            }
        );
        // A delta is as long as its change: an empty one is its header and 20 bytes.
        assert_eq!(
            encode_delta(1, 1, &[], None, None).len(),
            DELTA_HEADER_LEN + 20
        );
        // Followed by more bytes, it says where it ends.
        let mut two = bytes.clone();
        two.extend(encode_delta(8, 9, &[], None, None));
        assert_eq!(
            decode_delta(&two, CATALOG_VERSION).expect("first").1,
            bytes.len()
        );
    }

    #[test]
    fn corrupt_or_truncated_deltas_are_refused() {
        let bytes = encode_delta(7, 9, &[red(3, 4, 5)], Some(2), Some(&snap()));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(
                decode_delta(&b, CATALOG_VERSION).is_err(),
                "flip at {i} undetected"
            );
        }
        let e = |b: &[u8]| decode_delta(b, CATALOG_VERSION).expect_err("refused");
        let mut b = bytes.clone();
        b[DELTA_HEADER_LEN + 3] ^= 1;
        assert!(e(&b).contains("payload checksum"), "{}", e(&b));
        b = bytes.clone();
        b[9] ^= 1;
        assert!(e(&b).contains("header checksum"), "{}", e(&b));
        for cut in [0, 10, DELTA_HEADER_LEN, bytes.len() - 1] {
            let m = e(&bytes[..cut]);
            assert!(
                m.contains("shorter") || m.contains("runs past"),
                "{cut}: {m}"
            );
        }
        assert!(e(&[0u8; 64]).contains("checksum"), "zeroes are no record");
    }

    /// A checkpoint and its deltas decode to what the whole catalog at the end holds,
    /// in particular: a redirect applies to the snapshots before the delta's addition,
    /// and a deleted snapshot's blocks leave the block table unless still referenced.
    #[test]
    fn deltas_apply_in_order_onto_the_checkpoint() {
        let (a, b) = (vm(1, 0, 8), vm(2, 4, 8));
        let mut bytes = enc_v(CATALOG_VERSION, 5, 3, &[&a, &b], &Redirects::new(), &[]);
        // Gen 6: page 5 (a and b) -> block 20, page 1 (a) -> 21; then c is added: it
        // covers page 5 too, but was taken after the preserve.
        let c = vm(3, 5, 1);
        bytes.extend(encode_delta(
            6,
            4,
            &[red(5, 20, 0xa), red(1, 21, 0xb)],
            None,
            Some(&c),
        ));
        // Gen 7: a deleted: block 21 (a only) leaves the table, 20 (b too) stays.
        bytes.extend(encode_delta(7, 4, &[], Some(1), None));
        // Gen 8: page 6 (b only: c covers 5) -> block 21, reused.
        bytes.extend(encode_delta(8, 4, &[red(6, 21, 0xc)], None, None));
        let cat = decode(&bytes, 8).expect("decode");
        assert_eq!(
            (cat.generation, cat.version, cat.deltas),
            (8, CATALOG_VERSION, 3)
        );
        assert_eq!(cat.next_snapshot_id, 4);
        assert_eq!(cat.snapshots, vec![b.clone(), c.clone()]);
        // Page 5 of b (ids up to 2), page 6 of b and c (c does not cover it).
        let want = reds(&[(5, 2, 20), (6, 3, 21)]);
        assert_eq!(cat.redirects, want);
        assert_eq!(cat.redirects.get(&b, 5), Some(20));
        assert_eq!(cat.redirects.get(&c, 5), None, "c: page 5 in RAM");
        assert_eq!(cat.block_crcs, BTreeMap::from([(20, 0xa), (21, 0xc)]));
        // The same state as one checkpoint.
        let whole = enc_v(
            CATALOG_VERSION,
            8,
            4,
            &[&b, &c],
            &want,
            &[(20, 0xa), (21, 0xc)],
        );
        let w = decode(&whole, 8).expect("whole");
        assert_eq!(
            (w.snapshots, w.redirects, w.block_crcs),
            (cat.snapshots, cat.redirects, cat.block_crcs)
        );
        // Each prefix ending at a record is the catalog of that generation.
        let cp = decode(&bytes, 8).expect("again").checkpoint_len as usize;
        assert_eq!(
            decode(&bytes[..cp], 5).expect("checkpoint").snapshots,
            vec![a, b]
        );
    }

    /// Redirects apply in log order: of two records of one page, the first wins (the
    /// second found no snapshot left referencing RAM(p)) and only its block is listed;
    /// a redirect of a page no snapshot covers lists nothing.
    #[test]
    fn the_first_redirect_of_a_page_wins() {
        let (a, b) = (vm(1, 0, 8), vm(2, 100, 8));
        let mut bytes = enc_v(CATALOG_VERSION, 5, 3, &[&a, &b], &Redirects::new(), &[]);
        let log = [
            red(50, 9, 0x9),
            red(5, 30, 0x1),
            red(102, 31, 0x2),
            red(5, 32, 0x3),
        ];
        bytes.extend(encode_delta(6, 3, &log, None, None));
        let cat = decode(&bytes, 6).expect("decode");
        assert_eq!(cat.redirects, reds(&[(5, 2, 30), (102, 2, 31)]));
        assert_eq!(cat.redirects.get(&a, 5), Some(30));
        assert_eq!(cat.redirects.get(&b, 102), Some(31));
        assert_eq!(cat.block_crcs, BTreeMap::from([(30, 0x1), (31, 0x2)]));
    }

    #[test]
    fn delta_generations_and_references_are_checked() {
        let a = vm(1, 0, 8);
        let cp = enc_v(CATALOG_VERSION, 5, 2, &[&a], &Redirects::new(), &[]);
        let with = |deltas: &[Vec<u8>]| {
            let mut b = cp.clone();
            for d in deltas {
                b.extend_from_slice(d);
            }
            b
        };
        let d6 = encode_delta(6, 2, &[], None, None);
        // The last record's generation is the superblock's.
        assert!(decode(&with(std::slice::from_ref(&d6)), 7)
            .expect_err("wrong generation")
            .contains("generation 6, superblock says 7"));
        assert!(decode(&with(std::slice::from_ref(&d6)), 6).is_ok());
        // Generations only go up.
        for g in [5, 4] {
            let m = decode(&with(&[encode_delta(g, 2, &[], None, None)]), g).expect_err("old");
            assert!(
                m.contains("delta 0") && m.contains("after generation 5"),
                "{m}"
            );
        }
        let m = decode(&with(&[d6.clone(), d6.clone()]), 6).expect_err("twice");
        assert!(m.contains("delta 1"), "{m}");
        // A delta must delete what exists and add what does not.
        let m = decode(&with(&[encode_delta(6, 2, &[], Some(9), None)]), 6).expect_err("9");
        assert!(m.contains("snapshot id 9, which does not exist"), "{m}");
        let m = decode(&with(&[encode_delta(6, 2, &[], None, Some(&a))]), 6).expect_err("dup");
        assert!(m.contains("adds snapshot id 1"), "{m}");
        let m = decode(
            &with(&[encode_delta(6, 2, &[], None, Some(&vm(2, 0, 1)))]),
            6,
        )
        .expect_err("id beyond next");
        assert!(m.contains("next id is 2"), "{m}");
        let m = decode(&with(&[encode_delta(6, 1, &[], None, None)]), 6).expect_err("id back");
        assert!(m.contains("goes back"), "{m}");
        // A truncated delta (the catalog length cutting into it) is an error: whatever
        // the superblock covers must be whole.
        let full = with(std::slice::from_ref(&d6));
        let m = decode(&full[..full.len() - 1], 6).expect_err("truncated");
        assert!(m.contains("delta 0"), "{m}");
        // Corrupt crc in the payload.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(decode(&bad, 6).expect_err("crc").contains("checksum"));
    }

    #[test]
    fn owned_names() {
        assert_eq!(Owner::Guest(7).qualify("a"), "guest:7/a");
        assert_eq!(Owner::Host.qualify("a"), "a");
        assert_eq!(Owner::split("guest:7/a"), Some((Owner::Guest(7), "a")));
        assert_eq!(Owner::split("a"), Some((Owner::Host, "a")));
        for bad in [
            "guest:/a",
            "guest:07/a",
            "guest:x/a",
            "guest:7",
            "guest:99999999999/a",
        ] {
            assert_eq!(Owner::split(bad), None, "{bad}");
        }
        assert!(validate_owned_name(Owner::Guest(7), "guest:7/a").is_ok());
        assert!(validate_owned_name(Owner::Guest(8), "guest:7/a").is_err());
        assert!(validate_owned_name(Owner::Host, "guest:7/a").is_err());
        assert!(validate_owned_name(Owner::Guest(7), "a").is_err());
        assert!(validate_owned_name(Owner::Guest(7), "guest:7/.x").is_err());
        assert!(validate_owned_name(Owner::Host, "ok").is_ok());
        assert_eq!(Owner::Guest(1000).to_string(), "guest:1000");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("n", "ok.name_1-2").is_ok());
        for bad in ["", "-x", ".x", "a b", "ä", &"x".repeat(65)] {
            assert!(validate_name("n", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn covers_uses_page_set() {
        let s = snap();
        assert!(s.covers(0) && s.covers(1) && s.covers(5) && s.covers(7));
        assert!(!s.covers(2) && !s.covers(8));
        assert_eq!(s.page_count(), 5);
        assert_eq!(s.pages().collect::<Vec<_>>(), vec![0, 1, 5, 6, 7]);
    }
}
