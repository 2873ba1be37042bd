//! `pmsnap run` end to end: one real boot of the default image through the binary, one
//! short library boot for pause/resume, and one test per bad input (no boot needed).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pmsnap_tests::{
    ctl_json, image, ready_guest, ready_template, require_kvm, run_pmsnap, s, Guest, READY_TIMEOUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// A kernel and initrd that exist but are not a real image (for checks that happen
/// before anything is loaded).
fn dummy_image() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().expect("tmpdir");
    let k = d.path().join("vmlinux");
    let i = d.path().join("initramfs.cpio");
    std::fs::write(
        &k,
        b"not a kernel at all, just some bytes that are long enough to read",
    )
    .expect("write");
    std::fs::write(&i, b"070701").expect("write");
    (d, k, i)
}

/// The default pools of VMM `pid` (`pmsnap run` without `--pool` creates
/// `PID-NANOS.pool` in the default pool directory).
fn leftover_pools(pid: u32) -> Vec<String> {
    let dir = vmm::pool_dir::default_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new(); // not created yet: no default pool was ever made
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{pid}-")) && n.ends_with(".pool"))
        .collect()
}

#[test]
fn boots_default_image_with_two_vcpus_and_powers_off() {
    require_kvm!("boots_default_image_with_two_vcpus_and_powers_off");
    let (kernel, initrd) = image();
    let dir = tempfile::tempdir().expect("tempdir");
    let api = dir.path().join("api.sock");
    let mut g = Guest::spawn(
        &[
            "run",
            "--vcpus",
            "2",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
            "--api-sock",
            s(&api),
            "--snapshot-at-ready",
            "boot",
        ],
        &[],
    );
    let ready = g.wait_for(0, "pmsnap-guest: ready", READY_TIMEOUT);
    assert!(
        ready.is_some(),
        "no ready line after {:?}; console:\n{}\nstderr:\n{}",
        g.started.elapsed(),
        g.output(),
        g.stderr()
    );
    eprintln!("guest ready after {:?}", g.started.elapsed());
    assert!(
        g.sync_shell(Duration::from_secs(120)),
        "shell never answered:\n{}",
        g.output()
    );

    // The main job's snapshot: all guest RAM, taken when the guest said it was ready.
    let snaps = ctl_json(&api, &["list"]);
    let boot = snaps
        .as_array()
        .or_else(|| snaps["snapshots"].as_array())
        .and_then(|a| a.iter().find(|s| s["name"] == "boot"))
        .unwrap_or_else(|| panic!("no snapshot boot in {snaps}; stderr:\n{}", g.stderr()));
    assert_eq!(boot["pages"], 65536, "all 256 MiB of guest RAM: {boot}");
    assert!(
        g.stderr().contains("snapshot \"boot\": all 65536 pages"),
        "stderr:\n{}",
        g.stderr()
    );

    let from = g.output_len();
    g.send_line("cat /proc/cpuinfo | grep -c ^processor");
    // The answer is a line of its own (the echoed command line also contains the text).
    let got = g.wait_until(from, Duration::from_secs(60), |t| {
        t.lines().any(|l| l.trim().parse::<u32>().is_ok())
    });
    assert!(got.is_some(), "no processor count:\n{}", g.output());
    let out = g.output();
    let count: Vec<u32> = out[from..]
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        count.first(),
        Some(&2),
        "guest processor count; console:\n{}",
        &out[from..]
    );

    g.send_line("poweroff -f");
    let status = g.wait_exit(Duration::from_secs(120));
    let status =
        status.unwrap_or_else(|| panic!("VMM still running after poweroff:\n{}", g.output()));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", g.stderr());
    assert!(
        leftover_pools(g.pid()).is_empty(),
        "default pool not removed"
    );
}

/// Copy of all guest RAM.
fn ram(mem: &vmm::memory::GuestMemoryMmap) -> Vec<u8> {
    let mut all = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, GuestAddress(r.start_addr().0))
            .expect("read guest RAM");
        all.extend_from_slice(&buf);
    }
    all
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    require_kvm!("pause_freezes_the_guest_and_resume_continues_it");
    use vmm::builder::VmBuilder;
    use vmm::stop::StopNotifier;

    let (kernel, initrd) = image();
    let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir on tmpfs");
    let cfg = vmm::config::VmConfig {
        kernel,
        initrd: Some(initrd),
        extra_cmdline: String::new(),
        mem_bytes: 128 << 20,
        vcpus: 2,
        pool: dir.path().join("pause.pool"),
        block_area: None,
        pool_node: None,
    };
    let (stop, stops) = StopNotifier::new().expect("notifier");
    let console = Arc::new(Mutex::new(Vec::<u8>::new()));
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut b = VmBuilder::with_console(
        &cfg,
        stop.try_clone().expect("clone"),
        Box::new(Sink(console.clone())),
    )
    .expect("build VM");
    // An MMIO device gets the first window of the gap, IRQ 5, and a command-line entry.
    struct Dummy;
    impl vmm::devices::bus::BusDevice for Dummy {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
    }
    let slot = b
        .add_mmio_device(Arc::new(Mutex::new(Dummy)))
        .expect("place MMIO device");
    assert_eq!((slot.addr, slot.len, slot.irq), (0xc000_0000, 0x1000, 5));
    let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    b.vm().register_irqfd(&evt, slot.irq).expect("irqfd");
    let cmdline = b.cmdline_mut().as_cstring().expect("cmdline");
    assert!(
        cmdline
            .to_str()
            .expect("utf-8")
            .contains("virtio_mmio.device=4K@0xc0000000:5"),
        "{cmdline:?}"
    );
    let running = b
        .build()
        .expect("configure")
        .start(&stop)
        .expect("start vCPUs");
    let mem = running.vm().memory().clone();
    // Resume while running is acknowledged promptly (the vCPU is kicked out of KVM_RUN).
    let t = Instant::now();
    running.vcpus().resume().expect("resume while running");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "resume took {:?}",
        t.elapsed()
    );

    // Let the kernel get going, then pause: guest RAM must not change while paused
    // (nothing but the vCPUs writes it).
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    running.vcpus().pause().expect("pause");
    eprintln!("pause took {:?}", t.elapsed());
    running.vcpus().pause().expect("pausing twice is fine");
    let before = ram(&mem);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(ram(&mem) == before, "guest RAM changed while paused");

    running.vcpus().resume().expect("resume");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changed = false;
    while Instant::now() < deadline && !changed {
        std::thread::sleep(Duration::from_millis(200));
        changed = ram(&mem) != before;
    }
    assert!(changed, "guest RAM did not change after resume");
    assert!(stops.try_recv().is_err(), "the VM stopped unexpectedly");
    drop(running);
}

#[test]
fn missing_kernel_is_reported() {
    let (_d, _k, i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--kernel", "/nonexistent/vmlinux", "--initrd", s(&i)],
        &[],
    );
    out.expect_error("kernel /nonexistent/vmlinux does not exist");
}

#[test]
fn missing_initrd_is_reported() {
    let (_d, k, _i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--kernel", s(&k), "--initrd", "/nonexistent/initrd"],
        &[],
    );
    out.expect_error("initrd /nonexistent/initrd does not exist");
}

#[test]
fn unreadable_kernel_is_reported() {
    let (d, _k, i) = dummy_image();
    let out = run_pmsnap(&["run", "--kernel", s(d.path()), "--initrd", s(&i)], &[]);
    out.expect_error("is not a regular file");
}

#[test]
fn missing_default_image_says_how_to_build_it() {
    let d = tempfile::tempdir().expect("tmpdir");
    let out = run_pmsnap(&["run"], &[("PMSNAP_IMAGE_DIR", s(d.path()))]);
    let line = out.expect_error("vmlinux does not exist");
    assert!(line.contains("images/build.sh"), "{line}");
}

#[test]
fn file_that_is_not_a_kernel_is_reported() {
    require_kvm!("file_that_is_not_a_kernel_is_reported");
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(&["run", "--kernel", s(&k), "--initrd", s(&i)], &[]);
    out.expect_error("is not a kernel (neither an ELF vmlinux nor a bzImage)");
    assert!(
        leftover_pools(out.pid).is_empty(),
        "default pool not removed on error"
    );
}

#[test]
fn mem_too_small_for_the_kernel_is_reported() {
    require_kvm!("mem_too_small_for_the_kernel_is_reported");
    let (kernel, initrd) = image();
    let out = run_pmsnap(
        &[
            "run",
            "--mem",
            "8M",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
        ],
        &[],
    );
    out.expect_error("is too small for the kernel");
}

#[test]
fn mem_larger_than_the_host_is_reported() {
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--mem", "64T", "--kernel", s(&k), "--initrd", s(&i)],
        &[],
    );
    out.expect_error("is larger than the host can give");
}

#[test]
fn bad_mem_size_is_reported() {
    let out = run_pmsnap(&["run", "--mem", "lots"], &[]);
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(
        out.stderr.contains("invalid size \"lots\""),
        "{}",
        out.stderr
    );
}

#[test]
fn zero_vcpus_is_reported() {
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--vcpus", "0", "--kernel", s(&k), "--initrd", s(&i)],
        &[],
    );
    out.expect_error("--vcpus must be at least 1");
}

#[test]
fn too_many_vcpus_is_reported() {
    require_kvm!("too_many_vcpus_is_reported");
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(
        &[
            "run",
            "--vcpus",
            "1000",
            "--kernel",
            s(&k),
            "--initrd",
            s(&i),
        ],
        &[],
    );
    out.expect_error("--vcpus 1000 is more than this host allows");
}

#[test]
fn existing_file_that_is_not_a_pool_is_refused() {
    let (_d, k, i) = dummy_image();
    let shm = tempfile::tempdir_in("/dev/shm").expect("tmpdir");
    let pool = shm.path().join("precious");
    std::fs::write(&pool, b"user data").expect("write");
    let out = run_pmsnap(
        &[
            "run",
            "--pool",
            s(&pool),
            "--kernel",
            s(&k),
            "--initrd",
            s(&i),
        ],
        &[],
    );
    out.expect_error("exists and is not a pmsnap pool");
    assert_eq!(
        std::fs::read(&pool).expect("read"),
        b"user data",
        "file must be untouched"
    );
}

#[test]
fn pool_on_a_filesystem_without_uffd_wp_is_refused() {
    let (_d, k, i) = dummy_image();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmpdir");
    let (fs, _) = vmm::vstate::memory::statfs_pool(dir.path()).expect("statfs");
    let on_tmpfs =
        fs == vmm::vstate::memory::TMPFS_MAGIC || fs == vmm::vstate::memory::HUGETLBFS_MAGIC;
    pmsnap_testenv::require!(
        "pool_on_a_filesystem_without_uffd_wp_is_refused",
        on_tmpfs.then(|| format!(
            "needs a directory not on tmpfs/hugetlbfs, but the target dir {} is on one",
            env!("CARGO_TARGET_TMPDIR")
        ))
    );
    let pool = dir.path().join("p.pool");
    let out = run_pmsnap(
        &[
            "run",
            "--pool",
            s(&pool),
            "--kernel",
            s(&k),
            "--initrd",
            s(&i),
        ],
        &[],
    );
    let line = out.expect_error("which cannot do synchronous userfaultfd write-protect");
    assert!(
        line.contains("tmpfs (/dev/shm), hugetlbfs or a memfd"),
        "{line}"
    );
    assert!(!pool.exists(), "no pool file may be created there");
}

#[test]
fn missing_kvm_device_is_reported() {
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--kernel", s(&k), "--initrd", s(&i)],
        &[("PMSNAP_KVM_DEVICE", "/nonexistent/kvm")],
    );
    out.expect_error("/nonexistent/kvm does not exist: this host has no KVM");
    assert!(leftover_pools(out.pid).is_empty());
}

#[test]
fn device_that_is_not_kvm_is_reported() {
    let (_d, k, i) = dummy_image();
    let out = run_pmsnap(
        &["run", "--kernel", s(&k), "--initrd", s(&i)],
        &[("PMSNAP_KVM_DEVICE", "/dev/null")],
    );
    out.expect_error("/dev/null is not a usable KVM device");
}

#[test]
fn stdin_eof_keeps_the_guest_running_and_sigterm_cleans_up() {
    require_kvm!("stdin_eof_keeps_the_guest_running_and_sigterm_cleans_up");
    let (kernel, initrd) = image();
    let mut g = Guest::spawn(
        &[
            "run",
            "--mem",
            "128M",
            "--kernel",
            s(&kernel),
            "--initrd",
            s(&initrd),
        ],
        &[],
    );
    g.close_stdin();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        g.wait_exit(Duration::from_millis(10)).is_none(),
        "VMM ended after stdin EOF; stderr:\n{}",
        g.stderr()
    );
    let pid = g.pid();
    assert_eq!(
        leftover_pools(pid).len(),
        1,
        "the default pool exists while running"
    );
    // SAFETY: kill(2) on our own running child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = g
        .wait_exit(Duration::from_secs(30))
        .expect("VMM exits on SIGTERM");
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "stderr:\n{}",
        g.stderr()
    );
    assert!(leftover_pools(pid).is_empty(), "pool removed on SIGTERM");
}

/// Instant start, as every guest test of this suite starts its guest: the first
/// `pmsnap run` of an image boots and keeps its ready state as a template (the suite's
/// harness did that in `ready_template`, asserting the log said so); a run of the same
/// image starts from it (a lazy restore), its shell answers, and it neither boots nor
/// keeps another template.
#[test]
fn a_second_run_of_an_image_starts_from_its_ready_template() {
    require_kvm!("a_second_run_of_an_image_starts_from_its_ready_template");
    let t = ready_template();
    let listed = run_pmsnap(&["repo", "ls", s(&t.repo), "--json"], &[]);
    assert!(listed.status.success(), "{}", listed.stderr);
    assert!(
        listed.stdout.contains(&format!("\"{}\"", t.name)),
        "template {} not in its repository: {}",
        t.name,
        listed.stdout
    );
    let started = Instant::now();
    let mut warm = ready_guest(&[]);
    let shell = started.elapsed();
    let log = warm.guest.stderr();
    assert!(
        log.contains(&format!("starting from the ready template {:?}", t.name)),
        "not started from the template:\n{log}"
    );
    eprintln!("from the template to a shell that answers, RAM all in place: {shell:?}");
    let (out, rc) = warm
        .guest
        .run(
            "cat /proc/cpuinfo | grep -c ^processor",
            Duration::from_secs(60),
        )
        .expect("command answers");
    // The last line printed (the console may echo the typed line twice).
    let count = out.lines().last().map(str::trim);
    assert_eq!((count, rc), (Some("2"), 0), "{}", warm.guest.output());
    assert!(
        !warm.guest.output().contains("pmsnap-guest: ready"),
        "it did not boot"
    );
    warm.guest.send_line("poweroff -f");
    let st = warm
        .guest
        .wait_exit(Duration::from_secs(120))
        .expect("the VMM ends");
    assert_eq!(st.code(), Some(0), "{}", warm.guest.stderr());
    assert!(
        !warm.guest.stderr().contains("kept the guest's ready state"),
        "a run from the template keeps no new one"
    );
}
