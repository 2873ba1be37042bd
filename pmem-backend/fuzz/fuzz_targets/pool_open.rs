//! Fuzz target: open a pool from arbitrary bytes. Errors are fine; panics, hangs and
//! out-of-bounds accesses are bugs.
//!
//! Input byte 0 picks the mode:
//! - even: the rest is the whole pool file (magic, truncation and superblock paths);
//! - odd: the rest is a list of patches `(offset u16 LE, len u8, bytes)` applied to the
//!   metadata head (superblocks, redirect log, catalog slots) of a valid template pool
//!   that has snapshots, a state blob and redirect-log records. With bit 1 of byte 0 set,
//!   the superblock, catalog and log checksums are re-sealed after patching, so the
//!   decoders and validators behind the checksums get exercised too.
//!
//! After a successful open the read-only operations run, then a preserve and a delete.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pmem_backend::catalog::{CATALOG_HEADER_LEN, RECORD_HEADER_LEN};
use pmem_backend::superblock::{LOG_RECORD_SIZE, SB_CRC_OFFSET, SB_SIZE};
use pmem_backend::{PageRun, Pool, PoolOptions, ProcessInfo, SnapshotKind, SnapshotMeta};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Template {
    dir: PathBuf,
    image: Vec<u8>,
    head_len: usize,
    meta: (u64, u64, u64, u64),
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pmsnap-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let path = dir.join("template");
        let opts = PoolOptions {
            block_count: Some(16),
            log_records: Some(128),
            meta_slot_bytes: Some(8192),
            persist: None,
        };
        let mut pool = Pool::create(&path, 8 * 4096, opts).expect("template pool");
        for p in 0..8 {
            pool.write_ram_page(p, &[p as u8 + 1; 4096]).expect("fill");
        }
        let meta = SnapshotMeta {
            owner: pmem_backend::Owner::Host,
            labels: vec![("k".into(), "v".into())],
            state: vec![9; 5000],
            process: Some(ProcessInfo {
                pid: 7,
                comm: "fuzz".into(),
                run_vas: vec![0x1000, 0x9000],
            }),
        };
        pool.snapshot("p", SnapshotKind::Process, &[PageRun::new(0, 4), PageRun::new(6, 2)], meta)
            .expect("snapshot");
        pool.snapshot("v", SnapshotKind::Vm, &[PageRun::new(2, 6)], SnapshotMeta::default())
            .expect("snapshot");
        pool.preserve(0).expect("preserve");
        pool.preserve(3).expect("preserve");
        pool.gc().expect("gc");
        pool.preserve(6).expect("preserve");
        let g = pool.geometry();
        let head_len = g.ram_offset as usize;
        let meta = (g.log_offset, g.log_size, g.meta_offset, g.meta_slot_size);
        drop(pool);
        let image = std::fs::read(&path).expect("read template");
        Template {
            dir,
            image,
            head_len,
            meta,
        }
    })
}

fn reseal(head: &mut [u8], t: &Template) {
    for copy in 0..2 {
        let s = (copy * SB_SIZE) as usize;
        let crc = crc32c::crc32c(&head[s..s + SB_CRC_OFFSET]);
        head[s + SB_CRC_OFFSET..s + SB_SIZE as usize].copy_from_slice(&crc.to_le_bytes());
    }
    let (log_off, log_size, meta_off, slot) = t.meta;
    for r in 0..(log_size / LOG_RECORD_SIZE) as usize {
        let o = log_off as usize + r * LOG_RECORD_SIZE as usize;
        let crc = crc32c::crc32c(&head[o..o + 28]);
        head[o + 28..o + 32].copy_from_slice(&crc.to_le_bytes());
    }
    for s in 0..2 {
        let base = (meta_off + s * slot) as usize;
        let end = base + slot as usize;
        let crc = crc32c::crc32c(&head[base..base + 60]);
        head[base + 60..base + 64].copy_from_slice(&crc.to_le_bytes());
        let mut o = base + CATALOG_HEADER_LEN;
        while o + RECORD_HEADER_LEN <= end {
            let len = u32::from_le_bytes([head[o + 4], head[o + 5], head[o + 6], head[o + 7]]) as usize;
            let p = o + RECORD_HEADER_LEN;
            if p + len > end {
                break;
            }
            let pc = crc32c::crc32c(&head[p..p + len]);
            head[o + 8..o + 12].copy_from_slice(&pc.to_le_bytes());
            let hc = crc32c::crc32c(&head[o..o + 12]);
            head[o + 12..o + 16].copy_from_slice(&hc.to_le_bytes());
            o = p + len;
        }
    }
}

fn exercise(path: &std::path::Path) {
    let Ok(mut pool) = Pool::open(path) else { return };
    let _ = pool.stats();
    let _ = pool.protected_runs();
    let _ = pool.verify(|_, _| ());
    let list = pool.list();
    for info in &list {
        for r in info.runs.iter().take(4) {
            let _ = pool.read_snapshot_page(info.id, r.first);
        }
        let _ = pool.read_state(info.id);
    }
    for p in 0..pool.ram_pages().min(8) {
        let _ = pool.preserve(p);
    }
    if let Some(info) = list.first() {
        let _ = pool.delete(info.id);
    }
    let _ = pool.gc();
}

fuzz_target!(|data: &[u8]| {
    let t = template();
    let Some((&mode, rest)) = data.split_first() else { return };
    let path = t.dir.join("input");
    if mode % 2 == 0 {
        if std::fs::write(&path, rest).is_ok() {
            exercise(&path);
        }
        return;
    }
    let mut head = t.image[..t.head_len].to_vec();
    let mut r = rest;
    while r.len() >= 3 {
        let off = u16::from_le_bytes([r[0], r[1]]) as usize * 4 % t.head_len;
        let len = (r[2] as usize).min(r.len() - 3);
        for (i, &b) in r[3..3 + len].iter().enumerate() {
            if off + i < head.len() {
                head[off + i] = b;
            }
        }
        r = &r[3 + len..];
    }
    if mode & 2 != 0 {
        reseal(&mut head, t);
    }
    let Ok(f) = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path) else { return };
    if f.set_len(t.image.len() as u64).is_err()
        || f.write_all_at(&head, 0).is_err()
        || f.write_all_at(&t.image[t.head_len..], t.head_len as u64).is_err()
    {
        return;
    }
    drop(f);
    exercise(&path);
});
