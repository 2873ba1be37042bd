//! VM configuration and its pure validation: sizes, vCPU counts, the default image
//! location and the kernel command line. Everything here is testable without KVM.

use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, HIMEM_START};

/// Kernel command line the VMM always passes; `--cmdline` is appended.
///
/// - `console=ttyS0`: the 16550 at 0x3f8 is the console.
/// - `reboot=k panic=1`: reboot through the i8042 (which ends the VMM); reboot on panic.
/// - `noxsave clearcpuid=popcnt,smap,cx16,erms,fsrm`: instructions this host's KVM
///   emulator cannot run in guest kernel mode, or runs slowly (see docs/vmm.md).
/// - `quiet noreplace-smp rodata=off percpu_alloc=page norandmaps`: boot-time savers
///   measured on this host.
/// - `clocksource=kvm-clock`: the one guest clock a restore can put back on this host
///   (KVM_SET_CLOCK); the guest would pick `tsc`, which here is always the host's TSC, so
///   guest time would jump after a restore by the time the snapshot sat unused
///   (docs/machine-notes.md, "Guest time").
/// - `GLIBC_TUNABLES=...`: reaches init's environment; keeps glibc programs off AVX,
///   whose upper register halves leak between guest processes under `noxsave`.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave \
clearcpuid=popcnt,smap,cx16,erms,fsrm clocksource=kvm-clock quiet noreplace-smp rodata=off percpu_alloc=page \
norandmaps GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

/// Default guest RAM.
pub const DEFAULT_MEM: u64 = 256 << 20;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u32 = 2;
/// Smallest guest RAM accepted before the kernel-fit check: the e820 map needs RAM
/// above 1 MiB.
pub const MIN_MEM: u64 = 2 * HIMEM_START;
/// Highest APIC ID usable with xAPIC (0xff is broadcast).
pub const MAX_XAPIC_VCPUS: usize = 254;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size could not be parsed.
    #[error(
        "invalid size {0:?}: use a number of bytes with an optional K, M or G suffix (e.g. 256M)"
    )]
    BadSize(String),
    /// Memory size not a multiple of 4 KiB.
    #[error("--mem {} is not a multiple of 4 KiB", human(*.0))]
    MemNotPageAligned(u64),
    /// Memory size below the floor.
    #[error("--mem {} is too small (need at least {})", human(*.0), human(MIN_MEM))]
    MemTooSmall(u64),
    /// More memory than the host can give.
    #[error("--mem {} is larger than the host can give: {} available ({what})", human(*mem), human(*available))]
    MemTooLarge {
        /// Requested bytes.
        mem: u64,
        /// Bytes available.
        available: u64,
        /// Which limit.
        what: &'static str,
    },
    /// The kernel and initrd do not fit.
    #[error("--mem {} is too small for the kernel (loaded up to {}) and the initrd ({})", human(*mem), human(*kernel_end), human(*initrd_size))]
    MemTooSmallForKernel {
        /// Requested bytes.
        mem: u64,
        /// First byte after the loaded kernel (its physical extent).
        kernel_end: u64,
        /// Initrd size.
        initrd_size: u64,
    },
    /// Zero vCPUs.
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    /// Too many vCPUs.
    #[error("--vcpus {wanted} is more than this host allows ({max}: {why})")]
    TooManyVcpus {
        /// Requested.
        wanted: usize,
        /// Maximum.
        max: usize,
        /// Which limit.
        why: String,
    },
    /// The command line is too long or malformed.
    #[error("kernel command line rejected: {0}")]
    Cmdline(String),
    /// A kernel or initrd file is missing or unreadable.
    #[error("{what} {path} {problem}")]
    ImageFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Description (includes the hint to build the image when it is the default).
        problem: String,
    },
}

/// A byte count for messages: `256 MiB`, `1 GiB`, `1.5 GiB`, `12345 bytes`.
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes >> shift)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

/// The end of the highest loadable segment (physical address + memory size) of an
/// x86_64 ELF kernel, from its headers; None when `bytes` is not such an ELF file.
pub fn elf_load_end(bytes: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    // 64-bit little-endian ELF.
    if bytes.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut end = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        const PT_LOAD: u32 = 1;
        if u32_at(ph)? == PT_LOAD {
            let seg_end = u64_at(ph + 0x18)?.checked_add(u64_at(ph + 0x28)?)?;
            end = Some(end.map_or(seg_end, |e: u64| e.max(seg_end)));
        }
    }
    end
}

/// Parse a size such as `256M`, `1G`, `65536K` or `4096` (bytes). Suffixes are binary
/// (K = 1024), case-insensitive, optionally followed by `B` or `iB`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Check the guest RAM size on its own (alignment, floor).
pub fn validate_mem(mem: u64) -> Result<(), ConfigError> {
    if mem < MIN_MEM {
        return Err(ConfigError::MemTooSmall(mem));
    }
    if mem % 4096 != 0 {
        return Err(ConfigError::MemNotPageAligned(mem));
    }
    Ok(())
}

/// Check the guest RAM against what the host has: `MemAvailable` and the free space of
/// the pool's filesystem (guest RAM lives there).
pub fn check_host_memory(mem: u64, mem_available: u64, fs_free: u64) -> Result<(), ConfigError> {
    if mem > mem_available {
        return Err(ConfigError::MemTooLarge {
            mem,
            available: mem_available,
            what: "MemAvailable in /proc/meminfo",
        });
    }
    if mem > fs_free {
        return Err(ConfigError::MemTooLarge {
            mem,
            available: fs_free,
            what: "free space on the pool's filesystem",
        });
    }
    Ok(())
}

/// `MemAvailable` from the text of /proc/meminfo, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// Check the vCPU count against KVM's limit and the MP table's room.
pub fn validate_vcpus(
    wanted: usize,
    kvm_max: usize,
    mptable_max: usize,
) -> Result<(), ConfigError> {
    if wanted == 0 {
        return Err(ConfigError::NoVcpus);
    }
    let (max, why) = [
        (kvm_max, "KVM_CAP_MAX_VCPUS"),
        (mptable_max, "room in the MP table"),
        (MAX_XAPIC_VCPUS, "xAPIC IDs"),
    ]
    .into_iter()
    .min_by_key(|(m, _)| *m)
    .expect("the array is not empty");
    if wanted > max {
        return Err(ConfigError::TooManyVcpus {
            wanted,
            max,
            why: why.to_string(),
        });
    }
    Ok(())
}

/// Check that the initrd fits between the kernel's end and the top of low RAM; returns
/// its (page aligned) load address.
pub fn place_initrd(
    mem: u64,
    low_ram_end: u64,
    kernel_end: u64,
    initrd_size: u64,
) -> Result<u64, ConfigError> {
    let too_small = || ConfigError::MemTooSmallForKernel {
        mem,
        kernel_end,
        initrd_size,
    };
    if kernel_end > low_ram_end {
        return Err(too_small());
    }
    let addr = low_ram_end.checked_sub(initrd_size).ok_or_else(too_small)? & !0xfff;
    if addr < kernel_end {
        return Err(too_small());
    }
    Ok(addr)
}

/// The kernel command line: the defaults, then `extra` (the user's `--cmdline`).
/// Devices append their own words (`virtio_mmio.device=...`) to the result.
pub fn build_cmdline(extra: &str) -> Result<Cmdline, ConfigError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| ConfigError::Cmdline(e.to_string()))?;
    c.insert_str(DEFAULT_CMDLINE)
        .map_err(|e| ConfigError::Cmdline(e.to_string()))?;
    if !extra.trim().is_empty() {
        c.insert_str(extra.trim())
            .map_err(|e| ConfigError::Cmdline(e.to_string()))?;
    }
    Ok(c)
}

/// Where the default image lives: `$PMSNAP_IMAGE_DIR`, else the workspace's
/// `images/cache/default`.
pub fn default_image_dir(env_dir: Option<&str>) -> PathBuf {
    match env_dir {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(".."))
            .join("images")
            .join("cache")
            .join("default"),
    }
}

/// Check that a kernel or initrd file exists and is readable. `is_default` adds the
/// hint that the default image is made by `images/build.sh`.
pub fn check_image_file(
    what: &'static str,
    path: &Path,
    is_default: bool,
) -> Result<(), ConfigError> {
    let problem = match std::fs::File::open(path) {
        Ok(f) => match f.metadata() {
            Ok(m) if m.is_file() => return Ok(()),
            Ok(_) => "is not a regular file".to_string(),
            Err(e) => format!("cannot be read: {e}"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => format!("cannot be read: {e}"),
    };
    let hint = if is_default {
        " (the default guest image is built by images/build.sh; run it, or set PMSNAP_IMAGE_DIR, or pass --kernel/--initrd)"
    } else {
        ""
    };
    Err(ConfigError::ImageFile {
        what,
        path: path.to_path_buf(),
        problem: format!("{problem}{hint}"),
    })
}

/// A fully checked VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initramfs (uncompressed cpio recommended on this host).
    pub initrd: Option<PathBuf>,
    /// Words appended to `DEFAULT_CMDLINE`.
    pub extra_cmdline: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs (checked against KVM's limit when the VM is built).
    pub vcpus: u32,
    /// The pool file holding guest RAM.
    pub pool: PathBuf,
    /// Bytes of block area for a pool created now (preserved pages and state blobs);
    /// `None`: as much as guest RAM. An existing pool keeps its own.
    pub block_area: Option<u64>,
    /// NUMA node to allocate a pool created now on (`None`: wherever the kernel likes).
    pub pool_node: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2g "), Ok(2 << 30));
        for bad in [
            "",
            "M",
            "12X",
            "-1M",
            "1.5G",
            "99999999999999999999",
            "20000000000G",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(ConfigError::BadSize(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(256 << 20), "256 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(100), "100 bytes");
    }

    #[test]
    fn elf_extent() {
        // A minimal ELF header with two PT_LOAD program headers and one PT_NOTE.
        let mut b = vec![0u8; 0x40 + 3 * 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let ph = |b: &mut Vec<u8>, i: usize, t: u32, paddr: u64, memsz: u64| {
            let o = 0x40 + i * 56;
            b[o..o + 4].copy_from_slice(&t.to_le_bytes());
            b[o + 0x18..o + 0x20].copy_from_slice(&paddr.to_le_bytes());
            b[o + 0x28..o + 0x30].copy_from_slice(&memsz.to_le_bytes());
        };
        ph(&mut b, 0, 1, 0x100_0000, 0x80_0000);
        ph(&mut b, 1, 4, 0x900_0000, 0x1000);
        ph(&mut b, 2, 1, 0x200_0000, 0x10_0000);
        assert_eq!(elf_load_end(&b), Some(0x210_0000));
        assert_eq!(elf_load_end(b"not elf"), None);
        // Truncated program headers are not an answer.
        assert_eq!(elf_load_end(&b[..0x60]), None);
    }

    #[test]
    fn mem_checks() {
        assert!(validate_mem(256 << 20).is_ok());
        assert_eq!(
            validate_mem(1 << 20),
            Err(ConfigError::MemTooSmall(1 << 20))
        );
        assert_eq!(
            validate_mem((256 << 20) + 1),
            Err(ConfigError::MemNotPageAligned((256 << 20) + 1))
        );
        assert!(check_host_memory(1 << 30, 2 << 30, 4 << 30).is_ok());
        let e = check_host_memory(8 << 30, 2 << 30, 4 << 30).expect_err("too big");
        assert!(e.to_string().contains("MemAvailable"), "{e}");
        let e = check_host_memory(3 << 30, 4 << 30, 2 << 30).expect_err("fs too small");
        assert!(e.to_string().contains("pool's filesystem"), "{e}");
    }

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   123 kB\n";
        assert_eq!(parse_mem_available(text), Some(123 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn vcpu_checks() {
        assert_eq!(validate_vcpus(0, 255, 37), Err(ConfigError::NoVcpus));
        assert!(validate_vcpus(2, 255, 37).is_ok());
        assert!(validate_vcpus(37, 255, 37).is_ok());
        let e = validate_vcpus(38, 255, 37).expect_err("mptable");
        assert!(e.to_string().contains("(37: room in the MP table)"), "{e}");
        let e = validate_vcpus(5, 4, 37).expect_err("kvm");
        assert!(e.to_string().contains("KVM_CAP_MAX_VCPUS"), "{e}");
    }

    #[test]
    fn initrd_placement() {
        let mem = 256u64 << 20;
        let a = place_initrd(mem, mem, 0x300_0000, 0x1234).expect("fits");
        assert_eq!(a, (mem - 0x1234) & !0xfff);
        assert_eq!(a % 4096, 0);
        assert!(a + 0x1234 <= mem);
        assert!(place_initrd(mem, mem, 0x300_0000, mem).is_err());
        assert!(place_initrd(16 << 20, 16 << 20, 0x200_0000, 0).is_err());
    }

    #[test]
    fn cmdline_defaults_then_user_words() {
        let c = build_cmdline("foo=bar  init=/bin/sh").expect("cmdline");
        let s = c
            .as_cstring()
            .expect("cstring")
            .into_string()
            .expect("utf8");
        assert!(s.starts_with("console=ttyS0 reboot=k panic=1 noxsave"));
        assert!(s.contains("clearcpuid=popcnt,smap,cx16,erms,fsrm clocksource=kvm-clock "));
        assert!(s.contains("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,"));
        assert!(s.ends_with("foo=bar  init=/bin/sh"));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(build_cmdline(&long), Err(ConfigError::Cmdline(_))));
    }

    #[test]
    fn image_dir_default_and_env() {
        assert_eq!(default_image_dir(Some("/img")), PathBuf::from("/img"));
        let d = default_image_dir(None);
        assert!(d.ends_with("images/cache/default"), "{}", d.display());
        assert_eq!(default_image_dir(Some("")), d);
    }

    #[test]
    fn image_file_errors() {
        let e = check_image_file("kernel", Path::new("/nonexistent/vmlinux"), true)
            .expect_err("missing");
        let s = e.to_string();
        assert!(
            s.starts_with("kernel /nonexistent/vmlinux does not exist"),
            "{s}"
        );
        assert!(s.contains("images/build.sh"), "{s}");
        let e = check_image_file("initrd", Path::new("/tmp"), false).expect_err("dir");
        assert!(e.to_string().contains("is not a regular file"), "{e}");
        assert!(check_image_file("kernel", Path::new("/proc/self/exe"), false).is_ok());
    }
}
