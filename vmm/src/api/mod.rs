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
//! connection threads, one call at a time (the handler sits behind a mutex), so a handler
//! that owns its state needs no locking of its own.
//!
//! A VMM whose event loop owns the VM state (Firecracker style) uses [`channel`] instead:
//! [`channel::api_channel`] returns a [`channel::ChannelHandler`] to give to the server
//! and a [`channel::ApiReceiver`] whose `EventFd` the event loop watches. Each request
//! travels as an [`channel::ApiCall`] and the API thread waits for the reply, so the VM
//! state never leaves the VMM thread.
//!
//! ```no_run
//! use vmm::api::{ApiError, ApiHandler, ApiRequest, ApiResponse, ApiServer};
//!
//! struct Engine;
//! impl ApiHandler for Engine {
//!     fn handle(&mut self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
//!         Err(ApiError::NotImplemented(format!("{req:?}")))
//!     }
//! }
//! let server = ApiServer::start("/tmp/pmsnap.sock", Engine)?;
//! // ... run the VM ...
//! server.stop();
//! # Ok::<(), vmm::api::ServerError>(())
//! ```

pub mod channel;
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
pub trait ApiHandler: Send + 'static {
    /// Carry out one request.
    fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}

impl<F> ApiHandler for F
where
    F: FnMut(ApiRequest) -> Result<ApiResponse, ApiError> + Send + 'static,
{
    fn handle(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self(request)
    }
}
