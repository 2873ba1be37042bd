//! Crash test of whole-VM snapshots (issue 6): SIGKILL of the VMM at a random moment
//! during `snapshot-vm`, `rollback` or `delete`, trial after trial on one pool, with real
//! KVM, real `pmsnap` processes and a real pool file.
//!
//! The guest is the pattern payload (tests/payload/pattern.S): it runs in guest user mode,
//! which this host executes natively, and rewrites all of its 48 MiB region every round on
//! 2 vCPUs, so every trial finds RAM changed, pages being preserved and rolled back.
//!
//! A trial: start a VMM (the previous trial's restored one, or `pmsnap run --payload` when
//! the store holds no snapshot), let the guest run, then send one operation through the
//! API while a killer thread sleeps a random time and SIGKILLs the VMM. Before a
//! snapshot-vm the test pauses the VM and copies guest RAM from the pool file: that copy
//! is the snapshot's reference content. After the kill: `pmsnap store verify` must be
//! clean; every snapshot whose creation returned (and that no returned delete removed)
//! must still be listed; each snapshot in the store is restored by a new VMM with
//! `pmsnap restore --paused` and guest RAM, read from the pool file, must equal its
//! reference byte for byte. Each restored VMM is SIGKILLed too (a crash right after a
//! restore), except one chosen at random, which is resumed and carries the next trial;
//! that guest must go on from its saved registers (checked on the RAM it writes next).
//! A rollback of a paused VM that returned must have left RAM equal to the snapshot; one
//! killed before returning is classified by how much of RAM went back (before, mid-copy,
//! after the copy).
//!
//! `PMSNAP_CRASH_SEED` replays a run's random draws (the seed is printed; what a kill
//! hits still depends on the machine's timing, and the later choices follow what earlier
//! kills left in the store); `PMSNAP_CRASH_TRIALS` changes the trial count (default 50);
//! `PMSNAP_BIN` runs another `pmsnap` build. Run with `--nocapture` to see each trial.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pmem_backend::{Pool, PoolOptions};
use pmsnap_testenv::Rng;
use vmm::api::client::ClientError;
use vmm::api::types::VmState;

mod common;
use common::pattern::{first_difference, guest_continued, read_ram, MEM, MEM_ARG, PAGES, WORDS};
use common::{kvm_missing, payload, pmsnap_bin, ApiVmm as Vmm};

/// Snapshots kept at most: beyond it a trial deletes instead of snapshotting.
const MAX_LIVE: usize = 3;
/// Blocks for preserved pages and state: every live snapshot fully preserved, plus room
/// (a full block area makes the engine drop snapshots, which the test would report).
/// Not more: every VMM pre-faults the whole block area in the background.
const BLOCKS: u64 = MAX_LIVE as u64 * PAGES + 4096;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

impl Vmm {
    fn run_payload(dir: &Path, tag: &str, pool: &Path, bin: &Path) -> Result<Self, String> {
        let args = ["run", "--mem", MEM_ARG, "--vcpus", "2", "--payload"]
            .into_iter()
            .map(OsString::from)
            .chain([bin.into(), "--pool".into(), pool.into()]);
        Self::spawn(dir, tag, args)
    }

    fn restore_paused(dir: &Path, tag: &str, pool: &Path, name: &str) -> Result<Self, String> {
        let args = ["restore", "--paused", "--snapshot", name, "--pool"]
            .into_iter()
            .map(OsString::from)
            .chain([pool.into()]);
        Self::spawn(dir, tag, args)
    }

    /// Wait for the VMM to end; it must have died of SIGKILL (anything else is a bug).
    fn reap(&mut self) -> Result<(), String> {
        let st = self
            .wait(Duration::from_secs(30))
            .map_err(|e| format!("{e} after SIGKILL"))?;
        match st.signal() {
            Some(libc::SIGKILL) => Ok(()),
            _ => Err(format!(
                "VMM ended with {st}, not by SIGKILL: {}",
                self.log_tail(12)
            )),
        }
    }

    fn sigkill(mut self) -> Result<(), String> {
        self.signal(libc::SIGKILL);
        self.reap()
    }
}

/// Of the pages where `before` differed from `want`, how many equal it in `after`:
/// (pages back, pages to copy).
fn copy_progress(before: &[u64], after: &[u64], want: &[u64]) -> (usize, usize) {
    let (mut back, mut to_copy) = (0, 0);
    for ((b, a), w) in before
        .chunks_exact(WORDS)
        .zip(after.chunks_exact(WORDS))
        .zip(want.chunks_exact(WORDS))
    {
        if b != w {
            to_copy += 1;
            back += usize::from(a == w);
        }
    }
    (back, to_copy)
}

/// Run `pmsnap store <cmd> --pool P`; returns (exit code, stdout, stderr).
fn store(pool: &Path, cmd: &[&str]) -> (i32, String, String) {
    let out = Command::new(pmsnap_bin())
        .arg("store")
        .args(cmd)
        .arg("--pool")
        .arg(pool)
        .stdin(Stdio::null())
        .output()
        .expect("run pmsnap store");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the store holds, read by opening the pool (no VMM may hold it): per snapshot
/// its name and the payload's round (r12) on each vCPU in its saved registers; and the
/// blocks in use.
fn store_view(pool: &Path) -> Result<(BTreeMap<String, Vec<u64>>, u64), String> {
    let p = Pool::open(pool).map_err(|e| format!("open pool: {e}"))?;
    let mut snaps = BTreeMap::new();
    for info in p.list() {
        let name = info.name.as_str();
        let blob = p
            .read_state(name)
            .map_err(|e| format!("state of {name}: {e}"))?;
        let st =
            vmm::persist::VmState::decode(&blob).map_err(|e| format!("state of {name}: {e}"))?;
        snaps.insert(
            info.name.clone(),
            st.vcpus.iter().map(|v| v.regs.r12).collect(),
        );
    }
    Ok((snaps, p.stats().blocks_used))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    SnapshotVm,
    /// Rollback with the VM paused first (then a returned rollback is checked exactly).
    RollbackPaused,
    RollbackRunning,
    Delete,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::SnapshotVm => "snapshot-vm",
            Op::RollbackPaused => "rollback(paused)",
            Op::RollbackRunning => "rollback(running)",
            Op::Delete => "delete",
        }
    }

    /// First kill window: about the operation's usual time on an idle machine (debug
    /// build, 64 MiB guest; a rollback's time grows with the pages written since).
    fn first_window(self) -> Duration {
        match self {
            Op::SnapshotVm => Duration::from_millis(8),
            Op::RollbackPaused | Op::RollbackRunning => Duration::from_millis(80),
            Op::Delete => Duration::from_millis(16),
        }
    }
}

/// Per operation: how the kills fell.
#[derive(Debug, Default)]
struct Tally {
    trials: u32,
    /// The API answered before the VMM died.
    returned: u32,
    /// The VMM died first; of those, how many had committed the change anyway.
    killed_before_return: u32,
    committed_unacknowledged: u32,
    /// Paused rollbacks killed with part of RAM copied back.
    mid_copy: u32,
    op_times: Vec<Duration>,
    /// Kill delays used.
    delays: Vec<Duration>,
    /// Kill delays are drawn from 0..window. The window grows by half after a kill that
    /// came before the answer and shrinks by a third after an answer that came first, so
    /// about half the kills land before the operation returns however long it takes on
    /// this machine, in this pool state (None: [`Op::first_window`]).
    window: Option<Duration>,
}

impl Tally {
    fn window(&self, op: Op) -> Duration {
        self.window.unwrap_or_else(|| op.first_window())
    }

    fn adapt(&mut self, op: Op, returned: bool) {
        let w = self.window(op);
        let w = if returned { w * 2 / 3 } else { w * 3 / 2 };
        self.window = Some(w.clamp(Duration::from_millis(1), Duration::from_secs(2)));
    }
}

/// The VMM the next trial uses: restored from snapshot `from` and resumed.
struct Carried {
    vmm: Vmm,
    from: String,
    /// The snapshot's reference content.
    reference: Arc<Vec<u64>>,
    /// Its vCPUs' payload rounds at the snapshot.
    rounds: Vec<u64>,
}

/// What the test knows about the pool between trials.
struct Model {
    /// Reference content of every snapshot the store may hold.
    refs: BTreeMap<String, Arc<Vec<u64>>>,
    /// Snapshots the store must hold: creation returned (or seen in the store since)
    /// and no returned delete removed them.
    must_exist: BTreeSet<String>,
}

#[test]
fn sigkill_during_snapshot_rollback_and_delete() {
    if kvm_missing("sigkill_during_snapshot_rollback_and_delete") {
        return;
    }
    let t0 = Instant::now();
    let seed = env_u64("PMSNAP_CRASH_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        t ^ (u64::from(std::process::id()) << 32)
    }) | 1;
    let trials = env_u64("PMSNAP_CRASH_TRIALS").unwrap_or(50);
    println!("crash test: {trials} trials, seed {seed:#x} (replay: PMSNAP_CRASH_SEED={seed:#x})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let bin = payload(dir.path());
    let pool = dir.path().join("crash.pool");
    let ram_offset = {
        let p = Pool::create(
            &pool,
            MEM,
            PoolOptions {
                block_count: Some(BLOCKS),
                ..Default::default()
            },
        )
        .expect("create pool");
        p.ram_offset()
    };

    let mut model = Model {
        refs: BTreeMap::new(),
        must_exist: BTreeSet::new(),
    };
    let mut tallies: BTreeMap<Op, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut restores_checked = 0u32;
    let mut max_live = 0usize;
    let mut max_blocks = 0u64;
    let mut next: Option<Carried> = None;
    // Time spent: trial operation with its kill, store verify, reading the store, restore
    // --paused up to the RAM comparison, SIGKILL of restored VMMs.
    let mut phase = [Duration::ZERO; 5];

    for trial in 0..trials {
        let trial_start = Instant::now();
        let mut fail = |what: String| {
            println!("  FAIL trial {trial}: {what}");
            failures.push(format!("trial {trial}: {what}"));
        };
        let (mut vmm, carried) = match next.take() {
            Some(c) => (c.vmm, Some((c.from, c.reference, c.rounds))),
            None => match Vmm::run_payload(dir.path(), &format!("run{trial}"), &pool, &bin) {
                Ok(v) => (v, None),
                Err(e) => {
                    fail(format!("pmsnap run: {e}"));
                    break;
                }
            },
        };
        // Let the guest rewrite part of its region (and fault on protected pages).
        std::thread::sleep(Duration::from_millis(20 + rng.below(60)));
        // A restored guest goes on from its saved registers. Its first writes may leave
        // RAM as it was (a guest in round 1 rewriting pages an earlier guest of the pool
        // left in round 1), so wait for a change; RAM read while it runs is a mix of
        // instants, so the check is word by word.
        if let Some((from, from_ref, from_rounds)) = &carried {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ram = read_ram(&pool, ram_offset);
                match guest_continued(&ram, from_ref, from_rounds) {
                    Ok(0) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Ok(0) => {
                        fail(format!(
                            "the guest restored from {from} did not run in 20 s"
                        ));
                        break;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        fail(format!("the guest restored from {from}: {e}"));
                        break;
                    }
                }
            }
        }

        let live: Vec<String> = model.must_exist.iter().cloned().collect();
        let mut op = match trial % 3 {
            0 => Op::SnapshotVm,
            1 if (trial / 3) % 2 == 0 => Op::RollbackPaused,
            1 => Op::RollbackRunning,
            _ => Op::Delete,
        };
        if op != Op::SnapshotVm && live.is_empty() {
            op = Op::SnapshotVm;
        }
        if op == Op::SnapshotVm && model.refs.len() >= MAX_LIVE {
            op = Op::Delete;
        }
        let name = match op {
            Op::SnapshotVm => format!("t{trial}"),
            _ => rng.pick(&live).clone(),
        };
        // Preparation, before the killer starts.
        let prep = match op {
            Op::SnapshotVm | Op::RollbackPaused => vmm.api.pause().map(|_| ()),
            _ => Ok(()),
        };
        if let Err(e) = prep {
            fail(format!(
                "pause before {}: {e}; log: {}",
                op.as_str(),
                vmm.log_tail(12)
            ));
            break;
        }
        // Guest RAM now: exact when paused (the reference of a new snapshot).
        let now = Arc::new(read_ram(&pool, ram_offset));
        if op == Op::SnapshotVm {
            model.refs.insert(name.clone(), now.clone());
        }
        // RAM before a paused rollback: after a kill, how much of it went back tells
        // whether the kill landed before, during or after the copy.
        let before = (op == Op::RollbackPaused).then(|| now.clone());
        let window = tallies.entry(op).or_default().window(op);
        let delay = Duration::from_micros(rng.below(window.as_micros() as u64));
        let pid = vmm.child.id() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on the test's child, which the main thread reaps only
            // after joining this thread, so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let t = Instant::now();
        let res: Result<(), ClientError> = match op {
            Op::SnapshotVm => vmm.api.snapshot_vm(&name).map(|_| ()),
            Op::RollbackPaused | Op::RollbackRunning => vmm.api.rollback(&name).map(|_| ()),
            Op::Delete => vmm.api.delete(&name).map(|_| ()),
        };
        let op_time = t.elapsed();
        killer.join().expect("killer thread");
        if let Err(e) = vmm.reap() {
            fail(e);
        }
        phase[0] += t.elapsed();
        let returned = match &res {
            Ok(()) => true,
            Err(e @ ClientError::Api { .. }) | Err(e @ ClientError::InvalidName { .. }) => {
                fail(format!("{} {name} failed by itself: {e}", op.as_str()));
                false
            }
            Err(_) => false, // the connection died with the VMM
        };
        let tally = tallies.entry(op).or_default();
        tally.trials += 1;
        tally.delays.push(delay);
        tally.adapt(op, returned);
        if returned {
            tally.returned += 1;
            tally.op_times.push(op_time);
        } else {
            tally.killed_before_return += 1;
        }
        // A returned rollback of a paused VM left RAM exactly at the snapshot.
        let mut rollback_progress = String::new();
        if let Some(before) = &before {
            let ram = read_ram(&pool, ram_offset);
            let want = &model.refs[&name];
            if returned {
                if let Some((p, n)) = first_difference(&ram, want) {
                    fail(format!(
                        "after a returned rollback to {name}, guest page {p} differs ({n} pages)"
                    ));
                }
            } else {
                let (back, to_copy) = copy_progress(before, &ram, want);
                rollback_progress = match back {
                    0 => " before the copy".to_string(),
                    b if b < to_copy => {
                        tally.mid_copy += 1;
                        format!(" mid-copy ({b} of {to_copy} pages back)")
                    }
                    _ => " after the copy".to_string(),
                };
            }
        }

        // The store after the crash.
        let t_verify = Instant::now();
        let (code, out, err) = store(&pool, &["verify"]);
        if code != 0 {
            fail(format!("store verify exit {code}: {out}{err}"));
        }
        phase[1] += t_verify.elapsed();
        let t_ls = Instant::now();
        let (saved, blocks) = match store_view(&pool) {
            Ok(v) => v,
            Err(e) => {
                fail(e);
                break;
            }
        };
        let names: BTreeSet<String> = saved.keys().cloned().collect();
        max_blocks = max_blocks.max(blocks);
        phase[2] += t_ls.elapsed();
        let present = names.contains(&name);
        let effect = match (op, returned, present) {
            (Op::SnapshotVm, true, _) => {
                model.must_exist.insert(name.clone());
                "created"
            }
            (Op::SnapshotVm, false, true) => {
                tally.committed_unacknowledged += 1;
                model.must_exist.insert(name.clone());
                "created (answer lost)"
            }
            (Op::SnapshotVm, false, false) => {
                model.refs.remove(&name);
                "not created"
            }
            (Op::Delete, true, _) => {
                if present {
                    fail(format!("{name} still listed after its delete returned"));
                }
                model.must_exist.remove(&name);
                model.refs.remove(&name);
                "deleted"
            }
            (Op::Delete, false, false) => {
                tally.committed_unacknowledged += 1;
                model.must_exist.remove(&name);
                model.refs.remove(&name);
                "deleted (answer lost)"
            }
            (Op::Delete, false, true) => "not deleted",
            (_, true, _) => "rolled back",
            (_, false, _) => "rollback interrupted",
        }
        .to_string()
            + &rollback_progress;
        for n in &model.must_exist {
            if !names.contains(n) {
                fail(format!("snapshot {n} whose creation returned is gone"));
            }
        }
        for n in &names {
            if !model.refs.contains_key(n) {
                fail(format!("the store lists {n}, which no operation created"));
            }
        }
        max_live = max_live.max(names.len());

        // Every snapshot in the store restores exactly; one, at random, goes on running.
        let mut order: Vec<String> = names.iter().cloned().collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut checked = Vec::new();
        for (i, snap) in order.iter().enumerate() {
            let Some(want) = model.refs.get(snap).cloned() else {
                continue;
            };
            let last = i + 1 == order.len();
            let tag = format!("restore{trial}-{snap}");
            let t_restore = Instant::now();
            let restored = match Vmm::restore_paused(dir.path(), &tag, &pool, snap) {
                Ok(v) => v,
                Err(e) => {
                    fail(format!("restore --paused {snap}: {e}"));
                    continue;
                }
            };
            match restored.api.status() {
                Ok(st) if st.state == VmState::Paused => {}
                other => fail(format!("restore --paused {snap}: status {other:?}")),
            }
            let ram = read_ram(&pool, ram_offset);
            restores_checked += 1;
            phase[3] += t_restore.elapsed();
            if let Some((p, n)) = first_difference(&ram, &want) {
                fail(format!(
                    "restored {snap}: guest page {p} differs from the reference ({n} pages differ)"
                ));
            }
            checked.push(snap.as_str());
            if last {
                match restored.api.resume() {
                    Ok(_) => {
                        next = Some(Carried {
                            vmm: restored,
                            from: snap.clone(),
                            reference: want.clone(),
                            rounds: saved[snap].clone(),
                        })
                    }
                    Err(e) => fail(format!("resume after restore of {snap}: {e}")),
                }
            } else {
                let t_kill = Instant::now();
                if let Err(e) = restored.sigkill() {
                    fail(e);
                }
                phase[4] += t_kill.elapsed();
            }
        }
        println!(
            "trial {trial:2} ({:5.2} s): {:17} {name:4} kill at {:6.2} ms, {} after {:6.2} ms -> {effect}; \
             store: {} snapshots, {blocks} blocks, verify {}; restored exactly: {}",
            trial_start.elapsed().as_secs_f64(),
            op.as_str(),
            delay.as_secs_f64() * 1e3,
            if returned { "returned" } else { "killed  " },
            op_time.as_secs_f64() * 1e3,
            names.len(),
            if code == 0 { "clean" } else { "FAILED" },
            if checked.is_empty() {
                "-".to_string()
            } else {
                checked.join(" ")
            },
        );
    }
    if let Some(c) = next.take() {
        if let Err(e) = c.vmm.sigkill() {
            failures.push(e);
        }
    }
    let (code, out, err) = store(&pool, &["verify"]);
    if code != 0 {
        failures.push(format!("final store verify exit {code}: {out}{err}"));
    }

    println!(
        "summary: {trials} trials, seed {seed:#x}, {:?}",
        t0.elapsed()
    );
    let mut killed = 0;
    for (op, t) in &tallies {
        let mut times = t.op_times.clone();
        times.sort();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        killed += t.killed_before_return;
        println!(
            "  {:17} {:2} trials: {:2} returned before the kill, {:2} killed before returning \
             ({} of them had committed{}); median time when returned {:.2} ms; kill delays \
             {:.1}..{:.1} ms",
            op.as_str(),
            t.trials,
            t.returned,
            t.killed_before_return,
            t.committed_unacknowledged,
            if *op == Op::RollbackPaused {
                format!(", {} mid-copy", t.mid_copy)
            } else {
                String::new()
            },
            median.as_secs_f64() * 1e3,
            t.delays
                .iter()
                .min()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
            t.delays
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
        );
    }
    println!(
        "  kills before the operation returned: {killed} of {trials}; snapshots restored and \
         compared: {restores_checked}; most snapshots at once: {max_live}; most blocks used: \
         {max_blocks} of {BLOCKS}"
    );
    println!(
        "  time: operations with their kill {:.1} s, store verify {:.1} s, reading the store {:.1} s, \
         restores to the RAM comparison {:.1} s, SIGKILL of restored VMMs {:.1} s",
        phase[0].as_secs_f64(),
        phase[1].as_secs_f64(),
        phase[2].as_secs_f64(),
        phase[3].as_secs_f64(),
        phase[4].as_secs_f64(),
    );
    println!(
        "  outcome: {}",
        if failures.is_empty() {
            "every check passed".to_string()
        } else {
            format!("{} failure(s)", failures.len())
        }
    );
    if !failures.is_empty() {
        // Keep the pool and every VMM's log for a look.
        let kept = dir.keep();
        println!("  pool and VMM logs kept in {}", kept.display());
    }
    assert!(
        failures.is_empty(),
        "seed {seed:#x}:\n{}",
        failures.join("\n")
    );
    assert!(
        trials < 10 || (killed > 0 && killed < trials as u32),
        "kills must land both before and after operations returned ({killed} of {trials})"
    );
    assert!(
        trials < 10 || restores_checked > 0,
        "no snapshot was restored"
    );
}

/// `pmsnap restore --paused`: RAM holds the snapshot and no vCPU runs until `resume`.
#[test]
fn restore_paused_runs_nothing_until_resume() {
    if kvm_missing("restore_paused_runs_nothing_until_resume") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let bin = payload(dir.path());
    let pool = dir.path().join("p.pool");
    let ram_offset = Pool::create(&pool, MEM, PoolOptions::default())
        .expect("create pool")
        .ram_offset();
    let vmm = Vmm::run_payload(dir.path(), "run", &pool, &bin).expect("run");
    std::thread::sleep(Duration::from_millis(100));
    vmm.api.pause().expect("pause");
    let want = read_ram(&pool, ram_offset);
    vmm.api.snapshot_vm("s").expect("snapshot-vm while paused");
    assert_eq!(
        vmm.api.status().expect("status").state,
        VmState::Paused,
        "a snapshot of a paused VM leaves it paused"
    );
    assert_eq!(
        first_difference(&read_ram(&pool, ram_offset), &want),
        None,
        "snapshot-vm wrote nothing into guest RAM"
    );
    vmm.api.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        first_difference(&read_ram(&pool, ram_offset), &want).is_some(),
        "the payload rewrote RAM after the snapshot"
    );
    vmm.sigkill().expect("kill");

    let restored =
        Vmm::restore_paused(dir.path(), "restore", &pool, "s").expect("restore --paused");
    assert_eq!(
        restored.api.status().expect("status").state,
        VmState::Paused
    );
    for _ in 0..3 {
        let ram = read_ram(&pool, ram_offset);
        assert_eq!(
            first_difference(&ram, &want),
            None,
            "paused RAM == snapshot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        restored.api.stats().expect("stats").faults,
        0,
        "no guest write"
    );
    assert_eq!(
        restored.api.resume().expect("resume").state,
        VmState::Running
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_difference(&read_ram(&pool, ram_offset), &want).is_none() {
        assert!(
            Instant::now() < deadline,
            "the guest did not run after resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    restored.sigkill().expect("kill");

    // --paused without --api-sock could never be resumed: refused up front.
    let out = Command::new(pmsnap_bin())
        .args(["restore", "--paused", "--snapshot", "s", "--pool"])
        .arg(&pool)
        .stdin(Stdio::null())
        .output()
        .expect("run pmsnap");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--api-sock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
