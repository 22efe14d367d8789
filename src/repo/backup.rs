//! Base backups in the repository: their keys and their manifest. Pure data; no I/O.
//!
//! ```text
//! backups/<id>/part-<NNNNNN>     the backup's bytes: files concatenated in manifest order, cut
//!                                into parts of at most `part_size` plaintext bytes (codec format)
//! backups/<id>/summary.json      what `backup-list` shows (plain JSON, no file names), written
//!                                just before the manifest, so hosts with only the public key can
//!                                list backups
//! backups/<id>/manifest          the manifest (codec format: JSON, encrypted), written last
//! restore-points/<hex(name)>     a named restore point made by `walship restore-point` (codec)
//! ```
//!
//! A backup exists only once its manifest does: parts without one (a backup killed mid-upload) are
//! never listed or restored. The manifest is encrypted like the data: file names are sensitive, and
//! `backup_label` names the server.
//!
//! Parts are the files' bytes back to back, with nothing between: a file of `size` bytes starting
//! at `offset` in part `part` fills that part to its end (or to its own end) and goes on at offset
//! 0 of the next part. Files are cut wherever a part ends, so one large file is spread over many
//! parts, uploaded and restored in parallel.

use serde::{Deserialize, Serialize};

use crate::storage::ObjectKey;

pub const BACKUPS_PREFIX: &str = "backups/";
pub const RESTORE_POINTS_PREFIX: &str = "restore-points/";
pub const MANIFEST_FORMAT: u32 = 1;
const MANIFEST_NAME: &str = "manifest";
const SUMMARY_NAME: &str = "summary.json";

pub fn part_key(id: &str, index: u32) -> ObjectKey {
    ObjectKey::new(format!("{BACKUPS_PREFIX}{id}/part-{index:06}")).expect("valid key")
}

pub fn manifest_key(id: &str) -> ObjectKey {
    ObjectKey::new(format!("{BACKUPS_PREFIX}{id}/{MANIFEST_NAME}")).expect("valid key")
}

pub fn summary_key(id: &str) -> ObjectKey {
    ObjectKey::new(format!("{BACKUPS_PREFIX}{id}/{SUMMARY_NAME}")).expect("valid key")
}

/// The backup id and object name of a key under `backups/`, if it is one.
pub fn split_backup_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(BACKUPS_PREFIX)?;
    let (id, name) = rest.split_once('/')?;
    valid_id(id).then_some((id, name))
}

/// The backup id a manifest key belongs to, if it is one.
pub fn id_of_manifest_key(key: &str) -> Option<&str> {
    split_backup_key(key).and_then(|(id, name)| (name == MANIFEST_NAME).then_some(id))
}

/// Backup ids are the UTC start time, `YYYYMMDDTHHMMSSZ`: sortable and readable.
pub fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        })
}

/// Restore point names are free text for PostgreSQL; the key carries them hex-encoded.
pub fn restore_point_key(name: &str) -> ObjectKey {
    ObjectKey::new(format!("{RESTORE_POINTS_PREFIX}{}", hex::encode(name)))
        .expect("hex makes a valid key")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    /// Where the tablespace lived on the backed-up server.
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// Relative to the data directory, `/`-separated; tablespaces under `pg_tblspc/<oid>/`.
    pub path: String,
    pub mode: u32,
}

/// The owner of the backed-up data directory: names as the backed-up host knew them (a restore
/// as root looks them up again where it runs), and the ids there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub user: Option<String>,
    pub group: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Where the file's first byte is (see the module docs).
    pub part: u32,
    pub offset: u64,
    /// Blocks of this relation file (numbered in the relation, as PostgreSQL's own messages
    /// number them) whose page checksum failed when the backup read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_blocks: Vec<u32>,
    /// Bad blocks of this file beyond those listed: a backup names at most a bounded number of
    /// bad blocks, so a disk that returned garbage does not blow up the manifest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bad_blocks_unlisted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl FileEntry {
    /// How many of this file's pages failed their checksum, listed or not.
    pub fn bad_block_count(&self) -> u64 {
        self.bad_blocks.len() as u64 + self.bad_blocks_unlisted
    }
}

/// What a backup found when it checked its pages against their checksums (clusters with data
/// checksums only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageChecks {
    /// Pages whose checksum was verified, good or bad.
    pub verified: u64,
    /// Pages not judged: they failed as read while PostgreSQL wrote them (their LSN lies between
    /// the backup's start and stop), or the file was truncated since, and replay rewrites them.
    pub changed: u64,
    /// Pages whose checksum failed: the data directory was corrupt where they lie.
    pub bad: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    pub index: u32,
    pub plain_size: u64,
    pub stored_size: u64,
    /// sha256 of the part's plaintext, hex; the part's own header records it too.
    pub sha256: String,
    /// The S3 version id the upload got, on versioned buckets.
    pub version_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub id: String,
    pub system_identifier: String,
    /// `server_version_num`, e.g. 150010.
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    /// The first and the last WAL segment recovery needs to make this backup consistent.
    pub start_wal: String,
    pub stop_wal: String,
    /// RFC 3339 UTC, and the same instants in seconds since the epoch for comparisons.
    pub start_time: String,
    pub stop_time: String,
    pub start_epoch: f64,
    pub stop_epoch: f64,
    /// The server's next transaction id (64-bit, with epoch) once the backup had stopped: a
    /// transaction with this id or a later one commits after the backup is consistent. What
    /// `restore --target-xid` chooses a backup by; absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_xid: Option<u64>,
    pub from_standby: bool,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub tablespaces: Vec<Tablespace>,
    /// Absent in manifests written before owners were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    pub dirs: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    pub parts: Vec<PartEntry>,
    pub compression_level: i32,
    pub walship_version: String,
    /// `None` when pages were not checked: the cluster has no data checksums, or an older
    /// walship made the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_checks: Option<PageChecks>,
}

/// What `backup-list` shows of a backup, stored in plain text beside the encrypted manifest: no
/// file names, no backup label, nothing that is not also visible from the objects' sizes and
/// times. Restoring always reads the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub format: u32,
    pub id: String,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub wal_segment_size: u64,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub start_wal: String,
    pub stop_wal: String,
    pub start_time: String,
    pub stop_time: String,
    pub start_epoch: f64,
    pub stop_epoch: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_xid: Option<u64>,
    pub from_standby: bool,
    pub original_size: u64,
    pub stored_size: u64,
    pub files: usize,
    pub parts: usize,
    pub walship_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_checks: Option<PageChecks>,
}

impl BackupSummary {
    pub fn of(m: &BackupManifest) -> Self {
        Self {
            format: m.format,
            id: m.id.clone(),
            system_identifier: m.system_identifier.clone(),
            pg_version_num: m.pg_version_num,
            wal_segment_size: m.wal_segment_size,
            timeline: m.timeline,
            start_lsn: m.start_lsn.clone(),
            stop_lsn: m.stop_lsn.clone(),
            start_wal: m.start_wal.clone(),
            stop_wal: m.stop_wal.clone(),
            start_time: m.start_time.clone(),
            stop_time: m.stop_time.clone(),
            start_epoch: m.start_epoch,
            stop_epoch: m.stop_epoch,
            next_xid: m.next_xid,
            from_standby: m.from_standby,
            original_size: m.original_size(),
            stored_size: m.stored_size(),
            files: m.files.len(),
            parts: m.parts.len(),
            walship_version: m.walship_version.clone(),
            page_checks: m.page_checks,
        }
    }
}

impl BackupManifest {
    pub fn original_size(&self) -> u64 {
        self.parts.iter().map(|p| p.plain_size).sum()
    }

    pub fn stored_size(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_size).sum()
    }

    /// For every part, the pieces of files it holds: (file index, offset in the file, offset in
    /// the part, length). Errors when the files do not tile the parts exactly.
    pub fn pieces(&self) -> Result<Vec<Vec<Piece>>, String> {
        if let Some(p) = self.parts.iter().find(|p| p.plain_size == 0) {
            return Err(format!("part {} is empty", p.index));
        }
        let mut out: Vec<Vec<Piece>> = vec![Vec::new(); self.parts.len()];
        let (mut part, mut offset) = (0usize, 0u64);
        for (i, f) in self.files.iter().enumerate() {
            if f.size == 0 {
                continue;
            }
            if f.part as usize != part || f.offset != offset {
                return Err(format!(
                    "{} starts at part {} offset {}, expected part {part} offset {offset}",
                    f.path, f.part, f.offset
                ));
            }
            let mut done = 0u64;
            while done < f.size {
                let p = self
                    .parts
                    .get(part)
                    .ok_or_else(|| format!("{} runs past the last part", f.path))?;
                let len = (p.plain_size - offset).min(f.size - done);
                out[part].push(Piece {
                    file: i,
                    file_offset: done,
                    part_offset: offset,
                    len,
                });
                done += len;
                offset += len;
                if offset == p.plain_size {
                    part += 1;
                    offset = 0;
                }
            }
        }
        if part != self.parts.len() {
            return Err(format!("part {part} holds bytes no file accounts for"));
        }
        Ok(out)
    }
}

/// A run of one file's bytes inside one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub file: usize,
    pub file_offset: u64,
    pub part_offset: u64,
    pub len: u64,
}

/// What `walship restore-point` records, so `restore --target-name` can pick a backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub name: String,
    pub lsn: String,
    pub timeline: u32,
    pub time: String,
    pub epoch: f64,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A manifest of files `f<i>` (size, part, offset in the part) in parts of the given sizes.
    pub(crate) fn manifest(files: &[(u64, u32, u64)], parts: &[u64]) -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: "20261124T120000Z".into(),
            system_identifier: "1".into(),
            pg_version_num: 150000,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            start_time: String::new(),
            stop_time: String::new(),
            start_epoch: 0.0,
            stop_epoch: 0.0,
            next_xid: None,
            from_standby: false,
            backup_label: String::new(),
            tablespace_map: None,
            tablespaces: vec![],
            owner: None,
            dirs: vec![],
            files: files
                .iter()
                .enumerate()
                .map(|(i, &(size, part, offset))| FileEntry {
                    path: format!("f{i}"),
                    size,
                    mode: 0o600,
                    mtime: 0,
                    part,
                    offset,
                    bad_blocks: vec![],
                    bad_blocks_unlisted: 0,
                })
                .collect(),
            parts: parts
                .iter()
                .enumerate()
                .map(|(i, &plain_size)| PartEntry {
                    index: i as u32,
                    plain_size,
                    stored_size: 1,
                    sha256: String::new(),
                    version_id: None,
                })
                .collect(),
            compression_level: 1,
            walship_version: String::new(),
            page_checks: None,
        }
    }

    #[test]
    fn page_check_findings_are_optional_in_manifests_and_summaries() {
        let mut m = manifest(&[(8192, 0, 0)], &[8192]);
        // Written without them (no data checksums, or an older walship): read as not checked.
        let json = serde_json::to_value(&m).unwrap();
        assert!(json.get("page_checks").is_none());
        assert!(json["files"][0].get("bad_blocks").is_none());
        assert!(json["files"][0].get("bad_blocks_unlisted").is_none());
        let back: BackupManifest = serde_json::from_value(json).unwrap();
        assert_eq!(back.page_checks, None);
        m.page_checks = Some(PageChecks {
            verified: 1,
            changed: 0,
            bad: 1,
        });
        m.files[0].bad_blocks = vec![0];
        m.files[0].bad_blocks_unlisted = 3;
        let back: BackupManifest =
            serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(BackupSummary::of(&m).page_checks, m.page_checks);
    }

    #[test]
    fn files_tile_parts_and_large_files_span_several() {
        // Parts of 10 bytes: f0 (4 bytes), an empty f1, f2 (25 bytes over three parts), f3 (3).
        let m = manifest(
            &[(4, 0, 0), (0, 0, 4), (25, 0, 4), (3, 2, 9)],
            &[10, 10, 10, 2],
        );
        let p = m.pieces().unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(
            p[0],
            vec![
                Piece {
                    file: 0,
                    file_offset: 0,
                    part_offset: 0,
                    len: 4
                },
                Piece {
                    file: 2,
                    file_offset: 0,
                    part_offset: 4,
                    len: 6
                },
            ]
        );
        assert_eq!(
            p[1],
            vec![Piece {
                file: 2,
                file_offset: 6,
                part_offset: 0,
                len: 10
            }]
        );
        assert_eq!(
            p[2],
            vec![
                Piece {
                    file: 2,
                    file_offset: 16,
                    part_offset: 0,
                    len: 9
                },
                Piece {
                    file: 3,
                    file_offset: 0,
                    part_offset: 9,
                    len: 1
                },
            ]
        );
        assert_eq!(
            p[3],
            vec![Piece {
                file: 3,
                file_offset: 1,
                part_offset: 0,
                len: 2
            }]
        );
        assert_eq!(m.original_size(), 32);
    }

    #[test]
    fn a_manifest_that_does_not_tile_is_refused() {
        assert!(manifest(&[(4, 0, 1)], &[5]).pieces().is_err(), "gap");
        assert!(
            manifest(&[(4, 0, 0)], &[5]).pieces().is_err(),
            "bytes left over"
        );
        assert!(
            manifest(&[(6, 0, 0)], &[5]).pieces().is_err(),
            "file past the end"
        );
        assert!(manifest(&[], &[]).pieces().unwrap().is_empty());
    }

    #[test]
    fn keys_and_ids() {
        assert_eq!(
            part_key("20261124T120000Z", 7).as_str(),
            "backups/20261124T120000Z/part-000007"
        );
        let m = manifest_key("20261124T120000Z");
        assert_eq!(id_of_manifest_key(m.as_str()), Some("20261124T120000Z"));
        assert_eq!(
            id_of_manifest_key("backups/20261124T120000Z/part-000001"),
            None
        );
        assert_eq!(id_of_manifest_key("backups/x/manifest"), None);
        assert!(!valid_id("20261124X120000Z"));
        assert_eq!(
            restore_point_key("before batch").as_str(),
            "restore-points/6265666f7265206261746368"
        );
    }
}
