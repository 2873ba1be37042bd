//! Shared control of the running vCPUs: the controller pauses and resumes them while
//! the main thread owns their lifetime.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::vcpu::{PauseAnswers, VcpuError, Vcpus};

/// The vCPU threads behind a lock, with the paused flag the API reports. The lock is
/// never taken by a vCPU thread, so holding it while waiting for acknowledgements
/// cannot deadlock with them.
#[derive(Debug)]
pub struct VcpuControl {
    vcpus: Mutex<Vcpus>,
    paused: AtomicBool,
    count: u32,
}

impl VcpuControl {
    /// Wrap started vCPUs.
    pub fn new(vcpus: Vcpus) -> Self {
        let count = vcpus.len() as u32;
        Self {
            vcpus: Mutex::new(vcpus),
            paused: AtomicBool::new(false),
            count,
        }
    }

    /// Wrap vCPUs started with [`Vcpus::start_paused`].
    pub fn new_paused(vcpus: Vcpus) -> Self {
        let c = Self::new(vcpus);
        c.paused.store(true, Ordering::SeqCst);
        c
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> MutexGuard<'_, Vcpus> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pause every vCPU (see [`Vcpus::pause`]) and report the VM paused.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.vcpus().pause()?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Pause every vCPU and run `job` on each one's thread once all have left the guest
    /// (see [`Vcpus::pause_then`]), and report the VM paused.
    pub fn pause_then<R, F>(&self, what: &'static str, job: F) -> Result<PauseAnswers<R>, VcpuError>
    where
        R: Send + 'static,
        F: Fn(u8, &kvm_ioctls::VcpuFd) -> R + Clone + Send + 'static,
    {
        let answers = self.vcpus().pause_then(what, job)?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(answers)
    }

    /// Resume every vCPU (see [`Vcpus::resume`]) and report the VM running. Returns
    /// when the last vCPU went back to the guest.
    pub fn resume(&self) -> Result<Instant, VcpuError> {
        let at = self.vcpus().resume()?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(at)
    }

    /// Let vCPUs started paused run without waiting for them (see [`Vcpus::release`])
    /// and report the VM running.
    pub fn release(&self) -> Result<(), VcpuError> {
        self.vcpus().release()?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Number of vCPUs.
    pub fn count(&self) -> u32 {
        self.count
    }
}
