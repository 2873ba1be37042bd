//! The whole-VM operations of the control API: snapshot (pause, capture, reference every
//! page, resume) and in-place rollback (pause, copy back only pages written since,
//! restore state, resume).

use std::time::{Duration, Instant};

use pmem_backend::{PageRun, SnapshotKind, SnapshotMeta};

use super::{Controller, VmPersist};
use crate::api::{ApiError, ApiResponse, RolledBack, VmSnapshotCreated};
use crate::persist::load::load_vm_state;
use crate::persist::VmState;
use crate::snapshot::engine::lock_pool;

/// How long the guest was paused and, of that, how long its vCPUs took to stop.
struct Pause {
    us: u64,
    stop_us: u64,
}

impl Controller {
    /// Run `f` with the vCPUs paused; resume afterwards unless they were paused before.
    /// `stop` pauses them when told they run (or does what the paused VM needs instead)
    /// and returns what `f` gets and when the last vCPU stopped. Returns `f`'s result
    /// and the guest's pause: from the pause request until the last vCPU went back to
    /// the guest (`f`'s time alone when the vCPUs stay paused). The pool's background
    /// pre-fault is held off the CPUs meanwhile ([`pmem_backend::Pool::hold_background`]).
    fn paused<S, T>(
        &self,
        stop: impl FnOnce(bool) -> Result<(S, Instant), ApiError>,
        f: impl FnOnce(S) -> Result<T, ApiError>,
    ) -> Result<(T, Pause), ApiError> {
        let _quiet = lock_pool(self.engine.pool()).hold_background();
        let vm = self.vm.as_ref();
        let was_paused = vm.is_paused();
        let t = Instant::now();
        // A failed pause leaves nothing to resume; a failure after it (the VM reports
        // paused) still resumes below.
        let res = stop(!was_paused).and_then(|(s, stopped)| {
            let stop_us = stopped.saturating_duration_since(t).as_micros() as u64;
            f(s).map(|v| (v, stop_us))
        });
        let end = if was_paused || !vm.is_paused() {
            Instant::now()
        } else {
            vm.resume()
                .map_err(|e| ApiError::Internal(format!("cannot resume the vCPUs: {e}")))?
        };
        let us = end.saturating_duration_since(t).as_micros() as u64;
        res.map(|(v, stop_us)| (v, Pause { us, stop_us }))
    }

    /// [`Controller::paused`] for an `f` that needs nothing from the pause.
    fn paused_plain<T>(
        &self,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<(T, Pause), ApiError> {
        self.paused(
            |running| {
                if running {
                    self.vm.pause()?;
                }
                Ok(((), Instant::now()))
            },
            |()| f(),
        )
    }

    /// `POST /v1/vm-snapshots {"name"}`.
    pub(super) fn snapshot_vm(&self, name: &str) -> Result<ApiResponse, ApiError> {
        let engine = &self.engine;
        let port = self.live()?;
        let pages = lock_pool(engine.pool()).ram_pages();
        if lock_pool(engine.pool()).inspect(name).is_ok() {
            return Err(ApiError::DuplicateName(name.to_string()));
        }
        // What the guest wrote so far is harvested before the pause, which then takes
        // only what it writes in between (the first harvest covers all of RAM).
        if let Err(e) = engine.harvest_dirty() {
            log::warn!("dirty tracking: harvest before snapshot {name:?} failed: {e}");
        }
        // Write-protect the RAM no snapshot protects yet while the vCPUs still run: the
        // kernel's walk over every page table entry (and KVM dropping its mappings) is
        // what grows with RAM. Inside the pause only the pages written meanwhile are
        // protected again: those that faulted and every page dirty tracking saw written
        // (docs/perf-vm.md). Pages other snapshots protect are left alone: walking them
        // again would cost a walk of all RAM per snapshot and make the guest fault its
        // working set back into KVM. `PMSNAP_NO_PREPROTECT` turns it off, to measure.
        let t = Instant::now();
        if std::env::var_os("PMSNAP_NO_PREPROTECT").is_none() {
            let runs = lock_pool(engine.pool()).unprotected_runs(&[PageRun::new(0, pages)]);
            engine.preprotect(&runs)?;
        }
        let preprotect_us = t.elapsed().as_micros() as u64;
        // A running VM's vCPUs save their state as they stop, in one round trip (see
        // `VmPersist::pause_capture`); `capture_us` is then what follows their stop.
        let ((capture_us, store_us, state_bytes), pause) = self.paused(
            |running| {
                let (state, stopped) = match running {
                    true => port
                        .pause_capture()
                        .map(|(state, stopped)| (Some(state), stopped))?,
                    false => (None, Instant::now()),
                };
                Ok(((state, stopped), stopped))
            },
            |(state, stopped)| {
                let state = state.unwrap_or_else(|| port.capture());
                let blob = state?.encode()?;
                let capture_us = stopped.elapsed().as_micros() as u64;
                let t = Instant::now();
                let state_bytes = blob.len() as u64;
                let meta = SnapshotMeta {
                    state: blob,
                    ..Default::default()
                };
                engine.snapshot(name, SnapshotKind::Vm, &[PageRun::new(0, pages)], meta)?;
                Ok((capture_us, t.elapsed().as_micros() as u64, state_bytes))
            },
        )?;
        let (pause_us, stop_us) = (pause.us, pause.stop_us);
        log::info!(
            "VM snapshot {name:?}: {pages} pages, {state_bytes} bytes of state, paused {pause_us} us \
             (pre-protected in {preprotect_us} us before the pause)"
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
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        })
    }

    /// `POST /v1/vm-snapshots/{name}/rollback`.
    pub(super) fn rollback(&self, name: &str) -> Result<ApiResponse, ApiError> {
        let engine = &self.engine;
        let port = self.live()?;
        let state = load_vm_state(
            &lock_pool(engine.pool()),
            name,
            Some(port.vcpu_count()),
            port.mem_bytes(),
        )?;
        let ((dirty_pages, pages_copied, copy_us, restore_us), pause) =
            self.paused_plain(|| {
                let t = Instant::now();
                let dirty = engine.dirty_since(name)?;
                let dirty_pages = dirty.iter().map(|r| r.count).sum();
                let harvest = t.elapsed();
                log::debug!(
                    "rollback to {name:?}: {} dirty runs harvested in {harvest:?}",
                    dirty.len()
                );
                let (written, copy) = self.bring_back(port.as_ref(), name, &dirty, &state)?;
                let copy_us = (harvest + copy).as_micros() as u64;
                engine.reset_dirty(name)?;
                Ok((
                    dirty_pages,
                    written.len() as u64,
                    copy_us,
                    (t.elapsed().as_micros() as u64).saturating_sub(copy_us),
                ))
            })?;
        let (pause_us, stop_us) = (pause.us, pause.stop_us);
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
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        })
    }

    /// Put VM snapshot `name` back into the paused VM: the pages of `runs` whose
    /// snapshot content sits in a block are copied back into RAM (what other snapshots
    /// still need is preserved first), then vCPU, VM and device state go in. The one
    /// path for a rollback (`runs`: pages written since) and a restore (`runs`: all of
    /// the snapshot). Returns the pages written and the time the copy took.
    fn bring_back(
        &self,
        live: &dyn VmPersist,
        name: &str,
        runs: &[PageRun],
        state: &VmState,
    ) -> Result<(Vec<u64>, Duration), ApiError> {
        let t = Instant::now();
        let written = lock_pool(self.engine.pool()).copy_back(name, runs)?;
        let stored = t.elapsed();
        self.engine.after_vmm_write(&written);
        let copy = t.elapsed();
        live.apply(state)?;
        log::debug!(
            "brought back {name:?}: {} pages in {} runs asked, {} copied back by the store in \
             {stored:?}, unprotected and marked dirty after {copy:?}, state in after {:?}",
            runs.iter().map(|r| r.count).sum::<u64>(),
            runs.len(),
            written.len(),
            t.elapsed()
        );
        Ok((written, copy))
    }

    /// Bring a VM whose vCPUs were just started paused to VM snapshot `name`, whose
    /// state `state` was read and checked before the VM was built (`pmsnap restore`).
    /// The vCPUs stay paused; `RunningVm::run_vcpus` (or the API resume) runs them.
    pub fn restore_snapshot(&self, name: &str, state: &VmState) -> Result<Restored, ApiError> {
        let live = self.live()?;
        let runs = lock_pool(self.engine.pool()).inspect(name)?.runs;
        let (written, copy_time) = self.bring_back(live.as_ref(), name, &runs, state)?;
        Ok(Restored {
            pages_copied: written.len() as u64,
            copy_time,
        })
    }
}

impl Controller {
    /// Bring a VM whose vCPUs were just started paused to `state`, read from a
    /// repository before the VM was built (`pmsnap restore --from`): its RAM arrives
    /// through the engine's lazy fill, so only vCPU, VM and device state go in here.
    pub fn restore_state(&self, state: &VmState) -> Result<(), ApiError> {
        self.live()?.apply(state)?;
        Ok(())
    }
}

/// What a restore did.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Pages copied back from blocks into RAM.
    pub pages_copied: u64,
    /// Time the copy took.
    pub copy_time: Duration,
}
