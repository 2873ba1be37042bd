//! The API server: a Unix socket, an accept thread and one thread per connection.
//!
//! - Start: [`ApiServer::start`] binds the socket with
//!   [`crate::unix_socket::bind_listener`] (a stale socket file that nobody listens on is
//!   replaced, a live one refused; owner-only, 0600), and starts the accept thread.
//! - Connections: up to [`MAX_CONNECTIONS`] at once, each on its own thread so one slow
//!   client cannot stall the others; a connection over the limit gets a 503 and is closed.
//!   Handler calls run concurrently; the handler serializes what it must (see
//!   [`super::ApiHandler`]).
//! - Stop: [`ApiServerHandle::stop`] (or dropping the handle) stops accepting, lets the
//!   connection threads finish their current request, and removes the socket file.
//!
//! Nothing a client sends can panic the server: the framing and parsing return errors,
//! and a panicking handler is caught and answered with a 500.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use thiserror::Error;

use super::error::ApiError;
use super::http::{write_all_until, HttpConn, ReadError};
use super::request::parse_request;
use super::response::HttpResponse;
use super::ApiHandler;
use crate::unix_socket::{bind_listener, SocketError, SocketFile};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Granularity at which blocked threads notice a stop.
const TICK: Duration = Duration::from_millis(100);
/// Time allowed to write one answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`ApiServerHandle::stop`] waits for connection threads.
const STOP_WAIT: Duration = Duration::from_secs(3);

/// Errors starting the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The API socket could not be bound (in use by a live process, not a socket, ...).
    #[error("API socket")]
    Socket(#[from] SocketError),
    /// Starting the accept thread failed.
    #[error("cannot start the API server thread")]
    Spawn(#[source] io::Error),
}

/// State shared by the accept thread, the connection threads and the handle.
struct Shared {
    stop: AtomicBool,
    active: AtomicUsize,
    requests: AtomicU64,
    handler: Box<dyn ApiHandler>,
}

/// Entry point of the API server.
#[derive(Debug)]
pub struct ApiServer;

impl ApiServer {
    /// Bind `path` and serve the API with `handler` until the returned handle is stopped
    /// or dropped.
    pub fn start<H: ApiHandler>(
        path: impl AsRef<Path>,
        handler: H,
    ) -> Result<ApiServerHandle, ServerError> {
        // Owner-only (bind_listener's 0600): the API can pause the VM and read snapshot
        // metadata.
        let (listener, file) = bind_listener(path.as_ref())?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            handler: Box::new(handler),
        });
        let accept_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("pmsnap-api".to_string())
            .spawn(move || {
                // Connection threads start from this one and inherit its filter.
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Api);
                accept_loop(listener, accept_shared)
            })
            .map_err(ServerError::Spawn)?;
        debug!("API server listening on {}", file.path().display());
        Ok(ApiServerHandle {
            file,
            shared,
            thread: Some(thread),
        })
    }
}

/// A running server. Dropping it stops the server like [`ApiServerHandle::stop`].
pub struct ApiServerHandle {
    file: SocketFile,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerHandle")
            .field("path", &self.file.path())
            .field("active", &self.shared.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl ApiServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Requests passed to the handler so far (valid requests only).
    pub fn requests_handled(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stop accepting, wait briefly for open connections to finish their current request,
    /// and remove the socket file.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        if thread.join().is_err() {
            warn!("API accept thread panicked");
        }
        let deadline = Instant::now() + STOP_WAIT;
        while self.shared.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        // Remove the socket only if it is still ours (not replaced by a newer server).
        self.file.remove_if_ours();
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Wait until `listener` is readable or [`TICK`] passes.
fn wait_readable(listener: &UnixListener) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1; the fd
    // belongs to `listener`, which outlives the call. poll only writes `revents`.
    unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as libc::c_int) };
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                wait_readable(&listener);
                continue;
            }
            Err(e) => {
                // EMFILE and similar: back off instead of spinning.
                warn!("API accept failed: {e}");
                thread::sleep(TICK);
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            refuse_busy(stream);
            continue;
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("pmsnap-api-conn".to_string())
            .spawn(move || {
                crate::seccomp::mark(crate::seccomp::ThreadKind::Api);
                serve_connection(stream, &conn_shared);
                conn_shared.active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            warn!("cannot start an API connection thread: {e}");
        }
    }
}

/// Answer 503 to a connection over the limit and close it.
fn refuse_busy(mut stream: UnixStream) {
    let resp = HttpResponse::from_error(&ApiError::Unavailable(format!(
        "too many API connections (limit {MAX_CONNECTIONS}); try again"
    )));
    if stream.set_write_timeout(Some(TICK)).is_ok() {
        // Best effort: the client may already be gone.
        let _ = stream.write_all(&resp.to_bytes(true));
    }
}

/// Serve requests on one connection until it closes, errs or the server stops.
fn serve_connection(stream: UnixStream, shared: &Shared) {
    // Timeouts turn blocking reads into ticks at which the stop flag is checked.
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(TICK)).is_err()
        || stream.set_write_timeout(Some(TICK)).is_err()
    {
        return;
    }
    let mut conn = HttpConn::new(stream);
    let should_stop = || shared.stop.load(Ordering::Acquire);
    loop {
        let raw = match conn.read_request(&should_stop) {
            Ok(Some(raw)) => raw,
            Ok(None) | Err(ReadError::Closed) => return,
            Err(ReadError::Http(err)) => {
                debug!("API: bad request: {err}");
                let bytes = HttpResponse::from_error(&err).to_bytes(true);
                if write_all_until(conn.stream(), &bytes, Instant::now() + WRITE_TIMEOUT).is_ok() {
                    linger_close(conn.stream());
                }
                return;
            }
        };
        let result =
            parse_request(&raw.method, &raw.target, &raw.body).and_then(|req| call(shared, req));
        let resp = HttpResponse::from_result(result);
        debug!("API: {} {} -> {}", raw.method, raw.target, resp.status);
        let close = raw.close || should_stop();
        let bytes = resp.to_bytes(close);
        if write_all_until(conn.stream(), &bytes, Instant::now() + WRITE_TIMEOUT).is_err() {
            return;
        }
        if close {
            linger_close(conn.stream());
            return;
        }
    }
}

/// Pass one valid request to the handler, catching a panic.
fn call(shared: &Shared, req: super::ApiRequest) -> Result<super::ApiResponse, ApiError> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    // A handler that panicked leaves its state to the handler's own care; the API keeps
    // serving.
    match catch_unwind(AssertUnwindSafe(|| shared.handler.handle(req))) {
        Ok(result) => {
            if let Err(e) = &result {
                if e.status() >= 500 {
                    warn!("API handler error: {e}");
                }
            }
            result
        }
        Err(_) => {
            warn!("API handler panicked");
            Err(ApiError::Internal(
                "the request handler panicked".to_string(),
            ))
        }
    }
}

/// Close after an answer without losing it: shut down our sending side, then read and
/// discard what the client still sends (bounded), so the kernel does not reset the
/// connection while the client reads the answer.
fn linger_close(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < (1 << 20) {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}
