//! `backup-push`: a non-exclusive base backup of a running server (primary or standby).
//!
//! 1. `pg_backup_start` on one session, which stays open to the end (the backup is aborted if the
//!    session ends, e.g. when walship is killed).
//! 2. One thread walks and reads the data directory and its tablespaces, cutting the bytes into
//!    parts of `part_size`; as many parts as there are cores are encoded (sha256, zstd, age) at
//!    once and `upload_concurrency` uploaded at once. Memory: at most `threads + uploads + 2`
//!    parts.
//! 3. `pg_backup_stop`, then wait until the WAL segment holding the stop point is in *this*
//!    repository: without it the backup cannot be made consistent.
//! 4. The manifest, encrypted, last. Until it exists the backup does not.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::Client;

use super::progress::Progress;
use super::walk::{self, WalkedFile};
use super::BackupError;
use crate::archive::{Archive, ArchiveError, Stored};
use crate::codec::{self, Recipients};
use crate::pg::conn::PgError;
use crate::repo::backup::{self as layout, BackupManifest, FileEntry, PartEntry, MANIFEST_FORMAT};
use crate::repo::{self, RepoMeta};
use crate::storage::StorageError;
use crate::time::epoch_rfc3339;
use crate::wal::name::{format_lsn, parse_lsn, SegmentId, WalFileName};

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub part_size: usize,
    pub threads: usize,
    pub upload_concurrency: usize,
    pub compression_level: i32,
    /// The data directory, when it cannot be asked from the server (e.g. another mount path).
    pub pgdata: Option<PathBuf>,
    /// How long to wait for the backup's last WAL segment to reach the archive.
    pub wal_wait: Duration,
}

struct ServerFacts {
    version_num: u32,
    data_directory: PathBuf,
    wal_segment_size: u64,
    system_identifier: String,
    in_recovery: bool,
}

async fn server_facts(pg: &Client) -> Result<ServerFacts, BackupError> {
    let row = pg
        .query_one(
            "SELECT current_setting('server_version_num')::int4, \
                    current_setting('data_directory'), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(PgError::query(
            "reading server settings (the backup role needs pg_read_all_settings or superuser)",
        ))?;
    Ok(ServerFacts {
        version_num: row.get::<_, i32>(0) as u32,
        data_directory: PathBuf::from(row.get::<_, String>(1)),
        wal_segment_size: row.get::<_, i64>(2) as u64,
        system_identifier: row.get(3),
        in_recovery: row.get(4),
    })
}

async fn epoch(pg: &Client) -> Result<f64, BackupError> {
    Ok(pg
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .map_err(PgError::query("reading the server's clock"))?
        .get(0))
}

/// `YYYYMMDDTHHMMSSZ` of an RFC 3339 UTC time.
fn id_of(rfc: &str) -> String {
    rfc.chars().filter(|c| *c != '-' && *c != ':').collect()
}

/// A line `KEY: value` of backup_label.
fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Start timeline and start WAL file from backup_label.
pub fn parse_label(label: &str) -> Option<(u32, String)> {
    let tli = label_field(label, "START TIMELINE")?.parse().ok()?;
    let loc = label_field(label, "START WAL LOCATION")?;
    let file = loc.split("(file ").nth(1)?.trim_end_matches(')').trim();
    WalFileName::parse(file).ok()?;
    Some((tli, file.to_string()))
}

fn check_cluster(meta: &RepoMeta, facts: &ServerFacts, repo: &str) -> Result<(), BackupError> {
    if meta.system_identifier != facts.system_identifier {
        return Err(BackupError::ForeignCluster(format!(
            "{repo} belongs to the cluster with system identifier {}, this server is {}; \
             use a separate repository (prefix) per cluster",
            meta.system_identifier, facts.system_identifier
        )));
    }
    Ok(())
}

pub async fn push(
    archive: &Archive,
    recipients: Arc<Recipients>,
    pg: &Client,
    opts: &PushOptions,
) -> Result<BackupManifest, BackupError> {
    let facts = server_facts(pg).await?;
    let describe = archive.store().describe();
    if let Some(meta) = archive.read_meta().await? {
        check_cluster(&meta, &facts, &describe)?;
    }
    let pgdata = opts.pgdata.clone().unwrap_or(facts.data_directory.clone());
    if !pgdata.join("PG_VERSION").is_file() {
        return Err(BackupError::Invalid(format!(
            "{} is not the server's data directory (no PG_VERSION there); walship backup-push \
             runs on the database host; give the directory with --pgdata if it is mounted elsewhere",
            pgdata.display()
        )));
    }

    // An id nobody used: the start time, to the second.
    let (id, start_epoch) = loop {
        let e = epoch(pg).await?;
        let id = id_of(&epoch_rfc3339(e));
        let prefix = format!("{}{id}/", layout::BACKUPS_PREFIX);
        let used = archive
            .store()
            .list(&prefix)
            .await
            .map_err(ArchiveError::from)?;
        if used.is_empty() {
            break (id, e);
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    };
    let start_lsn: String = pg
        .query_one(
            "SELECT pg_backup_start($1, true)::text",
            &[&format!("walship {id}")],
        )
        .await
        .map_err(PgError::query(
            "pg_backup_start (the backup role needs EXECUTE on pg_backup_start/pg_backup_stop)",
        ))?
        .get(0);
    tracing::info!(
        "backup {id}: started at {start_lsn}{}",
        if facts.in_recovery {
            " on a standby"
        } else {
            ""
        }
    );

    let walk_dir = pgdata.clone();
    let walked = tokio::task::spawn_blocking(move || walk::walk(&walk_dir))
        .await
        .expect("walk does not panic")
        .map_err(|e| BackupError::local("cannot walk the data directory", &pgdata, e))?;
    let total = walked.total_size();
    tracing::info!(
        "backup {id}: {} files, {} bytes, {} tablespaces",
        walked.files.len(),
        total,
        walked.tablespaces.len()
    );
    let progress = Arc::new(Progress::new("backup-push", total));
    let (files, parts) = upload_parts(
        archive,
        recipients.clone(),
        &id,
        walked.files,
        opts,
        progress.clone(),
    )
    .await?;
    progress.finish();

    let row = pg
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(true)",
            &[],
        )
        .await
        .map_err(PgError::query("pg_backup_stop"))?;
    let stop_lsn: String = row.get(0);
    let label: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let stop_epoch = epoch(pg).await?;
    let (timeline, start_wal) = parse_label(&label).ok_or_else(|| {
        PgError::Unexpected(format!(
            "cannot read the backup label PostgreSQL returned: {label}"
        ))
    })?;
    let stop = parse_lsn(&stop_lsn)
        .ok_or_else(|| PgError::Unexpected(format!("bad stop LSN {stop_lsn}")))?;
    // The last segment recovery needs: the one holding the byte before the stop point.
    let stop_wal =
        SegmentId::containing(timeline, stop.saturating_sub(1), facts.wal_segment_size).file_name();
    tracing::info!("backup {id}: stopped at {stop_lsn}; waiting for {stop_wal} in the archive");
    wait_archived(archive, &stop_wal, opts.wal_wait).await?;
    // Archiving has run by now, so the repository has its metadata: check it is ours.
    match archive.read_meta().await? {
        Some(meta) => check_cluster(&meta, &facts, &describe)?,
        None => {
            return Err(BackupError::WalNotArchived(format!(
                "{describe} has no walship.json although {stop_wal} is there; is it a walship repository?"
            )))
        }
    }

    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        system_identifier: facts.system_identifier,
        pg_version_num: facts.version_num,
        wal_segment_size: facts.wal_segment_size,
        timeline,
        start_lsn,
        stop_lsn: format_lsn(stop),
        start_wal,
        stop_wal: stop_wal.to_string(),
        start_time: epoch_rfc3339(start_epoch),
        stop_time: epoch_rfc3339(stop_epoch),
        start_epoch,
        stop_epoch,
        from_standby: facts.in_recovery,
        backup_label: label,
        tablespace_map: spcmap.filter(|s| !s.is_empty()),
        tablespaces: walked.tablespaces,
        dirs: walked.dirs,
        files,
        parts,
        compression_level: opts.compression_level,
        walship_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    manifest.pieces().map_err(|why| BackupError::BadManifest {
        id: id.clone(),
        why: format!("internal error, the manifest does not add up: {why}"),
    })?;
    let json = serde_json::to_vec(&manifest).expect("manifest serialises");
    archive
        .put_plain(
            &layout::manifest_key(&id),
            json,
            &recipients,
            opts.compression_level,
        )
        .await?;
    tracing::info!(
        "backup {id}: complete; {} bytes stored for {} bytes",
        manifest.stored_size(),
        manifest.original_size()
    );
    Ok(manifest)
}

/// Wait until `name` is in the archive.
pub async fn wait_archived(
    archive: &Archive,
    name: &WalFileName,
    limit: Duration,
) -> Result<(), BackupError> {
    let key = repo::wal_key(name);
    let since = Instant::now();
    loop {
        match archive.header(&key).await {
            Ok(_) => return Ok(()),
            Err(ArchiveError::Storage(StorageError::NotFound(_))) => {}
            Err(e) => return Err(e.into()),
        }
        if since.elapsed() >= limit {
            return Err(BackupError::WalNotArchived(format!(
                "WAL segment {name}, which the backup needs, did not reach {} within {} s; \
                 check that archive_mode is on and archive_command is `walship wal-push %p` \
                 (PostgreSQL's log shows archiver failures), then take the backup again",
                archive.store().describe(),
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Read `files` into parts and upload them; the files as recorded (sizes as read) and the parts.
async fn upload_parts(
    archive: &Archive,
    recipients: Arc<Recipients>,
    id: &str,
    files: Vec<WalkedFile>,
    opts: &PushOptions,
    progress: Arc<Progress>,
) -> Result<(Vec<FileEntry>, Vec<PartEntry>), BackupError> {
    let (tx, mut rx) = mpsc::channel::<(u32, Vec<u8>)>(1);
    let part_size = opts.part_size;
    let reader_progress = progress.clone();
    let reader = tokio::task::spawn_blocking(move || pack(files, part_size, tx, &reader_progress));

    let threads = opts.threads.max(1);
    let cpu = Arc::new(Semaphore::new(threads));
    let uploads = Arc::new(Semaphore::new(opts.upload_concurrency.max(1)));
    let in_memory = Arc::new(Semaphore::new(threads + opts.upload_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    let mut failed: Option<BackupError> = None;
    while let Some((index, data)) = rx.recv().await {
        let held = in_memory.clone().acquire_owned().await.expect("open");
        let (archive, recipients, cpu, uploads) = (
            archive.clone(),
            recipients.clone(),
            cpu.clone(),
            uploads.clone(),
        );
        let key = layout::part_key(id, index);
        let level = opts.compression_level;
        tasks.spawn(async move {
            let _held = held;
            let plain_size = data.len() as u64;
            let working = cpu.acquire_owned().await.expect("open");
            let key_s = key.to_string();
            let enc =
                tokio::task::spawn_blocking(move || codec::encode(&data[..], &recipients, level))
                    .await
                    .expect("encode does not panic")
                    .map_err(|source| ArchiveError::Codec { key: key_s, source })?;
            drop(working);
            let sha256 = enc.header.sha256_hex();
            let _uploading = uploads.acquire().await.expect("open");
            let stored_size = enc.bytes.len() as u64;
            let version_id = match archive.put(&key, enc).await? {
                Stored::Created { version_id, .. } => version_id,
                Stored::AlreadyThere => None,
            };
            Ok::<_, BackupError>(PartEntry {
                index,
                plain_size,
                stored_size,
                sha256,
                version_id,
            })
        });
        while let Some(done) = tasks.try_join_next() {
            match done.expect("part task does not panic") {
                Ok(p) => parts.push(p),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if failed.is_some() {
            break;
        }
    }
    drop(rx); // a reader still sending stops
    while let Some(done) = tasks.join_next().await {
        match done.expect("part task does not panic") {
            Ok(p) => parts.push(p),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let read = reader.await.expect("reader does not panic");
    if let Some(e) = failed {
        return Err(e);
    }
    let files = read?;
    parts.sort_by_key(|p| p.index);
    Ok((files, parts))
}

/// The reading thread: files back to back into parts of `part_size` bytes.
fn pack(
    files: Vec<WalkedFile>,
    part_size: usize,
    tx: mpsc::Sender<(u32, Vec<u8>)>,
    progress: &Progress,
) -> Result<Vec<FileEntry>, BackupError> {
    let mut out = Vec::with_capacity(files.len());
    let mut index = 0u32;
    let mut buf: Vec<u8> = Vec::with_capacity(part_size);
    let send = |index: u32, buf: Vec<u8>| {
        tx.blocking_send((index, buf))
            .map_err(|_| BackupError::Invalid("backup stopped: an upload failed".into()))
    };
    for f in files {
        let mut file = match File::open(&f.abs) {
            Ok(file) => file,
            // Removed since the walk (a dropped table): PostgreSQL's WAL replay accounts for it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(BackupError::local("cannot read", &f.abs, e)),
        };
        let (part, offset) = (index, buf.len() as u64);
        let mut size = 0u64;
        // Up to the size the walk saw: what is appended later is replayed from WAL.
        while size < f.size {
            let room = (part_size - buf.len()).min((f.size - size) as usize);
            let start = buf.len();
            buf.resize(start + room, 0);
            let n = read_up_to(&mut file, &mut buf[start..])
                .map_err(|e| BackupError::local("cannot read", &f.abs, e))?;
            buf.truncate(start + n);
            size += n as u64;
            progress.inc(n as u64);
            if buf.len() == part_size {
                send(
                    index,
                    std::mem::replace(&mut buf, Vec::with_capacity(part_size)),
                )?;
                index += 1;
            }
            if n < room {
                break; // shorter than when walked: truncated meanwhile
            }
        }
        out.push(FileEntry {
            path: f.path,
            size,
            mode: f.mode,
            mtime: f.mtime,
            part,
            offset,
        });
    }
    if !buf.is_empty() {
        send(index, buf)?;
    }
    Ok(out)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_label_fields() {
        let label = "START WAL LOCATION: 0/9000028 (file 000000010000000000000009)\n\
                     CHECKPOINT LOCATION: 0/9000060\n\
                     BACKUP METHOD: streamed\n\
                     BACKUP FROM: primary\n\
                     START TIME: 2026-11-24 01:02:03 UTC\n\
                     LABEL: walship 20261124T010203Z\n\
                     START TIMELINE: 1\n";
        assert_eq!(
            parse_label(label),
            Some((1, "000000010000000000000009".to_string()))
        );
        assert_eq!(parse_label("nonsense"), None);
        assert_eq!(id_of("2026-11-24T01:02:03Z"), "20261124T010203Z");
        assert!(layout::valid_id(&id_of(&epoch_rfc3339(1_795_000_000.4))));
    }
}
