//! `wal-fetch`: place the archived file PostgreSQL asks for (%f) at %p, verified, atomically.
//!
//! "Not in the archive" (`WalError::NotInArchive`) is returned only when the store answered that the
//! object does not exist *and* the repository itself is there (its `walship.json` is readable), so
//! a wrong bucket, prefix or credentials can never look like the end of the archive. A miss is never
//! cached: every call that would answer "not in archive" has asked the store.
//!
//! A WAL segment (or `.partial` file) is placed only once its first page's header agrees with
//! its name and with the repository's `walship.json` (system identifier, segment size, page
//! magic): PostgreSQL takes another cluster's page for the end of WAL, and would end recovery
//! there. The prefetcher checks the same before a segment enters the spool.
//!
//! The prefetcher is started only for calls from recovery proper, which PostgreSQL makes with
//! %p = `pg_wal/RECOVERYXLOG`. pg_rewind's `--restore-target-wal` calls restore straight into
//! `pg_wal/<name>` and walks the data directory meanwhile: a prefetcher adding and removing spool
//! files under it would make the rewind fail (the failure WAL-G users hit with `pg_wal/.wal-g`).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::name::{format_lsn, WalFileKind, WalFileName};
use super::spool::{ServerWatch, Spool};
use super::{parent_dir, state_dir, HeaderMismatch, WalError};
use crate::archive::{self, Archive, ArchiveError, Durability};
use crate::codec::Identities;
use crate::config::WalSettings;
use crate::pg::walpage::{LongPageHeader, LONG_HEADER_LEN};
use crate::repo::{self, RepoMeta};
use crate::storage::StorageError;

/// The file name PostgreSQL's recovery restores segments to.
pub const RECOVERY_TARGET_NAME: &str = "RECOVERYXLOG";

/// The file name PostgreSQL's recovery restores timeline history files to.
const RECOVERY_HISTORY_NAME: &str = "RECOVERYHISTORY";

/// How long a call waits for a segment the prefetcher is downloading before it downloads the
/// segment itself. Downloading it twice would take CPU and bandwidth from the prefetcher.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

pub struct FetchContext {
    pub archive: Archive,
    pub identities: Arc<Identities>,
    pub settings: WalSettings,
    pub repo_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Found complete in the spool.
    FromSpool,
    /// Taken from the spool once the prefetcher's download of it ended, after this long.
    FromSpoolAfterWait(Duration),
    Downloaded,
}

pub struct FetchReport {
    pub outcome: FetchOutcome,
    /// Set when the caller should make sure a prefetcher is running for this spool.
    pub start_prefetcher: Option<Spool>,
}

fn spool_for(settings: &WalSettings, repo_id: &str, dest: &Path) -> Spool {
    Spool::new(
        &state_dir(settings.state_dir.as_deref(), &parent_dir(dest)),
        repo_id,
    )
}

/// The fast path, taken before any storage client is set up: move a prefetched segment into place.
/// `None` when it is not spooled (or cannot be taken): the caller downloads it. A segment the
/// prefetcher is downloading is waited for, though for no more than half the time to
/// `deadline`: the caller's own download gets the other half.
pub fn take_spooled(
    settings: &WalSettings,
    repo_id: &str,
    name: &WalFileName,
    dest: &Path,
    deadline: Option<Instant>,
) -> Option<FetchReport> {
    if settings.prefetch == 0 || name.kind() != WalFileKind::Segment {
        return None;
    }
    let spool = spool_for(settings, repo_id, dest);
    let limit = deadline.map_or(IN_FLIGHT_WAIT, |d| {
        (d.saturating_duration_since(Instant::now()) / 2).min(IN_FLIGHT_WAIT)
    });
    let waited = spool.take_when_ready(name.as_str(), dest, limit)?;
    let outcome = match waited.is_zero() {
        true => FetchOutcome::FromSpool,
        false => FetchOutcome::FromSpoolAfterWait(waited),
    };
    Some(after(settings, name, dest, spool, outcome))
}

/// Download, verify and place `name` at `dest`.
pub async fn fetch(
    ctx: &FetchContext,
    name: &WalFileName,
    dest: &Path,
) -> Result<FetchReport, WalError> {
    // What calls killed before they could clean up left beside `dest` (one small directory read
    // before a 16 MiB download; calls served from the spool leave it to the prefetcher's start).
    // Only for recovery's own names: pg_rewind lists pg_wal before it restores, and stops ("could
    // not remove file") when a file it listed for removal is already gone.
    if from_recovery(dest) || is_named(dest, RECOVERY_HISTORY_NAME) {
        archive::sweep_stale_temps(&parent_dir(dest));
    }
    let key = repo::wal_key(name);
    // A segment is checked against walship.json: read it beside the download, not after it.
    let (object, meta) = if has_long_header(name) {
        let (object, meta) = tokio::join!(ctx.archive.download(&key), ctx.archive.read_meta());
        (object, Some(meta))
    } else {
        (ctx.archive.download(&key).await, None)
    };
    let object = match object {
        Ok(object) => object,
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => {
            let meta = match meta {
                Some(meta) => meta?,
                None => ctx.archive.read_meta().await?,
            };
            return Err(match meta {
                Some(_) => WalError::NotInArchive(format!("{name} (repository {})", ctx.archive.store().describe())),
                None => WalError::NoRepository(format!(
                    "{} has no walship.json: this is not a walship repository (wrong bucket, prefix or directory?), so walship cannot tell whether {name} is archived",
                    ctx.archive.store().describe()
                )),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let expected = match meta {
        None => None,
        Some(meta) => Some(meta?.ok_or_else(|| {
            WalError::NoRepository(format!(
                "{} holds {name} but no walship.json, so walship cannot check that the segment is this cluster's WAL and does not restore it; \
                 restore walship.json (a versioned bucket keeps its earlier versions) or point restore_command at this cluster's repository",
                ctx.archive.store().describe()
            ))
        })?),
    };
    let place = |object| {
        let (seg, repository, expected) = (
            name.clone(),
            ctx.archive.store().describe(),
            expected.clone(),
        );
        archive::place(
            object,
            &key,
            &ctx.identities,
            dest,
            Durability::Fsync,
            (),
            move |restored: &Path| match &expected {
                Some(meta) => check_restored(restored, &seg, meta, &repository),
                None => Ok(()),
            },
        )
    };
    ctx.archive
        .verified_or_refetched(&key, object, place)
        .await?;
    Ok(after(
        &ctx.settings,
        name,
        dest,
        spool_for(&ctx.settings, &ctx.repo_id, dest),
        FetchOutcome::Downloaded,
    ))
}

/// After recovery fetched a timeline history file (PostgreSQL restores those to
/// `pg_wal/RECOVERYHISTORY`): tell the prefetcher, so that past a fork point it prefetches the
/// segments recovery reads from the new timeline, not the old timeline's. `pid_file` is the
/// server's `postmaster.pid`. Quiet on failure: prefetching is an optimisation, and the call's
/// own outcome says enough.
pub fn note_history(
    settings: &WalSettings,
    repo_id: &str,
    name: &WalFileName,
    dest: &Path,
    pid_file: &Path,
) {
    let from_recovery = is_named(dest, RECOVERY_HISTORY_NAME);
    if settings.prefetch == 0 || name.kind() != WalFileKind::History || !from_recovery {
        return;
    }
    let spool = spool_for(settings, repo_id, dest);
    let noted = ServerWatch::new(pid_file).and_then(|server| {
        let text = std::fs::read_to_string(dest)?;
        spool.note_history(server.identity(), name.timeline(), &text)
    });
    if let Err(e) = noted {
        tracing::debug!("cannot tell the prefetcher about {name}: {e}");
    }
}

/// Whether `name` is a file that starts with a WAL long page header: segments and `.partial`
/// segments, not history or backup-history files.
fn has_long_header(name: &WalFileName) -> bool {
    matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial)
}

/// Check a restored WAL segment, complete at `restored` but not yet placed, against its name and
/// the repository's `walship.json`: another cluster's segment (a repository recreated at the same
/// URL, a prefix shared by two clusters) or a misnamed one must not reach PostgreSQL, which would
/// take its first page for the end of WAL and end recovery there. The error names what the header
/// says and what was expected; not "not in the archive" (exit 1), which would end recovery too.
pub(super) fn check_restored(
    restored: &Path,
    name: &WalFileName,
    meta: &RepoMeta,
    repository: &str,
) -> Result<(), WalError> {
    let mut first = Vec::with_capacity(LONG_HEADER_LEN);
    std::fs::File::open(restored)
        .and_then(|f| f.take(LONG_HEADER_LEN as u64).read_to_end(&mut first))
        .map_err(|e| WalError::local("cannot read back", restored, e))?;
    let h = LongPageHeader::parse(&first).map_err(|e| {
        WalError::Invalid(format!(
            "{name} in {repository} decodes, but is {e}; walship did not restore it: find out what archived this object under a segment's name"
        ))
    })?;
    let Some(mismatch) = super::header_mismatch(&h, name, Some(meta)) else {
        return Ok(());
    };
    Err(match mismatch {
        HeaderMismatch::Position { header, name: by_name } => WalError::Invalid(format!(
            "{name} in {repository}: its WAL page header says it starts at {}, but its name says {}; walship did not restore this misnamed segment: find out what archived it under this name",
            format_lsn(header),
            format_lsn(by_name)
        )),
        HeaderMismatch::System { header, repository: expected } => WalError::ForeignCluster(format!(
            "{name} in {repository} belongs to database system {header}, but the repository's walship.json says system {expected}; \
             walship did not restore it: check that restore_command points at this cluster's repository (one recreated at the same URL, or shared with another cluster, holds other WAL)"
        )),
        HeaderMismatch::Format {
            magic,
            segment_size,
            repository_magic,
            repository_segment_size,
        } => WalError::ForeignCluster(format!(
            "{name} in {repository}: its WAL page header says magic {magic:#06x}, segment size {segment_size}, but the repository's walship.json says magic \
             {repository_magic:#06x}, segment size {repository_segment_size}; walship did not restore it: check that restore_command points at this cluster's repository"
        )),
    })
}

/// Whether a call restoring to `dest` comes from recovery proper (not pg_rewind, not a person).
pub fn from_recovery(dest: &Path) -> bool {
    is_named(dest, RECOVERY_TARGET_NAME)
}

/// Whether this call is the one PostgreSQL makes as archive recovery ends, with the server in
/// `data_dir` (its working directory): once it has removed `standby.signal` or
/// `recovery.signal`, it copies the parent timeline's history into the new timeline's, fetching
/// it to `RECOVERYHISTORY`. A failure there must be an ordinary one, as in standby mode:
/// PostgreSQL then copies `pg_wal`'s own copy (recovery keeps the history files it reads there),
/// where a code above 125 would stop the server halfway through a promotion.
pub fn ends_archive_recovery(dest: &Path, data_dir: &Path) -> bool {
    is_named(dest, RECOVERY_HISTORY_NAME)
        && !data_dir.join("standby.signal").exists()
        && !data_dir.join("recovery.signal").exists()
}

fn is_named(path: &Path, name: &str) -> bool {
    path.file_name().and_then(|n| n.to_str()) == Some(name)
}

/// Whether recovery's segments at `dest` go through the prefetch spool: segments (not history
/// files), restored by recovery proper (not pg_rewind), with prefetch on.
fn prefetched(settings: &WalSettings, name: &WalFileName, dest: &Path) -> bool {
    settings.prefetch > 0 && name.kind() == WalFileKind::Segment && from_recovery(dest)
}

/// Before a call from recovery downloads `name` itself: tell the prefetcher where recovery is,
/// and hand back the spool when no prefetcher runs there yet, so that one can be started to work
/// on the next segments while this call downloads its own. Not when recovery asks for the
/// segment it asked for last: a standby at the end of the archive asks for the next segment every
/// few seconds, and would otherwise start a prefetcher each time the last one went idle. Quiet:
/// when the spool cannot be written, the call's own outcome says enough.
pub fn prefetch_ahead(
    settings: &WalSettings,
    repo_id: &str,
    name: &WalFileName,
    dest: &Path,
) -> Option<Spool> {
    if !prefetched(settings, name, dest) {
        return None;
    }
    let spool = spool_for(settings, repo_id, dest);
    if spool.want().as_ref() == Some(name) {
        return None;
    }
    spool.set_want(name.as_str()).ok()?;
    (!spool.prefetcher_running()).then_some(spool)
}

fn after(
    settings: &WalSettings,
    name: &WalFileName,
    dest: &Path,
    spool: Spool,
    outcome: FetchOutcome,
) -> FetchReport {
    let done = FetchReport {
        outcome,
        start_prefetcher: None,
    };
    if !prefetched(settings, name, dest) {
        return done;
    }
    if let Err(e) = spool.set_want(name.as_str()) {
        tracing::warn!(
            "prefetch disabled for this call: cannot write to {}: {e}",
            spool.dir().display()
        );
        return done;
    }
    FetchReport {
        start_prefetcher: (!spool.prefetcher_running()).then_some(spool),
        ..done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;
    use crate::storage::testing::Faulty;

    const SEG_SIZE: u64 = 16 << 20;

    fn meta(system: u64) -> RepoMeta {
        RepoMeta {
            format: repo::REPO_FORMAT,
            system_identifier: system.to_string(),
            wal_page_magic: 0xD110,
            pg_major: Some(15),
            wal_segment_size: SEG_SIZE,
            wal_block_size: 8192,
            codec: "zstd+age-x25519".into(),
            recipient_fingerprints: Vec::new(),
            created_at: "2024-01-01T00:00:00Z".into(),
            created_by: "test".into(),
        }
    }

    /// The start of segment `at` of database system `system` (the checks read only its header).
    fn segment(system: u64, at: &WalFileName) -> Vec<u8> {
        let addr = at.segment().unwrap().segno(SEG_SIZE) * SEG_SIZE;
        let mut b =
            crate::pg::walpage::synthetic_header(system, at.timeline(), addr, SEG_SIZE as u32);
        b.resize(8192, 0);
        b
    }

    fn settings(prefetch: usize) -> WalSettings {
        WalSettings {
            lookahead: 0,
            upload_concurrency: 1,
            prefetch,
            download_concurrency: 4,
            state_dir: None,
            fetch_attempts: 1,
            standby_fetch_timeout: None,
            prefetch_idle: Duration::from_secs(60),
            prefetch_min_free: 0,
        }
    }

    #[test]
    fn the_history_copy_at_the_end_of_archive_recovery_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let history = dir.path().join("pg_wal").join(RECOVERY_HISTORY_NAME);
        let segment = dir.path().join("pg_wal").join(RECOVERY_TARGET_NAME);
        assert!(ends_archive_recovery(&history, dir.path()));
        assert!(!ends_archive_recovery(&segment, dir.path()));
        for signal in ["standby.signal", "recovery.signal"] {
            std::fs::write(dir.path().join(signal), b"").unwrap();
            assert!(!ends_archive_recovery(&history, dir.path()), "{signal}");
            std::fs::remove_file(dir.path().join(signal)).unwrap();
        }
    }

    #[test]
    fn a_call_waits_for_the_prefetchers_download_no_longer_than_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, dest) = (settings(16), dir.path().join(RECOVERY_TARGET_NAME));
        let name = WalFileName::parse("000000010000000000000002").unwrap();
        let spool = spool_for(&settings, "r", &dest);
        spool.set_want("000000010000000000000001").unwrap();
        // A running prefetcher whose download of the segment never ends.
        let lock = std::fs::File::create(spool.dir().join(".lock")).unwrap();
        lock.lock().unwrap();
        std::fs::File::create(spool.in_flight_marker(name.as_str())).unwrap();
        let since = std::time::Instant::now();
        let limit = Duration::from_millis(600);
        let deadline = Some(since + limit);
        assert!(take_spooled(&settings, "r", &name, &dest, deadline).is_none());
        let took = since.elapsed();
        // Half of it: the call's own download gets the rest.
        assert!(took >= limit / 2 && took < limit, "{took:?}");
        // Past the deadline: not waited for at all.
        let since = std::time::Instant::now();
        assert!(take_spooled(&settings, "r", &name, &dest, deadline).is_none());
        assert!(since.elapsed() < limit, "{:?}", since.elapsed());
    }

    #[test]
    fn only_the_repositorys_segment_at_its_named_place_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let name = WalFileName::parse("000000010000000200000003").unwrap();
        let restored = dir.path().join(".RECOVERYXLOG.walship-tmp.1");
        let check = |bytes: Vec<u8>, meta: &RepoMeta| {
            std::fs::write(&restored, bytes).unwrap();
            check_restored(&restored, &name, meta, "file:///repo")
        };
        check(segment(7, &name), &meta(7)).unwrap();
        fn refused(err: WalError, says: &[&str]) {
            let msg = err.to_string();
            for s in says {
                assert!(msg.contains(s), "'{s}' missing: {msg}");
            }
            // Never "not in the archive", which would end recovery there.
            let code = exit::for_wal(&err);
            assert!(
                code == exit::CONFLICT || code == exit::CORRUPT,
                "{code}: {msg}"
            );
        }
        // Another cluster's WAL under the name: a repository recreated at the same URL.
        let err = check(segment(8, &name), &meta(7)).unwrap_err();
        assert!(matches!(err, WalError::ForeignCluster(_)), "{err}");
        refused(
            err,
            &[
                "000000010000000200000003",
                "database system 8",
                "says system 7",
                "did not restore",
            ],
        );
        // Another WAL format.
        let newer = RepoMeta {
            wal_page_magic: 0xD113,
            ..meta(7)
        };
        let err = check(segment(7, &name), &newer).unwrap_err();
        refused(err, &["magic 0xd110", "magic 0xd113"]);
        // Misnamed: the page header says another position.
        let four = WalFileName::parse("000000010000000200000004").unwrap();
        let err = check(segment(7, &four), &meta(7)).unwrap_err();
        assert!(matches!(err, WalError::Invalid(_)), "{err}");
        refused(err, &["2/4000000", "2/3000000", "misnamed"]);
        // Not WAL at all.
        let err = check(Vec::new(), &meta(7)).unwrap_err();
        refused(err, &["not a WAL segment"]);
    }

    #[tokio::test]
    async fn only_this_clusters_segments_are_placed_and_only_recovery_sweeps_temps() {
        let dir = tempfile::tempdir().unwrap();
        let (store_dir, pg_wal) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(&store_dir).unwrap();
        std::fs::create_dir_all(&pg_wal).unwrap();
        let (text, _) = crate::codec::generate_identity();
        let ids = Identities::parse(&text, "test").unwrap();
        let recipients = ids.recipients();
        let archive = Archive::new(Arc::new(crate::storage::fs::FsStore::new(&store_dir)));
        archive.ensure_meta(&meta(7)).await.unwrap();
        let put = |name: &WalFileName, system: u64| {
            let enc = crate::codec::encode(&segment(system, name)[..], &recipients, 1).unwrap();
            let (archive, key) = (archive.clone(), repo::wal_key(name));
            async move { archive.put(&key, enc).await.unwrap() }
        };
        let ctx = FetchContext {
            archive: archive.clone(),
            identities: Arc::new(ids),
            settings: settings(0),
            repo_id: "file:///repo".into(),
        };
        let dest = pg_wal.join(RECOVERY_TARGET_NAME);

        let foreign = WalFileName::parse("000000010000000000000003").unwrap();
        put(&foreign, 8).await;
        let err = fetch(&ctx, &foreign, &dest).await.err().expect("refused");
        assert!(matches!(err, WalError::ForeignCluster(_)), "{err}");
        assert!(!dest.exists(), "nothing placed");
        assert_eq!(
            std::fs::read_dir(&pg_wal).unwrap().count(),
            0,
            "no temp file left"
        );

        let own = WalFileName::parse("000000010000000000000004").unwrap();
        put(&own, 7).await;
        fetch(&ctx, &own, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), segment(7, &own));

        let missing = WalFileName::parse("000000010000000000000005").unwrap();
        assert!(matches!(
            fetch(&ctx, &missing, &dest).await,
            Err(WalError::NotInArchive(_))
        ));

        // A killed call's temp file: left alone by pg_rewind's calls (to pg_wal/<name>), which
        // listed it for removal, and swept by recovery's.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let stale = pg_wal.join(format!(".RECOVERYXLOG.walship-tmp.{}", child.id()));
        child.wait().unwrap();
        std::fs::write(&stale, b"part").unwrap();
        fetch(&ctx, &own, &pg_wal.join(own.as_str())).await.unwrap();
        assert!(stale.exists(), "pg_rewind's listing still holds");
        fetch(&ctx, &own, &dest).await.unwrap();
        assert!(!stale.exists(), "swept by recovery");
    }

    /// A fetch context over `store`, a repository of system 7 holding segment `name`.
    async fn holding(store: Arc<Faulty>, name: &WalFileName) -> FetchContext {
        let (text, _) = crate::codec::generate_identity();
        let ids = Identities::parse(&text, "test").unwrap();
        let archive = Archive::new(store);
        archive.ensure_meta(&meta(7)).await.unwrap();
        let enc = crate::codec::encode(&segment(7, name)[..], &ids.recipients(), 1).unwrap();
        archive.put(&repo::wal_key(name), enc).await.unwrap();
        FetchContext {
            archive,
            identities: Arc::new(ids),
            settings: settings(0),
            repo_id: "file:///repo".into(),
        }
    }

    #[tokio::test]
    async fn a_download_damaged_on_the_way_is_made_once_more() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        for damaged in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (store_dir, pg_wal) = (dir.path().join("repo"), dir.path().join("pg_wal"));
            std::fs::create_dir_all(&store_dir).unwrap();
            std::fs::create_dir_all(&pg_wal).unwrap();
            let store = Arc::new(Faulty::damaging(&store_dir, "wal/", damaged));
            let ctx = holding(store.clone(), &name).await;
            let dest = pg_wal.join(RECOVERY_TARGET_NAME);
            let got = fetch(&ctx, &name, &dest).await;
            assert_eq!(store.downloads(), 2, "one download more, never a third");
            if damaged == 1 {
                got.unwrap();
                assert_eq!(std::fs::read(&dest).unwrap(), segment(7, &name));
            } else {
                let err = got.err().expect("damaged twice: corrupt");
                assert_eq!(exit::for_wal(&err), exit::CORRUPT, "{err}");
                assert_eq!(
                    std::fs::read_dir(&pg_wal).unwrap().count(),
                    0,
                    "nothing placed"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_segment_gone_when_downloaded_again_is_corrupt_not_missing() {
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (store_dir, pg_wal) = (dir.path().join("repo"), dir.path().join("pg_wal"));
        std::fs::create_dir_all(&store_dir).unwrap();
        std::fs::create_dir_all(&pg_wal).unwrap();
        let store = Arc::new(Faulty::damaging_then_gone(&store_dir, "wal/"));
        let ctx = holding(store, &name).await;
        let err = fetch(&ctx, &name, &pg_wal.join(RECOVERY_TARGET_NAME))
            .await
            .err()
            .expect("damaged, then gone");
        // Exit 1 would end recovery here, short of WAL the archive had.
        assert_eq!(exit::for_wal(&err), exit::CORRUPT, "{err}");
        assert!(
            err.to_string().contains("gone when downloaded again"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&pg_wal).unwrap().count(), 0);
    }

    /// Recovery that follows timeline 2 (it fetched 00000002.history) reads the segment holding
    /// the fork point, and those after it, from timeline 2: the prefetcher spools those, not
    /// timeline 1's copies, which the old primary may have archived past the fork, nor those of
    /// a newer timeline that forked before recovery's position.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_prefetcher_follows_the_history_recovery_fetched_past_the_fork() {
        let dir = tempfile::tempdir().unwrap();
        let (store_dir, data) = (dir.path().join("repo"), dir.path().join("data"));
        let pg_wal = data.join("pg_wal");
        std::fs::create_dir_all(&store_dir).unwrap();
        std::fs::create_dir_all(&pg_wal).unwrap();
        let pid_file = data.join("postmaster.pid");
        std::fs::write(&pid_file, "4242\n/data\n1700000000\n5432\n").unwrap();
        let store = Arc::new(Faulty::failing(&store_dir, 0, false));
        let first = WalFileName::parse("000000010000000000000002").unwrap();
        let mut ctx = holding(store, &first).await;
        ctx.settings = settings(3);
        let seg = |name: &str| WalFileName::parse(name).unwrap();
        // Timeline 2 forked inside segment 3; timeline 1 went on being archived past it. A
        // drill restored to segment 1 promoted timeline 3 and archived into the repository too.
        for name in [
            "000000010000000000000003",
            "000000010000000000000004",
            "000000020000000000000003",
            "000000020000000000000004",
            "000000020000000000000005",
            "000000030000000000000003",
            "000000030000000000000004",
            "000000030000000000000005",
        ] {
            let name = seg(name);
            let enc = crate::codec::encode(&segment(7, &name)[..], &ctx.identities.recipients(), 1)
                .unwrap();
            ctx.archive.put(&repo::wal_key(&name), enc).await.unwrap();
        }
        let history = pg_wal.join("RECOVERYHISTORY");
        std::fs::write(&history, "1\t0/3000198\tno recovery target specified\n").unwrap();
        let (settings, repo_id) = (ctx.settings.clone(), ctx.repo_id.clone());
        // Restored somewhere else than RECOVERYHISTORY (by hand, by pg_rewind): not noted.
        let elsewhere = pg_wal.join("00000002.history");
        std::fs::copy(&history, &elsewhere).unwrap();
        note_history(
            &settings,
            &repo_id,
            &seg("00000002.history"),
            &elsewhere,
            &pid_file,
        );
        let dest = pg_wal.join(RECOVERY_TARGET_NAME);
        let spool = spool_for(&settings, &repo_id, &dest);
        let followed = || {
            let at = first.segment().unwrap();
            spool
                .followed("4242 1700000000", &at, SEG_SIZE)
                .map(|h| h.timeline)
        };
        assert_eq!(followed(), None);
        let noted = |name: &str| note_history(&settings, &repo_id, &seg(name), &history, &pid_file);
        noted("00000002.history");
        assert_eq!(followed(), Some(2));
        // The drill's history, which a standby following 'latest' fetches and rejects.
        std::fs::write(&history, "1\t0/1800000\trestore drill\n").unwrap();
        noted("00000003.history");
        assert_eq!(followed(), Some(2));
        spool.set_want(first.as_str()).unwrap();

        let lock = spool.lock_for_prefetcher().unwrap().expect("lock is free");
        let server = ServerWatch::new(&pid_file).unwrap();
        let prefetcher = tokio::spawn(crate::wal::spool::run_prefetcher(
            Arc::new(ctx),
            spool_for(&settings, &repo_id, &dest),
            lock,
            server,
        ));
        let take = |name: &str| {
            let since = std::time::Instant::now();
            while since.elapsed() < Duration::from_secs(30) {
                if spool.take(name, &dest) {
                    return std::fs::read(&dest).unwrap();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("{name} never reached the spool");
        };
        for name in ["000000020000000000000003", "000000020000000000000004"] {
            assert_eq!(take(name), segment(7, &seg(name)));
            spool.set_want(name).unwrap();
        }
        assert_eq!(
            take("000000020000000000000005"),
            segment(7, &seg("000000020000000000000005"))
        );
        std::fs::remove_file(&pid_file).unwrap();
        tokio::time::timeout(Duration::from_secs(30), prefetcher)
            .await
            .expect("the prefetcher stops with its server")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn only_recovery_proper_starts_a_prefetcher() {
        assert!(from_recovery(Path::new("pg_wal/RECOVERYXLOG")));
        // pg_rewind --restore-target-wal restores straight to the segment's own name.
        assert!(!from_recovery(Path::new("pg_wal/000000010000000000000003")));
        assert!(!from_recovery(Path::new("pg_wal/RECOVERYHISTORY")));
    }

    #[test]
    fn a_prefetcher_starts_ahead_of_a_download_once_per_segment_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let settings = WalSettings {
            lookahead: 0,
            upload_concurrency: 1,
            prefetch: 16,
            download_concurrency: 4,
            state_dir: None,
            fetch_attempts: 1,
            standby_fetch_timeout: None,
            prefetch_idle: Duration::from_secs(60),
            prefetch_min_free: 0,
        };
        let dest = dir.path().join("RECOVERYXLOG");
        let seg = |n: &str| WalFileName::parse(n).unwrap();
        let (a, b) = (
            seg("000000010000000000000003"),
            seg("000000010000000000000004"),
        );
        let ahead = |name: &WalFileName| prefetch_ahead(&settings, "repo", name, &dest);
        assert!(ahead(&a).is_some(), "recovery moved on: start one");
        assert_eq!(spool_for(&settings, "repo", &dest).want(), Some(a.clone()));
        // The same segment again (a standby polling at the end of the archive): not again.
        assert!(ahead(&a).is_none());
        assert!(ahead(&b).is_some());
        // Not for history files, pg_rewind's restores, or with prefetch off.
        assert!(ahead(&seg("00000002.history")).is_none());
        let rewind = dir.path().join("000000010000000000000005");
        let five = seg("000000010000000000000005");
        assert!(prefetch_ahead(&settings, "repo", &five, &rewind).is_none());
        let off = WalSettings {
            prefetch: 0,
            ..settings.clone()
        };
        assert!(prefetch_ahead(&off, "repo", &seg("000000010000000000000006"), &dest).is_none());
    }
}
