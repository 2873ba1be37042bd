//! The copy-before-write core: write-protection of snapshot pages, the fault handler
//! that preserves a page before its first write, and dirty tracking. It knows nothing of
//! the control API, VM state or the guest agent (see `crate::controller`).

pub mod block_source;
pub mod dirty;
pub mod engine;
pub mod fault;
pub mod lazy;
pub mod protect;
pub mod sink;
#[cfg(test)]
pub(crate) mod testutil;
