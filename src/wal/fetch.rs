//! `wal-fetch`: place the archived file PostgreSQL asks for (%f) at %p, verified, atomically.
//!
//! "Not in the archive" (`WalError::NotInArchive`) is returned only when the store answered that the
//! object does not exist *and* the repository itself is there (its `walship.json` is readable), so
//! a wrong bucket, prefix or credentials can never look like the end of the archive.

use std::path::Path;
use std::sync::Arc;

use super::name::{WalFileKind, WalFileName};
use super::spool::Spool;
use super::{parent_dir, state_dir, WalError};
use crate::archive::{Archive, ArchiveError};
use crate::codec::Identities;
use crate::config::WalSettings;
use crate::repo;
use crate::storage::StorageError;

pub struct FetchContext {
    pub archive: Archive,
    pub identities: Arc<Identities>,
    pub settings: WalSettings,
    pub repo_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    FromSpool,
    Downloaded,
}

pub struct FetchReport {
    pub outcome: FetchOutcome,
    /// Whether the caller should make sure a prefetcher is running for this spool.
    pub start_prefetcher: Option<Spool>,
}

pub async fn fetch(ctx: &FetchContext, name: &str, dest: &Path) -> Result<FetchReport, WalError> {
    let name = WalFileName::parse(name)?;
    let spool = Spool::new(&state_dir(
        ctx.settings.state_dir.as_deref(),
        &parent_dir(dest),
    ));
    let prefetching = ctx.settings.prefetch > 0 && name.kind() == WalFileKind::Segment;

    if prefetching
        && spool
            .take(name.as_str(), dest, &ctx.repo_id)
            .map_err(|e| WalError::local("cannot take from spool", spool.dir(), e))?
    {
        return Ok(after(ctx, &name, spool, FetchOutcome::FromSpool));
    }
    match ctx.archive.fetch_to(&repo::wal_key(&name), &ctx.identities, dest).await {
        Ok(_) => Ok(after(ctx, &name, spool, FetchOutcome::Downloaded)),
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

fn after(
    ctx: &FetchContext,
    name: &WalFileName,
    spool: Spool,
    outcome: FetchOutcome,
) -> FetchReport {
    if ctx.settings.prefetch == 0 || name.kind() != WalFileKind::Segment {
        return FetchReport {
            outcome,
            start_prefetcher: None,
        };
    }
    if let Err(e) = spool.set_want(name.as_str(), &ctx.repo_id) {
        tracing::warn!(
            "prefetch disabled for this call: cannot write to {}: {e}",
            spool.dir().display()
        );
        return FetchReport {
            outcome,
            start_prefetcher: None,
        };
    }
    let start = (!spool.prefetcher_running()).then_some(spool);
    FetchReport {
        outcome,
        start_prefetcher: start,
    }
}
