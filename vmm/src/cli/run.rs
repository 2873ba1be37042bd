//! `pmsnap run`: boot a guest with its console on this terminal.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;

use super::anyhow_like::{context, Result};
use crate::builder::VmBuilder;
use crate::config::{self, VmConfig};
use crate::devices::legacy::serial::StdoutWriter;
use crate::devices::legacy::watch::MarkerWatch;
use crate::devices::legacy::RawModeGuard;
use crate::event_loop::EventLoop;
use crate::payload::{PayloadProgress, PROGRESS_PORT};
use crate::pool_dir;

use super::restore::{FillMode, RestoreArgs};
use super::template::{self, Template};

/// Arguments of `pmsnap run`.
#[derive(Debug, Args)]
#[command(after_help = after_help())]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux (fast here) or a bzImage.
    /// [default: $PMSNAP_IMAGE_DIR/vmlinux, else images/cache/default/vmlinux]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (an uncompressed cpio boots fastest here).
    /// [default: $PMSNAP_IMAGE_DIR/initramfs.cpio, else images/cache/default/initramfs.cpio]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command-line words, appended to the defaults (shown below).
    #[arg(long, value_name = "WORDS", default_value = "")]
    pub cmdline: String,
    /// Guest RAM, with an optional K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_mem)]
    pub mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_VCPUS)]
    pub vcpus: u32,
    /// Pool file holding guest RAM; must be on tmpfs (/dev/shm), hugetlbfs or a memfd.
    /// [default: a new file in $PMSNAP_POOL_DIR, else /dev/shm/pmsnap/
    /// (/dev/shm/pmsnap-UID/ if not root), removed at exit unless --keep-pool;
    /// `pmsnap store prune` removes those of VMMs that were killed]
    #[arg(long, value_name = "PATH")]
    pub pool: Option<PathBuf>,
    /// Keep the default pool file at exit (its path is logged; named `*.kept.pool`, so
    /// `pmsnap store prune` leaves it).
    #[arg(long)]
    pub keep_pool: bool,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket, e.g. for
    /// `pmsnap ctl --api-sock PATH status` or `curl --unix-socket PATH http://localhost/v1/status`.
    /// A stale socket left by a VMM that died is replaced; one a live process serves is
    /// refused.
    #[arg(
        long,
        value_name = "PATH",
        env = "PMSNAP_API_SOCK",
        hide_env_values = true
    )]
    pub api_sock: Option<PathBuf>,
    /// Give the guest a virtio-vsock device whose host side is this Unix socket
    /// (Firecracker style: connect and send `CONNECT <port>\n` to reach a guest
    /// listener). The guest agent reaches the VMM's snapshot service through it. A stale
    /// socket is replaced, a live one refused, as for --api-sock.
    #[arg(long, value_name = "PATH")]
    pub vsock_sock: Option<PathBuf>,
    /// Test mode: instead of Linux, run this flat binary directly in guest user mode on
    /// every vCPU (rdi = vCPU index, rsi = vCPU count, rdx/rcx = work region base and
    /// size). Used by the engine's tests; see vmm/src/payload.rs.
    #[arg(long, value_name = "PATH", hide = true, conflicts_with_all = ["kernel", "initrd"])]
    pub payload: Option<PathBuf>,
    /// When the guest prints `pmsnap-guest: ready`, snapshot all of its RAM under NAME
    /// (no page is copied: the pages become copy-before-write) and log what it cost.
    #[arg(long, value_name = "NAME", conflicts_with = "payload")]
    pub snapshot_at_ready: Option<String>,
    /// Limits of guest-owned snapshots.
    #[command(flatten)]
    pub guest: super::GuestArgs,
    /// Size of the block area of a pool created now, with K, M or G suffix: where pages
    /// are preserved before their first write after a snapshot, and VM state kept.
    /// Default: as large as guest RAM. Grow it later with `pmsnap ctl pool grow SIZE`.
    #[arg(long, value_name = "SIZE", value_parser = parse_mem)]
    pub block_area: Option<u64>,
    /// Allocate a pool created now on NUMA node N (persistent or CXL memory used as
    /// system RAM appears as a node); the log says where its pages are. See
    /// docs/machine-notes.md.
    #[arg(long, value_name = "N")]
    pub pool_node: Option<u32>,
    /// Boot the kernel even when a ready template of this image exists (and keep the
    /// new ready state as the template).
    #[arg(long)]
    pub cold: bool,
    /// Repository of ready templates: the first run of an image keeps its booted
    /// `ready` state there, later runs of the same image, RAM, vCPUs and command line
    /// start from it. [default: $XDG_CACHE_HOME/pmsnap/templates, else
    /// ~/.cache/pmsnap/templates]
    #[arg(
        long,
        value_name = "DIR",
        env = "PMSNAP_TEMPLATE_DIR",
        conflicts_with = "payload"
    )]
    pub template_dir: Option<PathBuf>,
    /// Neither start from a template nor keep one (for scripts that wait for the
    /// guest's `ready` line: a guest started from a template does not print it again).
    #[arg(
        long,
        env = "PMSNAP_NO_TEMPLATE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_template: bool,
    /// Run without the per-thread seccomp filters (to debug a VMM stopped by "forbidden
    /// system call"; see docs/security.md).
    #[arg(long)]
    pub no_seccomp: bool,
    /// The user and group the VMM's threads run as.
    #[command(flatten)]
    pub ids: super::IdArgs,
}

/// The line the default image's init prints when the guest is up.
const READY_MARKER: &[u8] = b"pmsnap-guest: ready";

/// `pmsnap restore --from TEMPLATE-REPO` arguments for a `pmsnap run` that starts from
/// template `t` (the same pool, sockets, limits and ids).
fn from_template(args: &RunArgs, cfg: &VmConfig, t: &Template) -> RestoreArgs {
    RestoreArgs {
        snapshot: Some(t.name.clone()),
        snapshot_flag: None,
        pool: cfg.pool.clone(),
        from: Some(t.location()),
        store: Default::default(),
        fill: FillMode::Background,
        copy_back: super::restore::CopyBack::Auto,
        block_area: cfg.block_area,
        ignore_touch_order: false,
        mem: Some(cfg.mem_bytes),
        vcpus: Some(cfg.vcpus),
        api_sock: args.api_sock.clone(),
        vsock_sock: args.vsock_sock.clone(),
        paused: false,
        guest: args.guest,
        no_seccomp: args.no_seccomp,
        ids: args.ids,
    }
}

/// `--snapshot-at-ready`: a page snapshot of all of RAM.
fn snapshot_at_ready(engine: &crate::snapshot::engine::Engine, name: &str, pages: u64) {
    let t = std::time::Instant::now();
    let res = engine.snapshot(
        name,
        pmem_backend::SnapshotKind::Pages,
        &[pmem_backend::PageRun::new(0, pages)],
        Default::default(),
    );
    match res {
        Ok(info) => log::info!(
            "snapshot {name:?}: all {} pages of guest RAM in {:?}, no page copied; \
             pages are preserved as the guest writes them (see `pmsnap ctl stats`)",
            info.pages,
            t.elapsed()
        ),
        Err(e) => log::error!("snapshot {name:?} at ready failed: {e}"),
    }
}

fn parse_mem(s: &str) -> std::result::Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

/// Removes a temporary pool file at drop, on every exit path.
struct TempPool(Option<PathBuf>);

impl Drop for TempPool {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            // A pool started from a template may still be filling: its marker goes too.
            let _ = pmem_backend::mark_ram_complete(p);
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove pool {}: {e}", p.display());
                }
            }
        }
    }
}

fn default_pool_path(keep: bool) -> PathBuf {
    pool_dir::new_pool_path(&pool_dir::default_dir(), keep)
}

/// The text after the options in `pmsnap run --help`, with the default kernel command
/// line in full from [`config::DEFAULT_CMDLINE`].
fn after_help() -> String {
    format!(
        "The guest console is this terminal (raw mode; Ctrl-A x quits). Stdin may also be a \
pipe: commands written to it are typed on the console, and its end does not stop the guest.\n\n\
Exit status: 0 when the guest reboots or powers off (poweroff -f, reboot, triple fault); \
1 on a VMM error; 2 on a usage error; 128+N when killed by signal N.\n\n\
Default kernel command line (--cmdline words are appended):\n  {}",
        config::DEFAULT_CMDLINE
    )
}

/// Resolve defaults and check the arguments that need no host access.
pub fn resolve(args: &RunArgs, image_dir_env: Option<&str>) -> Result<(VmConfig, bool, bool)> {
    if args.vcpus == 0 {
        return Err(config::ConfigError::NoVcpus.into());
    }
    config::validate_mem(args.mem)?;
    let temporary = args.pool.is_none();
    if let Some(payload) = &args.payload {
        config::check_image_file("payload", payload, false)?;
        let pool = args
            .pool
            .clone()
            .unwrap_or_else(|| default_pool_path(args.keep_pool));
        return Ok((
            VmConfig {
                kernel: payload.clone(),
                initrd: None,
                extra_cmdline: String::new(),
                mem_bytes: args.mem,
                vcpus: args.vcpus,
                pool,
                block_area: args.block_area,
                pool_node: args.pool_node,
            },
            temporary,
            temporary && !args.keep_pool,
        ));
    }
    let dir = config::default_image_dir(image_dir_env);
    let kernel_default = args.kernel.is_none();
    let kernel = args.kernel.clone().unwrap_or_else(|| dir.join("vmlinux"));
    let initrd_default = args.initrd.is_none();
    let initrd = args
        .initrd
        .clone()
        .unwrap_or_else(|| dir.join("initramfs.cpio"));
    config::check_image_file("kernel", &kernel, kernel_default)?;
    config::check_image_file("initrd", &initrd, initrd_default)?;
    let pool = args
        .pool
        .clone()
        .unwrap_or_else(|| default_pool_path(args.keep_pool));
    Ok((
        VmConfig {
            kernel,
            initrd: Some(initrd),
            extra_cmdline: args.cmdline.clone(),
            mem_bytes: args.mem,
            vcpus: args.vcpus,
            pool,
            block_area: args.block_area,
            pool_node: args.pool_node,
        },
        temporary,
        temporary && !args.keep_pool,
    ))
}

/// Run `pmsnap run`.
pub fn run(args: RunArgs) -> Result<i32> {
    if !args.no_seccomp {
        crate::seccomp::enable();
    }
    args.ids.arm()?;
    let env_dir = std::env::var("PMSNAP_IMAGE_DIR").ok();
    let (cfg, temporary, remove) = resolve(&args, env_dir.as_deref())?;
    // A socket a live process serves fails now, before any work; stale ones go.
    for sock in [&args.api_sock, &args.vsock_sock].into_iter().flatten() {
        crate::unix_socket::remove_stale(sock)?;
    }
    if args.keep_pool && !temporary {
        log::debug!("--keep-pool has no effect with --pool: a given pool is always kept");
    }
    if temporary {
        if let Some(dir) = cfg.pool.parent() {
            pool_dir::ensure_dir(dir)?;
        }
    }
    // Removal armed only for a pool we create; it must not exist before (fresh name).
    let _pool_guard = TempPool(remove.then(|| cfg.pool.clone()));
    // Instant start: a Linux guest of an image booted before starts from its template.
    let template = match (&args.payload, args.no_template) {
        (None, false) => {
            let dir = args
                .template_dir
                .clone()
                .unwrap_or_else(template::default_dir);
            match Template::for_run(&cfg, args.vsock_sock.is_some(), &dir) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("no ready template (cannot identify the image: {e}); booting");
                    None
                }
            }
        }
        _ => None,
    };
    if let Some(t) = &template {
        // --snapshot-at-ready needs the guest to say it is ready: it boots.
        let boot = args.cold || args.snapshot_at_ready.is_some();
        if !boot && !cfg.pool.exists() && t.exists() {
            log::info!(
                "starting from the ready template {:?} in {} instead of booting \
                 (--cold boots)",
                t.name,
                t.repo.display()
            );
            return super::restore::run(from_template(&args, &cfg, t));
        }
    }
    let started = std::time::Instant::now();

    let mut event_loop = EventLoop::new()?;
    event_loop.handle_termination_signals()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut builder = match &args.payload {
        None => VmBuilder::with_console(
            &cfg,
            event_loop.stop_notifier()?,
            Box::new(MarkerWatch::new(StdoutWriter, READY_MARKER, ready_tx)),
        )?,
        Some(path) => {
            let code = std::fs::read(path)
                .map_err(context(format!("cannot read payload {}", path.display())))?;
            let mut b = VmBuilder::with_payload(
                &cfg,
                event_loop.stop_notifier()?,
                Box::new(StdoutWriter),
                &code,
            )?;
            b.pio_bus_mut().insert(
                Arc::new(Mutex::new(PayloadProgress::default())),
                PROGRESS_PORT,
                4,
            )?;
            b
        }
    };
    if let Some(path) = &args.vsock_sock {
        builder.add_vsock(path, args.guest.limits())?;
    }
    let built = builder.build()?;
    if temporary && args.keep_pool {
        log::info!("pool: {}", cfg.pool.display());
    }
    // Restored on every path out of this function, including errors and panics.
    let _raw = RawModeGuard::new(0)?;
    log::debug!("starting {} vCPUs after {:?}", cfg.vcpus, started.elapsed());
    let mut running = built.start(&event_loop.stop_notifier()?)?;
    // What happens when the guest says it is ready (a Linux boot): the snapshot asked
    // for, and the template kept for the next run.
    let at_ready = (args.snapshot_at_ready.clone(), template);
    if args.payload.is_none() && (at_ready.0.is_some() || at_ready.1.is_some()) {
        let controller = running.controller().clone();
        let engine = running.engine().clone();
        let pages = cfg.mem_bytes / 4096;
        std::thread::Builder::new()
            .name("pmsnap-ready".into())
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Api);
                if ready_rx.recv().is_err() {
                    return; // the VM ended first
                }
                if let Some(name) = &at_ready.0 {
                    snapshot_at_ready(&engine, name, pages);
                }
                if let Some(t) = &at_ready.1 {
                    t.save(&controller);
                }
            })?;
    }
    super::serve_devices(&mut event_loop, &mut running)?;
    // Served once the vCPUs and state capture exist, so a client that sees the socket
    // can pause, resume or snapshot at once.
    let _api = super::serve_api(args.api_sock.as_deref(), running.controller())?;
    args.ids
        .give_sockets(&[args.api_sock.as_deref(), args.vsock_sock.as_deref()])?;
    super::serve_until_stopped(&mut event_loop, running, _raw, started)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(a: &[&str]) -> std::result::Result<RunArgs, clap::Error> {
        T::try_parse_from(std::iter::once("run").chain(a.iter().copied())).map(|t| t.run)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).expect("parse");
        assert_eq!(a.mem, 256 << 20);
        assert_eq!(a.vcpus, 2);
        assert!(a.pool.is_none() && !a.keep_pool && a.cmdline.is_empty());
    }

    #[test]
    fn sizes_and_bad_values() {
        assert_eq!(parse(&["--mem", "1G"]).expect("1G").mem, 1 << 30);
        assert_eq!(parse(&["--mem", "65536K"]).expect("K").mem, 64 << 20);
        let e = parse(&["--mem", "lots"]).expect_err("bad size");
        assert!(e.to_string().contains("invalid size"), "{e}");
        assert!(parse(&["--vcpus", "-1"]).is_err());
    }

    #[test]
    fn resolve_checks() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().to_str().expect("utf8");
        // Missing default image: the message says how to build it.
        let e = resolve(&parse(&[]).expect("parse"), Some(d)).expect_err("missing");
        let s = e.to_string();
        assert!(
            s.contains("vmlinux does not exist") && s.contains("images/build.sh"),
            "{s}"
        );
        std::fs::write(dir.path().join("vmlinux"), b"k").expect("write");
        std::fs::write(dir.path().join("initramfs.cpio"), b"i").expect("write");
        let (cfg, temporary, remove) = resolve(&parse(&[]).expect("parse"), Some(d)).expect("ok");
        assert!(temporary && remove);
        assert!(cfg.pool.starts_with(pool_dir::default_dir()));
        assert_eq!(cfg.kernel, dir.path().join("vmlinux"));
        let (cfg, _, remove) =
            resolve(&parse(&["--keep-pool"]).expect("parse"), Some(d)).expect("ok");
        assert!(!remove);
        assert!(
            cfg.pool.to_string_lossy().ends_with(".kept.pool"),
            "{cfg:?}"
        );
        let (cfg, temporary, remove) = resolve(
            &parse(&["--pool", "/dev/shm/x.pool"]).expect("parse"),
            Some(d),
        )
        .expect("ok");
        assert!(!temporary && !remove);
        assert_eq!(cfg.pool, PathBuf::from("/dev/shm/x.pool"));
        let e = resolve(&parse(&["--vcpus", "0"]).expect("parse"), Some(d)).expect_err("0");
        assert!(e.to_string().contains("at least 1"));
    }

    #[test]
    fn help_prints_the_default_cmdline_in_full() {
        use clap::CommandFactory;
        let help = T::command().render_long_help().to_string();
        // clap may wrap long words' line, so compare without whitespace.
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        assert!(
            squash(&help).contains(&squash(config::DEFAULT_CMDLINE)),
            "{help}"
        );
        assert!(!help.contains('…') && !help.contains(",..."), "{help}");
    }
}
