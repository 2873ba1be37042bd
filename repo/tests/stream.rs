//! `Repo::read_page_list`, what `pmsnap import` reads with: pages come out in the order
//! asked, equal to the source, with and without a pack cache; spans are checked on
//! several threads, yet a flipped byte is an error naming its pack and page, after the
//! good pages before it and never as a wrong page; a damaged cached block is read again
//! from the storage.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use pmsnap_repo::{
    DirStorage, Manifest, MemStorage, PackCache, Repo, RepoError, Storage, CACHE_BLOCK,
};

/// Read `pages` with `read_page_list`: what came out, in order, and how it ended.
fn read_list(
    repo: &Repo,
    m: &Manifest,
    pages: &[u64],
) -> (Vec<(u64, Page)>, Result<(), RepoError>) {
    let mut got = Vec::new();
    let res = repo.read_page_list(m, pages, &mut |p, d| {
        got.push((p, *d));
        Ok(())
    });
    (got, res)
}

/// Every page of `src` in order, backwards, and with repeats and zero pages mixed in.
fn page_lists(src: &FakeSource) -> Vec<Vec<u64>> {
    let all: Vec<u64> = src.pages.keys().copied().collect();
    let back: Vec<u64> = all.iter().rev().copied().collect();
    let mixed: Vec<u64> = all
        .iter()
        .map(|p| p * 7 % all.len() as u64)
        .chain([3, 3, 0, 5])
        .collect();
    vec![all, back, mixed]
}

fn assert_list_reads_back(repo: &Repo, src: &FakeSource) {
    let m = repo.manifest(&src.meta.name).unwrap();
    for pages in page_lists(src) {
        let (got, res) = read_list(repo, &m, &pages);
        res.unwrap();
        assert_eq!(got.len(), pages.len());
        for ((p, d), want) in got.iter().zip(&pages) {
            assert_eq!(p, want, "pages out of order");
            assert!(*d == src.pages[p], "page {p} differs");
        }
    }
}

#[test]
fn a_page_list_reads_back_in_order_with_and_without_a_cache() {
    let store = Arc::new(MemStorage::new());
    // 12 MiB of pages: spans of several cache blocks, chunks across block boundaries.
    let src = vm("big", 3000, 11);
    Repo::open_or_init(store.clone())
        .unwrap()
        .export(&mut src.clone(), &mut no_progress())
        .unwrap();
    assert_list_reads_back(&Repo::open_or_init(store.clone()).unwrap(), &src);

    let dir = tempfile::tempdir().unwrap();
    let c1 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r1 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c1.clone());
    assert_list_reads_back(&r1, &src);
    let pack_len: u64 = store.list("packs/").unwrap().iter().map(|o| o.size).sum();
    let fetched = c1.stats().fetched_bytes;
    assert!(
        fetched > pack_len / 2 && fetched < pack_len + pack_len / 10,
        "fetched {fetched} of {pack_len}"
    );
    // Another process on the same cache fetches nothing.
    let c2 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r2 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c2.clone());
    assert_list_reads_back(&r2, &src);
    assert_eq!(c2.stats().fetched_bytes, 0);

    // Small packs on a directory: many spans, each its own ranged read.
    let d = tempfile::tempdir().unwrap();
    let small = Repo::open_or_init(DirStorage::new(d.path()).unwrap())
        .unwrap()
        .with_pack_size(64 << 10);
    small.export(&mut src.clone(), &mut no_progress()).unwrap();
    assert_list_reads_back(&small, &src);
}

#[test]
fn a_flipped_byte_stops_the_list_at_its_page_naming_the_pack() {
    for cached in [false, true] {
        let store = Arc::new(MemStorage::new());
        let src = vm("v", 3000, 5);
        Repo::open_or_init(store.clone())
            .unwrap()
            .export(&mut src.clone(), &mut no_progress())
            .unwrap();
        let pack = store.list("packs/").unwrap()[0].key.clone();
        let pack_len = store.get(&pack).unwrap().len();
        assert!(pack_len as u64 > 2 * CACHE_BLOCK);
        // A byte in the second cache block of the pack.
        assert!(store.corrupt(&pack, |b| b[CACHE_BLOCK as usize + 5000] ^= 0x40));
        let dir = tempfile::tempdir().unwrap();
        let mut repo = Repo::open_or_init(store.clone()).unwrap();
        if cached {
            repo = repo.with_cache(Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap()));
        }
        let m = repo.manifest("v").unwrap();
        let pages: Vec<u64> = src.pages.keys().copied().collect();
        let (got, res) = read_list(&repo, &m, &pages);
        let err = res.unwrap_err();
        let id = pack.trim_start_matches("packs/");
        let RepoError::ChunkDamaged {
            pack: named, what, ..
        } = &err
        else {
            panic!("cached={cached}: {err}");
        };
        assert_eq!(named, id);
        // Every page handed out is right, and they are all the pages before the bad one.
        for ((p, d), want) in got.iter().zip(&pages) {
            assert_eq!(p, want);
            assert!(*d == src.pages[p], "page {p} is wrong");
        }
        assert_eq!(
            what,
            &format!("page {}", pages[got.len()]),
            "cached={cached}"
        );
        assert!(got.len() < pages.len());
        // The same page read alone is damaged too.
        assert!(matches!(
            repo.read_page(&m, pages[got.len()]),
            Err(RepoError::ChunkDamaged { .. })
        ));
        if cached {
            // Nothing damaged went into the cache: the damaged block is not there.
            let n = std::fs::read_dir(dir.path()).unwrap().count() as u64;
            assert!(n <= (pack_len as u64).div_ceil(CACHE_BLOCK));
        }
    }
}

#[test]
fn a_damaged_cached_block_is_read_again_from_the_storage() {
    let store = Arc::new(MemStorage::new());
    let src = vm("c", 2000, 9);
    Repo::open_or_init(store.clone())
        .unwrap()
        .export(&mut src.clone(), &mut no_progress())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c1 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    assert_list_reads_back(
        &Repo::open_or_init(store.clone()).unwrap().with_cache(c1),
        &src,
    );
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        std::fs::write(&p, b).unwrap();
    }
    let c2 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r2 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c2.clone());
    assert_list_reads_back(&r2, &src);
    assert!(
        c2.stats().fetched_bytes > 0,
        "damaged blocks are fetched again"
    );
    // And put back whole: a third reader fetches nothing.
    let c3 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r3 = Repo::open_or_init(store).unwrap().with_cache(c3.clone());
    assert_list_reads_back(&r3, &src);
    assert_eq!(c3.stats().fetched_bytes, 0);
}

#[test]
fn missing_packs_unknown_pages_and_caller_errors_end_the_list_in_order() {
    let store = Arc::new(MemStorage::new());
    let src = vm("m", 600, 3);
    let repo = Repo::open_or_init(store.clone())
        .unwrap()
        .with_pack_size(64 << 10);
    repo.export(&mut src.clone(), &mut no_progress()).unwrap();
    let m = repo.manifest("m").unwrap();

    // A page outside the snapshot, after good ones.
    let (got, res) = read_list(&repo, &m, &[1, 2, 600, 3]);
    assert_eq!(got.len(), 2);
    assert!(
        matches!(res, Err(RepoError::NoSuchPage { page: 600, .. })),
        "{res:?}"
    );

    // The caller's error ends it at once.
    let mut n = 0;
    let res = repo.read_page_list(&m, &[1, 2, 3, 4], &mut |_, _| {
        n += 1;
        if n == 2 {
            return Err(RepoError::Source("enough".into()));
        }
        Ok(())
    });
    assert!(matches!(res, Err(RepoError::Source(_))));
    assert_eq!(n, 2);

    // A missing pack is named; the pages before its first page come out.
    let pack = m.packs()[1].clone();
    store.delete(&format!("packs/{pack}")).unwrap();
    let fresh = Repo::open_or_init(store).unwrap();
    let pages: Vec<u64> = src.pages.keys().copied().collect();
    let (got, res) = read_list(&fresh, &m, &pages);
    let err = res.unwrap_err();
    assert!(
        matches!(&err, RepoError::PackMissing { pack: p, .. } if *p == pack),
        "{err}"
    );
    for (p, d) in &got {
        assert!(*d == src.pages[p], "page {p} is wrong");
    }
    assert!(got.len() < pages.len());
}
