//! Where a repository's objects live: the [`Storage`] trait and its implementations on a
//! directory ([`DirStorage`]) and in memory ([`MemStorage`], for tests and tools).
//!
//! The trait is deliberately the subset of operations an object store such as S3 offers:
//! whole-object atomic put (no rename, no append), get, ranged get, list by prefix, delete.
//! Nothing in the repository relies on anything else (no locks, no conditional writes, no
//! directory semantics), so an S3 client can implement it later without changing the
//! repository code.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One object as listed: its key, size and last modification time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The full key (`packs/<id>`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written (the storage's clock; an object store's
    /// `LastModified`). The garbage collector's grace period is measured against it.
    pub modified: SystemTime,
}

/// A flat key → bytes object store.
///
/// Keys are `/`-separated ASCII strings made of `[A-Za-z0-9._%-]` segments that do not
/// start with `.` (the repository only produces such keys). Every operation returns
/// `io::Error`; an absent object is reported with [`io::ErrorKind::NotFound`].
pub trait Storage: Send + Sync + fmt::Debug {
    /// Store `data` as the whole object `key`, replacing any previous object. Atomic: a
    /// reader (or a crash) sees either the old object (or none) or all of `data`, and
    /// once `put` returns the object is durable.
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()>;
    /// The whole object.
    fn get(&self, key: &str) -> io::Result<Vec<u8>>;
    /// `len` bytes from `offset`. A range past the end is an error
    /// ([`io::ErrorKind::UnexpectedEof`]), never a short read.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>>;
    /// Every object whose key starts with `prefix`, in key order. `prefix` is a
    /// directory-like prefix such as `packs/` (optionally followed by the start of a name).
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>>;
    /// Remove the object; removing an absent object is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;
    /// Whether the object exists.
    fn exists(&self, key: &str) -> io::Result<bool>;

    /// Put `objects` in the given order, possibly in the background: the call may return
    /// before they are stored, and a failure may be reported by a later `put_queued` or
    /// by [`Storage::wait_queued`]. An object store uploads several groups at once
    /// (bounded); the default puts them now, one after the other.
    fn put_queued(&self, objects: Vec<(String, Vec<u8>)>) -> io::Result<()> {
        for (k, d) in objects {
            self.put(&k, &d)?;
        }
        Ok(())
    }
    /// Wait until everything given to [`Storage::put_queued`] is stored; the first
    /// failure among them.
    fn wait_queued(&self) -> io::Result<()> {
        Ok(())
    }
    /// Several ranges `(key, offset, len)` at once (an object store fetches them
    /// concurrently, bounded); one result per request, in order.
    fn get_ranges(&self, reqs: &[(String, u64, u64)]) -> Vec<io::Result<Vec<u8>>> {
        reqs.iter()
            .map(|(k, o, l)| self.get_range(k, *o, *l))
            .collect()
    }
    /// Several whole objects at once (an object store fetches them concurrently,
    /// bounded); one result per key, in order.
    fn get_many(&self, keys: &[String]) -> Vec<io::Result<Vec<u8>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Where the objects are, for messages (a directory, `s3://bucket/prefix`).
    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

impl<S: Storage + ?Sized> Storage for Arc<S> {
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        (**self).put(key, data)
    }
    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        (**self).get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        (**self).get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        (**self).list(prefix)
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        (**self).delete(key)
    }
    fn exists(&self, key: &str) -> io::Result<bool> {
        (**self).exists(key)
    }
    fn put_queued(&self, objects: Vec<(String, Vec<u8>)>) -> io::Result<()> {
        (**self).put_queued(objects)
    }
    fn wait_queued(&self) -> io::Result<()> {
        (**self).wait_queued()
    }
    fn get_ranges(&self, reqs: &[(String, u64, u64)]) -> Vec<io::Result<Vec<u8>>> {
        (**self).get_ranges(reqs)
    }
    fn get_many(&self, keys: &[String]) -> Vec<io::Result<Vec<u8>>> {
        (**self).get_many(keys)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Refuse keys that could escape the root or collide with temporary files.
pub(crate) fn check_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._%-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid object key {key:?}"),
        ))
    }
}

/// A repository in a local directory: object `a/b` is the file `ROOT/a/b`.
///
/// `put` writes a temporary file `.tmp-…` in the object's directory, fsyncs it, renames
/// it over the object and fsyncs the directory, so the object is replaced atomically and
/// durably. A crash may leave `.tmp-…` files behind; they are never listed and
/// [`DirStorage::remove_stale_temps`] deletes old ones.
#[derive(Debug)]
pub struct DirStorage {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl DirStorage {
    /// Use (and create if needed) the directory `root`.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(DirStorage { root })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Delete temporary files (left by a crash during `put`) older than `age` in the
    /// directories under the root. Returns how many were deleted.
    pub fn remove_stale_temps(&self, age: std::time::Duration) -> io::Result<usize> {
        let now = SystemTime::now();
        let mut n = 0;
        let mut dirs = vec![self.root.clone()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d)? {
                let e = e?;
                let ft = e.file_type()?;
                let name = e.file_name();
                let name = name.to_string_lossy();
                if ft.is_dir() {
                    dirs.push(e.path());
                } else if name.starts_with(".tmp-") {
                    let m = e.metadata()?.modified()?;
                    if now.duration_since(m).unwrap_or_default() >= age {
                        fs::remove_file(e.path())?;
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

impl Storage for DirStorage {
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "key without parent"))?
            .to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir)?;
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            sync_dir(&dir)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(key)?)
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut f = fs::File::open(self.path(key)?)?;
        let size = f.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{len} past the end of {key} ({size} bytes)"),
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        let (dir, start) = match prefix.rfind('/') {
            Some(i) => (&prefix[..i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        if !dir.is_empty() {
            check_key(dir)?;
        }
        let path = self.root.join(dir);
        let rd = match fs::read_dir(&path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.starts_with(start) {
                continue;
            }
            let md = match e.metadata() {
                Ok(m) => m,
                // Deleted between read_dir and stat.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !md.is_file() {
                continue;
            }
            let key = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            out.push(ObjectInfo {
                key,
                size: md.len(),
                modified: md.modified()?,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.path(key)?) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        Ok(self.path(key)?.is_file())
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Objects in memory (tests, tools). Modification times are the wall clock at `put`
/// unless set with [`MemStorage::set_modified`].
#[derive(Debug, Default)]
pub struct MemStorage {
    objects: Mutex<MemObjects>,
}

type MemObjects = BTreeMap<String, (Arc<Vec<u8>>, SystemTime)>;

impl MemStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, MemObjects> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change an object's modification time (to test age-based rules).
    pub fn set_modified(&self, key: &str, t: SystemTime) -> bool {
        match self.map().get_mut(key) {
            Some(v) => {
                v.1 = t;
                true
            }
            None => false,
        }
    }

    /// Replace an object's bytes without changing its modification time (to test
    /// damage).
    pub fn corrupt(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        match self.map().get_mut(key) {
            Some(v) => {
                let mut d = (*v.0).clone();
                f(&mut d);
                v.0 = Arc::new(d);
                true
            }
            None => false,
        }
    }
}

fn not_found(key: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no object {key}"))
}

impl Storage for MemStorage {
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        check_key(key)?;
        self.map().insert(
            key.to_string(),
            (Arc::new(data.to_vec()), SystemTime::now()),
        );
        Ok(())
    }
    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        self.map()
            .get(key)
            .map(|v| (*v.0).clone())
            .ok_or_else(|| not_found(key))
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let d = self
            .map()
            .get(key)
            .map(|v| v.0.clone())
            .ok_or_else(|| not_found(key))?;
        let end = offset.checked_add(len).filter(|&e| e <= d.len() as u64);
        match end {
            Some(end) => Ok(d[offset as usize..end as usize].to_vec()),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {offset}+{len} past the end of {key}"),
            )),
        }
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        Ok(self
            .map()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectInfo {
                key: k.clone(),
                size: v.0.len() as u64,
                modified: v.1,
            })
            .collect())
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        self.map().remove(key);
        Ok(())
    }
    fn exists(&self, key: &str) -> io::Result<bool> {
        Ok(self.map().contains_key(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn Storage) {
        assert!(!s.exists("packs/a").unwrap());
        assert_eq!(
            s.get("packs/a").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        s.put("packs/a", b"hello").unwrap();
        s.put("packs/b", b"world!").unwrap();
        s.put("index/a", b"x").unwrap();
        s.put("packs/a", b"hello world").unwrap();
        assert_eq!(s.get("packs/a").unwrap(), b"hello world");
        assert_eq!(s.get_range("packs/a", 6, 5).unwrap(), b"world");
        assert_eq!(
            s.get_range("packs/a", 6, 6).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        let l: Vec<_> = s
            .list("packs/")
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(l, ["packs/a", "packs/b"]);
        assert_eq!(s.list("packs/b").unwrap()[0].size, 6);
        assert!(s.list("nothing/").unwrap().is_empty());
        s.delete("packs/a").unwrap();
        s.delete("packs/a").unwrap();
        assert!(!s.exists("packs/a").unwrap());
        for bad in ["", "../x", "a//b", ".tmp-1", "a/.b", "a/b c"] {
            assert_eq!(
                s.put(bad, b"").unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn dir_storage_basics() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStorage::new(d.path()).unwrap();
        exercise(&s);
        // A stray temp file is neither listed nor returned.
        fs::write(d.path().join("packs/.tmp-1-1"), b"junk").unwrap();
        assert_eq!(s.list("packs/").unwrap().len(), 1);
        assert_eq!(s.remove_stale_temps(std::time::Duration::ZERO).unwrap(), 1);
    }

    #[test]
    fn mem_storage_basics() {
        exercise(&MemStorage::new());
    }
}
