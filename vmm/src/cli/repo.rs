//! `pmsnap export`, `pmsnap import` and `pmsnap repo ...`: snapshots leave the pool for a
//! repository (crate `pmsnap-repo`, docs/repository.md) and come back into a new pool.
//!
//! Export and import work offline on a pool no VMM holds (its lock is taken). An import
//! creates a new pool whose RAM is the snapshot's and which holds the snapshot, so
//! `pmsnap restore NAME --pool P` runs a VM snapshot from it on this or another host.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 `repo verify` found damage.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use clap::{Args, Subcommand};
use guest_agent::cli::{exit, format_time_ms};
use pmem_backend::{Pool, PoolOptions};
use pmsnap_repo::{DirStorage, Repo};

use super::anyhow_like::{context, Result};
use crate::controller::export::{every_tenth, export_snapshot};

const PAGE: u64 = 4096;

/// Arguments of `pmsnap export`.
#[derive(Debug, Args)]
#[command(
    after_help = "Pages are stored by content (BLAKE3): zero pages and content the \
repository holds already (an earlier export, another guest of the same image) are not \
written again. The snapshot appears in REPO only when everything it needs is there: an \
interrupted export leaves REPO consistent, and running it again finishes the job.\n\n\
Exit status: 0 exported; 1 error; 2 usage."
)]
pub struct ExportArgs {
    /// The snapshot (its store name; `guest:UID/NAME` for a guest user's).
    #[arg(value_name = "NAME")]
    pub snapshot: String,
    /// The pool holding it (must not be in use by a running VMM).
    #[arg(long, value_name = "PATH")]
    pub pool: PathBuf,
    /// The repository directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// The name in the repository (default: the snapshot's own); `import` creates the
    /// snapshot under this name.
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pmsnap import`.
#[derive(Debug, Args)]
#[command(
    after_help = "The new pool's guest RAM is the snapshot's and it holds the \
snapshot under its name: `pmsnap restore NAME --pool PATH` runs a VM snapshot from it. \
Every page is checked against its checksum and hash; a damaged or missing pack is an \
error naming it, and the new pool is removed.\n\n\
Exit status: 0 imported; 1 error; 2 usage."
)]
pub struct ImportArgs {
    /// The snapshot in the repository.
    #[arg(value_name = "NAME")]
    pub snapshot: String,
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// The pool to create (must not exist).
    #[arg(long, value_name = "PATH")]
    pub pool: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pmsnap repo`.
#[derive(Debug, Args)]
#[command(after_help = exit::HELP)]
pub struct RepoArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: RepoCommand,
}

/// `pmsnap repo` subcommands.
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// List the snapshots with their sizes and the bytes they share.
    #[command(alias = "list")]
    Ls {
        /// The repository directory.
        repo: PathBuf,
    },
    /// Check every checksum; exit code 3 naming what is damaged.
    Verify {
        /// The repository directory.
        repo: PathBuf,
    },
    /// Remove a snapshot (its content goes at the next gc runs).
    #[command(alias = "delete")]
    Rm {
        /// The repository directory.
        repo: PathBuf,
        /// The snapshot.
        name: String,
    },
    /// Delete content no snapshot references, in two runs at least GRACE apart (safe
    /// while an export is running; docs/repository.md).
    Gc {
        /// The repository directory.
        repo: PathBuf,
        /// Grace period in seconds (0: at once, only when nothing else writes REPO).
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
}

pub(super) fn open_existing(dir: &Path) -> Result<Repo> {
    // Checked before DirStorage, which would create the directory.
    if !dir.join("config").is_file() {
        return Err(format!("{} is not a pmsnap repository (no config)", dir.display()).into());
    }
    let storage = DirStorage::new(dir)
        .map_err(context(format!("cannot open repository {}", dir.display())))?;
    Repo::open_or_init(storage)
        .map_err(context(format!("cannot open repository {}", dir.display())))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Run `pmsnap export`.
pub fn export(args: ExportArgs) -> Result<i32> {
    let pool = Pool::open(&args.pool)
        .map_err(context(format!("cannot open pool {}", args.pool.display())))?;
    let t = std::time::Instant::now();
    let quiet = args.json;
    let mut progress = every_tenth(|line| {
        if !quiet {
            eprintln!("export: {line}");
        }
    });
    let rep = export_snapshot(
        Arc::new(Mutex::new(pool)),
        &args.snapshot,
        args.as_name.as_deref(),
        &args.to,
        &mut progress,
    )
    .map_err(context(format!("cannot export {:?}", args.snapshot)))?;
    let secs = t.elapsed().as_secs_f64();
    if args.json {
        return print_json(&rep).map(|()| exit::OK);
    }
    if rep.no_op {
        println!(
            "{} is in {} already (same content)",
            rep.name,
            args.to.display()
        );
    } else {
        println!(
            "exported {} to {}: {} pages ({} zero), {} new bytes in {} chunks, {} already there, \
             {} written in {:.2} s",
            rep.name,
            args.to.display(),
            rep.pages,
            rep.zero_pages,
            rep.bytes_new,
            rep.chunks_new,
            rep.bytes_skipped,
            rep.bytes_written,
            secs
        );
    }
    Ok(exit::OK)
}

/// What `pmsnap import` did.
#[derive(Debug, serde::Serialize)]
struct ImportReport {
    name: String,
    pool: String,
    pages: u64,
    zero_pages: u64,
    ram_bytes: u64,
    millis: u64,
}

/// Run `pmsnap import`.
pub fn import(args: ImportArgs) -> Result<i32> {
    let repo = open_existing(&args.from)?;
    let m = repo
        .manifest(&args.snapshot)
        .map_err(context(format!("repository {}", args.from.display())))?;
    let meta = m.meta().clone();
    if meta.ram_size == 0 || meta.ram_size % PAGE != 0 {
        return Err(format!(
            "snapshot {:?} does not say its guest RAM size ({} bytes)",
            args.snapshot, meta.ram_size
        )
        .into());
    }
    if args.pool.exists() {
        return Err(format!(
            "{} exists: import creates a new pool (remove it or choose another path)",
            args.pool.display()
        )
        .into());
    }
    let t = std::time::Instant::now();
    let mut pool = Pool::create(&args.pool, meta.ram_size, PoolOptions::default()).map_err(
        context(format!("cannot create pool {}", args.pool.display())),
    )?;
    // From here on a failure removes the half-made pool.
    let res = fill(&repo, &m, &mut pool, &meta, args.json);
    if let Err(e) = res {
        drop(pool);
        let _ = std::fs::remove_file(&args.pool);
        return Err(context(format!(
            "cannot import {:?}; {} removed",
            args.snapshot,
            args.pool.display()
        ))(e));
    }
    let rep = ImportReport {
        name: meta.name.clone(),
        pool: args.pool.display().to_string(),
        pages: m.pages(),
        zero_pages: m.zero_pages(),
        ram_bytes: meta.ram_size,
        millis: t.elapsed().as_millis() as u64,
    };
    if args.json {
        return print_json(&rep).map(|()| exit::OK);
    }
    println!(
        "imported {} into {}: {} pages ({} zero) of a {} MiB guest in {} ms",
        rep.name,
        rep.pool,
        rep.pages,
        rep.zero_pages,
        rep.ram_bytes >> 20,
        rep.millis
    );
    Ok(exit::OK)
}

/// Write the snapshot's pages into the new pool's RAM (a new pool's RAM is zero, so zero
/// pages need nothing), then record the snapshot over them.
fn fill(
    repo: &Repo,
    m: &pmsnap_repo::Manifest,
    pool: &mut Pool,
    meta: &pmsnap_repo::SnapshotMeta,
    quiet: bool,
) -> Result<()> {
    let (file, base) = (pool.file().try_clone()?, pool.ram_offset());
    let total = m.pages();
    let (mut done, mut tenth) = (0u64, 0u64);
    for run in m.page_runs() {
        for page in run.first..run.first + run.count {
            done += 1;
            if !quiet && done * 10 / total.max(1) > tenth {
                tenth = done * 10 / total.max(1);
                eprintln!("import: {}% of {total} pages", tenth * 10);
            }
            if m.is_zero(page) == Some(true) {
                continue;
            }
            let data = repo.read_page(m, page)?;
            file.write_all_at(&data, base + page * PAGE)?;
        }
    }
    file.sync_data()?;
    let state = repo.read_state(m)?;
    let store_meta = pmem_backend::SnapshotMeta {
        owner: meta.owner,
        labels: meta.labels.clone(),
        state,
        process: meta.process.clone(),
    };
    pool.snapshot(&meta.name, meta.kind, &meta.runs, store_meta)?;
    Ok(())
}

/// Run `pmsnap repo`.
pub fn repo(args: RepoArgs) -> Result<i32> {
    match args.command {
        RepoCommand::Ls { repo } => {
            let r = open_existing(&repo)?;
            let list = r.ls()?;
            if args.json {
                return print_json(&list).map(|()| exit::OK);
            }
            println!(
                "{:<24} {:<8} {:<20} {:>8} {:>8} {:>12} {:>12} {:>12}",
                "NAME", "KIND", "CREATED", "PAGES", "ZERO", "STORED", "SHARED", "UNIQUE"
            );
            for s in &list {
                if let Some(e) = &s.error {
                    println!("{:<24} damaged: {e}", s.name);
                    continue;
                }
                println!(
                    "{:<24} {:<8} {:<20} {:>8} {:>8} {:>12} {:>12} {:>12}",
                    s.name,
                    s.kind.map_or("-", |k| k.as_str()),
                    format_time_ms(s.created_unix_ms),
                    s.pages,
                    s.zero_pages,
                    s.stored_bytes,
                    s.shared_bytes,
                    s.unique_bytes
                );
            }
            Ok(exit::OK)
        }
        RepoCommand::Verify { repo } => {
            let r = open_existing(&repo)?;
            let rep = r.verify()?;
            let code = if rep.is_clean() {
                exit::OK
            } else {
                exit::DAMAGE
            };
            if args.json {
                return print_json(&rep).map(|()| code);
            }
            for p in &rep.problems {
                println!(
                    "DAMAGED {}{}: {} (snapshots: {})",
                    p.object,
                    p.chunk.map(|c| format!(" chunk {c}")).unwrap_or_default(),
                    p.detail,
                    if p.snapshots.is_empty() {
                        "none".to_string()
                    } else {
                        p.snapshots.join(", ")
                    }
                );
            }
            println!(
                "{}: {} snapshots, {} packs, {} chunks, {} bytes checked; {} problems, {} \
                 unreferenced packs",
                if rep.is_clean() { "clean" } else { "DAMAGED" },
                rep.snapshots,
                rep.packs,
                rep.chunks,
                rep.bytes,
                rep.problems.len(),
                rep.unreferenced_packs
            );
            Ok(code)
        }
        RepoCommand::Rm { repo, name } => {
            let r = open_existing(&repo)?;
            r.remove(&name)?;
            if args.json {
                return print_json(&serde_json::json!({ "removed": name })).map(|()| exit::OK);
            }
            println!("removed {name} (its content goes at the next gc runs)");
            Ok(exit::OK)
        }
        RepoCommand::Gc { repo, grace_secs } => {
            let r = open_existing(&repo)?;
            let rep = r.gc(std::time::Duration::from_secs(grace_secs))?;
            if args.json {
                return print_json(&rep).map(|()| exit::OK);
            }
            println!(
                "gc: deleted {} packs ({} bytes); {} packs ({} bytes) condemned, deleted by a \
                 run {grace_secs} s after they were condemned; {} young packs kept",
                rep.deleted_packs,
                rep.freed_bytes,
                rep.condemned_packs,
                rep.condemned_bytes,
                rep.young_packs
            );
            Ok(exit::OK)
        }
    }
}
