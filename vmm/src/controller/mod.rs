//! The controller: owns the snapshot engine, the vCPUs, the live VM state and the agent
//! client, and serves the control API (as Firecracker's `rpc_interface.rs`). The
//! builder ([`crate::builder`]) makes one, fully connected, once the vCPUs run; nothing
//! is attached to it later.
//!
//! Requests arrive from several API connection threads at once: reads (and exports,
//! which read the pool a page at a time) answer at once,
//! changes take the control lock one at a time, and a process snapshot waits for the
//! guest agent without it, so a guest that is slow to answer (or never answers) cannot
//! hold up status, pause, a VM snapshot or a rollback.

pub mod agent_client;
pub mod export;
pub mod grants;
pub mod live;
pub mod process;
pub mod repo_source;
mod vm_ops;
pub use vm_ops::Restored;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::info;
use pmem_backend::{PageRun, SnapshotKind, SnapshotMeta};

use crate::api::{self, ApiError, ApiHandler, ApiRequest, ApiResponse};
use crate::snapshot::engine::{lock_pool, Engine};
use crate::vstate::control::VcpuControl;
use crate::vstate::vcpu::VcpuError;
pub use grants::HostGrants;
pub use live::{LiveVm, VirtioSlot, VmPersist};

/// Pause and resume of the vCPUs, as the controller needs them.
pub trait VmControl: Send + Sync {
    /// Stop every vCPU and wait until each has acknowledged.
    fn pause(&self) -> Result<(), VcpuError>;
    /// Let every vCPU run again; returns when the last one went back to the guest.
    fn resume(&self) -> Result<Instant, VcpuError>;
    /// Whether the vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
}

impl VmControl for VcpuControl {
    fn pause(&self) -> Result<(), VcpuError> {
        VcpuControl::pause(self)
    }

    fn resume(&self) -> Result<Instant, VcpuError> {
        VcpuControl::resume(self)
    }

    fn is_paused(&self) -> bool {
        VcpuControl::is_paused(self)
    }

    fn vcpus(&self) -> u32 {
        self.count()
    }
}

/// Static facts about the VM the status reports.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Path of the pool file.
    pub pool_path: String,
}

/// Process snapshots that may wait for the guest agent at once; more are refused.
pub const MAX_PROCESS_SNAPSHOTS_IN_FLIGHT: u64 = 4;

/// Decrements a counter when dropped (on every return path, panics included).
struct DecOnDrop<'a>(&'a AtomicU64);

impl Drop for DecOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the controller is built from.
#[allow(missing_debug_implementations)]
pub struct ControllerParts {
    /// The copy-before-write engine (owns the pool).
    pub engine: Arc<Engine>,
    /// Single-use grants that make an agent save host-owned (shared with the agent
    /// service of the vsock device).
    pub grants: Arc<HostGrants>,
    /// Pause and resume of the running vCPUs.
    pub vm: Arc<dyn VmControl>,
    /// Whole-VM state capture and apply; None when KVM cannot list its MSRs (VM
    /// snapshots are then refused with a clear error and the VM still runs).
    pub live: Option<Arc<dyn VmPersist>>,
    /// Host socket of the vsock device, to reach the guest agent; None without one.
    pub agent_uds: Option<PathBuf>,
    /// Facts for the status.
    pub info: VmInfo,
}

/// The controller. Shared by the API server's threads as `Arc<Controller>`.
pub struct Controller {
    engine: Arc<Engine>,
    grants: Arc<HostGrants>,
    vm: Arc<dyn VmControl>,
    live: Option<Arc<dyn VmPersist>>,
    agent_uds: Option<PathBuf>,
    /// Held by every API request that changes the VM or the store (pause, resume,
    /// snapshots, delete, rollback, and dirty, which harvests the dirty log), one at a
    /// time; never while waiting for the guest.
    control: Mutex<()>,
    /// Process snapshots waiting for the guest agent now (at most
    /// [`MAX_PROCESS_SNAPSHOTS_IN_FLIGHT`]).
    agent_waits: AtomicU64,
    /// The export thread (None if it could not start: exports are then refused).
    export: Option<export::ExportWorker>,
    info: VmInfo,
    started: Instant,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("info", &self.info)
            .field("vm_snapshots", &self.live.is_some())
            .field("agent", &self.agent_uds)
            .finish()
    }
}

impl Controller {
    /// A controller over a running VM. Call it from a thread without a seccomp filter:
    /// it starts the export thread, which installs its own.
    pub fn new(parts: ControllerParts) -> Self {
        let export = match export::ExportWorker::spawn(parts.engine.pool().clone()) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!("cannot start the export thread ({e}): ctl export is unavailable");
                None
            }
        };
        Self {
            export,
            engine: parts.engine,
            grants: parts.grants,
            vm: parts.vm,
            live: parts.live,
            agent_uds: parts.agent_uds,
            control: Mutex::new(()),
            agent_waits: AtomicU64::new(0),
            info: parts.info,
            started: Instant::now(),
        }
    }

    /// The snapshot engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn live(&self) -> Result<&Arc<dyn VmPersist>, ApiError> {
        self.live
            .as_ref()
            .ok_or_else(|| ApiError::InvalidState("VM state capture is not available".into()))
    }

    /// Pause the vCPUs, snapshot `runs`, resume; the runs are pre-protected before the
    /// pause ([`Engine::preprotect`]). Returns the snapshot and how long the vCPUs were
    /// paused.
    pub fn snapshot_paused(
        &self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
    ) -> Result<(pmem_backend::SnapshotInfo, std::time::Duration), ApiError> {
        if lock_pool(self.engine.pool()).inspect(name).is_ok() {
            return Err(ApiError::DuplicateName(name.to_string()));
        }
        self.engine.preprotect(runs)?;
        // As a VM snapshot's pause does (see `Controller::paused`).
        let _quiet = lock_pool(self.engine.pool()).hold_background();
        let t = Instant::now();
        self.vm.pause()?;
        let res = self.engine.snapshot(name, kind, runs, meta);
        let resumed = self.vm.resume();
        let info = res?;
        let paused = resumed?.saturating_duration_since(t);
        Ok((info, paused))
    }

    /// Serve one control-API request (see the module docs for what runs in parallel).
    pub fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        let _control = match &req {
            ApiRequest::Status
            | ApiRequest::Stats
            | ApiRequest::ListSnapshots
            | ApiRequest::InspectSnapshot { .. }
            | ApiRequest::SnapshotProcess(_)
            // Reads one page at a time under the pool lock only: snapshots, rollback and
            // pause go on while a long export runs.
            | ApiRequest::ExportSnapshot { .. } => None,
            _ => Some(self.control.lock().unwrap_or_else(|e| e.into_inner())),
        };
        match req {
            ApiRequest::Status => Ok(ApiResponse::Status(self.status())),
            ApiRequest::Pause => {
                self.vm.pause()?;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::Resume => {
                self.vm.resume()?;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::CreatePagesSnapshot(r) => {
                let runs: Vec<PageRun> = r.runs.iter().map(PageRun::from).collect();
                let meta = SnapshotMeta {
                    labels: r.labels.into_iter().collect(),
                    ..Default::default()
                };
                let info = if r.pause {
                    let (info, paused) =
                        self.snapshot_paused(&r.name, SnapshotKind::Pages, &runs, meta)?;
                    info!("snapshot {:?}: vCPUs paused for {paused:?}", r.name);
                    info
                } else {
                    self.engine
                        .snapshot(&r.name, SnapshotKind::Pages, &runs, meta)?
                };
                Ok(ApiResponse::SnapshotCreated(api::SnapshotInfo::from_store(
                    info, false,
                )))
            }
            ApiRequest::ListSnapshots => Ok(ApiResponse::Snapshots(
                lock_pool(self.engine.pool())
                    .list()
                    .into_iter()
                    .map(|s| api::SnapshotInfo::from_store(s, false))
                    .collect(),
            )),
            ApiRequest::InspectSnapshot { name } => {
                let s = lock_pool(self.engine.pool()).inspect(name.as_str())?;
                Ok(ApiResponse::Snapshot(api::SnapshotInfo::from_store(
                    s, true,
                )))
            }
            ApiRequest::DeleteSnapshot { name } => {
                self.engine.delete(&name)?;
                Ok(ApiResponse::Deleted(name))
            }
            ApiRequest::DirtySince { name } => {
                let runs = self.engine.dirty_since(&name)?;
                Ok(ApiResponse::Dirty(api::DirtyPages {
                    since: name,
                    pages: runs.iter().map(|r| r.count).sum(),
                    runs: runs.iter().map(api::PageRun::from).collect(),
                }))
            }
            ApiRequest::Stats => Ok(ApiResponse::Stats(self.stats())),
            ApiRequest::SnapshotProcess(r) => self.snapshot_process(r),
            ApiRequest::CreateVmSnapshot { name } => self.snapshot_vm(&name),
            ApiRequest::RollbackVm { name } => self.rollback(&name),
            ApiRequest::GrowPool { add_bytes } => self.grow_pool(add_bytes),
            ApiRequest::ExportSnapshot { name, to } => self.export(&name, &to),
        }
    }

    /// `POST /v1/snapshots/{name}/export`: write the snapshot into the repository `to`
    /// (a directory or `s3://BUCKET/PREFIX`) while the guest runs (on the export thread;
    /// this request waits).
    fn export(&self, name: &str, to: &str) -> Result<ApiResponse, ApiError> {
        let worker = self
            .export
            .as_ref()
            .ok_or_else(|| ApiError::InvalidState("the export thread is not running".into()))?;
        // Unknown names get the usual 404 before any work.
        lock_pool(self.engine.pool()).inspect(name)?;
        let t = Instant::now();
        let report = worker.export(name, to).map_err(ApiError::InvalidState)?;
        info!(
            "exported snapshot {name:?} to {to} in {:?}: {} pages, {} new bytes",
            t.elapsed(),
            report.pages,
            report.bytes_new
        );
        Ok(ApiResponse::Json {
            status: 200,
            body: serde_json::to_value(report).map_err(|e| ApiError::Internal(e.to_string()))?,
        })
    }

    /// `POST /v1/pool/grow`: grow the block area by `add_bytes` (rounded up to blocks),
    /// then wake a write waiting for a free block.
    fn grow_pool(&self, add_bytes: u64) -> Result<ApiResponse, ApiError> {
        let report = {
            let mut pool = lock_pool(self.engine.pool());
            let add = add_bytes.div_ceil(4096);
            let want = pool.geometry().block_count.saturating_add(add);
            pool.grow_blocks(want)?
        };
        self.engine.space_freed();
        log::info!(
            "block area grown from {} to {} blocks (pool file {} -> {} bytes)",
            report.old_block_count,
            report.new_block_count,
            report.old_file_size,
            report.new_file_size
        );
        Ok(ApiResponse::Json {
            status: 200,
            body: serde_json::to_value(report).map_err(|e| ApiError::Internal(e.to_string()))?,
        })
    }

    /// `POST /v1/process-snapshots`: ask the guest agent to save a process, with a
    /// single-use grant that makes the snapshot host-owned.
    fn snapshot_process(&self, r: api::ProcessSnapshotRequest) -> Result<ApiResponse, ApiError> {
        let uds = self.agent_uds.as_ref().ok_or_else(|| {
            ApiError::InvalidState(
                "this VMM has no vsock device (start it with --vsock-sock)".into(),
            )
        })?;
        let waits = self.agent_waits.fetch_add(1, Ordering::AcqRel);
        let _done = DecOnDrop(&self.agent_waits);
        if waits >= MAX_PROCESS_SNAPSHOTS_IN_FLIGHT {
            return Err(ApiError::InvalidState(format!(
                "{waits} process snapshots are already waiting for the guest agent; \
                 try again when one has finished"
            )));
        }
        let token = self.grants.grant(&r.name);
        let done = agent_client::snapshot_process(uds, &r, token, agent_client::AGENT_DEADLINE);
        self.grants.revoke(token);
        done?;
        let s = lock_pool(self.engine.pool()).inspect(r.name.as_str())?;
        Ok(ApiResponse::SnapshotCreated(api::SnapshotInfo::from_store(
            s, false,
        )))
    }

    fn status(&self) -> api::VmStatus {
        api::VmStatus {
            state: if self.engine.waiting_for_blocks().is_some() {
                api::VmState::BlockAreaFull
            } else if self.vm.is_paused() {
                api::VmState::Paused
            } else {
                api::VmState::Running
            },
            vcpus: self.vm.vcpus(),
            mem_bytes: self.info.mem_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pool_path: self.info.pool_path.clone(),
            version: api::VERSION.to_string(),
            lazy_fill: self.engine.lazy().map(|l| l.stats()),
        }
    }

    /// Engine and store statistics, as the API reports them.
    pub fn stats(&self) -> api::ApiStats {
        let s = self.engine.stats();
        api::ApiStats {
            faults: s.faults,
            preserved_pages: s.preserved_pages,
            protected_pages: s.store.pages_in_ram,
            snapshots: s.store.snapshots,
            fault_handler: api::HandlerTime {
                total_ns: s.fault_total_ns,
                mean_ns: s.fault_total_ns.checked_div(s.faults).unwrap_or(0),
                max_ns: s.fault_max_ns,
            },
            store: serde_json::to_value(&s.store).unwrap_or(serde_json::Value::Null),
            guest_snapshots_dropped: s.guest_snapshots_dropped,
            block_wait: self
                .engine
                .waiting_for_blocks()
                .map(|w| api::BlockWaitInfo {
                    page: w.page,
                    since_unix_ms: w.since_unix_ms,
                }),
            events: self
                .engine
                .events()
                .into_iter()
                .map(|e| api::ApiEvent {
                    unix_ms: e.unix_ms,
                    kind: e.kind.to_string(),
                    snapshot: e.snapshot,
                    detail: e.detail,
                })
                .collect(),
        }
    }
}

impl ApiHandler for Arc<Controller> {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        Controller::handle(self, request)
    }
}

#[cfg(test)]
mod tests;
