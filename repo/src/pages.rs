//! Reading a range of pages at once, as a lazy restore does: chunks that lie next to
//! each other in one pack come in one ranged read, and each is still checked on its own
//! (crc32c and BLAKE3) before a byte of it is handed out.

use crate::error::{RepoError, Result};
use crate::format::{check_chunk, hex, Extent, Target, CHUNK_HEADER};
use crate::meta::Manifest;
use crate::repo::Repo;
use crate::PAGE_SIZE;

/// Most bytes one ranged read asks for.
const MAX_RANGE: usize = 1 << 20;

/// The extent holding piece `n`, and `n`'s offset in it.
fn extent_at(ext: &[Extent], n: u64) -> Option<(&Extent, u64)> {
    let i = ext.partition_point(|e| e.first <= n);
    let e = ext.get(i.checked_sub(1)?)?;
    (n - e.first < e.count).then_some((e, n - e.first))
}

impl Repo {
    /// Guest pages `first..first + out.len() / 4096` of the snapshot into `out`, every
    /// chunk checked. Zero pages are zero-filled without a read; a page outside the
    /// snapshot is [`RepoError::NoSuchPage`]; a damaged or missing pack is an error
    /// naming it, and `out` must then not be used.
    pub fn read_pages(&self, m: &Manifest, first: u64, out: &mut [u8]) -> Result<()> {
        if out.len() % PAGE_SIZE != 0 {
            return Err(RepoError::InvalidMeta(format!(
                "read_pages: {} bytes is not a whole number of pages",
                out.len()
            )));
        }
        let n = (out.len() / PAGE_SIZE) as u64;
        let mut i = 0u64;
        while i < n {
            let page = first + i;
            let Some((ext, off)) = extent_at(&m.body.pages, page) else {
                return Err(RepoError::NoSuchPage {
                    snapshot: m.name().to_string(),
                    page,
                });
            };
            let take = (ext.count - off).min(n - i);
            let at = i as usize * PAGE_SIZE;
            let dst = &mut out[at..at + take as usize * PAGE_SIZE];
            match ext.target {
                Target::Zero => dst.fill(0),
                Target::Chunks { pack, entry } => {
                    self.read_run(m, pack, u64::from(entry) + off, page, dst)?
                }
            }
            i += take;
        }
        Ok(())
    }

    /// Pages from `page` on, whose chunks are entries `entry..` of the manifest's pack
    /// `slot`, into `dst` (whole pages).
    fn read_run(
        &self,
        m: &Manifest,
        slot: u32,
        entry: u64,
        page: u64,
        dst: &mut [u8],
    ) -> Result<()> {
        let what = |k: usize| format!("page {}", page + k as u64);
        let count = dst.len() / PAGE_SIZE;
        let mut k = 0;
        while k < count {
            // The longest stretch of chunks stored back to back, up to MAX_RANGE.
            let (e0, pack) = self.entry(m, slot, entry + k as u64, &what(k))?;
            let mut ents = vec![e0];
            while k + ents.len() < count && ents.len() * PAGE_SIZE < MAX_RANGE {
                let (e, _) = self.entry(m, slot, entry + (k + ents.len()) as u64, &what(k))?;
                // Next in the pack: after the previous chunk's data and its own header.
                let last = ents[ents.len() - 1];
                if e.offset != last.offset + u64::from(last.len) + CHUNK_HEADER as u64 {
                    break;
                }
                ents.push(e);
            }
            // From the first chunk's data to the end of the last one's (headers between).
            let last = ents[ents.len() - 1];
            let total = last.offset + u64::from(last.len) - e0.offset;
            let at_of = |e: &crate::format::IndexEntry| (e.offset - e0.offset) as usize;
            let first = entry + k as u64;
            let mut data = self.pack_range(m, &pack, e0.offset, total, &what(k), first, true)?;
            let intact = |d: &[u8]| {
                ents.iter()
                    .all(|e| check_chunk(e, &d[at_of(e)..at_of(e) + e.len as usize]).is_ok())
            };
            if data.1 && !intact(&data.0) {
                // A damaged cached block: drop it and read the storage itself.
                self.drop_cached(&pack, e0.offset, total);
                data = self.pack_range(m, &pack, e0.offset, total, &what(k), first, false)?;
            }
            let data = data.0;
            for (j, e) in ents.iter().enumerate() {
                let chunk = &data[at_of(e)..at_of(e) + e.len as usize];
                let damaged = |detail: String| RepoError::ChunkDamaged {
                    snapshot: m.name().to_string(),
                    pack: hex(&pack),
                    entry: (entry + (k + j) as u64) as u32,
                    what: what(k + j),
                    detail,
                };
                if e.len as usize != PAGE_SIZE {
                    return Err(damaged(format!(
                        "chunk is {} bytes, expected {PAGE_SIZE}",
                        e.len
                    )));
                }
                check_chunk(e, chunk).map_err(damaged)?;
                dst[(k + j) * PAGE_SIZE..(k + j + 1) * PAGE_SIZE].copy_from_slice(chunk);
            }
            k += ents.len();
        }
        Ok(())
    }
}
