//! Object storage: the `Store` trait, its contract, and the backends (S3, local directory) plus
//! wrappers (retry). Knows nothing of WAL, PostgreSQL or the object format.
//!
//! # Contract every backend keeps (checked by `conformance` against each backend)
//! - `put_if_absent` is atomic: readers see either no object or the whole object, never a part.
//!   It never replaces an existing object; when one exists it returns `PutOutcome::AlreadyExists`.
//!   It returns only once the object is durable (S3: the PUT was acknowledged; directory: file and
//!   directory fsynced).
//! - `get`/`get_prefix` of a missing key fail with `StorageError::NotFound`, and only then: a missing
//!   bucket is `NoBucket`, bad credentials `Denied`, anything that may succeed on retry `Transient`
//!   (`Credentials` when it is a credential provider that failed).
//!   `get` of a key whose current version is a delete marker is `Deleted`, where the backend can
//!   tell (S3 with versioning).
//! - `list` returns every object under a prefix, sorted by key; `list_after` those after a key;
//!   `list_dirs` the directories under a prefix that hold at least one object.

pub mod fs;
pub mod retry;
pub mod s3;

#[doc(hidden)]
pub mod conformance;

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;

/// How long `bytes` take to upload over a slow or shared link (256 KiB/s, 4 s per MiB): the
/// least time an upload of that size is given before it counts as stalled.
pub fn slow_link_time(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(4 * bytes.div_ceil(1 << 20))
}

/// A key inside the repository: relative, `/`-separated, no empty, `.` or `..` components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn new(key: impl Into<String>) -> Result<Self, StorageError> {
        let key = key.into();
        let ok = !key.is_empty()
            && key
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with(".tmp"))
            && !key.contains('\\')
            && !key.contains('\0');
        if ok {
            Ok(Self(key))
        } else {
            Err(StorageError::InvalidKey(key))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was stored. `version_id` is set by versioned buckets.
    Created { version_id: Option<String> },
    /// An object already exists under the key; nothing was written.
    AlreadyExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: ObjectKey,
    pub size: u64,
    /// When the object was stored, in Unix seconds by the storage's clock (S3 `LastModified`, a
    /// file's mtime), when the backend says.
    pub stored_at: Option<i64>,
}

/// What `Store::probe` learned about the storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreInfo {
    /// `Some(Ok(true))` when object versioning is enabled, `Some(Err(why))` when the storage would
    /// not say, `None` when the backend has no such notion.
    pub versioning: Option<Result<bool, String>>,
    /// `Some(Ok(true))` when object lock is on, `Some(Err(why))` when the storage would not say,
    /// `None` when the backend has no such notion.
    pub object_lock: Option<Result<bool, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {0} does not exist")]
    NotFound(String),
    /// The object was there: its current version is a delete marker (versioned buckets), and
    /// its earlier versions are still stored. Never "not in the archive".
    #[error("object {0} was deleted: its current version is a delete marker and its earlier versions are still in the bucket; find out who deleted it, and restore it by deleting that marker (`aws s3api list-object-versions --prefix <key>` shows its version id)")]
    Deleted(String),
    #[error("{0}")]
    NoBucket(String),
    /// The message says what to check: credentials and bucket policy for S3, owner and mode for files.
    #[error("access denied: {0}")]
    Denied(String),
    #[error("storage unavailable: {0}; check the network, the endpoint and the storage server (walship retried with back-off before giving up)")]
    Transient(String),
    /// A credential provider (STS, the instance metadata service) failed in a way that may
    /// pass: retried like `Transient`, but the message is about credentials, not the network.
    #[error("{0} (walship retried with back-off before giving up)")]
    Credentials(String),
    #[error("invalid object key '{0}'")]
    InvalidKey(String),
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("storage error: {0}")]
    Other(String),
}

impl StorageError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Transient(_) | StorageError::Credentials(_)
        )
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Store `body` under `key` unless an object is there already. See the module contract.
    async fn put_if_absent(&self, key: &ObjectKey, body: Bytes)
        -> Result<PutOutcome, StorageError>;
    /// The whole object.
    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError>;
    /// The first `len` bytes of the object (fewer if it is shorter).
    async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError>;
    /// Make sure an object found under `key` (not put by this call: another writer's, or one a
    /// killed put left) is durable before the caller reports it safe. Nothing to do where every
    /// visible object is durable (S3); a directory fsyncs the file and its directory.
    async fn make_durable(&self, key: &ObjectKey) -> Result<(), StorageError>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.list_after(prefix, "").await
    }
    /// The objects of `list(prefix)` whose keys sort after `after` (all of them when it is
    /// empty): a key, or a directory's prefix with its `/` (SeaweedFS skips the directory when
    /// given its name without). What sorts before costs no requests: S3 starts the listing there.
    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectInfo>, StorageError>;
    /// The "directories" right under `prefix` (which ends with `/`), sorted: each distinct
    /// `prefix + name + "/"` that at least one key starts with. One entry per directory, however
    /// many objects it holds (S3: a listing with delimiter `/`).
    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError>;
    /// Remove an object (missing is not an error). Retention and tests only.
    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError>;
    /// Check that the storage is reachable and usable, and what it offers.
    async fn probe(&self) -> Result<StoreInfo, StorageError>;
    /// Where this store points, for messages.
    fn describe(&self) -> String;
}

pub type DynStore = std::sync::Arc<dyn Store>;

#[cfg(test)]
pub mod testing {
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    use super::*;
    use crate::storage::fs::FsStore;

    /// A directory store with faults on purpose: the first `fail` puts and gets fail (with a
    /// transient error or a denial), and the first `damaged` downloads of objects under `prefix`
    /// come back with one bit flipped in their last bytes (the payload's last chunk), as over a
    /// faulty link.
    pub struct Faulty {
        inner: FsStore,
        fail: u32,
        transient: bool,
        /// Puts and gets so far, failed ones included.
        pub calls: AtomicU32,
        prefix: &'static str,
        damaged: usize,
        /// Delete each object once a damaged copy of it is handed out.
        then_gone: bool,
        /// Replace on put, as a server that ignores `If-None-Match`.
        replaces: bool,
        /// Puts of keys ending so never finish, as over a stalled connection.
        hangs: Option<&'static str>,
        downloads: AtomicUsize,
        /// `make_durable` calls so far.
        pub made_durable: AtomicU32,
    }

    impl Faulty {
        /// Its first `fail` puts and gets fail: transient errors, or denials.
        pub fn failing(dir: &std::path::Path, fail: u32, transient: bool) -> Self {
            Self {
                inner: FsStore::new(dir),
                fail,
                transient,
                calls: AtomicU32::new(0),
                prefix: "",
                damaged: 0,
                then_gone: false,
                replaces: false,
                hangs: None,
                downloads: AtomicUsize::new(0),
                made_durable: AtomicU32::new(0),
            }
        }

        /// Its first `damaged` downloads under `prefix` arrive damaged.
        pub fn damaging(dir: &std::path::Path, prefix: &'static str, damaged: usize) -> Self {
            Self {
                prefix,
                damaged,
                ..Self::failing(dir, 0, false)
            }
        }

        /// Its first download under `prefix` arrives damaged, and the object is then deleted (a
        /// retention run between two downloads).
        pub fn damaging_then_gone(dir: &std::path::Path, prefix: &'static str) -> Self {
            Self {
                then_gone: true,
                ..Self::damaging(dir, prefix, 1)
            }
        }

        /// Puts replace what is there, as on a server that ignores conditional puts.
        pub fn replacing(dir: &std::path::Path) -> Self {
            Self {
                replaces: true,
                ..Self::failing(dir, 0, false)
            }
        }

        /// Puts of keys ending with `suffix` never finish.
        pub fn hanging(dir: &std::path::Path, suffix: &'static str) -> Self {
            Self {
                hangs: Some(suffix),
                ..Self::failing(dir, 0, false)
            }
        }

        /// Downloads of objects under the prefix so far.
        pub fn downloads(&self) -> usize {
            self.downloads.load(Ordering::SeqCst)
        }

        fn gate(&self) -> Result<(), StorageError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail {
                if self.transient {
                    return Err(StorageError::Transient("connection reset".into()));
                }
                return Err(StorageError::Denied("nope".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for Faulty {
        async fn put_if_absent(
            &self,
            key: &ObjectKey,
            body: Bytes,
        ) -> Result<PutOutcome, StorageError> {
            self.gate()?;
            if self.hangs.is_some_and(|end| key.as_str().ends_with(end)) {
                std::future::pending::<()>().await;
            }
            if self.replaces {
                self.inner.delete(key).await?;
            }
            self.inner.put_if_absent(key, body).await
        }
        async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
            self.gate()?;
            let body = self.inner.get(key).await?;
            if self.damaged == 0
                || !key.as_str().starts_with(self.prefix)
                || self.downloads.fetch_add(1, Ordering::SeqCst) >= self.damaged
            {
                return Ok(body);
            }
            // Always the same place, in the payload's last chunk.
            let mut bad = body.to_vec();
            let at = bad.len() - 5;
            bad[at] ^= 0x10;
            if self.then_gone {
                self.inner.delete(key).await?;
            }
            Ok(bad.into())
        }
        async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError> {
            self.gate()?;
            self.inner.get_prefix(key, len).await
        }
        async fn make_durable(&self, key: &ObjectKey) -> Result<(), StorageError> {
            self.made_durable.fetch_add(1, Ordering::SeqCst);
            self.inner.make_durable(key).await
        }
        async fn list_after(
            &self,
            prefix: &str,
            after: &str,
        ) -> Result<Vec<ObjectInfo>, StorageError> {
            self.inner.list_after(prefix, after).await
        }
        async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            self.inner.list_dirs(prefix).await
        }
        async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }
        async fn probe(&self) -> Result<StoreInfo, StorageError> {
            self.inner.probe().await
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_are_relative_and_clean() {
        assert!(ObjectKey::new("wal/0000000100000000/000000010000000000000001").is_ok());
        for bad in [
            "", "/abs", "a//b", "a/../b", "./a", "a/", "a\\b", "a/.tmp-x",
        ] {
            assert!(ObjectKey::new(bad).is_err(), "{bad}");
        }
    }
}
