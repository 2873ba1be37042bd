//! The pool's exclusive lock: `flock(LOCK_EX | LOCK_NB)` held for the Pool's lifetime,
//! so two processes can never drive one pool. A process that dies (even by SIGKILL)
//! releases it, which is how [`claim_unused`] tells a dead VMM's pool from a live one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Outcome of trying to take the lock.
#[derive(Debug)]
pub enum LockError {
    /// Someone else holds it; their pid when /proc/locks tells.
    Held(Option<u32>),
    /// flock failed for another reason.
    Io(io::Error),
}

/// Take an exclusive, non-blocking flock on `file`. It is released when the file (the
/// open file description) is closed.
pub fn lock_exclusive(file: &File) -> Result<(), LockError> {
    // SAFETY: flock on a valid fd owned by `file`; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(LockError::Held(holder_pid(file)));
    }
    Err(LockError::Io(err))
}

/// Find the pid holding a FLOCK on this file's inode in /proc/locks. Best effort: the
/// pid shown is the process that took the lock, which may have exited if it passed the
/// fd on.
fn holder_pid(file: &File) -> Option<u32> {
    let md = file.metadata().ok()?;
    let dev = md.dev();
    let key = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        md.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    parse_proc_locks(&locks, &key)
}

fn parse_proc_locks(text: &str, key: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 12345 00:1a:1234 0 EOF"; blocked waiters have "->".
        let f: Vec<&str> = f.into_iter().filter(|s| *s != "->").collect();
        if f.len() >= 6 && f[1] == "FLOCK" && f[5] == key {
            f[4].parse().ok()
        } else {
            None
        }
    })
}

/// Whether `path` still names the file `file` is open on. A pool removed between its
/// open and its lock (by [`UnusedPool::remove`]) must not be used: it would live on
/// with no path, out of reach of `pmsnap restore` and of the next prune.
pub fn still_linked(file: &File, path: &Path) -> io::Result<bool> {
    let (ours, named) = (file.metadata()?, std::fs::symlink_metadata(path));
    Ok(match named {
        Ok(m) => m.dev() == ours.dev() && m.ino() == ours.ino() && ours.nlink() > 0,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

/// Whether a pool file is in use, as [`claim_unused`] found it.
#[derive(Debug)]
pub enum PoolUse {
    /// A live process holds the lock (its pid when /proc/locks tells).
    InUse(Option<u32>),
    /// Nobody held the lock; it is now held by the returned claim.
    Unused(UnusedPool),
    /// The file went away meanwhile (another prune removed it).
    Gone,
}

/// A pool file whose lock nobody held, now locked by this process: no VMM can open it
/// until the claim is dropped or [`UnusedPool::remove`]d.
#[derive(Debug)]
pub struct UnusedPool {
    file: File,
    path: PathBuf,
}

impl UnusedPool {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of memory (tmpfs pages) or disk the file holds: what removing it frees.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Remove the file, with the lock still held, if the path still names it.
    pub fn remove(self) -> io::Result<()> {
        if still_linked(&self.file, &self.path)? {
            std::fs::remove_file(&self.path)?;
        }
        Ok(())
    }
}

/// Try the pool lock of the file at `path` without waiting: [`PoolUse::InUse`] when a
/// live process holds it, else [`PoolUse::Unused`] holding it. Symlinks are not
/// followed (prune only removes files it finds itself).
pub fn claim_unused(path: &Path) -> io::Result<PoolUse> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PoolUse::Gone),
        Err(e) => return Err(e),
    };
    match lock_exclusive(&file) {
        Ok(()) => {}
        Err(LockError::Held(pid)) => return Ok(PoolUse::InUse(pid)),
        Err(LockError::Io(e)) => return Err(e),
    }
    if !still_linked(&file, path)? {
        return Ok(PoolUse::Gone);
    }
    Ok(PoolUse::Unused(UnusedPool {
        file,
        path: path.to_path_buf(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let t = "1: POSIX  ADVISORY  WRITE 11 00:1a:99 0 EOF\n2: FLOCK  ADVISORY  WRITE 4242 00:1a:99 0 EOF\n";
        assert_eq!(parse_proc_locks(t, "00:1a:99"), Some(4242));
        assert_eq!(parse_proc_locks(t, "00:1a:98"), None);
    }

    #[test]
    fn second_lock_is_refused_with_our_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let a = File::create(&p).expect("create");
        let b = File::open(&p).expect("open");
        lock_exclusive(&a).expect("first lock");
        match lock_exclusive(&b) {
            Err(LockError::Held(pid)) => {
                if let Some(pid) = pid {
                    assert_eq!(pid, std::process::id());
                }
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(a);
        lock_exclusive(&b).expect("lock after the holder closed");
    }

    #[test]
    fn claim_tells_live_pools_from_dead_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (live, dead) = (dir.path().join("live.pool"), dir.path().join("dead.pool"));
        let holder = File::create(&live).expect("create");
        lock_exclusive(&holder).expect("lock");
        std::fs::write(&dead, vec![1u8; 8192]).expect("write");
        match claim_unused(&live).expect("probe") {
            PoolUse::InUse(pid) => assert!(pid.is_none_or(|p| p == std::process::id())),
            other => panic!("a held lock must count as in use: {other:?}"),
        }
        let claim = match claim_unused(&dead).expect("probe") {
            PoolUse::Unused(c) => c,
            other => panic!("nobody holds it: {other:?}"),
        };
        assert!(claim.allocated_bytes().expect("stat") >= 8192);
        // While claimed, no pool open can take it.
        let other = File::open(&dead).expect("open");
        assert!(matches!(lock_exclusive(&other), Err(LockError::Held(_))));
        // A file opened before the removal is no longer linked: a pool open must refuse it.
        claim.remove().expect("remove");
        assert!(!dead.exists());
        assert!(!still_linked(&other, &dead).expect("stat"));
        assert!(matches!(claim_unused(&dead).expect("probe"), PoolUse::Gone));
        assert!(live.exists(), "the live pool stays");
        assert!(still_linked(&holder, &live).expect("stat"));
    }

    #[test]
    fn claim_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, b"x").expect("write");
        let link = dir.path().join("x.pool");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert!(claim_unused(&link).is_err());
        assert!(target.exists());
    }
}
