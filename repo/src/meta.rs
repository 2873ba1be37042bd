//! The value types a snapshot is described by: [`SnapshotMeta`] (with its validation and
//! its conversion to and from the stored form) and [`Manifest`], a snapshot's checked
//! manifest.

use pmem_backend::{normalize_runs, Owner, PageRun, ProcessInfo, SnapshotKind};

use crate::error::{corrupt, RepoError, Result};
use crate::format::{
    decode, hex, manifest_key, unseal, Extent, ManifestBody, ManifestExt, MetaBody, Target,
    MANIFEST_MAGIC, MAX_TOUCH_PAGES, MAX_TOUCH_RUNS,
};
use crate::repo::MAX_STATE_LEN;
use crate::PAGE_SIZE;

/// A snapshot's metadata as given to and returned by the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The store name (`guest:UID/NAME` for guest-owned snapshots, [`Owner::qualify`]).
    pub name: String,
    /// VM, pages or process.
    pub kind: SnapshotKind,
    /// Who it belongs to (must agree with the name).
    pub owner: Owner,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Creation time, ns since the Unix epoch.
    pub created_unix_ns: u64,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Process details (process snapshots only).
    pub process: Option<ProcessInfo>,
    /// Guest RAM size in bytes (0 if unknown); every page must lie below it.
    pub ram_size: u64,
    /// The runs as given at snapshot time (a VM snapshot: all of RAM).
    pub runs: Vec<PageRun>,
}

impl SnapshotMeta {
    pub(crate) fn to_body(&self) -> Result<MetaBody> {
        let bad = |m: String| Err(RepoError::InvalidMeta(m));
        if self.name.is_empty() || self.name.len() > 255 || self.name.chars().any(char::is_control)
        {
            return bad(format!(
                "name {:?} must be 1-255 bytes without control characters",
                self.name
            ));
        }
        match Owner::split(&self.name) {
            Some((o, rest)) if o == self.owner && !rest.is_empty() => {}
            _ => {
                return bad(format!(
                    "name {:?} does not belong to owner {}",
                    self.name, self.owner
                ))
            }
        }
        if (self.kind == SnapshotKind::Process) != self.process.is_some() {
            return bad("process details are required for, and only for, process snapshots".into());
        }
        if let Some(p) = &self.process {
            if p.run_vas.len() != self.runs.len() {
                return bad("process snapshot needs one virtual address per run".into());
            }
        }
        if self.ram_size % PAGE_SIZE as u64 != 0 {
            return bad(format!(
                "guest RAM size {} is not a multiple of 4096",
                self.ram_size
            ));
        }
        let ram_pages = self.ram_size / PAGE_SIZE as u64;
        for r in &self.runs {
            if r.count == 0 || r.first.checked_add(r.count).is_none() {
                return bad(format!("bad run {}+{}", r.first, r.count));
            }
            if self.ram_size != 0 && r.end() > ram_pages {
                return bad(format!(
                    "run {}+{} beyond guest RAM ({ram_pages} pages)",
                    r.first, r.count
                ));
            }
        }
        let (owner_tag, owner_uid) = match self.owner {
            Owner::Host => (0, 0),
            Owner::Guest(u) => (1, u),
        };
        Ok(MetaBody {
            name: self.name.clone(),
            kind: match self.kind {
                SnapshotKind::Process => 1,
                SnapshotKind::Vm => 2,
                SnapshotKind::Pages => 3,
            },
            owner_tag,
            owner_uid,
            created_unix_ms: self.created_unix_ms,
            created_unix_ns: self.created_unix_ns,
            labels: self.labels.clone(),
            process: self
                .process
                .as_ref()
                .map(|p| (p.pid, p.comm.clone(), p.run_vas.clone())),
            ram_size: self.ram_size,
            runs: self.runs.iter().map(|r| (r.first, r.count)).collect(),
        })
    }

    pub(crate) fn from_body(key: &str, b: &MetaBody) -> Result<SnapshotMeta> {
        let kind = match b.kind {
            1 => SnapshotKind::Process,
            2 => SnapshotKind::Vm,
            3 => SnapshotKind::Pages,
            k => return Err(corrupt(key, format!("unknown snapshot kind {k}"))),
        };
        let owner = match (b.owner_tag, b.owner_uid) {
            (0, 0) => Owner::Host,
            (1, u) => Owner::Guest(u),
            _ => return Err(corrupt(key, "unknown owner")),
        };
        let meta = SnapshotMeta {
            name: b.name.clone(),
            kind,
            owner,
            created_unix_ms: b.created_unix_ms,
            created_unix_ns: b.created_unix_ns,
            labels: b.labels.clone(),
            process: b.process.as_ref().map(|(pid, comm, vas)| ProcessInfo {
                pid: *pid,
                comm: comm.clone(),
                run_vas: vas.clone(),
            }),
            ram_size: b.ram_size,
            runs: b.runs.iter().map(|&(f, c)| PageRun::new(f, c)).collect(),
        };
        meta.to_body()
            .map_err(|e| corrupt(key, format!("metadata refused: {e}")))?;
        Ok(meta)
    }
}

/// A snapshot's manifest, as read from the repository (checked).
#[derive(Debug, Clone)]
pub struct Manifest {
    pub(crate) body: ManifestBody,
    pub(crate) meta: SnapshotMeta,
    pub(crate) touch_order: Vec<PageRun>,
}

impl Manifest {
    pub(crate) fn decode(key: &str, data: &[u8]) -> Result<Manifest> {
        let raw = unseal(key, MANIFEST_MAGIC, data)?;
        let (body, rest): (ManifestBody, &[u8]) = postcard::take_from_bytes(raw)
            .map_err(|e| corrupt(key, format!("does not decode: {e}")))?;
        let ext: ManifestExt = if rest.is_empty() {
            ManifestExt::default()
        } else {
            decode(key, rest)?
        };
        let meta = SnapshotMeta::from_body(key, &body.meta)?;
        if manifest_key(&meta.name) != key {
            return Err(corrupt(key, "manifest holds another snapshot's name"));
        }
        let npacks = body.packs.len() as u64;
        let check_extents = |ext: &[Extent], what: &str| -> Result<Vec<PageRun>> {
            let mut runs: Vec<PageRun> = Vec::new();
            let mut prev_end = 0u64;
            for (i, e) in ext.iter().enumerate() {
                let end = e.first.checked_add(e.count);
                let ok = e.count > 0
                    && end.is_some()
                    && (i == 0 || e.first >= prev_end)
                    && match e.target {
                        Target::Zero => true,
                        Target::Chunks { pack, entry } => {
                            u64::from(pack) < npacks
                                && u64::from(entry)
                                    .checked_add(e.count)
                                    .is_some_and(|x| x <= 1 << 32)
                        }
                    };
                if !ok {
                    return Err(corrupt(key, format!("bad {what} extent {i}")));
                }
                prev_end = end.unwrap_or(0);
                match runs.last_mut() {
                    Some(r) if r.end() == e.first => r.count += e.count,
                    _ => runs.push(PageRun::new(e.first, e.count)),
                }
            }
            Ok(runs)
        };
        if check_extents(&body.pages, "page")? != normalize_runs(&meta.runs) {
            return Err(corrupt(key, "page map does not cover the snapshot's pages"));
        }
        if body.state_len > MAX_STATE_LEN {
            return Err(corrupt(key, "state blob length out of range"));
        }
        let pieces = body.state_len.div_ceil(PAGE_SIZE as u64);
        let want: Vec<PageRun> = if pieces == 0 {
            vec![]
        } else {
            vec![PageRun::new(0, pieces)]
        };
        if check_extents(&body.state, "state")? != want {
            return Err(corrupt(key, "state map does not cover the state blob"));
        }
        let touch_order = check_touch_order(&ext.touch_order, &meta.runs)
            .map_err(|m| corrupt(key, format!("touch order: {m}")))?;
        Ok(Manifest {
            body,
            meta,
            touch_order,
        })
    }

    /// The snapshot name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// The metadata.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }
    /// Pages in the snapshot.
    pub fn pages(&self) -> u64 {
        self.body
            .pages
            .iter()
            .fold(0u64, |a, e| a.saturating_add(e.count))
    }
    /// All-zero pages.
    pub fn zero_pages(&self) -> u64 {
        self.body
            .pages
            .iter()
            .filter(|e| e.target == Target::Zero)
            .fold(0u64, |a, e| a.saturating_add(e.count))
    }
    /// The pages, as disjoint ascending runs.
    pub fn page_runs(&self) -> Vec<PageRun> {
        normalize_runs(&self.meta.runs)
    }
    /// Whether the page is part of the snapshot.
    pub fn contains(&self, page: u64) -> bool {
        find(&self.body.pages, page).is_some()
    }
    /// Whether the page is all zero (`None`: not part of the snapshot). Lazy restore
    /// can map such pages without reading anything.
    pub fn is_zero(&self, page: u64) -> Option<bool> {
        find(&self.body.pages, page).map(|(t, _)| t == Target::Zero)
    }
    /// State blob length.
    pub fn state_len(&self) -> u64 {
        self.body.state_len
    }
    /// When it was exported, ms since the Unix epoch.
    pub fn exported_unix_ms(&self) -> u64 {
        self.body.exported_unix_ms
    }
    /// The pages the guest touched first after the snapshot, in that order (recorded at
    /// export when the source knew it; empty otherwise). Every run lies in the snapshot.
    pub fn touch_order(&self) -> &[PageRun] {
        &self.touch_order
    }
    /// The packs it uses (hex ids).
    pub fn packs(&self) -> Vec<String> {
        self.body.packs.iter().map(|p| hex(&p.pack)).collect()
    }
}

/// A touch order as runs, checked: at most [`MAX_TOUCH_RUNS`] runs and
/// [`MAX_TOUCH_PAGES`] pages, every run non-empty and inside the snapshot's `runs`.
pub(crate) fn check_touch_order(
    order: &[(u64, u64)],
    runs: &[PageRun],
) -> std::result::Result<Vec<PageRun>, String> {
    if order.len() > MAX_TOUCH_RUNS {
        return Err(format!("{} runs (at most {MAX_TOUCH_RUNS})", order.len()));
    }
    let runs = normalize_runs(runs);
    let mut total = 0u64;
    let mut out = Vec::with_capacity(order.len());
    for &(first, count) in order {
        let r = PageRun::new(first, count);
        let i = runs.partition_point(|s| s.first <= first);
        let inside = count > 0
            && first.checked_add(count).is_some()
            && i > 0
            && runs[i - 1].first <= first
            && r.end() <= runs[i - 1].end();
        if !inside {
            return Err(format!("run {first}+{count} is not in the snapshot"));
        }
        total = total.saturating_add(count);
        if total > MAX_TOUCH_PAGES {
            return Err(format!("more than {MAX_TOUCH_PAGES} pages"));
        }
        out.push(r);
    }
    Ok(out)
}

/// The target of piece `n` in `ext` and its offset in the extent.
pub(crate) fn find(ext: &[Extent], n: u64) -> Option<(Target, u64)> {
    let i = ext.partition_point(|e| e.first <= n);
    let e = ext.get(i.checked_sub(1)?)?;
    (n - e.first < e.count).then_some((e.target, n - e.first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_validation() {
        let good = SnapshotMeta {
            name: "guest:5/x".into(),
            kind: SnapshotKind::Process,
            owner: Owner::Guest(5),
            created_unix_ms: 1,
            created_unix_ns: 1_000_000,
            labels: vec![],
            process: Some(ProcessInfo {
                pid: 1,
                comm: "sh".into(),
                run_vas: vec![0x1000],
            }),
            ram_size: 1 << 20,
            runs: vec![PageRun::new(3, 4)],
        };
        let b = good.to_body().unwrap();
        assert_eq!(SnapshotMeta::from_body("k", &b).unwrap(), good);
        let mut m = good.clone();
        m.owner = Owner::Host;
        assert!(m.to_body().is_err());
        let mut m = good.clone();
        m.runs = vec![PageRun::new(255, 2)];
        assert!(m.to_body().is_err());
        let mut m = good.clone();
        m.process = None;
        assert!(m.to_body().is_err());
        let mut m = good;
        m.runs.push(PageRun::new(100, 1));
        assert!(m.to_body().is_err());
    }

    #[test]
    fn touch_orders_are_checked_and_old_readers_skip_them() {
        let runs = [PageRun::new(0, 100), PageRun::new(200, 10)];
        let ok = check_touch_order(&[(205, 5), (3, 1), (0, 100)], &runs).unwrap();
        assert_eq!(ok[0], PageRun::new(205, 5));
        for bad in [
            vec![(205, 6)],
            vec![(100, 1)],
            vec![(3, 0)],
            vec![(u64::MAX, 2)],
            vec![(0, 100); (MAX_TOUCH_PAGES / 100 + 1) as usize],
            vec![(0, 1); MAX_TOUCH_RUNS + 1],
        ] {
            assert!(check_touch_order(&bad, &runs).is_err(), "{:?}", &bad[..1]);
        }
        // A format 1 reader decodes the body and never sees what follows it.
        let body = crate::format::MetaBody {
            name: "x".into(),
            kind: 2,
            owner_tag: 0,
            owner_uid: 0,
            created_unix_ms: 1,
            created_unix_ns: 2,
            labels: vec![],
            process: None,
            ram_size: 4096,
            runs: vec![(0, 1)],
        };
        let manifest = ManifestBody {
            meta: body,
            exported_unix_ms: 3,
            packs: vec![],
            pages: vec![Extent {
                first: 0,
                count: 1,
                target: Target::Zero,
            }],
            state_len: 0,
            state_hash: [0; 32],
            state: vec![],
        };
        let mut bytes = crate::format::encode(&manifest);
        bytes.extend(crate::format::encode(&ManifestExt {
            touch_order: vec![(0, 1)],
        }));
        let old: ManifestBody = decode("k", &bytes).unwrap();
        assert_eq!(old, manifest);
        let sealed = crate::format::seal(MANIFEST_MAGIC, &bytes);
        let m = Manifest::decode(&crate::format::manifest_key("x"), &sealed).unwrap();
        assert_eq!(m.touch_order(), [PageRun::new(0, 1)]);
    }
}
