//! A channel between the API threads and a VMM event loop that owns the VM state
//! (Firecracker style).
//!
//! [`api_channel`] gives a [`ChannelHandler`], which the server calls like any
//! [`ApiHandler`], and an [`ApiReceiver`] for the VMM thread. For each request the API
//! thread sends an [`ApiCall`], signals the receiver's `EventFd`, and waits (bounded by
//! the timeout) for the VMM thread to answer through [`ApiCall::respond`].
//!
//! In an event-manager subscriber: watch [`ApiReceiver::eventfd`] for `EPOLLIN`, and on
//! each event call [`ApiReceiver::take_pending`] and answer every call it returns.
//!
//! If the VMM thread answers after the timeout, the client has already been told 503 and
//! the late answer is dropped; the request may still have taken effect. Requests the VMM
//! knows to be slow should answer quickly and report progress through other routes.

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::ApiError;
use super::types::{ApiRequest, ApiResponse};
use super::ApiHandler;

/// Default time the API thread waits for the VMM thread's answer.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One request in flight from the API thread to the VMM thread.
#[derive(Debug)]
pub struct ApiCall {
    request: ApiRequest,
    reply: mpsc::SyncSender<Result<ApiResponse, ApiError>>,
}

impl ApiCall {
    /// The request to carry out.
    pub fn request(&self) -> &ApiRequest {
        &self.request
    }

    /// Send the answer back to the waiting API thread. An answer to a client that has
    /// given up (timeout) is dropped.
    pub fn respond(self, result: Result<ApiResponse, ApiError>) {
        // The API side holds one slot and reads at most one answer; a full or closed
        // channel only means it stopped waiting.
        let _ = self.reply.try_send(result);
    }

    /// Take the request out, keeping a reply handle.
    pub fn into_parts(self) -> (ApiRequest, ApiReply) {
        (self.request, ApiReply { reply: self.reply })
    }
}

/// The reply half of an [`ApiCall`], for VMMs that move the request elsewhere first.
#[derive(Debug)]
pub struct ApiReply {
    reply: mpsc::SyncSender<Result<ApiResponse, ApiError>>,
}

impl ApiReply {
    /// Send the answer back (see [`ApiCall::respond`]).
    pub fn respond(self, result: Result<ApiResponse, ApiError>) {
        let _ = self.reply.try_send(result);
    }
}

/// The API-thread side: an [`ApiHandler`] that forwards to the VMM thread.
#[derive(Debug)]
pub struct ChannelHandler {
    tx: mpsc::Sender<ApiCall>,
    evt: EventFd,
    timeout: Duration,
}

/// The VMM-thread side: receives [`ApiCall`]s.
#[derive(Debug)]
pub struct ApiReceiver {
    rx: mpsc::Receiver<ApiCall>,
    evt: EventFd,
}

/// Create a connected handler and receiver; the handler waits at most `timeout` for each
/// answer.
pub fn api_channel(timeout: Duration) -> std::io::Result<(ChannelHandler, ApiReceiver)> {
    let evt = EventFd::new(EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        ChannelHandler {
            tx,
            evt: evt.try_clone()?,
            timeout,
        },
        ApiReceiver { rx, evt },
    ))
}

impl ApiHandler for ChannelHandler {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send(ApiCall { request, reply })
            .map_err(|_| ApiError::Unavailable("the VMM is shutting down".to_string()))?;
        self.evt
            .write(1)
            .map_err(|e| ApiError::Internal(format!("cannot signal the VMM thread: {e}")))?;
        match answer.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(ApiError::Unavailable(format!(
                "the VMM did not answer within {} s",
                self.timeout.as_secs_f64()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(ApiError::Internal(
                "the VMM dropped the request without answering".to_string(),
            )),
        }
    }
}

impl ApiReceiver {
    /// The event fd signalled once per request sent; register it with the event loop.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Clear the event fd and return every request waiting now.
    pub fn take_pending(&self) -> Vec<ApiCall> {
        // EAGAIN only means the counter was already zero.
        let _ = self.evt.read();
        let mut calls = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(call) => calls.push(call),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return calls,
            }
        }
    }

    /// Block up to `timeout` for the next request (for VMMs and tests without an event
    /// loop). `None` on timeout or when the handler is gone.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<ApiCall> {
        self.rx.recv_timeout(timeout).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn request_round_trips_through_the_vmm_thread() {
        let (handler, rx) = api_channel(Duration::from_secs(5)).expect("eventfd");
        let vmm = thread::spawn(move || {
            let call = rx.recv_timeout(Duration::from_secs(5)).expect("a call");
            assert_eq!(call.request(), &ApiRequest::Stats);
            call.respond(Ok(ApiResponse::Deleted("x".into())));
            rx
        });
        assert_eq!(
            handler.handle(ApiRequest::Stats),
            Ok(ApiResponse::Deleted("x".into()))
        );
        let rx = vmm.join().expect("vmm thread");
        // The request was signalled on the eventfd; nothing is left pending.
        assert!(rx.take_pending().is_empty());
    }

    #[test]
    fn eventfd_signals_and_take_pending_drains() {
        let (handler, rx) = api_channel(Duration::from_millis(50)).expect("eventfd");
        // Nobody answers: the handler times out with 503, but the call is queued.
        let err = handler.handle(ApiRequest::Pause).expect_err("no answer");
        assert_eq!(err.status(), 503);
        assert_eq!(rx.eventfd().read().expect("signalled"), 1);
        let pending = rx.take_pending();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].request(), &ApiRequest::Pause);
        // Answering late is harmless.
        for call in pending {
            call.respond(Ok(ApiResponse::Deleted("late".into())));
        }
    }

    #[test]
    fn dropped_receiver_gives_unavailable_and_dropped_call_gives_internal() {
        let (handler, rx) = api_channel(Duration::from_secs(5)).expect("eventfd");
        let vmm = thread::spawn(move || {
            let call = rx.recv_timeout(Duration::from_secs(5)).expect("a call");
            drop(call);
            drop(rx);
        });
        let err = handler.handle(ApiRequest::Resume).expect_err("dropped");
        assert_eq!(err.code(), "internal");
        vmm.join().expect("vmm thread");
        let err = handler
            .handle(ApiRequest::Resume)
            .expect_err("receiver gone");
        assert_eq!(err.code(), "unavailable");
    }
}
