//! The `pmsnap` command line as a user meets it, by running the binary (no KVM needed):
//! exit codes, JSON errors, the `PMSNAP_API_SOCK` variable, verb aliases, `store prune`,
//! and the docs, whose `--help` blocks must be the binary's `--help`, byte for byte.
//!
//! The help blocks in the docs look like
//!
//! ````text
//! <!-- help: pmsnap ctl -->
//! ```text
//! ...the output of `pmsnap ctl --help`...
//! ```
//! ````
//!
//! `PMSNAP_UPDATE_DOCS=1 cargo test -p vmm --test cli` rewrites them from the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use guest_agent::cli::exit;
use pmem_backend::{Pool, PoolOptions};

fn pmsnap(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pmsnap"));
    c.args(args)
        .env_remove("PMSNAP_API_SOCK")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run pmsnap")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one JSON object on stdout.
fn json_out(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&o.stdout)))
}

#[test]
fn usage_errors_exit_2_and_are_json_with_json() {
    let o = pmsnap(&["ctl", "--api-sock", "/x", "stat"], &[]);
    assert_eq!(o.status.code(), Some(exit::USAGE));
    assert!(o.stdout.is_empty(), "text mode: nothing on stdout");
    assert!(text(&o.stderr).contains("unrecognized subcommand"));
    let o = pmsnap(&["ctl", "--json", "--api-sock", "/x", "stat"], &[]);
    assert_eq!(o.status.code(), Some(exit::USAGE));
    let v = json_out(&o);
    assert_eq!(v["error"]["exit_code"], exit::USAGE);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stat")),
        "{v}"
    );
    // A bad range is a usage error too, with the shared parser's message.
    let o = pmsnap(
        &[
            "ctl",
            "--api-sock",
            "/x",
            "snapshot-process",
            "n",
            "--pid",
            "1",
            "--range",
            "7f00-8f00",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(exit::USAGE));
    assert!(
        text(&o.stderr).contains("decimal, or in hex with 0x"),
        "{}",
        text(&o.stderr)
    );
    // --help is not an error.
    let o = pmsnap(&["--help"], &[]);
    assert_eq!(o.status.code(), Some(exit::OK));
    assert!(text(&o.stdout).contains(exit::HELP.split(';').next().expect("text")));
}

#[test]
fn api_sock_from_the_environment_and_json_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let s = sock.to_str().expect("utf8");
    // No socket at all: the message says how to give one.
    let o = pmsnap(&["ctl", "status"], &[]);
    assert_eq!(o.status.code(), Some(exit::ERROR));
    assert!(
        text(&o.stderr).contains("PMSNAP_API_SOCK"),
        "{}",
        text(&o.stderr)
    );
    // PMSNAP_API_SOCK is used: the error names that socket, in text and JSON.
    let o = pmsnap(&["ctl", "status"], &[("PMSNAP_API_SOCK", s)]);
    assert_eq!(o.status.code(), Some(exit::ERROR));
    assert!(text(&o.stderr).contains(s), "{}", text(&o.stderr));
    let o = pmsnap(&["ctl", "ls", "--json"], &[("PMSNAP_API_SOCK", s)]);
    assert_eq!(o.status.code(), Some(exit::ERROR));
    let v = json_out(&o);
    assert_eq!(v["error"]["exit_code"], exit::ERROR);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(s)),
        "{v}"
    );
    // --api-sock wins over the variable.
    let other = dir.path().join("other.sock");
    let o = pmsnap(
        &["ctl", "--api-sock", other.to_str().expect("utf8"), "status"],
        &[("PMSNAP_API_SOCK", s)],
    );
    assert!(
        text(&o.stderr).contains("other.sock"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn store_aliases_json_errors_and_prune() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = dir.path().join("2-0000a11e.pool");
    let _held = Pool::create(&live, 1 << 20, PoolOptions::default()).expect("create");
    let dead = dir.path().join("1-0000dead.pool");
    {
        let mut p = Pool::create(&dead, 1 << 20, PoolOptions::default()).expect("create");
        p.snapshot(
            "s1",
            pmem_backend::SnapshotKind::Vm,
            &[pmem_backend::PageRun::new(0, 4)],
            Default::default(),
        )
        .expect("snapshot");
    }
    let d = dead.to_str().expect("utf8");
    for verb in ["ls", "list"] {
        let o = pmsnap(&["store", "--pool", d, verb, "--json"], &[]);
        assert_eq!(o.status.code(), Some(exit::OK), "{}", text(&o.stderr));
        let v = json_out(&o);
        let created = v["per_snapshot"][0]["created_unix_ms"]
            .as_u64()
            .expect("ms");
        assert!(created > 1_600_000_000_000, "{v}");
    }
    let o = pmsnap(&["store", "--pool", d, "inspect", "s1"], &[]);
    let out = text(&o.stdout);
    let created = out
        .lines()
        .find_map(|l| l.strip_prefix("created:"))
        .expect("created line");
    assert!(created.trim().ends_with('Z'), "RFC 3339: {out}");
    // A locked pool: an error, as JSON on stdout with --json.
    let l = live.to_str().expect("utf8");
    let o = pmsnap(&["store", "--pool", l, "delete", "x", "--json"], &[]);
    assert_eq!(o.status.code(), Some(exit::ERROR));
    let v = json_out(&o);
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("locked by another process")),
        "{v}"
    );
    let o = pmsnap(&["store", "--pool", d, "delete", "s1"], &[]);
    assert_eq!(o.status.code(), Some(exit::OK), "{}", text(&o.stderr));
    // Prune: the dead pool goes, the live one stays.
    let dirs = dir.path().to_str().expect("utf8");
    let o = pmsnap(&["store", "prune", "--dir", dirs, "--json"], &[]);
    assert_eq!(o.status.code(), Some(exit::OK), "{}", text(&o.stderr));
    let v = json_out(&o);
    assert_eq!(v["removed"][0]["path"], d, "{v}");
    assert_eq!(v["in_use"][0]["path"], l, "{v}");
    assert!(!dead.exists() && live.exists());
}

/// Check (or with PMSNAP_UPDATE_DOCS=1 rewrite) the help blocks of `doc` for `pmsnap`.
fn check_help_blocks(doc: &Path, help: impl Fn(&[&str]) -> String) -> usize {
    let text = std::fs::read_to_string(doc).expect("read doc");
    let (fresh, stale, seen) =
        guest_agent::cli::refresh_help_blocks(&text, "pmsnap", help).expect("help blocks");
    if std::env::var_os("PMSNAP_UPDATE_DOCS").is_some() {
        std::fs::write(doc, fresh).expect("write doc");
    } else {
        assert!(
            stale.is_empty(),
            "{}: the --help of {stale:?} changed; run PMSNAP_UPDATE_DOCS=1 cargo test -p vmm \
             --test cli and review the diff",
            doc.display()
        );
    }
    seen
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

#[test]
fn docs_match_help() {
    let help = |args: &[&str]| {
        let mut a = args.to_vec();
        a.push("--help");
        let o = pmsnap(&a, &[]);
        assert_eq!(o.status.code(), Some(0), "{args:?} --help");
        text(&o.stdout)
    };
    let mut checked = 0;
    for doc in ["README.md", "docs/cli.md", "docs/api.md"] {
        checked += check_help_blocks(&repo().join(doc), help);
    }
    // The top level, run, restore, store, prune and ctl at least.
    assert!(checked >= 6, "only {checked} help blocks found");
    // Every command's help is somewhere in the docs.
    let all: String = ["README.md", "docs/cli.md", "docs/api.md"]
        .iter()
        .map(|d| std::fs::read_to_string(repo().join(d)).expect("read"))
        .collect();
    for cmd in [
        "pmsnap",
        "pmsnap run",
        "pmsnap restore",
        "pmsnap store",
        "pmsnap ctl",
    ] {
        assert!(
            all.contains(&format!("<!-- help: {cmd} -->")),
            "no help block for {cmd}"
        );
    }
}
