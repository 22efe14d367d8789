//! Command-line definitions (clap) and one small file per subcommand. No business logic here: each
//! subcommand resolves what it needs and calls into `wal`, `archive` or `codec`.

pub mod backup;
pub mod check;
pub mod keygen;
pub mod wal;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "walship",
    version,
    about = "Ship PostgreSQL WAL to object storage: verified, compressed (zstd), encrypted (age)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command accepts. Each flag can also come from its WALSHIP_* variable.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Repository and settings (every command)")]
pub struct GlobalArgs {
    /// Config file (TOML) [default: /etc/walship/walship.toml if it exists]
    #[arg(long, env = "WALSHIP_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Repository: s3://bucket/prefix or file:///absolute/path
    #[arg(long, env = "WALSHIP_REPO", global = true)]
    pub repo: Option<String>,
    /// age public key(s) to encrypt to (age1…); comma separated. Public, so allowed on the command line.
    #[arg(
        long = "recipient",
        env = "WALSHIP_RECIPIENTS",
        value_delimiter = ',',
        global = true
    )]
    pub recipients: Vec<String>,
    /// File with age public keys, one a line
    #[arg(long, env = "WALSHIP_RECIPIENTS_FILE", global = true)]
    pub recipients_file: Option<PathBuf>,
    /// age identity file (secret key) for decrypting; the key itself may instead be in WALSHIP_IDENTITY
    #[arg(long, env = "WALSHIP_IDENTITY_FILE", global = true)]
    pub identity_file: Option<PathBuf>,
    /// zstd level, 1..=19 [default: 1]
    #[arg(long, env = "WALSHIP_COMPRESSION_LEVEL", global = true)]
    pub compression_level: Option<i32>,
    /// S3 endpoint URL for S3-compatible servers, e.g. http://127.0.0.1:9000
    #[arg(long, env = "WALSHIP_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: us-east-1]
    #[arg(long, env = "WALSHIP_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Path-style addressing (needed by most S3-compatible servers) [default: false]
    #[arg(long, env = "WALSHIP_S3_PATH_STYLE", global = true)]
    pub s3_path_style: Option<bool>,
    /// PEM file with extra CA certificates to trust for the S3 endpoint
    #[arg(long, env = "WALSHIP_S3_CA_BUNDLE", global = true)]
    pub s3_ca_bundle: Option<PathBuf>,
    /// wal-push: how many other .ready segments to upload ahead [default: 16]
    #[arg(long, env = "WALSHIP_LOOKAHEAD", global = true)]
    pub lookahead: Option<usize>,
    /// wal-push: uploads in flight at once [default: 3]
    #[arg(long, env = "WALSHIP_UPLOAD_CONCURRENCY", global = true)]
    pub upload_concurrency: Option<usize>,
    /// wal-fetch: segments to keep prefetched ahead of recovery, 0 = off [default: 16]
    #[arg(long, env = "WALSHIP_PREFETCH", global = true)]
    pub prefetch: Option<usize>,
    /// wal-fetch: prefetch downloads in flight at once [default: 4]
    #[arg(long, env = "WALSHIP_DOWNLOAD_CONCURRENCY", global = true)]
    pub download_concurrency: Option<usize>,
    /// Directory for look-ahead records and the prefetch spool [default: <pg_wal>/.walship]
    #[arg(long, env = "WALSHIP_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

impl GlobalArgs {
    pub fn overrides(&self, identity_env: Option<String>) -> Overrides {
        Overrides {
            config: self.config.clone(),
            repo: self.repo.clone(),
            recipients: self.recipients.clone(),
            recipients_file: self.recipients_file.clone(),
            identity_file: self.identity_file.clone(),
            identity_env,
            compression_level: self.compression_level,
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_path_style: self.s3_path_style,
            s3_ca_bundle: self.s3_ca_bundle.clone(),
            lookahead: self.lookahead,
            upload_concurrency: self.upload_concurrency,
            prefetch: self.prefetch,
            download_concurrency: self.download_concurrency,
            state_dir: self.state_dir.clone(),
        }
    }
}

/// The flags that give a walship process started for this one (the prefetcher, PostgreSQL's
/// restore_command after `restore`) the same repository settings. Paths are made absolute, since
/// such processes may run elsewhere. Secrets never go on a command line: they come from the files
/// the config names, or from the environment.
pub fn repo_args(global: &GlobalArgs, cfg: &crate::config::Config) -> Vec<String> {
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .to_string_lossy()
            .into_owned()
    };
    let mut args = Vec::new();
    let mut flag = |k: &str, v: String| {
        args.push(k.to_string());
        args.push(v);
    };
    if let Some(c) = &cfg.config_file {
        flag("--config", absolute(c));
    }
    flag("--repo", cfg.repo_url.clone());
    if let Some(i) = global.identity_file.as_ref().or(cfg.identity_file.as_ref()) {
        flag("--identity-file", absolute(i));
    }
    if let Some(s3) = &cfg.s3 {
        if let Some(ep) = &s3.endpoint {
            flag("--s3-endpoint", ep.clone());
        }
        flag("--s3-region", s3.region.clone());
        flag("--s3-path-style", s3.path_style.to_string());
        if let Some(ca) = &s3.ca_bundle {
            flag("--s3-ca-bundle", absolute(ca));
        }
    }
    args
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an age identity file (mode 0600) and print its public key (the recipient)
    Keygen(keygen::KeygenArgs),
    /// Check repository access, versioning, and that the keys work; with --archiving, also that
    /// the server's WAL reaches the repository
    Check(check::CheckArgs),
    /// archive_command: archive the WAL file at PATH (%p)
    WalPush {
        /// The file PostgreSQL archives: %p
        path: PathBuf,
    },
    /// restore_command: fetch archived WAL file NAME (%f) to PATH (%p)
    WalFetch {
        /// The archived file's name: %f
        name: String,
        /// Where to place it: %p
        path: PathBuf,
    },
    /// Take a base backup of the running server (primary or standby)
    BackupPush(backup::PushArgs),
    /// List the backups and the span the archive can recover
    BackupList {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Restore a backup (an id or LATEST) into DIR, without recovery settings
    BackupFetch(backup::FetchArgs),
    /// Restore into DIR from the newest backup that reaches a target, and write the recovery
    /// settings (restore_command, target, recovery.signal) so starting PostgreSQL recovers
    Restore(backup::RestoreArgs),
    /// Create a named restore point and wait until the WAL holding it is archived
    RestorePoint(backup::RestorePointArgs),
    /// recovery_end_command after `restore`: once recovery has ended, blank the target in DIR's
    /// postgresql.auto.conf, set recovery_target_timeline to 'latest' and comment out
    /// recovery_end_command, so standbys cloned from the cluster do not inherit the target
    RecoveryDone {
        /// The data directory (PostgreSQL runs recovery_end_command in it)
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// The background prefetcher wal-fetch starts (internal)
    #[command(hide = true)]
    WalPrefetch {
        /// The state directory whose spool to fill
        #[arg(long = "spool-state-dir")]
        spool_state_dir: PathBuf,
        /// postmaster.pid of the server in recovery: the prefetcher stops when that server stops
        #[arg(long = "postmaster-pid-file")]
        postmaster_pid_file: PathBuf,
    },
}
