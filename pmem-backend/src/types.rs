//! Public value types of the store: page runs, snapshot metadata, page locations,
//! listings and statistics.

use serde::Serialize;

/// A run of consecutive guest pages (4 KiB guest-physical page numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PageRun {
    /// First guest page number.
    pub first: u64,
    /// Number of pages (at least one).
    pub count: u64,
}

impl PageRun {
    /// The run `first..first+count`.
    pub fn new(first: u64, count: u64) -> Self {
        PageRun { first, count }
    }
    /// One past the last page (saturating, for validation of hostile input).
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.count)
    }
    /// Whether `p` lies in the run.
    pub fn contains(&self, p: u64) -> bool {
        p >= self.first && p < self.end()
    }
}

/// Turn a sorted sequence of pages into runs.
pub fn pages_to_runs(pages: impl IntoIterator<Item = u64>) -> Vec<PageRun> {
    let mut out: Vec<PageRun> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(r) if r.end() == p => r.count += 1,
            _ => out.push(PageRun::new(p, 1)),
        }
    }
    out
}

/// Builds runs from ascending pages, extending the last run when a page follows it.
#[derive(Debug, Default)]
pub(crate) struct RunBuilder {
    pub runs: Vec<PageRun>,
}

impl RunBuilder {
    #[inline]
    pub fn push(&mut self, p: u64) {
        if let Some(r) = self.runs.last_mut() {
            if r.first + r.count == p {
                r.count += 1;
                return;
            }
        }
        self.runs.push(PageRun::new(p, 1));
    }

    /// Append run `r` (after every page pushed so far), merged with the last run where
    /// they touch.
    #[inline]
    pub fn push_run(&mut self, r: PageRun) {
        if r.count == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some(last) if last.first + last.count == r.first => last.count += r.count,
            _ => self.runs.push(r),
        }
    }
}

/// Sort and merge runs into the disjoint page set they cover.
pub fn normalize_runs(runs: &[PageRun]) -> Vec<PageRun> {
    let mut v: Vec<PageRun> = runs.iter().copied().filter(|r| r.count > 0).collect();
    v.sort_unstable();
    let mut out: Vec<PageRun> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.first <= last.end() => {
                let end = last.end().max(r.end());
                last.count = end - last.first;
            }
            _ => out.push(r),
        }
    }
    out
}

/// What a snapshot is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Pages of one guest process (taken through the guest agent).
    Process,
    /// A whole guest: all RAM plus device and vCPU state in the state blob.
    Vm,
    /// A set of guest pages named by page number (the control API's page snapshots).
    Pages,
}

impl SnapshotKind {
    /// The kind's name as shown to users and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Process => "process",
            SnapshotKind::Vm => "vm",
            SnapshotKind::Pages => "pages",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            SnapshotKind::Process => 1,
            SnapshotKind::Vm => 2,
            SnapshotKind::Pages => 3,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(SnapshotKind::Process),
            2 => Some(SnapshotKind::Vm),
            3 => Some(SnapshotKind::Pages),
            _ => None,
        }
    }
}

/// Process snapshot details: which process, and the guest virtual address of each run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// Guest pid.
    pub pid: u32,
    /// Command name (at most 64 bytes).
    pub comm: String,
    /// Guest virtual address of each run, in the order the runs were given.
    pub run_vas: Vec<u64>,
}

/// Who a snapshot belongs to. The host (VM, page and host-requested process
/// snapshots) and each guest uid have separate name spaces: a guest-owned snapshot's
/// store name is `guest:UID/NAME` ([`Owner::qualify`]), which no host name can be
/// (host names cannot contain `:` or `/`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The host: invisible and untouchable from the guest.
    #[default]
    Host,
    /// A guest user, by uid (through the guest agent).
    Guest(u32),
}

impl Owner {
    /// The store name of snapshot `name` of this owner.
    pub fn qualify(self, name: &str) -> String {
        match self {
            Owner::Host => name.to_string(),
            Owner::Guest(uid) => format!("guest:{uid}/{name}"),
        }
    }

    /// Split a store name into its owner and the name within the owner's name space
    /// (`None` when it is not of the form [`Owner::qualify`] produces for any owner;
    /// the name part is not validated here).
    pub fn split(store_name: &str) -> Option<(Owner, &str)> {
        let Some(rest) = store_name.strip_prefix("guest:") else {
            return Some((Owner::Host, store_name));
        };
        let (uid, name) = rest.split_once('/')?;
        // Canonical decimal only, so one snapshot has one store name.
        if uid.is_empty() || (uid.len() > 1 && uid.starts_with('0')) {
            return None;
        }
        if !uid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((Owner::Guest(uid.parse().ok()?), name))
    }

    pub(crate) fn code(self) -> (u8, u32) {
        match self {
            Owner::Host => (0, 0),
            Owner::Guest(uid) => (1, uid),
        }
    }

    pub(crate) fn from_code(tag: u8, uid: u32) -> Option<Self> {
        match (tag, uid) {
            (0, 0) => Some(Owner::Host),
            (1, uid) => Some(Owner::Guest(uid)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Host => f.write_str("host"),
            Owner::Guest(uid) => write!(f, "guest:{uid}"),
        }
    }
}

impl Serialize for Owner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Metadata given with a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Who the snapshot belongs to; the name given must be in its name space
    /// ([`Owner::qualify`]).
    pub owner: Owner,
    /// Free-form `key=value` labels (keys use the name charset, at most 64 labels).
    pub labels: Vec<(String, String)>,
    /// Opaque state for the VMM (vm snapshots: device and vCPU state). Checksummed;
    /// stored in blocks of the block area.
    pub state: Vec<u8>,
    /// For process snapshots (required there, refused for vm snapshots).
    pub process: Option<ProcessInfo>,
}

/// Names a snapshot by name or by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSel<'a> {
    /// By name.
    Name(&'a str),
    /// By id.
    Id(u64),
}

impl<'a> From<&'a str> for SnapshotSel<'a> {
    fn from(s: &'a str) -> Self {
        SnapshotSel::Name(s)
    }
}

impl From<u64> for SnapshotSel<'_> {
    fn from(id: u64) -> Self {
        SnapshotSel::Id(id)
    }
}

impl std::fmt::Display for SnapshotSel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotSel::Name(n) => write!(f, "{n:?}"),
            SnapshotSel::Id(i) => write!(f, "#{i}"),
        }
    }
}

/// Where a snapshot page's content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PageLocation {
    /// Still in guest RAM page p (protected and unwritten since the snapshot).
    Ram(u64),
    /// Preserved in block b of the block area.
    Block(u64),
}

/// Description of one snapshot, for list/inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Unique id (never reused).
    pub id: u64,
    /// Unique name (the store name: `guest:UID/NAME` for guest-owned snapshots).
    pub name: String,
    /// Who it belongs to.
    pub owner: Owner,
    /// Process or vm.
    pub kind: SnapshotKind,
    /// Creation time, milliseconds since the Unix epoch (the time field every pmsnap
    /// JSON output carries).
    pub created_unix_ms: u64,
    /// Creation time, nanoseconds since the Unix epoch (kept for older readers).
    pub created_unix_ns: u64,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Process details (process snapshots).
    pub process: Option<ProcessInfo>,
    /// The runs as given at snapshot time.
    pub runs: Vec<PageRun>,
    /// Distinct guest pages covered.
    pub pages: u64,
    /// Of those, still referenced as RAM(p).
    pub pages_in_ram: u64,
    /// Of those, preserved in blocks.
    pub pages_in_blocks: u64,
    /// Length of the state blob.
    pub state_len: u64,
}

/// Store-wide statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Snapshots in the store.
    pub snapshots: u64,
    /// Pages in the RAM area.
    pub ram_pages: u64,
    /// Distinct RAM pages referenced (and so write-protected).
    pub pages_in_ram: u64,
    /// Blocks holding preserved pages.
    pub pages_in_blocks: u64,
    /// Blocks holding state blobs.
    pub blob_blocks: u64,
    /// Bytes of pages (RAM or block) referenced by two or more snapshots.
    pub shared_bytes: u64,
    /// Bytes saved by sharing: sum over pages of (referrers - 1) * 4096.
    pub saved_bytes: u64,
    /// Blocks in the block area.
    pub blocks_total: u64,
    /// Blocks in use (preserved pages and blobs).
    pub blocks_used: u64,
    /// Blocks free.
    pub blocks_free: u64,
    /// Redirect-log records not yet compacted into the catalog.
    pub log_records: u64,
    /// Redirect-log capacity in records.
    pub log_capacity: u64,
    /// Catalog generation (superblock sequence number).
    pub generation: u64,
    /// Per snapshot details.
    pub per_snapshot: Vec<SnapshotInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_overlaps_and_neighbours() {
        let r = normalize_runs(&[
            PageRun::new(10, 5),
            PageRun::new(0, 2),
            PageRun::new(2, 1),
            PageRun::new(12, 10),
            PageRun::new(40, 0),
        ]);
        assert_eq!(r, vec![PageRun::new(0, 3), PageRun::new(10, 12)]);
    }

    #[test]
    fn pages_to_runs_groups_consecutive() {
        assert_eq!(
            pages_to_runs([1, 2, 3, 7, 9, 10]),
            vec![PageRun::new(1, 3), PageRun::new(7, 1), PageRun::new(9, 2)]
        );
        assert!(pages_to_runs([]).is_empty());
    }

    #[test]
    fn run_builder_push_and_push_run() {
        let mut b = RunBuilder::default();
        b.push(3);
        b.push(4);
        b.push(9);
        b.push_run(PageRun::new(10, 2));
        b.push_run(PageRun::new(13, 0));
        b.push_run(PageRun::new(13, 1));
        b.push(14);
        b.push_run(PageRun::new(16, 4));
        assert_eq!(
            b.runs,
            vec![
                PageRun::new(3, 2),
                PageRun::new(9, 3),
                PageRun::new(13, 2),
                PageRun::new(16, 4)
            ]
        );
    }

    #[test]
    fn run_contains_saturates() {
        let r = PageRun::new(u64::MAX - 1, 5);
        assert_eq!(r.end(), u64::MAX);
        assert!(r.contains(u64::MAX - 1));
        assert!(!r.contains(3));
    }
}
