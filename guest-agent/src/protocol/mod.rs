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
//! - `messages.rs`: the message types ([`GuestRequest`] around a [`Request`], [`Reply`],
//!   [`AgentRequest`], [`AppRequest`] and their parts);
//! - `frame.rs`: the frame header ([`FrameHeader`]) and each message's `encode` / `decode`;
//! - `validate.rs`: the checks of message content (the `validate` methods,
//!   [`validate_runs`] and the other `validate_*`, [`total_pages`]);
//! - `stream.rs`: frames over connections ([`read_frame`], [`write_frame`], [`call`] and
//!   the VMM's [`FrameBuffer`]);
//! - `error.rs`: [`ProtocolError`] and what a refusal carries ([`ErrorCode`],
//!   [`ErrorReply`]);
//! - `limits.rs`: ports, magic, version and the size and count limits.
//!
//! Everything is re-exported here: use `guest_agent::protocol::X`, never the file.

mod error;
mod frame;
mod limits;
mod messages;
mod stream;
#[cfg(test)]
mod test_util;
mod validate;

pub use error::{ErrorCode, ErrorReply, ProtocolError};
pub use frame::{FrameHeader, FrameKind};
pub use limits::{
    AGENT_PORT, HEADER_LEN, MAGIC, MAX_COMM_LEN, MAX_LIST_ENTRIES, MAX_MESSAGE_LEN, MAX_NAME_LEN,
    MAX_PAYLOAD_LEN, MAX_RANGES, MAX_RUNS, PAGE_SIZE, SNAPSHOT_SERVICE_PORT, VERSION,
};
pub use messages::{
    AgentRequest, AppRequest, GuestRequest, Reply, Request, RestoreRequest, Run, SaveRequest,
    SnapshotInfo, VirtRange,
};
pub use stream::{call, read_frame, write_frame, FrameBuffer};
pub use validate::{total_pages, validate_comm, validate_name, validate_ranges, validate_runs};
