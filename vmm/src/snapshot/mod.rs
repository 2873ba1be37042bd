//! The copy-before-write engine: write-protection of snapshot pages, the fault handler
//! that preserves a page before its first write, and dirty tracking.

pub mod agent_client;
pub mod dirty;
pub mod engine;
pub mod fault;
pub mod process;
pub mod protect;
#[cfg(test)]
pub(crate) mod testutil;
