//! The pattern payload's guest RAM (tests/payload/pattern.S) as tests check it: read
//! from a pool file, compared, and checked to be a guest that went on from a snapshot.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Guest RAM: 16 MiB of payload setup below the 48 MiB region the payload rewrites.
pub const MEM: u64 = 64 << 20;
/// [`MEM`] as a `--mem` argument.
pub const MEM_ARG: &str = "64M";
/// Bytes per page.
pub const PAGE: usize = 4096;
/// Guest pages.
pub const PAGES: u64 = MEM / PAGE as u64;

/// 8-byte words per page.
pub const WORDS: usize = PAGE / 8;

/// Guest RAM as the pool file holds it (a host read of the RAM area), as words.
pub fn read_ram(pool: &Path, ram_offset: u64) -> Vec<u64> {
    let f = std::fs::File::open(pool).expect("open pool file");
    let mut words = vec![0u64; MEM as usize / 8];
    // SAFETY: a byte view of the whole word buffer, used only for this read; any byte
    // pattern is a valid u64.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) };
    f.read_exact_at(bytes, ram_offset)
        .expect("read the RAM area of the pool file");
    words
}

/// The first guest page where `got` and `want` differ, with how many pages differ.
pub fn first_difference(got: &[u64], want: &[u64]) -> Option<(usize, usize)> {
    let mut differing = got
        .chunks_exact(WORDS)
        .zip(want.chunks_exact(WORDS))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(p, _)| p);
    let first = differing.next()?;
    Some((first, 1 + differing.count()))
}

/// First guest page of the payload's region (payload::REGION_BASE).
pub const REGION_FIRST: usize = (16 << 20) / PAGE;
/// Pages of the region (payload::region for 64 MiB and 2 vCPUs).
pub const REGION_PAGES: usize = PAGES as usize - REGION_FIRST;
/// Guest page of the payload's top page table (payload::PML4_ADDR); the PDPT and page
/// directories follow it.
pub const PML4_PAGE: usize = 0x9000 / PAGE;
/// Accessed (bit 5) and dirty (bit 6) bits of a page-table entry.
pub const ACCESSED_DIRTY: u64 = 0x60;

/// Check that a guest restored from a snapshot with content `from`, whose vCPUs were
/// then in rounds `rounds` (from the saved registers), and resumed went on from there:
/// below the region nothing changed but page-table accessed/dirty bits; in the region
/// every word that changed reads `(round << 32) | page` with a round no older than its
/// vCPU's round at the snapshot. (RAM rounds alone do not order: the pool's RAM may hold
/// higher rounds of an earlier guest, which a new guest in round 1 overwrites.) A guest
/// restarted, or resumed with wrong registers, writes other values. Returns the pages
/// changed.
pub fn guest_continued(now: &[u64], from: &[u64], rounds: &[u64]) -> Result<usize, String> {
    let slice = REGION_PAGES / rounds.len().max(1);
    let mut changed = 0;
    for p in 0..PAGES as usize {
        let (a, b) = (&now[p * WORDS..][..WORDS], &from[p * WORDS..][..WORDS]);
        if a == b {
            continue;
        }
        // Index loops: this runs over tens of MiB in an unoptimized test build.
        for w in 0..WORDS {
            let (x, y) = (a[w], b[w]);
            if x == y {
                continue;
            }
            let bad = if p < REGION_FIRST {
                // The page tables (payload::PML4_ADDR..) may differ only in the accessed
                // and dirty bits the MMU sets as the guest runs.
                let table = (PML4_PAGE..PML4_PAGE + 8).contains(&p);
                !table || (x ^ y) & !ACCESSED_DIRTY != 0
            } else {
                let i = p - REGION_FIRST;
                let round = rounds.get(i / slice).copied().unwrap_or(0);
                x & 0xffff_ffff != i as u64 || x >> 32 < round
            };
            if bad {
                return Err(format!(
                    "guest page {p} word {w} reads {x:#x}, the snapshot had {y:#x} (vCPU \
                     rounds at the snapshot: {rounds:?})"
                ));
            }
        }
        changed += usize::from(p >= REGION_FIRST);
    }
    Ok(changed)
}

/// VM snapshot `name` of the payload guest in `repo`: its guest RAM as words and its
/// vCPUs' payload rounds (r12, from the saved registers).
pub fn from_repository(repo: &pmsnap_repo::Repo, name: &str) -> (Vec<u64>, Vec<u64>) {
    let m = repo.manifest(name).expect("manifest");
    let mut bytes = vec![0u8; MEM as usize];
    repo.read_pages(&m, 0, &mut bytes).expect("pages");
    let words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let state =
        vmm::persist::VmState::decode(&repo.read_state(&m).expect("state")).expect("decode");
    (words, state.vcpus.iter().map(|v| v.regs.r12).collect())
}
