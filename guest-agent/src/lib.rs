//! pmsnap guest agent library: the agent protocol shared with the VMM, the transport
//! to the VMM's snapshot service, page-map translation, process freezing, the agent's
//! operations, the application-facing save/restore calls ([`app`]) and the command-line
//! language shared with `pmsnap` ([`cli`]).

/// Version string of the agent, printed by `pmsnap-agent --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod app;
pub mod churn;
pub mod cli;
pub mod client;
pub mod freeze;
pub mod ops;
pub mod pagemap;
pub mod protocol;
