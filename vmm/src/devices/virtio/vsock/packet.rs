//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes little-endian)
//! and its validation. Pure functions over bytes, so the fuzzer reaches them directly.

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only type supported.
pub const TYPE_STREAM: u16 = 1;

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset or refused.
    Rst = 3,
    /// Half or full close.
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Credit information, unsolicited or on request.
    CreditUpdate = 6,
    /// Ask the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// Decode an op number.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// A decoded header. Fields are raw until [`VsockHeader::validate_from_guest`] passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

/// Why a packet from the guest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than [`HDR_LEN`] bytes.
    #[error("header truncated: {0} bytes")]
    Truncated(usize),
    /// The source CID is not the guest's.
    #[error("source cid {0} is not the guest's")]
    BadSrcCid(u64),
    /// The destination is not the host.
    #[error("destination cid {0} is not the host")]
    BadDstCid(u64),
    /// Not a stream socket.
    #[error("socket type {0} not supported")]
    BadType(u16),
    /// Unknown operation.
    #[error("unknown op {0}")]
    BadOp(u16),
    /// Payload above [`MAX_PKT_PAYLOAD`].
    #[error("payload of {0} bytes too large")]
    TooLong(u32),
    /// A payload on an op that carries none.
    #[error("payload of {0} bytes on a non-data op")]
    UnexpectedPayload(u32),
    /// Shutdown flags outside the two defined bits.
    #[error("bad shutdown flags {0:#x}")]
    BadFlags(u32),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl VsockHeader {
    /// Parse the first [`HDR_LEN`] bytes of `bytes`. No field is judged here.
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < HDR_LEN {
            return Err(PacketError::Truncated(bytes.len()));
        }
        Ok(Self {
            src_cid: le64(bytes, 0),
            dst_cid: le64(bytes, 8),
            src_port: le32(bytes, 16),
            dst_port: le32(bytes, 20),
            len: le32(bytes, 24),
            type_: u16::from_le_bytes([bytes[28], bytes[29]]),
            op: u16::from_le_bytes([bytes[30], bytes[31]]),
            flags: le32(bytes, 32),
            buf_alloc: le32(bytes, 36),
            fwd_cnt: le32(bytes, 40),
        })
    }

    /// Encode to wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Check a header the guest sent (tx queue) and return its op. Everything is
    /// checked: addresses, type, op, payload length and flags.
    pub fn validate_from_guest(&self, guest_cid: u64) -> Result<Op, PacketError> {
        if self.src_cid != guest_cid {
            return Err(PacketError::BadSrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(PacketError::BadDstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::BadType(self.type_));
        }
        let op = Op::from_u16(self.op).ok_or(PacketError::BadOp(self.op))?;
        if self.len > MAX_PKT_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        if op != Op::Rw && self.len != 0 {
            return Err(PacketError::UnexpectedPayload(self.len));
        }
        if op == Op::Shutdown && self.flags & !(SHUTDOWN_RCV | SHUTDOWN_SEND) != 0 {
            return Err(PacketError::BadFlags(self.flags));
        }
        Ok(op)
    }

    /// The header of a packet from the host to the guest.
    pub fn to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: Op) -> Self {
        Self {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Default::default()
        }
    }

    /// The RST answering this (refused) guest packet, addressed back to its sender on
    /// the guest (whatever source CID it claimed: the guest is the only sender). `None`
    /// when the packet is itself an RST: never answer RST with RST.
    pub fn rst_reply(&self, guest_cid: u64) -> Option<Self> {
        if self.op == Op::Rst as u16 {
            return None;
        }
        Some(Self::to_guest(
            guest_cid,
            self.dst_port,
            self.src_port,
            Op::Rst,
        ))
    }
}

/// Parse and validate a guest packet header in one step: what the tx path and the fuzz
/// target call. Returns the header and op, or the reason for refusal.
pub fn parse_guest_header(bytes: &[u8], guest_cid: u64) -> Result<(VsockHeader, Op), PacketError> {
    let hdr = VsockHeader::parse(bytes)?;
    let op = hdr.validate_from_guest(guest_cid)?;
    Ok((hdr, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn good() -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = good();
        let b = h.to_bytes();
        assert_eq!(VsockHeader::parse(&b), Ok(h));
        // Spot-check offsets against struct virtio_vsock_hdr.
        assert_eq!(&b[16..20], &1025u32.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(parse_guest_header(&b, CID), Ok((h, Op::Rw)));
        assert_eq!(
            VsockHeader::parse(&b[..43]),
            Err(PacketError::Truncated(43))
        );
    }

    #[test]
    fn hostile_headers_are_refused() {
        let check = |f: &dyn Fn(&mut VsockHeader), want: PacketError| {
            let mut h = good();
            f(&mut h);
            assert_eq!(h.validate_from_guest(CID), Err(want));
        };
        check(&|h| h.src_cid = 4, PacketError::BadSrcCid(4));
        check(&|h| h.dst_cid = 5, PacketError::BadDstCid(5));
        check(&|h| h.type_ = 2, PacketError::BadType(2));
        check(&|h| h.op = 0, PacketError::BadOp(0));
        check(&|h| h.op = 8, PacketError::BadOp(8));
        check(&|h| h.len = u32::MAX, PacketError::TooLong(u32::MAX));
        check(
            &|h| h.op = Op::Request as u16,
            PacketError::UnexpectedPayload(10),
        );
        check(
            &|h| {
                h.op = Op::Shutdown as u16;
                h.len = 0;
                h.flags = 4;
            },
            PacketError::BadFlags(4),
        );
    }

    #[test]
    fn rst_reply_swaps_ports_and_never_answers_rst() {
        let r = good().rst_reply(CID).expect("reply");
        assert_eq!((r.src_port, r.dst_port, r.dst_cid), (52, 1025, CID));
        assert_eq!(r.op, Op::Rst as u16);
        let mut h = good();
        h.op = Op::Rst as u16;
        assert_eq!(h.rst_reply(CID), None);
        h.op = Op::Rw as u16;
        h.src_cid = 9;
        assert_eq!(h.rst_reply(CID).map(|r| r.dst_cid), Some(CID));
    }
}
