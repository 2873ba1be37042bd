//! The agent protocol: what the guest agent (and the guest library) says to the VMM's
//! snapshot service over virtio-vsock, and what the VMM answers.
//!
//! Every message is one frame: a fixed 12-byte little-endian header followed by a
//! payload encoded with serde in the compact `postcard` format (a save of a fragmented
//! 256 MiB process can carry tens of thousands of page runs; JSON would triple the bytes
//! the slow guest kernel has to push through vsock while the process is frozen).
//!
//! ```text
//! offset size field
//!      0    4 magic   = 0x504d_534e ("NSMP" read as little-endian bytes)
//!      4    2 version = 2
//!      6    2 kind    = 1 request, 2 reply
//!      8    4 len     = payload length in bytes, at most MAX_PAYLOAD_LEN
//!     12  len payload = postcard(Request) or postcard(Reply)
//! ```
//!
//! Decoding never panics on arbitrary bytes; a frame with another version is refused
//! with [`ProtocolError::UnsupportedVersion`] so a newer agent gets a clear answer. The
//! VMM side also checks the content with [`Request::validate`]: everything from the guest
//! is untrusted. See docs/protocol.md.
//!
//! The parts, one file each:
//!
//! - `limits.rs`: ports, magic, version and the size and count limits
//! - `error.rs`: [`ProtocolError`] and the error codes a refusal carries ([`ErrorCode`], [`ErrorReply`])
//! - `frame.rs`: the frame header ([`FrameHeader`]) and the `encode` / `decode` of each message

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

mod error;
mod frame;
mod limits;
#[cfg(test)]
mod test_util;

pub use error::{ErrorCode, ErrorReply, ProtocolError};
pub use frame::{FrameHeader, FrameKind};
pub use limits::{
    AGENT_PORT, HEADER_LEN, MAGIC, MAX_COMM_LEN, MAX_LIST_ENTRIES, MAX_MESSAGE_LEN, MAX_NAME_LEN,
    MAX_PAYLOAD_LEN, MAX_RANGES, MAX_RUNS, PAGE_SIZE, SNAPSHOT_SERVICE_PORT, VERSION,
};

/// A run of guest pages: `count` pages of the process's virtual memory starting at
/// `virt_addr`, backed by `count` consecutive guest-physical pages starting at
/// `guest_phys_first_page` when `present`, or never touched (zero) when not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First guest-physical page frame number (ignored when not present).
    pub guest_phys_first_page: u64,
    /// Number of pages, at least 1.
    pub count: u64,
    /// Virtual address of the first page in the process (page aligned).
    pub virt_addr: u64,
    /// Whether the pages are resident; absent pages are recorded and restore as zero.
    pub present: bool,
}

/// Save the pages of a process under a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveRequest {
    /// Snapshot name.
    pub name: String,
    /// Guest pid of the process (informational, kept in the catalog).
    pub pid: u32,
    /// Command name of the process (informational).
    pub comm: String,
    /// The page runs, in the process's virtual address order.
    pub runs: Vec<Run>,
}

/// Copy a saved snapshot into the guest pages that now back the target addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// Snapshot name.
    pub name: String,
    /// Target runs; all must be present (the agent touched and locked them).
    pub runs: Vec<Run>,
}

/// An operation on process snapshots. To the VMM it travels inside a [`GuestRequest`]
/// that says for which guest uid it is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Save pages.
    Save(SaveRequest),
    /// Restore pages.
    Restore(RestoreRequest),
    /// List the process snapshots the caller may see.
    List,
    /// Delete a snapshot.
    Delete {
        /// Snapshot name.
        name: String,
    },
}

/// What the agent sends the VMM's snapshot service: an operation and the guest uid it
/// is made for. The VMM believes `uid` only because its service accepts connections
/// from privileged vsock ports alone (guest root, i.e. the agent, which learned the uid
/// from the kernel with `SO_PEERCRED`); see docs/protocol.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRequest {
    /// Guest uid the request is made for. Snapshots it creates belong to this uid; it
    /// sees, restores and deletes only its own (uid 0: every guest-owned snapshot).
    pub uid: u32,
    /// Owner uid of the snapshot a restore or delete names, when not `uid` itself
    /// (only uid 0 may name another uid's snapshot).
    pub owner: Option<u32>,
    /// For a save the host asked for (`AgentRequest::SnapshotProcess`): the token the
    /// VMM sent with that request. The snapshot is then host-owned. `None` otherwise.
    pub host_token: Option<u64>,
    /// The operation.
    pub op: Request,
}

impl GuestRequest {
    /// `op` on behalf of guest uid `uid`, naming the caller's own snapshots.
    pub fn new(uid: u32, op: Request) -> Self {
        Self {
            uid,
            owner: None,
            host_token: None,
            op,
        }
    }

    /// Check the operation against guest RAM of `ram_pages` pages (see
    /// [`Request::validate`]).
    pub fn validate(&self, ram_pages: u64) -> Result<(), ProtocolError> {
        self.op.validate(ram_pages)
    }

    /// The snapshot owner a restore or delete addresses: `owner` or the caller.
    pub fn target_owner(&self) -> u32 {
        self.owner.unwrap_or(self.uid)
    }
}

/// One line of a list reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Snapshot name (within its owner's name space).
    pub name: String,
    /// Guest uid that owns the snapshot.
    pub uid: u32,
    /// Pid recorded at save time.
    pub pid: u32,
    /// Command name recorded at save time.
    pub comm: String,
    /// Total pages covered (present and absent).
    pub pages: u64,
    /// Pages that were present (the others restore as zero).
    pub present_pages: u64,
    /// Number of runs recorded.
    pub runs: u32,
    /// Creation time, seconds since the Unix epoch (host clock).
    pub created_unix: u64,
}

/// A reply from the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The save is done: the pages are now shared copy-on-write with the snapshot.
    Saved {
        /// Snapshot name.
        name: String,
        /// Total pages recorded.
        pages: u64,
        /// Pages that were present.
        present_pages: u64,
    },
    /// The restore is done.
    Restored {
        /// Snapshot name.
        name: String,
        /// Pages copied into guest memory.
        pages: u64,
    },
    /// The snapshots, at most [`MAX_LIST_ENTRIES`].
    List(Vec<SnapshotInfo>),
    /// The snapshot is deleted.
    Deleted {
        /// Snapshot name.
        name: String,
    },
    /// The request was refused.
    Error(ErrorReply),
}

impl Request {
    /// Check every field against the limits and against guest RAM of `ram_pages` pages.
    /// This is the VMM's gate: the guest is untrusted.
    pub fn validate(&self, ram_pages: u64) -> Result<(), ProtocolError> {
        match self {
            Request::Save(s) => {
                validate_name(&s.name)?;
                validate_comm(&s.comm)?;
                validate_runs(&s.runs, ram_pages, false)
            }
            Request::Restore(r) => {
                validate_name(&r.name)?;
                validate_runs(&r.runs, ram_pages, true)
            }
            Request::List => Ok(()),
            Request::Delete { name } => validate_name(name),
        }
    }
}

/// A virtual address range `[start, end)` of a guest process, page aligned. The same
/// type travels in the agent protocol and in the VMM's control API (JSON
/// `{"start": .., "end": ..}`); on the command line it is read by
/// [`crate::cli::parse_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtRange {
    /// First byte (page aligned).
    pub start: u64,
    /// One past the last byte (page aligned, above `start`).
    pub end: u64,
}

/// A request from the VMM to the guest agent (on [`AGENT_PORT`]). The agent answers
/// with one [`Reply`]: `Saved` on success, `Error` otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRequest {
    /// Freeze process `pid`, save `ranges` (all writable private mappings when empty)
    /// under `name` through the snapshot service, thaw it.
    SnapshotProcess {
        /// Snapshot name.
        name: String,
        /// Guest pid.
        pid: u32,
        /// Ranges to save; empty means the agent's default selection.
        ranges: Vec<VirtRange>,
        /// Single-use token the agent passes back in its [`GuestRequest::host_token`],
        /// so the snapshot is host-owned (the VMM hands it out per request).
        token: u64,
    },
}

/// What an application (the library, or `pmsnap-agent` run by any user) asks the agent
/// on its Unix socket. The agent learns the caller's uid and pid from the kernel
/// (`SO_PEERCRED`), checks that the caller may access process `pid`, reads the
/// guest-physical pages from its page map itself and asks the VMM on the caller's
/// behalf. No frame number ever comes from an application. Answered with one [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppRequest {
    /// Save `ranges` of process `pid` (default selection when empty) under `name`.
    Save {
        /// Snapshot name.
        name: String,
        /// Guest pid (the caller itself, or a process of the same uid; root: any).
        pid: u32,
        /// Virtual ranges; empty means all writable private mappings.
        ranges: Vec<VirtRange>,
    },
    /// Restore snapshot `name` into `ranges` of process `pid` (default selection when
    /// empty), filled in order.
    Restore {
        /// Snapshot name.
        name: String,
        /// Owner uid of the snapshot when not the caller (root only).
        owner: Option<u32>,
        /// Guest pid.
        pid: u32,
        /// Target ranges.
        ranges: Vec<VirtRange>,
    },
    /// List the snapshots the caller may see.
    List,
    /// Delete a snapshot of the caller (root: of `owner`).
    Delete {
        /// Snapshot name.
        name: String,
        /// Owner uid when not the caller (root only).
        owner: Option<u32>,
    },
}

impl AppRequest {
    /// Check names and ranges (the agent does not trust applications).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            AppRequest::Save { name, ranges, .. } | AppRequest::Restore { name, ranges, .. } => {
                validate_name(name)?;
                validate_ranges(ranges)
            }
            AppRequest::List => Ok(()),
            AppRequest::Delete { name, .. } => validate_name(name),
        }
    }
}

/// Check virtual ranges: at most [`MAX_RANGES`], each page aligned and non-empty.
pub fn validate_ranges(ranges: &[VirtRange]) -> Result<(), ProtocolError> {
    if ranges.len() > MAX_RANGES {
        return Err(ProtocolError::BadRun {
            index: MAX_RANGES,
            reason: "more ranges than MAX_RANGES",
        });
    }
    for (index, r) in ranges.iter().enumerate() {
        if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
            return Err(ProtocolError::BadRun {
                index,
                reason: "range empty or not page aligned",
            });
        }
    }
    Ok(())
}

impl AgentRequest {
    /// Check the fields (the agent does not trust the other end either).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            AgentRequest::SnapshotProcess { name, ranges, .. } => {
                validate_name(name)?;
                validate_ranges(ranges)
            }
        }
    }
}

/// Check a snapshot name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with '.'.
/// (The rule keeps names usable as file names in exports and free of path tricks.)
pub fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        // Bound what ends up in error messages and logs.
        Err(ProtocolError::InvalidName(
            name.chars().take(MAX_NAME_LEN + 8).collect(),
        ))
    }
}

/// Check a command name: at most [`MAX_COMM_LEN`] bytes, no control characters.
pub fn validate_comm(comm: &str) -> Result<(), ProtocolError> {
    if comm.len() > MAX_COMM_LEN || comm.chars().any(char::is_control) {
        return Err(ProtocolError::InvalidComm);
    }
    Ok(())
}

/// Check page runs against guest RAM of `ram_pages` pages: at most [`MAX_RUNS`], at
/// least one, each non-empty, page-aligned virtual address without overflow, present
/// runs entirely inside guest RAM, and all runs together (absent pages included) no
/// more pages than guest RAM has, so nothing the VMM sizes from them can exceed guest
/// RAM. With `require_present` (restore targets), absent runs are refused and no two
/// runs may share a guest-physical page (checked in O(n log n) on at most
/// [`MAX_RUNS`] runs).
pub fn validate_runs(
    runs: &[Run],
    ram_pages: u64,
    require_present: bool,
) -> Result<(), ProtocolError> {
    if runs.is_empty() {
        return Err(ProtocolError::NoRuns);
    }
    if runs.len() > MAX_RUNS {
        return Err(ProtocolError::TooManyRuns(runs.len()));
    }
    let mut total = 0u64;
    for (index, r) in runs.iter().enumerate() {
        let bad = |reason| Err(ProtocolError::BadRun { index, reason });
        if r.count == 0 {
            return bad("zero page count");
        }
        if r.virt_addr % PAGE_SIZE != 0 {
            return bad("virtual address not page aligned");
        }
        let bytes = match r.count.checked_mul(PAGE_SIZE) {
            Some(b) => b,
            None => return bad("page count overflows"),
        };
        if r.virt_addr.checked_add(bytes).is_none() {
            return bad("virtual range overflows");
        }
        if r.present {
            match r.guest_phys_first_page.checked_add(r.count) {
                Some(end) if end <= ram_pages => {}
                Some(_) => return bad("pages outside guest RAM"),
                None => return bad("guest page range overflows"),
            }
        } else if require_present {
            return bad("restore target pages must be present");
        }
        total = total.saturating_add(r.count);
        if total > ram_pages {
            return Err(ProtocolError::TooManyPages {
                got: total_pages(runs),
                limit: ram_pages,
            });
        }
    }
    if require_present {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_unstable_by_key(|&i| runs[i].guest_phys_first_page);
        for w in order.windows(2) {
            let (a, b) = (&runs[w[0]], &runs[w[1]]);
            // Present runs were checked above: first + count does not overflow.
            if a.guest_phys_first_page + a.count > b.guest_phys_first_page {
                return Err(ProtocolError::Overlap {
                    first: w[0].min(w[1]),
                    second: w[0].max(w[1]),
                });
            }
        }
    }
    Ok(())
}

/// Total pages of some runs (saturating; validated runs never saturate).
pub fn total_pages(runs: &[Run]) -> u64 {
    runs.iter().fold(0u64, |acc, r| acc.saturating_add(r.count))
}

/// Read one whole frame (header and payload) from a blocking stream, checking the
/// header before allocating the payload. Returns `Ok(None)` on a clean end of stream
/// before the first header byte.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtocolError::Truncated {
                    got,
                    want: HEADER_LEN,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e.to_string())),
        }
    }
    let header = FrameHeader::parse(&head)?;
    let mut frame = vec![0u8; HEADER_LEN + header.len as usize];
    frame[..HEADER_LEN].copy_from_slice(&head);
    r.read_exact(&mut frame[HEADER_LEN..])
        .map_err(|e| ProtocolError::Io(e.to_string()))?;
    Ok(Some(frame))
}

/// Write one frame to a blocking stream.
pub fn write_frame<W: Write>(w: &mut W, frame: &[u8]) -> Result<(), ProtocolError> {
    w.write_all(frame)
        .and_then(|()| w.flush())
        .map_err(|e| ProtocolError::Io(e.to_string()))
}

/// Send one request on a blocking stream and wait for its reply (the agent's side of
/// an exchange).
pub fn call<S: Read + Write>(stream: &mut S, req: &GuestRequest) -> Result<Reply, ProtocolError> {
    write_frame(stream, &req.encode()?)?;
    let frame = read_frame(stream)?
        .ok_or_else(|| ProtocolError::Io("connection closed before the reply".into()))?;
    Reply::decode(&frame)
}

/// Incremental frame splitter for a byte stream that arrives in pieces (the VMM side
/// of a vsock connection). Feed bytes with [`FrameBuffer::push`], take whole frames with
/// [`FrameBuffer::next_frame`]. A bad header is reported once and poisons the buffer:
/// after garbage there is no way to find the next frame boundary, so the caller should
/// answer with an error and close the connection.
#[derive(Debug, Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    poisoned: bool,
}

impl FrameBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes. Returns an error (and poisons) when the pending data would
    /// exceed one maximal frame, which a well-behaved peer never sends unanswered.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.poisoned {
            return Ok(());
        }
        let limit = HEADER_LEN + MAX_PAYLOAD_LEN as usize;
        if self.buf.len() + bytes.len() > limit {
            // Validate the header first so the error says why.
            if let Some(Err(e)) = self.header() {
                self.poisoned = true;
                return Err(e);
            }
            self.poisoned = true;
            return Err(ProtocolError::TooLarge(
                (self.buf.len() + bytes.len()) as u64,
            ));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn header(&self) -> Option<Result<FrameHeader, ProtocolError>> {
        let head: &[u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader::parse(head))
    }

    /// Take the next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.poisoned {
            return Ok(None);
        }
        let header = match self.header() {
            None => return Ok(None),
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                self.poisoned = true;
                self.buf.clear();
                return Err(e);
            }
        };
        let total = HEADER_LEN + header.len as usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        Ok(Some(std::mem::replace(&mut self.buf, rest)))
    }

    /// Bytes buffered and not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Whether a bad header stopped this buffer.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{run, save};
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "A.b-c_9", &"x".repeat(64), "a..b"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "..",
            "a\0",
        ] {
            assert!(
                matches!(validate_name(bad), Err(ProtocolError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(validate_comm("bash").is_ok());
        assert_eq!(validate_comm("a\nb"), Err(ProtocolError::InvalidComm));
        assert_eq!(
            validate_comm(&"c".repeat(65)),
            Err(ProtocolError::InvalidComm)
        );
    }

    #[test]
    fn run_validation() {
        let ram = 1000;
        assert_eq!(validate_runs(&[run(990, 10, 0, true)], ram, true), Ok(()));
        let reason = |r: Run, req| match validate_runs(&[r], ram, req) {
            Err(ProtocolError::BadRun { index: 0, reason }) => reason,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            reason(run(991, 10, 0, true), false),
            "pages outside guest RAM"
        );
        assert_eq!(
            reason(run(u64::MAX, 2, 0, true), false),
            "guest page range overflows"
        );
        assert_eq!(reason(run(1, 0, 0, true), false), "zero page count");
        assert_eq!(
            reason(run(1, 1, 0x10, true), false),
            "virtual address not page aligned"
        );
        assert_eq!(
            reason(run(1, u64::MAX / 2, 0, false), false),
            "page count overflows"
        );
        assert_eq!(
            reason(run(1, 2, u64::MAX - 4095, true), false),
            "virtual range overflows"
        );
        assert_eq!(
            reason(run(0, 1, 0, false), true),
            "restore target pages must be present"
        );
        // Absent pages need no guest-physical page, so any frame number is accepted.
        assert_eq!(
            validate_runs(&[run(u64::MAX, 3, 0, false)], ram, false),
            Ok(())
        );
        assert_eq!(validate_runs(&[], ram, false), Err(ProtocolError::NoRuns));
        let many = vec![run(0, 1, 0, true); MAX_RUNS + 1];
        assert_eq!(
            validate_runs(&many, ram, false),
            Err(ProtocolError::TooManyRuns(MAX_RUNS + 1))
        );
        // Index of the failing run is reported.
        assert!(matches!(
            validate_runs(&[run(0, 1, 0, true), run(0, 0, 0, true)], ram, false),
            Err(ProtocolError::BadRun { index: 1, .. })
        ));
        assert_eq!(save().validate(ram), Ok(()));
        assert!(save().validate(100).is_err());
        assert!(Request::Delete { name: ".x".into() }.validate(ram).is_err());
        assert_eq!(total_pages(&[run(0, 3, 0, true), run(0, 4, 0, false)]), 7);
    }

    #[test]
    fn page_totals_are_bounded_by_guest_ram() {
        let ram = 1000;
        // Absent pages count: 2^32 of them cannot be named in a guest of 1000 pages.
        assert_eq!(
            validate_runs(&[run(0, 1 << 32, 0, false)], ram, false),
            Err(ProtocolError::TooManyPages {
                got: 1 << 32,
                limit: ram
            })
        );
        // Many runs that each fit but together exceed guest RAM.
        let many: Vec<Run> = (0..65_536u64)
            .map(|i| run(0, 1 << 16, i << 28, false))
            .collect();
        let e = validate_runs(&many, ram, false).expect_err("too many pages");
        assert!(matches!(e, ProtocolError::TooManyPages { limit: 1000, .. }));
        assert_eq!(e.code(), ErrorCode::TooLarge);
        // Exactly guest RAM is fine.
        assert_eq!(
            validate_runs(
                &[run(0, 600, 0, false), run(0, 400, 0x1000_0000, true)],
                ram,
                false
            ),
            Ok(())
        );
        // Restore targets must be disjoint in guest-physical memory, in any order.
        assert_eq!(
            validate_runs(
                &[run(50, 10, 0, true), run(10, 10, 0x10000, true)],
                ram,
                true
            ),
            Ok(())
        );
        let e = validate_runs(
            &[
                run(50, 10, 0, true),
                run(0, 1, 0x1000, true),
                run(55, 1, 0x20000, true),
            ],
            ram,
            true,
        )
        .expect_err("overlap");
        assert_eq!(
            e,
            ProtocolError::Overlap {
                first: 0,
                second: 2
            }
        );
        assert_eq!(e.code(), ErrorCode::RunOutOfRange);
        // 65,536 copies of the same target page: refused, not allocated.
        let same = vec![run(5, 1, 0, true); MAX_RUNS];
        assert!(matches!(
            validate_runs(&same, 1 << 20, true),
            Err(ProtocolError::Overlap { .. })
        ));
    }

    #[test]
    fn app_requests_round_trip_and_validate() {
        let reqs = [
            AppRequest::Save {
                name: "s".into(),
                pid: 9,
                ranges: vec![],
            },
            AppRequest::Restore {
                name: "s".into(),
                owner: Some(1000),
                pid: 9,
                ranges: vec![VirtRange {
                    start: 0x1000,
                    end: 0x2000,
                }],
            },
            AppRequest::List,
            AppRequest::Delete {
                name: "s".into(),
                owner: None,
            },
        ];
        for r in &reqs {
            assert_eq!(r.validate(), Ok(()));
            let f = r.encode().expect("encode");
            assert_eq!(&AppRequest::decode(&f).expect("decode"), r);
        }
        let bad = AppRequest::Save {
            name: "s".into(),
            pid: 9,
            ranges: vec![VirtRange {
                start: 0x1001,
                end: 0x2000,
            }],
        };
        assert!(matches!(bad.validate(), Err(ProtocolError::BadRun { .. })));
        let bad = AppRequest::Delete {
            name: "../x".into(),
            owner: None,
        };
        assert!(matches!(bad.validate(), Err(ProtocolError::InvalidName(_))));
    }

    #[test]
    fn agent_request_round_trip_and_validation() {
        let ok = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![VirtRange {
                start: 0x1000,
                end: 0x3000,
            }],
            token: 1,
        };
        let f = ok.encode().expect("encode");
        assert_eq!(AgentRequest::decode(&f).expect("decode"), ok);
        assert_eq!(ok.validate(), Ok(()));
        let bad = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![VirtRange {
                start: 0x3000,
                end: 0x3000,
            }],
            token: 1,
        };
        assert!(matches!(
            bad.validate(),
            Err(ProtocolError::BadRun { index: 0, .. })
        ));
        let bad_name = AgentRequest::SnapshotProcess {
            name: "a/b".into(),
            pid: 7,
            ranges: vec![],
            token: 1,
        };
        assert!(matches!(
            bad_name.validate(),
            Err(ProtocolError::InvalidName(_))
        ));
        let too_many = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![
                VirtRange {
                    start: 0x1000,
                    end: 0x2000
                };
                MAX_RANGES + 1
            ],
            token: 1,
        };
        assert!(matches!(
            too_many.validate(),
            Err(ProtocolError::BadRun {
                index: MAX_RANGES,
                ..
            })
        ));
        // A reply frame is not an agent request.
        let r = Reply::Deleted { name: "a".into() }
            .encode()
            .expect("encode");
        assert_eq!(AgentRequest::decode(&r), Err(ProtocolError::BadKind(2)));
    }

    #[test]
    fn frame_buffer_splits_a_stream() {
        let a = GuestRequest::new(0, save()).encode().expect("encode");
        let b = GuestRequest::new(5, Request::List)
            .encode()
            .expect("encode");
        let mut stream = a.clone();
        stream.extend_from_slice(&b);
        let mut fb = FrameBuffer::new();
        let mut frames = Vec::new();
        for chunk in stream.chunks(5) {
            fb.push(chunk).expect("push");
            while let Some(f) = fb.next_frame().expect("frame") {
                frames.push(f);
            }
        }
        assert_eq!(frames, vec![a, b]);
        assert_eq!(fb.pending(), 0);

        let mut fb = FrameBuffer::new();
        fb.push(b"GET / HTTP/1.1\r\n").expect("push");
        assert!(matches!(fb.next_frame(), Err(ProtocolError::BadMagic(_))));
        assert!(fb.is_poisoned());
        assert_eq!(fb.next_frame(), Ok(None));
    }

    #[test]
    fn blocking_read_and_write() {
        let f = GuestRequest::new(0, save()).encode().expect("encode");
        let mut wire = Vec::new();
        write_frame(&mut wire, &f).expect("write");
        write_frame(&mut wire, &f).expect("write");
        let mut cur = std::io::Cursor::new(wire);
        assert_eq!(read_frame(&mut cur).expect("read"), Some(f.clone()));
        assert_eq!(read_frame(&mut cur).expect("read"), Some(f));
        assert_eq!(read_frame(&mut cur).expect("eof"), None);
        let mut cur = std::io::Cursor::new(vec![0x4e, 0x53]);
        assert!(matches!(
            read_frame(&mut cur),
            Err(ProtocolError::Truncated { .. })
        ));
    }

    #[test]
    fn call_over_a_socket() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            let f = read_frame(&mut b).expect("read").expect("frame");
            let name = match GuestRequest::decode(&f).expect("request").op {
                Request::Delete { name } => name,
                other => panic!("unexpected {other:?}"),
            };
            write_frame(&mut b, &Reply::Deleted { name }.encode().expect("encode")).expect("write");
            // Then hang up without answering the second call.
            let _ = read_frame(&mut b);
        });
        let r = call(
            &mut a,
            &GuestRequest::new(0, Request::Delete { name: "n".into() }),
        )
        .expect("call");
        assert_eq!(r, Reply::Deleted { name: "n".into() });
        a.shutdown(std::net::Shutdown::Write).expect("shutdown");
        server.join().expect("server");
        assert!(matches!(
            call(&mut a, &GuestRequest::new(0, Request::List)),
            Err(ProtocolError::Io(_))
        ));
    }
}
