//! `backup-fetch`: restore a base backup into a directory.
//!
//! Until it has finished, the directory holds `walship-restore-incomplete` (saying so) and no
//! `global/pg_control` (it is written under a temporary name and renamed last), so PostgreSQL
//! refuses to start on a half-restored directory. Parts are downloaded `concurrency` at a time
//! (the next ones download while earlier ones are written), each verified whole (AEAD, size,
//! sha256) before any of its bytes reach a file. Everything is flushed (syncfs) before
//! `pg_control` and the markers are put in place.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use super::owner::Chown;
use super::pool::BufferPool;
use super::progress::Progress;
use super::BackupError;
use crate::archive::{Archive, ArchiveError};
use crate::codec::{self, CodecError, Identities};
use crate::repo::backup::{self as layout, BackupManifest, Piece, Tablespace};
use crate::storage::StorageError;

pub const INCOMPLETE_MARKER: &str = "walship-restore-incomplete";
const PG_CONTROL: &str = "global/pg_control";
const PG_CONTROL_TMP: &str = "global/pg_control.walship-incomplete";

#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Empty a non-empty target directory (and tablespace directories) first.
    pub force: bool,
    /// Tablespace relocation: an OID or an old location, to a new location.
    pub tablespace_map: Vec<(String, PathBuf)>,
    pub concurrency: usize,
}

/// Whether `--tablespace-map` FROM `from` names tablespace `oid`: by OID or by its old location.
fn names_tablespace(from: &str, oid: u32, original: &str) -> bool {
    from == oid.to_string() || from == original
}

/// Where `--tablespace-map` sends tablespace `oid` (named by OID or by its old location).
fn mapped_location(opts: &FetchOptions, oid: u32, original: &str) -> Option<PathBuf> {
    opts.tablespace_map
        .iter()
        .find(|(from, _)| names_tablespace(from, oid, original))
        .map(|(_, to)| to.clone())
}

/// Refuse a `--tablespace-map` that names no tablespace of backup `id` (a mistyped OID would
/// otherwise send the tablespace to its original location, on the database host the live
/// server's), or whose new location is relative (PostgreSQL links tablespaces by absolute path),
/// and one that leaves two tablespaces in one directory or one inside the other, or a tablespace
/// in the target directory `dest` or around it.
fn check_tablespace_map(
    id: &str,
    tablespaces: &[Tablespace],
    dest: &Path,
    opts: &FetchOptions,
) -> Result<(), BackupError> {
    for (from, to) in &opts.tablespace_map {
        let arg = format!("--tablespace-map {from}={}", to.display());
        if !tablespaces
            .iter()
            .any(|t| names_tablespace(from, t.oid, &t.location))
        {
            let known = match tablespaces {
                [] => "it has none".to_string(),
                _ => {
                    let each: Vec<String> = tablespaces
                        .iter()
                        .map(|t| format!("{} (was {})", t.oid, t.location))
                        .collect();
                    format!("its tablespaces are {}", each.join(", "))
                }
            };
            return Err(BackupError::Invalid(format!(
                "{arg}: backup {id} has no tablespace {from}; {known}; name one by its OID or \
                 its original location"
            )));
        }
        if !to.is_absolute() {
            return Err(BackupError::Invalid(format!(
                "{arg}: {} is a relative path; give the tablespace's new location as an \
                 absolute path",
                to.display()
            )));
        }
    }
    // Two tablespaces in one directory, or one inside the other, would mix their files: a
    // relation file of one could overwrite the other's.
    let placed: Vec<(u32, PathBuf)> = tablespaces
        .iter()
        .map(|t| (t.oid, tablespace_location(opts, t.oid, &t.location)))
        .collect();
    for (i, (a, at)) in placed.iter().enumerate() {
        for (b, bt) in &placed[i + 1..] {
            if at.starts_with(bt) || bt.starts_with(at) {
                return Err(BackupError::Invalid(format!(
                    "tablespaces {a} and {b} of backup {id} would be restored to {} and {}, \
                     which overlap, so their files would mix; give each its own directory with \
                     --tablespace-map",
                    at.display(),
                    bt.display()
                )));
            }
        }
    }
    // A tablespace in the data directory is one PostgreSQL warns about, and base backups copy
    // twice; around it, emptying the tablespace's directory (--force) would empty the target.
    let target = std::path::absolute(dest).unwrap_or_else(|_| dest.to_path_buf());
    for (oid, at) in &placed {
        if at.starts_with(&target) || target.starts_with(at) {
            return Err(BackupError::Invalid(format!(
                "tablespace {oid} of backup {id} would be restored to {}, which overlaps the \
                 target directory {}; give it a directory outside the target with \
                 --tablespace-map {oid}=DIR",
                at.display(),
                target.display()
            )));
        }
    }
    Ok(())
}

/// Whether a path from a manifest stays inside the directory it is joined to: relative, with no
/// empty, `.` or `..` component. A crafted manifest could otherwise write, chmod and chown
/// outside the target (`/etc`, `../x`).
fn is_safe_path(path: &str) -> bool {
    !path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
}

/// Refuse a manifest with a directory or file path that would leave the target directory.
fn check_paths(m: &BackupManifest) -> Result<(), BackupError> {
    let dirs = m.dirs.iter().map(|d| &d.path);
    let files = m.files.iter().map(|f| &f.path);
    match dirs.chain(files).find(|p| !is_safe_path(p)) {
        Some(p) => Err(BackupError::BadManifest {
            id: m.id.clone(),
            why: format!(
                "unsafe path {p:?} (it would be written outside the target directory); restore \
                 another backup"
            ),
        }),
        None => Ok(()),
    }
}

/// Where tablespace `oid` goes: where it is mapped, else its original location.
fn tablespace_location(opts: &FetchOptions, oid: u32, original: &str) -> PathBuf {
    mapped_location(opts, oid, original).unwrap_or_else(|| PathBuf::from(original))
}

fn is_empty_dir(dir: &Path) -> std::io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Whether `dir` is absent or empty; a non-empty one is refused unless `force`.
fn check_empty(dir: &Path, force: bool, what: &str) -> Result<bool, BackupError> {
    let empty = is_empty_dir(dir).map_err(|e| BackupError::local("cannot read", dir, e))?;
    if !empty && !force {
        if dir.join(INCOMPLETE_MARKER).exists() {
            return Err(BackupError::TargetNotEmpty(format!(
                "{what} {} holds a restore that did not finish ({INCOMPLETE_MARKER}); pass \
                 --force to delete it and restore again",
                dir.display()
            )));
        }
        return Err(BackupError::TargetNotEmpty(format!(
            "{what} {} is not empty; restore into an empty directory, or pass --force to \
             delete what is there first",
            dir.display()
        )));
    }
    Ok(empty)
}

/// Make `dir` an empty directory, refusing to touch a non-empty one unless `force`.
fn prepare_empty(dir: &Path, force: bool, what: &str) -> Result<(), BackupError> {
    if !check_empty(dir, force, what)? {
        // pg_control first: a removal cut short (kill -9, a file that will not go) must not leave
        // a data directory PostgreSQL would start on with part of its files gone.
        let control = dir.join("global/pg_control");
        match fs::remove_file(&control) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BackupError::local("cannot remove", &control, e))
            }
            _ => {}
        }
        for e in fs::read_dir(dir).map_err(|e| BackupError::local("cannot read", dir, e))? {
            let p = e
                .map_err(|e| BackupError::local("cannot read", dir, e))?
                .path();
            let res = match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
                _ => fs::remove_file(&p),
            };
            res.map_err(|e| BackupError::local("cannot remove", &p, e))?;
        }
    }
    fs::create_dir_all(dir).map_err(|e| BackupError::local("cannot create", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| BackupError::local("cannot chmod", dir, e))
}

/// Bytes each place the restore writes to (the target directory, each tablespace's location)
/// must hold: its files' sizes, each rounded up to whole 4 KiB blocks.
fn space_needed<'a>(
    files: impl IntoIterator<Item = (&'a str, u64)>,
    dest: &Path,
    links: &HashMap<String, PathBuf>,
) -> Vec<(PathBuf, u64)> {
    let mut need: Vec<(PathBuf, u64)> = vec![(dest.to_path_buf(), 0)];
    for (path, size) in files {
        let root = path
            .strip_prefix("pg_tblspc/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|oid| links.get(&format!("pg_tblspc/{oid}")))
            .map_or(dest, PathBuf::as_path);
        let bytes = size.div_ceil(4096) * 4096;
        match need.iter_mut().find(|(p, _)| p == root) {
            Some((_, n)) => *n += bytes,
            None => need.push((root.to_path_buf(), bytes)),
        }
    }
    need
}

/// Refuse a restore its file systems cannot hold before any data is written, rather than hours
/// in. `fs_of` gives a place's file system (device id) and the bytes free there; places on one
/// file system add up. A place whose file system cannot be read is not checked.
fn check_space(
    need: &[(PathBuf, u64)],
    fs_of: impl Fn(&Path) -> Option<(u64, u64)>,
) -> Result<(), BackupError> {
    let mut by_fs: Vec<(u64, u64, &Path, u64)> = Vec::new(); // device, free, first place, need
    for (place, bytes) in need {
        let Some((dev, free)) = fs_of(place) else {
            continue;
        };
        match by_fs.iter_mut().find(|e| e.0 == dev) {
            Some(e) => e.3 += bytes,
            None => by_fs.push((dev, free, place, *bytes)),
        }
    }
    match by_fs.into_iter().find(|e| e.3 > e.1) {
        Some((_, free, place, bytes)) => Err(BackupError::local(
            "not enough space to restore into",
            place,
            // Not StorageFull: the message already says what to do (see io_hint).
            std::io::Error::other(format!(
                "the backup needs {} on that file system and {} is free; free some space \
                     or restore elsewhere",
                indicatif::HumanBytes(bytes),
                indicatif::HumanBytes(free)
            )),
        )),
        None => Ok(()),
    }
}

/// The file system a place is (or, not yet created, will be) on, and the bytes free there.
fn file_system_of(place: &Path) -> Option<(u64, u64)> {
    let existing = place.ancestors().find(|p| p.exists())?;
    let st = rustix::fs::statvfs(existing).ok()?;
    let dev = fs::metadata(existing).ok()?.dev();
    Some((dev, st.f_bavail.saturating_mul(st.f_frsize)))
}

/// What `fetch` checks before writing anything, without writing anything (`restore --dry-run`):
/// the manifest's paths stay inside the target, `--tablespace-map` names the backup's
/// tablespaces, the target and tablespace directories are empty or absent (or `force`), and
/// their file systems can hold the backup. With `force`, what is there now counts as free, as it
/// will be once `fetch` has emptied the directories.
pub fn preflight(m: &BackupManifest, dest: &Path, opts: &FetchOptions) -> Result<(), BackupError> {
    check_paths(m)?;
    let emptied = check_places(m, dest, opts)?;
    let links: HashMap<String, PathBuf> = m
        .tablespaces
        .iter()
        .map(|t| {
            let loc = tablespace_location(opts, t.oid, &t.location);
            (format!("pg_tblspc/{}", t.oid), loc)
        })
        .collect();
    let mut freed: HashMap<u64, u64> = HashMap::new();
    for (dir, _) in emptied.iter().filter(|(_, full)| *full) {
        if let Some((dev, _)) = file_system_of(dir) {
            *freed.entry(dev).or_default() += used_under(dir);
        }
    }
    let files = m.files.iter().map(|f| (f.path.as_str(), f.size));
    check_space(&space_needed(files, dest, &links), |place| {
        file_system_of(place).map(|(dev, free)| (dev, free + freed.get(&dev).copied().unwrap_or(0)))
    })
}

/// Check every place the restore writes to before any is touched: `--tablespace-map` (see
/// `check_tablespace_map`), the target directory and each tablespace's location. Returns each
/// place with whether it has contents `--force` would delete.
///
/// Two things are refused even with `--force`: a target directory a running server uses, and a
/// non-empty tablespace location the user did not name with `--tablespace-map` (the original
/// location, which on the database host is the live server's tablespace), unless it holds an
/// unfinished restore of ours.
fn check_places(
    m: &BackupManifest,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<Vec<(PathBuf, bool)>, BackupError> {
    check_tablespace_map(&m.id, &m.tablespaces, dest, opts)?;
    if let Some(pid) = running_server(dest) {
        return Err(BackupError::TargetNotEmpty(format!(
            "a PostgreSQL server is running on {} (postmaster.pid names process {pid}); stop it \
             before restoring there, or restore into another directory",
            dest.display()
        )));
    }
    let mut places = vec![(
        dest.to_path_buf(),
        !check_empty(dest, opts.force, "target directory")?,
    )];
    for t in &m.tablespaces {
        let mapped = mapped_location(opts, t.oid, &t.location);
        let named = mapped.is_some();
        let loc = mapped.unwrap_or_else(|| PathBuf::from(&t.location));
        let ours = loc.join(INCOMPLETE_MARKER).exists();
        if !named && !ours && !is_empty_dir(&loc).unwrap_or(false) {
            return Err(BackupError::TargetNotEmpty(format!(
                "tablespace {} would be restored to its original location {}, which is not \
                 empty (on the database host it is the running server's); give it an empty \
                 directory with --tablespace-map {}=DIR",
                t.oid,
                loc.display(),
                t.oid
            )));
        }
        let full = !check_empty(&loc, opts.force, "tablespace directory")?;
        places.push((loc, full));
    }
    Ok(places)
}

/// The process a live `postmaster.pid` in `dir` names, if that process exists.
fn running_server(dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let pid = rustix::process::Pid::from_raw(pid)?;
    match rustix::process::test_kill_process(pid) {
        // EPERM: it exists, owned by another user (the server's, when walship runs as root).
        Ok(()) | Err(rustix::io::Errno::PERM) => Some(pid.as_raw_nonzero().get()),
        Err(_) => None,
    }
}

/// The bytes the files under `dir` take on disk, not following symbolic links: what emptying it
/// frees (less what other hard links keep).
fn used_under(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.path().symlink_metadata() {
            Ok(m) if m.is_dir() => m.blocks() * 512 + used_under(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The rewritten `tablespace_map` for the new locations, when the backup has one.
fn remap_tablespace_map(m: &BackupManifest, opts: &FetchOptions) -> Option<Vec<u8>> {
    m.tablespace_map.as_ref()?;
    Some(tablespace_map_text(&m.tablespaces, opts))
}

/// `tablespace_map` as PostgreSQL 15 writes it (`do_pg_backup_start`): one `<oid> <location>`
/// line per tablespace, with a backslash before each newline, carriage return and backslash in
/// the location, which PostgreSQL's reader takes away again.
fn tablespace_map_text(tablespaces: &[Tablespace], opts: &FetchOptions) -> Vec<u8> {
    let mut map = Vec::new();
    for t in tablespaces {
        map.extend_from_slice(format!("{} ", t.oid).as_bytes());
        let loc = tablespace_location(opts, t.oid, &t.location);
        for &b in loc.as_os_str().as_bytes() {
            if matches!(b, b'\n' | b'\r' | b'\\') {
                map.push(b'\\');
            }
            map.push(b);
        }
        map.push(b'\n');
    }
    map
}

/// Restore backup `m` into `dest`. `finish` runs once every file is on disk and flushed, before
/// `pg_control` and the markers are put in place: what it writes (restore's recovery settings)
/// is then part of the restore, and a failure or kill there leaves the directory marked
/// incomplete.
pub async fn fetch(
    archive: &Archive,
    ids: &Arc<Identities>,
    m: &BackupManifest,
    dest: &Path,
    opts: &FetchOptions,
    finish: impl FnOnce() -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    let pieces = m.pieces().map_err(|why| BackupError::BadManifest {
        id: m.id.clone(),
        why,
    })?;
    check_paths(m)?;
    if let Some(c) = m.page_checks.filter(|c| c.bad > 0) {
        let files = m.files.iter().filter(|f| f.bad_block_count() > 0).count();
        tracing::warn!(
            "backup {} holds {} page(s) in {files} file(s) that failed their checksum when it was \
             taken: the server was corrupt there, and the restored cluster will report them when \
             it reads them, unless WAL replay rewrites them; an older backup may not have them",
            m.id,
            c.bad
        );
    }

    check_places(m, dest, opts)?;
    // Decided before the target is touched: its owner then is the fallback.
    let chown = Chown::for_restore(m.owner.as_ref(), dest);
    prepare_empty(dest, opts.force, "target directory")?;
    chown.apply(dest)?;
    let marker = dest.join(INCOMPLETE_MARKER);
    fs::write(
        &marker,
        format!(
            "walship is restoring backup {} here and has not finished.\n\
             Do not start PostgreSQL on this directory; run walship backup-fetch again.\n",
            m.id
        ),
    )
    .map_err(|e| BackupError::local("cannot write", &marker, e))?;

    // Tablespaces: empty target directories, linked from pg_tblspc.
    let mut links = HashMap::new();
    let mut locations = Vec::new();
    for t in &m.tablespaces {
        let loc = tablespace_location(opts, t.oid, &t.location);
        prepare_empty(&loc, opts.force, "tablespace directory")?;
        chown.apply(&loc)?;
        // So a rerun with --force may empty it again, also where it is the original location.
        let marker = loc.join(INCOMPLETE_MARKER);
        fs::write(
            &marker,
            format!("walship is restoring backup {} here.\n", m.id),
        )
        .map_err(|e| BackupError::local("cannot write", &marker, e))?;
        links.insert(format!("pg_tblspc/{}", t.oid), loc.clone());
        locations.push(loc);
    }
    let files = m.files.iter().map(|f| (f.path.as_str(), f.size));
    check_space(&space_needed(files, dest, &links), file_system_of)?;
    for d in &m.dirs {
        let path = dest.join(&d.path);
        if let Some(loc) = links.get(&d.path) {
            fs::create_dir_all(dest.join("pg_tblspc"))
                .map_err(|e| BackupError::local("cannot create", &path, e))?;
            std::os::unix::fs::symlink(loc, &path)
                .map_err(|e| BackupError::local("cannot link", &path, e))?;
            chown.apply(&path)?;
            continue;
        }
        fs::create_dir_all(&path).map_err(|e| BackupError::local("cannot create", &path, e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(d.mode))
            .map_err(|e| BackupError::local("cannot chmod", &path, e))?;
        chown.apply(&path)?;
    }
    let paths: Arc<Vec<PathBuf>> = Arc::new(
        m.files
            .iter()
            .map(|f| match f.path.as_str() {
                PG_CONTROL => dest.join(PG_CONTROL_TMP),
                p => dest.join(p),
            })
            .collect(),
    );
    for (f, path) in m.files.iter().zip(paths.iter()) {
        let file = File::create(path).map_err(|e| BackupError::local("cannot create", path, e))?;
        file.set_len(f.size)
            .map_err(|e| BackupError::local("cannot size", path, e))?;
        chown.apply_to(&file, path)?;
    }

    let progress = Arc::new(Progress::new("backup-fetch", m.original_size()));
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let pool = BufferPool::default();
    let mut tasks = tokio::task::JoinSet::new();
    for (part, part_pieces) in m.parts.iter().zip(pieces) {
        let permit = sem.clone().acquire_owned().await.expect("open");
        let (archive, ids, paths, progress, pool) = (
            archive.clone(),
            ids.clone(),
            paths.clone(),
            progress.clone(),
            pool.clone(),
        );
        let key = layout::part_key(&m.id, part.index);
        let (size, sha) = (part.plain_size, part.sha256.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let part_pieces = Arc::new(part_pieces);
            // A part of a finished backup that is gone is damage, not "no such backup".
            let object = archive.store().get(&key).await.map_err(|e| match e {
                StorageError::NotFound(what) => ArchiveError::Codec {
                    key: key.to_string(),
                    source: CodecError::Corrupt(format!(
                        "{what} is missing, though the backup's manifest lists it"
                    )),
                },
                e => ArchiveError::from(e),
            })?;
            // Verified whole before anything is written, so a damaged download can be made again.
            let restore = |object: bytes::Bytes| {
                let (ids, sha, part_pieces, paths, pool) = (
                    ids.clone(),
                    sha.clone(),
                    part_pieces.clone(),
                    paths.clone(),
                    pool.clone(),
                );
                let key_s = key.to_string();
                async move {
                    tokio::task::spawn_blocking(move || {
                        let mut plain = pool.take();
                        let done = restore_part(
                            &object,
                            &ids,
                            &key_s,
                            (size, &sha),
                            &part_pieces,
                            &paths,
                            &mut plain,
                        );
                        pool.give(plain);
                        done
                    })
                    .await
                    .expect("restore task does not panic")
                }
            };
            archive.verified_or_refetched(&key, object, restore).await?;
            progress.inc(size);
            Ok::<_, BackupError>(())
        });
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = done.expect("part task does not panic") {
                tasks.shutdown().await;
                return Err(e);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.expect("part task does not panic") {
            tasks.shutdown().await;
            return Err(e);
        }
    }
    progress.finish();

    for (f, path) in m.files.iter().zip(paths.iter()) {
        let file = File::options()
            .write(true)
            .open(path)
            .map_err(|e| BackupError::local("cannot open", path, e))?;
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(f.mtime.max(0) as u64);
        let _ = file.set_modified(mtime);
        file.set_permissions(fs::Permissions::from_mode(f.mode))
            .map_err(|e| BackupError::local("cannot chmod", path, e))?;
    }
    let label = dest.join("backup_label");
    fs::write(&label, &m.backup_label)
        .map_err(|e| BackupError::local("cannot write", &label, e))?;
    chown.apply(&label)?;
    if let Some(map) = remap_tablespace_map(m, opts) {
        let p = dest.join("tablespace_map");
        fs::write(&p, map).map_err(|e| BackupError::local("cannot write", &p, e))?;
        chown.apply(&p)?;
    }
    // Everything on disk before pg_control makes the directory startable.
    for dir in std::iter::once(dest.to_path_buf()).chain(locations.iter().cloned()) {
        let d = File::open(&dir).map_err(|e| BackupError::local("cannot open", &dir, e))?;
        rustix::fs::syncfs(&d).map_err(|e| BackupError::local("cannot flush", &dir, e.into()))?;
    }
    finish()?;
    if m.files.iter().any(|f| f.path == PG_CONTROL) {
        let (tmp, fin) = (dest.join(PG_CONTROL_TMP), dest.join(PG_CONTROL));
        fs::rename(&tmp, &fin).map_err(|e| BackupError::local("cannot rename", &tmp, e))?;
        sync_dir(&dest.join("global"))?;
    }
    for loc in &locations {
        let marker = loc.join(INCOMPLETE_MARKER);
        fs::remove_file(&marker).map_err(|e| BackupError::local("cannot remove", &marker, e))?;
        sync_dir(loc)?;
    }
    fs::remove_file(&marker).map_err(|e| BackupError::local("cannot remove", &marker, e))?;
    sync_dir(dest)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::local("cannot fsync", dir, e))
}

/// Verify one part whole, then write its pieces into their files.
fn restore_part(
    object: &[u8],
    ids: &Identities,
    key: &str,
    (size, sha256): (u64, &str),
    pieces: &[Piece],
    paths: &[PathBuf],
    plain: &mut Vec<u8>,
) -> Result<(), BackupError> {
    plain.reserve(size as usize);
    let header = codec::decode(object, ids, &mut *plain).map_err(|source| ArchiveError::Codec {
        key: key.to_string(),
        source,
    })?;
    if header.plain_size != size || header.sha256_hex() != sha256 {
        return Err(ArchiveError::Codec {
            key: key.to_string(),
            source: codec::CodecError::Corrupt(
                "the part is not the one the manifest lists (size or sha256 differ)".into(),
            ),
        }
        .into());
    }
    for p in pieces {
        let path = &paths[p.file];
        let file = File::options()
            .write(true)
            .open(path)
            .map_err(|e| BackupError::local("cannot open", path, e))?;
        let bytes = &plain[p.part_offset as usize..(p.part_offset + p.len) as usize];
        file.write_all_at(bytes, p.file_offset)
            .map_err(|e| BackupError::local("cannot write", path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_the_file_systems_cannot_hold_is_refused_up_front() {
        let links = HashMap::from([("pg_tblspc/16400".to_string(), PathBuf::from("/ts"))]);
        let files = [
            ("global/pg_control", 8192),
            ("base/1/1259", 1),
            ("pg_tblspc/16400/PG_15_202209061/5/16401", 10_000),
            ("pg_tblspc/16400", 0),
        ];
        let need = space_needed(files, Path::new("/data"), &links);
        assert_eq!(
            need,
            vec![("/data".into(), 8192 + 4096), ("/ts".into(), 12288)]
        );

        // Separate file systems: each must hold its own share.
        let apart = |free_data, free_ts| {
            move |p: &Path| {
                Some(if p == Path::new("/data") {
                    (1, free_data)
                } else {
                    (2, free_ts)
                })
            }
        };
        assert!(check_space(&need, apart(12288, 12288)).is_ok());
        let err = check_space(&need, apart(12288, 12287))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not enough space to restore into /ts") && err.contains("12.00 KiB"),
            "{err}"
        );
        // One file system: the shares add up.
        assert!(check_space(&need, |_| Some((1, 24576))).is_ok());
        assert!(check_space(&need, |_| Some((1, 24575))).is_err());
        // Unknown: not checked.
        assert!(check_space(&need, |_| None).is_ok());
    }

    #[tokio::test]
    async fn a_part_damaged_on_the_way_is_downloaded_once_more() {
        use crate::storage::testing::Faulty;
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for damaged in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (store_dir, dest) = (dir.path().join("repo"), dir.path().join("restored"));
            std::fs::create_dir_all(&store_dir).unwrap();
            let store = Arc::new(Faulty::damaging(&store_dir, "backups/", damaged));
            let archive = Archive::new(store.clone());
            let (text, _) = codec::generate_identity();
            let ids = Arc::new(Identities::parse(&text, "test").unwrap());
            let mut m = crate::repo::backup::tests::manifest(&[(data.len() as u64, 0, 0)], &[0]);
            let enc = codec::encode(&data[..], &ids.recipients(), 1).unwrap();
            m.parts[0].plain_size = data.len() as u64;
            m.parts[0].sha256 = enc.header.sha256_hex();
            archive.put(&layout::part_key(&m.id, 0), enc).await.unwrap();

            let opts = FetchOptions {
                concurrency: 1,
                ..FetchOptions::default()
            };
            let done = fetch(&archive, &ids, &m, &dest, &opts, || Ok(())).await;
            assert_eq!(store.downloads(), 2, "one download more, never a third");
            if damaged == 1 {
                done.unwrap();
                assert_eq!(std::fs::read(dest.join("f0")).unwrap(), data);
                assert!(!dest.join(INCOMPLETE_MARKER).exists());
            } else {
                let err = done.unwrap_err();
                assert_eq!(crate::exit::for_backup(&err), crate::exit::CORRUPT, "{err}");
                assert!(dest.join(INCOMPLETE_MARKER).exists(), "marked incomplete");
            }
        }
    }

    #[test]
    fn manifest_paths_that_leave_the_target_are_unsafe() {
        for ok in [
            "base",
            "base/1/1259",
            "pg_tblspc/16400",
            "pg_wal/archive_status",
            "..x",
        ] {
            assert!(is_safe_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "/etc",
            "../x",
            "base/../..",
            "./base",
            "base/.",
            "base//1",
            "base/",
        ] {
            assert!(!is_safe_path(bad), "{bad}");
        }
    }

    fn map(entries: &[(&str, &str)]) -> FetchOptions {
        FetchOptions {
            tablespace_map: entries
                .iter()
                .map(|&(from, to)| (from.to_string(), PathBuf::from(to)))
                .collect(),
            ..FetchOptions::default()
        }
    }

    fn two_tablespaces() -> [Tablespace; 2] {
        [(16400, "/srv/ts1"), (16401, "/srv/ts2")].map(|(oid, location)| Tablespace {
            oid,
            location: location.into(),
        })
    }

    #[test]
    fn a_tablespace_map_naming_no_tablespace_a_relative_dir_or_overlapping_dirs_is_refused() {
        let ts = two_tablespaces();
        let id = "20261124T120000Z";
        let dest = Path::new("/restore/data");
        assert!(check_tablespace_map(id, &ts, dest, &map(&[])).is_ok());
        assert!(check_tablespace_map(id, &ts, dest, &map(&[("16400", "/new/a")])).is_ok());
        assert!(check_tablespace_map(id, &ts, dest, &map(&[("/srv/ts2", "/new/b")])).is_ok());

        let err = check_tablespace_map(id, &ts, dest, &map(&[("16500", "/new/a")])).unwrap_err();
        assert!(matches!(err, BackupError::Invalid(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "--tablespace-map 16500=/new/a: backup 20261124T120000Z has no tablespace 16500; its \
             tablespaces are 16400 (was /srv/ts1), 16401 (was /srv/ts2); name one by its OID or \
             its original location"
        );
        let err = check_tablespace_map(id, &[], dest, &map(&[("16400", "/new/a")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("has no tablespace 16400; it has none"),
            "{err}"
        );

        let err = check_tablespace_map(id, &ts, dest, &map(&[("16401", "new/b")])).unwrap_err();
        assert!(matches!(err, BackupError::Invalid(_)), "{err:?}");
        assert!(
            err.to_string().contains("new/b is a relative path"),
            "{err}"
        );

        // Into one directory, or one inside the other (also where one stays where it was).
        for pairs in [
            &[("16400", "/new/ts"), ("16401", "/new/ts/")][..],
            &[("16400", "/new/ts"), ("16401", "/new/ts/b")],
            &[("16401", "/srv/ts1/b")],
        ] {
            let err = check_tablespace_map(id, &ts, dest, &map(pairs)).unwrap_err();
            assert!(
                err.to_string().contains("which overlap"),
                "{pairs:?}: {err}"
            );
        }
        assert!(check_tablespace_map(id, &ts, dest, &map(&[("16400", "/srv/ts2b")])).is_ok());

        // In the target directory, the target itself, or around it.
        for at in ["/restore/data/ts", "/restore/data", "/restore"] {
            let err = check_tablespace_map(id, &ts, dest, &map(&[("16400", at)])).unwrap_err();
            assert!(matches!(err, BackupError::Invalid(_)), "{err:?}");
            assert!(
                err.to_string().contains(&format!(
                    "restored to {at}, which overlaps the target directory /restore/data"
                )),
                "{at}: {err}"
            );
        }
        assert!(check_tablespace_map(id, &ts, dest, &map(&[("16400", "/restore/data2")])).is_ok());
        // A relative target is taken from the working directory.
        let cwd = std::env::current_dir().unwrap();
        let err = check_tablespace_map(
            id,
            &ts,
            Path::new("data"),
            &map(&[("16400", cwd.to_str().unwrap())]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps the target"), "{err}");
    }

    #[test]
    fn the_rewritten_tablespace_map_escapes_locations_as_postgresql_does() {
        let ts = two_tablespaces();
        let opts = map(&[("16401", "/new/a\\b\nc\rd")]);
        assert_eq!(
            tablespace_map_text(&ts, &opts),
            b"16400 /srv/ts1\n16401 /new/a\\\\b\\\nc\\\rd\n".to_vec()
        );
    }
}
