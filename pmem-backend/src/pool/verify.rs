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
        self.snapshots.iter().map(|s| s.page_count()).sum()
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
        for s in &self.snapshots {
            rep.snapshots += 1;
            for p in s.pages() {
                match s.redirects.get(&p) {
                    Some(&b) => {
                        let (ok, actual) = *block_ok.entry(b).or_insert_with(|| {
                            rep.blocks_checked += 1;
                            let mut page: Page = [0; PAGE_SIZE];
                            let actual = match self.read_block(u64::from(b), &mut page) {
                                Ok(()) => crc32c::crc32c(&page),
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
