//! Per-thread seccomp filters (rust-vmm's `seccompiler`), as Firecracker installs them.
//!
//! Every thread of a running VMM that touches guest-controlled data gets an allow-list of
//! the system calls its job needs, installed by the thread itself when it starts:
//!
//! | kind | threads | what it does |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | `vcpuN` | `KVM_RUN` and exit handling (port and MMIO I/O to devices), state save/restore |
//! | [`ThreadKind::Fault`] | `pmsnap-fault` | reads userfaultfd events, preserves pages into the pool, unprotects |
//! | [`ThreadKind::EventLoop`] | the main thread, once the VM runs | epoll, the serial console, virtio-vsock and the guest's snapshot service, signals, teardown |
//! | [`ThreadKind::Api`] | `pmsnap-api`, `pmsnap-api-conn`, `pmsnap-ready` | the control API, the engine's operations (VM snapshots, rollback), the agent client |
//! | [`ThreadKind::Export`] | `pmsnap-export`, `pmsnap-s3` | writes snapshots into a repository (`ctl export`): a directory (the one kind that opens files) or an S3 bucket (TCP; the S3 client's runtime threads inherit the filter) |
//!
//! A system call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler writes
//! one line naming the thread kind and the call to stderr and ends the process with exit
//! status 159 (128 + SIGSYS), so a compromised or confused thread stops the VMM instead of
//! acting, and the log says why. Filters are off unless the binary calls [`enable`]
//! (`pmsnap run` and `pmsnap restore` do, unless given `--no-seccomp`), so the library's
//! own tests and embedders are not filtered by surprise.
//!
//! The lists filter by system call number; `ioctl` is allowed whole in every thread kind
//! that uses KVM or userfaultfd (filtering its request argument per thread is the next
//! step, see docs/security.md).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The userfaultfd fault handler.
    Fault,
    /// The main thread running the event loop.
    EventLoop,
    /// The API threads and the engine operations they run.
    Api,
    /// The export worker: reads snapshots from the pool and writes repository files.
    Export,
    /// The lazy-restore filler: reads the repository, puts pages in with userfaultfd.
    Fill,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::Fault,
        ThreadKind::EventLoop,
        ThreadKind::Api,
        ThreadKind::Export,
        ThreadKind::Fill,
    ];

    /// Whether the kind may open files (only the export worker, which writes a
    /// repository directory, and the lazy-restore filler, which reads one; every other
    /// kind gets `EACCES`).
    pub fn opens_files(self) -> bool {
        matches!(self, ThreadKind::Export | ThreadKind::Fill)
    }

    /// Name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Fault => "fault handler",
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Api => "api",
            ThreadKind::Export => "export",
            ThreadKind::Fill => "lazy fill",
        }
    }
}

/// Errors installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built or compiled.
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter or the SIGSYS handler.
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        /// Thread kind.
        kind: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not drop to the user and group ids of `--uid/--gid`.
    #[error("the {kind} thread cannot drop to uid {uid} gid {gid}: {source}")]
    Ids {
        /// Thread kind.
        kind: &'static str,
        /// Target uid.
        uid: u32,
        /// Target gid.
        gid: u32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The user and group ids every VMM thread drops to (`--uid/--gid`), once set.
static TARGET_IDS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();

/// From now on every VMM thread drops to `uid`/`gid` (no supplementary groups) as it
/// starts, before its filter ([`apply`]); so does the pool's pre-fault thread. Call it
/// before any thread starts, once the process has opened what needs privileges. The
/// kernel keeps ids per thread and `setresuid(2)` changes only the caller's, so each
/// thread drops its own: glibc's wrapper would signal every thread to do it, which a
/// thread already under a seccomp filter could not.
pub fn drop_privileges_to(uid: u32, gid: u32) {
    let _ = TARGET_IDS.set((uid, gid));
    let _ = pmem_backend::THREAD_START.set(|| {
        if let Err(e) = drop_ids("pool pre-fault") {
            fatal_ids(&e);
        }
    });
}

/// The ids set by [`drop_privileges_to`], if any.
pub fn target_ids() -> Option<(u32, u32)> {
    TARGET_IDS.get().copied()
}

/// Drop the calling thread to the target ids, if set (raw system calls: this thread
/// only).
fn drop_ids(kind: &'static str) -> Result<(), SeccompError> {
    let Some((uid, gid)) = target_ids() else {
        return Ok(());
    };
    let fail = |source| SeccompError::Ids {
        kind,
        uid,
        gid,
        source,
    };
    let check = |r: libc::c_long| {
        if r == 0 {
            Ok(())
        } else {
            Err(fail(std::io::Error::last_os_error()))
        }
    };
    // SAFETY: raw credential system calls with plain integer arguments (and a null group
    // list of length 0); they affect only the calling thread.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
        check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
    }
    Ok(())
}

/// A thread that cannot drop its ids must not go on with them: end the VMM.
fn fatal_ids(e: &SeccompError) -> ! {
    eprintln!("pmsnap: {e}; the VMM stops");
    std::process::exit(1);
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static SIGSYS_HANDLER: Once = Once::new();

/// Turn filters on for this process: from now on [`apply`] installs them.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS message (a const-initialised cell: safe
    /// to read in a signal handler, no lazy initialisation).
    static KIND: std::cell::Cell<Option<ThreadKind>> = const { std::cell::Cell::new(None) };
}

/// Drop the calling thread to the `--uid/--gid` ids if set, then install the filter of
/// `kind` on it, when filters are enabled. Threads this thread starts afterwards inherit
/// both (and may add their own filter on top).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    drop_ids(kind.name())?;
    if !enabled() {
        return Ok(());
    }
    install(kind)
}

/// Install the filter of `kind` on the calling thread, enabled or not.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = program(kind)?;
    install_sigsys_handler().map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })?;
    let deny = deny_open_program().map_err(|source| SeccompError::Build {
        kind: kind.name(),
        source,
    })?;
    mark(kind);
    // The open filter first: the allow-list forbids `seccomp` itself.
    let progs: Vec<&BpfProgram> = if kind.opens_files() {
        vec![&prog]
    } else {
        vec![&deny, &prog]
    };
    for p in progs {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    log::debug!("seccomp: {} filter installed", kind.name());
    Ok(())
}

/// Record the calling thread's kind for the SIGSYS message, for a thread that inherits
/// its filter from the thread that started it (API connection threads).
pub fn mark(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// Opening files: refused with `EACCES` (not fatal) in every filtered thread. No VMM
/// thread opens files once the VM runs, but glibc's allocator may (it reads
/// `/proc/sys/vm/overcommit_memory` when a thread's arena shrinks) and copes with the
/// error; a compromised thread gains nothing from it. Installed on top of the allow-list
/// (which lets `openat` through): the kernel applies the strictest answer of all filters.
fn deny_open_program() -> Result<BpfProgram, seccompiler::BackendError> {
    compile(
        &[libc::SYS_open, libc::SYS_openat, libc::SYS_openat2],
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )
}

/// A BPF program answering `on_match` for the system calls in `calls` (any arguments)
/// and `otherwise` for the rest.
fn compile(
    calls: &[i64],
    otherwise: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(rules, otherwise, on_match, TargetArch::x86_64)?;
    BpfProgram::try_from(filter)
}

/// Install the filter of `kind`, logging (not failing) when that is impossible: used at
/// the top of threads whose spawner cannot handle an error. The VMM then runs that thread
/// unfiltered, and says so; a thread that cannot drop to the `--uid/--gid` ids ends the
/// VMM instead.
pub fn apply_or_warn(kind: ThreadKind) {
    match apply(kind) {
        Ok(()) => {}
        // Running on with the ids it was meant to drop is not an option.
        Err(e @ SeccompError::Ids { .. }) => fatal_ids(&e),
        Err(e) => log::warn!("{e}; this thread runs without a seccomp filter"),
    }
}

/// The compiled BPF program of `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    compile(&allowed(kind), SeccompAction::Trap, SeccompAction::Allow).map_err(|source| {
        SeccompError::Build {
            kind: kind.name(),
            source,
        }
    })
}

/// System calls every kind needs: memory, locks, time, logging to stderr, signals, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_fcntl,
    // Answered EACCES by the second filter (see `deny_open_program`).
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
];

/// Extra calls of a vCPU thread: KVM and the I/O its exits do (devices write to the
/// eventfds that wake the event loop; the console writes to stdout).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_tgkill,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Extra calls of the fault handler: userfaultfd events, pool writes and persistence.
const FAULT: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_msync,
    libc::SYS_pwrite64,
    libc::SYS_pread64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_setpriority,
    libc::SYS_sched_setaffinity,
];

/// Calls both service threads (the event loop and the API threads) make: socket and file
/// I/O on their own descriptors, KVM and userfaultfd ioctls, pool persistence.
const SERVICE: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_msync,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_dup,
    libc::SYS_setpriority,
];

/// Extra calls of the event loop thread: epoll, `flock` and `kill`/`wait4` at teardown.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_kill,
    libc::SYS_flock,
    libc::SYS_wait4,
];

/// Extra calls of the API threads: the agent client's Unix socket, the threads of new
/// connections, and extending the pool file when the block area grows (`pool grow`;
/// the pool's pre-fault thread, restarted by it, inherits this filter).
const API: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    // The host's memory, which bounds a grown pool (as at open).
    libc::SYS_sysinfo,
];

/// Extra calls of the export worker: files and directories of a repository (objects
/// written to a temporary file, synced, renamed into place; listing, removing).
const EXPORT: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
];

/// The calls of an `s3://` repository's client (export worker and lazy fill):
/// the S3 client's tokio runtime (its worker and blocking-pool threads, started by the
/// thread, inherit its filter) and its TCP connections (`strace -f` of a repository
/// command shows them); bind, sendto, sendmmsg and recvmsg are glibc's name resolution
/// of an endpoint given by host name (netlink and UDP DNS).
const S3_CLIENT: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
];

/// Extra calls of the lazy-restore filler beyond the `EXPORT` list, which it also has (it
/// reads repository files and writes the pack cache's directory, unlinks the pool's fill
/// marker): `UFFDIO_COPY`/`UFFDIO_WAKE` on the userfaultfd, the pack cache marking
/// a block it used (its LRU order) and claiming a block it fetches (`flock`, so that
/// processes sharing the cache fetch each block once).
const FILL: &[i64] = &[libc::SYS_ioctl, libc::SYS_utimensat, libc::SYS_flock];

/// The allow-list of `kind`.
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    let lists: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[COMMON, VCPU],
        ThreadKind::Fault => &[COMMON, FAULT],
        ThreadKind::EventLoop => &[COMMON, SERVICE, EVENT_LOOP],
        ThreadKind::Api => &[COMMON, SERVICE, API],
        ThreadKind::Export => &[COMMON, EXPORT, S3_CLIENT],
        // The pack cache of an s3:// repository writes its directory like an export.
        ThreadKind::Fill => &[COMMON, EXPORT, FILL, S3_CLIENT],
    };
    let mut v = lists.concat();
    v.sort_unstable();
    v.dedup();
    v
}

/// Exit status of a VMM stopped by a forbidden system call (128 + SIGSYS).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

fn install_sigsys_handler() -> std::io::Result<()> {
    let mut result = Ok(());
    SIGSYS_HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // is an `extern "C"` function with the SA_SIGINFO signature and lives forever.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on x86_64: after si_signo, si_errno,
/// si_code (and padding to 16 bytes) comes `_sigsys { void *_call_addr; int _syscall; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Format the SIGSYS line into `buf` (no allocation: called from the signal handler).
fn sigsys_message(buf: &mut [u8; 256], kind: Option<ThreadKind>, nr: i32) -> usize {
    let mut n = 0;
    let mut put = |s: &[u8]| {
        let k = s.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&s[..k]);
        n += k;
    };
    put(b"pmsnap: seccomp: the ");
    put(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    put(b" thread made the forbidden system call ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name());
    put(name.as_bytes());
    put(b" (");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let neg = nr < 0;
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        digits[i] = b'-';
    }
    put(&digits[i..]);
    put(b"); the VMM stops (pmsnap run/restore --no-seccomp turns filters off to debug)\n");
    n
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS
    // raised by seccomp, `si_syscall` is an int at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 256];
    let n = sigsys_message(&mut buf, kind, nr);
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed in every filter;
    // `buf` is valid for `n` bytes.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_allows_what_the_handler_needs() {
        for kind in ThreadKind::ALL {
            let prog = program(kind).expect("compiles");
            assert!(!prog.is_empty());
            let list = allowed(kind);
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_futex] {
                assert!(list.contains(&nr), "{kind:?} lacks {nr}");
            }
            // Nothing a VMM thread needs to start programs or trace others.
            for nr in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_ptrace] {
                assert!(!list.contains(&nr), "{kind:?} allows {nr}");
            }
        }
        // Only the API threads and the export worker (an S3 repository) start threads or
        // open sockets.
        assert!(!allowed(ThreadKind::Vcpu).contains(&libc::SYS_socket));
        assert!(!allowed(ThreadKind::Fault).contains(&libc::SYS_clone3));
    }

    #[test]
    fn the_sigsys_line_names_thread_and_call() {
        let mut buf = [0u8; 256];
        let n = sigsys_message(&mut buf, Some(ThreadKind::Vcpu), libc::SYS_execve as i32);
        let s = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert!(s.contains("the vcpu thread"), "{s}");
        assert!(s.contains("execve (59)"), "{s}");
        assert!(s.ends_with('\n'));
        let n = sigsys_message(&mut buf, None, -7);
        let s = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert!(s.contains("unknown (-7)"), "{s}");
    }
}
