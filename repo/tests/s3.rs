//! The repository in a real S3 bucket (SeaweedFS started by `scripts/objstore.sh`, one
//! server per test): the storage contract, the same results as on a directory, and an
//! object store that goes down in the middle of an export.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pmsnap_repo::{
    open_storage, DirStorage, Repo, RepoLocation, S3Options, SnapshotSource, SourceError, Storage,
    PAGE_SIZE,
};
use pmsnap_testenv::ObjStore;

fn options(os: &ObjStore, retry_secs: u64) -> S3Options {
    S3Options {
        endpoint: Some(os.endpoint().to_string()),
        region: os.var("AWS_REGION").to_string(),
        access_key_id: Some(os.var("AWS_ACCESS_KEY_ID").to_string()),
        secret_access_key: Some(os.var("AWS_SECRET_ACCESS_KEY").to_string()),
        session_token: None,
        retry_timeout: Duration::from_secs(retry_secs),
        in_flight: 4,
    }
}

fn s3(os: &ObjStore, url: &str, retry_secs: u64) -> Arc<dyn Storage> {
    open_storage(&RepoLocation::parse(url).unwrap(), &options(os, retry_secs)).unwrap()
}

#[test]
fn s3_storage_keeps_the_storage_contract() {
    pmsnap_testenv::require!(
        "s3_storage_keeps_the_storage_contract",
        ObjStore::unavailable()
    );
    let os = ObjStore::start();
    let s = s3(&os, "s3://pmsnap/contract/a", 5);
    assert!(!s.exists("packs/a").unwrap());
    let e = s.get("packs/a").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    assert!(
        e.to_string().contains("s3://pmsnap/contract/a/packs/a"),
        "{e}"
    );
    s.put("packs/a", b"hello world").unwrap();
    s.put("packs/b", b"world!").unwrap();
    s.put("snapshots/guest%3A1000%2Fdb", b"m").unwrap();
    // Another repository under a prefix that starts the same way is not listed.
    s3(&os, "s3://pmsnap/contract/ab", 5)
        .put("packs/z", b"other")
        .unwrap();
    assert_eq!(s.get("packs/a").unwrap(), b"hello world");
    assert_eq!(s.get_range("packs/a", 6, 5).unwrap(), b"world");
    assert_eq!(
        s.get_range("packs/a", 6, 6).unwrap_err().kind(),
        std::io::ErrorKind::UnexpectedEof
    );
    let keys = |p: &str| -> Vec<String> { s.list(p).unwrap().into_iter().map(|o| o.key).collect() };
    assert_eq!(keys("packs/"), ["packs/a", "packs/b"]);
    assert_eq!(keys("packs/b"), ["packs/b"]);
    assert_eq!(keys("snapshots/"), ["snapshots/guest%3A1000%2Fdb"]);
    let b = &s.list("packs/b").unwrap()[0];
    assert_eq!(b.size, 6);
    let age = std::time::SystemTime::now()
        .duration_since(b.modified)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(600), "LastModified {age:?} ago");
    // Ranges at once, in order.
    let r = s.get_ranges(&[
        ("packs/a".into(), 0, 5),
        ("packs/b".into(), 1, 3),
        ("packs/a".into(), 6, 5),
    ]);
    let r: Vec<Vec<u8>> = r.into_iter().map(Result::unwrap).collect();
    assert_eq!(r, [b"hello".to_vec(), b"orl".to_vec(), b"world".to_vec()]);
    // Queued puts, then wait.
    for i in 0..20 {
        s.put_queued(vec![(format!("index/q{i}"), vec![i as u8; 1000])])
            .unwrap();
    }
    s.wait_queued().unwrap();
    assert_eq!(keys("index/").len(), 20);
    s.delete("packs/a").unwrap();
    s.delete("packs/a").unwrap();
    assert!(!s.exists("packs/a").unwrap());
    // A missing bucket is named as such.
    let e = s3(&os, "s3://no-such-bucket/x", 2)
        .list("packs/")
        .unwrap_err();
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
    // Wrong credentials are named as such.
    let mut o = options(&os, 2);
    o.secret_access_key = Some("wrong".into());
    let bad = open_storage(&RepoLocation::parse("s3://pmsnap/x").unwrap(), &o).unwrap();
    let e = bad.get("config").unwrap_err();
    assert!(e.to_string().contains("credentials were refused"), "{e}");
}

#[test]
fn a_bucket_repository_gives_the_same_results_as_a_directory() {
    pmsnap_testenv::require!(
        "a_bucket_repository_gives_the_same_results_as_a_directory",
        ObjStore::unavailable()
    );
    let os = ObjStore::start();
    let dir = tempfile::tempdir().unwrap();
    let on_dir = Repo::open_or_init(DirStorage::new(dir.path()).unwrap())
        .unwrap()
        .with_pack_size(256 << 10);
    let on_s3 = Repo::open_or_init(s3(&os, "s3://pmsnap/same", 10))
        .unwrap()
        .with_pack_size(256 << 10);
    let a = vm("a", 700, 1);
    let mut b = vm("b", 700, 1);
    for p in 100..110 {
        b.pages.insert(p, [p as u8; PAGE_SIZE]);
    }
    for repo in [&on_dir, &on_s3] {
        let ra = repo.export(&mut a.clone(), &mut no_progress()).unwrap();
        let rb = repo.export(&mut b.clone(), &mut no_progress()).unwrap();
        assert!(ra.packs_written > 2, "{ra:?}");
        assert_eq!(rb.chunks_new, 10, "{rb:?}");
        assert!(
            repo.export(&mut a.clone(), &mut no_progress())
                .unwrap()
                .no_op
        );
        assert_reads_back(repo, &a);
        assert_reads_back(repo, &b);
    }
    let strip = |v: Vec<pmsnap_repo::SnapshotSummary>| {
        v.into_iter()
            .map(|mut s| {
                s.exported_unix_ms = 0;
                s
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(on_dir.ls().unwrap()), strip(on_s3.ls().unwrap()));
    let (vd, vs) = (on_dir.verify().unwrap(), on_s3.verify().unwrap());
    assert!(vd.is_clean() && vs.is_clean(), "{vs:?}");
    assert_eq!(vd, vs);
    // b's own content is one pack of its 10 new chunks: removing b frees it.
    on_dir.remove("b").unwrap();
    on_s3.remove("b").unwrap();
    let (gd, gs) = (
        on_dir.gc(Duration::ZERO).unwrap(),
        on_s3.gc(Duration::ZERO).unwrap(),
    );
    assert!(gs.deleted_packs > 0, "{gs:?}");
    assert_eq!(gd, gs);
    assert_eq!(on_s3.snapshots().unwrap(), ["a"]);
    assert_reads_back(&on_s3, &a);
    assert!(on_s3.verify().unwrap().is_clean());
    // A fresh handle on the bucket reads it too.
    let again = Repo::open_or_init(s3(&os, "s3://pmsnap/same", 10)).unwrap();
    assert_reads_back(&again, &a);
}

/// Calls `at` once, when page `n` is read.
#[derive(Clone)]
struct Hook<F: Fn()> {
    inner: FakeSource,
    n: u64,
    at: F,
}

impl<F: Fn()> SnapshotSource for Hook<F> {
    fn meta(&mut self) -> Result<pmsnap_repo::SnapshotMeta, SourceError> {
        self.inner.meta()
    }
    fn read_page(&mut self, page: u64, buf: &mut Page) -> Result<(), SourceError> {
        if page == self.n {
            (self.at)();
        }
        self.inner.read_page(page, buf)
    }
    fn state(&mut self) -> Result<Vec<u8>, SourceError> {
        self.inner.state()
    }
}

#[test]
fn an_export_to_a_server_that_goes_down_fails_clearly_and_a_rerun_finishes() {
    pmsnap_testenv::require!(
        "an_export_to_a_server_that_goes_down_fails_clearly_and_a_rerun_finishes",
        ObjStore::unavailable()
    );
    let os = ObjStore::start();
    let url = "s3://pmsnap/down";
    let repo = Repo::open_or_init(s3(&os, url, 3))
        .unwrap()
        .with_pack_size(128 << 10);
    let src = vm("v", 1500, 7);
    let mut hooked = Hook {
        inner: src.clone(),
        n: 900,
        at: || os.stop(),
    };
    let t = std::time::Instant::now();
    let e = repo.export(&mut hooked, &mut no_progress()).unwrap_err();
    let msg = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(msg.contains(url), "{msg}");
    assert!(msg.contains(os.endpoint()), "{msg}");
    assert!(msg.contains("running"), "{msg}");
    // Retried for about the configured 3 s, not forever.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());

    os.restart();
    // A restarted SeaweedFS may answer 500 for a few seconds while its volume server
    // registers again: the client's retries can run out before that (see s3.rs).
    let repo = pmsnap_testenv::poll_until(Duration::from_secs(60), || {
        Repo::open_or_init(s3(&os, url, 10)).ok()
    })
    .expect("the restarted store serves the repository within 60 s")
    .with_pack_size(128 << 10);
    assert!(repo.snapshots().unwrap().is_empty(), "no partial snapshot");
    let v = repo.verify().unwrap();
    assert!(v.is_clean(), "{v:?}");
    assert!(
        v.packs > 0,
        "the packs uploaded before the stop are there: {v:?}"
    );
    let r = repo.export(&mut src.clone(), &mut no_progress()).unwrap();
    // The rerun reuses what the first run stored.
    assert!(r.bytes_skipped > 0, "{r:?}");
    assert_reads_back(&repo, &src);
    assert!(repo.verify().unwrap().is_clean());
}
