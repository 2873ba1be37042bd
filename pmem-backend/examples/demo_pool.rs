//! Create a small demo pool with a few snapshots, for trying `pmsnap store` by hand:
//! `cargo run -p pmem-backend --example demo_pool -- /dev/shm/demo.pool [ram_mib]`
//! then `pmsnap store --pool /dev/shm/demo.pool ls`.

use pmem_backend::{PageRun, Pool, PoolOptions, ProcessInfo, SnapshotKind, SnapshotMeta};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: demo_pool PATH [RAM_MIB]")?;
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);
    let mut pool = Pool::create(&path, mib << 20, PoolOptions::default())?;
    let pages = pool.ram_pages();
    for p in 0..pages {
        pool.write_ram_page(p, &[(p % 251) as u8; 4096])?;
    }
    let vm = SnapshotMeta {
        labels: vec![("purpose".into(), "demo".into())],
        state: b"device and vCPU state would go here".to_vec(),
        process: None,
        ..Default::default()
    };
    pool.snapshot("boot", SnapshotKind::Vm, &[PageRun::new(0, pages)], vm)?;
    let proc_meta = SnapshotMeta {
        owner: pmem_backend::Owner::Guest(1000),
        labels: vec![("app".into(), "redis".into())],
        state: Vec::new(),
        process: Some(ProcessInfo {
            pid: 312,
            comm: "redis-server".into(),
            run_vas: vec![0x5555_5555_0000, 0x7fff_f000_0000],
        }),
    };
    pool.snapshot(
        "guest:1000/redis-1",
        SnapshotKind::Process,
        &[PageRun::new(10, 20), PageRun::new(100, 4)],
        proc_meta,
    )?;
    for p in (0..pages).step_by(7) {
        pool.write_ram_page(p, &[0xee; 4096])?;
    }
    let s = pool.stats();
    println!(
        "created {path}: {} snapshots, {} pages in RAM, {} in blocks, {} bytes shared",
        s.snapshots, s.pages_in_ram, s.pages_in_blocks, s.shared_bytes
    );
    Ok(())
}
