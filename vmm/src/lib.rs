//! pmsnap VMM library: KVM setup, devices, the copy-before-write engine and the CLI.

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod devices;
pub mod event_loop;
pub mod memory;
pub mod numa;
pub mod payload;
pub mod persist;
pub mod pool_dir;
pub mod seccomp;
pub mod snapshot;
pub mod state;
pub mod stop;
pub mod unix_socket;
pub mod vstate;
