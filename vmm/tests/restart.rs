//! Restart after a crash with the same arguments (issue 10): a VMM with an API socket
//! and a vsock socket is killed with SIGKILL, which leaves both socket files behind;
//! `pmsnap restore` with the same paths must replace them and run, and while it runs
//! another VMM asking for the same sockets must be refused with a clear error. Uses the
//! user-mode payload guest (tests/payload/pattern.S), which boots in milliseconds.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pmem_backend::{Pool, PoolOptions};
use vmm::api::client::ApiClient;
use vmm::api::types::VmState;

mod common;
use common::{kvm_missing, payload, pmsnap_bin};

/// A VMM started by this test; killed at drop if still running.
struct Vmm {
    child: Child,
    log: std::path::PathBuf,
}

impl Vmm {
    /// Start `pmsnap ARGS` (the socket files are not touched first, unlike the shared
    /// helper: that they are left as found is the point of this test).
    fn spawn(dir: &Path, tag: &str, args: &[OsString]) -> Self {
        Self::spawn_env(dir, tag, args, &[])
    }

    /// [`Vmm::spawn`] with environment variables.
    fn spawn_env(dir: &Path, tag: &str, args: &[OsString], env: &[(&str, &Path)]) -> Self {
        let log = dir.join(format!("{tag}.stderr"));
        let child = Command::new(pmsnap_bin())
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn pmsnap");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the API on `sock` answers with the VM's vCPUs.
    fn wait_api(&mut self, sock: &Path) -> ApiClient {
        let api = ApiClient::new(sock);
        let got = pmsnap_testenv::poll_until(Duration::from_secs(60), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("pmsnap exited early ({st}): {}", self.log());
            }
            // A stale socket file exists from the start: only an answer counts.
            api.status().is_ok_and(|s| s.vcpus > 0).then_some(())
        });
        assert!(got.is_some(), "no API after 60 s: {}", self.log());
        api
    }

    /// Wait up to 60 s for the process to end.
    fn wait(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        let st =
            pmsnap_testenv::poll_until(Duration::from_secs(60), || child.try_wait().expect("wait"));
        st.unwrap_or_else(|| panic!("pmsnap still running: {}", self.log()))
    }

    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let st = self.wait();
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{st}");
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn kill_9_then_restore_with_the_same_sockets() {
    if kvm_missing("kill_9_then_restore_with_the_same_sockets") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let d = dir.path();
    let bin = payload(d);
    let (pool, pool2) = (d.join("p.pool"), d.join("p2.pool"));
    let (api_sock, vsock) = (d.join("api.sock"), d.join("vsock.sock"));
    for p in [&pool, &pool2] {
        drop(Pool::create(p, 32 << 20, PoolOptions::default()).expect("create pool"));
    }
    let os = |p: &Path| p.as_os_str().to_owned();
    let run_args = |pool: &Path| {
        vec![
            "run".into(),
            "--mem".into(),
            "32M".into(),
            "--vcpus".into(),
            "1".into(),
            "--payload".into(),
            os(&bin),
            "--pool".into(),
            os(pool),
        ]
    };

    // 1. A VMM with both sockets; a VM snapshot; then kill -9.
    let mut args = run_args(&pool);
    args.extend([
        "--api-sock".into(),
        os(&api_sock),
        "--vsock-sock".into(),
        os(&vsock),
    ]);
    let mut first = Vmm::spawn(d, "run", &args);
    let api = first.wait_api(&api_sock);
    api.snapshot_vm("s").expect("snapshot-vm");
    first.sigkill();
    assert!(
        api_sock.exists() && vsock.exists(),
        "kill -9 leaves both socket files behind"
    );

    // 2. Restore with the same arguments: the stale sockets are replaced.
    let restore_args = [
        "restore".into(),
        "s".into(),
        "--pool".into(),
        os(&pool),
        "--api-sock".into(),
        os(&api_sock),
        "--vsock-sock".into(),
        os(&vsock),
    ];
    let mut restored = Vmm::spawn(d, "restore", &restore_args);
    let api = restored.wait_api(&api_sock);
    assert_eq!(api.status().expect("status").state, VmState::Running);
    vmm::unix_socket::connect_nonblocking(vsock.as_os_str())
        .expect("the restored VMM serves the vsock socket");

    // 3. While it runs, the same sockets are refused to another VMM, by name.
    for (flag, sock) in [("--vsock-sock", &vsock), ("--api-sock", &api_sock)] {
        let mut args = run_args(&pool2);
        args.extend([flag.into(), os(sock)]);
        let mut other = Vmm::spawn(d, "other", &args);
        let st = other.wait();
        let log = other.log();
        assert_eq!(st.code(), Some(1), "{flag}: {log}");
        assert!(
            log.contains("another live process serves the socket")
                && log.contains(&*sock.to_string_lossy()),
            "{flag}: {log}"
        );
    }
    assert_eq!(
        api.status().expect("still serving").state,
        VmState::Running,
        "the refused VMMs left the live one alone"
    );
    vmm::unix_socket::connect_nonblocking(vsock.as_os_str()).expect("vsock still served");

    // 4. Once more: kill -9 and restore, as a supervisor would loop.
    restored.sigkill();
    let mut again = Vmm::spawn(d, "restore2", &restore_args);
    let api = again.wait_api(&api_sock);
    assert_eq!(api.status().expect("status").state, VmState::Running);
    again.sigkill();

    // 5. `pmsnap run` replaces stale sockets the same way.
    let mut args = run_args(&pool2);
    args.extend([
        "--api-sock".into(),
        os(&api_sock),
        "--vsock-sock".into(),
        os(&vsock),
    ]);
    let mut fresh = Vmm::spawn(d, "run2", &args);
    let api = fresh.wait_api(&api_sock);
    assert_eq!(api.status().expect("status").state, VmState::Running);
    vmm::unix_socket::connect_nonblocking(vsock.as_os_str()).expect("vsock served");
    // A clean stop (SIGTERM) removes both socket files.
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(fresh.child.id() as i32, libc::SIGTERM) };
    let st = fresh.wait();
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{}", fresh.log());
    assert!(
        !api_sock.exists() && !vsock.exists(),
        "a VMM that stops cleanly removes its sockets (api {}, vsock {})",
        api_sock.exists(),
        vsock.exists()
    );
}

/// The default pools of VMMs killed with SIGKILL stay behind; `pmsnap store prune`
/// removes exactly those, not the pool of a VMM still running.
#[test]
fn prune_removes_the_pools_of_killed_vmms_only() {
    if kvm_missing("prune_removes_the_pools_of_killed_vmms_only") {
        return;
    }
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir");
    let d = dir.path();
    let bin = payload(d);
    let pools = d.join("pools");
    let env = [("PMSNAP_POOL_DIR", pools.as_path())];
    let start = |tag: &str| {
        let sock = d.join(format!("{tag}.sock"));
        let args: Vec<OsString> = vec![
            "run".into(),
            "--mem".into(),
            "32M".into(),
            "--vcpus".into(),
            "1".into(),
            "--payload".into(),
            bin.clone().into(),
            "--api-sock".into(),
            sock.clone().into(),
        ];
        let mut vmm = Vmm::spawn_env(d, tag, &args, &env);
        vmm.wait_api(&sock);
        vmm
    };
    let pool_of = |pid: u32| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&pools)
            .expect("pool dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
            })
            .collect()
    };
    let mut dead = start("dead");
    let mut live = start("live");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&pools), 0o700, "the pool directory is private");
    let dead_pid = dead.child.id();
    let dead_pool = pool_of(dead_pid);
    assert_eq!(dead_pool.len(), 1, "{dead_pool:?}");
    assert_eq!(mode(&dead_pool[0]), 0o600, "pool files are private");
    dead.sigkill();
    assert!(dead_pool[0].exists(), "SIGKILL leaves the pool behind");
    let live_pool = pool_of(live.child.id());
    assert_eq!(live_pool.len(), 1);

    let prune = |extra: &[&str]| {
        let o = Command::new(pmsnap_bin())
            .args(["store", "prune", "--json"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .output()
            .expect("run prune");
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("json")
    };
    let path = |p: &Path| p.to_str().expect("utf8").to_string();
    let v = prune(&["--dry-run"]);
    assert_eq!(v["removed"][0]["path"], path(&dead_pool[0]), "{v}");
    assert!(dead_pool[0].exists(), "a dry run removes nothing");
    let v = prune(&[]);
    assert_eq!(v["removed"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["removed"][0]["path"], path(&dead_pool[0]), "{v}");
    assert!(v["freed_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert_eq!(v["in_use"][0]["path"], path(&live_pool[0]), "{v}");
    if let Some(pid) = v["in_use"][0]["pid"].as_u64() {
        assert_eq!(pid, u64::from(live.child.id()), "{v}");
    }
    assert!(!dead_pool[0].exists() && live_pool[0].exists());
    assert_eq!(
        live.wait_api(&d.join("live.sock"))
            .status()
            .expect("status")
            .state,
        VmState::Running,
        "prune left the live VMM alone"
    );
    // A clean stop removes the pool itself; nothing left to prune.
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(live.child.id() as i32, libc::SIGTERM) };
    live.wait();
    assert!(!live_pool[0].exists(), "removed at a clean exit");
    let v = prune(&[]);
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
    assert_eq!(v["in_use"], serde_json::json!([]), "{v}");
}
