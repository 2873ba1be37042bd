//! The VMM end of the agent protocol on its vsock port: splits the guest's byte stream
//! into frames, decodes and validates every request against guest RAM, and hands only
//! well-formed requests to an [`AgentBackend`] (the snapshot engine implements it).
//! Every refusal is an error reply and a rate-limited log line; a frame whose header is
//! garbage ends the connection (the next frame boundary cannot be found), anything else
//! keeps it serving the next request.
//!
//! Who may connect: only guest sockets bound to a privileged vsock port (at most
//! [`MAX_PRIVILEGED_PORT`]), which the guest kernel lets only `CAP_NET_BIND_SERVICE`
//! (root, in practice the guest agent) bind. Everyone else gets RST. This is what lets
//! the service believe the guest uid each request names: the agent sets it from the
//! kernel's `SO_PEERCRED` for the application it serves (docs/protocol.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use guest_agent::protocol::{
    ErrorCode, ErrorReply, FrameBuffer, GuestRequest, ProtocolError, Reply, MAX_LIST_ENTRIES,
};

/// Highest guest source port the service accepts connections from (the privileged
/// ports, which only guest root can bind).
pub const MAX_PRIVILEGED_PORT: u32 = 1023;

/// Connections to the service open at once; more are reset. Each may buffer one frame
/// (at most `HEADER_LEN + MAX_PAYLOAD_LEN`, about 4 MiB), so this bounds what guest input
/// can make the VMM hold to about 32 MiB.
pub const MAX_SERVICE_CONNECTIONS: usize = 8;

/// Requests a connection may make in a burst, and per second after it; beyond, a
/// request gets a `Busy` error reply without being carried out (so a flood of cheap
/// requests cannot make the VMM produce large replies, such as lists, without end).
pub const REQUEST_BURST: f64 = 32.0;
/// See [`REQUEST_BURST`].
pub const REQUESTS_PER_SECOND: f64 = 64.0;

/// A token bucket: [`REQUEST_BURST`] tokens, refilled at [`REQUESTS_PER_SECOND`].
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    fn new() -> Self {
        Self {
            tokens: REQUEST_BURST,
            at: Instant::now(),
        }
    }

    /// Take a token at `now`; false when none is left.
    fn take(&mut self, now: Instant) -> bool {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + secs * REQUESTS_PER_SECOND).min(REQUEST_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

use super::connection::{VsockService, VsockServiceFactory};
use crate::guest_warn;

/// What the snapshot engine provides to the service. Requests arrive validated:
/// names follow the naming rule, runs lie inside guest RAM and within the limits
/// (together no more pages than guest RAM, restore targets disjoint), and they come
/// from guest root.
pub trait AgentBackend: Send {
    /// Carry out one request for the guest uid it names and produce the reply
    /// (`Reply::Error` for refusals such as an unknown name or another uid's snapshot).
    fn handle(&mut self, req: GuestRequest) -> Reply;
}

/// One connection's service.
pub struct AgentService {
    backend: Arc<Mutex<dyn AgentBackend>>,
    ram_pages: u64,
    frames: FrameBuffer,
    rate: RateLimit,
    /// The factory's count of open connections, decremented when this one goes.
    live: Option<Arc<AtomicUsize>>,
}

impl Drop for AgentService {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("ram_pages", &self.ram_pages)
            .field("pending", &self.frames.pending())
            .finish_non_exhaustive()
    }
}

fn encode(reply: &Reply, out: &mut Vec<u8>) {
    match reply.encode() {
        Ok(f) => out.extend_from_slice(&f),
        Err(e) => {
            log::error!("agent service: cannot encode reply: {e}");
            let fallback = Reply::Error(ErrorReply::new(ErrorCode::Internal, e.to_string()));
            if let Ok(f) = fallback.encode() {
                out.extend_from_slice(&f);
            }
        }
    }
}

fn refuse(e: &ProtocolError, out: &mut Vec<u8>) {
    guest_warn!("agent service: refusing request: {e}");
    encode(&Reply::Error(e.into()), out);
}

impl AgentService {
    /// A service for guest RAM of `ram_pages` pages.
    pub fn new(backend: Arc<Mutex<dyn AgentBackend>>, ram_pages: u64) -> Self {
        Self {
            backend,
            ram_pages,
            frames: FrameBuffer::new(),
            rate: RateLimit::new(),
            live: None,
        }
    }

    fn serve(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        if !self.rate.take(Instant::now()) {
            crate::guest_warn!(
                "agent service: rate limit: more than {REQUESTS_PER_SECOND} requests a second"
            );
            let e = ErrorReply::new(
                ErrorCode::Busy,
                format!(
                    "rate limit: at most {REQUESTS_PER_SECOND} requests a second per \
                     connection (bursts of {REQUEST_BURST}); retry later"
                ),
            );
            return encode(&Reply::Error(e), out);
        }
        let req = match GuestRequest::decode(frame)
            .and_then(|r| r.validate(self.ram_pages).map(|()| r))
        {
            Ok(r) => r,
            Err(e) => return refuse(&e, out),
        };
        let mut reply = self
            .backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handle(req);
        if let Reply::List(items) = &mut reply {
            items.truncate(MAX_LIST_ENTRIES);
        }
        encode(&reply, out);
    }
}

impl VsockService for AgentService {
    fn on_data(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        if let Err(e) = self.frames.push(data) {
            refuse(&e, out);
            return false;
        }
        loop {
            match self.frames.next_frame() {
                Ok(Some(frame)) => self.serve(&frame, out),
                Ok(None) => return !self.frames.is_poisoned(),
                Err(e) => {
                    refuse(&e, out);
                    return false;
                }
            }
        }
    }
}

/// Creates an [`AgentService`] per guest connection; register it on
/// `guest_agent::protocol::SNAPSHOT_SERVICE_PORT` with `Vsock::register_service`.
pub struct AgentServiceFactory {
    backend: Arc<Mutex<dyn AgentBackend>>,
    ram_pages: u64,
    live: Arc<AtomicUsize>,
}

impl std::fmt::Debug for AgentServiceFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentServiceFactory")
            .field("ram_pages", &self.ram_pages)
            .finish_non_exhaustive()
    }
}

impl AgentServiceFactory {
    /// Serve `backend` for guest RAM of `ram_pages` pages.
    pub fn new(backend: Arc<Mutex<dyn AgentBackend>>, ram_pages: u64) -> Self {
        Self {
            backend,
            ram_pages,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl VsockServiceFactory for AgentServiceFactory {
    fn accepts(&self, peer_port: u32) -> bool {
        if peer_port > MAX_PRIVILEGED_PORT {
            return false;
        }
        if self.live.load(Ordering::SeqCst) >= MAX_SERVICE_CONNECTIONS {
            crate::guest_warn!(
                "agent service: refusing a connection: {MAX_SERVICE_CONNECTIONS} are open"
            );
            return false;
        }
        true
    }

    fn connect(&mut self, _peer_port: u32) -> Box<dyn VsockService> {
        self.live.fetch_add(1, Ordering::SeqCst);
        let mut svc = AgentService::new(self.backend.clone(), self.ram_pages);
        svc.live = Some(self.live.clone());
        Box::new(svc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::{
        FrameHeader, FrameKind, Request, Run, SaveRequest, SnapshotInfo, HEADER_LEN,
    };
    use std::collections::BTreeMap;

    /// A stand-in for the engine: remembers names and page counts.
    #[derive(Default)]
    struct FakeBackend {
        snaps: BTreeMap<String, u64>,
        calls: usize,
    }

    impl AgentBackend for FakeBackend {
        fn handle(&mut self, req: GuestRequest) -> Reply {
            self.calls += 1;
            match req.op {
                Request::Save(s) => {
                    let pages = guest_agent::protocol::total_pages(&s.runs);
                    if self.snaps.contains_key(&s.name) {
                        return Reply::Error(ErrorReply::new(ErrorCode::AlreadyExists, s.name));
                    }
                    self.snaps.insert(s.name.clone(), pages);
                    Reply::Saved {
                        name: s.name,
                        pages,
                        present_pages: pages,
                    }
                }
                Request::Restore(r) => match self.snaps.get(&r.name) {
                    Some(&pages) => Reply::Restored {
                        name: r.name,
                        pages,
                    },
                    None => Reply::Error(ErrorReply::new(ErrorCode::NotFound, r.name)),
                },
                Request::List => Reply::List(
                    self.snaps
                        .iter()
                        .map(|(n, &p)| SnapshotInfo {
                            name: n.clone(),
                            uid: 0,
                            pid: 1,
                            comm: String::new(),
                            pages: p,
                            present_pages: p,
                            runs: 1,
                            created_unix: 0,
                        })
                        .collect(),
                ),
                Request::Delete { name } => match self.snaps.remove(&name) {
                    Some(_) => Reply::Deleted { name },
                    None => Reply::Error(ErrorReply::new(ErrorCode::NotFound, name)),
                },
            }
        }
    }

    fn req(op: Request) -> GuestRequest {
        GuestRequest::new(0, op)
    }

    fn save(name: &str, first: u64, count: u64) -> GuestRequest {
        req(Request::Save(SaveRequest {
            name: name.into(),
            pid: 7,
            comm: "t".into(),
            runs: vec![Run {
                guest_phys_first_page: first,
                count,
                virt_addr: 0x1000,
                present: true,
            }],
        }))
    }

    fn replies(bytes: &[u8]) -> Vec<Reply> {
        let mut fb = FrameBuffer::new();
        fb.push(bytes).expect("push");
        let mut v = Vec::new();
        while let Some(f) = fb.next_frame().expect("reply frame") {
            v.push(Reply::decode(&f).expect("reply"));
        }
        assert_eq!(fb.pending(), 0);
        v
    }

    fn code(r: &Reply) -> ErrorCode {
        match r {
            Reply::Error(e) => e.code,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    fn setup() -> (Arc<Mutex<FakeBackend>>, AgentService) {
        let b = Arc::new(Mutex::new(FakeBackend::default()));
        let svc = AgentService::new(b.clone(), 1000);
        (b, svc)
    }

    #[test]
    fn a_request_flood_gets_busy_replies_beyond_the_burst() {
        let (backend, mut svc) = setup();
        let mut stream = Vec::new();
        for _ in 0..200 {
            stream.extend(req(Request::List).encode().expect("encode"));
        }
        let mut out = Vec::new();
        assert!(svc.on_data(&stream, &mut out), "the connection stays");
        let r = replies(&out);
        assert_eq!(r.len(), 200, "every request gets an answer");
        let served = r.iter().filter(|r| matches!(r, Reply::List(_))).count();
        // The burst, plus what the bucket refilled while the loop ran (microseconds).
        assert!((32..=40).contains(&served), "{served} served");
        assert!(r[served..].iter().all(|r| code(r) == ErrorCode::Busy));
        assert_eq!(backend.lock().expect("lock").calls, served);
    }

    #[test]
    fn the_rate_limit_refills_with_time() {
        let t0 = Instant::now();
        let mut rl = RateLimit {
            tokens: 0.0,
            at: t0,
        };
        assert!(!rl.take(t0));
        // 64 a second: one token after 1/64 s, the burst at most after a long pause.
        assert!(rl.take(t0 + std::time::Duration::from_millis(16)));
        assert!(!rl.take(t0 + std::time::Duration::from_millis(16)));
        let later = t0 + std::time::Duration::from_secs(10);
        let granted = (0..100).filter(|_| rl.take(later)).count();
        assert_eq!(granted, 32);
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_until_one_closes() {
        let b: Arc<Mutex<dyn AgentBackend>> = Arc::new(Mutex::new(FakeBackend::default()));
        let mut f = AgentServiceFactory::new(b, 1000);
        assert!(!f.accepts(1024), "unprivileged ports never");
        let mut open: Vec<_> = (0..MAX_SERVICE_CONNECTIONS)
            .map(|_| {
                assert!(f.accepts(1000));
                f.connect(1000)
            })
            .collect();
        assert!(!f.accepts(1000), "the cap");
        open.pop();
        assert!(f.accepts(1000), "a closed connection frees its place");
    }

    #[test]
    fn serves_requests_in_pieces() {
        let (_, mut svc) = setup();
        let mut stream = save("a", 10, 5).encode().expect("encode");
        stream.extend(req(Request::List).encode().expect("encode"));
        stream.extend(
            req(Request::Delete { name: "a".into() })
                .encode()
                .expect("encode"),
        );
        let mut out = Vec::new();
        for chunk in stream.chunks(3) {
            assert!(svc.on_data(chunk, &mut out));
        }
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert!(matches!(&r[0], Reply::Saved { pages: 5, .. }));
        assert!(matches!(&r[1], Reply::List(l) if l.len() == 1 && l[0].name == "a"));
        assert!(matches!(&r[2], Reply::Deleted { name } if name == "a"));
    }

    #[test]
    fn invalid_requests_are_refused_and_service_continues() {
        let (backend, mut svc) = setup();
        let mut out = Vec::new();
        // Runs outside guest RAM, a bad name, an undecodable payload behind a good header.
        assert!(svc.on_data(&save("a", 999, 2).encode().expect("encode"), &mut out));
        assert!(svc.on_data(&save(".x", 1, 1).encode().expect("encode"), &mut out));
        let mut junk = FrameHeader {
            kind: FrameKind::Request,
            len: 2,
        }
        .to_bytes()
        .to_vec();
        junk.extend_from_slice(&[0xee, 0xee]);
        assert!(svc.on_data(&junk, &mut out));
        // A huge count.
        assert!(svc.on_data(&save("b", 0, u64::MAX).encode().expect("encode"), &mut out));
        // And a good request still works.
        assert!(svc.on_data(&save("ok", 1, 1).encode().expect("encode"), &mut out));
        let r = replies(&out);
        let codes: Vec<_> = r[..4].iter().map(code).collect();
        assert_eq!(
            codes,
            vec![
                ErrorCode::RunOutOfRange,
                ErrorCode::InvalidName,
                ErrorCode::BadFrame,
                ErrorCode::RunOutOfRange
            ]
        );
        assert!(matches!(&r[4], Reply::Saved { .. }));
        // Only the valid request reached the engine.
        assert_eq!(backend.lock().expect("lock").calls, 1);
    }

    #[test]
    fn only_privileged_source_ports_may_connect() {
        let f = AgentServiceFactory::new(Arc::new(Mutex::new(FakeBackend::default())), 1000);
        for port in [0, 512, 1023] {
            assert!(f.accepts(port), "{port}");
        }
        for port in [1024, 1025, 49152, u32::MAX] {
            assert!(!f.accepts(port), "{port}");
        }
    }

    #[test]
    fn page_bombs_are_refused_before_the_engine() {
        let (backend, mut svc) = setup();
        let mut out = Vec::new();
        // 2^32 absent pages in a guest of 1000 pages.
        let absent = req(Request::Save(SaveRequest {
            name: "bomb".into(),
            pid: 1,
            comm: "x".into(),
            runs: vec![Run {
                guest_phys_first_page: 0,
                count: 1 << 32,
                virt_addr: 0,
                present: false,
            }],
        }));
        assert!(svc.on_data(&absent.encode().expect("encode"), &mut out));
        // 65,536 overlapping restore target runs over the same page: more pages than
        // guest RAM; 500 of them: within RAM, but overlapping.
        let overlapping = |n| {
            req(Request::Restore(guest_agent::protocol::RestoreRequest {
                name: "bomb".into(),
                runs: vec![
                    Run {
                        guest_phys_first_page: 0,
                        count: 1,
                        virt_addr: 0,
                        present: true,
                    };
                    n
                ],
            }))
        };
        for n in [guest_agent::protocol::MAX_RUNS, 500] {
            assert!(svc.on_data(&overlapping(n).encode().expect("encode"), &mut out));
        }
        let r = replies(&out);
        assert_eq!(code(&r[0]), ErrorCode::TooLarge);
        assert_eq!(code(&r[1]), ErrorCode::TooLarge);
        assert_eq!(code(&r[2]), ErrorCode::RunOutOfRange);
        assert_eq!(backend.lock().expect("lock").calls, 0);
    }

    #[test]
    fn bad_headers_close_the_connection() {
        for (what, frame) in [
            ("wrong version", {
                let mut f = req(Request::List).encode().expect("encode");
                f[4] = 9;
                f
            }),
            ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            ("oversized", {
                let mut f = req(Request::List).encode().expect("encode");
                f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                f
            }),
        ] {
            let (backend, mut svc) = setup();
            let mut out = Vec::new();
            assert!(!svc.on_data(&frame, &mut out), "{what}");
            let r = replies(&out);
            assert_eq!(r.len(), 1, "{what}");
            let want = if what == "wrong version" {
                ErrorCode::UnsupportedVersion
            } else if what == "oversized" {
                ErrorCode::TooLarge
            } else {
                ErrorCode::BadFrame
            };
            assert_eq!(code(&r[0]), want, "{what}");
            assert_eq!(backend.lock().expect("lock").calls, 0);
        }
        // A reply frame sent to the service is a bad frame but framing is intact.
        let (_, mut svc) = setup();
        let mut out = Vec::new();
        let f = Reply::Deleted { name: "x".into() }
            .encode()
            .expect("encode");
        assert!(svc.on_data(&f, &mut out));
        assert_eq!(code(&replies(&out)[0]), ErrorCode::BadFrame);
        assert!(out.len() > HEADER_LEN);
    }
}
