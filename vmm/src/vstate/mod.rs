//! KVM state: the VM, its vCPUs and guest memory.

pub mod memory;
