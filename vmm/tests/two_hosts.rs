//! Two hosts on one machine (issue 14): host A and host B are network namespaces, each
//! with its own mount namespace and its own /dev/shm, reaching a real SeaweedFS S3
//! gateway (in the root namespace) only over their veth pair. A exports a running
//! payload guest's VM snapshot to the bucket; B restores it lazily from the bucket and
//! the guest goes on from A's state; B's guest's own snapshot, read back from the bucket,
//! is a continuation of A's. Then the object store goes down in the middle of a second
//! lazy restore on B: the fill waits, `GET /v1/status` says why, the VMM stays up, and
//! when the store is back every page arrives.
//!
//! Needs root (namespaces, veth), /dev/kvm, `weed` (scripts/setup.sh installs it), and
//! `ip` (Debian's iproute2) and `unshare` (util-linux), which Debian installs by default.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pmsnap_repo::{open_storage, Repo, RepoLocation, S3Options};
use pmsnap_testenv::{poll_until, ObjStore};
use vmm::api::client::ApiClient;

mod common;
use common::pattern::{guest_continued, MEM_ARG};
use common::{kvm_missing, payload, pmsnap_bin};

/// One test host: a network namespace joined to the root namespace by a veth pair.
struct Host {
    ns: String,
    /// The root namespace's end of the pair (what the host reaches the store at).
    gateway: String,
}

impl Host {
    fn new(tag: &str, subnet: u8) -> Host {
        let ns = format!("pmsnap-{tag}-{}", std::process::id());
        let (outer, inner) = (format!("pm{tag}{subnet}o"), format!("pm{tag}{subnet}i"));
        let gateway = format!("10.213.{subnet}.1");
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&[
            "addr",
            "add",
            &format!("10.213.{subnet}.2/24"),
            "dev",
            &inner,
        ]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["link", "set", "lo", "up"]);
        Host { ns, gateway }
    }

    /// `pmsnap ARGS` on this host: in its network namespace, in a new mount namespace
    /// with its own /dev/shm, with the object store's environment pointed at this host's
    /// way to it.
    fn pmsnap(&self, store: &ObjStore, args: &[&str]) -> Command {
        let port = store.endpoint().rsplit(':').next().expect("endpoint port");
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args([
            "sh",
            "-c",
            "mount -t tmpfs -o size=512m tmpfs /dev/shm && exec \"$@\"",
            "sh",
        ])
        .arg(pmsnap_bin())
        .args(args)
        .envs(store.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://{}:{port}", self.gateway),
        )
        .env("PMSNAP_NO_TEMPLATE", "1")
        .stdin(Stdio::null());
        c
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the other end.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A VMM started on a host, killed on drop.
struct Vmm {
    child: Child,
    api: ApiClient,
    log: PathBuf,
}

impl Vmm {
    fn spawn(mut cmd: Command, sock: &Path, log: PathBuf) -> Vmm {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn pmsnap");
        let api = ApiClient::new(sock);
        let mut vmm = Vmm { child, api, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !vmm.api.status().is_ok_and(|s| s.vcpus > 0) {
            if let Ok(Some(st)) = vmm.child.try_wait() {
                panic!("pmsnap exited early ({st}): {}", vmm.log());
            }
            assert!(
                Instant::now() < deadline,
                "no API after 60 s: {}",
                vmm.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Run `cmd` to success and return its stdout.
fn ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Snapshot `name` under `prefix` of the bucket: its RAM as words and its vCPUs' rounds.
fn from_bucket(store: &ObjStore, prefix: &str, name: &str) -> (Vec<u64>, Vec<u64>) {
    let mut opts = S3Options::from_env();
    opts.endpoint = Some(store.endpoint().to_string());
    opts.access_key_id = Some(store.var("AWS_ACCESS_KEY_ID").to_string());
    opts.secret_access_key = Some(store.var("AWS_SECRET_ACCESS_KEY").to_string());
    opts.region = store.var("AWS_REGION").to_string();
    let loc = RepoLocation::parse(&format!("s3://pmsnap/{prefix}")).expect("location");
    let repo = Repo::open_or_init(open_storage(&loc, &opts).expect("storage")).expect("repo");
    common::pattern::from_repository(&repo, name)
}

#[test]
fn host_b_restores_host_a_guest_lazily_from_the_bucket_and_waits_out_a_store_outage() {
    let name = "host_b_restores_host_a_guest_lazily_from_the_bucket_and_waits_out_a_store_outage";
    if kvm_missing(name)
        || pmsnap_testenv::skip_or_fail(name, pmsnap_testenv::root_unavailable("namespaces"))
        || pmsnap_testenv::skip_or_fail(name, ObjStore::unavailable())
        || pmsnap_testenv::skip_or_fail(name, pmsnap_testenv::tool_unavailable("ip"))
        || pmsnap_testenv::skip_or_fail(name, pmsnap_testenv::tool_unavailable("unshare"))
    {
        return;
    }
    let dir = tempfile::tempdir().expect("tmpdir");
    let d = dir.path();
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("{:>7.1} s  {what}", t0.elapsed().as_secs_f64());
    let store = ObjStore::start_on("0.0.0.0");
    step("object store up");
    let (a, b) = (Host::new("a", 1), Host::new("b", 2));
    let bin = payload(d);

    // Host A: a running guest, snapshotted and exported live to the bucket.
    let a_sock = d.join("a.sock");
    let run = [
        "run",
        "--mem",
        MEM_ARG,
        "--vcpus",
        "2",
        "--payload",
        s(&bin),
        "--pool",
        "/dev/shm/a.pool",
        "--api-sock",
        s(&a_sock),
    ];
    let host_a = Vmm::spawn(a.pmsnap(&store, &run), &a_sock, d.join("a.log"));
    std::thread::sleep(Duration::from_millis(300));
    host_a.api.snapshot_vm("v1").expect("snapshot on A");
    step("A snapshotted");
    let ctl = |sock: &Path, args: &[&str]| {
        let mut a = vec!["ctl", "--api-sock", s(sock), "--json"];
        a.extend_from_slice(args);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let export = ctl(&a_sock, &["export", "v1", "--to", "s3://pmsnap/two"]);
    let export: Vec<&str> = export.iter().map(String::as_str).collect();
    ok(a.pmsnap(&store, &export));
    step("A's export returned");
    drop(host_a);
    let (v1, rounds) = from_bucket(&store, "two", "v1");
    step("A exported v1");

    // Host B: a lazy restore from the bucket; the guest goes on from A's state.
    let b_sock = d.join("b.sock");
    let restore = [
        "restore",
        "v1",
        "--from",
        "s3://pmsnap/two",
        "--pool",
        "/dev/shm/b.pool",
        "--api-sock",
        s(&b_sock),
        "--cache-mib",
        "0",
    ];
    let host_b = Vmm::spawn(b.pmsnap(&store, &restore), &b_sock, d.join("b.log"));
    let filled = poll_until(Duration::from_secs(120), || {
        host_b.api.status().ok()?.lazy_fill.filter(|f| f.complete)
    });
    assert!(
        filled.is_some(),
        "B's fill did not complete: {}",
        host_b.log()
    );
    std::thread::sleep(Duration::from_millis(200));
    step("B filled");
    host_b.api.pause().expect("pause B");
    host_b.api.snapshot_vm("v2").expect("snapshot on B");
    let export = ctl(&b_sock, &["export", "v2", "--to", "s3://pmsnap/two"]);
    let export: Vec<&str> = export.iter().map(String::as_str).collect();
    let rep: serde_json::Value =
        serde_json::from_str(&ok(b.pmsnap(&store, &export))).expect("json");
    drop(host_b);
    let (v2, _) = from_bucket(&store, "two", "v2");
    step("B exported v2");
    let changed = guest_continued(&v2, &v1, &rounds).unwrap_or_else(|e| panic!("B's guest: {e}"));
    assert!(changed > 0, "B's guest ran on");
    // What B's guest did not write since A's snapshot is already in the bucket.
    let (new, pages) = (
        rep["bytes_new"].as_u64().expect("bytes_new"),
        rep["pages"].as_u64().expect("pages"),
    );
    assert!(new < pages * 4096, "v2 shares content with v1: {rep}");

    // The store goes down in the middle of a lazy restore: a guest that touches a
    // missing page waits, the status says why, the VMM stays up; once the store is back
    // the pages arrive and the guest runs on. (A short S3 retry bound, so the client's
    // own retries give up quickly and the fill's backoff loop is what waits.)
    let c_sock = d.join("c.sock");
    let restore = [
        "restore",
        "v2",
        "--from",
        "s3://pmsnap/two",
        "--pool",
        "/dev/shm/c.pool",
        "--api-sock",
        s(&c_sock),
        "--cache-mib",
        "0",
        "--fill",
        "on-demand",
        "--paused",
        "--s3-retry-secs",
        "2",
    ];
    let mut host_c = Vmm::spawn(b.pmsnap(&store, &restore), &c_sock, d.join("c.log"));
    store.stop();
    step("store stopped");
    host_c.api.resume().expect("resume C");
    let waiting = poll_until(Duration::from_secs(60), || {
        host_c.api.status().ok()?.lazy_fill?.waiting
    });
    assert!(
        waiting.is_some(),
        "the status says what the fill waits for: {}",
        host_c.log()
    );
    let before = host_c
        .api
        .status()
        .expect("status")
        .lazy_fill
        .expect("fill");
    assert!(
        host_c.child.try_wait().expect("wait").is_none(),
        "the VMM stays up"
    );
    store.restart();
    step("store restarted");
    let back = poll_until(Duration::from_secs(120), || {
        let f = host_c.api.status().ok()?.lazy_fill?;
        (f.waiting.is_none() && f.present > before.present + 1000).then_some(f)
    });
    assert!(
        back.is_some(),
        "the fill goes on once the store is back: {}",
        host_c.log()
    );
    assert!(host_c.log().contains("answers again"), "{}", host_c.log());
    host_c
        .api
        .snapshot_vm("after")
        .expect("a snapshot after the outage");
}
