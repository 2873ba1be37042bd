//! Request and response types of the control API: what the API layer hands to the VMM
//! ([`ApiRequest`]) and what the VMM answers ([`ApiResponse`]).
//!
//! Every value in an [`ApiRequest`] has passed the API layer's checks (see
//! [`super::request`]): names follow [`super::validate_snapshot_name`], runs are non-empty,
//! sorted, non-overlapping and do not overflow. Checks that need the VM (runs inside guest
//! RAM, duplicate names, unknown snapshots) are the handler's, reported through
//! [`super::ApiError`].
//!
//! The response types derive `Deserialize` too, so the client ([`super::client`]) and the
//! tests read exactly what the server writes. They accept unknown fields so an older client
//! keeps working when the server adds one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Guest page size the API counts in.
pub const PAGE_SIZE: u64 = 4096;
/// Most page runs accepted in one request.
pub const MAX_RUNS: usize = 4096;
/// Most labels on one snapshot.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_LEN: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_LEN: usize = 256;
/// Version string reported by `GET /v1/status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A run of consecutive guest pages: pages `first_page .. first_page + count`, where page
/// `p` covers guest-physical bytes `p * 4096 .. (p + 1) * 4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageRun {
    /// Guest page frame number of the first page.
    pub first_page: u64,
    /// Number of pages, at least 1.
    pub count: u64,
}

impl PageRun {
    /// One past the last page of the run, or `None` if that overflows.
    pub fn end(&self) -> Option<u64> {
        self.first_page.checked_add(self.count)
    }
}

/// Body of `POST /v1/snapshots`: snapshot these guest page runs under `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagesSnapshotRequest {
    /// Snapshot name (see [`super::validate_snapshot_name`]).
    pub name: String,
    /// Guest page runs to snapshot; the API layer sorts them by `first_page`.
    pub runs: Vec<PageRun>,
    /// Free-form labels stored with the snapshot.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Pause the vCPUs for the snapshot, so all pages share one instant. The pages are
    /// write-protected before the pause, so the pause only covers the pages written
    /// meanwhile and the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
}

/// A request that passed the API layer's checks, for the VMM to carry out.
///
/// Later routes (whole-VM snapshot, rollback, process snapshot) add variants here and a
/// line in the route table of [`super::request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /v1/status`. Answer [`ApiResponse::Status`].
    Status,
    /// `PUT|POST /v1/pause`: pause all vCPUs. Answer [`ApiResponse::Status`] (the new state).
    Pause,
    /// `PUT|POST /v1/resume`: resume all vCPUs. Answer [`ApiResponse::Status`].
    Resume,
    /// `POST /v1/snapshots`: snapshot guest page runs. Answer
    /// [`ApiResponse::SnapshotCreated`].
    CreatePagesSnapshot(PagesSnapshotRequest),
    /// `GET /v1/snapshots`. Answer [`ApiResponse::Snapshots`].
    ListSnapshots,
    /// `GET /v1/snapshots/{name}`. Answer [`ApiResponse::Snapshot`] with `runs` filled.
    InspectSnapshot {
        /// Validated snapshot name.
        name: String,
    },
    /// `DELETE /v1/snapshots/{name}`. Answer [`ApiResponse::Deleted`].
    DeleteSnapshot {
        /// Validated snapshot name.
        name: String,
    },
    /// `GET /v1/snapshots/{name}/dirty`: guest pages written since that snapshot was
    /// taken. Answer [`ApiResponse::Dirty`].
    DirtySince {
        /// Validated snapshot name.
        name: String,
    },
    /// `GET /v1/stats`. Answer [`ApiResponse::Stats`].
    Stats,
    /// Ask the guest agent for a snapshot of a guest process (VMM -> agent -> VMM).
    SnapshotProcess(ProcessSnapshotRequest),
    /// `POST /v1/vm-snapshots {"name"}`: pause, capture the whole VM, reference every
    /// guest page, resume. Answer [`ApiResponse::Json`] 201 with the pause time.
    CreateVmSnapshot {
        /// Validated snapshot name.
        name: String,
    },
    /// `POST /v1/vm-snapshots/{name}/rollback`: put back the pages written since and the
    /// VM state. Answer [`ApiResponse::Json`] 200 with pages copied and times.
    RollbackVm {
        /// Validated snapshot name.
        name: String,
    },
    /// `POST /v1/pool/grow {"add_bytes"}`: grow the pool's block area online by that
    /// many bytes (rounded up to 4 KiB blocks); a write waiting for a free block goes on.
    /// Answer [`ApiResponse::Json`] 200 with the old and new block counts and file sizes.
    GrowPool {
        /// Bytes to add, more than 0.
        add_bytes: u64,
    },
    /// `POST /v1/snapshots/{name}/export {"to"}`: write the snapshot into the repository
    /// `to` (an absolute directory path or `s3://BUCKET/PREFIX`) while the guest runs. Answer
    /// [`ApiResponse::Json`] 200 with the export report.
    ExportSnapshot {
        /// Validated snapshot name.
        name: String,
        /// The repository: an absolute directory path or `s3://BUCKET/PREFIX`.
        to: String,
    },
}

/// Body of `POST /v1/snapshots/{name}/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The repository: an absolute directory path (created if missing) or
    /// `s3://BUCKET/PREFIX` (the VMM's AWS_* environment says where and as whom).
    pub to: String,
}

/// Body of `POST /v1/pool/grow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowPoolRequest {
    /// Bytes to add to the block area (rounded up to 4 KiB blocks).
    pub add_bytes: u64,
}

/// Body of `POST /v1/vm-snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotRequest {
    /// Snapshot name (see [`super::validate_snapshot_name`]).
    pub name: String,
}

/// Body of `POST /v1/process-snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSnapshotRequest {
    /// Snapshot name.
    pub name: String,
    /// Guest pid.
    pub pid: u32,
    /// Virtual ranges to save; empty: every writable private mapping of the process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<VirtRange>,
}

/// A guest virtual address range `[start, end)`, page aligned: the agent protocol's type,
/// so the API, the agent and both command lines share one definition.
pub use guest_agent::protocol::VirtRange;

/// Most ranges in one process snapshot request.
pub const MAX_RANGES: usize = 1024;

/// Run state of the VM's vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs are running the guest.
    Running,
    /// vCPUs are paused.
    Paused,
    /// A guest write waits for a free block: the block area is full and only host-owned
    /// snapshots hold blocks. Delete a snapshot or grow the block area.
    #[serde(rename = "paused: block area full")]
    BlockAreaFull,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::BlockAreaFull => "paused: block area full",
        })
    }
}

/// Body of `GET /v1/status`, `/v1/pause` and `/v1/resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Run state of the vCPUs.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Milliseconds since the VMM started the guest.
    pub uptime_ms: u64,
    /// Path of the pmem pool file.
    pub pool_path: String,
    /// pmsnap version ([`VERSION`]).
    pub version: String,
    /// The lazy fill of a VM restored with `pmsnap restore --from REPO`: pages present,
    /// first-touch latency, what it waits for. Absent for other VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_fill: Option<crate::snapshot::lazy::FillStats>,
}

/// Summary of one snapshot (list, inspect, create).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot name.
    pub name: String,
    /// What the snapshot holds, decided by the engine: `"pages"`, `"process"`, `"vm"`.
    pub kind: String,
    /// Number of guest pages the snapshot covers.
    pub pages: u64,
    /// Number of page runs.
    pub run_count: u64,
    /// The runs themselves; filled by inspect, may be left out of list and create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<PageRun>>,
    /// Pages of this snapshot already preserved into blocks (written since).
    pub preserved_pages: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Labels given at creation.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Body of `GET /v1/snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// All snapshots, in the order the engine lists them.
    pub snapshots: Vec<SnapshotInfo>,
}

/// Body of `DELETE /v1/snapshots/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// Name of the deleted snapshot.
    pub deleted: String,
}

/// Body of `GET /v1/snapshots/{name}/dirty`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyPages {
    /// The snapshot the pages were written since.
    pub since: String,
    /// Number of pages written since (the sum of the runs' counts).
    pub pages: u64,
    /// The written pages as sorted, non-overlapping runs.
    pub runs: Vec<PageRun>,
}

/// Time spent in the copy-before-write fault handler, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerTime {
    /// Sum over all faults handled.
    pub total_ns: u64,
    /// Mean per fault (0 when there was none).
    pub mean_ns: u64,
    /// Longest single fault.
    pub max_ns: u64,
}

/// Body of `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiStats {
    /// Write-protect faults handled since the VMM started.
    pub faults: u64,
    /// Pages preserved into blocks since the VMM started.
    pub preserved_pages: u64,
    /// Guest pages write-protected now.
    pub protected_pages: u64,
    /// Number of snapshots in the store.
    pub snapshots: u64,
    /// Time in the fault handler.
    pub fault_handler: HandlerTime,
    /// The store's own statistics, passed through as it reports them.
    #[serde(default)]
    pub store: serde_json::Value,
    /// Guest-owned snapshots dropped because the block area was full.
    #[serde(default)]
    pub guest_snapshots_dropped: u64,
    /// The guest write waiting for a free block, if one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_wait: Option<BlockWaitInfo>,
    /// What the engine did on its own lately (dropped snapshots), oldest first, at most
    /// 64.
    #[serde(default)]
    pub events: Vec<ApiEvent>,
}

/// A guest write waiting for a free block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockWaitInfo {
    /// The guest page (pool RAM page number) that needs a block.
    pub page: u64,
    /// Since when, milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// Something the engine did on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiEvent {
    /// When, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// `guest_snapshot_dropped` (block area full) or `snapshot_dropped` (a page could
    /// not be preserved).
    pub kind: String,
    /// The snapshot's store name.
    pub snapshot: String,
    /// Why.
    pub detail: String,
}

/// The VMM's answer to an [`ApiRequest`]. Each variant fixes the HTTP status and the JSON
/// body (see [`super::response`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 200, [`VmStatus`].
    Status(VmStatus),
    /// 201, [`SnapshotInfo`] of the new snapshot.
    SnapshotCreated(SnapshotInfo),
    /// 200, [`SnapshotInfo`].
    Snapshot(SnapshotInfo),
    /// 200, [`SnapshotList`] `{"snapshots": [...]}`.
    Snapshots(Vec<SnapshotInfo>),
    /// 200, [`Deleted`] `{"deleted": name}`.
    Deleted(String),
    /// 200, [`DirtyPages`].
    Dirty(DirtyPages),
    /// 200, [`ApiStats`].
    Stats(ApiStats),
    /// Any status and JSON body, for routes that have no typed answer yet.
    Json {
        /// HTTP status code (2xx).
        status: u16,
        /// Response body.
        body: serde_json::Value,
    },
}

/// Body of `POST /v1/vm-snapshots`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotCreated {
    /// Snapshot name.
    pub name: String,
    /// Guest pages referenced (all of RAM).
    pub pages: u64,
    /// Size of the state blob in bytes.
    pub state_bytes: u64,
    /// Time the guest was paused, in microseconds: from the pause request until the
    /// last vCPU thread went back to the guest. The answer itself may come later.
    pub pause_us: u64,
    /// Of that, waiting for every vCPU to stop (a vCPU in emulated guest kernel code
    /// can take milliseconds to leave it).
    pub stop_us: u64,
    /// Of that, capturing vCPU, VM and device state, from the moment the last vCPU
    /// left the guest (each vCPU thread saves its own state right then, in the same
    /// round trip as the pause).
    pub capture_us: u64,
    /// Of that, recording the snapshot in the store and write-protecting RAM.
    pub store_us: u64,
}

/// Body of `POST /v1/vm-snapshots/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolledBack {
    /// Snapshot rolled back to.
    pub name: String,
    /// Pages written since the snapshot (from dirty tracking).
    pub dirty_pages: u64,
    /// Pages whose snapshot content was copied back from a block.
    pub pages_copied: u64,
    /// Time the guest was paused, in microseconds (as for a VM snapshot).
    pub pause_us: u64,
    /// Of that, waiting for every vCPU to stop.
    pub stop_us: u64,
    /// Of that, reading the dirty log and copying pages back.
    pub copy_us: u64,
    /// Of that, restoring vCPU, VM and device state.
    pub restore_us: u64,
}

// Conversions between the store's types and the API's, in one place (the API's types
// carry serde names and units of the wire format; the store's do not).

impl From<&pmem_backend::PageRun> for PageRun {
    fn from(r: &pmem_backend::PageRun) -> Self {
        PageRun {
            first_page: r.first,
            count: r.count,
        }
    }
}

impl From<&PageRun> for pmem_backend::PageRun {
    fn from(r: &PageRun) -> Self {
        pmem_backend::PageRun::new(r.first_page, r.count)
    }
}

impl SnapshotInfo {
    /// The API's view of a store snapshot; its runs only when `with_runs` (inspect).
    pub fn from_store(s: pmem_backend::SnapshotInfo, with_runs: bool) -> Self {
        SnapshotInfo {
            name: s.name,
            kind: s.kind.as_str().to_string(),
            pages: s.pages,
            run_count: s.runs.len() as u64,
            runs: with_runs.then(|| s.runs.iter().map(PageRun::from).collect()),
            preserved_pages: s.pages_in_blocks,
            created_unix_ms: s.created_unix_ns / 1_000_000,
            labels: s.labels.into_iter().collect::<BTreeMap<_, _>>(),
        }
    }
}

#[cfg(test)]
mod store_conversion_tests {
    use super::*;

    #[test]
    fn runs_and_snapshot_info_convert_both_ways() {
        let store = pmem_backend::PageRun::new(7, 3);
        let api = PageRun::from(&store);
        assert_eq!((api.first_page, api.count), (7, 3));
        assert_eq!(pmem_backend::PageRun::from(&api), store);
        let info = pmem_backend::SnapshotInfo {
            id: 1,
            name: "s".into(),
            owner: pmem_backend::Owner::Host,
            kind: pmem_backend::SnapshotKind::Vm,
            created_unix_ms: 5,
            created_unix_ns: 5_000_000,
            labels: vec![("k".into(), "v".into())],
            process: None,
            runs: vec![pmem_backend::PageRun::new(0, 4), store],
            pages: 10,
            pages_in_ram: 8,
            pages_in_blocks: 2,
            state_len: 0,
        };
        let a = SnapshotInfo::from_store(info.clone(), false);
        assert_eq!(
            (a.name.as_str(), a.kind.as_str(), a.pages, a.run_count),
            ("s", "vm", 10, 2)
        );
        assert_eq!((a.preserved_pages, a.created_unix_ms), (2, 5));
        assert!(a.runs.is_none());
        assert_eq!(a.labels.get("k").map(String::as_str), Some("v"));
        let runs = SnapshotInfo::from_store(info, true).runs.expect("runs");
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[1].first_page, runs[1].count), (7, 3));
    }
}
