//! The protocol's numbers: vsock ports, the frame magic and version, and every size
//! and count limit a message must keep (checked when decoding and validating).

/// vsock port (on the host, CID 2) where the VMM serves this protocol.
pub const SNAPSHOT_SERVICE_PORT: u32 = 1024;
/// vsock port where the guest agent listens for requests from the host.
pub const AGENT_PORT: u32 = 1025;

/// Frame magic, first four bytes of every frame.
pub const MAGIC: u32 = 0x504d_534e;
/// The only protocol version this build speaks. Version 2 (issue 12) wraps every
/// request to the VMM in a [`GuestRequest`] naming the guest uid it is made for, adds
/// the owner uid to [`SnapshotInfo`], a host token to [`AgentRequest::SnapshotProcess`],
/// and the application messages ([`AppRequest`]) spoken on the agent's Unix socket.
///
/// [`GuestRequest`]: super::GuestRequest
/// [`SnapshotInfo`]: super::SnapshotInfo
/// [`AgentRequest::SnapshotProcess`]: super::AgentRequest::SnapshotProcess
/// [`AppRequest`]: super::AppRequest
pub const VERSION: u16 = 2;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted (4 MiB): room for [`MAX_RUNS`] worst-case runs.
pub const MAX_PAYLOAD_LEN: u32 = 4 << 20;
/// Most page runs in one save or restore request.
pub const MAX_RUNS: usize = 65_536;
/// Longest snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest process command name carried in a save request, in bytes.
pub const MAX_COMM_LEN: usize = 64;
/// Longest error message the VMM sends (longer ones are cut at a char boundary).
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Most snapshots listed in one reply.
pub const MAX_LIST_ENTRIES: usize = 4096;
/// Guest page size the runs are counted in.
pub const PAGE_SIZE: u64 = 4096;
/// Most virtual ranges in one [`AgentRequest::SnapshotProcess`].
///
/// [`AgentRequest::SnapshotProcess`]: super::AgentRequest::SnapshotProcess
pub const MAX_RANGES: usize = 1024;
