//! Freezing a process while its page map is read and the VMM protects its pages, so
//! no page changes between "which frames back it" and "those frames are protected".
//!
//! Preferred: the cgroup freezer (v2 `cgroup.freeze`, or v1 `freezer.state`), which
//! stops every thread without the process noticing. Fallback where no cgroup is
//! available: `SIGSTOP`/`SIGCONT` (visible to a parent that waits for stops, and a
//! process that was already stopped stays stopped).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for the kernel to finish freezing or stopping.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(1);

/// Errors of freezing and thawing.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// No such process.
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// A cgroup file operation failed.
    #[error("cgroup {path}: {source}")]
    Cgroup {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("signal to pid {pid}: {source}")]
    Signal {
        /// Target.
        pid: u32,
        /// Cause.
        source: std::io::Error,
    },
    /// The process did not reach the frozen state in time.
    #[error("pid {0} did not freeze within {FREEZE_TIMEOUT:?}")]
    Timeout(u32),
}

/// The mechanism used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeMethod {
    /// cgroup v2 under the given hierarchy root (normally `/sys/fs/cgroup`).
    CgroupV2(PathBuf),
    /// cgroup v1 freezer hierarchy root (normally `/sys/fs/cgroup/freezer`).
    CgroupV1(PathBuf),
    /// `SIGSTOP` / `SIGCONT`.
    Sigstop,
}

impl FreezeMethod {
    /// The best method this system offers.
    pub fn detect() -> Self {
        let v2 = Path::new("/sys/fs/cgroup");
        if v2.join("cgroup.controllers").exists() {
            return Self::CgroupV2(v2.to_owned());
        }
        let v1 = Path::new("/sys/fs/cgroup/freezer");
        if v1.join("freezer.state").exists() || v1.join("cgroup.procs").exists() {
            return Self::CgroupV1(v1.to_owned());
        }
        Self::Sigstop
    }

    /// Short name for output.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CgroupV2(_) => "cgroup-v2",
            Self::CgroupV1(_) => "cgroup-v1",
            Self::Sigstop => "sigstop",
        }
    }
}

/// A frozen process; thawed by [`Frozen::thaw`] or, best effort, on drop.
#[derive(Debug)]
pub struct Frozen {
    pid: u32,
    method: FreezeMethod,
    /// The cgroup made for the freeze, and the one to move the process back to.
    cgroups: Option<(PathBuf, PathBuf)>,
    was_stopped: bool,
    thawed: bool,
}

fn cg_err(path: &Path) -> impl FnOnce(std::io::Error) -> FreezeError + '_ {
    move |source| FreezeError::Cgroup {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, s: &str) -> Result<(), FreezeError> {
    std::fs::write(path, s).map_err(cg_err(path))
}

fn wait_for(
    pid: u32,
    mut done: impl FnMut() -> Result<bool, FreezeError>,
) -> Result<(), FreezeError> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > FREEZE_TIMEOUT {
            return Err(FreezeError::Timeout(pid));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The cgroup path of `pid` in the v2 hierarchy (`v1 == false`) or the v1 freezer
/// hierarchy, from the text of `/proc/PID/cgroup`.
pub fn parse_proc_cgroup(text: &str, v1: bool) -> Option<String> {
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if v1 {
            ctrls.split(',').any(|c| c == "freezer")
        } else {
            id == "0" && ctrls.is_empty()
        };
        hit.then(|| path.to_owned())
    })
}

/// The scheduler state letter of `pid` (`R`, `S`, `T`, ...).
pub fn process_state(pid: u32) -> Result<char, FreezeError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| FreezeError::NoProcess(pid))?;
    // The command name may contain anything, so find the state after the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .ok_or(FreezeError::NoProcess(pid))
}

fn signal(pid: u32, sig: libc::c_int) -> Result<(), FreezeError> {
    let p = libc::pid_t::try_from(pid).map_err(|_| FreezeError::NoProcess(pid))?;
    // SAFETY: kill has no memory-safety preconditions; errors are reported via errno.
    if unsafe { libc::kill(p, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Err(FreezeError::NoProcess(pid));
        }
        return Err(FreezeError::Signal { pid, source: e });
    }
    Ok(())
}

/// Freeze `pid` with the best available method.
pub fn freeze(pid: u32) -> Result<Frozen, FreezeError> {
    freeze_with(pid, FreezeMethod::detect())
}

/// Freeze `pid` with `method`.
pub fn freeze_with(pid: u32, method: FreezeMethod) -> Result<Frozen, FreezeError> {
    let was_stopped = process_state(pid)? == 'T';
    let mut f = Frozen {
        pid,
        method: method.clone(),
        cgroups: None,
        was_stopped,
        thawed: false,
    };
    match &method {
        FreezeMethod::Sigstop => {
            if !was_stopped {
                signal(pid, libc::SIGSTOP)?;
                wait_for(pid, || Ok(matches!(process_state(pid)?, 'T' | 't')))?;
            }
        }
        FreezeMethod::CgroupV1(root) | FreezeMethod::CgroupV2(root) => {
            let v1 = matches!(method, FreezeMethod::CgroupV1(_));
            let proc_cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map_err(|_| FreezeError::NoProcess(pid))?;
            let orig = parse_proc_cgroup(&proc_cg, v1).unwrap_or_else(|| "/".to_owned());
            let orig = root.join(orig.trim_start_matches('/'));
            let dir = root.join(format!("pmsnap-freeze-{pid}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(cg_err(&dir)(e)),
            }
            f.cgroups = Some((dir.clone(), orig));
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
            if v1 {
                let state = dir.join("freezer.state");
                write(&state, "FROZEN")?;
                wait_for(pid, || {
                    let s = std::fs::read_to_string(&state).map_err(cg_err(&state))?;
                    Ok(s.trim() == "FROZEN")
                })?;
            } else {
                write(&dir.join("cgroup.freeze"), "1")?;
                let events = dir.join("cgroup.events");
                wait_for(pid, || {
                    let s = std::fs::read_to_string(&events).map_err(cg_err(&events))?;
                    Ok(s.lines().any(|l| l.trim() == "frozen 1"))
                })?;
            }
        }
    }
    Ok(f)
}

impl Frozen {
    /// The method used.
    pub fn method(&self) -> &FreezeMethod {
        &self.method
    }

    /// The frozen process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Let the process run again (and put it back in its own cgroup).
    pub fn thaw(mut self) -> Result<(), FreezeError> {
        self.do_thaw()
    }

    fn do_thaw(&mut self) -> Result<(), FreezeError> {
        if std::mem::replace(&mut self.thawed, true) {
            return Ok(());
        }
        match &self.method {
            FreezeMethod::Sigstop => {
                if !self.was_stopped {
                    signal(self.pid, libc::SIGCONT)?;
                }
                Ok(())
            }
            FreezeMethod::CgroupV1(_) | FreezeMethod::CgroupV2(_) => {
                let Some((dir, orig)) = &self.cgroups else {
                    return Ok(());
                };
                if matches!(self.method, FreezeMethod::CgroupV1(_)) {
                    write(&dir.join("freezer.state"), "THAWED")?;
                } else {
                    write(&dir.join("cgroup.freeze"), "0")?;
                }
                // The process may have exited meanwhile; then there is nothing to move.
                if process_state(self.pid).is_ok() {
                    write(&orig.join("cgroup.procs"), &self.pid.to_string())?;
                }
                // Fails (EBUSY) only if something else joined it; leave it then.
                let _ = std::fs::remove_dir(dir);
                Ok(())
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Never leave a process frozen because the agent hit an error.
        let _ = self.do_thaw();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn sleeper() -> Child {
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep")
    }

    fn wait_state(pid: u32, want: &[char]) -> char {
        let start = Instant::now();
        loop {
            let s = process_state(pid).expect("state");
            if want.contains(&s) || start.elapsed() > Duration::from_secs(2) {
                return s;
            }
            std::thread::sleep(POLL);
        }
    }

    #[test]
    fn proc_cgroup_lines() {
        let v2 = "0::/user.slice/session-1.scope\n";
        assert_eq!(
            parse_proc_cgroup(v2, false).as_deref(),
            Some("/user.slice/session-1.scope")
        );
        assert_eq!(parse_proc_cgroup(v2, true), None);
        let v1 = "12:cpu,cpuacct:/\n7:freezer:/jobs\n0::/\n";
        assert_eq!(parse_proc_cgroup(v1, true).as_deref(), Some("/jobs"));
        assert_eq!(parse_proc_cgroup(v1, false).as_deref(), Some("/"));
    }

    #[test]
    fn sigstop_freezes_and_thaws() {
        let mut child = sleeper();
        let pid = child.id();
        let f = freeze_with(pid, FreezeMethod::Sigstop).expect("freeze");
        assert_eq!(process_state(pid).expect("state"), 'T');
        f.thaw().expect("thaw");
        assert_ne!(wait_state(pid, &['S']), 'T');
        // Dropping a freeze guard thaws too.
        drop(freeze_with(pid, FreezeMethod::Sigstop).expect("freeze"));
        assert_ne!(wait_state(pid, &['S', 'R']), 'T');
        // A process stopped before stays stopped.
        signal(pid, libc::SIGSTOP).expect("stop");
        assert_eq!(wait_state(pid, &['T']), 'T');
        freeze_with(pid, FreezeMethod::Sigstop)
            .expect("freeze")
            .thaw()
            .expect("thaw");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(process_state(pid).expect("state"), 'T');
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(matches!(
            freeze_with(pid, FreezeMethod::Sigstop),
            Err(FreezeError::NoProcess(_))
        ));
    }

    #[test]
    fn cgroup_v1_file_protocol() {
        // A stand-in hierarchy: the files behave as plain files, which is enough to
        // check what is written where and that everything is undone on thaw.
        let root = tempfile::tempdir().expect("tempdir");
        let mut child = sleeper();
        let pid = child.id();
        let f = freeze_with(pid, FreezeMethod::CgroupV1(root.path().to_owned())).expect("freeze");
        let dir = root.path().join(format!("pmsnap-freeze-{pid}"));
        let read = |p: PathBuf| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(dir.join("cgroup.procs")), pid.to_string());
        assert_eq!(read(dir.join("freezer.state")), "FROZEN");
        f.thaw().expect("thaw");
        // Moved back to its original cgroup (the root here: no freezer line on the host).
        assert_eq!(read(root.path().join("cgroup.procs")), pid.to_string());
        assert_eq!(read(dir.join("freezer.state")), "THAWED");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
