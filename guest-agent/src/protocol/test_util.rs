//! Message builders shared by the protocol's unit tests.

use super::{Request, Run, SaveRequest};

pub(super) fn run(first: u64, count: u64, virt: u64, present: bool) -> Run {
    Run {
        guest_phys_first_page: first,
        count,
        virt_addr: virt,
        present,
    }
}

pub(super) fn save() -> Request {
    Request::Save(SaveRequest {
        name: "db-1.snap_A".into(),
        pid: 42,
        comm: "postgres".into(),
        runs: vec![
            run(100, 16, 0x7f00_0000_0000, true),
            run(0, 4, 0x7f00_0001_0000, false),
        ],
    })
}
