//! Snapshots leave the pool and come back, with the real binary on real KVM: a VM
//! snapshot of the pattern payload is exported to a repository, exported again (nothing
//! new), imported into a new pool (byte-exact, every page) and restored from it; a flipped
//! byte in a pack is found by `repo verify` and refused by `import`; `repo rm` and `gc`
//! empty the repository.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pmem_backend::Pool;

mod common;
use common::{kvm_missing, pmsnap_bin, ApiVmm};

fn pmsnap(args: &[&str]) -> Output {
    Command::new(pmsnap_bin())
        .args(args)
        .output()
        .expect("run pmsnap")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let o = pmsnap(args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Snapshot `v1` of the pools `a` and `b` holds the same `pages` pages and state (the
/// pools are open only for the comparison).
fn assert_same_v1(a: &Path, b: &Path, pages: u64, what: &str) {
    let (a, b) = (Pool::open(a).expect("a"), Pool::open(b).expect("b"));
    for page in 0..pages {
        let x = a.read_snapshot_page("v1", page).expect("a page").1;
        let y = b.read_snapshot_page("v1", page).expect("b page").1;
        assert!(x == y, "{what}: page {page} differs");
    }
    assert_eq!(
        a.read_state("v1").expect("a state"),
        b.read_state("v1").expect("b state"),
        "{what}: state differs"
    );
}

#[test]
fn export_import_restore_verify_and_gc() {
    if kvm_missing("export_import_restore_verify_and_gc") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let (p1, p2, p3) = (
        dir.path().join("a.pool"),
        dir.path().join("b.pool"),
        dir.path().join("c.pool"),
    );
    let repo = dir.path().join("repo");
    let mut vmm = ApiVmm::spawn_payload(dir.path(), "a", &p1, "32M", &[]);
    vmm.api.snapshot_vm("v1").expect("snapshot");
    vmm.child.kill().expect("kill");
    vmm.child.wait().expect("reap");

    let rep = ok_json(&["export", "v1", "--pool", s(&p1), "--to", s(&repo), "--json"]);
    assert_eq!(rep["pages"], 8192, "{rep}");
    assert!(rep["bytes_new"].as_u64().expect("bytes_new") > 0, "{rep}");
    assert!(rep["zero_pages"].as_u64().expect("zero") > 0, "{rep}");
    let again = ok_json(&["export", "v1", "--pool", s(&p1), "--to", s(&repo), "--json"]);
    assert_eq!(again["no_op"], true, "{again}");
    assert_eq!(again["bytes_written"], 0, "{again}");

    let imp = ok_json(&[
        "import",
        "v1",
        "--from",
        s(&repo),
        "--pool",
        s(&p2),
        "--json",
    ]);
    assert_eq!(imp["pages"], 8192, "{imp}");
    assert_same_v1(&p1, &p2, 8192, "after import");
    // The imported pool restores: the VM comes up (paused) with its vCPUs.
    let args = ["restore", "v1", "--paused", "--pool", s(&p2)];
    let restored = ApiVmm::spawn(dir.path(), "b", args).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(restored.api.status().expect("status").vcpus, 2);
    drop(restored);

    let v = ok_json(&["repo", "verify", s(&repo), "--json"]);
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    // Damage: flip one byte in the middle of the largest pack.
    let pack_id = common::damage_largest_pack(&repo);
    let pack_id = pack_id.as_str();
    let o = pmsnap(&["repo", "verify", s(&repo)]);
    assert_eq!(o.status.code(), Some(3), "verify finds the damage");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(pack_id), "names the pack: {out}");
    let o = pmsnap(&["import", "v1", "--from", s(&repo), "--pool", s(&p3)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(pack_id), "import names the pack: {err}");
    assert!(!p3.exists(), "a failed import leaves no pool");

    ok_json(&["repo", "rm", s(&repo), "v1", "--json"]);
    let gc = ok_json(&["repo", "gc", s(&repo), "--grace-secs", "0", "--json"]);
    assert!(gc["deleted_packs"].as_u64().expect("deleted") > 0, "{gc}");
    let ls = ok_json(&["repo", "ls", s(&repo), "--json"]);
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "{ls}");
    assert_eq!(
        std::fs::read_dir(repo.join("packs"))
            .expect("packs")
            .count(),
        0
    );
}

/// Boot the payload on a new pool, take VM snapshot `v1`, kill the VMM: a pool to export.
fn payload_pool(dir: &Path, pool: &Path) {
    let mut vmm = ApiVmm::spawn_payload(dir, "src", pool, "64M", &[]);
    std::thread::sleep(Duration::from_millis(300)); // the payload writes its pattern
    vmm.api.snapshot_vm("v1").expect("snapshot");
    vmm.child.kill().expect("kill");
    vmm.child.wait().expect("reap");
}

#[test]
fn an_export_killed_at_any_moment_leaves_a_consistent_repository_and_a_rerun_finishes() {
    if kvm_missing("an_export_killed_at_any_moment_leaves_a_consistent_repository") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let pool = dir.path().join("a.pool");
    payload_pool(dir.path(), &pool);
    // How long a whole export takes here: kills land anywhere in it.
    let full = dir.path().join("full");
    let t = Instant::now();
    ok_json(&[
        "export",
        "v1",
        "--pool",
        s(&pool),
        "--to",
        s(&full),
        "--json",
    ]);
    let whole = t.elapsed();
    let seed = std::env::var("PMSNAP_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("export takes {whole:?}; PMSNAP_CRASH_SEED={seed}");
    let mut rng = pmsnap_testenv::Rng(seed | 1);
    let (mut interrupted, mut finished) = (0, 0);
    for trial in 0..20 {
        let repo = dir.path().join(format!("r{trial}"));
        let delay = Duration::from_micros(rng.below(whole.as_micros() as u64 + 1));
        let mut child = Command::new(pmsnap_bin())
            .args([
                "export",
                "v1",
                "--pool",
                s(&pool),
                "--to",
                s(&repo),
                "--json",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn export");
        std::thread::sleep(delay);
        let _ = child.kill();
        let st = child.wait().expect("reap");
        if st.success() {
            finished += 1;
        } else {
            interrupted += 1;
        }
        if repo.join("config").exists() {
            // Consistent after the kill: nothing damaged, and v1 is there only whole.
            let v = ok_json(&["repo", "verify", s(&repo), "--json"]);
            assert_eq!(
                v["problems"].as_array().map(Vec::len),
                Some(0),
                "trial {trial}: {v}"
            );
        }
        // The same export again finishes the job.
        ok_json(&[
            "export",
            "v1",
            "--pool",
            s(&pool),
            "--to",
            s(&repo),
            "--json",
        ]);
        let v = ok_json(&["repo", "verify", s(&repo), "--json"]);
        assert_eq!(
            v["problems"].as_array().map(Vec::len),
            Some(0),
            "trial {trial}: {v}"
        );
        let ls = ok_json(&["repo", "ls", s(&repo), "--json"]);
        assert_eq!(ls[0]["name"], "v1", "trial {trial}: {ls}");
        assert_eq!(ls[0]["pages"], 16384, "trial {trial}: {ls}");
        if trial % 5 == 0 {
            // And what it holds imports byte-exact.
            let p = dir.path().join(format!("imp{trial}.pool"));
            ok_json(&[
                "import",
                "v1",
                "--from",
                s(&repo),
                "--pool",
                s(&p),
                "--json",
            ]);
            assert_same_v1(&pool, &p, 16384, &format!("trial {trial}"));
            std::fs::remove_file(&p).expect("remove");
        }
        std::fs::remove_dir_all(&repo).expect("remove repo");
    }
    eprintln!("{interrupted} exports killed, {finished} finished before the kill");
    assert!(interrupted > 0, "no kill landed inside an export");
}

#[test]
fn a_live_export_while_the_guest_writes_holds_the_snapshot_byte_exact() {
    if kvm_missing("a_live_export_while_the_guest_writes_holds_the_snapshot_byte_exact") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let (p1, p2) = (dir.path().join("a.pool"), dir.path().join("b.pool"));
    let repo = dir.path().join("repo");
    let mut vmm = ApiVmm::spawn_payload(dir.path(), "live", &p1, "64M", &[]);
    vmm.api.snapshot_vm("v1").expect("snapshot");
    // The payload keeps writing every page while the VMM (seccomp on) exports.
    let sock = dir.path().join("live.sock");
    let rep = ok_json(&[
        "ctl",
        "--api-sock",
        s(&sock),
        "--json",
        "export",
        "v1",
        "--to",
        s(&repo),
    ]);
    assert_eq!(rep["pages"], 16384, "{rep}");
    let stats = vmm.api.stats().expect("stats");
    assert!(
        stats.preserved_pages > 0,
        "the guest wrote during the export"
    );
    assert!(
        vmm.log_tail(40)
            .contains("export of \"v1\": 100% of 16384 pages"),
        "progress is logged: {}",
        vmm.log_tail(40)
    );
    // A second export of the same snapshot is a no-op.
    let again = ok_json(&[
        "ctl",
        "--api-sock",
        s(&sock),
        "--json",
        "export",
        "v1",
        "--to",
        s(&repo),
    ]);
    assert_eq!(again["no_op"], true, "{again}");
    vmm.child.kill().expect("kill");
    vmm.child.wait().expect("reap");

    ok_json(&[
        "import",
        "v1",
        "--from",
        s(&repo),
        "--pool",
        s(&p2),
        "--json",
    ]);
    assert_same_v1(
        &p1,
        &p2,
        16384,
        "the export read what the guest wrote later",
    );
}

fn pmsnap_env(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(pmsnap_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run pmsnap")
}

fn ok_json_env(args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let o = pmsnap_env(args, env);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// ls without the export times (they differ between two exports of the same snapshot).
fn ls_sizes(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    for s in v.as_array_mut().expect("ls array") {
        s["exported_unix_ms"] = 0.into();
    }
    v
}

#[test]
fn a_live_export_to_a_bucket_under_seccomp_and_every_repo_command_on_it() {
    let test = "a_live_export_to_a_bucket_under_seccomp_and_every_repo_command_on_it";
    if kvm_missing(test) {
        return;
    }
    pmsnap_testenv::require!(test, pmsnap_testenv::ObjStore::unavailable());
    let os = pmsnap_testenv::ObjStore::start();
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let mut env = os.env.clone();
    // The pack cache of this test's commands stays in its directory.
    let default_cache = dir.path().join("default-cache");
    env.push(("PMSNAP_CACHE_DIR".into(), s(&default_cache).into()));
    let (p1, p2) = (dir.path().join("a.pool"), dir.path().join("b.pool"));
    let local = dir.path().join("repo");
    let url = "s3://pmsnap/hosts/a";
    // The VMM (seccomp on: the export thread's filter) reaches the bucket with its own
    // environment.
    let mut vmm = ApiVmm::spawn_payload_env(dir.path(), "live", &p1, "32M", &[], &env);
    vmm.api.snapshot_vm("v1").expect("snapshot");
    let sock = dir.path().join("live.sock");
    let ctl = [
        "ctl",
        "--api-sock",
        s(&sock),
        "--json",
        "export",
        "v1",
        "--to",
        url,
    ];
    let ctl_export = |vmm: &ApiVmm| {
        let o = pmsnap(&ctl);
        assert!(
            o.status.success(),
            "{}; the VMM's log: {}",
            String::from_utf8_lossy(&o.stderr),
            vmm.log_tail(20)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let rep = ctl_export(&vmm);
    assert_eq!(rep["pages"], 8192, "{rep}");
    assert!(rep["packs_written"].as_u64().expect("packs") > 0, "{rep}");
    assert!(
        vmm.api.status().is_ok(),
        "the VMM runs on: {}",
        vmm.log_tail(20)
    );
    assert_eq!(ctl_export(&vmm)["no_op"], true);
    vmm.child.kill().expect("kill");
    vmm.child.wait().expect("reap");

    // The same snapshot exported offline to a directory lists and verifies the same.
    ok_json(&[
        "export",
        "v1",
        "--pool",
        s(&p1),
        "--to",
        s(&local),
        "--json",
    ]);
    let ls3 = ok_json_env(&["repo", "ls", url, "--json"], &env);
    let lsd = ok_json(&["repo", "ls", s(&local), "--json"]);
    assert_eq!(ls_sizes(&ls3), ls_sizes(&lsd));
    let v3 = ok_json_env(&["repo", "verify", url, "--json"], &env);
    let vd = ok_json(&["repo", "verify", s(&local), "--json"]);
    assert_eq!(v3["problems"].as_array().map(Vec::len), Some(0), "{v3}");
    assert_eq!(v3["chunks"], vd["chunks"]);

    // Two imports on this host through one pack cache: the second fetches nothing.
    let cache = dir.path().join("cache");
    let import = |pool: &Path| {
        ok_json_env(
            &[
                "import",
                "v1",
                "--from",
                url,
                "--pool",
                s(pool),
                "--cache-dir",
                s(&cache),
                "--json",
            ],
            &env,
        )
    };
    let imp = import(&p2);
    assert_eq!(imp["pages"], 8192, "{imp}");
    let fetched = imp["fetched_bytes"].as_u64().expect("fetched_bytes");
    assert!(fetched > 0, "{imp}");
    assert_same_v1(&p1, &p2, 8192, "imported from the bucket");
    std::fs::remove_file(&p2).expect("rm pool");
    let imp = import(&p2);
    assert_eq!(imp["fetched_bytes"], 0, "{imp}");
    assert_same_v1(&p1, &p2, 8192, "imported again, from the cache");

    ok_json_env(&["repo", "rm", url, "v1", "--json"], &env);
    let gc = ok_json_env(&["repo", "gc", url, "--grace-secs", "0", "--json"], &env);
    assert!(gc["deleted_packs"].as_u64().expect("deleted") > 0, "{gc}");
    let ls = ok_json_env(&["repo", "ls", url, "--json"], &env);
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "{ls}");

    // Clear errors: no repository there, no such bucket, no credentials, server down.
    let err = |args: &[&str], env: &[(String, String)]| {
        let o = pmsnap_env(args, env);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = err(&["repo", "ls", "s3://pmsnap/nothing"], &env);
    assert!(
        e.contains("s3://pmsnap/nothing is not a pmsnap repository"),
        "{e}"
    );
    let e = err(&["repo", "ls", "s3://no-such-bucket/x"], &env);
    assert!(e.contains("bucket no-such-bucket does not exist"), "{e}");
    let no_creds: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.contains("SECRET"))
        .cloned()
        .collect();
    let o = Command::new(pmsnap_bin())
        .args(["repo", "ls", url])
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(no_creds.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no S3 credentials"), "{e}");
    os.stop();
    let e = err(&["repo", "ls", url, "--s3-retry-secs", "1"], &env);
    assert!(e.contains(os.endpoint()) && e.contains("running"), "{e}");
}
