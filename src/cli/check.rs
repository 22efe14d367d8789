//! `walship check`: can this host use the repository, and do the keys fit it? With
//! `--archiving`, also: is the server set up to archive into it, and does a new segment arrive?

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;

use crate::archive::Archive;
use crate::backup::push::{self as backup_push, Awaited};
use crate::cli::backup::PgArgs;
use crate::codec;
use crate::config::Config;
use crate::config::ConfigError;
use crate::pg::conn;
use crate::repo::{self, RepoMeta};
use crate::storage::{PutOutcome, StorageError, Store};
use bytes::Bytes;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Also check the PostgreSQL server (on its host, as for backup-push): that it is the
    /// repository's cluster, its archiving settings, and that a new WAL segment reaches the
    /// repository; this writes a restore point named walship_check and switches WAL
    #[arg(long)]
    pub archiving: bool,
    /// Seconds to wait for that segment to reach the repository
    #[arg(long, default_value_t = 60)]
    pub wal_wait_secs: u64,
    /// Skip the write test, on a host that only restores (a read-only role) but shares the
    /// pushing hosts' config; hosts without recipients skip it anyway
    #[arg(long, conflicts_with = "archiving")]
    pub read_only: bool,
    // Last: the heading it sets carries on to the fields after it.
    #[command(flatten)]
    pub pg: PgArgs,
}

/// One line of the report: what, how it stands, and a hint when it is a problem.
pub struct Line {
    pub what: &'static str,
    pub status: Status,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but should be fixed; `check` still exits 0.
    Warn,
    /// Would make a command fail; `check` exits non-zero.
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// A secret file others can read, by PostgreSQL's rule for its TLS key file: no access for
/// other users, and for the group only when root owns it (`0640 root:postgres`).
pub fn loose_secret_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let mode = m.mode() & 0o777;
    let allowed_group = if m.uid() == 0 { 0o040 } else { 0 };
    (mode & 0o077 & !allowed_group != 0).then(|| {
        format!(
            "{} has mode {mode:04o}: other users can read it; chmod {} it",
            path.display(),
            if m.uid() == 0 {
                "0640 (or 0600)"
            } else {
                "0600"
            }
        )
    })
}

pub async fn run(cfg: &Config, args: &CheckArgs) -> Vec<Line> {
    let mut out = Vec::new();
    let mut line = |what, status, text: String| out.push(Line { what, status, text });
    let archive = match Archive::open(cfg, 2).await {
        Ok(a) => a,
        Err(e) => {
            line("repository", Status::Fail, format!("{}: {e}", cfg.repo_url));
            return out;
        }
    };
    match archive.store().probe().await {
        Ok(info) => {
            line(
                "repository",
                Status::Ok,
                format!("{} is reachable and readable", archive.store().describe()),
            );
            let (status, text) = match info.versioning {
                Some(Ok(true)) => (Status::Ok, "enabled".into()),
                Some(Ok(false)) => (
                    Status::Fail,
                    "OFF: turn bucket versioning on, so that an overwritten or deleted object can be recovered".into(),
                ),
                Some(Err(why)) => (
                    Status::Warn,
                    format!(
                        "unknown, the storage would not say ({why}); make sure versioning is on \
                         (or grant s3:GetBucketVersioning so that check can tell)"
                    ),
                ),
                None => (Status::Ok, "not applicable (directory repository)".into()),
            };
            line("versioning", status, text);
            match info.object_lock {
                Some(Ok(lock)) => line(
                    "object lock",
                    Status::Ok,
                    if lock { "enabled" } else { "off (optional)" }.into(),
                ),
                Some(Err(why)) => line("object lock", Status::Ok, format!("unknown: {why}")),
                None => {}
            }
        }
        Err(e) => {
            line("repository", Status::Fail, e.to_string());
            return out;
        }
    }
    let meta = match archive.read_meta().await {
        Ok(Some(m)) => {
            line(
                "metadata",
                Status::Ok,
                format!(
                    "system {}, PostgreSQL {}, {} MiB segments, created {}",
                    m.system_identifier,
                    m.pg_major
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "?".into()),
                    m.wal_segment_size >> 20,
                    m.created_at
                ),
            );
            Some(m)
        }
        Ok(None) => {
            line(
                "metadata",
                Status::Ok,
                "none yet: the first wal-push initialises the repository".into(),
            );
            None
        }
        Err(e) => {
            line("metadata", Status::Fail, e.to_string());
            None
        }
    };
    match cfg.recipients() {
        Ok(r) => {
            let fps = r.fingerprints();
            match &meta {
                Some(m)
                    if !m.recipient_fingerprints.is_empty() && m.recipient_fingerprints != fps =>
                {
                    line(
                        "recipients",
                        Status::Fail,
                        format!(
                        "fingerprints {} differ from the repository's {}: pushes would be refused",
                        fps.join(","),
                        m.recipient_fingerprints.join(",")
                    ),
                    )
                }
                _ => line(
                    "recipients",
                    Status::Ok,
                    format!("{} key(s), fingerprints {}", fps.len(), fps.join(",")),
                ),
            }
        }
        // A host that only restores (an identity, no recipients) needs none.
        Err(ConfigError::NoRecipients)
            if cfg.identity_file.is_some() || cfg.identity_env.is_some() =>
        {
            line(
                "recipients",
                Status::Ok,
                "not configured (needed only where WAL and backups are pushed)".into(),
            )
        }
        Err(e) => line(
            "recipients",
            Status::Fail,
            format!("{e} (needed for wal-push and backup-push)"),
        ),
    }
    if cfg.identity_file.is_some() || cfg.identity_env.is_some() {
        match cfg.identities() {
            Ok(ids) => {
                let mine = ids.recipients().fingerprints();
                let configured = cfg.recipients().ok();
                let configured_fps = || {
                    configured
                        .as_ref()
                        .map(|r| ("the configured recipients", r.fingerprints()))
                };
                // The keys it must be one of, and whose list that is.
                let expected = meta
                    .as_ref()
                    .map(|m| {
                        (
                            "the repository's recipients",
                            m.recipient_fingerprints.clone(),
                        )
                    })
                    .or_else(configured_fps);
                let fits = expected
                    .as_ref()
                    .is_none_or(|(_, exp)| exp.is_empty() || mine.iter().any(|f| exp.contains(f)));
                let round_trip = configured
                    .as_ref()
                    .and_then(|r| codec::encode(&b"walship check"[..], r, 1).ok())
                    .map(|enc| codec::decode(&enc.bytes, &ids, Vec::new()).is_ok());
                let source = match &cfg.identity_file {
                    Some(path) if cfg.identity_env.is_none() => path.display().to_string(),
                    _ => "WALSHIP_IDENTITY".to_string(),
                };
                let unmatched = if !fits {
                    expected
                } else if round_trip == Some(false) {
                    configured_fps()
                } else {
                    None
                };
                if let Some((whose, theirs)) = unmatched {
                    line(
                        "identity",
                        Status::Fail,
                        format!(
                            "does not match: key {} in {source} is none of {whose} ({}), so \
                             wal-fetch could not decrypt; set identity_file (or \
                             WALSHIP_IDENTITY_FILE) to the secret key file of one of them, or \
                             WALSHIP_IDENTITY to the key",
                            mine.join(","),
                            theirs.join(","),
                        ),
                    );
                } else {
                    line(
                        "identity",
                        Status::Ok,
                        format!("matches recipient {}", mine.join(",")),
                    );
                }
            }
            Err(e) => line("identity", Status::Fail, e.to_string()),
        }
    } else {
        line(
            "identity",
            Status::Ok,
            "not configured (needed only where WAL is fetched)".into(),
        );
    }
    // Where this host pushes: can it create objects, and will the storage never replace one?
    if cfg.recipients().is_ok() && !args.read_only {
        let (status, text) = conditional_put(archive.store().as_ref()).await;
        out.push(Line {
            what: "writes",
            status,
            text,
        });
    }
    let secrets = [
        (
            "identity",
            &cfg.identity_file,
            "it decrypts the whole archive",
        ),
        ("s3 secret", &cfg.s3_secret_file, "it is the S3 secret key"),
    ];
    for (what, path, why) in secrets {
        if let Some(w) = path.as_deref().and_then(loose_secret_file) {
            out.push(Line {
                what,
                status: Status::Warn,
                text: format!("{w} ({why})"),
            });
        }
    }
    if args.archiving {
        let ready = !out.iter().any(|l| l.status == Status::Fail);
        server_lines(&archive, meta.as_ref(), args, ready, &mut out).await;
    }
    out
}

/// A warning when the command line (`argv`, program name first) gives `--pg-*` flags that only
/// `--archiving` uses: whoever typed them meant the server to be checked. The same settings from
/// `WALSHIP_PG_*` are not warned about: they are there for the backup commands too.
pub fn unused_pg_flags(args: &CheckArgs, argv: &[String]) -> Option<Line> {
    if args.archiving {
        return None;
    }
    let given: Vec<&str> = argv
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .filter_map(|a| a.split('=').next())
        .filter(|a| a.starts_with("--pg-"))
        .collect();
    (!given.is_empty()).then(|| Line {
        what: "server",
        status: Status::Warn,
        text: format!(
            "not checked: {} used only with --archiving; add it to check the server too",
            given.join(", ")
        ),
    })
}

/// Whether this host can create objects, and whether the storage refuses to replace one, as
/// `wal-push` relies on (S3: `If-None-Match: *`, which some S3-compatible servers ignore): the
/// check object is put twice. After the first check ever, the first put already finds it.
async fn conditional_put(store: &dyn Store) -> (Status, String) {
    let key = repo::check_key();
    let body = || {
        Bytes::from_static(
            b"Created by `walship check` to test that this storage never replaces an object.\n",
        )
    };
    let cannot = |e: StorageError| {
        (
            Status::Fail,
            format!(
                "cannot create objects in {}: {e}; wal-push and backup-push would fail \
                 (on a host that only restores, use `walship check --read-only`)",
                store.describe()
            ),
        )
    };
    let replaced = match store.put_if_absent(&key, body()).await {
        Ok(PutOutcome::AlreadyExists) => false,
        Ok(PutOutcome::Created { .. }) => match store.put_if_absent(&key, body()).await {
            Ok(outcome) => outcome != PutOutcome::AlreadyExists,
            Err(e) => return cannot(e),
        },
        Err(e) => return cannot(e),
    };
    match replaced {
        false => (
            Status::Ok,
            "objects can be created, and an existing one is never replaced".into(),
        ),
        true => (
            Status::Warn,
            "the storage replaced an existing object although walship asked it not to \
             (If-None-Match: *): wal-push still refuses a different segment after checking for \
             one, but two uploads of one name at the same moment could replace each other; \
             keep bucket versioning on, or use storage that supports conditional writes"
                .into(),
        ),
    }
}

/// The server's lines: who it is, its archiving settings, and the archive test, which runs only
/// when everything before it passed (`ready`), so a check that already failed pushes nothing.
async fn server_lines(
    archive: &Archive,
    meta: Option<&RepoMeta>,
    args: &CheckArgs,
    ready: bool,
    out: &mut Vec<Line>,
) {
    let mut line = |what, status, text: String| out.push(Line { what, status, text });
    let pg = match conn::connect(&args.pg.settings()).await {
        Ok(pg) => pg,
        Err(e) => return line("postgres", Status::Fail, e.to_string()),
    };
    let describe = archive.store().describe();
    let server = match backup_push::check_server(&pg, meta, &describe).await {
        Ok(s) => s,
        Err(e) => return line("postgres", Status::Fail, e.to_string()),
    };
    line("postgres", Status::Ok, server.summary);
    let mut ready = ready;
    match server.cluster {
        Ok(()) => line(
            "cluster",
            Status::Ok,
            match meta {
                Some(_) => "the repository's".into(),
                None => "the repository has none yet: the first archived segment sets it".into(),
            },
        ),
        Err(e) => {
            ready = false;
            line("cluster", Status::Fail, e)
        }
    }
    match server.archiving {
        Ok(text) => line("archiving", Status::Ok, text),
        Err(e) => {
            ready = false;
            line("archiving", Status::Fail, e)
        }
    }
    for w in server.warnings {
        line("archiving", Status::Warn, w);
    }
    if server.in_recovery {
        return line(
            "archive test",
            Status::Ok,
            "skipped: a standby cannot switch WAL; run `walship check --archiving` on the primary"
                .into(),
        );
    }
    if !ready {
        return line(
            "archive test",
            Status::Fail,
            "not run: fix the FAIL lines above first".into(),
        );
    }
    let since = Instant::now();
    let wait = Duration::from_secs(args.wal_wait_secs);
    let tested = match backup_push::mark_and_switch(&pg, "walship_check").await {
        Ok(marked) => {
            tracing::info!("waiting up to {} s for {}", wait.as_secs(), marked.segment);
            backup_push::wait_archived(archive, &marked.segment, wait, Awaited::Check)
                .await
                .map(|()| marked.segment)
        }
        Err(e) => Err(e),
    };
    match tested {
        Ok(seg) => line(
            "archive test",
            Status::Ok,
            format!(
                "{seg} reached the repository {:.1} s after the switch",
                since.elapsed().as_secs_f64()
            ),
        ),
        Err(e) => line("archive test", Status::Fail, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn pg_flags_without_archiving_are_warned_about() {
        let warned = |argv: &[&str]| {
            use clap::Parser;
            let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
            let cli = crate::cli::Cli::try_parse_from(&argv).unwrap();
            let crate::cli::Command::Check(args) = &cli.command else {
                panic!("not check: {argv:?}")
            };
            unused_pg_flags(args, &argv).map(|l| l.text)
        };
        let text = warned(&["walship", "check", "--pg-host", "/run/pg", "--pg-port=5433"]).unwrap();
        assert!(
            text.contains("--pg-host, --pg-port used only with --archiving"),
            "{text}"
        );
        assert_eq!(
            warned(&["walship", "check", "--archiving", "--pg-port", "5433"]),
            None
        );
        assert_eq!(warned(&["walship", "check"]), None);
    }

    /// A storage that accepts every put (`Replaces`: as a server that ignores If-None-Match) or
    /// refuses them all (`ReadOnly`: as a restore host's role). Nothing else is called.
    enum Puts {
        Replaces,
        ReadOnly,
    }

    #[async_trait::async_trait]
    impl Store for Puts {
        async fn put_if_absent(
            &self,
            _: &crate::storage::ObjectKey,
            _: Bytes,
        ) -> Result<PutOutcome, StorageError> {
            match self {
                Puts::Replaces => Ok(PutOutcome::Created { version_id: None }),
                Puts::ReadOnly => Err(StorageError::Denied("PutObject".into())),
            }
        }
        async fn get(&self, _: &crate::storage::ObjectKey) -> Result<Bytes, StorageError> {
            unreachable!()
        }
        async fn get_prefix(
            &self,
            _: &crate::storage::ObjectKey,
            _: u64,
        ) -> Result<Bytes, StorageError> {
            unreachable!()
        }
        async fn list_after(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Vec<crate::storage::ObjectInfo>, StorageError> {
            unreachable!()
        }
        async fn make_durable(&self, _: &crate::storage::ObjectKey) -> Result<(), StorageError> {
            unreachable!()
        }
        async fn list_dirs(&self, _: &str) -> Result<Vec<String>, StorageError> {
            unreachable!()
        }
        async fn delete(&self, _: &crate::storage::ObjectKey) -> Result<(), StorageError> {
            unreachable!()
        }
        async fn probe(&self) -> Result<crate::storage::StoreInfo, StorageError> {
            unreachable!()
        }
        fn describe(&self) -> String {
            "test://".into()
        }
    }

    #[tokio::test]
    async fn the_write_check_tells_refused_replacements_from_silent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let fs = crate::storage::fs::FsStore::new(dir.path());
        // The first check creates the object and sees the second put refused; later checks find
        // it at once.
        for _ in 0..2 {
            let (status, text) = conditional_put(&fs).await;
            assert_eq!(status, Status::Ok, "{text}");
        }
        let stored = dir.path().join(repo::check_key().as_str());
        assert!(std::fs::read_to_string(stored)
            .unwrap()
            .contains("walship check"));
        let (status, text) = conditional_put(&Puts::Replaces).await;
        assert_eq!(status, Status::Warn);
        assert!(text.contains("If-None-Match"), "{text}");
        let (status, text) = conditional_put(&Puts::ReadOnly).await;
        assert_eq!(status, Status::Fail);
        assert!(
            text.contains("cannot create objects in test://") && text.contains("wal-push"),
            "{text}"
        );
    }

    #[test]
    fn secret_files_follow_postgresqls_key_file_rule() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("identity.txt");
        std::fs::write(&f, b"AGE-SECRET-KEY-1...").unwrap();
        let with_mode = |mode| {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            loose_secret_file(&f)
        };
        assert_eq!(with_mode(0o600), None);
        assert_eq!(with_mode(0o400), None);
        let world = with_mode(0o644).expect("world-readable is loose");
        assert!(world.contains("mode 0644"), "{world}");
        // Group-readable is fine only for a file root owns (0640 root:postgres).
        let root_owned = std::fs::metadata(&f).unwrap().uid() == 0;
        assert_eq!(with_mode(0o640).is_none(), root_owned);
        assert_eq!(loose_secret_file(&dir.path().join("missing")), None);
    }
}
