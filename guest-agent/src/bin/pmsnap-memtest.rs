//! `pmsnap-memtest`: the guest test program for process snapshots. Fills memory with a
//! pattern derived from a seed (user-mode work, cheap in the guest), saves and restores
//! it through the library or the agent, and checks every byte. See docs/agent.md.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use clap::{Parser, Subcommand};
use guest_agent::app::{self, Options, PageBuffer, Pin};
use guest_agent::churn::{mix, Churn};
use guest_agent::client::{
    call, call_app, DryRun, SocketTransport, Transport, VsockStream, HOST_CID,
};
use guest_agent::freeze::FreezeMethod;
use guest_agent::gateway::LocalAgent;
use guest_agent::ops::{copy_out_process, save_process, Principal};
use guest_agent::protocol::{
    read_frame, write_frame, AppRequest, GuestRequest, Request, VirtRange, SNAPSHOT_SERVICE_PORT,
};

#[derive(Debug, Parser)]
#[command(
    name = "pmsnap-memtest",
    version,
    about = "pmsnap guest memory test program"
)]
struct Cli {
    /// Test only: snapshot service endpoint (`unix:PATH`); the library calls then run
    /// the agent's logic in this process. Without it they go to the agent's socket
    /// (env PMSNAP_AGENT_SOCK) and `bench` to the VMM (env PMSNAP_TRANSPORT).
    #[arg(long, global = true, hide = true)]
    transport: Option<String>,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Fill, save (library), scribble over all of it, restore (library), check.
    FillSaveRestore {
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Snapshot name.
        #[arg(long)]
        name: String,
        /// Delete the snapshot at the end (default: keep it for restore-check).
        #[arg(long)]
        rm: bool,
    },
    /// Restore snapshot NAME into a fresh buffer of this fresh process and check it.
    RestoreCheck {
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Seed the snapshot was filled with.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Snapshot name.
        #[arg(long)]
        name: String,
    },
    /// Fill a buffer, print `memtest: hold pid P range START-END`, and sleep (for
    /// `pmsnap-agent save --pid`).
    Hold {
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Time the library's save and restore calls on a filled buffer without a VMM
    /// (lock, translate, build and check the request, unlock): the guest-side cost.
    LibDryRun {
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Pinning: auto, mlock or none.
        #[arg(long, default_value = "auto", value_parser = parse_pin)]
        pin: Pin,
    },
    /// Check the memory of another process (via /proc/PID/mem) against a seed.
    Verify {
        /// Process id.
        #[arg(long)]
        pid: u32,
        /// Start address (decimal, or hex with 0x).
        #[arg(long, value_parser = parse_addr)]
        addr: u64,
        /// Size in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Expected seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The whole-VM snapshot workload: change a 16 MiB buffer step by step (see
    /// `guest_agent::churn`) and print `C=<step> S=<checksum of all of it>` after each.
    Churn {
        /// Pause between steps, in milliseconds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
        /// Stop after this many steps (default: run until killed).
        #[arg(long)]
        steps: Option<u64>,
    },
    /// Run a command as another user: drop supplementary groups, set gid and uid, exec
    /// (for tests of what an unprivileged guest user can do; busybox has no `su -c`
    /// without a passwd entry).
    AsUid {
        /// User (and group) id.
        uid: u32,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Ask the VMM's snapshot service for a list directly, from an unprivileged vsock
    /// port (as any application could try): prints `memtest: probe refused: ...` when
    /// the VMM refuses the connection, `memtest: probe answered: ...` otherwise.
    ProbeVsock {
        /// Guest uid to claim in the request.
        #[arg(long, default_value_t = 0)]
        claim_uid: u32,
    },
    /// As guest root, hit the VMM's snapshot service as an attacker would: open
    /// `--connections` connections from privileged ports at once (the VMM keeps at most
    /// 8), then send `--requests` List requests back to back on one of them (beyond a
    /// burst the VMM answers Busy). Prints `memtest: flood: connections A of M accepted;
    /// requests N: L listed, B busy, E other errors`.
    Flood {
        /// Connections to open at once.
        #[arg(long, default_value_t = 12)]
        connections: usize,
        /// Requests to send on one connection, in one write.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// As guest root, fuzz the VMM's snapshot service: `--frames` frames, each a valid
    /// request (List, Save, Restore or Delete with random names and runs) with random
    /// bytes flipped, cut short or grown, sent from privileged ports (a new connection
    /// whenever the VMM closes one). Ends with a plain List that must be answered. Prints
    /// `memtest: fuzz: N frames, R replies, C connections; final list answered`.
    Fuzz {
        /// Frames to send.
        #[arg(long, default_value_t = 300)]
        frames: usize,
        /// Seed of the mutations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// As guest root, send the VMM's snapshot service the allocation bombs of issue 12
    /// (a save of 2^32 absent pages, a save of 65,536 absent runs of 2 pages, restores
    /// over 65,536 and 500 overlapping target runs) and count the error replies. Prints `memtest:
    /// bombs: R refused of N`.
    Bombs,
    /// Stand in for the agent on its vsock port as a hostile guest would: accept the
    /// VMM's connections and answer one byte a second, for `--seconds` (stop
    /// `pmsnap-agent serve` first: it holds the port). Prints `memtest: slow-agent
    /// listening` once bound.
    SlowAgent {
        /// How long to trickle, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Measure the save pause against copying the same pages out, per size.
    Bench {
        /// Sizes in MiB.
        #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
        sizes: Vec<usize>,
        /// Directory for the copy-out file (tmpfs).
        #[arg(long, default_value = "/tmp")]
        dir: std::path::PathBuf,
        /// Print one JSON line per size.
        #[arg(long)]
        json: bool,
        /// Freeze method: auto, cgroup-v1, cgroup-v2 or sigstop.
        #[arg(long, default_value = "auto", value_parser = parse_freeze)]
        freeze: FreezeMethod,
        /// Save without a VMM (the agent's own share of the pause; see
        /// `pmsnap-agent save --dry-run`).
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_freeze(s: &str) -> Result<FreezeMethod, String> {
    Ok(match s {
        "auto" => FreezeMethod::Auto,
        "cgroup-v1" => FreezeMethod::CgroupV1,
        "cgroup-v2" => FreezeMethod::CgroupV2,
        "sigstop" => FreezeMethod::Signal,
        _ => return Err(format!("unknown freeze method {s:?}")),
    })
}

fn parse_pin(s: &str) -> Result<Pin, String> {
    Ok(match s {
        "auto" => Pin::Auto,
        "mlock" => Pin::Mlock,
        "none" => Pin::None,
        _ => return Err(format!("unknown pin policy {s:?}")),
    })
}

/// `--addr`: the number rule every pmsnap tool shares.
fn parse_addr(s: &str) -> Result<u64, String> {
    guest_agent::cli::parse_number(s).map_err(|e| e.to_string())
}

fn fill(buf: &mut [u8], seed: u64, invert: bool) {
    let mask = if invert { u64::MAX } else { 0 };
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(mix(seed, i as u64) ^ mask).to_le_bytes());
    }
}

/// Offset, got and want of the first byte that differs from the pattern.
fn first_bad(buf: &[u8], seed: u64, base_index: u64) -> Option<(usize, u8, u8)> {
    for (i, c) in buf.chunks_exact(8).enumerate() {
        let want = mix(seed, base_index + i as u64).to_le_bytes();
        if c != want {
            let j = (0..8).find(|&j| c[j] != want[j]).unwrap_or(0);
            return Some((i * 8 + j, c[j], want[j]));
        }
    }
    None
}

fn check(buf: &[u8], seed: u64, what: &str) -> Result<(), String> {
    match first_bad(buf, seed, 0) {
        None => Ok(()),
        Some((off, got, want)) => Err(format!(
            "memtest: FAIL first bad byte at offset {off:#x} (addr {:#x}) after {what}: got {got:#04x} want {want:#04x}",
            buf.as_ptr() as u64 + off as u64
        )),
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn transport(t: Option<&str>) -> Result<SocketTransport, String> {
    match t {
        Some(s) => Ok(SocketTransport::new(s.parse().map_err(|e| format!("{e}"))?)),
        None => SocketTransport::from_env().map_err(|e| e.to_string()),
    }
}

/// The agent, for the library calls; with `--transport` (host tests against a fake
/// snapshot service) the agent's logic runs in this process instead.
fn agent(t: Option<&str>) -> Result<Box<dyn Transport>, String> {
    Ok(match t {
        Some(s) => Box::new(LocalAgent::new(SocketTransport::new(
            s.parse().map_err(|e| format!("{e}"))?,
        ))),
        None => Box::new(SocketTransport::agent()),
    })
}

fn as_uid(uid: u32, cmd: &[String]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    // SAFETY: setgroups with an empty list, setgid and setuid take no pointers that
    // outlive the calls; failures are reported.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(uid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(format!(
                "memtest: FAIL cannot become uid {uid}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let e = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    Err(format!("memtest: FAIL exec {}: {e}", cmd[0]))
}

fn flood(connections: usize, requests: usize) -> Result<(), String> {
    use guest_agent::protocol::{ErrorCode, Reply};
    // Connections: keep every accepted one open until the count is done. A refused one
    // is reset, which shows at connect or at the first read.
    let mut open = Vec::new();
    for _ in 0..connections {
        let Ok(mut s) = VsockStream::connect_privileged(HOST_CID, SNAPSHOT_SERVICE_PORT) else {
            continue;
        };
        let _ = s.set_read_timeout(std::time::Duration::from_secs(30));
        let frame = GuestRequest::new(0, Request::List)
            .encode()
            .map_err(|e| e.to_string())?;
        if write_frame(&mut s, &frame).is_ok() && matches!(read_frame(&mut s), Ok(Some(_))) {
            open.push(s);
        }
    }
    let accepted = open.len();
    open.truncate(1);
    let Some(mut s) = open.pop() else {
        return Err("no connection was accepted".into());
    };
    let one = GuestRequest::new(0, Request::List)
        .encode()
        .map_err(|e| e.to_string())?;
    let burst: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * requests)
        .collect();
    write_frame(&mut s, &burst).map_err(|e| e.to_string())?;
    let (mut listed, mut busy, mut other) = (0, 0, 0);
    for _ in 0..requests {
        match read_frame(&mut s) {
            Ok(Some(f)) => match Reply::decode(&f) {
                Ok(Reply::List(_)) => listed += 1,
                Ok(Reply::Error(e)) if e.code == ErrorCode::Busy => busy += 1,
                _ => other += 1,
            },
            Ok(None) | Err(_) => break,
        }
    }
    println!(
        "memtest: flood: connections {accepted} of {connections} accepted; requests \
         {requests}: {listed} listed, {busy} busy, {other} other errors"
    );
    Ok(())
}

fn fuzz(frames: usize, seed: u64) -> Result<(), String> {
    use guest_agent::protocol::{Reply, RestoreRequest, Run, SaveRequest};
    use std::time::Duration;
    let mut x = seed | 1;
    let mut rnd = move || {
        // xorshift64: fuzz input only.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let connect = || -> Result<VsockStream, String> {
        let s = VsockStream::connect_privileged(HOST_CID, SNAPSHOT_SERVICE_PORT)
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_read_timeout(Duration::from_millis(300));
        Ok(s)
    };
    let mut s = connect()?;
    let (mut replies, mut conns) = (0u64, 1u64);
    for _ in 0..frames {
        let name = ["a", "b", "fz", ".x", ""][(rnd() % 5) as usize].to_string();
        let runs = vec![Run {
            guest_phys_first_page: rnd() % 70_000,
            count: 1 + rnd() % 8,
            virt_addr: rnd() & !0xfff,
            present: rnd() % 2 == 0,
        }];
        let op = match rnd() % 4 {
            0 => Request::List,
            1 => Request::Save(SaveRequest {
                name,
                pid: 1,
                comm: "fuzz".into(),
                runs,
            }),
            2 => Request::Restore(RestoreRequest { name, runs }),
            _ => Request::Delete { name },
        };
        let mut frame = GuestRequest::new((rnd() % 2) as u32 * 1000, op)
            .encode()
            .map_err(|e| e.to_string())?;
        match rnd() % 4 {
            0 => {
                for _ in 0..1 + rnd() % 4 {
                    let i = (rnd() as usize) % frame.len();
                    frame[i] ^= 1 << (rnd() % 8);
                }
            }
            1 => frame.truncate((rnd() as usize) % frame.len()),
            2 => frame.extend((0..rnd() % 32).map(|_| rnd() as u8)),
            _ => {}
        }
        if write_frame(&mut s, &frame).is_err() {
            s = connect()?;
            conns += 1;
            continue;
        }
        match read_frame(&mut s) {
            Ok(Some(_)) => replies += 1,
            // Closed (a garbage header ends a connection) or no answer (a frame cut
            // short waits for its rest): go on with a new connection.
            Ok(None) | Err(_) => {
                s = connect()?;
                conns += 1;
            }
        }
    }
    let mut s = connect()?;
    let _ = s.set_read_timeout(Duration::from_secs(30));
    let list = GuestRequest::new(0, Request::List)
        .encode()
        .map_err(|e| e.to_string())?;
    write_frame(&mut s, &list).map_err(|e| e.to_string())?;
    let answered = match read_frame(&mut s) {
        Ok(Some(f)) => matches!(Reply::decode(&f), Ok(Reply::List(_))),
        _ => false,
    };
    println!(
        "memtest: fuzz: {frames} frames, {replies} replies, {conns} connections; final list {}",
        if answered { "answered" } else { "NOT answered" }
    );
    if answered {
        Ok(())
    } else {
        Err("the snapshot service no longer answers".into())
    }
}

fn bombs() -> Result<(), String> {
    use guest_agent::protocol::{Reply, RestoreRequest, Run, SaveRequest, MAX_RUNS};
    let run = |first, count, present| Run {
        guest_phys_first_page: first,
        count,
        virt_addr: 0x1000,
        present,
    };
    let save = |runs| {
        Request::Save(SaveRequest {
            name: "bomb".into(),
            pid: 1,
            comm: "bomb".into(),
            runs,
        })
    };
    let restore = |n| {
        Request::Restore(RestoreRequest {
            name: "bomb".into(),
            runs: vec![run(0, 1, true); n],
        })
    };
    let requests = [
        save(vec![run(0, 1 << 32, false)]),
        // Absent runs cost no block, but name pages: twice guest RAM's worth here.
        save((0..MAX_RUNS as u64).map(|i| run(i * 2, 2, false)).collect()),
        restore(MAX_RUNS),
        restore(500),
    ];
    let mut refused = 0;
    for op in requests.iter().cloned() {
        let mut s = VsockStream::connect_privileged(HOST_CID, SNAPSHOT_SERVICE_PORT)
            .map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_read_timeout(std::time::Duration::from_secs(60));
        let frame = GuestRequest::new(0, op)
            .encode()
            .map_err(|e| e.to_string())?;
        write_frame(&mut s, &frame).map_err(|e| e.to_string())?;
        match read_frame(&mut s) {
            Ok(Some(f)) => match Reply::decode(&f) {
                Ok(Reply::Error(e)) => {
                    println!("memtest: bomb refused: {:?}: {}", e.code, e.message);
                    refused += 1;
                }
                other => println!("memtest: bomb NOT refused: {other:?}"),
            },
            other => println!("memtest: bomb got no reply: {other:?}"),
        }
    }
    println!("memtest: bombs: {refused} refused of {}", requests.len());
    Ok(())
}

fn slow_agent(seconds: u64) -> Result<(), String> {
    use std::io::Write as _;
    let l = guest_agent::client::VsockListener::bind(guest_agent::protocol::AGENT_PORT)
        .map_err(|e| format!("bind the agent port: {e}"))?;
    println!("memtest: slow-agent listening");
    let _ = std::io::stdout().flush();
    let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let accepted = conns.clone();
    std::thread::spawn(move || {
        while let Ok(c) = l.accept() {
            accepted.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    });
    // Every connection held gets a byte a second: a frame header that never completes.
    let end = Instant::now() + std::time::Duration::from_secs(seconds);
    while Instant::now() < end {
        for c in conns.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            let _ = c.write_all(b"P");
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    Ok(())
}

fn probe_vsock(claim_uid: u32) -> Result<(), String> {
    let mut s = match VsockStream::connect(HOST_CID, SNAPSHOT_SERVICE_PORT) {
        Ok(s) => s,
        Err(e) => {
            println!("memtest: probe refused: connect: {e}");
            return Ok(());
        }
    };
    let _ = s.set_read_timeout(std::time::Duration::from_secs(30));
    let frame = GuestRequest::new(claim_uid, Request::List)
        .encode()
        .map_err(|e| e.to_string())?;
    if let Err(e) = write_frame(&mut s, &frame) {
        println!("memtest: probe refused: send: {e}");
        return Ok(());
    }
    match read_frame(&mut s) {
        Ok(Some(f)) => println!("memtest: probe answered: {} bytes", f.len()),
        Ok(None) => println!("memtest: probe refused: closed without a reply"),
        Err(e) => println!("memtest: probe refused: {e}"),
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let t = cli.transport.as_deref();
    match cli.command {
        Mode::FillSaveRestore {
            mib,
            seed,
            name,
            rm,
        } => {
            let mut tr = agent(t)?;
            let mut buf = PageBuffer::populated(mib << 20).map_err(|e| e.to_string())?;
            fill(&mut buf, seed, false);
            let s = app::save_with(tr.as_mut(), &name, &[&buf])
                .map_err(|e| format!("memtest: FAIL save: {e}"))?;
            fill(&mut buf, seed, true);
            // The scribble must have hit every byte, or the check below proves nothing.
            if buf.iter().step_by(4093).zip(0..).any(|(&b, k)| {
                let off = k * 4093;
                b == mix(seed, (off / 8) as u64).to_le_bytes()[off % 8]
            }) {
                return Err("memtest: FAIL scribble did not change the buffer".into());
            }
            let r = app::restore_with(tr.as_mut(), &name, &mut [&mut buf])
                .map_err(|e| format!("memtest: FAIL restore: {e}"))?;
            check(&buf, seed, "restore")?;
            if rm {
                call_app(
                    tr.as_mut(),
                    &AppRequest::Delete {
                        name: name.clone(),
                        owner: None,
                    },
                )
                .map_err(|e| format!("memtest: FAIL rm: {e}"))?;
            }
            println!(
                "memtest: ok fill-save-restore {mib} MiB seed {seed} name {name}: save {} pages \
                 {:.2} ms, restore {} pages {:.2} ms (locked {})",
                s.pages,
                ms(s.elapsed),
                r.pages,
                ms(r.elapsed),
                s.locked
            );
        }
        Mode::RestoreCheck { mib, seed, name } => {
            let mut tr = agent(t)?;
            let mut buf = PageBuffer::new(mib << 20).map_err(|e| e.to_string())?;
            let r = app::restore_with(tr.as_mut(), &name, &mut [&mut buf])
                .map_err(|e| format!("memtest: FAIL restore: {e}"))?;
            check(&buf, seed, "restore")?;
            println!(
                "memtest: ok restore-check {mib} MiB seed {seed} name {name}: {} pages {:.2} ms",
                r.pages,
                ms(r.elapsed)
            );
        }
        Mode::LibDryRun { mib, pin } => {
            let opts = Options { pin };
            let mut buf = PageBuffer::populated(mib << 20).map_err(|e| e.to_string())?;
            fill(&mut buf, 1, false);
            // The agent's work done in this process against a VMM stand-in.
            let mut dry = LocalAgent::new(DryRun);
            let s = app::save_with_options(&mut dry, "dry-run", &[&buf], opts)
                .map_err(|e| format!("memtest: FAIL save: {e}"))?;
            let r = app::restore_with_options(&mut dry, "dry-run", &mut [&mut buf], opts)
                .map_err(|e| format!("memtest: FAIL restore: {e}"))?;
            // Nothing was restored, so the content must be what was filled.
            check(&buf, 1, "dry run")?;
            // And into a fresh buffer, whose pages must all be made resident first.
            let mut fresh = PageBuffer::new(mib << 20).map_err(|e| e.to_string())?;
            let f = app::restore_with_options(&mut dry, "dry-run", &mut [&mut fresh], opts)
                .map_err(|e| format!("memtest: FAIL restore: {e}"))?;
            println!(
                "memtest: ok lib-dry-run {mib} MiB (locked {}): save {} pages {:.2} ms, \
                 restore {} pages {:.2} ms, restore into a fresh buffer ({} pages) {:.2} ms",
                s.locked,
                s.pages,
                ms(s.elapsed),
                r.pages,
                ms(r.elapsed),
                f.pages,
                ms(f.elapsed)
            );
        }
        Mode::Hold { mib, seed } => {
            let mut buf = PageBuffer::populated(mib << 20).map_err(|e| e.to_string())?;
            fill(&mut buf, seed, false);
            let start = buf.as_ptr() as u64;
            println!(
                "memtest: hold pid {} range {start:#x}-{:#x}",
                std::process::id(),
                start + buf.len() as u64
            );
            let _ = std::io::stdout().flush();
            loop {
                // SAFETY: pause has no preconditions; it returns on any signal.
                unsafe { libc::pause() };
            }
        }
        Mode::Verify {
            pid,
            addr,
            mib,
            seed,
        } => {
            let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
                .map_err(|e| format!("memtest: FAIL open /proc/{pid}/mem: {e}"))?;
            let chunk = 1 << 20;
            let mut buf = vec![0u8; chunk];
            for k in 0..mib {
                let at = addr + (k * chunk) as u64;
                mem.read_exact_at(&mut buf, at)
                    .map_err(|e| format!("memtest: FAIL read {at:#x}: {e}"))?;
                if let Some((off, got, want)) = first_bad(&buf, seed, (k * chunk / 8) as u64) {
                    return Err(format!(
                        "memtest: FAIL first bad byte at offset {:#x} (addr {:#x}) of pid {pid}: got {got:#04x} want {want:#04x}",
                        k * chunk + off,
                        at + off as u64
                    ));
                }
            }
            println!("memtest: ok verify pid {pid} {mib} MiB seed {seed}");
        }
        Mode::Churn { interval_ms, steps } => {
            let mut c = Churn::new();
            let mut out = std::io::stdout().lock();
            while steps.is_none_or(|max| c.steps() < max) {
                let n = c.step();
                // Flushed per line: the host reads each step as it happens.
                writeln!(out, "{}", Churn::line(n, c.checksum()))
                    .and_then(|()| out.flush())
                    .map_err(|e| format!("memtest: FAIL write: {e}"))?;
                std::thread::sleep(std::time::Duration::from_millis(interval_ms));
            }
        }
        Mode::AsUid { uid, cmd } => as_uid(uid, &cmd)?,
        Mode::ProbeVsock { claim_uid } => probe_vsock(claim_uid)?,
        Mode::Flood {
            connections,
            requests,
        } => flood(connections, requests)?,
        Mode::Fuzz { frames, seed } => fuzz(frames, seed)?,
        Mode::SlowAgent { seconds } => slow_agent(seconds)?,
        Mode::Bombs => bombs()?,
        Mode::Bench {
            sizes,
            dir,
            json,
            freeze,
            dry_run,
        } => {
            let mut tr: Box<dyn Transport> = if dry_run {
                Box::new(DryRun)
            } else {
                Box::new(transport(t)?)
            };
            bench(tr.as_mut(), &sizes, &dir, json, freeze)?
        }
    }
    Ok(())
}

/// A `hold` child, killed on drop.
struct Holder {
    child: std::process::Child,
    pid: u32,
    range: VirtRange,
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_holder(mib: usize, seed: u64) -> Result<Holder, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "hold",
            "--mib",
            &mib.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn hold: {e}"))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    // "memtest: hold pid P range S-E"
    let w: Vec<&str> = line.split_whitespace().collect();
    let parsed = (|| {
        let pid = w.get(3)?.parse().ok()?;
        Some((pid, guest_agent::cli::parse_range(w.get(5)?).ok()?))
    })();
    let Some((pid, range)) = parsed else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("bad hold output {line:?}"));
    };
    Ok(Holder { child, pid, range })
}

fn bench(
    tr: &mut dyn Transport,
    sizes: &[usize],
    dir: &std::path::Path,
    json: bool,
    freeze: FreezeMethod,
) -> Result<(), String> {
    for &mib in sizes {
        let started = Instant::now();
        let h = spawn_holder(mib, mib as u64)?;
        let fill_ms = ms(started.elapsed());
        let name = format!("memtest-bench-{}-{mib}", std::process::id());
        let s = save_process(tr, h.pid, &[h.range], &name, freeze)
            .map_err(|e| format!("bench save {mib} MiB: {e}"))?;
        let _ = call(tr, &Principal::current().request(Request::Delete { name }));
        let out = dir.join(format!("pmsnap-memtest-copy-{}", std::process::id()));
        let c = copy_out_process(h.pid, &[h.range], &out, freeze);
        let _ = std::fs::remove_file(&out);
        let c = c.map_err(|e| format!("bench copy {mib} MiB: {e}"))?;
        let ratio = c.pause_us as f64 / s.pause_us.max(1) as f64;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "mib": mib, "save_pause_us": s.pause_us, "save_runs": s.runs,
                    "copy_pause_us": c.pause_us, "copy_bytes": c.bytes,
                    "copy_over_save": ratio, "freeze": s.freeze, "fill_ms": fill_ms,
                    "save_phases": s.phases,
                })
            );
        } else {
            println!(
                "bench: {mib} MiB resident: save pause {:.3} ms ({} runs, {}: freeze {:.3} map {:.3} vmm {:.3} thaw {:.3}), copy-out pause {:.3} ms, copy/save {:.1}x",
                s.pause_us as f64 / 1000.0,
                s.runs,
                s.freeze,
                s.phases.freeze_us as f64 / 1000.0,
                s.phases.map_us as f64 / 1000.0,
                s.phases.vmm_us as f64 / 1000.0,
                s.phases.thaw_us as f64 / 1000.0,
                c.pause_us as f64 / 1000.0,
                ratio
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.starts_with("memtest:") {
                println!("{e}");
            } else {
                println!("memtest: FAIL {e}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_checks() {
        let mut b = vec![0u8; 4096 * 3];
        fill(&mut b, 9, false);
        assert_eq!(first_bad(&b, 9, 0), None);
        assert!(first_bad(&b, 10, 0).is_some());
        b[5000] ^= 1;
        assert_eq!(first_bad(&b, 9, 0).map(|x| x.0), Some(5000));
        // The inverted pattern differs in every byte.
        let mut c = vec![0u8; 4096];
        fill(&mut c, 9, true);
        assert!(c.iter().zip(&b).all(|(x, y)| x != y));
        // Index-based: a slice in the middle checks with its base index.
        fill(&mut b, 9, false);
        assert_eq!(first_bad(&b[4096..], 9, 512), None);
    }
}
