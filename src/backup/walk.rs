//! What a base backup copies: the data directory and its tablespaces, less what PostgreSQL's
//! documentation says to leave out ("Backing Up with the Low Level API" and pg_basebackup):
//!
//! - the contents (not the directories) of `pg_wal`, `pg_dynshmem`, `pg_notify`, `pg_replslot`,
//!   `pg_serial`, `pg_snapshots`, `pg_stat_tmp` and `pg_subtrans`; `pg_wal/archive_status` is kept
//!   as an empty directory;
//! - `postmaster.pid`, `postmaster.opts`, `backup_label`, `tablespace_map`, `backup_manifest`,
//!   `current_logfiles`, `postgresql.auto.conf.tmp`, and every file or directory whose name starts
//!   with `pg_internal.init` (the relcache init file and the `pg_internal.init.<pid>` files a
//!   backend writes before renaming them into place) or `pgsql_tmp`;
//! - in database directories (`base/<oid>`, `pg_tblspc/<oid>/PG_*/<oid>`): temporary relations
//!   (`t<backend>_<relfilenode>…`), and every fork of an unlogged relation except its init fork.
//!   Recovery makes an unlogged relation empty again by copying its init fork over the main fork,
//!   so its contents could never be restored anyway.
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
    /// For a relation's file (whose pages carry checksums when the cluster has them): which
    /// segment of the relation it is, `0` for `<relfilenode>`, `n` for `<relfilenode>.<n>`.
    pub relation_segment: Option<u32>,
    /// Held open from the walk on (see `pinned_while_walked`): read from this, not the path.
    pub pinned: Option<std::sync::Arc<fs::File>>,
}

/// Files replaced whole (written beside and renamed over) at any moment, which WAL replay does
/// not restore: the configuration files at the top (`ALTER SYSTEM`, configuration management)
/// and the replication origins' checkpoint. A part is read long after the walk (the top comes
/// last, after `base/`), and a newer file cut or padded to the walked size would be a wrong
/// setting, or a file PostgreSQL refuses; held open, the file is read as it was when walked.
fn pinned_while_walked(rel: &str) -> bool {
    !rel.contains('/') || rel == "pg_logical/replorigin_checkpoint"
}

/// An entry of the data directory (or of a tablespace) that the walk could not read.
#[derive(Debug)]
pub struct Unreadable {
    /// What failed, for the message: "cannot read", or what the path is for.
    pub what: &'static str,
    pub path: PathBuf,
    pub err: io::Error,
}

/// `map_err` for an I/O error on `path`.
fn at(path: &Path) -> impl FnOnce(io::Error) -> Unreadable + '_ {
    at_what("cannot read", path)
}

fn at_what<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Unreadable + 'a {
    move |err| Unreadable {
        what,
        path: path.to_path_buf(),
        err,
    }
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

/// Names left out wherever they are. `pg_internal.init` by prefix, as pg_basebackup does: a
/// backend writes `pg_internal.init.<pid>` and renames it, and a crash can leave one behind.
fn skipped_name(name: &str) -> bool {
    name.starts_with("pgsql_tmp") || name.starts_with("pg_internal.init")
}

/// Whether `rel` (relative, `/`-separated) is a database directory, one that holds relation files.
fn is_db_dir(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        ["base", db] => digits(db),
        ["pg_tblspc", ts, version, db] => digits(ts) && version.starts_with("PG_") && digits(db),
        _ => false,
    }
}

/// The relfilenode and fork of a permanent or unlogged relation's file name
/// (`<relfilenode>[_<fork>][.<segment>]`); `None` for any other name.
fn relation_file(name: &str) -> Option<(&str, &str)> {
    let base = match name.split_once('.') {
        Some((b, seg)) if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) => b,
        Some(_) => return None,
        None => name,
    };
    let (node, fork) = base.split_once('_').unwrap_or((base, "main"));
    let node_ok = !node.is_empty() && node.bytes().all(|c| c.is_ascii_digit());
    (node_ok && ["main", "fsm", "vm", "init"].contains(&fork)).then_some((node, fork))
}

/// The segment number of a relation's file name (see `relation_file`).
fn relation_segment(name: &str) -> Option<u32> {
    relation_file(name)?;
    match name.split_once('.') {
        Some((_, seg)) => seg.parse().ok(),
        None => Some(0),
    }
}

/// Whether `name` is a temporary relation's file: `t<backend>_<relfilenode>[_<fork>][.<segment>]`.
fn temp_relation_file(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, rel)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty()
        && backend.bytes().all(|c| c.is_ascii_digit())
        && relation_file(rel).is_some()
}

/// Names in a database directory that a backup leaves out: temporary relations, and the forks
/// other than `init` of every relation that has an init fork (an unlogged one).
fn db_dir_skips(names: &[String]) -> impl Fn(&str) -> bool {
    let unlogged: std::collections::HashSet<String> = names
        .iter()
        .filter_map(|n| relation_file(n))
        .filter(|(_, fork)| *fork == "init")
        .map(|(node, _)| node.to_string())
        .collect();
    move |name: &str| {
        temp_relation_file(name)
            || relation_file(name)
                .is_some_and(|(node, fork)| fork != "init" && unlogged.contains(node))
    }
}

/// List everything a backup of `pgdata` copies, in a stable order (directories before their
/// contents, names sorted).
pub fn walk(pgdata: &Path) -> Result<Walked, Unreadable> {
    let mut out = Walked::default();
    walk_dir(pgdata, "", &mut out, true)?;
    let tblspc = pgdata.join("pg_tblspc");
    let mut links: Vec<_> = match fs::read_dir(&tblspc) {
        Ok(rd) => rd.collect::<Result<_, _>>().map_err(at(&tblspc))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(at(&tblspc)(e)),
    };
    links.sort_by_key(|e| e.file_name());
    for link in links {
        let name = link.file_name().to_string_lossy().into_owned();
        let Ok(oid) = name.parse::<u32>() else {
            continue;
        };
        let target = fs::read_link(link.path())
            .map_err(at_what("cannot read tablespace symlink", &link.path()))?;
        let location = if target.is_absolute() {
            target
        } else {
            tblspc.join(target)
        };
        out.tablespaces.push(Tablespace {
            oid,
            location: location.to_string_lossy().into_owned(),
        });
        let meta = fs::metadata(&location)
            .map_err(at_what("cannot read tablespace directory", &location))?;
        let rel = format!("pg_tblspc/{oid}");
        out.dirs.push(DirEntry {
            path: rel.clone(),
            mode: meta.permissions().mode() & 0o7777,
        });
        walk_dir(&location, &rel, &mut out, false)?;
    }
    Ok(out)
}

fn walk_dir(dir: &Path, rel: &str, out: &mut Walked, top: bool) -> Result<(), Unreadable> {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<_, _>>().map_err(at(dir))?,
        // Dropped while we walk (a database or relation removed): nothing to back up.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => return Err(at(dir)(e)),
    };
    entries.sort_by_key(|e| e.file_name());
    let names: Vec<String> = entries
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let db_dir = is_db_dir(rel);
    let db_skip = db_dir.then(|| db_dir_skips(&names));
    // Shared catalogs live in `global`, which is not a database directory but holds relations.
    let relations = db_dir || rel == "global";
    for (e, name) in entries.iter().zip(names.iter().cloned()) {
        if skipped_name(&name)
            || (top && TOP_FILES_SKIPPED.contains(&name.as_str()))
            || db_skip.as_ref().is_some_and(|skip| skip(&name))
        {
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
            Err(e) => return Err(at(&path)(e)),
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
            let pinned = pinned_while_walked(&child)
                .then(|| fs::File::open(&path).ok())
                .flatten();
            // The size of what is read: the open file's, should it have been replaced since.
            let size = pinned
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(meta.len(), |m| m.len());
            out.files.push(WalkedFile {
                path: child,
                abs: path,
                size,
                mode,
                mtime: meta.mtime(),
                relation_segment: relations.then(|| relation_segment(&name)).flatten(),
                pinned: pinned.map(std::sync::Arc::new),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory (`<root>/data`) with one database directory and no tablespaces.
    fn small_data_dir() -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        fs::create_dir_all(data.join("base/1")).unwrap();
        fs::create_dir_all(data.join("pg_tblspc")).unwrap();
        (root, data)
    }

    #[test]
    fn configuration_files_are_read_as_they_were_when_walked() {
        use std::io::Read;
        let (_root, data) = small_data_dir();
        fs::write(data.join("postgresql.auto.conf"), "max_connections = 100\n").unwrap();
        fs::write(data.join("base/1/1259"), b"relation").unwrap();
        let w = walk(&data).unwrap();
        // ALTER SYSTEM after the walk: a new file renamed over the old one.
        fs::write(
            data.join("new.conf"),
            "max_connections = 1000\nwork_mem = '1GB'\n",
        )
        .unwrap();
        fs::rename(data.join("new.conf"), data.join("postgresql.auto.conf")).unwrap();
        let conf = w
            .files
            .iter()
            .find(|f| f.path == "postgresql.auto.conf")
            .unwrap();
        assert_eq!(conf.size, 22);
        let mut text = String::new();
        (&*conf.pinned.clone().expect("held open"))
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "max_connections = 100\n");
        let rel = w.files.iter().find(|f| f.path == "base/1/1259").unwrap();
        assert!(rel.pinned.is_none(), "relation files are read by path");
    }

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
            "global/pg_internal.init.4242",
            "base/1/pg_internal.init.4243",
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
    #[test]
    fn leaves_out_temporary_relations_and_all_but_the_init_fork_of_unlogged_ones() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        let ts = root.path().join("ts");
        let db = data.join("base/5");
        let ts_db = ts.join("PG_15_202209061/5");
        fs::create_dir_all(&db).unwrap();
        fs::create_dir_all(&ts_db).unwrap();
        fs::create_dir_all(data.join("pg_tblspc")).unwrap();
        fs::create_dir_all(data.join("global")).unwrap();
        std::os::unix::fs::symlink(&ts, data.join("pg_tblspc/16400")).unwrap();
        // 16384 is logged; 16390 is unlogged (it has an init fork), with a second segment.
        for f in [
            "16384",
            "16384_fsm",
            "16384_vm",
            "16384.1",
            "16390",
            "16390_fsm",
            "16390_vm",
            "16390_init",
            "16390.1",
            "t3_16395",
            "t3_16395_fsm",
            "t3_16395.2",
            "PG_VERSION",
            "pg_filenode.map",
            "1639",
        ] {
            fs::write(db.join(f), f).unwrap();
        }
        for f in ["16500", "16500_init", "16501", "t12_16502"] {
            fs::write(ts_db.join(f), f).unwrap();
        }
        // Outside database directories the same names are ordinary files.
        fs::write(data.join("global/16390_init"), b"x").unwrap();
        fs::write(data.join("global/16390"), b"x").unwrap();

        let w = walk(&data).unwrap();
        let files: Vec<_> = w.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            files,
            [
                "base/5/16384",
                "base/5/16384.1",
                "base/5/16384_fsm",
                "base/5/16384_vm",
                "base/5/1639",
                "base/5/16390_init",
                "base/5/PG_VERSION",
                "base/5/pg_filenode.map",
                "global/16390",
                "global/16390_init",
                "pg_tblspc/16400/PG_15_202209061/5/16500_init",
                "pg_tblspc/16400/PG_15_202209061/5/16501",
            ]
        );
        // Relations' files, in databases, tablespaces and `global`, are known by their segment.
        let segments: Vec<_> = w.files.iter().map(|f| f.relation_segment).collect();
        assert_eq!(
            segments,
            [
                Some(0),
                Some(1),
                Some(0),
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                Some(0),
                Some(0),
                Some(0),
                Some(0),
            ]
        );
        fs::write(data.join("global/pg_control"), b"x").unwrap();
        fs::write(data.join("PG_VERSION"), b"15").unwrap();
        fs::create_dir_all(data.join("pg_xact")).unwrap();
        fs::write(data.join("pg_xact/0000"), b"x").unwrap();
        let w = walk(&data).unwrap();
        for f in &w.files {
            let outside = !f.path.starts_with("base/") && !f.path.starts_with("pg_tblspc/");
            if outside && f.path != "global/16390" && f.path != "global/16390_init" {
                assert_eq!(f.relation_segment, None, "{}", f.path);
            }
        }
    }

    #[test]
    fn a_walk_that_fails_names_the_entry_it_could_not_read() {
        let (root, data) = small_data_dir();
        // A tablespace whose directory is gone (an unmounted volume, say).
        let gone = root.path().join("unmounted/ts");
        std::os::unix::fs::symlink(&gone, data.join("pg_tblspc/16400")).unwrap();
        let u = walk(&data).unwrap_err();
        assert_eq!(u.path, gone);
        assert_eq!(u.err.kind(), io::ErrorKind::NotFound);
        assert!(u.what.contains("tablespace"), "{u:?}");
        // A link that cannot be read as one: not a tablespace's symlink but a file by that name.
        fs::remove_file(data.join("pg_tblspc/16400")).unwrap();
        fs::write(data.join("pg_tblspc/16400"), b"").unwrap();
        let u = walk(&data).unwrap_err();
        assert_eq!(u.path, data.join("pg_tblspc/16400"));
        assert!(u.what.contains("symlink"), "{u:?}");
    }

    #[test]
    fn relation_file_names() {
        assert_eq!(relation_file("16384"), Some(("16384", "main")));
        assert_eq!(relation_file("16384.12"), Some(("16384", "main")));
        assert_eq!(relation_file("16384_init"), Some(("16384", "init")));
        assert_eq!(relation_file("16384_vm.1"), Some(("16384", "vm")));
        assert_eq!(relation_segment("16384"), Some(0));
        assert_eq!(relation_segment("16384_fsm.3"), Some(3));
        assert_eq!(relation_segment("pg_filenode.map"), None);
        for other in [
            "16384_",
            "16384.",
            "16384_foo",
            "16384.x",
            "pg_filenode.map",
            "PG_VERSION",
            "_init",
        ] {
            assert_eq!(relation_file(other), None, "{other}");
        }
        assert!(temp_relation_file("t3_16384"));
        assert!(temp_relation_file("t3_16384_fsm.4"));
        assert!(!temp_relation_file("t_16384"));
        assert!(!temp_relation_file("t3_"));
        assert!(!temp_relation_file("16384"));
    }
}
