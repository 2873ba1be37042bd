//! Who may ask the agent to save or restore which process.
//!
//! The agent runs as root and is the only guest program that reaches the VMM's snapshot
//! service, so it applies the rule the kernel applies to `/proc/PID/pagemap`,
//! `/proc/PID/mem` and `ptrace` (and CRIU to dump and restore): a caller may work on a
//! process only if it is root, or if the process's real, effective and saved user ids
//! and group ids are all the caller's, and the process is dumpable (a process that
//! made itself non-dumpable, or runs a setuid program, has its `/proc/PID` owned by
//! root, which is checked too). The caller's uid and gid come from the kernel
//! (`SO_PEERCRED` on the agent's socket), never from the request.
//!
//! A process can change between the check and the work (it exits and its pid is
//! reused, or it executes a setuid program): [`Access::recheck`] compares the process's
//! start time and credentials again after its page map was read and before the VMM is
//! asked, so a frame of another process is never sent on the caller's behalf.

use std::os::unix::fs::MetadataExt;

/// Why access is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    /// No such process (or it exited).
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// The caller may not access the process.
    #[error(
        "permission denied: uid {caller} may not access pid {pid} (owned by uid {owner}); \
         only the process's owner or root may save or restore it"
    )]
    Denied {
        /// Caller's uid.
        caller: u32,
        /// Target pid.
        pid: u32,
        /// Target's effective uid.
        owner: u32,
    },
    /// The process changed between the check and the work.
    #[error("pid {0} changed (exited, was replaced, or changed credentials) during the request")]
    Changed(u32),
}

/// The ids of a process, from `/proc/PID/status` and `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcIds {
    /// Real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gids.
    pub gids: [u32; 4],
    /// Owner of `/proc/PID` (root when the process is not dumpable).
    pub proc_uid: u32,
    /// Start time in clock ticks since boot (identifies the process across pid reuse).
    pub start_time: u64,
}

fn ids_line(status: &str, key: &str) -> Option<[u32; 4]> {
    let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
    let mut it = rest.split_whitespace().map(|w| w.parse::<u32>().ok());
    let mut out = [0u32; 4];
    for slot in &mut out {
        *slot = it.next()??;
    }
    Some(out)
}

/// The `Uid:` and `Gid:` lines of `/proc/PID/status`.
pub fn parse_status(status: &str) -> Option<([u32; 4], [u32; 4])> {
    Some((ids_line(status, "Uid:")?, ids_line(status, "Gid:")?))
}

/// Field 22 (`starttime`) of `/proc/PID/stat`; the command name (field 2) may contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3.. ; starttime is field 22, the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

impl ProcIds {
    /// Read the ids of `pid`.
    pub fn read(pid: u32) -> Result<Self, AccessError> {
        let gone = |_| AccessError::NoProcess(pid);
        let dir = format!("/proc/{pid}");
        let status = std::fs::read_to_string(format!("{dir}/status")).map_err(gone)?;
        let stat = std::fs::read_to_string(format!("{dir}/stat")).map_err(gone)?;
        let meta = std::fs::metadata(&dir).map_err(gone)?;
        let (uids, gids) = parse_status(&status).ok_or(AccessError::NoProcess(pid))?;
        let start_time = parse_start_time(&stat).ok_or(AccessError::NoProcess(pid))?;
        Ok(Self {
            uids,
            gids,
            proc_uid: meta.uid(),
            start_time,
        })
    }
}

/// Whether a caller with `uid`/`gid` may access a process with `ids` (the kernel's
/// ptrace rule without capabilities: all of the process's real, effective and saved
/// ids are the caller's, and the process is dumpable). Root may access any process.
pub fn may_access(uid: u32, gid: u32, ids: &ProcIds) -> bool {
    uid == 0
        || (ids.uids[..3].iter().all(|&u| u == uid)
            && ids.gids[..3].iter().all(|&g| g == gid)
            && ids.proc_uid == uid)
}

/// A granted access of a caller to one process instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    uid: u32,
    gid: u32,
    pid: u32,
    ids: ProcIds,
}

impl Access {
    /// Check that the caller (`uid`, `gid` from `SO_PEERCRED`) may access `pid`.
    pub fn check(uid: u32, gid: u32, pid: u32) -> Result<Self, AccessError> {
        let ids = ProcIds::read(pid)?;
        Self::decide(uid, gid, pid, ids)
    }

    /// [`Access::check`] with the process's ids already read.
    pub fn decide(uid: u32, gid: u32, pid: u32, ids: ProcIds) -> Result<Self, AccessError> {
        if !may_access(uid, gid, &ids) {
            return Err(AccessError::Denied {
                caller: uid,
                pid,
                owner: ids.uids[1],
            });
        }
        Ok(Self { uid, gid, pid, ids })
    }

    /// Check that the process is still the same instance and still accessible.
    pub fn recheck(&self) -> Result<(), AccessError> {
        let now = ProcIds::read(self.pid).map_err(|_| AccessError::Changed(self.pid))?;
        self.compare(&now)
    }

    fn compare(&self, now: &ProcIds) -> Result<(), AccessError> {
        if now.start_time != self.ids.start_time || !may_access(self.uid, self.gid, now) {
            return Err(AccessError::Changed(self.pid));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tcat\nUmask:\t0022\nState:\tR (running)\nTgid:\t7\n\
        Uid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t100\n";

    fn ids(uids: [u32; 4], gids: [u32; 4], proc_uid: u32) -> ProcIds {
        ProcIds {
            uids,
            gids,
            proc_uid,
            start_time: 55,
        }
    }

    #[test]
    fn parses_status_and_stat() {
        assert_eq!(
            parse_status(STATUS),
            Some(([1000, 1000, 1000, 1000], [100, 100, 100, 100]))
        );
        assert_eq!(parse_status("Uid:\t1\t2\n"), None);
        assert_eq!(parse_status("Uid:\tx\t1\t1\t1\nGid:\t1\t1\t1\t1\n"), None);
        assert_eq!(parse_status(""), None);
        // A command name with spaces and a ')' does not shift the fields.
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    123456 4096 100 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(123_456));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        assert_eq!(parse_start_time("no paren"), None);
    }

    #[test]
    fn the_ptrace_rule() {
        let own = ids([1000; 4], [100; 4], 1000);
        assert!(may_access(1000, 100, &own));
        assert!(may_access(0, 0, &own), "root may access anything");
        assert!(!may_access(65534, 65534, &own), "another user");
        assert!(!may_access(1000, 65534, &own), "another group");
        // A setuid program started by the user: effective uid root.
        assert!(!may_access(1000, 100, &ids([1000, 0, 0, 0], [100; 4], 0)));
        // Saved uid differs (dropped privileges temporarily).
        assert!(!may_access(
            1000,
            100,
            &ids([1000, 1000, 0, 1000], [100; 4], 1000)
        ));
        // Same ids but not dumpable: /proc/PID belongs to root.
        assert!(!may_access(1000, 100, &ids([1000; 4], [100; 4], 0)));
        // Root's processes are not any user's.
        assert!(!may_access(1000, 100, &ids([0; 4], [0; 4], 0)));
        let e = Access::decide(65534, 65534, 7, own).expect_err("denied");
        assert_eq!(
            e,
            AccessError::Denied {
                caller: 65534,
                pid: 7,
                owner: 1000
            }
        );
        assert!(e.to_string().contains("permission denied"), "{e}");
    }

    #[test]
    fn recheck_notices_a_replaced_process() {
        let a = Access::decide(1000, 100, 7, ids([1000; 4], [100; 4], 1000)).expect("own");
        assert_eq!(a.compare(&ids([1000; 4], [100; 4], 1000)), Ok(()));
        let mut reused = ids([1000; 4], [100; 4], 1000);
        reused.start_time = 99;
        assert_eq!(a.compare(&reused), Err(AccessError::Changed(7)));
        assert_eq!(
            a.compare(&ids([1000, 0, 0, 0], [100; 4], 0)),
            Err(AccessError::Changed(7))
        );
    }

    #[test]
    fn real_processes() {
        let me = std::process::id();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let a = Access::check(uid, gid, me).expect("a process may access itself");
        a.recheck().expect("still the same process");
        assert_eq!(
            Access::check(uid, gid, u32::MAX - 1),
            Err(AccessError::NoProcess(u32::MAX - 1))
        );
        if uid == 0 {
            // pid 1 belongs to root: an unprivileged uid may not touch it.
            assert!(matches!(
                Access::check(65534, 65534, 1),
                Err(AccessError::Denied { pid: 1, .. })
            ));
        }
    }
}
