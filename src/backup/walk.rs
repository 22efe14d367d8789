//! What a base backup copies: the data directory and its tablespaces, less what PostgreSQL's
//! documentation says to leave out ("Backing Up with the Low Level API" and pg_basebackup):
//!
//! - the contents (not the directories) of `pg_wal`, `pg_dynshmem`, `pg_notify`, `pg_replslot`,
//!   `pg_serial`, `pg_snapshots`, `pg_stat_tmp` and `pg_subtrans`; `pg_wal/archive_status` is kept
//!   as an empty directory;
//! - `postmaster.pid`, `postmaster.opts`, `backup_label`, `tablespace_map`, `backup_manifest`,
//!   `current_logfiles`, `postgresql.auto.conf.tmp`, every `pg_internal.init`, and every file or
//!   directory whose name starts with `pgsql_tmp`.
//!
//! `pg_tblspc/<oid>` symlinks are tablespaces: their targets are walked as `pg_tblspc/<oid>/…`.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::repo::backup::{DirEntry, Tablespace};

const CONTENTS_SKIPPED: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

const TOP_FILES_SKIPPED: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "current_logfiles",
    "postgresql.auto.conf.tmp",
];

#[derive(Debug, Clone)]
pub struct WalkedFile {
    /// Relative, `/`-separated.
    pub path: String,
    pub abs: PathBuf,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

#[derive(Debug, Default)]
pub struct Walked {
    pub dirs: Vec<DirEntry>,
    pub files: Vec<WalkedFile>,
    pub tablespaces: Vec<Tablespace>,
}

impl Walked {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn skipped_name(name: &str) -> bool {
    name.starts_with("pgsql_tmp") || name == "pg_internal.init"
}

/// List everything a backup of `pgdata` copies, in a stable order (directories before their
/// contents, names sorted).
pub fn walk(pgdata: &Path) -> io::Result<Walked> {
    let mut out = Walked::default();
    walk_dir(pgdata, "", &mut out, true)?;
    let tblspc = pgdata.join("pg_tblspc");
    let mut links: Vec<_> = match fs::read_dir(&tblspc) {
        Ok(rd) => rd.collect::<Result<_, _>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    links.sort_by_key(|e| e.file_name());
    for link in links {
        let name = link.file_name().to_string_lossy().into_owned();
        let Ok(oid) = name.parse::<u32>() else {
            continue;
        };
        let target = fs::read_link(link.path())?;
        let location = if target.is_absolute() {
            target
        } else {
            tblspc.join(target)
        };
        out.tablespaces.push(Tablespace {
            oid,
            location: location.to_string_lossy().into_owned(),
        });
        let meta = fs::metadata(&location)?;
        let rel = format!("pg_tblspc/{oid}");
        out.dirs.push(DirEntry {
            path: rel.clone(),
            mode: meta.permissions().mode() & 0o7777,
        });
        walk_dir(&location, &rel, &mut out, false)?;
    }
    Ok(out)
}

fn walk_dir(dir: &Path, rel: &str, out: &mut Walked, top: bool) -> io::Result<()> {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<_, _>>()?,
        // Dropped while we walk (a database or relation removed): nothing to back up.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(e),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if skipped_name(&name) || (top && TOP_FILES_SKIPPED.contains(&name.as_str())) {
            continue;
        }
        let path = e.path();
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            out.dirs.push(DirEntry {
                path: child.clone(),
                mode,
            });
            if top && name == "pg_tblspc" {
                continue; // tablespaces are walked on their own
            }
            if top && CONTENTS_SKIPPED.contains(&name.as_str()) {
                if name == "pg_wal" {
                    out.dirs.push(DirEntry {
                        path: "pg_wal/archive_status".into(),
                        mode,
                    });
                }
                continue;
            }
            walk_dir(&path, &child, out, false)?;
        } else if meta.is_file() {
            out.files.push(WalkedFile {
                path: child,
                abs: path,
                size: meta.len(),
                mode,
                mtime: meta.mtime(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_out_what_postgresql_says_to_and_follows_tablespaces() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let ts = root.path().join("ts");
        for d in [
            "base/1",
            "global",
            "pg_wal/archive_status",
            "pg_wal/.walship/spool",
            "pg_replslot/slot",
            "pg_stat_tmp",
            "pg_tblspc",
            "base/pgsql_tmp",
        ] {
            fs::create_dir_all(data.join(d)).unwrap();
        }
        fs::create_dir_all(ts.join("PG_15_1/5")).unwrap();
        for f in [
            "base/1/1259",
            "global/pg_control",
            "global/pg_internal.init",
            "pg_wal/000000010000000000000001",
            "pg_replslot/slot/state",
            "pg_stat_tmp/x",
            "postmaster.pid",
            "backup_label",
            "base/pgsql_tmp/pgsql_tmp1.0",
            "PG_VERSION",
        ] {
            fs::write(data.join(f), f).unwrap();
        }
        fs::write(ts.join("PG_15_1/5/16384"), b"rel").unwrap();
        std::os::unix::fs::symlink(&ts, data.join("pg_tblspc/16400")).unwrap();

        let w = walk(&data).unwrap();
        let files: Vec<_> = w.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            files,
            [
                "PG_VERSION",
                "base/1/1259",
                "global/pg_control",
                "pg_tblspc/16400/PG_15_1/5/16384"
            ]
        );
        let dirs: Vec<_> = w.dirs.iter().map(|d| d.path.as_str()).collect();
        for kept in [
            "pg_wal",
            "pg_wal/archive_status",
            "pg_replslot",
            "pg_stat_tmp",
        ] {
            assert!(dirs.contains(&kept), "{kept} kept as a directory");
        }
        assert!(!dirs
            .iter()
            .any(|d| d.contains("pgsql_tmp") || d.contains(".walship")));
        assert_eq!(
            w.tablespaces,
            [Tablespace {
                oid: 16400,
                location: ts.to_string_lossy().into_owned()
            }]
        );
        assert_eq!(w.total_size(), 10 + 11 + 17 + 3);
    }
}
