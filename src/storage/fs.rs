//! A repository in a local directory (`file:///path`): for single-host setups, NFS mounts, tests
//! and the quickstart.
//!
//! Atomic, durable, no-overwrite puts: the body goes to a temp file in the target directory, which is
//! fsynced and then hard-linked to its final name. `link(2)` fails with EEXIST instead of replacing,
//! so two writers racing for one key cannot overwrite each other; the directory is fsynced last.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectInfo, ObjectKey, PutOutcome, StorageError, Store, StoreInfo};

pub struct FsStore {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FsStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }
}

/// Whether the repository directory `root` is there.
fn check_root(root: &Path) -> Result<(), StorageError> {
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(StorageError::NoBucket(format!(
            "repository path {} is a file, not a directory; fix the repository URL or move the file away",
            root.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StorageError::NoBucket(format!(
            "repository directory {} does not exist; create it (mkdir -p) or fix the repository URL",
            root.display()
        ))),
        Err(e) => Err(io_error(root, e)),
    }
}

fn io_error(path: &Path, e: io::Error) -> StorageError {
    let msg = format!("{}: {e}{}", path.display(), crate::io_hint::suffix(&e));
    match e.kind() {
        io::ErrorKind::PermissionDenied => StorageError::Denied(msg),
        _ => StorageError::Io(msg),
    }
}

/// Whether no process with this pid exists on this host (a pid that is ours, or that we may not
/// signal, exists). For temp files named by their writer's pid.
pub fn process_gone(pid: u32) -> bool {
    pid != std::process::id()
        && i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH))
}

/// This host's name, as it goes into temp file names: Linux allows any byte in a host name,
/// a file name allows neither `/` nor NUL.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect()
}

/// Temp files a put of `name` killed part-way left in `dir`, named `.tmp.<name>.<pid>.<n>.<host>`:
/// removed when their writer is gone from this host, or, from another host sharing the directory
/// (NFS) or an older walship without the host in the name, once they are a day old. The next
/// put of the same name (PostgreSQL retries a failed segment) is when this runs.
fn sweep_dead_temps(dir: &Path, name: &str, host: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".tmp.{name}.");
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let mut parts = rest.splitn(3, '.');
        let (pid, _n, writer_host) = (parts.next(), parts.next(), parts.next());
        let dead_here =
            writer_host == Some(host) && pid.and_then(|p| p.parse().ok()).is_some_and(process_gone);
        let old = || {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(24 * 3600))
        };
        if dead_here || old() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// fsync a directory so a new entry in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn put_blocking(path: PathBuf, body: Bytes) -> Result<PutOutcome, StorageError> {
    let dir = path
        .parent()
        .expect("object path has a parent")
        .to_path_buf();
    let name = path
        .file_name()
        .expect("object has a file name")
        .to_string_lossy()
        .into_owned();
    let host = host_name();
    sweep_dead_temps(&dir, &name, &host);
    if path.exists() {
        return already_there(&path, &dir);
    }
    create_dirs_durably(&dir).map_err(|e| io_error(&dir, e))?;
    let tmp = dir.join(format!(
        ".tmp.{name}.{}.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        host
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        match fs::hard_link(&tmp, &path) {
            Ok(()) => {
                sync_dir(&dir)?;
                Ok(Ok(PutOutcome::Created { version_id: None }))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(already_there(&path, &dir)),
            // EPERM on a file we just created, or EOPNOTSUPP: no hard links here (vfat, CIFS
            // without unix extensions, some FUSE file systems).
            Err(e) if matches!(e.raw_os_error(), Some(1 | 95)) => {
                Ok(Err(StorageError::Io(format!(
                    "{}: {e}: this file system does not support hard links, which walship uses to \
                     create objects without ever replacing one; put the repository on one that \
                     does (ext4, XFS, NFS)",
                    dir.display()
                ))))
            }
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result.map_err(|e| io_error(&path, e))?
}

/// The answer for a key that has an object already, once that object is durable: it may be
/// another writer's whose put has not yet fsynced the directory (a look-ahead upload of the same
/// segment, or a put killed between its link and that fsync), and the caller is about to tell
/// PostgreSQL the segment is safe.
fn already_there(path: &Path, dir: &Path) -> Result<PutOutcome, StorageError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(path, e))?;
    sync_dir(dir).map_err(|e| io_error(dir, e))?;
    Ok(PutOutcome::AlreadyExists)
}

/// `create_dir_all`, then fsync the parent of every directory it created: a new directory's
/// entry is part of its parent, and an object acknowledged inside it must survive a power loss.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.exists() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// The objects under `dir` whose keys start with `prefix` and sort after `after`. Directories
/// none of whose keys could qualify are not read.
fn walk(dir: &Path, root: &Path, want: &Wanted, out: &mut Vec<ObjectInfo>) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp") {
            continue; // a put in progress, or left by a killed writer
        }
        let path = entry.path();
        let rel = key_of(&path, root);
        let ft = entry.file_type()?;
        if ft.is_dir() {
            if want.may_hold(&format!("{rel}/")) {
                walk(&path, root, want, out)?;
            }
        } else if ft.is_file() && want.takes(&rel) {
            if let Ok(key) = ObjectKey::new(rel) {
                let meta = entry.metadata()?;
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    stored_at: Some(std::os::unix::fs::MetadataExt::mtime(&meta)),
                });
            }
        }
    }
    Ok(())
}

/// The key of a file (or the key prefix of a directory) under `root`.
fn key_of(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .expect("under root")
        .to_string_lossy()
        .replace('\\', "/")
}

/// What a listing asks for: keys starting with `prefix` that sort after `after`.
struct Wanted {
    prefix: String,
    after: String,
}

impl Wanted {
    fn takes(&self, key: &str) -> bool {
        key.starts_with(&self.prefix) && *key > *self.after
    }

    /// Whether any key starting with `dir` (which ends with `/`) could be taken.
    fn may_hold(&self, dir: &str) -> bool {
        let meets_prefix = dir.starts_with(&self.prefix) || self.prefix.starts_with(dir);
        // Every key under `dir` sorts before `after` when `dir` does and is not a prefix of it.
        let all_before = *dir <= *self.after && !self.after.starts_with(dir);
        meets_prefix && !all_before
    }
}

/// Whether `dir` or a directory below it holds a file (not a temp file).
fn holds_a_file(dir: &Path) -> io::Result<bool> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(".tmp") {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_file() || (ft.is_dir() && holds_a_file(&entry.path())?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs a file system operation on tokio's blocking pool: every one may block for long (a network
/// mount that stopped answering), and on the executor it would stall the other tasks and every
/// deadline a caller set.
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|e| StorageError::Other(e.to_string()))?
}

#[async_trait]
impl Store for FsStore {
    async fn put_if_absent(
        &self,
        key: &ObjectKey,
        body: Bytes,
    ) -> Result<PutOutcome, StorageError> {
        let (root, path) = (self.root.clone(), self.path(key));
        blocking(move || {
            check_root(&root)?;
            put_blocking(path, body)
        })
        .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        self.get_prefix(key, u64::MAX).await
    }

    async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError> {
        let (root, path) = (self.root.clone(), self.path(key));
        let key = key.to_string();
        blocking(move || {
            check_root(&root)?;
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(StorageError::NotFound(key))
                }
                Err(e) => return Err(io_error(&path, e)),
            };
            let mut buf = Vec::new();
            f.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| io_error(&path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn make_durable(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let (root, path) = (self.root.clone(), self.path(key));
        blocking(move || {
            check_root(&root)?;
            let dir = path
                .parent()
                .expect("object path has a parent")
                .to_path_buf();
            already_there(&path, &dir).map(drop)
        })
        .await
    }

    async fn list_after(&self, prefix: &str, after: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let root = self.root.clone();
        let want = Wanted {
            prefix: prefix.to_string(),
            after: after.to_string(),
        };
        blocking(move || {
            check_root(&root)?;
            let start = match want.prefix.rfind('/') {
                Some(i) => root.join(&want.prefix[..i]),
                None => root.clone(),
            };
            let mut out = Vec::new();
            walk(&start, &root, &want, &mut out).map_err(|e| io_error(&start, e))?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        blocking(move || {
            check_root(&root)?;
            let dir = root.join(prefix.trim_end_matches('/'));
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_error(&dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                // S3 has no empty directories: one emptied by deletes is not listed.
                if is_dir
                    && !name.starts_with(".tmp")
                    && holds_a_file(&entry.path()).map_err(|e| io_error(&entry.path(), e))?
                {
                    out.push(format!("{prefix}{name}/"));
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let path = self.path(key);
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&path, e)),
        })
        .await
    }

    async fn probe(&self) -> Result<StoreInfo, StorageError> {
        let root = self.root.clone();
        blocking(move || {
            check_root(&root)?;
            // A write test: a repository we cannot write to is as broken as a missing one.
            let probe = root.join(format!(".tmp.probe.{}", std::process::id()));
            fs::write(&probe, b"walship").map_err(|e| io_error(&root, e))?;
            let _ = fs::remove_file(&probe);
            Ok(StoreInfo {
                versioning: None,
                object_lock: None,
            })
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conforms() {
        let dir = tempfile::tempdir().unwrap();
        super::super::conformance::run(&FsStore::new(dir.path())).await;
    }

    #[tokio::test]
    async fn missing_root_is_no_bucket_not_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("nope"));
        let key = ObjectKey::new("wal/x").unwrap();
        assert!(matches!(
            store.get(&key).await,
            Err(StorageError::NoBucket(_))
        ));
        assert!(matches!(
            store.put_if_absent(&key, Bytes::from_static(b"x")).await,
            Err(StorageError::NoBucket(_))
        ));
        // A file where the repository should be: said so, with what to do.
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let store = FsStore::new(dir.path().join("file"));
        match store.get(&key).await {
            Err(StorageError::NoBucket(why)) => assert!(
                why.contains("is a file, not a directory; fix the repository URL"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn leftover_temp_files_are_invisible() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path());
        fs::create_dir_all(dir.path().join("wal")).unwrap();
        fs::write(dir.path().join("wal/.tmp.seg.1.0"), b"half").unwrap();
        assert!(store.list("wal/").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_put_removes_what_killed_puts_of_the_same_name_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path());
        let wal = dir.path().join("wal");
        fs::create_dir_all(&wal).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let (me, host) = (std::process::id(), host_name());
        let names = [
            format!(".tmp.seg.{dead}.0.{host}"),     // killed here: removed
            format!(".tmp.seg.{dead}.1.other.host"), // another host's, fresh: kept
            format!(".tmp.seg.{dead}.2.other.host"), // another host's, two days old: removed
            format!(".tmp.seg.{dead}.3"),            // no host in the name, fresh: kept
            format!(".tmp.seg.{me}.4.{host}"),       // a writer still running: kept
            format!(".tmp.seg2.{dead}.5.{host}"),    // another object: not this put's business
        ];
        for n in &names {
            fs::write(wal.join(n), b"half").unwrap();
        }
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        File::options()
            .write(true)
            .open(wal.join(&names[2]))
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
        let key = ObjectKey::new("wal/seg").unwrap();
        store
            .put_if_absent(&key, Bytes::from_static(b"whole"))
            .await
            .unwrap();
        let left: Vec<bool> = names.iter().map(|n| wal.join(n).exists()).collect();
        assert_eq!(left, [false, true, false, true, true, true]);
        // The put's own temp file is gone too.
        assert_eq!(fs::read_dir(&wal).unwrap().count(), names.len() - 2 + 1);
    }
}
