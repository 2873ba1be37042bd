//! Guest RAM in the pool: the pool file's checks (filesystem, size), opening or creating
//! it, and mapping its RAM area as guest memory.

use crate::memory::GuestMemoryMmap;

use std::fs::File;
use std::path::{Path, PathBuf};

use pmem_backend::{Pool, PoolError, PoolOptions};
use vm_memory::{FileOffset, GuestAddress};

use crate::arch::x86_64::layout;

/// `statfs` type of tmpfs (also what a memfd reports).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs` type of hugetlbfs.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Errors opening the pool file or mapping guest RAM from it.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The pool could not be placed on the NUMA node asked for.
    #[error(transparent)]
    Numa(#[from] crate::numa::NumaError),
    /// The pool's filesystem cannot do synchronous userfaultfd write-protect.
    #[error("pool {path} is on {fs} which cannot do synchronous userfaultfd write-protect; put it on tmpfs (/dev/shm), hugetlbfs or a memfd")]
    WrongFilesystem {
        /// The pool path.
        path: PathBuf,
        /// Name of the filesystem found.
        fs: String,
    },
    /// The pool path exists and is not a pool.
    #[error("pool {0} exists and is not a pmsnap pool (refusing to overwrite it; remove it or choose another path)")]
    NotAPool(PathBuf),
    /// statfs, open or resize failed.
    #[error("cannot {op} pool {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The pool path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap or region setup failed.
    /// The pool could not be opened or created.
    #[error("pool {path}")]
    Pool {
        /// The pool path.
        path: PathBuf,
        /// What the store said.
        #[source]
        source: PoolError,
    },
    /// The pool was made for another RAM size.
    #[error("pool {path} holds {pool} bytes of guest RAM but --mem asks for {mem}; use --mem {pool} with this pool")]
    PoolRamSize {
        /// The pool path.
        path: PathBuf,
        /// RAM size of the pool.
        pool: u64,
        /// RAM size asked for.
        mem: u64,
    },
    #[error("cannot map guest RAM from the pool")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Human name of a `statfs` filesystem type.
pub fn filesystem_name(magic: i64) -> String {
    match magic {
        TMPFS_MAGIC => "tmpfs".into(),
        HUGETLBFS_MAGIC => "hugetlbfs".into(),
        0xef53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x0102_1997 => "9p".into(),
        0x6573_5546 => "fuse".into(),
        0x2fc1_2fc1 => "zfs".into(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// Filesystem type and free bytes of the filesystem holding `path` (or, when `path`
/// does not exist yet, its directory).
pub fn statfs_pool(path: &Path) -> Result<(i64, u64), MemoryError> {
    let target = if path.exists() {
        path.to_path_buf()
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let io = |source| MemoryError::Io {
        op: "statfs",
        path: path.to_path_buf(),
        source,
    };
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| io(std::io::Error::other(e)))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to a writable statfs that
    // lives across the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it filled the whole struct.
    let st = unsafe { st.assume_init() };
    Ok((
        st.f_type,
        st.f_bavail.saturating_mul(st.f_bsize.unsigned_abs()),
    ))
}

/// Accept only filesystems where synchronous userfaultfd write-protect works on a
/// `MAP_SHARED` mapping (see docs/machine-notes.md: it fails with EINVAL on ext4/XFS/btrfs).
pub fn check_pool_filesystem(path: &Path, fs_type: i64) -> Result<(), MemoryError> {
    if fs_type == TMPFS_MAGIC || fs_type == HUGETLBFS_MAGIC {
        Ok(())
    } else {
        Err(MemoryError::WrongFilesystem {
            path: path.to_path_buf(),
            fs: filesystem_name(fs_type),
        })
    }
}

/// Open the pool at `path`, or create it for `mem_bytes` of guest RAM when nothing is
/// there. An existing pool keeps its snapshots; it must have been made for the same RAM
/// size. Anything at `path` that is not a pool is refused, never overwritten.
/// A pool created here gets `block_area` bytes of blocks (rounded up to 4 KiB; `None`:
/// as much as guest RAM).
pub fn open_or_create_pool(
    path: &Path,
    mem_bytes: u64,
    block_area: Option<u64>,
    node: Option<u32>,
) -> Result<Pool, MemoryError> {
    let (fs, _) = statfs_pool(path)?;
    check_pool_filesystem(path, fs)?;
    let pool = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(MemoryError::NotAPool(path.to_path_buf())),
        Ok(_) => Pool::open(path).map_err(|e| match e {
            PoolError::NotAPool | PoolError::Truncated { .. } => {
                MemoryError::NotAPool(path.to_path_buf())
            }
            e => MemoryError::Pool {
                path: path.to_path_buf(),
                source: e,
            },
        })?,
        Err(_) => {
            let options = PoolOptions {
                block_count: block_area.map(|b| b.div_ceil(4096)),
                ..PoolOptions::default()
            };
            // Creation allocates the whole file: bound, every page lands on the node.
            let _bound = node.map(crate::numa::bind_thread).transpose()?;
            Pool::create(path, mem_bytes, options).map_err(|e| MemoryError::Pool {
                path: path.to_path_buf(),
                source: e,
            })?
        }
    };
    if let Some(n) = node {
        let by_node =
            crate::numa::pages_by_node(pool.file(), 0, pool.geometry().file_size as usize)?;
        let elsewhere: u64 = by_node
            .iter()
            .filter(|(k, _)| **k != n as i32)
            .map(|(_, c)| c)
            .sum();
        if elsewhere > 0 {
            log::warn!(
                "pool {} asked for NUMA node {n} has {elsewhere} pages elsewhere ({}): an \
                 existing pool keeps where it was made",
                path.display(),
                crate::numa::describe(&by_node)
            );
        } else {
            log::info!(
                "pool {} is on NUMA node {n}: {}",
                path.display(),
                crate::numa::describe(&by_node)
            );
        }
    }
    if pool.ram_size() != mem_bytes {
        return Err(MemoryError::PoolRamSize {
            path: path.to_path_buf(),
            pool: pool.ram_size(),
            mem: mem_bytes,
        });
    }
    Ok(pool)
}

pub fn create_guest_memory(
    file: &File,
    ram_offset: u64,
    mem_bytes: u64,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = ram_offset;
    let mut regions = Vec::new();
    for r in layout::ram_regions(mem_bytes) {
        let f = file.try_clone().map_err(|source| MemoryError::Io {
            op: "duplicate the fd of",
            path: PathBuf::from("(guest RAM)"),
            source,
        })?;
        regions.push((
            GuestAddress(r.start),
            r.size as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += r.size;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn filesystems_are_checked() {
        let p = Path::new("/x/pool");
        assert!(check_pool_filesystem(p, TMPFS_MAGIC).is_ok());
        assert!(check_pool_filesystem(p, HUGETLBFS_MAGIC).is_ok());
        let e = check_pool_filesystem(p, 0xef53).expect_err("ext4 refused");
        let msg = e.to_string();
        assert!(msg.contains("/x/pool is on ext4"), "{msg}");
        assert!(
            msg.contains("tmpfs (/dev/shm), hugetlbfs or a memfd"),
            "{msg}"
        );
    }

    #[test]
    fn dev_shm_is_tmpfs() {
        let (fs, free) = statfs_pool(Path::new("/dev/shm/not-there-yet")).expect("statfs");
        assert_eq!(fs, TMPFS_MAGIC);
        assert!(free > 0);
    }

    #[test]
    fn existing_non_pool_is_refused() {
        let f = tempfile::NamedTempFile::new_in("/dev/shm").expect("tmp");
        std::fs::write(f.path(), b"precious data").expect("write");
        let e = open_or_create_pool(f.path(), 1 << 20, None, None).expect_err("refused");
        assert!(matches!(e, MemoryError::NotAPool(_)), "{e}");
        assert_eq!(std::fs::read(f.path()).expect("read"), b"precious data");
    }

    #[test]
    fn existing_pool_is_reopened_and_must_match_the_ram_size() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir");
        let path = dir.path().join("p.pool");
        drop(open_or_create_pool(&path, 2 << 20, None, None).expect("create"));
        let pool = open_or_create_pool(&path, 2 << 20, None, None).expect("reopen");
        assert_eq!(pool.ram_size(), 2 << 20);
        let e = open_or_create_pool(&path, 4 << 20, None, None).expect_err("locked");
        assert!(e.to_string().contains("pool"), "{e}");
        drop(pool);
        let e = open_or_create_pool(&path, 4 << 20, None, None).expect_err("size");
        assert!(
            matches!(e, MemoryError::PoolRamSize { pool, mem, .. } if pool == 2 << 20 && mem == 4 << 20),
            "{e}"
        );
    }

    #[test]
    fn ram_is_shared_with_the_file() {
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpdir");
        let path = dir.path().join("p.pool");
        let pool = open_or_create_pool(&path, 2 << 20, None, None).expect("open");
        let mem = create_guest_memory(pool.file(), pool.ram_offset(), 2 << 20).expect("map");
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("write");
        let page = pool.read_ram_page(1).expect("read the pool's RAM page 1");
        assert_eq!(&page[..4], &0xdead_beef_u32.to_le_bytes());
        // The VMM's write shows in its own dirty log.
        use crate::vstate::dirty::{DirtySource, VmmWriteLog};
        let mut log = VmmWriteLog::new(mem.clone());
        let dirty = log.harvest().expect("harvest");
        assert_eq!(dirty[0], 1 << 1);
        log.recycle(dirty);
        assert_eq!(
            log.harvest().expect("harvest"),
            Vec::<u64>::new(),
            "none since"
        );
        mem.write_obj(1u8, GuestAddress(0x3000)).expect("write");
        let dirty = log.harvest().expect("harvest");
        assert_eq!(
            dirty,
            [1 << 3, 0, 0, 0, 0, 0, 0, 0],
            "only the new write, in the recycled bitmap"
        );
    }
}
