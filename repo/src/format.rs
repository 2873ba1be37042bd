//! On-disk formats: sealed objects, packs, indexes, manifests, object keys.
//! docs/repository.md describes them for readers of the bytes.

use serde::{Deserialize, Serialize};

use crate::error::{corrupt, Result};

/// A BLAKE3 hash (chunk hash, pack id, index hash, object seal).
pub type Hash32 = [u8; 32];

/// Lower-case hex of a hash.
pub fn hex(h: &Hash32) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// Parse 64 hex digits.
pub fn parse_hex(s: &str) -> Option<Hash32> {
    if s.len() != 64 {
        return None;
    }
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

pub(crate) fn blake(data: &[u8]) -> Hash32 {
    *blake3::hash(data).as_bytes()
}

/// Magic of an index object.
pub(crate) const INDEX_MAGIC: &[u8; 8] = b"PMSRINDX";
/// Magic of a snapshot manifest.
pub(crate) const MANIFEST_MAGIC: &[u8; 8] = b"PMSRSNAP";
/// Magic of the gc's condemned list.
pub(crate) const CONDEMNED_MAGIC: &[u8; 8] = b"PMSRCOND";
/// Magic at the start of a pack.
pub(crate) const PACK_MAGIC: &[u8; 8] = b"PMSRPACK";
/// Version of every sealed object and of packs.
pub(crate) const OBJECT_VERSION: u32 = 1;
const SEAL_HEADER: usize = 8 + 4 + 8;

/// Wrap `body` as `magic | version u32 | body_len u64 | body | BLAKE3(all before)`.
pub(crate) fn seal(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEAL_HEADER + body.len() + 32);
    out.extend_from_slice(magic);
    out.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let h = blake(&out);
    out.extend_from_slice(&h);
    out
}

/// Check and unwrap a sealed object named `key`.
pub(crate) fn unseal<'a>(key: &str, magic: &[u8; 8], data: &'a [u8]) -> Result<&'a [u8]> {
    if data.len() < SEAL_HEADER + 32 {
        return Err(corrupt(key, format!("truncated ({} bytes)", data.len())));
    }
    if &data[..8] != magic {
        return Err(corrupt(key, "wrong magic"));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&data[8..12]);
    let version = u32::from_le_bytes(v);
    let mut l = [0u8; 8];
    l.copy_from_slice(&data[12..20]);
    let len = u64::from_le_bytes(l);
    if len != (data.len() - SEAL_HEADER - 32) as u64 {
        return Err(corrupt(
            key,
            "length does not match the object size (truncated?)",
        ));
    }
    let (covered, sum) = data.split_at(data.len() - 32);
    if blake(covered) != sum {
        return Err(corrupt(key, "checksum mismatch"));
    }
    if version != OBJECT_VERSION {
        return Err(corrupt(
            key,
            format!("object version {version} not supported (this build reads {OBJECT_VERSION})"),
        ));
    }
    Ok(&covered[SEAL_HEADER..])
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Postcard serialization of these plain structs cannot fail (no maps with non-string
    // keys, no unsupported types); an empty body would fail decoding loudly if it did.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(key: &str, body: &'a [u8]) -> Result<T> {
    postcard::from_bytes(body).map_err(|e| corrupt(key, format!("does not decode: {e}")))
}

// ---------------------------------------------------------------------------------------
// Packs

/// Bytes before each chunk's data in a pack: hash, length, crc32c.
pub(crate) const CHUNK_HEADER: usize = 32 + 4 + 4;
/// Bytes of the pack header: magic, version, chunk count, nonce.
pub(crate) const PACK_HEADER: usize = 8 + 4 + 4 + 16;

/// 16 bytes no other pack has: packs are never identical, so a pack id names one write
/// (an export never re-creates a pack a gc has condemned, and two hosts writing the same
/// chunks at once write two packs, not one object twice).
fn pack_nonce() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let local = 0u8;
    h.update(&(&local as *const u8 as usize).to_le_bytes());
    if let Ok(host) = std::fs::read("/proc/sys/kernel/random/boot_id") {
        h.update(&host);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// One chunk as listed in an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// BLAKE3 of the chunk's content.
    pub hash: Hash32,
    /// Offset of the content in the pack.
    pub offset: u64,
    /// Length of the content (at most 4096).
    pub len: u32,
    /// crc32c of the stored bytes.
    pub crc: u32,
}

/// The index of one pack (`index/<pack id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    /// The pack's id: BLAKE3 of the whole pack.
    pub pack: Hash32,
    /// The pack's length in bytes.
    pub pack_len: u64,
    /// Its chunks in pack order.
    pub entries: Vec<IndexEntry>,
}

impl PackIndex {
    /// Decode a sealed index object and check it is consistent with its key.
    pub(crate) fn decode(key: &str, pack: &Hash32, data: &[u8]) -> Result<PackIndex> {
        let idx: PackIndex = decode(key, unseal(key, INDEX_MAGIC, data)?)?;
        if &idx.pack != pack {
            return Err(corrupt(key, "index names another pack"));
        }
        let mut expect = PACK_HEADER as u64;
        for (i, e) in idx.entries.iter().enumerate() {
            if e.len as usize > crate::PAGE_SIZE || e.offset != expect + CHUNK_HEADER as u64 {
                return Err(corrupt(
                    key,
                    format!("entry {i} has an impossible offset/length"),
                ));
            }
            expect = e.offset + e.len as u64;
        }
        if expect != idx.pack_len {
            return Err(corrupt(key, "entries do not add up to the pack length"));
        }
        Ok(idx)
    }
}

/// Builds a pack in memory.
#[derive(Debug)]
pub(crate) struct PackBuilder {
    pub bytes: Vec<u8>,
    pub entries: Vec<IndexEntry>,
}

impl PackBuilder {
    pub fn new() -> Self {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(PACK_MAGIC);
        bytes.extend_from_slice(&OBJECT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&pack_nonce());
        PackBuilder {
            bytes,
            entries: Vec::new(),
        }
    }

    /// Append a chunk; returns its entry number.
    pub fn push(&mut self, hash: Hash32, data: &[u8]) -> u32 {
        let crc = pmem_backend::checksum::crc32c(data);
        self.bytes.extend_from_slice(&hash);
        self.bytes
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(data);
        self.entries.push(IndexEntry {
            hash,
            offset,
            len: data.len() as u32,
            crc,
        });
        (self.entries.len() - 1) as u32
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished pack bytes, its id and its index.
    pub fn finish(mut self) -> (Vec<u8>, PackIndex) {
        let n = self.entries.len() as u32;
        self.bytes[12..16].copy_from_slice(&n.to_le_bytes());
        let id = blake(&self.bytes);
        let idx = PackIndex {
            pack: id,
            pack_len: self.bytes.len() as u64,
            entries: self.entries,
        };
        (self.bytes, idx)
    }
}

/// Check one chunk's stored bytes against its index entry. Returns what is wrong.
pub(crate) fn check_chunk(e: &IndexEntry, data: &[u8]) -> std::result::Result<(), String> {
    if data.len() != e.len as usize {
        return Err(format!("{} bytes, index says {}", data.len(), e.len));
    }
    if pmem_backend::checksum::crc32c(data) != e.crc {
        return Err("checksum (crc32c) mismatch".into());
    }
    if blake(data) != e.hash {
        return Err("content hash (BLAKE3) mismatch".into());
    }
    Ok(())
}

/// Walk a whole pack: check its id, its structure against the index and every chunk.
/// Returns the problems found (entry number or `None` for the pack as a whole).
pub(crate) fn check_pack(
    id: &Hash32,
    bytes: &[u8],
    idx: Option<&PackIndex>,
) -> Vec<(Option<u32>, String)> {
    let mut out = Vec::new();
    if &blake(bytes) != id {
        out.push((
            None,
            "pack content does not match its id (BLAKE3)".to_string(),
        ));
    }
    if bytes.len() < PACK_HEADER || &bytes[..8] != PACK_MAGIC {
        out.push((None, "not a pack (bad header)".to_string()));
        return out;
    }
    let mut pos = PACK_HEADER;
    let mut i = 0u32;
    while pos < bytes.len() {
        if pos + CHUNK_HEADER > bytes.len() {
            out.push((Some(i), "truncated chunk header".into()));
            return out;
        }
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[pos..pos + 32]);
        let mut b4 = [0u8; 4];
        b4.copy_from_slice(&bytes[pos + 32..pos + 36]);
        let len = u32::from_le_bytes(b4);
        b4.copy_from_slice(&bytes[pos + 36..pos + 40]);
        let crc = u32::from_le_bytes(b4);
        let off = pos + CHUNK_HEADER;
        if len as usize > crate::PAGE_SIZE || off + len as usize > bytes.len() {
            out.push((Some(i), "chunk length out of range".into()));
            return out;
        }
        let e = IndexEntry {
            hash,
            offset: off as u64,
            len,
            crc,
        };
        if let Some(idx) = idx {
            match idx.entries.get(i as usize) {
                Some(ie) if *ie == e => {}
                Some(_) => out.push((Some(i), "chunk header disagrees with the index".into())),
                None => out.push((Some(i), "chunk not in the index".into())),
            }
        }
        if let Err(d) = check_chunk(&e, &bytes[off..off + len as usize]) {
            out.push((Some(i), d));
        }
        pos = off + len as usize;
        i += 1;
    }
    let mut c = [0u8; 4];
    c.copy_from_slice(&bytes[12..16]);
    if u32::from_le_bytes(c) != i {
        out.push((
            None,
            format!(
                "pack header says {} chunks, holds {i}",
                u32::from_le_bytes(c)
            ),
        ));
    }
    if let Some(idx) = idx {
        if idx.entries.len() as u64 != u64::from(i) {
            out.push((
                None,
                format!("pack holds {i} chunks, index lists {}", idx.entries.len()),
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Manifests

/// What a range of consecutive pages (or state blob pieces) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// All zero; nothing stored.
    Zero,
    /// Piece `first + i` is chunk `entry + i` of the manifest's pack number `pack`.
    Chunks {
        /// Index into the manifest's pack list.
        pack: u32,
        /// Entry number of the first piece's chunk in that pack.
        entry: u32,
    },
}

/// A run of consecutive pieces with the same kind of target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First page (or blob piece) number.
    pub first: u64,
    /// Number of pieces.
    pub count: u64,
    /// Where they are.
    pub target: Target,
}

/// A pack a manifest references, pinned by its index's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackPin {
    /// The pack id.
    pub pack: Hash32,
    /// BLAKE3 of the sealed index object `index/<pack>`.
    pub index_hash: Hash32,
}

/// Serialized metadata (own types: the pool's types are not deserializable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetaBody {
    pub name: String,
    pub kind: u8,
    pub owner_tag: u8,
    pub owner_uid: u32,
    pub created_unix_ms: u64,
    pub created_unix_ns: u64,
    pub labels: Vec<(String, String)>,
    pub process: Option<(u32, String, Vec<u64>)>,
    pub ram_size: u64,
    pub runs: Vec<(u64, u64)>,
}

/// The body of `snapshots/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestBody {
    pub meta: MetaBody,
    pub exported_unix_ms: u64,
    pub packs: Vec<PackPin>,
    pub pages: Vec<Extent>,
    pub state_len: u64,
    pub state_hash: Hash32,
    pub state: Vec<Extent>,
}

/// Most runs a manifest's touch order holds (runs beyond are dropped at export).
pub const MAX_TOUCH_RUNS: usize = 16384;
/// Most pages a manifest's touch order covers (256 MiB of guest RAM).
pub const MAX_TOUCH_PAGES: u64 = 65536;

/// What follows a [`ManifestBody`] in a manifest's sealed body, if anything (a format 1
/// reader decodes the body and ignores the bytes after it, so new fields go here and old
/// readers keep reading new manifests; a manifest without them ends after the body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ManifestExt {
    /// The pages the guest touched first after the snapshot, in that order, as runs
    /// `(first page, count)`: the order a lazy restore fetches them in before the rest.
    pub touch_order: Vec<(u64, u64)>,
}

// ---------------------------------------------------------------------------------------
// Keys

/// Key of a pack.
pub(crate) fn pack_key(id: &Hash32) -> String {
    format!("packs/{}", hex(id))
}
/// Key of a pack's index.
pub(crate) fn index_key(id: &Hash32) -> String {
    format!("index/{}", hex(id))
}

/// Key of a snapshot's manifest: `snapshots/` + the name with every byte outside
/// `[A-Za-z0-9_-]` (and `.` when it starts the name) written as `%XX`.
pub(crate) fn manifest_key(name: &str) -> String {
    let mut k = String::from("snapshots/");
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            k.push(b as char);
        } else {
            k.push_str(&format!("%{b:02X}"));
        }
    }
    k
}

/// The name a manifest key encodes (`None` if it is not one [`manifest_key`] makes).
pub(crate) fn name_from_key(key: &str) -> Option<String> {
    let enc = key.strip_prefix("snapshots/")?;
    let b = enc.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = enc.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (manifest_key(&name) == key).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_damage() {
        let s = seal(INDEX_MAGIC, b"body");
        assert_eq!(unseal("k", INDEX_MAGIC, &s).unwrap(), b"body");
        assert!(unseal("k", MANIFEST_MAGIC, &s).is_err());
        for i in 0..s.len() {
            let mut d = s.clone();
            d[i] ^= 1;
            assert!(unseal("k", INDEX_MAGIC, &d).is_err(), "flip at {i}");
        }
        assert!(unseal("k", INDEX_MAGIC, &s[..s.len() - 1]).is_err());
        assert!(unseal("k", INDEX_MAGIC, b"").is_err());
    }

    #[test]
    fn names_escape_reversibly() {
        for n in ["vm1", "guest:1000/db.snap", ".hidden", "a b/%", "ünï"] {
            let k = manifest_key(n);
            assert!(k["snapshots/".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._%-".contains(&b)));
            assert!(!k["snapshots/".len()..].starts_with('.'));
            assert_eq!(name_from_key(&k).as_deref(), Some(n));
        }
        assert_eq!(manifest_key("guest:5/x"), "snapshots/guest%3A5%2Fx");
        assert_eq!(name_from_key("snapshots/a%3a"), None);
        assert_eq!(name_from_key("snapshots/a%"), None);
    }

    #[test]
    fn pack_builds_and_checks() {
        let mut b = PackBuilder::new();
        let a = [7u8; 4096];
        b.push(blake(&a), &a);
        b.push(blake(b"tail"), b"tail");
        let (bytes, idx) = b.finish();
        let key = index_key(&idx.pack);
        let sealed = seal(INDEX_MAGIC, &encode(&idx));
        assert_eq!(PackIndex::decode(&key, &idx.pack, &sealed).unwrap(), idx);
        assert!(check_pack(&idx.pack, &bytes, Some(&idx)).is_empty());
        let mut bad = bytes.clone();
        let off = idx.entries[1].offset as usize;
        bad[off] ^= 0x40;
        let p = check_pack(&idx.pack, &bad, Some(&idx));
        assert!(p.iter().any(|(e, _)| e.is_none()));
        assert!(p.iter().any(|(e, _)| *e == Some(1)));
    }
}
