//! virtio-vsock device.
