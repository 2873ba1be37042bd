//! A small blocking client for the control API, used by `pmsnap ctl` and the tests.
//!
//! One connection per request with `Connection: close`: the answer ends at end of stream,
//! and the client holds no state between calls.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

use super::error::ErrorBody;
use super::name::{validate_snapshot_name, NameError};
use super::types::{
    ApiStats, Deleted, DirtyPages, PagesSnapshotRequest, SnapshotInfo, SnapshotList, VmStatus,
};

/// Largest answer the client reads.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Errors of the client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot connect to the pmsnap API socket {path} (is the VMM running with --api-sock?)"
    )]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("API socket I/O failed")]
    Io(#[from] io::Error),
    /// The answer is not a well-formed HTTP response or not the expected JSON.
    #[error("malformed answer from the API: {0}")]
    BadResponse(String),
    /// The server answered with an error status.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Error code from the body (`duplicate_name`, ...).
        code: String,
        /// Error message from the body.
        message: String,
    },
    /// A snapshot name was refused before sending.
    #[error("invalid snapshot name {name:?}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        reason: NameError,
    },
}

/// A raw answer: status, headers of interest and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Client of one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the socket at `path`, with a 60 s I/O timeout.
    pub fn new(path: impl AsRef<Path>) -> Self {
        ApiClient {
            path: path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(60),
        }
    }

    /// The same client with another I/O timeout (for long requests such as an export).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send one request and read the whole answer, whatever its status.
    pub fn request_raw(
        &self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let body = body.unwrap_or(&[]);
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        stream.write_all(&bytes)?;
        let mut answer = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES as u64 + 1)
            .read_to_end(&mut answer)?;
        if answer.len() > MAX_RESPONSE_BYTES {
            return Err(ClientError::BadResponse(format!(
                "answer larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        parse_response(&answer)
    }

    /// Send one request with an optional JSON body; a 2xx answer's body is parsed as
    /// JSON, any other status becomes [`ClientError::Api`].
    pub fn request_json(
        &self,
        method: &str,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        let resp = self.request_raw(method, target, body.as_deref())?;
        check_status(&resp)?;
        serde_json::from_slice(&resp.body)
            .map_err(|e| ClientError::BadResponse(format!("body is not JSON: {e}")))
    }

    fn typed<T: DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let v = self.request_json(method, target, body)?;
        decode(v)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<VmStatus, ClientError> {
        self.typed("GET", "/v1/status", None)
    }

    /// `PUT /v1/pause`.
    pub fn pause(&self) -> Result<VmStatus, ClientError> {
        self.typed("PUT", "/v1/pause", None)
    }

    /// `PUT /v1/resume`.
    pub fn resume(&self) -> Result<VmStatus, ClientError> {
        self.typed("PUT", "/v1/resume", None)
    }

    /// `POST /v1/snapshots`.
    pub fn create_pages_snapshot(
        &self,
        req: &PagesSnapshotRequest,
    ) -> Result<SnapshotInfo, ClientError> {
        let body = serde_json::to_value(req)
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        self.typed("POST", "/v1/snapshots", Some(&body))
    }

    /// `GET /v1/snapshots`.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, ClientError> {
        Ok(self
            .typed::<SnapshotList>("GET", "/v1/snapshots", None)?
            .snapshots)
    }

    /// `GET /v1/snapshots/{name}`.
    pub fn inspect(&self, name: &str) -> Result<SnapshotInfo, ClientError> {
        self.typed("GET", &snapshot_path(name, "")?, None)
    }

    /// `DELETE /v1/snapshots/{name}`.
    pub fn delete(&self, name: &str) -> Result<Deleted, ClientError> {
        self.typed("DELETE", &snapshot_path(name, "")?, None)
    }

    /// `GET /v1/snapshots/{name}/dirty`.
    pub fn dirty(&self, name: &str) -> Result<DirtyPages, ClientError> {
        self.typed("GET", &snapshot_path(name, "/dirty")?, None)
    }

    /// `GET /v1/stats`.
    pub fn stats(&self) -> Result<ApiStats, ClientError> {
        self.typed("GET", "/v1/stats", None)
    }

    /// `POST /v1/vm-snapshots`: snapshot the whole VM.
    pub fn snapshot_vm(&self, name: &str) -> Result<crate::api::VmSnapshotCreated, ClientError> {
        snapshot_path(name, "")?;
        let body = serde_json::json!({ "name": name });
        self.typed("POST", "/v1/vm-snapshots", Some(&body))
    }

    /// `POST /v1/vm-snapshots/{name}/rollback`: roll the VM back in place.
    pub fn rollback(&self, name: &str) -> Result<crate::api::RolledBack, ClientError> {
        snapshot_path(name, "")?;
        self.typed("POST", &format!("/v1/vm-snapshots/{name}/rollback"), None)
    }
}

/// The path of a snapshot resource; the name is checked first, since a name with `/` or
/// spaces would change the path or break the request line.
pub fn snapshot_path(name: &str, suffix: &str) -> Result<String, ClientError> {
    validate_snapshot_name(name).map_err(|reason| ClientError::InvalidName {
        name: name.to_string(),
        reason,
    })?;
    Ok(format!("/v1/snapshots/{name}{suffix}"))
}

/// Decode a JSON value into a response type.
pub fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, ClientError> {
    serde_json::from_value(v)
        .map_err(|e| ClientError::BadResponse(format!("unexpected JSON shape: {e}")))
}

/// Turn a non-2xx answer into [`ClientError::Api`], using the error body when present.
pub fn check_status(resp: &RawResponse) -> Result<(), ClientError> {
    if (200..300).contains(&resp.status) {
        return Ok(());
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&resp.body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (
            "unknown".to_string(),
            String::from_utf8_lossy(&resp.body).trim().to_string(),
        ),
    };
    Err(ClientError::Api {
        status: resp.status,
        code,
        message,
    })
}

/// Parse a complete answer (head and body up to end of stream), skipping interim 1xx
/// answers.
pub fn parse_response(mut bytes: &[u8]) -> Result<RawResponse, ClientError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(bytes) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(ClientError::BadResponse(format!(
                    "connection closed inside the response head after {} bytes",
                    bytes.len()
                )))
            }
            Err(e) => return Err(ClientError::BadResponse(format!("invalid head: {e}"))),
        };
        let status = resp
            .code
            .ok_or_else(|| ClientError::BadResponse("no status code".to_string()))?;
        if (100..200).contains(&status) {
            bytes = &bytes[head_len..];
            continue;
        }
        let mut content_length = None;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let len = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| ClientError::BadResponse("bad Content-Length".to_string()))?;
                content_length = Some(len);
            }
        }
        let rest = &bytes[head_len..];
        let body = match content_length {
            Some(len) if rest.len() < len => {
                return Err(ClientError::BadResponse(format!(
                    "body cut short: {} of {len} bytes",
                    rest.len()
                )))
            }
            Some(len) => rest[..len].to_vec(),
            None => rest.to_vec(),
        };
        return Ok(RawResponse { status, body });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_and_skips_continue() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-Length: 55\r\n\r\n{\"error\":{\"code\":\"duplicate_name\",\"message\":\"exists\"}}\ntrailing";
        let r = parse_response(raw).expect("valid");
        assert_eq!(r.status, 409);
        assert_eq!(r.body.len(), 55);
        match check_status(&r) {
            Err(ClientError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (409, "duplicate_name", "exists")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn refuses_truncated_and_garbage_responses() {
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
            Err(ClientError::BadResponse(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent"),
            Err(ClientError::BadResponse(_))
        ));
        assert!(matches!(
            parse_response(b"\x00\x01garbage\r\n\r\n"),
            Err(ClientError::BadResponse(_))
        ));
        assert!(matches!(
            parse_response(b""),
            Err(ClientError::BadResponse(_))
        ));
    }

    #[test]
    fn non_json_error_body_is_kept_as_message() {
        let r = RawResponse {
            status: 502,
            body: b"proxy broke\n".to_vec(),
        };
        match check_status(&r) {
            Err(ClientError::Api { code, message, .. }) => {
                assert_eq!(code, "unknown");
                assert_eq!(message, "proxy broke");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn snapshot_path_validates_names() {
        assert_eq!(
            snapshot_path("s-1", "/dirty").expect("valid"),
            "/v1/snapshots/s-1/dirty"
        );
        assert!(matches!(
            snapshot_path("a b", ""),
            Err(ClientError::InvalidName { .. })
        ));
        assert!(matches!(
            snapshot_path("../x", ""),
            Err(ClientError::InvalidName { .. })
        ));
    }

    #[test]
    fn connect_error_names_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody.sock");
        let err = ApiClient::new(&path).status().expect_err("no server");
        let msg = err.to_string();
        assert!(msg.contains("nobody.sock"), "{msg}");
        assert!(matches!(err, ClientError::Connect { .. }));
    }
}
