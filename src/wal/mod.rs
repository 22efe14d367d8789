//! WAL archiving: names and LSN arithmetic, `wal-push` with look-ahead, `wal-fetch` with the
//! prefetch spool. Talks to storage only through `Archive`.

pub mod fetch;
pub mod name;
pub mod push;
pub mod spool;

use std::path::{Path, PathBuf};

use crate::archive::ArchiveError;
use crate::codec::CodecError;
use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    BadName(#[from] name::BadWalName),
    #[error("{0}")]
    ForeignCluster(String),
    #[error("{0} is not in the archive")]
    NotInArchive(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NoRepository(String),
    #[error("{what} {path}: {err}{}", crate::io_hint::suffix(.err))]
    Local {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("encoding {path} failed: {source}")]
    Encode { path: PathBuf, source: CodecError },
}

impl WalError {
    pub fn local(what: &'static str, path: &Path, err: std::io::Error) -> Self {
        WalError::Local {
            what,
            path: path.to_path_buf(),
            err,
        }
    }
}

/// The directory for walship's own state next to pg_wal: look-ahead records and the spool.
pub fn state_dir(configured: Option<&Path>, pg_wal: &Path) -> PathBuf {
    configured
        .map(Path::to_path_buf)
        .unwrap_or_else(|| pg_wal.join(".walship"))
}

/// The directory a path given by PostgreSQL (%p) lives in.
pub fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
