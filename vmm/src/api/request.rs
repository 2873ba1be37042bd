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
    ApiRequest, PageRun, PagesSnapshotRequest, ProcessSnapshotRequest, MAX_LABELS,
    MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_RANGES, MAX_RUNS, PAGE_SIZE,
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
        pattern: "/v1/snapshots/{name}/export",
        methods: &[("POST", parse_export)],
    },
    Route {
        pattern: "/v1/stats",
        methods: &[("GET", parse_stats)],
    },
    Route {
        pattern: "/v1/process-snapshots",
        methods: &[("POST", parse_snapshot_process)],
    },
    Route {
        pattern: "/v1/vm-snapshots",
        methods: &[("POST", parse_create_vm)],
    },
    Route {
        pattern: "/v1/vm-snapshots/{name}/rollback",
        methods: &[("POST", parse_rollback)],
    },
    Route {
        pattern: "/v1/pool/grow",
        methods: &[("POST", parse_grow_pool)],
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

fn parse_snapshot_process(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let req: ProcessSnapshotRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    validate_snapshot_name(&req.name).map_err(|e| ApiError::invalid_name(&req.name, e))?;
    if req.pid == 0 {
        return Err(ApiError::BadRequest("pid 0 is not a process".into()));
    }
    if req.ranges.len() > MAX_RANGES {
        return Err(ApiError::BadRequest(format!(
            "{} ranges given; at most {MAX_RANGES} are accepted",
            req.ranges.len()
        )));
    }
    for r in &req.ranges {
        if r.start >= r.end || r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 {
            return Err(ApiError::BadRequest(format!(
                "range {:#x}-{:#x} is empty or not page aligned",
                r.start, r.end
            )));
        }
    }
    Ok(ApiRequest::SnapshotProcess(req))
}

fn parse_create_vm(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let req: super::types::VmSnapshotRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("{e}; expected {{\"name\": \"...\"}}")))?;
    validate_snapshot_name(&req.name).map_err(|e| ApiError::invalid_name(&req.name, e))?;
    Ok(ApiRequest::CreateVmSnapshot { name: req.name })
}

fn parse_rollback(params: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    expect_no_body(body)?;
    Ok(ApiRequest::RollbackVm {
        name: name_param(params)?,
    })
}

fn parse_export(params: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let req: super::types::ExportRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("{e}; expected {{\"to\": \"/path\"}}")))?;
    let s3 = req.to.starts_with("s3://");
    if !(req.to.starts_with('/') || s3) || req.to.len() > 4096 || req.to.contains('\0') {
        return Err(ApiError::BadRequest(format!(
            "\"to\" must be an absolute path or s3://BUCKET/PREFIX of at most 4096 bytes, \
             not {:?}",
            req.to
        )));
    }
    if s3 {
        pmsnap_repo::RepoLocation::parse(&req.to)
            .map_err(|e| ApiError::BadRequest(format!("\"to\": {e}")))?;
    }
    Ok(ApiRequest::ExportSnapshot {
        name: name_param(params)?,
        to: req.to,
    })
}

fn parse_grow_pool(_: &Params, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let req: super::types::GrowPoolRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidJson(format!("{e}; expected {{\"add_bytes\": N}}")))?;
    if req.add_bytes == 0 {
        return Err(ApiError::BadRequest(
            "add_bytes must be more than 0".to_string(),
        ));
    }
    Ok(ApiRequest::GrowPool {
        add_bytes: req.add_bytes,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_snapshot_requests_are_checked() {
        let ok = parse_request(
            "POST",
            "/v1/process-snapshots",
            br#"{"name":"p1","pid":42,"ranges":[{"start":4096,"end":8192}]}"#,
        )
        .expect("valid");
        assert!(
            matches!(ok, ApiRequest::SnapshotProcess(ref r) if r.pid == 42 && r.ranges.len() == 1)
        );
        let no_ranges = parse_request("POST", "/v1/process-snapshots", br#"{"name":"p","pid":1}"#);
        assert!(matches!(no_ranges, Ok(ApiRequest::SnapshotProcess(ref r)) if r.ranges.is_empty()));
        for (body, status) in [
            (&br#"{"name":"p","pid":0}"#[..], 400),
            (
                br#"{"name":"p","pid":1,"ranges":[{"start":1,"end":4096}]}"#,
                400,
            ),
            (
                br#"{"name":"p","pid":1,"ranges":[{"start":8192,"end":4096}]}"#,
                400,
            ),
            (br#"{"name":"../p","pid":1}"#, 400),
            (br#"{"name":"p"}"#, 400),
            (br#"{"name":"p","pid":1,"extra":1}"#, 400),
        ] {
            let e = parse_request("POST", "/v1/process-snapshots", body).expect_err("refused");
            assert_eq!(e.status(), status, "{}", String::from_utf8_lossy(body));
        }
        let many = format!(
            r#"{{"name":"p","pid":1,"ranges":[{}]}}"#,
            vec![r#"{"start":0,"end":4096}"#; MAX_RANGES + 1].join(",")
        );
        assert_eq!(
            parse_request("POST", "/v1/process-snapshots", many.as_bytes())
                .expect_err("too many")
                .status(),
            400
        );
        let e = parse_request("GET", "/v1/process-snapshots", b"").expect_err("GET");
        assert_eq!(e.status(), 405);
    }

    fn ok(method: &str, target: &str, body: &str) -> ApiRequest {
        parse_request(method, target, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {target} {body}: {e:?}"))
    }

    fn err(method: &str, target: &str, body: &str) -> ApiError {
        match parse_request(method, target, body.as_bytes()) {
            Ok(r) => panic!("{method} {target} {body} parsed as {r:?}"),
            Err(e) => e,
        }
    }

    fn run(first_page: u64, count: u64) -> PageRun {
        PageRun { first_page, count }
    }

    #[test]
    fn simple_routes() {
        assert_eq!(ok("GET", "/v1/status", ""), ApiRequest::Status);
        assert_eq!(ok("GET", "/v1/stats", ""), ApiRequest::Stats);
        assert_eq!(ok("GET", "/v1/snapshots", ""), ApiRequest::ListSnapshots);
        for m in ["PUT", "POST"] {
            assert_eq!(ok(m, "/v1/pause", ""), ApiRequest::Pause);
            assert_eq!(ok(m, "/v1/resume", ""), ApiRequest::Resume);
            assert_eq!(ok(m, "/v1/pause", " {} \n"), ApiRequest::Pause);
        }
    }

    #[test]
    fn export_needs_an_absolute_directory_or_a_bucket() {
        assert_eq!(
            ok(
                "POST",
                "/v1/snapshots/base/export",
                r#"{"to": "/srv/snaps"}"#
            ),
            ApiRequest::ExportSnapshot {
                name: "base".into(),
                to: "/srv/snaps".into()
            }
        );
        assert_eq!(
            ok(
                "POST",
                "/v1/snapshots/base/export",
                r#"{"to": "s3://pmsnap/a"}"#
            ),
            ApiRequest::ExportSnapshot {
                name: "base".into(),
                to: "s3://pmsnap/a".into()
            }
        );
        for bad in [
            r#"{"to": "s3://No_Bucket/x"}"#,
            r#"{"to": "rel/dir"}"#,
            r#"{"to": ""}"#,
            "{}",
            r#"{"to": "/x", "y": 1}"#,
        ] {
            assert!(
                parse_request("POST", "/v1/snapshots/base/export", bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn grow_pool_needs_a_positive_byte_count() {
        assert_eq!(
            ok("POST", "/v1/pool/grow", r#"{"add_bytes": 1048576}"#),
            ApiRequest::GrowPool { add_bytes: 1 << 20 }
        );
        for bad in [
            r#"{"add_bytes": 0}"#,
            r#"{"add_bytes": -1}"#,
            "{}",
            r#"{"x": 1}"#,
        ] {
            assert!(
                parse_request("POST", "/v1/pool/grow", bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert!(parse_request("GET", "/v1/pool/grow", b"").is_err());
    }

    #[test]
    fn name_routes() {
        let name = "snap-1.a_b".to_string();
        assert_eq!(
            ok("GET", "/v1/snapshots/snap-1.a_b", ""),
            ApiRequest::InspectSnapshot { name: name.clone() }
        );
        assert_eq!(
            ok("DELETE", "/v1/snapshots/snap-1.a_b", ""),
            ApiRequest::DeleteSnapshot { name: name.clone() }
        );
        assert_eq!(
            ok("GET", "/v1/snapshots/snap-1.a_b/dirty", ""),
            ApiRequest::DirtySince { name }
        );
    }

    #[test]
    fn targets_with_query_trailing_slash_and_absolute_form() {
        assert_eq!(ok("GET", "/v1/status?pretty=1", ""), ApiRequest::Status);
        assert_eq!(ok("GET", "/v1/status/", ""), ApiRequest::Status);
        assert_eq!(
            ok("GET", "http://localhost/v1/status", ""),
            ApiRequest::Status
        );
        assert_eq!(ok("GET", "/v1/snapshots/", ""), ApiRequest::ListSnapshots);
        assert_eq!(err("GET", "*", "").code(), "bad_request");
        assert_eq!(err("GET", "v1/status", "").code(), "bad_request");
    }

    #[test]
    fn unknown_routes_are_404() {
        for target in [
            "/",
            "/v1",
            "/v2/status",
            "/v1/statuss",
            "/v1/status/x",
            "/v1//status",
            "/v1/snapshots/a/b",
            "/v1/snapshots/a/dirty/x",
            "/v1/snapshots//dirty",
            "/V1/status",
        ] {
            let e = err("GET", target, "");
            assert_eq!(e.status(), 404, "{target}: {e:?}");
            assert_eq!(e.code(), "not_found");
        }
    }

    #[test]
    fn wrong_methods_are_405_with_allowed_list() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("POST", "/v1/status", &["GET"]),
            ("GET", "/v1/pause", &["PUT", "POST"]),
            ("DELETE", "/v1/resume", &["PUT", "POST"]),
            ("DELETE", "/v1/snapshots", &["GET", "POST"]),
            ("PUT", "/v1/snapshots/x", &["GET", "DELETE"]),
            ("POST", "/v1/snapshots/x/dirty", &["GET"]),
            ("PATCH", "/v1/stats", &["GET"]),
            ("get", "/v1/status", &["GET"]),
        ];
        for (method, target, allowed) in cases {
            match err(method, target, "") {
                ApiError::MethodNotAllowed {
                    allowed: got,
                    method: m,
                    ..
                } => {
                    assert_eq!(&got, allowed, "{method} {target}");
                    assert_eq!(&m, method);
                }
                other => panic!("{method} {target}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_names_in_paths_are_400() {
        for target in [
            "/v1/snapshots/.hidden",
            "/v1/snapshots/a%2Fb",
            "/v1/snapshots/a%20b/dirty",
            &format!("/v1/snapshots/{}", "x".repeat(65)),
        ] {
            let methods: &[&str] = if target.ends_with("/dirty") {
                &["GET"]
            } else {
                &["GET", "DELETE"]
            };
            for method in methods {
                let e = err(method, target, "");
                assert_eq!(e.code(), "invalid_name", "{method} {target}");
                assert_eq!(e.status(), 400);
            }
        }
    }

    #[test]
    fn pause_with_body_is_400() {
        assert_eq!(err("PUT", "/v1/pause", "{\"x\":1}").code(), "invalid_json");
        assert_eq!(err("POST", "/v1/resume", "nonsense").code(), "invalid_json");
    }

    #[test]
    fn create_snapshot_parses_sorts_and_keeps_labels() {
        let body = r#"{"name": "s1", "runs": [{"first_page": 100, "count": 5},
                       {"first_page": 0, "count": 1}, {"first_page": 105, "count": 3}],
                       "labels": {"app": "db", "k.v/x": "a b"}}"#;
        match ok("POST", "/v1/snapshots", body) {
            ApiRequest::CreatePagesSnapshot(req) => {
                assert_eq!(req.name, "s1");
                assert_eq!(req.runs, vec![run(0, 1), run(100, 5), run(105, 3)]);
                assert_eq!(req.labels.get("app").map(String::as_str), Some("db"));
                assert_eq!(req.labels.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        // Labels are optional.
        match ok(
            "POST",
            "/v1/snapshots",
            r#"{"name":"s","runs":[{"first_page":0,"count":1}]}"#,
        ) {
            ApiRequest::CreatePagesSnapshot(req) => assert!(req.labels.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_snapshot_bad_json_is_400() {
        let cases = [
            "",
            "   ",
            "{",
            "[]",
            "null",
            r#"{"runs":[{"first_page":0,"count":1}]}"#,
            r#"{"name":"s"}"#,
            r#"{"name":"s","runs":[{"first_page":0,"count":1}],"extra":1}"#,
            r#"{"name":"s","runs":[{"first_page":0,"count":1,"x":2}]}"#,
            r#"{"name":"s","runs":[{"first_page":0}]}"#,
            r#"{"name":"s","runs":[{"first_page":-1,"count":1}]}"#,
            r#"{"name":"s","runs":[{"first_page":1.5,"count":1}]}"#,
            r#"{"name":"s","runs":[{"first_page":"0","count":1}]}"#,
            r#"{"name":"s","runs":[{"first_page":18446744073709551616,"count":1}]}"#,
            r#"{"name":5,"runs":[]}"#,
            r#"{"name":"s","runs":{}}"#,
            r#"{"name":"s","runs":[],"labels":{"a":1}}"#,
            r#"{"name":"s","runs":[]} trailing"#,
        ];
        for body in cases {
            let e = err("POST", "/v1/snapshots", body);
            assert_eq!(e.code(), "invalid_json", "{body}: {e:?}");
            assert_eq!(e.status(), 400);
        }
        // Not UTF-8.
        let e = parse_request(
            "POST",
            "/v1/snapshots",
            b"{\"name\":\"\xff\xfe\",\"runs\":[]}",
        )
        .expect_err("bad UTF-8");
        assert_eq!(e.code(), "invalid_json");
    }

    #[test]
    fn create_snapshot_bad_names_are_400() {
        for name in ["", ".x", "a/b", "a b", "ünï", &"n".repeat(65)] {
            let body = serde_json::json!({"name": name, "runs": [{"first_page": 0, "count": 1}]});
            let e = err("POST", "/v1/snapshots", &body.to_string());
            assert_eq!(e.code(), "invalid_name", "{name:?}");
        }
    }

    #[test]
    fn create_snapshot_bad_runs_are_400() {
        let max_end = u64::MAX / PAGE_SIZE;
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (serde_json::json!([]), "invalid_runs"),
            (
                serde_json::json!([{"first_page": 5, "count": 0}]),
                "invalid_runs",
            ),
            (
                serde_json::json!([{"first_page": u64::MAX, "count": 1}]),
                "invalid_runs",
            ),
            (
                serde_json::json!([{"first_page": 1, "count": u64::MAX}]),
                "invalid_runs",
            ),
            (
                serde_json::json!([{"first_page": max_end, "count": 1}]),
                "invalid_runs",
            ),
            (
                serde_json::json!([{"first_page": 0, "count": 10}, {"first_page": 9, "count": 1}]),
                "invalid_runs",
            ),
            (
                serde_json::json!([{"first_page": 3, "count": 1}, {"first_page": 3, "count": 1}]),
                "invalid_runs",
            ),
        ];
        for (runs, code) in cases {
            let body = serde_json::json!({"name": "s", "runs": runs});
            let e = err("POST", "/v1/snapshots", &body.to_string());
            assert_eq!(e.code(), code, "{runs}: {e:?}");
            assert_eq!(e.status(), 400);
        }
        // The last page below the 64-bit limit is fine.
        let body =
            serde_json::json!({"name": "s", "runs": [{"first_page": max_end - 1, "count": 1}]});
        ok("POST", "/v1/snapshots", &body.to_string());
    }

    #[test]
    fn run_count_limit() {
        let runs = |n: u64| -> Vec<serde_json::Value> {
            (0..n)
                .map(|i| serde_json::json!({"first_page": i * 2, "count": 1}))
                .collect()
        };
        let at_limit = serde_json::json!({"name": "s", "runs": runs(MAX_RUNS as u64)});
        match ok("POST", "/v1/snapshots", &at_limit.to_string()) {
            ApiRequest::CreatePagesSnapshot(req) => assert_eq!(req.runs.len(), MAX_RUNS),
            other => panic!("{other:?}"),
        }
        let over = serde_json::json!({"name": "s", "runs": runs(MAX_RUNS as u64 + 1)});
        match err("POST", "/v1/snapshots", &over.to_string()) {
            ApiError::TooManyRuns { count, max } => {
                assert_eq!((count, max), (MAX_RUNS + 1, MAX_RUNS))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_labels_are_400() {
        let too_many: serde_json::Map<String, serde_json::Value> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), serde_json::json!("v")))
            .collect();
        let cases = vec![
            serde_json::Value::Object(too_many),
            serde_json::json!({"": "v"}),
            serde_json::json!({"a=b": "v"}),
            serde_json::json!({"a b": "v"}),
            serde_json::json!({"k".repeat(65): "v"}),
            serde_json::json!({"k": "v".repeat(257)}),
            serde_json::json!({"k": "line\nbreak"}),
        ];
        for labels in cases {
            let body = serde_json::json!({"name": "s", "runs": [{"first_page": 0, "count": 1}], "labels": labels});
            let e = err("POST", "/v1/snapshots", &body.to_string());
            assert_eq!(e.code(), "invalid_labels", "{labels}");
        }
    }

    #[test]
    fn every_route_and_method_is_documented_in_openapi() {
        let doc = include_str!("../../../docs/api.yaml");
        for route in ROUTES {
            let key = format!("\n  {}:\n", route.pattern);
            let start = doc
                .find(&key)
                .unwrap_or_else(|| panic!("docs/api.yaml lacks path {}", route.pattern));
            let block = &doc[start + key.len()..];
            // The path's block ends at the next path or section (two-space or no indent).
            let end = block
                .find("\n  /")
                .into_iter()
                .chain(block.find("\ncomponents:"))
                .min()
                .unwrap_or(block.len());
            let block = &block[..end];
            for (method, _) in route.methods {
                let m = format!("\n    {}:", method.to_ascii_lowercase());
                assert!(
                    format!("\n{block}").contains(&m),
                    "docs/api.yaml lacks {method} {}",
                    route.pattern
                );
            }
        }
    }

    proptest::proptest! {
        /// Whatever method, target and body arrive, parsing answers Ok or an error with a
        /// 4xx status; it never panics.
        #[test]
        fn parse_never_panics(
            method in "[A-Z]{0,8}",
            target in "(/v1(/[a-z.%_-]{0,12}){0,4})|(.{0,40})",
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        ) {
            if let Err(e) = parse_request(&method, &target, &body) {
                proptest::prop_assert!((400..500).contains(&e.status()), "{e:?}");
            }
        }

        /// Valid runs survive validation sorted and unchanged as a set.
        #[test]
        fn valid_runs_come_back_sorted(starts in proptest::collection::btree_set(0u64..1_000_000, 1..50)) {
            let runs: Vec<PageRun> = starts.iter().rev().map(|&s| run(s * 2, 1)).collect();
            let out = validate_runs(runs).expect("disjoint runs");
            proptest::prop_assert!(out.windows(2).all(|w| w[0].first_page < w[1].first_page));
            proptest::prop_assert_eq!(out.len(), starts.len());
        }
    }
}
