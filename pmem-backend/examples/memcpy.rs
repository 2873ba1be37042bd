//! The physical floor every copy figure of issue 16 is compared with: a memcpy of
//! `MIB` MiB into memory that is already faulted in (so no page allocation is paid),
//! best of `REPS` rounds. Prints `memcpy MIB MiB: T us (G GB/s)`.
//!
//! `cargo run --release -p pmem-backend --example memcpy -- MIB [REPS]`

use std::time::Instant;

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mib = args.first().copied().unwrap_or(256);
    let reps = args.get(1).copied().unwrap_or(3).max(1);
    let len = (mib << 20) as usize;
    let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    // Written once, so every page of the destination is faulted in before the timing.
    let mut dst = vec![1u8; len];
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    println!(
        "memcpy {mib} MiB: {:.0} us ({:.2} GB/s)",
        best * 1e6,
        len as f64 / best / 1e9
    );
}
