//! Whole-VM state for snapshots: every vCPU's registers and in-kernel state, the VM's
//! irqchip, PIT and kvmclock, and the devices, gathered through [`Persist`] into one
//! versioned, checksummed blob that the pool stores next to the memory snapshot.
//!
//! Blob layout (little-endian): magic `PMSNVMST` (8 bytes), format version (u32), payload
//! length (u64), crc32c of the payload (u32), then the payload: a postcard-encoded
//! [`VmState`]. A blob is validated (magic, version, length, checksum, then the decoded
//! contents against the VM it is restored into) before any of it is used.

pub mod load;
pub mod vcpu;
pub mod vm;

use serde::{Deserialize, Serialize};

pub use crate::devices::legacy::serial::SerialSnap;
use crate::devices::virtio::mmio::MmioState;
pub use crate::state::Persist;
pub use vcpu::VcpuState;
pub use vm::VmKvmState;

/// First bytes of every state blob.
pub const MAGIC: [u8; 8] = *b"PMSNVMST";
/// Format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header size: magic, version, length, crc.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest payload accepted (the state of 254 vCPUs is far below this).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors saving, decoding, validating or applying VM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The blob is shorter than its header or its declared length.
    #[error("VM state blob is truncated: {0}")]
    Truncated(String),
    /// The blob does not start with the state magic.
    #[error("VM state blob has a bad magic (not a pmsnap VM state)")]
    BadMagic,
    /// Written by a newer pmsnap.
    #[error("VM state format version {found} is newer than this pmsnap reads ({supported})")]
    VersionTooNew {
        /// Version in the blob.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The payload fails its checksum.
    #[error("VM state blob fails its checksum (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Stored crc32c.
        stored: u32,
        /// Computed crc32c.
        computed: u32,
    },
    /// The payload does not decode.
    #[error("VM state payload does not decode: {0}")]
    Decode(String),
    /// The payload cannot be encoded.
    #[error("VM state cannot be encoded: {0}")]
    Encode(String),
    /// The state does not fit this VM.
    #[error("VM state does not fit this VM: {field}: {detail}")]
    Mismatch {
        /// The state field that does not fit.
        field: &'static str,
        /// Saved versus present.
        detail: String,
    },
    /// A KVM ioctl failed while saving or restoring.
    #[error("KVM {op} failed{}", vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default())]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The vCPU, for per-vCPU state.
        vcpu: Option<u8>,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU threads could not save or restore.
    #[error(transparent)]
    VcpuThread(#[from] crate::vstate::vcpu::VcpuError),
    /// A device refused its state.
    #[error(transparent)]
    Device(#[from] crate::state::DeviceStateError),
}

/// Everything needed to resume a VM whose RAM equals the snapshot's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub vm: VmKvmState,
    /// The serial port.
    pub serial: SerialSnap,
    /// virtio-mmio transports in slot order (vsock: connections are reset on restore).
    pub mmio: Vec<MmioState>,
}

impl VmState {
    /// Check the state against the VM it is to be restored into.
    pub fn validate(&self, vcpus: usize, mem_bytes: u64) -> Result<(), PersistError> {
        if self.mem_bytes != mem_bytes {
            return Err(PersistError::Mismatch {
                field: "mem_bytes",
                detail: format!(
                    "snapshot has {} MiB of RAM, this VM {} MiB",
                    self.mem_bytes >> 20,
                    mem_bytes >> 20
                ),
            });
        }
        if self.vcpus.len() != vcpus {
            return Err(PersistError::Mismatch {
                field: "vcpus",
                detail: format!("snapshot has {} vCPUs, this VM {vcpus}", self.vcpus.len()),
            });
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return Err(PersistError::Mismatch {
                    field: "vcpus.id",
                    detail: format!("entry {i} is for vCPU {}", v.id),
                });
            }
        }
        Ok(())
    }

    /// Encode into a blob with header and checksum.
    pub fn encode(&self) -> Result<Vec<u8>, PersistError> {
        let payload = postcard::to_stdvec(self).map_err(|e| PersistError::Encode(e.to_string()))?;
        Ok(seal(&payload))
    }

    /// Decode a blob, checking magic, version, length and checksum first.
    pub fn decode(blob: &[u8]) -> Result<Self, PersistError> {
        let payload = unseal(blob)?;
        postcard::from_bytes(payload).map_err(|e| PersistError::Decode(e.to_string()))
    }
}

/// Wrap `payload` in the blob header.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&pmem_backend::checksum::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Check a blob's header and checksum and return its payload.
pub fn unseal(blob: &[u8]) -> Result<&[u8], PersistError> {
    if blob.len() < HEADER_LEN {
        return Err(PersistError::Truncated(format!(
            "{} bytes, the header alone is {HEADER_LEN}",
            blob.len()
        )));
    }
    if blob[..8] != MAGIC {
        return Err(PersistError::BadMagic);
    }
    let version = u32::from_le_bytes(blob[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION {
        return Err(PersistError::VersionTooNew {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(PersistError::Decode("format version 0".into()));
    }
    let len = u64::from_le_bytes(blob[12..20].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(blob[20..24].try_into().expect("4 bytes"));
    let have = (blob.len() - HEADER_LEN) as u64;
    if len > MAX_PAYLOAD || len != have {
        return Err(PersistError::Truncated(format!(
            "header says {len} payload bytes, blob has {have}"
        )));
    }
    let payload = &blob[HEADER_LEN..];
    let computed = pmem_backend::checksum::crc32c(payload);
    if computed != stored {
        return Err(PersistError::Checksum { stored, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        let mut v0 = VcpuState::default();
        v0.regs.rip = 0xffff_ffff_8100_0000;
        v0.regs.rax = 42;
        v0.sregs.cr3 = 0x1000;
        v0.msrs.push(kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 123_456,
            ..Default::default()
        });
        v0.lapic.regs[0x20] = 7;
        let mut v1 = VcpuState {
            id: 1,
            ..Default::default()
        };
        v1.mp_state.mp_state = 3;
        let mut vm = VmKvmState::default();
        vm.clock.clock = 999;
        vm.pit.channels[0].count = 5;
        VmState {
            mem_bytes: 256 << 20,
            vcpus: vec![v0, v1],
            vm,
            serial: SerialSnap {
                line_control: 3,
                in_buffer: vec![b'x'],
                ..Default::default()
            },
            mmio: Vec::new(),
        }
    }

    #[test]
    fn round_trip_keeps_every_field_checked() {
        let s = sample();
        let blob = s.encode().expect("encode");
        assert_eq!(&blob[..8], b"PMSNVMST");
        let back = VmState::decode(&blob).expect("decode");
        assert_eq!(back.mem_bytes, 256 << 20);
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].sregs.cr3, 0x1000);
        assert_eq!(back.vcpus[0].msrs[0].data, 123_456);
        assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
        assert_eq!(back.vcpus[1].mp_state.mp_state, 3);
        assert_eq!(back.vm.clock.clock, 999);
        assert_eq!(back.vm.pit.channels[0].count, 5);
        assert_eq!(back.serial.in_buffer, vec![b'x']);
        back.validate(2, 256 << 20).expect("fits");
    }

    #[test]
    fn bad_magic_version_length_and_checksum_are_refused() {
        let blob = sample().encode().expect("encode");
        let mut b = blob.clone();
        b[0] ^= 1;
        assert!(matches!(VmState::decode(&b), Err(PersistError::BadMagic)));
        let mut b = blob.clone();
        b[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = VmState::decode(&b).expect_err("newer");
        assert!(
            matches!(e, PersistError::VersionTooNew { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(e.to_string().contains("newer"), "{e}");
        let mut b = blob.clone();
        let last = b.len() - 1;
        b[last] ^= 0x40;
        assert!(matches!(
            VmState::decode(&b),
            Err(PersistError::Checksum { .. })
        ));
        assert!(matches!(
            VmState::decode(&blob[..blob.len() - 1]),
            Err(PersistError::Truncated(_))
        ));
        assert!(matches!(
            VmState::decode(&blob[..10]),
            Err(PersistError::Truncated(_))
        ));
        // A valid header over garbage is a decode error, not a panic.
        assert!(matches!(
            VmState::decode(&seal(&[0xff; 7])),
            Err(PersistError::Decode(_))
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let s = sample();
        let e = s.validate(2, 512 << 20).expect_err("mem");
        assert!(matches!(
            e,
            PersistError::Mismatch {
                field: "mem_bytes",
                ..
            }
        ));
        assert!(e.to_string().contains("256 MiB"), "{e}");
        let e = s.validate(1, 256 << 20).expect_err("vcpus");
        assert!(matches!(e, PersistError::Mismatch { field: "vcpus", .. }));
        let mut s = s;
        s.vcpus[1].id = 5;
        let e = s.validate(2, 256 << 20).expect_err("ids");
        assert!(matches!(
            e,
            PersistError::Mismatch {
                field: "vcpus.id",
                ..
            }
        ));
    }
}
