//! Base backups: `push` (take one from a running server), `fetch` (restore one into a directory)
//! and reading their manifests. See `repo::backup` for the objects and the manifest.

pub mod fetch;
pub mod owner;
pub mod pool;
pub mod progress;
pub mod push;
pub mod walk;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::archive::{Archive, ArchiveError};
use crate::codec::Identities;
use crate::config::ConfigError;
use crate::pg::conn::PgError;
use crate::repo::backup::{self as layout, BackupManifest, BackupSummary, MANIFEST_FORMAT};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} {}: {err}{}", path.display(), crate::io_hint::suffix(.err))]
    Local {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{0}")]
    ForeignCluster(String),
    #[error("{0}")]
    WalNotArchived(String),
    /// On a standby, the WAL from the backup's start to its stop would cross a timeline switch.
    #[error("{0}")]
    TimelineSwitched(String),
    #[error("no backup {0} in the repository; `walship backup-list` shows the backups there are")]
    NoSuchBackup(String),
    /// LATEST asked of a repository with no complete backup.
    #[error("{0} has no complete backup yet, so there is no LATEST: take one with `walship backup-push`")]
    NoBackups(String),
    #[error("backup {id} is unusable: {why}")]
    BadManifest { id: String, why: String },
    #[error("{0}")]
    TargetNotEmpty(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoBackupForTarget(String),
    #[error(
        "timeline history {name} in the repository cannot be read ({why}), so the restore cannot \
         tell which timeline the WAL goes on along; pass --target-timeline (current for the \
         backup's own, or a number) to choose it yourself"
    )]
    BadHistory { name: String, why: String },
    /// Archived WAL after a missing segment: recovery would stop at the gap.
    #[error("{0}")]
    Gap(String),
}

impl crate::archive::CodecFailure for BackupError {
    fn codec_failure(&self) -> Option<&crate::codec::CodecError> {
        match self {
            BackupError::Archive(a) => a.codec_failure(),
            _ => None,
        }
    }
}

impl BackupError {
    pub fn local(what: &'static str, path: &Path, err: std::io::Error) -> Self {
        BackupError::Local {
            what,
            path: path.to_path_buf(),
            err,
        }
    }
}

/// Read and decrypt the manifest of backup `id`.
pub async fn read_manifest(
    archive: &Archive,
    ids: &Arc<Identities>,
    id: &str,
) -> Result<BackupManifest, BackupError> {
    if !layout::valid_id(id) {
        return Err(BackupError::NoSuchBackup(id.to_string()));
    }
    let plain = match archive.get_plain(&layout::manifest_key(id), ids).await {
        Ok(p) => p,
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => {
            return Err(BackupError::NoSuchBackup(id.to_string()))
        }
        Err(e) => return Err(e.into()),
    };
    let m: BackupManifest =
        serde_json::from_slice(&plain).map_err(|e| BackupError::BadManifest {
            id: id.to_string(),
            why: format!("manifest is not valid JSON: {e}"),
        })?;
    if m.format > MANIFEST_FORMAT {
        return Err(BackupError::BadManifest {
            id: id.to_string(),
            why: format!(
                "manifest format {} is newer than this walship understands; upgrade walship",
                m.format
            ),
        });
    }
    Ok(m)
}

/// What is under `backups/`, from one listing.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Ids of complete backups (those with a manifest), oldest first.
    pub complete: Vec<String>,
    /// Backup directories without a manifest, oldest first.
    pub unfinished: Vec<Unfinished>,
}

/// A backup directory without a manifest: a backup killed or failed part-way, or one still
/// running. walship never restores from it; its objects stay until someone deletes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    pub id: String,
    pub objects: usize,
    pub stored_bytes: u64,
    /// When its newest object was stored (Unix seconds, the storage's clock), if known.
    pub last_stored_at: Option<i64>,
}

/// Backups found per listing request at once.
const INVENTORY_CONCURRENCY: usize = 16;

/// What is under `backups/`: one listing of its directories, then one small listing per backup
/// for its manifest. The parts themselves are listed only for backups without one, so the cost
/// grows with the number of backups, not with their size.
pub async fn inventory(archive: &Archive) -> Result<Inventory, BackupError> {
    let dirs = archive
        .store()
        .list_dirs(layout::BACKUPS_PREFIX)
        .await
        .map_err(ArchiveError::from)?;
    let ids: Vec<String> = dirs
        .iter()
        .filter_map(|d| d.strip_prefix(layout::BACKUPS_PREFIX)?.strip_suffix('/'))
        .filter(|id| layout::valid_id(id))
        .map(str::to_string)
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(INVENTORY_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids {
        let (archive, sem) = (archive.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("never closed");
            let found = survey(&archive, &id).await;
            (id, found)
        });
    }
    let mut found = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (id, survey) = done.expect("inventory task does not panic");
        found.push((id, survey.map_err(ArchiveError::from)?));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut inv = Inventory::default();
    for (id, unfinished) in found {
        match unfinished {
            None => inv.complete.push(id),
            Some(u) => inv.unfinished.push(u),
        }
    }
    Ok(inv)
}

/// `None` when backup `id` has its manifest; otherwise what its directory holds.
async fn survey(archive: &Archive, id: &str) -> Result<Option<Unfinished>, StorageError> {
    let manifest = layout::manifest_key(id);
    let store = archive.store();
    if store
        .list(manifest.as_str())
        .await?
        .iter()
        .any(|o| o.key == manifest)
    {
        return Ok(None);
    }
    let objects = store
        .list(&format!("{}{id}/", layout::BACKUPS_PREFIX))
        .await?;
    Ok(Some(Unfinished {
        id: id.to_string(),
        objects: objects.len(),
        stored_bytes: objects.iter().map(|o| o.size).sum(),
        last_stored_at: objects.iter().filter_map(|o| o.stored_at).max(),
    }))
}

/// Ids of every complete backup (one with a manifest), oldest first.
pub async fn list_ids(archive: &Archive) -> Result<Vec<String>, BackupError> {
    Ok(inventory(archive).await?.complete)
}

/// Every complete backup's summary, oldest first. A backup whose plain summary is missing (made
/// before summaries existed) or unreadable is summarised from its manifest, which needs `ids`.
pub async fn summaries(
    archive: &Archive,
    ids: Option<&Arc<Identities>>,
) -> Result<Vec<BackupSummary>, BackupError> {
    summaries_of(archive, ids, list_ids(archive).await?).await
}

/// The summaries of the complete backups `complete` (from an `Inventory`).
pub async fn summaries_of(
    archive: &Archive,
    ids: Option<&Arc<Identities>>,
    complete: Vec<String>,
) -> Result<Vec<BackupSummary>, BackupError> {
    let mut out = Vec::new();
    for id in complete {
        // Why the plain summary cannot be used, when it cannot.
        let (unusable, damaged) = match archive.store().get(&layout::summary_key(&id)).await {
            Ok(bytes) => match serde_json::from_slice::<BackupSummary>(&bytes) {
                Ok(summary) => {
                    out.push(summary);
                    continue;
                }
                Err(e) => (format!("its summary.json is not valid ({e})"), true),
            },
            Err(StorageError::NotFound(_)) => (
                "it was made by a walship without plain summaries".to_string(),
                false,
            ),
            Err(e) => return Err(ArchiveError::from(e).into()),
        };
        // The manifest, encrypted and verified, says everything the summary does.
        match ids {
            Some(ids) => {
                let manifest = read_manifest(archive, ids, &id).await?;
                if damaged {
                    tracing::warn!("backup {id}: {unusable}; listed from its manifest");
                }
                out.push(BackupSummary::of(&manifest))
            }
            None => {
                return Err(BackupError::Invalid(format!(
                    "cannot list backup {id}: {unusable}; list backups on a host with the \
                     identity (identity_file or WALSHIP_IDENTITY), which reads its manifest instead"
                )))
            }
        }
    }
    Ok(out)
}

/// `LATEST` or an id, to a manifest.
pub async fn resolve(
    archive: &Archive,
    ids: &Arc<Identities>,
    which: &str,
) -> Result<BackupManifest, BackupError> {
    if which.eq_ignore_ascii_case("LATEST") {
        let all = list_ids(archive).await?;
        let id = all
            .last()
            .ok_or_else(|| BackupError::NoBackups(archive.store().describe()))?;
        return read_manifest(archive, ids, id).await;
    }
    read_manifest(archive, ids, which).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStore;
    use crate::storage::ObjectKey;

    #[tokio::test]
    async fn backups_without_a_manifest_are_unfinished_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::new(Arc::new(FsStore::new(dir.path())));
        let put = |key: &str, len: usize| {
            let archive = archive.clone();
            let key = ObjectKey::new(key).unwrap();
            async move {
                archive
                    .store()
                    .put_if_absent(&key, vec![7u8; len].into())
                    .await
                    .unwrap();
            }
        };
        put("backups/20261124T070000Z/part-000000", 100).await;
        put("backups/20261124T070000Z/manifest", 10).await;
        put("backups/20261124T080000Z/part-000000", 100).await;
        put("backups/20261124T080000Z/part-000001", 50).await;
        put("backups/not-a-backup/part-000000", 1).await;
        put("wal/0000000100000000/000000010000000000000001", 1).await;

        let inv = inventory(&archive).await.unwrap();
        assert_eq!(inv.complete, vec!["20261124T070000Z".to_string()]);
        assert_eq!(inv.unfinished.len(), 1, "{inv:?}");
        let u = &inv.unfinished[0];
        assert_eq!(
            (u.id.as_str(), u.objects, u.stored_bytes),
            ("20261124T080000Z", 2, 150)
        );
        assert!(u.last_stored_at.is_some(), "file mtimes are known");
    }

    /// An empty `file://` repository (gone with the directory) and an identity.
    fn empty_repository() -> (tempfile::TempDir, Archive, Arc<Identities>) {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::new(Arc::new(FsStore::new(dir.path())));
        let (text, _) = crate::codec::generate_identity();
        let ids = Arc::new(Identities::parse(&text, "test").unwrap());
        (dir, archive, ids)
    }

    #[tokio::test]
    async fn latest_in_a_repository_without_backups_says_so() {
        let (_dir, archive, ids) = empty_repository();
        let err = resolve(&archive, &ids, "latest").await.unwrap_err();
        assert_eq!(crate::exit::for_backup(&err), crate::exit::NOT_IN_ARCHIVE);
        assert_eq!(
            err.to_string(),
            format!(
                "{} has no complete backup yet, so there is no LATEST: take one with \
                 `walship backup-push`",
                archive.store().describe()
            )
        );
    }

    #[tokio::test]
    async fn a_backup_whose_summary_is_unreadable_is_listed_from_its_manifest() {
        let (_dir, archive, ids) = empty_repository();
        let manifest = crate::repo::backup::tests::manifest(&[(10, 0, 0)], &[10]);
        let id = manifest.id.clone();
        let plain = serde_json::to_vec(&manifest).unwrap();
        let recipients = Arc::new(ids.recipients());
        let key = layout::manifest_key(&id);
        archive
            .put_plain(&key, plain, &recipients, 1)
            .await
            .unwrap();
        // Cut short: an upload by hand, a bucket tool, a bit of damage.
        let summary = layout::summary_key(&id);
        let whole = serde_json::to_vec(&BackupSummary::of(&manifest)).unwrap();
        let cut = whole[..whole.len() / 2].to_vec();
        archive
            .store()
            .put_if_absent(&summary, cut.into())
            .await
            .unwrap();

        let listed = summaries(&archive, Some(&ids)).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            serde_json::to_value(&listed[0]).unwrap(),
            serde_json::to_value(BackupSummary::of(&manifest)).unwrap()
        );
        // Without the identity the manifest cannot be read: say which backup, why, and where
        // listing works.
        let err = summaries(&archive, None).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cannot list backup {id}: its summary.json is not valid (EOF while parsing"
            )) && err.ends_with("which reads its manifest instead"),
            "{err}"
        );
    }
}
