//! The `pmsnap` command line. Each subcommand lives in its own file.

use clap::{Parser, Subcommand};

pub mod ctl;
pub mod repo;
pub mod restore;
pub mod run;
pub mod store;
pub mod template;

/// The text after the commands in `pmsnap --help`.
const AFTER_HELP: &str = "Environment: PMSNAP_API_SOCK sets --api-sock (run, restore, ctl); \
PMSNAP_IMAGE_DIR the default image directory (run); PMSNAP_POOL_DIR the default pool \
directory (run, store prune); RUST_LOG the log filter.\n\n\
Exit codes: 0 success; 1 error; 2 usage error (bad command, option or value); 3 `store \
verify` found damage. run and restore: 0 when the guest powers off or reboots, 128+N when \
killed by signal N.";

/// pmsnap: a KVM VMM whose guest RAM lives in a pmem pool file, with a persistent
/// copy-on-write snapshot store in the same pool.
#[derive(Debug, Parser)]
#[command(name = "pmsnap", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or an env_logger filter such as
    /// `vmm=debug`). Overrides RUST_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of `pmsnap`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Look after a pool's snapshot store offline (the pool must not be in use).
    Store(store::StoreArgs),
    /// Talk to a running VMM through its control API socket.
    Ctl(ctl::CtlArgs),
    /// Boot a guest with its console on this terminal.
    Run(run::RunArgs),
    /// Resume a guest from a VM snapshot in its pool, in this new VMM process.
    Restore(restore::RestoreArgs),
    /// Copy a snapshot of a pool (offline) into a repository (a directory or an S3 bucket), deduplicated.
    Export(repo::ExportArgs),
    /// Create a new pool holding a snapshot from a repository.
    Import(repo::ImportArgs),
    /// Look after a repository: list, verify, remove, collect garbage.
    Repo(repo::RepoArgs),
}

/// Run the parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow_like::Result<i32> {
    match cli.command {
        Command::Store(args) => store::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::Run(args) => run::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Export(args) => repo::export(args),
        Command::Import(args) => repo::import(args),
        Command::Repo(args) => repo::repo(args),
    }
}

/// Serve the control API on `path` (when given) for `engine`, until the returned handle
/// drops. `run` and `restore` call it once the vCPUs and state capture exist, so a client
/// that sees the socket can pause, resume or snapshot at once.
fn serve_api(
    path: Option<&std::path::Path>,
    controller: &std::sync::Arc<crate::controller::Controller>,
) -> anyhow_like::Result<Option<crate::api::ApiServerHandle>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let server = crate::api::ApiServer::start(path, controller.clone())?;
    log::info!("control API on {}", path.display());
    Ok(Some(server))
}

/// Serve the running VM's devices (vsock) and the console input (stdin, typed on the
/// serial port) from the event loop; the same for `run` and `restore`.
fn serve_devices(
    event_loop: &mut crate::event_loop::EventLoop,
    running: &mut crate::builder::RunningVm,
) -> anyhow_like::Result<()> {
    for s in running.take_subscribers() {
        event_loop.add_subscriber(s);
    }
    let interactive = crate::devices::legacy::terminal::is_terminal(0);
    event_loop.add_subscriber(std::sync::Arc::new(std::sync::Mutex::new(
        crate::devices::legacy::StdinInput::new(
            running.serial(),
            0,
            interactive,
            event_loop.stop_notifier()?,
        ),
    )));
    Ok(())
}

/// `--guest-quota` of `run` and `restore`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct GuestArgs {
    /// Bytes of the store that guest-owned snapshots (made by guest users through the
    /// agent) may claim together, with K, M or G suffix; a save beyond it is refused
    /// (NoSpace). Default: a quarter of the block area. Host snapshots are not counted.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = |s: &str| crate::config::parse_size(s).map_err(|e| e.to_string()),
        env = "PMSNAP_GUEST_QUOTA"
    )]
    pub guest_quota: Option<u64>,
}

impl GuestArgs {
    /// The limits of guest-owned snapshots these arguments ask for.
    pub fn limits(self) -> crate::controller::process::GuestLimits {
        crate::controller::process::GuestLimits {
            quota_bytes: self.guest_quota,
            ..Default::default()
        }
    }
}

/// `--uid/--gid` of `run` and `restore`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct IdArgs {
    /// Run the VMM's threads as this user id once /dev/kvm, the pool, the userfaultfd
    /// and the sockets are open (needs root, and --gid and --pool; the socket files are
    /// given to this user). See docs/security.md.
    #[arg(long, value_name = "UID", requires_all = ["gid", "pool"])]
    pub uid: Option<u32>,
    /// Group id to run as, with --uid (supplementary groups are dropped).
    #[arg(long, value_name = "GID", requires = "uid")]
    pub gid: Option<u32>,
}

impl IdArgs {
    /// Check the request and arm the drop (each VMM thread drops as it starts): call
    /// before any thread starts.
    fn arm(self) -> anyhow_like::Result<()> {
        let (Some(uid), Some(gid)) = (self.uid, self.gid) else {
            return Ok(());
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("--uid/--gid need root (a VMM not run as root keeps its own ids)".into());
        }
        crate::seccomp::drop_privileges_to(uid, gid);
        log::info!("VMM threads run as uid {uid} gid {gid} once set up");
        Ok(())
    }

    /// Give the socket files to the target user (before the main thread drops).
    fn give_sockets(self, socks: &[Option<&std::path::Path>]) -> anyhow_like::Result<()> {
        let (Some(uid), Some(gid)) = (self.uid, self.gid) else {
            return Ok(());
        };
        for p in socks.iter().flatten() {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(anyhow_like::context(
                format!("cannot give {} to uid {uid}", p.display()),
            ))?;
        }
        Ok(())
    }
}

/// The end of `run` and `restore`: confine the event loop thread (seccomp), serve until
/// the VM stops, stop the vCPUs and drop the VM before the terminal's raw mode, and turn
/// why it stopped into the exit status: 0 for a guest reset or shutdown, 128+N for
/// signal N, an error (status 1) for a VMM error.
fn serve_until_stopped(
    event_loop: &mut crate::event_loop::EventLoop,
    mut running: crate::builder::RunningVm,
    raw: Option<crate::devices::legacy::RawModeGuard>,
    started: std::time::Instant,
) -> anyhow_like::Result<i32> {
    use crate::stop::VmStop;
    crate::seccomp::apply(crate::seccomp::ThreadKind::EventLoop)?;
    let why = event_loop.run_until_stopped()?;
    running.stop();
    drop(running);
    drop(raw);
    log::debug!("VM stopped after {:?}: {why:?}", started.elapsed());
    match why {
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

/// A minimal boxed-error result used at the top of the binary, where the cause chain is
/// printed once.
pub mod anyhow_like {
    /// Boxed error with its `source()` chain.
    pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
    /// Result with a boxed error.
    pub type Result<T> = std::result::Result<T, Error>;

    /// An error with what was being done, keeping the cause as its `source()` so the
    /// whole chain is printed once at the top.
    #[derive(Debug, thiserror::Error)]
    #[error("{what}")]
    pub struct Context {
        what: String,
        #[source]
        source: Error,
    }

    /// For `map_err`: wrap an error in a [`Context`] saying `what` was being done.
    pub fn context<E: Into<Error>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
        let what = what.into();
        move |e| {
            Box::new(Context {
                what,
                source: e.into(),
            })
        }
    }
}
