//! A repository in an S3-compatible bucket ([`S3Storage`], Apache Arrow's `object_store`
//! crate), and [`RepoLocation`] / [`open_storage`], which turn a REPO argument (a
//! directory or `s3://BUCKET/PREFIX`) into a [`Storage`].
//!
//! `object_store` is async; an [`S3Storage`] owns a small tokio runtime (two worker
//! threads named `pmsnap-s3`) and blocks on it. Every request is retried on transient
//! errors (connection refused or reset, timeouts, 5xx, 429) with exponential backoff:
//! 100 ms doubling to at most 5 s, at most 10 retries, and no retry started after
//! [`S3Options::retry_timeout`] (default 60 s) from the first attempt; a request that
//! gets no answer in 60 s is a timeout (connect timeout 5 s).

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::task::JoinHandle;

use crate::storage::{check_key, DirStorage, ObjectInfo, Storage};

/// Where a repository is: a directory or a bucket prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    /// A local directory.
    Dir(PathBuf),
    /// `s3://BUCKET/PREFIX` (the prefix may be empty).
    S3 {
        /// The bucket.
        bucket: String,
        /// Key prefix without leading or trailing `/` (empty: the bucket's root).
        prefix: String,
    },
}

impl RepoLocation {
    /// Parse a REPO argument: `s3://BUCKET[/PREFIX]` or a directory path.
    pub fn parse(arg: &str) -> io::Result<RepoLocation> {
        let Some(rest) = arg.strip_prefix("s3://") else {
            if arg.contains("://") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{arg}: unsupported URL (a repository is a directory or s3://BUCKET/PREFIX)"),
                ));
            }
            return Ok(RepoLocation::Dir(PathBuf::from(arg)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{arg}: {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-', '.')"),
            ));
        }
        if !prefix.is_empty() {
            check_key(prefix).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{arg}: the prefix {prefix:?} must be /-separated names of \
                         [A-Za-z0-9._%-] not starting with '.'"
                    ),
                )
            })?;
        }
        Ok(RepoLocation::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// Whether this is a bucket.
    pub fn is_s3(&self) -> bool {
        matches!(self, RepoLocation::S3 { .. })
    }
}

impl fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoLocation::Dir(p) => write!(f, "{}", p.display()),
            RepoLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// How to reach an S3 endpoint. [`S3Options::from_env`] reads the usual AWS variables;
/// the CLI's flags override single fields.
#[derive(Clone)]
pub struct S3Options {
    /// Endpoint URL (`AWS_ENDPOINT_URL`); none: AWS itself. An `http://` endpoint is
    /// allowed (plain HTTP); requests are path-style (`ENDPOINT/BUCKET/KEY`) whenever an
    /// endpoint is given, as SeaweedFS, MinIO and Ceph need.
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// No retry of a failing request starts later than this after its first attempt
    /// (`PMSNAP_S3_RETRY_SECS`, default 60).
    pub retry_timeout: Duration,
    /// Uploads (and ranged downloads) in flight at once (`PMSNAP_S3_IN_FLIGHT`,
    /// default 8, 1 to 64).
    pub in_flight: usize,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("retry_timeout", &self.retry_timeout)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl S3Options {
    /// From the environment (see the fields).
    pub fn from_env() -> S3Options {
        S3Options {
            endpoint: env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
            region: env("AWS_REGION")
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: env("AWS_SESSION_TOKEN"),
            retry_timeout: Duration::from_secs(
                env("PMSNAP_S3_RETRY_SECS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60),
            ),
            in_flight: env("PMSNAP_S3_IN_FLIGHT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(8)
                .clamp(1, 64),
        }
    }
}

/// Open the storage of `loc`: a [`DirStorage`] (the directory is created if missing) or
/// an [`S3Storage`] with `s3`.
pub fn open_storage(loc: &RepoLocation, s3: &S3Options) -> io::Result<Arc<dyn Storage>> {
    match loc {
        RepoLocation::Dir(p) => Ok(Arc::new(DirStorage::new(p)?)),
        RepoLocation::S3 { bucket, prefix } => Ok(Arc::new(S3Storage::new(bucket, prefix, s3)?)),
    }
}

/// A repository under a prefix of an S3 bucket: object `a/b` is key `PREFIX/a/b`.
///
/// A PUT is atomic (readers see the old or the whole new object) and durable once
/// answered, which is all [`Storage::put`] asks. [`Storage::put_queued`] uploads in the
/// background, at most [`S3Options::in_flight`] at once; [`Storage::get_ranges`] fetches
/// ranges concurrently with the same bound.
pub struct S3Storage {
    store: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
    bucket: String,
    prefix: String,
    endpoint: String,
    in_flight: usize,
    queue: Mutex<Vec<JoinHandle<io::Result<()>>>>,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S3Storage({} at {})", self.url(), self.endpoint)
    }
}

/// Turns object_store's error into an io::Error naming the URL, what failed and, for
/// the common causes, what to check.
#[derive(Clone)]
struct ErrCtx {
    url: String,
    endpoint: String,
    bucket: String,
}

impl ErrCtx {
    fn map(&self, op: &str, key: &str, e: object_store::Error) -> io::Error {
        let what = format!("{op} {}/{key}", self.url);
        if let object_store::Error::NotFound { .. } = e {
            let s = error_chain(&e);
            if s.contains("NoSuchBucket") {
                return io::Error::other(format!(
                    "{what}: bucket {} does not exist at {}",
                    self.bucket, self.endpoint
                ));
            }
            return io::Error::new(io::ErrorKind::NotFound, format!("{what}: no such object"));
        }
        let s = error_chain(&e);
        let hint = if s.contains("NoSuchBucket") {
            format!(
                " (bucket {} does not exist at {})",
                self.bucket, self.endpoint
            )
        } else if [
            "error sending request",
            "connect",
            "timed out",
            "timeout",
            "closed",
            "reset",
            "broken pipe",
            "retries",
        ]
        .iter()
        .any(|w| s.to_ascii_lowercase().contains(w))
        {
            format!(
                " (is the object store at {} running and reachable?)",
                self.endpoint
            )
        } else if s.contains("InvalidAccessKeyId")
            || s.contains("SignatureDoesNotMatch")
            || s.contains("AccessDenied")
            || s.contains("403")
        {
            " (the credentials were refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                .to_string()
        } else {
            String::new()
        };
        io::Error::other(format!("{what} failed: {s}{hint}"))
    }
}

/// The error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        src = c.source();
    }
    s
}

impl S3Storage {
    /// The storage of `s3://bucket/prefix`. Fails when credentials are missing; does not
    /// contact the server (the first request does).
    pub fn new(bucket: &str, prefix: &str, o: &S3Options) -> io::Result<S3Storage> {
        let url = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let (Some(key), Some(secret)) = (&o.access_key_id, &o.secret_access_key) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                     (and AWS_ENDPOINT_URL for a server other than AWS)"
                ),
            ));
        };
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: o.retry_timeout,
        };
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(60))
            .with_allow_http(
                o.endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            );
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(&o.region)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_retry(retry)
            .with_client_options(client);
        if let Some(t) = &o.session_token {
            b = b.with_token(t);
        }
        let endpoint = match &o.endpoint {
            Some(e) => {
                b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                e.clone()
            }
            None => format!("https://s3.{}.amazonaws.com", o.region),
        };
        let store = b.build().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url}: cannot set up the S3 client: {e}"),
            )
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pmsnap-s3")
            .enable_all()
            .build()
            .map_err(|e| io::Error::other(format!("{url}: cannot start the S3 runtime: {e}")))?;
        Ok(S3Storage {
            store: Arc::new(store),
            rt,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint,
            in_flight: o.in_flight.max(1),
            queue: Mutex::new(Vec::new()),
        })
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn ctx(&self) -> ErrCtx {
        ErrCtx {
            url: self.url(),
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
        }
    }

    /// One ranged read, as a future the runtime can run anywhere.
    fn range_future(
        &self,
        ctx: &ErrCtx,
        key: &str,
        offset: u64,
        len: u64,
    ) -> impl std::future::Future<Output = io::Result<Vec<u8>>> + Send + 'static {
        let (store, ctx) = (self.store.clone(), ctx.clone());
        let path = self.path(key);
        let key = key.to_string();
        async move {
            let path = path?;
            let end = offset
                .checked_add(len)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
            if len == 0 {
                return Ok(Vec::new());
            }
            let range: Range<u64> = offset..end;
            match store.get_range(&path, range).await {
                Ok(b) if b.len() as u64 == len => Ok(Vec::from(b)),
                Ok(b) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "range {offset}+{len} past the end of {key} ({} bytes read)",
                        b.len()
                    ),
                )),
                // A range starting past the end: 416, or object_store's own check.
                Err(e) if matches!(e, object_store::Error::NotFound { .. }) => {
                    Err(ctx.map("get", &key, e))
                }
                Err(e) => {
                    let s = e.to_string();
                    if s.contains("416") || s.contains("Range") || s.contains("range") {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("range {offset}+{len} past the end of {key}: {s}"),
                        ))
                    } else {
                        Err(ctx.map("get", &key, e))
                    }
                }
            }
        }
    }

    fn path(&self, key: &str) -> io::Result<ObjPath> {
        check_key(key)?;
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjPath::parse(&full)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<io::Result<()>>>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for queued uploads until at most `keep` are in flight; the first error.
    fn drain(&self, keep: usize) -> io::Result<()> {
        let mut first_err = None;
        loop {
            let h = {
                let mut q = self.queue();
                if q.len() <= keep {
                    break;
                }
                q.remove(0)
            };
            let r = self
                .rt
                .block_on(h)
                .unwrap_or_else(|e| Err(io::Error::other(format!("upload task failed: {e}"))));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for S3Storage {
    fn drop(&mut self) {
        let _ = self.drain(0);
    }
}

async fn put_one(
    store: Arc<AmazonS3>,
    ctx: ErrCtx,
    path: ObjPath,
    key: String,
    data: bytes::Bytes,
) -> io::Result<()> {
    store
        .put(&path, PutPayload::from_bytes(data))
        .await
        .map(|_| ())
        .map_err(|e| ctx.map("put", &key, e))
}

impl Storage for S3Storage {
    fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        let data = bytes::Bytes::copy_from_slice(data);
        self.rt.block_on(put_one(
            self.store.clone(),
            self.ctx(),
            path,
            key.into(),
            data,
        ))
    }

    fn put_queued(&self, objects: Vec<(String, Vec<u8>)>) -> io::Result<()> {
        let mut items = Vec::with_capacity(objects.len());
        for (k, d) in objects {
            items.push((self.path(&k)?, k, bytes::Bytes::from(d)));
        }
        // Room for one more first; an earlier upload's failure is reported now.
        self.drain(self.in_flight - 1)?;
        let (store, ctx) = (self.store.clone(), self.ctx());
        let h = self.rt.spawn(async move {
            // In order: a pack is stored before its index.
            for (path, key, data) in items {
                put_one(store.clone(), ctx.clone(), path, key, data).await?;
            }
            Ok(())
        });
        self.queue().push(h);
        Ok(())
    }

    fn wait_queued(&self) -> io::Result<()> {
        self.drain(0)
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        let path = self.path(key)?;
        let ctx = self.ctx();
        self.rt.block_on(async {
            let r = self
                .store
                .get(&path)
                .await
                .map_err(|e| ctx.map("get", key, e))?;
            r.bytes()
                .await
                .map(Vec::from)
                .map_err(|e| ctx.map("get", key, e))
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        // On the runtime's workers, which drive the connection, rather than on the calling
        // thread: the body then comes in without a switch between threads for each piece
        // of it, which matters when several threads each wait for a range at once
        // (`Repo::read_page_list`).
        let fut = self.range_future(&self.ctx(), key, offset, len);
        self.rt
            .block_on(self.rt.spawn(fut))
            .unwrap_or_else(|e| Err(io::Error::other(format!("ranged get of {key}: {e}"))))
    }

    fn get_ranges(&self, reqs: &[(String, u64, u64)]) -> Vec<io::Result<Vec<u8>>> {
        let ctx = self.ctx();
        let futs = reqs
            .iter()
            .map(|(key, offset, len)| self.range_future(&ctx, key, *offset, *len));
        self.rt.block_on(
            futures::stream::iter(futs)
                .buffered(self.in_flight)
                .collect::<Vec<_>>(),
        )
    }

    fn get_many(&self, keys: &[String]) -> Vec<io::Result<Vec<u8>>> {
        let ctx = self.ctx();
        let futs = keys.iter().map(|key| {
            let (store, ctx) = (self.store.clone(), ctx.clone());
            let path = self.path(key);
            let key = key.clone();
            async move {
                let path = path?;
                let r = store
                    .get(&path)
                    .await
                    .map_err(|e| ctx.map("get", &key, e))?;
                r.bytes()
                    .await
                    .map(Vec::from)
                    .map_err(|e| ctx.map("get", &key, e))
            }
        });
        self.rt.block_on(
            futures::stream::iter(futs)
                .buffered(self.in_flight)
                .collect::<Vec<_>>(),
        )
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        // Directory-like part and start of a name, as DirStorage.
        let dir = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let base = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, _) => dir.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{dir}", self.prefix),
        };
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let ctx = self.ctx();
        let listed: Vec<object_store::ObjectMeta> = self.rt.block_on(async {
            let p = if base.is_empty() {
                None
            } else {
                Some(
                    ObjPath::parse(&base)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
                )
            };
            self.store
                .list(p.as_ref())
                .try_collect()
                .await
                .map_err(|e| ctx.map("list", prefix, e))
        })?;
        let mut out: Vec<ObjectInfo> = listed
            .into_iter()
            .filter_map(|m| {
                let key = m
                    .location
                    .as_ref()
                    .strip_prefix(strip.as_str())?
                    .to_string();
                key.starts_with(prefix).then(|| ObjectInfo {
                    key,
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key)?;
        let ctx = self.ctx();
        self.rt.block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(ctx.map("delete", key, e)),
            }
        })
    }

    fn exists(&self, key: &str) -> io::Result<bool> {
        let path = self.path(key)?;
        let ctx = self.ctx();
        self.rt.block_on(async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(ctx.map("head", key, e)),
            }
        })
    }

    fn describe(&self) -> String {
        self.url()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_arguments_parse() {
        assert_eq!(
            RepoLocation::parse("/var/repo").unwrap(),
            RepoLocation::Dir("/var/repo".into())
        );
        assert_eq!(
            RepoLocation::parse("s3://pmsnap/a/b/").unwrap(),
            RepoLocation::S3 {
                bucket: "pmsnap".into(),
                prefix: "a/b".into()
            }
        );
        let l = RepoLocation::parse("s3://pmsnap").unwrap();
        assert_eq!(l.to_string(), "s3://pmsnap");
        assert!(l.is_s3());
        for bad in [
            "s3://Bad_Bucket/x",
            "s3://ab",
            "s3://pmsnap/../x",
            "http://x/y",
        ] {
            let e = RepoLocation::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn missing_credentials_are_named() {
        let o = S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            retry_timeout: Duration::from_secs(1),
            in_flight: 4,
        };
        let e = S3Storage::new("pmsnap", "x", &o).unwrap_err();
        assert!(
            e.to_string().contains("s3://pmsnap/x: no S3 credentials"),
            "{e}"
        );
    }
}
