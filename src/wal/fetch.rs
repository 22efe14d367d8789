//! `wal-fetch`: place the archived file PostgreSQL asks for (%f) at %p, verified, atomically.
//!
//! "Not in the archive" (`WalError::NotInArchive`) is returned only when the store answered that the
//! object does not exist *and* the repository itself is there (its `walship.json` is readable), so
//! a wrong bucket, prefix or credentials can never look like the end of the archive. A miss is never
//! cached: every call that would answer "not in archive" has asked the store.
//!
//! The prefetcher is started only for calls from recovery proper, which PostgreSQL makes with
//! %p = `pg_wal/RECOVERYXLOG`. pg_rewind's `--restore-target-wal` calls restore straight into
//! `pg_wal/<name>` and walks the data directory meanwhile: a prefetcher adding and removing spool
//! files under it would make the rewind fail (the failure WAL-G users hit with `pg_wal/.wal-g`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::name::{WalFileKind, WalFileName};
use super::spool::Spool;
use super::{parent_dir, state_dir, WalError};
use crate::archive::{Archive, ArchiveError, Durability};
use crate::codec::Identities;
use crate::config::WalSettings;
use crate::repo;
use crate::storage::StorageError;

/// The file name PostgreSQL's recovery restores segments to.
pub const RECOVERY_TARGET_NAME: &str = "RECOVERYXLOG";

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
/// `None` when it is not spooled (or cannot be taken): the caller downloads it.
pub fn take_spooled(
    settings: &WalSettings,
    repo_id: &str,
    name: &WalFileName,
    dest: &Path,
) -> Option<FetchReport> {
    if settings.prefetch == 0 || name.kind() != WalFileKind::Segment {
        return None;
    }
    let spool = spool_for(settings, repo_id, dest);
    let waited = spool.take_when_ready(name.as_str(), dest, IN_FLIGHT_WAIT)?;
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
    crate::archive::sweep_stale_temps(&parent_dir(dest));
    let placed = ctx
        .archive
        .fetch_to(
            &repo::wal_key(name),
            &ctx.identities,
            dest,
            Durability::Fsync,
            (),
        )
        .await;
    match placed {
        Ok(_) => Ok(after(
            &ctx.settings,
            name,
            dest,
            spool_for(&ctx.settings, &ctx.repo_id, dest),
            FetchOutcome::Downloaded,
        )),
        Err(ArchiveError::Storage(StorageError::NotFound(_))) => match ctx.archive.read_meta().await? {
            Some(_) => Err(WalError::NotInArchive(format!("{name} (repository {})", ctx.archive.store().describe()))),
            None => Err(WalError::NoRepository(format!(
                "{} has no walship.json: this is not a walship repository (wrong bucket, prefix or directory?), so walship cannot tell whether {name} is archived",
                ctx.archive.store().describe()
            ))),
        },
        Err(e) => Err(e.into()),
    }
}

/// Whether a call restoring to `dest` comes from recovery proper (not pg_rewind, not a person).
pub fn from_recovery(dest: &Path) -> bool {
    dest.file_name().and_then(|n| n.to_str()) == Some(RECOVERY_TARGET_NAME)
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
