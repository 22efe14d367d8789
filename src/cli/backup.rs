//! `backup-push`, `backup-list`, `backup-fetch`, `restore` and `restore-point`: wiring flags and
//! config into the `backup` and `restore` modules.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::archive::{Archive, ArchiveError};
use crate::backup::{self, fetch::FetchOptions, push::PushOptions, BackupError};
use crate::cli::GlobalArgs;
use crate::codec;
use crate::config::{Config, RepoLocation};
use crate::pg::conn::{self, PgSettings};
use crate::repo::backup::{self as layout, BackupManifest, PageChecks, RestorePoint};
use crate::restore::{self, timeline, RecoveryOptions, Target};
use crate::storage::StorageError;
use crate::time::epoch_rfc3339;
use crate::wal::name::{format_lsn, parse_lsn, SegmentId, WalFileKind, WalFileName};

#[derive(Debug, Args)]
#[command(next_help_heading = "PostgreSQL connection")]
pub struct PgArgs {
    /// Server host or socket directory (default: PGHOST, else the local socket)
    #[arg(long, env = "WALSHIP_PG_HOST")]
    pub pg_host: Option<String>,
    /// Server port (default: PGPORT, else 5432)
    #[arg(long, env = "WALSHIP_PG_PORT")]
    pub pg_port: Option<u16>,
    /// Role to connect as (default: PGUSER, else USER, else postgres); password from PGPASSWORD or ~/.pgpass
    #[arg(long, env = "WALSHIP_PG_USER")]
    pub pg_user: Option<String>,
    /// Database to connect to (default: PGDATABASE, else the role's name)
    #[arg(long, env = "WALSHIP_PG_DBNAME")]
    pub pg_dbname: Option<String>,
}

impl PgArgs {
    pub fn settings(&self) -> PgSettings {
        PgSettings {
            host: self.pg_host.clone(),
            port: self.pg_port,
            user: self.pg_user.clone(),
            dbname: self.pg_dbname.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The data directory, if walship cannot read it at the path the server reports
    #[arg(long, env = "PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Plaintext bytes per part, in MiB
    #[arg(long, default_value_t = 16)]
    pub part_size_mb: usize,
    /// Parts compressed and encrypted at once (default: the number of cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Parts uploaded at once
    #[arg(long, default_value_t = 4)]
    pub uploads: usize,
    /// Seconds to wait for the backup's last WAL segment to reach the archive
    #[arg(long, default_value_t = 300)]
    pub wal_wait_secs: u64,
    // Last: the heading it sets carries on to the fields after it.
    #[command(flatten)]
    pub pg: PgArgs,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Backup id (see backup-list) or LATEST
    pub backup: String,
    /// Directory to restore into: must be empty or absent
    pub dir: PathBuf,
    #[command(flatten)]
    pub restore: RestoreCommon,
}

#[derive(Debug, Args)]
pub struct RestoreCommon {
    /// Delete what the target directory (and tablespace directories) hold first
    #[arg(long)]
    pub force: bool,
    /// Put a tablespace elsewhere: OID=DIR or OLD_LOCATION=DIR (repeatable)
    #[arg(long = "tablespace-map", value_name = "FROM=DIR")]
    pub tablespace_map: Vec<String>,
    /// Parts downloaded at once
    #[arg(long, default_value_t = 4)]
    pub downloads: usize,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Directory to restore into: must be empty or absent
    pub dir: PathBuf,
    /// Restore this backup rather than the newest one that reaches the target
    #[arg(long)]
    pub backup: Option<String>,
    /// Recover to this time, with a zone: '2026-11-24 12:44:59+00' or '2026-11-24 13:44:59 Europe/Berlin'
    #[arg(long, group = "target")]
    pub target_time: Option<String>,
    /// Recover to this named restore point
    #[arg(long, group = "target")]
    pub target_name: Option<String>,
    /// Recover to this transaction id
    #[arg(long, group = "target")]
    pub target_xid: Option<u64>,
    /// Recover to this WAL location (e.g. 0/5000060)
    #[arg(long, group = "target")]
    pub target_lsn: Option<String>,
    /// Stop as soon as the backup is consistent
    #[arg(long, group = "target")]
    pub target_immediate: bool,
    /// What to do at the target: promote, pause or shutdown (PostgreSQL's default: pause)
    #[arg(long, value_parser = ["promote", "pause", "shutdown"])]
    pub target_action: Option<String>,
    /// Stop just after the target (the default)
    #[arg(long, conflicts_with = "target_exclusive")]
    pub target_inclusive: bool,
    /// Stop just before the target
    #[arg(long)]
    pub target_exclusive: bool,
    /// Timeline to recover along: current, latest or a number (default: with a target, current,
    /// the backup's own; without one, latest). With latest or a number, the backup is chosen
    /// from that timeline's history
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// Restore to the end of the archive even though a segment is missing before its end:
    /// recovery stops at the gap, and what was archived after it is lost
    #[arg(long)]
    pub accept_gap: bool,
    /// Start as a standby (standby.signal) that keeps fetching WAL from the archive
    #[arg(long)]
    pub standby: bool,
    /// off: turn archiving off in the restored cluster (for drills and copies, so their new
    /// timelines stay out of this repository); preserve: keep the backup's setting
    #[arg(long, value_parser = ["preserve", "off"], default_value = "preserve")]
    pub archive_mode: String,
    /// Check everything and print the backup it would restore and the recovery settings it
    /// would write, then stop: nothing is downloaded and the directory is not touched
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub restore: RestoreCommon,
}

#[derive(Debug, Args)]
pub struct RestorePointArgs {
    /// The restore point's name
    pub name: String,
    /// Seconds to wait for the WAL holding the point to reach the archive
    #[arg(long, default_value_t = 300)]
    pub wal_wait_secs: u64,
    // Last: the heading it sets carries on to the fields after it.
    #[command(flatten)]
    pub pg: PgArgs,
}

fn identities(cfg: &Config) -> Result<Arc<codec::Identities>, BackupError> {
    Ok(Arc::new(cfg.identities()?))
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

pub async fn push(cfg: &Config, args: &PushArgs) -> Result<BackupManifest, BackupError> {
    let recipients = Arc::new(cfg.recipients()?);
    let archive = Archive::open(cfg, 5).await?;
    let pg = conn::connect(&args.pg.settings()).await?;
    if args.part_size_mb == 0 || args.part_size_mb > 1024 {
        return Err(BackupError::Invalid(
            "--part-size-mb must be between 1 and 1024".into(),
        ));
    }
    let opts = PushOptions {
        part_size: args.part_size_mb << 20,
        threads: args.threads.unwrap_or_else(cores),
        upload_concurrency: args.uploads,
        compression_level: cfg.compression_level,
        pgdata: args.pgdata.clone(),
        wal_wait: Duration::from_secs(args.wal_wait_secs),
    };
    backup::push::push(&archive, recipients, &pg, &opts).await
}

/// Where the WAL that follows a backup without a gap ends, along its timeline or the timelines
/// failovers continued it on.
#[derive(Clone)]
struct ArchiveEnd {
    last_segment: String,
    lsn: u64,
    /// When the last segment was stored, by the storage's clock.
    stored_at: Option<i64>,
    /// The promotions followed, and those that are not.
    path: timeline::WalPath,
    /// The highest timeline the archive has a history file for.
    newest_timeline: u32,
    /// What the archive holds of each timeline in `path.branches`.
    branch_tips: std::collections::BTreeMap<u32, BranchTip>,
    /// The first segment archived after a gap on the last timeline: WAL recovery cannot reach.
    after_gap: Option<String>,
}

/// How far a timeline that is not followed goes, to help the user choose.
#[derive(Debug, Clone, Default)]
struct BranchTip {
    /// When its history file was stored: about when it was promoted.
    promoted_at: Option<i64>,
    /// Its newest archived segment, and when that was stored.
    last_segment: Option<String>,
    stored_at: Option<i64>,
}

/// A storage timestamp for messages.
fn stored_time(at: Option<i64>) -> String {
    at.map(|t| crate::time::epoch_rfc3339(t as f64))
        .unwrap_or_else(|| "at an unknown time".into())
}

impl ArchiveEnd {
    fn timeline(&self, own: u32) -> u32 {
        self.path.last_timeline(own)
    }

    /// ", through timelines 2 and 4", or nothing.
    fn through(&self) -> String {
        if self.path.steps.is_empty() {
            return String::new();
        }
        let tlis: Vec<String> = self
            .path
            .steps
            .iter()
            .map(|s| s.timeline.to_string())
            .collect();
        format!(
            ", through timeline{} {}",
            if tlis.len() > 1 { "s" } else { "" },
            tlis.join(" and ")
        )
    }

    /// For a target past the end: the timelines that fork from the path and are not followed,
    /// one of which may be where production went on.
    /// For a target past the end: the WAL after a gap, which recovery cannot reach.
    fn gap_hint(&self) -> String {
        match &self.after_gap {
            None => String::new(),
            Some(next) => format!(
                ". The archive has a gap: the segment after {} is missing, though {next} and \
                 later are there (a deleted segment can be restored from a bucket version)",
                self.last_segment
            ),
        }
    }

    fn branch_hint(&self) -> String {
        match self.path.branches.as_slice() {
            [] => String::new(),
            branches => {
                let each: Vec<String> = branches.iter().map(|b| b.to_string()).collect();
                format!(
                    ". Not followed: {} (a restore drill or copy, or a failover the archive does \
                     not tell from one); if production went on there, restore with \
                     --target-timeline {}",
                    each.join(", "),
                    branches[0].timeline
                )
            }
        }
    }
}

/// The facts about a backup that locate its WAL.
struct WalStart<'a> {
    start_wal: &'a str,
    stop_lsn: &'a str,
    wal_segment_size: u64,
}

/// Whether `archive_end` reads the history files of timelines after the backup's, and what a
/// history it cannot decode means.
#[derive(Clone, Copy)]
enum Histories<'a> {
    /// Not read: the path stays on the backup's timeline.
    Skip,
    /// Read already, every one decoded (`all_histories`, which a restore needs anyway).
    Read(&'a std::collections::BTreeMap<u32, timeline::History>),
    /// One that cannot be decoded is left out with a warning, and its timeline is not followed:
    /// a listing still shows the backups.
    BestEffort(&'a Arc<codec::Identities>),
}

/// The WAL file an object of the archive's `wal/` holds, by its key's last part.
fn wal_name(key: &crate::storage::ObjectKey) -> Option<WalFileName> {
    key.as_str()
        .rsplit('/')
        .next()
        .and_then(|n| WalFileName::parse(n).ok())
}

/// The end of the WAL that follows a backup (from its first segment) without a gap. With
/// history files (and the identity that decrypts them), the path follows promotions whose
/// parent's WAL ends where they forked (failovers, see `restore::timeline`); without, it stays
/// on the backup's timeline.
async fn archive_end(
    archive: &Archive,
    histories: Histories<'_>,
    backup: WalStart<'_>,
) -> Result<Option<ArchiveEnd>, BackupError> {
    let seg_size = backup.wal_segment_size;
    let Some(start) = crate::wal::name::WalFileName::parse(backup.start_wal)
        .ok()
        .and_then(|n| n.segment())
    else {
        return Ok(None);
    };
    // Nothing before the backup's first segment's directory matters: parent timelines sort
    // before it, later timelines and `wal/history/` after. Skipping it keeps the listing as long
    // as the WAL since the backup, however much older WAL the archive holds.
    let objects = archive
        .store()
        .list_after("wal/", &crate::repo::wal_dir(start))
        .await
        .map_err(ArchiveError::from)?;
    let mut stored = std::collections::HashMap::new();
    let mut archived = timeline::Archived::default();
    let mut history_names = Vec::new();
    let mut history_stored = std::collections::HashMap::new();
    for o in &objects {
        let Some(name) = wal_name(&o.key) else {
            continue;
        };
        match (name.kind(), name.segment()) {
            (kind @ (WalFileKind::Segment | WalFileKind::Partial), Some(seg)) => {
                let by_timeline = if kind == WalFileKind::Segment {
                    stored.insert(name.to_string(), o.stored_at);
                    &mut archived.segments
                } else {
                    &mut archived.partials
                };
                by_timeline
                    .entry(seg.timeline)
                    .or_default()
                    .insert(seg.segno(seg_size));
            }
            (WalFileKind::History, _) => {
                history_stored.insert(name.timeline(), o.stored_at);
                history_names.push(name)
            }
            _ => {}
        }
    }
    let newest_timeline = history_names
        .iter()
        .map(|n| n.timeline())
        .max()
        .unwrap_or(1);
    let later = history_names
        .iter()
        .filter(|n| n.timeline() > start.timeline);
    for name in later {
        let ids = match histories {
            Histories::Skip => break,
            Histories::Read(read) => {
                // One stored since `all_histories` listed them is not followed.
                if let Some(h) = read.get(&name.timeline()) {
                    archived.histories.insert(name.timeline(), h.clone());
                }
                continue;
            }
            Histories::BestEffort(ids) => ids,
        };
        match read_history(archive, name, ids).await? {
            Ok(history) => {
                archived.histories.insert(name.timeline(), history);
            }
            Err(why) => tracing::warn!(
                "timeline history {name} cannot be read ({why}): the newest recoverable point \
                 shown does not follow timeline {} or the timelines that branch from it",
                name.timeline()
            ),
        }
    }
    let path = timeline::follow(
        start.timeline,
        start.segno(seg_size),
        parse_lsn(backup.stop_lsn).unwrap_or(0),
        seg_size,
        &archived,
    );
    let branch_tips = path
        .branches
        .iter()
        .map(|b| {
            let last = archived
                .segments
                .get(&b.timeline)
                .and_then(|s| s.last())
                .map(|&segno| SegmentId::from_segno(b.timeline, segno, seg_size).file_name());
            let tip = BranchTip {
                promoted_at: history_stored.get(&b.timeline).copied().flatten(),
                stored_at: last
                    .as_ref()
                    .and_then(|l| stored.get(l.as_str()).copied().flatten()),
                last_segment: last.map(|l| l.to_string()),
            };
            (b.timeline, tip)
        })
        .collect();
    Ok(path.end.map(|(tli, segno)| {
        let last = SegmentId::from_segno(tli, segno, seg_size).file_name();
        let after_gap = archived
            .segments
            .get(&tli)
            .and_then(|s| s.range(segno + 1..).next())
            .map(|&n| {
                SegmentId::from_segno(tli, n, seg_size)
                    .file_name()
                    .to_string()
            });
        ArchiveEnd {
            after_gap,
            stored_at: stored.get(last.as_str()).copied().flatten(),
            last_segment: last.to_string(),
            lsn: (segno + 1) * seg_size,
            path,
            newest_timeline,
            branch_tips,
        }
    }))
}

/// How far the storage's clock may be from the database's before a target time after the
/// archive's newest WAL is called unreachable.
const CLOCK_SLACK_SECS: i64 = 300;

/// Refuse a time, LSN or recorded restore point target that the WAL after `chosen` cannot reach,
/// before anything is downloaded: PostgreSQL would replay everything and only then stop with
/// "recovery ended before configured recovery target was reached".
fn check_reachable(
    chosen: &BackupManifest,
    target: &Target,
    end: Option<&ArchiveEnd>,
    accept_gap: bool,
) -> Result<(), BackupError> {
    let Some(end) = end else {
        return Ok(());
    };
    if let Target::Name {
        name,
        point: Some(p),
    } = target
    {
        // A later timeline than the backup's that the path does not take. (An earlier one is
        // not judged: records made before restore-point read the server's timeline right could
        // name the timeline before a promotion.)
        let off_path = p.timeline > chosen.timeline
            && !end.path.steps.iter().any(|s| s.timeline == p.timeline);
        if off_path {
            return Err(BackupError::NoBackupForTarget(format!(
                "restore point '{name}' was made on timeline {} (LSN {}), which recovery from \
                 backup {} does not follow (it ends on timeline {}{}); if timeline {} is the \
                 history you mean, restore with --target-timeline {}",
                p.timeline,
                p.lsn,
                chosen.id,
                end.timeline(chosen.timeline),
                end.through(),
                p.timeline,
                p.timeline
            )));
        }
        return match parse_lsn(&p.lsn) {
            Some(lsn) => check_reachable(chosen, &Target::Lsn(lsn), Some(end), accept_gap),
            None => Ok(()),
        };
    }
    if let (Some(next), Target::EndOfArchive | Target::Xid(_) | Target::Name { .. }) =
        (&end.after_gap, target)
    {
        let gap = format!(
            "the archived WAL after backup {} has a gap: the segment after {} is missing, though \
             {next} and later are there, and recovery stops at the first missing segment",
            chosen.id, end.last_segment
        );
        // Replaying to the end would promote at the gap, with every later transaction missing.
        if *target == Target::EndOfArchive && !accept_gap {
            return Err(BackupError::Gap(format!(
                "{gap}: restore the missing segments (a deleted one can be restored from a bucket \
                 version), or, to accept losing everything archived after the gap, restore with \
                 --accept-gap"
            )));
        }
        eprintln!("walship: warning: {gap}; a target after the gap cannot be reached");
    }
    match target {
        // Recovery stops at an LSN once it has read a record starting there or later: one
        // starting at the end would be in the next segment.
        Target::Lsn(lsn) if *lsn >= end.lsn => Err(BackupError::NoBackupForTarget(format!(
            "LSN {} is past the end of the archive: the WAL after backup {} ends at {} ({}{}); \
             archive more WAL or choose an earlier target{}{}",
            format_lsn(*lsn),
            chosen.id,
            format_lsn(end.lsn),
            end.last_segment,
            end.through(),
            end.gap_hint(),
            end.branch_hint()
        ))),
        Target::Time { text, epoch } => match end.stored_at {
            Some(at) if *epoch > (at + CLOCK_SLACK_SECS) as f64 => {
                Err(BackupError::NoBackupForTarget(format!(
                    "target time {text} is past the end of the archive: the newest WAL after \
                     backup {} on timeline {}{}, {}, was stored at {}, so recovery would replay \
                     it all and stop short of the target; check that archiving works \
                     (pg_stat_archiver on the server, walship errors in its log) or choose an \
                     earlier time{}{}",
                    chosen.id,
                    end.timeline(chosen.timeline),
                    end.through(),
                    end.last_segment,
                    epoch_rfc3339(at as f64),
                    end.gap_hint(),
                    end.branch_hint()
                )))
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

pub async fn list(cfg: &Config, json: bool) -> Result<(), BackupError> {
    let archive = Archive::open(cfg, 5).await?;
    // The summaries are plain text: the identity is needed only for backups made before them.
    let ids = match cfg.identities() {
        Ok(ids) => Some(Arc::new(ids)),
        Err(crate::config::ConfigError::NoIdentity) => None,
        Err(e) => return Err(e.into()),
    };
    let inventory = backup::inventory(&archive).await?;
    let unfinished = inventory.unfinished;
    let backups = backup::summaries_of(&archive, ids.as_ref(), inventory.complete).await?;
    let newest_end = match backups.last() {
        Some(m) => {
            let start = WalStart {
                start_wal: &m.start_wal,
                stop_lsn: &m.stop_lsn,
                wal_segment_size: m.wal_segment_size,
            };
            archive_end(
                &archive,
                ids.as_ref().map_or(Histories::Skip, Histories::BestEffort),
                start,
            )
            .await?
        }
        None => None,
    };
    if json {
        let rows: Vec<_> = backups
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "start_time": m.start_time, "stop_time": m.stop_time,
                    "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn, "timeline": m.timeline,
                    "original_size": m.original_size, "stored_size": m.stored_size,
                    "pg_version_num": m.pg_version_num, "from_standby": m.from_standby,
                    "page_checks": m.page_checks, "next_xid": m.next_xid,
                })
            })
            .collect();
        let out = serde_json::json!({
            "backups": rows,
            "oldest_recoverable": backups.first().map(|m| serde_json::json!({"time": m.stop_time, "lsn": m.stop_lsn})),
            "newest_recoverable": newest_end.as_ref().map(|e| serde_json::json!({
                "lsn": format_lsn(e.lsn),
                "last_segment": e.last_segment,
                "stored_at": e.stored_at.map(|t| epoch_rfc3339(t as f64)),
                "timeline": e.timeline(backups.last().map_or(1, |m| m.timeline)),
                "through_timelines": e.path.steps.iter().map(|s| s.timeline).collect::<Vec<_>>(),
            })),
            "unfinished": unfinished.iter().map(|u| serde_json::json!({
                "id": u.id, "objects": u.objects, "stored_size": u.stored_bytes,
                "last_stored_at": u.last_stored_at.map(|t| epoch_rfc3339(t as f64)),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    if backups.is_empty() {
        println!("no backups in {}", archive.store().describe());
        print_unfinished(&unfinished);
        return Ok(());
    }
    println!(
        "{:<17} {:<21} {:<21} {:<12} {:<12} {:>3} {:>10} {:>10} {:>7}  pages",
        "id", "start", "stop", "start lsn", "stop lsn", "tli", "size", "stored", "pg"
    );
    for m in &backups {
        println!(
            "{:<17} {:<21} {:<21} {:<12} {:<12} {:>3} {:>10} {:>10} {:>7}  {}",
            m.id,
            m.start_time,
            m.stop_time,
            m.start_lsn,
            m.stop_lsn,
            m.timeline,
            human(m.original_size),
            human(m.stored_size),
            m.pg_version_num,
            pages_column(m.page_checks)
        );
    }
    let oldest = &backups[0];
    println!(
        "recoverable from {} (LSN {}, backup {})",
        oldest.stop_time, oldest.stop_lsn, oldest.id
    );
    match newest_end {
        Some(e) => println!(
            "recoverable to LSN {} (end of {}, the last archived segment without a gap after the newest backup{}{})",
            format_lsn(e.lsn),
            e.last_segment,
            e.through(),
            e.stored_at
                .map(|t| format!(", stored at {}", epoch_rfc3339(t as f64)))
                .unwrap_or_default()
        ),
        None => println!("the newest backup's WAL is not in the archive yet"),
    }
    print_unfinished(&unfinished);
    Ok(())
}

/// What `backup-list` says of a backup's page checks.
fn pages_column(checks: Option<PageChecks>) -> String {
    match checks {
        None => "not checked".into(),
        Some(c) if c.bad == 0 => "verified".into(),
        Some(c) => format!("{} BAD", c.bad),
    }
}

/// Backups without a manifest take space but are never used: say so, and what to do.
fn print_unfinished(unfinished: &[backup::Unfinished]) {
    if unfinished.is_empty() {
        return;
    }
    println!(
        "{} unfinished backup(s), without a manifest (killed, failed, or still running); never restored from:",
        unfinished.len()
    );
    for u in unfinished {
        println!(
            "  {}: {} object{}, {}{}",
            u.id,
            u.objects,
            if u.objects == 1 { "" } else { "s" },
            human(u.stored_bytes),
            u.last_stored_at
                .map(|t| format!(", last written {}", epoch_rfc3339(t as f64)))
                .unwrap_or_default()
        );
    }
    println!(
        "  delete backups/<id>/ of these once no backup-push is running (with the maintainer's credentials: the archiver's cannot delete)"
    );
}

fn fetch_options(r: &RestoreCommon) -> Result<FetchOptions, BackupError> {
    let tablespace_map = r
        .tablespace_map
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(a, b)| (a.to_string(), PathBuf::from(b)))
                .ok_or_else(|| {
                    BackupError::Invalid(format!("--tablespace-map {m}: expected FROM=DIR"))
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(FetchOptions {
        force: r.force,
        tablespace_map,
        concurrency: r.downloads,
    })
}

/// Refuse a repository URL with no `walship.json`: a wrong bucket, prefix or directory would
/// otherwise read as "no backups" (exit 1) rather than a setup error (exit 6).
async fn require_repository(archive: &Archive) -> Result<(), BackupError> {
    match archive.read_meta().await? {
        Some(_) => Ok(()),
        None => Err(ArchiveError::Storage(StorageError::NoBucket(format!(
            "{} has no walship.json: this is not a walship repository (wrong bucket, prefix or \
             directory?)",
            archive.store().describe()
        )))
        .into()),
    }
}

pub async fn fetch(cfg: &Config, args: &FetchArgs) -> Result<BackupManifest, BackupError> {
    let archive = Archive::open(cfg, 5).await?;
    let ids = identities(cfg)?;
    require_repository(&archive).await?;
    let m = backup::resolve(&archive, &ids, &args.backup).await?;
    backup::fetch::fetch(
        &archive,
        &ids,
        &m,
        &args.dir,
        &fetch_options(&args.restore)?,
        || Ok(()),
    )
    .await?;
    Ok(m)
}

/// This walship, for the commands PostgreSQL runs: as it was invoked where that leads to the
/// running binary, else the running binary's own path.
fn exe() -> String {
    let running = std::env::current_exe().ok();
    let invoked = std::env::args_os()
        .next()
        .and_then(|a0| invoked_path(&a0, std::env::var_os("PATH"), running.as_deref()));
    invoked
        .or(running)
        .map_or_else(|| "walship".into(), |p| p.to_string_lossy().into_owned())
}

/// The path `argv0` names (with a `/`) or finds on `path` (without), made absolute but with its
/// symlinks kept, when it leads to the `running` binary. The running binary's path is the
/// resolved file: under a package manager or a versioned install behind a stable link
/// (`/usr/local/bin/walship` -> `/opt/walship/1.4/walship`), it would be gone after an upgrade,
/// and a long-lived standby's restore_command would then exit 127, which stops PostgreSQL.
fn invoked_path(
    argv0: &std::ffi::OsStr,
    path: Option<std::ffi::OsString>,
    running: Option<&Path>,
) -> Option<PathBuf> {
    let named = Path::new(argv0);
    let found = match named.components().count() > 1 {
        true => named.to_path_buf(),
        false => std::env::split_paths(&path?)
            .map(|dir| dir.join(named))
            .find(|p| {
                use std::os::unix::fs::PermissionsExt;
                p.metadata()
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })?,
    };
    let found = std::path::absolute(found).ok()?;
    let same = std::fs::canonicalize(&found).ok()? == std::fs::canonicalize(running?).ok()?;
    same.then_some(found)
}

/// The recovery_end_command that disables the restore's target once recovery has ended. Any
/// failure exits 1: PostgreSQL logs a warning for that, where a walship gone from its path (exit
/// 127) or killed by a signal would stop the server just after its promotion.
pub fn recovery_end_command() -> String {
    format!("{} recovery-done || exit 1", restore::command_arg(&exe()))
}

/// The restore_command that fetches from this repository with this call's settings.
pub fn restore_command(global: &GlobalArgs, cfg: &Config) -> String {
    let mut cmd: Vec<String> = std::iter::once(exe())
        .chain(crate::cli::repo_args(global, cfg))
        .map(|a| restore::command_arg(&a))
        .collect();
    cmd.extend(["wal-fetch".into(), "\"%f\"".into(), "\"%p\"".into()]);
    cmd.join(" ")
}

async fn read_restore_point(
    archive: &Archive,
    ids: &Arc<codec::Identities>,
    name: &str,
) -> Result<Option<RestorePoint>, BackupError> {
    let key = layout::restore_point_key(name);
    let out = match archive.get_plain(&key, ids).await {
        Ok(o) => o,
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    serde_json::from_slice(&out)
        .map(Some)
        .map_err(|e| BackupError::Invalid(format!("restore point record {key} is unreadable: {e}")))
}

/// The `recovery_target_timeline` a restore without `--target-timeline` writes, given where the
/// WAL after `chosen` goes: the number of the last timeline a failover continued it on; with no
/// target, the backup's own when the archive has later timelines off the path, which PostgreSQL's
/// default, 'latest', would follow; otherwise none (walship's defaults: 'current' with a
/// target, 'latest' without). Refused when two timelines continue the same point.
///
/// A `standby` without a target is left on 'latest' where that is the path's last timeline, so
/// it goes on to follow later failovers; where 'latest' would be a branch off the path, it gets
/// the path's timeline like any restore to the end, and is told it stays there.
fn follow_timeline(
    chosen: (&str, u32),
    target: &Target,
    end: &ArchiveEnd,
    standby: bool,
) -> Result<Option<String>, BackupError> {
    let (id, own) = chosen;
    if let Some(a) = &end.path.ambiguous {
        let children: Vec<String> = a.children.iter().map(|c| c.to_string()).collect();
        return Err(BackupError::Invalid(format!(
            "the WAL after backup {} on timeline {} ends where timelines {} all fork from it: a \
             failover and a restore drill or copy that archived into this repository look alike, \
             so walship cannot tell which is production; choose with --target-timeline {} (or \
             'current' if the target is before the fork)",
            id,
            a.parent,
            children.join(", "),
            children.join(" | ")
        )));
    }
    let last = end.timeline(own);
    // A timeline that forked while the WAL it forked from went on being archived: a restore
    // drill or copy that archived here, or production after a failover whose old primary went on
    // archiving, or a copy restored to before a faulty batch and made the primary. Which one is
    // production nobody can tell from the archive, and replaying the wrong one brings back what
    // the restore is meant to undo. Only a target before the fork is the same on both.
    // Where the path's WAL ends at the fork (a fork on a segment boundary, or at the end of the
    // archive), a target within that WAL is before the fork and one after it is on the branch
    // alone: only replaying to the end has to choose.
    let undecided: Vec<&timeline::Step> = end
        .path
        .branches
        .iter()
        .filter(|b| !target_before_fork(target, b, end.branch_tips.get(&b.timeline)))
        .filter(|b| end.lsn > b.fork_lsn || *target == Target::EndOfArchive)
        .collect();
    if !undecided.is_empty() {
        let each: Vec<String> = undecided
            .iter()
            .map(|b| {
                let tip = end
                    .branch_tips
                    .get(&b.timeline)
                    .cloned()
                    .unwrap_or_default();
                format!(
                    "{b} (promoted about {}; its WAL goes on to {}, stored {})",
                    stored_time(tip.promoted_at),
                    tip.last_segment
                        .as_deref()
                        .unwrap_or("nothing archived yet"),
                    stored_time(tip.stored_at),
                )
            })
            .collect();
        let mut choices: Vec<String> = vec![last.to_string()];
        choices.extend(undecided.iter().map(|b| b.timeline.to_string()));
        return Err(BackupError::Invalid(format!(
            "the WAL after backup {id} goes on along timeline {last} to {} (stored {}), and \
             {}: one is production, the other a restore drill or copy that archived into this \
             repository (or the old primary after a failover), and walship cannot tell which; \
             choose the history to restore with --target-timeline {} (production's WAL is \
             usually the one still being archived), or give a target before the fork",
            end.last_segment,
            stored_time(end.stored_at),
            each.join("; "),
            choices.join(" | ")
        )));
    }
    // 'latest' is PostgreSQL's newest timeline: the path's last one unless a branch is newer.
    let latest = standby && *target == Target::EndOfArchive && end.newest_timeline == last;
    let stays = || {
        if standby {
            eprintln!(
                "walship: the standby stays on timeline {last}: after a failover, set \
                 recovery_target_timeline in its postgresql.auto.conf to the new timeline and \
                 restart it"
            );
        }
    };
    if !end.path.steps.is_empty() {
        let forks: Vec<String> = end.path.steps.iter().map(|s| s.to_string()).collect();
        // Said whatever the log level: the choice decides which history the restore gets.
        eprintln!(
            "walship: the WAL after backup {id} goes on along timeline {last}: promoted where the \
             archived WAL before it ends, as after a failover ({}); recovery follows it \
             (recovery_target_timeline = {})",
            forks.join(", "),
            if latest {
                "'latest', which follows later failovers too".to_string()
            } else {
                last.to_string()
            }
        );
        if latest {
            return Ok(None);
        }
        stays();
        return Ok(Some(last.to_string()));
    }
    if *target == Target::EndOfArchive && end.newest_timeline > last {
        eprintln!(
            "walship: the archive has timelines up to {} that branch off the WAL after backup {} \
             before its end (restore drills or copies): recovery follows timeline {last}, not \
             'latest'",
            end.newest_timeline, id
        );
        stays();
        return Ok(Some(last.to_string()));
    }
    Ok(None)
}

/// Whether `target` lies before `branch` forked, where both histories are the same.
fn target_before_fork(target: &Target, branch: &timeline::Step, tip: Option<&BranchTip>) -> bool {
    match target {
        Target::Lsn(lsn) => *lsn <= branch.fork_lsn,
        // The history file is archived as the promotion ends, just after the fork.
        Target::Time { epoch, .. } => tip
            .and_then(|t| t.promoted_at)
            .is_some_and(|at| *epoch < (at - CLOCK_SLACK_SECS) as f64),
        // A recorded point names its timeline; the checks judge it.
        Target::Name { point: Some(_), .. } | Target::Immediate => true,
        Target::EndOfArchive | Target::Xid(_) | Target::Name { point: None, .. } => false,
    }
}

/// `--target-timeline`, as PostgreSQL's `recovery_target_timeline` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimelineArg {
    Current,
    Latest,
    Number(u32),
}

/// As walship read it, for postgresql.auto.conf: PostgreSQL would read `010` as octal 8.
impl std::fmt::Display for TimelineArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Current => f.write_str("current"),
            Self::Latest => f.write_str("latest"),
            Self::Number(t) => write!(f, "{t}"),
        }
    }
}

fn parse_timeline_arg(s: &str) -> Result<TimelineArg, BackupError> {
    match s {
        "current" => Ok(TimelineArg::Current),
        "latest" => Ok(TimelineArg::Latest),
        n => match n.parse::<u32>() {
            Ok(t) if t > 0 => Ok(TimelineArg::Number(t)),
            _ => Err(BackupError::Invalid(format!(
                "--target-timeline {s}: expected current, latest or a timeline number such as 2"
            ))),
        },
    }
}

/// The archived history file `name`, decoded; `Err(why)` inside when it cannot be decrypted,
/// verified or parsed (the caller decides whether that stops it), outside when it cannot be read.
async fn read_history(
    archive: &Archive,
    name: &WalFileName,
    ids: &Arc<codec::Identities>,
) -> Result<Result<timeline::History, String>, ArchiveError> {
    match archive.get_plain(&crate::repo::wal_key(name), ids).await {
        Ok(text) => Ok(timeline::History::parse(
            name.timeline(),
            &String::from_utf8_lossy(&text),
        )),
        Err(ArchiveError::Codec { source, .. }) => Ok(Err(source.to_string())),
        Err(e) => Err(e),
    }
}

/// Every history file in the archive, decoded, and when each was stored.
async fn all_histories(
    archive: &Archive,
    ids: &Arc<codec::Identities>,
) -> Result<
    (
        std::collections::BTreeMap<u32, timeline::History>,
        std::collections::HashMap<u32, Option<i64>>,
    ),
    BackupError,
> {
    let objects = archive
        .store()
        .list("wal/history/")
        .await
        .map_err(ArchiveError::from)?;
    let mut histories = std::collections::BTreeMap::new();
    let mut stored = std::collections::HashMap::new();
    for o in &objects {
        let Some(name) = wal_name(&o.key).filter(|n| n.kind() == WalFileKind::History) else {
            continue;
        };
        let history =
            read_history(archive, &name, ids)
                .await?
                .map_err(|why| BackupError::BadHistory {
                    name: name.to_string(),
                    why,
                })?;
        histories.insert(name.timeline(), history);
        stored.insert(name.timeline(), o.stored_at);
    }
    Ok((histories, stored))
}

/// The history `--target-timeline latest` or a number names: PostgreSQL can only start recovery
/// along it from a backup that ended on it.
async fn pinned_lineage(
    archive: &Archive,
    ids: &Arc<codec::Identities>,
    arg: TimelineArg,
) -> Result<Option<(u32, Vec<(u32, u64)>)>, BackupError> {
    if arg == TimelineArg::Current {
        return Ok(None);
    }
    let (histories, _) = all_histories(archive, ids).await?;
    let tli = match arg {
        TimelineArg::Number(t) => t,
        _ => histories.keys().max().copied().unwrap_or(1),
    };
    let line = timeline::lineage(tli, &histories).ok_or_else(|| {
        BackupError::NoBackupForTarget(format!(
            "timeline {tli} has no history file in the archive ({:08X}.history), so PostgreSQL \
             cannot recover along it; the archive's timelines are 1{}",
            tli,
            histories
                .keys()
                .map(|t| format!(", {t}"))
                .collect::<String>()
        ))
    })?;
    Ok(Some((tli, line)))
}

/// What the archive holds of the histories that parted from the chosen backup's before it
/// ended (`timeline::rivals`), by timeline: segment numbers with when each was stored, and
/// the `.partial` ones.
async fn rival_wal(
    archive: &Archive,
    seg_size: u64,
    rivals: &[timeline::Rival],
) -> Result<
    (
        std::collections::BTreeMap<u32, std::collections::BTreeMap<u64, Option<i64>>>,
        std::collections::BTreeMap<u32, std::collections::BTreeSet<u64>>,
    ),
    BackupError,
> {
    let mut from: std::collections::BTreeMap<u32, u64> = Default::default();
    for r in rivals {
        for &t in &r.timelines {
            let f = if r.parent_side {
                r.fork.fork_lsn / seg_size
            } else {
                0
            };
            let e = from.entry(t).or_insert(f);
            *e = (*e).min(f);
        }
    }
    let (mut segments, mut partials) = (
        std::collections::BTreeMap::<u32, std::collections::BTreeMap<u64, Option<i64>>>::new(),
        std::collections::BTreeMap::<u32, std::collections::BTreeSet<u64>>::new(),
    );
    for (tli, first) in from {
        let start = SegmentId::from_segno(tli, first, seg_size);
        let objects = archive
            .store()
            .list_after(
                &crate::repo::timeline_prefix(tli),
                &crate::repo::wal_dir(start),
            )
            .await
            .map_err(ArchiveError::from)?;
        for o in &objects {
            let Some(name) = wal_name(&o.key) else {
                continue;
            };
            let Some(seg) = name.segment().filter(|s| s.timeline == tli) else {
                continue;
            };
            match name.kind() {
                WalFileKind::Segment => {
                    segments
                        .entry(tli)
                        .or_default()
                        .insert(seg.segno(seg_size), o.stored_at);
                }
                WalFileKind::Partial => {
                    partials.entry(tli).or_default().insert(seg.segno(seg_size));
                }
                _ => {}
            }
        }
    }
    Ok((segments, partials))
}

/// Refuse a restore whose backup was chosen on one side of a fork the archive cannot settle:
/// a timeline forked before the backup ended while the history the backup lies on went on (or
/// the backup lies on a timeline whose parent went on past the fork), and the other side's
/// archived WAL reaches the target too. Which side is production only the user knows; a
/// backup's recency says nothing about it (the old primary's backups go on after a copy was
/// made production, a drill may take backups of its own).
async fn check_rivals(
    archive: &Archive,
    histories: &std::collections::BTreeMap<u32, timeline::History>,
    promoted: &std::collections::HashMap<u32, Option<i64>>,
    chosen: &BackupManifest,
    target: &Target,
    end: Option<&ArchiveEnd>,
) -> Result<(), BackupError> {
    if matches!(target, Target::Immediate) {
        return Ok(());
    }
    let seg_size = chosen.wal_segment_size;
    let Some(stop) = parse_lsn(&chosen.stop_lsn) else {
        return Ok(());
    };
    let found = timeline::rivals(chosen.timeline, stop, histories);
    if found.is_empty() {
        return Ok(());
    }
    let (segments, partials) = rival_wal(archive, seg_size, &found).await?;
    let on_path = |t: u32| {
        t == chosen.timeline || end.is_some_and(|e| e.path.steps.iter().any(|s| s.timeline == t))
    };
    let mut reaching = Vec::new();
    for r in &found {
        // The other side's archived WAL: its newest segment, and when it was stored.
        let mut last: Option<(u32, u64, Option<i64>)> = None;
        for &t in &r.timelines {
            let Some(segs) = segments.get(&t) else {
                continue;
            };
            for (&n, &at) in segs.range(r.from_segno(seg_size, &partials)..) {
                if last.is_none_or(|(_, _, l)| at.unwrap_or(i64::MAX) > l.unwrap_or(i64::MAX)) {
                    last = Some((t, n, at));
                }
            }
        }
        let (tip, end_lsn, last_at) = match last {
            Some((t, n, at)) => (
                SegmentId::from_segno(t, n, seg_size)
                    .file_name()
                    .to_string(),
                (n + 1) * seg_size,
                at,
            ),
            // A parent that stopped at the fork: a failover, nothing to choose.
            None if r.parent_side => continue,
            None => (
                "nothing archived yet".to_string(),
                r.fork.fork_lsn,
                promoted.get(&r.fork.timeline).copied().flatten(),
            ),
        };
        let slack = |at: Option<i64>| at.map(|a| (a + CLOCK_SLACK_SECS) as f64);
        let reaches = match target {
            Target::Immediate => false,
            Target::Time { epoch, .. } => slack(last_at).is_none_or(|a| a >= *epoch),
            Target::Lsn(lsn) => end_lsn > *lsn,
            Target::Name { point: Some(p), .. } => {
                !on_path(p.timeline) && parse_lsn(&p.lsn).is_none_or(|l| end_lsn > l)
            }
            // Both go on to their ends: the other side matters while it was still being
            // archived when the backup's history last was.
            Target::EndOfArchive | Target::Xid(_) | Target::Name { point: None, .. } => {
                match (slack(last_at), end.and_then(|e| e.stored_at)) {
                    (Some(o), Some(e)) => o >= e as f64,
                    _ => true,
                }
            }
        };
        if reaches {
            reaching.push((r, tip, last_at));
        }
    }
    if reaching.is_empty() {
        return Ok(());
    }
    let last = end.map_or(chosen.timeline, |e| e.timeline(chosen.timeline));
    let mut choices = vec![last.to_string()];
    let each: Vec<String> = reaching
        .iter()
        .map(|(r, tip, at)| {
            let other = if r.parent_side {
                r.fork.parent
            } else {
                r.fork.timeline
            };
            if !choices.contains(&other.to_string()) {
                choices.push(other.to_string());
            }
            let what = if r.parent_side {
                format!(
                    "timeline {} went on past the fork of timeline {} at {}",
                    r.fork.parent,
                    r.fork.timeline,
                    format_lsn(r.fork.fork_lsn)
                )
            } else {
                format!("{} before the backup ended", r.fork)
            };
            format!(
                "{what} (its WAL goes on to {tip}, stored {})",
                stored_time(*at)
            )
        })
        .collect();
    Err(BackupError::Invalid(format!(
        "backup {} (timeline {}) is the newest that reaches the target, but {}: one history is \
         production, the other a restore drill or copy that archived into this repository (or \
         the old primary after a failover), and walship cannot tell which; choose with \
         --target-timeline {} (the backup is then chosen on that history; production's WAL is \
         usually the one still being archived)",
        chosen.id,
        chosen.timeline,
        each.join("; "),
        choices.join(" | ")
    )))
}

pub async fn restore(
    cfg: &Config,
    global: &GlobalArgs,
    args: &RestoreArgs,
) -> Result<BackupManifest, BackupError> {
    let archive = Archive::open(cfg, 5).await?;
    let ids = identities(cfg)?;
    require_repository(&archive).await?;
    let target = if let Some(t) = &args.target_time {
        let time = restore::parse_target_time(t).map_err(BackupError::Invalid)?;
        Target::Time {
            text: time.text,
            epoch: time.epoch,
        }
    } else if let Some(n) = &args.target_name {
        let point = read_restore_point(&archive, &ids, n).await?;
        if point.is_none() {
            tracing::warn!(
                "restore point '{n}' was not made with `walship restore-point`; restoring the newest backup, which must have ended before the point"
            );
        }
        Target::Name {
            name: n.clone(),
            point,
        }
    } else if let Some(x) = args.target_xid {
        Target::Xid(x)
    } else if let Some(l) = &args.target_lsn {
        Target::Lsn(parse_lsn(l).ok_or_else(|| {
            BackupError::Invalid(format!(
                "--target-lsn {l}: expected a WAL location like 0/5000060"
            ))
        })?)
    } else if args.target_immediate {
        Target::Immediate
    } else {
        Target::EndOfArchive
    };
    let timeline_arg = args
        .target_timeline
        .as_deref()
        .map(parse_timeline_arg)
        .transpose()?;
    let pinned = match timeline_arg {
        Some(arg) => pinned_lineage(&archive, &ids, arg).await?,
        None => None,
    };
    let on_pinned = |tli: u32, stop_lsn: &str| {
        pinned.as_ref().is_none_or(|(_, line)| {
            parse_lsn(stop_lsn).is_some_and(|stop| timeline::on_lineage(line, tli, stop))
        })
    };
    let chosen = match &args.backup {
        Some(which) => {
            let m = backup::resolve(&archive, &ids, which).await?;
            if let Some((tli, _)) = pinned
                .as_ref()
                .filter(|_| !on_pinned(m.timeline, &m.stop_lsn))
            {
                return Err(BackupError::NoBackupForTarget(format!(
                    "backup {} (timeline {}, ended at {}) does not lie on timeline {tli}'s \
                     history, so PostgreSQL cannot recover along it from there; leave out \
                     --backup to let walship choose one that does",
                    m.id, m.timeline, m.stop_lsn
                )));
            }
            // PostgreSQL would find out only after the download and replay, and refuse to start:
            // "requested recovery stop point is before consistent recovery point".
            let before_xid = match (&target, m.next_xid) {
                (Target::Xid(x), Some(next)) => !restore::xid_at_or_after(*x, next),
                _ => false,
            };
            if before_xid || restore::reaches(&m.stop_lsn, m.stop_epoch, &target) == Some(false) {
                return Err(BackupError::NoBackupForTarget(format!(
                    "backup {} becomes consistent only at {} (LSN {}), after the target: \
                     choose an earlier backup, or leave out --backup to let walship choose",
                    m.id, m.stop_time, m.stop_lsn
                )));
            }
            m
        }
        None => {
            let mut all = backup::summaries(&archive, Some(&ids)).await?;
            if let Some((tli, _)) = &pinned {
                let before = all.len();
                all.retain(|b| on_pinned(b.timeline, &b.stop_lsn));
                if all.is_empty() && before > 0 {
                    return Err(BackupError::NoBackupForTarget(format!(
                        "no backup lies on timeline {tli}'s history: each ended on a timeline \
                         it does not descend from, or after it forked off; take a backup on \
                         timeline {tli}, or choose another --target-timeline"
                    )));
                }
            }
            let id = &restore::choose_backup(&all, &target)?.id;
            backup::read_manifest(&archive, &ids, id).await?
        }
    };
    // Without --target-timeline, recovery follows the timelines failovers continued the backup's
    // WAL on (restore::timeline), and the checks follow the same path. With one, the checks follow
    // it when it is the backup's own; on another the WAL goes on under names only PostgreSQL's
    // reading of the history files resolves. A standby's timeline is chosen the same way (left
    // alone, PostgreSQL's 'latest' follows a drill's newer branch), but the checks are not made:
    // it waits for WAL yet to come.
    let follow = args.target_timeline.is_none() && target != Target::Immediate;
    let own_timeline = match timeline_arg {
        None | Some(TimelineArg::Current) => true,
        Some(TimelineArg::Number(t)) => t == chosen.timeline,
        Some(TimelineArg::Latest) => pinned.as_ref().is_some_and(|(t, _)| *t == chosen.timeline),
    };
    // Following the path needs every history file: read once, for the path and the rivals.
    let all = match follow {
        true => Some(all_histories(&archive, &ids).await?),
        false => None,
    };
    // The archive is listed only to choose the timeline, or for a target the checks can judge.
    let checkable = matches!(
        target,
        Target::Lsn(_) | Target::Time { .. } | Target::Name { point: Some(_), .. }
    );
    let end = if follow || (own_timeline && !args.standby && checkable) {
        let start = WalStart {
            start_wal: &chosen.start_wal,
            stop_lsn: &chosen.stop_lsn,
            wal_segment_size: chosen.wal_segment_size,
        };
        let histories = match &all {
            Some((read, _)) => Histories::Read(read),
            None => Histories::Skip,
        };
        archive_end(&archive, histories, start).await?
    } else {
        None
    };
    let timeline = match &end {
        _ if !follow => timeline_arg.map(|arg| arg.to_string()),
        None => None,
        Some(e) => follow_timeline((&chosen.id, chosen.timeline), &target, e, args.standby)?,
    };
    if let Some((histories, promoted)) = &all {
        check_rivals(
            &archive,
            histories,
            promoted,
            &chosen,
            &target,
            end.as_ref(),
        )
        .await?;
    }
    if !args.standby {
        check_reachable(&chosen, &target, end.as_ref(), args.accept_gap)?;
    }
    let opts = RecoveryOptions {
        target,
        action: args.target_action.clone(),
        inclusive: match (args.target_inclusive, args.target_exclusive) {
            (_, true) => Some(false),
            (true, _) => Some(true),
            _ => None,
        },
        timeline,
        standby: args.standby,
        archive_off: args.archive_mode == "off",
    };
    let settings = restore::recovery_settings(
        &opts,
        &restore_command(global, cfg),
        &recovery_end_command(),
        &chosen.id,
    );
    let fetch_opts = fetch_options(&args.restore)?;
    if args.dry_run {
        backup::fetch::preflight(&chosen, &args.dir, &fetch_opts)?;
        print_restore_plan(&chosen, &args.dir, &settings, args.standby);
        return Ok(chosen);
    }
    tracing::info!(
        "restoring backup {} (ended {})",
        chosen.id,
        chosen.stop_time
    );
    backup::fetch::fetch(&archive, &ids, &chosen, &args.dir, &fetch_opts, || {
        restore::write_recovery(&args.dir, &settings, args.standby)
    })
    .await?;
    for w in restore_command_warnings(global, cfg, &args.dir) {
        tracing::warn!("{w}");
    }
    Ok(chosen)
}

/// `restore --dry-run`: what a restore would do, once every check before the download passed.
fn print_restore_plan(m: &BackupManifest, dir: &std::path::Path, settings: &str, standby: bool) {
    println!(
        "would restore backup {} (taken {} to {}, LSN {} to {}, timeline {}{})",
        m.id,
        m.start_time,
        m.stop_time,
        m.start_lsn,
        m.stop_lsn,
        m.timeline,
        if m.from_standby { ", on a standby" } else { "" }
    );
    println!(
        "  {} in {} files; {} to download in {} parts",
        human(m.original_size()),
        m.files.len(),
        human(m.stored_size()),
        m.parts.len()
    );
    let bad: Vec<String> = m
        .files
        .iter()
        .filter(|f| f.bad_block_count() > 0)
        .map(|f| match f.bad_block_count() {
            1 => format!("{} (1 block)", f.path),
            n => format!("{} ({n} blocks)", f.path),
        })
        .collect();
    match m.page_checks {
        None => println!("  pages not checked when it was taken (no data checksums)"),
        Some(c) if c.bad == 0 => {
            println!("  {} page checksums verified when it was taken", c.verified)
        }
        Some(c) => println!(
            "  {} of {} pages failed their checksum when it was taken: {}",
            c.bad,
            c.verified,
            bad.join(", ")
        ),
    }
    println!(
        "into {}, then add to its postgresql.auto.conf (and create {}):",
        dir.display(),
        if standby {
            "standby.signal"
        } else {
            "recovery.signal"
        }
    );
    for line in settings.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {line}");
    }
}

/// What would stop the restore_command just written from working once PostgreSQL runs it, as the
/// data directory's owner and with the server's environment, though this restore worked.
fn restore_command_warnings(
    global: &GlobalArgs,
    cfg: &Config,
    dir: &std::path::Path,
) -> Vec<String> {
    let mut out = Vec::new();
    let identity_file = global.identity_file.as_ref().or(cfg.identity_file.as_ref());
    if cfg.identity_env.is_some() && identity_file.is_none() {
        out.push(
            "the identity came from WALSHIP_IDENTITY, which restore_command has only if it is in \
             PostgreSQL's environment: give the PostgreSQL user an identity file and restore with \
             --identity-file"
                .to_string(),
        );
    }
    let root = rustix::process::geteuid().is_root();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    out.extend(s3_credentials_warning(
        cfg,
        |k| std::env::var_os(k).filter(|v| !v.is_empty()).is_some(),
        home.filter(|_| root).as_deref(),
    ));
    if root {
        // The path the recovery settings name, which may be a link the server cannot follow.
        let mut files: Vec<PathBuf> = vec![PathBuf::from(exe())];
        files.extend(cfg.config_file.clone());
        files.extend(identity_file.cloned());
        files.extend(cfg.s3.as_ref().and_then(|s| s.ca_bundle.clone()));
        files.extend(cfg.s3_secret_file.clone());
        if let RepoLocation::Dir(repo) = &cfg.repo {
            files.push(repo.clone());
        }
        for (f, uid) in backup::owner::unreadable_by_owner_of(dir, &files) {
            out.push(format!(
                "PostgreSQL will run restore_command as uid {uid}, the owner of {}, who cannot \
                 read {f}: make it readable to that user, or recovery stops at its first WAL fetch",
                dir.display()
            ));
        }
    }
    out
}

/// Why restore_command might lack the S3 credentials this call used: keys from variables only
/// this call's environment may hold, or (`root_home`: run as root) from root's own `~/.aws`, which
/// PostgreSQL's user does not read. Keys from the config file are checked as files instead.
fn s3_credentials_warning(
    cfg: &Config,
    env_set: impl Fn(&str) -> bool,
    root_home: Option<&std::path::Path>,
) -> Option<String> {
    let s3 = cfg.s3.as_ref()?;
    if s3.static_credentials.is_some() {
        return None;
    }
    let fix =
        "set s3.access_key_id and s3.secret_access_key_file in the config file, or make sure \
               PostgreSQL runs with the same credentials";
    if let Some(var) = ["AWS_ACCESS_KEY_ID", "AWS_PROFILE"]
        .into_iter()
        .find(|v| env_set(v))
    {
        return Some(format!(
            "the S3 credentials came from {var} in this restore's environment, which \
             restore_command has only if PostgreSQL's environment has it too: {fix}"
        ));
    }
    let aws = root_home?.join(".aws");
    ["credentials", "config"]
        .into_iter()
        .map(|f| aws.join(f))
        .find(|p| p.is_file())
        .map(|p| {
            format!(
                "the S3 credentials may have come from {}, root's own, which restore_command \
                 (run as the data directory's owner) does not read: {fix}",
                p.display()
            )
        })
}

pub async fn restore_point(
    cfg: &Config,
    args: &RestorePointArgs,
) -> Result<RestorePoint, BackupError> {
    let recipients = cfg.recipients()?;
    let archive = Archive::open(cfg, 5).await?;
    let key = layout::restore_point_key(&args.name);
    // Recovery to a name stops at the first point of that name it replays, and walship picks the
    // backup before the first one recorded: a name used again (every night's 'before_batch') would
    // take a restore back to the first night. Checked before the point is created.
    let taken = |when: &str| {
        BackupError::Archive(ArchiveError::Conflict(format!(
            "a restore point named '{}' was recorded {when}; a restore to that name would stop at \
             the first one: use a new name (e.g. with the date: '{}_YYYY_MM_DD')",
            args.name, args.name
        )))
    };
    match archive.header(&key).await {
        Ok(_) => return Err(taken("before")),
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => {}
        Err(e) => return Err(e.into()),
    }
    let pg = conn::connect(&args.pg.settings()).await?;
    let marked = backup::push::mark_and_switch(&pg, &args.name).await?;
    let (lsn_text, seg, epoch) = (format_lsn(marked.lsn), marked.segment, marked.epoch);
    let (lsn, timeline) = (marked.lsn, seg.timeline());
    backup::push::wait_archived(
        &archive,
        &seg,
        Duration::from_secs(args.wal_wait_secs),
        backup::push::Awaited::RestorePoint,
    )
    .await
    .map_err(|e| match e {
        BackupError::WalNotArchived(why) => BackupError::WalNotArchived(format!(
            "restore point '{}' was created at {lsn_text}, but it is not recoverable yet: {why}",
            args.name
        )),
        e => e,
    })?;
    let point = RestorePoint {
        name: args.name.clone(),
        lsn: format_lsn(lsn),
        timeline,
        time: crate::time::epoch_rfc3339(epoch),
        epoch,
    };
    let json = serde_json::to_vec(&point).expect("json");
    // The first record of a name stays (another call may have made one meanwhile).
    match archive
        .put_plain(&key, json, &Arc::new(recipients), cfg.compression_level)
        .await
    {
        Ok(_) => Ok(point),
        Err(ArchiveError::Conflict(_)) => Err(taken("by another call meanwhile")),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn commands_name_walship_as_invoked_with_links_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (real, bin) = (dir.path().join("opt/1.4"), dir.path().join("bin"));
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let running = real.join("walship");
        let executable = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(p, b"").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        executable(&running);
        std::os::unix::fs::symlink(&running, bin.join("walship")).unwrap();
        executable(&bin.join("other"));
        let path = || Some(std::ffi::OsString::from(&bin));
        let invoked = |a0: &Path| invoked_path(a0.as_os_str(), path(), Some(&running));
        // Found on PATH, or named: the link, not what it points to.
        assert_eq!(invoked(Path::new("walship")), Some(bin.join("walship")));
        assert_eq!(invoked(&bin.join("walship")), Some(bin.join("walship")));
        // Not this binary (another program, a PATH that finds another walship): not taken.
        assert_eq!(invoked(Path::new("other")), None);
        assert_eq!(invoked(Path::new("missing")), None);
        // Not an executable (the shell would go on looking): not taken.
        std::fs::write(bin.join("plain"), b"").unwrap();
        assert_eq!(
            invoked_path("plain".as_ref(), path(), Some(&bin.join("plain"))),
            None
        );
        assert_eq!(
            invoked_path("walship".as_ref(), path(), Some(&bin.join("other"))),
            None
        );
    }

    #[test]
    fn a_target_timeline_is_written_as_walship_read_it() {
        // PostgreSQL reads the setting with strtoul(.., 0): "010" would be timeline 8.
        assert_eq!(parse_timeline_arg("010").unwrap().to_string(), "10");
        assert_eq!(parse_timeline_arg("0x10").ok(), None);
        assert_eq!(
            parse_timeline_arg("current").unwrap().to_string(),
            "current"
        );
        assert_eq!(parse_timeline_arg("latest").unwrap().to_string(), "latest");
    }

    fn config(dir: &std::path::Path, s3_keys: bool) -> Config {
        let mut text = String::from("repo = \"s3://bucket/p\"\n[s3]\n");
        if s3_keys {
            std::fs::write(dir.join("secret"), "s").unwrap();
            let secret = dir.join("secret").display().to_string();
            text += &format!("access_key_id = \"k\"\nsecret_access_key_file = \"{secret}\"\n");
        }
        std::fs::write(dir.join("w.toml"), text).unwrap();
        Config::resolve(Overrides {
            config: Some(dir.join("w.toml")),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn the_timeline_written_follows_failovers_and_avoids_branches() {
        let end = |steps: &[u32], ambiguous: Option<Vec<u32>>, newest: u32| ArchiveEnd {
            last_segment: "000000020000000000000009".into(),
            lsn: 10 << 24,
            stored_at: None,
            path: timeline::WalPath {
                steps: steps
                    .iter()
                    .map(|&t| timeline::Step {
                        timeline: t,
                        parent: t - 1,
                        fork_lsn: 5 << 24,
                    })
                    .collect(),
                end: None,
                ambiguous: ambiguous.map(|children| timeline::Ambiguity {
                    parent: 1,
                    children,
                }),
                branches: Vec::new(),
            },
            newest_timeline: newest,
            branch_tips: Default::default(),
            after_gap: None,
        };
        let time = Target::Time {
            text: "2026-11-24 12:44:59+00".into(),
            epoch: 0.0,
        };
        let chosen = ("20261124T020000Z", 1);
        let written = |target: &Target, e: &ArchiveEnd| follow_timeline(chosen, target, e, false);
        let standby = |e: &ArchiveEnd| follow_timeline(chosen, &Target::EndOfArchive, e, true);
        // A failover continued the WAL: its timeline, with a target or without.
        assert_eq!(
            written(&time, &end(&[2], None, 2)).unwrap(),
            Some("2".into())
        );
        assert_eq!(
            written(&Target::EndOfArchive, &end(&[2, 3], None, 3)).unwrap(),
            Some("3".into())
        );
        // Nothing followed: walship's defaults ('current' with a target, 'latest' without)...
        assert_eq!(written(&time, &end(&[], None, 1)).unwrap(), None);
        assert_eq!(
            written(&Target::EndOfArchive, &end(&[], None, 1)).unwrap(),
            None
        );
        // ... except that 'latest' would replay into a drill's branch.
        assert_eq!(
            written(&Target::EndOfArchive, &end(&[], None, 2)).unwrap(),
            Some("1".into())
        );
        assert_eq!(written(&time, &end(&[], None, 2)).unwrap(), None);
        // A standby stays on 'latest' where that is the path's end, to follow later failovers
        // too, and gets the path's timeline where 'latest' is a newer branch.
        assert_eq!(standby(&end(&[2], None, 2)).unwrap(), None);
        assert_eq!(standby(&end(&[], None, 1)).unwrap(), None);
        assert_eq!(standby(&end(&[2], None, 4)).unwrap(), Some("2".into()));
        assert_eq!(standby(&end(&[], None, 2)).unwrap(), Some("1".into()));
        // Branches not followed are named when a target lies past the end.
        let mut drill = end(&[], None, 3);
        drill.path.branches = vec![timeline::Step {
            timeline: 3,
            parent: 1,
            fork_lsn: 6 << 24,
        }];
        // A timeline that forked while timeline 1 went on: which is production nobody can tell,
        // so a restore that would pass the fork asks; one before it does not need to.
        drill.branch_tips.insert(
            3,
            BranchTip {
                promoted_at: Some(1_000_000),
                last_segment: Some("00000003000000000000000C".into()),
                stored_at: Some(1_000_900),
            },
        );
        for past in [
            Target::EndOfArchive,
            Target::Xid(7),
            Target::Lsn(7 << 24),
            Target::Time {
                text: "t".into(),
                epoch: 1_000_000.0,
            },
        ] {
            let err = written(&past, &drill).unwrap_err().to_string();
            assert!(
                err.contains("timeline 3 forked from 1 at 0/6000000")
                    && err.contains("00000003000000000000000C")
                    && err.contains("--target-timeline 1 | 3"),
                "{past:?}: {err}"
            );
        }
        // A branch forked where the path's WAL ends: only the end of the archive is in doubt.
        let mut at_end = drill.clone();
        at_end.path.branches[0].fork_lsn = at_end.lsn;
        assert!(written(&Target::EndOfArchive, &at_end).is_err());
        assert!(standby(&drill).is_err() && standby(&at_end).is_err());
        assert_eq!(written(&Target::Xid(7), &at_end).unwrap(), None);
        for before in [
            Target::Lsn(6 << 24),
            Target::Time {
                text: "t".into(),
                epoch: 1_000_000.0 - 600.0,
            },
            Target::Immediate,
        ] {
            assert_eq!(written(&before, &drill).unwrap(), None, "{before:?}");
        }
        let hint = drill.branch_hint();
        assert!(
            hint.contains("timeline 3 forked from 1 at 0/6000000")
                && hint.contains("--target-timeline 3"),
            "{hint}"
        );
        assert_eq!(end(&[2], None, 2).branch_hint(), "");
        // Two timelines continue the same point: the user chooses.
        let err = written(&time, &end(&[], Some(vec![2, 3]), 3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timelines 2, 3") && err.contains("--target-timeline 2 | 3"),
            "{err}"
        );
    }

    #[test]
    fn s3_keys_only_this_call_could_see_are_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".aws")).unwrap();
        let no_env = |_: &str| false;

        // Keys from the config file: restore_command reads the same file.
        let cfg = config(dir.path(), true);
        assert_eq!(cfg.s3_secret_file, Some(dir.path().join("secret")));
        let env = |k: &str| k == "AWS_ACCESS_KEY_ID";
        assert_eq!(s3_credentials_warning(&cfg, env, Some(&home)), None);

        // Keys from the environment.
        let cfg = config(dir.path(), false);
        let w = s3_credentials_warning(&cfg, env, None).unwrap();
        assert!(w.contains("AWS_ACCESS_KEY_ID") && w.contains("secret_access_key_file"));
        let w = s3_credentials_warning(&cfg, |k| k == "AWS_PROFILE", None).unwrap();
        assert!(w.contains("AWS_PROFILE"), "{w}");

        // Root's own ~/.aws, only when there is one.
        assert_eq!(s3_credentials_warning(&cfg, no_env, Some(&home)), None);
        std::fs::write(home.join(".aws/credentials"), "[default]\n").unwrap();
        let w = s3_credentials_warning(&cfg, no_env, Some(&home)).unwrap();
        assert!(w.contains(".aws/credentials"), "{w}");
        // Not root: PostgreSQL's user is this user, with this home.
        assert_eq!(s3_credentials_warning(&cfg, no_env, None), None);

        // A file:// repository needs no S3 credentials.
        let file = Config::resolve(Overrides {
            repo: Some(format!("file://{}", dir.path().display())),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s3_credentials_warning(&file, env, Some(&home)), None);
        assert_eq!(file.s3_secret_file, None);
    }
}
