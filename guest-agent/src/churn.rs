//! The "churn" workload of the whole-VM snapshot tests: a 16 MiB buffer that step
//! `n = 1, 2, 3, ...` changes deterministically, and a checksum over all of it after each
//! step. The guest program (`pmsnap-memtest churn`) prints `C=<n> S=<checksum>` after
//! each step; the host test replays the same rule here to know the exact checksum each
//! counter value must come with, so a guest that continues after a rollback or a restore
//! proves its memory is exactly the snapshot's, not merely that a counter went on.

/// Size of the churned buffer.
pub const CHURN_BYTES: usize = 16 << 20;
/// Words (u64) in the buffer.
const WORDS: usize = CHURN_BYTES / 8;
/// Words per 4 KiB page.
const PAGE_WORDS: usize = 4096 / 8;
/// Pages rewritten by each step.
pub const PAGES_PER_STEP: usize = 8;

/// splitmix64 of (a, b): a cheap, well-mixed word (also the fill pattern of
/// `pmsnap-memtest`).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(b.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(0x94d0_49bb_1331_11eb);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The buffer and the number of steps applied to it.
#[derive(Debug, Clone)]
pub struct Churn {
    words: Vec<u64>,
    step: u64,
}

impl Default for Churn {
    fn default() -> Self {
        Self::new()
    }
}

impl Churn {
    /// The buffer before step 1: every word filled from its index (so every page is
    /// really populated, not the shared zero page).
    pub fn new() -> Self {
        let words = (0..WORDS as u64).map(|i| mix(0, i)).collect();
        Self { words, step: 0 }
    }

    /// Steps applied so far (the last printed counter).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The pages step `n` rewrites.
    pub fn pages_of_step(n: u64) -> [usize; PAGES_PER_STEP] {
        let pages = (WORDS / PAGE_WORDS) as u64;
        std::array::from_fn(|k| (mix(n, k as u64 + 1) % pages) as usize)
    }

    /// Apply the next step: rewrite a few pages chosen from the step number with words
    /// derived from it (and from what was there, so the order of steps matters).
    pub fn step(&mut self) -> u64 {
        self.step += 1;
        let n = self.step;
        for page in Self::pages_of_step(n) {
            let base = page * PAGE_WORDS;
            for (j, w) in self.words[base..base + PAGE_WORDS].iter_mut().enumerate() {
                *w = mix(n, *w ^ j as u64);
            }
        }
        n
    }

    /// Checksum of the whole buffer: an order-sensitive multiply-xor-rotate over every
    /// word (reads all 16 MiB each time).
    pub fn checksum(&self) -> u64 {
        self.words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
            (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23)
        })
    }

    /// The line the guest program prints after a step.
    pub fn line(n: u64, checksum: u64) -> String {
        format!("C={n} S={checksum:016x}")
    }

    /// Parse a console line `C=<n> S=<16 hex digits>` (surrounding whitespace and a
    /// carriage return allowed); None for anything else.
    pub fn parse_line(line: &str) -> Option<(u64, u64)> {
        let rest = line.trim().strip_prefix("C=")?;
        let (n, s) = rest.split_once(" S=")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some((n.parse().ok()?, u64::from_str_radix(s, 16).ok()?))
    }
}

/// Expected checksums for counter values, computed by replaying the steps.
pub fn expected_checksums(counters: &[u64]) -> Vec<(u64, u64)> {
    let mut want: Vec<u64> = counters.to_vec();
    want.sort_unstable();
    want.dedup();
    let mut c = Churn::new();
    let mut out = Vec::with_capacity(want.len());
    for n in want {
        while c.steps() < n {
            c.step();
        }
        out.push((n, c.checksum()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_change_the_checksum_and_replay_exactly() {
        let mut a = Churn::new();
        let s0 = a.checksum();
        a.step();
        let s1 = a.checksum();
        a.step();
        let s2 = a.checksum();
        assert!(s0 != s1 && s1 != s2 && s0 != s2);
        let mut b = Churn::new();
        b.step();
        assert_eq!(b.checksum(), s1);
        assert_eq!(expected_checksums(&[2, 1, 2]), vec![(1, s1), (2, s2)]);
    }

    #[test]
    fn a_single_changed_word_changes_the_checksum() {
        let mut a = Churn::new();
        let s = a.checksum();
        a.words[WORDS - 1] ^= 1;
        assert_ne!(a.checksum(), s);
        a.words[WORDS - 1] ^= 1;
        a.words.swap(0, 1);
        assert_ne!(a.checksum(), s, "order matters");
    }

    #[test]
    fn lines_round_trip_and_junk_is_rejected() {
        let l = Churn::line(42, 0xdead_beef);
        assert_eq!(l, "C=42 S=00000000deadbeef");
        assert_eq!(
            Churn::parse_line(&format!("{l}\r")),
            Some((42, 0xdead_beef))
        );
        for bad in [
            "C= S=00000000deadbeef",
            "C=4 S=deadbeef",
            "x C=4 S=00000000deadbeef",
            "C=4 S=00000000deadbeeg",
            "C=4a S=00000000deadbeef",
        ] {
            assert_eq!(Churn::parse_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn pages_of_a_step_are_in_range() {
        for n in 1..1000 {
            assert!(Churn::pages_of_step(n)
                .iter()
                .all(|&p| p < CHURN_BYTES / 4096));
        }
    }
}
