//! The repository end to end: export and read back, dedup, crashes, damage, gc.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use pmem_backend::{PageRun, SnapshotKind};
use pmsnap_repo::{
    DirStorage, MemStorage, Progress, Repo, RepoError, SnapshotSource, Storage, PAGE_SIZE,
};

fn export(repo: &Repo, src: &FakeSource) -> pmsnap_repo::ExportReport {
    repo.export(&mut src.clone(), &mut no_progress()).unwrap()
}

#[test]
fn export_reads_back_byte_exact_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open_or_init(DirStorage::new(dir.path()).unwrap()).unwrap();
    let src = vm("vm1", 600, 1);
    let mut phases = Vec::new();
    let r = repo
        .export(&mut src.clone(), &mut |p: Progress| phases.push(p.phase))
        .unwrap();
    assert!(!r.no_op);
    assert_eq!(r.pages, 600);
    assert_eq!(r.zero_pages, 120);
    // Distinct non-zero pages: random ones plus one fixed page; the state adds 3 pieces.
    let random = (0..600u64).filter(|p| p % 5 != 0 && p % 7 != 0).count() as u64;
    assert_eq!(r.chunks_new, random + 1 + 3);
    let fixed_copies = (0..600u64).filter(|p| p % 5 != 0 && p % 7 == 0).count() as u64;
    assert_eq!(r.bytes_skipped, (fixed_copies - 1) * PAGE_SIZE as u64);
    assert!(phases.contains(&pmsnap_repo::Phase::Pages));
    assert_eq!(phases.last(), Some(&pmsnap_repo::Phase::Commit));
    assert_eq!(repo.snapshots().unwrap(), ["vm1"]);
    assert_reads_back(&repo, &src);

    // A fresh Repo on the same directory reads it too.
    let again = Repo::open_or_init(DirStorage::new(dir.path()).unwrap()).unwrap();
    assert_reads_back(&again, &src);
    assert!(again.verify().unwrap().is_clean());

    // Same name, same content: a no-op. Same name, other content: refused.
    let before = dir_size(dir.path());
    let r2 = export(&again, &src);
    assert!(r2.no_op);
    assert_eq!(r2.bytes_written, 0);
    assert_eq!(dir_size(dir.path()), before);
    let mut other = src.clone();
    other.pages.insert(3, [9; PAGE_SIZE]);
    assert!(matches!(
        again.export(&mut other, &mut no_progress()),
        Err(RepoError::Exists(n)) if n == "vm1"
    ));
    let mut relabelled = src.clone();
    relabelled.meta.labels.clear();
    assert!(matches!(
        again.export(&mut relabelled, &mut no_progress()),
        Err(RepoError::Exists(_))
    ));
}

fn dir_size(p: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += dir_size(&e.path());
        } else {
            n += e.metadata().unwrap().len();
        }
    }
    n
}

#[test]
fn every_kind_exports_and_pages_outside_are_refused() {
    let repo = Repo::open_or_init(MemStorage::new()).unwrap();
    let p = process(1000, "db", 2);
    export(&repo, &p);
    assert_reads_back(&repo, &p);
    let m = repo.manifest("guest:1000/db").unwrap();
    assert!(matches!(
        repo.read_page(&m, 99),
        Err(RepoError::NoSuchPage { page: 99, .. })
    ));
    assert_eq!(m.is_zero(100), Some(true));
    assert_eq!(m.is_zero(101), Some(false));
    assert_eq!(m.is_zero(5), None);
    assert_eq!(repo.read_state(&m).unwrap(), Vec::<u8>::new());

    let mut pages = vm("pages1", 64, 3);
    pages.meta.kind = SnapshotKind::Pages;
    pages.meta.runs = vec![PageRun::new(40, 3), PageRun::new(2, 5), PageRun::new(4, 2)];
    pages
        .pages
        .retain(|p, _| (2..7).contains(p) || (40..43).contains(p));
    pages.state.clear();
    export(&repo, &pages);
    assert_reads_back(&repo, &pages);
    let mut names = repo.snapshots().unwrap();
    names.sort();
    assert_eq!(names, ["guest:1000/db", "pages1"]);

    // Bad metadata is refused before anything is written.
    let mut bad = vm("bad", 4, 4);
    bad.meta.name = "guest:1/x".into();
    assert!(matches!(
        repo.export(&mut bad, &mut no_progress()),
        Err(RepoError::InvalidMeta(_))
    ));
    // A source error is passed on.
    let mut short = vm("short", 4, 4);
    short.pages.remove(&2);
    assert!(matches!(
        repo.export(&mut short, &mut no_progress()),
        Err(RepoError::Source(_))
    ));
    assert!(repo.verify().unwrap().is_clean());
}

#[test]
fn one_percent_change_writes_about_one_percent() {
    let repo = Repo::open_or_init(MemStorage::new())
        .unwrap()
        .with_pack_size(256 << 10);
    let a = vm("a", 2000, 7);
    let ra = export(&repo, &a);
    let mut b = a.clone();
    b.meta.name = "b".into();
    let mut rng = Rng(99);
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < 20 {
        let p = rng.below(2000);
        if changed.insert(p) {
            b.pages.insert(p, random_page(&mut rng));
        }
    }
    let rb = export(&repo, &b);
    assert_eq!(rb.chunks_new, 20);
    assert_eq!(rb.bytes_new, 20 * PAGE_SIZE as u64);
    let logical = 2000 * PAGE_SIZE as u64;
    assert!(rb.bytes_written < logical / 50, "{rb:?}");
    assert!(rb.bytes_skipped > ra.bytes_new - 40 * PAGE_SIZE as u64);
    assert_reads_back(&repo, &b);
    assert_reads_back(&repo, &a);
}

#[test]
fn snapshots_share_content_and_ls_says_so() {
    let repo = Repo::open_or_init(MemStorage::new())
        .unwrap()
        .with_pack_size(128 << 10);
    // Two guests booted from the same image: same first 300 pages, then their own.
    let a = vm("guest-a", 400, 11);
    let mut b = vm("guest-b", 400, 12);
    for p in 0..300 {
        b.pages.insert(p, a.pages[&p]);
    }
    export(&repo, &a);
    let rb = export(&repo, &b);
    let own_b = (300..400u64).filter(|p| p % 5 != 0 && p % 7 != 0).count() as u64;
    // b's state shares its last piece with a's.
    assert_eq!(rb.chunks_new, own_b + 2);
    let ls = repo.ls().unwrap();
    assert_eq!(ls.len(), 2);
    for s in &ls {
        assert!(s.error.is_none());
        assert_eq!(s.pages, 400);
        assert_eq!(s.zero_pages, 80);
        assert!(s.shared_bytes > 200 * PAGE_SIZE as u64, "{s:?}");
        assert_eq!(s.stored_bytes, s.shared_bytes + s.unique_bytes);
        assert_eq!(s.logical_bytes, 400 * PAGE_SIZE as u64 + s.state_len);
    }
    let sb = ls.iter().find(|s| s.name == "guest-b").unwrap();
    // Own random pages plus own state (the fixed page is shared).
    assert!(sb.unique_bytes >= own_b * PAGE_SIZE as u64);
    assert!(sb.unique_bytes < (own_b + 4) * PAGE_SIZE as u64);
}

#[test]
fn interrupted_exports_leave_a_consistent_repo_and_a_rerun_finishes() {
    let src = vm("crashy", 300, 21);
    // Another snapshot is already there and must stay intact.
    let base = vm("base", 50, 22);
    // The puts a complete export makes (small packs: many of them).
    let probe = Arc::new(MemStorage::new());
    let probe_repo = Repo::open_or_init(probe.clone())
        .unwrap()
        .with_pack_size(40 << 10);
    export(&probe_repo, &base);
    let base_chunks = probe_repo.verify().unwrap().chunks;
    let full = probe_repo
        .export(&mut src.clone(), &mut no_progress())
        .unwrap();
    let puts = 2 * full.packs_written as usize + 1;
    assert!(puts > 10, "{full:?}");
    for n in 0..puts {
        let mem = Arc::new(MemStorage::new());
        export(&Repo::open_or_init(mem.clone()).unwrap(), &base);
        let crashing = Repo::open_or_init(FailAfter::new(mem.clone(), n))
            .unwrap()
            .with_pack_size(40 << 10);
        let err = crashing
            .export(&mut src.clone(), &mut no_progress())
            .unwrap_err();
        assert!(matches!(err, RepoError::Storage { .. }), "{err}");

        let repo = Repo::open_or_init(mem.clone())
            .unwrap()
            .with_pack_size(40 << 10);
        assert_eq!(repo.snapshots().unwrap(), ["base"], "after {n} puts");
        let v = repo.verify().unwrap();
        assert!(v.is_clean(), "after {n} puts: {:?}", v.problems);
        assert!(matches!(
            repo.manifest("crashy"),
            Err(RepoError::NotFound(_))
        ));
        // What complete packs+indexes the crashed run left is reused, not rewritten.
        let left_by_crash = v.chunks - base_chunks;
        let rerun = repo.export(&mut src.clone(), &mut no_progress()).unwrap();
        assert_eq!(
            rerun.chunks_new + left_by_crash,
            full.chunks_new,
            "after {n} puts"
        );
        assert_reads_back(&repo, &src);
        assert_reads_back(&repo, &base);
        assert!(repo.verify().unwrap().is_clean());
        // gc (no grace: nothing else is writing) removes exactly the crash's leftovers.
        let g = repo.gc(Duration::ZERO).unwrap();
        assert_eq!(
            g.referenced_packs as usize,
            mem.list("packs/").unwrap().len()
        );
        assert_eq!(
            mem.list("packs/").unwrap().len(),
            mem.list("index/").unwrap().len()
        );
        assert_reads_back(&repo, &src);
        assert_eq!(repo.verify().unwrap().unreferenced_packs, 0);
    }
}

#[test]
fn a_flipped_byte_is_found_and_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::open_or_init(DirStorage::new(dir.path()).unwrap())
        .unwrap()
        .with_pack_size(64 << 10);
    let src = vm("v", 100, 31);
    export(&repo, &src);
    let m = repo.manifest("v").unwrap();
    let pack = m.packs()[1].clone();
    let path = dir.path().join("packs").join(&pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();

    let v = repo.verify().unwrap();
    assert!(!v.is_clean());
    let key = format!("packs/{pack}");
    let chunk_problem = v
        .problems
        .iter()
        .find(|p| p.object == key && p.chunk.is_some())
        .unwrap();
    assert_eq!(chunk_problem.snapshots, ["v"]);
    assert!(v
        .problems
        .iter()
        .any(|p| p.object == key && p.chunk.is_none()));

    let mut bad_pages = 0;
    for p in src.pages.keys() {
        match repo.read_page(&m, *p) {
            Ok(got) => assert!(got == src.pages[p], "page {p} is wrong"),
            Err(e @ RepoError::ChunkDamaged { .. }) => {
                bad_pages += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains(&pack) && msg.contains(&format!("page {p}")),
                    "{msg}"
                );
            }
            Err(e) => panic!("page {p}: {e}"),
        }
    }
    assert!(bad_pages >= 1);
}

#[test]
fn damaged_index_and_manifest_are_named() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone())
        .unwrap()
        .with_pack_size(64 << 10);
    let a = vm("a", 80, 41);
    let b = vm("b", 80, 42);
    export(&repo, &a);
    export(&repo, &b);
    let ma = repo.manifest("a").unwrap();
    let ipack = ma.packs()[0].clone();
    mem.corrupt(&format!("index/{ipack}"), |d| d[30] ^= 1);
    mem.corrupt("snapshots/b", |d| {
        let n = d.len();
        d[n - 40] ^= 1
    });
    let v = Repo::open_or_init(mem.clone()).unwrap().verify().unwrap();
    let objects: Vec<&str> = v.problems.iter().map(|p| p.object.as_str()).collect();
    assert!(
        objects.contains(&format!("index/{ipack}").as_str()),
        "{objects:?}"
    );
    assert!(objects.contains(&"snapshots/b"), "{objects:?}");
    let fresh = Repo::open_or_init(mem.clone()).unwrap();
    assert!(
        matches!(fresh.manifest("b"), Err(RepoError::Corrupt { object, .. }) if object == "snapshots/b")
    );
    let first = *a.pages.iter().find(|(p, _)| *p % 5 != 0).unwrap().0;
    let err = fresh.read_page(&ma, first).unwrap_err();
    assert!(matches!(err, RepoError::ChunkDamaged { .. }), "{err}");
    assert!(err.to_string().contains(&ipack));
    // ls lists the damaged manifest with its error instead of failing.
    let ls = fresh.ls().unwrap();
    assert!(ls.iter().any(|s| s.name == "b" && s.error.is_some()));
    // gc refuses to run while a manifest cannot be read (it cannot know what is live).
    assert!(fresh.gc(Duration::ZERO).is_err());
}

#[test]
fn a_missing_pack_is_a_clear_error() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone())
        .unwrap()
        .with_pack_size(64 << 10);
    let src = vm("m", 100, 51);
    export(&repo, &src);
    let m = repo.manifest("m").unwrap();
    let gone = m.packs()[0].clone();
    mem.delete(&format!("packs/{gone}")).unwrap();
    let mut missing = 0;
    for p in src.pages.keys() {
        match repo.read_page(&m, *p) {
            Ok(got) => assert!(got == src.pages[p]),
            Err(e @ RepoError::PackMissing { .. }) => {
                missing += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains(&gone)
                        && msg.contains("missing")
                        && msg.contains(&format!("page {p}")),
                    "{msg}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(missing > 0);
    let v = repo.verify().unwrap();
    let p = v
        .problems
        .iter()
        .find(|p| p.object == format!("packs/{gone}"))
        .unwrap();
    assert_eq!(p.snapshots, ["m"]);
    // Its index missing too: still a clear error.
    mem.delete(&format!("index/{gone}")).unwrap();
    let fresh = Repo::open_or_init(mem.clone()).unwrap();
    let first = *src.pages.keys().find(|p| *p % 5 != 0).unwrap();
    let err = fresh.read_page(&m, first).unwrap_err();
    assert!(
        matches!(err, RepoError::PackMissing { .. }) && err.to_string().contains(&gone),
        "{err}"
    );
    // A new export does not reuse what the missing pack held.
    let mut again = src.clone();
    again.meta.name = "m2".into();
    export(&fresh, &again);
    assert_reads_back(&fresh, &again);
}

#[test]
fn gc_keeps_referenced_and_young_and_removes_old_garbage() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone())
        .unwrap()
        .with_pack_size(64 << 10);
    let keep = vm("keep", 100, 61);
    export(&repo, &keep);
    // Garbage: an export that crashed after a few puts.
    let crashing = Repo::open_or_init(FailAfter::new(mem.clone(), 4))
        .unwrap()
        .with_pack_size(64 << 10);
    crashing
        .export(&mut vm("lost", 100, 62), &mut no_progress())
        .unwrap_err();
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();

    // Everything is young: nothing condemned, nothing deleted.
    let g = repo.gc_at(hour, now).unwrap();
    assert_eq!((g.deleted_packs, g.condemned_packs), (0, 0));
    assert!(g.young_packs >= 2, "{g:?}");
    assert!(g.referenced_packs >= 1);

    // Two hours later: the garbage is condemned but not yet deleted.
    let g = repo.gc_at(hour, now + 2 * hour).unwrap();
    assert_eq!(g.deleted_packs, 0);
    assert!(g.condemned_packs >= 2);
    assert!(mem.exists("gc/condemned").unwrap());
    // Frequent runs do not postpone the deletion: condemned at +2h, still pending at
    // +2h30 (the list is rewritten), deleted at +3h01.
    let g2 = repo.gc_at(hour, now + 2 * hour + hour / 2).unwrap();
    assert_eq!(g2.deleted_packs, 0);
    assert_eq!(g2.condemned_packs, g.condemned_packs);
    let g3 = repo
        .gc_at(hour, now + 3 * hour + Duration::from_secs(60))
        .unwrap();
    assert_eq!(g3.deleted_packs, g.condemned_packs);
    assert!(g3.freed_bytes > 0);
    assert_reads_back(&repo, &keep);
    let v = repo.verify().unwrap();
    assert!(v.is_clean() && v.unreferenced_packs == 0, "{v:?}");
    assert!(!mem.exists("gc/condemned").unwrap());
}

#[test]
fn remove_and_gc_free_only_unique_content() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone())
        .unwrap()
        .with_pack_size(32 << 10);
    let a = vm("a", 300, 71);
    let mut b = vm("b", 300, 72);
    for p in 0..200 {
        b.pages.insert(p, a.pages[&p]);
    }
    export(&repo, &a);
    export(&repo, &b);
    let unique_b = repo
        .ls()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "b")
        .unwrap()
        .unique_bytes;
    let total_before: u64 = mem.list("packs/").unwrap().iter().map(|o| o.size).sum();
    assert!(matches!(repo.remove("nope"), Err(RepoError::NotFound(_))));
    repo.remove("b").unwrap();
    assert_eq!(repo.snapshots().unwrap(), ["a"]);
    let g = repo.gc(Duration::ZERO).unwrap();
    assert!(g.deleted_packs > 0);
    let total_after: u64 = mem.list("packs/").unwrap().iter().map(|o| o.size).sum();
    // b's packs were written after a's and hold only b's own content (plus headers).
    let freed_content = total_before - total_after;
    assert!(freed_content >= unique_b, "{freed_content} < {unique_b}");
    assert!(freed_content < unique_b + unique_b / 10 + 4096);
    assert_reads_back(&repo, &a);
    let ls = repo.ls().unwrap();
    assert_eq!(ls[0].shared_bytes, 0);
    assert!(repo.verify().unwrap().is_clean());
}

/// A source that runs a gc on another handle of the repository halfway through.
struct GcMidway<'a> {
    inner: FakeSource,
    other: &'a Repo,
    at: SystemTime,
    done: bool,
}

impl SnapshotSource for GcMidway<'_> {
    fn meta(&mut self) -> Result<pmsnap_repo::SnapshotMeta, pmsnap_repo::SourceError> {
        self.inner.meta()
    }
    fn read_page(&mut self, page: u64, buf: &mut Page) -> Result<(), pmsnap_repo::SourceError> {
        if page == 50 && !self.done {
            self.done = true;
            self.other
                .gc_at(Duration::from_secs(3600), self.at)
                .map_err(|e| e.to_string())?;
        }
        self.inner.read_page(page, buf)
    }
    fn state(&mut self) -> Result<Vec<u8>, pmsnap_repo::SourceError> {
        self.inner.state()
    }
}

#[test]
fn an_export_racing_gc_never_commits_a_reference_to_condemned_content() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone()).unwrap();
    let other = Repo::open_or_init(mem.clone()).unwrap();
    let a = vm("a", 100, 81);
    export(&repo, &a);
    repo.remove("a").unwrap();
    let hour = Duration::from_secs(3600);
    let later = SystemTime::now() + 2 * hour;
    // An export of the same content reuses a's (now unreferenced, old) packs while a gc
    // condemns them: it must not commit.
    let mut b = a.clone();
    b.meta.name = "b".into();
    let mut racing = GcMidway {
        inner: b.clone(),
        other: &other,
        at: later,
        done: false,
    };
    let err = repo.export(&mut racing, &mut no_progress()).unwrap_err();
    assert!(matches!(err, RepoError::Conflict(n) if n > 0), "{err}");
    assert!(repo.snapshots().unwrap().is_empty());
    // The rerun stores the content anew and the next gc deletes the condemned packs
    // without touching it.
    let r = repo.export(&mut b.clone(), &mut no_progress()).unwrap();
    assert!(r.chunks_new > 0);
    let g = other.gc_at(hour, later + 2 * hour).unwrap();
    assert!(g.deleted_packs > 0);
    assert_reads_back(&repo, &b);
    assert!(repo.verify().unwrap().is_clean());
}

#[test]
fn foreign_or_newer_repositories_are_refused() {
    let mem = Arc::new(MemStorage::new());
    mem.put("config", b"not json").unwrap();
    assert!(matches!(
        Repo::open_or_init(mem.clone()),
        Err(RepoError::NotARepo(_))
    ));
    mem.put(
        "config",
        br#"{"format":"pmsnap-repo","version":9,"chunk_size":4096,"created_unix_ms":0}"#,
    )
    .unwrap();
    assert!(matches!(
        Repo::open_or_init(mem.clone()),
        Err(RepoError::NewerVersion { found: 9, .. })
    ));
}

#[test]
fn damage_anywhere_is_an_error_never_a_wrong_page_or_a_panic() {
    let mem = Arc::new(MemStorage::new());
    let repo = Repo::open_or_init(mem.clone())
        .unwrap()
        .with_pack_size(16 << 10);
    let src = vm("d", 24, 91);
    export(&repo, &src);
    let originals: Vec<(String, Vec<u8>)> = ["packs/", "index/", "snapshots/"]
        .iter()
        .flat_map(|p| mem.list(p).unwrap())
        .map(|o| (o.key.clone(), mem.get(&o.key).unwrap()))
        .collect();
    let mut rng = Rng(5);
    for round in 0..300 {
        let (key, orig) = &originals[round % originals.len()];
        let at = rng.below(orig.len() as u64) as usize;
        let truncate = round % 10 == 9;
        mem.corrupt(key, |d| {
            if truncate {
                d.truncate(at);
            } else {
                d[at] ^= 1 << (round % 8);
            }
        });
        let fresh = Repo::open_or_init(mem.clone()).unwrap();
        let v = fresh.verify().unwrap();
        assert!(!v.is_clean(), "{key} damaged at {at} not found");
        assert!(
            v.problems.iter().any(|p| p.object == *key),
            "{key}: {:?}",
            v.problems
        );
        if let Ok(m) = fresh.manifest("d") {
            for (p, want) in &src.pages {
                if let Ok(got) = fresh.read_page(&m, *p) {
                    assert!(got == *want, "{key}@{at}: page {p} wrong");
                }
            }
            if let Ok(st) = fresh.read_state(&m) {
                assert_eq!(st, src.state);
            }
        }
        fresh.ls().unwrap();
        mem.put(key, orig).unwrap();
    }
    assert!(Repo::open_or_init(mem.clone())
        .unwrap()
        .verify()
        .unwrap()
        .is_clean());
}

#[test]
fn interrupted_export_on_a_directory() {
    let src = vm("crashy", 120, 23);
    for n in [0, 1, 2, 5] {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DirStorage::new(dir.path()).unwrap());
        Repo::open_or_init(disk.clone()).unwrap();
        let crashing = Repo::open_or_init(FailAfter::new(disk.clone(), n))
            .unwrap()
            .with_pack_size(64 << 10);
        crashing
            .export(&mut src.clone(), &mut no_progress())
            .unwrap_err();
        let repo = Repo::open_or_init(DirStorage::new(dir.path()).unwrap()).unwrap();
        assert!(repo.snapshots().unwrap().is_empty());
        assert!(repo.verify().unwrap().is_clean());
        repo.export(&mut src.clone(), &mut no_progress()).unwrap();
        assert_reads_back(&repo, &src);
    }
}

#[test]
fn a_pack_cache_fetches_each_block_once_and_refetches_a_damaged_one() {
    use pmsnap_repo::{PackCache, CACHE_BLOCK};
    let store = Arc::new(MemStorage::new());
    let src = vm("c", 3000, 5);
    Repo::open_or_init(store.clone())
        .unwrap()
        .export(&mut src.clone(), &mut no_progress())
        .unwrap();
    let pack_len: u64 = store.list("packs/").unwrap().iter().map(|o| o.size).sum();
    let blocks = pack_len.div_ceil(CACHE_BLOCK);
    assert!(blocks > 3, "{pack_len}");
    let dir = tempfile::tempdir().unwrap();
    let pages: Vec<u64> = src.pages.keys().copied().collect();

    // Host process 1: prefetch everything, then read it all from the cache.
    let c1 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r1 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c1.clone());
    let m = r1.manifest("c").unwrap();
    let p = r1.prefetch(&m, &pages).unwrap();
    assert_eq!(
        (p.blocks, p.fetched, p.cached, p.failed),
        (blocks, blocks, 0, 0)
    );
    assert_reads_back(&r1, &src);
    assert_eq!(c1.stats().fetched_bytes, pack_len, "each byte fetched once");
    assert_eq!(c1.stats().misses, 0);

    // Process 2 on the same directory fetches nothing.
    let c2 = Arc::new(PackCache::open(dir.path(), 1 << 30).unwrap());
    let r2 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c2.clone());
    let p = r2.prefetch(&m, &pages).unwrap();
    assert_eq!((p.fetched, p.cached), (0, blocks));
    assert_reads_back(&r2, &src);
    assert_eq!(c2.stats().fetched_bytes, 0);

    // Without prefetch, reads fetch whole blocks on demand, each once.
    let d3 = tempfile::tempdir().unwrap();
    let c3 = Arc::new(PackCache::open(d3.path(), 1 << 30).unwrap());
    let r3 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c3.clone());
    assert_reads_back(&r3, &src);
    assert_eq!(c3.stats().fetched_bytes, pack_len);

    // A damaged cached block is not trusted: the page is read from the storage again.
    for e in std::fs::read_dir(d3.path()).unwrap() {
        let p = e.unwrap().path();
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        std::fs::write(&p, b).unwrap();
    }
    // (A new handle: c3 still holds the good blocks in memory.)
    let c4 = Arc::new(PackCache::open(d3.path(), 1 << 30).unwrap());
    let r4 = Repo::open_or_init(store.clone())
        .unwrap()
        .with_cache(c4.clone());
    assert_reads_back(&r4, &src);
    assert!(
        c4.stats().fetched_bytes > 0,
        "damaged blocks are fetched again"
    );

    // A small cache stays near its limit and still reads right.
    let d5 = tempfile::tempdir().unwrap();
    let c5 = Arc::new(PackCache::open(d5.path(), 2 * CACHE_BLOCK).unwrap());
    let r5 = Repo::open_or_init(store).unwrap().with_cache(c5.clone());
    r5.prefetch(&m, &pages).unwrap();
    assert_reads_back(&r5, &src);
    let used: u64 = std::fs::read_dir(d5.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(used <= 2 * CACHE_BLOCK, "{used}");
    assert!(c5.stats().evicted > 0);
}

/// A source that knows the order the guest touched pages in after the snapshot.
struct Ordered(FakeSource, Vec<PageRun>);

impl SnapshotSource for Ordered {
    fn meta(&mut self) -> Result<pmsnap_repo::SnapshotMeta, pmsnap_repo::SourceError> {
        self.0.meta()
    }
    fn read_page(&mut self, page: u64, buf: &mut Page) -> Result<(), pmsnap_repo::SourceError> {
        self.0.read_page(page, buf)
    }
    fn state(&mut self) -> Result<Vec<u8>, pmsnap_repo::SourceError> {
        self.0.state()
    }
    fn touch_order(&mut self) -> Vec<PageRun> {
        self.1.clone()
    }
}

#[test]
fn the_touch_order_is_recorded_bounded_and_optional() {
    let repo = Repo::open_or_init(MemStorage::new()).unwrap();
    // Out of address order; one run reaches past the snapshot, one lies outside it.
    let order = vec![
        PageRun::new(90, 3),
        PageRun::new(5, 1),
        PageRun::new(598, 10),
        PageRun::new(5000, 2),
        PageRun::new(40, 2),
    ];
    repo.export(
        &mut Ordered(vm("hinted", 600, 3), order),
        &mut no_progress(),
    )
    .unwrap();
    let m = repo.manifest("hinted").unwrap();
    assert_eq!(
        m.touch_order(),
        [
            PageRun::new(90, 3),
            PageRun::new(5, 1),
            PageRun::new(598, 2),
            PageRun::new(40, 2)
        ]
    );
    assert_reads_back(&repo, &vm("hinted", 600, 3));
    assert!(repo.verify().unwrap().is_clean());

    // Without one the manifest is as before (and reads back an empty order).
    export(&repo, &vm("plain", 600, 4));
    assert!(repo.manifest("plain").unwrap().touch_order().is_empty());

    // A huge order is cut to the bound, never refused.
    let huge: Vec<PageRun> = (0..17_000u64)
        .map(|i| PageRun::new(i * 2 % 17_000, 1))
        .collect();
    repo.export(
        &mut Ordered(vm("huge", 17_000, 5), huge),
        &mut no_progress(),
    )
    .unwrap();
    let m = repo.manifest("huge").unwrap();
    assert_eq!(m.touch_order().len(), pmsnap_repo::MAX_TOUCH_RUNS);
    assert_eq!(m.touch_order()[1], PageRun::new(2, 1));
}
