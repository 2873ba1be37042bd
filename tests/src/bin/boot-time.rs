//! Boot-time measurement: time from starting `pmsnap run` to the guest's
//! `pmsnap-guest: ready` line, median of N runs per vCPU count and image.
//!
//! ```text
//! cargo run -p pmsnap-tests --bin boot-time -- [--runs 3] [--vcpus 1,2] [--mem 256M]
//!     [--cmdline "extra words"] [--image DIR]...
//! ```
//!
//! With several `--image DIR` (each holding `vmlinux` and `initramfs.cpio`, such as
//! `images/cache/image-<key>`), the runs alternate between the images (round 1: A, B;
//! round 2: A, B; ...), so that before/after images see the same machine load. Without
//! `--image` it measures the default image (`$PMSNAP_IMAGE_DIR` or
//! `images/cache/default`), the one `pmsnap run` boots.
//!
//! Also prints the CPU time (user + system, all threads) the VMM process had used at
//! the ready line: on a busy machine wall time grows with contention, CPU time much
//! less; and the 1-minute load average before each run. Each VM is stopped with SIGTERM
//! right after the ready line (clean exit, pool removed).

use std::path::PathBuf;
use std::time::Duration;

use pmsnap_tests::{default_image_dir, kvm_unavailable, Guest, READY_TIMEOUT};

/// One image under measurement and its results.
struct Measured {
    label: String,
    kernel: PathBuf,
    initrd: PathBuf,
    times: Vec<f64>,
    cpus: Vec<f64>,
}

fn main() {
    let mut runs = 3usize;
    let mut vcpus = vec![1u32, 2];
    let mut mem = "256M".to_string();
    let mut cmdline = String::new();
    let mut images: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--runs" => match val().parse() {
                Ok(n) if n > 0 => runs = n,
                _ => usage("--runs N (N >= 1)"),
            },
            "--vcpus" => {
                vcpus = val()
                    .split(',')
                    .map(|v| v.parse().unwrap_or_else(|_| usage("--vcpus 1,2")))
                    .collect()
            }
            "--mem" => mem = val(),
            "--cmdline" => cmdline = val(),
            "--image" => images.push(PathBuf::from(val())),
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if let Some(why) = kvm_unavailable() {
        eprintln!("boot-time: cannot measure: {why}");
        std::process::exit(1);
    }
    if images.is_empty() {
        images.push(default_image_dir());
    }
    let images: Vec<(PathBuf, PathBuf)> = images
        .iter()
        .map(|d| {
            let (k, i) = (d.join("vmlinux"), d.join("initramfs.cpio"));
            if !(k.is_file() && i.is_file()) {
                eprintln!("boot-time: {} lacks vmlinux or initramfs.cpio", d.display());
                std::process::exit(1);
            }
            (k, i)
        })
        .collect();
    println!("load average at start: {}", loadavg());
    for (n, (k, i)) in images.iter().enumerate() {
        let initrd = std::fs::canonicalize(i).unwrap_or_else(|_| i.clone());
        let size = std::fs::metadata(&initrd).map_or(0, |m| m.len());
        println!(
            "image {}: kernel {} initrd {} ({size} bytes)",
            label(n),
            k.display(),
            initrd.display()
        );
    }
    for n in vcpus {
        let mut measured: Vec<Measured> = images
            .iter()
            .enumerate()
            .map(|(idx, (k, i))| Measured {
                label: label(idx),
                kernel: k.clone(),
                initrd: i.clone(),
                times: Vec::with_capacity(runs),
                cpus: Vec::with_capacity(runs),
            })
            .collect();
        for round in 0..runs {
            for m in &mut measured {
                let load = loadavg();
                let (t, cpu) = boot_once(n, &mem, &cmdline, m);
                println!(
                    "vcpus={n} image={} run={round} ready_after={t:.2}s cpu={cpu:.2}s load_before={}",
                    m.label,
                    load.split_whitespace().next().unwrap_or("?")
                );
                m.times.push(t);
                m.cpus.push(cpu);
            }
        }
        for m in &mut measured {
            m.times.sort_by(f64::total_cmp);
            m.cpus.sort_by(f64::total_cmp);
            println!(
                "vcpus={n} image={} mem={mem} runs={runs} median={:.2}s min={:.2}s max={:.2}s median_cpu={:.2}s",
                m.label,
                m.times[m.times.len() / 2],
                m.times[0],
                m.times[m.times.len() - 1],
                m.cpus[m.cpus.len() / 2]
            );
        }
    }
    println!("load average at end: {}", loadavg());
}

/// A, B, C, ... for the images in the order given.
fn label(idx: usize) -> String {
    u8::try_from(idx)
        .ok()
        .filter(|i| *i < 26)
        .map_or_else(|| format!("#{idx}"), |i| char::from(b'A' + i).to_string())
}

/// Boot `m` once with `n` vCPUs; wall seconds to the ready line and the VMM's CPU
/// seconds by then. Exits the program when no ready line comes.
fn boot_once(n: u32, mem: &str, cmdline: &str, m: &Measured) -> (f64, f64) {
    let n_s = n.to_string();
    let args = [
        "run",
        "--vcpus",
        &n_s,
        "--mem",
        mem,
        "--cmdline",
        cmdline,
        "--kernel",
        m.kernel.to_str().expect("utf-8 path"),
        "--initrd",
        m.initrd.to_str().expect("utf-8 path"),
    ];
    let g = Guest::spawn(&args, &[]);
    if g.wait_for(0, "pmsnap-guest: ready", READY_TIMEOUT)
        .is_none()
    {
        eprintln!(
            "image {}: no ready line; console:\n{}\n{}",
            m.label,
            g.output(),
            g.stderr()
        );
        std::process::exit(1);
    }
    let t = g.started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(g.pid());
    drop(g);
    std::thread::sleep(Duration::from_millis(500));
    (t, cpu)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
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

const USAGE: &str =
    "usage: boot-time [--runs N] [--vcpus 1,2] [--mem SIZE] [--cmdline WORDS] [--image DIR]...";

fn usage(msg: &str) -> ! {
    eprintln!("boot-time: {msg}\n{USAGE}");
    std::process::exit(2);
}
