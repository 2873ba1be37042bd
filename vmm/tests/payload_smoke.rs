//! Payload mode on bare KVM: a vCPU entered directly in user mode runs the pattern
//! payload natively and reports its rounds through port I/O. This checks the payload
//! setup (GDT, page tables, CPL 3 registers) independently of the rest of the VMM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemoryMmap;
use vmm::payload;

fn assemble(src: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let obj = dir.path().join("p.o");
    let bin = dir.path().join("p.bin");
    let ok = std::process::Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(src)
        .status()
        .expect("run GNU as")
        .success();
    assert!(ok, "GNU as failed on {src}");
    let ok = std::process::Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&obj)
        .arg(&bin)
        .status()
        .expect("run objcopy")
        .success();
    assert!(ok, "objcopy failed");
    std::fs::read(bin).expect("read payload")
}

#[test]
fn user_mode_payload_writes_the_pattern() {
    pmsnap_testenv::require!(
        "user_mode_payload_writes_the_pattern",
        pmsnap_testenv::kvm_unavailable()
    );
    let code = assemble(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/payload/pattern.S"
    ));
    let ram: u64 = 64 << 20;
    let (region_base, region_bytes) = (32u64 << 20, 8u64 << 20);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram as usize)]).expect("mem");
    payload::write_setup(&mem, ram, &code).expect("setup");

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create vm");
    let host = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram,
        userspace_addr: host,
    };
    // SAFETY: the mapping backing `mem` lives until the end of this test, after the VM.
    unsafe { vm.set_user_memory_region(slot) }.expect("memslot");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    let sregs = payload::sregs(vcpu.get_sregs().expect("sregs"));
    vcpu.set_sregs(&sregs).expect("set sregs");
    vcpu.set_regs(&payload::regs(0, 1, region_base, region_bytes))
        .expect("set regs");

    let mut rounds = Vec::new();
    while rounds.len() < 3 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x510, data) => {
                rounds.push(u32::from_le_bytes(data.try_into().expect("4-byte out")))
            }
            other => {
                let d = format!("{other:?}");
                panic!(
                    "unexpected exit {d}: regs {:x?} sregs {:x?}",
                    vcpu.get_regs(),
                    vcpu.get_sregs()
                )
            }
        }
    }
    assert_eq!(rounds, vec![1, 2, 3], "vCPU 0 reports rounds 1, 2, 3");
    for page in [0u64, 1, 1000, 2047] {
        for word in [0u64, 7, 511] {
            let v: u64 = mem
                .read_obj(GuestAddress(region_base + page * 4096 + word * 8))
                .expect("read");
            assert_eq!(v, (3 << 32) | page, "page {page} word {word}");
        }
    }
}
