//! `pmsnap`: command-line entry point. Parses arguments, sets up logging, runs the
//! subcommand and prints an error with its cause chain once (and, when the command line
//! has `--json`, also as JSON on stdout).

use clap::Parser;
use guest_agent::cli::{exit, json_error, report_clap_error, wants_json};
use vmm::cli::{self, Cli};

fn main() {
    let json = wants_json(std::env::args_os());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(report_clap_error(&e, json)),
    };
    let filter = cli
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format_timestamp_millis()
        .init();
    tune_allocator();
    match cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("pmsnap: error: {msg}");
            if json {
                println!("{}", json_error(&msg, exit::ERROR, Default::default()));
            }
            std::process::exit(exit::ERROR);
        }
    }
}

/// Keep glibc's allocator from changing the process's mappings on its own while a VM
/// runs. Growing or trimming a heap (`mprotect`, `brk`, `mmap`/`munmap` of a new
/// thread's arena) takes the mm's lock for writing, and a writer waits for every reader:
/// the write-protect walks and the pool's pre-fault thread hold it for reading for
/// milliseconds. Inside a snapshot's pause that added 5-30 ms at 4 GiB (a `perf`
/// trace of the API thread showed it waiting in `mprotect` from the allocator,
/// docs/perf-vm.md). One arena for all threads, grown 8 MiB at a time and trimmed only
/// past 16 MiB free, makes such changes rare; the VMM allocates little, so one arena
/// costs no measurable contention. Allocations up to 32 MiB come from the heap too:
/// setting the pad and the trim threshold turns off glibc's moving mmap threshold, which
/// left every allocation of 128 KiB or more (a dirty bitmap of a 4 GiB guest, allocated
/// at each harvest by vm-memory's `get_and_reset`) a fresh `mmap` to fault in and a
/// `munmap` to free, inside the pause (`perf record` of a 4 GiB `snapshot-vm`).
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TOP_PAD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}
