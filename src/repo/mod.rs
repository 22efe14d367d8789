//! The repository format: where each object lives and what the repository metadata says. Pure data;
//! no I/O. Layout under the repository root (bucket prefix or directory):
//!
//! ```text
//! walship.json                                 repository metadata, written once (plaintext JSON)
//! wal/<TTTTTTTTXXXXXXXX>/<segment>             WAL segments, .partial and .backup files
//! wal/history/<TTTTTTTT>.history               timeline history files
//! backups/<id>/part-<NNNNNN>, backups/<id>/manifest    base backups (see `backup`)
//! restore-points/<hex(name)>                   named restore points (see `backup`)
//! check/conditional-put                        written once by `walship check` (plain text)
//! ```
//!
//! Every object but `walship.json` and `check/` is in the codec format (see `codec`).
//! `walship.json` is plaintext on purpose: database hosts hold only public keys and must still
//! check, before every push, that the repository belongs to their cluster. It names no database
//! file.

pub mod backup;

use serde::{Deserialize, Serialize};

use crate::storage::ObjectKey;
use crate::wal::name::{SegmentId, WalFileKind, WalFileName};

pub const META_KEY: &str = "walship.json";
pub const REPO_FORMAT: u32 = 1;

/// Where an archived WAL file is stored.
pub fn wal_key(name: &WalFileName) -> ObjectKey {
    let key = match name.kind() {
        WalFileKind::History => format!("wal/history/{name}"),
        _ => format!("wal/{}/{name}", &name.as_str()[..16]),
    };
    ObjectKey::new(key).expect("WAL names make valid keys")
}

/// The directory holding `seg` and the other segments of its timeline's 4 GiB log file
/// (`wal/<TTTTTTTTXXXXXXXX>/`). A listing that starts after it skips all earlier WAL.
pub fn wal_dir(seg: SegmentId) -> String {
    format!("wal/{:08X}{:08X}/", seg.timeline, seg.log)
}

/// The prefix shared by a timeline's WAL directories.
pub fn timeline_prefix(timeline: u32) -> String {
    format!("wal/{timeline:08X}")
}

pub fn meta_key() -> ObjectKey {
    ObjectKey::new(META_KEY).expect("valid key")
}

/// The object `walship check` creates to test that the storage never replaces an object.
pub fn check_key() -> ObjectKey {
    ObjectKey::new("check/conditional-put").expect("valid key")
}

/// `walship.json`: written by the first push, checked by every later one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoMeta {
    pub format: u32,
    /// pg_control's system identifier, as a string (JSON numbers lose 64-bit precision).
    pub system_identifier: String,
    /// The WAL page magic, which identifies the PostgreSQL major version's WAL format.
    pub wal_page_magic: u16,
    pub pg_major: Option<u32>,
    pub wal_segment_size: u64,
    pub wal_block_size: u32,
    pub codec: String,
    pub recipient_fingerprints: Vec<String>,
    pub created_at: String,
    pub created_by: String,
}

impl RepoMeta {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("serialisable");
        v.push(b'\n');
        v
    }

    pub fn from_json(b: &[u8]) -> Result<Self, String> {
        let meta: RepoMeta = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        if meta.format > REPO_FORMAT {
            return Err(format!(
                "repository format {} is newer than this walship understands; upgrade walship",
                meta.format
            ));
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        let k = |n: &str| wal_key(&WalFileName::parse(n).unwrap()).to_string();
        assert_eq!(
            k("0000000100000002000000FE"),
            "wal/0000000100000002/0000000100000002000000FE"
        );
        assert_eq!(k("00000003.history"), "wal/history/00000003.history");
        assert_eq!(
            k("000000010000000000000002.00000028.backup"),
            "wal/0000000100000000/000000010000000000000002.00000028.backup"
        );
        assert_eq!(
            k("000000020000000000000005.partial"),
            "wal/0000000200000000/000000020000000000000005.partial"
        );
        let seg = WalFileName::parse("0000000A00000002000000FE")
            .unwrap()
            .segment()
            .unwrap();
        assert_eq!(wal_dir(seg), "wal/0000000A00000002/");
        assert!(wal_key(&seg.file_name())
            .as_str()
            .starts_with(&wal_dir(seg)));
        assert!(wal_dir(seg).starts_with(&timeline_prefix(10)));
        assert!(!wal_dir(seg).starts_with(&timeline_prefix(1)));
    }

    #[test]
    fn meta_round_trip_and_newer_format_refused() {
        let m = RepoMeta {
            format: 1,
            system_identifier: "7311112222333344445".into(),
            wal_page_magic: 0xD110,
            pg_major: Some(15),
            wal_segment_size: 16 << 20,
            wal_block_size: 8192,
            codec: "zstd+age".into(),
            recipient_fingerprints: vec!["00ff".into()],
            created_at: "2026-11-22T00:00:00Z".into(),
            created_by: "walship 0.1.0".into(),
        };
        assert_eq!(RepoMeta::from_json(&m.to_json()).unwrap(), m);
        let newer = RepoMeta { format: 99, ..m };
        assert!(RepoMeta::from_json(&newer.to_json())
            .unwrap_err()
            .contains("upgrade"));
    }
}
