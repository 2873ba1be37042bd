//! Test fixtures for the engine: a real pool on tmpfs, its RAM area mapped like the
//! VMM maps guest RAM and registered with userfaultfd.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use pmem_backend::Pool;

use super::engine::Engine;
use super::fault::HandlerOptions;
use super::protect::UffdProtector;

/// The VMM's view of guest RAM: the pool's RAM area mapped shared, as KVM sees it.
pub(crate) struct Ram {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: the mapping lives as long as Ram; tests synchronise their accesses.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}
impl Ram {
    pub fn write(&self, page: u64, byte: u8) {
        assert!(page < (self.len / 4096) as u64);
        // SAFETY: inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.ptr.add(page as usize * 4096), byte, 4096) };
    }
}
impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: mapped in `setup` with this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(crate) fn setup(pages: u64) -> (tempfile::TempDir, Engine, Arc<Ram>) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let pool = Pool::create(dir.path().join("p.pool"), pages * 4096, Default::default())
        .expect("create pool");
    let len = pool.ram_size() as usize;
    // SAFETY: a fresh shared mapping of the pool's RAM area; checked for failure.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            pool.file().as_raw_fd(),
            pool.ram_offset() as libc::off_t,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let ram = Arc::new(Ram {
        ptr: ptr.cast(),
        len,
    });
    let prot = Arc::new(UffdProtector::new(ram.ptr, len).expect("uffd"));
    let engine = Engine::start(
        Arc::new(Mutex::new(pool)),
        prot,
        Vec::new(),
        HandlerOptions::default(),
    )
    .expect("engine");
    (dir, engine, ram)
}
