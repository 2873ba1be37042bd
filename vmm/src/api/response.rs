//! Response building: an [`ApiResponse`] or [`ApiError`] to an HTTP status and JSON body,
//! and that to the bytes on the wire.

use serde::Serialize;

use super::error::ApiError;
use super::types::{ApiResponse, Deleted, SnapshotList};

/// A response ready to be written: status, JSON body, and the extra headers the API uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes (JSON followed by a newline, so curl output ends its line).
    pub body: Vec<u8>,
    /// Value of the `Allow` header (405 answers).
    pub allow: Option<String>,
}

/// Serialize `value` as a JSON body with a trailing newline.
fn json_body<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    let mut body = serde_json::to_vec(value)
        .map_err(|e| ApiError::Internal(format!("cannot serialize the response: {e}")))?;
    body.push(b'\n');
    Ok(body)
}

impl HttpResponse {
    /// The response for a handler's result.
    pub fn from_result(result: Result<ApiResponse, ApiError>) -> Self {
        match result.and_then(Self::try_from_response) {
            Ok(r) => r,
            Err(e) => Self::from_error(&e),
        }
    }

    fn try_from_response(resp: ApiResponse) -> Result<Self, ApiError> {
        let (status, body) = match resp {
            ApiResponse::Status(s) => (200, json_body(&s)?),
            ApiResponse::SnapshotCreated(s) => (201, json_body(&s)?),
            ApiResponse::Snapshot(s) => (200, json_body(&s)?),
            ApiResponse::Snapshots(snapshots) => (200, json_body(&SnapshotList { snapshots })?),
            ApiResponse::Deleted(deleted) => (200, json_body(&Deleted { deleted })?),
            ApiResponse::Dirty(d) => (200, json_body(&d)?),
            ApiResponse::Stats(s) => (200, json_body(&s)?),
            ApiResponse::Json { status, body } => {
                if !(200..300).contains(&status) || status == 204 {
                    return Err(ApiError::Internal(format!(
                        "handler answered with status {status}; errors must be ApiError values"
                    )));
                }
                (status, json_body(&body)?)
            }
        };
        Ok(HttpResponse {
            status,
            body,
            allow: None,
        })
    }

    /// The response for an error: its status and `{"error": {"code", "message"}}`.
    pub fn from_error(err: &ApiError) -> Self {
        let body = json_body(&err.body()).unwrap_or_else(|_| {
            // Two plain strings always serialize; keep a fixed body just in case.
            b"{\"error\":{\"code\":\"internal\",\"message\":\"unprintable error\"}}\n".to_vec()
        });
        let allow = match err {
            ApiError::MethodNotAllowed { allowed, .. } => Some(allowed.join(", ")),
            _ => None,
        };
        HttpResponse {
            status: err.status(),
            body,
            allow,
        }
    }

    /// The bytes on the wire: status line, headers, body. `close` adds `Connection: close`
    /// (the server then closes after writing).
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: pmsnap/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.status,
            reason_phrase(self.status),
            super::types::VERSION,
            self.body.len()
        );
        if let Some(allow) = &self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str(if close {
            "Connection: close\r\n\r\n"
        } else {
            "Connection: keep-alive\r\n\r\n"
        });
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Reason phrase for the statuses this API uses.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{VmState, VmStatus};

    fn status() -> VmStatus {
        VmStatus {
            state: VmState::Paused,
            vcpus: 2,
            mem_bytes: 1 << 28,
            uptime_ms: 5,
            pool_path: "/dev/shm/p".into(),
            version: "0.1.0".into(),
            lazy_fill: None,
        }
    }

    #[test]
    fn typed_responses_map_to_status_and_body() {
        let r = HttpResponse::from_result(Ok(ApiResponse::Status(status())));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("valid JSON");
        assert_eq!(v["state"], "paused");
        assert_eq!(v["mem_bytes"], 1u64 << 28);
        assert_eq!(*r.body.last().expect("non-empty"), b'\n');

        let r = HttpResponse::from_result(Ok(ApiResponse::Deleted("s".into())));
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"deleted\":\"s\"}\n");

        let r = HttpResponse::from_result(Ok(ApiResponse::Snapshots(vec![])));
        assert_eq!(r.body, b"{\"snapshots\":[]}\n");
    }

    #[test]
    fn handler_cannot_smuggle_an_error_status_through_json() {
        let r = HttpResponse::from_result(Ok(ApiResponse::Json {
            status: 404,
            body: serde_json::json!({}),
        }));
        assert_eq!(r.status, 500);
        let r = HttpResponse::from_result(Ok(ApiResponse::Json {
            status: 202,
            body: serde_json::json!({"ok": true}),
        }));
        assert_eq!(r.status, 202);
    }

    #[test]
    fn error_response_has_allow_header_and_framing() {
        let err = ApiError::MethodNotAllowed {
            method: "PATCH".into(),
            path: "/v1/pause".into(),
            allowed: vec!["PUT", "POST"],
        };
        let r = HttpResponse::from_error(&err);
        assert_eq!(r.status, 405);
        let bytes = String::from_utf8(r.to_bytes(true)).expect("ASCII head and JSON body");
        assert!(
            bytes.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{bytes}"
        );
        assert!(bytes.contains("\r\nAllow: PUT, POST\r\n"));
        assert!(bytes.contains("\r\nConnection: close\r\n\r\n"));
        assert!(bytes.contains(&format!("\r\nContent-Length: {}\r\n", r.body.len())));
        assert!(bytes.ends_with("}\n"));
    }
}
