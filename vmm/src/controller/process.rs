//! The snapshot service the guest agent talks to: save a process's pages (no copy, the
//! pages become copy-before-write), restore them into the pages that now back a target
//! region, list and delete process snapshots.
//!
//! Requests arrive decoded and validated against the guest-physical address space by
//! the vsock agent service. Guest-physical page numbers are translated to pool RAM pages
//! here (guest RAM above 4 GiB sits after the MMIO gap in the pool).
//!
//! The agent's full run list, absent (never touched) runs included, is kept in the
//! snapshot's state blob; the store's page runs are the present runs only, with the
//! virtual address of each.
//!
//! Ownership (issue 12): every request names the guest uid it is made for (the agent
//! learned it from the kernel; only guest root reaches this service, see
//! `AgentServiceFactory`). A save creates a snapshot owned by that uid, stored as
//! `guest:UID/NAME`, unless it carries the token of a host request (`ctl
//! snapshot-process`), which makes it host-owned under its plain name. Restore, delete
//! and list see guest-owned snapshots only: a uid its own, root (uid 0) every uid's.
//! Host-owned snapshots cannot be named from the guest at all.

use std::sync::Arc;

use guest_agent::protocol::{
    self, ErrorCode, ErrorReply, GuestRequest, Reply, Request, RestoreRequest, Run, SaveRequest,
};
use log::info;
use pmem_backend::{Owner, PageRun, PoolError, ProcessInfo, SnapshotKind, SnapshotMeta};

use super::HostGrants;
use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
use crate::devices::virtio::vsock::AgentBackend;
use crate::snapshot::engine::{lock_pool, Engine};

const PAGE: u64 = 4096;

/// Number of guest-physical pages the agent may name for `mem_bytes` of RAM (the
/// address space up to the end of RAM, the MMIO gap included).
pub fn guest_phys_pages(mem_bytes: u64) -> u64 {
    if mem_bytes <= MMIO_GAP_START {
        mem_bytes / PAGE
    } else {
        (MMIO_GAP_END + (mem_bytes - MMIO_GAP_START)) / PAGE
    }
}

/// Translate guest-physical pages `first..first+count` to pool RAM page runs; `None` when
/// any page lies in the MMIO gap or past RAM.
pub fn gpa_to_ram(first: u64, count: u64, mem_bytes: u64) -> Option<Vec<PageRun>> {
    let (gap_first, gap_end) = (MMIO_GAP_START / PAGE, MMIO_GAP_END / PAGE);
    let ram_pages = mem_bytes / PAGE;
    let end = first.checked_add(count)?;
    let mut out = Vec::new();
    let low_end = end.min(gap_first).min(ram_pages);
    if first < low_end {
        out.push(PageRun::new(first, low_end - first));
    }
    if end > low_end {
        // Whatever is left must be above the gap.
        let start = first.max(low_end);
        if start < gap_end || mem_bytes <= MMIO_GAP_START {
            return None;
        }
        let ram_first = start - (gap_end - gap_first);
        if ram_first + (end - start) > ram_pages {
            return None;
        }
        out.push(PageRun::new(ram_first, end - start));
    }
    Some(out)
}

/// The state blob of a process snapshot: the agent's runs as sent (JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct ProcessBlob {
    runs: Vec<Run>,
}

/// What guest users together may keep in the store. Guest-owned snapshots are created
/// only within these limits, so guests alone cannot fill the block area; the host's own
/// snapshots are never counted or dropped for them (docs/pool-format.md, "When the block
/// area is full").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLimits {
    /// Bytes of blocks and metadata that all guest-owned snapshots together may claim
    /// (see [`guest_charge`]); `None`: a quarter of the block area.
    pub quota_bytes: Option<u64>,
    /// Guest-owned snapshots per guest uid.
    pub max_per_uid: usize,
    /// Guest-owned snapshots in all (so a List for guest root is complete, and small).
    pub max_total: usize,
}

impl Default for GuestLimits {
    fn default() -> Self {
        Self {
            quota_bytes: None,
            max_per_uid: 256,
            max_total: 1024,
        }
    }
}

/// Catalog bytes a snapshot costs beyond its runs (name, owner, times, labels, process
/// info, at most): charged to guest snapshots.
const CATALOG_BYTES_PER_SNAPSHOT: u64 = 512;
/// Catalog bytes per page run.
const CATALOG_BYTES_PER_RUN: u64 = 24;

/// What a guest snapshot may come to cost the store: a block for each of its pages (it
/// takes one when the page is first written), the blocks of its state blob (the agent's
/// run list, absent runs included) and its catalog entry.
pub fn guest_charge(pages: u64, state_len: u64, runs: u64) -> u64 {
    pages
        .saturating_mul(PAGE)
        .saturating_add(state_len.div_ceil(PAGE) * PAGE)
        .saturating_add(CATALOG_BYTES_PER_SNAPSHOT)
        .saturating_add(runs.saturating_mul(CATALOG_BYTES_PER_RUN))
}

/// Serves the agent protocol on top of the engine.
#[derive(Debug)]
pub struct ProcessService {
    engine: Arc<Engine>,
    grants: Arc<HostGrants>,
    mem_bytes: u64,
    limits: GuestLimits,
}

impl ProcessService {
    /// A service for a guest with `mem_bytes` of RAM; saves carrying a token of
    /// `grants` become host-owned; guest-owned snapshots stay within `limits`.
    pub fn new(
        engine: Arc<Engine>,
        grants: Arc<HostGrants>,
        mem_bytes: u64,
        limits: GuestLimits,
    ) -> Self {
        Self {
            engine,
            grants,
            mem_bytes,
            limits,
        }
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// The guest quota in bytes.
    pub fn quota_bytes(&self) -> u64 {
        self.limits.quota_bytes.unwrap_or_else(|| {
            let blocks = lock_pool(self.engine.pool()).geometry().block_count;
            blocks * PAGE / 4
        })
    }

    /// Refuse a new snapshot of guest `uid` that would break the limits: its count
    /// per uid, the count in all, or the quota (counting what it may come to cost).
    fn check_limits(&self, uid: u32, charge: u64) -> Result<(), ErrorReply> {
        let quota = self.quota_bytes();
        let (mut used, mut total, mut of_uid) = (0u64, 0usize, 0usize);
        for s in lock_pool(self.engine.pool()).list() {
            if let Owner::Guest(o) = s.owner {
                used = used.saturating_add(guest_charge(s.pages, s.state_len, s.runs.len() as u64));
                total += 1;
                of_uid += usize::from(o == uid);
            }
        }
        let refuse = |m: String| {
            crate::guest_warn!("snapshot service: refusing a save of uid {uid}: {m}");
            Err(ErrorReply::new(ErrorCode::NoSpace, m))
        };
        if of_uid >= self.limits.max_per_uid {
            return refuse(format!(
                "uid {uid} has {of_uid} snapshots, the most a guest uid may keep; delete one"
            ));
        }
        if total >= self.limits.max_total {
            return refuse(format!(
                "guest users have {total} snapshots, the most the guest may keep"
            ));
        }
        if used.saturating_add(charge) > quota {
            return refuse(format!(
                "guest quota exceeded: guest snapshots may claim {} KiB of the store, they \
                 claim {} KiB and this one needs {} KiB",
                quota >> 10,
                used >> 10,
                charge >> 10
            ));
        }
        Ok(())
    }

    fn ram_runs(&self, r: &Run) -> Result<Vec<PageRun>, ErrorReply> {
        gpa_to_ram(r.guest_phys_first_page, r.count, self.mem_bytes).ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::RunOutOfRange,
                format!(
                    "guest pages {}+{} are not guest RAM",
                    r.guest_phys_first_page, r.count
                ),
            )
        })
    }

    /// Who a save's snapshot belongs to: the host when the request carries the token
    /// of a host request for this name, else the requesting guest uid.
    fn save_owner(
        &self,
        uid: u32,
        owner: Option<u32>,
        host_token: Option<u64>,
        name: &str,
    ) -> Result<Owner, ErrorReply> {
        if owner.is_some_and(|o| o != uid) {
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                "a save creates a snapshot of the requesting uid only",
            ));
        }
        match host_token {
            None => Ok(Owner::Guest(uid)),
            Some(t) if self.grants.take(t, name) => Ok(Owner::Host),
            Some(_) => Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!("no host request for a snapshot {name:?} with this token"),
            )),
        }
    }

    /// The store name of guest snapshot `name` that a request of `uid` addresses: its
    /// own, or (root only) `owner`'s.
    fn guest_name(uid: u32, owner: Option<u32>, name: &str) -> Result<String, ErrorReply> {
        let owner = owner.unwrap_or(uid);
        if owner != uid && uid != 0 {
            return Err(ErrorReply::new(
                ErrorCode::PermissionDenied,
                format!("uid {uid} may not use snapshots of uid {owner}"),
            ));
        }
        Ok(Owner::Guest(owner).qualify(name))
    }

    fn save(&self, s: SaveRequest, owner: Owner) -> Result<Reply, ErrorReply> {
        let store_name = owner.qualify(&s.name);
        let mut runs = Vec::new();
        let mut vas = Vec::new();
        for r in s.runs.iter().filter(|r| r.present) {
            let mut va = r.virt_addr;
            for rr in self.ram_runs(r)? {
                runs.push(rr);
                vas.push(va);
                va += rr.count * PAGE;
            }
        }
        let total = protocol::total_pages(&s.runs);
        let present: u64 = runs.iter().map(|r| r.count).sum();
        let state = serde_json::to_vec(&ProcessBlob {
            runs: s.runs.clone(),
        })
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        if let Owner::Guest(uid) = owner {
            self.check_limits(
                uid,
                guest_charge(present, state.len() as u64, runs.len() as u64),
            )?;
        }
        let meta = SnapshotMeta {
            owner,
            labels: Vec::new(),
            state,
            process: Some(ProcessInfo {
                pid: s.pid,
                comm: s.comm.clone(),
                run_vas: vas,
            }),
        };
        self.engine
            .snapshot(&store_name, SnapshotKind::Process, &runs, meta)
            .map_err(|e| store_error_named(e, &s.name))?;
        info!(
            "process snapshot {store_name:?} of pid {} ({}): {total} pages, {present} present, {} runs",
            s.pid,
            s.comm,
            runs.len()
        );
        Ok(Reply::Saved {
            name: s.name,
            pages: total,
            present_pages: present,
        })
    }

    /// The run list of process snapshot `name` (a store name).
    fn blob(&self, name: &str) -> Result<ProcessBlob, ErrorReply> {
        let pool = lock_pool(self.engine.pool());
        let info = pool.inspect(name).map_err(store_error)?;
        if info.owner == Owner::Host {
            // Not reachable through guest_name (host names have no "guest:" prefix);
            // checked anyway: host snapshots are never served to the guest.
            return Err(ErrorReply::new(ErrorCode::NotFound, "no such snapshot"));
        }
        if info.kind != SnapshotKind::Process {
            return Err(ErrorReply::new(
                ErrorCode::BadRequest,
                format!(
                    "snapshot {name:?} is a {} snapshot, not a process snapshot",
                    info.kind.as_str()
                ),
            ));
        }
        let state = pool.read_state(name).map_err(store_error)?;
        serde_json::from_slice(&state).map_err(|e| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!("snapshot {name:?} has an unreadable run list: {e}"),
            )
        })
    }

    fn restore(&self, r: RestoreRequest, store_name: &str) -> Result<Reply, ErrorReply> {
        let blob = self.blob(store_name)?;
        let want = protocol::total_pages(&blob.runs);
        let got = protocol::total_pages(&r.runs);
        if want != got {
            return Err(ErrorReply::new(
                ErrorCode::SizeMismatch,
                format!(
                    "snapshot {:?} holds {want} pages but the target has {got}",
                    r.name
                ),
            ));
        }
        // Source pages in snapshot order: Some(ram page) or None (absent: zero).
        let mut sources: Vec<Option<u64>> = Vec::with_capacity(want as usize);
        for run in &blob.runs {
            if run.present {
                for rr in self.ram_runs(run)? {
                    sources.extend((rr.first..rr.end()).map(Some));
                }
            } else {
                sources.extend(std::iter::repeat_n(None, run.count as usize));
            }
        }
        let mut targets: Vec<u64> = Vec::with_capacity(want as usize);
        for run in &r.runs {
            for rr in self.ram_runs(run)? {
                targets.extend(rr.first..rr.end());
            }
        }
        // Read everything first: a target may be another source page of the same
        // snapshot, and write_ram_page preserves it before overwriting, but reading all
        // sources up front keeps the copy independent of the order.
        let zero = [0u8; protocol::PAGE_SIZE as usize];
        let mut pool = lock_pool(self.engine.pool());
        let mut pages = Vec::with_capacity(sources.len());
        for src in &sources {
            pages.push(match src {
                Some(p) => {
                    pool.read_snapshot_page(store_name, *p)
                        .map_err(store_error)?
                        .1
                }
                None => zero,
            });
        }
        for (t, data) in targets.iter().zip(&pages) {
            pool.write_ram_page(*t, data).map_err(store_error)?;
        }
        drop(pool);
        self.engine.after_vmm_write(&targets);
        Ok(Reply::Restored {
            name: r.name,
            pages: got,
        })
    }

    /// The guest-owned process snapshots `uid` may see: its own, or all for root.
    fn list(&self, uid: u32) -> Reply {
        let pool = lock_pool(self.engine.pool());
        let list = pool
            .list()
            .into_iter()
            .filter(|s| s.kind == SnapshotKind::Process)
            .filter_map(|s| match s.owner {
                Owner::Guest(o) if uid == 0 || o == uid => Some((o, s)),
                _ => None,
            })
            .take(protocol::MAX_LIST_ENTRIES)
            .map(|(owner, s)| {
                let (pid, comm) = s
                    .process
                    .as_ref()
                    .map(|p| (p.pid, p.comm.clone()))
                    .unwrap_or_default();
                let total = pool
                    .read_state(s.name.as_str())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ProcessBlob>(&b).ok())
                    .map_or(s.pages, |b| protocol::total_pages(&b.runs));
                let name = Owner::split(&s.name).map_or_else(|| s.name.clone(), |(_, n)| n.into());
                protocol::SnapshotInfo {
                    name,
                    uid: owner,
                    pid,
                    comm,
                    pages: total,
                    present_pages: s.pages,
                    runs: s.runs.len() as u32,
                    created_unix: s.created_unix_ns / 1_000_000_000,
                }
            })
            .collect();
        Reply::List(list)
    }

    fn delete(&self, name: String, store_name: &str) -> Result<Reply, ErrorReply> {
        self.blob(store_name)?;
        self.engine.delete(store_name).map_err(store_error)?;
        Ok(Reply::Deleted { name })
    }
}

/// [`store_error`], naming the snapshot as the guest knows it (without the store's
/// `guest:UID/` prefix) where the store's message would show the store name.
fn store_error_named(e: PoolError, name: &str) -> ErrorReply {
    match e {
        PoolError::DuplicateName(_) => ErrorReply::new(
            ErrorCode::AlreadyExists,
            format!("a snapshot named {name:?} exists already"),
        ),
        other => store_error(other),
    }
}

fn store_error(e: PoolError) -> ErrorReply {
    let code = match &e {
        PoolError::NoSuchSnapshot(_) => ErrorCode::NotFound,
        PoolError::DuplicateName(_) => ErrorCode::AlreadyExists,
        PoolError::PageOutOfRange { .. } => ErrorCode::RunOutOfRange,
        PoolError::BlockAreaFull { .. } | PoolError::MetadataFull { .. } => ErrorCode::NoSpace,
        PoolError::InvalidArgument(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    ErrorReply::new(code, e.to_string())
}

impl AgentBackend for ProcessService {
    fn handle(&mut self, req: GuestRequest) -> Reply {
        let GuestRequest {
            uid,
            owner,
            host_token,
            op,
        } = req;
        let res = match op {
            Request::Save(s) => self
                .save_owner(uid, owner, host_token, &s.name)
                .and_then(|o| self.save(s, o)),
            Request::Restore(r) => {
                Self::guest_name(uid, owner, &r.name).and_then(|st| self.restore(r, &st))
            }
            Request::List => Ok(self.list(uid)),
            Request::Delete { name } => {
                Self::guest_name(uid, owner, &name).and_then(|st| self.delete(name, &st))
            }
        };
        res.unwrap_or_else(Reply::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::testutil::setup;

    fn run(gpa: u64, count: u64, va: u64, present: bool) -> Run {
        Run {
            guest_phys_first_page: gpa,
            count,
            virt_addr: va,
            present,
        }
    }

    fn handle(svc: &mut ProcessService, uid: u32, op: Request) -> Reply {
        svc.handle(GuestRequest::new(uid, op))
    }

    fn err_code(r: Reply) -> ErrorCode {
        match r {
            Reply::Error(e) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn save_scribble_restore_elsewhere_and_errors() {
        let (_dir, engine, ram) = setup(64);
        let engine = Arc::new(engine);
        let grants = Arc::new(HostGrants::default());
        let mut svc = ProcessService::new(
            engine.clone(),
            grants.clone(),
            64 * PAGE,
            GuestLimits::default(),
        );
        for p in 0..64 {
            ram.fill_page(p, p as u8);
        }
        // A process with 3 pages at 0x1000 (gpa 10, 11 and 20) and 2 untouched pages.
        let saved = handle(
            &mut svc,
            1000,
            Request::Save(SaveRequest {
                name: "proc".into(),
                pid: 42,
                comm: "memtest".into(),
                runs: vec![
                    run(10, 2, 0x1000, true),
                    run(0, 2, 0x3000, false),
                    run(20, 1, 0x5000, true),
                ],
            }),
        );
        assert_eq!(
            saved,
            Reply::Saved {
                name: "proc".into(),
                pages: 5,
                present_pages: 3
            }
        );
        for p in [10, 11, 20] {
            ram.fill_page(p, 0xee); // scribble: preserved first
        }
        // Restore into a fresh process whose 5 pages sit at gpa 30..35.
        let restored = handle(
            &mut svc,
            1000,
            Request::Restore(RestoreRequest {
                name: "proc".into(),
                runs: vec![run(30, 5, 0x7000_0000, true)],
            }),
        );
        assert_eq!(
            restored,
            Reply::Restored {
                name: "proc".into(),
                pages: 5
            }
        );
        let pool = lock_pool(engine.pool());
        let want = [10u8, 11, 0, 0, 20];
        for (i, w) in want.iter().enumerate() {
            let page = pool.read_ram_page(30 + i as u64).expect("read");
            assert!(page.iter().all(|b| b == w), "target page {i} holds {w}");
        }
        drop(pool);
        match handle(&mut svc, 1000, Request::List) {
            Reply::List(l) => {
                assert_eq!(l.len(), 1);
                assert_eq!((l[0].pid, l[0].pages, l[0].present_pages), (42, 5, 3));
            }
            other => panic!("list: {other:?}"),
        }
        // Errors: wrong size, unknown name, a page snapshot is not a process snapshot.
        let wrong = handle(
            &mut svc,
            1000,
            Request::Restore(RestoreRequest {
                name: "proc".into(),
                runs: vec![run(30, 4, 0, true)],
            }),
        );
        assert_eq!(err_code(wrong), ErrorCode::SizeMismatch);
        let unknown = handle(
            &mut svc,
            1000,
            Request::Delete {
                name: "nope".into(),
            },
        );
        assert_eq!(err_code(unknown), ErrorCode::NotFound);
        engine
            .snapshot(
                "pages",
                SnapshotKind::Pages,
                &[PageRun::new(50, 1)],
                Default::default(),
            )
            .expect("page snapshot");
        // A host snapshot is invisible to the guest: not even "not a process snapshot".
        let host = handle(
            &mut svc,
            1000,
            Request::Delete {
                name: "pages".into(),
            },
        );
        assert_eq!(err_code(host), ErrorCode::NotFound);
        let dup = handle(
            &mut svc,
            1000,
            Request::Save(SaveRequest {
                name: "proc".into(),
                pid: 1,
                comm: "x".into(),
                runs: vec![run(1, 1, 0, true)],
            }),
        );
        assert_eq!(err_code(dup), ErrorCode::AlreadyExists);
        assert_eq!(
            handle(
                &mut svc,
                1000,
                Request::Delete {
                    name: "proc".into()
                }
            ),
            Reply::Deleted {
                name: "proc".into()
            }
        );
    }

    fn save_req(name: &str, gpa: u64) -> Request {
        Request::Save(SaveRequest {
            name: name.into(),
            pid: 7,
            comm: "t".into(),
            runs: vec![run(gpa, 2, 0x1000, true)],
        })
    }

    fn names(r: Reply) -> Vec<(u32, String)> {
        match r {
            Reply::List(l) => l.into_iter().map(|s| (s.uid, s.name)).collect(),
            other => panic!("list: {other:?}"),
        }
    }

    #[test]
    fn guest_snapshots_stay_within_the_quota_and_the_counts_host_ones_are_not_counted() {
        let (_dir, engine, _ram) = setup(64);
        let engine = Arc::new(engine);
        let grants = Arc::new(HostGrants::default());
        // Two 2-page snapshots do not fit 20 KiB (each may claim 2 blocks, a state
        // block and its catalog entry: 12.5 KiB).
        let limits = GuestLimits {
            quota_bytes: Some(20 << 10),
            max_per_uid: 3,
            max_total: 4,
        };
        let mut svc = ProcessService::new(engine.clone(), grants.clone(), 64 * PAGE, limits);
        assert!(matches!(
            handle(&mut svc, 1000, save_req("a", 2)),
            Reply::Saved { .. }
        ));
        let over = handle(&mut svc, 1001, save_req("b", 2));
        assert_eq!(err_code(over), ErrorCode::NoSpace);
        // A host-owned save (ctl snapshot-process) is not the guest's to pay.
        let host_save = GuestRequest {
            host_token: Some(grants.grant("h")),
            ..GuestRequest::new(0, save_req("h", 8))
        };
        assert!(matches!(svc.handle(host_save), Reply::Saved { .. }));
        // Deleting frees the quota.
        assert!(matches!(
            handle(&mut svc, 1000, Request::Delete { name: "a".into() }),
            Reply::Deleted { .. }
        ));
        assert!(matches!(
            handle(&mut svc, 1001, save_req("b", 2)),
            Reply::Saved { .. }
        ));

        // The counts, with quota to spare: 3 per uid, 4 in all.
        let limits = GuestLimits {
            quota_bytes: Some(1 << 30),
            ..limits
        };
        let mut svc = ProcessService::new(engine.clone(), grants, 64 * PAGE, limits);
        for n in ["c1", "c2"] {
            assert!(matches!(
                handle(&mut svc, 1001, save_req(n, 1)),
                Reply::Saved { .. }
            ));
        }
        let fourth = handle(&mut svc, 1001, save_req("c3", 1));
        assert_eq!(err_code(fourth), ErrorCode::NoSpace, "3 per uid");
        assert!(matches!(
            handle(&mut svc, 1002, save_req("d", 1)),
            Reply::Saved { .. }
        ));
        let fifth = handle(&mut svc, 1003, save_req("e", 1));
        assert_eq!(err_code(fifth), ErrorCode::NoSpace, "4 in all");
        // The default quota is a quarter of the block area (64 blocks here).
        let svc = ProcessService::new(
            engine,
            Arc::new(HostGrants::default()),
            64 * PAGE,
            GuestLimits::default(),
        );
        assert_eq!(svc.quota_bytes(), 16 * PAGE);
    }

    #[test]
    fn snapshots_belong_to_their_owner() {
        let (_dir, engine, _ram) = setup(64);
        let engine = Arc::new(engine);
        let grants = Arc::new(HostGrants::default());
        let mut svc = ProcessService::new(
            engine.clone(),
            grants.clone(),
            64 * PAGE,
            GuestLimits::default(),
        );
        // Root's, user 1000's and the host's snapshot, all named "s": separate name
        // spaces, no collision.
        assert!(matches!(
            handle(&mut svc, 0, save_req("s", 1)),
            Reply::Saved { .. }
        ));
        assert!(matches!(
            handle(&mut svc, 1000, save_req("s", 3)),
            Reply::Saved { .. }
        ));
        let token = grants.grant("s");
        let host_save = GuestRequest {
            host_token: Some(token),
            ..GuestRequest::new(0, save_req("s", 5))
        };
        assert!(matches!(svc.handle(host_save.clone()), Reply::Saved { .. }));
        {
            let pool = lock_pool(engine.pool());
            assert_eq!(pool.inspect("s").expect("host").owner, Owner::Host);
            assert_eq!(
                pool.inspect("guest:0/s").expect("root").owner,
                Owner::Guest(0)
            );
            assert_eq!(
                pool.inspect("guest:1000/s").expect("user").owner,
                Owner::Guest(1000)
            );
        }
        // The token was single-use; a made-up one is refused.
        let again = svc.handle(GuestRequest {
            host_token: Some(token),
            ..GuestRequest::new(0, save_req("s2", 5))
        });
        assert_eq!(err_code(again), ErrorCode::PermissionDenied);
        // Lists: a user sees its own, root every guest uid's, nobody the host's.
        assert_eq!(
            names(handle(&mut svc, 1000, Request::List)),
            [(1000, "s".into())]
        );
        assert_eq!(names(handle(&mut svc, 65534, Request::List)), []);
        assert_eq!(
            names(handle(&mut svc, 0, Request::List)),
            [(0, "s".into()), (1000, "s".into())]
        );
        // Another user cannot delete or restore user 1000's snapshot, not even by
        // naming its owner.
        let foreign = |op| GuestRequest {
            owner: Some(1000),
            ..GuestRequest::new(65534, op)
        };
        let del = svc.handle(foreign(Request::Delete { name: "s".into() }));
        assert_eq!(err_code(del), ErrorCode::PermissionDenied);
        let res = svc.handle(foreign(Request::Restore(RestoreRequest {
            name: "s".into(),
            runs: vec![run(40, 2, 0, true)],
        })));
        assert_eq!(err_code(res), ErrorCode::PermissionDenied);
        // Its own name space has no "s".
        let del = handle(&mut svc, 65534, Request::Delete { name: "s".into() });
        assert_eq!(err_code(del), ErrorCode::NotFound);
        // Root may, naming the owner.
        let root_del = svc.handle(GuestRequest {
            owner: Some(1000),
            ..GuestRequest::new(0, Request::Delete { name: "s".into() })
        });
        assert_eq!(root_del, Reply::Deleted { name: "s".into() });
        // Root deleting its own "s" leaves the host's "s" alone.
        assert!(matches!(
            handle(&mut svc, 0, Request::Delete { name: "s".into() }),
            Reply::Deleted { .. }
        ));
        let pool = lock_pool(engine.pool());
        assert!(pool.inspect("s").is_ok(), "the host's snapshot is intact");
        assert_eq!(pool.list().len(), 1);
    }

    #[test]
    fn guest_physical_pages_translate_around_the_gap() {
        let mib = 1u64 << 20;
        assert_eq!(guest_phys_pages(256 * mib), 65536);
        assert_eq!(
            gpa_to_ram(10, 5, 256 * mib),
            Some(vec![PageRun::new(10, 5)])
        );
        assert_eq!(gpa_to_ram(65535, 2, 256 * mib), None, "past RAM");
        let mem = 4096 * mib; // 3 GiB low + 1 GiB high
        let gap_first = MMIO_GAP_START / PAGE;
        let high_first = MMIO_GAP_END / PAGE;
        assert_eq!(guest_phys_pages(mem), high_first + 262_144);
        assert_eq!(gpa_to_ram(gap_first, 1, mem), None, "in the gap");
        assert_eq!(
            gpa_to_ram(high_first + 3, 2, mem),
            Some(vec![PageRun::new(gap_first + 3, 2)])
        );
        assert_eq!(gpa_to_ram(gap_first - 1, 2, mem), None, "straddles the gap");
        assert_eq!(gpa_to_ram(high_first + 262_143, 2, mem), None, "past RAM");
        assert_eq!(gpa_to_ram(u64::MAX, 2, mem), None);
    }
}

/// Fuzzing the snapshot service from the host side: random bytes and random well-formed
/// requests of every kind, from every kind of guest uid, through the vsock service layer
/// into a real engine and pool.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::devices::virtio::vsock::AgentService;
    use crate::devices::virtio::vsock::VsockService;
    use crate::snapshot::testutil::setup;
    use guest_agent::protocol::{HEADER_LEN, MAX_PAYLOAD_LEN};
    use proptest::prelude::*;

    /// Mostly a few valid names (so saves, restores and deletes meet each other),
    /// sometimes anything.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop_oneof![Just("a".to_string()), Just("b".into()), Just("c".into())],
            1 => "[a-z0-9._/:-]{0,70}",
        ]
    }

    /// Mostly runs of 2 pages inside the 64 pages of RAM (so restores often fit a saved
    /// snapshot), sometimes anything.
    fn runs() -> impl Strategy<Value = Vec<Run>> {
        let run = prop_oneof![
            4 => (0u64..60, any::<bool>()).prop_map(|(g, p)| (g, 2, 0x1000, p)),
            1 => (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(g, c, p)| (g, c, 7, p)),
        ];
        proptest::collection::vec(
            run.prop_map(|(g, c, va, p)| Run {
                guest_phys_first_page: g,
                count: c,
                virt_addr: va,
                present: p,
            }),
            1..3,
        )
    }

    fn request() -> impl Strategy<Value = GuestRequest> {
        let op = prop_oneof![
            (name(), any::<u32>(), runs()).prop_map(|(name, pid, runs)| Request::Save(
                SaveRequest {
                    name,
                    pid,
                    comm: "f".into(),
                    runs,
                }
            )),
            (name(), runs())
                .prop_map(|(name, runs)| Request::Restore(RestoreRequest { name, runs })),
            Just(Request::List),
            name().prop_map(|name| Request::Delete { name }),
        ];
        (
            prop_oneof![3 => Just(0u32), 3 => Just(1000), 1 => Just(65534), 1 => any::<u32>()],
            prop_oneof![
                3 => Just(None),
                1 => proptest::option::of(prop_oneof![Just(0u32), Just(1000), any::<u32>()]),
            ],
            prop_oneof![3 => Just(None), 1 => proptest::option::of(any::<u64>())],
            op,
        )
            .prop_map(|(uid, owner, host_token, op)| GuestRequest {
                owner,
                host_token,
                ..GuestRequest::new(uid, op)
            })
    }

    /// One piece of a connection's stream: raw bytes, or an encoded request.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            1 => proptest::collection::vec(any::<u8>(), 0..64),
            4 => request().prop_map(|r| r.encode().unwrap_or_default()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn the_service_survives_any_stream_and_host_snapshots_stay_intact(
            pieces in proptest::collection::vec(piece(), 1..48),
        ) {
            let (_dir, engine, ram) = setup(64);
            let engine = Arc::new(engine);
            for p in 0..64 {
                ram.fill_page(p, 0xaa);
            }
            engine
                .snapshot("host", pmem_backend::SnapshotKind::Pages, &[PageRun::new(0, 64)], Default::default())
                .expect("host snapshot");
            let svc = ProcessService::new(
                engine.clone(),
                Arc::new(HostGrants::default()),
                64 * PAGE,
                GuestLimits::default(),
            );
            let mut conn = AgentService::new(Arc::new(std::sync::Mutex::new(svc)), 64);
            let mut out = Vec::new();
            for p in &pieces {
                out.clear();
                if !conn.on_data(p, &mut out) {
                    // A garbage header ends the connection: a new one goes on.
                    let svc = ProcessService::new(
                        engine.clone(),
                        Arc::new(HostGrants::default()),
                        64 * PAGE,
                        GuestLimits::default(),
                    );
                    conn = AgentService::new(Arc::new(std::sync::Mutex::new(svc)), 64);
                }
                // Bounded answers: at most one frame per request the piece can hold.
                let frames = p.len() / HEADER_LEN + 1;
                prop_assert!(out.len() <= frames * (HEADER_LEN + MAX_PAYLOAD_LEN as usize));
            }
            let pool = lock_pool(engine.pool());
            for p in 0..64 {
                let (_, data) = pool.read_snapshot_page("host", p).expect("host page");
                prop_assert!(data.iter().all(|&b| b == 0xaa), "host page {} changed", p);
            }
            prop_assert!(pool.verify(|_, _| ()).is_clean());
        }
    }
}
