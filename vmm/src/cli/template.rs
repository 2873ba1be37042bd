//! Instant start: `pmsnap run` of an image keeps the guest's booted `ready` state as a VM
//! snapshot in a local repository (a template), and later runs of the same image start
//! from it with a lazy restore instead of booting (`--cold` boots anyway).
//!
//! A template is keyed by everything that decides what a booted guest looks like: the
//! kernel and initramfs (path, size, modification time, inode), the `pmsnap` binary
//! (the same, of `/proc/self/exe`: a new build makes new templates, as its device state
//! may differ), guest RAM, vCPUs, the extra command line and whether the guest has a
//! vsock device. The key names the snapshot (`ready-<key>`); templates of other images
//! live beside it in the same repository and share their content there.

use std::path::{Path, PathBuf};

use crate::api::ApiRequest;
use crate::config::VmConfig;
use crate::controller::Controller;

/// Where templates are kept unless `--template-dir` or `PMSNAP_TEMPLATE_DIR` says:
/// `$XDG_CACHE_HOME/pmsnap/templates`, else `$HOME/.cache/pmsnap/templates`, else
/// `/var/tmp/pmsnap-templates`.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("pmsnap/templates");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".cache/pmsnap/templates");
    }
    PathBuf::from("/var/tmp/pmsnap-templates")
}

/// The template of one image and configuration.
#[derive(Debug, Clone)]
pub struct Template {
    /// The repository holding it.
    pub repo: PathBuf,
    /// Its snapshot name there.
    pub name: String,
}

fn identity(h: &mut blake3::Hasher, what: &str, path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    let canon = std::fs::canonicalize(path)?;
    h.update(what.as_bytes());
    h.update(canon.as_os_str().as_encoded_bytes());
    for v in [
        m.len(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ino(),
        m.dev(),
    ] {
        h.update(&v.to_le_bytes());
    }
    Ok(())
}

impl Template {
    /// The template of `cfg` (a Linux boot) in repository `dir`.
    pub fn for_run(cfg: &VmConfig, vsock: bool, dir: &Path) -> std::io::Result<Self> {
        let mut h = blake3::Hasher::new();
        identity(&mut h, "kernel", &cfg.kernel)?;
        if let Some(i) = &cfg.initrd {
            identity(&mut h, "initrd", i)?;
        }
        identity(&mut h, "pmsnap", Path::new("/proc/self/exe"))?;
        h.update(&cfg.mem_bytes.to_le_bytes());
        h.update(&cfg.vcpus.to_le_bytes());
        h.update(cfg.extra_cmdline.as_bytes());
        h.update(&[u8::from(vsock)]);
        let key = h.finalize().to_hex();
        Ok(Self {
            // The API takes an absolute repository path.
            repo: std::path::absolute(dir)?,
            name: format!("ready-{}", &key.as_str()[..24]),
        })
    }

    /// Whether the repository holds it.
    pub fn exists(&self) -> bool {
        self.repo.join("config").is_file()
            && super::repo::open_repo(&self.location(), &Default::default(), false)
                .and_then(|r| r.manifest(&self.name).map_err(Into::into))
                .is_ok()
    }

    /// The repository as a REPO argument.
    pub fn location(&self) -> String {
        self.repo.display().to_string()
    }

    /// Keep the guest's state now as this template: a VM snapshot, exported to the
    /// repository while the guest runs on, then deleted from the pool. Errors are
    /// logged: the guest is not affected by a template that could not be kept.
    pub fn save(&self, controller: &Controller) {
        let t = std::time::Instant::now();
        let name = self.name.clone();
        let run = |req: ApiRequest| controller.handle(req).map(drop).map_err(|e| e.to_string());
        let res = run(ApiRequest::CreateVmSnapshot { name: name.clone() }).and_then(|()| {
            let exported = run(ApiRequest::ExportSnapshot {
                name: name.clone(),
                to: self.location(),
            });
            // Deleted either way: the pool must not keep pages protected for it.
            let deleted = run(ApiRequest::DeleteSnapshot { name: name.clone() });
            exported.and(deleted)
        });
        match res {
            Ok(()) => log::info!(
                "kept the guest's ready state as template {name:?} in {} in {:?}: the next \
                 `pmsnap run` of this image starts from it (--cold boots)",
                self.repo.display(),
                t.elapsed()
            ),
            Err(e) => log::warn!(
                "cannot keep the ready state as template {name:?} in {}: {e}",
                self.repo.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, mem: u64) -> VmConfig {
        VmConfig {
            kernel: dir.join("vmlinux"),
            initrd: Some(dir.join("initramfs.cpio")),
            extra_cmdline: String::new(),
            mem_bytes: mem,
            vcpus: 2,
            pool: dir.join("p.pool"),
            block_area: None,
            pool_node: None,
        }
    }

    #[test]
    fn the_key_follows_the_image_and_the_configuration() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("vmlinux"), b"kernel").expect("write");
        std::fs::write(d.path().join("initramfs.cpio"), b"initrd").expect("write");
        let repo = d.path().join("t");
        let a = Template::for_run(&cfg(d.path(), 256 << 20), false, &repo).expect("key");
        let same = Template::for_run(&cfg(d.path(), 256 << 20), false, &repo).expect("key");
        assert_eq!(a.name, same.name);
        assert!(
            a.name.starts_with("ready-") && a.name.len() == 30,
            "{}",
            a.name
        );
        let other_mem = Template::for_run(&cfg(d.path(), 512 << 20), false, &repo).expect("key");
        let vsock = Template::for_run(&cfg(d.path(), 256 << 20), true, &repo).expect("key");
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(d.path().join("initramfs.cpio"), b"initrd, rebuilt").expect("write");
        let rebuilt = Template::for_run(&cfg(d.path(), 256 << 20), false, &repo).expect("key");
        for other in [&other_mem, &vsock, &rebuilt] {
            assert_ne!(a.name, other.name);
        }
        assert!(!a.exists(), "no repository yet");
        std::fs::remove_file(d.path().join("vmlinux")).expect("rm");
        assert!(Template::for_run(&cfg(d.path(), 256 << 20), false, &repo).is_err());
    }
}
