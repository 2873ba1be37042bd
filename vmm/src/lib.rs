//! pmsnap VMM library: KVM setup, devices, the copy-before-write engine and the CLI.

pub mod api;
pub mod cli;
pub mod devices;
pub mod payload;
pub mod snapshot;
pub mod vstate;
