//! `pmsnap restore`: resume a guest from a VM snapshot in its pool, in a new VMM process
//! (for example after the first one was killed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind};

use clap::Args;

use super::anyhow_like::{context, Result};
use crate::api::ApiServerHandle;
use crate::builder::{LazySpec, RunningVm, VmBuilder};
use crate::config::{self, VmConfig};
use crate::controller::repo_source::RepoPageSource;
use crate::devices::legacy::serial::StdoutWriter;
use crate::devices::legacy::RawModeGuard;
use crate::event_loop::EventLoop;
use crate::persist::load::load_vm_state;
use crate::persist::VmState;
use crate::snapshot::block_source::PoolBlockSource;
use crate::snapshot::lazy::{FillOptions, PageSource};

/// Arguments of `pmsnap restore`.
#[derive(Debug, Args)]
#[command(
    after_help = "The pool must not be in use by another VMM (its lock is taken). \
Guest RAM becomes the snapshot's: pages the snapshot still references in place need no \
copy; preserved pages are copied back (what other snapshots still need is preserved \
first). The console is this terminal, as with `pmsnap run`.\n\n\
After a VMM was killed (kill -9), restore it with the same arguments: the sockets it left \
behind are replaced (a socket a live process still serves is refused).\n\n\
Exit status: as for `pmsnap run` (0 guest powered off; 1 error; 2 usage; 128+N signal N)."
)]
pub struct RestoreArgs {
    /// Name of the VM snapshot to resume (`--snapshot NAME` is accepted too).
    #[arg(value_name = "NAME", required_unless_present = "snapshot_flag")]
    pub snapshot: Option<String>,
    /// The older spelling of NAME.
    #[arg(
        long = "snapshot",
        value_name = "NAME",
        hide = true,
        conflicts_with = "snapshot"
    )]
    pub snapshot_flag: Option<String>,
    /// Pool file holding the snapshot (and guest RAM). With --from: the new pool to
    /// create (it must not exist).
    #[arg(long, value_name = "PATH")]
    pub pool: PathBuf,
    /// Restore lazily from this repository (what `pmsnap export` wrote) instead of from
    /// the pool: a new pool is created and the vCPUs run before guest RAM is there.
    /// A page comes on its first access; the rest follows in the background (--fill).
    #[arg(long, value_name = "REPO")]
    pub from: Option<String>,
    /// How to reach an s3:// repository (--from).
    #[command(flatten)]
    pub store: super::repo::StoreArgs,
    /// With --from (or a lazy --copy-back): `background` fills every page after the
    /// vCPUs run; `on-demand` fetches only what the guest touches (clones of one
    /// snapshot: each uses host memory only for what it touches; a pool left with
    /// pages to copy back finishes the copy when it is next opened).
    #[arg(long, value_enum, default_value_t = FillMode::Background)]
    pub fill: FillMode,
    /// With --from: size of the new pool's block area (preserved pages), with K, M or G
    /// suffix (default: as large as guest RAM).
    #[arg(long, value_name = "SIZE", value_parser = parse_mem, requires = "from")]
    pub block_area: Option<u64>,
    /// With --from: the background fill goes in address order even when the snapshot
    /// records the order the guest touched pages in after it (which it otherwise reads
    /// first); to measure what that order gains.
    #[arg(long, requires = "from")]
    pub ignore_touch_order: bool,
    /// How preserved pages come back into RAM: `eager` copies them before the vCPUs
    /// run; `lazy` leaves them out and the vCPUs run at once, each page arriving from
    /// its block on first access or in the background; `auto` is lazy from
    /// 4096 pages on (eager with --paused, whose RAM must hold the snapshot).
    #[arg(long, value_enum, default_value_t = CopyBack::Auto, conflicts_with = "from")]
    pub copy_back: CopyBack,
    /// Expected guest RAM (checked against the snapshot), with K, M or G suffix.
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub mem: Option<u64>,
    /// Expected number of vCPUs (checked against the snapshot).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Serve the control API on this Unix socket.
    #[arg(
        long,
        value_name = "PATH",
        env = "PMSNAP_API_SOCK",
        hide_env_values = true
    )]
    pub api_sock: Option<PathBuf>,
    /// Host socket of the virtio-vsock device; required when the snapshot had one (its
    /// connections are reset; the guest agent reconnects).
    #[arg(long, value_name = "PATH")]
    pub vsock_sock: Option<PathBuf>,
    /// Restore everything but leave the vCPUs paused until `POST /v1/resume` on the API
    /// socket (`pmsnap ctl --api-sock PATH resume`); needs --api-sock. Guest RAM then
    /// holds exactly the snapshot until the resume.
    #[arg(long, requires = "api_sock")]
    pub paused: bool,
    /// Limits of guest-owned snapshots.
    #[command(flatten)]
    pub guest: super::GuestArgs,
    /// Run without the per-thread seccomp filters (to debug a VMM stopped by "forbidden
    /// system call"; see docs/security.md).
    #[arg(long)]
    pub no_seccomp: bool,
    /// The user and group the VMM's threads run as.
    #[command(flatten)]
    pub ids: super::IdArgs,
}

/// How a lazy restore fills guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FillMode {
    /// Every page, in the background, once the vCPUs run.
    Background,
    /// Only the pages the guest (or the VMM) touches.
    OnDemand,
}

/// How `pmsnap restore` brings preserved pages back into RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CopyBack {
    /// Lazily from 4096 pages on (eager when paused).
    Auto,
    /// Copied before the vCPUs run.
    Eager,
    /// Filled on first access and in the background while the vCPUs run.
    Lazy,
}

/// From this many pages to copy back, `--copy-back auto` fills them lazily: copying
/// costs about 1.6 us a page here (docs/perf-vm.md), so 4096 pages are ~7 ms before the
/// vCPUs run, about what setting up the lazy fill costs.
pub const LAZY_COPY_BACK_PAGES: u64 = 4096;

fn parse_mem(s: &str) -> std::result::Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

/// Run `pmsnap restore`.
pub fn run(args: RestoreArgs) -> Result<i32> {
    if !args.no_seccomp {
        crate::seccomp::enable();
    }
    args.ids.arm()?;
    let started = Instant::now();
    let name = args
        .snapshot
        .as_deref()
        .or(args.snapshot_flag.as_deref())
        .unwrap_or_default();
    crate::api::validate_snapshot_name(name)
        .map_err(context(format!("invalid snapshot name {name:?}")))?;
    // A socket a live process serves fails now, before any work; stale ones go.
    for sock in [&args.api_sock, &args.vsock_sock].into_iter().flatten() {
        crate::unix_socket::remove_stale(sock)?;
    }
    if let Some(repo) = &args.from {
        return run_lazy(&args, name, repo, started);
    }
    // Validate everything with the pool's lock held, before building anything.
    let (state, mem_bytes, pool) = {
        let pool = pmem_backend::Pool::open(&args.pool)
            .map_err(context(format!("cannot open pool {}", args.pool.display())))?;
        let mem_bytes = pool.ram_size();
        check_mem(&args, name, mem_bytes)?;
        let vcpus = args.vcpus.map(|v| v as usize);
        let state = load_vm_state(&pool, name, vcpus, mem_bytes)
            .map_err(context(format!("cannot restore snapshot {name:?}")))?;
        (state, mem_bytes, pool)
    };
    log::debug!(
        "pool opened and state checked after {:?}",
        started.elapsed()
    );
    let to_copy = pool
        .inspect(name)
        .and_then(|i| {
            pool.preserved_pages(name, &i.runs)
                .map(|p| (i.runs, p.len() as u64))
        })
        .map_err(context(format!("cannot restore snapshot {name:?}")))?;
    let (runs, to_copy) = to_copy;
    let lazy = match args.copy_back {
        CopyBack::Eager => false,
        CopyBack::Lazy => to_copy > 0,
        CopyBack::Auto => to_copy >= LAZY_COPY_BACK_PAGES && !args.paused,
    };
    if lazy {
        return run_copy_back_lazy(&args, name, &state, pool, &runs, started);
    }
    let mut event_loop = EventLoop::new()?;
    event_loop.handle_termination_signals()?;
    let builder = VmBuilder::for_restore(
        &restore_config(&args, &state, mem_bytes),
        event_loop.stop_notifier()?,
        Box::new(StdoutWriter),
        pool,
    )?;
    let (mut running, raw) = start_paused(&args, name, &state, builder, &event_loop, started)?;
    let restored = running.controller().restore_snapshot(name, &state)?;
    log::debug!("snapshot restored after {:?}", started.elapsed());
    let (to_run, _api) = run_and_serve(&args, &mut event_loop, &mut running, started)?;
    log::info!(
        "restored snapshot {name:?}: {} of {} pages copied back in {:?}; vCPUs {} {to_run:?} after start",
        restored.pages_copied,
        mem_bytes / 4096,
        restored.copy_time,
        run_state(&args)
    );
    super::serve_until_stopped(&mut event_loop, running, raw, started)
}

/// `pmsnap restore` of a snapshot with many pages in blocks: they are punched out of RAM
/// (each preserved first for the other snapshots that reference it) and arrive from
/// their blocks through the lazy fill once the vCPUs run
/// ([`pmem_backend::Pool::copy_back_lazy`], [`PoolBlockSource`]).
fn run_copy_back_lazy(
    args: &RestoreArgs,
    name: &str,
    state: &VmState,
    mut pool: Pool,
    runs: &[PageRun],
    started: Instant,
) -> Result<i32> {
    let mem_bytes = pool.ram_size();
    let t = Instant::now();
    let back = pool
        .copy_back_lazy(name, runs)
        .map_err(context(format!("cannot restore snapshot {name:?}")))?;
    let prepared = t.elapsed();
    let file = pool
        .file()
        .try_clone()
        .map_err(context(format!("cannot read {}", args.pool.display())))?;
    let lazy = LazySpec {
        source: Arc::new(PoolBlockSource::new(file, &back)),
        options: FillOptions {
            background: args.fill == FillMode::Background,
        },
        missing: Some(back.hole_runs()),
    };
    let mut event_loop = EventLoop::new()?;
    event_loop.handle_termination_signals()?;
    let builder = VmBuilder::for_lazy_restore(
        &restore_config(args, state, mem_bytes),
        event_loop.stop_notifier()?,
        Box::new(StdoutWriter),
        pool,
        lazy,
    )?;
    let (mut running, raw) = start_paused(args, name, state, builder, &event_loop, started)?;
    running.controller().restore_state(state)?;
    let (to_run, _api) = run_and_serve(args, &mut event_loop, &mut running, started)?;
    log::info!(
        "restored snapshot {name:?}: {} of {} pages copied back in {prepared:?}, {} arrive \
         lazily from its blocks; vCPUs {} {to_run:?} after start",
        back.copied.len(),
        mem_bytes / 4096,
        back.holes.len(),
        run_state(args)
    );
    super::serve_until_stopped(&mut event_loop, running, raw, started)
}

/// `pmsnap restore --from REPO`: a new pool whose RAM arrives lazily.
fn run_lazy(args: &RestoreArgs, name: &str, from: &str, started: Instant) -> Result<i32> {
    let where_ = from.to_string();
    let repo = super::repo::open_repo(from, &args.store, false)?;
    let m = repo
        .manifest(name)
        .map_err(context(format!("repository {where_}")))?;
    let meta = m.meta().clone();
    if meta.kind != SnapshotKind::Vm {
        return Err(format!(
            "snapshot {name:?} in {where_} is a {} snapshot; only VM snapshots restore",
            meta.kind.as_str()
        )
        .into());
    }
    let mem_bytes = meta.ram_size;
    check_mem(args, name, mem_bytes)?;
    let blob = repo.read_state(&m).map_err(context(format!(
        "cannot read the state of {name:?} from {where_}"
    )))?;
    let state = VmState::decode(&blob)
        .and_then(|s| {
            let vcpus = args.vcpus.map_or(s.vcpus.len(), |v| v as usize);
            s.validate(vcpus, mem_bytes).map(|()| s)
        })
        .map_err(context(format!("cannot restore snapshot {name:?}")))?;
    if args.pool.exists() {
        return Err(format!(
            "{} exists: restore --from creates a new pool (remove it or choose another path)",
            args.pool.display()
        )
        .into());
    }
    let mut source = RepoPageSource::new(repo, m, &where_);
    if args.ignore_touch_order {
        source = source.without_touch_order();
    }
    let options = PoolOptions {
        block_count: args.block_area.map(|b| b.div_ceil(4096)),
        lazy_ram: Some(source.describe()),
        ..PoolOptions::default()
    };
    log::debug!("repository read after {:?}", started.elapsed());
    let pool = Pool::create(&args.pool, mem_bytes, options).map_err(context(format!(
        "cannot create pool {}",
        args.pool.display()
    )))?;
    log::debug!("pool created after {:?}", started.elapsed());
    // Until the guest state is in, a failure leaves no half-made pool behind.
    let mut cleanup = RemoveOnError(Some(args.pool.clone()));
    let mut event_loop = EventLoop::new()?;
    event_loop.handle_termination_signals()?;
    let lazy = LazySpec {
        source: Arc::new(source),
        options: FillOptions {
            background: args.fill == FillMode::Background,
        },
        missing: None,
    };
    let builder = VmBuilder::for_lazy_restore(
        &restore_config(args, &state, mem_bytes),
        event_loop.stop_notifier()?,
        Box::new(StdoutWriter),
        pool,
        lazy,
    )?;
    let (mut running, raw) = start_paused(args, name, &state, builder, &event_loop, started)?;
    running.controller().restore_state(&state)?;
    cleanup.0 = None;
    let (to_run, _api) = run_and_serve(args, &mut event_loop, &mut running, started)?;
    log::info!(
        "restored snapshot {name:?} lazily from {where_} into {}: vCPUs {} {to_run:?} after start; \
         guest RAM fills {}",
        args.pool.display(),
        run_state(args),
        match args.fill {
            FillMode::Background => "in the background",
            FillMode::OnDemand => "on demand only",
        }
    );
    super::serve_until_stopped(&mut event_loop, running, raw, started)
}

/// Removes a pool (and its fill marker) when dropped armed.
struct RemoveOnError(Option<PathBuf>);

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(&p);
            let _ = pmem_backend::mark_ram_complete(&p);
        }
    }
}

fn check_mem(args: &RestoreArgs, name: &str, mem_bytes: u64) -> Result<()> {
    match args.mem {
        Some(m) if m != mem_bytes => Err(format!(
            "snapshot {name:?} is of a {} MiB guest, --mem asks for {} MiB",
            mem_bytes >> 20,
            m >> 20
        )
        .into()),
        _ => Ok(()),
    }
}

fn restore_config(args: &RestoreArgs, state: &VmState, mem_bytes: u64) -> VmConfig {
    VmConfig {
        kernel: PathBuf::new(),
        initrd: None,
        extra_cmdline: String::new(),
        mem_bytes,
        vcpus: state.vcpus.len() as u32,
        pool: args.pool.clone(),
        block_area: None,
        pool_node: None,
    }
}

/// Wire the snapshot's devices and start its vCPUs paused (the state goes in next).
fn start_paused(
    args: &RestoreArgs,
    name: &str,
    state: &VmState,
    mut builder: VmBuilder,
    event_loop: &EventLoop,
    started: Instant,
) -> Result<(RunningVm, Option<RawModeGuard>)> {
    let want = usize::from(args.vsock_sock.is_some());
    if state.mmio.len() != want {
        return Err(format!(
            "snapshot {name:?} has {} virtio devices; restore it {} --vsock-sock",
            state.mmio.len(),
            if state.mmio.is_empty() {
                "without"
            } else {
                "with"
            }
        )
        .into());
    }
    log::debug!("VM and engine created after {:?}", started.elapsed());
    // The same devices, wired the same way, as `pmsnap run` gave the VM.
    if let Some(path) = &args.vsock_sock {
        builder.add_vsock(path, args.guest.limits())?;
    }
    let built = builder.build_for_restore()?;
    let raw = RawModeGuard::new(0)?;
    // The vCPUs start paused; the snapshot's RAM and state go in as a rollback puts
    // them back, then they run (unless --paused).
    let running = built.start_paused(&event_loop.stop_notifier()?)?;
    log::debug!("vCPU threads started after {:?}", started.elapsed());
    Ok((running, raw))
}

/// Run the vCPUs (unless --paused), start the background work, serve devices and the
/// API. Returns the time from start to running vCPUs, and the API server (served until
/// it is dropped).
fn run_and_serve(
    args: &RestoreArgs,
    event_loop: &mut EventLoop,
    running: &mut RunningVm,
    started: Instant,
) -> Result<(std::time::Duration, Option<ApiServerHandle>)> {
    if !args.paused {
        running.run_vcpus()?;
    }
    let to_run = started.elapsed();
    log::debug!("vCPUs resumed after {to_run:?}");
    running.start_prefault()?;
    super::serve_devices(event_loop, running)?;
    // Served once the vCPUs and state capture exist, so a client that sees the socket
    // can pause, resume or snapshot at once (with --paused, POST /v1/resume is next).
    let api = super::serve_api(args.api_sock.as_deref(), running.controller())?;
    args.ids
        .give_sockets(&[args.api_sock.as_deref(), args.vsock_sock.as_deref()])?;
    Ok((to_run, api))
}

fn run_state(args: &RestoreArgs) -> &'static str {
    if args.paused {
        "paused (POST /v1/resume runs them)"
    } else {
        "running"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        restore: RestoreArgs,
    }

    fn parse(a: &[&str]) -> std::result::Result<RestoreArgs, clap::Error> {
        T::try_parse_from(std::iter::once("restore").chain(a.iter().copied())).map(|t| t.restore)
    }

    #[test]
    fn snapshot_name_is_positional_or_the_old_flag() {
        let a = parse(&["--pool", "/p", "snap1"]).expect("positional");
        assert_eq!(a.snapshot.as_deref(), Some("snap1"));
        let a = parse(&["--pool", "/p", "--snapshot", "old"]).expect("old flag");
        assert_eq!(a.snapshot_flag.as_deref(), Some("old"));
        let e = parse(&["--pool", "/p"]).expect_err("no name");
        assert_eq!(e.exit_code(), guest_agent::cli::exit::USAGE);
        assert!(parse(&["--pool", "/p", "a", "--snapshot", "b"]).is_err());
        let e = parse(&["--pool", "/p", "s", "--paused"]).expect_err("--paused needs the API");
        assert_eq!(e.exit_code(), guest_agent::cli::exit::USAGE);
    }
}
