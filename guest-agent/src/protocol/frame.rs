//! Frames on the wire: the fixed 12-byte header ([`FrameHeader`]) and the `encode` /
//! `decode` of every message, one whole frame at a time (layout in the module docs of
//! [`crate::protocol`]).

use serde::{Deserialize, Serialize};

use super::{
    AgentRequest, AppRequest, GuestRequest, ProtocolError, Reply, HEADER_LEN, MAGIC,
    MAX_PAYLOAD_LEN, VERSION,
};

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Agent to VMM.
    Request = 1,
    /// VMM to agent.
    Reply = 2,
}

impl FrameKind {
    fn from_u16(v: u16) -> Result<Self, ProtocolError> {
        match v {
            1 => Ok(Self::Request),
            2 => Ok(Self::Reply),
            other => Err(ProtocolError::BadKind(other)),
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request or reply.
    pub kind: FrameKind,
    /// Payload length, already checked against [`MAX_PAYLOAD_LEN`].
    pub len: u32,
}

impl FrameHeader {
    /// Parse and check the fixed header: magic, version, kind and the length limit.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, ProtocolError> {
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion { got: version });
        }
        let kind = FrameKind::from_u16(u16::from_le_bytes([bytes[6], bytes[7]]))?;
        let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if len > MAX_PAYLOAD_LEN {
            return Err(ProtocolError::TooLarge(u64::from(len)));
        }
        Ok(Self { kind, len })
    }

    /// The 12 header bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out
    }
}

fn encode_frame<T: Serialize>(kind: FrameKind, msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_PAYLOAD_LEN as usize {
        return Err(ProtocolError::TooLarge(len as u64));
    }
    let header = FrameHeader {
        kind,
        // Cannot truncate: checked against MAX_PAYLOAD_LEN (a u32) just above.
        len: len as u32,
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(out)
}

fn decode_frame<T: for<'de> Deserialize<'de>>(
    want: FrameKind,
    frame: &[u8],
) -> Result<T, ProtocolError> {
    let head: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(ProtocolError::Truncated {
            got: frame.len(),
            want: HEADER_LEN,
        })?;
    let header = FrameHeader::parse(head)?;
    if header.kind != want {
        return Err(ProtocolError::BadKind(header.kind as u16));
    }
    let want_len = HEADER_LEN + header.len as usize;
    if frame.len() < want_len {
        return Err(ProtocolError::Truncated {
            got: frame.len(),
            want: want_len,
        });
    }
    if frame.len() > want_len {
        return Err(ProtocolError::Trailing(frame.len() - want_len));
    }
    decode_payload(&frame[HEADER_LEN..])
}

/// Decode a payload whose header was already checked; the payload must be used whole.
fn decode_payload<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, ProtocolError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(payload)
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Trailing(rest.len()));
    }
    Ok(msg)
}

impl GuestRequest {
    /// Encode as one frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        encode_frame(FrameKind::Request, self)
    }

    /// Decode exactly one request frame (header and payload, nothing more).
    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        decode_frame(FrameKind::Request, frame)
    }
}

impl AppRequest {
    /// Encode as one request frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        encode_frame(FrameKind::Request, self)
    }

    /// Decode exactly one request frame.
    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        decode_frame(FrameKind::Request, frame)
    }
}

impl AgentRequest {
    /// Encode as one request frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        encode_frame(FrameKind::Request, self)
    }

    /// Decode exactly one request frame.
    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        decode_frame(FrameKind::Request, frame)
    }
}

impl Reply {
    /// Encode as one frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        encode_frame(FrameKind::Reply, self)
    }

    /// Decode exactly one reply frame.
    pub fn decode(frame: &[u8]) -> Result<Self, ProtocolError> {
        decode_frame(FrameKind::Reply, frame)
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::test_util::{run, save};
    use crate::protocol::*;

    #[test]
    fn round_trip_every_message() {
        let reqs = [
            save(),
            Request::Restore(RestoreRequest {
                name: "x".into(),
                runs: vec![run(7, 1, 0x1000, true)],
            }),
            Request::List,
            Request::Delete { name: "y".into() },
        ];
        for (uid, r) in reqs.into_iter().enumerate() {
            let r = &GuestRequest {
                uid: uid as u32,
                owner: Some(7),
                host_token: Some(99),
                op: r,
            };
            let f = r.encode().expect("encode");
            assert_eq!(&f[0..4], &MAGIC.to_le_bytes());
            assert_eq!(
                u32::from_le_bytes(f[8..12].try_into().expect("4")) as usize,
                f.len() - 12
            );
            assert_eq!(&GuestRequest::decode(&f).expect("decode"), r);
        }
        let replies = [
            Reply::Saved {
                name: "a".into(),
                pages: 20,
                present_pages: 16,
            },
            Reply::Restored {
                name: "a".into(),
                pages: 20,
            },
            Reply::List(vec![SnapshotInfo {
                name: "a".into(),
                uid: 1000,
                pid: 1,
                comm: "init".into(),
                pages: 3,
                present_pages: 2,
                runs: 2,
                created_unix: 1_700_000_000,
            }]),
            Reply::Deleted { name: "a".into() },
            Reply::Error(ErrorReply::new(ErrorCode::NotFound, "no snapshot a")),
        ];
        for r in &replies {
            let f = r.encode().expect("encode");
            assert_eq!(&Reply::decode(&f).expect("decode"), r);
            // A reply is never accepted where a request is expected.
            assert_eq!(GuestRequest::decode(&f), Err(ProtocolError::BadKind(2)));
        }
    }

    #[test]
    fn header_rejections() {
        let good = GuestRequest::new(0, Request::List)
            .encode()
            .expect("encode");
        let mut f = good.clone();
        f[0] ^= 1;
        assert!(matches!(
            GuestRequest::decode(&f),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut f = good.clone();
        f[4..6].copy_from_slice(&3u16.to_le_bytes());
        let e = GuestRequest::decode(&f).expect_err("version 3");
        assert_eq!(e, ProtocolError::UnsupportedVersion { got: 3 });
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        let mut f = good.clone();
        f[6..8].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(GuestRequest::decode(&f), Err(ProtocolError::BadKind(9)));
        let mut f = good.clone();
        f[8..12].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        assert_eq!(
            GuestRequest::decode(&f),
            Err(ProtocolError::TooLarge(u64::from(MAX_PAYLOAD_LEN) + 1))
        );
        assert!(matches!(
            GuestRequest::decode(&good[..5]),
            Err(ProtocolError::Truncated { got: 5, want: 12 })
        ));
        let mut f = good.clone();
        f[8..12].copy_from_slice(&5u32.to_le_bytes());
        assert!(matches!(
            GuestRequest::decode(&f),
            Err(ProtocolError::Truncated { .. })
        ));
        let mut f = good.clone();
        f.push(0);
        assert_eq!(GuestRequest::decode(&f), Err(ProtocolError::Trailing(1)));
    }

    #[test]
    fn payload_rejections() {
        // Unknown enum variant index.
        let mut f = FrameHeader {
            kind: FrameKind::Request,
            len: 1,
        }
        .to_bytes()
        .to_vec();
        f.push(77);
        assert!(matches!(
            GuestRequest::decode(&f),
            Err(ProtocolError::Malformed(_))
        ));
        // A payload with a valid message followed by junk inside the announced length.
        let mut inner = postcard::to_stdvec(&GuestRequest::new(0, Request::List)).expect("encode");
        inner.push(0xAA);
        let mut f = FrameHeader {
            kind: FrameKind::Request,
            len: inner.len() as u32,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&inner);
        assert_eq!(GuestRequest::decode(&f), Err(ProtocolError::Trailing(1)));
        // Truncated payload of a save.
        let full = GuestRequest::new(0, save()).encode().expect("encode");
        let mut f = full[..full.len() - 3].to_vec();
        let len = (f.len() - HEADER_LEN) as u32;
        f[8..12].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            GuestRequest::decode(&f),
            Err(ProtocolError::Malformed(_))
        ));
        // A vector length prefix claiming billions of runs fails without allocating them.
        let mut p = vec![0u8, 0, 0]; // uid 0, owner None, host_token None
        p.push(0); // variant Save
        p.push(1);
        p.push(b'a'); // name "a"
        p.push(1); // pid 1
        p.push(0); // comm ""
        p.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // runs len = u32::MAX
        let mut f = FrameHeader {
            kind: FrameKind::Request,
            len: p.len() as u32,
        }
        .to_bytes()
        .to_vec();
        f.extend_from_slice(&p);
        assert!(matches!(
            GuestRequest::decode(&f),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn max_runs_fit_in_a_frame() {
        // Worst case: every field at its largest varint.
        let r = GuestRequest {
            uid: u32::MAX,
            owner: Some(u32::MAX),
            host_token: Some(u64::MAX),
            op: Request::Save(SaveRequest {
                name: "n".repeat(MAX_NAME_LEN),
                pid: u32::MAX,
                comm: "c".repeat(MAX_COMM_LEN),
                runs: vec![run(u64::MAX, u64::MAX, u64::MAX, true); MAX_RUNS],
            }),
        };
        let f = r.encode().expect("max request fits");
        assert!(f.len() <= HEADER_LEN + MAX_PAYLOAD_LEN as usize);
        assert_eq!(GuestRequest::decode(&f).expect("decode"), r);
    }
}
