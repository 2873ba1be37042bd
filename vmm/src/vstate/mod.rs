//! KVM state: the VM, its vCPUs and guest memory.

pub mod control;
pub mod dirty;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
