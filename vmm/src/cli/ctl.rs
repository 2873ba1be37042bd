//! `pmsnap ctl --api-sock PATH <command>`: the command-line client of a running VMM's
//! control API (see `docs/api.md`).
//!
//! Exit codes: 0 on success, 1 when the VMM answers with an error (its message is
//! printed; with `--json` also as JSON on stdout) or the socket cannot be reached, 2 on a
//! usage error.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use guest_agent::cli::{exit, format_time_ms, json_error, parse_number, parse_range, NameArg};

use super::anyhow_like::context;
use crate::api::client::{decode, snapshot_path, ApiClient, ClientError};
use crate::api::{
    ApiStats, Deleted, DirtyPages, PageRun, PagesSnapshotRequest, ProcessSnapshotRequest,
    SnapshotInfo, SnapshotList, VirtRange, VmStatus, PAGE_SIZE,
};

/// Arguments of `pmsnap ctl`.
#[derive(Debug, Args)]
#[command(after_help = exit::HELP)]
pub struct CtlArgs {
    /// The VMM's API socket (`pmsnap run --api-sock PATH`); required.
    #[arg(
        long,
        value_name = "PATH",
        global = true,
        env = "PMSNAP_API_SOCK",
        hide_env_values = true
    )]
    pub api_sock: Option<PathBuf>,
    /// Print the VMM's JSON answer instead of text (errors too, on stdout; times in unix
    /// milliseconds).
    #[arg(long, global = true)]
    pub json: bool,
    /// The request to send.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Requests `pmsnap ctl` can send.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show the VM's state, size, uptime and pool.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Snapshot runs of guest pages (no page data is copied).
    SnapshotPages {
        #[command(flatten)]
        name: NameArg,
        /// Page runs FIRST_PAGE:COUNT[,FIRST_PAGE:COUNT...]; numbers in decimal, or hex
        /// with 0x.
        #[arg(long, value_name = "FIRST:COUNT", value_delimiter = ',', value_parser = parse_run, required = true)]
        runs: Vec<PageRun>,
        /// A label KEY=VALUE stored with the snapshot; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Pause the vCPUs around the snapshot (one instant for all pages; the pages are
        /// write-protected before the pause, so it stays short).
        #[arg(long)]
        pause: bool,
    },
    /// List snapshots.
    #[command(visible_alias = "ls")]
    List,
    /// Show one snapshot, with its page runs.
    Inspect {
        #[command(flatten)]
        name: NameArg,
    },
    /// Delete a snapshot.
    #[command(visible_alias = "rm")]
    Delete {
        #[command(flatten)]
        name: NameArg,
    },
    /// Show the guest pages written since a snapshot was taken.
    Dirty {
        /// The snapshot (`--since NAME` is accepted too).
        #[arg(value_name = "NAME", required_unless_present = "since_flag")]
        since: Option<String>,
        /// The older spelling of NAME.
        #[arg(
            long = "since",
            value_name = "NAME",
            hide = true,
            conflicts_with = "since"
        )]
        since_flag: Option<String>,
    },
    /// Show copy-before-write and store statistics.
    Stats,
    /// Snapshot a guest process through the guest agent (needs --vsock-sock on the VMM
    /// and `pmsnap-agent serve` in the guest, which the default image starts).
    #[command(
        after_help = "Numbers are decimal, or hex with 0x: 4096-8192 and 0x1000-0x2000 are the same range."
    )]
    SnapshotProcess {
        #[command(flatten)]
        name: NameArg,
        /// Guest pid.
        #[arg(long)]
        pid: u32,
        /// A virtual range START-END, page aligned, to save; repeat for more. Default:
        /// every writable private mapping of the process.
        #[arg(long = "range", value_name = "START-END", value_parser = range_arg)]
        ranges: Vec<VirtRange>,
    },
    /// Snapshot the whole VM (vCPU, VM and device state; no page data copied).
    SnapshotVm {
        #[command(flatten)]
        name: NameArg,
    },
    /// Roll the running VM back to a VM snapshot, in place.
    Rollback {
        #[command(flatten)]
        name: NameArg,
    },
    /// Write a snapshot into a repository (a directory or an S3 bucket) while the guest
    /// runs (the snapshot is immutable; pages the guest writes meanwhile are preserved
    /// first). Waits up to an hour; the VMM logs progress.
    Export {
        #[command(flatten)]
        name: NameArg,
        /// The repository: a directory (created if missing; a relative path is taken
        /// from this directory) or s3://BUCKET/PREFIX, reached with the VMM's own
        /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION.
        #[arg(long, value_name = "REPO")]
        to: String,
    },
    /// The pool: `pool grow SIZE` adds SIZE to the block area online (for a VM whose
    /// status is `paused: block area full`, or before it gets there).
    Pool {
        #[command(subcommand)]
        op: PoolOp,
    },
}

/// `pmsnap ctl pool ...`.
#[derive(Debug, Subcommand)]
pub enum PoolOp {
    /// Add SIZE (K, M or G suffix) to the block area; the pool file grows by as much
    /// (sparse on tmpfs until blocks are used).
    Grow {
        /// Bytes to add, rounded up to 4 KiB blocks.
        #[arg(value_name = "SIZE", value_parser = size_arg)]
        size: u64,
    },
}

/// SIZE values with K, M, G or T suffixes.
fn size_arg(s: &str) -> Result<u64, String> {
    crate::config::parse_size(s).map_err(|e| e.to_string())
}

/// `--range` values: the parser shared with `pmsnap-agent`.
fn range_arg(s: &str) -> Result<VirtRange, String> {
    parse_range(s).map_err(|e| e.to_string())
}

/// Parse `FIRST:COUNT` (decimal, or hex with 0x).
fn parse_run(s: &str) -> Result<PageRun, String> {
    let (first, count) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not FIRST_PAGE:COUNT"))?;
    Ok(PageRun {
        first_page: parse_number(first).map_err(|e| e.to_string())?,
        count: parse_number(count).map_err(|e| e.to_string())?,
    })
}

/// Parse `KEY=VALUE`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))
}

/// Run `pmsnap ctl`.
pub fn run(args: CtlArgs) -> super::anyhow_like::Result<i32> {
    let sock = args
        .api_sock
        .ok_or("--api-sock PATH (or the PMSNAP_API_SOCK environment variable) is required")?;
    let mut client = ApiClient::new(&sock);
    if matches!(args.command, CtlCommand::Export { .. }) {
        // An export of many GiB takes minutes; the VMM answers when it is done.
        client = client.with_timeout(std::time::Duration::from_secs(3600));
    }
    match send(&client, &args.command, args.json) {
        Ok(text) => {
            print!("{text}");
            Ok(exit::OK)
        }
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            eprintln!("pmsnap ctl: {message} (HTTP {status}, {code})");
            if args.json {
                let mut extra = serde_json::Map::new();
                extra.insert("status".into(), status.into());
                extra.insert("code".into(), code.into());
                println!("{}", json_error(&message, exit::ERROR, extra));
            }
            Ok(exit::ERROR)
        }
        Err(e) => Err(context(format!("pmsnap ctl: {}", sock.display()))(e)),
    }
}

/// Send the command's request and render the answer (JSON or text).
pub fn send(client: &ApiClient, cmd: &CtlCommand, json: bool) -> Result<String, ClientError> {
    let (method, target, body) = match cmd {
        CtlCommand::Status => ("GET", "/v1/status".to_string(), None),
        CtlCommand::Pause => ("PUT", "/v1/pause".to_string(), None),
        CtlCommand::Resume => ("PUT", "/v1/resume".to_string(), None),
        CtlCommand::SnapshotPages {
            name,
            runs,
            labels,
            pause,
        } => {
            let req = PagesSnapshotRequest {
                name: name.get().to_string(),
                pause: *pause,
                runs: runs.clone(),
                labels: labels.iter().cloned().collect::<BTreeMap<_, _>>(),
            };
            let body = serde_json::to_value(&req)
                .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
            ("POST", "/v1/snapshots".to_string(), Some(body))
        }
        CtlCommand::List => ("GET", "/v1/snapshots".to_string(), None),
        CtlCommand::Inspect { name } => ("GET", snapshot_path(name.get(), "")?, None),
        CtlCommand::Delete { name } => ("DELETE", snapshot_path(name.get(), "")?, None),
        CtlCommand::Dirty { since, since_flag } => {
            let since = since
                .as_deref()
                .or(since_flag.as_deref())
                .unwrap_or_default();
            ("GET", snapshot_path(since, "/dirty")?, None)
        }
        CtlCommand::Stats => ("GET", "/v1/stats".to_string(), None),
        CtlCommand::Export { name, to } => {
            let to = if to.starts_with("s3://") {
                to.clone()
            } else {
                std::path::absolute(to)
                    .map_err(|e| ClientError::BadResponse(format!("cannot resolve {to}: {e}")))?
                    .display()
                    .to_string()
            };
            let body = serde_json::json!({ "to": to });
            ("POST", snapshot_path(name.get(), "/export")?, Some(body))
        }
        CtlCommand::Pool {
            op: PoolOp::Grow { size },
        } => (
            "POST",
            "/v1/pool/grow".to_string(),
            Some(serde_json::json!({ "add_bytes": size })),
        ),
        CtlCommand::SnapshotProcess { pid, name, ranges } => {
            let req = ProcessSnapshotRequest {
                name: name.get().to_string(),
                pid: *pid,
                ranges: ranges.clone(),
            };
            let body = serde_json::to_value(&req)
                .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
            ("POST", "/v1/process-snapshots".to_string(), Some(body))
        }
        CtlCommand::SnapshotVm { name } => {
            let name = name.get();
            snapshot_path(name, "")?;
            (
                "POST",
                "/v1/vm-snapshots".to_string(),
                Some(serde_json::json!({ "name": name })),
            )
        }
        CtlCommand::Rollback { name } => {
            let name = name.get();
            snapshot_path(name, "")?;
            ("POST", format!("/v1/vm-snapshots/{name}/rollback"), None)
        }
    };
    let value = client.request_json(method, &target, body.as_ref())?;
    if json {
        let mut s = serde_json::to_string_pretty(&value)
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        s.push('\n');
        return Ok(s);
    }
    Ok(match cmd {
        CtlCommand::Status | CtlCommand::Pause | CtlCommand::Resume => {
            render_status(&decode::<VmStatus>(value)?)
        }
        CtlCommand::SnapshotPages { .. } | CtlCommand::SnapshotProcess { .. } => {
            format!(
                "created {}",
                render_snapshot(&decode::<SnapshotInfo>(value)?)
            )
        }
        CtlCommand::Inspect { .. } => render_snapshot(&decode::<SnapshotInfo>(value)?),
        CtlCommand::List => render_list(&decode::<SnapshotList>(value)?.snapshots),
        CtlCommand::Delete { .. } => format!("deleted {}\n", decode::<Deleted>(value)?.deleted),
        CtlCommand::Dirty { .. } => render_dirty(&decode::<DirtyPages>(value)?),
        CtlCommand::Stats => render_stats(&decode::<ApiStats>(value)?),
        CtlCommand::SnapshotVm { .. } => {
            let r: crate::api::VmSnapshotCreated = decode(value)?;
            format!(
                "created VM snapshot {} ({} pages, {} of state), paused {:.3} ms (stop {:.3} ms, capture {:.3} ms, store {:.3} ms)\n",
                r.name,
                r.pages,
                human_bytes(r.state_bytes),
                r.pause_us as f64 / 1000.0,
                r.stop_us as f64 / 1000.0,
                r.capture_us as f64 / 1000.0,
                r.store_us as f64 / 1000.0
            )
        }
        CtlCommand::Export { to, .. } => {
            let n = |k: &str| value[k].as_u64().unwrap_or(0);
            if value["no_op"] == true {
                format!(
                    "{} is in {} already (same content)\n",
                    value["name"].as_str().unwrap_or("?"),
                    to
                )
            } else {
                format!(
                    "exported {} to {}: {} pages ({} zero), {} new bytes, {} already there, {} written\n",
                    value["name"].as_str().unwrap_or("?"),
                    to,
                    n("pages"),
                    n("zero_pages"),
                    n("bytes_new"),
                    n("bytes_skipped"),
                    n("bytes_written")
                )
            }
        }
        CtlCommand::Pool {
            op: PoolOp::Grow { .. },
        } => {
            let blocks = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
            let (old, new) = (
                blocks(&value, "old_block_count"),
                blocks(&value, "new_block_count"),
            );
            format!(
                "block area grown from {old} to {new} blocks ({} -> {})\n",
                human_bytes(old.saturating_mul(PAGE_SIZE)),
                human_bytes(new.saturating_mul(PAGE_SIZE))
            )
        }
        CtlCommand::Rollback { .. } => {
            let r: crate::api::RolledBack = decode(value)?;
            format!(
                "rolled back to {}: {} pages copied ({} dirty), paused {:.3} ms (stop {:.3} ms, copy {:.3} ms, state {:.3} ms)\n",
                r.name,
                r.pages_copied,
                r.dirty_pages,
                r.pause_us as f64 / 1000.0,
                r.stop_us as f64 / 1000.0,
                r.copy_us as f64 / 1000.0,
                r.restore_us as f64 / 1000.0
            )
        }
    })
}

/// Bytes as a short human size (binary units).
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn render_status(s: &VmStatus) -> String {
    let mut out = format!(
        "state:   {}\nvcpus:   {}\nmemory:  {} ({} bytes)\nuptime:  {:.1} s\npool:    {}\nversion: {}\n",
        s.state,
        s.vcpus,
        human_bytes(s.mem_bytes),
        s.mem_bytes,
        s.uptime_ms as f64 / 1000.0,
        s.pool_path,
        s.version
    );
    if let Some(f) = &s.lazy_fill {
        let _ = writeln!(
            out,
            "fill:    {} of {} pages from {}{} ({} on first touch, p50 {} us, p99 {} us)",
            f.present,
            f.pages,
            f.source,
            if f.complete { ", complete" } else { "" },
            f.demanded,
            f.first_touch_p50_us,
            f.first_touch_p99_us
        );
        for (what, v) in [("waiting", &f.waiting), ("error", &f.error)] {
            if let Some(v) = v {
                let _ = writeln!(out, "fill {what}: {v}");
            }
        }
    }
    out
}

fn render_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn render_runs(runs: &[PageRun]) -> String {
    let mut out = String::new();
    for r in runs {
        let _ = writeln!(out, "  {}:{}", r.first_page, r.count);
    }
    out
}

fn render_snapshot(s: &SnapshotInfo) -> String {
    let mut out = format!(
        "{}\n  kind:      {}\n  pages:     {} ({})\n  runs:      {}\n  preserved: {}\n  created:   {}\n",
        s.name,
        s.kind,
        s.pages,
        human_bytes(s.pages.saturating_mul(PAGE_SIZE)),
        s.run_count,
        s.preserved_pages,
        format_time_ms(s.created_unix_ms)
    );
    if !s.labels.is_empty() {
        let _ = writeln!(out, "  labels:    {}", render_labels(&s.labels));
    }
    if let Some(runs) = &s.runs {
        out.push_str("  page runs (first:count):\n");
        for line in render_runs(runs).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

fn render_list(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return "no snapshots\n".to_string();
    }
    let w = list.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:<w$}  {:<8}  {:<20}  {:>10}  {:>6}  {:>10}  LABELS\n",
        "NAME", "KIND", "CREATED", "PAGES", "RUNS", "PRESERVED"
    );
    for s in list {
        let _ = writeln!(
            out,
            "{:<w$}  {:<8}  {:<20}  {:>10}  {:>6}  {:>10}  {}",
            s.name,
            s.kind,
            format_time_ms(s.created_unix_ms),
            s.pages,
            s.run_count,
            s.preserved_pages,
            render_labels(&s.labels)
        );
    }
    out
}

fn render_dirty(d: &DirtyPages) -> String {
    let mut out = format!(
        "{} pages ({}) written since {} in {} runs\n",
        d.pages,
        human_bytes(d.pages.saturating_mul(PAGE_SIZE)),
        d.since,
        d.runs.len()
    );
    out.push_str(&render_runs(&d.runs));
    out
}

/// Nanoseconds as a short human duration.
fn human_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// How one store figure is shown.
type Figure = dyn Fn(u64) -> String;

/// Rows `label  value`, the labels padded to one column at least `min_w` wide.
fn render_rows(out: &mut String, rows: &[(&str, String)], min_w: usize) {
    let w = rows
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0)
        .max(min_w);
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<w$}  {v}");
    }
}

/// `ctl stats` as text: the VMM's counters, the store's figures, and a table of the
/// store's snapshots (the API's JSON has them all, `--json` prints it).
fn render_stats(s: &ApiStats) -> String {
    let vmm_rows = [
        ("write faults", s.faults.to_string()),
        (
            "pages preserved",
            format!(
                "{} ({})",
                s.preserved_pages,
                human_bytes(s.preserved_pages.saturating_mul(PAGE_SIZE))
            ),
        ),
        (
            "pages protected now",
            format!(
                "{} ({})",
                s.protected_pages,
                human_bytes(s.protected_pages.saturating_mul(PAGE_SIZE))
            ),
        ),
        ("snapshots", s.snapshots.to_string()),
        (
            "guest snapshots dropped",
            s.guest_snapshots_dropped.to_string(),
        ),
        (
            "fault handler time",
            format!(
                "total {}, mean {}, max {}",
                human_ns(s.fault_handler.total_ns),
                human_ns(s.fault_handler.mean_ns),
                human_ns(s.fault_handler.max_ns)
            ),
        ),
    ];
    let mut out = String::from("copy-before-write (since the VMM started):\n");
    let serde_json::Value::Object(store) = &s.store else {
        render_rows(&mut out, &vmm_rows, 0);
        render_engine_notes(&mut out, s);
        return out;
    };
    let pages = |n: u64| format!("{n} ({})", human_bytes(n.saturating_mul(PAGE_SIZE)));
    let count = |n: u64| n.to_string();
    let known: [(&str, &str, &Figure); 12] = [
        ("ram_pages", "guest RAM pages", &pages),
        ("pages_in_ram", "referenced in place", &pages),
        ("pages_in_blocks", "preserved in blocks", &pages),
        ("blob_blocks", "state blob blocks", &count),
        ("shared_bytes", "shared", &human_bytes),
        ("saved_bytes", "saved by sharing", &human_bytes),
        ("blocks_used", "blocks used", &count),
        ("blocks_free", "blocks free", &count),
        ("blocks_total", "blocks total", &count),
        ("log_records", "redirect log records", &count),
        ("log_capacity", "redirect log capacity", &count),
        ("generation", "generation", &count),
    ];
    let mut rows: Vec<(&str, String)> = known
        .iter()
        .filter_map(|(k, label, f)| store.get(*k)?.as_u64().map(|n| (*label, f(n))))
        .collect();
    // Figures a newer store reports that this client has no label for: as they come.
    for (k, v) in store {
        let listed = known.iter().any(|(name, ..)| name == k);
        if !listed && k != "snapshots" && !v.is_array() && !v.is_object() {
            rows.push((k.as_str(), v.to_string()));
        }
    }
    // One label column for both sections.
    let w = vmm_rows
        .iter()
        .chain(&rows)
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0);
    render_rows(&mut out, &vmm_rows, w);
    if !rows.is_empty() {
        out.push_str("store:\n");
        render_rows(&mut out, &rows, w);
    }
    let snaps = store
        .get("per_snapshot")
        .and_then(serde_json::Value::as_array)
        .filter(|a| !a.is_empty());
    if let Some(snaps) = snaps {
        let field = |v: &serde_json::Value, k: &str| match &v[k] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        };
        let w = snaps
            .iter()
            .map(|v| field(v, "name").len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "  {:<w$}  {:<8}  {:<20}  {:>8}  {:>8}  {:>9}",
            "NAME", "KIND", "CREATED", "PAGES", "IN-RAM", "IN-BLOCKS"
        );
        for v in snaps {
            let created = v["created_unix_ms"]
                .as_u64()
                .map(format_time_ms)
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:<w$}  {:<8}  {:<20}  {:>8}  {:>8}  {:>9}",
                field(v, "name"),
                field(v, "kind"),
                created,
                field(v, "pages"),
                field(v, "pages_in_ram"),
                field(v, "pages_in_blocks")
            );
        }
    }
    render_engine_notes(&mut out, s);
    out
}

/// The write waiting for a block and the engine's recent events, after the figures.
fn render_engine_notes(out: &mut String, s: &ApiStats) {
    if let Some(w) = &s.block_wait {
        let _ = writeln!(
            out,
            "WAITING since {}: guest page {} needs a free block and only host-owned \
             snapshots hold blocks; delete a snapshot or grow the block area",
            format_time_ms(w.since_unix_ms),
            w.page
        );
    }
    if !s.events.is_empty() {
        out.push_str("events:\n");
        for e in &s.events {
            let _ = writeln!(
                out,
                "  {}  {}  {}: {}",
                format_time_ms(e.unix_ms),
                e.kind,
                e.snapshot,
                e.detail
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HandlerTime, VmState};
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        T::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|t| t.ctl)
    }

    #[test]
    fn parses_snapshot_pages_with_runs_and_labels() {
        let a = parse(&[
            "--api-sock",
            "/tmp/s",
            "snapshot-pages",
            "n1",
            "--runs",
            "0:16,0x100:2",
            "--runs",
            "500:1",
            "--label",
            "app=db",
            "--label",
            "x=a=b",
            "--json",
        ])
        .expect("valid");
        assert!(a.json);
        assert_eq!(a.api_sock, Some(PathBuf::from("/tmp/s")));
        match a.command {
            CtlCommand::SnapshotPages {
                name,
                runs,
                labels,
                pause,
            } => {
                assert!(!pause);
                assert_eq!(name.get(), "n1");
                assert_eq!(
                    runs,
                    vec![
                        PageRun {
                            first_page: 0,
                            count: 16
                        },
                        PageRun {
                            first_page: 256,
                            count: 2
                        },
                        PageRun {
                            first_page: 500,
                            count: 1
                        },
                    ]
                );
                assert_eq!(
                    labels,
                    vec![("app".into(), "db".into()), ("x".into(), "a=b".into())]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn api_sock_may_follow_the_subcommand_and_is_required() {
        let a = parse(&["dirty", "--since", "s", "--api-sock", "/x"]).expect("valid");
        assert_eq!(a.api_sock, Some(PathBuf::from("/x")));
        assert!(matches!(a.command, CtlCommand::Dirty { since_flag: Some(s), .. } if s == "s"));
        let a = parse(&["dirty", "s2"]).expect("positional");
        assert!(matches!(a.command, CtlCommand::Dirty { since: Some(s), .. } if s == "s2"));
        // Global arguments cannot be required in clap; `run` refuses a missing socket.
        let a = parse(&["status"]).expect("parses");
        if std::env::var_os("PMSNAP_API_SOCK").is_none() {
            let err = run(a).expect_err("no socket");
            assert!(err.to_string().contains("--api-sock"), "{err}");
        }
    }

    #[test]
    fn whole_cli_definition_is_consistent() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
        let cli = crate::cli::Cli::try_parse_from([
            "pmsnap",
            "ctl",
            "--api-sock",
            "/s",
            "stats",
            "--json",
        ])
        .expect("valid");
        match cli.command {
            crate::cli::Command::Ctl(a) => {
                assert!(a.json);
                assert!(matches!(a.command, CtlCommand::Stats));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ranges_read_as_the_agent_reads_them() {
        let ranges = |r: &str| match parse(&["snapshot-process", "p", "--pid", "1", "--range", r])
            .map(|a| a.command)
        {
            Ok(CtlCommand::SnapshotProcess { ranges, .. }) => Ok(ranges),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let want = vec![VirtRange {
            start: 0x1000,
            end: 0x2000,
        }];
        assert_eq!(ranges("4096-8192").expect("decimal"), want);
        assert_eq!(ranges("0x1000-0x2000").expect("hex"), want);
        // The one parser: the same answer, the same refusal.
        assert_eq!(Ok(want[0]), guest_agent::cli::parse_range("4096-8192"));
        for bad in ["1000-2000", "7f00-8f00", "0x2000-0x1000"] {
            let e = ranges(bad).expect_err(bad);
            let shared = guest_agent::cli::parse_range(bad).expect_err(bad);
            assert!(e.to_string().contains(&shared.to_string()), "{e}");
            assert_eq!(e.exit_code(), exit::USAGE);
        }
    }

    #[test]
    fn refuses_bad_runs_and_labels() {
        for runs in ["5", "a:1", "1:", ":1", "1:2:3", "-1:2", "0x:1", "1f:1"] {
            let e = parse(&["--api-sock", "/s", "snapshot-pages", "n", "--runs", runs])
                .expect_err(runs);
            assert_eq!(e.exit_code(), exit::USAGE);
        }
        assert!(parse(&[
            "--api-sock",
            "/s",
            "snapshot-pages",
            "--name",
            "n",
            "--runs",
            "1:1",
            "--label",
            "nokv"
        ])
        .is_err());
    }

    #[test]
    fn renders_human_output() {
        let s = VmStatus {
            state: VmState::Running,
            vcpus: 2,
            mem_bytes: 256 << 20,
            uptime_ms: 1500,
            pool_path: "/dev/shm/pool".into(),
            version: "0.1.0".into(),
            lazy_fill: None,
        };
        let text = render_status(&s);
        assert!(text.contains("state:   running"));
        assert!(text.contains("256.0 MiB (268435456 bytes)"));
        assert!(text.contains("uptime:  1.5 s"));

        let info = SnapshotInfo {
            name: "snap".into(),
            kind: "pages".into(),
            pages: 3,
            run_count: 2,
            runs: Some(vec![
                PageRun {
                    first_page: 1,
                    count: 2,
                },
                PageRun {
                    first_page: 9,
                    count: 1,
                },
            ]),
            preserved_pages: 1,
            created_unix_ms: 7,
            labels: [("a".to_string(), "b".to_string())].into(),
        };
        let text = render_snapshot(&info);
        assert!(text.contains("pages:     3 (12.0 KiB)"), "{text}");
        assert!(text.contains("labels:    a=b"));
        assert!(text.contains("    1:2\n    9:1\n"), "{text}");
        let table = render_list(&[info]);
        let mut lines = table.lines();
        assert!(lines.next().expect("header").starts_with("NAME"));
        let row: Vec<&str> = lines.next().expect("row").split_whitespace().collect();
        assert_eq!(
            row,
            [
                "snap",
                "pages",
                "1970-01-01T00:00:00Z",
                "3",
                "2",
                "1",
                "a=b"
            ]
        );
        assert_eq!(render_list(&[]), "no snapshots\n");

        let d = DirtyPages {
            since: "snap".into(),
            pages: 4,
            runs: vec![PageRun {
                first_page: 0,
                count: 4,
            }],
        };
        assert_eq!(
            render_dirty(&d),
            "4 pages (16.0 KiB) written since snap in 1 runs\n  0:4\n"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let mut pool = pmem_backend::Pool::create(
            dir.path().join("p"),
            1 << 20,
            pmem_backend::PoolOptions::default(),
        )
        .expect("pool");
        pool.snapshot(
            "base",
            pmem_backend::SnapshotKind::Vm,
            &[pmem_backend::PageRun::new(0, 16)],
            Default::default(),
        )
        .expect("snapshot");
        let st = ApiStats {
            faults: 10,
            preserved_pages: 9,
            protected_pages: 100,
            snapshots: 1,
            fault_handler: HandlerTime {
                total_ns: 1000,
                mean_ns: 100,
                max_ns: 2_500_000,
            },
            store: serde_json::to_value(pool.stats()).expect("json"),
            guest_snapshots_dropped: 1,
            block_wait: Some(crate::api::BlockWaitInfo {
                page: 77,
                since_unix_ms: 1_700_000_000_000,
            }),
            events: vec![crate::api::ApiEvent {
                unix_ms: 1_700_000_000_000,
                kind: "guest_snapshot_dropped".into(),
                snapshot: "guest:1000/a".into(),
                detail: "block area full".into(),
            }],
        };
        let text = render_stats(&st);
        assert!(text.contains("  guest snapshots dropped  1\n"), "{text}");
        assert!(
            text.contains("WAITING since 2023-11-14T22:13:20Z: guest page 77 needs a free block"),
            "{text}"
        );
        assert!(
            text.contains(
                "events:\n  2023-11-14T22:13:20Z  guest_snapshot_dropped  guest:1000/a: \
                 block area full\n"
            ),
            "{text}"
        );
        assert!(
            !text.contains('{') && !text.contains('['),
            "a table, not JSON: {text}"
        );
        assert!(text.contains("  write faults             10\n"), "{text}");
        assert!(text.contains("  blocks free              256\n"), "{text}");
        assert!(
            text.contains("total 1.0 us, mean 100 ns, max 2.5 ms"),
            "{text}"
        );
        assert!(
            text.contains("guest RAM pages          256 (1.0 MiB)"),
            "{text}"
        );
        assert!(
            text.contains("referenced in place      16 (64.0 KiB)"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.trim_start().starts_with("base"))
            .expect("snapshot row");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], "vm");
        assert!(cols[2].ends_with('Z') && cols[2].contains('T'), "{row}");
        assert_eq!(&cols[3..], ["16", "16", "0"], "{row}");
        // A VMM without store figures: the counters alone.
        let bare = ApiStats {
            store: serde_json::Value::Null,
            block_wait: None,
            events: Vec::new(),
            ..st
        };
        assert!(render_stats(&bare).ends_with("max 2.5 ms\n"));
    }
}
