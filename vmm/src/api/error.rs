//! [`ApiError`]: every way a request can fail, each with its HTTP status and a stable
//! machine-readable code. The body is always
//! `{"error": {"code": "<code>", "message": "<text>"}}`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::name::NameError;

/// A failed request. The API layer produces the transport and validation variants; the
/// VMM's handler produces the semantic ones (marked "handler" below).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApiError {
    /// 400 `bad_request`: the request is malformed (HTTP framing, path, headers).
    #[error("{0}")]
    BadRequest(String),
    /// 400 `invalid_json`: the body is not the JSON the route expects (syntax, types,
    /// missing or unknown fields, not UTF-8).
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// 400 `invalid_name`: a snapshot name breaks the name rule.
    #[error("invalid snapshot name {name:?}: {reason}")]
    InvalidName {
        /// The refused name (possibly cut for the message).
        name: String,
        /// Which part of the rule it breaks.
        reason: NameError,
    },
    /// 400 `invalid_runs`: empty run list, a zero count, overflow or overlapping runs.
    #[error("invalid page runs: {0}")]
    InvalidRuns(String),
    /// 400 `too_many_runs`: more runs than [`super::MAX_RUNS`].
    #[error("{count} page runs given; at most {max} are accepted per request")]
    TooManyRuns {
        /// Runs in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// 400 `invalid_labels`: too many labels, or a key or value out of bounds.
    #[error("invalid labels: {0}")]
    InvalidLabels(String),
    /// 404 `not_found`: no route for this path.
    #[error("no route for {0}")]
    NotFound(String),
    /// 405 `method_not_allowed`: the path exists but not with this method.
    #[error("method {method} is not allowed on {path}; allowed: {}", allowed.join(", "))]
    MethodNotAllowed {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
        /// Methods the route accepts (sent in the `Allow` header too).
        allowed: Vec<&'static str>,
    },
    /// 408 `request_timeout`: the client did not send a full request in time.
    #[error("request not received in time")]
    RequestTimeout,
    /// 411 `length_required`: a body without `Content-Length` (chunked is not supported).
    #[error("{0}")]
    LengthRequired(String),
    /// 413 `payload_too_large`: the body is larger than [`super::MAX_BODY_BYTES`].
    #[error("body of {len} bytes is larger than the limit of {max} bytes")]
    PayloadTooLarge {
        /// Declared body length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// 431 `headers_too_large`: the request head exceeds the limit.
    #[error("request head larger than {max} bytes or with more than {max_headers} headers")]
    HeadersTooLarge {
        /// Head size limit in bytes.
        max: usize,
        /// Header count limit.
        max_headers: usize,
    },
    /// 404 `unknown_snapshot` (handler): no snapshot with this name.
    #[error("no snapshot named {0:?}")]
    UnknownSnapshot(String),
    /// 409 `duplicate_name` (handler): a snapshot with this name exists.
    #[error("a snapshot named {0:?} already exists")]
    DuplicateName(String),
    /// 409 `invalid_state` (handler): the VM is not in a state that allows the request,
    /// e.g. not running.
    #[error("{0}")]
    InvalidState(String),
    /// 422 `runs_outside_ram` (handler): a run names pages outside guest RAM.
    #[error("{0}")]
    RunsOutsideRam(String),
    /// 500 `internal` (handler): the VMM failed to carry out a valid request.
    #[error("internal error: {0}")]
    Internal(String),
    /// 501 `not_implemented` (handler): this VMM does not support the request (yet).
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// 503 `unavailable`: the server is busy or the VMM is shutting down or did not answer.
    #[error("{0}")]
    Unavailable(String),
}

/// The JSON error body: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `duplicate_name`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// HTTP status code of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_)
            | ApiError::InvalidJson(_)
            | ApiError::InvalidName { .. }
            | ApiError::InvalidRuns(_)
            | ApiError::TooManyRuns { .. }
            | ApiError::InvalidLabels(_) => 400,
            ApiError::NotFound(_) | ApiError::UnknownSnapshot(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::RequestTimeout => 408,
            ApiError::DuplicateName(_) | ApiError::InvalidState(_) => 409,
            ApiError::LengthRequired(_) => 411,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::RunsOutsideRam(_) => 422,
            ApiError::HeadersTooLarge { .. } => 431,
            ApiError::Internal(_) => 500,
            ApiError::NotImplemented(_) => 501,
            ApiError::Unavailable(_) => 503,
        }
    }

    /// Stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidName { .. } => "invalid_name",
            ApiError::InvalidRuns(_) => "invalid_runs",
            ApiError::TooManyRuns { .. } => "too_many_runs",
            ApiError::InvalidLabels(_) => "invalid_labels",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::LengthRequired(_) => "length_required",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::UnknownSnapshot(_) => "unknown_snapshot",
            ApiError::DuplicateName(_) => "duplicate_name",
            ApiError::InvalidState(_) => "invalid_state",
            ApiError::RunsOutsideRam(_) => "runs_outside_ram",
            ApiError::Internal(_) => "internal",
            ApiError::NotImplemented(_) => "not_implemented",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    /// The JSON body for this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        }
    }

    /// Build an [`ApiError::InvalidName`], cutting very long names for the message.
    pub fn invalid_name(name: &str, reason: NameError) -> Self {
        const SHOWN: usize = 80;
        let shown = if name.len() > SHOWN {
            let mut cut = SHOWN;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}...", &name[..cut])
        } else {
            name.to_string()
        };
        ApiError::InvalidName {
            name: shown,
            reason,
        }
    }
}

// The errors of the layers below, as a client sees them. Every handler error reaches
// the API through one of these, so a given failure always gets the same status and code.

impl From<pmem_backend::PoolError> for ApiError {
    fn from(e: pmem_backend::PoolError) -> Self {
        use pmem_backend::PoolError;
        match e {
            PoolError::DuplicateName(n) => ApiError::DuplicateName(n),
            PoolError::NoSuchSnapshot(n) => ApiError::UnknownSnapshot(n),
            e @ PoolError::PageOutOfRange { .. } => ApiError::RunsOutsideRam(e.to_string()),
            e @ PoolError::InvalidArgument(_) => ApiError::BadRequest(e.to_string()),
            // The host's filesystem is full: the operator's to fix, not a VMM fault.
            e @ PoolError::Extend { .. } => ApiError::InvalidState(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::persist::load::LoadError> for ApiError {
    fn from(e: crate::persist::load::LoadError) -> Self {
        use crate::persist::load::LoadError;
        match e {
            LoadError::Pool(e) => e.into(),
            e @ LoadError::NotVm { .. } => ApiError::InvalidState(e.to_string()),
            LoadError::State(e) => ApiError::InvalidState(e.to_string()),
        }
    }
}

impl From<crate::snapshot::engine::DirtySinceError> for ApiError {
    fn from(e: crate::snapshot::engine::DirtySinceError) -> Self {
        use crate::snapshot::engine::DirtySinceError;
        match e {
            DirtySinceError::Pool(e) => e.into(),
            DirtySinceError::Dirty(e) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<crate::persist::PersistError> for ApiError {
    fn from(e: crate::persist::PersistError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<crate::vstate::vcpu::VcpuError> for ApiError {
    fn from(e: crate::vstate::vcpu::VcpuError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<crate::vstate::dirty::DirtyError> for ApiError {
    fn from(e: crate::vstate::dirty::DirtyError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_code_pairs() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::InvalidJson("x".into()), 400, "invalid_json"),
            (ApiError::NotFound("/x".into()), 404, "not_found"),
            (
                ApiError::MethodNotAllowed {
                    method: "PATCH".into(),
                    path: "/v1/status".into(),
                    allowed: vec!["GET"],
                },
                405,
                "method_not_allowed",
            ),
            (
                ApiError::UnknownSnapshot("a".into()),
                404,
                "unknown_snapshot",
            ),
            (ApiError::DuplicateName("a".into()), 409, "duplicate_name"),
            (
                ApiError::InvalidState("paused".into()),
                409,
                "invalid_state",
            ),
            (
                ApiError::RunsOutsideRam("x".into()),
                422,
                "runs_outside_ram",
            ),
            (ApiError::LengthRequired("x".into()), 411, "length_required"),
            (
                ApiError::PayloadTooLarge { len: 9, max: 1 },
                413,
                "payload_too_large",
            ),
            (ApiError::Internal("x".into()), 500, "internal"),
            (ApiError::NotImplemented("x".into()), 501, "not_implemented"),
            (ApiError::Unavailable("x".into()), 503, "unavailable"),
        ];
        for (err, status, code) in cases {
            assert_eq!(err.status(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(err.body().error.code, code);
        }
    }

    #[test]
    fn every_code_is_in_the_openapi_enum() {
        let doc = include_str!("../../../docs/api.yaml");
        let enum_start = doc.find("    ErrorCode:").expect("ErrorCode schema");
        let codes = &doc[enum_start..];
        let errors = [
            ApiError::BadRequest(String::new()),
            ApiError::InvalidJson(String::new()),
            ApiError::invalid_name("", NameError::Empty),
            ApiError::InvalidRuns(String::new()),
            ApiError::TooManyRuns { count: 0, max: 0 },
            ApiError::InvalidLabels(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed {
                method: String::new(),
                path: String::new(),
                allowed: vec![],
            },
            ApiError::RequestTimeout,
            ApiError::LengthRequired(String::new()),
            ApiError::PayloadTooLarge { len: 0, max: 0 },
            ApiError::HeadersTooLarge {
                max: 0,
                max_headers: 0,
            },
            ApiError::UnknownSnapshot(String::new()),
            ApiError::DuplicateName(String::new()),
            ApiError::InvalidState(String::new()),
            ApiError::RunsOutsideRam(String::new()),
            ApiError::Internal(String::new()),
            ApiError::NotImplemented(String::new()),
            ApiError::Unavailable(String::new()),
        ];
        for e in errors {
            assert!(
                codes.contains(&format!("        - {}\n", e.code())),
                "docs/api.yaml ErrorCode lacks {}",
                e.code()
            );
        }
    }

    #[test]
    fn body_serializes_as_documented() {
        let v = serde_json::to_value(ApiError::DuplicateName("s1".into()).body())
            .expect("plain struct serializes");
        assert_eq!(v["error"]["code"], "duplicate_name");
        assert_eq!(
            v["error"]["message"],
            "a snapshot named \"s1\" already exists"
        );
    }

    #[test]
    fn invalid_name_cuts_long_names_on_char_boundary() {
        let name = "é".repeat(100);
        match ApiError::invalid_name(&name, NameError::TooLong { len: 200 }) {
            ApiError::InvalidName { name, .. } => {
                assert!(name.ends_with("..."));
                assert!(name.len() <= 83);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn lower_layer_errors_map_to_stable_statuses() {
        use pmem_backend::PoolError;
        let cases: Vec<(ApiError, u16)> = vec![
            (PoolError::DuplicateName("a".into()).into(), 409),
            (PoolError::NoSuchSnapshot("a".into()).into(), 404),
            (PoolError::InvalidArgument("x".into()).into(), 400),
            (
                crate::persist::load::LoadError::NotVm {
                    name: "a".into(),
                    kind: "pages",
                }
                .into(),
                409,
            ),
            (
                crate::persist::load::LoadError::Pool(PoolError::NoSuchSnapshot("a".into())).into(),
                404,
            ),
            (
                crate::snapshot::engine::DirtySinceError::Pool(PoolError::NoSuchSnapshot(
                    "a".into(),
                ))
                .into(),
                404,
            ),
            (crate::vstate::vcpu::VcpuError::Gone(1).into(), 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.status(), status, "{e}");
        }
        assert_eq!(
            ApiError::from(PoolError::NoSuchSnapshot("s1".into())),
            ApiError::UnknownSnapshot("s1".into())
        );
    }
}
