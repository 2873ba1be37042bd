//! The vsock multiplexer: the host side of every connection. It owns the Unix
//! listening socket (`--vsock-sock PATH`), the host streams, the in-VMM services, and
//! the queue of packets waiting for guest rx buffers. It knows nothing about virtqueues
//! or epoll: the device feeds it guest packets and asks it for packets to deliver; the
//! event handler tells it which fds are ready and applies the fd interest changes it
//! reports.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::EventSet;

use super::connection::{Connection, Endpoint, VsockService, VsockServiceFactory};
use super::packet::{Op, VsockHeader};
use crate::guest_warn;
use crate::unix_socket::{bind_listener, connect_nonblocking, SocketError, SocketFile};

/// Most live connections; further requests are refused with RST.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host streams that connected but have not finished their `CONNECT` line.
pub const MAX_PENDING_HOST_STREAMS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most queued control packets (RSTs to unknown connections); beyond, they are dropped.
pub const MAX_CONTROL_QUEUE: usize = 1024;
/// First host-side port handed to host-initiated connections.
const LOCAL_PORT_BASE: u32 = 1 << 30;

/// Errors of setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The listening socket could not be created (a live process serves the path, or
    /// it is not a socket, or binding failed).
    #[error(transparent)]
    Listen(#[from] SocketError),
    /// A service is already registered on the port.
    #[error("vsock port {0} already has a service")]
    PortTaken(u32),
}

/// A change to the set of fds the event loop watches for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdChange {
    /// Start watching `fd` for `events`.
    Add(RawFd, EventSet),
    /// Change what `fd` is watched for.
    Modify(RawFd, EventSet),
    /// Stop watching `fd` (the fd may already be closed).
    Remove(RawFd),
}

type ConnKey = (u32, u32); // (local_port, peer_port)

/// Fd registrations to apply to the event loop, and the closed streams whose fds must
/// stay open until their `Remove` was applied (epoll and the event manager refuse to
/// forget a closed fd, and a reused fd number would collide). Apply `changes`, then drop.
#[must_use]
pub struct FdChanges {
    /// The registrations, in order.
    pub changes: Vec<FdChange>,
    _keep_open: Vec<Dead>,
}

impl std::fmt::Debug for FdChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdChanges")
            .field("changes", &self.changes)
            .finish_non_exhaustive()
    }
}

#[allow(dead_code)] // Held only so their fds close after the epoll removal.
enum Dead {
    Conn(Connection),
    Stream(UnixStream),
}

struct PendingStream {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The host side of the vsock device.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// The socket file, removed at drop if still ours.
    socket_file: SocketFile,
    listener: UnixListener,
    conns: HashMap<ConnKey, Connection>,
    fd_to_conn: HashMap<RawFd, ConnKey>,
    pending_streams: HashMap<RawFd, PendingStream>,
    services: HashMap<u32, Box<dyn VsockServiceFactory>>,
    control: VecDeque<VsockHeader>,
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    /// What each fd is registered for in the event loop right now.
    registered: HashMap<RawFd, EventSet>,
    changes: Vec<FdChange>,
    dead: Vec<Dead>,
    next_local_port: u32,
}

impl std::fmt::Debug for VsockMuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockMuxer")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl VsockMuxer {
    /// The host socket file.
    pub fn socket_file(&self) -> &SocketFile {
        &self.socket_file
    }

    /// Listen on `uds_path` for host programs: a stale socket left there by a VMM that
    /// died is replaced, one a live process serves is refused (see
    /// [`crate::unix_socket::bind_listener`]).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let (listener, socket_file) = bind_listener(uds_path)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            socket_file,
            listener,
            conns: HashMap::new(),
            fd_to_conn: HashMap::new(),
            pending_streams: HashMap::new(),
            services: HashMap::new(),
            control: VecDeque::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            registered: HashMap::new(),
            changes: Vec::new(),
            dead: Vec::new(),
            next_local_port: LOCAL_PORT_BASE,
        })
    }

    /// The listening socket (the event loop watches it for `IN`).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Serve guest connections to host port `port` with services from `factory`.
    pub fn register_service(
        &mut self,
        port: u32,
        factory: Box<dyn VsockServiceFactory>,
    ) -> Result<(), MuxerError> {
        if self.services.contains_key(&port) {
            return Err(MuxerError::PortTaken(port));
        }
        self.services.insert(port, factory);
        Ok(())
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn schedule(&mut self, key: ConnKey) {
        if self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    fn push_control(&mut self, hdr: VsockHeader) {
        if self.control.len() >= MAX_CONTROL_QUEUE {
            guest_warn!(
                "vsock: control queue full, dropping {:?}",
                Op::from_u16(hdr.op)
            );
            return;
        }
        self.control.push_back(hdr);
    }

    /// Queue an RST answering a refused guest packet.
    pub fn reset_guest_packet(&mut self, hdr: &VsockHeader) {
        if let Some(rst) = hdr.rst_reply(self.guest_cid) {
            self.push_control(rst);
        }
    }

    /// A validated packet from the guest.
    pub fn send_from_guest(&mut self, hdr: &VsockHeader, op: Op, data: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.recv_from_guest(hdr, op, data);
            self.after_conn_change(key);
            return;
        }
        match op {
            Op::Request => self.guest_connect(hdr),
            // Nothing to reset.
            Op::Rst => {}
            _ => self.reset_guest_packet(hdr),
        }
    }

    fn guest_connect(&mut self, hdr: &VsockHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!(
                "vsock: connection limit reached, refusing port {}",
                hdr.dst_port
            );
            return self.reset_guest_packet(hdr);
        }
        let port = hdr.dst_port;
        let endpoint = if let Some(factory) = self.services.get_mut(&port) {
            Endpoint::Service {
                svc: factory.connect(hdr.src_port),
                out: VecDeque::new(),
                close_after_out: false,
            }
        } else {
            let mut path = self.uds_path.clone().into_os_string();
            path.push(format!("_{port}"));
            match connect_nonblocking(&path) {
                Ok(stream) => Endpoint::Host {
                    stream,
                    readable: false,
                    eof: false,
                },
                Err(_) => return self.reset_guest_packet(hdr),
            }
        };
        let conn = Connection::guest_initiated(hdr, endpoint);
        let key = (conn.local_port, conn.peer_port);
        if let Some(fd) = conn.stream().map(AsRawFd::as_raw_fd) {
            self.fd_to_conn.insert(fd, key);
        }
        self.conns.insert(key, conn);
        self.after_conn_change(key);
    }

    fn after_conn_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.is_closed() {
            self.remove(key);
        } else if conn.has_rx() {
            self.schedule(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            if let Some(fd) = conn.stream().map(AsRawFd::as_raw_fd) {
                self.fd_to_conn.remove(&fd);
                if self.registered.remove(&fd).is_some() {
                    self.changes.push(FdChange::Remove(fd));
                }
            }
            self.dead.push(Dead::Conn(conn));
        }
    }

    /// Whether packets wait for guest rx buffers.
    pub fn has_pending_rx(&self) -> bool {
        !self.control.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` data bytes.
    pub fn recv_for_guest(&mut self, max_payload: usize) -> Option<(VsockHeader, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        // Visit each waiting connection at most once: one that cannot send now (data but
        // a buffer with no room for payload) goes to the back and must not spin us.
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            self.in_rxq.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.next_rx(self.guest_cid, max_payload);
            self.after_conn_change(key);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Accept host programs waiting on the listening socket.
    pub fn accept_host_streams(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending_streams.len() >= MAX_PENDING_HOST_STREAMS {
                        log::warn!("vsock: too many host streams without CONNECT; closing one");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.pending_streams.insert(
                        fd,
                        PendingStream {
                            stream,
                            line: Vec::new(),
                        },
                    );
                    self.registered.insert(fd, EventSet::IN);
                    self.changes.push(FdChange::Add(fd, EventSet::IN));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    /// The event loop saw `events` on `fd` (a host stream of this muxer).
    pub fn handle_fd_event(&mut self, fd: RawFd, events: EventSet) {
        if self.pending_streams.contains_key(&fd) {
            return self.read_connect_line(fd);
        }
        let Some(&key) = self.fd_to_conn.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            conn.on_readable();
        }
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            conn.flush_tx();
        }
        self.after_conn_change(key);
    }

    fn drop_pending_stream(&mut self, fd: RawFd) {
        if let Some(p) = self.pending_streams.remove(&fd) {
            self.dead.push(Dead::Stream(p.stream));
        }
        if self.registered.remove(&fd).is_some() {
            self.changes.push(FdChange::Remove(fd));
        }
    }

    /// Read a `CONNECT <port>\n` line one byte at a time, so no byte the host program
    /// sends after the line (its first data) is consumed here.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending_streams.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => return self.drop_pending_stream(fd),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&p.line),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break None,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.drop_pending_stream(fd),
            }
        };
        let Some(peer_port) = port else {
            log::warn!("vsock: host program sent a bad CONNECT line; closing it");
            return self.drop_pending_stream(fd);
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.drop_pending_stream(fd);
        }
        let Some(p) = self.pending_streams.remove(&fd) else {
            return;
        };
        // The stream waits (out of epoll) until the guest answers.
        if self.registered.remove(&fd).is_some() {
            self.changes.push(FdChange::Remove(fd));
        }
        let local_port = self.alloc_local_port(peer_port);
        let conn = Connection::host_initiated(local_port, peer_port, p.stream);
        let key = (local_port, peer_port);
        self.fd_to_conn.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(p, peer_port)) && !self.services.contains_key(&p) {
                return p;
            }
        }
    }

    /// The fd registrations to apply to the event loop since the last call.
    pub fn take_fd_changes(&mut self) -> FdChanges {
        let mut changes = std::mem::take(&mut self.changes);
        for conn in self.conns.values() {
            let Some(fd) = conn.stream().map(AsRawFd::as_raw_fd) else {
                continue;
            };
            let want = conn.interest();
            match (self.registered.get(&fd).copied(), want) {
                (None, Some(w)) => {
                    self.registered.insert(fd, w);
                    changes.push(FdChange::Add(fd, w));
                }
                (Some(have), Some(w)) if have != w => {
                    self.registered.insert(fd, w);
                    changes.push(FdChange::Modify(fd, w));
                }
                (Some(_), None) => {
                    self.registered.remove(&fd);
                    changes.push(FdChange::Remove(fd));
                }
                _ => {}
            }
        }
        FdChanges {
            changes,
            _keep_open: std::mem::take(&mut self.dead),
        }
    }

    /// Drop every connection (device reset). Host streams are closed; services told.
    pub fn reset(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.control.clear();
        self.rxq.clear();
        self.in_rxq.clear();
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // The socket file outlives the listener otherwise; a newer VMM's is left alone.
        self.socket_file.remove_if_ours();
    }
}

/// Parse `CONNECT <port>` (without the newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

/// Service used by tests and as a worked example: echoes every byte back.
#[derive(Debug, Default)]
pub struct EchoService;

impl VsockService for EchoService {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"\xff"), None);
    }
}
