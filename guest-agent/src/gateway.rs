//! The agent as the gateway for applications: a Unix socket (mode 0666, so any user
//! may ask) where the agent learns each caller's uid, gid and pid from the kernel
//! (`SO_PEERCRED`), checks that the caller may access the process it names
//! ([`crate::access`]), reads that process's guest-physical pages itself, and asks the
//! VMM on the caller's behalf, naming the caller's uid. Applications never send frame
//! numbers: restore targets are always pages of the process named. See docs/agent.md.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::access::Access;
use crate::client::{call, Transport};
use crate::freeze::FreezeMethod;
use crate::ops::{restore_process_as, save_process_as, OpsError, Principal};
use crate::protocol::{
    read_frame, write_frame, AppRequest, ErrorCode, ErrorReply, ProtocolError, Reply, Request,
};

/// The credentials of the process at the other end of a Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its pid (at connect time).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// The peer's credentials, from the kernel (`SO_PEERCRED`).
pub fn peer_cred(s: &UnixStream) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: u32::try_from(cred.pid).unwrap_or(0),
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Listen on `path` for applications: a stale socket file is replaced, and the socket
/// is made world-connectable (0666); authority is decided per request.
pub fn bind_agent_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

fn denied(msg: String) -> Reply {
    Reply::Error(ErrorReply::new(ErrorCode::PermissionDenied, msg))
}

/// The owner a restore or delete may name: its own uid, or any for root.
fn owner_allowed(peer: &PeerCred, owner: Option<u32>) -> Result<(), Reply> {
    match owner {
        Some(o) if o != peer.uid && peer.uid != 0 => Err(denied(format!(
            "permission denied: uid {} may not use snapshots of uid {o}",
            peer.uid
        ))),
        _ => Ok(()),
    }
}

fn failed(what: &str, peer: &PeerCred, e: &OpsError) -> Reply {
    log::warn!("{what} for uid {} (pid {}) failed: {e}", peer.uid, peer.pid);
    Reply::Error(e.to_reply())
}

/// Answer one application request from `peer`: check, act on the caller's behalf,
/// reply (never an error: failures become error replies).
pub fn handle_app_frame(
    t: &mut dyn Transport,
    frame: &[u8],
    peer: PeerCred,
    method: FreezeMethod,
) -> Reply {
    let req = match AppRequest::decode(frame).and_then(|r| r.validate().map(|()| r)) {
        Ok(r) => r,
        Err(e) => return Reply::Error(ErrorReply::from(&e)),
    };
    let who = Principal::uid(peer.uid);
    // The caller itself is blocked in this call: no freeze. Another process is frozen.
    let freeze = |pid: u32| (pid != peer.pid).then_some(method);
    match req {
        AppRequest::Save { name, pid, ranges } => {
            let access = match Access::check(peer.uid, peer.gid, pid) {
                Ok(a) => a,
                Err(e) => return failed("save", &peer, &e.into()),
            };
            match save_process_as(t, pid, &ranges, &name, freeze(pid), &who, Some(&access)) {
                Ok(o) => Reply::Saved {
                    name: o.name,
                    pages: o.vmm_pages,
                    present_pages: o.vmm_present_pages,
                },
                Err(e) => failed("save", &peer, &e),
            }
        }
        AppRequest::Restore {
            name,
            owner,
            pid,
            ranges,
        } => {
            if let Err(r) = owner_allowed(&peer, owner) {
                return r;
            }
            let access = match Access::check(peer.uid, peer.gid, pid) {
                Ok(a) => a,
                Err(e) => return failed("restore", &peer, &e.into()),
            };
            let who = Principal { owner, ..who };
            match restore_process_as(t, pid, &ranges, &name, freeze(pid), &who, Some(&access)) {
                Ok(o) => Reply::Restored {
                    name: o.name,
                    pages: o.vmm_pages,
                },
                Err(e) => failed("restore", &peer, &e),
            }
        }
        AppRequest::List => forward(t, &who, Request::List),
        AppRequest::Delete { name, owner } => {
            if let Err(r) = owner_allowed(&peer, owner) {
                return r;
            }
            forward(t, &Principal { owner, ..who }, Request::Delete { name })
        }
    }
}

fn forward(t: &mut dyn Transport, who: &Principal, op: Request) -> Reply {
    match call(t, &who.request(op)) {
        Ok(r) => r,
        Err(e) => Reply::Error(OpsError::from(e).to_reply()),
    }
}

/// The agent's logic run inside the calling process, against a transport to the VMM:
/// answers application requests as the agent would answer this process. For dry runs
/// (with [`crate::client::DryRun`]) and tests; reading frame numbers from a page map
/// needs root.
#[derive(Debug)]
pub struct LocalAgent<T> {
    /// Transport to the VMM (or a stand-in).
    pub vmm: T,
    /// How to freeze a process other than this one.
    pub method: FreezeMethod,
}

impl<T> LocalAgent<T> {
    /// An in-process agent in front of `vmm`.
    pub fn new(vmm: T) -> Self {
        Self {
            vmm,
            method: FreezeMethod::Auto,
        }
    }
}

impl<T: Transport> Transport for LocalAgent<T> {
    fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, crate::client::ClientError> {
        // SAFETY: geteuid/getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let peer = PeerCred {
            pid: std::process::id(),
            uid,
            gid,
        };
        Ok(handle_app_frame(&mut self.vmm, frame, peer, self.method).encode()?)
    }
}

/// Serve one application connection: read one request frame, then (holding `one`, so
/// the agent's operations run one at a time, and a caller that connects but sends
/// nothing holds up nobody else's) answer it.
pub fn serve_app_connection(
    conn: &mut UnixStream,
    t: &mut dyn Transport,
    method: FreezeMethod,
    one: &std::sync::Mutex<()>,
) -> Result<(), ProtocolError> {
    let peer = peer_cred(conn).map_err(|e| ProtocolError::Io(e.to_string()))?;
    let reply = match read_frame(conn) {
        Ok(Some(frame)) => {
            let _held = one.lock().unwrap_or_else(|e| e.into_inner());
            handle_app_frame(t, &frame, peer, method)
        }
        Ok(None) => return Ok(()),
        Err(e) => Reply::Error(ErrorReply::from(&e)),
    };
    write_frame(conn, &reply.encode()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientError;
    use crate::protocol::{GuestRequest, VirtRange};

    /// Records what would reach the VMM and answers like it.
    #[derive(Default)]
    struct Recorder(Vec<GuestRequest>);

    impl Transport for Recorder {
        fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
            let req = GuestRequest::decode(frame)?;
            let reply = match &req.op {
                Request::Save(s) => Reply::Saved {
                    name: s.name.clone(),
                    pages: crate::protocol::total_pages(&s.runs),
                    present_pages: 0,
                },
                Request::Restore(r) => Reply::Restored {
                    name: r.name.clone(),
                    pages: crate::protocol::total_pages(&r.runs),
                },
                Request::List => Reply::List(Vec::new()),
                Request::Delete { name } => Reply::Deleted { name: name.clone() },
            };
            self.0.push(req);
            Ok(reply.encode()?)
        }
    }

    fn code(r: &Reply) -> ErrorCode {
        match r {
            Reply::Error(e) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn frame(r: &AppRequest) -> Vec<u8> {
        r.encode().expect("encode")
    }

    #[test]
    fn list_and_delete_carry_the_callers_uid() {
        let mut t = Recorder::default();
        let peer = PeerCred {
            pid: 1,
            uid: 1000,
            gid: 100,
        };
        let r = handle_app_frame(&mut t, &frame(&AppRequest::List), peer, FreezeMethod::Auto);
        assert_eq!(r, Reply::List(Vec::new()));
        let del = AppRequest::Delete {
            name: "x".into(),
            owner: None,
        };
        handle_app_frame(&mut t, &frame(&del), peer, FreezeMethod::Auto);
        assert_eq!(t.0.len(), 2);
        assert!(t.0.iter().all(|g| g.uid == 1000 && g.host_token.is_none()));
        // Another uid's snapshots: refused by the agent, nothing forwarded.
        let other = AppRequest::Delete {
            name: "x".into(),
            owner: Some(0),
        };
        let r = handle_app_frame(&mut t, &frame(&other), peer, FreezeMethod::Auto);
        assert_eq!(code(&r), ErrorCode::PermissionDenied);
        assert_eq!(t.0.len(), 2);
        // Root may name any owner.
        let root = PeerCred { uid: 0, ..peer };
        let own = AppRequest::Delete {
            name: "x".into(),
            owner: Some(1000),
        };
        handle_app_frame(&mut t, &frame(&own), root, FreezeMethod::Auto);
        assert_eq!((t.0[2].uid, t.0[2].owner), (0, Some(1000)));
    }

    #[test]
    fn another_users_process_is_refused_before_the_vmm() {
        let mut t = Recorder::default();
        let peer = PeerCred {
            pid: 12345,
            uid: 65534,
            gid: 65534,
        };
        let me = std::process::id();
        for req in [
            AppRequest::Save {
                name: "s".into(),
                pid: me,
                ranges: vec![],
            },
            AppRequest::Restore {
                name: "s".into(),
                owner: None,
                pid: me,
                ranges: vec![VirtRange {
                    start: 0x1000,
                    end: 0x2000,
                }],
            },
        ] {
            // This test process does not belong to uid 65534 (unless it runs as it).
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 65534 {
                return;
            }
            let r = handle_app_frame(&mut t, &frame(&req), peer, FreezeMethod::Auto);
            assert_eq!(code(&r), ErrorCode::PermissionDenied, "{req:?}");
        }
        assert!(t.0.is_empty(), "nothing reached the VMM");
        // A pid that does not exist.
        let r = handle_app_frame(
            &mut t,
            &frame(&AppRequest::Save {
                name: "s".into(),
                pid: u32::MAX - 1,
                ranges: vec![],
            }),
            peer,
            FreezeMethod::Auto,
        );
        assert_eq!(code(&r), ErrorCode::BadRequest);
        // Garbage.
        let r = handle_app_frame(&mut t, b"junk", peer, FreezeMethod::Auto);
        assert_eq!(code(&r), ErrorCode::BadFrame);
    }

    #[test]
    fn own_process_is_saved_from_its_page_map_without_freezing() {
        let buf = vec![7u8; 4 * 4096];
        let start = (buf.as_ptr() as u64).div_ceil(4096) * 4096;
        let me = std::process::id();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let peer = PeerCred { pid: me, uid, gid };
        let mut t = Recorder::default();
        let req = AppRequest::Save {
            name: "own".into(),
            pid: me,
            ranges: vec![VirtRange {
                start,
                end: start + 4096,
            }],
        };
        let r = handle_app_frame(&mut t, &frame(&req), peer, FreezeMethod::Auto);
        match r {
            Reply::Saved { pages: 1, .. } => {}
            // Without root the page map hides frame numbers: a clear error instead,
            // and never a permission refusal for the caller's own process.
            Reply::Error(e) if uid != 0 => assert_ne!(e.code, ErrorCode::PermissionDenied),
            other => panic!("unexpected {other:?}"),
        }
        if uid == 0 {
            let sent = &t.0[0];
            assert_eq!(sent.uid, 0);
            match &sent.op {
                Request::Save(s) => {
                    assert_eq!(s.pid, me);
                    assert_eq!(s.runs[0].virt_addr, start);
                }
                other => panic!("{other:?}"),
            }
        }
        drop(buf);
    }

    #[test]
    fn socket_is_world_connectable_and_reports_credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/agent.sock");
        std::fs::write(dir.path().join("stale"), b"").expect("write");
        let l = bind_agent_socket(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        // Binding again replaces the stale socket.
        drop(l);
        let l = bind_agent_socket(&path).expect("rebind");
        let c = UnixStream::connect(&path).expect("connect");
        let (s, _) = l.accept().expect("accept");
        let cred = peer_cred(&s).expect("cred");
        assert_eq!(cred.pid, std::process::id());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(cred.uid, unsafe { libc::geteuid() });
        drop(c);
    }
}
