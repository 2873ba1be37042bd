//! The messages: what the agent asks the VMM's snapshot service ([`GuestRequest`]
//! around a [`Request`]), what the VMM answers ([`Reply`]), what the VMM asks the agent
//! ([`AgentRequest`]) and what applications ask the agent ([`AppRequest`]). Their
//! `encode` / `decode` live in `frame.rs`, their `validate` in `validate.rs`.

use serde::{Deserialize, Serialize};

use super::ErrorReply;

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
    /// The snapshots, at most [`MAX_LIST_ENTRIES`](super::MAX_LIST_ENTRIES).
    List(Vec<SnapshotInfo>),
    /// The snapshot is deleted.
    Deleted {
        /// Snapshot name.
        name: String,
    },
    /// The request was refused.
    Error(ErrorReply),
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
///
/// [`AGENT_PORT`]: super::AGENT_PORT
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
