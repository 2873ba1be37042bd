//! `pmsnap export`, `pmsnap import` and `pmsnap repo ...`: snapshots leave the pool for a
//! repository (crate `pmsnap-repo`, docs/repository.md) and come back into a new pool.
//!
//! Export and import work offline on a pool no VMM holds (its lock is taken). An import
//! creates a new pool whose RAM is the snapshot's and which holds the snapshot, so
//! `pmsnap restore NAME --pool P` runs a VM snapshot from it on this or another host.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 `repo verify` found damage.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use clap::{Args, Subcommand};
use guest_agent::cli::{exit, format_time_ms};
use pmem_backend::{Pool, PoolOptions};
use pmsnap_repo::{open_storage, PackCache, Repo, RepoLocation, S3Options};

use super::anyhow_like::{context, Result};
use crate::controller::export::{every_tenth, export_snapshot};

const PAGE: u64 = 4096;

/// How to reach a repository in an S3 bucket (every repository command takes them).
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// Endpoint of s3:// repositories [default: $AWS_ENDPOINT_URL, else AWS]. An
    /// http:// endpoint is used as plain HTTP; requests are path-style. Credentials come
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN).
    #[arg(long, value_name = "URL", global = true)]
    pub s3_endpoint: Option<String>,
    /// Region of s3:// repositories [default: $AWS_REGION, else us-east-1].
    #[arg(long, value_name = "REGION", global = true)]
    pub s3_region: Option<String>,
    /// Give up on an S3 request still failing this long after its first attempt (it is
    /// retried with exponential backoff meanwhile) [default: $PMSNAP_S3_RETRY_SECS, else
    /// 60].
    #[arg(long, value_name = "SECS", global = true)]
    pub s3_retry_secs: Option<u64>,
    /// Local cache of pack ranges fetched from s3:// repositories, shared by every pmsnap
    /// on this host that uses it (each 1 MiB range is fetched once) [default:
    /// $PMSNAP_CACHE_DIR, else /var/tmp/pmsnap-cache].
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Size limit of the cache in MiB; the least recently used ranges go first (0: no
    /// cache).
    #[arg(long, value_name = "MIB", global = true, default_value_t = 4096)]
    pub cache_mib: u64,
}

impl StoreArgs {
    /// The S3 options: the environment, overridden by the flags.
    pub fn s3_options(&self) -> S3Options {
        let mut o = S3Options::from_env();
        if let Some(e) = &self.s3_endpoint {
            o.endpoint = Some(e.clone());
        }
        if let Some(r) = &self.s3_region {
            o.region = r.clone();
        }
        if let Some(s) = self.s3_retry_secs {
            o.retry_timeout = std::time::Duration::from_secs(s);
        }
        o
    }

    /// The pack cache of s3:// repositories (None with `--cache-mib 0`).
    pub fn cache(&self) -> Result<Option<Arc<PackCache>>> {
        if self.cache_mib == 0 {
            return Ok(None);
        }
        let dir = self
            .cache_dir
            .clone()
            .or_else(|| std::env::var_os("PMSNAP_CACHE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/tmp/pmsnap-cache"));
        let c = PackCache::open(&dir, self.cache_mib << 20).map_err(context(format!(
            "cannot open the pack cache {}",
            dir.display()
        )))?;
        Ok(Some(Arc::new(c)))
    }
}

/// Open the repository named by a REPO argument (a directory or `s3://BUCKET/PREFIX`):
/// the one way every command reaches a repository. With `create`, a repository is made
/// if there is none (export); otherwise its absence is an error naming REPO.
pub fn open_repo(arg: &str, store: &StoreArgs, create: bool) -> Result<Repo> {
    let loc = RepoLocation::parse(arg)?;
    let what = format!("cannot open repository {loc}");
    let cannot = || context(what.clone());
    if !create {
        if let RepoLocation::Dir(dir) = &loc {
            // Checked before DirStorage, which would create the directory.
            if !dir.join("config").is_file() {
                return Err(format!("{loc} is not a pmsnap repository (no config)").into());
            }
        }
    }
    let storage = open_storage(&loc, &store.s3_options()).map_err(cannot())?;
    if !create && loc.is_s3() && !storage.exists("config").map_err(cannot())? {
        // Says so when the bucket itself is missing or unreachable.
        storage.list("config").map_err(cannot())?;
        return Err(format!("{loc} is not a pmsnap repository (no config)").into());
    }
    let repo = Repo::open_or_init(storage).map_err(context(what.clone()))?;
    // A directory is read in place; a bucket through the host's pack cache.
    if !loc.is_s3() {
        return Ok(repo);
    }
    Ok(match store.cache()? {
        Some(c) => repo.with_cache(c),
        None => repo,
    })
}

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
    /// The repository: a directory (created if missing) or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "REPO")]
    pub to: String,
    /// The name in the repository (default: the snapshot's own); `import` creates the
    /// snapshot under this name.
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Arguments of `pmsnap import`.
#[derive(Debug, Args)]
#[command(
    after_help = "The new pool's guest RAM is the snapshot's and it holds the \
snapshot under its name: `pmsnap restore NAME --pool PATH` runs a VM snapshot from it. \
Every page is checked against its checksum and hash; a damaged or missing pack is an \
error naming it, and the new pool is removed.\n\n\
From an s3:// repository, import keeps what it fetched in the pack cache only when \
--cache-dir or PMSNAP_CACHE_DIR names one: it reads every range once and the new pool \
holds the pages afterwards, and writing a copy into the cache would cost more than the \
download (docs/perf-s3.md).\n\n\
Exit status: 0 imported; 1 error; 2 usage."
)]
pub struct ImportArgs {
    /// The snapshot in the repository.
    #[arg(value_name = "NAME")]
    pub snapshot: String,
    /// The repository: a directory or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "REPO")]
    pub from: String,
    /// The pool to create (must not exist).
    #[arg(long, value_name = "PATH")]
    pub pool: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Arguments of `pmsnap repo`.
#[derive(Debug, Args)]
#[command(after_help = exit::HELP)]
pub struct RepoArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
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
        /// The repository: a directory or s3://BUCKET/PREFIX.
        repo: String,
    },
    /// Check every checksum; exit code 3 naming what is damaged.
    Verify {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        repo: String,
    },
    /// Remove a snapshot (its content goes at the next gc runs).
    #[command(alias = "delete")]
    Rm {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        repo: String,
        /// The snapshot.
        name: String,
    },
    /// Delete content no snapshot references, in two runs at least GRACE apart (safe
    /// while an export is running; docs/repository.md).
    Gc {
        /// The repository: a directory or s3://BUCKET/PREFIX.
        repo: String,
        /// Grace period in seconds (0: at once, only when nothing else writes REPO).
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
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
        &RepoLocation::parse(&args.to)?,
        &args.store.s3_options(),
        &mut progress,
    )
    .map_err(context(format!("cannot export {:?}", args.snapshot)))?;
    let secs = t.elapsed().as_secs_f64();
    if args.json {
        return print_json(&rep).map(|()| exit::OK);
    }
    if rep.no_op {
        println!("{} is in {} already (same content)", rep.name, args.to);
    } else {
        println!(
            "exported {} to {}: {} pages ({} zero), {} new bytes in {} chunks, {} already there, \
             {} written in {:.2} s",
            rep.name,
            args.to,
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
    /// Bytes fetched from a bucket into the pack cache (0: all in the cache already;
    /// absent for a directory, and without a pack cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    fetched_bytes: Option<u64>,
}

/// Run `pmsnap import`.
pub fn import(args: ImportArgs) -> Result<i32> {
    // A one-pass copy: the pack cache only when the user names one (see the help).
    let mut store = args.store.clone();
    if store.cache_dir.is_none() && std::env::var_os("PMSNAP_CACHE_DIR").is_none() {
        store.cache_mib = 0;
    }
    let repo = open_repo(&args.from, &store, false)?;
    let m = repo
        .manifest(&args.snapshot)
        .map_err(context(format!("repository {}", args.from)))?;
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
        fetched_bytes: repo.pack_cache().map(|c| c.stats().fetched_bytes),
    };
    if args.json {
        return print_json(&rep).map(|()| exit::OK);
    }
    println!(
        "imported {} into {}: {} pages ({} zero) of a {} MiB guest in {} ms{}",
        rep.name,
        rep.pool,
        rep.pages,
        rep.zero_pages,
        rep.ram_bytes >> 20,
        rep.millis,
        rep.fetched_bytes
            .map(|b| format!(", {b} bytes fetched (the rest from the pack cache)"))
            .unwrap_or_default()
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
    // Non-zero pages, through Repo::read_page_list: spans of close chunks are fetched
    // (or taken from the pack cache) and checked on several threads, ahead of the writes.
    let pages: Vec<u64> = m
        .page_runs()
        .iter()
        .flat_map(|r| r.first..r.first + r.count)
        .collect();
    let nonzero: Vec<u64> = pages
        .iter()
        .copied()
        .filter(|&p| m.is_zero(p) != Some(true))
        .collect();
    let n = nonzero.len() as u64;
    let mut write_err = None;
    let res = repo.read_page_list(m, &nonzero, &mut |page, data| {
        if let Err(e) = file.write_all_at(data, base + page * PAGE) {
            write_err = Some(e);
            return Err(pmsnap_repo::RepoError::Source("write".into()));
        }
        done += 1;
        if !quiet && done * 10 / n.max(1) > tenth {
            tenth = done * 10 / n.max(1);
            eprintln!(
                "import: {}% of {n} non-zero pages ({total} pages)",
                tenth * 10
            );
        }
        Ok(())
    });
    if let Some(e) = write_err {
        return Err(e.into());
    }
    res?;
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
            let r = open_repo(&repo, &args.store, false)?;
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
            let r = open_repo(&repo, &args.store, false)?;
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
            let r = open_repo(&repo, &args.store, false)?;
            r.remove(&name)?;
            if args.json {
                return print_json(&serde_json::json!({ "removed": name })).map(|()| exit::OK);
            }
            println!("removed {name} (its content goes at the next gc runs)");
            Ok(exit::OK)
        }
        RepoCommand::Gc { repo, grace_secs } => {
            let r = open_repo(&repo, &args.store, false)?;
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
