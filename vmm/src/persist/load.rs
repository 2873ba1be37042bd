//! Reading a VM snapshot's state back from the pool: found, of the VM kind, intact and
//! fitting the VM it is restored into, before any of it is used.

use pmem_backend::{PoolError, SnapshotKind};

use super::VmState;

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

#[cfg(test)]
mod tests {
    use super::*;
    use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotMeta};

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
