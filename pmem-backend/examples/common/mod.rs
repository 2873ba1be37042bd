//! What the examples share.

/// Shuffle `v` in place with xorshift from a fixed seed: the same order every run (the
/// order in which a guest might have written pages, for copy-back figures).
pub fn shuffle(v: &mut [u64]) {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
