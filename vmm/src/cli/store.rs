//! `pmsnap store ...`: offline commands on a pool's snapshot store, and `prune`, which
//! removes the pools of VMMs that died.
//!
//! Exit codes: 0 success; 1 error (printed with its cause chain by `main`, and as JSON on
//! stdout with `--json`); 2 usage error; 3 `verify` found damage (the problems are
//! printed, or returned in the JSON report).

use clap::{Args, Subcommand};
use guest_agent::cli::{exit, format_time_ms, NameArg};
use indicatif::{ProgressBar, ProgressStyle};
use pmem_backend::{Pool, SnapshotInfo, SnapshotKind, Stats};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::anyhow_like::context;
use crate::pool_dir::{self, PruneReport};

/// Exit code of `verify` when it found damage.
pub const EXIT_CORRUPT: i32 = exit::DAMAGE;

/// Arguments of `pmsnap store`.
#[derive(Debug, Args)]
#[command(after_help = exit::HELP)]
pub struct StoreArgs {
    /// The pool file (must not be in use by a running VMM); required except for prune.
    #[arg(long, global = true, value_name = "PATH")]
    pub pool: Option<PathBuf>,
    /// Print machine-readable JSON instead of text (errors too, on stdout; times in unix
    /// milliseconds).
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
    #[command(visible_alias = "list")]
    Ls,
    /// Show one snapshot in detail.
    Inspect {
        #[command(flatten)]
        name: NameArg,
    },
    /// Check every checksum and invariant; exit code 3 if anything is damaged.
    Verify,
    /// Delete a snapshot.
    #[command(visible_alias = "delete")]
    Rm {
        #[command(flatten)]
        name: NameArg,
    },
    /// Reclaim unreferenced blocks and compact the redirect log.
    Gc,
    /// Remove the pools of VMMs that died (killed, aborted) from the default pool
    /// directory: only pools whose lock no process holds. Pools in use are listed.
    #[command(
        after_help = "The default pool directory is $PMSNAP_POOL_DIR, else /dev/shm/pmsnap \
(/dev/shm/pmsnap-UID when not root), where the old-style default pools \
/dev/shm/pmsnap-PID-NANOS.pool are looked at too. Only temporary default pools \
(PID-NANOS.pool) are candidates: pools kept with --keep-pool (*.kept.pool) and pools named \
with --pool are never removed. Each pool holds its guest's RAM in host memory until \
removed."
    )]
    Prune {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Prune the default pools (PID-NANOS.pool) of this directory instead of the
        /// default one.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
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
    let json = args.json;
    if let StoreCommand::Prune { dry_run, dir } = &args.command {
        if args.pool.is_some() {
            return Err("prune takes --dir DIR, not --pool".into());
        }
        // Old-style default pools sat directly in /dev/shm: looked at only when the
        // directory is the built-in default.
        let (dir, legacy) = match (dir, pool_dir::env_dir()) {
            (Some(d), _) => (d.clone(), None),
            (None, Some(env)) => (env, None),
            (None, None) => (
                pool_dir::default_dir(),
                Some(std::path::Path::new(pool_dir::SHM)),
            ),
        };
        let pools = pool_dir::candidates(&dir, legacy)
            .map_err(context(format!("listing pools in {}", dir.display())))?;
        let report = pool_dir::prune(&pools, *dry_run)?;
        if json {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        } else {
            print_prune(out, &report)?;
        }
        return Ok(exit::OK);
    }
    let path = args.pool.ok_or("--pool PATH is required")?;
    let mut pool =
        Pool::open(&path).map_err(context(format!("opening pool {}", path.display())))?;
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
            let info = pool.inspect(name.get())?;
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
            let name = name.get();
            let freed = pool.delete(name)?;
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
        // Answered above, before any pool is opened.
        StoreCommand::Prune { .. } => return Err("prune does not take a pool".into()),
    }
    Ok(exit::OK)
}

fn print_prune(out: &mut dyn Write, r: &PruneReport) -> std::io::Result<()> {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for p in &r.removed {
        writeln!(out, "{verb} {} ({})", p.path.display(), mib(p.bytes))?;
    }
    for p in &r.in_use {
        match p.pid {
            Some(pid) => writeln!(out, "in use by pid {pid}: {}", p.path.display())?,
            None => writeln!(out, "in use: {}", p.path.display())?,
        }
    }
    writeln!(
        out,
        "{} pool(s) {verb}, {} freed{}; {} in use",
        r.removed.len(),
        mib(r.freed_bytes),
        if r.dry_run { " if removed" } else { "" },
        r.in_use.len()
    )
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
            format_time_ms(i.created_unix_ms),
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
    writeln!(out, "created:   {}", format_time_ms(i.created_unix_ms))?;
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
                name: NameArg::new("first"),
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
                name: NameArg::new("first"),
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
                    name: NameArg::new("first"),
                },
            ),
            &mut sink,
            false,
        )
        .expect_err("no such snapshot");
        assert!(err.to_string().contains("no snapshot"), "{err}");
    }

    #[test]
    fn verify_exit_code_3_on_damage() {
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
        assert_eq!(code, 3, "the documented code");
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
        assert!(err.to_string().contains("opening pool"), "{err}");
        let cause = err.source().map(|s| s.to_string()).unwrap_or_default();
        assert!(cause.contains("locked by another process"), "{cause}");
    }

    #[test]
    fn prune_in_a_directory_text_and_json() {
        let d = tempfile::tempdir().expect("tempdir");
        let live = d.path().join("2-0000a11e.pool");
        let _held = Pool::create(&live, 1 << 20, PoolOptions::default()).expect("create");
        let dead = d.path().join("1-0000dead.pool");
        drop(Pool::create(&dead, 1 << 20, PoolOptions::default()).expect("create"));
        let prune = |dry_run, json| StoreArgs {
            pool: None,
            json,
            command: StoreCommand::Prune {
                dry_run,
                dir: Some(d.path().to_path_buf()),
            },
        };
        let (code, text) = run_out(prune(true, false));
        assert_eq!(code, 0);
        assert!(
            text.contains(&format!("would remove {}", dead.display())),
            "{text}"
        );
        assert!(
            text.contains("in use") && text.contains("2-0000a11e.pool"),
            "{text}"
        );
        assert!(dead.exists());
        let (code, js) = run_out(prune(false, true));
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&js).expect("json");
        assert_eq!(v["dry_run"], false);
        assert_eq!(v["removed"][0]["path"], dead.to_str().expect("utf8"));
        assert_eq!(v["in_use"][0]["path"], live.to_str().expect("utf8"));
        assert!(!dead.exists() && live.exists());
        let mut sink = Vec::new();
        let with_pool = StoreArgs {
            pool: Some(live.clone()),
            ..prune(false, false)
        };
        assert!(run_with(with_pool, &mut sink, false).is_err());
    }

    #[test]
    fn verbs_have_aliases_and_names_are_positional() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct T {
            #[command(flatten)]
            store: StoreArgs,
        }
        let p = |a: &[&str]| {
            T::try_parse_from(std::iter::once("store").chain(a.iter().copied())).map(|t| t.store)
        };
        for verb in ["ls", "list"] {
            assert!(matches!(p(&[verb]).expect(verb).command, StoreCommand::Ls));
        }
        for a in [&["rm", "s"][..], &["delete", "s"], &["rm", "--name", "s"]] {
            match p(a).expect("rm").command {
                StoreCommand::Rm { name } => assert_eq!(name.get(), "s"),
                other => panic!("{other:?}"),
            }
        }
        let e = p(&["verify", "--bogus"]).expect_err("usage");
        assert_eq!(e.exit_code(), exit::USAGE);
    }
}
