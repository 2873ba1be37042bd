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
