//! Checking the content of decoded messages against the limits and guest RAM: the
//! VMM's gate for what the guest sends, and the agent's for what applications and the
//! host send. Everything a peer sends is untrusted.

use super::{
    AgentRequest, AppRequest, GuestRequest, ProtocolError, Request, Run, VirtRange, MAX_COMM_LEN,
    MAX_NAME_LEN, MAX_RANGES, MAX_RUNS, PAGE_SIZE,
};

impl GuestRequest {
    /// Check the operation against guest RAM of `ram_pages` pages (see
    /// [`Request::validate`]).
    pub fn validate(&self, ram_pages: u64) -> Result<(), ProtocolError> {
        self.op.validate(ram_pages)
    }
}

impl Request {
    /// Check every field against the limits and against guest RAM of `ram_pages` pages.
    /// This is the VMM's gate: the guest is untrusted.
    pub fn validate(&self, ram_pages: u64) -> Result<(), ProtocolError> {
        match self {
            Request::Save(s) => {
                validate_name(&s.name)?;
                validate_comm(&s.comm)?;
                validate_runs(&s.runs, ram_pages, false)
            }
            Request::Restore(r) => {
                validate_name(&r.name)?;
                validate_runs(&r.runs, ram_pages, true)
            }
            Request::List => Ok(()),
            Request::Delete { name } => validate_name(name),
        }
    }
}

impl AppRequest {
    /// Check names and ranges (the agent does not trust applications).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            AppRequest::Save { name, ranges, .. } | AppRequest::Restore { name, ranges, .. } => {
                validate_name(name)?;
                validate_ranges(ranges)
            }
            AppRequest::List => Ok(()),
            AppRequest::Delete { name, .. } => validate_name(name),
        }
    }
}

impl AgentRequest {
    /// Check the fields (the agent does not trust the other end either).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            AgentRequest::SnapshotProcess { name, ranges, .. } => {
                validate_name(name)?;
                validate_ranges(ranges)
            }
        }
    }
}

/// Check virtual ranges: at most [`MAX_RANGES`], each page aligned and non-empty.
pub fn validate_ranges(ranges: &[VirtRange]) -> Result<(), ProtocolError> {
    if ranges.len() > MAX_RANGES {
        return Err(ProtocolError::BadRun {
            index: MAX_RANGES,
            reason: "more ranges than MAX_RANGES",
        });
    }
    for (index, r) in ranges.iter().enumerate() {
        if r.start % PAGE_SIZE != 0 || r.end % PAGE_SIZE != 0 || r.end <= r.start {
            return Err(ProtocolError::BadRun {
                index,
                reason: "range empty or not page aligned",
            });
        }
    }
    Ok(())
}

/// Check a snapshot name: 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with '.'.
/// (The rule keeps names usable as file names in exports and free of path tricks.)
pub fn validate_name(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        // Bound what ends up in error messages and logs.
        Err(ProtocolError::InvalidName(
            name.chars().take(MAX_NAME_LEN + 8).collect(),
        ))
    }
}

/// Check a command name: at most [`MAX_COMM_LEN`] bytes, no control characters.
pub fn validate_comm(comm: &str) -> Result<(), ProtocolError> {
    if comm.len() > MAX_COMM_LEN || comm.chars().any(char::is_control) {
        return Err(ProtocolError::InvalidComm);
    }
    Ok(())
}

/// Check page runs against guest RAM of `ram_pages` pages: at most [`MAX_RUNS`], at
/// least one, each non-empty, page-aligned virtual address without overflow, present
/// runs entirely inside guest RAM, and all runs together (absent pages included) no
/// more pages than guest RAM has, so nothing the VMM sizes from them can exceed guest
/// RAM. With `require_present` (restore targets), absent runs are refused and no two
/// runs may share a guest-physical page (checked in O(n log n) on at most
/// [`MAX_RUNS`] runs).
pub fn validate_runs(
    runs: &[Run],
    ram_pages: u64,
    require_present: bool,
) -> Result<(), ProtocolError> {
    if runs.is_empty() {
        return Err(ProtocolError::NoRuns);
    }
    if runs.len() > MAX_RUNS {
        return Err(ProtocolError::TooManyRuns(runs.len()));
    }
    let mut total = 0u64;
    for (index, r) in runs.iter().enumerate() {
        let bad = |reason| Err(ProtocolError::BadRun { index, reason });
        if r.count == 0 {
            return bad("zero page count");
        }
        if r.virt_addr % PAGE_SIZE != 0 {
            return bad("virtual address not page aligned");
        }
        let bytes = match r.count.checked_mul(PAGE_SIZE) {
            Some(b) => b,
            None => return bad("page count overflows"),
        };
        if r.virt_addr.checked_add(bytes).is_none() {
            return bad("virtual range overflows");
        }
        if r.present {
            match r.guest_phys_first_page.checked_add(r.count) {
                Some(end) if end <= ram_pages => {}
                Some(_) => return bad("pages outside guest RAM"),
                None => return bad("guest page range overflows"),
            }
        } else if require_present {
            return bad("restore target pages must be present");
        }
        total = total.saturating_add(r.count);
        if total > ram_pages {
            return Err(ProtocolError::TooManyPages {
                got: total_pages(runs),
                limit: ram_pages,
            });
        }
    }
    if require_present {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_unstable_by_key(|&i| runs[i].guest_phys_first_page);
        for w in order.windows(2) {
            let (a, b) = (&runs[w[0]], &runs[w[1]]);
            // Present runs were checked above: first + count does not overflow.
            if a.guest_phys_first_page + a.count > b.guest_phys_first_page {
                return Err(ProtocolError::Overlap {
                    first: w[0].min(w[1]),
                    second: w[0].max(w[1]),
                });
            }
        }
    }
    Ok(())
}

/// Total pages of some runs (saturating; validated runs never saturate).
pub fn total_pages(runs: &[Run]) -> u64 {
    runs.iter().fold(0u64, |acc, r| acc.saturating_add(r.count))
}

#[cfg(test)]
mod tests {
    use crate::protocol::test_util::{run, save};
    use crate::protocol::*;

    #[test]
    fn names() {
        for ok in ["a", "A.b-c_9", &"x".repeat(64), "a..b"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "..",
            "a\0",
        ] {
            assert!(
                matches!(validate_name(bad), Err(ProtocolError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(validate_comm("bash").is_ok());
        assert_eq!(validate_comm("a\nb"), Err(ProtocolError::InvalidComm));
        assert_eq!(
            validate_comm(&"c".repeat(65)),
            Err(ProtocolError::InvalidComm)
        );
    }

    #[test]
    fn run_validation() {
        let ram = 1000;
        assert_eq!(validate_runs(&[run(990, 10, 0, true)], ram, true), Ok(()));
        let reason = |r: Run, req| match validate_runs(&[r], ram, req) {
            Err(ProtocolError::BadRun { index: 0, reason }) => reason,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(
            reason(run(991, 10, 0, true), false),
            "pages outside guest RAM"
        );
        assert_eq!(
            reason(run(u64::MAX, 2, 0, true), false),
            "guest page range overflows"
        );
        assert_eq!(reason(run(1, 0, 0, true), false), "zero page count");
        assert_eq!(
            reason(run(1, 1, 0x10, true), false),
            "virtual address not page aligned"
        );
        assert_eq!(
            reason(run(1, u64::MAX / 2, 0, false), false),
            "page count overflows"
        );
        assert_eq!(
            reason(run(1, 2, u64::MAX - 4095, true), false),
            "virtual range overflows"
        );
        assert_eq!(
            reason(run(0, 1, 0, false), true),
            "restore target pages must be present"
        );
        // Absent pages need no guest-physical page, so any frame number is accepted.
        assert_eq!(
            validate_runs(&[run(u64::MAX, 3, 0, false)], ram, false),
            Ok(())
        );
        assert_eq!(validate_runs(&[], ram, false), Err(ProtocolError::NoRuns));
        let many = vec![run(0, 1, 0, true); MAX_RUNS + 1];
        assert_eq!(
            validate_runs(&many, ram, false),
            Err(ProtocolError::TooManyRuns(MAX_RUNS + 1))
        );
        // Index of the failing run is reported.
        assert!(matches!(
            validate_runs(&[run(0, 1, 0, true), run(0, 0, 0, true)], ram, false),
            Err(ProtocolError::BadRun { index: 1, .. })
        ));
        assert_eq!(save().validate(ram), Ok(()));
        assert!(save().validate(100).is_err());
        assert!(Request::Delete { name: ".x".into() }.validate(ram).is_err());
        assert_eq!(total_pages(&[run(0, 3, 0, true), run(0, 4, 0, false)]), 7);
    }

    #[test]
    fn page_totals_are_bounded_by_guest_ram() {
        let ram = 1000;
        // Absent pages count: 2^32 of them cannot be named in a guest of 1000 pages.
        assert_eq!(
            validate_runs(&[run(0, 1 << 32, 0, false)], ram, false),
            Err(ProtocolError::TooManyPages {
                got: 1 << 32,
                limit: ram
            })
        );
        // Many runs that each fit but together exceed guest RAM.
        let many: Vec<Run> = (0..65_536u64)
            .map(|i| run(0, 1 << 16, i << 28, false))
            .collect();
        let e = validate_runs(&many, ram, false).expect_err("too many pages");
        assert!(matches!(e, ProtocolError::TooManyPages { limit: 1000, .. }));
        assert_eq!(e.code(), ErrorCode::TooLarge);
        // Exactly guest RAM is fine.
        assert_eq!(
            validate_runs(
                &[run(0, 600, 0, false), run(0, 400, 0x1000_0000, true)],
                ram,
                false
            ),
            Ok(())
        );
        // Restore targets must be disjoint in guest-physical memory, in any order.
        assert_eq!(
            validate_runs(
                &[run(50, 10, 0, true), run(10, 10, 0x10000, true)],
                ram,
                true
            ),
            Ok(())
        );
        let e = validate_runs(
            &[
                run(50, 10, 0, true),
                run(0, 1, 0x1000, true),
                run(55, 1, 0x20000, true),
            ],
            ram,
            true,
        )
        .expect_err("overlap");
        assert_eq!(
            e,
            ProtocolError::Overlap {
                first: 0,
                second: 2
            }
        );
        assert_eq!(e.code(), ErrorCode::RunOutOfRange);
        // 65,536 copies of the same target page: refused, not allocated.
        let same = vec![run(5, 1, 0, true); MAX_RUNS];
        assert!(matches!(
            validate_runs(&same, 1 << 20, true),
            Err(ProtocolError::Overlap { .. })
        ));
    }

    #[test]
    fn app_requests_round_trip_and_validate() {
        let reqs = [
            AppRequest::Save {
                name: "s".into(),
                pid: 9,
                ranges: vec![],
            },
            AppRequest::Restore {
                name: "s".into(),
                owner: Some(1000),
                pid: 9,
                ranges: vec![VirtRange {
                    start: 0x1000,
                    end: 0x2000,
                }],
            },
            AppRequest::List,
            AppRequest::Delete {
                name: "s".into(),
                owner: None,
            },
        ];
        for r in &reqs {
            assert_eq!(r.validate(), Ok(()));
            let f = r.encode().expect("encode");
            assert_eq!(&AppRequest::decode(&f).expect("decode"), r);
        }
        let bad = AppRequest::Save {
            name: "s".into(),
            pid: 9,
            ranges: vec![VirtRange {
                start: 0x1001,
                end: 0x2000,
            }],
        };
        assert!(matches!(bad.validate(), Err(ProtocolError::BadRun { .. })));
        let bad = AppRequest::Delete {
            name: "../x".into(),
            owner: None,
        };
        assert!(matches!(bad.validate(), Err(ProtocolError::InvalidName(_))));
    }

    #[test]
    fn agent_request_round_trip_and_validation() {
        let ok = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![VirtRange {
                start: 0x1000,
                end: 0x3000,
            }],
            token: 1,
        };
        let f = ok.encode().expect("encode");
        assert_eq!(AgentRequest::decode(&f).expect("decode"), ok);
        assert_eq!(ok.validate(), Ok(()));
        let bad = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![VirtRange {
                start: 0x3000,
                end: 0x3000,
            }],
            token: 1,
        };
        assert!(matches!(
            bad.validate(),
            Err(ProtocolError::BadRun { index: 0, .. })
        ));
        let bad_name = AgentRequest::SnapshotProcess {
            name: "a/b".into(),
            pid: 7,
            ranges: vec![],
            token: 1,
        };
        assert!(matches!(
            bad_name.validate(),
            Err(ProtocolError::InvalidName(_))
        ));
        let too_many = AgentRequest::SnapshotProcess {
            name: "p1".into(),
            pid: 7,
            ranges: vec![
                VirtRange {
                    start: 0x1000,
                    end: 0x2000
                };
                MAX_RANGES + 1
            ],
            token: 1,
        };
        assert!(matches!(
            too_many.validate(),
            Err(ProtocolError::BadRun {
                index: MAX_RANGES,
                ..
            })
        ));
        // A reply frame is not an agent request.
        let r = Reply::Deleted { name: "a".into() }
            .encode()
            .expect("encode");
        assert_eq!(AgentRequest::decode(&r), Err(ProtocolError::BadKind(2)));
    }
}
