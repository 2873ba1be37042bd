//! `Repo::read_pages`, what lazy restore reads with: a range of pages equals the same
//! pages read one by one, zero pages included; a page outside the snapshot and a damaged
//! chunk are errors naming them.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use pmsnap_repo::{MemStorage, Repo, RepoError, Storage, PAGE_SIZE};

#[test]
fn a_range_reads_what_single_pages_read_and_damage_is_named() {
    let st = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(st.clone()).unwrap();
    let src = vm("vm1", 600, 1);
    repo.export(&mut src.clone(), &mut no_progress()).unwrap();
    let m = repo.manifest("vm1").unwrap();
    let mut all = vec![0u8; 600 * PAGE_SIZE];
    repo.read_pages(&m, 0, &mut all).unwrap();
    for p in 0..600usize {
        let one = repo.read_page(&m, p as u64).unwrap();
        assert!(all[p * PAGE_SIZE..][..PAGE_SIZE] == one[..], "page {p}");
    }
    let mut mid = vec![0u8; 37 * PAGE_SIZE];
    repo.read_pages(&m, 101, &mut mid).unwrap();
    assert!(mid[..] == all[101 * PAGE_SIZE..138 * PAGE_SIZE]);
    let outside = repo.read_pages(&m, 599, &mut [0u8; 2 * PAGE_SIZE]);
    assert!(
        matches!(outside, Err(RepoError::NoSuchPage { page: 600, .. })),
        "{outside:?}"
    );
    assert!(
        repo.read_pages(&m, 0, &mut [0u8; 100]).is_err(),
        "not whole pages"
    );

    // Flip a byte in the middle of a pack: a fresh reader's range read fails naming it.
    let pack = st.list("packs/").unwrap().pop().unwrap().key;
    assert!(st.corrupt(&pack, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 1;
    }));
    let fresh = Repo::open_or_init(st.clone()).unwrap();
    let err = fresh.read_pages(&m, 0, &mut all).unwrap_err();
    let id = pack.trim_start_matches("packs/");
    assert!(
        matches!(&err, RepoError::ChunkDamaged { pack, .. } if pack == id),
        "{err}"
    );
}
