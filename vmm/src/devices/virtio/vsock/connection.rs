//! One vsock stream connection between a guest socket and a host endpoint (a Unix
//! stream or an in-VMM service): the state machine and the credit-based flow control.
//!
//! Credit, both ways: the guest may have at most `buf_alloc` bytes in flight to us that
//! we have not yet forwarded (`fwd_cnt` counts what we forwarded); a guest that sends
//! more gets an RST. We send the guest at most `peer_buf_alloc - (rx_cnt -
//! peer_fwd_cnt)` bytes, from the numbers in the last header it sent us.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use event_manager::EventSet;

use super::packet::{Op, VsockHeader, MAX_PKT_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::guest_warn;

/// Receive buffer we advertise per connection: the most guest bytes we hold unforwarded.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once we forwarded this many bytes since the last one we sent.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
/// A service's unsent replies above which it is fed no more guest bytes.
pub const SERVICE_OUT_HIGH: usize = 1 << 20;

/// An in-VMM service reachable from the guest on one vsock port (the snapshot service).
/// One instance serves one connection; it sees the guest's byte stream in pieces of
/// any size and answers with bytes.
pub trait VsockService: Send {
    /// Bytes from the guest. Append reply bytes to `out`. Return `false` to close the
    /// connection once `out` has been delivered.
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool;
    /// The connection is gone (guest closed or reset it, or the device was reset).
    fn on_close(&mut self) {}
}

/// Creates a [`VsockService`] for each guest connection to the registered port.
pub trait VsockServiceFactory: Send {
    /// Whether a guest socket on port `peer_port` may connect; refused connections get
    /// RST. Every port by default.
    fn accepts(&self, _peer_port: u32) -> bool {
        true
    }
    /// A guest socket on port `peer_port` connected.
    fn connect(&mut self, peer_port: u32) -> Box<dyn VsockService>;
}

impl<F> VsockServiceFactory for F
where
    F: FnMut(u32) -> Box<dyn VsockService> + Send,
{
    fn connect(&mut self, peer_port: u32) -> Box<dyn VsockService> {
        self(peer_port)
    }
}

/// The host side of a connection.
pub(super) enum Endpoint {
    /// A Unix stream: a host program (host- or guest-initiated).
    Host {
        stream: UnixStream,
        /// epoll said readable and we have not yet read it dry.
        readable: bool,
        /// The host closed its write side.
        eof: bool,
    },
    /// An in-VMM service.
    Service {
        svc: Box<dyn VsockService>,
        out: VecDeque<u8>,
        close_after_out: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// We sent (or will send) a REQUEST for a host program; waiting for RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
    /// We are resetting it: only an RST is left to send.
    Killed,
    /// Gone: the muxer drops it.
    Closed,
}

#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown: u32,
}

/// A connection. `local_port` is the host-side port, `peer_port` the guest's.
pub(super) struct Connection {
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
    state: State,
    endpoint: Endpoint,
    /// Guest bytes not yet written to the host stream.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_sent_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent.
    local_shutdown: u32,
    pending: Pending,
}

impl Connection {
    /// A connection the guest requested (`hdr` is its REQUEST); answers RESPONSE.
    pub(super) fn guest_initiated(hdr: &VsockHeader, endpoint: Endpoint) -> Self {
        let mut c = Self::new(hdr.dst_port, hdr.src_port, endpoint, State::Established);
        c.update_peer_credit(hdr);
        c.pending.response = true;
        c
    }

    /// A connection a host program asked for with `CONNECT <peer_port>`; sends REQUEST.
    pub(super) fn host_initiated(local_port: u32, peer_port: u32, stream: UnixStream) -> Self {
        let mut c = Self::new(
            local_port,
            peer_port,
            Endpoint::Host {
                stream,
                readable: false,
                eof: false,
            },
            State::LocalInit,
        );
        c.pending.request = true;
        c
    }

    fn new(local_port: u32, peer_port: u32, endpoint: Endpoint, state: State) -> Self {
        Self {
            local_port,
            peer_port,
            state,
            endpoint,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_sent_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            local_shutdown: 0,
            pending: Pending::default(),
        }
    }

    /// The Unix stream, if the endpoint is one.
    pub(super) fn stream(&self) -> Option<&UnixStream> {
        match &self.endpoint {
            Endpoint::Host { stream, .. } => Some(stream),
            Endpoint::Service { .. } => None,
        }
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes we may still send to the guest. A guest reporting nonsense (more in flight
    /// than its buffer) gets zero, not an underflow.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Reset the connection: drop what is pending, send only an RST, then go away.
    pub(super) fn kill(&mut self) {
        if self.state != State::Closed {
            self.state = State::Killed;
        }
    }

    /// True once nothing is left to send and the muxer should drop it.
    pub(super) fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// A packet from the guest for this connection (already validated).
    pub(super) fn recv_from_guest(&mut self, hdr: &VsockHeader, op: Op, data: &[u8]) {
        self.update_peer_credit(hdr);
        match (self.state, op) {
            (State::Killed | State::Closed, _) => {}
            (_, Op::Rst) => self.close(),
            (State::LocalInit, Op::Response) => {
                self.state = State::Established;
                let line = format!("OK {}\n", self.local_port);
                // A fresh stream with nothing sent yet: a short line cannot block.
                let res = match &mut self.endpoint {
                    Endpoint::Host { stream, .. } => stream.write_all(line.as_bytes()),
                    Endpoint::Service { .. } => Ok(()),
                };
                if let Err(e) = res {
                    guest_warn!("vsock: host program went away before OK: {e}");
                    self.kill();
                }
            }
            (State::LocalInit, _) => self.kill(),
            (State::Established, Op::Request | Op::Response) => self.kill(),
            (State::Established, Op::CreditUpdate) => {}
            (State::Established, Op::CreditRequest) => self.pending.credit_update = true,
            (State::Established, Op::Rw) => self.recv_data(data),
            (State::Established, Op::Shutdown) => {
                self.peer_shutdown |= hdr.flags;
                self.after_peer_shutdown();
            }
        }
    }

    fn recv_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 || self.local_shutdown & SHUTDOWN_RCV != 0 {
            return self.kill();
        }
        if self.tx_buf.len() + data.len() > CONN_BUF_ALLOC as usize {
            guest_warn!(
                "vsock: guest overran its credit on port {}",
                self.local_port
            );
            return self.kill();
        }
        self.tx_buf.extend(data);
        self.flush_tx();
    }

    /// Count `n` guest bytes as delivered and schedule a credit update when due.
    fn forwarded(&mut self, n: usize) {
        // n is at most CONN_BUF_ALLOC, far below u32::MAX.
        self.fwd_cnt += Wrapping(n as u32);
        if (self.fwd_cnt - self.last_sent_fwd_cnt).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    /// Write buffered guest bytes to the host stream as far as it takes them.
    pub(super) fn flush_tx(&mut self) {
        let mut written = 0;
        let mut failed = false;
        match &mut self.endpoint {
            Endpoint::Host { stream, .. } => {
                while !self.tx_buf.is_empty() {
                    let (a, _) = self.tx_buf.as_slices();
                    match stream.write(a) {
                        Ok(0) => break,
                        Ok(n) => {
                            self.tx_buf.drain(..n);
                            written += n;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
            }
            Endpoint::Service {
                svc,
                out,
                close_after_out,
            } => {
                // Backpressure: while replies pile up unread, stop consuming the guest's
                // requests; its credit runs out and its writes block. A guest that never
                // reads cannot make the VMM buffer replies without bound.
                while !self.tx_buf.is_empty() && out.len() < SERVICE_OUT_HIGH && !*close_after_out {
                    let (a, _) = self.tx_buf.as_slices();
                    let n = a.len();
                    let mut reply = Vec::new();
                    if !svc.on_data(a, &mut reply) {
                        *close_after_out = true;
                    }
                    out.extend(reply);
                    self.tx_buf.drain(..n);
                    written += n;
                }
                if *close_after_out {
                    // Closing: whatever else the guest sent is dropped.
                    written += self.tx_buf.len();
                    self.tx_buf.clear();
                    if out.is_empty() {
                        self.pending.shutdown = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    }
                }
            }
        }
        self.forwarded(written);
        if failed {
            // The host program is gone: the guest's data can never arrive.
            return self.kill();
        }
        if self.tx_buf.is_empty() {
            self.after_peer_shutdown();
        }
    }

    /// Act on the guest's SHUTDOWN once its data is delivered.
    fn after_peer_shutdown(&mut self) {
        if !self.tx_buf.is_empty() || self.state != State::Established {
            return;
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            if let Endpoint::Host { stream, .. } = &self.endpoint {
                // Tell the host program no more data comes; errors mean it is gone.
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // Full close from the guest: it waits for our RST to finish.
            self.kill();
        }
    }

    fn close(&mut self) {
        if let Endpoint::Service { svc, .. } = &mut self.endpoint {
            svc.on_close();
        }
        self.state = State::Closed;
    }

    /// epoll reported the host stream readable.
    pub(super) fn on_readable(&mut self) {
        if let Endpoint::Host { readable, .. } = &mut self.endpoint {
            *readable = true;
        }
    }

    /// Whether there is something to send to the guest now.
    pub(super) fn has_rx(&self) -> bool {
        match self.state {
            State::Killed => return true,
            State::Closed => return false,
            State::LocalInit => return self.pending.request,
            State::Established => {}
        }
        if self.pending.response || self.pending.credit_update || self.pending.shutdown != 0 {
            return true;
        }
        self.peer_credit() > 0 && self.data_ready()
    }

    fn data_ready(&self) -> bool {
        if self.peer_shutdown & SHUTDOWN_RCV != 0 || self.local_shutdown & SHUTDOWN_SEND != 0 {
            return false;
        }
        match &self.endpoint {
            Endpoint::Host { readable, eof, .. } => *readable && !*eof,
            Endpoint::Service { out, .. } => !out.is_empty(),
        }
    }

    /// What to wait for on the host stream; `None` means "not in epoll at all" (so a
    /// hung-up stream we are not reading cannot spin the event loop).
    pub(super) fn interest(&self) -> Option<EventSet> {
        let Endpoint::Host { readable, eof, .. } = &self.endpoint else {
            return None;
        };
        if !matches!(self.state, State::Established) {
            return None;
        }
        let mut set = EventSet::empty();
        let can_read = self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.local_shutdown & SHUTDOWN_SEND == 0
            && !*eof;
        if can_read && !*readable && self.peer_credit() > 0 {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        (!set.is_empty()).then_some(set)
    }

    fn header(&mut self, guest_cid: u64, op: Op) -> VsockHeader {
        let mut h = VsockHeader::to_guest(guest_cid, self.local_port, self.peer_port, op);
        h.buf_alloc = CONN_BUF_ALLOC;
        h.fwd_cnt = self.fwd_cnt.0;
        self.last_sent_fwd_cnt = self.fwd_cnt;
        h
    }

    /// The next packet for the guest, with at most `max_payload` data bytes.
    pub(super) fn next_rx(
        &mut self,
        guest_cid: u64,
        max_payload: usize,
    ) -> Option<(VsockHeader, Vec<u8>)> {
        match self.state {
            State::Closed => return None,
            State::Killed => {
                self.close();
                return Some((self.header(guest_cid, Op::Rst), Vec::new()));
            }
            State::LocalInit => {
                if !self.pending.request {
                    return None;
                }
                self.pending.request = false;
                return Some((self.header(guest_cid, Op::Request), Vec::new()));
            }
            State::Established => {}
        }
        if std::mem::take(&mut self.pending.response) {
            return Some((self.header(guest_cid, Op::Response), Vec::new()));
        }
        if let Some(pkt) = self.next_data(guest_cid, max_payload) {
            return Some(pkt);
        }
        if self.state == State::Killed {
            return self.next_rx(guest_cid, max_payload);
        }
        if self.pending.shutdown != 0 {
            let flags = std::mem::take(&mut self.pending.shutdown);
            self.local_shutdown |= flags;
            let mut h = self.header(guest_cid, Op::Shutdown);
            h.flags = flags;
            return Some((h, Vec::new()));
        }
        if std::mem::take(&mut self.pending.credit_update) {
            return Some((self.header(guest_cid, Op::CreditUpdate), Vec::new()));
        }
        None
    }

    fn next_data(&mut self, guest_cid: u64, max_payload: usize) -> Option<(VsockHeader, Vec<u8>)> {
        if !self.data_ready() {
            return None;
        }
        let limit = (self.peer_credit() as usize)
            .min(max_payload)
            .min(MAX_PKT_PAYLOAD as usize);
        if limit == 0 {
            return None;
        }
        let mut resume_service = false;
        let data = match &mut self.endpoint {
            Endpoint::Service {
                out,
                close_after_out,
                ..
            } => {
                let data: Vec<u8> = out.drain(..limit.min(out.len())).collect();
                if out.is_empty() && *close_after_out {
                    self.pending.shutdown = SHUTDOWN_RCV | SHUTDOWN_SEND;
                }
                if out.len() < SERVICE_OUT_HIGH && !self.tx_buf.is_empty() {
                    resume_service = true;
                }
                data
            }
            Endpoint::Host {
                stream,
                readable,
                eof,
            } => {
                let mut buf = vec![0u8; limit];
                match stream.read(&mut buf) {
                    Ok(0) => {
                        *eof = true;
                        // The host program closed its side: the guest reads EOF.
                        self.pending.shutdown = SHUTDOWN_SEND;
                        return None;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        buf
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        *readable = false;
                        return None;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => return None,
                    Err(_) => {
                        self.kill();
                        return None;
                    }
                }
            }
        };
        if resume_service {
            self.flush_tx();
        }
        // data.len() <= MAX_PKT_PAYLOAD.
        let n = data.len() as u32;
        let mut h = self.header(guest_cid, Op::Rw);
        h.len = n;
        self.rx_cnt += Wrapping(n);
        Some((h, data))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.state != State::Closed {
            if let Endpoint::Service { svc, .. } = &mut self.endpoint {
                svc.on_close();
            }
        }
    }
}
