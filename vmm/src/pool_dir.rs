//! Where default pools live, and how the pools of VMMs that died are found and removed.
//!
//! `pmsnap run` without `--pool` creates its pool in a directory of its own on tmpfs,
//! [`default_dir`] (`/dev/shm/pmsnap` for root, `/dev/shm/pmsnap-UID` for others, or
//! `$PMSNAP_POOL_DIR`, e.g. a directory on hugetlbfs), owner-only (0700; the pool files
//! are 0600). It removes the pool at exit, but a VMM
//! killed by SIGKILL or aborted cannot: its pool stays, holding guest RAM's worth of
//! host memory. [`prune`] lists and removes such pools: a pool is in use exactly while a
//! process holds its lock (pmem-backend's `flock`, released by the kernel when the
//! holder dies), so only pools whose lock nobody holds are removed, each while prune
//! itself holds the lock.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use pmem_backend::PoolUse;
use serde::Serialize;

/// The tmpfs under which the default pool directory lives.
pub const SHM: &str = "/dev/shm";

/// Errors preparing the default pool directory.
#[derive(Debug, thiserror::Error)]
pub enum PoolDirError {
    /// Creating or checking the directory failed.
    #[error("cannot create or check the pool directory {path}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a private directory of ours.
    #[error("{path} is not a private directory of this user ({why}); remove it or pass --pool")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// The default pool directory of the user with id `uid`.
pub fn default_dir_for(uid: u32) -> PathBuf {
    if uid == 0 {
        Path::new(SHM).join("pmsnap")
    } else {
        Path::new(SHM).join(format!("pmsnap-{uid}"))
    }
}

/// The environment variable that moves the default pool directory.
pub const DIR_ENV: &str = "PMSNAP_POOL_DIR";

/// The default pool directory given by [`DIR_ENV`], if set and not empty.
pub fn env_dir() -> Option<PathBuf> {
    std::env::var_os(DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The default pool directory: [`env_dir`], else that of this process's user.
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    env_dir().unwrap_or_else(|| default_dir_for(unsafe { libc::geteuid() }))
}

/// Create `dir` owner-only (0700) if it does not exist; if it does, check that it is a
/// real directory (not a symlink) owned by us and closed to others, since `/dev/shm` is
/// world-writable and someone else could have made it first.
pub fn ensure_dir(dir: &Path) -> Result<(), PoolDirError> {
    let io_err = |source| PoolDirError::Io {
        path: dir.to_path_buf(),
        source,
    };
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(e)),
    }
    let md = fs::symlink_metadata(dir).map_err(io_err)?;
    let unsafe_dir = |why: String| PoolDirError::Unsafe {
        path: dir.to_path_buf(),
        why,
    };
    if !md.file_type().is_dir() {
        return Err(unsafe_dir("not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if md.uid() != uid {
        return Err(unsafe_dir(format!("owned by uid {}", md.uid())));
    }
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(unsafe_dir(format!("mode {mode:o}, want 700")));
    }
    Ok(())
}

/// A fresh pool path in `dir`: `PID-NANOS.pool` (NANOS 8 hex digits), removed at exit
/// and by [`prune`] once its VMM died; with `keep` (`--keep-pool`)
/// `PID-NANOS.kept.pool`, which prune never touches: it is kept on purpose.
pub fn new_pool_path(dir: &Path, keep: bool) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let kept = if keep { ".kept" } else { "" };
    dir.join(format!("{}-{nanos:08x}{kept}.pool", std::process::id()))
}

/// Whether `rest` is `PID-NANOS` as [`new_pool_path`] writes it.
fn is_pid_nanos(rest: &str) -> bool {
    match rest.split_once('-') {
        Some((pid, nanos)) => {
            !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && nanos.len() == 8
                && nanos.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Whether `name` is a temporary default pool's (`PID-NANOS.pool`): the only files
/// [`prune`] considers in a pool directory. Kept pools and pools named with `--pool`
/// are never pruned.
pub fn is_default_pool_name(name: &str) -> bool {
    name.strip_suffix(".pool").is_some_and(is_pid_nanos)
}

/// A pool prune removed (or, in a dry run, would remove).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunedPool {
    /// The pool file.
    pub path: PathBuf,
    /// Memory (tmpfs) or disk it held.
    pub bytes: u64,
}

/// A pool prune left because a live process holds its lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolInUse {
    /// The pool file.
    pub path: PathBuf,
    /// The lock holder, when /proc/locks tells.
    pub pid: Option<u32>,
}

/// What [`prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// True when nothing was removed (`--dry-run`).
    pub dry_run: bool,
    /// Pools of dead VMMs, removed (or to remove in a dry run).
    pub removed: Vec<PrunedPool>,
    /// Pools in use by a live process, kept.
    pub in_use: Vec<PoolInUse>,
    /// Sum of `removed[].bytes`.
    pub freed_bytes: u64,
}

/// Whether `name` is a default pool's name from before default pools got their own
/// directory: `pmsnap-PID-NANOS.pool` (NANOS 8 hex digits), directly in `/dev/shm`.
/// Other `pmsnap-*.pool` files there (a test's, a user's) are not ours to remove.
pub fn is_legacy_default_name(name: &str) -> bool {
    name.strip_prefix("pmsnap-")
        .and_then(|r| r.strip_suffix(".pool"))
        .is_some_and(is_pid_nanos)
}

/// The pool files prune considers: the temporary default pools in `dir`
/// ([`is_default_pool_name`]), and with `legacy`
/// also the old-style default pools directly in that directory
/// ([`is_legacy_default_name`]).
pub fn candidates(dir: &Path, legacy: Option<&Path>) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut scan = |d: &Path, wanted: &dyn Fn(&str) -> bool| -> io::Result<()> {
        let entries = match fs::read_dir(d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if wanted(&name) && entry.file_type()?.is_file() {
                out.push(entry.path());
            }
        }
        Ok(())
    };
    scan(dir, &is_default_pool_name)?;
    if let Some(shm) = legacy {
        scan(shm, &is_legacy_default_name)?;
    }
    out.sort();
    Ok(out)
}

/// Remove (unless `dry_run`) each of `pools` whose lock nobody holds, holding the lock
/// while removing so that no VMM can open it meanwhile; pools in use are listed.
pub fn prune(pools: &[PathBuf], dry_run: bool) -> io::Result<PruneReport> {
    let mut report = PruneReport {
        dry_run,
        ..Default::default()
    };
    for path in pools {
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        match pmem_backend::claim_unused(path).map_err(with_path)? {
            PoolUse::Gone => {}
            PoolUse::InUse(pid) => report.in_use.push(PoolInUse {
                path: path.clone(),
                pid,
            }),
            PoolUse::Unused(claim) => {
                let bytes = claim.allocated_bytes().map_err(with_path)?;
                if !dry_run {
                    claim.remove().map_err(with_path)?;
                }
                report.freed_bytes += bytes;
                report.removed.push(PrunedPool {
                    path: path.clone(),
                    bytes,
                });
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dirs() {
        assert_eq!(default_dir_for(0), PathBuf::from("/dev/shm/pmsnap"));
        assert_eq!(default_dir_for(1000), PathBuf::from("/dev/shm/pmsnap-1000"));
        let p = new_pool_path(Path::new("/x"), false);
        assert!(p.starts_with("/x") && p.extension().is_some_and(|e| e == "pool"));
        let name = |p: &Path| p.file_name().expect("name").to_string_lossy().into_owned();
        assert!(is_default_pool_name(&name(&p)), "{p:?}");
        let kept = new_pool_path(Path::new("/x"), true);
        assert!(name(&kept).ends_with(".kept.pool"), "{kept:?}");
        assert!(
            !is_default_pool_name(&name(&kept)),
            "kept pools are not pruned"
        );
        for n in [
            "guest.pool",
            "12-abc.pool",
            "12-0000abcd.pool.bak",
            "x-0000abcd.pool",
        ] {
            assert!(!is_default_pool_name(n), "{n}");
        }
    }

    #[test]
    fn legacy_names() {
        assert!(is_legacy_default_name("pmsnap-4242-0000abcd.pool"));
        for n in [
            "pmsnap-test-template-1.pool",
            "pmsnap-test-7-3.pool",
            "pmsnap-12-abc.pool",
            "pmsnap--0000abcd.pool",
            "pmsnap-1-0000abcd.pool.bak",
            "other-1-0000abcd.pool",
            "pmsnap-x1-0000abcd.pool",
        ] {
            assert!(!is_legacy_default_name(n), "{n}");
        }
    }

    #[test]
    fn dir_is_created_private_and_checked() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("pools");
        ensure_dir(&d).expect("create");
        let mode = fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        ensure_dir(&d).expect("exists already: fine");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = ensure_dir(&d).expect_err("open to others");
        assert!(e.to_string().contains("mode 777"), "{e}");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).expect("symlink");
        let e = ensure_dir(&link).expect_err("symlink");
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn prune_removes_only_pools_nobody_holds() {
        let t = tempfile::tempdir().expect("tempdir");
        let (dir, shm) = (t.path().join("pmsnap"), t.path());
        ensure_dir(&dir).expect("dir");
        let opts = pmem_backend::PoolOptions::default;
        // A live VMM's pool: its Pool (and lock) is held.
        let live = new_pool_path(&dir, false);
        let _held = pmem_backend::Pool::create(&live, 1 << 20, opts()).expect("create");
        // A dead VMM's pool: created, then its process "died" (the Pool was dropped).
        let dead = dir.join("1-0000dead.pool");
        // A pool kept on purpose (--keep-pool) and one named by the user: never pruned.
        let kept = new_pool_path(&dir, true);
        drop(pmem_backend::Pool::create(&kept, 1 << 20, opts()).expect("create"));
        let named = dir.join("guest.pool");
        drop(pmem_backend::Pool::create(&named, 1 << 20, opts()).expect("create"));
        drop(pmem_backend::Pool::create(&dead, 1 << 20, opts()).expect("create"));
        // An old-style default pool, and files prune must not touch.
        let legacy = shm.join("pmsnap-1234-0badf00d.pool");
        drop(pmem_backend::Pool::create(&legacy, 1 << 20, opts()).expect("create"));
        let other = shm.join("other.pool");
        fs::write(&other, b"x").expect("write");
        // A test's pool next to the old-style ones: not a default pool.
        let test_pool = shm.join("pmsnap-test-template-1.pool");
        fs::write(&test_pool, b"x").expect("write");
        fs::write(dir.join("notes.txt"), b"x").expect("write");

        let pools = candidates(&dir, Some(shm)).expect("scan");
        assert_eq!(pools.len(), 3, "{pools:?}");
        let dry = prune(&pools, true).expect("dry run");
        assert!(dry.dry_run);
        assert_eq!(dry.removed.len(), 2, "{dry:?}");
        assert!(
            dead.exists() && legacy.exists(),
            "a dry run removes nothing"
        );
        assert!(dry.freed_bytes >= 2 << 20, "{dry:?}");

        let rep = prune(&pools, false).expect("prune");
        let removed: Vec<&Path> = rep.removed.iter().map(|p| p.path.as_path()).collect();
        assert_eq!(removed, vec![dead.as_path(), legacy.as_path()]);
        assert_eq!(rep.in_use.len(), 1);
        assert_eq!(rep.in_use[0].path, live);
        if let Some(pid) = rep.in_use[0].pid {
            assert_eq!(pid, std::process::id());
        }
        assert!(!dead.exists() && !legacy.exists());
        assert!(live.exists() && other.exists() && dir.join("notes.txt").exists());
        assert!(test_pool.exists() && kept.exists() && named.exists());
        // Pool files are owner-only.
        let mode = fs::metadata(&live).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Again: nothing left to remove.
        let again = prune(&candidates(&dir, Some(shm)).expect("scan"), false).expect("prune");
        assert!(again.removed.is_empty() && again.in_use.len() == 1);
    }
}
