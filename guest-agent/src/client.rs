//! Transports: to the VMM's snapshot service (the agent, guest root) and to the agent's
//! Unix socket (applications). One connection per request, one request frame out, one
//! reply frame back.
//!
//! The real transport to the VMM is `AF_VSOCK` to the host (CID 2) on
//! [`SNAPSHOT_SERVICE_PORT`](crate::protocol::SNAPSHOT_SERVICE_PORT), from a privileged
//! source port (512..=1023): the VMM serves nobody else, and binding such a port needs
//! `CAP_NET_BIND_SERVICE` in the guest, so only root (the agent) gets through.
//! Applications talk to the agent at [`AGENT_SOCKET`] instead. Tests plug in a Unix
//! socket (`unix:PATH`) or any [`Transport`] implementation, the way Firecracker's vsock
//! tests plug in a test backend. The endpoints can be overridden with the
//! `PMSNAP_TRANSPORT` and `PMSNAP_AGENT_SOCK` environment variables (see docs/agent.md).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{
    read_frame, write_frame, AppRequest, ErrorReply, GuestRequest, ProtocolError, Reply, Request,
    SNAPSHOT_SERVICE_PORT,
};

/// The host's vsock context id.
pub const HOST_CID: u32 = 2;
/// Environment variable that overrides the endpoint (tests): `unix:PATH` or
/// `vsock:CID:PORT`.
pub const TRANSPORT_ENV: &str = "PMSNAP_TRANSPORT";
/// Where the agent serves applications (mode 0666: any user may ask; the agent decides
/// per request from the caller's credentials).
pub const AGENT_SOCKET: &str = "/run/pmsnap-agent.sock";
/// Environment variable that overrides [`AGENT_SOCKET`] for applications.
pub const AGENT_SOCKET_ENV: &str = "PMSNAP_AGENT_SOCK";
/// Privileged vsock source ports tried, highest first, when connecting to the VMM
/// (like `bindresvport`): the VMM refuses connections from ports above 1023.
const PRIVILEGED_PORTS: std::ops::RangeInclusive<u32> = 512..=1023;
/// How long to wait for the VMM's reply (a save of a large process takes a while on
/// the slow guest kernel; this only bounds a hung service).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors talking to the snapshot service.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No vsock in this kernel, or nothing listens at the other end.
    #[error(
        "vsock not available: cannot reach the snapshot service at {endpoint}: {source}{hint}"
    )]
    Unavailable {
        /// Where we tried to connect.
        endpoint: String,
        /// Cause.
        source: std::io::Error,
        /// Extra hint for the user.
        hint: &'static str,
    },
    /// Sending or receiving failed.
    #[error("talking to the snapshot service: {0}")]
    Protocol(#[from] ProtocolError),
    /// The service closed the connection without replying.
    #[error("the snapshot service closed the connection without a reply")]
    NoReply,
    /// The VMM refused the request.
    #[error("VMM refused: {} ({:?})", .0.message, .0.code)]
    Refused(ErrorReply),
    /// The reply does not answer the request.
    #[error("unexpected reply from the snapshot service: {0}")]
    Unexpected(String),
    /// A bad endpoint string.
    #[error("bad transport {0:?}: expected unix:PATH or vsock:CID:PORT")]
    BadEndpoint(String),
    /// The agent's socket is not there or nobody listens.
    #[error(
        "cannot reach the pmsnap agent at {path}: {source} (is `pmsnap-agent serve` running?)"
    )]
    NoAgent {
        /// Socket path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// Something that carries one request frame to the service and brings one reply back.
pub trait Transport {
    /// Send `frame` (a whole encoded request) and return the whole reply frame.
    fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError>;
}

/// Where the snapshot service is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A vsock address.
    Vsock {
        /// Context id (2 = host).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A Unix stream socket (the agent's socket, or a test service).
    Unix(PathBuf),
}

impl Endpoint {
    /// The VMM's snapshot service.
    pub fn snapshot_service() -> Self {
        Endpoint::Vsock {
            cid: HOST_CID,
            port: SNAPSHOT_SERVICE_PORT,
        }
    }

    /// `PMSNAP_TRANSPORT` when set, else the VMM's snapshot service.
    pub fn from_env() -> Result<Self, ClientError> {
        match std::env::var(TRANSPORT_ENV) {
            Ok(s) if !s.is_empty() => s.parse(),
            _ => Ok(Self::snapshot_service()),
        }
    }

    /// The agent's socket: `PMSNAP_AGENT_SOCK` when set, else [`AGENT_SOCKET`].
    pub fn agent_from_env() -> Self {
        match std::env::var_os(AGENT_SOCKET_ENV) {
            Some(p) if !p.is_empty() => Endpoint::Unix(PathBuf::from(p)),
            _ => Endpoint::Unix(PathBuf::from(AGENT_SOCKET)),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ClientError::BadEndpoint(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(Endpoint::Vsock {
                cid: cid.parse().map_err(|_| bad())?,
                port: port.parse().map_err(|_| bad())?,
            });
        }
        Err(bad())
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Vsock { cid, port } => write!(f, "vsock CID {cid} port {port}"),
            Endpoint::Unix(p) => write!(f, "unix socket {}", p.display()),
        }
    }
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub enum Stream {
    /// `AF_VSOCK` stream.
    Vsock(VsockStream),
    /// Unix stream.
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Vsock(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Vsock(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An `AF_VSOCK` stream socket (libc; std has none).
#[derive(Debug)]
pub struct VsockStream(OwnedFd);

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Bind a vsock socket to `port` of any local CID.
fn vsock_bind(fd: &OwnedFd, port: u32) -> std::io::Result<()> {
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm and its size is passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket() has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_timeout(fd: &OwnedFd, opt: libc::c_int, d: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv lives across the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VsockStream {
    /// Connect to `cid:port` from a privileged local port (the highest free one of
    /// 512..=1023). Binding one needs `CAP_NET_BIND_SERVICE`; without it the error is
    /// `EACCES`.
    pub fn connect_privileged(cid: u32, port: u32) -> std::io::Result<Self> {
        let mut last = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        for local in PRIVILEGED_PORTS.rev() {
            let fd = vsock_socket()?;
            if let Err(e) = vsock_bind(&fd, local) {
                if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    last = e;
                    continue;
                }
                return Err(e);
            }
            return Self::connect_fd(fd, cid, port);
        }
        Err(last)
    }

    /// Connect to `cid:port` from any local port (the VMM's snapshot service refuses
    /// this; used to show that it does).
    pub fn connect(cid: u32, port: u32) -> std::io::Result<Self> {
        Self::connect_fd(vsock_socket()?, cid, port)
    }

    fn connect_fd(fd: OwnedFd, cid: u32, port: u32) -> std::io::Result<Self> {
        let addr = vsock_addr(cid, port);
        // SAFETY: addr is a valid sockaddr_vm and its size is passed.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Bound how long a read waits.
    pub fn set_read_timeout(&self, d: Duration) -> std::io::Result<()> {
        set_timeout(&self.0, libc::SO_RCVTIMEO, d)
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes of reads.
        let n = unsafe { libc::write(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A listening `AF_VSOCK` socket (for `pmsnap-agent serve`).
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listen on `port` for any CID.
    pub fn bind(port: u32) -> std::io::Result<Self> {
        let fd = vsock_socket()?;
        vsock_bind(&fd, port)?;
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    /// Accept one connection.
    pub fn accept(&self) -> std::io::Result<VsockStream> {
        loop {
            // SAFETY: accept4 with null address pointers is allowed.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fresh descriptor we own.
                return Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Connect to an endpoint.
pub fn connect(endpoint: &Endpoint) -> Result<Stream, ClientError> {
    let unavailable = |source: std::io::Error, hint| ClientError::Unavailable {
        endpoint: endpoint.to_string(),
        source,
        hint,
    };
    match endpoint {
        Endpoint::Vsock { cid, port } => {
            let s = VsockStream::connect_privileged(*cid, *port).map_err(|e| {
                let hint = vsock_hint(&e);
                unavailable(e, hint)
            })?;
            s.set_read_timeout(REPLY_TIMEOUT)
                .map_err(|e| unavailable(e, ""))?;
            Ok(Stream::Vsock(s))
        }
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| unavailable(e, ""))?;
            s.set_read_timeout(Some(REPLY_TIMEOUT))
                .map_err(|e| unavailable(e, ""))?;
            Ok(Stream::Unix(s))
        }
    }
}

/// What a failed vsock connect most likely means, for the error message.
fn vsock_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (the snapshot service serves only privileged vsock ports, i.e. guest root: \
             applications ask the agent at /run/pmsnap-agent.sock)"
        }
        Some(libc::EAFNOSUPPORT) => " (this kernel has no vsock support)",
        Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL) => {
            " (no virtio-vsock device: start the VM with a vsock device)"
        }
        Some(libc::ECONNREFUSED) | Some(libc::ECONNRESET) => {
            " (nothing listens there: is the VMM's snapshot service running?)"
        }
        Some(libc::ETIMEDOUT) => " (the host did not answer)",
        _ => "",
    }
}

/// The socket transport: a fresh connection to `endpoint` for each round trip.
#[derive(Debug, Clone)]
pub struct SocketTransport {
    endpoint: Endpoint,
    /// The endpoint is the agent's socket (errors say so).
    agent: bool,
}

impl SocketTransport {
    /// A transport to `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            agent: false,
        }
    }

    /// A transport to the agent's socket ([`Endpoint::agent_from_env`]), for
    /// applications.
    pub fn agent() -> Self {
        Self {
            endpoint: Endpoint::agent_from_env(),
            agent: true,
        }
    }

    /// The endpoint from the environment (see [`Endpoint::from_env`]).
    pub fn from_env() -> Result<Self, ClientError> {
        Ok(Self::new(Endpoint::from_env()?))
    }
}

impl Transport for SocketTransport {
    fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
        let mut s = match (connect(&self.endpoint), &self.endpoint) {
            (Err(ClientError::Unavailable { source, .. }), Endpoint::Unix(path)) if self.agent => {
                return Err(ClientError::NoAgent {
                    path: path.display().to_string(),
                    source,
                })
            }
            (r, _) => r?,
        };
        write_frame(&mut s, frame)?;
        read_frame(&mut s)?.ok_or(ClientError::NoReply)
    }
}

/// A transport that sends nothing: it checks the request the way the VMM would
/// (except against the guest RAM size, which only the VMM knows) and answers as if the
/// VMM had accepted it. `save --dry-run` and `pmsnap-memtest bench --dry-run` use it to
/// measure the agent's own share of a pause without a VMM.
#[derive(Debug, Default, Clone, Copy)]
pub struct DryRun;

impl Transport for DryRun {
    fn round_trip(&mut self, frame: &[u8]) -> Result<Vec<u8>, ClientError> {
        let req = GuestRequest::decode(frame)?;
        if let Err(e) = req.validate(u64::MAX) {
            return Ok(Reply::Error(ErrorReply::from(&e)).encode()?);
        }
        let reply = match req.op {
            Request::Save(s) => Reply::Saved {
                pages: crate::protocol::total_pages(&s.runs),
                present_pages: s
                    .runs
                    .iter()
                    .filter(|r| r.present)
                    .fold(0, |a, r| a + r.count),
                name: s.name,
            },
            Request::Restore(r) => Reply::Restored {
                pages: crate::protocol::total_pages(&r.runs),
                name: r.name,
            },
            Request::List => Reply::List(Vec::new()),
            Request::Delete { name } => Reply::Deleted { name },
        };
        Ok(reply.encode()?)
    }
}

/// Send `req` to the VMM's snapshot service and return the reply; an error reply
/// becomes [`ClientError::Refused`].
pub fn call(t: &mut dyn Transport, req: &GuestRequest) -> Result<Reply, ClientError> {
    call_frame(t, req.encode()?)
}

/// Send an application request to the agent and return the reply; an error reply
/// becomes [`ClientError::Refused`].
pub fn call_app(t: &mut dyn Transport, req: &AppRequest) -> Result<Reply, ClientError> {
    call_frame(t, req.encode()?)
}

fn call_frame(t: &mut dyn Transport, frame: Vec<u8>) -> Result<Reply, ClientError> {
    let reply = Reply::decode(&t.round_trip(&frame)?)?;
    match reply {
        Reply::Error(e) => Err(ClientError::Refused(e)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorCode, FrameBuffer};
    use std::os::unix::net::UnixListener;

    #[test]
    fn dry_run_answers_like_an_accepting_vmm() {
        use crate::protocol::{Run, SaveRequest};
        let run = |present, count| Run {
            guest_phys_first_page: 5,
            count,
            virt_addr: 0x1000,
            present,
        };
        let save = GuestRequest::new(
            0,
            Request::Save(SaveRequest {
                name: "d".into(),
                pid: 1,
                comm: "x".into(),
                runs: vec![run(true, 3), run(false, 2)],
            }),
        );
        assert_eq!(
            call(&mut DryRun, &save).expect("save"),
            Reply::Saved {
                name: "d".into(),
                pages: 5,
                present_pages: 3
            }
        );
        let bad = GuestRequest::new(
            0,
            Request::Save(SaveRequest {
                name: "d".into(),
                pid: 1,
                comm: "x".into(),
                runs: vec![],
            }),
        );
        assert!(matches!(
            call(&mut DryRun, &bad),
            Err(ClientError::Refused(_))
        ));
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "vsock:2:1024".parse::<Endpoint>().expect("vsock"),
            Endpoint::snapshot_service()
        );
        assert_eq!(
            "unix:/tmp/x".parse::<Endpoint>().expect("unix"),
            Endpoint::Unix("/tmp/x".into())
        );
        for bad in ["", "unix:", "vsock:2", "vsock:a:1", "tcp:1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unix_round_trip_and_error_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("svc");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            for i in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                // Read in small pieces like the VMM does.
                let mut fb = FrameBuffer::new();
                let mut buf = [0u8; 7];
                let frame = loop {
                    let n = s.read(&mut buf).expect("read");
                    fb.push(&buf[..n]).expect("push");
                    if let Some(f) = fb.next_frame().expect("frame") {
                        break f;
                    }
                };
                let req = GuestRequest::decode(&frame).expect("decode");
                let reply = match (i, req.op) {
                    (0, Request::Delete { name }) => Reply::Deleted { name },
                    _ => Reply::Error(ErrorReply::new(ErrorCode::NotFound, "no snapshot x")),
                };
                write_frame(&mut s, &reply.encode().expect("encode")).expect("write");
            }
        });
        let mut t = SocketTransport::new(Endpoint::Unix(path.clone()));
        let r = call(
            &mut t,
            &GuestRequest::new(0, Request::Delete { name: "a".into() }),
        )
        .expect("call");
        assert_eq!(r, Reply::Deleted { name: "a".into() });
        match call(&mut t, &GuestRequest::new(0, Request::List)) {
            Err(ClientError::Refused(e)) => assert_eq!(e.code, ErrorCode::NotFound),
            other => panic!("unexpected {other:?}"),
        }
        server.join().expect("server");
    }

    #[test]
    fn no_reply_and_garbage_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("svc");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
            let (mut s, _) = listener.accept().expect("accept");
            // Take the whole request first, so the client's write cannot fail.
            read_frame(&mut s).expect("read").expect("a request");
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .expect("write");
        });
        let mut t = SocketTransport::new(Endpoint::Unix(path));
        assert!(matches!(
            call(&mut t, &GuestRequest::new(0, Request::List)),
            Err(ClientError::NoReply | ClientError::Protocol(_))
        ));
        assert!(matches!(
            call(&mut t, &GuestRequest::new(0, Request::List)),
            Err(ClientError::Protocol(ProtocolError::BadMagic(_)))
        ));
        server.join().expect("server");
    }

    #[test]
    fn unavailable_endpoints_say_so() {
        let mut t = SocketTransport::new(Endpoint::Unix("/nonexistent/pmsnap.sock".into()));
        let e = call(&mut t, &GuestRequest::new(0, Request::List)).expect_err("no socket");
        assert!(e.to_string().starts_with("vsock not available"), "{e}");
        // The agent's socket missing: the error names the agent.
        let mut t = SocketTransport {
            endpoint: Endpoint::Unix("/nonexistent/agent.sock".into()),
            agent: true,
        };
        let e = call_app(&mut t, &AppRequest::List).expect_err("no agent");
        assert!(matches!(e, ClientError::NoAgent { .. }), "{e}");
        assert!(e.to_string().contains("pmsnap-agent serve"), "{e}");
        // Nobody serves the snapshot port on the host side of this machine's vsock
        // (or vsock is missing altogether): either way a clear error, never a hang.
        let mut t = SocketTransport::new(Endpoint::Vsock {
            cid: HOST_CID,
            port: SNAPSHOT_SERVICE_PORT,
        });
        let e = call(&mut t, &GuestRequest::new(0, Request::List)).expect_err("no service");
        assert!(matches!(e, ClientError::Unavailable { .. }), "{e}");
    }
}
