//! Who owns a restored data directory.
//!
//! PostgreSQL starts only on a data directory owned by the user it runs as. A restore run as that
//! user owns what it writes, and nothing here applies. A restore run as root gives every
//! directory and file it creates to the user and group that owned the backed-up data directory,
//! looked up by *name* on this host (ids differ between hosts). When that user does not exist
//! here (or the backup predates the record), they go to the owner of the target directory as it
//! was before the restore, unless that is root: then they stay root's, with a warning that says
//! how to fix it. This is what pgBackRest users expect; WAL-G leaves it to them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::BackupError;
use crate::repo::backup::Owner;

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";

/// An entry of `/etc/passwd` or `/etc/group` text: (name, id, primary group id for passwd).
fn entries(db: &str) -> impl Iterator<Item = (&str, u32, Option<u32>)> {
    db.lines().filter_map(|l| {
        let mut f = l.split(':');
        let name = f.next().filter(|n| !n.is_empty() && !n.starts_with('#'))?;
        let id = f.nth(1)?.parse().ok()?;
        let gid = f.next().and_then(|g| g.parse().ok());
        Some((name, id, gid))
    })
}

fn name_of(db: &str, id: u32) -> Option<String> {
    entries(db).find(|e| e.1 == id).map(|e| e.0.to_string())
}

/// The owner of the data directory being backed up, with its names as this host knows them.
pub fn of_data_dir(pgdata: &Path) -> std::io::Result<Owner> {
    let meta = fs::metadata(pgdata)?;
    let read = |p| fs::read_to_string(p).unwrap_or_default();
    Ok(Owner {
        user: name_of(&read(PASSWD), meta.uid()),
        group: name_of(&read(GROUP), meta.gid()),
        uid: meta.uid(),
        gid: meta.gid(),
    })
}

/// Whom a restore run as root gives the files to; a warning when that is not the backup's owner.
fn decide(
    recorded: Option<&Owner>,
    target_owner: Option<(u32, u32)>,
    passwd: &str,
    group: &str,
) -> (Option<(u32, u32)>, Option<String>) {
    let user = recorded.and_then(|o| o.user.as_deref());
    if let Some((_, uid, primary)) = user.and_then(|u| entries(passwd).find(|e| e.0 == u)) {
        let gid = recorded
            .and_then(|o| o.group.as_deref())
            .and_then(|g| entries(group).find(|e| e.0 == g))
            .map(|e| e.1)
            .or(primary);
        if let Some(gid) = gid {
            return (Some((uid, gid)), None);
        }
    }
    let whose = match user {
        Some(u) => format!("the backup's owner (user {u}) does not exist on this host"),
        None => "the backup does not record a user name for its owner".to_string(),
    };
    match target_owner {
        Some((uid, gid)) if uid != 0 => (
            Some((uid, gid)),
            Some(format!(
                "{whose}: the restored files go to uid {uid}, gid {gid}, the target directory's owner"
            )),
        ),
        _ => (
            None,
            Some(format!(
                "{whose}, and walship runs as root: the restored files belong to root and \
                 PostgreSQL will not start on them; chown -R them to the PostgreSQL user, or \
                 run the restore as that user"
            )),
        ),
    }
}

/// The groups of user `uid`: its primary group and those listing it as a member.
fn groups_of(uid: u32, passwd: &str, group: &str) -> Vec<u32> {
    let Some((name, _, primary)) = entries(passwd).find(|e| e.1 == uid) else {
        return Vec::new();
    };
    let members = group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let listed = f.get(3)?.split(',').any(|m| m.trim() == name);
        listed.then(|| f.get(2)?.parse().ok()).flatten()
    });
    primary.into_iter().chain(members).collect()
}

/// Whether mode bits grant `want` (4 read, 1 search) to `uid` with groups `gids` (ACLs aside).
fn permits(owner: (u32, u32), mode: u32, uid: u32, gids: &[u32], want: u32) -> bool {
    let shift = if owner.0 == uid {
        6
    } else if gids.contains(&owner.1) {
        3
    } else {
        0
    };
    uid == 0 || (mode >> shift) & want == want
}

/// The files among `files` that the owner of `dir` (who PostgreSQL runs as) cannot read (a
/// directory: list and enter), going by mode bits along their paths. Only meaningful when run as
/// root, who can read anything itself.
pub fn unreadable_by_owner_of(dir: &Path, files: &[std::path::PathBuf]) -> Vec<(String, u32)> {
    let Ok(uid) = fs::metadata(dir).map(|m| m.uid()) else {
        return Vec::new();
    };
    let read = |p| fs::read_to_string(p).unwrap_or_default();
    let gids = groups_of(uid, &read(PASSWD), &read(GROUP));
    let may = |p: &Path, want| {
        fs::metadata(p).is_ok_and(|m| permits((m.uid(), m.gid()), m.mode(), uid, &gids, want))
    };
    files
        .iter()
        .filter_map(|f| std::path::absolute(f).ok())
        .filter(|f| {
            let want = if f.is_dir() { 4 | 1 } else { 4 };
            !(f.ancestors().skip(1).all(|d| may(d, 1)) && may(f, want))
        })
        .map(|f| (f.display().to_string(), uid))
        .collect()
}

/// Gives what a restore creates to the owner decided at its start; does nothing unless root.
#[derive(Debug, Clone, Copy, Default)]
pub struct Chown(Option<(u32, u32)>);

impl Chown {
    /// Decide before the restore touches `dest` (its current owner is the fallback).
    pub fn for_restore(recorded: Option<&Owner>, dest: &Path) -> Self {
        if !rustix::process::geteuid().is_root() {
            return Self(None);
        }
        let read = |p| fs::read_to_string(p).unwrap_or_default();
        let target = fs::metadata(dest).ok().map(|m| (m.uid(), m.gid()));
        let (ids, warning) = decide(recorded, target, &read(PASSWD), &read(GROUP));
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
        if let Some((uid, gid)) = ids {
            tracing::info!("restoring as root: files go to uid {uid}, gid {gid}");
        }
        Self(ids)
    }

    /// Run as root: the owner of `dir` (set by the restore); otherwise nothing to do.
    pub fn like(dir: &Path) -> Self {
        if !rustix::process::geteuid().is_root() {
            return Self(None);
        }
        Self(fs::metadata(dir).ok().map(|m| (m.uid(), m.gid())))
    }

    /// Give `path` (not a symlink's target) to the owner.
    pub fn apply(&self, path: &Path) -> Result<(), BackupError> {
        match self.0 {
            Some((uid, gid)) => std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .map_err(|e| BackupError::local("cannot change the owner of", path, e)),
            None => Ok(()),
        }
    }

    /// Give the open file `f` (at `path`, for the error) to the owner, without a path lookup.
    pub fn apply_to(&self, f: &fs::File, path: &Path) -> Result<(), BackupError> {
        match self.0 {
            Some((uid, gid)) => std::os::unix::fs::fchown(f, Some(uid), Some(gid))
                .map_err(|e| BackupError::local("cannot change the owner of", path, e)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "root:x:0:0:root:/root:/bin/bash\n\
                               postgres:x:105:112:PostgreSQL:/var/lib/postgresql:/bin/bash\n\
                               app:x:1001:1001::/home/app:/bin/sh\n";
    const GROUP_TEXT: &str = "root:x:0:\npostgres:x:112:\nssl-cert:x:113:postgres\n";

    fn owner(user: Option<&str>, group: Option<&str>) -> Owner {
        Owner {
            user: user.map(str::to_string),
            group: group.map(str::to_string),
            uid: 999,
            gid: 999,
        }
    }

    #[test]
    fn names_are_looked_up_here_not_ids() {
        let o = owner(Some("postgres"), Some("ssl-cert"));
        assert_eq!(
            decide(Some(&o), None, PASSWD_TEXT, GROUP_TEXT),
            (Some((105, 113)), None)
        );
        // A group unknown here: the user's primary group.
        let o = owner(Some("postgres"), Some("dba"));
        assert_eq!(
            decide(Some(&o), None, PASSWD_TEXT, GROUP_TEXT),
            (Some((105, 112)), None)
        );
    }

    #[test]
    fn an_unknown_user_falls_back_to_the_target_directory_owner_unless_root() {
        let o = owner(Some("pg"), Some("pg"));
        let (ids, warning) = decide(Some(&o), Some((1001, 1001)), PASSWD_TEXT, GROUP_TEXT);
        assert_eq!(ids, Some((1001, 1001)));
        assert!(warning.unwrap().contains("(user pg) does not exist"));
        let (ids, warning) = decide(Some(&o), Some((0, 0)), PASSWD_TEXT, GROUP_TEXT);
        assert_eq!(ids, None);
        assert!(warning.unwrap().contains("chown -R"));
        // A backup from before owners were recorded.
        let (ids, warning) = decide(None, None, PASSWD_TEXT, GROUP_TEXT);
        assert_eq!(ids, None);
        assert!(warning.unwrap().contains("does not record"));
    }

    #[test]
    fn read_permission_follows_owner_group_and_other_bits() {
        let gids = groups_of(105, PASSWD_TEXT, GROUP_TEXT);
        assert_eq!(gids, [112, 113], "primary group, then memberships");
        assert!(permits((105, 0), 0o400, 105, &gids, 4), "owner may read");
        assert!(!permits((105, 0), 0o044, 105, &gids, 4), "owner bits win");
        assert!(
            permits((0, 113), 0o640, 105, &gids, 4),
            "through a membership"
        );
        assert!(!permits((0, 0), 0o640, 105, &gids, 4));
        assert!(permits((0, 0), 0o644, 105, &gids, 4));
        assert!(!permits((0, 0), 0o700, 105, &gids, 1), "no search");
        assert!(
            permits((1001, 1001), 0o000, 0, &[], 4),
            "root reads anything"
        );
    }

    #[test]
    fn names_of_ids() {
        assert_eq!(name_of(PASSWD_TEXT, 105).as_deref(), Some("postgres"));
        assert_eq!(name_of(GROUP_TEXT, 113).as_deref(), Some("ssl-cert"));
        assert_eq!(name_of(PASSWD_TEXT, 4242), None);
        assert_eq!(name_of("# comment\n\nbroken\n", 0), None);
    }
}
