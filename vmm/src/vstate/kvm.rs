//! The `/dev/kvm` handle: opening it with a clear error, checking the API version and
//! the capabilities the VMM relies on, and the limits used by validation.

use std::path::Path;

use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// Environment variable overriding [`KVM_PATH`] (tests use it to check the errors for a
/// missing or non-KVM device on hosts that do have KVM).
pub const KVM_DEVICE_ENV: &str = "PMSNAP_KVM_DEVICE";

/// Errors opening or querying KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The KVM device does not exist.
    #[error("{0} does not exist: this host has no KVM (load the kvm module or run on a machine with virtualization)")]
    Missing(String),
    /// The KVM device exists but cannot be opened.
    #[error("cannot open {0} (needs read/write access: run as root or join the kvm group)")]
    Access(String, #[source] std::io::Error),
    /// The device answered the API version query wrongly (or not at all).
    #[error(
        "{0} is not a usable KVM device: KVM_GET_API_VERSION returned {1} (need {KVM_API_VERSION})"
    )]
    ApiVersion(String, i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// An open `/dev/kvm` with the checks done.
#[derive(Debug)]
pub struct KvmContext {
    kvm: Kvm,
    max_vcpus: usize,
}

impl KvmContext {
    /// Open `/dev/kvm` and check the API version and capabilities.
    pub fn new() -> Result<Self, KvmError> {
        Self::with_path(Path::new(KVM_PATH))
    }

    /// Open the device named by `$PMSNAP_KVM_DEVICE`, else `/dev/kvm`.
    pub fn from_env() -> Result<Self, KvmError> {
        match std::env::var_os(KVM_DEVICE_ENV) {
            Some(p) if !p.is_empty() => Self::with_path(Path::new(&p)),
            _ => Self::new(),
        }
    }

    /// Same as `new` with another device path (tests use a missing one).
    pub fn with_path(path: &Path) -> Result<Self, KvmError> {
        let name = path.display().to_string();
        if !path.exists() {
            return Err(KvmError::Missing(name));
        }
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| KvmError::Access(name.clone(), std::io::Error::other(e)))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| {
            KvmError::Access(name.clone(), std::io::Error::from_raw_os_error(e.errno()))
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION as i32 {
            return Err(KvmError::ApiVersion(name, version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::SetTssAddr, "SET_TSS_ADDR"),
            (Cap::ExtCpuid, "EXT_CPUID"),
            (Cap::ImmediateExit, "IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        Ok(Self { kvm, max_vcpus })
    }

    /// The KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The most vCPUs KVM allows in one VM (`KVM_CAP_MAX_VCPUS`).
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }

    /// KVM's supported CPUID list.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_a_clear_error() {
        let e = KvmContext::with_path(Path::new("/nonexistent/kvm")).expect_err("must fail");
        assert!(matches!(e, KvmError::Missing(_)));
        assert!(
            e.to_string().starts_with("/nonexistent/kvm does not exist"),
            "{e}"
        );
    }

    #[test]
    fn non_kvm_device_is_refused() {
        // /dev/null opens fine but answers no KVM ioctl: the version check must catch it.
        let e = KvmContext::with_path(Path::new("/dev/null")).expect_err("must fail");
        assert!(matches!(e, KvmError::ApiVersion(_, _)), "{e}");
        assert!(
            e.to_string()
                .contains("/dev/null is not a usable KVM device"),
            "{e}"
        );
    }

    #[test]
    fn real_kvm_opens() {
        pmsnap_testenv::require!("real_kvm_opens", pmsnap_testenv::kvm_unavailable());
        let k = KvmContext::new().expect("open /dev/kvm");
        assert!(k.max_vcpus() >= 1);
        assert!(!k.supported_cpuid().expect("cpuid").as_slice().is_empty());
    }
}
