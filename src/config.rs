//! Configuration: defaults < TOML file < `WALSHIP_*` environment < flags, resolved once into a
//! validated `Config` that is passed down. Outside this module walship reads only what other
//! tools define (PostgreSQL's `PG*` and `USER` for connections, `HOME` and `AWS_*` where `check`
//! looks for credentials the server would lack, the AWS SDK's credential chain), `WALSHIP_LOG`,
//! and the secret `WALSHIP_IDENTITY`, which `main` reads and passes down.
//!
//! Secrets are never taken from argv: the age identity comes from a file (`identity_file`) or the
//! `WALSHIP_IDENTITY` variable; S3 keys from the standard AWS variables/profile chain or from
//! `s3.secret_access_key_file`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::{CodecError, Identities, Recipients};
use crate::storage::s3::S3Settings;

/// Where `walship` looks for a config file when neither `--config` nor `WALSHIP_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/walship/walship.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {err}{}; the config file is --config or WALSHIP_CONFIG, else {} when it exists", .path.display(), crate::io_hint::suffix(.err), DEFAULT_CONFIG_PATH)]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {0} is invalid: {1}; fix that line (README.md, Configuration, lists every setting)")]
    Parse(PathBuf, String),
    #[error("no repository configured: set WALSHIP_REPO, --repo or `repo = ...` in the config file (s3://bucket/prefix or file:///path)")]
    NoRepo,
    #[error("repository URL '{0}' is not valid: {1}")]
    BadRepo(String, &'static str),
    #[error("no encryption recipients configured: set `recipients`/`recipients_file` in the config or WALSHIP_RECIPIENTS (create a key with `walship keygen`)")]
    NoRecipients,
    #[error("no identity configured to decrypt the archive: set `identity_file` in the config, WALSHIP_IDENTITY_FILE or WALSHIP_IDENTITY")]
    NoIdentity,
    #[error("cannot read {what} {path}: {err}{}", crate::io_hint::suffix(.err))]
    ReadSecret {
        what: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("{0}")]
    Key(#[from] CodecError),
    /// A recipient that is not an age public key, and the setting it came from.
    #[error("{err} (set by {by})")]
    Recipients { by: String, err: CodecError },
    #[error("invalid setting {0}: {1}")]
    Invalid(&'static str, String),
}

/// The config file, every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repo: Option<String>,
    pub recipients: Option<Vec<String>>,
    pub recipients_file: Option<PathBuf>,
    pub identity_file: Option<PathBuf>,
    pub compression_level: Option<i32>,
    #[serde(default)]
    pub s3: FileS3,
    #[serde(default)]
    pub wal: FileWal,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub ca_bundle: Option<PathBuf>,
    pub access_key_id: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
    pub max_attempts: Option<u32>,
    pub connect_timeout_secs: Option<u64>,
    pub operation_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWal {
    pub lookahead: Option<usize>,
    pub upload_concurrency: Option<usize>,
    pub prefetch: Option<usize>,
    pub download_concurrency: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub fetch_attempts: Option<u32>,
    pub standby_fetch_timeout_secs: Option<u64>,
    pub prefetch_idle_secs: Option<u64>,
    pub prefetch_min_free_mb: Option<u64>,
}

/// Values from flags or the environment (clap merges the two); `None` falls back to the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub repo: Option<String>,
    pub recipients: Vec<String>,
    pub recipients_file: Option<PathBuf>,
    pub identity_file: Option<PathBuf>,
    /// The identity itself, only ever from the WALSHIP_IDENTITY variable.
    pub identity_env: Option<String>,
    pub compression_level: Option<i32>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: Option<bool>,
    pub s3_ca_bundle: Option<PathBuf>,
    pub lookahead: Option<usize>,
    pub upload_concurrency: Option<usize>,
    pub prefetch: Option<usize>,
    pub download_concurrency: Option<usize>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    S3 { bucket: String, prefix: String },
    Dir(PathBuf),
}

impl RepoLocation {
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why| ConfigError::BadRepo(url.to_string(), why);
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !bucket_ok {
                return Err(bad(
                    "an S3 bucket name is 3 to 63 characters, lowercase letters, digits, '-' and \
                     '.' (s3://bucket/prefix)",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
                return Err(bad(
                    "the prefix after the bucket has an empty, '.' or '..' part; name the \
                     folder directly (s3://bucket/pg/main)",
                ));
            }
            let prefix = if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            };
            Ok(RepoLocation::S3 {
                bucket: bucket.to_string(),
                prefix,
            })
        } else if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file:// repository needs an absolute path, with three slashes in all \
                     (file:///var/lib/walship)",
                ));
            }
            Ok(RepoLocation::Dir(PathBuf::from(path)))
        } else {
            Err(bad(
                "use s3://bucket/prefix for S3 or file:///absolute/path for a local directory",
            ))
        }
    }
}

#[derive(Debug, Clone)]
pub struct WalSettings {
    /// How many other `.ready` segments one wal-push call uploads ahead.
    pub lookahead: usize,
    /// Uploads in flight at once within one wal-push call.
    pub upload_concurrency: usize,
    /// How many segments the prefetch spool keeps ahead of recovery; 0 turns prefetch off.
    pub prefetch: usize,
    pub download_concurrency: usize,
    /// Where look-ahead records and the prefetch spool live; default `<pg_wal>/.walship`.
    pub state_dir: Option<PathBuf>,
    /// Tries per object in wal-fetch before giving up on a transient failure.
    pub fetch_attempts: u32,
    /// In standby mode and for the history copy at the end of archive recovery, how long one
    /// wal-fetch call may wait for storage (`None`: no limit). PostgreSQL retries a standby's
    /// failed call by itself, and while the call runs it neither streams from its primary nor
    /// acts on a promote, which makes three calls in a row.
    pub standby_fetch_timeout: Option<Duration>,
    pub prefetch_idle: Duration,
    /// Free space the prefetcher leaves on the spool's filesystem: below it, it starts no download.
    pub prefetch_min_free: u64,
}

/// Everything a command needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub repo_url: String,
    pub repo: RepoLocation,
    pub s3: Option<S3Settings>,
    /// Public keys (age1…) as given; parsed on demand.
    pub recipients: Vec<String>,
    pub identity_file: Option<PathBuf>,
    pub identity_env: Option<String>,
    pub compression_level: i32,
    pub wal: WalSettings,
    /// The config file that was read, if any: passed on to processes walship starts.
    pub config_file: Option<PathBuf>,
    /// Where the S3 secret key was read from, if the config named a file.
    pub s3_secret_file: Option<PathBuf>,
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        err: e,
    })?;
    let mut file: FileConfig = toml::from_str(&text)
        .map_err(|e| ConfigError::Parse(path.to_path_buf(), toml_error(&text, &e)))?;
    let dir = std::path::absolute(path)
        .map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            err: e,
        })?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    file.anchor_paths(&dir);
    Ok(file)
}

/// A TOML error on one line: where (line and column) and what. toml's own `Display` draws the
/// line with a caret under it, over several lines, in PostgreSQL's log.
fn toml_error(text: &str, err: &toml::de::Error) -> String {
    let what = crate::text::one_line(err.message());
    let Some(at) = err.span().map(|s| s.start.min(text.len())) else {
        return what;
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    format!("line {line}, column {column}: {what}")
}

/// The keys in `entries`, refused with `by` (where they were set) named when one is not a public
/// key. Each entry may hold several keys, split by commas or white space. In a recipients file's
/// lines (`lines`), `#` starts a comment to the end of the line; in a setting's values only a word
/// starting with `#` is left out, so a `#` there never hides the keys after it.
fn checked_recipients<S: AsRef<str>>(
    entries: impl IntoIterator<Item = S>,
    lines: bool,
    by: String,
) -> Result<Vec<String>, ConfigError> {
    let mut keys = Vec::new();
    for entry in entries {
        let entry = entry.as_ref();
        let kept = match lines {
            true => entry.split('#').next().unwrap_or_default(),
            false => entry,
        };
        keys.extend(
            kept.split([',', ' ', '\t'])
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.starts_with('#'))
                .map(str::to_string),
        );
    }
    match Recipients::parse(keys.iter().map(String::as_str)) {
        Ok(_) => Ok(keys),
        Err(err) => Err(ConfigError::Recipients { by, err }),
    }
}

impl FileConfig {
    /// Relative paths in a config file name files beside it, not in whatever directory walship
    /// runs in: PostgreSQL runs archive_command and restore_command in the data directory.
    fn anchor_paths(&mut self, dir: &Path) {
        for p in [
            &mut self.recipients_file,
            &mut self.identity_file,
            &mut self.s3.ca_bundle,
            &mut self.s3.secret_access_key_file,
            &mut self.wal.state_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

impl Config {
    /// Resolve flags/env over the config file over defaults.
    pub fn resolve(o: Overrides) -> Result<Self, ConfigError> {
        let (file, config_file) = match &o.config {
            Some(p) => (read_file_config(p)?, Some(p.clone())),
            // A file that cannot be looked at (a directory walship's user may not search) is
            // read, so its error shows; skipping it would run without its settings.
            None if Path::new(DEFAULT_CONFIG_PATH).try_exists().unwrap_or(true) => (
                read_file_config(Path::new(DEFAULT_CONFIG_PATH))?,
                Some(PathBuf::from(DEFAULT_CONFIG_PATH)),
            ),
            None => (FileConfig::default(), None),
        };
        let repo_url = o.repo.or(file.repo).ok_or(ConfigError::NoRepo)?;
        let repo = RepoLocation::parse(&repo_url)?;

        // `recipients` and `recipients_file` are one setting: the highest source that sets either
        // gives both. A key replaced through WALSHIP_RECIPIENTS must not stay in use through the
        // config file's `recipients_file`.
        let (listed, listed_by, recipients_file) =
            if !o.recipients.is_empty() || o.recipients_file.is_some() {
                let by = "--recipient or WALSHIP_RECIPIENTS".to_string();
                (o.recipients.clone(), by, o.recipients_file.clone())
            } else {
                let by = match &config_file {
                    Some(cfg) => format!("`recipients` in {}", cfg.display()),
                    None => "`recipients`".to_string(),
                };
                (
                    file.recipients.unwrap_or_default(),
                    by,
                    file.recipients_file,
                )
            };
        // Each source is checked on its own, so a bad key's error says where to fix it.
        let mut recipients = checked_recipients(&listed, false, listed_by)?;
        if let Some(path) = recipients_file {
            let text = std::fs::read_to_string(&path).map_err(|err| ConfigError::ReadSecret {
                what: "recipients file",
                path: path.clone(),
                err,
            })?;
            let by = format!("recipients file {}", path.display());
            recipients.extend(checked_recipients(text.lines(), true, by)?);
        }

        // Level 1: WAL is archived one segment per call and a backlog is dangerous, so speed comes
        // first; level 3 stores about a quarter less for about twice the CPU (see README).
        let compression_level = o.compression_level.or(file.compression_level).unwrap_or(1);
        if !(1..=19).contains(&compression_level) {
            return Err(ConfigError::Invalid(
                "compression_level",
                format!("{compression_level} is not in 1..=19"),
            ));
        }

        let s3_secret_file = match &repo {
            RepoLocation::S3 { .. } => file.s3.secret_access_key_file.clone(),
            RepoLocation::Dir(_) => None,
        };
        let s3 = match &repo {
            RepoLocation::Dir(_) => None,
            RepoLocation::S3 { bucket, prefix } => {
                let fs3 = file.s3;
                let static_credentials = match (&fs3.access_key_id, &fs3.secret_access_key_file) {
                    (Some(id), Some(path)) => {
                        let secret = std::fs::read_to_string(path).map_err(|err| {
                            ConfigError::ReadSecret {
                                what: "s3.secret_access_key_file",
                                path: path.clone(),
                                err,
                            }
                        })?;
                        Some((id.clone(), secret.trim().to_string()))
                    }
                    (None, None) => None,
                    _ => {
                        return Err(ConfigError::Invalid(
                            "s3.access_key_id",
                            "set both access_key_id and secret_access_key_file, or neither".into(),
                        ))
                    }
                };
                let endpoint = o.s3_endpoint.or(fs3.endpoint);
                if let Some(ep) = &endpoint {
                    if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                        return Err(ConfigError::Invalid(
                            "s3.endpoint",
                            format!("'{ep}' must start with http:// or https://"),
                        ));
                    }
                }
                Some(S3Settings {
                    bucket: bucket.clone(),
                    prefix: prefix.clone(),
                    region: o
                        .s3_region
                        .or(fs3.region)
                        .unwrap_or_else(|| "us-east-1".into()),
                    endpoint,
                    path_style: o.s3_path_style.or(fs3.path_style).unwrap_or(false),
                    ca_bundle: o.s3_ca_bundle.or(fs3.ca_bundle),
                    static_credentials,
                    max_attempts: fs3.max_attempts.unwrap_or(3),
                    connect_timeout: Duration::from_secs(fs3.connect_timeout_secs.unwrap_or(5)),
                    operation_timeout: Duration::from_secs(
                        fs3.operation_timeout_secs.unwrap_or(120),
                    ),
                })
            }
        };

        let w = file.wal;
        let wal = WalSettings {
            lookahead: o.lookahead.or(w.lookahead).unwrap_or(16),
            upload_concurrency: o
                .upload_concurrency
                .or(w.upload_concurrency)
                .unwrap_or(3)
                .max(1),
            prefetch: o.prefetch.or(w.prefetch).unwrap_or(16),
            download_concurrency: o
                .download_concurrency
                .or(w.download_concurrency)
                .unwrap_or(4)
                .max(1),
            state_dir: o.state_dir.or(w.state_dir),
            fetch_attempts: w.fetch_attempts.unwrap_or(5).max(1),
            standby_fetch_timeout: match w.standby_fetch_timeout_secs.unwrap_or(15) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            prefetch_idle: Duration::from_secs(w.prefetch_idle_secs.unwrap_or(60)),
            prefetch_min_free: w
                .prefetch_min_free_mb
                .unwrap_or(1024)
                .saturating_mul(1 << 20),
        };

        // An identity file given by flag or WALSHIP_IDENTITY_FILE wins over WALSHIP_IDENTITY,
        // which wins over the config file's.
        let identity_env = o.identity_env.filter(|_| o.identity_file.is_none());
        Ok(Self {
            repo_url,
            repo,
            s3,
            recipients,
            identity_env,
            identity_file: o.identity_file.or(file.identity_file),
            compression_level,
            wal,
            config_file,
            s3_secret_file,
        })
    }

    /// The public keys pushes encrypt to.
    pub fn recipients(&self) -> Result<Recipients, ConfigError> {
        let r = Recipients::parse(self.recipients.iter().map(String::as_str))?;
        if r.is_empty() {
            return Err(ConfigError::NoRecipients);
        }
        Ok(r)
    }

    /// The secret keys fetches decrypt with.
    pub fn identities(&self) -> Result<Identities, ConfigError> {
        if let Some(text) = &self.identity_env {
            return Ok(Identities::parse(text, "WALSHIP_IDENTITY")?);
        }
        let path = self.identity_file.as_ref().ok_or(ConfigError::NoIdentity)?;
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::ReadSecret {
            what: "identity file",
            path: path.clone(),
            err,
        })?;
        Ok(Identities::parse(&text, &path.display().to_string())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_urls() {
        assert_eq!(
            RepoLocation::parse("s3://my-bucket/pg/main/").unwrap(),
            RepoLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: "pg/main/".into()
            }
        );
        assert_eq!(
            RepoLocation::parse("s3://my-bucket").unwrap(),
            RepoLocation::S3 {
                bucket: "my-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            RepoLocation::parse("file:///var/lib/walship").unwrap(),
            RepoLocation::Dir("/var/lib/walship".into())
        );
        for (bad, why) in [
            ("s3://B/x", "bucket name"),
            ("s3://ab", "bucket name"),
            ("s3://bucket/../x", "'..'"),
            ("s3://bucket/a//b", "empty"),
            ("file://relative", "absolute path"),
            ("http://x", "s3://bucket/prefix for S3"),
            ("/tmp/x", "file:///absolute/path"),
        ] {
            let err = RepoLocation::parse(bad).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("repository URL '{bad}' is not valid: "))
                    && err.contains(why),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_standby_fetch_timeout_defaults_to_15_s_and_0_turns_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |wal: &str| {
            let cfg = dir.path().join("w.toml");
            std::fs::write(&cfg, format!("repo = \"file:///x\"\n[wal]\n{wal}")).unwrap();
            let o = Overrides {
                config: Some(cfg),
                ..Default::default()
            };
            Config::resolve(o).unwrap().wal.standby_fetch_timeout
        };
        assert_eq!(resolve(""), Some(Duration::from_secs(15)));
        assert_eq!(
            resolve("standby_fetch_timeout_secs = 7\n"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(resolve("standby_fetch_timeout_secs = 0\n"), None);
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"s3://file-bucket/p\"\ncompression_level = 5\n[s3]\nregion = \"eu-west-1\"\npath_style = true\n[wal]\nlookahead = 4\n",
        )
        .unwrap();
        let o = Overrides {
            config: Some(cfg.clone()),
            lookahead: Some(9),
            ..Default::default()
        };
        let c = Config::resolve(o).unwrap();
        assert_eq!(c.compression_level, 5);
        assert_eq!(c.wal.lookahead, 9);
        let s3 = c.s3.unwrap();
        assert_eq!(
            (
                s3.bucket.as_str(),
                s3.prefix.as_str(),
                s3.region.as_str(),
                s3.path_style
            ),
            ("file-bucket", "p/", "eu-west-1", true)
        );
        let o = Overrides {
            config: Some(cfg),
            repo: Some("file:///x".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(o).unwrap().repo,
            RepoLocation::Dir("/x".into())
        );
    }

    #[test]
    fn relative_paths_in_a_config_file_name_files_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cr3t\n").unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            "repo = \"s3://bucket/p\"\nidentity_file = \"keys/id\"\n\
             [s3]\naccess_key_id = \"AK\"\nsecret_access_key_file = \"secret\"\n\
             ca_bundle = \"/etc/ca.pem\"\n[wal]\nstate_dir = \"state\"\n",
        )
        .unwrap();
        // The test runs in the crate's directory, which has no file named `secret`.
        let c = Config::resolve(Overrides {
            config: Some(cfg),
            ..Default::default()
        })
        .unwrap();
        let s3 = c.s3.unwrap();
        assert_eq!(
            s3.static_credentials,
            Some(("AK".to_string(), "s3cr3t".to_string()))
        );
        assert_eq!(s3.ca_bundle, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.s3_secret_file, Some(dir.path().join("secret")));
        assert_eq!(c.identity_file, Some(dir.path().join("keys/id")));
        assert_eq!(c.wal.state_dir, Some(dir.path().join("state")));
    }

    #[test]
    fn key_settings_follow_the_same_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let key = |n: u8| {
            use age::secrecy::ExposeSecret;
            let id = age::x25519::Identity::generate();
            let path = dir.path().join(format!("key{n}"));
            std::fs::write(&path, format!("{}\n", id.to_string().expose_secret())).unwrap();
            (id.to_public().to_string(), path)
        };
        let (old, _) = key(1);
        let (new, id_file) = key(2);
        let old_list = dir.path().join("old-recipients");
        // Comments, whole-line or after a key, may hold spaces and commas.
        std::fs::write(&old_list, format!("# the ops key, for now\n{old}  # ops\n")).unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(
            &cfg,
            format!(
                "repo = \"file:///x\"\nrecipients_file = \"{}\"\n",
                old_list.display()
            ),
        )
        .unwrap();
        let resolve = |o: Overrides| {
            Config::resolve(Overrides {
                config: Some(cfg.clone()),
                ..o
            })
            .unwrap()
        };
        // A key replaced through the environment replaces the file's list, not joins it.
        let c = resolve(Overrides {
            recipients: vec![new.clone()],
            ..Default::default()
        });
        assert_eq!(c.recipients, std::slice::from_ref(&new));
        assert_eq!(
            resolve(Overrides::default()).recipients,
            std::slice::from_ref(&old)
        );
        // In a value, a word starting with `#` is no comment to the end: the keys after it count.
        let c = resolve(Overrides {
            recipients: vec![format!("{new} #retired {old}")],
            ..Default::default()
        });
        assert_eq!(c.recipients, [new.clone(), old]);
        // An identity file named by flag or WALSHIP_IDENTITY_FILE wins over WALSHIP_IDENTITY.
        let c = resolve(Overrides {
            identity_file: Some(id_file.clone()),
            identity_env: Some("AGE-SECRET-KEY-1 from the environment".into()),
            ..Default::default()
        });
        assert!(c.identity_env.is_none());
        assert_eq!(
            c.identities().unwrap().recipients().fingerprints(),
            crate::codec::Recipients::parse([new.as_str()])
                .unwrap()
                .fingerprints()
        );
        let c = resolve(Overrides {
            identity_env: Some("AGE-SECRET-KEY-1 from the environment".into()),
            ..Default::default()
        });
        assert!(c.identity_env.is_some());
    }

    #[test]
    fn a_key_that_is_not_a_recipient_names_the_setting_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("recipients");
        // A comment of several words, and one after a key, are not keys.
        std::fs::write(&list, "# the ops team's key\nage1notakey  # old\n").unwrap();
        let cfg = dir.path().join("w.toml");
        let refused = |file: &str, o: Overrides| {
            std::fs::write(&cfg, format!("repo = \"file:///x\"\n{file}")).unwrap();
            let err = Config::resolve(Overrides {
                config: Some(cfg.clone()),
                ..o
            })
            .unwrap_err();
            assert!(matches!(err, ConfigError::Recipients { .. }), "{err:?}");
            err.to_string()
        };
        let listed = format!("recipients_file = \"{}\"\n", list.display());
        let err = refused(&listed, Overrides::default());
        assert!(
            err.contains("'age1notakey'")
                && err.ends_with(&format!("(set by recipients file {})", list.display())),
            "{err}"
        );
        let err = refused("recipients = [\"nope\"]\n", Overrides::default());
        assert!(
            err.ends_with(&format!("(set by `recipients` in {})", cfg.display())),
            "{err}"
        );
        // A secret key where a public one belongs: the source is named, the key is not repeated.
        let secret = "AGE-SECRET-KEY-1QQQQ";
        let err = refused(
            "",
            Overrides {
                recipients: vec![secret.into()],
                ..Default::default()
            },
        );
        assert!(
            err.ends_with("(set by --recipient or WALSHIP_RECIPIENTS)") && !err.contains(secret),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("w.toml");
        std::fs::write(&cfg, "repo = \"file:///x\"\n[wal]\n  lookahed = 3\n").unwrap();
        let resolve = |cfg: &Path| {
            Config::resolve(Overrides {
                config: Some(cfg.to_path_buf()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string()
        };
        // One line, saying where: toml's own message draws the line over several.
        let err = resolve(&cfg);
        assert!(
            err.contains("is invalid: line 3, column 3: unknown field `lookahed`, expected one of `lookahead`")
                && !err.contains('\n'),
            "{err}"
        );
        let err = resolve(&dir.path().join("missing.toml"));
        assert!(
            err.contains("missing.toml: No such file") && err.contains("WALSHIP_CONFIG"),
            "{err}"
        );
        let err = Config::resolve(Overrides {
            repo: Some("file:///x".into()),
            compression_level: Some(40),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("compression_level"), "{err}");
        assert!(matches!(
            Config::resolve(Overrides::default()),
            Err(ConfigError::NoRepo)
        ));
    }
}
