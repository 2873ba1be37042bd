//! The repository itself: [`Repo`], opening or creating it (its `config`), and the
//! storage helpers the other modules share. Exporting is in `export`, reading in `read`,
//! listing, verifying, removing and gc in `manage`; the value types in `meta`.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cache::PackCache;
use crate::error::{storage_err, RepoError, Result};
use crate::format::{parse_hex, Hash32};
use crate::read::LoadedIndex;
use crate::storage::Storage;
use crate::PAGE_SIZE;

/// Pack size an export aims for (a pack is closed before it would exceed this).
pub const DEFAULT_PACK_SIZE: usize = 16 << 20;
/// The longest state blob a snapshot may have (a VM's device and vCPU state is far
/// smaller); bounds what reading a hostile manifest allocates.
pub const MAX_STATE_LEN: u64 = 1 << 30;
/// The repository format version this build writes and reads.
pub const REPO_VERSION: u32 = 1;

const CONFIG_KEY: &str = "config";
const FORMAT_NAME: &str = "pmsnap-repo";

#[derive(Debug, Serialize, Deserialize)]
struct Config {
    format: String,
    version: u32,
    chunk_size: u32,
    created_unix_ms: u64,
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A snapshot repository on some [`Storage`].
pub struct Repo {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) pack_size: usize,
    pub(crate) indexes: Mutex<HashMap<Hash32, Arc<LoadedIndex>>>,
    pub(crate) cache: Option<Arc<PackCache>>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("storage", &self.storage)
            .field("pack_size", &self.pack_size)
            .finish_non_exhaustive()
    }
}

impl Repo {
    /// Open the repository on `storage`, creating it (its `config`) if the storage holds
    /// none.
    pub fn open_or_init(storage: impl Storage + 'static) -> Result<Repo> {
        let storage: Arc<dyn Storage> = Arc::new(storage);
        match storage.get(CONFIG_KEY) {
            Ok(data) => {
                let c: Config = serde_json::from_slice(&data)
                    .map_err(|e| RepoError::NotARepo(format!("config does not parse: {e}")))?;
                if c.format != FORMAT_NAME {
                    return Err(RepoError::NotARepo(format!(
                        "config says format {:?}",
                        c.format
                    )));
                }
                if c.version > REPO_VERSION {
                    return Err(RepoError::NewerVersion {
                        found: c.version,
                        supported: REPO_VERSION,
                    });
                }
                if c.chunk_size != PAGE_SIZE as u32 {
                    return Err(RepoError::NotARepo(format!(
                        "chunk size {} unsupported",
                        c.chunk_size
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let c = Config {
                    format: FORMAT_NAME.into(),
                    version: REPO_VERSION,
                    chunk_size: PAGE_SIZE as u32,
                    created_unix_ms: unix_ms(SystemTime::now()),
                };
                let data = serde_json::to_vec_pretty(&c)
                    .map_err(|e| storage_err("put", CONFIG_KEY)(io::Error::other(e)))?;
                storage
                    .put(CONFIG_KEY, &data)
                    .map_err(storage_err("put", CONFIG_KEY))?;
            }
            Err(e) => return Err(storage_err("get", CONFIG_KEY)(e)),
        }
        Ok(Repo {
            storage,
            pack_size: DEFAULT_PACK_SIZE,
            indexes: Mutex::new(HashMap::new()),
            cache: None,
        })
    }

    /// Use packs of about `bytes` (at least one chunk each) for later exports.
    pub fn with_pack_size(mut self, bytes: usize) -> Repo {
        self.pack_size = bytes.clamp(PAGE_SIZE + 64, 1 << 30);
        self
    }

    /// Read packs through `cache`: a chunk is read from its cached block, and a missing
    /// block ([`crate::CACHE_BLOCK`] bytes of the pack) is fetched whole with one ranged
    /// read and kept. For a remote repository; a directory needs none.
    pub fn with_cache(mut self, cache: Arc<PackCache>) -> Repo {
        self.cache = Some(cache);
        self
    }

    /// The pack cache, if any.
    pub fn pack_cache(&self) -> Option<&Arc<PackCache>> {
        self.cache.as_ref()
    }

    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    pub(crate) fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.storage.put(key, data).map_err(storage_err("put", key))
    }

    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<crate::storage::ObjectInfo>> {
        self.storage
            .list(prefix)
            .map_err(storage_err("list", prefix))
    }

    pub(crate) fn list_ids(
        &self,
        prefix: &str,
    ) -> Result<HashMap<Hash32, crate::storage::ObjectInfo>> {
        Ok(self
            .list(prefix)?
            .into_iter()
            .filter_map(|o| Some((parse_hex(o.key.strip_prefix(prefix)?)?, o)))
            .collect())
    }
}

// A fault handler and a background filler read one Repo at once.
const _: () = {
    fn send_sync<T: Send + Sync>() {}
    fn check() {
        send_sync::<Repo>();
    }
    let _ = check;
};
