//! Integration tests of the control API over a real Unix socket, with a test-double
//! engine: the typed client, `pmsnap ctl` (as a library and as the binary), raw hostile
//! bytes, limits, the channel adapter, and curl when it is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm::api::client::{parse_response, ApiClient, ClientError, RawResponse};
use vmm::api::{
    serialized, ApiError, ApiHandler, ApiRequest, ApiResponse, ApiServer, ApiServerHandle,
    ApiStats, DirtyPages, HandlerTime, PageRun, PagesSnapshotRequest, ServerError, SnapshotInfo,
    VmState, VmStatus,
};
use vmm::cli::ctl::{send, CtlCommand};
use vmm::unix_socket::SocketError;

/// Guest RAM of the fake VM, in pages.
const RAM_PAGES: u64 = 1024;

/// A fake engine: snapshots in a map, a run state, and a set of written pages the test
/// can add to.
#[derive(Default)]
struct Fake {
    paused: bool,
    snapshots: BTreeMap<String, (SnapshotInfo, BTreeSet<u64>)>,
    written: Arc<Mutex<BTreeSet<u64>>>,
    faults: u64,
}

fn runs_of(pages: &BTreeSet<u64>) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some(r) if r.first_page + r.count == p => r.count += 1,
            _ => runs.push(PageRun {
                first_page: p,
                count: 1,
            }),
        }
    }
    runs
}

impl Fake {
    fn status(&self) -> VmStatus {
        VmStatus {
            state: if self.paused {
                VmState::Paused
            } else {
                VmState::Running
            },
            vcpus: 2,
            mem_bytes: RAM_PAGES * 4096,
            uptime_ms: 1234,
            pool_path: "/dev/shm/fake.pool".into(),
            version: vmm::api::VERSION.into(),
            lazy_fill: None,
        }
    }

    fn create(&mut self, req: PagesSnapshotRequest) -> Result<ApiResponse, ApiError> {
        if let Some(r) = req.runs.iter().find(|r| r.first_page + r.count > RAM_PAGES) {
            return Err(ApiError::RunsOutsideRam(format!(
                "run {}:{} ends beyond guest RAM ({RAM_PAGES} pages)",
                r.first_page, r.count
            )));
        }
        if self.snapshots.contains_key(&req.name) {
            return Err(ApiError::DuplicateName(req.name));
        }
        let info = SnapshotInfo {
            name: req.name.clone(),
            kind: "pages".into(),
            pages: req.runs.iter().map(|r| r.count).sum(),
            run_count: req.runs.len() as u64,
            runs: Some(req.runs),
            preserved_pages: 0,
            created_unix_ms: 1,
            labels: req.labels,
        };
        // Pages written from now on are dirty relative to this snapshot.
        let written_now = self.written.lock().expect("lock").clone();
        self.snapshots.insert(req.name, (info.clone(), written_now));
        Ok(ApiResponse::SnapshotCreated(info))
    }

    fn get(&self, name: &str) -> Result<&(SnapshotInfo, BTreeSet<u64>), ApiError> {
        self.snapshots
            .get(name)
            .ok_or_else(|| ApiError::UnknownSnapshot(name.to_string()))
    }
}

/// The test double behind the real server, one request at a time.
fn served(mut fake: Fake) -> impl ApiHandler {
    serialized(move |req| fake.handle(req))
}

impl Fake {
    fn handle(&mut self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        match req {
            ApiRequest::Status => Ok(ApiResponse::Status(self.status())),
            ApiRequest::SnapshotProcess(_) => Err(ApiError::InvalidState(
                "the test double has no guest agent".into(),
            )),
            ApiRequest::GrowPool { .. } | ApiRequest::ExportSnapshot { .. } => {
                Err(ApiError::InvalidState("the test double has no pool".into()))
            }
            ApiRequest::Pause => {
                self.paused = true;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::Resume if !self.paused => {
                Err(ApiError::InvalidState("the VM is not paused".into()))
            }
            ApiRequest::Resume => {
                self.paused = false;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::CreatePagesSnapshot(r) if r.name == "panic" => {
                panic!("test double panics on purpose")
            }
            ApiRequest::CreatePagesSnapshot(r) => self.create(r),
            ApiRequest::ListSnapshots => Ok(ApiResponse::Snapshots(
                self.snapshots
                    .values()
                    .map(|(i, _)| SnapshotInfo {
                        runs: None,
                        ..i.clone()
                    })
                    .collect(),
            )),
            ApiRequest::InspectSnapshot { name } => {
                Ok(ApiResponse::Snapshot(self.get(&name)?.0.clone()))
            }
            ApiRequest::DeleteSnapshot { name } => {
                self.get(&name)?;
                self.snapshots.remove(&name);
                Ok(ApiResponse::Deleted(name))
            }
            ApiRequest::CreateVmSnapshot { .. } | ApiRequest::RollbackVm { .. } => Err(
                ApiError::NotImplemented("VM snapshots in the test double".into()),
            ),
            ApiRequest::DirtySince { name } => {
                let before = &self.get(&name)?.1;
                let now = self.written.lock().expect("lock").clone();
                let dirty: BTreeSet<u64> = now.difference(before).copied().collect();
                Ok(ApiResponse::Dirty(DirtyPages {
                    since: name,
                    pages: dirty.len() as u64,
                    runs: runs_of(&dirty),
                }))
            }
            ApiRequest::Stats => {
                self.faults += 1;
                Ok(ApiResponse::Stats(ApiStats {
                    faults: self.faults,
                    preserved_pages: 3,
                    protected_pages: 7,
                    snapshots: self.snapshots.len() as u64,
                    fault_handler: HandlerTime {
                        total_ns: 900,
                        mean_ns: 300,
                        max_ns: 500,
                    },
                    store: serde_json::json!({"blocks_used": 3, "blocks_free": 61}),
                    guest_snapshots_dropped: 0,
                    block_wait: None,
                    events: Vec::new(),
                }))
            }
        }
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Option<ApiServerHandle>,
    written: Arc<Mutex<BTreeSet<u64>>>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let fake = Fake::default();
        let written = Arc::clone(&fake.written);
        let server = ApiServer::start(&path, served(fake)).expect("server starts");
        Env {
            _dir: dir,
            path,
            server: Some(server),
            written,
        }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.path)
    }

    /// The server still answers a normal request.
    fn assert_serving(&self) {
        let s = self.client().status().expect("server still serving");
        assert_eq!(s.vcpus, 2);
    }
}

fn api_err(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn req(name: &str, runs: &[(u64, u64)]) -> PagesSnapshotRequest {
    PagesSnapshotRequest {
        name: name.into(),
        runs: runs
            .iter()
            .map(|&(first_page, count)| PageRun { first_page, count })
            .collect(),
        labels: BTreeMap::new(),
        pause: false,
    }
}

/// Read one response from a keep-alive stream (framed by Content-Length).
fn read_one(stream: &mut UnixStream, buf: &mut Vec<u8>) -> RawResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().expect("numeric length"))
                .unwrap_or(0);
            let total = head_end + 4 + len;
            if buf.len() >= total {
                let resp = parse_response(&buf[..total]).expect("well-formed response");
                buf.drain(..total);
                return resp;
            }
        }
        assert!(Instant::now() < deadline, "no complete response in time");
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed before a full response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Send raw bytes (optionally half-closing), read until the server closes, parse.
fn raw_exchange(path: &Path, bytes: &[u8], half_close: bool) -> RawResponse {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    // A server that answers before reading (503 at the connection limit) may have
    // closed already: its answer is still there to read.
    if let Err(e) = s.write_all(bytes) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write: {e}");
    }
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // A reset after the full answer arrived is fine for this check.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !out.is_empty() => break,
            Err(e) => panic!("read failed: {e}"),
        }
    }
    parse_response(&out).unwrap_or_else(|e| panic!("bad answer {e}: {out:?}"))
}

fn error_code(resp: &RawResponse) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("JSON error body");
    v["error"]["code"].as_str().expect("code").to_string()
}

#[test]
fn every_route_through_the_typed_client() {
    let env = Env::new();
    let c = env.client();
    let s = c.status().expect("status");
    assert_eq!(s.state, VmState::Running);
    assert_eq!(s.mem_bytes, RAM_PAGES * 4096);

    assert_eq!(api_err(c.resume()).0, 409);
    assert_eq!(c.pause().expect("pause").state, VmState::Paused);
    assert_eq!(c.status().expect("status").state, VmState::Paused);
    assert_eq!(c.resume().expect("resume").state, VmState::Running);

    let mut r = req("s1", &[(100, 4), (0, 2)]);
    r.labels.insert("app".into(), "db".into());
    let info = c.create_pages_snapshot(&r).expect("create");
    assert_eq!(
        (info.name.as_str(), info.pages, info.run_count),
        ("s1", 6, 2)
    );
    // The API layer sorted the runs before the engine saw them.
    assert_eq!(
        info.runs.expect("runs")[0],
        PageRun {
            first_page: 0,
            count: 2
        }
    );

    let (status, code, msg) = api_err(c.create_pages_snapshot(&req("s1", &[(0, 1)])));
    assert_eq!((status, code.as_str()), (409, "duplicate_name"));
    assert!(msg.contains("s1"));
    let (status, code, _) = api_err(c.create_pages_snapshot(&req("s2", &[(1020, 5)])));
    assert_eq!((status, code.as_str()), (422, "runs_outside_ram"));
    let (status, code, _) = api_err(c.create_pages_snapshot(&req("bad name", &[(0, 1)])));
    assert_eq!((status, code.as_str()), (400, "invalid_name"));

    c.create_pages_snapshot(&req("s2", &[(10, 1)]))
        .expect("second");
    let list = c.list().expect("list");
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert_eq!(list[0].labels.get("app").map(String::as_str), Some("db"));

    let inspected = c.inspect("s1").expect("inspect");
    assert_eq!(inspected.runs.as_ref().map(Vec::len), Some(2));
    assert_eq!(api_err(c.inspect("nope")).1, "unknown_snapshot");

    env.written.lock().expect("lock").extend([5, 6, 7, 9]);
    let d = c.dirty("s1").expect("dirty");
    assert_eq!(d.pages, 4);
    assert_eq!(
        d.runs,
        vec![
            PageRun {
                first_page: 5,
                count: 3
            },
            PageRun {
                first_page: 9,
                count: 1
            }
        ]
    );
    assert_eq!(api_err(c.dirty("nope")).0, 404);

    let st = c.stats().expect("stats");
    assert_eq!((st.protected_pages, st.snapshots), (7, 2));
    assert_eq!(st.store["blocks_free"], 61);

    assert_eq!(c.delete("s1").expect("delete").deleted, "s1");
    assert_eq!(api_err(c.delete("s1")).1, "unknown_snapshot");
    assert_eq!(c.list().expect("list").len(), 1);
}

#[test]
fn ctl_commands_render_text_and_json() {
    let env = Env::new();
    let c = env.client();
    let snap = CtlCommand::SnapshotPages {
        name: "n1".into(),
        runs: vec![PageRun {
            first_page: 0,
            count: 16,
        }],
        labels: vec![("k".into(), "v".into())],
        pause: false,
    };
    let text = send(&c, &snap, false).expect("snapshot-pages");
    assert!(text.starts_with("created n1\n"), "{text}");
    assert!(text.contains("pages:     16 (64.0 KiB)"), "{text}");

    let json = send(&c, &CtlCommand::List, true).expect("list --json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["snapshots"][0]["name"], "n1");
    assert_eq!(v["snapshots"][0]["labels"]["k"], "v");

    let text = send(&c, &CtlCommand::Status, false).expect("status");
    assert!(text.contains("state:   running"), "{text}");
    let text = send(&c, &CtlCommand::Pause, false).expect("pause");
    assert!(text.contains("state:   paused"), "{text}");
    send(&c, &CtlCommand::Resume, false).expect("resume");

    env.written.lock().expect("lock").insert(3);
    let text = send(
        &c,
        &CtlCommand::Dirty {
            since: Some("n1".into()),
            since_flag: None,
        },
        false,
    )
    .expect("dirty");
    assert_eq!(
        text,
        "1 pages (4.0 KiB) written since n1 in 1 runs\n  3:1\n"
    );
    let text = send(&c, &CtlCommand::Stats, false).expect("stats");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["blocks", "free", "61"])),
        "{text}"
    );
    let text = send(&c, &CtlCommand::Inspect { name: "n1".into() }, false).expect("inspect");
    assert!(text.contains("    0:16\n"), "{text}");

    let err = send(&c, &CtlCommand::Delete { name: "zz".into() }, false).expect_err("unknown");
    assert!(matches!(err, ClientError::Api { status: 404, .. }));
    let text = send(&c, &CtlCommand::Delete { name: "n1".into() }, false).expect("delete");
    assert_eq!(text, "deleted n1\n");
    // A name that would break the request path is refused before sending.
    let err = send(&c, &CtlCommand::Inspect { name: "a/b".into() }, false).expect_err("bad");
    assert!(matches!(err, ClientError::InvalidName { .. }));
}

#[test]
fn ctl_binary_exit_codes_and_messages() {
    let env = Env::new();
    let bin = env!("CARGO_BIN_EXE_pmsnap");
    let sock = env.path.to_str().expect("UTF-8 temp path");
    let run = |args: &[&str]| {
        Command::new(bin)
            .args(["ctl", "--api-sock", sock])
            .args(args)
            .output()
            .expect("run pmsnap")
    };
    let out = run(&[
        "snapshot-pages",
        "--name",
        "b1",
        "--runs",
        "0:4,8:2",
        "--label",
        "x=y",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("created b1"));

    let out = run(&["snapshot-pages", "--name", "b1", "--runs", "0:1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("409"),
        "{err}"
    );

    // With --json the API's error is JSON on stdout too, with its status and code.
    let out = run(&["snapshot-pages", "b1", "--runs", "0:1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON error");
    assert_eq!(v["error"]["status"], 409, "{v}");
    assert_eq!(v["error"]["code"], "duplicate_name", "{v}");
    assert_eq!(v["error"]["exit_code"], 1, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("already exists")),
        "{v}"
    );

    for verb in ["list", "ls"] {
        let out = run(&[verb, "--json"]);
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["snapshots"][0]["pages"], 6);
        assert!(v["snapshots"][0]["created_unix_ms"].is_u64(), "{v}");
    }
    // Text: RFC 3339.
    let out = run(&["inspect", "b1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let created = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("created:"))
        .expect("created line");
    assert!(
        created.trim().ends_with('Z') && created.contains('T'),
        "{text}"
    );

    let out = run(&["snapshot-pages", "--name", "b2", "--runs", "0:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("count 0"));

    let out = Command::new(bin)
        .args(["ctl", "--api-sock", "/nonexistent/pmsnap.sock", "status"])
        .output()
        .expect("run pmsnap");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/pmsnap.sock"), "{err}");
}

#[test]
fn hostile_bytes_get_errors_and_the_server_keeps_serving() {
    let env = Env::new();
    let cases: Vec<(&str, Vec<u8>, bool, u16)> = vec![
        ("malformed request line", b"HELLO THERE\r\n\r\n".to_vec(), false, 400),
        ("garbage bytes", (0u8..=255).cycle().take(3000).collect(), false, 400),
        (
            "huge Content-Length",
            b"POST /v1/snapshots HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
            false,
            413,
        ),
        (
            "chunked body",
            b"POST /v1/snapshots HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            false,
            411,
        ),
        (
            "half-closed inside the head",
            b"GET /v1/status HTTP/1.1\r\nHost: x".to_vec(),
            true,
            400,
        ),
        (
            "half-closed inside the body",
            b"POST /v1/snapshots HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"name\":".to_vec(),
            true,
            400,
        ),
        (
            "bad UTF-8 in the body",
            {
                let body = b"{\"name\":\"\xff\xfe\xfd\",\"runs\":[]}";
                let head = format!(
                    "POST /v1/snapshots HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                [head.as_bytes(), body].concat()
            },
            false,
            400,
        ),
        (
            "bad UTF-8 in the path",
            b"GET /v1/snapshots/\xff\xfe HTTP/1.1\r\n\r\n".to_vec(),
            false,
            400,
        ),
        (
            "unknown route",
            b"GET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            false,
            404,
        ),
        (
            "wrong method",
            b"DELETE /v1/status HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            false,
            405,
        ),
        (
            "huge header",
            [
                b"GET /v1/status HTTP/1.1\r\nX: ".to_vec(),
                vec![b'a'; 20000],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
            false,
            431,
        ),
    ];
    for (what, bytes, half_close, status) in cases {
        let resp = raw_exchange(&env.path, &bytes, half_close);
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        error_code(&resp);
        env.assert_serving();
    }
    // A client that connects and goes away without a byte.
    drop(UnixStream::connect(&env.path).expect("connect"));
    env.assert_serving();
}

#[test]
fn keep_alive_pipelining_and_thousand_rapid_requests() {
    let env = Env::new();
    let mut s = UnixStream::connect(&env.path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = Vec::new();
    // Two pipelined requests in one write, then an error that keeps the connection.
    s.write_all(b"GET /v1/status HTTP/1.1\r\n\r\nGET /v1/stats HTTP/1.1\r\n\r\nGET /v1/snapshots/.x HTTP/1.1\r\n\r\n")
        .expect("write");
    assert_eq!(read_one(&mut s, &mut buf).status, 200);
    let stats = read_one(&mut s, &mut buf);
    assert_eq!(stats.status, 200);
    assert!(String::from_utf8_lossy(&stats.body).contains("blocks_used"));
    assert_eq!(read_one(&mut s, &mut buf).status, 400);

    let start = Instant::now();
    // 500 requests on the one keep-alive connection ...
    for i in 0..500 {
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        assert_eq!(read_one(&mut s, &mut buf).status, 200, "request {i}");
    }
    // ... and 500 on fresh connections.
    let c = env.client();
    for _ in 0..500 {
        c.status().expect("status");
    }
    let elapsed = start.elapsed();
    println!("1000 requests in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    assert!(env.server.as_ref().expect("server").requests_handled() >= 1002);
    env.assert_serving();
}

#[test]
fn slow_clients_neither_block_others_nor_exceed_the_limit() {
    let env = Env::new();
    // A client stuck in the middle of a head does not stall a second client.
    let mut slow = UnixStream::connect(&env.path).expect("connect");
    slow.write_all(b"GET /v1/sta").expect("write");
    env.assert_serving();

    // Fill the connection limit with idle connections; one more gets 503.
    let server = env.server.as_ref().expect("server");
    let mut idle = Vec::new();
    while server.active_connections() < vmm::api::server::MAX_CONNECTIONS {
        idle.push(UnixStream::connect(&env.path).expect("connect"));
        thread::sleep(Duration::from_millis(20));
    }
    let resp = raw_exchange(&env.path, b"GET /v1/status HTTP/1.1\r\n\r\n", false);
    assert_eq!(resp.status, 503);
    assert_eq!(error_code(&resp), "unavailable");
    drop(idle);
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.active_connections() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    env.assert_serving();
}

#[test]
fn handler_panic_is_a_500_and_serving_continues() {
    let env = Env::new();
    let (status, code, _) = api_err(env.client().create_pages_snapshot(&req("panic", &[(0, 1)])));
    assert_eq!((status, code.as_str()), (500, "internal"));
    env.assert_serving();
    env.client()
        .create_pages_snapshot(&req("after", &[(0, 1)]))
        .expect("handler state still usable");
}

#[test]
fn socket_file_lifecycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    // A stale socket (bound, nobody listening) is replaced.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = ApiServer::start(&path, served(Fake::default())).expect("replaces stale socket");
    ApiClient::new(&path).status().expect("serving");
    // A second server on a live socket is refused, and the first keeps serving.
    let err = ApiServer::start(&path, served(Fake::default())).expect_err("in use");
    assert!(
        matches!(err, ServerError::Socket(SocketError::InUse(_))),
        "{err}"
    );
    ApiClient::new(&path).status().expect("still serving");
    server.stop();
    assert!(!path.exists(), "stop removes the socket");

    let file = dir.path().join("regular");
    std::fs::write(&file, b"x").expect("write");
    let err = ApiServer::start(&file, served(Fake::default())).expect_err("not a socket");
    assert!(matches!(
        err,
        ServerError::Socket(SocketError::NotASocket(_))
    ));
    assert!(file.exists(), "a regular file is never removed");

    let err = ApiServer::start(dir.path().join("no/such/dir/s"), served(Fake::default()))
        .expect_err("bad dir");
    assert!(
        matches!(err, ServerError::Socket(SocketError::Bind { .. })),
        "{err}"
    );
}

#[test]
fn stop_is_prompt_with_idle_connections_open() {
    let env = Env::new();
    let _idle = UnixStream::connect(&env.path).expect("connect");
    let mut keep = UnixStream::connect(&env.path).expect("connect");
    keep.write_all(b"GET /v1/status HTTP/1.1\r\n\r\n")
        .expect("write");
    let mut buf = Vec::new();
    assert_eq!(read_one(&mut keep, &mut buf).status, 200);
    let mut env = env;
    let start = Instant::now();
    env.server.take().expect("server").stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(!env.path.exists());
}

/// A request that waits (a process snapshot waiting for a guest that never answers)
/// does not hold up the others: the server calls the handler concurrently, so status
/// is answered while the slow request is still open.
#[test]
fn a_waiting_request_does_not_block_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.sock");
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let entered_tx = Mutex::new(entered_tx);
    let release_rx = Mutex::new(release_rx);
    let handler = move |req: ApiRequest| match req {
        ApiRequest::SnapshotProcess(_) => {
            entered_tx.lock().expect("lock").send(()).expect("signal");
            // Wait like a process snapshot whose guest does not answer.
            let _ = release_rx
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(30));
            Err(ApiError::InvalidState(
                "the guest agent did not answer".into(),
            ))
        }
        ApiRequest::Status => Ok(ApiResponse::Status(Fake::default().status())),
        other => Err(ApiError::NotImplemented(format!("{other:?}"))),
    };
    let server = ApiServer::start(&path, handler).expect("start");
    let slow_path = path.clone();
    let slow = thread::spawn(move || {
        let mut s = UnixStream::connect(&slow_path).expect("connect");
        let body = r#"{"pid":1,"name":"p"}"#;
        write!(
            s,
            "POST /v1/process-snapshots HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut buf = Vec::new();
        read_one(&mut s, &mut buf).status
    });
    entered_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the slow request reached the handler");
    let start = Instant::now();
    let st = ApiClient::new(&path)
        .status()
        .expect("status while the other waits");
    assert_eq!(st.state, VmState::Running);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "status took {:?} behind a waiting request",
        start.elapsed()
    );
    release_tx.send(()).expect("release");
    assert_eq!(slow.join().expect("slow client"), 409);
    server.stop();
}

#[test]
fn curl_works_over_the_unix_socket() {
    // scripts/setup.sh installs curl.
    pmsnap_testenv::require!(
        "curl_works_over_the_unix_socket",
        pmsnap_testenv::tool_unavailable("curl")
    );
    let env = Env::new();
    let sock = env.path.to_str().expect("UTF-8 path");
    let curl = |args: &[&str]| -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket", sock, "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').expect("status line from -w");
        (code.parse().expect("numeric status"), body.to_string())
    };
    let (code, body) = curl(&["http://localhost/v1/status"]);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["state"], "running");

    let (code, _) = curl(&["-X", "PUT", "http://localhost/v1/pause"]);
    assert_eq!(code, 200);
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"name":"c1","runs":[{"first_page":0,"count":8}]}"#,
        "http://localhost/v1/snapshots",
    ]);
    assert_eq!(code, 201, "{body}");
    let (code, body) = curl(&["http://localhost/v1/snapshots/c1"]);
    assert_eq!(code, 200);
    assert!(body.contains("\"pages\":8"), "{body}");
    let (code, body) = curl(&["-X", "DELETE", "http://localhost/v1/snapshots/c1"]);
    assert_eq!((code, body.as_str()), (200, "{\"deleted\":\"c1\"}\n"));
    let (code, body) = curl(&["http://localhost/v1/nothing"]);
    assert_eq!(code, 404);
    assert!(body.contains("not_found"));

    // A body over the limit: curl may announce it with Expect: 100-continue; either way
    // the answer is 413 and the server keeps serving.
    let big_path = env._dir.path().join("big.json");
    std::fs::write(&big_path, vec![b' '; 2 << 20]).expect("write");
    let data = format!("@{}", big_path.display());
    let (code, _) = curl(&[
        "-X",
        "POST",
        "--data-binary",
        &data,
        "http://localhost/v1/snapshots",
    ]);
    assert_eq!(code, 413);
    // A body over 1 KiB but under the limit (curl versions that send Expect for it get
    // an interim 100 Continue).
    let runs: Vec<String> = (0..200)
        .map(|i| format!("{{\"first_page\":{},\"count\":1}}", i * 2))
        .collect();
    let body = format!("{{\"name\":\"many\",\"runs\":[{}]}}", runs.join(","));
    // With a 10 s expect timeout, an answer within 5 s shows the server sent 100 Continue.
    let start = Instant::now();
    let (code, resp) = curl(&[
        "--expect100-timeout",
        "10",
        "-X",
        "POST",
        "-H",
        "Expect: 100-continue",
        "-d",
        &body,
        "http://localhost/v1/snapshots",
    ]);
    assert_eq!(code, 201, "{resp}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    env.assert_serving();
}
