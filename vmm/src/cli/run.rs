//! `pmsnap run`: boot a guest with its console on this terminal.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;

use super::anyhow_like::Result;
use crate::builder::VmBuilder;
use crate::config::{self, VmConfig};
use crate::device_manager;
use crate::devices::legacy::serial::StdoutWriter;
use crate::devices::legacy::watch::MarkerWatch;
use crate::devices::legacy::{terminal, RawModeGuard, StdinInput};
use crate::event_loop::EventLoop;
use crate::payload::{PayloadProgress, PROGRESS_PORT};
use crate::vstate::vcpu::VmStop;

/// Arguments of `pmsnap run`.
#[derive(Debug, Args)]
#[command(after_help = concat!(
    "The guest console is this terminal (raw mode; Ctrl-A x quits). Stdin may also be a pipe: \
commands written to it are typed on the console, and its end does not stop the guest.\n\n\
The VM ends with exit status 0 when the guest reboots or powers off (poweroff -f, reboot, \
triple fault), and 1 on a VMM error.\n\nDefault kernel command line:\n  ",
    "console=ttyS0 reboot=k panic=1 noxsave clearcpuid=popcnt,smap,cx16,erms,fsrm \
clocksource=kvm-clock quiet noreplace-smp rodata=off percpu_alloc=page norandmaps GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,..."
))]
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
    /// [default: a new file in /dev/shm, removed at exit unless --keep-pool]
    #[arg(long, value_name = "PATH")]
    pub pool: Option<PathBuf>,
    /// Keep the default pool file at exit (its path is logged).
    #[arg(long)]
    pub keep_pool: bool,
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket, e.g. for
    /// `pmsnap ctl --api-sock PATH status` or `curl --unix-socket PATH http://localhost/v1/status`.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Give the guest a virtio-vsock device whose host side is this Unix socket
    /// (Firecracker style: connect and send `CONNECT <port>\n` to reach a guest
    /// listener). The guest agent reaches the VMM's snapshot service through it.
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
}

/// The line the default image's init prints when the guest is up.
const READY_MARKER: &[u8] = b"pmsnap-guest: ready";

fn snapshot_when_ready(
    ready: &std::sync::mpsc::Receiver<()>,
    engine: &crate::snapshot::engine::Engine,
    name: &str,
    pages: u64,
) {
    if ready.recv().is_err() {
        return; // the VM ended first
    }
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
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove pool {}: {e}", p.display());
                }
            }
        }
    }
}

fn default_pool_path() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    PathBuf::from(format!(
        "/dev/shm/pmsnap-{}-{nanos:08x}.pool",
        std::process::id()
    ))
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
        let pool = args.pool.clone().unwrap_or_else(default_pool_path);
        return Ok((
            VmConfig {
                kernel: payload.clone(),
                initrd: None,
                extra_cmdline: String::new(),
                mem_bytes: args.mem,
                vcpus: args.vcpus,
                pool,
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
    let pool = args.pool.clone().unwrap_or_else(default_pool_path);
    Ok((
        VmConfig {
            kernel,
            initrd: Some(initrd),
            extra_cmdline: args.cmdline.clone(),
            mem_bytes: args.mem,
            vcpus: args.vcpus,
            pool,
        },
        temporary,
        temporary && !args.keep_pool,
    ))
}

/// Run `pmsnap run`.
pub fn run(args: RunArgs) -> Result<i32> {
    let env_dir = std::env::var("PMSNAP_IMAGE_DIR").ok();
    let (cfg, temporary, remove) = resolve(&args, env_dir.as_deref())?;
    if args.keep_pool && !temporary {
        log::debug!("--keep-pool has no effect with --pool: a given pool is always kept");
    }
    // Removal armed only for a pool we create; it must not exist before (fresh name).
    let _pool_guard = TempPool(remove.then(|| cfg.pool.clone()));
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
                .map_err(|e| format!("cannot read payload {}: {e}", path.display()))?;
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
    let serial = builder.serial();
    let serial_for_state = serial.clone();
    let mut virtio = Vec::new();
    let engine = builder.engine().clone();
    if let Some(path) = &args.vsock_sock {
        let (vsock, slot) = device_manager::attach_vsock_with_state(
            &mut builder,
            path,
            engine.clone(),
            cfg.mem_bytes,
        )?;
        virtio.push(slot);
        event_loop.add_subscriber(vsock);
    }
    if let Some(name) = args.snapshot_at_ready.clone() {
        let engine = engine.clone();
        let pages = cfg.mem_bytes / 4096;
        std::thread::Builder::new()
            .name("pmsnap-ready".into())
            .spawn(move || snapshot_when_ready(&ready_rx, &engine, &name, pages))?;
    }
    let built = builder.build()?;
    if temporary && args.keep_pool {
        log::info!("pool: {}", cfg.pool.display());
    }

    let interactive = terminal::is_terminal(0);
    event_loop.add_subscriber(Arc::new(Mutex::new(StdinInput::new(
        serial,
        0,
        interactive,
        event_loop.stop_notifier()?,
    ))));
    // Restored on every path out of this function, including errors and panics.
    let _raw = RawModeGuard::new(0)?;
    log::debug!("starting {} vCPUs after {:?}", cfg.vcpus, started.elapsed());
    let mut running = built.start(&event_loop.stop_notifier()?)?;
    crate::persist::live::attach(&running, serial_for_state, cfg.mem_bytes, virtio);
    // Served once the vCPUs and state capture exist, so a client that sees the socket
    // can pause, resume or snapshot at once.
    let _api = super::serve_api(args.api_sock.as_deref(), &engine)?;
    let why = event_loop.run_until_stopped()?;
    running.stop();
    drop(running);
    drop(_raw);
    log::debug!("VM stopped after {:?}: {why:?}", started.elapsed());
    match &why {
        VmStop::Reset => log::info!("guest reset (reboot or poweroff): VM stopped"),
        VmStop::Shutdown => log::info!("guest shut down: VM stopped"),
        VmStop::Terminated(_) | VmStop::Error(_) => {}
    }
    match why {
        VmStop::Reset | VmStop::Shutdown => Ok(0),
        VmStop::Terminated(sig) => Ok(128 + sig),
        VmStop::Error(msg) => Err(msg.into()),
    }
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
        assert!(cfg.pool.starts_with("/dev/shm"));
        assert_eq!(cfg.kernel, dir.path().join("vmlinux"));
        let (_, _, remove) =
            resolve(&parse(&["--keep-pool"]).expect("parse"), Some(d)).expect("ok");
        assert!(!remove);
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
}
