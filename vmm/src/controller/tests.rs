//! The controller over a real engine (pool on tmpfs, userfaultfd) and a fake vCPU
//! control: API requests, their errors and the VM state they report.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::api::{PageRun as ApiRun, PagesSnapshotRequest};
use crate::snapshot::testutil::setup;

struct FakeVm(AtomicBool);

impl VmControl for FakeVm {
    fn pause(&self) -> Result<(), VcpuError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) -> Result<std::time::Instant, VcpuError> {
        self.0.store(false, Ordering::SeqCst);
        Ok(std::time::Instant::now())
    }
    fn is_paused(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn vcpus(&self) -> u32 {
        2
    }
}

/// A controller over `pages` of RAM; the RAM mapping must outlive it.
fn controller(
    pages: u64,
) -> (
    tempfile::TempDir,
    Controller,
    Arc<crate::snapshot::testutil::Ram>,
) {
    let (dir, engine, ram) = setup(pages);
    let c = Controller::new(ControllerParts {
        engine: Arc::new(engine),
        grants: Arc::new(HostGrants::default()),
        vm: Arc::new(FakeVm(AtomicBool::new(false))),
        live: None,
        agent_uds: None,
        info: VmInfo {
            mem_bytes: pages * 4096,
            pool_path: "test".into(),
        },
    });
    (dir, c, ram)
}

fn req(name: &str, runs: &[(u64, u64)], pause: bool) -> ApiRequest {
    ApiRequest::CreatePagesSnapshot(PagesSnapshotRequest {
        name: name.into(),
        runs: runs
            .iter()
            .map(|&(first_page, count)| ApiRun { first_page, count })
            .collect(),
        labels: Default::default(),
        pause,
    })
}

#[test]
fn bad_requests_get_api_errors() {
    let (_dir, c, _ram) = controller(16);
    let created = c.handle(req("a", &[(0, 4)], false)).expect("snapshot");
    assert!(matches!(created, ApiResponse::SnapshotCreated(ref i) if i.pages == 4));
    let dup = c.handle(req("a", &[(4, 1)], false)).expect_err("duplicate");
    assert_eq!(dup.status(), 409);
    let dup = c
        .handle(req("a", &[(4, 1)], true))
        .expect_err("paused duplicate");
    assert_eq!(dup.status(), 409);
    let outside = c
        .handle(req("b", &[(10, 7)], false))
        .expect_err("outside RAM");
    assert_eq!(outside.status(), 422);
    for r in [
        ApiRequest::DeleteSnapshot { name: "zz".into() },
        ApiRequest::DirtySince { name: "zz".into() },
        ApiRequest::InspectSnapshot { name: "zz".into() },
    ] {
        assert_eq!(c.handle(r).expect_err("unknown").status(), 404);
    }
    let vm = c
        .handle(ApiRequest::CreateVmSnapshot { name: "v".into() })
        .expect_err("no VM state capture");
    assert_eq!(vm.status(), 409, "{vm}");
    let process = c
        .handle(ApiRequest::SnapshotProcess(api::ProcessSnapshotRequest {
            name: "p".into(),
            pid: 1,
            ranges: Vec::new(),
        }))
        .expect_err("no vsock device");
    assert_eq!(process.status(), 409, "{process}");
    assert!(
        !lock_pool(c.engine().pool()).is_protected(10),
        "a refused snapshot protects nothing"
    );
}

#[test]
fn pause_resume_status_and_a_paused_snapshot() {
    let (_dir, c, _ram) = controller(16);
    let st = |r: ApiResponse| match r {
        ApiResponse::Status(s) => (s.state, s.vcpus, s.mem_bytes),
        other => panic!("not a status: {other:?}"),
    };
    assert_eq!(
        st(c.handle(ApiRequest::Pause).expect("pause")),
        (api::VmState::Paused, 2, 16 * 4096)
    );
    assert_eq!(
        st(c.handle(ApiRequest::Resume).expect("resume")).0,
        api::VmState::Running
    );
    c.handle(req("p", &[(0, 8)], true))
        .expect("paused snapshot");
    assert_eq!(
        st(c.handle(ApiRequest::Status).expect("status")).0,
        api::VmState::Running,
        "resumed after the snapshot"
    );
    match c.handle(ApiRequest::Stats).expect("stats") {
        ApiResponse::Stats(s) => assert_eq!((s.snapshots, s.protected_pages), (1, 8)),
        other => panic!("not stats: {other:?}"),
    }
}
