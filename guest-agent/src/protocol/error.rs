//! What goes wrong: [`ProtocolError`] for a frame or message this side cannot encode,
//! decode or accept, and [`ErrorCode`] / [`ErrorReply`], how a refusal travels back in a
//! [`Reply::Error`](super::Reply::Error).

use serde::{Deserialize, Serialize};

use super::{MAX_MESSAGE_LEN, MAX_PAYLOAD_LEN, MAX_RUNS, VERSION};

/// Errors of encoding, decoding and validating frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The first four bytes are not [`MAGIC`](super::MAGIC).
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// The peer speaks another protocol version.
    #[error(
        "unsupported protocol version {got} (this side speaks {VERSION}): the guest agent \
         and the VMM come from different pmsnap releases; rebuild the guest image \
         (images/build.sh) or use the matching VMM"
    )]
    UnsupportedVersion {
        /// Version found in the frame.
        got: u16,
    },
    /// The kind field is neither request nor reply, or not the one expected.
    #[error("unexpected frame kind {0}")]
    BadKind(u16),
    /// The payload length is above [`MAX_PAYLOAD_LEN`].
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    TooLarge(u64),
    /// Fewer bytes than the header announces.
    #[error("truncated frame: {got} of {want} bytes")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the header announces.
        want: usize,
    },
    /// Bytes left after the announced payload.
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    /// The payload does not decode as the expected message.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// A snapshot name breaks the naming rule.
    #[error("invalid snapshot name {0:?}: 1..=64 of [A-Za-z0-9._-], not starting with '.'")]
    InvalidName(String),
    /// A command name is too long or contains control characters.
    #[error("invalid command name")]
    InvalidComm,
    /// Too many runs in one request.
    #[error("{0} runs exceed the limit of {MAX_RUNS}")]
    TooManyRuns(usize),
    /// A run is empty, overflows, or leaves guest RAM.
    #[error("run {index} is invalid: {reason}")]
    BadRun {
        /// Index of the run in the request.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The request has no runs where some are needed.
    #[error("request has no page runs")]
    NoRuns,
    /// The runs name more pages than guest RAM has.
    #[error("the runs name {got} pages, more than the {limit} pages of guest RAM")]
    TooManyPages {
        /// Pages named (saturating).
        got: u64,
        /// Guest RAM pages.
        limit: u64,
    },
    /// Two restore target runs share guest-physical pages.
    #[error("restore target runs {first} and {second} overlap in guest-physical memory")]
    Overlap {
        /// Index of one run.
        first: usize,
        /// Index of the other.
        second: usize,
    },
    /// The encoder failed (a message above the limits).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// I/O error while reading or writing a frame.
    #[error("i/o error: {0}")]
    Io(String),
}

impl ProtocolError {
    /// The error code the VMM answers with when it refuses a request for this reason.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadMagic(_) | Self::BadKind(_) | Self::Truncated { .. } | Self::Trailing(_) => {
                ErrorCode::BadFrame
            }
            Self::Malformed(_) => ErrorCode::BadFrame,
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::TooLarge(_) | Self::TooManyRuns(_) | Self::TooManyPages { .. } => {
                ErrorCode::TooLarge
            }
            Self::Overlap { .. } => ErrorCode::RunOutOfRange,
            Self::InvalidName(_) => ErrorCode::InvalidName,
            Self::InvalidComm | Self::NoRuns => ErrorCode::BadRequest,
            Self::BadRun { .. } => ErrorCode::RunOutOfRange,
            Self::Encode(_) | Self::Io(_) => ErrorCode::Internal,
        }
    }
}

/// Why the VMM refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be parsed.
    BadFrame = 1,
    /// The frame's protocol version is not spoken here.
    UnsupportedVersion = 2,
    /// The request is well formed but makes no sense (no runs, bad command name).
    BadRequest = 3,
    /// A run is empty, overflows or leaves guest RAM.
    RunOutOfRange = 4,
    /// A size or count limit was exceeded.
    TooLarge = 5,
    /// The snapshot name breaks the naming rule.
    InvalidName = 6,
    /// No snapshot of that name.
    NotFound = 7,
    /// A snapshot of that name exists already.
    AlreadyExists = 8,
    /// Restore target does not have the snapshot's page count.
    SizeMismatch = 9,
    /// The store is out of space.
    NoSpace = 10,
    /// The service is busy (another save or restore runs); retry.
    Busy = 11,
    /// Anything else on the VMM side.
    Internal = 12,
    /// The caller may not do this (another user's process or snapshot).
    PermissionDenied = 13,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`MAX_MESSAGE_LEN`] bytes.
    pub message: String,
}

impl ErrorReply {
    /// Build an error reply, cutting the message to [`MAX_MESSAGE_LEN`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut cut = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }
}

impl From<&ProtocolError> for ErrorReply {
    fn from(e: &ProtocolError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::*;

    #[test]
    fn version_mismatch_says_what_to_do() {
        let mut f = GuestRequest::new(0, Request::List)
            .encode()
            .expect("encode");
        f[4..6].copy_from_slice(&1u16.to_le_bytes());
        let e = GuestRequest::decode(&f).expect_err("version 1");
        assert_eq!(e, ProtocolError::UnsupportedVersion { got: 1 });
        let msg = e.to_string();
        assert!(
            msg.contains("version 1") && msg.contains("speaks 2"),
            "{msg}"
        );
        assert!(msg.contains("images/build.sh"), "{msg}");
    }

    #[test]
    fn error_reply_message_is_bounded() {
        let e = ErrorReply::new(ErrorCode::Internal, "é".repeat(MAX_MESSAGE_LEN));
        assert!(e.message.len() <= MAX_MESSAGE_LEN);
        let from: ErrorReply = (&ProtocolError::UnsupportedVersion { got: 3 }).into();
        assert_eq!(from.code, ErrorCode::UnsupportedVersion);
        assert!(from.message.contains('3'));
    }
}
