//! The catalog: every committed snapshot (name, metadata, runs, redirects, state-blob
//! location) plus the checksum of every preserved block. It is rewritten whole into the
//! inactive metadata slot at each commit; each record carries its own crc32c.

use crate::codec::{DecodeError, Reader, Writer};
use crate::types::{normalize_runs, Owner, PageRun, ProcessInfo, SnapshotKind};
use std::collections::BTreeMap;

/// Magic at the start of a catalog.
pub const CATALOG_MAGIC: [u8; 8] = *b"PMSCATLG";
/// Catalog format version written. Version 2 adds each snapshot's owner (issue 12).
pub const CATALOG_VERSION: u32 = 2;
/// Oldest catalog version read: version 1 catalogs (no owner) are read with every
/// snapshot host-owned, and rewritten as version 2 at the next commit.
pub const CATALOG_VERSION_MIN: u32 = 1;
/// Bytes of the catalog header.
pub const CATALOG_HEADER_LEN: usize = 64;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Record type: the block checksum table.
pub const REC_BLOCK_TABLE: u32 = 1;
/// Record type: one snapshot.
pub const REC_SNAPSHOT: u32 = 2;

/// Catalog bytes a block adds when it holds a preserved page that one snapshot
/// references: its block-table entry (block u32, crc32c u32) and that snapshot's
/// redirect (page u64, block u32). Each further snapshot sharing the block adds another
/// 12; a state-blob block adds 4 (its number in the blob's list). Growing the block area
/// reserves this much metadata-slot room per free block (`Pool::grow_blocks`).
pub const CATALOG_BYTES_PER_BLOCK: u64 = 8 + 12;

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
    pub page_set: Vec<PageRun>,
    /// Pages already preserved, page -> block. Pages of `page_set` not in here are RAM(p).
    pub redirects: BTreeMap<u64, u32>,
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

    fn encode(&self, w: &mut Writer, version: u32) {
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
        w.u32(self.redirects.len() as u32);
        for (&p, &b) in &self.redirects {
            w.u64(p);
            w.u32(b);
        }
        w.u64(self.blob.len);
        w.u32(self.blob.crc);
        w.u32(self.blob.blocks.len() as u32);
        for &b in &self.blob.blocks {
            w.u32(b);
        }
    }

    fn decode(r: &mut Reader<'_>, version: u32) -> Result<Self, DecodeError> {
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
        let nd = r.count(12)?;
        let mut redirects = BTreeMap::new();
        for _ in 0..nd {
            let p = r.u64()?;
            let b = r.u32()?;
            if redirects.insert(p, b).is_some() {
                return Err(inv(format!("snapshot {name:?}: page {p} redirected twice")));
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
            redirects,
            blob: BlobRef { len, crc, blocks },
        };
        if let Some(&p) = s.redirects.keys().find(|&&p| !s.covers(p)) {
            return Err(inv(format!(
                "snapshot {:?}: redirect of page {p} it does not cover",
                s.name
            )));
        }
        Ok(s)
    }
}

/// A decoded catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Generation it was committed under.
    pub generation: u64,
    /// Next snapshot id to hand out.
    pub next_snapshot_id: u64,
    /// Snapshots, in id order.
    pub snapshots: Vec<Snapshot>,
    /// crc32c of every block holding a preserved page.
    pub block_crcs: BTreeMap<u32, u32>,
}

fn push_record(w: &mut Writer, kind: u32, payload: &[u8]) {
    let mut h = Writer::with_capacity(RECORD_HEADER_LEN);
    h.u32(kind);
    h.u32(u32::try_from(payload.len()).expect("catalog records are bounded by the metadata slot"));
    h.u32(crc32c::crc32c(payload));
    let hc = crc32c::crc32c(&h.buf);
    h.u32(hc);
    w.bytes(&h.buf);
    w.bytes(payload);
}

/// Encode a catalog from its parts (borrowed, so commits don't clone snapshots).
pub fn encode<'a>(
    generation: u64,
    next_snapshot_id: u64,
    snapshots: impl Iterator<Item = &'a Snapshot>,
    block_crcs: impl ExactSizeIterator<Item = (u32, u32)>,
) -> Vec<u8> {
    encode_version(
        CATALOG_VERSION,
        generation,
        next_snapshot_id,
        snapshots,
        block_crcs,
    )
}

fn encode_version<'a>(
    version: u32,
    generation: u64,
    next_snapshot_id: u64,
    snapshots: impl Iterator<Item = &'a Snapshot>,
    block_crcs: impl ExactSizeIterator<Item = (u32, u32)>,
) -> Vec<u8> {
    let mut body = Writer::default();
    let mut count = 0u32;
    let mut p = Writer::with_capacity(4 + block_crcs.len() * 8);
    p.u32(block_crcs.len() as u32);
    for (b, c) in block_crcs {
        p.u32(b);
        p.u32(c);
    }
    push_record(&mut body, REC_BLOCK_TABLE, &p.buf);
    count += 1;
    for s in snapshots {
        let mut p = Writer::default();
        s.encode(&mut p, version);
        push_record(&mut body, REC_SNAPSHOT, &p.buf);
        count += 1;
    }
    let mut w = Writer::with_capacity(CATALOG_HEADER_LEN + body.buf.len());
    w.bytes(&CATALOG_MAGIC);
    w.u32(version);
    w.u32(count);
    w.u64(generation);
    w.u64(next_snapshot_id);
    w.u64(body.buf.len() as u64);
    w.buf.resize(60, 0);
    let crc = crc32c::crc32c(&w.buf);
    w.u32(crc);
    w.bytes(&body.buf);
    w.buf
}

/// Decode a catalog, checking every checksum. Errors name the failing record.
pub fn decode(bytes: &[u8], expected_generation: u64) -> Result<Catalog, String> {
    let e = |m: String| format!("catalog: {m}");
    if bytes.len() < CATALOG_HEADER_LEN {
        return Err(e("shorter than its header".into()));
    }
    let (head, body) = bytes.split_at(CATALOG_HEADER_LEN);
    if head[..8] != CATALOG_MAGIC {
        return Err(e("bad magic".into()));
    }
    let stored = u32::from_le_bytes([head[60], head[61], head[62], head[63]]);
    if crc32c::crc32c(&head[..60]) != stored {
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
    if generation != expected_generation {
        return Err(e(format!(
            "generation {generation}, superblock says {expected_generation}"
        )));
    }
    if body_len != body.len() as u64 {
        return Err(e(format!(
            "body is {} bytes, header says {body_len}",
            body.len()
        )));
    }
    let mut cat = Catalog {
        generation,
        next_snapshot_id,
        ..Default::default()
    };
    let mut r = Reader::new(body, "catalog");
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
        if crc32c::crc32c(&h[..12]) != hcrc {
            return Err(e(format!("record {i}: header checksum mismatch")));
        }
        let payload = r.take(len).map_err(|x| e(format!("record {i}: {x}")))?;
        if crc32c::crc32c(payload) != pcrc {
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
                let s = Snapshot::decode(&mut pr, version)
                    .map_err(|x| e(format!("record {i} (snapshot): {x}")))?;
                cat.snapshots.push(s);
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
    Ok(cat)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            redirects: BTreeMap::from([(6, 11)]),
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
        let bytes = encode(9, 4, [&s].into_iter(), [(11u32, 0xabcu32)].into_iter());
        let c = decode(&bytes, 9).expect("decode");
        assert_eq!(c.snapshots, vec![s]);
        assert_eq!(c.next_snapshot_id, 4);
        assert_eq!(c.block_crcs, BTreeMap::from([(11, 0xabc)]));
        assert!(decode(&bytes, 8)
            .expect_err("wrong gen")
            .contains("generation"));
    }

    /// `CATALOG_BYTES_PER_BLOCK` is what the encoder really spends per preserved page.
    #[test]
    fn a_preserved_block_costs_the_catalog_twenty_bytes() {
        let mut s = snap();
        s.runs = vec![PageRun::new(0, 1000)];
        s.page_set = normalize_runs(&s.runs);
        s.process = None;
        s.kind = SnapshotKind::Vm;
        s.redirects.clear();
        let empty = encode(1, 4, [&s].into_iter(), std::iter::empty::<(u32, u32)>()).len();
        s.redirects = (0..100).map(|p| (p * 3, 500 + p as u32)).collect();
        let table: Vec<(u32, u32)> = s.redirects.values().map(|&b| (b, 0)).collect();
        let full = encode(1, 4, [&s].into_iter(), table.into_iter()).len();
        assert_eq!((full - empty) as u64, 100 * CATALOG_BYTES_PER_BLOCK);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let s = snap();
        let bytes = encode(1, 4, [&s].into_iter(), [(11u32, 1u32)].into_iter());
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
        let bytes = encode(2, 5, [&h, &g].into_iter(), [(11u32, 1u32)].into_iter());
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().expect("4")), 2);
        let c = decode(&bytes, 2).expect("decode");
        assert_eq!(c.snapshots, vec![h.clone(), g.clone()]);
        // A version 1 catalog (no owner field) reads with every snapshot host-owned.
        let v1 = encode_version(1, 2, 5, [&h].into_iter(), [(11u32, 1u32)].into_iter());
        let c = decode(&v1, 2).expect("decode v1");
        assert_eq!(c.snapshots[0].owner, Owner::Host);
        assert_eq!(c.snapshots, vec![h]);
        // A guest-style name in a version 1 catalog is not a valid host name.
        let v1g = encode_version(1, 2, 5, [&g].into_iter(), [(11u32, 1u32)].into_iter());
        assert!(decode(&v1g, 2)
            .expect_err("bad name")
            .contains("name space"));
        // A newer catalog is refused with a clear error.
        let mut v3 = bytes.clone();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&v3[..60]);
        v3[60..64].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&v3, 2).expect_err("v3").contains("newer pmsnap"));
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
