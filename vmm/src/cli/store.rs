//! `pmsnap store ...`: offline commands on a pool's snapshot store.
//!
//! Exit codes: 0 success; 1 error (printed with its cause chain by `main`); 2 `verify`
//! found corruption (the problems are printed, or returned in the JSON report).

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pmem_backend::{Pool, SnapshotInfo, SnapshotKind, Stats};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Exit code of `verify` when it found corruption.
pub const EXIT_CORRUPT: i32 = 2;

/// Arguments of `pmsnap store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The pool file (must not be in use by a running VMM).
    #[arg(long, global = true, value_name = "PATH")]
    pub pool: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The store command.
    #[command(subcommand)]
    pub command: StoreCommand,
}

/// `pmsnap store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List snapshots and store statistics.
    Ls,
    /// Show one snapshot in detail.
    Inspect {
        /// Snapshot name.
        name: String,
    },
    /// Check every checksum and invariant; exit code 2 if anything is corrupt.
    Verify,
    /// Delete a snapshot.
    Rm {
        /// Snapshot name.
        name: String,
    },
    /// Reclaim unreferenced blocks and compact the redirect log.
    Gc,
}

/// Run `pmsnap store`, printing to stdout.
pub fn run(args: StoreArgs) -> super::anyhow_like::Result<i32> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_with(args, &mut out, true)
}

/// Run `pmsnap store`, printing to `out`; `progress` allows a progress bar on stderr.
pub fn run_with(
    args: StoreArgs,
    out: &mut dyn Write,
    progress: bool,
) -> super::anyhow_like::Result<i32> {
    let path = args.pool.ok_or("--pool PATH is required")?;
    let mut pool =
        Pool::open(&path).map_err(|e| format!("opening pool {}: {e}", path.display()))?;
    let json = args.json;
    match args.command {
        StoreCommand::Ls => {
            let stats = pool.stats();
            if json {
                serde_json::to_writer_pretty(&mut *out, &stats)?;
                writeln!(out)?;
            } else {
                print_ls(out, &stats)?;
            }
        }
        StoreCommand::Inspect { name } => {
            let info = pool.inspect(name.as_str())?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &info)?;
                writeln!(out)?;
            } else {
                print_inspect(out, &info)?;
            }
        }
        StoreCommand::Verify => {
            let rep = verify_with_progress(&pool, progress && !json);
            if json {
                serde_json::to_writer_pretty(&mut *out, &rep)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "checked {} snapshots, {} pages, {} blocks: {}",
                    rep.snapshots,
                    rep.pages_checked,
                    rep.blocks_checked,
                    if rep.is_clean() {
                        "clean".to_string()
                    } else {
                        format!("{} problem(s)", rep.problems.len())
                    }
                )?;
                for p in &rep.problems {
                    writeln!(out, "  {}", serde_json::to_string(p)?)?;
                }
            }
            if !rep.is_clean() {
                return Ok(EXIT_CORRUPT);
            }
        }
        StoreCommand::Rm { name } => {
            let freed = pool.delete(name.as_str())?;
            let pages: u64 = freed.iter().map(|r| r.count).sum();
            if json {
                let v = serde_json::json!({ "deleted": name, "unprotected_pages": pages, "unprotected_runs": freed });
                serde_json::to_writer_pretty(&mut *out, &v)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "deleted {name}; {pages} RAM page(s) no longer referenced"
                )?;
            }
        }
        StoreCommand::Gc => {
            let r = pool.gc()?;
            if json {
                serde_json::to_writer_pretty(&mut *out, &r)?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "gc: reclaimed {} block(s), unprotected {} page(s), compacted {} log record(s) \
                     (recovery at open: {} torn, {} orphan record(s) dropped); generation {}",
                    r.blocks_reclaimed,
                    r.pages_unprotected,
                    r.log_records_compacted,
                    r.torn_records_discarded,
                    r.orphan_records_dropped,
                    r.generation
                )?;
            }
        }
    }
    Ok(0)
}

/// Verify, showing a progress bar on stderr once it has run for more than a second.
fn verify_with_progress(pool: &Pool, allow_bar: bool) -> pmem_backend::VerifyReport {
    let start = Instant::now();
    let mut bar: Option<ProgressBar> = None;
    let rep = pool.verify(|done, total| {
        if !allow_bar {
            return;
        }
        if bar.is_none() && start.elapsed() > Duration::from_secs(1) {
            let b = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("verify [{bar:40}] {pos}/{len} pages ({eta})")
            {
                b.set_style(style.progress_chars("=> "));
            }
            bar = Some(b);
        }
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    rep
}

fn kind_str(k: SnapshotKind) -> &'static str {
    k.as_str()
}

/// Format ns since the epoch as UTC `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, H. Hinnant).
fn fmt_time(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_ls(out: &mut dyn Write, s: &Stats) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>4}  {:<24} {:<7} {:<20} {:>8} {:>8} {:>9} {:>9}  LABELS",
        "ID", "NAME", "KIND", "CREATED", "PAGES", "IN-RAM", "IN-BLOCKS", "STATE"
    )?;
    for i in &s.per_snapshot {
        let labels: Vec<String> = i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(
            out,
            "{:>4}  {:<24} {:<7} {:<20} {:>8} {:>8} {:>9} {:>9}  {}",
            i.id,
            i.name,
            kind_str(i.kind),
            fmt_time(i.created_unix_ns),
            i.pages,
            i.pages_in_ram,
            i.pages_in_blocks,
            i.state_len,
            labels.join(",")
        )?;
    }
    writeln!(
        out,
        "{} snapshot(s); RAM {} pages, {} referenced in place; {} preserved page(s), {} blob block(s); \
         shared {}, saved {}; blocks {} used / {} free / {} total; log {}/{}; generation {}",
        s.snapshots,
        s.ram_pages,
        s.pages_in_ram,
        s.pages_in_blocks,
        s.blob_blocks,
        mib(s.shared_bytes),
        mib(s.saved_bytes),
        s.blocks_used,
        s.blocks_free,
        s.blocks_total,
        s.log_records,
        s.log_capacity,
        s.generation
    )
}

fn print_inspect(out: &mut dyn Write, i: &SnapshotInfo) -> std::io::Result<()> {
    writeln!(out, "name:      {}", i.name)?;
    writeln!(out, "id:        {}", i.id)?;
    writeln!(out, "kind:      {}", kind_str(i.kind))?;
    writeln!(out, "created:   {}", fmt_time(i.created_unix_ns))?;
    writeln!(
        out,
        "pages:     {} ({} in RAM, {} in blocks)",
        i.pages, i.pages_in_ram, i.pages_in_blocks
    )?;
    writeln!(out, "state:     {} bytes", i.state_len)?;
    for (k, v) in &i.labels {
        writeln!(out, "label:     {k}={v}")?;
    }
    if let Some(p) = &i.process {
        writeln!(out, "process:   pid {} ({})", p.pid, p.comm)?;
    }
    writeln!(out, "runs:")?;
    for (n, r) in i.runs.iter().enumerate() {
        let va = i
            .process
            .as_ref()
            .and_then(|p| p.run_vas.get(n))
            .map(|va| format!("  va {va:#x}"));
        writeln!(
            out,
            "  pages {}..{} ({}){}",
            r.first,
            r.end(),
            r.count,
            va.unwrap_or_default()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmem_backend::{PageRun, PoolOptions, SnapshotMeta};

    fn args(pool: &std::path::Path, json: bool, command: StoreCommand) -> StoreArgs {
        StoreArgs {
            pool: Some(pool.to_path_buf()),
            json,
            command,
        }
    }

    fn run_out(a: StoreArgs) -> (i32, String) {
        let mut out = Vec::new();
        let code = run_with(a, &mut out, false).expect("command runs");
        (code, String::from_utf8(out).expect("utf8"))
    }

    fn make_pool(dir: &std::path::Path) -> PathBuf {
        let path = dir.join("pool");
        let mut pool = Pool::create(&path, 1 << 20, PoolOptions::default()).expect("create");
        let meta = SnapshotMeta {
            labels: vec![("app".into(), "db".into())],
            ..Default::default()
        };
        pool.snapshot("first", SnapshotKind::Vm, &[PageRun::new(0, 16)], meta)
            .expect("snapshot");
        pool.write_ram_page(3, &[7; 4096])
            .expect("preserve, then write");
        path
    }

    #[test]
    fn ls_inspect_verify_rm_gc() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = make_pool(d.path());
        let (code, text) = run_out(args(&path, false, StoreCommand::Ls));
        assert_eq!(code, 0);
        assert!(text.contains("first") && text.contains("app=db"), "{text}");
        let (_, js) = run_out(args(&path, true, StoreCommand::Ls));
        let v: serde_json::Value = serde_json::from_str(&js).expect("json");
        assert_eq!(v["snapshots"], 1);
        assert_eq!(v["per_snapshot"][0]["pages_in_blocks"], 1);
        let (_, text) = run_out(args(
            &path,
            false,
            StoreCommand::Inspect {
                name: "first".into(),
            },
        ));
        assert!(text.contains("15 in RAM, 1 in blocks"), "{text}");
        let (code, text) = run_out(args(&path, false, StoreCommand::Verify));
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("clean"));
        let (code, js) = run_out(args(
            &path,
            true,
            StoreCommand::Rm {
                name: "first".into(),
            },
        ));
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&js).expect("json");
        assert_eq!(v["unprotected_pages"], 15);
        let (code, text) = run_out(args(&path, false, StoreCommand::Gc));
        assert_eq!(code, 0);
        assert!(text.starts_with("gc: reclaimed 0 block(s)"), "{text}");
        let mut sink = Vec::new();
        let err = run_with(
            args(
                &path,
                false,
                StoreCommand::Rm {
                    name: "first".into(),
                },
            ),
            &mut sink,
            false,
        )
        .expect_err("no such snapshot");
        assert!(err.to_string().contains("no snapshot"), "{err}");
    }

    #[test]
    fn verify_exit_code_2_on_corruption() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().expect("tempdir");
        let path = make_pool(d.path());
        let block_offset = {
            let pool = Pool::open(&path).expect("open");
            match pool.snapshot_page_location("first", 3).expect("loc") {
                pmem_backend::PageLocation::Block(b) => pool.geometry().block_offset_of(b),
                other => panic!("{other:?}"),
            }
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.write_all_at(&[0xde, 0xad], block_offset + 10)
            .expect("corrupt");
        let (code, text) = run_out(args(&path, false, StoreCommand::Verify));
        assert_eq!(code, EXIT_CORRUPT);
        assert!(
            text.contains("\"snapshot\":\"first\"") && text.contains("\"page\":3"),
            "{text}"
        );
    }

    #[test]
    fn missing_pool_and_locked_pool_are_errors() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut sink = Vec::new();
        let none = StoreArgs {
            pool: None,
            json: false,
            command: StoreCommand::Ls,
        };
        assert!(run_with(none, &mut sink, false).is_err());
        let path = make_pool(d.path());
        let _held = Pool::open(&path).expect("hold the lock");
        let err =
            run_with(args(&path, false, StoreCommand::Ls), &mut sink, false).expect_err("locked");
        assert!(
            err.to_string().contains("locked by another process"),
            "{err}"
        );
    }

    #[test]
    fn time_formatting() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            fmt_time(1_700_000_000 * 1_000_000_000),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            fmt_time(951_782_400 * 1_000_000_000),
            "2000-02-29T00:00:00Z"
        );
    }
}
