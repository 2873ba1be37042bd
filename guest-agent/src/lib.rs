//! pmsnap guest agent library: the agent protocol shared with the VMM, and the
//! application-facing save/restore calls.

/// Version string of the agent, printed by `pmsnap-agent --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod protocol;
