//! Request parsing and validation, without sockets: (method, target, body) to an
//! [`ApiRequest`] or an [`ApiError`].
//!
//! Routing is table-driven: [`ROUTES`] lists each path pattern with the methods it accepts
//! and the function that parses the body. A path that matches no pattern is a 404; a path
//! that matches with a method the route does not list is a 405 naming the allowed ones.
//! Adding a route (say `POST /v1/snapshots/{name}/rollback`) is one line in the table, one
//! parse function and one [`ApiRequest`] variant.

use serde::Deserialize;

use super::error::ApiError;
use super::name::validate_snapshot_name;
use super::types::{
    ApiRequest, PageRun, PagesSnapshotRequest, MAX_LABELS, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN,
    MAX_RUNS, PAGE_SIZE,
};

/// Path parameters captured by a route pattern's `{name}` segments.
#[derive(Debug, Default)]
pub struct Params {
    values: Vec<(&'static str, String)>,
}

impl Params {
    /// The value captured for `{key}`.
    fn get(&self, key: &str) -> Result<&str, ApiError> {
        self.values
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| ApiError::Internal(format!("route has no parameter {key}")))
    }
}

/// Parses one route's body and parameters into a request.
pub type ParseFn = fn(&Params, &[u8]) -> Result<ApiRequest, ApiError>;

/// One entry of the route table.
#[derive(Debug)]
pub struct Route {
    /// Path pattern; `{x}` matches one non-empty segment and captures it as `x`.
    pub pattern: &'static str,
    /// Accepted methods, each with its parser.
    pub methods: &'static [(&'static str, ParseFn)],
}

/// The route table of API version 1.
pub const ROUTES: &[Route] = &[
    Route {
        pattern: "/v1/status",
        methods: &[("GET", parse_status)],
    },
    Route {
        pattern: "/v1/pause",
        methods: &[("PUT", parse_pause), ("POST", parse_pause)],
    },
    Route {
        pattern: "/v1/resume",
        methods: &[("PUT", parse_resume), ("POST", parse_resume)],
    },
    Route {
        pattern: "/v1/snapshots",
        methods: &[("GET", parse_list), ("POST", parse_create_pages)],
    },
    Route {
        pattern: "/v1/snapshots/{name}",
        methods: &[("GET", parse_inspect), ("DELETE", parse_delete)],
    },
    Route {
        pattern: "/v1/snapshots/{name}/dirty",
        methods: &[("GET", parse_dirty)],
    },
    Route {
        pattern: "/v1/stats",
        methods: &[("GET", parse_stats)],
    },
];

/// Parse and validate one request against [`ROUTES`].
///
/// `target` is the request target as sent (origin form `/v1/x?query`, or absolute form
/// `http://host/v1/x`); the query string is ignored.
pub fn parse_request(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let path = request_path(target)?;
    let mut allowed: Vec<&'static str> = Vec::new();
    for route in ROUTES {
        let Some(params) = match_pattern(route.pattern, path) else {
            continue;
        };
        if let Some((_, parse)) = route.methods.iter().find(|(m, _)| *m == method) {
            return parse(&params, body);
        }
        allowed.extend(route.methods.iter().map(|(m, _)| *m));
    }
    if allowed.is_empty() {
        Err(ApiError::NotFound(path.to_string()))
    } else {
        Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed,
        })
    }
}

/// The path part of a request target, without query or fragment, with at most one
/// trailing `/` removed.
fn request_path(target: &str) -> Result<&str, ApiError> {
    let mut path = target;
    // Absolute form, which HTTP/1.1 servers must accept.
    for scheme in ["http://", "https://"] {
        if let Some(rest) = path.strip_prefix(scheme) {
            path = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    if !path.starts_with('/') {
        return Err(ApiError::BadRequest(format!(
            "request target {target:?} is not an absolute path"
        )));
    }
    if let Some(i) = path.find(['?', '#']) {
        path = &path[..i];
    }
    if path.len() > 1 {
        path = path.strip_suffix('/').unwrap_or(path);
    }
    Ok(path)
}

/// Match `path` against `pattern`, capturing `{x}` segments.
fn match_pattern(pattern: &'static str, path: &str) -> Option<Params> {
    let mut params = Params::default();
    let mut pat = pattern.split('/');
    let mut segs = path.split('/');
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return Some(params),
            (Some(p), Some(s)) => {
                if let Some(key) = p.strip_prefix('{').and_then(|k| k.strip_suffix('}')) {
                    if s.is_empty() {
                        return None;
                    }
                    params.values.push((key, s.to_string()));
                } else if p != s {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

/// A body that must be empty or an empty JSON object (`{}`), as curl and other clients
/// send for bodiless PUT/POST.
fn expect_no_body(body: &[u8]) -> Result<(), ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    serde_json::from_slice::<Empty>(body)
        .map(|_| ())
        .map_err(|e| ApiError::InvalidJson(format!("this route takes no body or {{}}: {e}")))
}

fn parse_status(_: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::Status)
}

fn parse_stats(_: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::Stats)
}

fn parse_list(_: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::ListSnapshots)
}

fn parse_pause(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    expect_no_body(body)?;
    Ok(ApiRequest::Pause)
}

fn parse_resume(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    expect_no_body(body)?;
    Ok(ApiRequest::Resume)
}

/// The `{name}` parameter, checked against the name rule.
fn name_param(params: &Params) -> Result<String, ApiError> {
    let name = params.get("name")?;
    validate_snapshot_name(name).map_err(|e| ApiError::invalid_name(name, e))?;
    Ok(name.to_string())
}

fn parse_inspect(params: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::InspectSnapshot {
        name: name_param(params)?,
    })
}

fn parse_delete(params: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::DeleteSnapshot {
        name: name_param(params)?,
    })
}

fn parse_dirty(params: &Params, _: &[u8]) -> Result<ApiRequest, ApiError> {
    Ok(ApiRequest::DirtySince {
        name: name_param(params)?,
    })
}

fn parse_create_pages(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson(
            "empty body; expected {\"name\": ..., \"runs\": [{\"first_page\": N, \"count\": N}]}"
                .to_string(),
        ));
    }
    let mut req: PagesSnapshotRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    validate_snapshot_name(&req.name).map_err(|e| ApiError::invalid_name(&req.name, e))?;
    req.runs = validate_runs(req.runs)?;
    validate_labels(&req.labels)?;
    Ok(ApiRequest::CreatePagesSnapshot(req))
}

/// Check a list of page runs and return it sorted by `first_page`.
///
/// Refused: no runs, more than [`MAX_RUNS`], a zero count, a run whose end page or end
/// byte address overflows 64 bits, runs that overlap. Adjacent runs are accepted as
/// given. Whether the runs lie inside guest RAM is the handler's check.
pub fn validate_runs(mut runs: Vec<PageRun>) -> Result<Vec<PageRun>, ApiError> {
    if runs.is_empty() {
        return Err(ApiError::InvalidRuns("no page runs given".to_string()));
    }
    if runs.len() > MAX_RUNS {
        return Err(ApiError::TooManyRuns {
            count: runs.len(),
            max: MAX_RUNS,
        });
    }
    const MAX_END_PAGE: u64 = u64::MAX / PAGE_SIZE;
    for (i, run) in runs.iter().enumerate() {
        if run.count == 0 {
            return Err(ApiError::InvalidRuns(format!(
                "run {i} (first_page {}) has count 0",
                run.first_page
            )));
        }
        match run.end() {
            Some(end) if end <= MAX_END_PAGE => {}
            _ => {
                return Err(ApiError::InvalidRuns(format!(
                    "run {i} (first_page {}, count {}) ends beyond the 64-bit address space",
                    run.first_page, run.count
                )))
            }
        }
    }
    runs.sort_unstable();
    for pair in runs.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // `end` cannot overflow: checked above.
        if a.first_page + a.count > b.first_page {
            return Err(ApiError::InvalidRuns(format!(
                "runs {}:{} and {}:{} overlap",
                a.first_page, a.count, b.first_page, b.count
            )));
        }
    }
    Ok(runs)
}

/// Check labels: at most [`MAX_LABELS`]; keys 1..=[`MAX_LABEL_KEY_LEN`] bytes of printable
/// ASCII without `=`; values at most [`MAX_LABEL_VALUE_LEN`] bytes without control
/// characters.
pub fn validate_labels(
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::InvalidLabels(format!(
            "{} labels given; at most {MAX_LABELS} are accepted",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_LEN {
            return Err(ApiError::InvalidLabels(format!(
                "label key of {} bytes; keys must be 1 to {MAX_LABEL_KEY_LEN} bytes",
                k.len()
            )));
        }
        if !k.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
            return Err(ApiError::InvalidLabels(format!(
                "label key {k:?} must be printable ASCII without spaces or '='"
            )));
        }
        if v.len() > MAX_LABEL_VALUE_LEN {
            return Err(ApiError::InvalidLabels(format!(
                "value of label {k:?} is {} bytes; at most {MAX_LABEL_VALUE_LEN} are allowed",
                v.len()
            )));
        }
        if v.chars().any(char::is_control) {
            return Err(ApiError::InvalidLabels(format!(
                "value of label {k:?} holds a control character"
            )));
        }
    }
    Ok(())
}
