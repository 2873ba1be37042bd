//! The VMM asking the guest agent for a process snapshot: connect to the agent's vsock
//! port through the vsock device's host socket (Firecracker style `CONNECT <port>`),
//! send one agent request, read one reply. The agent then saves the process through the
//! VMM's snapshot service on another connection, which the event loop serves meanwhile.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use guest_agent::protocol::{self, AgentRequest, ErrorCode, Reply, VirtRange};

use crate::api::{self, ApiError};

/// How long the agent may take: it freezes the process and walks its page map under
/// this host's slow guest-kernel emulation (seconds per 64 MiB).
const AGENT_TIMEOUT: Duration = Duration::from_secs(900);

/// Ask the agent behind `uds` to snapshot a process; returns the saved page counts.
/// `token` (from [`super::engine::Engine::grant_host_save`]) makes the snapshot
/// host-owned when the agent saves it.
pub fn snapshot_process(
    uds: &Path,
    req: &api::ProcessSnapshotRequest,
    token: u64,
) -> Result<(u64, u64), ApiError> {
    let unavailable = |what: String| {
        ApiError::InvalidState(format!(
            "cannot reach the guest agent through {}: {what}",
            uds.display()
        ))
    };
    let mut stream = UnixStream::connect(uds).map_err(|e| unavailable(e.to_string()))?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(AGENT_TIMEOUT)))
        .map_err(|e| unavailable(e.to_string()))?;
    writeln!(stream, "CONNECT {}", protocol::AGENT_PORT).map_err(|e| unavailable(e.to_string()))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| unavailable(e.to_string()))?);
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .map_err(|e| unavailable(e.to_string()))?;
    if !line.starts_with("OK ") {
        return Err(unavailable(
            "the agent does not listen on its vsock port (is `pmsnap-agent serve` running?)".into(),
        ));
    }
    let frame = AgentRequest::SnapshotProcess {
        name: req.name.clone(),
        pid: req.pid,
        ranges: req
            .ranges
            .iter()
            .map(|r| VirtRange {
                start: r.start,
                end: r.end,
            })
            .collect(),
        token,
    }
    .encode()
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    protocol::write_frame(&mut stream, &frame).map_err(|e| unavailable(e.to_string()))?;
    let reply = protocol::read_frame(&mut reader)
        .map_err(|e| unavailable(e.to_string()))?
        .ok_or_else(|| unavailable("the agent closed the connection".into()))?;
    match Reply::decode(&reply).map_err(|e| unavailable(format!("bad reply: {e}")))? {
        Reply::Saved {
            pages,
            present_pages,
            ..
        } => Ok((pages, present_pages)),
        Reply::Error(e) => Err(match e.code {
            ErrorCode::NotFound => ApiError::UnknownSnapshot(e.message),
            ErrorCode::AlreadyExists => ApiError::DuplicateName(req.name.clone()),
            ErrorCode::BadRequest | ErrorCode::InvalidName | ErrorCode::RunOutOfRange => {
                ApiError::BadRequest(format!("agent: {}", e.message))
            }
            _ => ApiError::Internal(format!("agent: {:?}: {}", e.code, e.message)),
        }),
        other => Err(unavailable(format!("unexpected reply {other:?}"))),
    }
}
