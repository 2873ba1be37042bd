//! Vsock tests without KVM: guest memory over anonymous pages, a test "driver" that lays
//! out virtqueues and buffers as Linux does, the real MMIO transport for activation and
//! notification, and a real event-manager loop for the fd wiring. Host programs are
//! real Unix streams.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};

use super::connection::{VsockService, CONN_BUF_ALLOC};
use super::device::{Vsock, EVQ, RXQ, TXQ};
use super::muxer::EchoService;
use super::packet::{Op, VsockHeader, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{VirtioDevice, VIRTIO_CONFIG_S_DRIVER_OK};
use crate::memory::GuestMemoryMmap;

const CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Driver side of one split virtqueue.
struct DriverQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Put a chain of (addr, len, device-writable) buffers on the available ring.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let mut flags = if w { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let d = self.desc + u64::from(idx) * 16;
            mem.write_obj(addr, GuestAddress(d)).expect("desc addr");
            mem.write_obj(len, GuestAddress(d + 8)).expect("desc len");
            mem.write_obj(flags, GuestAddress(d + 12))
                .expect("desc flags");
            mem.write_obj(self.next_desc, GuestAddress(d + 14))
                .expect("desc next");
        }
        let slot = self.avail + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        mem.write_obj(head, GuestAddress(slot)).expect("avail slot");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
        head
    }

    /// New used entries (id, len) since the last call.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("id");
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    transport: MmioTransport,
    em: EventManager<Arc<Mutex<Vsock>>>,
    q: [DriverQueue; 3],
    /// Rx chains posted: head -> buffer address.
    rx_bufs: std::collections::HashMap<u32, u64>,
    next_buf: u64,
    guest_fwd_cnt: u32,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("mem");
        let dev = Arc::new(Mutex::new(Vsock::new(CID, &path).expect("vsock")));
        let mut transport = MmioTransport::new(mem.clone(), dev.clone()).expect("transport");
        let q = [
            DriverQueue::new(0x1_0000),
            DriverQueue::new(0x2_0000),
            DriverQueue::new(0x3_0000),
        ];
        // The driver's bring-up sequence, through the registers.
        let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(0, off, &v.to_le_bytes());
        wr(&mut transport, 0x70, 0);
        wr(&mut transport, 0x70, 1);
        wr(&mut transport, 0x70, 3);
        wr(&mut transport, 0x24, 1);
        wr(&mut transport, 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
        wr(&mut transport, 0x70, 0xb);
        for (i, dq) in q.iter().enumerate() {
            wr(&mut transport, 0x30, i as u32);
            wr(&mut transport, 0x38, u32::from(QSIZE));
            wr(&mut transport, 0x80, dq.desc as u32);
            wr(&mut transport, 0x90, dq.avail as u32);
            wr(&mut transport, 0xa0, dq.used as u32);
            wr(&mut transport, 0x44, 1);
        }
        wr(&mut transport, 0x70, 0xf);
        let mut st = [0u8; 4];
        transport.read(0, 0x70, &mut st);
        assert_eq!(
            u32::from_le_bytes(st) & VIRTIO_CONFIG_S_DRIVER_OK,
            VIRTIO_CONFIG_S_DRIVER_OK
        );
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(dev.clone());
        Self {
            mem,
            dev,
            transport,
            em,
            q,
            rx_bufs: Default::default(),
            next_buf: 0x10_0000,
            guest_fwd_cnt: 0,
            _dir: dir,
            path,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(64);
        assert!(
            self.next_buf < MEM_SIZE as u64,
            "test ran out of buffer space"
        );
        a
    }

    /// Run the event loop until it goes idle.
    fn pump(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(0).expect("event loop") == 0 {
                return;
            }
        }
        panic!("event loop never went idle");
    }

    /// Notify queue `idx` the way the guest does: an MMIO write to QueueNotify.
    fn kick(&mut self, idx: u32) {
        self.transport.write(0, 0x50, &idx.to_le_bytes());
        self.pump();
    }

    fn ghdr(&self, op: Op, src_port: u32, dst_port: u32, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.guest_fwd_cnt,
        }
    }

    /// Queue a tx packet as Linux 6.1 does (header and payload in two descriptors).
    fn send_raw(&mut self, hdr: &VsockHeader, data: &[u8]) {
        let h = self.alloc(HDR_LEN as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .expect("hdr");
        let mut chain = vec![(h, HDR_LEN as u32, false)];
        if !data.is_empty() {
            let d = self.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(d)).expect("data");
            chain.push((d, data.len() as u32, false));
        }
        self.q[TXQ].add_chain(&self.mem, &chain);
        self.kick(TXQ as u32);
        let used = self.q[TXQ].take_used(&self.mem);
        assert_eq!(used.len(), 1, "tx chain returned");
    }

    fn send(&mut self, op: Op, src_port: u32, dst_port: u32, data: &[u8]) {
        let h = self.ghdr(op, src_port, dst_port, data.len() as u32);
        self.send_raw(&h, data);
    }

    /// Post `n` rx buffers (header + 4 KiB, one descriptor each as Linux does).
    fn post_rx(&mut self, n: usize) {
        self.post_rx_sized(n, 4096);
    }

    fn post_rx_sized(&mut self, n: usize, payload: u64) {
        for _ in 0..n {
            let len = HDR_LEN as u64 + payload;
            let a = self.alloc(len);
            let head = self.q[RXQ].add_chain(&self.mem, &[(a, len as u32, true)]);
            self.rx_bufs.insert(u32::from(head), a);
        }
        self.kick(RXQ as u32);
    }

    /// Packets the device put in rx buffers since the last call.
    fn recv(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        self.pump();
        let used = self.q[RXQ].take_used(&self.mem);
        used.into_iter()
            .map(|(id, len)| {
                let a = self.rx_bufs[&id];
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(a)).expect("read");
                let h = VsockHeader::parse(&b).expect("device wrote a header");
                assert_eq!(h.len as usize, b.len() - HDR_LEN, "used len matches header");
                (h, b[HDR_LEN..].to_vec())
            })
            .collect()
    }

    fn recv_one(&mut self) -> (VsockHeader, Vec<u8>) {
        let mut v = self.recv();
        assert_eq!(v.len(), 1, "expected one packet, got {v:?}");
        v.remove(0)
    }

    fn connections(&self) -> usize {
        self.dev.lock().expect("lock").muxer().connection_count()
    }
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("read line") == 1 && b[0] != b'\n' {
        out.push(b[0]);
    }
    String::from_utf8(out).expect("utf8")
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read");
    v
}

/// Host program connects, guest accepts; returns (host stream, host port).
fn host_connect(h: &mut Harness, guest_port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(&h.path).expect("connect to vsock socket");
    s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .expect("write");
    h.pump();
    let (req, _) = h.recv_one();
    assert_eq!(req.op, Op::Request as u16);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!(req.dst_port, guest_port);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    let host_port = req.src_port;
    h.send(Op::Response, guest_port, host_port, &[]);
    assert_eq!(read_line(&mut s), format!("OK {host_port}"));
    (s, host_port)
}

#[test]
fn config_space_holds_guest_cid() {
    let h = Harness::new();
    let mut b = [0u8; 8];
    h.dev.lock().expect("lock").read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b = [0u8; 4];
    h.dev.lock().expect("lock").read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
}

#[test]
fn host_connect_and_data_both_ways() {
    let mut h = Harness::new();
    h.post_rx(16);
    let (mut s, hp) = host_connect(&mut h, 1234);
    assert_eq!(h.connections(), 1);
    s.write_all(b"hello guest").expect("write");
    h.pump();
    let (p, d) = h.recv_one();
    assert_eq!((p.op, p.src_port, p.dst_port), (Op::Rw as u16, hp, 1234));
    assert_eq!(d, b"hello guest");
    h.send(Op::Rw, 1234, hp, b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");
    // Our next header reports the 10 forwarded bytes in fwd_cnt.
    s.write_all(b"x").expect("write");
    h.pump();
    let (p, _) = h.recv_one();
    assert_eq!(p.fwd_cnt, 10);
    // The guest interrupt fired for used buffers.
    assert_ne!(h.transport.interrupt().status() & 1, 0);
}

#[test]
fn credit_limits_what_the_guest_gets() {
    let mut h = Harness::new();
    h.post_rx(32);
    let (mut s, hp) = host_connect(&mut h, 77);
    // The guest shrinks its buffer to 100 bytes.
    let mut cu = h.ghdr(Op::CreditUpdate, 77, hp, 0);
    cu.buf_alloc = 100;
    h.send_raw(&cu, &[]);
    s.write_all(&[7u8; 250]).expect("write");
    h.pump();
    let got: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 100, "never more than the peer's credit");
    // The guest consumed 100 bytes and says so: 100 more may come.
    h.guest_fwd_cnt = 100;
    h.send_raw(
        &{
            let mut c = h.ghdr(Op::CreditUpdate, 77, hp, 0);
            c.buf_alloc = 100;
            c
        },
        &[],
    );
    let got: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 100);
    h.guest_fwd_cnt = 200;
    h.send_raw(
        &{
            let mut c = h.ghdr(Op::CreditUpdate, 77, hp, 0);
            c.buf_alloc = 100;
            c
        },
        &[],
    );
    let got: usize = h.recv().iter().map(|(_, d)| d.len()).sum();
    assert_eq!(got, 50);
    // CREDIT_REQUEST is answered with CREDIT_UPDATE.
    h.send(Op::CreditRequest, 77, hp, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::CreditUpdate as u16);
    assert_eq!(p.buf_alloc, CONN_BUF_ALLOC);
}

#[test]
fn credit_updates_follow_forwarding_and_overrun_is_reset() {
    let mut h = Harness::new();
    h.post_rx(64);
    let (mut s, hp) = host_connect(&mut h, 5);
    // Forward 64 KiB that the host reads: a credit update must follow.
    let chunk = vec![0x5au8; 32 * 1024];
    h.send(Op::Rw, 5, hp, &chunk);
    h.send(Op::Rw, 5, hp, &chunk);
    assert_eq!(read_n(&mut s, 64 * 1024).len(), 64 * 1024);
    let pkts = h.recv();
    let cu = pkts
        .iter()
        .find(|(p, _)| p.op == Op::CreditUpdate as u16)
        .expect("credit update after 64 KiB forwarded");
    assert_eq!(cu.0.fwd_cnt, 64 * 1024);
    // Now the host stops reading: the guest ignoring our credit gets an RST.
    let big = vec![1u8; 60 * 1024];
    let mut reset = false;
    for _ in 0..40 {
        h.send(Op::Rw, 5, hp, &big);
        if h.recv().iter().any(|(p, _)| p.op == Op::Rst as u16) {
            reset = true;
            break;
        }
    }
    assert!(
        reset,
        "overrunning CONN_BUF_ALLOC must reset the connection"
    );
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_shutdown_gets_rst_and_host_sees_eof() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (mut s, hp) = host_connect(&mut h, 9);
    h.send(Op::Rw, 9, hp, b"bye");
    let mut sd = h.ghdr(Op::Shutdown, 9, hp, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send_raw(&sd, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::Rst as u16);
    assert_eq!(h.connections(), 0);
    // The data before the shutdown arrived, then EOF.
    let mut all = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.read_to_end(&mut all).expect("read to eof");
    assert_eq!(all, b"bye");
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_ends_it() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (s, hp) = host_connect(&mut h, 11);
    drop(s);
    h.pump();
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::Shutdown as u16);
    assert_eq!(p.flags, SHUTDOWN_SEND);
    h.send(Op::Rst, 11, hp, &[]);
    assert_eq!(h.connections(), 0);
    assert!(h.recv().is_empty(), "no answer to an RST");
}

#[test]
fn guest_connects_to_unix_listener_or_gets_rst() {
    let mut h = Harness::new();
    h.post_rx(8);
    // Nobody on port 700: RST.
    h.send(Op::Request, 4000, 700, &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.src_port, p.dst_port), (Op::Rst as u16, 700, 4000));
    // A host program listening on PATH_701.
    let mut lp = h.path.clone().into_os_string();
    lp.push("_701");
    let listener = UnixListener::bind(&lp).expect("bind");
    h.send(Op::Request, 4001, 701, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(
        (p.op, p.src_port, p.dst_port),
        (Op::Response as u16, 701, 4001)
    );
    let (mut conn, _) = listener.accept().expect("accept");
    h.send(Op::Rw, 4001, 701, b"from guest");
    assert_eq!(read_n(&mut conn, 10), b"from guest");
    conn.write_all(b"from host").expect("write");
    h.pump();
    let (p, d) = h.recv_one();
    assert_eq!((p.op, d.as_slice()), (Op::Rw as u16, &b"from host"[..]));
    // A second REQUEST for the same pair is a protocol error: RST.
    h.send(Op::Request, 4001, 701, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::Rst as u16);
}

#[test]
fn in_vmm_service_echoes() {
    let mut h = Harness::new();
    h.dev
        .lock()
        .expect("lock")
        .register_service(
            52,
            Box::new(|_port| Box::new(EchoService) as Box<dyn VsockService>),
        )
        .expect("register");
    assert!(h
        .dev
        .lock()
        .expect("lock")
        .register_service(
            52,
            Box::new(|_port| Box::new(EchoService) as Box<dyn VsockService>)
        )
        .is_err());
    h.post_rx(8);
    h.send(Op::Request, 3333, 52, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::Response as u16);
    h.send(Op::Rw, 3333, 52, b"ping");
    let (p, d) = h.recv_one();
    assert_eq!((p.op, d.as_slice()), (Op::Rw as u16, &b"ping"[..]));
    assert_eq!(p.fwd_cnt, 4);
}

/// A service that answers once and closes.
struct OneShot;
impl VsockService for OneShot {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        out.extend_from_slice(&[data.len() as u8]);
        false
    }
}

#[test]
fn service_close_sends_shutdown() {
    let mut h = Harness::new();
    h.dev
        .lock()
        .expect("lock")
        .register_service(60, Box::new(|_| Box::new(OneShot) as Box<dyn VsockService>))
        .expect("register");
    h.post_rx(8);
    h.send(Op::Request, 10, 60, &[]);
    h.recv_one();
    h.send(Op::Rw, 10, 60, b"abc");
    let pkts = h.recv();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!(pkts[0].1, vec![3]);
    assert_eq!(pkts[1].0.op, Op::Shutdown as u16);
    assert_eq!(pkts[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    h.send(Op::Rst, 10, 60, &[]);
    assert_eq!(h.connections(), 0);
}

#[test]
fn hostile_headers_get_rst_and_nothing_breaks() {
    let mut h = Harness::new();
    h.post_rx(32);
    let base = h.ghdr(Op::Request, 1, 2, 0);
    let cases: Vec<(&str, VsockHeader)> = vec![
        (
            "wrong src cid",
            VsockHeader {
                src_cid: 99,
                ..base
            },
        ),
        ("wrong dst cid", VsockHeader { dst_cid: 7, ..base }),
        ("dgram type", VsockHeader { type_: 3, ..base }),
        ("op 0", VsockHeader { op: 0, ..base }),
        ("op 200", VsockHeader { op: 200, ..base }),
        (
            "len beyond max",
            VsockHeader {
                op: Op::Rw as u16,
                len: u32::MAX,
                ..base
            },
        ),
        (
            "len beyond chain",
            VsockHeader {
                op: Op::Rw as u16,
                len: 1000,
                ..base
            },
        ),
        (
            "rw on unknown connection",
            VsockHeader {
                op: Op::Rw as u16,
                ..base
            },
        ),
        (
            "shutdown on unknown connection",
            VsockHeader {
                op: Op::Shutdown as u16,
                ..base
            },
        ),
    ];
    for (what, hdr) in cases {
        h.send_raw(&hdr, &[]);
        let (p, _) = h.recv_one();
        assert_eq!(p.op, Op::Rst as u16, "{what}");
        assert_eq!((p.dst_cid, p.src_port, p.dst_port), (CID, 2, 1), "{what}");
    }
    // An RST for nothing is dropped silently.
    h.send_raw(
        &VsockHeader {
            op: Op::Rst as u16,
            ..base
        },
        &[],
    );
    assert!(h.recv().is_empty());
    // A chain too short for a header: returned, no answer (no ports to answer to).
    let a = h.alloc(16);
    h.q[TXQ].add_chain(&h.mem, &[(a, 16, false)]);
    h.kick(TXQ as u32);
    assert_eq!(h.q[TXQ].take_used(&h.mem).len(), 1);
    // A descriptor pointing outside guest memory.
    h.q[TXQ].add_chain(&h.mem, &[(MEM_SIZE as u64 - 8, 44, false)]);
    h.kick(TXQ as u32);
    assert_eq!(h.q[TXQ].take_used(&h.mem).len(), 1);
    assert!(h.recv().is_empty());
    // The device still works.
    h.dev
        .lock()
        .expect("lock")
        .register_service(
            52,
            Box::new(|_| Box::new(EchoService) as Box<dyn VsockService>),
        )
        .expect("register");
    h.send(Op::Request, 5, 52, &[]);
    assert_eq!(h.recv_one().0.op, Op::Response as u16);
}

#[test]
fn bad_connect_lines_and_refusals_close_the_host_stream() {
    let mut h = Harness::new();
    h.post_rx(8);
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 64]] {
        let mut s = UnixStream::connect(&h.path).expect("connect");
        s.write_all(line).expect("write");
        h.pump();
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut b = [0u8; 8];
        // Closed with our bytes unread shows as a reset; either way it is closed.
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{line:?}: stream should be closed: {other:?}"),
        }
    }
    assert!(h.recv().is_empty());
    // The guest refuses a host connection: the stream is closed.
    let mut s = UnixStream::connect(&h.path).expect("connect");
    s.write_all(b"CONNECT 8\n").expect("write");
    h.pump();
    let (req, _) = h.recv_one();
    h.send(Op::Rst, 8, req.src_port, &[]);
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).expect("closed"), 0);
    assert_eq!(h.connections(), 0);
}

#[test]
fn small_rx_buffers_are_returned_and_packets_wait_for_buffers() {
    let mut h = Harness::new();
    // No rx buffers yet: the REQUEST waits.
    let mut s = UnixStream::connect(&h.path).expect("connect");
    s.write_all(b"CONNECT 3\n").expect("write");
    h.pump();
    assert!(h.recv().is_empty());
    // A 20-byte buffer cannot hold a header: returned empty; the next one is used.
    let a = h.alloc(20);
    let head = h.q[RXQ].add_chain(&h.mem, &[(a, 20, true)]);
    h.rx_bufs.insert(u32::from(head), a);
    h.kick(RXQ as u32);
    let used = h.q[RXQ].take_used(&h.mem);
    assert_eq!(used, vec![(u32::from(head), 0)]);
    h.post_rx(1);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, Op::Request as u16);
    // Header and data split over two descriptors works too.
    h.send(Op::Response, 3, p.src_port, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", p.src_port));
    let hb = h.alloc(HDR_LEN as u64);
    let db = h.alloc(8);
    let head = h.q[RXQ].add_chain(&h.mem, &[(hb, HDR_LEN as u32, true), (db, 8, true)]);
    h.kick(RXQ as u32);
    s.write_all(b"0123456789").expect("write");
    h.pump();
    let used = h.q[RXQ].take_used(&h.mem);
    assert_eq!(used, vec![(u32::from(head), HDR_LEN as u32 + 8)]);
    let mut d = [0u8; 8];
    h.mem.read_slice(&mut d, GuestAddress(db)).expect("read");
    assert_eq!(&d, b"01234567");
}

#[test]
fn device_reset_drops_connections() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (mut s, _) = host_connect(&mut h, 1);
    h.transport.write(0, 0x70, &0u32.to_le_bytes());
    assert!(!h.dev.lock().expect("lock").is_activated());
    assert_eq!(h.connections(), 0);
    h.pump();
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut b = [0u8; 4];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("stream should be closed: {other:?}"),
    }
}

#[test]
fn event_queue_notify_is_harmless() {
    let mut h = Harness::new();
    let a = h.alloc(8);
    h.q[EVQ].add_chain(&h.mem, &[(a, 8, true)]);
    h.kick(EVQ as u32);
    // The event queue is only used for transport resets; the buffer stays with us.
    assert!(h.q[EVQ].take_used(&h.mem).is_empty());
    h.post_rx(1);
    let _ = host_connect(&mut h, 2);
}

#[test]
fn header_only_rx_buffers_do_not_spin() {
    let mut h = Harness::new();
    h.post_rx(1);
    let (mut s, hp) = host_connect(&mut h, 4);
    // Only a buffer with room for a header and no payload.
    let a = h.alloc(HDR_LEN as u64);
    let head = h.q[RXQ].add_chain(&h.mem, &[(a, HDR_LEN as u32, true)]);
    h.rx_bufs.insert(u32::from(head), a);
    h.kick(RXQ as u32);
    s.write_all(b"data").expect("write");
    h.pump(); // must return: nothing deliverable, the buffer stays available
    assert!(h.recv().is_empty());
    // A control packet fits in it.
    h.send(Op::CreditRequest, 4, hp, &[]);
    let (p, d) = h.recv_one();
    assert_eq!((p.op, d.len()), (Op::CreditUpdate as u16, 0));
    // With a real buffer the data flows.
    h.post_rx(1);
    let (p, d) = h.recv_one();
    assert_eq!((p.op, d.as_slice()), (Op::Rw as u16, &b"data"[..]));
}

/// Answers every valid request with `Deleted` so the test sees what passed validation.
struct NameEcho;
impl super::AgentBackend for NameEcho {
    fn handle(&mut self, req: guest_agent::protocol::GuestRequest) -> guest_agent::protocol::Reply {
        use guest_agent::protocol::{Reply, Request};
        match req.op {
            Request::Delete { name } => Reply::Deleted { name },
            _ => Reply::List(Vec::new()),
        }
    }
}

#[test]
fn agent_protocol_over_vsock() {
    use guest_agent::protocol::{
        ErrorCode, FrameBuffer, GuestRequest, Reply, Request, SNAPSHOT_SERVICE_PORT,
    };
    let mut h = Harness::new();
    let backend: Arc<Mutex<dyn super::AgentBackend>> = Arc::new(Mutex::new(NameEcho));
    h.dev
        .lock()
        .expect("lock")
        .register_service(
            SNAPSHOT_SERVICE_PORT,
            Box::new(super::AgentServiceFactory::new(backend, 4096)),
        )
        .expect("register");
    h.post_rx(16);
    // An unprivileged source port (any guest user can bind one): refused with RST.
    h.send(Op::Request, 2000, SNAPSHOT_SERVICE_PORT, &[]);
    assert_eq!(h.recv_one().0.op, Op::Rst as u16);
    // A privileged one (guest root, the agent): served.
    h.send(Op::Request, 900, SNAPSHOT_SERVICE_PORT, &[]);
    assert_eq!(h.recv_one().0.op, Op::Response as u16);
    let mut frames = GuestRequest::new(
        0,
        Request::Delete {
            name: "snap".into(),
        },
    )
    .encode()
    .expect("encode");
    frames.extend(
        GuestRequest::new(
            0,
            Request::Delete {
                name: "../etc".into(),
            },
        )
        .encode()
        .expect("encode"),
    );
    h.send(Op::Rw, 900, SNAPSHOT_SERVICE_PORT, &frames);
    let mut fb = FrameBuffer::new();
    for (p, d) in h.recv() {
        assert_eq!(p.op, Op::Rw as u16);
        fb.push(&d).expect("push");
    }
    let a = Reply::decode(&fb.next_frame().expect("frame").expect("first")).expect("reply");
    let b = Reply::decode(&fb.next_frame().expect("frame").expect("second")).expect("reply");
    assert_eq!(
        a,
        Reply::Deleted {
            name: "snap".into()
        }
    );
    assert!(matches!(b, Reply::Error(e) if e.code == ErrorCode::InvalidName));
    // Garbage ends the connection: error reply, then SHUTDOWN.
    h.send(Op::Rw, 900, SNAPSHOT_SERVICE_PORT, b"garbage garbage!");
    let pkts = h.recv();
    assert_eq!(pkts.last().map(|(p, _)| p.op), Some(Op::Shutdown as u16));
}

/// Answers every byte with 128 KiB: a guest that never reads must not make it grow.
struct Amplifier(Arc<std::sync::atomic::AtomicUsize>);
impl VsockService for Amplifier {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        self.0
            .fetch_add(data.len(), std::sync::atomic::Ordering::SeqCst);
        out.resize(out.len() + data.len() * 128 * 1024, 0x11);
        true
    }
}

#[test]
fn service_replies_are_bounded_by_backpressure() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let mut h = Harness::new();
    let fed = Arc::new(AtomicUsize::new(0));
    let f2 = fed.clone();
    h.dev
        .lock()
        .expect("lock")
        .register_service(
            70,
            Box::new(move |_| Box::new(Amplifier(f2.clone())) as Box<dyn VsockService>),
        )
        .expect("register");
    h.post_rx(1);
    h.send(Op::Request, 9, 70, &[]);
    assert_eq!(h.recv_one().0.op, Op::Response as u16);
    // No rx buffers: 24 one-byte requests; only the first 8 (1 MiB of replies) are fed.
    for _ in 0..24 {
        h.send(Op::Rw, 9, 70, b"x");
    }
    assert_eq!(fed.load(SeqCst), 8, "service fed beyond the reply limit");
    // Reading the replies lets the rest through, in order.
    h.guest_fwd_cnt = 0;
    let mut got = 0usize;
    for _ in 0..200 {
        h.post_rx_sized(1, 64 * 1024);
        for (p, d) in h.recv() {
            assert_eq!(p.op, Op::Rw as u16);
            got += d.len();
        }
        h.guest_fwd_cnt = got as u32;
        h.send(Op::CreditUpdate, 9, 70, &[]);
        if got == 24 * 128 * 1024 {
            break;
        }
    }
    assert_eq!(fed.load(SeqCst), 24);
    assert_eq!(got, 24 * 128 * 1024);
}

#[test]
fn restore_continues_rings_and_resets_guest_sockets() {
    let mut h = Harness::new();
    let ev = h.alloc(4);
    let ev_head = h.q[EVQ].add_chain(&h.mem, &[(ev, 4, true)]);
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(ev))
        .expect("poison");
    h.post_rx(8);
    let (s, _) = host_connect(&mut h, 21);
    drop(s);
    h.pump();
    h.recv(); // the SHUTDOWN for the closed stream
    let state = h.transport.save_state();
    assert!(state.queues[TXQ].next_avail > 0 && state.queues[RXQ].next_used > 0);

    // A new VMM process: fresh device, same guest memory, saved transport state.
    let dir = tempfile::tempdir().expect("tempdir");
    let dev2 = Arc::new(Mutex::new(
        Vsock::new(CID, &dir.path().join("v2.sock")).expect("vsock"),
    ));
    let t2 = MmioTransport::restore(h.mem.clone(), dev2.clone(), &state).expect("restore");
    assert!(dev2.lock().expect("lock").is_activated());
    assert!(dev2.lock().expect("lock").send_transport_reset());
    assert_eq!(h.q[EVQ].take_used(&h.mem), vec![(u32::from(ev_head), 4)]);
    let id: u32 = h.mem.read_obj(GuestAddress(ev)).expect("event");
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert_ne!(t2.interrupt().status() & 1, 0);
    // No second event buffer: reported, not a panic.
    assert!(!dev2.lock().expect("lock").send_transport_reset());

    // The rings continue where they were: one new tx chain gives exactly one used entry
    // and one answer (RST: nobody serves port 999 on the new host side).
    let hdr = h.ghdr(Op::Request, 5, 999, 0);
    let a = h.alloc(HDR_LEN as u64);
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(a))
        .expect("hdr");
    h.q[TXQ].add_chain(&h.mem, &[(a, HDR_LEN as u32, false)]);
    dev2.lock().expect("lock").process_queues();
    assert_eq!(h.q[TXQ].take_used(&h.mem).len(), 1);
    let used = h.q[RXQ].take_used(&h.mem);
    assert_eq!(used.len(), 1);
    let mut b = [0u8; HDR_LEN];
    h.mem
        .read_slice(&mut b, GuestAddress(h.rx_bufs[&used[0].0]))
        .expect("read");
    let p = VsockHeader::parse(&b).expect("header");
    assert_eq!((p.op, p.dst_port), (Op::Rst as u16, 5));
}
