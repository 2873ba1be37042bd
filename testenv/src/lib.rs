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
}
