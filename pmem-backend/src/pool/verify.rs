//! `verify`: re-read everything from the pool and check every checksum and the store's
//! invariants, reporting each problem by snapshot name and page number.

use super::Pool;
use crate::catalog;
use crate::redirect_log::LogRecord;
use crate::superblock::{self, SbCopy, LOG_RECORD_SIZE, SB_SIZE};
use crate::{Page, PAGE_SIZE};
use serde::Serialize;
use std::collections::HashMap;

/// One problem verify found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// The active superblock copy no longer decodes or differs from the open state.
    Superblock {
        /// What is wrong.
        detail: String,
    },
    /// The catalog on the pool fails a check.
    Catalog {
        /// What is wrong (names the record).
        detail: String,
    },
    /// A redirect-log record of the current generation fails its checksum.
    LogRecord {
        /// Record position.
        seq: u32,
    },
    /// A snapshot page's block fails its checksum.
    BadPage {
        /// Snapshot name.
        snapshot: String,
        /// Guest page number.
        page: u64,
        /// Block number.
        block: u64,
        /// Stored crc32c.
        expected: u32,
        /// Computed crc32c.
        actual: u32,
    },
    /// A snapshot's state blob fails its checksum.
    BadState {
        /// Snapshot name.
        snapshot: String,
    },
    /// A snapshot page is RAM(p) but p is not marked protected.
    Unprotected {
        /// Snapshot name.
        snapshot: String,
        /// Guest page number.
        page: u64,
    },
}

/// What verify checked and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Snapshot pages checked (RAM references and blocks).
    pub pages_checked: u64,
    /// Distinct blocks whose checksum was computed.
    pub blocks_checked: u64,
    /// Problems, in the order found.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// Whether nothing was wrong.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Pool {
    /// Total units of work `verify` reports progress in (snapshot pages).
    pub fn verify_work(&self) -> u64 {
        self.snapshots.values().map(|s| s.page_count()).sum()
    }

    /// Check every checksum (superblock, catalog records, current log records, every
    /// preserved block, every state blob) and that every RAM(p) reference is protected.
    /// `progress(done, total)` is called as snapshot pages are checked.
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> VerifyReport {
        let mut rep = VerifyReport::default();
        let sb_off = (self.sb.generation % 2) * SB_SIZE;
        let mut sector = vec![0u8; SB_SIZE as usize];
        let sb_ok = self.map.read_at(sb_off, &mut sector).is_ok();
        match superblock::decode(&sector) {
            SbCopy::Good(sb) if sb_ok && sb == self.sb => {}
            other => rep.problems.push(Problem::Superblock {
                detail: format!(
                    "active copy (generation {}) reads back as {other:?}",
                    self.sb.generation
                ),
            }),
        }
        let mut cat = vec![0u8; self.sb.catalog_len as usize];
        let cat_res = self
            .map
            .read_at(self.geo.meta_slot_offset(self.sb.catalog_slot), &mut cat)
            .map_err(|e| e.to_string())
            .and_then(|()| catalog::decode(&cat, self.sb.generation));
        if let Err(detail) = cat_res {
            rep.problems.push(Problem::Catalog { detail });
        }
        for seq in 0..self.log_tail {
            let mut b = [0u8; LOG_RECORD_SIZE as usize];
            let off = self.geo.log_offset + u64::from(seq) * LOG_RECORD_SIZE;
            let ok = self.map.read_at(off, &mut b).is_ok()
                && LogRecord::decode(&b).is_some_and(|r| r.is_next(self.sb.generation, seq));
            if !ok {
                rep.problems.push(Problem::LogRecord { seq });
            }
        }
        let total = self.verify_work();
        let mut done = 0u64;
        let mut block_ok: HashMap<u32, (bool, u32)> = HashMap::new();
        for s in self.snapshots.values() {
            rep.snapshots += 1;
            let records = self.redirects.of(s);
            let mut red = records.iter().peekable();
            for p in s.pages() {
                let here = red.next_if(|v| v.page == p).map(|v| v.block);
                match here {
                    Some(b) => {
                        let (ok, actual) = *block_ok.entry(b).or_insert_with(|| {
                            rep.blocks_checked += 1;
                            let mut page: Page = [0; PAGE_SIZE];
                            let actual = match self.read_block(u64::from(b), &mut page) {
                                Ok(()) => crate::checksum::crc32c(&page),
                                Err(_) => 0,
                            };
                            (self.index.block_crc(b) == Some(actual), actual)
                        });
                        if !ok {
                            rep.problems.push(Problem::BadPage {
                                snapshot: s.name.clone(),
                                page: p,
                                block: u64::from(b),
                                expected: self.index.block_crc(b).unwrap_or(0),
                                actual,
                            });
                        }
                    }
                    None => {
                        if !self.index.is_protected(p) || self.index.ram_refs(p) == 0 {
                            rep.problems.push(Problem::Unprotected {
                                snapshot: s.name.clone(),
                                page: p,
                            });
                        }
                    }
                }
                rep.pages_checked += 1;
                done += 1;
                if done % 4096 == 0 {
                    progress(done, total);
                }
            }
            if self.read_state(s.id).is_err() {
                rep.problems.push(Problem::BadState {
                    snapshot: s.name.clone(),
                });
            }
        }
        progress(done, total);
        rep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fill, small_pool, tmpdir, vm};
    use crate::{PageLocation, PageRun, PoolError, PoolOptions, SnapshotKind, SnapshotMeta};

    #[test]
    fn verify_names_the_bad_page() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 8, PoolOptions::default());
        fill(&mut pool, 0..8, 9);
        vm(&mut pool, "a", &[PageRun::new(0, 8)]);
        vm(&mut pool, "b", &[PageRun::new(3, 1)]);
        pool.preserve(3).expect("preserve");
        let PageLocation::Block(b) = pool.snapshot_page_location("a", 3).expect("loc") else {
            panic!("not preserved")
        };
        pool.map
            .write_at(pool.geo.block_offset_of(b) + 100, &[0xee])
            .expect("corrupt");
        let mut calls = 0;
        let rep = pool.verify(|done, total| {
            calls += 1;
            assert!(done <= total);
        });
        assert!(calls >= 1);
        assert_eq!(rep.pages_checked, 9);
        let bad: Vec<(String, u64)> = rep
            .problems
            .iter()
            .filter_map(|p| match p {
                Problem::BadPage { snapshot, page, .. } => Some((snapshot.clone(), *page)),
                _ => None,
            })
            .collect();
        assert_eq!(bad, vec![("a".to_string(), 3), ("b".to_string(), 3)]);
        assert!(matches!(
            pool.read_snapshot_page("b", 3),
            Err(PoolError::BadBlock { page: 3, .. })
        ));
    }

    #[test]
    fn verify_detects_bad_state_blob_and_catalog() {
        let d = tmpdir();
        let (_, mut pool) = small_pool(&d, 8, PoolOptions::default());
        let meta = SnapshotMeta {
            state: vec![5; 100],
            ..Default::default()
        };
        pool.snapshot("a", SnapshotKind::Vm, &[], meta)
            .expect("snapshot");
        let b = pool.snapshots[&1].blob.blocks[0];
        pool.map
            .write_at(pool.geo.block_offset_of(u64::from(b)), &[6])
            .expect("corrupt");
        let cat_off = pool.geo.meta_slot_offset(pool.sb.catalog_slot) + 70;
        pool.map
            .write_at(cat_off, &[0xff])
            .expect("corrupt catalog");
        let rep = pool.verify(|_, _| {});
        assert!(rep.problems.contains(&Problem::BadState {
            snapshot: "a".into()
        }));
        assert!(rep
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Catalog { .. })));
        assert!(pool.read_state("a").is_err());
    }
}
