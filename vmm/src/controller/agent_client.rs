//! The VMM asking the guest agent for a process snapshot: connect to the agent's vsock
//! port through the vsock device's host socket (Firecracker style `CONNECT <port>`),
//! send one agent request, read one reply. The agent then saves the process through the
//! VMM's snapshot service on another connection, which the event loop serves meanwhile.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::protocol::{self, AgentRequest, ErrorCode, Reply};

use crate::api::{self, ApiError};

/// How long the whole exchange with the agent may take, from connect to reply: it
/// freezes the process and walks its page map under this host's slow guest-kernel
/// emulation (seconds per 64 MiB). The bound is on the whole exchange, not per read, so
/// an agent (or anything else listening on the guest's port) that trickles bytes cannot
/// keep the request open longer.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(900);

/// A stream whose every read and write times out at one overall deadline.
struct Deadlined {
    stream: UnixStream,
    deadline: Instant,
}

impl Deadlined {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the guest agent did not answer in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.set_write_timeout(Some(left))
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Ask the agent behind `uds` to snapshot a process, giving it `deadline` for the whole
/// exchange; returns the saved page counts. `token` (from
/// [`crate::controller::HostGrants::grant`]) makes the snapshot host-owned when the
/// agent saves it.
pub fn snapshot_process(
    uds: &Path,
    req: &api::ProcessSnapshotRequest,
    token: u64,
    deadline: Duration,
) -> Result<(u64, u64), ApiError> {
    let deadline = Instant::now() + deadline;
    let unavailable = |what: String| {
        ApiError::InvalidState(format!(
            "cannot reach the guest agent through {}: {what}",
            uds.display()
        ))
    };
    let connected = UnixStream::connect(uds).map_err(|e| unavailable(e.to_string()))?;
    let mut stream = Deadlined {
        stream: connected
            .try_clone()
            .map_err(|e| unavailable(e.to_string()))?,
        deadline,
    };
    writeln!(stream, "CONNECT {}", protocol::AGENT_PORT).map_err(|e| unavailable(e.to_string()))?;
    let mut reader = BufReader::new(Deadlined {
        stream: connected,
        deadline,
    });
    let mut line = String::new();
    // The handshake line is short; a peer that never ends it is cut off at 256 bytes.
    (&mut reader)
        .take(256)
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
        ranges: req.ranges.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A peer on the agent's port that accepts and then trickles a byte every 20 ms
    /// (never a whole frame) is cut off at the overall deadline, not kept open by each
    /// byte resetting a per-read timeout.
    #[test]
    fn a_trickling_agent_is_cut_off_at_the_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).expect("bind");
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut line = [0u8; 64];
            let _ = s.read(&mut line);
            let _ = s.write_all(b"OK 1073741824\n");
            // Trickle until the client goes away or 5 s pass.
            for _ in 0..250 {
                std::thread::sleep(Duration::from_millis(20));
                if s.write_all(&[0]).is_err() {
                    break;
                }
            }
        });
        let req = api::ProcessSnapshotRequest {
            pid: 1,
            name: "p".into(),
            ranges: Vec::new(),
        };
        let start = Instant::now();
        let err = snapshot_process(&uds, &req, 1, Duration::from_millis(300))
            .expect_err("no reply within the deadline");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(3), "cut off after {took:?}");
        assert!(matches!(err, ApiError::InvalidState(_)), "{err:?}");
        peer.join().expect("peer");
    }
}
