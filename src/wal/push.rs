//! `wal-push`: archive one file PostgreSQL hands us (%p), and upload other `.ready` files ahead so
//! that PostgreSQL's next calls return at once.
//!
//! Safety rules: exit 0 only once the object is durable; never overwrite an archived name with other
//! content; refuse WAL from another cluster. A look-ahead upload leaves a record in
//! `<state>/pushed/<repository tag>/<name>` holding the file's identity (size, inode, mtime, ctime) and sha256; a later
//! call for that name trusts the record only if the file still has that identity, else pushes again.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::name::{WalFileKind, WalFileName};
use super::{parent_dir, state_dir, HeaderMismatch, WalError};
use crate::archive::{Archive, ArchiveError, Stored};
use crate::codec::{self, Recipients};
use crate::config::WalSettings;
use crate::pg::walpage::{LongPageHeader, LONG_HEADER_LEN};
use crate::repo::{self, RepoMeta, REPO_FORMAT};

/// What a push needs, resolved by the caller.
pub struct PushContext {
    pub archive: Archive,
    pub recipients: Recipients,
    pub compression_level: i32,
    pub settings: WalSettings,
    /// Identifies the repository in look-ahead records (its URL).
    pub repo_id: String,
    /// `walship.json`, read (or created) once per call however many segments the call pushes.
    pub meta: OnceCell<RepoMeta>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    Uploaded {
        stored_bytes: u64,
    },
    /// An earlier call uploaded it ahead; its record still matches the file.
    AlreadyUploadedAhead,
    /// The same content was archived before (a retry after a crash, or a re-run).
    AlreadyArchived,
}

#[derive(Debug)]
pub struct PushReport {
    pub name: String,
    pub outcome: PushOutcome,
    pub ahead_uploaded: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct AheadRecord {
    repo: String,
    // The file's identity, field by field: serde's flatten cannot carry i128.
    size: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

impl AheadRecord {
    fn file(&self) -> FileIdentity {
        FileIdentity {
            size: self.size,
            ino: self.ino,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        }
    }
}

/// What tells one file from another, or from itself rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    size: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            size: m.len(),
            ino: m.ino(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Check and consume a look-ahead record. True when the file was uploaded ahead and is unchanged.
fn take_ahead_record(record: &Path, file: &Path, repo_id: &str) -> bool {
    let Ok(text) = std::fs::read(record) else {
        return false;
    };
    let _ = std::fs::remove_file(record);
    let Ok(rec) = serde_json::from_slice::<AheadRecord>(&text) else {
        return false;
    };
    let Ok(now) = std::fs::metadata(file) else {
        return false;
    };
    rec.repo == repo_id && rec.file() == FileIdentity::of(&now)
}

/// Record that `name` was uploaded: its file as it was when the upload opened it, so a file
/// rewritten while it was read does not match the record.
fn write_ahead_record(
    dir: &Path,
    name: &str,
    file: FileIdentity,
    repo_id: &str,
    sha256: String,
) -> std::io::Result<()> {
    let rec = AheadRecord {
        repo: repo_id.to_string(),
        size: file.size,
        ino: file.ino,
        mtime_ns: file.mtime_ns,
        ctime_ns: file.ctime_ns,
        sha256,
    };
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp.{name}"));
    // No fsync: a record lost in a crash only costs a second (idempotent) upload.
    let written = std::fs::write(&tmp, serde_json::to_vec(&rec).expect("serialisable"))
        .and_then(|()| std::fs::rename(&tmp, dir.join(name)));
    if written.is_err() {
        // A full disk, say: leave no empty temp file behind (the next call prunes any anyway).
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Read the first page of a segment and check it is a WAL segment at the position its name says
/// (`check_header` checks it against the repository).
fn read_header(path: &Path, name: &WalFileName) -> Result<LongPageHeader, WalError> {
    use std::io::Read;
    let mut buf = [0u8; LONG_HEADER_LEN];
    let mut f = std::fs::File::open(path).map_err(|e| WalError::local("cannot open", path, e))?;
    f.read_exact(&mut buf)
        .map_err(|e| WalError::local("cannot read WAL page header of", path, e))?;
    let h = LongPageHeader::parse(&buf)
        .map_err(|e| WalError::Invalid(format!("{}: {e}", path.display())))?;
    check_header(&h, path, name, None)?;
    // A .partial file is a whole segment too (PostgreSQL fills it up with zeros). A short one,
    // archived, would hold its name for good: no later push may replace it.
    let len = f
        .metadata()
        .map_err(|e| WalError::local("cannot read the size of", path, e))?
        .len();
    if len != u64::from(h.segment_size) {
        return Err(WalError::Invalid(format!(
            "{} is {len} bytes, but its header says this cluster's WAL segments are {} bytes; \
             refusing to archive a truncated or padded segment (check the file system it is on)",
            path.display(),
            h.segment_size
        )));
    }
    Ok(h)
}

/// Check a segment's header against its name and, given one, the repository's `walship.json`.
fn check_header(
    h: &LongPageHeader,
    path: &Path,
    name: &WalFileName,
    meta: Option<&RepoMeta>,
) -> Result<(), WalError> {
    match super::header_mismatch(h, name, meta) {
        None => Ok(()),
        Some(HeaderMismatch::Position { header, name: by_name }) => Err(WalError::Invalid(format!(
            "{}: the WAL page header says the file starts at {}, but its name says {}; refusing to archive a misnamed segment",
            path.display(),
            super::name::format_lsn(header),
            super::name::format_lsn(by_name)
        ))),
        Some(HeaderMismatch::System { header, repository }) => Err(WalError::ForeignCluster(format!(
            "{name} belongs to database system {header}, but the repository holds WAL of system {repository}; \
             every cluster needs its own repository (a different prefix or directory)"
        ))),
        Some(HeaderMismatch::Format {
            magic,
            segment_size,
            repository_magic,
            repository_segment_size,
        }) => Err(WalError::ForeignCluster(format!(
            "{name}: WAL format (magic {magic:#06x}, segment size {segment_size}) differs from the repository's \
             (magic {repository_magic:#06x}, segment size {repository_segment_size}); use a new repository after a major upgrade"
        ))),
    }
}

fn meta_for(h: &LongPageHeader, recipients: &Recipients) -> RepoMeta {
    RepoMeta {
        format: REPO_FORMAT,
        system_identifier: h.system_identifier.to_string(),
        wal_page_magic: h.magic,
        pg_major: h.pg_major(),
        wal_segment_size: u64::from(h.segment_size),
        wal_block_size: h.block_size,
        codec: "zstd+age-x25519".into(),
        recipient_fingerprints: recipients.fingerprints(),
        created_at: crate::time::now_rfc3339(),
        created_by: format!("walship {}", env!("CARGO_PKG_VERSION")),
    }
}

/// What `push_one` did, with the sha256 of what it read and the file as it was when opened.
struct Pushed {
    outcome: PushOutcome,
    sha256: String,
    file: FileIdentity,
}

/// Push one file: checks, encode on a blocking thread, conditional put.
async fn push_one(ctx: &PushContext, path: &Path, name: &WalFileName) -> Result<Pushed, WalError> {
    let is_wal = matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial);
    let read_meta;
    let meta: Option<&RepoMeta> = if is_wal {
        // First push ever into this repository: create walship.json from this segment's header.
        let h = read_header(path, name)?;
        let meta = ctx
            .meta
            .get_or_try_init(|| async {
                let wanted = meta_for(&h, &ctx.recipients);
                ctx.archive.ensure_meta(&wanted).await
            })
            .await?;
        check_header(&h, path, name, Some(meta))?;
        Some(meta)
    } else {
        // History and backup-history files carry no system identifier: the server's pg_control
        // (beside the pg_wal the file is in) says whose they are. Stored once, a foreign one would
        // stay for good, and a history file steers every later recovery's choice of timeline.
        read_meta = ctx.archive.read_meta().await?;
        if let Some(meta) = &read_meta {
            check_control(path, name, meta)?;
        }
        read_meta.as_ref()
    };
    if let Some(meta) = meta {
        let ours = ctx.recipients.fingerprints();
        if !meta.recipient_fingerprints.is_empty() && meta.recipient_fingerprints != ours {
            return Err(WalError::ForeignCluster(format!(
                "the configured recipients (fingerprints {}) differ from the repository's ({}); the restoring identity could not decrypt this segment. \
                 Use the repository's recipients, or a new repository for new keys",
                ours.join(","),
                meta.recipient_fingerprints.join(",")
            )));
        }
    }
    let file = std::fs::File::open(path).map_err(|e| WalError::local("cannot open", path, e))?;
    let identity = file
        .metadata()
        .map(|m| FileIdentity::of(&m))
        .map_err(|e| WalError::local("cannot stat", path, e))?;
    let recipients = ctx.recipients.clone();
    let level = ctx.compression_level;
    let p = path.to_path_buf();
    let enc = tokio::task::spawn_blocking(move || {
        codec::encode(
            std::io::BufReader::with_capacity(1 << 20, file),
            &recipients,
            level,
        )
    })
    .await
    .expect("encode task does not panic")
    .map_err(|source| WalError::Encode { path: p, source })?;
    let sha256 = enc.header.sha256_hex();
    let key = repo::wal_key(name);
    let outcome = match ctx.archive.put_unless_archived(&key, enc).await? {
        Stored::Created { stored_bytes, .. } => PushOutcome::Uploaded { stored_bytes },
        Stored::AlreadyThere => PushOutcome::AlreadyArchived,
    };
    Ok(Pushed {
        outcome,
        sha256,
        file: identity,
    })
}

/// Refuse a history or backup-history file from a server that is not the repository's cluster,
/// judged by `global/pg_control` in the data directory holding the file's pg_wal. Not judged when
/// there is no such file (a file pushed by hand from elsewhere).
fn check_control(path: &Path, name: &WalFileName, meta: &RepoMeta) -> Result<(), WalError> {
    let Some(data_dir) = path.parent().and_then(Path::parent) else {
        return Ok(());
    };
    let data_dir = if data_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        data_dir
    };
    match crate::pg::control_system_identifier(data_dir) {
        Some(id) if id.to_string() != meta.system_identifier => {
            Err(WalError::ForeignCluster(format!(
                "{name} comes from the cluster with system identifier {id} (its pg_control), \
                 the repository belongs to {}; give each cluster its own repository (prefix)",
                meta.system_identifier
            )))
        }
        _ => Ok(()),
    }
}

/// `.ready` files other than `skip`, oldest first, history files first (as PostgreSQL orders them).
fn ready_files(archive_status: &Path, skip: &str, limit: usize) -> Vec<WalFileName> {
    let Ok(entries) = std::fs::read_dir(archive_status) else {
        return Vec::new();
    };
    let ready: Vec<WalFileName> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .map(str::to_string)
        })
        .filter_map(|n| WalFileName::parse(&n).ok())
        .collect();
    // A timeline's history goes first, alone, by PostgreSQL's own call for it: refused (the
    // timeline is taken in this repository, by a drill or another promotion), nothing of this
    // server's timeline may be stored under names the other history owns.
    let first_unarchived_timeline = ready
        .iter()
        .filter(|n| n.kind() == WalFileKind::History)
        .map(WalFileName::timeline)
        .min()
        .unwrap_or(u32::MAX);
    let mut names: Vec<WalFileName> = ready
        .into_iter()
        .filter(|n| n.as_str() != skip && n.timeline() < first_unarchived_timeline)
        .collect();
    names.sort_by_key(|n| n.as_str().to_string());
    names.truncate(limit);
    names
}

/// Remove records whose file is gone (PostgreSQL archived and recycled it meanwhile).
fn prune_records(dir: &Path, pg_wal: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(".tmp") || !pg_wal.join(&*n).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A history file the archive holds with other content means the timeline was taken: another
/// promotion in this repository (a restore drill or copy that archived here, an earlier failover)
/// that this server did not see when it was promoted, since PostgreSQL picks one past the newest
/// history file its restore_command finds. Say so: archiving stays stuck on this file. Likewise
/// a `.partial` file of the old timeline that differs from the archived one.
fn explain_conflict(name: &WalFileName, e: WalError) -> WalError {
    match e {
        WalError::Archive(ArchiveError::Conflict(why)) if name.kind() == WalFileKind::History => {
            WalError::Archive(ArchiveError::Conflict(format!(
                "{why}. Timeline {tli} is taken in this repository by another promotion (a restore \
                 drill or copy archiving here, or an earlier failover) that this server did not \
                 see: PostgreSQL picks one past the newest history file restore_command finds, so \
                 give standbys restore_command = 'walship wal-fetch %f %p'. Archiving stays stuck \
                 here and pg_wal grows: point archive_command at a new repository prefix and take a \
                 base backup there",
                tli = name.timeline()
            )))
        }
        WalError::Archive(ArchiveError::Conflict(why)) if name.kind() == WalFileKind::Partial => {
            WalError::Archive(ArchiveError::Conflict(format!(
                "{why}. Two servers were promoted from this timeline's segment (a failover and a \
                 second promotion, or a split brain), each archiving its own end of the old \
                 timeline under this name. Recovery never reads .partial files; the archived one \
                 stays. To let archiving go on, copy pg_wal/{name} somewhere safe, then rename \
                 pg_wal/archive_status/{name}.ready to {name}.done"
            )))
        }
        e => e,
    }
}

/// How long uploads ahead may go without one finishing, once PostgreSQL's own file is done: four
/// times what that file took (a slow link is not a stall), and never less than a segment of
/// `segment_bytes` takes at 256 KiB/s (S3 puts get as long: 64 s for 16 MiB) or 30 s.
fn ahead_stall_limit(own_took: Duration, segment_bytes: u64) -> Duration {
    let slow_link = crate::storage::slow_link_time(segment_bytes);
    (own_took * 4).max(slow_link).max(Duration::from_secs(30))
}

/// The name PostgreSQL gave (%p's file name), validated.
fn wal_name_of(path: &Path) -> Result<WalFileName, WalError> {
    let fname = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| WalError::Invalid(format!("{} has no file name", path.display())))?;
    Ok(WalFileName::parse(fname)?)
}

/// One records directory per repository: a cluster that archives into two repositories
/// (`wal-push` twice in archive_command) keeps the look-ahead of each instead of each call
/// consuming, and so wasting, the other's records.
fn records_dir(settings: &WalSettings, pg_wal: &Path, repo_id: &str) -> std::path::PathBuf {
    let digest = Sha256::digest(repo_id.as_bytes());
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    state_dir(settings.state_dir.as_deref(), pg_wal)
        .join("pushed")
        .join(tag)
}

/// The fast path, taken before any storage client is set up: true when an earlier call uploaded
/// `path` ahead and the file is unchanged since (its record is consumed).
pub fn uploaded_ahead(settings: &WalSettings, repo_id: &str, path: &Path) -> bool {
    let Ok(name) = wal_name_of(path) else {
        return false;
    };
    let records = records_dir(settings, &parent_dir(path), repo_id);
    take_ahead_record(&records.join(name.as_str()), path, repo_id)
}

pub async fn push(ctx: Arc<PushContext>, path: &Path) -> Result<PushReport, WalError> {
    let name = wal_name_of(path)?;
    let fname = name.as_str();
    let pg_wal = parent_dir(path);
    let records = records_dir(&ctx.settings, &pg_wal, &ctx.repo_id);
    let mut report = PushReport {
        name: name.to_string(),
        outcome: PushOutcome::AlreadyUploadedAhead,
        ahead_uploaded: vec![],
        warnings: vec![],
    };

    if take_ahead_record(&records.join(fname), path, &ctx.repo_id) {
        return Ok(report);
    }
    // One stat: the system's error ("No such file or directory", "Permission denied"), not a
    // made-up one, or a path that is not a file.
    match std::fs::metadata(path) {
        // Most often %f (the bare name) given for %p, or the command run by hand elsewhere.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let e = std::io::Error::new(
                e.kind(),
                format!(
                    "{e}; archive_command must pass %p, the path relative to the data directory \
                     PostgreSQL runs it in: archive_command = 'walship wal-push %p'"
                ),
            );
            return Err(WalError::local("cannot archive", path, e));
        }
        Err(e) => return Err(WalError::local("cannot archive", path, e)),
        Ok(m) if !m.is_file() => {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(WalError::local("cannot archive", path, e));
        }
        Ok(_) => {}
    }

    // Look-ahead: other .ready files, uploaded alongside ours with bounded concurrency.
    let ahead: Vec<WalFileName> = if ctx.settings.lookahead > 0 {
        prune_records(&records, &pg_wal);
        // Records kept directly in `pushed/` by earlier versions, once their segments are gone.
        if let Some(all) = records.parent() {
            prune_records(all, &pg_wal);
        }
        ready_files(
            &pg_wal.join("archive_status"),
            fname,
            ctx.settings.lookahead,
        )
        .into_iter()
        .filter(|n| !records.join(n.as_str()).exists())
        .collect()
    } else {
        Vec::new()
    };
    let sem = Arc::new(Semaphore::new(ctx.settings.upload_concurrency));
    // PostgreSQL waits for its own segment: it takes the first slot, before any look-ahead task.
    let own_permit = sem.clone().acquire_owned().await.expect("semaphore open");
    let mut tasks = tokio::task::JoinSet::new();
    for n in ahead {
        let (ctx, sem, records, file) = (
            ctx.clone(),
            sem.clone(),
            records.clone(),
            pg_wal.join(n.as_str()),
        );
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore open");
            let res = push_one(&ctx, &file, &n).await;
            if let Ok(done) = &res {
                if let Err(e) = write_ahead_record(
                    &records,
                    n.as_str(),
                    done.file,
                    &ctx.repo_id,
                    done.sha256.clone(),
                ) {
                    return (
                        n,
                        Err(WalError::local(
                            "cannot write look-ahead record in",
                            &records,
                            e,
                        )),
                    );
                }
            }
            (n, res.map(|done| done.outcome))
        });
    }
    let own_started = Instant::now();
    let own = push_one(&ctx, path, &name).await;
    let segment_bytes = ctx
        .meta
        .get()
        .map_or(super::name::DEFAULT_SEGMENT_SIZE, |m| m.wal_segment_size);
    let stall = ahead_stall_limit(own_started.elapsed(), segment_bytes);
    drop(own_permit);
    if own.is_err() {
        // Refused (another cluster, a taken name) or failing: uploads ahead of a file PostgreSQL
        // must retry would claim names before the cause is seen to. Puts are atomic, so one
        // stopped mid-way stores nothing.
        tasks.abort_all();
    }
    // PostgreSQL learns that its file is archived only when this call returns: uploads ahead
    // that stop making progress (a stalled connection) must not hold that back for the SDK's
    // timeouts and retries. A stopped one is pushed by PostgreSQL's own call for it.
    loop {
        let joined = match tokio::time::timeout(stall, tasks.join_next()).await {
            Ok(Some(joined)) => joined,
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    "look-ahead made no progress for {} s after {name} was archived; stopped \
                     its {} unfinished uploads (PostgreSQL's own calls will push those files)",
                    stall.as_secs(),
                    tasks.len()
                );
                tasks.abort_all();
                continue;
            }
        };
        let (n, res) = match joined {
            Ok(done) => done,
            Err(e) if e.is_cancelled() => continue,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match res {
            Ok(_) => report.ahead_uploaded.push(n.to_string()),
            // PostgreSQL will call us for it anyway; the error then surfaces with its own call.
            Err(e) => tracing::debug!("look-ahead upload of {n} failed: {e}"),
        }
    }
    let outcome = own.map_err(|e| explain_conflict(&name, e))?.outcome;
    let spool = super::spool::Spool::new(
        &state_dir(ctx.settings.state_dir.as_deref(), &pg_wal),
        &ctx.repo_id,
    );
    let (files, bytes) = spool.sweep_abandoned();
    if files > 0 {
        tracing::info!(
            "removed {files} files ({} MiB) that a killed prefetcher left in {}",
            bytes >> 20,
            spool.dir().display()
        );
    }
    if outcome == PushOutcome::AlreadyArchived {
        report.warnings.push(format!(
            "{name} was already archived with the same content (sha256 and size match); nothing to do"
        ));
    }
    report.outcome = outcome;
    report.ahead_uploaded.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walpage::synthetic_header;
    use std::path::PathBuf;

    fn seg(dir: &Path, name: &str, sysid: u64) -> PathBuf {
        let n = WalFileName::parse(name).unwrap();
        let id = n.segment().unwrap();
        let seg_size = 1u32 << 24;
        let mut body = synthetic_header(
            sysid,
            id.timeline,
            id.segno(u64::from(seg_size)) * u64::from(seg_size),
            seg_size,
        );
        body.resize(4096, 7);
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        // Whole-segment size, sparse.
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(u64::from(seg_size))
            .unwrap();
        p
    }

    /// Look-ahead on (the default 16, 3 uploads at once), prefetch off.
    fn settings() -> WalSettings {
        WalSettings {
            lookahead: 16,
            upload_concurrency: 3,
            prefetch: 0,
            download_concurrency: 1,
            state_dir: None,
            fetch_attempts: 1,
            standby_fetch_timeout: None,
            prefetch_idle: Duration::from_secs(1),
            prefetch_min_free: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn look_ahead_that_stops_making_progress_does_not_hold_back_postgresqls_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store_dir, pg_wal) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(&store_dir).unwrap();
        std::fs::create_dir_all(pg_wal.join("archive_status")).unwrap();
        let names = [
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
        ];
        for n in names {
            seg(&pg_wal, n, 42);
            std::fs::write(
                pg_wal.join("archive_status").join(format!("{n}.ready")),
                b"",
            )
            .unwrap();
        }
        // Segment 5's upload stalls for good; 3 (PostgreSQL's) and 4 (ahead) go through.
        let store = Arc::new(crate::storage::testing::Faulty::hanging(
            &store_dir,
            "000000010000000000000005",
        ));
        let (text, _) = codec::generate_identity();
        let ids = codec::Identities::parse(&text, "test").unwrap();
        let ctx = Arc::new(PushContext {
            archive: Archive::new(store),
            recipients: ids.recipients(),
            compression_level: 1,
            settings: settings(),
            repo_id: "file:///repo".into(),
            meta: OnceCell::new(),
        });
        let started = tokio::time::Instant::now();
        let report = tokio::time::timeout(
            Duration::from_secs(3600),
            push(ctx.clone(), &pg_wal.join(names[0])),
        )
        .await
        .expect("the stall limit ends the wait, not the stalled upload")
        .unwrap();
        let waited = started.elapsed();
        assert_eq!(report.ahead_uploaded, [names[1]]);
        // 16 MiB segments at 256 KiB/s.
        assert!(
            waited >= Duration::from_secs(64) && waited < Duration::from_secs(100),
            "returned after {waited:?}"
        );
        // The stalled file was not recorded as pushed: PostgreSQL's call for it pushes it.
        assert!(uploaded_ahead(
            &ctx.settings,
            &ctx.repo_id,
            &pg_wal.join(names[1])
        ));
        assert!(!uploaded_ahead(
            &ctx.settings,
            &ctx.repo_id,
            &pg_wal.join(names[2])
        ));
    }

    #[test]
    fn misnamed_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = seg(dir.path(), "000000010000000000000003", 42);
        let wrong = dir.path().join("000000010000000000000004");
        std::fs::rename(&p, &wrong).unwrap();
        let n = WalFileName::parse("000000010000000000000004").unwrap();
        let err = read_header(&wrong, &n).unwrap_err();
        assert!(err.to_string().contains("misnamed"), "{err}");
    }

    #[test]
    fn conflicts_over_history_and_partial_files_say_why_and_what_to_do() {
        let conflict = || WalError::Archive(ArchiveError::Conflict("differs".into()));
        let explained = |name: &str| {
            explain_conflict(&WalFileName::parse(name).unwrap(), conflict()).to_string()
        };
        assert!(explained("00000003.history").contains("Timeline 3 is taken"));
        let partial = explained("000000010000000000000005.partial");
        assert!(
            partial.contains("Two servers were promoted from this timeline's segment")
                && partial.contains(
                    "rename pg_wal/archive_status/000000010000000000000005.partial.ready to \
                     000000010000000000000005.partial.done"
                ),
            "{partial}"
        );
        assert_eq!(explained("000000010000000000000005"), "differs");
    }

    #[test]
    fn a_segment_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let name = "000000010000000000000003";
        let p = seg(dir.path(), name, 42);
        let n = WalFileName::parse(name).unwrap();
        read_header(&p, &n).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_len(8192).unwrap();
        let err = read_header(&p, &n).unwrap_err();
        assert!(
            err.to_string().contains(
                "is 8192 bytes, but its header says this cluster's WAL segments are 16777216 bytes"
            ),
            "{err}"
        );
        assert_eq!(crate::exit::for_wal_push(&err), crate::exit::CONFLICT);
    }

    #[test]
    fn each_repository_keeps_its_own_records() {
        let settings = settings();
        let wal = Path::new("/data/pg_wal");
        let a = records_dir(&settings, wal, "s3://bucket/a");
        assert_eq!(a, records_dir(&settings, wal, "s3://bucket/a"));
        assert_ne!(a, records_dir(&settings, wal, "file:///backup/a"));
        assert!(
            a.starts_with("/data/pg_wal/.walship/pushed/"),
            "{}",
            a.display()
        );
    }

    #[test]
    fn pruning_drops_records_of_recycled_segments_and_keeps_other_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(&wal).unwrap();
        seg(&wal, "000000010000000000000004", 42);
        let pushed = dir.path().join("pushed");
        let ours = pushed.join("aaaaaaaaaaaa");
        let theirs = pushed.join("bbbbbbbbbbbb");
        for d in [&ours, &theirs] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in [
            ours.join("000000010000000000000003"),
            ours.join("000000010000000000000004"),
            ours.join(".tmp.1"),
            theirs.join("000000010000000000000003"),
            pushed.join("000000010000000000000002"), // an earlier version's layout
        ] {
            std::fs::write(f, b"record").unwrap();
        }
        prune_records(&ours, &wal);
        prune_records(&pushed, &wal);
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(&ours), ["000000010000000000000004"]);
        assert_eq!(names(&pushed), ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]);
        assert_eq!(
            names(&theirs),
            ["000000010000000000000003"],
            "pruned by its own calls"
        );
    }

    #[test]
    fn ahead_record_is_trusted_only_for_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = seg(dir.path(), "000000010000000000000003", 42);
        let rec = dir.path().join("rec");
        let record = rec.join("000000010000000000000003");
        let opened = || FileIdentity::of(&std::fs::metadata(&p).unwrap());
        let write = |file| {
            write_ahead_record(&rec, "000000010000000000000003", file, "repo-a", "x".into())
                .unwrap()
        };
        write(opened());
        assert!(
            !take_ahead_record(&record, &p, "repo-b"),
            "other repository"
        );
        write(opened());
        assert!(take_ahead_record(&record, &p, "repo-a"));
        assert!(!record.exists(), "a record is used once");
        write(opened());
        std::fs::remove_file(&p).unwrap();
        seg(dir.path(), "000000010000000000000003", 43); // replaced by another file
        assert!(!take_ahead_record(&record, &p, "repo-a"));
        // Rewritten in place while its upload read it: the record holds the file as the upload
        // opened it, which no longer matches.
        let before = opened();
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        drop(f);
        write(before);
        assert!(!take_ahead_record(&record, &p, "repo-a"));
    }

    #[test]
    fn look_ahead_skips_the_current_file_and_any_timeline_whose_history_is_not_archived() {
        let dir = tempfile::tempdir().unwrap();
        let ready = |names: &[&str]| {
            for n in names {
                std::fs::write(dir.path().join(format!("{n}.ready")), b"").unwrap();
            }
        };
        ready(&[
            "000000010000000000000005",
            "000000010000000000000004",
            "000000010000000000000003",
            "junk",
        ]);
        std::fs::write(dir.path().join("000000010000000000000002.done"), b"").unwrap();
        let ahead = |skip: &str| -> Vec<String> {
            ready_files(dir.path(), skip, 10)
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(
            ahead("000000010000000000000003"),
            ["000000010000000000000004", "000000010000000000000005"]
        );
        assert_eq!(ready_files(dir.path(), "", 1).len(), 1);
        // After a promotion: the old timeline's last segment goes ahead, the new timeline's
        // files wait until its history is archived, whichever file PostgreSQL asks for.
        ready(&[
            "00000002.history",
            "000000010000000000000006.partial",
            "000000020000000000000006",
            "000000020000000000000007",
        ]);
        let old_timeline = [
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000006.partial",
        ];
        assert_eq!(ahead("000000010000000000000003"), old_timeline);
        let mut with_three = vec!["000000010000000000000003"];
        with_three.extend(old_timeline);
        assert_eq!(ahead("00000002.history"), with_three);
        // Once it is: the new timeline's segments too.
        std::fs::rename(
            dir.path().join("00000002.history.ready"),
            dir.path().join("00000002.history.done"),
        )
        .unwrap();
        assert_eq!(ahead("000000010000000000000003").len(), 5);
    }
}
