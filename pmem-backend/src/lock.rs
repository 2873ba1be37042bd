//! The pool's exclusive lock: `flock(LOCK_EX | LOCK_NB)` held for the Pool's lifetime,
//! so two processes can never drive one pool.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

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
}
