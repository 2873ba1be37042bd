//! The pool's background pre-fault and the hold that keeps it off the CPUs while a
//! guest is paused.
//!
//! The pre-fault thread populates the pool's metadata and block area for a long time
//! after a large pool is created (the block area of a 4 GiB pool is 4 GiB; at nice 19
//! beside two busy vCPUs it takes minutes). It is a speed-up only, so it can wait; a
//! guest's pause cannot. While the vCPUs are paused they leave the CPUs to it, and on a
//! kernel without preemption (this machine's) every thread the pause hands work to then
//! waits for the populate step in progress. [`BackgroundHold`] stops it between steps
//! for as long as a pause lasts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::mapping::Mapping;

/// Bytes the pre-fault populates per call. Small steps: each one holds the process's
/// mmap lock for reading, and a thread that wants it for writing (any mmap or munmap)
/// waits for the step in progress; and each is one stretch in the kernel that a kernel
/// built without preemption (`PREEMPT_NONE`, as this machine's) may not interrupt for a
/// woken thread. A 4 MiB step ran 3-14 ms at a time at 4 GiB while the vCPUs, the fault
/// handler and the API thread waited for the CPU (`perf sched timehist` of a 4 GiB
/// `snapshot-vm` whose pause took 5 ms).
const STEP: u64 = 256 << 10;

/// How long a held pre-fault sleeps before it looks at its stop flag again (a stop
/// also wakes it at once; this bounds a wake-up that raced the wait).
const HELD_RECHECK: Duration = Duration::from_millis(100);

/// Holders of the background work of one pool (see [`BackgroundHold`]).
#[derive(Debug, Default)]
pub(super) struct Quiet {
    holders: Mutex<usize>,
    released: Condvar,
}

impl Quiet {
    fn holders(&self) -> MutexGuard<'_, usize> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a hold: background work stops at its next step until every hold is
    /// dropped.
    pub(super) fn hold(self: &Arc<Self>) -> BackgroundHold {
        *self.holders() += 1;
        BackgroundHold(self.clone())
    }

    /// Whether someone holds the background work now.
    #[cfg(test)]
    pub(super) fn is_held(&self) -> bool {
        *self.holders() > 0
    }

    /// Wait while a hold is taken, unless `stop` is set (see [`Quiet::wake`]).
    fn wait_while_held(&self, stop: &AtomicBool) {
        let mut held = self.holders();
        while *held > 0 && !stop.load(Ordering::Relaxed) {
            held = match self.released.wait_timeout(held, HELD_RECHECK) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Wake a held background thread (its stop flag was set).
    pub(super) fn wake(&self) {
        let _held = self.holders();
        self.released.notify_all();
    }
}

/// Keeps the pool's background pre-fault off the CPUs until dropped: it finishes the
/// step in progress (at most 256 KiB) and then sleeps. Taken for the length of a
/// guest's pause (see `Pool::hold_background`). Several may be held at once.
#[derive(Debug)]
#[must_use = "the background work resumes when the hold is dropped"]
pub struct BackgroundHold(Arc<Quiet>);

impl Drop for BackgroundHold {
    fn drop(&mut self) {
        let mut held = self.0.holders();
        *held = held.saturating_sub(1);
        if *held == 0 {
            self.0.released.notify_all();
        }
    }
}

/// Pre-fault `len` bytes at `off` for writing in [`STEP`]s, pausing while `quiet` is
/// held and stopping early when `stop` is set.
pub(super) fn populate_until_stopped(
    map: &Mapping,
    off: u64,
    len: u64,
    stop: &AtomicBool,
    quiet: &Quiet,
) {
    let mut at = off;
    while at < off + len && !stop.load(Ordering::Relaxed) {
        quiet.wait_while_held(stop);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let n = STEP.min(off + len - at);
        map.populate(at, n, true);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A held thread sleeps until the last hold is dropped, and a stop ends the wait at
    /// once even while held.
    #[test]
    fn a_hold_waits_for_its_last_holder_and_a_stop_ends_the_wait() {
        let quiet = Arc::new(Quiet::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (a, b) = (quiet.hold(), quiet.hold());
        assert!(quiet.is_held());
        let (q, s) = (quiet.clone(), stop.clone());
        let waiter = std::thread::spawn(move || {
            q.wait_while_held(&s);
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(30));
        drop(a);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "one hold is still taken");
        let released = Instant::now();
        drop(b);
        let woke = waiter.join().expect("waiter");
        assert!(woke >= released, "woke only after the last hold went");
        assert!(!quiet.is_held());

        let _c = quiet.hold();
        let (q, s) = (quiet.clone(), stop.clone());
        let waiter = std::thread::spawn(move || q.wait_while_held(&s));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!waiter.is_finished(), "held");
        stop.store(true, Ordering::Relaxed);
        quiet.wake();
        waiter
            .join()
            .expect("a stop ends the wait though the hold is taken");
    }
}
