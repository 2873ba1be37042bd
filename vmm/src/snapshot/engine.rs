//! The copy-before-write engine: joins the snapshot store in the pool, the write-protect
//! seam, the fault handler and dirty tracking, and serves the control API.
//!
//! Consistency of a page snapshot: each page's content is the content it had at the
//! moment that page became write-protected (the store marks the pages, the protect
//! callback write-protects them, then the store commits, all under the store lock, so a
//! write racing with the snapshot either lands before the protection, and is part of the
//! snapshot, or faults and is preserved into it). With the vCPUs paused around the
//! snapshot (API `pause`, snapshot, `resume`), all pages share one instant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use log::{error, info, warn};
use pmem_backend::{
    normalize_runs, pages_to_runs, PageLocation, PageRun, Pool, PoolError, SnapshotKind,
    SnapshotMeta,
};

use super::dirty::DirtyTracker;
use super::fault::{FaultHandler, FaultStats, HandlerOptions, PreserveSink};
use super::protect::{PageProtector, UffdProtector};
use crate::api::{self, ApiError, ApiRequest, ApiResponse};
use crate::persist::live::VmPersist;
use crate::vstate::dirty::DirtySource;

/// Pause and resume of the vCPUs, as the engine needs them.
pub trait VmControl: Send + Sync {
    /// Stop every vCPU and wait until each has acknowledged.
    fn pause(&self) -> Result<(), String>;
    /// Let every vCPU run again.
    fn resume(&self) -> Result<(), String>;
    /// Whether the vCPUs are paused.
    fn is_paused(&self) -> bool;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
}

/// Lock the pool, ignoring poisoning: a panic elsewhere does not make the on-disk store
/// less consistent (every change commits atomically), so later calls may go on.
pub fn lock_pool(pool: &Mutex<Pool>) -> MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fault handler's view of the store: preserve before the first write.
struct StoreSink {
    pool: Arc<Mutex<Pool>>,
    protector: Arc<dyn PageProtector>,
    preserved: AtomicU64,
    /// While a pre-protection is armed: what was pre-protected, and every page the
    /// handler has made writable since (those must be protected again at the snapshot).
    armed: Mutex<Option<PreProtect>>,
}

/// A pre-protection in progress (see [`Engine::preprotect`]).
#[derive(Debug, Default)]
struct PreProtect {
    runs: Vec<PageRun>,
    unprotected: Vec<u64>,
}

impl StoreSink {
    fn armed(&self) -> MutexGuard<'_, Option<PreProtect>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make `runs` writable, and remember them if a pre-protection is armed. Every
    /// unprotect of the engine goes through here, so an armed pre-protection always
    /// knows which of its pages lost their protection.
    fn unprotect(&self, runs: &[PageRun]) {
        unprotect_runs(self.protector.as_ref(), runs);
        if let Some(pre) = self.armed().as_mut() {
            pre.unprotected
                .extend(runs.iter().flat_map(|r| r.first..r.first + r.count));
        }
    }
}

impl PreserveSink for StoreSink {
    fn before_write(&self, page: u64) -> Result<(), String> {
        self.preserve_locked(&mut lock_pool(&self.pool), page)
    }

    /// Preserve and unprotect under one hold of the store lock: a snapshot cannot
    /// protect the page again in between (see the trait).
    fn before_write_then(&self, page: u64, unprotect: &mut dyn FnMut()) -> Result<(), String> {
        let mut pool = lock_pool(&self.pool);
        let res = self.preserve_locked(&mut pool, page);
        unprotect();
        if let Some(pre) = self.armed().as_mut() {
            pre.unprotected.push(page);
        }
        res
    }
}

impl StoreSink {
    fn preserve_locked(&self, pool: &mut Pool, page: u64) -> Result<(), String> {
        match pool.preserve(page) {
            Ok(true) => {
                self.preserved.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                // The page cannot be kept: drop every snapshot that still needs it, so no
                // snapshot silently reads the new content later. The guest goes on.
                let reason = e.to_string();
                let victims: Vec<String> = pool
                    .list()
                    .into_iter()
                    .filter(|s| {
                        matches!(
                            pool.snapshot_page_location(s.name.as_str(), page),
                            Ok(PageLocation::Ram(_))
                        )
                    })
                    .map(|s| s.name)
                    .collect();
                for name in &victims {
                    match pool.delete(name.as_str()) {
                        Ok(runs) => {
                            error!("snapshot {name:?} dropped: cannot preserve guest page {page}: {reason}");
                            self.unprotect(&runs);
                        }
                        Err(e) => {
                            error!("cannot drop snapshot {name:?} after a failed preserve: {e}")
                        }
                    }
                }
                Err(reason)
            }
        }
    }
}

fn unprotect_runs(protector: &dyn PageProtector, runs: &[PageRun]) {
    for r in runs {
        if let Err(e) = protector.unprotect(r.first, r.count) {
            warn!("unprotect of pages {}+{} failed: {e}", r.first, r.count);
        }
    }
}

/// Static facts about the VM the engine reports.
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

/// The engine. Shared between the API, the guest agent service and the VMM.
pub struct Engine {
    pool: Arc<Mutex<Pool>>,
    protector: Arc<dyn PageProtector>,
    sink: Arc<StoreSink>,
    faults: Arc<FaultStats>,
    dirty: Mutex<DirtyTracker>,
    vm: OnceLock<Arc<dyn VmControl>>,
    agent_uds: OnceLock<std::path::PathBuf>,
    /// Host-requested process snapshots in flight: token -> snapshot name. The agent
    /// passes the token back with its save, which makes the snapshot host-owned.
    host_grants: Mutex<BTreeMap<u64, String>>,
    persist: OnceLock<Arc<dyn VmPersist>>,
    /// Held by every API request that changes the VM or the store (pause, resume,
    /// snapshots, delete, rollback, and dirty, which harvests the dirty log), one at a
    /// time; never while waiting for the guest.
    control: Mutex<()>,
    /// Process snapshots waiting for the guest agent now (at most
    /// [`MAX_PROCESS_SNAPSHOTS_IN_FLIGHT`]).
    agent_waits: AtomicU64,
    info: VmInfo,
    started: Instant,
    // Last, so the handler thread stops before the rest goes away.
    _handler: Option<FaultHandler>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish()
    }
}

/// Errors of engine start-up.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Re-protecting pages named by snapshots already in the pool failed.
    #[error("cannot re-protect the pages of existing snapshots: {0}")]
    Reprotect(#[source] super::protect::ProtectError),
    /// The fault handler thread could not start.
    #[error("cannot start the fault handler thread: {0}")]
    Handler(#[source] std::io::Error),
}

impl Engine {
    /// Start the engine on an open pool whose RAM area is mapped at the protector's
    /// range: re-protect every page an existing snapshot references, start the fault
    /// handler, and start dirty tracking.
    pub fn start(
        pool: Arc<Mutex<Pool>>,
        protector: Arc<UffdProtector>,
        dirty_sources: Vec<Box<dyn DirtySource>>,
        info: VmInfo,
        opts: HandlerOptions,
    ) -> Result<Self, EngineError> {
        let (runs, names, pages) = {
            let p = lock_pool(&pool);
            let names: Vec<String> = p.list().into_iter().map(|s| s.name).collect();
            (p.protected_runs(), names, p.ram_pages())
        };
        let t = Instant::now();
        for r in &runs {
            protector
                .protect(r.first, r.count)
                .map_err(EngineError::Reprotect)?;
        }
        if !names.is_empty() {
            info!(
                "re-protected {} pages of {} existing snapshots in {:?}",
                runs.iter().map(|r| r.count).sum::<u64>(),
                names.len(),
                t.elapsed()
            );
        }
        let protector_dyn: Arc<dyn PageProtector> = protector.clone();
        let sink = Arc::new(StoreSink {
            pool: pool.clone(),
            protector: protector_dyn.clone(),
            preserved: AtomicU64::new(0),
            armed: Mutex::new(None),
        });
        let handler =
            FaultHandler::spawn(protector, sink.clone(), opts).map_err(EngineError::Handler)?;
        let mut dirty = DirtyTracker::new(pages, dirty_sources);
        for n in &names {
            dirty.start_unknown(n);
        }
        Ok(Self {
            pool,
            protector: protector_dyn,
            sink,
            faults: handler.stats(),
            dirty: Mutex::new(dirty),
            vm: OnceLock::new(),
            agent_uds: OnceLock::new(),
            host_grants: Mutex::new(BTreeMap::new()),
            persist: OnceLock::new(),
            control: Mutex::new(()),
            agent_waits: AtomicU64::new(0),
            info,
            started: Instant::now(),
            _handler: Some(handler),
        })
    }

    /// Connect the vCPUs once they run (pause and resume before that are refused).
    pub fn set_vm_control(&self, vm: Arc<dyn VmControl>) {
        if self.vm.set(vm).is_err() {
            warn!("the vCPU control was already set");
        }
    }

    /// Allow one save named `name` through the agent to be host-owned; returns the
    /// single-use token to send the agent. Unguessable (random), so a guest cannot
    /// make a snapshot host-owned on its own (it would then escape guest quotas and
    /// guest deletion).
    pub fn grant_host_save(&self, name: &str) -> u64 {
        let mut grants = self.host_grants.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut b = [0u8; 8];
            // SAFETY: b is valid for 8 bytes of writes.
            let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
            let token = if n == 8 {
                u64::from_le_bytes(b)
            } else {
                // getrandom cannot fail for 8 bytes once the pool is seeded; fall back
                // to the clock mixed with the address space layout rather than abort.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                t ^ (&b as *const _ as u64).rotate_left(32)
            };
            if token != 0 && !grants.contains_key(&token) {
                grants.insert(token, name.to_string());
                return token;
            }
        }
    }

    /// Use the grant `token` for a save named `name`: true (and the grant is gone)
    /// when it was granted for that name.
    pub fn take_host_grant(&self, token: u64, name: &str) -> bool {
        let mut grants = self.host_grants.lock().unwrap_or_else(|e| e.into_inner());
        match grants.get(&token) {
            Some(n) if n == name => {
                grants.remove(&token);
                true
            }
            _ => false,
        }
    }

    /// Forget a grant (its request is over, used or not).
    pub fn revoke_host_grant(&self, token: u64) {
        self.host_grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
    }

    /// The host socket of the guest's vsock device, to reach the guest agent.
    pub fn set_agent_socket(&self, path: std::path::PathBuf) {
        if self.agent_uds.set(path).is_err() {
            warn!("the agent socket was already set");
        }
    }

    /// Connect whole-VM state capture (VM snapshots and rollback need it).
    pub fn set_vm_persist(&self, p: Arc<dyn VmPersist>) {
        if self.persist.set(p).is_err() {
            warn!("the VM state port was already set");
        }
    }

    /// Whole-VM state capture, once connected.
    pub fn vm_persist(&self) -> Result<&Arc<dyn VmPersist>, ApiError> {
        self.persist
            .get()
            .ok_or_else(|| ApiError::InvalidState("VM state capture is not available".into()))
    }

    /// Pause and resume of the vCPUs, once they run.
    pub fn vm_control(&self) -> Result<&Arc<dyn VmControl>, ApiError> {
        self.vm()
    }

    /// Reset the dirty tracking of `name` to "nothing written" (after a rollback to it).
    pub fn reset_dirty(&self, name: &str) -> Result<(), ApiError> {
        self.dirty()
            .reset(name)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    fn vm(&self) -> Result<&Arc<dyn VmControl>, ApiError> {
        self.vm
            .get()
            .ok_or_else(|| ApiError::InvalidState("the vCPUs are not running yet".into()))
    }

    /// The pool, for callers that read snapshots (restore, export).
    pub fn pool(&self) -> &Arc<Mutex<Pool>> {
        &self.pool
    }

    fn dirty(&self) -> MutexGuard<'_, DirtyTracker> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a snapshot of `runs` (guest RAM page numbers). Writes no page data.
    pub fn snapshot(
        &self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
    ) -> Result<pmem_backend::SnapshotInfo, PoolError> {
        let mut pool = lock_pool(&self.pool);
        // A duplicate name must not touch the existing snapshot's dirty tracking (start
        // would reset it, and the failure path would forget it). Checked under the pool
        // lock, which is held until the snapshot is in, so no other creation can race.
        if pool.inspect(name).is_ok() {
            return Err(PoolError::DuplicateName(name.to_string()));
        }
        // Track writes from before the pages are protected: a write in between is counted
        // as dirty (harmless for rollback) rather than missed. Lock order: pool, then dirty.
        if let Err(e) = self.dirty().start(name) {
            warn!("dirty tracking for {name:?} could not start: {e}");
        }
        let protector = self.protector.clone();
        // Taken under the pool lock: the handler records under it too, so the list of
        // pages it made writable is complete here.
        let pre = self.sink.armed().take();
        let res = pool.snapshot_with(name, kind, runs, meta, |newly| {
            for r in to_protect(newly, pre.as_ref()) {
                protector.protect(r.first, r.count)?;
            }
            Ok(())
        });
        match res {
            Ok(id) => pool.inspect(id),
            Err(e) => {
                // As in delete: unprotect while no other snapshot can protect these pages.
                if let PoolError::SnapshotAborted { unprotect, .. } = &e {
                    self.sink.unprotect(unprotect);
                }
                drop(pool);
                self.dirty().forget(name);
                Err(e)
            }
        }
    }

    /// Write-protect `runs` ahead of a snapshot of them, while the vCPUs still run, so
    /// that the snapshot itself (typically with the vCPUs paused) only has to protect
    /// again the pages written in between. The kernel's write-protect walk over every
    /// page table entry is most of a snapshot's cost; this moves it out of the pause.
    /// Pages written meanwhile fault once and become writable again (nothing to
    /// preserve yet); the handler records them. Pre-protected pages that no snapshot
    /// takes fault once later and are released then.
    pub fn preprotect(&self, runs: &[PageRun]) -> Result<(), PoolError> {
        let runs = normalize_runs(runs);
        *self.sink.armed() = Some(PreProtect {
            runs: runs.clone(),
            unprotected: Vec::new(),
        });
        for r in &runs {
            if let Err(e) = self.protector.protect(r.first, r.count) {
                *self.sink.armed() = None;
                return Err(PoolError::InvalidArgument(e.to_string()));
            }
        }
        Ok(())
    }

    /// Pause the vCPUs, snapshot `runs`, resume; the runs are pre-protected before the
    /// pause. Returns the snapshot and how long the vCPUs were paused.
    pub fn snapshot_paused(
        &self,
        name: &str,
        kind: SnapshotKind,
        runs: &[PageRun],
        meta: SnapshotMeta,
    ) -> Result<(pmem_backend::SnapshotInfo, std::time::Duration), ApiError> {
        let vm = self.vm()?.clone();
        if lock_pool(&self.pool).inspect(name).is_ok() {
            return Err(ApiError::DuplicateName(name.to_string()));
        }
        self.preprotect(runs).map_err(api_error)?;
        let t = Instant::now();
        vm.pause().map_err(ApiError::Internal)?;
        let res = self.snapshot(name, kind, runs, meta);
        let resumed = vm.resume();
        let paused = t.elapsed();
        let info = res.map_err(api_error)?;
        resumed.map_err(ApiError::Internal)?;
        Ok((info, paused))
    }

    /// Delete a snapshot; pages no other snapshot references become writable again.
    pub fn delete(&self, name: &str) -> Result<u64, PoolError> {
        // Unprotect before the lock is released: a snapshot taken right after the delete
        // may protect some of these pages again, and must keep that protection.
        let runs = {
            let mut pool = lock_pool(&self.pool);
            let runs = pool.delete(name)?;
            self.sink.unprotect(&runs);
            runs
        };
        self.dirty().forget(name);
        Ok(runs.iter().map(|r| r.count).sum())
    }

    /// Pages written since snapshot `name` was taken (by vCPUs or by the VMM).
    pub fn dirty_since(&self, name: &str) -> Result<Vec<PageRun>, ApiError> {
        lock_pool(&self.pool)
            .inspect(name)
            .map_err(|_| ApiError::UnknownSnapshot(name.to_string()))?;
        self.dirty()
            .dirty_since(name)
            .map(|runs| runs.into_iter().map(|(f, c)| PageRun::new(f, c)).collect())
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// The VMM wrote `pages` through the store's own mapping (restore): record them as
    /// dirty for every tracked snapshot, and drop stale write protection on pages that
    /// no snapshot references any more (the store preserved them before the write).
    pub fn after_vmm_write(&self, pages: &[u64]) {
        let mut sorted = pages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let runs: Vec<(u64, u64)> = pages_to_runs(sorted)
            .into_iter()
            .map(|r| (r.first, r.count))
            .collect();
        self.dirty().mark(&runs);
        // One unprotect per run of such pages, not per page. Every written page gets
        // it, protected or not: the ioctl also makes KVM drop its mappings of the range
        // (an mmu-notifier invalidation), and a shadow-paging KVM (this host's kvm_pvm)
        // needs that after the VMM rewrote guest page tables behind its back: skipping
        // it for pages known to be unprotected crashed the guest after a rollback.
        let pool = lock_pool(&self.pool);
        let mut stale: Vec<PageRun> = Vec::new();
        for &(first, count) in &runs {
            for p in first..first + count {
                if !pool.is_protected(p) {
                    match stale.last_mut() {
                        Some(r) if r.first + r.count == p => r.count += 1,
                        _ => stale.push(PageRun::new(p, 1)),
                    }
                }
            }
        }
        self.sink.unprotect(&stale);
    }

    /// Pages preserved by the fault handler since start.
    pub fn preserved_pages(&self) -> u64 {
        self.sink.preserved.load(Ordering::Relaxed)
    }

    /// Serve one control-API request. The API calls this from several threads at once:
    /// reads answer at once, changes take the control lock one at a time, and a process
    /// snapshot waits for the guest agent without it, so a guest that is slow to answer
    /// (or never answers) cannot hold up status, pause, a VM snapshot or a rollback.
    pub fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        let _control = match &req {
            ApiRequest::Status
            | ApiRequest::Stats
            | ApiRequest::ListSnapshots
            | ApiRequest::InspectSnapshot { .. }
            | ApiRequest::SnapshotProcess(_) => None,
            _ => Some(self.control.lock().unwrap_or_else(|e| e.into_inner())),
        };
        match req {
            ApiRequest::Status => Ok(ApiResponse::Status(self.status())),
            ApiRequest::Pause => {
                self.vm()?.pause().map_err(ApiError::Internal)?;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::Resume => {
                self.vm()?.resume().map_err(ApiError::Internal)?;
                Ok(ApiResponse::Status(self.status()))
            }
            ApiRequest::CreatePagesSnapshot(r) => {
                let runs: Vec<PageRun> = r
                    .runs
                    .iter()
                    .map(|r| PageRun::new(r.first_page, r.count))
                    .collect();
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
                    self.snapshot(&r.name, SnapshotKind::Pages, &runs, meta)
                        .map_err(api_error)?
                };
                Ok(ApiResponse::SnapshotCreated(to_api_info(info, false)))
            }
            ApiRequest::ListSnapshots => Ok(ApiResponse::Snapshots(
                lock_pool(&self.pool)
                    .list()
                    .into_iter()
                    .map(|s| to_api_info(s, false))
                    .collect(),
            )),
            ApiRequest::InspectSnapshot { name } => lock_pool(&self.pool)
                .inspect(name.as_str())
                .map(|s| ApiResponse::Snapshot(to_api_info(s, true)))
                .map_err(api_error),
            ApiRequest::DeleteSnapshot { name } => {
                self.delete(&name).map_err(api_error)?;
                Ok(ApiResponse::Deleted(name))
            }
            ApiRequest::DirtySince { name } => {
                let runs = self.dirty_since(&name)?;
                Ok(ApiResponse::Dirty(api::DirtyPages {
                    since: name,
                    pages: runs.iter().map(|r| r.count).sum(),
                    runs: runs
                        .into_iter()
                        .map(|r| api::PageRun {
                            first_page: r.first,
                            count: r.count,
                        })
                        .collect(),
                }))
            }
            ApiRequest::Stats => Ok(ApiResponse::Stats(self.stats())),
            ApiRequest::SnapshotProcess(r) => {
                let uds = self.agent_uds.get().ok_or_else(|| {
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
                let token = self.grant_host_save(&r.name);
                let done = super::agent_client::snapshot_process(
                    uds,
                    &r,
                    token,
                    super::agent_client::AGENT_DEADLINE,
                );
                self.revoke_host_grant(token);
                done?;
                lock_pool(&self.pool)
                    .inspect(r.name.as_str())
                    .map(|s| ApiResponse::SnapshotCreated(to_api_info(s, false)))
                    .map_err(api_error)
            }
            ApiRequest::CreateVmSnapshot { name } => crate::persist::ops::snapshot_vm(self, &name),
            ApiRequest::RollbackVm { name } => crate::persist::ops::rollback(self, &name),
        }
    }

    fn status(&self) -> api::VmStatus {
        api::VmStatus {
            state: if self.vm.get().is_some_and(|v| v.is_paused()) {
                api::VmState::Paused
            } else {
                api::VmState::Running
            },
            vcpus: self.vm.get().map_or(0, |v| v.vcpus()),
            mem_bytes: self.info.mem_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pool_path: self.info.pool_path.clone(),
            version: api::VERSION.to_string(),
        }
    }

    /// Engine and store statistics.
    pub fn stats(&self) -> api::ApiStats {
        let f = self.faults.snapshot();
        let store = lock_pool(&self.pool).stats();
        api::ApiStats {
            faults: f.faults,
            preserved_pages: self.preserved_pages(),
            protected_pages: store.pages_in_ram,
            snapshots: store.snapshots,
            fault_handler: api::HandlerTime {
                total_ns: f.total_ns,
                mean_ns: f.total_ns.checked_div(f.faults).unwrap_or(0),
                max_ns: f.max_ns,
            },
            store: serde_json::to_value(&store).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The runs a snapshot must write-protect: its newly referenced pages, less those a
/// pre-protection already covers and that were not made writable since.
fn to_protect(newly: &[PageRun], pre: Option<&PreProtect>) -> Vec<PageRun> {
    let Some(pre) = pre else {
        return newly.to_vec();
    };
    let mut pages: Vec<u64> = Vec::new();
    let mut out: Vec<PageRun> = Vec::new();
    for n in newly {
        // The parts of `n` outside every pre-protected run.
        let mut at = n.first;
        let end = n.first + n.count;
        for p in pre
            .runs
            .iter()
            .filter(|p| p.first < end && p.first + p.count > n.first)
        {
            if p.first > at {
                out.push(PageRun::new(at, p.first - at));
            }
            at = at.max(p.first + p.count);
        }
        if at < end {
            out.push(PageRun::new(at, end - at));
        }
        pages.extend(pre.unprotected.iter().filter(|&&p| p >= n.first && p < end));
    }
    pages.sort_unstable();
    pages.dedup();
    out.extend(pages.into_iter().map(|p| PageRun::new(p, 1)));
    normalize_runs(&out)
}

/// Map a store error to the API error a client should see.
pub fn api_error(e: PoolError) -> ApiError {
    match e {
        PoolError::DuplicateName(n) => ApiError::DuplicateName(n),
        PoolError::NoSuchSnapshot(n) => ApiError::UnknownSnapshot(n),
        e @ PoolError::PageOutOfRange { .. } => ApiError::RunsOutsideRam(e.to_string()),
        e @ PoolError::InvalidArgument(_) => ApiError::BadRequest(e.to_string()),
        e => ApiError::Internal(e.to_string()),
    }
}

fn to_api_info(s: pmem_backend::SnapshotInfo, with_runs: bool) -> api::SnapshotInfo {
    api::SnapshotInfo {
        name: s.name,
        kind: s.kind.as_str().to_string(),
        pages: s.pages,
        run_count: s.runs.len() as u64,
        runs: with_runs.then(|| {
            s.runs
                .iter()
                .map(|r| api::PageRun {
                    first_page: r.first,
                    count: r.count,
                })
                .collect()
        }),
        preserved_pages: s.pages_in_blocks,
        created_unix_ms: s.created_unix_ns / 1_000_000,
        labels: s.labels.into_iter().collect::<BTreeMap<_, _>>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PageRun as ApiRun, PagesSnapshotRequest};
    use crate::snapshot::testutil::setup;

    fn req(name: &str, runs: &[(u64, u64)]) -> ApiRequest {
        ApiRequest::CreatePagesSnapshot(PagesSnapshotRequest {
            name: name.into(),
            runs: runs
                .iter()
                .map(|&(first_page, count)| ApiRun { first_page, count })
                .collect(),
            labels: Default::default(),
            pause: false,
        })
    }

    fn page_of(engine: &Engine, snap: &str, p: u64) -> (PageLocation, u8) {
        let (loc, data) = lock_pool(engine.pool())
            .read_snapshot_page(snap, p)
            .expect("read snapshot page");
        assert!(data.iter().all(|&b| b == data[0]), "page {p} is uniform");
        (loc, data[0])
    }

    #[test]
    fn writes_after_a_snapshot_are_preserved_first_and_shared() {
        let (_dir, engine, ram) = setup(64);
        for p in 0..64 {
            ram.write(p, 1);
        }
        let created = engine.handle(req("a", &[(0, 16)])).expect("snapshot a");
        assert!(matches!(created, ApiResponse::SnapshotCreated(ref i) if i.pages == 16));
        ram.write(3, 2); // faults: preserved for a
        ram.write(40, 2); // not protected: no fault
        engine.handle(req("b", &[(0, 8)])).expect("snapshot b");
        ram.write(5, 3); // shared by a and b: one block for both
        ram.write(3, 4); // a has it in a block already, b references RAM
        assert_eq!(
            page_of(&engine, "a", 3),
            (PageLocation::Block(page_block(&engine, "a", 3)), 1)
        );
        assert_eq!(page_of(&engine, "b", 3).1, 2);
        assert_eq!(page_of(&engine, "a", 5).1, 1);
        assert_eq!(page_of(&engine, "b", 5).1, 1);
        assert_eq!(
            page_block(&engine, "a", 5),
            page_block(&engine, "b", 5),
            "a page shared by two snapshots is preserved once"
        );
        assert_eq!(page_of(&engine, "a", 6), (PageLocation::Ram(6), 1));
        // The handler counts a fault after it has unprotected the page, which lets the
        // writer go on: wait for the count instead of racing it.
        let stats = settled_stats(&engine, 3);
        assert_eq!((stats.faults, stats.preserved_pages), (3, 3));
        // Delete a: pages only a referenced become writable without a fault.
        engine
            .handle(ApiRequest::DeleteSnapshot { name: "a".into() })
            .expect("delete a");
        ram.write(12, 9);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(engine.stats().faults, 3, "page 12 is no longer protected");
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    /// Stats once the handler has counted `faults` faults (or after 5 s).
    fn settled_stats(engine: &Engine, faults: u64) -> api::ApiStats {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let stats = engine.stats();
            if stats.faults >= faults || Instant::now() >= deadline {
                return stats;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn page_block(engine: &Engine, snap: &str, p: u64) -> u64 {
        match lock_pool(engine.pool())
            .snapshot_page_location(snap, p)
            .expect("location")
        {
            PageLocation::Block(b) => b,
            other => panic!("page {p} of {snap} is {other:?}, not in a block"),
        }
    }

    #[test]
    fn to_protect_skips_pre_protected_pages_not_written_since() {
        let pre = PreProtect {
            runs: vec![PageRun::new(0, 10), PageRun::new(20, 5)],
            unprotected: vec![3, 3, 21, 40],
        };
        assert_eq!(
            to_protect(&[PageRun::new(0, 30)], Some(&pre)),
            vec![
                PageRun::new(3, 1),
                PageRun::new(10, 10),
                PageRun::new(21, 1),
                PageRun::new(25, 5)
            ]
        );
        assert_eq!(
            to_protect(&[PageRun::new(5, 2)], None),
            vec![PageRun::new(5, 2)]
        );
        assert_eq!(to_protect(&[PageRun::new(5, 2)], Some(&pre)), vec![]);
    }

    #[test]
    fn a_pre_protected_snapshot_still_preserves_every_page() {
        let (_dir, engine, ram) = setup(64);
        for p in 0..64 {
            ram.write(p, 1);
        }
        engine
            .preprotect(&[PageRun::new(0, 32)])
            .expect("preprotect");
        ram.write(3, 2); // faults once, becomes writable again: recorded
        ram.write(5, 2);
        engine.handle(req("doomed", &[(40, 2)])).expect("snapshot");
        engine.delete("doomed").expect("delete"); // unprotects 40, 41 (outside the runs)
        engine
            .snapshot(
                "s",
                SnapshotKind::Pages,
                &[PageRun::new(0, 32)],
                Default::default(),
            )
            .expect("snapshot");
        ram.write(3, 9); // protected again by the snapshot: preserved first
        ram.write(7, 9); // pre-protected, never written: still protected
        ram.write(31, 9);
        assert_eq!(page_of(&engine, "s", 3).1, 2);
        assert_eq!(page_of(&engine, "s", 5), (PageLocation::Ram(5), 2));
        assert_eq!(page_of(&engine, "s", 7).1, 1);
        assert_eq!(page_of(&engine, "s", 31).1, 1);
        assert!(matches!(page_of(&engine, "s", 7).0, PageLocation::Block(_)));
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }

    #[test]
    fn bad_requests_get_api_errors() {
        let (_dir, engine, _ram) = setup(16);
        engine.handle(req("a", &[(0, 4)])).expect("snapshot");
        let dup = engine.handle(req("a", &[(4, 1)])).expect_err("duplicate");
        assert_eq!(dup.status(), 409);
        let outside = engine
            .handle(req("b", &[(10, 7)]))
            .expect_err("outside RAM");
        assert_eq!(outside.status(), 422);
        let unknown = engine
            .handle(ApiRequest::DeleteSnapshot { name: "zz".into() })
            .expect_err("unknown");
        assert_eq!(unknown.status(), 404);
        let unknown = engine
            .handle(ApiRequest::DirtySince { name: "zz".into() })
            .expect_err("unknown");
        assert_eq!(unknown.status(), 404);
        assert!(
            !lock_pool(engine.pool()).is_protected(10),
            "a refused snapshot protects nothing"
        );
    }

    #[test]
    fn the_store_sink_unprotects_while_holding_the_store_lock() {
        let (_dir, engine, _ram) = setup(16);
        engine.handle(req("a", &[(0, 4)])).expect("snapshot");
        let mut locked_during_unprotect = None;
        engine
            .sink
            .before_write_then(2, &mut || {
                locked_during_unprotect = Some(engine.pool().try_lock().is_err());
            })
            .expect("preserve");
        assert_eq!(
            locked_during_unprotect,
            Some(true),
            "a snapshot must not be able to protect the page between preserve and unprotect"
        );
        assert!(
            !lock_pool(engine.pool()).is_protected(2),
            "page 2 was preserved"
        );
    }

    #[test]
    fn a_duplicate_name_keeps_the_existing_snapshots_dirty_tracking() {
        let (_dir, engine, _ram) = setup(16);
        engine.handle(req("a", &[(0, 4)])).expect("snapshot");
        engine.after_vmm_write(&[5]);
        let dup = engine.handle(req("a", &[(8, 1)])).expect_err("duplicate");
        assert_eq!(dup.status(), 409);
        let runs = engine.dirty_since("a").expect("a is still tracked");
        assert_eq!(
            runs,
            vec![PageRun::new(5, 1)],
            "page 5 is still dirty since a"
        );
    }

    #[test]
    fn pause_resume_and_status() {
        let (_dir, engine, _ram) = setup(16);
        let st = |r: ApiResponse| match r {
            ApiResponse::Status(s) => s.state,
            other => panic!("not a status: {other:?}"),
        };
        assert_eq!(
            st(engine.handle(ApiRequest::Pause).expect("pause")),
            api::VmState::Paused
        );
        assert_eq!(
            st(engine.handle(ApiRequest::Resume).expect("resume")),
            api::VmState::Running
        );
    }
}
