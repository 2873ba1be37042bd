//! The whole-VM operations of the control API: snapshot (pause, capture, reference every
//! page, resume) and in-place rollback (pause, copy back only pages written since,
//! restore state, resume).

use std::time::Instant;

use pmem_backend::{PageRun, PoolError, SnapshotKind, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::VmState;
use crate::api::{ApiError, ApiResponse};
use crate::snapshot::engine::{api_error, lock_pool, Engine};

/// Body of `POST /v1/vm-snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotCreated {
    /// Snapshot name.
    pub name: String,
    /// Guest pages referenced (all of RAM).
    pub pages: u64,
    /// Size of the state blob in bytes.
    pub state_bytes: u64,
    /// Time the vCPUs were paused, in microseconds (pause request to resume done).
    pub pause_us: u64,
    /// Of that, waiting for every vCPU to stop (a vCPU in emulated guest kernel code
    /// can take milliseconds to leave it).
    pub stop_us: u64,
    /// Of that, capturing vCPU, VM and device state.
    pub capture_us: u64,
    /// Of that, recording the snapshot in the store and write-protecting RAM.
    pub store_us: u64,
}

/// Body of `POST /v1/vm-snapshots/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// Snapshot rolled back to.
    pub name: String,
    /// Pages written since the snapshot (from dirty tracking).
    pub dirty_pages: u64,
    /// Pages whose snapshot content was copied back from a block.
    pub pages_copied: u64,
    /// Time the vCPUs were paused, in microseconds.
    pub pause_us: u64,
    /// Of that, waiting for every vCPU to stop.
    pub stop_us: u64,
    /// Of that, reading the dirty log and copying pages back.
    pub copy_us: u64,
    /// Of that, restoring vCPU, VM and device state.
    pub restore_us: u64,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Run `f` with the vCPUs paused; resume afterwards unless they were paused before.
/// Returns `f`'s result, the time from the pause request to the end of the resume, and
/// of that the time until every vCPU had stopped.
fn paused<T>(
    engine: &Engine,
    f: impl FnOnce() -> Result<T, ApiError>,
) -> Result<(T, u64, u64), ApiError> {
    let vm = engine.vm_control()?;
    let was_paused = vm.is_paused();
    let t = Instant::now();
    if !was_paused {
        vm.pause().map_err(ApiError::Internal)?;
    }
    let stop_us = t.elapsed().as_micros() as u64;
    let res = f();
    if !was_paused {
        if let Err(e) = vm.resume() {
            return Err(ApiError::Internal(format!("cannot resume the vCPUs: {e}")));
        }
    }
    let us = t.elapsed().as_micros() as u64;
    res.map(|v| (v, us, stop_us))
}

/// `POST /v1/vm-snapshots {"name"}`.
pub fn snapshot_vm(engine: &Engine, name: &str) -> Result<ApiResponse, ApiError> {
    let port = engine.vm_persist()?;
    let pages = lock_pool(engine.pool()).ram_pages();
    if lock_pool(engine.pool()).inspect(name).is_ok() {
        return Err(ApiError::DuplicateName(name.to_string()));
    }
    let ((capture_us, store_us, state_bytes), pause_us, stop_us) = paused(engine, || {
        let t = Instant::now();
        let state = port.capture().map_err(internal)?;
        let blob = state.encode().map_err(internal)?;
        let capture_us = t.elapsed().as_micros() as u64;
        let t = Instant::now();
        let state_bytes = blob.len() as u64;
        let meta = SnapshotMeta {
            state: blob,
            ..Default::default()
        };
        engine
            .snapshot(name, SnapshotKind::Vm, &[PageRun::new(0, pages)], meta)
            .map_err(api_error)?;
        Ok((capture_us, t.elapsed().as_micros() as u64, state_bytes))
    })?;
    log::info!(
        "VM snapshot {name:?}: {pages} pages, {state_bytes} bytes of state, paused {pause_us} us"
    );
    Ok(ApiResponse::Json {
        status: 201,
        body: serde_json::to_value(VmSnapshotCreated {
            name: name.to_string(),
            pages,
            state_bytes,
            pause_us,
            stop_us,
            capture_us,
            store_us,
        })
        .map_err(internal)?,
    })
}

/// Read and validate the state of VM snapshot `name` from the pool: it must exist, be a
/// VM snapshot, pass its checksums and fit a VM of `vcpus` vCPUs (None: as saved) and
/// `mem_bytes` RAM.
pub fn load_vm_state(
    pool: &pmem_backend::Pool,
    name: &str,
    vcpus: Option<usize>,
    mem_bytes: u64,
) -> Result<VmState, LoadError> {
    let info = pool.inspect(name)?;
    if info.kind != SnapshotKind::Vm {
        return Err(LoadError::NotVm {
            name: name.to_string(),
            kind: info.kind.as_str(),
        });
    }
    let blob = pool.read_state(name)?;
    let state = VmState::decode(&blob)?;
    state.validate(vcpus.unwrap_or(state.vcpus.len()), mem_bytes)?;
    Ok(state)
}

/// Why a VM snapshot's state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store refused (unknown snapshot, checksum failure...).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Not a VM snapshot.
    #[error("snapshot {name:?} is a {kind} snapshot; a VM snapshot is needed")]
    NotVm {
        /// The snapshot.
        name: String,
        /// Its kind.
        kind: &'static str,
    },
    /// The state blob is bad or does not fit.
    #[error(transparent)]
    State(#[from] super::PersistError),
}

fn load_error(name: &str, e: LoadError) -> ApiError {
    match e {
        LoadError::Pool(PoolError::NoSuchSnapshot(_)) => ApiError::UnknownSnapshot(name.into()),
        LoadError::Pool(e) => api_error(e),
        e @ LoadError::NotVm { .. } => ApiError::InvalidState(e.to_string()),
        LoadError::State(e) => ApiError::InvalidState(e.to_string()),
    }
}

/// `POST /v1/vm-snapshots/{name}/rollback`.
pub fn rollback(engine: &Engine, name: &str) -> Result<ApiResponse, ApiError> {
    let port = engine.vm_persist()?;
    let state = load_vm_state(
        &lock_pool(engine.pool()),
        name,
        Some(port.vcpu_count()),
        port.mem_bytes(),
    )
    .map_err(|e| load_error(name, e))?;
    let ((dirty_pages, pages_copied, copy_us, restore_us), pause_us, stop_us) =
        paused(engine, || {
            let t = Instant::now();
            let dirty = engine.dirty_since(name)?;
            let dirty_pages = dirty.iter().map(|r| r.count).sum();
            let written = lock_pool(engine.pool())
                .copy_back(name, &dirty)
                .map_err(api_error)?;
            engine.after_vmm_write(&written);
            let copy_us = t.elapsed().as_micros() as u64;
            let t = Instant::now();
            port.apply(&state).map_err(internal)?;
            engine.reset_dirty(name)?;
            Ok((
                dirty_pages,
                written.len() as u64,
                copy_us,
                t.elapsed().as_micros() as u64,
            ))
        })?;
    log::info!(
        "rolled back to {name:?}: {pages_copied} of {dirty_pages} dirty pages copied, paused {pause_us} us"
    );
    Ok(ApiResponse::Json {
        status: 200,
        body: serde_json::to_value(RolledBack {
            name: name.to_string(),
            dirty_pages,
            pages_copied,
            pause_us,
            stop_us,
            copy_us,
            restore_us,
        })
        .map_err(internal)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmem_backend::{Pool, PoolOptions};

    fn page(b: u8) -> [u8; 4096] {
        [b; 4096]
    }

    fn meta(state: Vec<u8>) -> SnapshotMeta {
        SnapshotMeta {
            state,
            ..Default::default()
        }
    }

    #[test]
    fn copy_back_restores_preserved_pages_keeping_later_snapshots() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut pool = Pool::create(dir.path().join("p.pool"), 16 * 4096, PoolOptions::default())
            .expect("pool");
        for p in 0..16 {
            pool.write_ram_page(p, &page(p as u8)).expect("write");
        }
        let all = [PageRun::new(0, 16)];
        pool.snapshot("a", SnapshotKind::Vm, &all, meta(super::super::seal(&[1])))
            .expect("a");
        pool.write_ram_page(3, &page(0xee)).expect("write 3");
        pool.write_ram_page(9, &page(0xdd)).expect("write 9");
        pool.snapshot("b", SnapshotKind::Vm, &all, meta(super::super::seal(&[2])))
            .expect("b");
        let written = pool.copy_back("a", &all).expect("copy back");
        assert_eq!(written, vec![3, 9], "only the preserved pages are copied");
        for p in 0..16 {
            assert_eq!(
                pool.read_ram_page(p).expect("read"),
                page(p as u8),
                "page {p}"
            );
        }
        // b still sees what RAM held when it was taken: preserved before the copy.
        assert_eq!(pool.read_snapshot_page("b", 3).expect("b 3").1, page(0xee));
        assert_eq!(pool.read_snapshot_page("b", 9).expect("b 9").1, page(0xdd));
    }

    #[test]
    fn load_vm_state_refuses_wrong_kind_unknown_and_bad_blobs() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut pool = Pool::create(dir.path().join("p.pool"), 8 * 4096, PoolOptions::default())
            .expect("pool");
        pool.snapshot(
            "pg",
            SnapshotKind::Pages,
            &[PageRun::new(0, 2)],
            meta(Vec::new()),
        )
        .expect("pages");
        pool.snapshot(
            "bad",
            SnapshotKind::Vm,
            &[PageRun::new(0, 8)],
            meta(b"junk".to_vec()),
        )
        .expect("vm with a bad blob");
        assert!(matches!(
            load_vm_state(&pool, "pg", None, 8 * 4096),
            Err(LoadError::NotVm { kind: "pages", .. })
        ));
        assert!(matches!(
            load_vm_state(&pool, "zz", None, 8 * 4096),
            Err(LoadError::Pool(PoolError::NoSuchSnapshot(_)))
        ));
        let e = load_vm_state(&pool, "bad", None, 8 * 4096).expect_err("bad blob");
        assert!(matches!(e, LoadError::State(_)), "{e}");
    }
}
