//! The blocks of a snapshot in the VM's own pool as the source of a lazy fill
//! ([`PageSource`]): a restore that would copy many preserved pages back
//! ([`pmem_backend::Pool::copy_back_lazy`]) leaves them as holes in RAM, and the lazy
//! fill ([`super::lazy::LazyFill`]) brings each in from its block on first access or in
//! the background.
//!
//! The source reads the pool file with `pread`, never through the pool: the filler must
//! not take the pool lock (a preserve waiting in the store's gate holds it). The blocks
//! stay the snapshot's while the fill runs: the store fills every hole before it deletes
//! the snapshot (see `pmem-backend/src/pool/lazy_back.rs`). Every block is checked
//! against its crc32c; a bad one is fatal and never fills a page.

use std::fs::File;
use std::os::unix::fs::FileExt;

use pmem_backend::{LazyCopyBack, LazyPage};

use super::lazy::{FetchError, PageSource};
use super::protect::PAGE_SIZE;

/// The holes of a lazy copy back and the pool file holding their blocks.
pub struct PoolBlockSource {
    file: File,
    holes: Vec<LazyPage>,
    describe: String,
}

impl std::fmt::Debug for PoolBlockSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl PoolBlockSource {
    /// The holes `back` left, read from `file` (the pool file, or a clone of it).
    pub fn new(file: File, back: &LazyCopyBack) -> Self {
        Self {
            file,
            holes: back.holes.clone(),
            describe: format!("the blocks of snapshot {:?} in the pool", back.snapshot),
        }
    }
}

impl PageSource for PoolBlockSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn read(&self, first: u64, out: &mut [u8]) -> Result<(), FetchError> {
        let page = PAGE_SIZE as usize;
        let i = self.holes.partition_point(|h| h.page < first);
        for (k, dst) in out.chunks_mut(page).enumerate() {
            let p = first + k as u64;
            // The fill asks only for holes, and holes are ascending.
            let h = self
                .holes
                .get(i + k)
                .filter(|h| h.page == p)
                .ok_or_else(|| {
                    FetchError::Fatal(format!("guest page {p} is not one the copy back left out"))
                })?;
            self.file
                .read_exact_at(dst, h.block_offset)
                .map_err(|e| FetchError::Fatal(format!("block {} of page {p}: {e}", h.block)))?;
            let actual = pmem_backend::checksum::crc32c(dst);
            if actual != h.crc {
                return Err(FetchError::Fatal(format!(
                    "block {} of page {p} is damaged (crc32c {actual:#010x}, expected {:#010x})",
                    h.block, h.crc
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn source(blocks: &[(u64, u8)]) -> (tempfile::NamedTempFile, PoolBlockSource) {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        let mut holes = Vec::new();
        for (i, &(page, byte)) in blocks.iter().enumerate() {
            let data = vec![byte; 4096];
            f.write_all(&data).expect("write");
            holes.push(LazyPage {
                page,
                block: i as u64,
                block_offset: i as u64 * 4096,
                crc: pmem_backend::checksum::crc32c(&data),
            });
        }
        let back = LazyCopyBack {
            snapshot: "s".into(),
            holes,
            copied: Vec::new(),
        };
        let file = f.reopen().expect("reopen");
        (f, PoolBlockSource::new(file, &back))
    }

    #[test]
    fn reads_each_hole_from_its_block() {
        let (_f, src) = source(&[(3, 0xa3), (4, 0xa4), (9, 0xa9)]);
        let mut out = vec![0u8; 2 * 4096];
        src.read(3, &mut out).expect("pages 3 and 4");
        assert!(out[..4096].iter().all(|&b| b == 0xa3));
        assert!(out[4096..].iter().all(|&b| b == 0xa4));
        let mut one = vec![0u8; 4096];
        src.read(9, &mut one).expect("page 9");
        assert!(one.iter().all(|&b| b == 0xa9));
    }

    #[test]
    fn a_page_that_is_no_hole_or_a_bad_block_is_fatal() {
        let (f, src) = source(&[(3, 0xa3), (5, 0xa5)]);
        let mut out = vec![0u8; 2 * 4096];
        let e = src.read(3, &mut out).expect_err("page 4 is no hole");
        assert!(
            matches!(&e, FetchError::Fatal(m) if m.contains("page 4")),
            "{e}"
        );
        f.as_file()
            .write_all_at(&[0u8; 8], 4096 + 100)
            .expect("damage block 1");
        let e = src.read(5, &mut out[..4096]).expect_err("damaged");
        assert!(
            matches!(&e, FetchError::Fatal(m) if m.contains("damaged")),
            "{e}"
        );
    }

    /// The byte every byte of page `p` holds in generation `g` of the test's RAM.
    fn byte(g: u8, p: u64) -> u8 {
        g.wrapping_mul(61).wrapping_add(p as u8) | 1
    }

    #[test]
    fn a_lazy_copy_back_fills_from_the_blocks_and_a_mid_fill_snapshot_is_exact() {
        use crate::snapshot::engine::{lock_pool, Engine};
        use crate::snapshot::fault::HandlerOptions;
        use crate::snapshot::lazy::{FillOptions, LazyFill};
        use crate::snapshot::protect::UffdProtector;
        use pmem_backend::{PageRun, Pool, PoolOptions, SnapshotKind};
        use pmsnap_testenv::SharedMap;
        use std::sync::{Arc, Mutex};

        const PAGES: u64 = 64;
        let dir = tempfile::tempdir_in("/dev/shm").expect("tempdir on tmpfs");
        let path = dir.path().join("p.pool");
        let mut pool = Pool::create(&path, PAGES * 4096, PoolOptions::default()).expect("pool");
        let all = [PageRun::new(0, PAGES)];
        let write = |pool: &mut Pool, g: u8, pages: std::ops::Range<u64>| {
            for p in pages {
                pool.write_ram_page(p, &[byte(g, p); 4096]).expect("write");
            }
        };
        write(&mut pool, 1, 0..PAGES);
        pool.snapshot("a", SnapshotKind::Vm, &all, Default::default())
            .expect("a");
        write(&mut pool, 2, 10..40);
        pool.snapshot("b", SnapshotKind::Vm, &all, Default::default())
            .expect("b");
        write(&mut pool, 3, 20..30);
        let back = pool.copy_back_lazy("a", &all).expect("lazy copy back");
        assert_eq!(back.hole_runs(), vec![PageRun::new(10, 30)]);
        let source = PoolBlockSource::new(pool.file().try_clone().expect("dup"), &back);

        let len = pool.ram_size() as usize;
        let ram = Arc::new(SharedMap::new(pool.file(), pool.ram_offset(), len, true));
        let prot = Arc::new(UffdProtector::with_ranges_lazy(&[(ram.as_ptr(), len)]).expect("uffd"));
        let fatal = Arc::new(Mutex::new(None::<String>));
        let f2 = fatal.clone();
        let fill = LazyFill::new_partial(
            prot.clone(),
            Arc::new(source),
            FillOptions { background: false },
            Box::new(move |m| *f2.lock().expect("lock") = Some(m)),
            &back.hole_runs(),
        );
        assert!(fill.is_present(9) && !fill.is_present(10) && fill.is_present(40));
        let engine = Engine::start_with(
            Arc::new(Mutex::new(pool)),
            prot,
            Vec::new(),
            HandlerOptions::default(),
            Some(fill.clone()),
        )
        .expect("engine");
        fill.start().expect("start");
        let guest = |p: u64| {
            // SAFETY: inside the mapping; a volatile read, as a vCPU's access would be.
            unsafe { std::ptr::read_volatile(ram.as_ptr().add(p as usize * 4096 + 7)) }
        };
        // Touched holes arrive with a's content.
        assert_eq!(guest(15), byte(1, 15));
        assert_eq!(guest(25), byte(1, 25));
        assert!(!fill.complete(), "on demand only: holes remain");
        engine
            .snapshot("mid", SnapshotKind::Pages, &all, Default::default())
            .expect("snapshot mid-fill");
        // A write into a hole: it arrives, is preserved for mid, then written.
        ram.fill_page(33, 0xee);
        {
            let pool = lock_pool(engine.pool());
            for p in 0..PAGES {
                let (_, mid) = pool.read_snapshot_page("mid", p).expect("mid");
                assert!(mid.iter().all(|&x| x == byte(1, p)), "mid page {p}");
                let (_, b) = pool.read_snapshot_page("b", p).expect("b");
                let want = if (10..40).contains(&p) { 2 } else { 1 };
                assert!(b.iter().all(|&x| x == byte(want, p)), "b page {p}");
            }
        }
        assert_eq!(guest(33), 0xee);
        // Deleting the source fills every hole first.
        engine.delete("a").expect("delete a");
        assert!(fill.complete());
        assert!(!pmem_backend::filling_marker(&path).exists());
        for p in (0..PAGES).filter(|&p| p != 33) {
            assert_eq!(guest(p), byte(1, p), "page {p}");
        }
        assert!(fatal.lock().expect("lock").is_none());
        assert!(lock_pool(engine.pool()).verify(|_, _| ()).is_clean());
    }
}
