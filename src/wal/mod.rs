//! WAL archiving: names and LSN arithmetic, `wal-push` with look-ahead, `wal-fetch` with the
//! prefetch spool. Talks to storage only through `Archive`.

pub mod fallback;
pub mod fetch;
pub mod history;
pub mod name;
pub mod push;
pub mod spool;

use std::path::{Path, PathBuf};

use crate::archive::ArchiveError;
use crate::codec::CodecError;
use crate::config::ConfigError;
use crate::pg::walpage::LongPageHeader;
use crate::repo::RepoMeta;

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
    /// A standby's request for an older timeline's copy of a segment whose newer copy just
    /// failed to download (`fallback`).
    #[error("{0}")]
    HeldBack(String),
    #[error("{what} {path}: {err}{}", crate::io_hint::suffix(.err))]
    Local {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("encoding {path} failed: {source}")]
    Encode { path: PathBuf, source: CodecError },
}

impl crate::archive::CodecFailure for WalError {
    fn codec_failure(&self) -> Option<&CodecError> {
        match self {
            WalError::Archive(a) => a.codec_failure(),
            _ => None,
        }
    }
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

/// How the first page of a WAL segment (or `.partial` file) disagrees with the file's name or
/// with the repository's `walship.json`. wal-push refuses to archive such a file and wal-fetch to
/// restore one: PostgreSQL takes a page it cannot use for the end of WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderMismatch {
    /// `xlp_pageaddr` is not where the name puts the segment: both byte positions.
    Position { header: u64, name: u64 },
    /// Another database system's WAL.
    System { header: u64, repository: String },
    /// Another WAL format: page magic and segment size.
    Format {
        magic: u16,
        segment_size: u32,
        repository_magic: u16,
        repository_segment_size: u64,
    },
}

/// Compare a WAL file's long page header with its name and, when given, the repository's
/// `walship.json`. `None` when all agree (and for names without a position: history files).
/// The timeline is not compared: the first segment of a new timeline starts as a copy of the
/// old timeline's, page headers included.
pub(crate) fn header_mismatch(
    h: &LongPageHeader,
    name: &name::WalFileName,
    meta: Option<&RepoMeta>,
) -> Option<HeaderMismatch> {
    let size = u64::from(h.segment_size);
    let by_name = name.segment()?.segno(size).saturating_mul(size);
    if h.page_addr != by_name {
        return Some(HeaderMismatch::Position {
            header: h.page_addr,
            name: by_name,
        });
    }
    let meta = meta?;
    if meta.system_identifier != h.system_identifier.to_string() {
        return Some(HeaderMismatch::System {
            header: h.system_identifier,
            repository: meta.system_identifier.clone(),
        });
    }
    if meta.wal_segment_size != size || meta.wal_page_magic != h.magic {
        return Some(HeaderMismatch::Format {
            magic: h.magic,
            segment_size: h.segment_size,
            repository_magic: meta.wal_page_magic,
            repository_segment_size: meta.wal_segment_size,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walpage::synthetic_header;

    #[test]
    fn a_header_is_judged_by_position_system_and_format_not_timeline() {
        let seg = 16u32 << 20;
        let five = name::WalFileName::parse("000000020000000000000005").unwrap();
        let meta = RepoMeta {
            format: crate::repo::REPO_FORMAT,
            system_identifier: "7".into(),
            wal_page_magic: 0xD110,
            pg_major: Some(15),
            wal_segment_size: u64::from(seg),
            wal_block_size: 8192,
            codec: "zstd+age-x25519".into(),
            recipient_fingerprints: Vec::new(),
            created_at: "2024-01-01T00:00:00Z".into(),
            created_by: "test".into(),
        };
        let header = |system, tli, addr| {
            LongPageHeader::parse(&synthetic_header(system, tli, addr, seg)).unwrap()
        };
        // The first segment of a new timeline starts as a copy of the old one's, page headers
        // included: timeline 1 in the header of timeline 2's segment.
        assert_eq!(
            header_mismatch(&header(7, 1, 5 << 24), &five, Some(&meta)),
            None
        );
        assert_eq!(
            header_mismatch(&header(7, 2, 6 << 24), &five, Some(&meta)),
            Some(HeaderMismatch::Position {
                header: 6 << 24,
                name: 5 << 24
            })
        );
        assert_eq!(
            header_mismatch(&header(8, 2, 5 << 24), &five, Some(&meta)),
            Some(HeaderMismatch::System {
                header: 8,
                repository: "7".into()
            })
        );
        assert_eq!(header_mismatch(&header(8, 2, 5 << 24), &five, None), None);
        let history = name::WalFileName::parse("00000002.history").unwrap();
        assert_eq!(
            header_mismatch(&header(8, 2, 0), &history, Some(&meta)),
            None
        );
    }
}
