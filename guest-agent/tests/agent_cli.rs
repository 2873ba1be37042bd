//! Host tests of `pmsnap-agent` and `pmsnap-memtest` against the fake snapshot
//! service: the real binaries, real processes, real pagemap frames (root), real
//! freezing; only the VMM is replaced.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::FakeVmm;
use guest_agent::protocol::{
    read_frame, write_frame, AgentRequest, ErrorCode, Reply, VirtRange, HEADER_LEN,
};

const AGENT: &str = env!("CARGO_BIN_EXE_pmsnap-agent");
const MEMTEST: &str = env!("CARGO_BIN_EXE_pmsnap-memtest");

macro_rules! need_root {
    ($test:expr) => {
        pmsnap_testenv::require!(
            $test,
            pmsnap_testenv::root_unavailable("pagemap frame numbers, mlock and /proc/PID/mem")
        );
    };
}

fn run(bin: &str, fake: &FakeVmm, args: &[&str]) -> Output {
    let out = Command::new(bin)
        .arg("--transport")
        .arg(fake.endpoint())
        .args(args)
        .output()
        .expect("run binary");
    eprintln!(
        "$ {bin} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `pmsnap-memtest hold` process; killed on drop.
struct Hold {
    child: Child,
    pid: u32,
    range: VirtRange,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hold {
    fn start(mib: usize, seed: u64) -> Self {
        let mut child = Command::new(MEMTEST)
            .args([
                "hold",
                "--mib",
                &mib.to_string(),
                "--seed",
                &seed.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn hold");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w[..3], ["memtest:", "hold", "pid"], "{line}");
        let pid = w[3].parse().expect("pid");
        let (s, e) = w[5].split_once('-').expect("range");
        let hex = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).expect("hex");
        Hold {
            child,
            pid,
            range: VirtRange {
                start: hex(s),
                end: hex(e),
            },
        }
    }

    fn range_arg(&self) -> String {
        format!("{:#x}-{:#x}", self.range.start, self.range.end)
    }
}

#[test]
fn memtest_fill_save_restore_and_fresh_process() {
    need_root!("memtest_fill_save_restore_and_fresh_process");
    let fake = FakeVmm::start();
    let o = run(
        MEMTEST,
        &fake,
        &[
            "fill-save-restore",
            "--mib",
            "64",
            "--seed",
            "7",
            "--name",
            "mt1",
        ],
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("memtest: ok fill-save-restore 64 MiB"));
    {
        let st = fake.state();
        let snap = &st.snaps["mt1"];
        assert_eq!(snap.pages.len(), 64 * 256);
        assert!(
            snap.pages.iter().all(|p| p.is_some()),
            "mlock made all present"
        );
        assert_eq!(st.seen, ["save", "restore"]);
    }
    // A second, fresh process restores into a fresh buffer.
    let o = run(
        MEMTEST,
        &fake,
        &[
            "restore-check",
            "--mib",
            "64",
            "--seed",
            "7",
            "--name",
            "mt1",
        ],
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("memtest: ok restore-check"));
    // The check is real: the wrong seed fails with the first bad byte.
    let o = run(
        MEMTEST,
        &fake,
        &[
            "restore-check",
            "--mib",
            "64",
            "--seed",
            "8",
            "--name",
            "mt1",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("memtest: FAIL first bad byte at offset 0x0"));
    // Wrong size: the VMM's size-mismatch reply, non-zero exit.
    let o = run(
        MEMTEST,
        &fake,
        &[
            "restore-check",
            "--mib",
            "32",
            "--seed",
            "7",
            "--name",
            "mt1",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("SizeMismatch"), "{}", stdout(&o));
    // Unknown name.
    let o = run(
        MEMTEST,
        &fake,
        &["restore-check", "--mib", "64", "--name", "nope"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("NotFound"));
}

#[test]
fn agent_save_list_restore_rm() {
    need_root!("agent_save_list_restore_rm");
    let fake = FakeVmm::start();
    let a = Hold::start(8, 11);
    let o = run(
        AGENT,
        &fake,
        &[
            "save",
            "--pid",
            &a.pid.to_string(),
            "--range",
            &a.range_arg(),
            "--name",
            "a1",
            "--json",
        ],
    );
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v["pages"], 2048);
    assert_eq!(v["present_pages"], 2048);
    assert_eq!(v["vmm_pages"], 2048);
    assert!(v["runs"].as_u64().expect("runs") >= 1);
    assert!(v["pause_us"].as_u64().expect("pause") > 0);
    // The holder runs again after the save (thawed): it can be signalled and is not 'T'.
    assert!(!guest_agent::freeze::is_stopped(a.pid));

    // Default ranges: the whole writable private memory, more than the buffer.
    let o = run(
        AGENT,
        &fake,
        &["save", "--pid", &a.pid.to_string(), "--name", "a-all"],
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("saved a-all from pid"));
    assert!(fake.state().snaps["a-all"].pages.len() > 2048);

    let o = run(AGENT, &fake, &["list", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(v[0]["name"], "a-all");
    assert_eq!(v[1]["name"], "a1");
    assert_eq!(v[1]["comm"], "pmsnap-memtest");
    let o = run(AGENT, &fake, &["list"]);
    assert!(stdout(&o).lines().count() == 3);

    // Restore into another process with another pattern, then check its memory.
    let b = Hold::start(8, 22);
    fake.state().restore_pid = Some(b.pid);
    let o = run(
        AGENT,
        &fake,
        &[
            "restore",
            "--name",
            "a1",
            "--pid",
            &b.pid.to_string(),
            "--range",
            &b.range_arg(),
        ],
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("restored a1 into pid"));
    // The holder wrote all of its buffer: nothing to touch before the restore.
    assert!(
        stdout(&o).contains("(8.0 MiB, 0 touched)"),
        "{}",
        stdout(&o)
    );
    let check = |seed: &str| {
        Command::new(MEMTEST)
            .args([
                "verify",
                "--pid",
                &b.pid.to_string(),
                "--addr",
                &format!("{:#x}", b.range.start),
                "--mib",
                "8",
                "--seed",
                seed,
            ])
            .output()
            .expect("verify")
    };
    let ok = check("11");
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(!check("22").status.success());

    // Wrong size.
    let half = format!("{:#x}-{:#x}", b.range.start, b.range.start + (4 << 20));
    let o = run(
        AGENT,
        &fake,
        &[
            "restore",
            "--name",
            "a1",
            "--pid",
            &b.pid.to_string(),
            "--range",
            &half,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("SizeMismatch"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "one-line error");

    let o = run(AGENT, &fake, &["rm", "a1"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "deleted a1");
    let o = run(AGENT, &fake, &["rm", "a1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NotFound"));
    assert!(!fake.state().snaps.contains_key("a1"));
    assert!(fake.state().snaps.contains_key("a-all"));
}

#[test]
fn agent_errors_are_one_line_and_nonzero() {
    need_root!("agent_errors_are_one_line_and_nonzero");
    let fake = FakeVmm::start();
    let h = Hold::start(1, 3);
    let pid = h.pid.to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "restore".into(),
                "--name".into(),
                "ghost".into(),
                "--pid".into(),
                pid.clone(),
                "--range".into(),
                h.range_arg(),
            ],
            "NotFound",
        ),
        (
            vec![
                "save".into(),
                "--pid".into(),
                "2147483000".into(),
                "--name".into(),
                "x".into(),
            ],
            "no process with pid 2147483000",
        ),
        (
            vec![
                "save".into(),
                "--pid".into(),
                pid.clone(),
                "--name".into(),
                "x".into(),
                "--range".into(),
                "0x1000-0x2000".into(),
            ],
            "is not mapped",
        ),
        (
            vec![
                "save".into(),
                "--pid".into(),
                pid.clone(),
                "--name".into(),
                "../x".into(),
            ],
            "invalid snapshot name",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(AGENT, &fake, &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with("pmsnap-agent: error: "), "{e}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // The holder is never left frozen by a failed save.
    assert!(!guest_agent::freeze::is_stopped(h.pid));
    assert!(fake.state().snaps.is_empty());

    // No VMM: vsock on this host has no snapshot service at CID 2.
    let o = Command::new(AGENT)
        .args(["list"])
        .env_remove("PMSNAP_TRANSPORT")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("pmsnap-agent: error: vsock not available"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serve_answers_the_vmm() {
    need_root!("serve_answers_the_vmm");
    let fake = FakeVmm::start();
    let sock = fake.dir.path().join("agent.sock");
    let log = fake.dir.path().join("agent.log");
    let mut agent = Command::new(AGENT)
        .args(["--transport", &fake.endpoint(), "serve", "--listen-unix"])
        .arg(&sock)
        .arg("--log")
        .arg(&log)
        .arg("--app-socket")
        .arg(fake.dir.path().join("app.sock"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ask = |frame: &[u8]| {
        let mut s = UnixStream::connect(&sock).expect("connect");
        write_frame(&mut s, frame).expect("write");
        Reply::decode(&read_frame(&mut s).expect("read").expect("a reply")).expect("decode")
    };
    let h = Hold::start(4, 5);
    let req = AgentRequest::SnapshotProcess {
        token: 5,
        name: "from-host".into(),
        pid: h.pid,
        ranges: vec![h.range],
    };
    match ask(&req.encode().expect("encode")) {
        Reply::Saved {
            name,
            pages,
            present_pages,
        } => {
            assert_eq!(name, "from-host");
            assert_eq!((pages, present_pages), (1024, 1024));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(fake.state().snaps.contains_key("from-host"));
    // Errors come back as error replies and the daemon keeps serving.
    let missing = AgentRequest::SnapshotProcess {
        token: 6,
        name: "x".into(),
        pid: 2_147_483_000,
        ranges: vec![],
    };
    match ask(&missing.encode().expect("encode")) {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("no process"), "{}", e.message);
        }
        other => panic!("unexpected {other:?}"),
    }
    let mut garbage = vec![0u8; HEADER_LEN];
    garbage[..4].copy_from_slice(b"GET ");
    match ask(&garbage) {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::BadFrame),
        other => panic!("unexpected {other:?}"),
    }
    match ask(&req.encode().expect("encode")) {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::AlreadyExists),
        other => panic!("unexpected {other:?}"),
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("saved pid"), "{text}");
}

#[test]
fn memtest_bench_reports_both_pauses() {
    need_root!("memtest_bench_reports_both_pauses");
    let fake = FakeVmm::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(
        MEMTEST,
        &fake,
        &[
            "bench",
            "--sizes",
            "4,8",
            "--json",
            "--dir",
            dir.path().to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["mib"], 8);
    assert_eq!(lines[1]["copy_bytes"], 8 << 20);
    assert!(lines[1]["save_pause_us"].as_u64().expect("save") > 0);
    // Bench snapshots are deleted again.
    assert!(fake.state().snaps.is_empty());
}

/// Host numbers for docs/agent.md (not the guest measurement): run with
/// `cargo test -p guest-agent --test agent_cli host_bench -- --ignored --nocapture`.
/// The fake service reads every page through /proc/PID/mem, so its round trip is not
/// what the VMM costs; the freeze and thaw phases are real.
#[test]
#[ignore]
fn host_bench() {
    need_root!("host_bench");
    let fake = FakeVmm::start();
    for freeze in ["sigstop", "cgroup-v1", "cgroup-v2"] {
        let o = run(
            MEMTEST,
            &fake,
            &[
                "bench", "--sizes", "16,64", "--dir", "/dev/shm", "--freeze", freeze,
            ],
        );
        assert!(o.status.success());
    }
}

#[test]
fn dry_runs_need_no_vmm() {
    need_root!("dry_runs_need_no_vmm");
    let fake = FakeVmm::start();
    let h = Hold::start(2, 4);
    let o = run(
        AGENT,
        &fake,
        &[
            "save",
            "--dry-run",
            "--pid",
            &h.pid.to_string(),
            "--range",
            &h.range_arg(),
            "--name",
            "d",
            "--freeze",
            "sigstop",
        ],
    );
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("dry run: would save d from pid"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("512 pages"));
    assert!(
        fake.state().seen.is_empty(),
        "the service was not contacted"
    );
    assert!(!guest_agent::freeze::is_stopped(h.pid));
    let o = run(
        AGENT,
        &fake,
        &[
            "restore",
            "--dry-run",
            "--pid",
            &h.pid.to_string(),
            "--range",
            &h.range_arg(),
            "--name",
            "d",
        ],
    );
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("dry run: would restore d into pid"));
    assert!(
        fake.state().seen.is_empty(),
        "the service was not contacted"
    );
    // Touching the targets left their content alone.
    let v = Command::new(MEMTEST)
        .args([
            "verify",
            "--pid",
            &h.pid.to_string(),
            "--mib",
            "2",
            "--seed",
            "4",
            "--addr",
        ])
        .arg(format!("{:#x}", h.range.start))
        .output()
        .expect("verify");
    assert!(v.status.success(), "{}", stdout(&v));
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Command::new(MEMTEST)
        .args([
            "--transport",
            "unix:/nonexistent",
            "bench",
            "--dry-run",
            "--sizes",
            "2",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("bench");
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("bench: 2 MiB resident: save pause"));
    let o = Command::new(MEMTEST)
        .args([
            "--transport",
            "unix:/nonexistent",
            "lib-dry-run",
            "--mib",
            "2",
            "--pin",
            "none",
        ])
        .output()
        .expect("lib-dry-run");
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).starts_with("memtest: ok lib-dry-run 2 MiB (locked false)"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("save 512 pages"));
    assert!(stdout(&o).contains("fresh buffer (512 pages)"));
}

/// Run `cmd` as uid 65534 through `pmsnap-memtest as-uid`, with the agent's socket at
/// `app`.
fn as_nobody(app: &std::path::Path, cmd: &[&str]) -> Output {
    let out = Command::new(MEMTEST)
        .args(["as-uid", "65534"])
        .args(cmd)
        .env("PMSNAP_AGENT_SOCK", app)
        .output()
        .expect("run as uid 65534");
    eprintln!(
        "$ (uid 65534) {}\n{}{}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_agent_decides_what_an_unprivileged_user_may_do() {
    need_root!("the_agent_decides_what_an_unprivileged_user_may_do");
    let fake = FakeVmm::start();
    // uid 65534 must reach the socket: the temporary directory is root's 0700.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(fake.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let app = fake.dir.path().join("app.sock");
    let mut agent = Command::new(AGENT)
        .args(["--transport", &fake.endpoint(), "serve", "--listen-unix"])
        .arg(fake.dir.path().join("vsock.sock"))
        .arg("--log")
        .arg(fake.dir.path().join("agent.log"))
        .arg("--app-socket")
        .arg(&app)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    for _ in 0..500 {
        if app.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // A root process: uid 65534 may neither save it nor restore into it.
    let h = Hold::start(1, 2);
    let pid = h.pid.to_string();
    let range = h.range_arg();
    for cmd in [
        vec!["save", "--pid", &pid, "--name", "steal"],
        vec!["restore", "--name", "x", "--pid", &pid, "--range", &range],
    ] {
        let mut full = vec![AGENT];
        full.extend(cmd.iter().copied());
        let o = as_nobody(&app, &full);
        assert_eq!(o.status.code(), Some(1), "{cmd:?}");
        assert!(
            stderr(&o).contains("PermissionDenied"),
            "{cmd:?}: {}",
            stderr(&o)
        );
    }
    assert!(fake.state().seen.is_empty(), "nothing reached the VMM");
    // List and delete reach the VMM on behalf of uid 65534, never as root.
    let o = as_nobody(&app, &[AGENT, "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = as_nobody(&app, &[AGENT, "rm", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NotFound"), "{}", stderr(&o));
    {
        let st = fake.state();
        assert_eq!(st.seen, ["list", "delete"]);
        assert_eq!(st.uids, [65534, 65534]);
    }
    // Root (this test) may name another uid's snapshot: forwarded as uid 0.
    let mut s = UnixStream::connect(&app).expect("connect");
    let req = guest_agent::protocol::AppRequest::Delete {
        name: "x".into(),
        owner: Some(1000),
    };
    write_frame(&mut s, &req.encode().expect("encode")).expect("write");
    let r = Reply::decode(&read_frame(&mut s).expect("read").expect("reply")).expect("decode");
    assert!(matches!(r, Reply::Error(e) if e.code == ErrorCode::NotFound));
    assert_eq!(fake.state().uids.last(), Some(&0));
    let _ = agent.kill();
    let _ = agent.wait();
}
