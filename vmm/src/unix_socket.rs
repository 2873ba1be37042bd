//! The Unix sockets the VMM listens on (the control API, the host side of the vsock
//! device) are bound by one function, [`bind_listener`], so that both behave the same
//! after a crash: a socket file left behind by a VMM that was killed (`kill -9` leaves
//! it; nobody listens on it any more) is replaced, while a socket that a live process
//! still serves is refused with a clear error. "Live" is decided by connecting to it,
//! without blocking: a refused connection means stale; an accepted one, or a full
//! backlog, means someone listens.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why a socket path could not be bound.
#[derive(Debug, Error)]
pub enum SocketError {
    /// A live process accepts connections on the path.
    #[error(
        "another live process serves the socket {0} (a connection to it was accepted); \
         stop that process or choose another path"
    )]
    InUse(PathBuf),
    /// Something other than a socket exists at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Checking or removing an existing file at the path failed.
    #[error("cannot check or remove the existing socket {path}")]
    Stale {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding or configuring the socket failed.
    #[error("cannot bind the socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A socket file this process bound; [`SocketFile::remove_if_ours`] removes it only if
/// the path still names the same socket (not one a newer process bound since).
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    /// (device, inode, ctime s, ctime ns): inode numbers are reused at once on some
    /// filesystems, the change time tells a newer socket apart.
    id: (u64, u64, i64, i64),
}

fn file_id(m: &fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the socket file if it is still the one we bound.
    pub fn remove_if_ours(&self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id) {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("cannot remove socket {}: {e}", self.path.display());
            }
        }
    }
}

/// Removes a [`SocketFile`] when dropped (if still ours): for the owner of a listener
/// that may outlive it, such as the vsock device, which the VMM's state keeps alive.
#[derive(Debug)]
pub struct RemoveOnDrop(pub SocketFile);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        self.0.remove_if_ours();
    }
}

/// Bind a listening Unix stream socket at `path`, made owner-only (0600: whoever can
/// connect can pause the VM or reach the guest): a stale socket file there is replaced,
/// a socket a live process serves is refused ([`SocketError::InUse`]), and any other
/// file is left alone ([`SocketError::NotASocket`]). The listener is non-blocking.
pub fn bind_listener(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    remove_stale(path)?;
    let bind_err = |source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let id = file_id(&fs::symlink_metadata(path).map_err(bind_err)?);
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            id,
        },
    ))
}

/// Make `path` free for binding, as [`bind_listener`] does first: nothing there, or a
/// socket nobody listens on (removed); a live one is [`SocketError::InUse`]. The VMM
/// calls it at start for every socket it will serve, so a socket in use fails before
/// any work (a restore's copy-back, starting vCPUs) rather than after.
pub fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let stale = |source| SocketError::Stale {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match connect_nonblocking(path.as_os_str()) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        // A full backlog: someone listens but does not accept right now.
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(SocketError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            log::debug!("removing stale socket {}", path.display());
            fs::remove_file(path).map_err(stale)
        }
        Err(e) => Err(stale(e)),
    }
}

/// Connect to a Unix stream socket without blocking: a listener whose backlog is full
/// (not accepting) fails with `EAGAIN` instead of stalling the caller (the vsock
/// device's event loop, or [`bind_listener`]'s liveness check).
pub fn connect_nonblocking(path: &OsStr) -> io::Result<UnixStream> {
    let bytes = path.as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket() has no memory-safety preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a socket we just created and own exclusively; OwnedFd closes it on
    // every path from here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: addr is an initialised sockaddr_un, len is within its size (checked
    // above), and the kernel only reads it during the call.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn nonblocking_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s");
        assert!(
            connect_nonblocking(p.as_os_str()).is_err(),
            "nothing listening"
        );
        let l = UnixListener::bind(&p).expect("bind");
        let mut c = connect_nonblocking(p.as_os_str()).expect("connect");
        let (mut a, _) = l.accept().expect("accept");
        std::io::Write::write_all(&mut c, b"hi").expect("write");
        let mut b = [0u8; 2];
        a.read_exact(&mut b).expect("read");
        assert_eq!(&b, b"hi");
        // Never accepting: once the backlog is full, connecting fails instead of blocking.
        let mut held = Vec::new();
        let refused = (0..10_000).any(|_| match connect_nonblocking(p.as_os_str()) {
            Ok(s) => {
                held.push(s);
                false
            }
            Err(_) => true,
        });
        assert!(refused, "a full backlog must refuse, not block");
        let long = "x".repeat(200);
        assert!(connect_nonblocking(OsStr::new(&long)).is_err());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sock");
        // What `kill -9` leaves: a socket file nobody listens on.
        drop(UnixListener::bind(&p).expect("bind"));
        assert!(p.exists());
        let (l, file) = bind_listener(&p).expect("stale socket replaced");
        let mode = fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only");
        // A second bind while the first listener lives is refused and leaves it serving.
        let err = bind_listener(&p).expect_err("in use");
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
        assert!(err.to_string().contains("another live process"), "{err}");
        connect_nonblocking(p.as_os_str()).expect("first listener still serves");
        drop(l);
        // The listener is gone but the file is ours: removed.
        file.remove_if_ours();
        assert!(!p.exists());
    }

    #[test]
    fn full_backlog_counts_as_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.sock");
        let _l = UnixListener::bind(&p).expect("bind");
        let mut held = Vec::new();
        while let Ok(s) = connect_nonblocking(p.as_os_str()) {
            held.push(s);
            assert!(held.len() < 10_000, "backlog never filled");
        }
        let err = bind_listener(&p).expect_err("in use");
        assert!(matches!(err, SocketError::InUse(_)), "{err}");
    }

    #[test]
    fn other_files_and_newer_sockets_are_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("regular");
        fs::write(&file, b"x").expect("write");
        let err = bind_listener(&file).expect_err("not a socket");
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert!(file.exists(), "a regular file is never removed");
        let err = bind_listener(&dir.path().join("no/such/dir/s")).expect_err("bad dir");
        assert!(matches!(err, SocketError::Bind { .. }), "{err}");

        // A socket replaced by a newer process is not removed by the older one.
        let p = dir.path().join("s.sock");
        let (l, old) = bind_listener(&p).expect("bind");
        drop(l);
        let (_l2, _new) = bind_listener(&p).expect("stale replaced by the newer one");
        old.remove_if_ours();
        assert!(p.exists(), "the newer socket stays");
    }
}
