//! Boot-time measurement: time from starting `pmsnap run` to the guest's
//! `pmsnap-guest: ready` line, median of N runs per vCPU count.
//!
//! ```text
//! cargo run -p pmsnap-tests --bin boot-time -- [--runs 3] [--vcpus 1,2] [--mem 256M]
//!     [--cmdline "extra words"]
//! ```
//!
//! Also prints the CPU time (user + system, all threads) the VMM process had used at
//! the ready line: on a busy machine wall time grows with contention, CPU time much less.
//!
//! Uses the default image (`$PMSNAP_IMAGE_DIR` or `images/cache/default`). Each VM is
//! stopped with SIGTERM right after the ready line (clean exit, pool removed).

use std::time::Duration;

use pmsnap_tests::{image, kvm_unavailable, Guest, READY_TIMEOUT};

fn main() {
    let mut runs = 3usize;
    let mut vcpus = vec![1u32, 2];
    let mut mem = "256M".to_string();
    let mut cmdline = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--runs" => runs = val().parse().unwrap_or_else(|_| usage("--runs N")),
            "--vcpus" => {
                vcpus = val()
                    .split(',')
                    .map(|v| v.parse().unwrap_or_else(|_| usage("--vcpus 1,2")))
                    .collect()
            }
            "--mem" => mem = val(),
            "--cmdline" => cmdline = val(),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if let Some(why) = kvm_unavailable() {
        eprintln!("boot-time: cannot measure: {why}");
        std::process::exit(1);
    }
    let (kernel, initrd) = image();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("kernel {} initrd {}", kernel.display(), initrd.display());
    println!("load average at start: {}", load.trim());
    for n in vcpus {
        let mut times = Vec::with_capacity(runs);
        let mut cpus: Vec<f64> = Vec::with_capacity(runs);
        for i in 0..runs {
            let n_s = n.to_string();
            let args = [
                "run",
                "--vcpus",
                &n_s,
                "--mem",
                &mem,
                "--cmdline",
                &cmdline,
                "--kernel",
                kernel.to_str().expect("utf-8 path"),
                "--initrd",
                initrd.to_str().expect("utf-8 path"),
            ];
            let g = Guest::spawn(&args, &[]);
            if g.wait_for(0, "pmsnap-guest: ready", READY_TIMEOUT)
                .is_none()
            {
                eprintln!(
                    "run {i}: no ready line; console:\n{}\n{}",
                    g.output(),
                    g.stderr()
                );
                std::process::exit(1);
            }
            let t = g.started.elapsed();
            let cpu = cpu_seconds(g.pid());
            println!(
                "vcpus={n} run={i} ready_after={:.2}s cpu={cpu:.2}s",
                t.as_secs_f64()
            );
            times.push(t);
            cpus.push(cpu);
            drop(g);
            std::thread::sleep(Duration::from_millis(500));
        }
        times.sort();
        cpus.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "vcpus={n} mem={mem} runs={runs} median={:.2}s min={:.2}s max={:.2}s median_cpu={:.2}s",
            median.as_secs_f64(),
            times[0].as_secs_f64(),
            times[times.len() - 1].as_secs_f64(),
            cpus[cpus.len() / 2]
        );
    }
}

/// User + system CPU seconds of process `pid` (all threads), from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn usage(msg: &str) -> ! {
    eprintln!("boot-time: {msg}\nusage: boot-time [--runs N] [--vcpus 1,2] [--mem SIZE] [--cmdline WORDS]");
    std::process::exit(2);
}
