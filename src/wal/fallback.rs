//! A standby's guard against replaying an older timeline's copy of a segment past a fork.
//!
//! For each segment, PostgreSQL's recovery asks restore_command for the copy on the newest
//! timeline that can hold it first, takes any ordinary failure for "not there", and then asks for
//! the same segment on the timelines before (`XLogFileReadAnyTLI`). In standby mode walship's
//! failures are ordinary ones (PostgreSQL retries them a few seconds later), so a download of the
//! new timeline's copy of the segment it forked in that fails for a moment would be followed by a
//! request for the old timeline's copy. After an asynchronous failover the old primary has often
//! archived that copy in full, with the transactions the new primary never had: replayed, they
//! make the standby diverge from its new primary for good.
//!
//! So in standby mode a failure other than "not in the archive" is recorded, and for a few
//! minutes a request for the same segment on an older timeline fails as well (exit 3), until the
//! newer copy is fetched or found missing. A newer copy not archived yet (the new primary's
//! current segment) is "missing", and PostgreSQL then takes the older one as it would from any
//! archive: holding it back there would stall a standby whose new primary died before archiving
//! that segment.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::name::{SegmentId, WalFileName};
use super::WalError;

/// The record of the last failed fetch, in walship's state directory beside pg_wal.
const RECORD: &str = "fetch-failed";

/// How long a failure holds back older timelines' copies. PostgreSQL asks for them right after
/// the failure and asks for the newer copy again within seconds; the limit only keeps a record
/// nothing clears (recovery moved on by streaming) from holding anything back later.
const HOLD: Duration = Duration::from_secs(300);

pub struct FallbackGuard {
    record: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl FallbackGuard {
    /// The guard whose record lives in `state` (walship's state directory beside pg_wal).
    pub fn new(state: &Path) -> Self {
        Self {
            record: state.join(RECORD),
        }
    }

    /// The failed fetch recorded, when it is recent: its segment and how many seconds ago.
    fn recorded(&self) -> Option<(WalFileName, SegmentId, u64)> {
        let text = std::fs::read_to_string(&self.record).ok()?;
        let (name, at) = text.trim().split_once(' ')?;
        let name = WalFileName::parse(name).ok()?;
        let id = name.segment()?;
        let ago = now_secs().checked_sub(at.parse().ok()?)?;
        (Duration::from_secs(ago) < HOLD).then_some((name, id, ago))
    }

    /// Refuse `name` when fetching the same segment on a later timeline failed a moment ago.
    fn check(&self, name: &WalFileName) -> Result<(), WalError> {
        let Some(asked) = name.segment() else {
            return Ok(());
        };
        match self.recorded() {
            Some((failed, id, ago))
                if (id.log, id.seg) == (asked.log, asked.seg) && id.timeline > asked.timeline =>
            {
                Err(WalError::HeldBack(format!(
                    "not serving timeline {}'s copy of this segment: fetching {failed}, timeline \
                     {}'s, failed {ago} s ago, and PostgreSQL would replay the older copy past the \
                     point where timeline {} forked from it; it asks for {failed} again in a few \
                     seconds, so fix what made that fetch fail (the error logged just before)",
                    asked.timeline, id.timeline, id.timeline
                )))
            }
            _ => Ok(()),
        }
    }

    /// Fetch `name` with `fetch` unless the guard holds it back, and record how that ended.
    pub fn guarded(
        &self,
        name: &WalFileName,
        fetch: impl FnOnce() -> Result<(), WalError>,
    ) -> Result<(), WalError> {
        self.check(name)?;
        let fetched = fetch();
        let failed = matches!(&fetched, Err(e) if !matches!(e, WalError::NotInArchive(_)));
        self.note(name, failed);
        fetched
    }

    /// Record how fetching `name` ended: `failed` for any failure but "not in the archive".
    /// Best effort: without a record the guard holds nothing back, as before it existed.
    fn note(&self, name: &WalFileName, failed: bool) {
        if name.segment().is_none() {
            return;
        }
        if failed {
            let tmp = self.record.with_extension("tmp");
            let written = self
                .record
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&tmp, format!("{name} {}\n", now_secs())))
                .and_then(|()| std::fs::rename(&tmp, &self.record));
            if let Err(e) = written {
                tracing::warn!("cannot record the failed fetch of {name}: {e}");
            }
        } else if self.record.exists() && self.recorded().is_none_or(|(failed, ..)| failed == *name)
        {
            // Its own record, or a stale one.
            let _ = std::fs::remove_file(&self.record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> WalFileName {
        WalFileName::parse(s).unwrap()
    }

    #[test]
    fn an_older_timelines_copy_waits_while_the_newer_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let guard = FallbackGuard::new(&dir.path().join("state"));
        let (new, old, older) = (
            name("000000030000000000000005"),
            name("000000020000000000000005"),
            name("000000010000000000000005"),
        );
        guard.check(&old).unwrap();
        let failed = guard.guarded(&new, || Err(WalError::Invalid("damaged".into())));
        assert!(matches!(failed, Err(WalError::Invalid(_))));
        for held in [&old, &older] {
            let err = guard.check(held).unwrap_err();
            assert!(
                err.to_string()
                    .contains("fetching 000000030000000000000005, timeline 3's, failed 0 s ago"),
                "{err}"
            );
            assert_eq!(crate::exit::for_wal(&err), crate::exit::UNAVAILABLE);
        }
        // Not the newer copy itself, nor another segment, nor a later timeline's.
        guard.check(&new).unwrap();
        guard.check(&name("000000020000000000000006")).unwrap();
        guard.check(&name("000000040000000000000005")).unwrap();
        // Another segment's outcome leaves the record alone. Fetched (or found missing), the
        // newer copy releases them.
        guard.note(&name("000000010000000000000004"), false);
        assert!(guard.check(&old).is_err(), "another segment's outcome");
        let missing = guard.guarded(&new, || Err(WalError::NotInArchive(new.to_string())));
        assert!(matches!(missing, Err(WalError::NotInArchive(_))));
        guard.check(&old).unwrap();
        guard.check(&older).unwrap();
        assert!(!dir.path().join("state").join(RECORD).exists());
    }

    #[test]
    fn an_old_record_holds_nothing_back() {
        let dir = tempfile::tempdir().unwrap();
        let guard = FallbackGuard::new(dir.path());
        let at = now_secs() - HOLD.as_secs() - 1;
        std::fs::write(
            dir.path().join(RECORD),
            format!("000000020000000000000005 {at}\n"),
        )
        .unwrap();
        guard.check(&name("000000010000000000000005")).unwrap();
        // History files are not segments: their failures are not recorded.
        guard.note(&name("00000002.history"), true);
        assert!(std::fs::read_to_string(dir.path().join(RECORD))
            .unwrap()
            .starts_with("000000020000000000000005 "));
    }
}
