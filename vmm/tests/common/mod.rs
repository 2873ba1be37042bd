//! Helpers shared by the vmm crate's KVM integration tests (each test binary includes
//! this module with `mod common;` and uses what it needs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// True (after printing why the test is skipped) when `/dev/kvm` is missing.
pub fn kvm_missing(name: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED {name}: /dev/kvm is missing");
        println!("SKIPPED {name}: /dev/kvm is missing");
        return true;
    }
    false
}

/// Assemble the pattern payload (tests/payload/pattern.S) with GNU as + objcopy into
/// `dir`; returns the flat binary for `pmsnap run --payload`.
pub fn payload(dir: &Path) -> PathBuf {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payload/pattern.S");
    let (obj, bin) = (dir.join("p.o"), dir.join("p.bin"));
    let ok = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(src)
        .status()
        .expect("run GNU as")
        .success();
    assert!(ok, "GNU as failed on {src}");
    let ok = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .expect("run objcopy")
        .success();
    assert!(ok, "objcopy failed");
    bin
}

/// The `pmsnap` binary under test; `PMSNAP_BIN` picks another build (e.g. a release one).
pub fn pmsnap_bin() -> PathBuf {
    std::env::var_os("PMSNAP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pmsnap")))
}
