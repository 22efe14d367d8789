//! `backup-push`: a non-exclusive base backup of a running server (primary or standby).
//!
//! 1. `pg_backup_start` on one session, which stays open to the end (the backup is aborted if the
//!    session ends, e.g. when walship is killed), with the server's timeouts turned off for it: it
//!    sits idle while the files upload.
//! 2. One thread walks and reads the data directory and its tablespaces, cutting the bytes into
//!    parts of `part_size`; as many parts as there are cores are encoded (sha256, zstd, age) at
//!    once and `upload_concurrency` uploaded at once. Memory: at most `threads + uploads + 2`
//!    parts.
//! 3. `pg_backup_stop` without its own wait for archiving (which has no time limit), then wait,
//!    at most `wal_wait`, until the WAL segment holding the stop point is in *this* repository:
//!    without it the backup cannot be made consistent.
//! 4. The manifest, encrypted, last. Until it exists the backup does not.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_postgres::Client;

use super::owner;
use super::progress::Progress;
use super::walk::{self, WalkedFile};
use super::BackupError;
use crate::archive::{Archive, ArchiveError, Stored};
use crate::codec::{self, Recipients};
use crate::pg::conn::{self, PgError};
use crate::pg::page;
use crate::repo::backup::{
    self as layout, BackupManifest, BackupSummary, FileEntry, PageChecks, PartEntry,
    MANIFEST_FORMAT,
};
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
    archive_mode: String,
    /// `archive_command`, or `archive_library` when that is set instead.
    archiver: String,
    /// The archiver's last failure (`<file> at <time>`) when it is more recent than its last success.
    archiver_failing: Option<String>,
    port: u16,
    /// `pg_postmaster_start_time()`, in seconds since the epoch.
    started: f64,
    /// The server's address on this connection; `None` over a Unix socket.
    address: Option<std::net::IpAddr>,
    /// Whether pages carry checksums (`initdb --data-checksums`), and the page geometry.
    data_checksums: bool,
    block_size: u64,
    /// Blocks per relation segment file (`segment_size`).
    relseg_blocks: u64,
}

async fn server_facts(pg: &Client) -> Result<ServerFacts, BackupError> {
    let row = pg
        .query_one(
            "SELECT current_setting('server_version_num')::int4, \
                    current_setting('data_directory'), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    pg_is_in_recovery(), \
                    current_setting('archive_mode'), \
                    current_setting('archive_command') || current_setting('archive_library'), \
                    (SELECT last_failed_wal || ' at ' || last_failed_time::text \
                       FROM pg_stat_archiver \
                      WHERE last_failed_time > coalesce(last_archived_time, '-infinity')), \
                    current_setting('port')::int4, \
                    extract(epoch FROM pg_postmaster_start_time())::float8, \
                    host(inet_server_addr()), \
                    current_setting('data_checksums') = 'on', \
                    current_setting('block_size')::int8, \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'segment_size')",
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
        archive_mode: row.get(5),
        archiver: row.get(6),
        archiver_failing: row.get(7),
        port: row.get::<_, i32>(8) as u16,
        started: row.get(9),
        address: row
            .get::<_, Option<String>>(10)
            .and_then(|a| a.parse().ok()),
        data_checksums: row.get(11),
        block_size: row.get::<_, i64>(12) as u64,
        relseg_blocks: row.get::<_, i64>(13) as u64,
    })
}

/// What backup-push needs to check pages against their checksums.
#[derive(Debug, Clone, Copy)]
struct PageGeometry {
    block_size: u64,
    relseg_blocks: u64,
    /// A failing page whose LSN is at or past this may have changed since the backup started:
    /// judged at the stop point.
    start_lsn: u64,
}

/// The most bad blocks a backup names, in memory and in its manifest; the rest are counted per
/// file. A disk that returned garbage would otherwise list every block of it.
const LISTED_BAD_BLOCKS: usize = 100_000;
/// The most failing pages with an LSN past the start held for the stop point to judge (24 bytes
/// each). Only pages PostgreSQL was writing as they were read are legitimately among them,
/// a handful at most; more are corruption.
const HELD_UNSETTLED: usize = 500_000;

/// What the page checks found: counts, the bad pages as (file index, block) up to
/// [`LISTED_BAD_BLOCKS`] and per-file counts beyond, and the failing pages whose LSN is at or
/// past the start as (file index, block, LSN), which the stop point settles.
#[derive(Debug, Default)]
struct PageFindings {
    checks: PageChecks,
    bad: Vec<(usize, u32)>,
    unlisted: std::collections::BTreeMap<usize, u64>,
    unsettled: Vec<(usize, u32, u64)>,
    /// Failing pages past the start that were not held (past [`HELD_UNSETTLED`], those with
    /// the lowest LSNs): how many per file, and the highest LSN among them.
    shed: std::collections::BTreeMap<usize, u64>,
    shed_max_lsn: u64,
}

impl PageFindings {
    fn bad_page(&mut self, file: usize, block: u32) {
        self.checks.verified += 1;
        self.checks.bad += 1;
        self.list_bad(file, block);
    }

    fn list_bad(&mut self, file: usize, block: u32) {
        match self.bad.len() < LISTED_BAD_BLOCKS {
            true => self.bad.push((file, block)),
            false => *self.unlisted.entry(file).or_default() += 1,
        }
    }

    fn add(&mut self, other: PageFindings) {
        self.checks.verified += other.checks.verified;
        self.checks.changed += other.checks.changed;
        self.checks.bad += other.checks.bad;
        for (file, block) in other.bad {
            self.list_bad(file, block);
        }
        for (file, n) in other.unlisted {
            *self.unlisted.entry(file).or_default() += n;
        }
        self.unsettled.extend(other.unsettled);
        for (file, n) in other.shed {
            *self.shed.entry(file).or_default() += n;
        }
        self.shed_max_lsn = self.shed_max_lsn.max(other.shed_max_lsn);
        if self.unsettled.len() > HELD_UNSETTLED {
            self.shed_lowest(HELD_UNSETTLED / 2);
        }
    }

    /// Keep the `keep` failing pages with the highest LSNs: a corrupted LSN lands far in the
    /// future, among them.
    fn shed_lowest(&mut self, keep: usize) {
        self.unsettled
            .select_nth_unstable_by_key(keep, |&(_, _, lsn)| std::cmp::Reverse(lsn));
        for (file, _, lsn) in self.unsettled.drain(keep..) {
            *self.shed.entry(file).or_default() += 1;
            self.shed_max_lsn = self.shed_max_lsn.max(lsn);
        }
    }

    /// Judge the failing pages that carried an LSN at or past the start, now that the backup's
    /// stop point is known: a page is written to disk only after the WAL up to its LSN, so one
    /// read before the stop with an LSN past it was corrupted there (the torn read of a page
    /// PostgreSQL was writing has a real LSN, and replay rewrites that page). Then record the
    /// bad blocks in the files' entries.
    ///
    /// The pages shed to bound memory were not judged one by one: when even the highest of
    /// their LSNs is past the stop, they all count as bad, unlisted (so many failing pages are
    /// corruption, not reads racing writes); otherwise all as changed.
    fn settle(mut self, stop_lsn: u64, entries: &mut [FileEntry]) -> PageChecks {
        for (file, block, lsn) in std::mem::take(&mut self.unsettled) {
            match lsn > stop_lsn {
                true => self.bad_page(file, block),
                false => self.checks.changed += 1,
            }
        }
        for (file, n) in std::mem::take(&mut self.shed) {
            match self.shed_max_lsn > stop_lsn {
                true => {
                    self.checks.verified += n;
                    self.checks.bad += n;
                    *self.unlisted.entry(file).or_default() += n;
                }
                false => self.checks.changed += n,
            }
        }
        for (file, block) in self.bad {
            entries[file].bad_blocks.push(block);
        }
        for (file, n) in self.unlisted {
            entries[file].bad_blocks_unlisted = n;
        }
        for e in entries.iter_mut() {
            e.bad_blocks.sort_unstable();
        }
        self.checks
    }
}

/// What this host's copy of the data directory says about the server running on it.
struct LocalDir {
    /// The system identifier in `global/pg_control`.
    system_identifier: Option<u64>,
    /// `postmaster.pid`'s start time (seconds) and port, when a server runs on the directory.
    running: Option<(f64, u16)>,
}

impl LocalDir {
    /// A `postmaster.pid` that is there but cannot be read is an error, not "no server".
    fn read(pgdata: &std::path::Path) -> Result<Self, BackupError> {
        let system_identifier = crate::pg::control_system_identifier(pgdata);
        let pid_file = pgdata.join("postmaster.pid");
        let text = match std::fs::read_to_string(&pid_file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(BackupError::local("cannot read", &pid_file, e)),
        };
        let running = text.and_then(|t| {
            let lines: Vec<&str> = t.lines().collect();
            Some((
                lines.get(2)?.trim().parse().ok()?,
                lines.get(3)?.trim().parse().ok()?,
            ))
        });
        Ok(Self {
            system_identifier,
            running,
        })
    }
}

/// Whether `addr` belongs to this host (a socket can be bound to it).
fn is_local_address(addr: std::net::IpAddr) -> bool {
    addr.is_loopback() || std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// Refuse to back up a directory that is not the data directory of the server walship is
/// connected to: the files would be copied from one server and the backup label taken from
/// another, and the backup would restore into a silently inconsistent database. It happens with
/// `--pg-host` of another host (a standby's directory at the same path here), `--pgdata` of
/// another cluster, or another server's port.
fn check_data_directory(
    pgdata: &std::path::Path,
    facts: &ServerFacts,
    local: &LocalDir,
    is_local: impl Fn(std::net::IpAddr) -> bool,
) -> Result<(), BackupError> {
    let dir = pgdata.display();
    let connected = match facts.address {
        Some(a) => format!(
            "the server walship is connected to ({a} port {})",
            facts.port
        ),
        None => format!("the server walship is connected to (port {})", facts.port),
    };
    let hint = "run backup-push on the database host, connected to the server whose data \
                directory it reads (--pg-host, --pg-port; --pgdata where that directory is mounted)";
    if let Some(sysid) = local.system_identifier {
        if sysid.to_string() != facts.system_identifier {
            return Err(BackupError::Invalid(format!(
                "{dir} belongs to the cluster with system identifier {sysid}, but {connected} is \
                 {}; {hint}",
                facts.system_identifier
            )));
        }
    }
    let Some((started, port)) = local.running else {
        return Err(BackupError::Invalid(format!(
            "no server is running on {dir} (no postmaster.pid there), so it is not the data \
             directory of {connected}; {hint}"
        )));
    };
    if port != facts.port {
        return Err(BackupError::Invalid(format!(
            "the server running on {dir} listens on port {port}, {connected} on port {}: they are \
             different servers; {hint}",
            facts.port
        )));
    }
    // Same port on this host is the same server; from another host, the start times tell.
    let elsewhere = facts.address.is_some_and(|a| !is_local(a));
    if elsewhere && (started - facts.started).abs() > 30.0 {
        return Err(BackupError::Invalid(format!(
            "the server running on {dir} started at {}, {connected} at {}: it is another server, \
             on another host; {hint}",
            epoch_rfc3339(started),
            epoch_rfc3339(facts.started)
        )));
    }
    Ok(())
}

/// Refuse a backup whose WAL could never reach the repository, before any data is copied: the
/// backup would otherwise upload everything and then fail waiting for its last segment. Returns
/// warnings for what may still work out (a failing archiver may recover while the backup runs).
fn check_archiving(facts: &ServerFacts) -> Result<Vec<String>, BackupError> {
    let fix = "set archive_mode = on and archive_command = 'walship wal-push %p' (changing \
               archive_mode needs a restart), then take the backup";
    let archives_itself = match facts.archive_mode.as_str() {
        "off" if !facts.in_recovery => {
            return Err(BackupError::Invalid(format!(
                "archive_mode is off on this server, so the WAL this backup needs would never \
                 reach the repository: {fix}"
            )))
        }
        "always" => true,
        _ => !facts.in_recovery, // a standby with archive_mode = on leaves archiving to the primary
    };
    if archives_itself && facts.archiver.trim().is_empty() {
        return Err(BackupError::Invalid(format!(
            "archive_command is empty on this server, so archiving is paused and the WAL this \
             backup needs would never reach the repository: {fix}"
        )));
    }
    Ok(facts
        .archiver_failing
        .iter()
        .filter(|_| archives_itself)
        .map(|f| {
            format!(
                "this server's archiver is failing (last failure: {f}; PostgreSQL's log says \
                 why): the backup fails at its end unless its WAL reaches the repository"
            )
        })
        .collect())
}

/// What `walship check --archiving` says of a server before its archive test.
pub struct ServerCheck {
    /// Version, system identifier, role, data checksums.
    pub summary: String,
    pub in_recovery: bool,
    /// `Err` when the server is not the repository's cluster.
    pub cluster: Result<(), String>,
    /// The archiving settings, or why the server's WAL cannot reach the repository.
    pub archiving: Result<String, String>,
    pub warnings: Vec<String>,
}

/// Check a server against the repository the way backup-push does before copying anything.
pub async fn check_server(
    pg: &Client,
    meta: Option<&RepoMeta>,
    repo: &str,
) -> Result<ServerCheck, BackupError> {
    let facts = server_facts(pg).await?;
    let summary = format!(
        "PostgreSQL {}.{}, system {}, {}, data checksums {}",
        facts.version_num / 10_000,
        facts.version_num % 10_000,
        facts.system_identifier,
        if facts.in_recovery {
            "standby"
        } else {
            "primary"
        },
        if facts.data_checksums { "on" } else { "off" }
    );
    let cluster = match meta {
        Some(m) => check_cluster(m, &facts, repo).map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let mut warnings = Vec::new();
    let archiving = check_archiving(&facts)
        .map(|w| {
            warnings.extend(w);
            if !facts.archiver.trim().is_empty() && !facts.archiver.contains("wal-push") {
                warnings.push(format!(
                    "archive_command '{}' does not call walship wal-push (fine if a script it \
                     runs does)",
                    facts.archiver
                ));
            }
            format!(
                "archive_mode = {}, archive_command = '{}'",
                facts.archive_mode, facts.archiver
            )
        })
        .map_err(|e| e.to_string());
    Ok(ServerCheck {
        summary,
        in_recovery: facts.in_recovery,
        cluster,
        archiving,
        warnings,
    })
}

/// A transaction id assigned now, in a transaction rolled back: a commit would wait for a
/// synchronous standby (with no time limit on this session), an abort does not, and the counter
/// moves past the id all the same. `None` when the server refuses.
async fn assigned_xid(pg: &Client) -> Option<u64> {
    let replies = pg
        .simple_query("BEGIN; SELECT pg_current_xact_id()::text; ROLLBACK")
        .await;
    if let Err(e) = &replies {
        tracing::debug!("cannot assign a transaction id for next_xid: {e}");
        let _ = pg.batch_execute("ROLLBACK").await;
    }
    replies.ok()?.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
        _ => None,
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

/// On a standby: the timeline of its last restartpoint (where a backup started now starts) and
/// the timeline its minimum recovery point is on (where a backup stopped now stops), both from
/// pg_control as pg_backup_start and pg_backup_stop read them. The SQL functions read the file
/// without PostgreSQL's lock and fail on a copy torn by a concurrent rewrite: asked up to three
/// times.
async fn standby_timelines(pg: &Client) -> Result<(u32, u32), BackupError> {
    let mut tries = 0;
    let row = loop {
        tries += 1;
        match pg
            .query_one(
                "SELECT c.timeline_id, r.min_recovery_end_timeline \
                   FROM pg_control_checkpoint() c, pg_control_recovery() r",
                &[],
            )
            .await
        {
            Ok(row) => break row,
            Err(_) if tries < 3 => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(PgError::query("reading pg_control's timelines")(e).into()),
        }
    };
    Ok((row.get::<_, i32>(0) as u32, row.get::<_, i32>(1) as u32))
}

/// A standby backup whose WAL would cross from timeline `start` to `stop`: the upstream was
/// promoted during the backup, or shortly before it and the standby has made no restartpoint on
/// the new timeline since. Refused: such a backup's end lies on another timeline than its start,
/// which its stop segment and restore's choice of backups do not follow. A `stop` of 0 is a
/// server no longer in recovery (promoted before the backup started: a primary's backup then).
fn crosses_timelines(id: &str, start: u32, stop: u32) -> Result<(), BackupError> {
    if stop == start || stop == 0 {
        return Ok(());
    }
    Err(BackupError::TimelineSwitched(format!(
        "backup {id}: this standby's WAL went from timeline {start} to {stop} between the backup's \
         start and its end (its upstream was promoted), so the backup is not stored; take it \
         again once the standby has made a restartpoint on timeline {stop} (run CHECKPOINT on \
         the new primary, then on this standby), or take it on the new primary"
    )))
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
    // Before pg_backup_start: this session then sits idle for the whole upload.
    conn::without_timeouts(pg).await?;
    let facts = server_facts(pg).await?;
    for w in check_archiving(&facts)? {
        tracing::warn!("{w}");
    }
    let describe = archive.store().describe();
    match archive.read_meta().await? {
        Some(meta) => check_cluster(&meta, &facts, &describe)?,
        None => tracing::warn!(
            "no WAL has been archived into {describe} yet: unless this server's archive_command \
             pushes there, the backup fails at its end waiting for its WAL"
        ),
    }
    let pgdata = opts.pgdata.clone().unwrap_or(facts.data_directory.clone());
    if !pgdata.join("PG_VERSION").is_file() {
        return Err(BackupError::Invalid(format!(
            "{} is not the server's data directory (no PG_VERSION there); walship backup-push \
             runs on the database host; give the directory with --pgdata if it is mounted elsewhere",
            pgdata.display()
        )));
    }
    check_data_directory(&pgdata, &facts, &LocalDir::read(&pgdata)?, is_local_address)?;

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
    if facts.in_recovery {
        // Before reading the data directory, so that such a backup fails in seconds.
        let (start, replaying) = standby_timelines(pg).await?;
        crosses_timelines(&id, start, replaying)?;
    }
    tracing::info!(
        "backup {id}: started at {start_lsn}{}",
        if facts.in_recovery {
            " on a standby"
        } else {
            ""
        }
    );

    let owner =
        owner::of_data_dir(&pgdata).map_err(|e| BackupError::local("cannot read", &pgdata, e))?;
    let walk_dir = pgdata.clone();
    let walked = tokio::task::spawn_blocking(move || walk::walk(&walk_dir))
        .await
        .expect("walk does not panic")
        .map_err(|u| BackupError::local(u.what, &u.path, u.err))?;
    let total = walked.total_size();
    tracing::info!(
        "backup {id}: {} files, {} bytes, {} tablespaces",
        walked.files.len(),
        total,
        walked.tablespaces.len()
    );
    let pages = match facts.data_checksums {
        true => Some(PageGeometry {
            block_size: facts.block_size,
            relseg_blocks: facts.relseg_blocks,
            start_lsn: parse_lsn(&start_lsn)
                .ok_or_else(|| PgError::Unexpected(format!("bad start LSN {start_lsn}")))?,
        }),
        false => {
            tracing::info!(
                "backup {id}: the cluster has no data checksums, so pages cannot be verified \
                 (pg_checksums --enable, on a stopped cluster, turns them on)"
            );
            None
        }
    };
    let progress = Arc::new(Progress::new("backup-push", total));
    let mut to_read = walked.files;
    control_last(&mut to_read);
    let (mut files, parts, page_findings) = upload_parts(
        archive,
        recipients.clone(),
        &id,
        to_read,
        opts,
        pages,
        progress.clone(),
    )
    .await?;
    progress.finish();

    // wait_for_archive => false: PostgreSQL's own wait for the stop segment has no time limit,
    // so a failing archiver would hang the backup here forever. The segment switch still happens
    // (on a primary), and `wait_archived` below waits for the segment, at most `wal_wait`.
    let row = pg
        .query_one(
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)",
            &[],
        )
        .await
        .map_err(PgError::query("pg_backup_stop"))?;
    let stop_lsn: String = row.get(0);
    let label: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    let stop_epoch = epoch(pg).await?;
    // An xid every transaction at or after which began, and so commits, after the stop. On a
    // primary, one assigned now: a snapshot's xmax is one past the newest *finished* xid, and a
    // transaction whose commit record is written (before the stop) can still be running, waiting
    // for a synchronous standby. On a standby, which cannot assign one, the snapshot's xmax,
    // which replay advances as it meets each xid. Text, since tokio-postgres has no xid8;
    // optional, since restore can do without.
    let xid_query = |sql: &'static str| async move {
        pg.query_one(sql, &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, String>(0).parse::<u64>().ok())
    };
    let assigned = match facts.in_recovery {
        true => None,
        false => assigned_xid(pg).await,
    };
    let next_xid = match assigned {
        Some(xid) => Some(xid),
        None => xid_query("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").await,
    };
    let (timeline, start_wal) = parse_label(&label).ok_or_else(|| {
        PgError::Unexpected(format!(
            "the backup label pg_backup_stop returned has no START TIMELINE and START WAL \
             LOCATION lines as walship knows them: {}; backup {id} is left unfinished (no \
             manifest; `walship backup-list` shows it apart): this PostgreSQL may be newer than \
             this walship supports, so upgrade walship",
            crate::text::one_line(&label)
        ))
    })?;
    if facts.in_recovery {
        // pg_backup_stop took its stop point from the same pg_control field, a moment before.
        let (_, stop_timeline) = standby_timelines(pg).await?;
        crosses_timelines(&id, timeline, stop_timeline)?;
    }
    let stop = parse_lsn(&stop_lsn)
        .ok_or_else(|| PgError::Unexpected(format!("bad stop LSN {stop_lsn}")))?;
    let page_checks = page_findings.map(|found| found.settle(stop, &mut files));
    if let Some(checks) = page_checks {
        report_pages(&id, &files, checks);
    }
    // The last segment recovery needs: the one holding the byte before the stop point.
    let stop_wal =
        SegmentId::containing(timeline, stop.saturating_sub(1), facts.wal_segment_size).file_name();
    if facts.in_recovery {
        // A standby does not archive (unless archive_mode = always) and cannot switch segments:
        // the primary archives this one when it fills or when its archive_timeout passes.
        tracing::info!(
            "backup {id}: stopped at {stop_lsn} on a standby; waiting for the primary to archive \
             {stop_wal} (when it fills, or after the primary's archive_timeout)"
        );
    } else {
        tracing::info!("backup {id}: stopped at {stop_lsn}; waiting for {stop_wal} in the archive");
    }
    let waiting_since = Instant::now();
    let archived = async {
        wait_archived(archive, &stop_wal, opts.wal_wait, Awaited::BackupEnd).await?;
        // Look-ahead uploads let later segments reach the repository while an earlier one keeps
        // failing: every segment from the start on must be there, not only the last.
        let Some(first_seg) = WalFileName::parse(&start_wal)
            .ok()
            .and_then(|n| n.segment())
        else {
            return Ok(());
        };
        let first = first_seg.segno(facts.wal_segment_size);
        let last = stop.saturating_sub(1) / facts.wal_segment_size;
        let present: std::collections::HashSet<String> = archive
            .store()
            .list_after(&repo::timeline_prefix(timeline), &repo::wal_dir(first_seg))
            .await
            .map_err(ArchiveError::from)?
            .into_iter()
            .filter_map(|o| o.key.as_str().rsplit('/').next().map(str::to_string))
            .collect();
        for segno in first..last {
            let name = SegmentId::from_segno(timeline, segno, facts.wal_segment_size).file_name();
            if !present.contains(name.as_str()) {
                let left = opts.wal_wait.saturating_sub(waiting_since.elapsed());
                wait_archived(archive, &name, left, Awaited::BackupEnd).await?;
            }
        }
        Ok(())
    };
    archived.await.map_err(|e| match e {
        BackupError::WalNotArchived(why) if facts.in_recovery => {
            BackupError::WalNotArchived(format!(
                "{why}. This backup ran on a standby: the primary archives that segment when \
                     it fills or when archive_timeout passes, so set archive_timeout (e.g. 60) on \
                     the primary, or run `select pg_switch_wal()` there while the backup waits"
            ))
        }
        e => e,
    })?;
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
        next_xid,
        from_standby: facts.in_recovery,
        backup_label: label,
        tablespace_map: spcmap.filter(|s| !s.is_empty()),
        tablespaces: walked.tablespaces,
        owner: Some(owner),
        dirs: walked.dirs,
        files,
        parts,
        compression_level: opts.compression_level,
        walship_version: env!("CARGO_PKG_VERSION").to_string(),
        page_checks,
    };
    manifest.pieces().map_err(|why| BackupError::BadManifest {
        id: id.clone(),
        why: format!("internal error, the manifest does not add up: {why}"),
    })?;
    // The summary first: a backup is listed only once its manifest exists, so a summary without
    // one (a backup killed here) is never shown.
    let summary = serde_json::to_vec(&BackupSummary::of(&manifest)).expect("summary serialises");
    archive
        .store()
        .put_if_absent(&layout::summary_key(&id), summary.into())
        .await
        .map_err(ArchiveError::from)?;
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

/// A restore point written and the segment holding it closed.
pub struct Marked {
    /// Where the point's record ends.
    pub lsn: u64,
    /// The segment holding the record, on the timeline the server writes.
    pub segment: WalFileName,
    /// The server's clock when it wrote the point, in seconds since the epoch.
    pub epoch: f64,
}

/// Write a restore point named `name` (`pg_create_restore_point`) and switch WAL, so the segment
/// holding it is archived now rather than when it fills. Primary only.
///
/// The segment comes from `pg_walfile_name`, which uses the timeline the server writes now:
/// `pg_control_checkpoint()` still names the old one after a promotion until the first checkpoint
/// on the new timeline ends, minutes later with a spread checkpoint. It names the segment holding
/// the byte before the LSN given, which for the end of a record is the segment holding it.
pub async fn mark_and_switch(pg: &Client, name: &str) -> Result<Marked, BackupError> {
    let row = pg
        .query_one(
            "WITH p AS MATERIALIZED (SELECT pg_create_restore_point($1) AS lsn) \
             SELECT lsn::text, pg_walfile_name(lsn), extract(epoch FROM clock_timestamp())::float8 \
               FROM p",
            &[&name],
        )
        .await
        .map_err(PgError::query("pg_create_restore_point"))?;
    let (lsn_text, seg_text): (String, String) = (row.get(0), row.get(1));
    let lsn =
        parse_lsn(&lsn_text).ok_or_else(|| PgError::Unexpected(format!("bad LSN {lsn_text}")))?;
    let segment = WalFileName::parse(&seg_text)
        .map_err(|_| PgError::Unexpected(format!("bad WAL file name {seg_text}")))?;
    pg.execute("SELECT pg_switch_wal()", &[])
        .await
        .map_err(PgError::query("pg_switch_wal"))?;
    Ok(Marked {
        lsn,
        segment,
        epoch: row.get(2),
    })
}

/// What a segment waited for holds, and what to run again once archiving works.
#[derive(Debug, Clone, Copy)]
pub enum Awaited {
    BackupEnd,
    RestorePoint,
    Check,
}

/// Wait until `name` is in the archive.
pub async fn wait_archived(
    archive: &Archive,
    name: &WalFileName,
    limit: Duration,
    awaited: Awaited,
) -> Result<(), BackupError> {
    let (holds, again) = match awaited {
        Awaited::BackupEnd => ("which the backup needs", "take the backup again"),
        Awaited::RestorePoint => ("which holds the restore point", "run restore-point again"),
        Awaited::Check => (
            "which `walship check` closed with a restore point and a WAL switch",
            "run the check again",
        ),
    };
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
                "WAL segment {name}, {holds}, did not reach {} within {} s; check that \
                 archive_mode is on and archive_command is `walship wal-push %p` with this \
                 repository (PostgreSQL's log shows archiver failures), then {again}",
                archive.store().describe(),
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Read `files` into parts and upload them; the files as recorded and the parts.
///
/// The layout is planned from the sizes the walk saw, so every part can be read, compressed and
/// encrypted by any thread on its own, straight from the files in frames that stay in the CPU's
/// cache: no part-sized buffer of plaintext is ever held, and each byte crosses memory once on its
/// way in.
async fn upload_parts(
    archive: &Archive,
    recipients: Arc<Recipients>,
    id: &str,
    files: Vec<WalkedFile>,
    opts: &PushOptions,
    pages: Option<PageGeometry>,
    progress: Arc<Progress>,
) -> Result<(Vec<FileEntry>, Vec<PartEntry>, Option<PageFindings>), BackupError> {
    let (entries, plan) = plan_parts(&files, opts.part_size as u64);
    // The part pg_control starts (the last, alone) waits for all others (see `control_last`).
    let control_part = entries
        .iter()
        .find(|e| e.path == PG_CONTROL)
        .map(|e| e.part as usize);
    let files = Arc::new(files);
    let threads = opts.threads.max(1);
    let uploads = Arc::new(Semaphore::new(opts.upload_concurrency.max(1)));
    let cpu = Arc::new(Semaphore::new(threads));
    // Encoded parts, being made or waiting for an upload slot: memory stays bounded.
    let in_memory = Arc::new(Semaphore::new(threads + opts.upload_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut settled = Settled::default();
    for (index, pieces) in plan.into_iter().enumerate() {
        let mut control = None;
        if Some(index) == control_part {
            while let Some(done) = tasks.join_next().await {
                settled.take(done);
            }
            if settled.failed.is_some() {
                break;
            }
            control = Some(read_control(&files).await?);
        }
        let held = in_memory.clone().acquire_owned().await.expect("open");
        let working = cpu.clone().acquire_owned().await.expect("open");
        let (archive, recipients, uploads, files, progress) = (
            archive.clone(),
            recipients.clone(),
            uploads.clone(),
            files.clone(),
            progress.clone(),
        );
        let index = index as u32;
        let key = layout::part_key(id, index);
        let level = opts.compression_level;
        tasks.spawn(async move {
            let _held = held;
            let plain_size = pieces.iter().map(|p| p.len).sum::<u64>();
            let key_s = key.to_string();
            let (enc, found) = tokio::task::spawn_blocking(move || {
                let mut reader = PartReader::new(&files, &pieces, &progress, pages);
                reader.fixed = control;
                let encoded = codec::encode(&mut reader, &recipients, level);
                match (encoded, reader.unreadable) {
                    (Ok(enc), _) => Ok((enc, reader.found)),
                    // A data directory file that cannot be read: said of the file, not the part.
                    (Err(codec::CodecError::Io(e)), Some(path)) => {
                        Err(BackupError::local("cannot read", &path, e))
                    }
                    (Err(source), _) => Err(ArchiveError::Codec { key: key_s, source }.into()),
                }
            })
            .await
            .expect("encode does not panic")?;
            drop(working);
            let sha256 = enc.header.sha256_hex();
            let _uploading = uploads.acquire().await.expect("open");
            let stored_size = enc.bytes.len() as u64;
            let version_id = match archive.put(&key, enc).await? {
                Stored::Created { version_id, .. } => version_id,
                Stored::AlreadyThere => None,
            };
            let part = PartEntry {
                index,
                plain_size,
                stored_size,
                sha256,
                version_id,
            };
            Ok::<_, BackupError>((part, found))
        });
        while let Some(done) = tasks.try_join_next() {
            settled.take(done);
        }
        if settled.failed.is_some() {
            break;
        }
    }
    while let Some(done) = tasks.join_next().await {
        settled.take(done);
    }
    if let Some(e) = settled.failed {
        return Err(e);
    }
    let mut parts = settled.parts;
    parts.sort_by_key(|p| p.index);
    Ok((entries, parts, pages.map(|_| settled.found)))
}

/// `global/pg_control`, read once its checksum holds (see [`crate::pg::control`]): its index in
/// `files` and its bytes, for the part that stores it.
async fn read_control(files: &Arc<Vec<WalkedFile>>) -> Result<(usize, Arc<[u8]>), BackupError> {
    let index = files
        .iter()
        .position(|f| f.path == PG_CONTROL)
        .expect("the control part holds pg_control");
    let path = files[index].abs.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        crate::pg::control::read_checked(&path)
            .map_err(|e| BackupError::local("cannot read", &path, e))
    })
    .await
    .expect("reading pg_control does not panic")?;
    Ok((index, bytes.into()))
}

/// The outcomes of the part tasks so far: stored parts, page findings, the first error.
#[derive(Default)]
struct Settled {
    parts: Vec<PartEntry>,
    found: PageFindings,
    failed: Option<BackupError>,
}

impl Settled {
    fn take(
        &mut self,
        done: Result<Result<(PartEntry, PageFindings), BackupError>, tokio::task::JoinError>,
    ) {
        match done.expect("part task does not panic") {
            Ok((p, f)) => {
                self.parts.push(p);
                self.found.add(f);
            }
            Err(e) => self.failed = self.failed.take().or(Some(e)),
        }
    }
}

/// Say what the page checks found; corrupt pages as a warning naming them, as PostgreSQL would
/// when it read them.
fn report_pages(id: &str, files: &[FileEntry], checks: PageChecks) {
    if checks.bad == 0 {
        tracing::info!(
            "backup {id}: {} page checksums verified ({} pages read while PostgreSQL wrote them \
             were not judged: replay rewrites them)",
            checks.verified,
            checks.changed
        );
        return;
    }
    let bad: Vec<&FileEntry> = files.iter().filter(|f| f.bad_block_count() > 0).collect();
    const SHOWN: usize = 10;
    let mut named: Vec<String> = bad
        .iter()
        .take(SHOWN)
        .map(|f| {
            let count = f.bad_block_count();
            let word = if count == 1 { "block" } else { "blocks" };
            let blocks: Vec<String> = f
                .bad_blocks
                .iter()
                .take(SHOWN)
                .map(u32::to_string)
                .collect();
            match count - blocks.len() as u64 {
                0 => format!("{} {word} {}", f.path, blocks.join(", ")),
                more if blocks.is_empty() => format!("{} ({more} {word})", f.path),
                more => format!("{} {word} {} and {more} more", f.path, blocks.join(", ")),
            }
        })
        .collect();
    if bad.len() > SHOWN {
        named.push(format!("and {} more files", bad.len() - SHOWN));
    }
    tracing::warn!(
        "backup {id}: {} of the {} pages checked failed their checksum: {}. The data directory has \
         corrupt pages and this backup holds them as they were read. Find the cause (storage, \
         memory, file system), check the cluster with pg_amcheck, and keep the older backups until \
         it is repaired",
        checks.bad,
        checks.verified,
        named.join("; ")
    );
}

/// A stretch of one file inside a part.
#[derive(Debug, Clone, PartialEq)]
struct PlannedPiece {
    file: usize,
    file_offset: u64,
    len: u64,
}

/// Files back to back, cut into parts of `part_size` bytes: each file's place, and each part's
/// pieces.
fn plan_parts(files: &[WalkedFile], part_size: u64) -> (Vec<FileEntry>, Vec<Vec<PlannedPiece>>) {
    let mut entries = Vec::with_capacity(files.len());
    let mut plan: Vec<Vec<PlannedPiece>> = Vec::new();
    let (mut part, mut offset) = (0u32, 0u64);
    for (i, f) in files.iter().enumerate() {
        if f.path == PG_CONTROL && offset > 0 {
            // A part of its own, read after every other (see `control_last`).
            part += 1;
            offset = 0;
        }
        entries.push(FileEntry {
            path: f.path.clone(),
            size: f.size,
            mode: f.mode,
            mtime: f.mtime,
            part,
            offset,
            bad_blocks: Vec::new(),
            bad_blocks_unlisted: 0,
        });
        let mut done = 0;
        while done < f.size {
            let len = (part_size - offset).min(f.size - done);
            if plan.len() <= part as usize {
                plan.push(Vec::new());
            }
            plan[part as usize].push(PlannedPiece {
                file: i,
                file_offset: done,
                len,
            });
            done += len;
            offset += len;
            if offset == part_size {
                part += 1;
                offset = 0;
            }
        }
    }
    (entries, plan)
}

const PG_CONTROL: &str = "global/pg_control";

/// Move `global/pg_control` to the end, where `plan_parts` gives it a part of its own and
/// `upload_parts` reads that part only once every other part is stored, as pg_basebackup sends
/// it last. A backup taken on a standby ends, for PostgreSQL, at the `minRecoveryPoint` of the
/// pg_control it holds: read early, while replay went on writing the files read after it, that
/// point would come before pages the backup holds, and recovery would call the copy consistent
/// too soon (a target in between would open an inconsistent cluster).
fn control_last(files: &mut Vec<WalkedFile>) {
    if let Some(i) = files.iter().position(|f| f.path == PG_CONTROL) {
        let control = files.remove(i);
        files.push(control);
    }
}

/// Reads one part's pieces in order. A file that shrank or vanished since the walk reads as zeros
/// up to the size the walk saw, as pg_basebackup pads it: WAL replay truncates or removes it again.
///
/// With `pages`, every page of a relation file whose first byte this part holds is checked
/// against its checksum as it passes (see [`check_pages`]).
struct PartReader<'a> {
    files: &'a [WalkedFile],
    pieces: &'a [PlannedPiece],
    progress: &'a Progress,
    pages: Option<PageGeometry>,
    found: PageFindings,
    piece: usize,
    at: u64,
    open: Option<(usize, Option<Arc<File>>)>,
    /// A file already read and checked (pg_control): its index in `files` and its bytes, served
    /// instead of reading the path.
    fixed: Option<(usize, Arc<[u8]>)>,
    /// The file a read failed on, for the error: the codec sees only the `io::Error`.
    unreadable: Option<PathBuf>,
}

impl<'a> PartReader<'a> {
    fn new(
        files: &'a [WalkedFile],
        pieces: &'a [PlannedPiece],
        progress: &'a Progress,
        pages: Option<PageGeometry>,
    ) -> Self {
        Self {
            files,
            pieces,
            progress,
            pages,
            found: PageFindings::default(),
            piece: 0,
            at: 0,
            open: None,
            fixed: None,
            unreadable: None,
        }
    }

    fn file(&mut self, index: usize) -> std::io::Result<Option<&File>> {
        if self.open.as_ref().map(|(i, _)| *i) != Some(index) {
            let path = &self.files[index].abs;
            let file = match (&self.files[index].pinned, File::open(path)) {
                (Some(pinned), _) => Some(pinned.clone()),
                (None, Ok(f)) => Some(Arc::new(f)),
                (None, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!("{} vanished during the backup", path.display());
                    None
                }
                (None, Err(e)) => {
                    self.unreadable = Some(path.clone());
                    return Err(e);
                }
            };
            self.open = Some((index, file));
        }
        Ok(self.open.as_ref().and_then(|(_, f)| f.as_deref()))
    }
}

impl Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let Some(p) = self.pieces.get(self.piece).cloned() else {
            return Ok(0);
        };
        let mut want = buf.len().min((p.len - self.at) as usize);
        let pos = p.file_offset + self.at;
        let files = self.files;
        let paged = self
            .pages
            .zip(files[p.file].relation_segment)
            .filter(|(g, _)| g.block_size > 0);
        if let Some((g, _)) = paged {
            // End on a page boundary when one lies inside the read, so that pages are checked
            // straight from `buf`.
            let end = pos + want as u64;
            let aligned = end - end % g.block_size;
            if aligned > pos {
                want = (aligned - pos) as usize;
            }
        }
        let fixed = self.fixed.as_ref().filter(|(i, _)| *i == p.file);
        let n = match fixed {
            Some((_, bytes)) => {
                let from = (pos as usize).min(bytes.len());
                let n = want.min(bytes.len() - from);
                buf[..n].copy_from_slice(&bytes[from..from + n]);
                n
            }
            None => match self.file(p.file)? {
                Some(f) => loop {
                    match f.read_at(&mut buf[..want], pos) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            self.unreadable = Some(files[p.file].abs.clone());
                            return Err(e);
                        }
                        Ok(n) => break n,
                    }
                },
                None => 0,
            },
        };
        let n = if n == 0 {
            // Shorter than when walked: zeros to the walked size.
            buf[..want].fill(0);
            want
        } else {
            if let (Some((g, segment)), Some((_, Some(file)))) = (paged, self.open.as_ref()) {
                let at = PageAt {
                    file: p.file,
                    segment,
                    pos,
                };
                check_pages(&g, file, at, &buf[..n], &mut self.found);
            }
            n
        };
        self.at += n as u64;
        if self.at == p.len {
            self.piece += 1;
            self.at = 0;
        }
        self.progress.inc(n as u64);
        Ok(n)
    }
}

/// Where a read of a relation file starts.
struct PageAt {
    /// Index of the file in the walk.
    file: usize,
    /// The file's segment number in its relation.
    segment: u32,
    /// The read's offset in the file.
    pos: u64,
}

/// Check the pages that start inside `bytes`, read from `file` at `at.pos`, against their
/// checksums. A page that runs past `bytes` (at the end of a part or of a short read) is read
/// whole from the file. A page that fails is read again: a read racing PostgreSQL's write of the
/// page sees parts of two versions, and the second read then shows the newer, whole. A page that
/// fails twice is bad, unless its LSN says it changed since the backup started: the stop point
/// settles those ([`PageFindings::settle`]).
fn check_pages(g: &PageGeometry, file: &File, at: PageAt, bytes: &[u8], found: &mut PageFindings) {
    let bs = g.block_size;
    let end = at.pos + bytes.len() as u64;
    let mut page_at = at.pos.div_ceil(bs) * bs;
    while page_at < end {
        let blkno = (u64::from(at.segment) * g.relseg_blocks + page_at / bs) as u32;
        let off = (page_at - at.pos) as usize;
        let reread;
        let page = match bytes.get(off..off + bs as usize) {
            Some(p) => Some(p),
            None => {
                reread = read_page(file, page_at, bs);
                reread.as_deref()
            }
        };
        let mut verdict = page.map(|p| page::verify(p, blkno, g.start_lsn));
        if !matches!(verdict, None | Some(page::Verdict::Valid)) {
            verdict = read_page(file, page_at, bs).map(|p| page::verify(&p, blkno, g.start_lsn));
        }
        match verdict {
            // A page the file no longer has whole was truncated since: replay truncates it too.
            None => found.checks.changed += 1,
            Some(page::Verdict::Valid) => found.checks.verified += 1,
            Some(page::Verdict::FailedSinceStart { lsn }) => {
                found.unsettled.push((at.file, blkno, lsn))
            }
            Some(page::Verdict::Mismatch { .. } | page::Verdict::NotZeroed) => {
                found.bad_page(at.file, blkno)
            }
        }
        page_at += bs;
    }
}

/// The whole page at `offset`, or `None` when the file no longer has it whole.
fn read_page(file: &File, offset: u64, len: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut page = vec![0u8; len as usize];
    file.read_exact_at(&mut page, offset).ok()?;
    Some(page)
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

    /// A primary on port 5432, started at 1000 s, reached over a Unix socket.
    fn server() -> ServerFacts {
        ServerFacts {
            version_num: 150000,
            data_directory: "/x".into(),
            wal_segment_size: 16 << 20,
            system_identifier: "1".into(),
            in_recovery: false,
            archive_mode: "on".into(),
            archiver: "walship wal-push %p".into(),
            archiver_failing: None,
            port: 5432,
            started: 1000.0,
            address: None,
            data_checksums: true,
            block_size: 8192,
            relseg_blocks: 131072,
        }
    }

    #[test]
    fn a_data_directory_of_another_server_is_refused() {
        let dir = std::path::Path::new("/var/lib/postgresql/15/main");
        let ours = LocalDir {
            system_identifier: Some(1),
            running: Some((1000.4, 5432)),
        };
        let check = |facts: &ServerFacts, local: &LocalDir, here: bool| {
            check_data_directory(dir, facts, local, |_| here)
        };
        let refused = |r: Result<(), BackupError>| match r {
            Err(BackupError::Invalid(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(check(&server(), &ours, true).is_ok());
        // Another cluster's directory.
        let other = LocalDir {
            system_identifier: Some(2),
            ..ours
        };
        assert!(refused(check(&server(), &other, true)).contains("system identifier 2"));
        // A copy no server runs on.
        let stopped = LocalDir {
            running: None,
            ..ours
        };
        assert!(refused(check(&server(), &stopped, true)).contains("no server is running"));
        // Another server on this host (a standby on its own port).
        let standby = LocalDir {
            running: Some((1500.0, 5433)),
            ..ours
        };
        assert!(refused(check(&server(), &standby, true)).contains("port 5433"));
        // Over TCP to this host: same port, same server, whatever the start times.
        let tcp = ServerFacts {
            address: Some("10.0.0.5".parse().unwrap()),
            started: 900.0,
            ..server()
        };
        assert!(check(&tcp, &ours, true).is_ok());
        // To another host, with a same-port server here: only the same start time passes.
        assert!(refused(check(&tcp, &ours, false)).contains("another host"));
        let same_start = ServerFacts {
            started: 1001.0,
            ..tcp
        };
        assert!(check(&same_start, &ours, false).is_ok());
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn postmaster_pid_is_read_or_its_absence_told_from_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("postmaster.pid");
        assert_eq!(LocalDir::read(dir.path()).unwrap().running, None);
        std::fs::write(&pid_file, "4242\n/data\n1795505738\n5433\n/tmp\n*\n").unwrap();
        assert_eq!(
            LocalDir::read(dir.path()).unwrap().running,
            Some((1_795_505_738.0, 5433))
        );
        std::fs::remove_file(&pid_file).unwrap();
        std::fs::create_dir(&pid_file).unwrap(); // there, but not readable as a file
        assert!(matches!(
            LocalDir::read(dir.path()),
            Err(BackupError::Local { .. })
        ));
    }

    #[test]
    fn a_backup_whose_wal_cannot_be_archived_is_refused_before_it_starts() {
        let facts = |mode: &str, archiver: &str, standby: bool, failing: bool| ServerFacts {
            in_recovery: standby,
            archive_mode: mode.into(),
            archiver: archiver.into(),
            archiver_failing: failing.then(|| "000000010000000000000003 at 12:00".into()),
            ..server()
        };
        let cmd = "walship wal-push %p";
        let refused = |f: &ServerFacts| match check_archiving(f) {
            Err(BackupError::Invalid(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(refused(&facts("off", cmd, false, false)).contains("archive_mode is off"));
        assert!(refused(&facts("on", " ", false, false)).contains("archive_command is empty"));
        assert!(refused(&facts("always", "", true, false)).contains("archive_command is empty"));
        assert_eq!(
            check_archiving(&facts("on", cmd, false, false))
                .unwrap()
                .len(),
            0
        );
        // A standby without archive_mode = always leaves archiving to its primary.
        assert_eq!(
            check_archiving(&facts("off", "", true, true))
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            check_archiving(&facts("on", "", true, true)).unwrap().len(),
            0
        );
        // A failing archiver may recover while the backup runs: a warning.
        let w = check_archiving(&facts("on", cmd, false, true)).unwrap();
        assert!(
            w.len() == 1 && w[0].contains("000000010000000000000003"),
            "{w:?}"
        );
    }

    fn walked(path: &std::path::Path, size: u64) -> WalkedFile {
        WalkedFile {
            path: path.file_name().unwrap().to_string_lossy().into_owned(),
            abs: path.to_path_buf(),
            size,
            mode: 0o600,
            mtime: 0,
            relation_segment: None,
            pinned: None,
        }
    }

    #[test]
    fn parts_are_planned_back_to_back_and_read_with_zeros_for_what_vanished() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c, gone) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
            dir.path().join("gone"),
        );
        std::fs::write(&a, vec![1u8; 10]).unwrap();
        std::fs::write(&b, b"").unwrap();
        std::fs::write(&c, vec![3u8; 4]).unwrap(); // walked at 7 bytes, shrank to 4 since
        let files = vec![
            walked(&a, 10),
            walked(&b, 0),
            walked(&c, 7),
            walked(&gone, 5),
        ];
        let (entries, plan) = plan_parts(&files, 8);
        let places: Vec<(u32, u64, u64)> =
            entries.iter().map(|e| (e.part, e.offset, e.size)).collect();
        assert_eq!(places, vec![(0, 0, 10), (1, 2, 0), (1, 2, 7), (2, 1, 5)]);
        assert_eq!(plan.len(), 3);
        assert_eq!(
            plan[1],
            vec![
                PlannedPiece {
                    file: 0,
                    file_offset: 8,
                    len: 2
                },
                PlannedPiece {
                    file: 2,
                    file_offset: 0,
                    len: 6
                },
            ]
        );
        let progress = Progress::new("test", 22);
        let mut read = Vec::new();
        for pieces in &plan {
            let mut part = Vec::new();
            PartReader::new(&files, pieces, &progress, None)
                .read_to_end(&mut part)
                .unwrap();
            assert!(part.len() <= 8);
            read.extend(part);
        }
        let mut want = vec![1u8; 10];
        want.extend([3, 3, 3, 3, 0, 0, 0]);
        want.extend([0; 5]);
        assert_eq!(read, want);
    }

    #[test]
    fn pg_control_goes_last_in_a_part_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let named = |path: &str, size| WalkedFile {
            path: path.into(),
            ..walked(&dir.path().join("x"), size)
        };
        let mut files = vec![
            named("base/1/1259", 10),
            named(PG_CONTROL, 8),
            named("pg_xact/0000", 3),
        ];
        control_last(&mut files);
        let order: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(order, ["base/1/1259", "pg_xact/0000", PG_CONTROL]);
        let (entries, plan) = plan_parts(&files, 8);
        let places: Vec<(u32, u64)> = entries.iter().map(|e| (e.part, e.offset)).collect();
        // pg_xact/0000 ends part 1 short of its size; pg_control starts part 2.
        assert_eq!(places, vec![(0, 0), (1, 2), (2, 0)]);
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[2].len(), 1, "nothing else in pg_control's part");
        // Part 1 is short: restore tiles files over each part's own size.
        let sizes: Vec<u64> = plan.iter().map(|p| p.iter().map(|x| x.len).sum()).collect();
        assert_eq!(sizes, vec![8, 5, 8]);
    }

    /// A real page from a PostgreSQL 15 cluster with data checksums, made block `blkno` with
    /// LSN `lsn` and its checksum set to fit.
    fn page_for(blkno: u32, lsn: u64) -> Vec<u8> {
        let mut p = include_bytes!("../../tests/fixtures/pg15-page-1259-0").to_vec();
        p[..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        let sum = page::checksum(&p, blkno);
        p[8..10].copy_from_slice(&sum.to_ne_bytes());
        p
    }

    #[test]
    fn pages_are_checked_across_part_boundaries_and_bad_ones_named_by_block() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 of a relation with 4 blocks per segment: blocks 4 to 8.
        let (lead, rel) = (dir.path().join("lead"), dir.path().join("16384.1"));
        std::fs::write(&lead, vec![7u8; 100]).unwrap();
        let mut bytes = Vec::new();
        bytes.extend(page_for(4, 0x10));
        let mut bad = page_for(5, 0x10);
        bad[6000] ^= 0x01; // a bit flipped on the disk
        bytes.extend(bad);
        // Fails with an LSN past the start: torn by a concurrent write, or corrupt; the stop
        // point decides.
        let mut changed = page_for(6, 0x5000);
        changed[300] ^= 0x01;
        bytes.extend(changed);
        bytes.extend(vec![0u8; 8192]); // new, all zeros: fine
        let mut dirty_new = vec![0u8; 8192]; // says new, but is not zeros
        dirty_new[8000] = 9;
        bytes.extend(dirty_new);
        bytes.extend(page_for(9, 0x5000)); // changed since the start, and whole: verified
        std::fs::write(&rel, &bytes).unwrap();
        let mut rel_file = walked(&rel, bytes.len() as u64);
        rel_file.relation_segment = Some(1);
        let files = vec![walked(&lead, 100), rel_file];
        let g = PageGeometry {
            block_size: 8192,
            relseg_blocks: 4,
            start_lsn: 0x4000,
        };
        let total = 100 + bytes.len() as u64;
        let progress = Progress::new("test", total);
        // Parts of 3 pages: every part boundary cuts a page of the relation file in two.
        for part_size in [3 * 8192, 20_000, total] {
            let (mut entries, plan) = plan_parts(&files, part_size);
            let mut found = PageFindings::default();
            let mut read = Vec::new();
            for pieces in &plan {
                let mut reader = PartReader::new(&files, pieces, &progress, Some(g));
                reader.read_to_end(&mut read).unwrap();
                found.add(reader.found);
            }
            assert_eq!(read.len() as u64, total);
            assert_eq!(
                found.checks,
                PageChecks {
                    verified: 5,
                    changed: 0,
                    bad: 2
                },
                "parts of {part_size}"
            );
            found.bad.sort();
            assert_eq!(found.bad, vec![(1, 5), (1, 8)], "parts of {part_size}");
            assert_eq!(
                found.unsettled,
                vec![(1, 6, 0x5000)],
                "parts of {part_size}"
            );
            assert_eq!(entries.len(), 2);
            // Stopped past its LSN: a page PostgreSQL was writing, which replay rewrites. Stopped
            // before it: an LSN no page on disk could have yet, so the page is corrupt.
            let (stop, checks, blocks) = match part_size == total {
                false => (0x6000, (5, 1, 2), vec![5, 8]),
                true => (0x4fff, (6, 0, 3), vec![5, 6, 8]),
            };
            let (verified, changed, bad) = checks;
            assert_eq!(
                found.settle(stop, &mut entries),
                PageChecks {
                    verified,
                    changed,
                    bad
                }
            );
            assert_eq!(entries[1].bad_blocks, blocks);
            assert!(entries[0].bad_blocks.is_empty());
        }
        // Not a relation file: not checked.
        let plain = vec![walked(&rel, bytes.len() as u64)];
        let (_, plan) = plan_parts(&plain, 8192);
        for pieces in &plan {
            let mut reader = PartReader::new(&plain, pieces, &progress, Some(g));
            reader.read_to_end(&mut Vec::new()).unwrap();
            assert_eq!(reader.found.checks, PageChecks::default());
        }
    }

    #[test]
    fn bad_blocks_named_and_failing_pages_held_stay_bounded() {
        let dir = std::path::Path::new("/nonexistent");
        let files = vec![
            walked(&dir.join("a"), 1 << 30),
            walked(&dir.join("b"), 1 << 30),
        ];
        let held = HELD_UNSETTLED as u64;
        let settled = |stop: u64| {
            let (mut entries, _) = plan_parts(&files, 1 << 30);
            let mut total = PageFindings::default();
            let mut part = PageFindings::default();
            for block in 0..LISTED_BAD_BLOCKS + 5 {
                part.bad_page(0, block as u32);
            }
            total.add(part);
            let mut part = PageFindings::default();
            part.bad_page(1, 7);
            // Failing pages past the start, more than are held: LSNs 100 to 100 + held.
            part.unsettled = (0..=held).map(|i| (1, i as u32, 100 + i)).collect();
            total.add(part);
            assert_eq!(total.bad.len(), LISTED_BAD_BLOCKS);
            assert!(total.unsettled.len() <= HELD_UNSETTLED);
            // The highest LSNs are the ones held.
            let shed = held + 1 - total.unsettled.len() as u64;
            assert_eq!(total.shed[&1], shed);
            assert_eq!(total.shed_max_lsn, 100 + shed - 1);
            let checks = total.settle(stop, &mut entries);
            (checks, entries, shed)
        };
        // Stopped just below the ten highest LSNs: those ten are bad, and the rest (held or
        // shed) were pages changed since the start.
        let (checks, entries, _) = settled(100 + held - 10);
        assert_eq!(checks.bad, LISTED_BAD_BLOCKS as u64 + 5 + 1 + 10);
        assert_eq!(checks.changed, held + 1 - 10);
        assert_eq!(
            entries[0].bad_blocks.len() as u64 + entries[1].bad_blocks.len() as u64,
            LISTED_BAD_BLOCKS as u64
        );
        assert_eq!(entries[0].bad_block_count(), LISTED_BAD_BLOCKS as u64 + 5);
        assert_eq!(entries[1].bad_block_count(), 11);
        assert_eq!(entries[0].bad_blocks_unlisted, 5);
        // Stopped below every one of them: all bad, those shed too, counted if not named.
        let (checks, entries, shed) = settled(50);
        assert_eq!(checks.bad, LISTED_BAD_BLOCKS as u64 + 5 + 1 + held + 1);
        assert_eq!(checks.changed, 0);
        assert_eq!(entries[1].bad_block_count(), 1 + held + 1);
        assert!(entries[1].bad_blocks_unlisted >= shed);
    }
}
