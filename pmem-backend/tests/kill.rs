//! kill -9 across checkpoints: a child process runs a long history of commits
//! (snapshots, writes, deletes, a name deleted and created again, gc) on a pool whose
//! metadata slot is small (8 KiB), so its commits cross many checkpoints as well as
//! appending deltas, and reports each step it finished. The parent kills it with SIGKILL
//! at several points, reopens the pool and checks that it holds exactly the state after
//! some prefix of the history at least as long as the child reported (every snapshot
//! bit-exact, verify clean), then starts a new child on the recovered pool from there.
//! Unlike the simulated crashes of `crash.rs`, the kill lands wherever the child is,
//! inside a commit's memcpy or msync included, on the real tmpfs page cache.

mod common;

use common::{pattern, superblock_at, tmpdir, Model};
use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind, SnapshotMeta, PAGE_SIZE};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

const PAGES: u64 = 32;
/// The pool the child works on.
const CHILD: &str = "PMSNAP_KILL_CHILD";
/// The step the child starts at.
const FROM: &str = "PMSNAP_KILL_FROM";

#[derive(Debug, Clone)]
enum Step {
    Snap(String, PageRun),
    Write(u64, u64),
    Delete(String),
    Gc,
}

fn history() -> Vec<Step> {
    let mut h = Vec::new();
    let mut live: Vec<String> = Vec::new();
    for round in 0..500u64 {
        let name = format!("s{round}");
        h.push(Step::Snap(name.clone(), PageRun::new((round * 5) % 24, 8)));
        live.push(name);
        for k in 0..3 {
            h.push(Step::Write(
                (round * 7 + k * 3) % PAGES,
                10_000 + round * 10 + k,
            ));
        }
        if live.len() > 3 {
            h.push(Step::Delete(live.remove(0)));
        }
        if round == 1 {
            h.push(Step::Snap("keep".into(), PageRun::new(0, 16)));
        } else if round % 5 == 4 {
            h.push(Step::Delete("keep".into()));
            h.push(Step::Snap("keep".into(), PageRun::new(round % 16, 16)));
        }
        if round % 50 == 49 {
            h.push(Step::Gc);
        }
    }
    h
}

/// The model after `step`.
fn model_step(m: &mut Model, step: &Step) {
    match step {
        Step::Snap(name, run) => m.record_snapshot(name, &[*run], Vec::new()),
        Step::Write(p, seed) => m.ram[*p as usize] = *seed,
        Step::Delete(name) => {
            m.snaps.remove(name);
        }
        Step::Gc => {}
    }
}

fn run_step(pool: &mut Pool, step: &Step) {
    let res = match step {
        Step::Snap(name, run) => {
            // A label, so that the deltas fill the small slot sooner.
            let meta = SnapshotMeta {
                labels: vec![("note".into(), "x".repeat(100))],
                ..SnapshotMeta::default()
            };
            pool.snapshot(name, SnapshotKind::Vm, &[*run], meta)
                .map(|_| ())
        }
        Step::Write(p, seed) => pool.write_ram_page(*p, &pattern(*seed)),
        Step::Delete(name) => pool.delete(name.as_str()).map(|_| ()),
        Step::Gc => pool.gc().map(|_| ()),
    };
    res.unwrap_or_else(|e| panic!("{step:?}: {e}"));
}

/// The child: run the history from step `FROM` on the pool at `CHILD`, printing
/// `done I SLOT` (the step and the metadata slot then in force) after each step.
#[test]
fn child_runs_the_history() {
    let Some(path) = std::env::var_os(CHILD) else {
        return;
    };
    let from: usize = std::env::var(FROM).expect("FROM").parse().expect("a step");
    let path = Path::new(&path);
    let mut pool = Pool::open(path).expect("open");
    let mut out = std::io::stdout().lock();
    for (i, step) in history().iter().enumerate().skip(from) {
        run_step(&mut pool, step);
        let slot = superblock_at(path).catalog_slot;
        writeln!(out, "done {i} {slot}").expect("report");
        out.flush().expect("report");
    }
}

/// Start a child on `path` from step `from`; read its reports until it has finished
/// step `until` (or ended); `delay` later, SIGKILL it. Returns the last step reported
/// finished (if any) and the slot changes (checkpoints) seen.
fn run_and_kill(
    path: &Path,
    from: usize,
    until: usize,
    delay: std::time::Duration,
) -> (Option<usize>, u64) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new(exe)
        .args([
            "child_runs_the_history",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, path)
        .env(FROM, from.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    // The pipe stays open until the child is dead: a child writing into a closed pipe
    // would end at a report, not anywhere.
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let (mut last, mut slot, mut checkpoints) = (None, None, 0);
    let mut report = |line: &str| {
        // (The first report follows the test harness's "test NAME ... " on its line.)
        let at = line.find("done ")?;
        let (i, s) = line[at + 5..]
            .trim_end()
            .split_once(' ')
            .expect("done I SLOT");
        let (i, s): (usize, u32) = (i.parse().expect("I"), s.parse().expect("SLOT"));
        checkpoints += u64::from(slot.is_some_and(|x| x != s));
        (last, slot) = (Some(i), Some(s));
        Some(i)
    };
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("read") == 0 {
            break;
        }
        if report(&line).is_some_and(|i| i >= until) {
            break;
        }
    }
    // Let the child go on for a while (it may be anywhere in a step then), and SIGKILL
    // it (if it has finished, this does nothing).
    std::thread::sleep(delay);
    let _ = child.kill();
    let status = child.wait().expect("wait");
    // What it reported before it died.
    for line in out.lines() {
        report(&line.expect("read"));
    }
    assert!(
        status.success() || last.is_some_and(|i| i >= until),
        "the child failed before step {until}: {status}"
    );
    (last, checkpoints)
}

#[test]
fn kill_9_during_commits_across_checkpoints() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let steps = history();
    let mut models = vec![Model::new(PAGES)];
    for step in &steps {
        let mut m = models[models.len() - 1].clone();
        model_step(&mut m, step);
        models.push(m);
    }
    let d = tmpdir();
    let path = d.path().join("pool");
    let opts = PoolOptions {
        block_count: Some(128),
        log_records: Some(128),
        meta_slot_bytes: Some(8 * 1024),
        persist: None,
        ..PoolOptions::default()
    };
    let mut pool = Pool::create(&path, PAGES * PAGE_SIZE as u64, opts).expect("create");
    models[0].fill(&mut pool);
    drop(pool);
    let (mut from, mut checkpoints) = (0, 0);
    // Kills that found the state of the last step reported, and of a later one (the
    // kill landed after a commit was durable, before the child said so).
    let mut outcomes = [0u64; 2];
    // 26 kills, each 0 to 1.5 ms after the child reported a step (a step of this debug
    // build takes about that long), and a last child that runs to the end.
    let kills = (1..=26u64).map(|k| (k as usize * 100, (k * 7919) % 1500));
    for (until, delay_us) in kills.chain([(steps.len() - 1, 0)]) {
        let delay = std::time::Duration::from_micros(delay_us);
        let (last, seen) = run_and_kill(&path, from, until, delay);
        checkpoints += seen;
        let mut pool = Pool::open(&path).expect("reopen after kill -9");
        // The state is that after `done` steps, for some `done` at least one more than
        // the last step reported (a step that changes no snapshot matches two).
        let first = last.map_or(from, |i| i + 1);
        let done = (first..=steps.len())
            .find(|&j| models[j].check(&pool).is_ok())
            .unwrap_or_else(|| {
                panic!(
                    "killed after step {last:?}: no state from {first} on matches: {}",
                    models[first].check(&pool).expect_err("no match")
                )
            });
        let v = pool.verify(|_, _| {});
        assert!(v.is_clean(), "after step {done}: verify: {:?}", v.problems);
        // RAM pages no snapshot references may hold a later (or half a) write: put the
        // model's content back, as the next child assumes it.
        let m = &models[done];
        for p in 0..PAGES {
            let want = pattern(m.ram[p as usize]);
            if pool.read_ram_page(p).expect("read") != want {
                assert!(!pool.is_protected(p), "page {p} protected and changed");
                pool.write_ram_page(p, &want).expect("rewrite");
            }
        }
        drop(pool);
        eprintln!(
            "killed {delay_us} us after step {last:?} of {}: the state after {done} steps",
            steps.len()
        );
        outcomes[usize::from(last.is_some_and(|i| done > i + 1))] += 1;
        from = done;
    }
    assert_eq!(from, steps.len(), "the last child ran to the end");
    // Both happen (about 21 and 6 of 27 here), but which is chance: not asserted.
    eprintln!(
        "{checkpoints} checkpoints; kills: {} found the last step reported, {} a step \
         done but not reported yet",
        outcomes[0], outcomes[1]
    );
    assert!(checkpoints >= 10, "{checkpoints} checkpoints seen");
    let pool = Pool::open(&path).expect("final open");
    models[steps.len()]
        .check(&pool)
        .expect("the end of the history");
}
