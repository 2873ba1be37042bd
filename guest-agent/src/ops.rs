//! The agent's operations on another process: save, restore, copy-out (the baseline the
//! benchmark compares against), and serving the VMM's snapshot-process requests.
//!
//! Each operation freezes the target for its whole critical section: from reading the
//! page map until the VMM has answered (the VMM write-protects the saved pages, or has
//! copied the snapshot into the target pages, before it replies), then thaws it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::access::{Access, AccessError};
use crate::client::{call, ClientError, Transport};
use crate::freeze::{FreezeError, FreezeGuard, FreezeMethod};
use crate::pagemap::{
    check_ranges, decode_entry, default_ranges, is_private_resident, proc_error, read_maps,
    Mapping, PageState, Pagemap, PagemapError, RunBuilder,
};
use crate::protocol::{
    read_frame, total_pages, validate_name, write_frame, AgentRequest, ErrorCode, ErrorReply,
    GuestRequest, ProtocolError, Reply, Request, RestoreRequest, SaveRequest, VirtRange,
    MAX_COMM_LEN, MAX_RUNS, PAGE_SIZE,
};

/// Bytes moved per `pread`/`pwrite` of /proc/PID/mem: few syscalls, bounded memory.
const MEM_CHUNK: usize = 1 << 20;

/// Errors of the agent's operations.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Reading maps or pagemap failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// Freezing or thawing failed.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    /// The snapshot service failed or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A request field is invalid before anything is sent.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Reading or writing the process's memory failed.
    #[error("accessing memory of pid {pid} at {addr:#x}: {source}")]
    Mem {
        /// Process.
        pid: u32,
        /// Address.
        addr: u64,
        /// Cause.
        source: std::io::Error,
    },
    /// A page stayed absent after touching it (restore targets must be resident).
    #[error("page at {0:#x} is not resident after touching it")]
    NotResident(u64),
    /// More runs than one request may carry.
    #[error("{0} page runs exceed the protocol limit of {MAX_RUNS}; save fewer ranges")]
    TooManyRuns(usize),
    /// The caller may not access the process.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Writing the copy-out file failed.
    #[error("writing {path}: {source}")]
    Output {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl OpsError {
    /// The error reply the agent sends the VMM when a snapshot-process request fails.
    pub fn to_reply(&self) -> ErrorReply {
        match self {
            OpsError::Client(ClientError::Refused(e)) => e.clone(),
            OpsError::Protocol(p) => ErrorReply::from(p),
            OpsError::Pagemap(PagemapError::NoProcess(_))
            | OpsError::Freeze(FreezeError::NoProcess(_))
            | OpsError::Pagemap(PagemapError::NotMapped { .. })
            | OpsError::Pagemap(PagemapError::BadRange { .. })
            | OpsError::Pagemap(PagemapError::NothingToSave(_))
            | OpsError::Freeze(FreezeError::SelfFreeze(_)) => {
                ErrorReply::new(ErrorCode::BadRequest, self.to_string())
            }
            OpsError::TooManyRuns(_) => ErrorReply::new(ErrorCode::TooLarge, self.to_string()),
            OpsError::Access(AccessError::Denied { .. }) => {
                ErrorReply::new(ErrorCode::PermissionDenied, self.to_string())
            }
            OpsError::Access(AccessError::NoProcess(_)) => {
                ErrorReply::new(ErrorCode::BadRequest, self.to_string())
            }
            _ => ErrorReply::new(ErrorCode::Internal, self.to_string()),
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SaveOutcome {
    /// Snapshot name.
    pub name: String,
    /// Process.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Pages covered.
    pub pages: u64,
    /// Pages that were present.
    pub present_pages: u64,
    /// Runs sent.
    pub runs: usize,
    /// Freeze method used.
    pub freeze: &'static str,
    /// Freeze to thaw, microseconds.
    pub pause_us: u64,
    /// Where the pause went.
    pub phases: Phases,
    /// Pages the VMM says it saved.
    pub vmm_pages: u64,
    /// Present pages the VMM says it saved.
    pub vmm_present_pages: u64,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreOutcome {
    /// Snapshot name.
    pub name: String,
    /// Process.
    pub pid: u32,
    /// Target pages.
    pub pages: u64,
    /// Target pages that had to be made resident or private first.
    pub touched_pages: usize,
    /// Runs sent.
    pub runs: usize,
    /// Freeze method used.
    pub freeze: &'static str,
    /// Freeze to thaw, microseconds.
    pub pause_us: u64,
    /// Where the pause went.
    pub phases: Phases,
    /// Pages the VMM says it copied.
    pub vmm_pages: u64,
}

/// Where the pause of an operation went, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Phases {
    /// Until the process was frozen.
    pub freeze_us: u64,
    /// Making restore targets resident (zero for save).
    pub touch_us: u64,
    /// Reading maps and pagemap, building runs.
    pub map_us: u64,
    /// The VMM's round trip.
    pub vmm_us: u64,
    /// Thawing.
    pub thaw_us: u64,
}

/// A stopwatch that hands out the time since its last lap.
struct Laps(Instant);

impl Laps {
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let d = micros(now - self.0);
        self.0 = now;
        d
    }
}

/// What a copy-out did (the benchmark baseline).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CopyOutcome {
    /// Bytes copied.
    pub bytes: u64,
    /// Freeze to thaw, microseconds.
    pub pause_us: u64,
}

/// On whose behalf the agent asks the VMM: the guest uid (from `SO_PEERCRED` for an
/// application, the agent's own for its CLI), the owner of the snapshot named when not
/// that uid (root only), and the host's token for a save the host asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Principal {
    /// Guest uid.
    pub uid: u32,
    /// Owner of the snapshot a restore or delete names, when not `uid`.
    pub owner: Option<u32>,
    /// Token of a host request (the snapshot becomes host-owned).
    pub host_token: Option<u64>,
}

impl Principal {
    /// Acting for guest uid `uid` on its own snapshots.
    pub fn uid(uid: u32) -> Self {
        Self {
            uid,
            ..Self::default()
        }
    }

    /// The effective uid of this process.
    pub fn current() -> Self {
        // SAFETY: geteuid has no preconditions.
        Self::uid(unsafe { libc::geteuid() })
    }

    /// `op` wrapped for the VMM.
    pub fn request(&self, op: Request) -> GuestRequest {
        GuestRequest {
            uid: self.uid,
            owner: self.owner,
            host_token: self.host_token,
            op,
        }
    }
}

/// How an operation holds its target still: freeze it (another process), or not (the
/// caller saving or restoring itself, blocked in the call meanwhile).
fn freeze_if(pid: u32, method: Option<FreezeMethod>) -> Result<Option<FreezeGuard>, OpsError> {
    Ok(match method {
        Some(m) => Some(FreezeGuard::freeze(pid, m)?),
        None => None,
    })
}

fn thaw(guard: Option<FreezeGuard>, start: Instant) -> Result<Duration, OpsError> {
    Ok(match guard {
        Some(g) => g.thaw()?,
        None => start.elapsed(),
    })
}

fn recheck(access: Option<&Access>) -> Result<(), OpsError> {
    if let Some(a) = access {
        a.recheck()?;
    }
    Ok(())
}

/// The target held still (or not, see [`freeze_if`]) and the time of each phase so far.
struct Held {
    guard: Option<FreezeGuard>,
    start: Instant,
    laps: Laps,
    phases: Phases,
}

impl Held {
    fn hold(pid: u32, method: Option<FreezeMethod>) -> Result<Self, OpsError> {
        let guard = freeze_if(pid, method)?;
        let start = guard.as_ref().map_or_else(Instant::now, |g| g.frozen_at());
        let mut laps = Laps(start);
        let phases = Phases {
            freeze_us: laps.lap(),
            ..Phases::default()
        };
        Ok(Self {
            guard,
            start,
            laps,
            phases,
        })
    }

    /// How the target is held: the freeze method's name, or "none".
    fn method(&self) -> &'static str {
        self.guard.as_ref().map_or("none", |g| g.method().name())
    }

    /// The runs are built: check the caller's access again, send `request` to the VMM,
    /// thaw. Returns the reply, the phases and the whole pause.
    fn ask(
        mut self,
        t: &mut dyn Transport,
        who: &Principal,
        access: Option<&Access>,
        request: Request,
    ) -> Result<(Reply, Phases, Duration), OpsError> {
        recheck(access)?;
        self.phases.map_us = self.laps.lap();
        let reply = call(t, &who.request(request))?;
        self.phases.vmm_us = self.laps.lap();
        let pause = thaw(self.guard, self.start)?;
        let p = &mut self.phases;
        p.thaw_us = micros(pause).saturating_sub(p.freeze_us + p.touch_us + p.map_us + p.vmm_us);
        Ok((reply, self.phases, pause))
    }
}

/// The command name of `pid`, cut to the protocol's limit.
pub fn comm_of(pid: u32) -> Result<String, PagemapError> {
    let path = format!("/proc/{pid}/comm");
    let s = std::fs::read_to_string(&path).map_err(|e| proc_error(pid, path, e))?;
    let mut c: String = s
        .trim_end_matches('\n')
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    while c.len() > MAX_COMM_LEN {
        c.pop();
    }
    Ok(c)
}

/// The ranges to work on: `ranges`, or the default selection when empty; checked
/// against the process's current maps.
fn select_ranges(pid: u32, ranges: &[VirtRange]) -> Result<Vec<VirtRange>, PagemapError> {
    select(pid, ranges).map(|(_, chosen)| chosen)
}

/// [`select_ranges`], also returning the maps it read.
fn select(pid: u32, ranges: &[VirtRange]) -> Result<(Vec<Mapping>, Vec<VirtRange>), PagemapError> {
    let maps = read_maps(pid)?;
    let chosen = if ranges.is_empty() {
        default_ranges(&maps)
    } else {
        ranges.to_vec()
    };
    if chosen.is_empty() {
        return Err(PagemapError::NothingToSave(pid));
    }
    check_ranges(pid, &maps, &chosen)?;
    Ok((maps, chosen))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Freeze `pid`, save `ranges` (default selection when empty) under `name`, thaw; for
/// the agent's own uid.
pub fn save_process(
    t: &mut dyn Transport,
    pid: u32,
    ranges: &[VirtRange],
    name: &str,
    method: FreezeMethod,
) -> Result<SaveOutcome, OpsError> {
    save_process_as(
        t,
        pid,
        ranges,
        name,
        Some(method),
        &Principal::current(),
        None,
    )
}

/// [`save_process`] on behalf of `who`: freeze with `method` (`None`: the target is
/// the blocked caller itself), and when `access` is given, check again after reading
/// the page map that the process is still the one the caller may access (a pid reused
/// or a process that became privileged meanwhile is refused before the VMM is asked).
pub fn save_process_as(
    t: &mut dyn Transport,
    pid: u32,
    ranges: &[VirtRange],
    name: &str,
    method: Option<FreezeMethod>,
    who: &Principal,
    access: Option<&Access>,
) -> Result<SaveOutcome, OpsError> {
    validate_name(name)?;
    let comm = comm_of(pid)?;
    // Check first, so a bad range or a kernel thread costs the process no pause; check
    // again once frozen, since the layout may have changed in between.
    select_ranges(pid, ranges)?;
    let held = Held::hold(pid, method)?;
    let used = held.method();
    let chosen = select_ranges(pid, ranges)?;
    let built = Pagemap::open(pid)?.runs(&chosen)?;
    let (pages, present_pages) = (built.pages(), built.present_pages());
    let runs = built.finish();
    if runs.len() > MAX_RUNS {
        return Err(OpsError::TooManyRuns(runs.len()));
    }
    let nruns = runs.len();
    let request = Request::Save(SaveRequest {
        name: name.to_string(),
        pid,
        comm: comm.clone(),
        runs,
    });
    let (reply, phases, pause) = held.ask(t, who, access, request)?;
    match reply {
        Reply::Saved {
            pages: vmm_pages,
            present_pages: vmm_present_pages,
            ..
        } => Ok(SaveOutcome {
            name: name.to_string(),
            pid,
            comm,
            pages,
            present_pages,
            runs: nruns,
            freeze: used,
            pause_us: micros(pause),
            phases,
            vmm_pages,
            vmm_present_pages,
        }),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &Reply) -> OpsError {
    let mut s = format!("{r:?}");
    s.truncate(200);
    OpsError::Client(ClientError::Unexpected(s))
}

/// Pages touched per `process_vm_readv`/`process_vm_writev` call (the kernel's
/// `IOV_MAX`): few system calls, which are slow in the guest.
const TOUCH_BATCH: usize = 1024;

/// A page to make resident and private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// Page address.
    pub addr: u64,
    /// Known to read as zero (an absent page of private anonymous memory): write a
    /// zero without reading first.
    pub zero: bool,
}

/// The pages of `range` that a restore cannot overwrite in place yet, from the range's
/// pagemap `entries`: in a private mapping every page that is not
/// [`is_private_resident`] (absent, shared copy-on-write, the zero page, or still the
/// file's page), in a shared mapping every absent page.
pub fn plan_touches(maps: &[Mapping], range: VirtRange, entries: &[u64]) -> Vec<Touch> {
    let mut out = Vec::new();
    for m in maps
        .iter()
        .filter(|m| m.end > range.start && m.start < range.end)
    {
        let anon = m.inode == 0;
        let mut va = m.start.max(range.start);
        while va < m.end.min(range.end) {
            let idx = ((va - range.start) / PAGE_SIZE) as usize;
            let raw = entries.get(idx).copied().unwrap_or(0);
            let state = decode_entry(raw);
            let ready = if m.private {
                is_private_resident(raw)
            } else {
                matches!(state, PageState::Present(_))
            };
            if !ready {
                out.push(Touch {
                    addr: va,
                    zero: anon && m.private && state == PageState::Absent,
                });
            }
            va += PAGE_SIZE;
        }
    }
    out
}

/// Make restore targets resident and private without changing their content, and
/// return the pagemap entries of each range afterwards. Only pages that need it are
/// touched (see [`plan_touches`]), so restoring into memory the process already wrote
/// costs one pagemap read. The process must be frozen.
pub fn make_resident(
    pid: u32,
    pm: &Pagemap,
    maps: &[Mapping],
    ranges: &[VirtRange],
) -> Result<(Vec<Vec<u64>>, usize), OpsError> {
    let mut all = Vec::with_capacity(ranges.len());
    let mut touched = 0;
    for r in ranges {
        let entries = pm.entries(*r)?;
        let plan = plan_touches(maps, *r, &entries);
        if plan.is_empty() {
            all.push(entries);
            continue;
        }
        touch_pages(pid, &plan)?;
        touched += plan.len();
        all.push(pm.entries(*r)?);
    }
    Ok((all, touched))
}

/// Touch `pages` of `pid`: read one byte of each page (unless known zero) and write the
/// same byte back. A write fault breaks copy-on-write and never leaves the shared zero
/// page mapped; only one byte per page moves because guest kernel code is emulated on
/// the development hosts and whole-page copies there are slow (docs/machine-notes.md), and
/// 1024 pages go in one `process_vm_readv`/`process_vm_writev`. Pages those calls
/// cannot reach (a read-only or `PROT_NONE` mapping) go through /proc/PID/mem, which
/// forces the access. The process must be frozen, or the byte could change between
/// read and write.
pub fn touch_pages(pid: u32, pages: &[Touch]) -> Result<(), OpsError> {
    let mut mem: Option<File> = None;
    let mut bytes = [0u8; TOUCH_BATCH];
    for batch in pages.chunks(TOUCH_BATCH) {
        let n = batch.len();
        bytes[..n].fill(0);
        let to_read: Vec<usize> = (0..n).filter(|&i| !batch[i].zero).collect();
        if !to_read.is_empty() {
            let addrs: Vec<u64> = to_read.iter().map(|&i| batch[i].addr).collect();
            let mut got = vec![0u8; addrs.len()];
            let done = vm_rw(pid, &addrs, &mut got, false)?;
            for (k, &va) in addrs.iter().enumerate().skip(done) {
                // Unreadable through process_vm_readv (PROT_NONE): /proc/PID/mem
                // forces the access.
                proc_mem(pid, &mut mem)?
                    .read_exact_at(&mut got[k..=k], va)
                    .map_err(|source| OpsError::Mem {
                        pid,
                        addr: va,
                        source,
                    })?;
            }
            for (k, &i) in to_read.iter().enumerate() {
                bytes[i] = got[k];
            }
        }
        let addrs: Vec<u64> = batch.iter().map(|t| t.addr).collect();
        let done = vm_rw(pid, &addrs, &mut bytes[..n], true)?;
        for (i, &va) in addrs.iter().enumerate().skip(done) {
            proc_mem(pid, &mut mem)?
                .write_all_at(&bytes[i..=i], va)
                .map_err(|source| OpsError::Mem {
                    pid,
                    addr: va,
                    source,
                })?;
        }
    }
    Ok(())
}

fn proc_mem(pid: u32, slot: &mut Option<File>) -> Result<&File, OpsError> {
    if slot.is_none() {
        let path = format!("/proc/{pid}/mem");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| proc_error(pid, path, e))?;
        *slot = Some(f);
    }
    Ok(slot.as_ref().expect("just set"))
}

/// Read (or write) one byte at each of `addrs` in process `pid` into (from) `bytes`
/// with one system call; returns how many leading addresses were done (the kernel
/// stops at the first page it cannot access).
fn vm_rw(pid: u32, addrs: &[u64], bytes: &mut [u8], write: bool) -> Result<usize, OpsError> {
    let local = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: addrs.len(),
    };
    let remote: Vec<libc::iovec> = addrs
        .iter()
        .map(|&a| libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: 1,
        })
        .collect();
    let p = libc::pid_t::try_from(pid).map_err(|_| PagemapError::NoProcess(pid))?;
    // SAFETY: `local` describes `bytes` (addrs.len() <= bytes.len() bytes, valid for
    // reads and writes); the remote iovecs name addresses in the other process, which
    // the kernel checks; nothing in this process is touched beyond `bytes`.
    let n = unsafe {
        if write {
            libc::process_vm_writev(p, &local, 1, remote.as_ptr(), remote.len() as _, 0)
        } else {
            libc::process_vm_readv(p, &local, 1, remote.as_ptr(), remote.len() as _, 0)
        }
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Err(PagemapError::NoProcess(pid).into()),
            // The first page failed: let the caller fall back for all of them.
            Some(libc::EFAULT) | Some(libc::EPERM) | Some(libc::ENOSYS) => Ok(0),
            _ => Err(OpsError::Mem {
                pid,
                addr: addrs.first().copied().unwrap_or(0),
                source: e,
            }),
        };
    }
    Ok(n as usize)
}

/// Freeze `pid`, make the target pages of `ranges` (default selection when empty)
/// resident, find their guest-physical pages, ask the VMM to copy snapshot `name` into
/// them, thaw; for the agent's own uid.
pub fn restore_process(
    t: &mut dyn Transport,
    pid: u32,
    ranges: &[VirtRange],
    name: &str,
    method: FreezeMethod,
) -> Result<RestoreOutcome, OpsError> {
    restore_process_as(
        t,
        pid,
        ranges,
        name,
        Some(method),
        &Principal::current(),
        None,
    )
}

/// [`restore_process`] on behalf of `who` (see [`save_process_as`]). The targets are
/// always pages of `pid`, read from its page map here.
pub fn restore_process_as(
    t: &mut dyn Transport,
    pid: u32,
    ranges: &[VirtRange],
    name: &str,
    method: Option<FreezeMethod>,
    who: &Principal,
    access: Option<&Access>,
) -> Result<RestoreOutcome, OpsError> {
    validate_name(name)?;
    select_ranges(pid, ranges)?;
    let mut held = Held::hold(pid, method)?;
    let used = held.method();
    let (maps, chosen) = select(pid, ranges)?;
    let pm = Pagemap::open(pid)?;
    let (entries, touched) = make_resident(pid, &pm, &maps, &chosen)?;
    held.phases.touch_us = held.laps.lap();
    let mut b = RunBuilder::new();
    for (r, e) in chosen.iter().zip(&entries) {
        b.push_entries(r.start, e)?;
    }
    let runs = b.finish();
    if let Some(r) = runs.iter().find(|r| !r.present) {
        return Err(OpsError::NotResident(r.virt_addr));
    }
    if runs.len() > MAX_RUNS {
        return Err(OpsError::TooManyRuns(runs.len()));
    }
    let (pages, nruns) = (total_pages(&runs), runs.len());
    let request = Request::Restore(RestoreRequest {
        name: name.to_string(),
        runs,
    });
    let (reply, phases, pause) = held.ask(t, who, access, request)?;
    match reply {
        Reply::Restored {
            pages: vmm_pages, ..
        } => Ok(RestoreOutcome {
            name: name.to_string(),
            pid,
            pages,
            touched_pages: touched,
            runs: nruns,
            freeze: used,
            pause_us: micros(pause),
            phases,
            vmm_pages,
        }),
        other => Err(unexpected(&other)),
    }
}

/// The baseline a copying snapshot would pay: freeze `pid`, read `ranges` (default
/// selection when empty) from /proc/PID/mem into the file `out`, thaw.
pub fn copy_out_process(
    pid: u32,
    ranges: &[VirtRange],
    out: &Path,
    method: FreezeMethod,
) -> Result<CopyOutcome, OpsError> {
    select_ranges(pid, ranges)?;
    let guard = FreezeGuard::freeze(pid, method)?;
    let chosen = select_ranges(pid, ranges)?;
    let bytes = copy_ranges(pid, &chosen, out)?;
    let pause = guard.thaw()?;
    Ok(CopyOutcome {
        bytes,
        pause_us: micros(pause),
    })
}

/// Copy `ranges` of `pid`'s memory into the file `out`; returns the bytes copied.
pub fn copy_ranges(pid: u32, ranges: &[VirtRange], out: &Path) -> Result<u64, OpsError> {
    let path = format!("/proc/{pid}/mem");
    let mem = File::open(&path).map_err(|e| proc_error(pid, path, e))?;
    let out_err = |source| OpsError::Output {
        path: out.display().to_string(),
        source,
    };
    let mut file = File::create(out).map_err(out_err)?;
    let mut buf = vec![0u8; MEM_CHUNK];
    let mut bytes = 0u64;
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = ((r.end - at) as usize).min(MEM_CHUNK);
            mem.read_exact_at(&mut buf[..n], at)
                .map_err(|source| OpsError::Mem {
                    pid,
                    addr: at,
                    source,
                })?;
            file.write_all(&buf[..n]).map_err(out_err)?;
            at += n as u64;
            bytes += n as u64;
        }
    }
    Ok(bytes)
}

/// Answer one VMM request frame received on the agent port: decode, validate, run the
/// save, and return the reply (never an error: failures become error replies).
pub fn handle_agent_frame(t: &mut dyn Transport, frame: &[u8], method: FreezeMethod) -> Reply {
    let req = match AgentRequest::decode(frame).and_then(|r| r.validate().map(|()| r)) {
        Ok(r) => r,
        Err(e) => return Reply::Error(ErrorReply::from(&e)),
    };
    match req {
        AgentRequest::SnapshotProcess {
            name,
            pid,
            ranges,
            token,
        } => {
            // The host's request: the snapshot is host-owned (the VMM checks the token).
            let who = Principal {
                host_token: Some(token),
                ..Principal::current()
            };
            match save_process_as(t, pid, &ranges, &name, Some(method), &who, None) {
                Ok(o) => {
                    log::info!(
                        "saved pid {} as {}: {} pages ({} present) in {} runs, pause {} us",
                        o.pid,
                        o.name,
                        o.pages,
                        o.present_pages,
                        o.runs,
                        o.pause_us
                    );
                    Reply::Saved {
                        name: o.name,
                        pages: o.vmm_pages,
                        present_pages: o.vmm_present_pages,
                    }
                }
                Err(e) => {
                    log::warn!("snapshot of pid {pid} as {name} failed: {e}");
                    Reply::Error(e.to_reply())
                }
            }
        }
    }
}

/// Serve one connection on the agent port: read one request frame, answer it.
pub fn serve_connection<S: std::io::Read + std::io::Write>(
    conn: &mut S,
    t: &mut dyn Transport,
    method: FreezeMethod,
) -> Result<(), ProtocolError> {
    let reply = match read_frame(conn) {
        Ok(Some(frame)) => handle_agent_frame(t, &frame, method),
        Ok(None) => return Ok(()),
        Err(e) => Reply::Error(ErrorReply::from(&e)),
    };
    write_frame(conn, &reply.encode()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(pid: u32, ranges: &[VirtRange]) -> Vec<u8> {
        let mem = File::open(format!("/proc/{pid}/mem")).expect("mem");
        let mut out = Vec::new();
        for r in ranges {
            let mut b = vec![0u8; (r.end - r.start) as usize];
            mem.read_exact_at(&mut b, r.start).expect("read");
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn touch_plans() {
        let m = |start: u64, end: u64, private, inode| Mapping {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            private,
            inode,
            name: String::new(),
        };
        let maps = [m(0x1000, 0x4000, true, 0), m(0x4000, 0x6000, false, 9)];
        let p = 1u64 << 63;
        let ex = 1u64 << 56;
        let file = 1u64 << 61;
        let entries = [
            p | ex | 7,   // 0x1000 private resident: ready
            0,            // 0x2000 absent anon: zero
            p | 8,        // 0x3000 shared (zero page or forked): touch, read
            p | file | 9, // 0x4000 shared mapping, present: ready
            0,            // 0x5000 shared mapping, absent: touch, read
        ];
        let plan = plan_touches(
            &maps,
            VirtRange {
                start: 0x1000,
                end: 0x6000,
            },
            &entries,
        );
        assert_eq!(
            plan,
            vec![
                Touch {
                    addr: 0x2000,
                    zero: true
                },
                Touch {
                    addr: 0x3000,
                    zero: false
                },
                Touch {
                    addr: 0x5000,
                    zero: false
                },
            ]
        );
    }

    #[test]
    fn touch_makes_pages_present_without_changing_them() {
        pmsnap_testenv::require!(
            "touch_makes_pages_present_without_changing_them",
            pmsnap_testenv::root_unavailable("pagemap frames and other processes' memory")
        );
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // Give it time to exec so the maps are sleep's.
        std::thread::sleep(Duration::from_millis(100));
        let maps = read_maps(pid).expect("maps");
        let mut ranges = default_ranges(&maps);
        // A read-only private file mapping too: process_vm_writev cannot write it,
        // the /proc/PID/mem fallback can.
        let ro = maps
            .iter()
            .find(|m| m.read && !m.write && m.private && m.inode != 0)
            .expect("a read-only file mapping");
        ranges.push(VirtRange {
            start: ro.start,
            end: ro.start + PAGE_SIZE,
        });
        let pm = Pagemap::open(pid).expect("pagemap");
        let absent_before: usize = ranges
            .iter()
            .map(|r| {
                pm.entries(*r)
                    .expect("entries")
                    .iter()
                    .filter(|&&e| decode_entry(e) == PageState::Absent)
                    .count()
            })
            .sum();
        let ro_range = *ranges.last().expect("ro range");
        let ro_before = decode_entry(pm.entries(ro_range).expect("entries")[0]);
        let guard = FreezeGuard::freeze(pid, FreezeMethod::Signal).expect("freeze");
        let before = snapshot(pid, &ranges);
        let (entries, touched) = make_resident(pid, &pm, &maps, &ranges).expect("touch");
        let after = snapshot(pid, &ranges);
        // Touched again: nothing left to do.
        let (_, again) = make_resident(pid, &pm, &maps, &ranges).expect("touch");
        drop(guard);
        assert!(touched >= absent_before, "{touched} < {absent_before}");
        assert_eq!(again, 0);
        for (r, e) in ranges.iter().zip(&entries) {
            assert_eq!(e, &pm.entries(*r).expect("entries"));
        }
        assert_eq!(before, after, "content unchanged");
        for r in &ranges {
            for (i, e) in pm.entries(*r).expect("entries").iter().enumerate() {
                assert!(
                    is_private_resident(*e)
                        && matches!(decode_entry(*e), PageState::Present(p) if p != 0),
                    "page {:#x} not present after touch",
                    r.start + i as u64 * PAGE_SIZE
                );
            }
        }
        // The read-only page was written (forced): now a private copy, not the page
        // cache page it was.
        let ro_after = decode_entry(pm.entries(ro_range).expect("entries")[0]);
        if let PageState::Present(p) = ro_before {
            assert_ne!(ro_after, PageState::Present(p), "read-only page was copied");
        }
        eprintln!(
            "touched {} ranges, {absent_before} pages were absent",
            ranges.len()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
