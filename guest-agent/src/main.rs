//! `pmsnap-agent`: the guest side of pmsnap. Saves and restores the memory of guest
//! processes through the VMM's snapshot service, and serves the VMM's
//! snapshot-process requests. See docs/agent.md.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use guest_agent::cli::{self as cli_lang, exit, format_time_ms, parse_range, NameArg};
use guest_agent::client::{call, ClientError, DryRun, Endpoint, SocketTransport, VsockListener};
use guest_agent::freeze::FreezeMethod;
use guest_agent::ops::{copy_out_process, restore_process, save_process, serve_connection, Phases};
use guest_agent::protocol::{
    validate_name, Reply, Request, SnapshotInfo, VirtRange, AGENT_PORT, PAGE_SIZE,
};

/// Help text on virtual ranges, the same in `pmsnap ctl`.
const RANGE_HELP: &str =
    "Numbers are decimal, or hex with 0x: 4096-8192 and 0x1000-0x2000 are the same range.";

/// How the agent freezes a process.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Freeze {
    /// cgroup v1 freezer, else cgroup v2, else SIGSTOP.
    Auto,
    /// cgroup v1 freezer only.
    CgroupV1,
    /// cgroup v2 only.
    CgroupV2,
    /// SIGSTOP/SIGCONT only.
    Sigstop,
}

impl From<Freeze> for FreezeMethod {
    fn from(f: Freeze) -> Self {
        match f {
            Freeze::Auto => FreezeMethod::Auto,
            Freeze::CgroupV1 => FreezeMethod::CgroupV1,
            Freeze::CgroupV2 => FreezeMethod::CgroupV2,
            Freeze::Sigstop => FreezeMethod::Signal,
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "pmsnap-agent",
    version,
    about = "pmsnap guest agent: save and restore process memory without copying it",
    after_help = exit::HELP
)]
struct Cli {
    /// Test only: talk to a fake snapshot service (`unix:PATH` or `vsock:CID:PORT`)
    /// instead of the VMM (default vsock CID 2, port 1024; env PMSNAP_TRANSPORT).
    #[arg(long, global = true, hide = true)]
    transport: Option<String>,
    /// Print JSON on stdout, errors included (times in unix milliseconds).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Save the memory of a process (frozen meanwhile) as snapshot NAME.
    #[command(after_help = RANGE_HELP)]
    Save {
        #[command(flatten)]
        name: NameArg,
        /// Process id.
        #[arg(long)]
        pid: u32,
        /// Virtual range START-END, page aligned (repeatable); default: all writable
        /// private mappings (heap, stack, anonymous mmaps, data).
        #[arg(long = "range", value_name = "START-END", value_parser = range_arg)]
        ranges: Vec<VirtRange>,
        /// How to freeze the process.
        #[arg(long, value_enum, default_value = "auto")]
        freeze: Freeze,
        /// Do everything but contact the VMM (freeze, read the page map, build and
        /// check the request, thaw) and report it: the agent's own share of the pause.
        #[arg(long)]
        dry_run: bool,
    },
    /// Copy snapshot NAME back into a process (frozen meanwhile).
    #[command(after_help = RANGE_HELP)]
    Restore {
        #[command(flatten)]
        name: NameArg,
        /// Process id.
        #[arg(long)]
        pid: u32,
        /// Target range START-END, page aligned (repeatable); the total size must equal
        /// the snapshot's. Default: all writable private mappings.
        #[arg(long = "range", value_name = "START-END", value_parser = range_arg)]
        ranges: Vec<VirtRange>,
        /// How to freeze the process.
        #[arg(long, value_enum, default_value = "auto")]
        freeze: Freeze,
        /// Do everything but contact the VMM (freeze, make the targets resident, read
        /// the page map, thaw); the targets' content does not change.
        #[arg(long)]
        dry_run: bool,
    },
    /// List the process snapshots.
    #[command(visible_alias = "ls")]
    List,
    /// Delete a snapshot.
    #[command(visible_alias = "delete")]
    Rm {
        #[command(flatten)]
        name: NameArg,
    },
    /// Baseline for benchmarks: freeze a process and copy its pages into a file
    /// (what a copying snapshot would pay), printing the pause.
    #[command(after_help = RANGE_HELP)]
    CopyOut {
        /// Process id.
        #[arg(long)]
        pid: u32,
        /// Virtual range START-END, page aligned (repeatable); default as for save.
        #[arg(long = "range", value_name = "START-END", value_parser = range_arg)]
        ranges: Vec<VirtRange>,
        /// Output file (put it on tmpfs).
        #[arg(long)]
        out: PathBuf,
        /// How to freeze the process.
        #[arg(long, value_enum, default_value = "auto")]
        freeze: Freeze,
    },
    /// Serve the VMM's snapshot-process requests on a vsock port (runs until killed).
    Serve {
        /// Vsock port to listen on.
        #[arg(long, default_value_t = AGENT_PORT)]
        port: u32,
        /// Test only: listen on a Unix socket path instead of vsock.
        #[arg(long, hide = true)]
        listen_unix: Option<PathBuf>,
        /// Log file (errors also go to stderr).
        #[arg(long, default_value = "/tmp/pmsnap-agent.log")]
        log: PathBuf,
        /// How to freeze processes.
        #[arg(long, value_enum, default_value = "auto")]
        freeze: Freeze,
    },
}

/// `--range` values: the parser shared with `pmsnap ctl`.
fn range_arg(s: &str) -> Result<VirtRange, String> {
    parse_range(s).map_err(|e| e.to_string())
}

/// Minimal logger: one line per record to a file, errors also to stderr, so the
/// daemon stays quiet on the serial console (every byte there is a slow VM exit).
struct FileLogger {
    file: Option<Mutex<std::fs::File>>,
    level: log::LevelFilter,
}

impl log::Log for FileLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = format!("{} {} {}\n", format_time_ms(ms), r.level(), r.args());
        if let Some(f) = &self.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        if r.level() <= log::Level::Error || self.file.is_none() {
            eprint!("pmsnap-agent: {line}");
        }
    }

    fn flush(&self) {}
}

fn init_log(file: Option<&std::path::Path>) {
    let level = match std::env::var("PMSNAP_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        _ if file.is_some() => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let file = file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
            .map(Mutex::new)
    });
    let logger = Box::leak(Box::new(FileLogger { file, level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn transport(cli_transport: Option<&str>) -> Result<SocketTransport, ClientError> {
    match cli_transport {
        Some(s) => Ok(SocketTransport::new(s.parse()?)),
        None => SocketTransport::from_env(),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), String> {
    let s = serde_json::to_string(v).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

fn pages_mib(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / (1 << 20) as f64
}

fn run(cli: Cli) -> Result<(), String> {
    let t = cli.transport.as_deref();
    let json = cli.json;
    match cli.command {
        Command::Save {
            pid,
            ranges,
            name,
            freeze,
            dry_run,
        } => {
            let name = name.get();
            let o = if dry_run {
                save_process(&mut DryRun, pid, &ranges, name, freeze.into())
            } else {
                let mut tr = transport(t).map_err(|e| e.to_string())?;
                save_process(&mut tr, pid, &ranges, name, freeze.into())
            }
            .map_err(|e| e.to_string())?;
            if json {
                return print_json(&o);
            }
            let verb = if dry_run {
                "dry run: would save"
            } else {
                "saved"
            };
            println!(
                "{verb} {} from pid {} ({}): {} pages ({:.1} MiB, {} present) in {} runs, \
                 pause {:.3} ms ({}: {}); vmm: {} pages, {} present",
                o.name,
                o.pid,
                o.comm,
                o.pages,
                pages_mib(o.pages),
                o.present_pages,
                o.runs,
                o.pause_us as f64 / 1000.0,
                o.freeze,
                phases(&o.phases),
                o.vmm_pages,
                o.vmm_present_pages
            );
        }
        Command::Restore {
            name,
            pid,
            ranges,
            freeze,
            dry_run,
        } => {
            let name = name.get();
            let o = if dry_run {
                restore_process(&mut DryRun, pid, &ranges, name, freeze.into())
            } else {
                let mut tr = transport(t).map_err(|e| e.to_string())?;
                restore_process(&mut tr, pid, &ranges, name, freeze.into())
            }
            .map_err(|e| e.to_string())?;
            if json {
                return print_json(&o);
            }
            let verb = if dry_run {
                "dry run: would restore"
            } else {
                "restored"
            };
            println!(
                "{verb} {} into pid {}: {} pages ({:.1} MiB, {} touched) in {} runs, \
                 pause {:.3} ms ({}: {}); vmm: {} pages",
                o.name,
                o.pid,
                o.pages,
                pages_mib(o.pages),
                o.touched_pages,
                o.runs,
                o.pause_us as f64 / 1000.0,
                o.freeze,
                phases(&o.phases),
                o.vmm_pages
            );
        }
        Command::List => {
            let mut tr = transport(t).map_err(|e| e.to_string())?;
            let list = match call(&mut tr, &Request::List).map_err(|e| e.to_string())? {
                Reply::List(l) => l,
                other => return Err(format!("unexpected reply {other:?}")),
            };
            if json {
                return print_json(&list.iter().map(info_json).collect::<Vec<_>>());
            }
            print!("{}", render_list(&list));
        }
        Command::Rm { name } => {
            let name = name.get().to_string();
            validate_name(&name).map_err(|e| e.to_string())?;
            let mut tr = transport(t).map_err(|e| e.to_string())?;
            match call(&mut tr, &Request::Delete { name }).map_err(|e| e.to_string())? {
                Reply::Deleted { name } if json => {
                    print_json(&serde_json::json!({ "deleted": name }))?
                }
                Reply::Deleted { name } => println!("deleted {name}"),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Command::CopyOut {
            pid,
            ranges,
            out,
            freeze,
        } => {
            let o =
                copy_out_process(pid, &ranges, &out, freeze.into()).map_err(|e| e.to_string())?;
            if json {
                return print_json(&o);
            }
            println!(
                "copied {} bytes ({:.1} MiB) of pid {} to {}, pause {:.3} ms",
                o.bytes,
                o.bytes as f64 / (1 << 20) as f64,
                pid,
                out.display(),
                o.pause_us as f64 / 1000.0
            );
        }
        Command::Serve {
            port,
            listen_unix,
            log,
            freeze,
        } => return serve(t, port, listen_unix, &log, freeze.into()),
    }
    Ok(())
}

fn phases(p: &Phases) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut s = format!("freeze {:.3}", ms(p.freeze_us));
    if p.touch_us > 0 {
        s += &format!(" touch {:.3}", ms(p.touch_us));
    }
    s + &format!(
        " map {:.3} vmm {:.3} thaw {:.3} ms",
        ms(p.map_us),
        ms(p.vmm_us),
        ms(p.thaw_us)
    )
}

/// The list as a table; times in RFC 3339.
fn render_list(list: &[SnapshotInfo]) -> String {
    let mut out = format!(
        "{:<24} {:>7} {:<16} {:>9} {:>9} {:>7}  CREATED\n",
        "NAME", "PID", "COMM", "PAGES", "PRESENT", "RUNS"
    );
    for s in list {
        out += &format!(
            "{:<24} {:>7} {:<16} {:>9} {:>9} {:>7}  {}\n",
            s.name,
            s.pid,
            s.comm,
            s.pages,
            s.present_pages,
            s.runs,
            format_time_ms(s.created_unix.saturating_mul(1000))
        );
    }
    out
}

/// One snapshot in `list --json`: the creation time in unix milliseconds
/// (`created_unix_ms`), like the VMM's API; `created_unix` (seconds) stays for older
/// readers.
fn info_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "name": s.name, "pid": s.pid, "comm": s.comm, "pages": s.pages,
        "present_pages": s.present_pages, "runs": s.runs,
        "created_unix_ms": s.created_unix.saturating_mul(1000),
        "created_unix": s.created_unix,
    })
}

/// Accept connections one at a time (a save freezes a process; one at a time keeps
/// pauses short and the guest kernel's work bounded) and answer each.
fn serve(
    t: Option<&str>,
    port: u32,
    listen_unix: Option<PathBuf>,
    log_path: &std::path::Path,
    freeze: FreezeMethod,
) -> Result<(), String> {
    init_log(Some(log_path));
    let mut tr = transport(t).map_err(|e| e.to_string())?;
    // A peer that connects and sends nothing must not block the daemon for long.
    let idle = Duration::from_secs(10);
    if let Some(path) = listen_unix {
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        log::info!("serving on unix socket {}", path.display());
        for conn in l.incoming() {
            match conn {
                Ok(mut c) => {
                    let _ = c.set_read_timeout(Some(idle));
                    if let Err(e) = serve_connection(&mut c, &mut tr, freeze) {
                        log::warn!("connection: {e}");
                    }
                }
                Err(e) => log::warn!("accept: {e}"),
            }
        }
        return Ok(());
    }
    let l = VsockListener::bind(port)
        .map_err(|e| format!("vsock not available: cannot listen on vsock port {port}: {e}"))?;
    log::info!(
        "serving on vsock port {port}, snapshot service {}",
        Endpoint::snapshot_service()
    );
    loop {
        match l.accept() {
            Ok(mut c) => {
                let _ = c.set_read_timeout(idle);
                if let Err(e) = serve_connection(&mut c, &mut tr, freeze) {
                    log::warn!("connection: {e}");
                }
            }
            Err(e) => {
                log::error!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = cli_lang::report_clap_error(&e, cli_lang::wants_json(std::env::args_os()));
            return ExitCode::from(code as u8);
        }
    };
    if !matches!(cli.command, Command::Serve { .. }) {
        init_log(None);
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pmsnap-agent: error: {e}");
            if json {
                println!(
                    "{}",
                    cli_lang::json_error(&e, exit::ERROR, Default::default())
                );
            }
            ExitCode::from(exit::ERROR as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("pmsnap-agent").chain(args.iter().copied()))
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = parse(&[
            "save",
            "--pid",
            "5",
            "x",
            "--range",
            "4096-8192",
            "--range",
            "0x4000-0x6000",
            "--json",
        ])
        .expect("parse");
        assert!(c.json);
        match c.command {
            Command::Save {
                pid, ranges, name, ..
            } => {
                assert_eq!(pid, 5);
                assert_eq!(name.get(), "x");
                assert_eq!(
                    ranges,
                    vec![
                        VirtRange {
                            start: 0x1000,
                            end: 0x2000
                        },
                        VirtRange {
                            start: 0x4000,
                            end: 0x6000
                        }
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn old_spellings_and_aliases() {
        match parse(&["restore", "--name", "old", "--pid", "7"])
            .expect("--name")
            .command
        {
            Command::Restore { name, pid, .. } => assert_eq!((name.get(), pid), ("old", 7)),
            other => panic!("{other:?}"),
        }
        for verb in ["list", "ls"] {
            assert!(matches!(parse(&[verb]).expect(verb).command, Command::List));
        }
        for verb in ["rm", "delete"] {
            match parse(&[verb, "s1"]).expect(verb).command {
                Command::Rm { name } => assert_eq!(name.get(), "s1"),
                other => panic!("{other:?}"),
            }
        }
        match parse(&["rm", "--name", "s2"]).expect("rm --name").command {
            Command::Rm { name } => assert_eq!(name.get(), "s2"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_ranges_are_usage_errors() {
        // Hex without 0x was the agent's old rule; now it is refused, not misread.
        let e = parse(&["save", "x", "--pid", "1", "--range", "7f00000-7f01000"])
            .expect_err("bare hex");
        assert_eq!(e.exit_code(), exit::USAGE);
        assert!(e.to_string().contains("hex with 0x"), "{e}");
        let e = parse(&[
            "copy-out",
            "--pid",
            "1",
            "--out",
            "/f",
            "--range",
            "1000-2000",
        ])
        .expect_err("unaligned");
        assert!(e.to_string().contains("page aligned"), "{e}");
    }

    #[test]
    fn list_times_are_rfc3339_in_text_and_ms_in_json() {
        let s = SnapshotInfo {
            name: "a".into(),
            pid: 3,
            comm: "sh".into(),
            pages: 10,
            present_pages: 4,
            runs: 2,
            created_unix: 1_700_000_000,
        };
        let text = render_list(std::slice::from_ref(&s));
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.contains("2023-11-14T22:13:20Z"), "{text}");
        let v = info_json(&s);
        assert_eq!(v["created_unix_ms"], 1_700_000_000_000u64);
        assert_eq!(v["created_unix"], 1_700_000_000u64);
    }

    #[test]
    fn help_lists_exit_codes_and_aliases() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains(exit::HELP), "{help}");
        assert!(
            help.contains("[alias: ls]") && help.contains("[alias: delete]"),
            "{help}"
        );
    }
}
