//! Helpers shared by the vmm crate's KVM integration tests (each test binary includes
//! this module with `mod common;` and uses what it needs).
#![allow(dead_code)]

pub mod pattern;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vmm::api::client::ApiClient;

/// When KVM is missing: fails the test under CI, and elsewhere returns true after
/// printing why the test does not run (pmsnap_testenv).
pub fn kvm_missing(name: &str) -> bool {
    pmsnap_testenv::skip_or_fail(name, pmsnap_testenv::kvm_unavailable())
}

/// Assemble the pattern payload (tests/payload/pattern.S) with GNU as + objcopy into
/// `dir`; returns the flat binary for `pmsnap run --payload`.
pub fn payload(dir: &Path) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payload/pattern.S");
    let (obj, bin) = (dir.join("p.o"), dir.join("p.bin"));
    let ok = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(src)
        .status()
        .expect("run GNU as")
        .success();
    assert!(ok, "GNU as failed on {src}");
    let ok = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .expect("run objcopy")
        .success();
    assert!(ok, "objcopy failed");
    bin
}

/// The `pmsnap` binary under test; `PMSNAP_BIN` picks another build (e.g. a release one).
pub fn pmsnap_bin() -> PathBuf {
    std::env::var_os("PMSNAP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pmsnap")))
}

/// A `pmsnap` VMM process started by a test, with its control API; its stderr goes to a
/// file in the test's directory. Dropping it kills the process if it still runs.
pub struct ApiVmm {
    /// The process.
    pub child: Child,
    /// Client of its control API.
    pub api: ApiClient,
    /// File holding its stderr (the log).
    pub stderr: PathBuf,
}

impl ApiVmm {
    /// Start `pmsnap <args> --api-sock DIR/TAG.sock` and wait until its API answers with
    /// the VM's vCPUs. An early exit or no API within 60 s is an error carrying the end of
    /// the VMM's log.
    pub fn spawn(
        dir: &Path,
        tag: &str,
        args: impl IntoIterator<Item = impl AsRef<OsStr>>,
    ) -> Result<Self, String> {
        Self::spawn_env(dir, tag, args, &[])
    }

    /// [`ApiVmm::spawn`] with these environment variables added.
    pub fn spawn_env(
        dir: &Path,
        tag: &str,
        args: impl IntoIterator<Item = impl AsRef<OsStr>>,
        env: &[(String, String)],
    ) -> Result<Self, String> {
        let sock = dir.join(format!("{tag}.sock"));
        let _ = std::fs::remove_file(&sock);
        let stderr = dir.join(format!("{tag}.stderr"));
        let child = Command::new(pmsnap_bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn pmsnap");
        let mut vmm = Self {
            child,
            api: ApiClient::new(&sock),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(sock.exists() && vmm.api.status().is_ok_and(|s| s.vcpus > 0)) {
            if let Ok(Some(st)) = vmm.child.try_wait() {
                return Err(format!("pmsnap exited early ({st}): {}", vmm.log_tail(12)));
            }
            if Instant::now() > deadline {
                return Err(format!("no API after 60 s: {}", vmm.log_tail(12)));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(vmm)
    }

    /// `pmsnap run --mem MEM --vcpus 2 EXTRA... --payload BIN --pool POOL` (the pattern
    /// payload, assembled into `dir`), started as [`ApiVmm::spawn`] does; panics if it
    /// does not come up.
    pub fn spawn_payload(dir: &Path, tag: &str, pool: &Path, mem: &str, extra: &[&str]) -> Self {
        Self::spawn_payload_env(dir, tag, pool, mem, extra, &[])
    }

    /// [`ApiVmm::spawn_payload`] with these environment variables added.
    pub fn spawn_payload_env(
        dir: &Path,
        tag: &str,
        pool: &Path,
        mem: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let bin = payload(dir);
        let base = ["run", "--mem", mem, "--vcpus", "2"];
        let args = base
            .iter()
            .chain(extra)
            .map(std::ffi::OsString::from)
            .chain(["--payload".into(), bin.into(), "--pool".into(), pool.into()]);
        Self::spawn_env(dir, tag, args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The VMM's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last `lines` lines of the VMM's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Send `sig` to the VMM.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not reaped yet, so the pid is still its own.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait up to `timeout` for the VMM to end.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return Ok(st);
            }
            if Instant::now() > deadline {
                return Err(format!("pmsnap still running after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Damage repository directory `repo`: flip one byte in the middle of its largest pack.
/// Returns the pack's id (its file name).
pub fn damage_largest_pack(repo: &Path) -> String {
    let pack = std::fs::read_dir(repo.join("packs"))
        .expect("packs")
        .map(|e| e.expect("entry").path())
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a pack");
    let mut bytes = std::fs::read(&pack).expect("read pack");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&pack, &bytes).expect("write pack");
    pack.file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string()
}
