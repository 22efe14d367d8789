//! The repository as the commands see it: a store plus the repository format and the codec. Opens
//! the configured backend, keeps `walship.json` consistent, and stores or fetches coded objects
//! with the no-overwrite and verify-before-use rules.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::codec::{self, CodecError, Encoded, Header, Identities, Recipients};
use crate::config::{Config, RepoLocation};
use crate::repo::{self, RepoMeta};
use crate::storage::fs::{sync_dir, FsStore};
use crate::storage::retry::{Deadline, RetryPolicy, Retrying};
use crate::storage::s3::S3Store;
use crate::storage::{DynStore, ObjectKey, PutOutcome, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{key}: {source}")]
    Codec { key: String, source: CodecError },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    ForeignRepo(String),
    #[error("{what} {path}: {err}{}", crate::io_hint::suffix(.err))]
    Local {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
}

/// An error that may carry a failure to decode an object, for
/// [`Archive::verified_or_refetched`].
pub trait CodecFailure {
    fn codec_failure(&self) -> Option<&CodecError>;
}

impl CodecFailure for ArchiveError {
    fn codec_failure(&self) -> Option<&CodecError> {
        match self {
            ArchiveError::Codec { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl ArchiveError {
    pub fn local(what: &'static str, path: &Path, err: std::io::Error) -> Self {
        ArchiveError::Local {
            what,
            path: path.to_path_buf(),
            err,
        }
    }
}

/// What storing an object did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Created {
        version_id: Option<String>,
        stored_bytes: u64,
    },
    /// The same content (same sha256 and size) was already archived under the key.
    AlreadyThere,
}

#[derive(Clone)]
pub struct Archive {
    store: DynStore,
}

impl Archive {
    pub fn new(store: DynStore) -> Self {
        Self { store }
    }

    /// Open the configured backend, wrapped in the retry policy for transient failures.
    pub async fn open(cfg: &Config, attempts: u32) -> Result<Self, ArchiveError> {
        Self::open_until(cfg, attempts, None).await
    }

    /// `open`, with a deadline past which no storage operation is waited for.
    pub async fn open_until(
        cfg: &Config,
        attempts: u32,
        deadline: Option<Deadline>,
    ) -> Result<Self, ArchiveError> {
        let policy = RetryPolicy {
            attempts,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            deadline,
        };
        let store: DynStore = match (&cfg.repo, &cfg.s3) {
            (RepoLocation::Dir(dir), _) => Arc::new(Retrying::new(FsStore::new(dir), policy)),
            (RepoLocation::S3 { .. }, Some(s3)) => {
                Arc::new(Retrying::new(S3Store::connect(s3).await?, policy))
            }
            (RepoLocation::S3 { .. }, None) => {
                unreachable!("config resolves S3 settings for s3:// URLs")
            }
        };
        Ok(Self { store })
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub async fn read_meta(&self) -> Result<Option<RepoMeta>, ArchiveError> {
        match self.store.get(&repo::meta_key()).await {
            Ok(b) => RepoMeta::from_json(&b).map(Some).map_err(|e| {
                ArchiveError::ForeignRepo(format!(
                    "{}/walship.json is unreadable: {e}",
                    self.store.describe()
                ))
            }),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Write `walship.json` if the repository has none, else return the one that is there.
    pub async fn ensure_meta(&self, wanted: &RepoMeta) -> Result<RepoMeta, ArchiveError> {
        if let Some(m) = self.read_meta().await? {
            return Ok(m);
        }
        match self
            .store
            .put_if_absent(&repo::meta_key(), Bytes::from(wanted.to_json()))
            .await?
        {
            PutOutcome::Created { .. } => Ok(wanted.clone()),
            // Another host initialised it between our read and write: use theirs.
            PutOutcome::AlreadyExists => self.read_meta().await?.ok_or_else(|| {
                ArchiveError::ForeignRepo("walship.json vanished while being created".into())
            }),
        }
    }

    /// The header of an archived object, read with one small ranged GET.
    pub async fn header(&self, key: &ObjectKey) -> Result<Header, ArchiveError> {
        let b = self.store.get_prefix(key, codec::HEADER_LEN as u64).await?;
        Header::parse(&b).map_err(|source| ArchiveError::Codec {
            key: key.to_string(),
            source,
        })
    }

    /// Store an encoded object under `key` unless it is there. The same content there already is
    /// success (`AlreadyThere`); other content is a `Conflict`, and nothing is overwritten.
    ///
    /// The no-overwrite rests on the storage honouring a conditional put; S3-compatible servers
    /// that ignore `If-None-Match` replace instead. For names that may be pushed again
    /// ([`Archive::put_unless_archived`]), the object's header is read first.
    pub async fn put(&self, key: &ObjectKey, enc: Encoded) -> Result<Stored, ArchiveError> {
        let stored_bytes = enc.bytes.len() as u64;
        let ours = enc.header;
        match self
            .store
            .put_if_absent(key, Bytes::from(enc.bytes))
            .await?
        {
            PutOutcome::Created { version_id } => Ok(Stored::Created {
                version_id,
                stored_bytes,
            }),
            PutOutcome::AlreadyExists => self.same_as_archived(key, &ours, self.header(key).await?),
        }
    }

    /// `put` after one small ranged GET of `key`'s header: what is archived there already decides
    /// without an upload, and nothing is replaced on storage that ignores conditional puts (a
    /// WAL segment, a timeline history, pushed again after a crash or by a second server).
    pub async fn put_unless_archived(
        &self,
        key: &ObjectKey,
        enc: Encoded,
    ) -> Result<Stored, ArchiveError> {
        match self.header(key).await {
            Ok(theirs) => {
                let same = self.same_as_archived(key, &enc.header, theirs)?;
                // A put killed between its link and its directory fsync left it visible only.
                self.store.make_durable(key).await?;
                Ok(same)
            }
            Err(ArchiveError::Storage(StorageError::NotFound(_))) => self.put(key, enc).await,
            Err(e) => Err(e),
        }
    }

    fn same_as_archived(
        &self,
        key: &ObjectKey,
        ours: &Header,
        theirs: Header,
    ) -> Result<Stored, ArchiveError> {
        if theirs == *ours {
            return Ok(Stored::AlreadyThere);
        }
        Err(ArchiveError::Conflict(format!(
            "{} already holds {key} with different content (archived sha256 {}, {} bytes; local sha256 {}, {} bytes); \
             refusing to overwrite. Another cluster may be archiving into this repository, or this file was changed after archiving",
            self.store.describe(),
            theirs.sha256_hex(),
            theirs.plain_size,
            ours.sha256_hex(),
            ours.plain_size
        )))
    }

    /// Encode a small in-memory object (a manifest, a record) off the executor and `put` it.
    pub async fn put_plain(
        &self,
        key: &ObjectKey,
        plain: Vec<u8>,
        recipients: &Arc<Recipients>,
        level: i32,
    ) -> Result<Stored, ArchiveError> {
        let recipients = recipients.clone();
        let enc =
            tokio::task::spawn_blocking(move || codec::encode(&plain[..], &recipients, level))
                .await
                .expect("encode task does not panic")
                .map_err(|source| ArchiveError::Codec {
                    key: key.to_string(),
                    source,
                })?;
        self.put(key, enc).await
    }

    /// Download a small object and decode it into memory, verified (AEAD, size, sha256).
    pub async fn get_plain(
        &self,
        key: &ObjectKey,
        ids: &Arc<Identities>,
    ) -> Result<Vec<u8>, ArchiveError> {
        let object = self.store.get(key).await?;
        let (ids, key_s) = (ids.clone(), key.to_string());
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            codec::decode(&object, &ids, &mut out)
                .map(|_| out)
                .map_err(|source| ArchiveError::Codec { key: key_s, source })
        })
        .await
        .expect("decode task does not panic")
    }

    /// Run `verify` (decode and check, writing nothing where it is read before the object passes)
    /// on `object`, a download of `key`. When that fails on damage a transfer might have done,
    /// download `key` once more and run it again: a stop of recovery or a failed restore over bits
    /// flipped on the way (plain http, a faulty proxy) costs an operator's restart, and a truly
    /// corrupt object fails again at once. A key gone by then is damage too, never "not in the
    /// archive" (exit 1 would end recovery there). A warning only when the second try passes.
    pub async fn verified_or_refetched<T, E, Fut>(
        &self,
        key: &ObjectKey,
        object: Bytes,
        mut verify: impl FnMut(Bytes) -> Fut,
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: From<ArchiveError> + CodecFailure,
    {
        let why = match verify(object).await {
            Ok(t) => return Ok(t),
            Err(e) => match e.codec_failure() {
                Some(c) if c.may_be_transfer_damage() => c.to_string(),
                _ => return Err(e),
            },
        };
        tracing::info!("{key} failed verification ({why}); downloading it once more");
        let again = self.download(key).await.map_err(|e| match e {
            ArchiveError::Storage(StorageError::NotFound(_)) => ArchiveError::Codec {
                key: key.to_string(),
                source: CodecError::Corrupt(format!(
                    "failed verification ({why}), and was gone when downloaded again"
                )),
            },
            e => e,
        })?;
        let t = verify(again).await?;
        tracing::warn!(
            "{key} failed verification on its first download ({why}) and passed on the second: \
             something between this host and the repository damages data"
        );
        Ok(t)
    }

    /// The object as stored (still encoded), for `place`.
    pub async fn download(&self, key: &ObjectKey) -> Result<Bytes, ArchiveError> {
        self.store.get(key).await.map_err(ArchiveError::Storage)
    }
}

/// Verify and decode `object` (a download of `key`) into a new file at `dest` atomically: a temp
/// file in the same directory, renamed over `dest` once complete. With `Durability::Fsync` the
/// file is fsynced before the rename and the directory after it. `check` vets the complete decoded
/// file (at its temp path) before the rename. On any error, `check`'s included, nothing appears at
/// `dest`. `hold` is dropped when the decode ends: a caller cancelled meanwhile (its future
/// dropped) can tell by it when the decode, which goes on, has stopped writing.
pub async fn place<E>(
    object: Bytes,
    key: &ObjectKey,
    ids: &Arc<Identities>,
    dest: &Path,
    durability: Durability,
    hold: impl Send + 'static,
    check: impl FnOnce(&Path) -> Result<(), E> + Send + 'static,
) -> Result<Header, E>
where
    E: From<ArchiveError> + Send + 'static,
{
    let ids = ids.clone();
    let dest = dest.to_path_buf();
    let key_s = key.to_string();
    tokio::task::spawn_blocking(move || {
        let _hold = hold;
        decode_to_file(&object, &ids, &dest, &key_s, durability, check)
    })
    .await
    .expect("decode task does not panic")
}

/// Whether a placed file must survive a machine crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file before the rename and the directory after it.
    Fsync,
    /// Complete and renamed, but possibly only in the page cache: for callers that discard such
    /// files after a reboot (the prefetch spool).
    UntilReboot,
}

/// Temp files are `.<name>.walship-tmp.<pid of the writer>`.
const TEMP_INFIX: &str = ".walship-tmp.";

/// Remove the temp files of `decode_to_file` calls that were killed before they could clean up:
/// a recovering server stopped with `pg_ctl stop` sends SIGTERM to its `restore_command`, and
/// each such call would otherwise leave up to a segment's worth of bytes in `pg_wal`, under a
/// name nothing else ever removes. A temp file is stale when the process that named it no longer
/// exists (`dir` is local: pg_wal, the spool); a reused pid only delays the removal. Returns how
/// many were removed.
pub fn sweep_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let n = e.file_name();
        let Some(pid) = n
            .to_str()
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.rsplit_once(TEMP_INFIX))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if crate::storage::fs::process_gone(pid) && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The temp file this process writes `dest` through: in the same directory, so the rename is
/// atomic, and named so that `sweep_stale_temps` removes it once this process is gone.
pub fn temp_beside(dest: &Path) -> PathBuf {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}{TEMP_INFIX}{}", std::process::id()))
}

/// Write-then-rename, so `dest` is either absent (on error) or complete, verified, and passed by
/// `check` (given the temp file, complete, before the rename).
pub fn decode_to_file<E: From<ArchiveError>>(
    object: &[u8],
    ids: &Identities,
    dest: &Path,
    key: &str,
    durability: Durability,
    check: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<Header, E> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = temp_beside(dest);
    let result = (|| -> Result<Header, E> {
        let mut f =
            File::create(&tmp).map_err(|e| ArchiveError::local("cannot create", &tmp, e))?;
        let header = {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
            let h = codec::decode(object, ids, &mut w).map_err(|source| match source {
                CodecError::Io(err) => ArchiveError::local("cannot write", &tmp, err),
                source => ArchiveError::Codec {
                    key: key.to_string(),
                    source,
                },
            })?;
            w.flush()
                .map_err(|e| ArchiveError::local("cannot write", &tmp, e))?;
            h
        };
        check(&tmp)?;
        let durable = durability == Durability::Fsync;
        if durable {
            f.sync_all()
                .map_err(|e| ArchiveError::local("cannot fsync", &tmp, e))?;
        }
        drop(f);
        std::fs::rename(&tmp, dest)
            .map_err(|e| ArchiveError::local("cannot rename into place", dest, e))?;
        if durable {
            sync_dir(&dir).map_err(|e| ArchiveError::local("cannot fsync directory", &dir, e))?;
        }
        Ok(header)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[tokio::test]
    async fn what_is_archived_is_never_replaced_even_where_conditional_puts_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::storage::testing::Faulty::replacing(dir.path()));
        let archive = Archive::new(store.clone());
        let (text, _) = codec::generate_identity();
        let recipients = Identities::parse(&text, "test").unwrap().recipients();
        let enc = |b: &'static [u8]| codec::encode(b, &recipients, 1).unwrap();
        let key = ObjectKey::new("wal/0000000100000000/000000010000000000000001").unwrap();
        let first = enc(b"first");
        let archived = first.header;
        assert!(matches!(
            archive.put_unless_archived(&key, first).await.unwrap(),
            Stored::Created { .. }
        ));
        assert_eq!(
            archive
                .put_unless_archived(&key, enc(b"first"))
                .await
                .unwrap(),
            Stored::AlreadyThere
        );
        // Found by its header, and made durable before it is called safe: a put killed between
        // its link and its directory fsync leaves an object that is visible only.
        assert_eq!(store.made_durable.load(Ordering::SeqCst), 1);
        let err = archive
            .put_unless_archived(&key, enc(b"other"))
            .await
            .unwrap_err();
        assert!(matches!(err, ArchiveError::Conflict(_)), "{err}");
        assert_eq!(archive.header(&key).await.unwrap(), archived, "untouched");
        // A plain put trusts the storage, which replaces here.
        archive.put(&key, enc(b"other")).await.unwrap();
        assert_ne!(archive.header(&key).await.unwrap(), archived);
    }

    #[test]
    fn only_temp_files_of_processes_that_are_gone_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let names = [
            format!(".RECOVERYXLOG.walship-tmp.{dead}"),
            format!(".RECOVERYXLOG.walship-tmp.{me}"),
            ".000000010000000000000003.walship-tmp.1".to_string(), // init: alive
            ".RECOVERYXLOG.walship-tmp.notapid".to_string(),
            "000000010000000000000003".to_string(),
            format!("RECOVERYXLOG.walship-tmp.{dead}"), // not ours: ours start with a dot
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        assert_eq!(sweep_stale_temps(dir.path()), 1);
        for n in &names[1..] {
            assert!(dir.path().join(n).exists(), "{n} kept");
        }
        assert!(!dir.path().join(&names[0]).exists());
        assert_eq!(sweep_stale_temps(&dir.path().join("missing")), 0);
    }
}
