//! Helpers shared by pmsnap's integration tests: locating the built binaries and the
//! default guest image, deciding whether KVM is there at all, and driving a guest's
//! serial console through the `pmsnap` process's stdin/stdout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod fidelity;

/// How long a guest may take to print `pmsnap-guest: ready`. A boot takes 15-20 s on an
/// idle development machine but several times that when the machine is busy.
pub const READY_TIMEOUT: Duration = Duration::from_secs(400);

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub use pmsnap_testenv::{kvm_unavailable, skip_or_fail};

/// When KVM is missing: fail the test under CI, return early saying why elsewhere
/// (pmsnap_testenv).
#[macro_export]
macro_rules! require_kvm {
    ($name:expr) => {
        if $crate::skip_or_fail($name, $crate::kvm_unavailable()) {
            return;
        }
    };
}

/// The image directory the tests boot: `$PMSNAP_IMAGE_DIR`, else `images/cache/test`,
/// the default image plus the test-only guest programs (`pmsnap-memtest`), which
/// images/build.sh leaves out of the default image so that it boots faster.
pub fn image_dir() -> PathBuf {
    match std::env::var("PMSNAP_IMAGE_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("images/cache/test"),
    }
}

/// The default guest image directory, as `pmsnap run` resolves it:
/// `$PMSNAP_IMAGE_DIR`, else `images/cache/default`.
pub fn default_image_dir() -> PathBuf {
    match std::env::var("PMSNAP_IMAGE_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("images/cache/default"),
    }
}

/// The test image's kernel and initrd (see [`image_dir`]); panics with the way to build
/// them when missing (the image is part of the project, so a missing one is a failure,
/// not a skip).
pub fn image() -> (PathBuf, PathBuf) {
    let d = image_dir();
    let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio"));
    assert!(
        k.is_file() && i.is_file(),
        "guest image missing in {}: run images/build.sh (or set PMSNAP_IMAGE_DIR)",
        d.display()
    );
    (k, i)
}

/// Path of the `pmsnap` binary, built on first use with the same profile as this test
/// (`cargo test -p pmsnap-tests` does not build other packages' binaries).
pub fn pmsnap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("PMSNAP_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<test-binary>, or target/<profile>/<bin> for a tool.
        let exe = std::env::current_exe().expect("current exe");
        let mut profile_dir = exe.parent().expect("exe has a directory").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "vmm", "--bin", "pmsnap"])
            .current_dir(workspace_root());
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for pmsnap");
        assert!(status.success(), "building pmsnap failed");
        let bin = profile_dir.join("pmsnap");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// Output of a finished `pmsnap` run.
#[derive(Debug)]
pub struct RunOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout (the guest console).
    pub stdout: String,
    /// Stderr (VMM log and errors).
    pub stderr: String,
    /// The process id it ran as.
    pub pid: u32,
}

impl RunOutput {
    /// Assert that the run failed with exactly one error line containing `needle`
    /// (and no panic); returns that line.
    pub fn expect_error(&self, needle: &str) -> String {
        assert!(
            !self.status.success(),
            "expected failure, got {:?}; stderr: {}",
            self.status,
            self.stderr
        );
        assert_eq!(self.status.code(), Some(1), "stderr: {}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("pmsnap: error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected: {}", self.stderr);
        assert!(
            errors[0].contains(needle),
            "{:?} not in {:?}",
            needle,
            errors[0]
        );
        errors[0].to_string()
    }
}

/// Every `pmsnap` a test starts runs with this unless the test sets it otherwise:
/// `pmsnap run` neither starts from nor keeps a ready template (a guest started from one
/// does not print its ready line, which most tests wait for).
pub const NO_TEMPLATE: (&str, &str) = ("PMSNAP_NO_TEMPLATE", "1");

/// Run `pmsnap <args>` to completion with stdin closed.
pub fn run_pmsnap(args: &[&str], env: &[(&str, &str)]) -> RunOutput {
    let child = Command::new(pmsnap_bin())
        .args(args)
        // Guests boot unless a test asks for templates (see `NO_TEMPLATE`).
        .env(NO_TEMPLATE.0, NO_TEMPLATE.1)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pmsnap");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for pmsnap");
    RunOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        pid,
    }
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    closed: bool,
}

/// A running `pmsnap run` whose console is driven through pipes. Dropping it kills the
/// VMM (SIGTERM, so it removes its pool; SIGKILL if it does not exit).
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<(Mutex<Captured>, Condvar)>,
    stderr: Arc<(Mutex<Captured>, Condvar)>,
    /// When the process was started.
    pub started: Instant,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("pid", &self.child.id())
            .finish()
    }
}

fn pump(mut r: impl Read + Send + 'static, sink: Arc<(Mutex<Captured>, Condvar)>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = r.read(&mut buf).unwrap_or(0);
            let (m, cv) = &*sink;
            let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
            if n == 0 {
                c.closed = true;
                cv.notify_all();
                return;
            }
            c.bytes.extend_from_slice(&buf[..n]);
            cv.notify_all();
        }
    });
}

/// Wait until `check` finds what it looks for in the captured output (checked again each
/// time more arrives); None on timeout or when the stream closed.
fn wait_on<T>(
    sink: &(Mutex<Captured>, Condvar),
    timeout: Duration,
    check: impl Fn(&Captured) -> Option<T>,
) -> Option<T> {
    let (m, cv) = sink;
    let deadline = Instant::now() + timeout;
    let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(v) = check(&c) {
            return Some(v);
        }
        let now = Instant::now();
        if c.closed || now >= deadline {
            return None;
        }
        c = cv
            .wait_timeout(c, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

impl Guest {
    /// Start `pmsnap <args>` with piped stdin/stdout/stderr.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(pmsnap_bin())
            .args(args)
            .env(NO_TEMPLATE.0, NO_TEMPLATE.1)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pmsnap");
        let out = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let stderr = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        pump(child.stdout.take().expect("piped stdout"), out.clone());
        pump(child.stderr.take().expect("piped stderr"), stderr.clone());
        Self {
            stdin: child.stdin.take(),
            child,
            out,
            stderr,
            started: Instant::now(),
        }
    }

    /// Console output so far.
    pub fn output(&self) -> String {
        let c = self.out.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&c.bytes).into_owned()
    }

    /// VMM stderr so far.
    pub fn stderr(&self) -> String {
        let c = self.stderr.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&c.bytes).into_owned()
    }

    /// Wait until the console output after byte `from` satisfies `pred`; returns the
    /// output length at that point, or None on timeout or when the VMM closed stdout.
    pub fn wait_until(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<usize> {
        wait_on(&self.out, timeout, |c| {
            let text = String::from_utf8_lossy(&c.bytes[from.min(c.bytes.len())..]);
            pred(&text).then_some(c.bytes.len())
        })
    }

    /// Wait for `needle` in the console output after byte `from`.
    pub fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> Option<usize> {
        self.wait_until(from, timeout, |t| t.contains(needle))
    }

    /// Wait until the VMM's log (stderr) satisfies `pred`; returns the log at that point,
    /// or None on timeout or when the VMM closed stderr.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        wait_on(&self.stderr, timeout, |c| {
            let text = String::from_utf8_lossy(&c.bytes).into_owned();
            pred(&text).then_some(text)
        })
    }

    /// Current length of the console output.
    pub fn output_len(&self) -> usize {
        self.out
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
            .len()
    }

    /// Type `line` and Enter on the console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the console");
        stdin.flush().expect("flush the console");
    }

    /// Close the console input (EOF on the VMM's stdin).
    /// Type `cmd` on the guest shell and wait for it to finish: returns what it printed
    /// (the console lines after the echoed command) and its exit status, or `None` on
    /// timeout.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Option<(String, i32)> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The marker is joined by the shell ("rc" "N-"), so the echoed command line (which
        // the console may also wrap anywhere) never contains it.
        let tag = format!("rc{n}-");
        let from = self.output_len();
        self.send_line(&format!("{cmd}; echo \"rc\"\"{n}-$?-end\""));
        let done = |t: &str| {
            t.lines()
                .any(|l| l.trim_start().starts_with(&tag) && l.trim_end().ends_with("-end"))
        };
        self.wait_until(from, timeout, done)?;
        let out = self.output();
        let text = &out[from.min(out.len())..];
        let mut lines = text.lines().skip(1); // the echoed command
        let mut printed = String::new();
        for l in lines.by_ref() {
            let l = l.trim_start();
            if let Some(rest) = l.strip_prefix(&tag) {
                let rc = rest
                    .trim_end()
                    .trim_end_matches("-end")
                    .parse()
                    .unwrap_or(-1);
                return Some((printed, rc));
            }
            printed.push_str(l);
            printed.push('\n');
        }
        None
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Until the shell answers: type a command whose output differs from its echo
    /// until that output appears (input typed while the shell starts can be lost).
    pub fn sync_shell(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let from = self.output_len();
            self.send_line("echo shell-$((40+2))");
            if self
                .wait_for(from, "shell-42", Duration::from_secs(10))
                .is_some()
            {
                return true;
            }
        }
        false
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A path as `&str` for a command line (test paths are always UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `pmsnap ctl --api-sock SOCK ARGS... --json`, which must succeed; its JSON answer.
pub fn ctl_json(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["ctl", "--api-sock", s(sock), "--json"];
    full.extend_from_slice(args);
    let out = run_pmsnap(&full, &[]);
    assert!(out.status.success(), "pmsnap {full:?}: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("ctl --json prints JSON")
}

/// Guest RAM of the ready template (and of every guest started from it).
pub const TEMPLATE_MEM: &str = "256M";
/// vCPUs of the ready template.
pub const TEMPLATE_VCPUS: &str = "2";

/// The cargo target directory this test runs from (`target/<profile>/deps/<test>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe has a directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.pop(); // the profile directory
    dir
}

/// Where the ready template lives: `target/pmsnap-test-cache/`.
pub fn test_cache_dir() -> PathBuf {
    target_dir().join("pmsnap-test-cache")
}

/// The repository of the suite's ready templates, `target/pmsnap-test-cache/templates`:
/// the suite starts its guests the way users do, through `pmsnap run`'s templates
/// (`--template-dir`), not through a mechanism of its own.
pub fn template_repo() -> PathBuf {
    test_cache_dir().join("templates")
}

/// An exclusive flock on a file, released on drop (also when the process dies).
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a valid fd owned by `f`; no memory is passed.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Self(f);
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "flock: {e}");
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking our own valid fd; closing it would release the lock anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// A file removed on drop (for a pool, its `.filling` marker too, left when a lazily
/// restored pool did not finish filling).
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let mut marker = self.0.clone().into_os_string();
        marker.push(".filling");
        let _ = std::fs::remove_file(marker);
    }
}

/// The suite's ready template: the VM snapshot `pmsnap run` keeps in [`template_repo`]
/// for the standard test configuration ([`TEMPLATE_MEM`], [`TEMPLATE_VCPUS`], a vsock
/// device, the test image).
#[derive(Debug, Clone)]
pub struct ReadyTemplate {
    /// The repository.
    pub repo: PathBuf,
    /// The snapshot's name there (`ready-<key>`, the key chosen by `pmsnap run`).
    pub name: String,
}

static TEMPLATE: OnceLock<ReadyTemplate> = OnceLock::new();

/// A guest started by `pmsnap run` of the standard test configuration, before it is
/// known to answer. Fields drop in order: the VMM stops before its pool is removed.
#[derive(Debug)]
pub struct ReadyGuest {
    /// The running `pmsnap run` (a lazy restore of the template).
    pub guest: Guest,
    /// Its pool in /dev/shm, removed on drop.
    pub pool: RemoveOnDrop,
    /// Control API socket.
    pub api: PathBuf,
    /// Host socket of the vsock device.
    pub vsock: PathBuf,
    /// Directory of the sockets.
    pub dir: tempfile::TempDir,
}

/// A new pool path in /dev/shm for this test process (removed on drop).
fn fresh_pool() -> RemoveOnDrop {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    remove_stale_copies();
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pool = PathBuf::from(format!(
        "/dev/shm/pmsnap-test-{}-{n}.pool",
        std::process::id()
    ));
    let rm = RemoveOnDrop(pool);
    let _ = std::fs::remove_file(&rm.0);
    rm
}

/// The quoted name after `phrase` in `log`, if the phrase is there.
fn quoted_after(log: &str, phrase: &str) -> Option<String> {
    let rest = &log[log.find(phrase)? + phrase.len()..];
    let rest = rest.trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

const FROM_TEMPLATE: &str = "starting from the ready template";
const KEPT_TEMPLATE: &str = "kept the guest's ready state as template";

/// `pmsnap run` of the standard test configuration with templates in [`template_repo`]:
/// returns the guest, the template's name and whether it booted (and so kept a new
/// template) rather than starting from one.
fn standard_run(env: &[(&str, &str)]) -> (ReadyGuest, String, bool) {
    let (kernel, initrd) = image();
    let repo = template_repo();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let pool = fresh_pool();
    let mut all_env = vec![
        ("RUST_LOG", "info"),
        ("PMSNAP_NO_TEMPLATE", "false"),
        ("PMSNAP_TEMPLATE_DIR", s(&repo)),
    ];
    all_env.extend_from_slice(env);
    let guest = Guest::spawn(
        &[
            "run",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--mem",
            TEMPLATE_MEM,
            "--vcpus",
            TEMPLATE_VCPUS,
            "--pool",
            s(&pool.0),
            "--api-sock",
            s(&api),
            "--vsock-sock",
            s(&vsock),
        ],
        &all_env,
    );
    // A start from the template says so at once; a boot keeps the template at the
    // guest's ready line.
    let log = guest.wait_log(READY_TIMEOUT + Duration::from_secs(120), |l| {
        l.contains(FROM_TEMPLATE) || l.contains(KEPT_TEMPLATE) || l.contains("cannot keep")
    });
    let found = log.as_deref().and_then(|l| {
        quoted_after(l, FROM_TEMPLATE)
            .map(|n| (n, false))
            .or_else(|| quoted_after(l, KEPT_TEMPLATE).map(|n| (n, true)))
    });
    let Some((name, cold)) = found else {
        panic!(
            "`pmsnap run` neither started from a template nor kept one; console:\n{}\nstderr:\n{}",
            guest.output(),
            guest.stderr()
        );
    };
    let rg = ReadyGuest {
        guest,
        pool,
        api,
        vsock,
        dir,
    };
    (rg, name, cold)
}

/// Remove the templates of older images and binaries from [`template_repo`] (each new
/// build of `pmsnap` keys a new one) and collect what only they used.
fn prune_templates(keep: &str) {
    let repo = template_repo();
    let out = run_pmsnap(&["repo", "ls", s(&repo), "--json"], &[]);
    assert!(out.status.success(), "repo ls: {}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("repo ls --json");
    let list = v
        .as_array()
        .or_else(|| v["snapshots"].as_array())
        .cloned()
        .unwrap_or_default();
    for snap in list {
        let Some(name) = snap["name"].as_str() else {
            continue;
        };
        if name.starts_with("ready-") && name != keep {
            let out = run_pmsnap(&["repo", "rm", s(&repo), name], &[]);
            assert!(out.status.success(), "repo rm {name}: {}", out.stderr);
        }
    }
    // Unreferenced packs go at a later run, a grace period after this one.
    let out = run_pmsnap(&["repo", "gc", s(&repo)], &[]);
    assert!(out.status.success(), "repo gc: {}", out.stderr);
}

/// A `pmsnap run` of the standard test configuration that started from the ready
/// template. The first caller on a machine (across test processes, under a lock in
/// [`test_cache_dir`]) boots instead, which keeps the template, and starts again.
fn run_from_template(env: &[(&str, &str)]) -> ReadyGuest {
    let cache = test_cache_dir();
    std::fs::create_dir_all(&cache).expect("create the test cache directory");
    let lock = FileLock::take(&cache.join("template.lock"));
    let (mut rg, mut name, cold) = standard_run(env);
    if cold {
        eprintln!(
            "ready template {name} kept in {} by a boot of {:?}",
            template_repo().display(),
            rg.guest.started.elapsed()
        );
        drop(rg);
        prune_templates(&name);
        (rg, name, _) = standard_run(env);
        assert!(
            rg.guest.stderr().contains(FROM_TEMPLATE),
            "the run after the boot did not start from the template it kept:\n{}",
            rg.guest.stderr()
        );
    }
    drop(lock);
    let _ = TEMPLATE.set(ReadyTemplate {
        repo: template_repo(),
        name: std::mem::take(&mut name),
    });
    rg
}

/// The suite's ready template, made by a boot on first use (see [`ready_guest`]).
pub fn ready_template() -> ReadyTemplate {
    if TEMPLATE.get().is_none() {
        drop(run_from_template(&[]));
    }
    TEMPLATE.get().expect("template known").clone()
}

/// Remove pool copies in /dev/shm left by test processes that died before their drop
/// ran (each holds a whole guest's RAM).
fn remove_stale_copies() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("pmsnap-test-template-")
            .or_else(|| name.strip_prefix("pmsnap-test-"))
        else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !Path::new("/proc").join(&pid).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A new pool in /dev/shm holding the ready template as a pool snapshot (`pmsnap
/// import` from [`template_repo`]), removed on drop: for tests that look into the pool
/// before a VMM takes its lock ([`ready_guest_in`] starts one on it).
pub fn ready_pool_copy() -> RemoveOnDrop {
    let t = ready_template();
    let pool = fresh_pool();
    let out = run_pmsnap(
        &[
            "import",
            &t.name,
            "--from",
            s(&t.repo),
            "--pool",
            s(&pool.0),
        ],
        &[],
    );
    assert!(out.status.success(), "import the template: {}", out.stderr);
    pool
}

/// The arguments of `pmsnap restore` for `snapshot` of `pool` with these sockets.
pub fn restore_args<'a>(
    pool: &'a Path,
    snapshot: &'a str,
    api: &'a Path,
    vsock: &'a Path,
) -> Vec<&'a str> {
    vec![
        "restore",
        "--pool",
        s(pool),
        "--snapshot",
        snapshot,
        "--api-sock",
        s(api),
        "--vsock-sock",
        s(vsock),
    ]
}

/// Until the console's shell answers and, for a lazily restored guest, every page of its
/// RAM is in place (a test may stop the VMM and restore the pool).
fn wait_ready(rg: &mut ReadyGuest, t0: Instant, how: &str) {
    assert!(
        rg.guest.sync_shell(Duration::from_secs(300)),
        "{how}: the shell does not answer; console:\n{}\nstderr:\n{}",
        rg.guest.output(),
        rg.guest.stderr()
    );
    assert!(
        rg.api.exists(),
        "no API socket; stderr:\n{}",
        rg.guest.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = ctl_json(&rg.api, &["status"]);
        let fill = &st["lazy_fill"];
        if fill.is_null() || fill["complete"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{how}: guest RAM not filled in 120 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{how}: shell answers after {:?}", t0.elapsed());
}

/// A guest of the standard test configuration, started by `pmsnap run` from the ready
/// template as a user's second run of an image is (a lazy restore, no boot), whose shell
/// answers and whose RAM is all in place. Dropping it stops the VMM, then removes the
/// pool and the sockets. `env` is added to the VMM's environment.
pub fn ready_guest(env: &[(&str, &str)]) -> ReadyGuest {
    let t0 = Instant::now();
    let mut rg = run_from_template(env);
    wait_ready(&mut rg, t0, "guest started from the ready template");
    rg
}

/// `pmsnap restore` of the ready template's snapshot in `pool` (made with
/// [`ready_pool_copy`]), for tests that look at the pool before the VMM takes its lock.
pub fn ready_guest_in(pool: RemoveOnDrop, env: &[(&str, &str)]) -> ReadyGuest {
    let t = ready_template();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let t0 = Instant::now();
    let guest = Guest::spawn(&restore_args(&pool.0, &t.name, &api, &vsock), env);
    let mut rg = ReadyGuest {
        guest,
        pool,
        api,
        vsock,
        dir,
    };
    wait_ready(&mut rg, t0, "guest restored from the imported template");
    rg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_lock_excludes_a_second_holder_until_dropped() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("lock");
        let first = FileLock::take(&path);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            let _second = FileLock::take(&p);
            tx.send(()).expect("send");
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "second lock taken while the first is held"
        );
        drop(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("second lock taken after the first is dropped");
        t.join().expect("join");
    }
}
