//! Placing the pool on a NUMA node (`pmsnap run --pool-node N`) and reporting where its
//! pages live.
//!
//! Persistent memory used as system RAM (device DAX as KMEM) and CXL memory appear as
//! NUMA nodes, usually without CPUs. A pool created with `--pool-node N` is allocated
//! under an `MPOL_BIND` policy to node N on the creating thread: tmpfs takes the
//! allocating task's policy, and creation `fallocate`s the whole file, so every page of
//! RAM, metadata and blocks is placed then (an alternative is a tmpfs mounted with
//! `mpol=bind:N`). Where the pages are is read back with `move_pages(2)` (nodes = NULL:
//! query only) over a read-only mapping of the file, and logged at start.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `MPOL_DEFAULT` and `MPOL_BIND` of `set_mempolicy(2)`.
const MPOL_DEFAULT: libc::c_int = 0;
const MPOL_BIND: libc::c_int = 2;
/// Pages asked about per `move_pages` call.
const QUERY_CHUNK: usize = 4096;

/// Errors of NUMA placement.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    /// The node does not exist or has no memory.
    #[error("NUMA node {node} has no memory here (nodes with memory: {have})")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes that have memory (`/sys/devices/system/node/has_memory`).
        have: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> NumaError {
    NumaError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The nodes with memory, as the kernel lists them (`0` or `0-1,3`).
fn nodes_with_memory() -> String {
    std::fs::read_to_string("/sys/devices/system/node/has_memory")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".to_string())
}

/// Whether `node` is in a kernel node list such as `0-1,3`.
fn in_list(list: &str, node: u32) -> bool {
    list.split(',')
        .filter(|p| !p.is_empty())
        .any(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&node),
                _ => false,
            },
            None => part.trim().parse::<u32>() == Ok(node),
        })
}

/// Check that `node` exists and has memory.
pub fn check_node(node: u32) -> Result<(), NumaError> {
    let have = nodes_with_memory();
    if in_list(&have, node) && Path::new(&format!("/sys/devices/system/node/node{node}")).exists() {
        Ok(())
    } else {
        Err(NumaError::NoSuchNode { node, have })
    }
}

/// While alive, the calling thread allocates memory on one node only.
#[derive(Debug)]
pub struct BindGuard(());

/// Bind the calling thread's allocations to `node` until the guard drops.
pub fn bind_thread(node: u32) -> Result<BindGuard, NumaError> {
    check_node(node)?;
    let bits = libc::c_ulong::BITS;
    let mut mask = vec![0 as libc::c_ulong; node as usize / bits as usize + 1];
    mask[node as usize / bits as usize] |= 1 << (node % bits);
    let maxnode = mask.len() as libc::c_ulong * libc::c_ulong::from(bits);
    // SAFETY: set_mempolicy with a node mask of `maxnode` bits that lives for the call.
    let r = unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), maxnode) };
    if r != 0 {
        return Err(sys("set_mempolicy(MPOL_BIND)"));
    }
    Ok(BindGuard(()))
}

impl Drop for BindGuard {
    fn drop(&mut self) {
        // SAFETY: set_mempolicy(MPOL_DEFAULT) takes no mask.
        let r = unsafe {
            libc::syscall(
                libc::SYS_set_mempolicy,
                MPOL_DEFAULT,
                std::ptr::null::<libc::c_ulong>(),
                0,
            )
        };
        if r != 0 {
            log::warn!(
                "cannot reset the memory policy: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// How many pages of `len` bytes of `file` from `offset` (page aligned) are on each NUMA
/// node. Pages not allocated yet are not counted.
pub fn pages_by_node(
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> Result<BTreeMap<i32, u64>, NumaError> {
    let mut out = BTreeMap::new();
    if len == 0 {
        return Ok(out);
    }
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(sys("mmap of the pool"));
    }
    let result = (|| {
        // Map the pages the file has (a read fault does not allocate in a fallocated
        // file); move_pages only sees mapped pages.
        // SAFETY: advice on the mapping made above.
        if unsafe { libc::madvise(base, len, libc::MADV_POPULATE_READ) } != 0 {
            return Err(sys("madvise(MADV_POPULATE_READ)"));
        }
        let pages = len / 4096;
        let mut ptrs: Vec<*mut libc::c_void> = Vec::with_capacity(QUERY_CHUNK);
        let mut status = vec![0 as libc::c_int; QUERY_CHUNK];
        for first in (0..pages).step_by(QUERY_CHUNK) {
            let n = QUERY_CHUNK.min(pages - first);
            ptrs.clear();
            // SAFETY: addresses inside the mapping (first + i < pages).
            ptrs.extend(
                (first..first + n).map(|p| unsafe { base.cast::<u8>().add(p * 4096) }.cast()),
            );
            // SAFETY: move_pages on this process with `n` addresses and a status array of
            // at least `n` entries; nodes = NULL only queries.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_move_pages,
                    0,
                    n as libc::c_ulong,
                    ptrs.as_ptr(),
                    std::ptr::null::<libc::c_int>(),
                    status.as_mut_ptr(),
                    0,
                )
            };
            if r < 0 {
                return Err(sys("move_pages"));
            }
            for &s in &status[..n] {
                if s >= 0 {
                    *out.entry(s).or_insert(0) += 1;
                }
            }
        }
        Ok(out)
    })();
    // SAFETY: unmapping exactly the mapping made above.
    unsafe { libc::munmap(base, len) };
    result
}

/// `node0=65536 node1=12` for a log line.
pub fn describe(by_node: &BTreeMap<i32, u64>) -> String {
    if by_node.is_empty() {
        return "no pages allocated".to_string();
    }
    by_node
        .iter()
        .map(|(n, c)| format!("node{n}={c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn node_lists_parse_as_the_kernel_writes_them() {
        assert!(in_list("0", 0));
        assert!(!in_list("0", 1));
        assert!(in_list("0-1,3", 1));
        assert!(in_list("0-1,3", 3));
        assert!(!in_list("0-1,3", 2));
        assert!(!in_list("", 0));
        assert!(matches!(
            check_node(4095),
            Err(NumaError::NoSuchNode { node: 4095, .. })
        ));
    }

    #[test]
    fn a_file_made_while_bound_to_node_0_has_all_its_pages_there() {
        check_node(0).expect("node 0 exists on every Linux machine with NUMA sysfs");
        let mut f = tempfile::tempfile_in("/dev/shm").expect("tmpfs file");
        {
            let _bound = bind_thread(0).expect("bind to node 0");
            f.write_all(&vec![7u8; 64 * 4096]).expect("write");
        }
        let by_node = pages_by_node(&f, 0, 64 * 4096).expect("query");
        assert_eq!(by_node.get(&0), Some(&64), "{}", describe(&by_node));
        assert_eq!(by_node.values().sum::<u64>(), 64);
    }
}
