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
        let (m, cv) = &*self.out;
        let deadline = Instant::now() + timeout;
        let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let text = String::from_utf8_lossy(&c.bytes[from.min(c.bytes.len())..]).into_owned();
            if pred(&text) {
                return Some(c.bytes.len());
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

    /// Wait for `needle` in the console output after byte `from`.
    pub fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> Option<usize> {
        self.wait_until(from, timeout, |t| t.contains(needle))
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

/// Guest RAM of the ready template (and of every guest restored from it).
pub const TEMPLATE_MEM: &str = "256M";
/// vCPUs of the ready template.
pub const TEMPLATE_VCPUS: &str = "2";
/// Name of the VM snapshot in the template pool.
pub const TEMPLATE_SNAPSHOT: &str = "ready";
/// What the template is made of besides the image and the VMM binary: bump when the
/// way it is made changes, so older templates are not used.
const TEMPLATE_RECIPE: &str = "ready-v1: run --mem 256M --vcpus 2 --vsock-sock; ready line; shell; snapshot-vm ready; SIGKILL";

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

/// Key of the template: sha256 of the kernel, the initrd, the `pmsnap` binary and the
/// recipe, so a change to any of them makes a new template.
fn template_key(kernel: &Path, initrd: &Path, bin: &Path) -> String {
    let out = Command::new("sha256sum")
        .args([kernel, initrd, bin])
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum failed: {out:?}");
    let sums: String = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (sums, TEMPLATE_RECIPE).hash(&mut h);
    format!("{:016x}", h.finish())
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

/// A file removed on drop.
#[derive(Debug)]
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Sparse-aware copy (`cp --sparse=always`): a pool is mostly holes, and /dev/shm is
/// tmpfs, where a plain copy would allocate every page.
pub fn copy_sparse(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "cp {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Boot the default image with the standard test configuration, wait for the ready line
/// and a shell answer, take VM snapshot `ready`, SIGKILL the VMM (the snapshot survives
/// in the pool) and copy the pool to `dest`.
fn make_template(kernel: &Path, initrd: &Path, dest: &Path) {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let pool = PathBuf::from(format!(
        "/dev/shm/pmsnap-test-template-{}.pool",
        std::process::id()
    ));
    let _rm = RemoveOnDrop(pool.clone());
    let _ = std::fs::remove_file(&pool);
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let mut g = Guest::spawn(
        &[
            "run",
            "--kernel",
            s(kernel),
            "--initrd",
            s(initrd),
            "--mem",
            TEMPLATE_MEM,
            "--vcpus",
            TEMPLATE_VCPUS,
            "--pool",
            s(&pool),
            "--api-sock",
            s(&api),
            "--vsock-sock",
            s(&vsock),
        ],
        &[],
    );
    assert!(
        g.wait_for(0, "pmsnap-guest: ready", READY_TIMEOUT)
            .is_some(),
        "template guest not ready; console:\n{}\nstderr:\n{}",
        g.output(),
        g.stderr()
    );
    assert!(
        g.sync_shell(Duration::from_secs(300)),
        "template guest's shell does not answer:\n{}",
        g.output()
    );
    let snap = ctl_json(&api, &["snapshot-vm", TEMPLATE_SNAPSHOT]);
    assert_eq!(snap["name"], TEMPLATE_SNAPSHOT, "{snap}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(g.pid() as i32, libc::SIGKILL) }, 0);
    assert!(
        g.wait_exit(Duration::from_secs(30)).is_some(),
        "VMM survived SIGKILL"
    );
    let tmp = dest.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    copy_sparse(&pool, &tmp);
    std::fs::rename(&tmp, dest).expect("rename the template into place");
    eprintln!(
        "ready template {} made in {:?}",
        dest.display(),
        t0.elapsed()
    );
}

/// The pool of the ready template: a guest of the standard test configuration
/// ([`TEMPLATE_MEM`], [`TEMPLATE_VCPUS`], a vsock device) snapshotted as
/// [`TEMPLATE_SNAPSHOT`] once its shell answered. Made by the first caller (across test
/// processes, under a lock in [`test_cache_dir`]) and kept until the image or the
/// `pmsnap` binary changes. Copy it before use ([`ready_guest`] does).
pub fn ready_template() -> PathBuf {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let (kernel, initrd) = image();
            let bin = pmsnap_bin();
            let cache = test_cache_dir();
            std::fs::create_dir_all(&cache).expect("create the test cache directory");
            let key = template_key(&kernel, &initrd, &bin);
            let path = cache.join(format!("ready-{key}.pool"));
            let _lock = FileLock::take(&cache.join("template.lock"));
            if !path.is_file() {
                // Templates of older images or binaries are no use any more.
                for e in std::fs::read_dir(&cache)
                    .expect("list the test cache")
                    .flatten()
                {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with("ready-") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
                make_template(&kernel, &initrd, &path);
            }
            path
        })
        .clone()
}

/// A guest restored from a copy of the ready template, whose shell answers. Dropping it
/// stops the VMM, then removes the pool copy and the sockets.
#[derive(Debug)]
pub struct ReadyGuest {
    /// The running `pmsnap restore`.
    pub guest: Guest,
    /// Its pool (a copy of the template in /dev/shm), removed on drop.
    pub pool: RemoveOnDrop,
    /// Control API socket.
    pub api: PathBuf,
    /// Host socket of the vsock device.
    pub vsock: PathBuf,
    /// Directory of the sockets.
    pub dir: tempfile::TempDir,
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

/// A fresh copy of the ready template at a new path in /dev/shm (removed on drop).
pub fn ready_pool_copy() -> RemoveOnDrop {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let template = ready_template();
    remove_stale_copies();
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pool = PathBuf::from(format!(
        "/dev/shm/pmsnap-test-{}-{n}.pool",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&pool);
    let rm = RemoveOnDrop(pool);
    copy_sparse(&template, &rm.0);
    rm
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

/// Start a guest from a copy of the ready template instead of booting one: `pmsnap
/// restore` of [`TEMPLATE_SNAPSHOT`], then wait until its (fresh) console's shell answers
/// and its control API listens.
pub fn ready_guest(env: &[(&str, &str)]) -> ReadyGuest {
    ready_guest_in(ready_pool_copy(), env)
}

/// [`ready_guest`] on a given copy of the template (made with [`ready_pool_copy`]), for
/// tests that look at the pool before the VMM takes its lock.
pub fn ready_guest_in(pool: RemoveOnDrop, env: &[(&str, &str)]) -> ReadyGuest {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    let vsock = dir.path().join("v.sock");
    let t0 = Instant::now();
    let mut guest = Guest::spawn(&restore_args(&pool.0, TEMPLATE_SNAPSHOT, &api, &vsock), env);
    assert!(
        guest.sync_shell(Duration::from_secs(300)),
        "restored guest's shell does not answer; console:\n{}\nstderr:\n{}",
        guest.output(),
        guest.stderr()
    );
    assert!(api.exists(), "no API socket; stderr:\n{}", guest.stderr());
    eprintln!(
        "guest restored from the ready template, shell after {:?}",
        t0.elapsed()
    );
    ReadyGuest {
        guest,
        pool,
        api,
        vsock,
        dir,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn template_key_follows_every_input() {
        let d = tempfile::tempdir().expect("tempdir");
        let (k, i, b) = (d.path().join("k"), d.path().join("i"), d.path().join("b"));
        for (p, c) in [(&k, "kernel"), (&i, "initrd"), (&b, "bin")] {
            std::fs::write(p, c).expect("write");
        }
        let key = template_key(&k, &i, &b);
        assert_eq!(key, template_key(&k, &i, &b), "stable");
        for p in [&k, &i, &b] {
            let old = std::fs::read(p).expect("read");
            std::fs::write(p, b"changed").expect("write");
            assert_ne!(template_key(&k, &i, &b), key, "{}", p.display());
            std::fs::write(p, old).expect("write");
        }
        assert_eq!(template_key(&k, &i, &b), key);
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let d = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let f = std::fs::File::create(&a).expect("create");
        f.set_len(64 << 20).expect("set_len");
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"data at 1 MiB", 1 << 20).expect("write");
        drop(f);
        copy_sparse(&a, &b);
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        let blocks = std::fs::metadata(&b).expect("stat").blocks();
        assert!(blocks * 512 < 1 << 20, "copy is sparse: {blocks} blocks");
    }

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
