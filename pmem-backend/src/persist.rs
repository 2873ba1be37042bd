//! The persistence seam: every durable write in the pool goes through [`Persist::persist`].
//!
//! [`MsyncPersist`] is the implementation for files (tmpfs, hugetlbfs, ordinary
//! filesystems). A DAX implementation (cache-line write-back + fence) would slot in here.
//! [`CrashSim`] is the test facility: it keeps a shadow "durable image" of the pool that
//! only persisted ranges update, and simulates a crash at the Nth persist call.

use crate::mapping::Mapping;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Makes a byte range of the pool mapping durable. Returns only when it is.
pub trait Persist: Send + Sync + std::fmt::Debug {
    /// Persist `range` (byte offsets into the pool file) of `map`.
    fn persist(&self, map: &Mapping, range: Range<u64>) -> io::Result<()>;

    /// Persist several ranges with no ordering among them: when this returns all are
    /// durable, but a crash during the call may leave any subset (or a torn part) of
    /// them on the media. A DAX implementation flushes every range and fences once.
    fn persist_batch(&self, map: &Mapping, ranges: &[Range<u64>]) -> io::Result<()> {
        ranges.iter().try_for_each(|r| self.persist(map, r.clone()))
    }
}

/// `msync(MS_SYNC)` on the page-aligned cover of the range.
///
/// On tmpfs and hugetlbfs (memory filesystems, where msync writes nothing back and costs
/// the same for any length) a batch is persisted with one msync over the ranges' hull;
/// on other filesystems each range gets its own msync, so no unrelated dirty page (guest
/// RAM) is written back.
#[derive(Debug, Default, Clone, Copy)]
pub struct MsyncPersist {
    /// Whether one msync may cover a whole batch.
    pub memory_fs: bool,
}

/// statfs magic numbers of the memory filesystems.
pub(crate) const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The statfs magic number of the filesystem `file` lives on (`None` if fstatfs fails).
pub(crate) fn fs_type(file: &std::fs::File) -> Option<i64> {
    use std::os::fd::AsRawFd;
    // SAFETY: statfs is plain data, valid when zeroed.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd; `st` is a live, writable statfs the call fills in.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    (rc == 0).then_some(st.f_type as i64)
}

impl MsyncPersist {
    /// The msync seam for `file`, noting whether it lives on a memory filesystem.
    pub fn for_file(file: &std::fs::File) -> Self {
        MsyncPersist {
            memory_fs: matches!(fs_type(file), Some(TMPFS_MAGIC | HUGETLBFS_MAGIC)),
        }
    }
}

impl Persist for MsyncPersist {
    fn persist(&self, map: &Mapping, range: Range<u64>) -> io::Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        let page = crate::PAGE_SIZE as u64;
        let start = range.start & !(page - 1);
        let end = range.end.min(map.len() as u64);
        if start >= end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "persist range outside the mapping",
            ));
        }
        let len = usize::try_from(end - start).map_err(io::Error::other)?;
        // SAFETY: start is page aligned and start..end lies inside the live mapping, as
        // msync requires; msync does not touch Rust-visible memory.
        let rc =
            unsafe { libc::msync(map.as_ptr().add(start as usize).cast(), len, libc::MS_SYNC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn persist_batch(&self, map: &Mapping, ranges: &[Range<u64>]) -> io::Result<()> {
        if self.memory_fs && ranges.len() > 1 {
            let start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
            let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
            return self.persist(map, start..end);
        }
        ranges.iter().try_for_each(|r| self.persist(map, r.clone()))
    }
}

/// How the write in flight at the crash point ends up in the durable image. For a
/// batch (several ranges persisted by one call, unordered), the mode applies per range
/// except `LastOnly`, which models reordering: only the batch's last range landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tear {
    /// None of it reached the media.
    Lost,
    /// The first half (rounded down to 8 bytes) of each range reached the media.
    Half,
    /// All of it reached the media, but the caller never learned so.
    Whole,
    /// Only the last range of the batch reached the media (whole); for a single range
    /// this is `Whole`.
    LastOnly,
}

impl Tear {
    /// Every mode, for tests that try them all.
    pub const ALL: [Tear; 4] = [Tear::Lost, Tear::Half, Tear::Whole, Tear::LastOnly];
}

#[derive(Debug)]
struct SimState {
    image: Vec<u8>,
    calls: u64,
    crash_at: Option<u64>,
    tear: Tear,
    crashed: bool,
}

/// Crash simulator on the persist seam. Clone it to keep a handle while the pool owns it.
///
/// Call N (1-based) of `persist` is the crash point: it is applied according to [`Tear`]
/// and fails, and every later call fails without touching the image. Writes to the
/// mapping that were never persisted are absent from [`CrashSim::durable_image`].
#[derive(Debug, Clone)]
pub struct CrashSim {
    state: Arc<Mutex<SimState>>,
}

impl CrashSim {
    /// A simulator whose durable image starts as `len` zero bytes (a fresh file).
    /// `crash_at: None` only counts calls.
    pub fn new(len: usize, crash_at: Option<u64>, tear: Tear) -> Self {
        Self::from_image(vec![0; len], crash_at, tear)
    }

    /// A simulator starting from an existing durable image (a reopened pool).
    pub fn from_image(image: Vec<u8>, crash_at: Option<u64>, tear: Tear) -> Self {
        CrashSim {
            state: Arc::new(Mutex::new(SimState {
                image,
                calls: 0,
                crash_at,
                tear,
                crashed: false,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        // A panic while holding this lock can only come from a test assertion; the state
        // is still a plain byte vector, so recover it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Persist calls seen so far (including the crashing one).
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Whether the crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// Crash at the `after`-th persist call from now (1 = the next one), tearing as `tear`.
    pub fn arm(&self, after: u64, tear: Tear) {
        let mut st = self.lock();
        st.crash_at = Some(st.calls + after.max(1));
        st.tear = tear;
    }

    /// Cancel an armed crash that has not happened.
    pub fn disarm(&self) {
        self.lock().crash_at = None;
    }

    /// What would be on the media after the crash.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().image.clone()
    }
}

impl Persist for CrashSim {
    fn persist(&self, map: &Mapping, range: Range<u64>) -> io::Result<()> {
        self.persist_batch(map, std::slice::from_ref(&range))
    }

    fn persist_batch(&self, map: &Mapping, ranges: &[Range<u64>]) -> io::Result<()> {
        let mut st = self.lock();
        if st.crashed {
            return Err(io::Error::other("simulated crash: pool is gone"));
        }
        st.calls += 1;
        let crash = st.crash_at == Some(st.calls);
        let n = ranges.len();
        for (i, range) in ranges.iter().enumerate() {
            let end = range.end.min(map.len() as u64);
            let len = end.saturating_sub(range.start) as usize;
            let mut bytes = vec![0u8; len];
            map.read_at(range.start, &mut bytes)?;
            let keep = if crash {
                match st.tear {
                    Tear::Lost => 0,
                    Tear::Half => (len / 2) & !7,
                    Tear::Whole => len,
                    Tear::LastOnly if i + 1 == n => len,
                    Tear::LastOnly => 0,
                }
            } else {
                len
            };
            let start = range.start as usize;
            // The file's size is set at creation, or by a growth of the block area before
            // its commit (metadata operations that are durable before any later data
            // write), so the image always spans the whole mapping: after a growth, from
            // its first persist on, whatever that persist's fate.
            let size = map.len().max(start + len);
            if st.image.len() < size {
                st.image.resize(size, 0);
            }
            st.image[start..start + keep].copy_from_slice(&bytes[..keep]);
        }
        if crash {
            st.crashed = true;
            return Err(io::Error::other(format!(
                "simulated crash at persist #{}",
                st.calls
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> (std::fs::File, Mapping) {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(3 * 4096).expect("set_len");
        let m = Mapping::new(&f, 3 * 4096).expect("map");
        (f, m)
    }

    #[test]
    fn msync_accepts_unaligned_ranges() {
        let (_f, m) = map();
        m.write_at(5000, &[9; 100]).expect("write");
        for mp in [
            MsyncPersist { memory_fs: false },
            MsyncPersist { memory_fs: true },
        ] {
            mp.persist(&m, 5000..5100).expect("msync");
            mp.persist(&m, 0..3 * 4096).expect("msync all");
            mp.persist_batch(&m, &[0..10, 8192..8200]).expect("batch");
            assert!(mp.persist(&m, 20000..20001).is_err());
        }
    }

    #[test]
    fn detects_memory_filesystems() {
        if let Ok(f) = tempfile::tempfile_in("/dev/shm") {
            assert!(MsyncPersist::for_file(&f).memory_fs, "/dev/shm is tmpfs");
        }
    }

    #[test]
    fn crash_sim_keeps_only_persisted_and_tears_the_crashing_write() {
        let (_f, m) = map();
        let sim = CrashSim::new(m.len(), Some(2), Tear::Half);
        m.write_at(0, &[1; 64]).expect("write");
        sim.persist(&m, 0..64).expect("first persist succeeds");
        m.write_at(100, &[2; 64]).expect("write");
        m.write_at(4096, &[3; 8]).expect("write, never persisted");
        assert!(sim.persist(&m, 100..164).is_err());
        assert!(sim.crashed());
        m.write_at(200, &[4; 8]).expect("write");
        assert!(sim.persist(&m, 200..208).is_err());
        let img = sim.durable_image();
        assert_eq!(&img[0..64], &[1; 64]);
        assert_eq!(&img[100..132], &[2; 32]);
        assert_eq!(&img[132..164], &[0; 32]);
        assert_eq!(&img[200..208], &[0; 8]);
        assert_eq!(&img[4096..4104], &[0; 8]);
        assert_eq!(sim.calls(), 2);
    }

    #[test]
    fn crash_sim_lost_and_whole() {
        let (_f, m) = map();
        m.write_at(0, &[7; 16]).expect("write");
        let lost = CrashSim::new(m.len(), Some(1), Tear::Lost);
        assert!(lost.persist(&m, 0..16).is_err());
        assert_eq!(&lost.durable_image()[0..16], &[0; 16]);
        let whole = CrashSim::new(m.len(), Some(1), Tear::Whole);
        assert!(whole.persist(&m, 0..16).is_err());
        assert_eq!(&whole.durable_image()[0..16], &[7; 16]);
    }

    #[test]
    fn crash_sim_batch_reordering() {
        let (_f, m) = map();
        m.write_at(0, &[1; 16]).expect("write");
        m.write_at(4096, &[2; 16]).expect("write");
        let sim = CrashSim::new(m.len(), Some(1), Tear::LastOnly);
        assert!(sim.persist_batch(&m, &[0..16, 4096..4112]).is_err());
        let img = sim.durable_image();
        assert_eq!(
            (&img[0..16], &img[4096..4112]),
            (&[0u8; 16][..], &[2u8; 16][..])
        );
        let ok = CrashSim::new(m.len(), None, Tear::Lost);
        ok.persist_batch(&m, &[0..16, 4096..4112])
            .expect("no crash");
        assert_eq!(ok.calls(), 1, "a batch is one persist point");
        assert_eq!(&ok.durable_image()[4096..4112], &[2u8; 16]);
    }
}
