//! Test fixtures for the engine: a real pool on tmpfs, its RAM area mapped like the
//! VMM maps guest RAM (a [`SharedMap`]) and registered with userfaultfd.

use std::sync::{Arc, Mutex};

use pmem_backend::{Pool, PoolOptions};
use pmsnap_testenv::SharedMap;

use super::engine::Engine;
use super::fault::HandlerOptions;
use super::protect::UffdProtector;
use crate::vstate::dirty::DirtySource;

/// The VMM's view of guest RAM: the pool's RAM area mapped shared, as KVM sees it.
pub(crate) type Ram = SharedMap;

pub(crate) fn setup(pages: u64) -> (tempfile::TempDir, Engine, Arc<Ram>) {
    setup_with(pages, PoolOptions::default())
}

/// [`setup`] with pool options (for example a small block area).
pub(crate) fn setup_with(
    pages: u64,
    options: PoolOptions,
) -> (tempfile::TempDir, Engine, Arc<Ram>) {
    setup_with_sources(pages, options, Vec::new())
}

/// [`setup_with`] with dirty-tracking sources.
pub(crate) fn setup_with_sources(
    pages: u64,
    options: PoolOptions,
    dirty_sources: Vec<Box<dyn DirtySource>>,
) -> (tempfile::TempDir, Engine, Arc<Ram>) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
    let pool = Pool::create(dir.path().join("p.pool"), pages * 4096, options).expect("create pool");
    let len = pool.ram_size() as usize;
    let ram = Arc::new(SharedMap::new(pool.file(), pool.ram_offset(), len, true));
    let prot = Arc::new(UffdProtector::new(ram.as_ptr(), len).expect("uffd"));
    let engine = Engine::start(
        Arc::new(Mutex::new(pool)),
        prot,
        dirty_sources,
        HandlerOptions::default(),
    )
    .expect("engine");
    (dir, engine, ram)
}
