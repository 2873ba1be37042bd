//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, so that
//! `curl --unix-socket SOCK http://localhost/v1/status` works. `pmsnap ctl` is its client.
//! The routes are documented in `docs/api.yaml` (OpenAPI 3) and `docs/api.md`.
//!
//! # Layers
//!
//! - [`request`]: pure parsing and validation, (method, target, body) to an
//!   [`ApiRequest`] or an [`ApiError`]; routing is a table ([`request::ROUTES`]).
//! - [`response`]: an [`ApiResponse`] or [`ApiError`] to a status and JSON body.
//! - [`http`]: HTTP framing on a stream (`httparse` parses the heads).
//! - [`server`]: the socket, the accept thread and one thread per connection (at most
//!   [`server::MAX_CONNECTIONS`]).
//! - [`client`]: a small blocking client, used by `pmsnap ctl` and the tests.
//!
//! # How the VMM plugs in
//!
//! The VMM implements [`ApiHandler`]: one call per valid request, answered with a typed
//! [`ApiResponse`] or a semantic [`ApiError`] (unknown snapshot, duplicate name, runs
//! outside guest RAM, VM in the wrong state). The server calls the handler from its
//! connection threads concurrently: a request that waits (a process snapshot waits for
//! the guest agent) must not hold up `status`, `pause` or a VM snapshot, so the handler
//! decides what to serialize (the VMM's [`crate::controller::Controller`] serializes the operations that change the VM or
//! the store, and waits for the guest outside that lock). A handler that owns its state
//! and wants one call at a time wraps itself with [`serialized`].
//!
//! ```no_run
//! use vmm::api::{ApiError, ApiHandler, ApiRequest, ApiResponse, ApiServer};
//!
//! struct Handler;
//! impl ApiHandler for Handler {
//!     fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
//!         Err(ApiError::NotImplemented(format!("{req:?}")))
//!     }
//! }
//! let server = ApiServer::start("/tmp/pmsnap.sock", Handler)?;
//! // ... run the VM ...
//! server.stop();
//! # Ok::<(), vmm::api::ServerError>(())
//! ```

pub mod client;
pub mod error;
pub mod http;
pub mod name;
pub mod request;
pub mod response;
pub mod server;
pub mod types;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use http::MAX_BODY_BYTES;
pub use name::{validate_snapshot_name, NameError, MAX_NAME_LEN};
pub use request::{parse_request, validate_labels, validate_runs};
pub use server::{ApiServer, ApiServerHandle, ServerError};
pub use types::*;

/// What the VMM implements to serve the API.
///
/// `handle` gets requests that passed the API layer's validation (see [`ApiRequest`] for
/// each variant's guarantees and expected answer). It must not panic on any input; if it
/// does, the server answers 500 and keeps serving.
pub trait ApiHandler: Send + Sync + 'static {
    /// Carry out one request. Called from several connection threads at once.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}

impl<F> ApiHandler for F
where
    F: Fn(ApiRequest) -> Result<ApiResponse, ApiError> + Send + Sync + 'static,
{
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self(request)
    }
}

/// A handler that owns mutable state, called one request at a time behind a mutex (a
/// panic in it leaves the state as it was when the panic happened; the server answers
/// 500 and keeps serving).
pub fn serialized<F>(f: F) -> impl ApiHandler
where
    F: FnMut(ApiRequest) -> Result<ApiResponse, ApiError> + Send + 'static,
{
    let f = std::sync::Mutex::new(f);
    move |request| (f.lock().unwrap_or_else(|p| p.into_inner()))(request)
}
