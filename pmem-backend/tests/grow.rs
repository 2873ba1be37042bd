//! Growing the block area of an open pool (`Pool::grow_blocks`): a full block area
//! grown online takes the preserve that failed, every snapshot reads back bit-exact
//! before and after a reopen, refusals change nothing, and a crash between extending
//! the file and committing the new superblock leaves the old pool, which opens.

mod common;

use common::{materialise, pattern, small_opts, tmpdir, Model};
use pmem_backend::superblock::Geometry;
use pmem_backend::{CrashSim, GrowReport, PageRun, Pool, PoolError, Tear, PAGE_SIZE};
use std::path::{Path, PathBuf};

const PAGES: u64 = 32;
/// Blocks at creation: the two snapshots of `setup` and a few preserves fill them.
const BLOCKS: u64 = 16;

/// A pool of `PAGES` pages and `BLOCKS` blocks (64 KiB metadata slots) at `dir/pool`,
/// with snapshot "a" of all RAM (state blob of 2 blocks) and "b" of pages 8..24, and
/// pages written (preserved first) until the block area is full. Returns the page whose
/// preserve found it full.
fn full_pool(
    dir: &Path,
    persist: Option<Box<dyn pmem_backend::Persist>>,
) -> (PathBuf, Pool, Model, u64) {
    let path = dir.join("pool");
    let mut opts = small_opts(persist);
    opts.block_count = Some(BLOCKS);
    let mut pool = Pool::create(&path, PAGES * PAGE_SIZE as u64, opts).expect("create");
    let mut m = Model::new(PAGES);
    m.fill(&mut pool);
    m.snapshot(&mut pool, "a", &[PageRun::new(0, PAGES)], vec![3; 5000])
        .expect("a");
    m.snapshot(&mut pool, "b", &[PageRun::new(8, 16)], Vec::new())
        .expect("b");
    let stuck = write_until_full(&mut pool, &mut m, 0..PAGES, 100);
    (path, pool, m, stuck)
}

/// Write pages of `pages` (each preserved first) until a preserve finds the block area
/// full; the page it failed on (its RAM and the model unchanged).
fn write_until_full(pool: &mut Pool, m: &mut Model, pages: std::ops::Range<u64>, seed: u64) -> u64 {
    for p in pages {
        match m.write(pool, p, seed + p) {
            Ok(()) => {}
            Err(PoolError::BlockAreaFull { free: 0, .. }) => {
                assert_eq!(pool.stats().blocks_free, 0);
                return p;
            }
            Err(e) => panic!("write {p}: {e}"),
        }
    }
    panic!("the block area never filled");
}

/// Everything a growth must keep: the model's snapshots bit-exact, RAM as written,
/// verify clean.
fn check_all(pool: &Pool, m: &Model, ctx: &str) {
    m.check(pool).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    for (p, &seed) in m.ram.iter().enumerate() {
        let ram = pool.read_ram_page(p as u64).expect("read RAM");
        assert!(ram == pattern(seed), "{ctx}: RAM page {p} differs");
    }
    let v = pool.verify(|_, _| {});
    assert!(v.is_clean(), "{ctx}: verify: {:?}", v.problems);
}

/// `new` is `old` with only the block count and file size changed.
fn only_the_block_area_moved(old: Geometry, new: Geometry) {
    let same = Geometry {
        block_count: old.block_count,
        file_size: old.file_size,
        ..new
    };
    assert_eq!(same, old, "RAM, log and metadata stay where they were");
    assert!(new.file_size >= new.block_offset + new.block_count * PAGE_SIZE as u64);
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").len()
}

fn invalid(r: pmem_backend::Result<GrowReport>) -> String {
    match r {
        Err(PoolError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn a_full_block_area_grows_online_and_the_failed_preserve_succeeds() {
    let d = tmpdir();
    let (path, mut pool, mut m, stuck) = full_pool(d.path(), None);
    assert_eq!(stuck, 14, "2 blob blocks + 14 preserved pages");
    check_all(&pool, &m, "full");
    let old = pool.geometry();
    let gen = pool.generation();
    let r = pool.grow_blocks(64).expect("grow");
    let new = pool.geometry();
    assert_eq!(
        r,
        GrowReport {
            old_block_count: BLOCKS,
            new_block_count: 64,
            old_file_size: old.file_size,
            new_file_size: new.file_size,
            generation: gen + 1,
        }
    );
    assert_eq!(new.block_count, 64);
    only_the_block_area_moved(old, new);
    assert_eq!(file_len(&path), new.file_size);
    let s = pool.stats();
    assert_eq!((s.blocks_total, s.blocks_free, s.log_records), (64, 48, 0));
    check_all(&pool, &m, "grown");
    // What the vCPU was waiting for: the preserve of the page that found the area full.
    m.write(&mut pool, stuck, 100 + stuck)
        .expect("the failed preserve succeeds now");
    for p in stuck + 1..PAGES {
        m.write(&mut pool, p, 100 + p).expect("write");
    }
    m.snapshot(&mut pool, "c", &[PageRun::new(0, 20)], vec![9; 100])
        .expect("c");
    for p in 0..20 {
        m.write(&mut pool, p, 700 + p).expect("write after c");
    }
    check_all(&pool, &m, "used after growing");
    drop(pool);
    let mut pool = Pool::open(&path).expect("reopen");
    assert_eq!(pool.geometry(), new, "the superblock has the new geometry");
    check_all(&pool, &m, "reopened");
    // The new blocks are usable after a reopen too, up to the new count.
    m.snapshot(&mut pool, "d", &[PageRun::new(0, PAGES)], Vec::new())
        .expect("d");
    let stuck = write_until_full(&mut pool, &mut m, 0..PAGES, 900);
    assert_eq!(stuck, 9, "55 of the 64 blocks were in use");
    assert_eq!(pool.stats().blocks_total, 64);
    pool.gc().expect("gc");
    check_all(&pool, &m, &format!("full again at page {stuck}"));
}

#[test]
fn growing_twice_within_the_padding_and_beyond() {
    let d = tmpdir();
    let (path, mut pool, mut m, stuck) = full_pool(d.path(), None);
    let g0 = pool.geometry();
    // One more block fits the 2 MiB padding of the file: no extension, same file size.
    pool.grow_blocks(BLOCKS + 1).expect("grow by one");
    let g1 = pool.geometry();
    assert_eq!((g1.block_count, g1.file_size), (BLOCKS + 1, g0.file_size));
    m.write(&mut pool, stuck, 100 + stuck)
        .expect("uses the one new block");
    let stuck = write_until_full(&mut pool, &mut m, stuck + 1..PAGES, 100);
    drop(pool);
    let mut pool = Pool::open(&path).expect("reopen");
    assert_eq!(pool.geometry(), g1);
    check_all(&pool, &m, "after the first growth");
    // Then far beyond it: the file grows.
    pool.grow_blocks(1000).expect("grow to 1000");
    let g2 = pool.geometry();
    assert!(g2.file_size > g1.file_size);
    only_the_block_area_moved(g0, g2);
    assert_eq!(file_len(&path), g2.file_size);
    for p in stuck..PAGES {
        m.write(&mut pool, p, 100 + p).expect("write");
    }
    check_all(&pool, &m, "after the second growth");
    drop(pool);
    let pool = Pool::open(&path).expect("reopen");
    assert_eq!(pool.geometry(), g2);
    check_all(&pool, &m, "reopened after the second growth");
}

#[test]
fn growth_is_refused_when_not_larger_or_too_large_and_changes_nothing() {
    let d = tmpdir();
    let (path, mut pool, m, _) = full_pool(d.path(), None);
    let (geo, gen, len) = (pool.geometry(), pool.generation(), file_len(&path));
    let unchanged = |pool: &Pool, ctx: &str| {
        assert_eq!(pool.geometry(), geo, "{ctx}");
        assert_eq!(pool.generation(), gen, "{ctx}: nothing committed");
        assert_eq!(file_len(&path), len, "{ctx}: file not extended");
        check_all(pool, &m, ctx);
    };
    for n in [0, 3, BLOCKS] {
        let e = invalid(pool.grow_blocks(n));
        assert!(
            e.contains("has 16 blocks") && e.contains(&format!("larger count than {n}")),
            "{e}"
        );
        unchanged(&pool, "not larger");
    }
    let max = pool.max_block_count();
    assert!(max > BLOCKS && max < 1 << 20, "{max}");
    let e = invalid(pool.grow_blocks(u64::from(u32::MAX) + 1));
    assert!(
        e.contains("block numbers are 32 bits")
            && e.contains(&format!("the largest block count possible now is {max}")),
        "{e}"
    );
    unchanged(&pool, "beyond the format");
    // The 64 KiB metadata slot is what bounds this pool.
    let e = invalid(pool.grow_blocks(max + 1));
    assert!(
        e.contains("would not fit the metadata slot")
            && e.contains("a slot holds 65536")
            && e.contains(&format!("the largest block count possible now is {max}")),
        "{e}"
    );
    unchanged(&pool, "beyond the metadata slot");
    pool.grow_blocks(max)
        .expect("the largest count is accepted");
    assert_eq!(pool.max_block_count(), max, "the catalog did not change");
    let e = invalid(pool.grow_blocks(max + 1));
    assert!(
        e.contains(&format!(
            "this pool cannot grow now: the limit is {max} blocks and it has {max}"
        )),
        "{e}"
    );
}

/// The metadata limit is honest: a pool grown to its largest count and then filled
/// with pages preserved for one snapshot still commits (gc), and reopens.
#[test]
fn a_pool_grown_to_its_limit_can_fill_every_block() {
    let d = tmpdir();
    let path = d.path().join("pool");
    let pages = 1024;
    let mut opts = small_opts(None);
    opts.block_count = Some(8);
    opts.meta_slot_bytes = Some(16 * 1024);
    let mut pool = Pool::create(&path, pages * PAGE_SIZE as u64, opts).expect("create");
    let mut m = Model::new(pages);
    m.fill(&mut pool);
    m.snapshot(&mut pool, "a", &[PageRun::new(0, pages)], vec![1; 4096])
        .expect("a");
    let max = pool.max_block_count();
    assert!(
        max > 500 && max < pages,
        "{max}: a 16 KiB slot, 28 bytes a block"
    );
    pool.grow_blocks(max).expect("grow to the limit");
    let stuck = write_until_full(&mut pool, &mut m, 0..pages, 5000);
    assert_eq!(stuck, max - 1, "every block but the blob's holds a page");
    pool.gc()
        .expect("the catalog of the full pool fits its slot");
    drop(pool);
    let pool = Pool::open(&path).expect("reopen");
    assert_eq!(pool.geometry().block_count, max);
    check_all(&pool, &m, "full at the limit");
}

/// A crash after the file was extended and before the new superblock was durable: the
/// file is longer than the superblock's `file_size` (here with junk in the excess).
/// `open` accepts it with the old block count, and a later growth works over it.
#[test]
fn crash_between_extend_and_commit_opens_with_the_old_count() {
    let d = tmpdir();
    let (path, pool, mut m, stuck) = full_pool(d.path(), None);
    let old = pool.geometry();
    drop(pool);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    let longer = old.with_block_count(2000).expect("geometry").file_size;
    f.set_len(longer).expect("extend as a crashed growth did");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xa5; 8192], old.file_size + 4096)
        .expect("junk beyond file_size");
    drop(f);
    let mut pool = Pool::open(&path).expect("a longer file opens");
    assert_eq!(pool.geometry(), old, "not grown");
    assert_eq!(pool.recovery().torn_discarded, 0);
    check_all(&pool, &m, "reopened longer file");
    assert!(matches!(
        pool.preserve(stuck),
        Err(PoolError::BlockAreaFull { .. })
    ));
    // Growing to less than the file already holds keeps the longer file (never shrinks).
    pool.grow_blocks(600).expect("grow");
    assert!(pool.geometry().file_size < longer);
    assert_eq!(file_len(&path), longer);
    for p in stuck..PAGES {
        m.write(&mut pool, p, 100 + p).expect("write");
    }
    check_all(&pool, &m, "grown over the longer file");
    drop(pool);
    let pool = Pool::open(&path).expect("reopen");
    assert_eq!(pool.geometry().block_count, 600);
    check_all(&pool, &m, "reopened");
}

/// Crash at every persist point of a growth (the catalog, then the superblock), with
/// the write in flight lost, torn, or complete: the durable image is the file extended
/// (its new length is durable before the first of them) with either the old or the new
/// geometry in force, every snapshot intact, and the pool grows (again) after reopening.
#[test]
fn crash_at_every_persist_point_of_a_growth() {
    // Counting run.
    let d = tmpdir();
    let sim = CrashSim::new(0, None, Tear::Lost);
    let (_, mut pool, _, _) = full_pool(d.path(), Some(Box::new(sim.clone())));
    let before = sim.calls();
    pool.grow_blocks(200).expect("grow");
    let new = pool.geometry();
    let points = sim.calls() - before;
    assert_eq!(points, 2, "catalog, then superblock");
    drop(pool);
    let mut outcomes = [0; 2];
    for n in 1..=points {
        for tear in Tear::ALL {
            let ctx = format!("crash at persist {n}/{points} ({tear:?})");
            let d = tmpdir();
            let sim = CrashSim::new(0, None, Tear::Lost);
            let (_, mut pool, mut m, stuck) = full_pool(d.path(), Some(Box::new(sim.clone())));
            let old = pool.geometry();
            sim.arm(n, tear);
            assert!(pool.grow_blocks(200).is_err(), "{ctx}: unnoticed");
            // The failed growth handed out no block beyond the committed area.
            assert_eq!(pool.geometry(), old, "{ctx}");
            assert_eq!(pool.stats().blocks_free, 0, "{ctx}");
            drop(pool);
            let image = sim.durable_image();
            assert!(image.len() as u64 >= new.file_size, "{ctx}: extension lost");
            let path = materialise(d.path(), "after-crash", &image);
            let mut pool =
                Pool::open(&path).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
            let grown = pool.geometry() == new;
            assert!(
                grown || pool.geometry() == old,
                "{ctx}: {:?}",
                pool.geometry()
            );
            outcomes[usize::from(grown)] += 1;
            check_all(&pool, &m, &ctx);
            if !grown {
                assert!(matches!(
                    pool.preserve(stuck),
                    Err(PoolError::BlockAreaFull { .. })
                ));
                pool.grow_blocks(200)
                    .unwrap_or_else(|e| panic!("{ctx}: grow after reopen: {e}"));
            }
            for p in stuck..PAGES {
                m.write(&mut pool, p, 100 + p).expect("write");
            }
            check_all(&pool, &m, &format!("{ctx}, grown and written"));
        }
    }
    // Lost or torn before the superblock: old; the superblock complete: new.
    assert_eq!(outcomes, [6, 2], "old 6 times, new 2 times");
}

/// Extending the file fails (here with EFBIG: a file size limit, set in a child process
/// as it is per process): `PoolError::Extend`, and the pool is exactly as before.
#[test]
fn extension_failure_leaves_the_pool_unchanged() {
    const CHILD: &str = "PMSNAP_GROW_FSIZE_CHILD";
    if std::env::var_os(CHILD).is_none() {
        run_child(
            "extension_failure_leaves_the_pool_unchanged",
            CHILD,
            "1",
            None,
        );
        return;
    }
    let d = tmpdir();
    let (path, mut pool, m, stuck) = full_pool(d.path(), None);
    let len = file_len(&path);
    // SAFETY: plain syscalls on this (child) process; no memory is shared.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        let cap = libc::rlimit {
            rlim_cur: len as libc::rlim_t,
            rlim_max: lim.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &cap), 0);
    }
    expect_extend_failure(&path, &mut pool, &m, stuck, libc::EFBIG);
    // SAFETY: as above; the soft limit goes back up to the hard one.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
    pool.grow_blocks(1000).expect("grows once the file can");
}

/// The same on a full tmpfs (ENOSPC): run in a child process with its own mount
/// namespace and a 10 MiB tmpfs. Needs the right to mount (root, or CAP_SYS_ADMIN);
/// elsewhere it says so and passes without checking.
#[test]
fn full_tmpfs_leaves_the_pool_unchanged() {
    const CHILD: &str = "PMSNAP_GROW_ENOSPC_CHILD";
    let Some(dir) = std::env::var_os(CHILD) else {
        let d = tmpdir();
        let mnt = d.path().join("small-tmpfs");
        std::fs::create_dir(&mnt).expect("mount point");
        run_child(
            "full_tmpfs_leaves_the_pool_unchanged",
            CHILD,
            mnt.to_str().expect("utf-8 path"),
            Some(mnt.clone()),
        );
        return;
    };
    let dir = PathBuf::from(dir);
    let (path, mut pool, m, stuck) = full_pool(&dir, None);
    let free = || {
        // SAFETY: statvfs is plain data, valid when zeroed.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(dir.to_str().expect("utf-8")).expect("path");
        // SAFETY: a valid C path and a live, writable struct for the call to fill.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bfree
    };
    let free_before = free();
    // The pool takes 6 MiB of the 10: 2000 blocks (12 MiB of file) cannot be had.
    assert_eq!(file_len(&path), 6 << 20);
    expect_extend_failure(&path, &mut pool, &m, stuck, libc::ENOSPC);
    assert_eq!(
        free(),
        free_before,
        "the space fallocate took is given back"
    );
    // 600 blocks (an 8 MiB file) fit.
    pool.grow_blocks(600).expect("a growth that fits");
    check_all(&pool, &m, "grown on the small tmpfs");
}

/// Growing to 2000 blocks fails to extend the file with `errno`; nothing changed.
fn expect_extend_failure(path: &Path, pool: &mut Pool, m: &Model, stuck: u64, errno: i32) {
    let (geo, gen, len) = (pool.geometry(), pool.generation(), file_len(path));
    match pool.grow_blocks(2000) {
        Err(e @ PoolError::Extend { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("the pool is unchanged"), "{msg}");
            let PoolError::Extend { source, .. } = e else {
                unreachable!()
            };
            assert_eq!(source.raw_os_error(), Some(errno), "{source}");
        }
        other => panic!("expected Extend, got {other:?}"),
    }
    assert_eq!(pool.geometry(), geo);
    assert_eq!(pool.generation(), gen);
    assert_eq!(file_len(path), len, "the file has its old length");
    assert!(matches!(
        pool.preserve(stuck),
        Err(PoolError::BlockAreaFull { .. })
    ));
    check_all(pool, m, "after the failed extension");
}

/// Run test `name` of this binary again in a child process with `var=value` (and, with
/// `mount`, in a new mount namespace with a 10 MiB tmpfs mounted there); it must pass.
fn run_child(name: &str, var: &str, value: &str, mount: Option<PathBuf>) {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(var, value);
    if let Some(dir) = mount {
        let target = std::ffi::CString::new(dir.to_str().expect("utf-8")).expect("path");
        let (tmpfs, root, opts) = (c"tmpfs", c"/", c"size=10m,mode=0700");
        // SAFETY: between fork and exec only async-signal-safe syscalls run, on strings
        // made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let null = std::ptr::null();
                let private = libc::MS_REC | libc::MS_PRIVATE;
                let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                    && libc::mount(null, root.as_ptr(), null, private, std::ptr::null()) == 0
                    && libc::mount(
                        tmpfs.as_ptr(),
                        target.as_ptr(),
                        tmpfs.as_ptr(),
                        0,
                        opts.as_ptr().cast(),
                    ) == 0;
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("{name}: skipped, no child with a small tmpfs ({e})");
            return;
        }
    };
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
}
