//! The copy-before-write engine with the real Linux guest (restored from the suite's
//! ready template, so no boot here): while a shell loop writes,
//! pause, copy all guest RAM, snapshot all of it, resume; let the guest run on; after the
//! VMM stops, the snapshot must equal the paused copy bit for bit while RAM moved on.

use std::time::{Duration, Instant};

use pmem_backend::{PageLocation, Pool};
use pmsnap_testenv::SharedMap;
use pmsnap_tests::{ready_guest_in, ready_pool_copy, require_kvm};
use vmm::api::client::ApiClient;
use vmm::api::{PageRun, PagesSnapshotRequest};

const MEM: u64 = 256 << 20;
const PAGES: u64 = MEM / 4096;

#[test]
fn linux_guest_snapshot_of_all_ram_equals_the_paused_copy() {
    require_kvm!("linux_guest_snapshot_of_all_ram_equals_the_paused_copy");
    let t0 = Instant::now();
    // The guest is restored from a copy of the suite's ready template (no boot). Open the
    // copy first, before the VMM takes its lock, to learn where guest RAM lies in it.
    let pool_copy = ready_pool_copy();
    let pool_path = pool_copy.0.clone();
    let ram_offset = {
        let pool = Pool::open(&pool_path).expect("open the pool copy");
        assert_eq!(pool.ram_size(), MEM, "the template is a {MEM}-byte guest");
        pool.ram_offset()
    };
    let file = std::fs::File::open(&pool_path).expect("open pool");
    let ram = SharedMap::new(&file, ram_offset, MEM as usize, false);

    let rg = ready_guest_in(pool_copy, &[]);
    let sock = rg.api.clone();
    let mut g = rg.guest;
    eprintln!("shell after {:?}", t0.elapsed());
    g.send_line("i=0; while true; do i=$((i+1)); echo $i > /tmp/c; done &");
    std::thread::sleep(Duration::from_secs(2));

    let api = ApiClient::new(&sock);
    api.pause().expect("pause");
    let mut copy = vec![0u8; MEM as usize];
    // The vCPUs are paused, so guest RAM does not change during the copy.
    ram.copy_out(0, &mut copy);
    let t = Instant::now();
    let info = api
        .create_pages_snapshot(&PagesSnapshotRequest {
            name: "linux".into(),
            runs: vec![PageRun {
                first_page: 0,
                count: PAGES,
            }],
            labels: Default::default(),
            pause: false,
        })
        .expect("snapshot");
    let took = t.elapsed();
    api.resume().expect("resume");
    assert_eq!(info.pages, PAGES);
    eprintln!("snapshot of {PAGES} pages while paused: {took:?}");

    std::thread::sleep(Duration::from_secs(5));
    let stats = api.stats().expect("stats");
    eprintln!(
        "after 5 s: faults {}, preserved {}, handler mean {} ns",
        stats.faults, stats.preserved_pages, stats.fault_handler.mean_ns
    );
    assert!(stats.preserved_pages > 0, "the guest wrote on: {stats:?}");
    // Informational: the loop's counter. Not asserted: with the loop running, this
    // host's emulated guest kernel can take minutes to answer on the console.
    let from = g.output_len();
    g.send_line("echo count=$(cat /tmp/c)");
    let seen = g.wait_until(from, Duration::from_secs(20), |t| {
        t.lines()
            .any(|l| l.trim().starts_with("count=") && l.trim().len() > 6)
    });
    eprintln!(
        "loop counter {}",
        if seen.is_some() {
            "seen"
        } else {
            "not echoed within 20 s"
        }
    );

    // SAFETY: kill(2) on our own child process, not reaped yet.
    unsafe { libc::kill(g.pid() as i32, libc::SIGTERM) };
    let st = g.wait_exit(Duration::from_secs(30)).expect("VMM exits");
    assert_eq!(st.code(), Some(143), "{}", g.stderr());
    drop(ram);

    let pool = Pool::open(&pool_path).expect("open pool");
    let (mut in_blocks, mut changed) = (0u64, 0u64);
    for p in 0..PAGES {
        let want = &copy[p as usize * 4096..][..4096];
        let (loc, got) = pool.read_snapshot_page("linux", p).expect("read");
        assert!(
            got[..] == *want,
            "guest page {p} differs from the paused copy"
        );
        in_blocks += u64::from(matches!(loc, PageLocation::Block(_)));
        changed += u64::from(pool.read_ram_page(p).expect("RAM")[..] != *want);
    }
    eprintln!("{in_blocks} pages preserved, {changed} pages of RAM changed since the snapshot");
    assert!(
        changed > 0 && in_blocks >= changed,
        "RAM moved on after the snapshot"
    );
    let report = pool.verify(|_, _| ());
    assert!(report.is_clean(), "{report:?}");
    eprintln!("Linux engine test took {:?}", t0.elapsed());
}
