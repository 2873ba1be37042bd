//! Freezing a process while the agent reads its page map and the VMM protects the
//! pages: the cgroup freezer (v1 `freezer.state` or v2 `cgroup.freeze`) when a
//! hierarchy is mounted, otherwise `SIGSTOP`/`SIGCONT`.
//!
//! [`FreezeGuard`] thaws on drop, so every error path after a successful freeze thaws
//! the process. The cgroup methods move the process into a private child cgroup
//! (`pmsnap-<pid>`), freeze that, and on thaw move it back to where it was and remove
//! the child. The cgroup freezer is invisible to the process; `SIGSTOP` is not (its
//! parent may see a stop notification), which is why it is only the fallback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a process to reach the frozen or stopped state.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting.
const POLL: Duration = Duration::from_millis(1);

/// Errors of freezing and thawing.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The process does not exist.
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// The agent would freeze itself.
    #[error("refusing to freeze the agent's own process {0}")]
    SelfFreeze(u32),
    /// A cgroup file operation failed.
    #[error("cgroup freezer: {what} {path}: {source}")]
    Cgroup {
        /// Operation.
        what: &'static str,
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Sending a signal failed.
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        /// Signal name.
        signal: &'static str,
        /// Target.
        pid: u32,
        /// Cause.
        source: std::io::Error,
    },
    /// The process did not reach the frozen state in time.
    #[error("pid {0} did not freeze within {FREEZE_TIMEOUT:?}")]
    Timeout(u32),
    /// No freezer of the requested kind is available.
    #[error("no {0} available")]
    Unavailable(&'static str),
}

/// Which freezing method to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeMethod {
    /// cgroup v1 freezer if mounted, else cgroup v2, else SIGSTOP.
    Auto,
    /// cgroup v1 `freezer` hierarchy only.
    CgroupV1,
    /// cgroup v2 `cgroup.freeze` only.
    CgroupV2,
    /// `SIGSTOP` / `SIGCONT` only.
    Signal,
}

/// The method a guard actually used (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsedMethod {
    /// cgroup v1 freezer.
    CgroupV1,
    /// cgroup v2 freezer.
    CgroupV2,
    /// SIGSTOP.
    Signal,
}

impl UsedMethod {
    /// Short name for output.
    pub fn name(self) -> &'static str {
        match self {
            UsedMethod::CgroupV1 => "cgroup-v1",
            UsedMethod::CgroupV2 => "cgroup-v2",
            UsedMethod::Signal => "sigstop",
        }
    }
}

#[derive(Debug)]
enum State {
    /// Frozen in our child cgroup; `home` is the cgroup directory to move back to.
    Cgroup {
        v2: bool,
        child: PathBuf,
        home: PathBuf,
    },
    /// Stopped with SIGSTOP by us.
    Stopped,
    /// Was already stopped: leave it stopped.
    AlreadyStopped,
    /// Thawed already.
    Done,
}

/// A frozen process; thawed when dropped (or by [`FreezeGuard::thaw`]).
#[derive(Debug)]
pub struct FreezeGuard {
    pid: u32,
    method: UsedMethod,
    state: State,
    frozen_at: Instant,
}

impl FreezeGuard {
    /// Freeze `pid` with `method`; `Auto` falls back from cgroup to SIGSTOP on any
    /// cgroup error.
    pub fn freeze(pid: u32, method: FreezeMethod) -> Result<Self, FreezeError> {
        if pid == std::process::id() {
            return Err(FreezeError::SelfFreeze(pid));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() || pid == 0 {
            return Err(FreezeError::NoProcess(pid));
        }
        match method {
            FreezeMethod::CgroupV1 => {
                let root =
                    cgroup_root(false).ok_or(FreezeError::Unavailable("cgroup v1 freezer"))?;
                freeze_cgroup(pid, &root, false)
            }
            FreezeMethod::CgroupV2 => {
                let root = cgroup_root(true).ok_or(FreezeError::Unavailable("cgroup v2"))?;
                freeze_cgroup(pid, &root, true)
            }
            FreezeMethod::Signal => freeze_signal(pid),
            FreezeMethod::Auto => {
                for v2 in [false, true] {
                    if let Some(root) = cgroup_root(v2) {
                        match freeze_cgroup(pid, &root, v2) {
                            Ok(g) => return Ok(g),
                            Err(FreezeError::NoProcess(p)) => {
                                return Err(FreezeError::NoProcess(p))
                            }
                            Err(e) => log::debug!("cgroup freeze failed, falling back: {e}"),
                        }
                    }
                }
                freeze_signal(pid)
            }
        }
    }

    /// The method used.
    pub fn method(&self) -> UsedMethod {
        self.method
    }

    /// When the freeze was requested (the pause starts here).
    pub fn frozen_at(&self) -> Instant {
        self.frozen_at
    }

    /// Thaw now and report errors (drop thaws too but can only log them). Returns the
    /// pause: from the freeze request until the process may run again. Moving the
    /// process back to its cgroup and removing ours happen after that, while it runs.
    pub fn thaw(mut self) -> Result<Duration, FreezeError> {
        let r = self.unfreeze();
        let pause = self.frozen_at.elapsed();
        let c = self.cleanup();
        r.and(c).map(|()| pause)
    }

    /// Let the process run again.
    fn unfreeze(&mut self) -> Result<(), FreezeError> {
        match &self.state {
            State::Cgroup { v2, child, .. } => {
                let (file, value) = if *v2 {
                    ("cgroup.freeze", "0")
                } else {
                    ("freezer.state", "THAWED")
                };
                write_file(&child.join(file), value, "thaw")
            }
            State::Stopped => {
                self.state = State::Done;
                send(self.pid, libc::SIGCONT, "SIGCONT")
            }
            State::AlreadyStopped | State::Done => Ok(()),
        }
    }

    /// Undo the cgroup move (after [`Self::unfreeze`]).
    fn cleanup(&mut self) -> Result<(), FreezeError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Cgroup { child, home, .. } => {
                // Move every process back even when thawing failed: rmdir needs it empty.
                let back = move_all(&child, &home);
                let _ = std::fs::remove_dir(&child);
                back
            }
            _ => Ok(()),
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Err(e) = self.unfreeze().and(self.cleanup()) {
            log::error!("thawing pid {}: {e}", self.pid);
        }
    }
}

/// Mount point of the cgroup v1 freezer hierarchy (`v2 == false`) or of cgroup2.
fn cgroup_root(v2: bool) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
        let hit = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && opts.split(',').any(|o| o == "freezer")
        };
        hit.then(|| PathBuf::from(unescape_mount(dir)))
    })
}

/// /proc/mounts escapes spaces and friends as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The process's cgroup path in the v1 freezer or the v2 hierarchy, from /proc/PID/cgroup.
fn home_cgroup(pid: u32, v2: bool) -> Result<String, FreezeError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = std::fs::read_to_string(&path).map_err(|_| FreezeError::NoProcess(pid))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, ctrls, p) = (f.next()?, f.next()?, f.next()?);
            let hit = if v2 {
                id == "0" && ctrls.is_empty()
            } else {
                ctrls.split(',').any(|c| c == "freezer")
            };
            hit.then(|| p.to_string())
        })
        .ok_or(FreezeError::Unavailable("cgroup membership"))
}

fn write_file(path: &Path, value: &str, what: &'static str) -> Result<(), FreezeError> {
    std::fs::write(path, value).map_err(|source| FreezeError::Cgroup {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Move every process of cgroup `from` into `to` (writing a pid to `cgroup.procs`
/// moves all its threads at once, in v1 and v2).
fn move_all(from: &Path, to: &Path) -> Result<(), FreezeError> {
    let list = "cgroup.procs";
    let text = std::fs::read_to_string(from.join(list)).map_err(|source| FreezeError::Cgroup {
        what: "read",
        path: from.join(list),
        source,
    })?;
    let mut result = Ok(());
    for id in text.split_whitespace() {
        if let Err(e) = write_file(&to.join(list), id, "move back") {
            // A task that exited in between is not an error.
            if !matches!(&e, FreezeError::Cgroup { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
            {
                result = Err(e);
            }
        }
    }
    result
}

fn freeze_cgroup(pid: u32, root: &Path, v2: bool) -> Result<FreezeGuard, FreezeError> {
    let home_rel = home_cgroup(pid, v2)?;
    let home = root.join(home_rel.trim_start_matches('/'));
    let child = root.join(format!("pmsnap-{pid}"));
    match std::fs::create_dir(&child) {
        Ok(()) => {}
        // A leftover from a crashed agent: reuse it (it is ours by name).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(FreezeError::Cgroup {
                what: "create",
                path: child,
                source,
            })
        }
    }
    // From here on the guard cleans up (moves the process back, removes the child).
    let mut guard = FreezeGuard {
        pid,
        method: if v2 {
            UsedMethod::CgroupV2
        } else {
            UsedMethod::CgroupV1
        },
        state: State::Cgroup {
            v2,
            child: child.clone(),
            home,
        },
        frozen_at: Instant::now(),
    };
    // cgroup.procs moves all threads of the process at once, so a thread created
    // meanwhile cannot stay behind unfrozen.
    write_file(&child.join("cgroup.procs"), &pid.to_string(), "move")?;
    guard.frozen_at = Instant::now();
    if v2 {
        write_file(&child.join("cgroup.freeze"), "1", "freeze")?;
        wait_until(pid, || {
            Ok(std::fs::read_to_string(child.join("cgroup.events"))
                .map(|t| t.lines().any(|l| l.trim() == "frozen 1"))
                .unwrap_or(false))
        })?;
    } else {
        write_file(&child.join("freezer.state"), "FROZEN", "freeze")?;
        wait_until(pid, || {
            Ok(std::fs::read_to_string(child.join("freezer.state"))
                .map(|t| t.trim() == "FROZEN")
                .unwrap_or(false))
        })?;
    }
    Ok(guard)
}

fn send(pid: u32, sig: libc::c_int, name: &'static str) -> Result<(), FreezeError> {
    let p = libc::pid_t::try_from(pid).map_err(|_| FreezeError::NoProcess(pid))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(p, sig) } != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ESRCH) {
            return Err(FreezeError::NoProcess(pid));
        }
        return Err(FreezeError::Signal {
            signal: name,
            pid,
            source,
        });
    }
    Ok(())
}

/// State letter of every thread of `pid` ('R', 'S', 'T', ...).
fn thread_states(pid: u32) -> Result<Vec<u8>, FreezeError> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| FreezeError::NoProcess(pid))?;
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // thread exited
        };
        // "tid (comm) S ...": comm may contain ')', so take the last one.
        if let Some(state) = stat
            .rfind(')')
            .and_then(|i| stat.as_bytes().get(i + 2).copied())
        {
            out.push(state);
        }
    }
    if out.is_empty() {
        return Err(FreezeError::NoProcess(pid));
    }
    Ok(out)
}

fn freeze_signal(pid: u32) -> Result<FreezeGuard, FreezeError> {
    let before = thread_states(pid)?;
    if before.iter().all(|&s| s == b'T' || s == b't') {
        return Ok(FreezeGuard {
            pid,
            method: UsedMethod::Signal,
            state: State::AlreadyStopped,
            frozen_at: Instant::now(),
        });
    }
    let frozen_at = Instant::now();
    send(pid, libc::SIGSTOP, "SIGSTOP")?;
    let guard = FreezeGuard {
        pid,
        method: UsedMethod::Signal,
        state: State::Stopped,
        frozen_at,
    };
    // A zombie thread ('Z') or a dead one ('X') counts as not running.
    wait_until(pid, || {
        Ok(thread_states(pid)?
            .iter()
            .all(|&s| matches!(s, b'T' | b't' | b'Z' | b'X')))
    })?;
    Ok(guard)
}

fn wait_until(
    pid: u32,
    mut done: impl FnMut() -> Result<bool, FreezeError>,
) -> Result<(), FreezeError> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() > FREEZE_TIMEOUT {
            return Err(FreezeError::Timeout(pid));
        }
        std::thread::sleep(POLL);
    }
}

/// Whether `pid` is currently stopped or frozen, judged from its threads' states (the
/// cgroup freezer shows frozen threads as 'D' or 'S' on older kernels, so this is only
/// conclusive for SIGSTOP; tests use it with counters instead).
pub fn is_stopped(pid: u32) -> bool {
    thread_states(pid)
        .map(|s| s.iter().all(|&c| c == b'T' || c == b't'))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::process::{Child, Command, Stdio};

    /// A child that prints a counter line every millisecond, so "frozen" is observable
    /// as "no progress".
    fn spawn_counter() -> Child {
        Command::new("sh")
            .arg("-c")
            .arg("i=0; while :; do i=$((i+1)); echo $i; done")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    fn progress(child: &mut Child, dur: Duration) -> usize {
        // Drain what is there, wait, drain again: bytes written during `dur`.
        let out = child.stdout.as_mut().expect("piped");
        let fd = std::os::fd::AsRawFd::as_raw_fd(out);
        // SAFETY: fcntl on a pipe fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..1000 {
            if !out.read(&mut buf).map(|n| n > 0).unwrap_or(false) {
                break;
            }
        }
        std::thread::sleep(dur);
        let mut total = 0;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }

    fn check_method(method: FreezeMethod, want: UsedMethod) {
        let mut child = spawn_counter();
        let pid = child.id();
        assert!(
            progress(&mut child, Duration::from_millis(50)) > 0,
            "child runs"
        );
        let g = match FreezeGuard::freeze(pid, method) {
            Ok(g) => g,
            Err(FreezeError::Unavailable(what)) => {
                let _ = child.kill();
                let _ = child.wait();
                // Fails under CI; elsewhere says why and the test returns.
                pmsnap_testenv::skip_or_fail(
                    &format!("freeze with {method:?}"),
                    Some(format!("needs {what} mounted on this host")),
                );
                return;
            }
            Err(e) => panic!("freeze {method:?}: {e}"),
        };
        assert_eq!(g.method(), want);
        // The pipe may hold a few bytes written just before the freeze; after that none.
        let _ = progress(&mut child, Duration::from_millis(20));
        assert_eq!(
            progress(&mut child, Duration::from_millis(100)),
            0,
            "frozen"
        );
        if want == UsedMethod::Signal {
            assert!(is_stopped(pid));
        }
        let frozen_for = g.thaw().expect("thaw");
        assert!(frozen_for >= Duration::from_millis(100));
        assert!(
            progress(&mut child, Duration::from_millis(50)) > 0,
            "runs again"
        );
        // The private cgroup is gone and the child is back home.
        assert!(!Path::new(&format!("/sys/fs/cgroup/freezer/pmsnap-{pid}")).exists());
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(!cg.contains("pmsnap-"), "{cg}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn sigstop_freezes_and_thaws() {
        check_method(FreezeMethod::Signal, UsedMethod::Signal);
    }

    #[test]
    fn cgroup_v1_freezes_and_thaws() {
        check_method(FreezeMethod::CgroupV1, UsedMethod::CgroupV1);
    }

    #[test]
    fn cgroup_v2_freezes_and_thaws() {
        check_method(FreezeMethod::CgroupV2, UsedMethod::CgroupV2);
    }

    #[test]
    fn drop_thaws_on_error_paths() {
        let mut child = spawn_counter();
        let pid = child.id();
        {
            let _g = FreezeGuard::freeze(pid, FreezeMethod::Auto).expect("freeze");
            let _ = progress(&mut child, Duration::from_millis(20));
            assert_eq!(progress(&mut child, Duration::from_millis(50)), 0);
            // Dropped here as an early return would.
        }
        assert!(progress(&mut child, Duration::from_millis(50)) > 0);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn errors() {
        assert!(matches!(
            FreezeGuard::freeze(0x7fff_fff0, FreezeMethod::Auto),
            Err(FreezeError::NoProcess(_))
        ));
        assert!(matches!(
            FreezeGuard::freeze(std::process::id(), FreezeMethod::Signal),
            Err(FreezeError::SelfFreeze(_))
        ));
    }

    #[test]
    fn parses_mount_escapes() {
        assert_eq!(unescape_mount("/a\\040b"), "/a b");
    }
}
