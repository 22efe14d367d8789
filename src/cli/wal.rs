//! `wal-push`, `wal-fetch` and the hidden `wal-prefetch`: wiring config into the `wal` module.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use crate::archive::Archive;
use crate::cli::GlobalArgs;
use crate::config::Config;
use crate::storage::retry::Deadline;
use crate::wal::fallback::FallbackGuard;
use crate::wal::fetch::{self, FetchContext, FetchOutcome, FetchReport};
use crate::wal::name::{WalFileKind, WalFileName};
use crate::wal::push::{self, PushContext, PushOutcome};
use crate::wal::spool::{self, Spool};
use crate::wal::WalError;

/// The fast path of `wal-push`, before any async runtime or storage client exists: whether a
/// look-ahead upload already archived `path` (and recorded it).
pub fn pushed_ahead(cfg: &Config, path: &Path) -> bool {
    let done = push::uploaded_ahead(&cfg.wal, &cfg.repo_url, path);
    if done {
        tracing::info!("{}: uploaded earlier by look-ahead", path.display());
    }
    done
}

/// Push `path` (after `pushed_ahead` said no).
pub async fn push(cfg: &Config, path: &Path) -> Result<(), WalError> {
    let ctx = PushContext {
        archive: Archive::open(cfg, 3).await?,
        recipients: cfg.recipients()?,
        compression_level: cfg.compression_level,
        settings: cfg.wal.clone(),
        repo_id: cfg.repo_url.clone(),
        meta: Default::default(),
    };
    let report = push::push(Arc::new(ctx), path).await?;
    for w in &report.warnings {
        eprintln!("walship: warning: {w}");
    }
    let how = match report.outcome {
        PushOutcome::Uploaded { stored_bytes } => format!("uploaded ({stored_bytes} bytes stored)"),
        PushOutcome::AlreadyUploadedAhead => "uploaded earlier by look-ahead".into(),
        PushOutcome::AlreadyArchived => "already archived".into(),
    };
    tracing::info!(
        "{}: {how}; {} more uploaded ahead",
        report.name,
        report.ahead_uploaded.len()
    );
    Ok(())
}

/// When a `wal-fetch` call stops waiting for storage: `None` (retry for as long as
/// `wal.fetch_attempts` says) where giving up stops recovery; `wal.standby_fetch_timeout_secs`
/// from now where PostgreSQL does without the file (`lenient`: standby mode, where it tries again
/// by itself and, while the call runs, neither streams from its primary nor acts on a promote;
/// the history copy at the end of archive recovery).
pub fn fetch_deadline(cfg: &Config, lenient: bool) -> Option<Instant> {
    cfg.wal
        .standby_fetch_timeout
        .filter(|_| lenient)
        .map(|limit| Instant::now() + limit)
}

async fn fetch_context(cfg: &Config, deadline: Option<Instant>) -> Result<FetchContext, WalError> {
    let deadline = deadline.map(|at| Deadline {
        at,
        why: format!(
            "the {} s a wal-fetch call gets in standby mode and at the end of archive recovery \
             (wal.standby_fetch_timeout_secs), where PostgreSQL does without the file: a standby \
             tries again a few seconds later and streams from its primary meanwhile if it has \
             one; at the end of recovery it uses pg_wal's copy",
            cfg.wal.standby_fetch_timeout.unwrap_or_default().as_secs()
        )
        .into(),
    });
    Ok(FetchContext {
        archive: Archive::open_until(cfg, cfg.wal.fetch_attempts, deadline).await?,
        identities: Arc::new(cfg.identities()?),
        settings: cfg.wal.clone(),
        repo_id: cfg.repo_url.clone(),
    })
}

/// The guard against an older timeline's copy of a segment (`wal::fallback`), for recovery's
/// own segment requests in standby mode (`standby`), the only place where PostgreSQL goes on to
/// an older timeline after a failure: outside it, walship's failures stop recovery.
pub fn fallback_guard(
    cfg: &Config,
    name: &str,
    dest: &Path,
    standby: bool,
) -> Option<(FallbackGuard, WalFileName)> {
    let name = WalFileName::parse(name).ok()?;
    let ours = standby && name.kind() == WalFileKind::Segment && fetch::from_recovery(dest);
    ours.then(|| {
        let state =
            crate::wal::state_dir(cfg.wal.state_dir.as_deref(), &crate::wal::parent_dir(dest));
        (FallbackGuard::new(&state), name)
    })
}

/// The fast path of `wal-fetch`, before any async runtime or storage client exists: take the
/// segment from the prefetch spool (waiting while the prefetcher is downloading it). `Ok(false)`
/// when the caller must download it with `fetch`.
pub fn fetch_spooled(
    cfg: &Config,
    global: &GlobalArgs,
    name: &str,
    dest: &Path,
    deadline: Option<Instant>,
) -> Result<bool, WalError> {
    let name = WalFileName::parse(name)?;
    match fetch::take_spooled(&cfg.wal, &cfg.repo_url, &name, dest, deadline) {
        Some(report) => {
            finish_fetch(global, cfg, &name, report);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Download, verify and place the segment (after `fetch_spooled` found nothing).
pub async fn fetch(
    cfg: &Config,
    global: &GlobalArgs,
    name: &str,
    dest: &Path,
    deadline: Option<Instant>,
) -> Result<(), WalError> {
    let name = WalFileName::parse(name)?;
    // The prefetcher starts before this download rather than after it: at the start of recovery
    // it gets a segment's download time ahead, and the next call finds its segment under way.
    // Only where a server runs (PostgreSQL calls from its data directory).
    let started = Path::new("postmaster.pid").is_file()
        && fetch::prefetch_ahead(&cfg.wal, &cfg.repo_url, &name, dest)
            .is_some_and(|spool| try_start_prefetcher(global, cfg, &spool));
    let mut report = fetch::fetch(&fetch_context(cfg, deadline).await?, &name, dest).await?;
    if started {
        report.start_prefetcher = None;
    }
    fetch::note_history(
        &cfg.wal,
        &cfg.repo_url,
        &name,
        dest,
        Path::new("postmaster.pid"),
    );
    finish_fetch(global, cfg, &name, report);
    Ok(())
}

fn finish_fetch(global: &GlobalArgs, cfg: &Config, name: &WalFileName, report: FetchReport) {
    match report.outcome {
        FetchOutcome::FromSpool => tracing::info!("{name}: served from the prefetch spool"),
        FetchOutcome::FromSpoolAfterWait(waited) => tracing::info!(
            "{name}: served from the prefetch spool after waiting {} ms for its download",
            waited.as_millis()
        ),
        FetchOutcome::Downloaded => tracing::info!("{name}: downloaded"),
    }
    if let Some(spool) = report.start_prefetcher {
        try_start_prefetcher(global, cfg, &spool);
    }
}

/// Start the prefetcher, or say why not; recovery goes on without it either way.
fn try_start_prefetcher(global: &GlobalArgs, cfg: &Config, spool: &Spool) -> bool {
    match start_prefetcher(global, cfg, spool) {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!("cannot start the prefetcher (recovery goes on without it): {e}");
            false
        }
    }
}

/// Start `walship wal-prefetch` detached, in its own process group, with the settings of this call.
/// The environment (AWS_*, WALSHIP_*) is inherited; secrets never go on its command line.
///
/// PostgreSQL runs restore_command in the data directory; the prefetcher is tied to the postmaster
/// named in its `postmaster.pid` and stops as soon as that server stops, so no prefetcher is left
/// writing under `pg_wal` when pg_rewind or a base backup copy of a stopped cluster runs.
/// `Ok(false)` when there is no `postmaster.pid` here (not a call from a server).
fn start_prefetcher(global: &GlobalArgs, cfg: &Config, spool: &Spool) -> std::io::Result<bool> {
    use std::os::unix::process::CommandExt;
    let pid_file = std::env::current_dir()?.join("postmaster.pid");
    if !pid_file.is_file() {
        tracing::debug!("no postmaster.pid in the working directory: not starting a prefetcher");
        return Ok(false);
    }
    let state_dir = spool
        .dir()
        .parent()
        .expect("spool lives in a state dir")
        .to_path_buf();
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("wal-prefetch")
        .arg("--spool-state-dir")
        .arg(&state_dir)
        .arg("--postmaster-pid-file")
        .arg(&pid_file)
        .args(super::repo_args(global, cfg));
    cmd.arg("--prefetch")
        .arg(cfg.wal.prefetch.to_string())
        .arg("--download-concurrency")
        .arg(cfg.wal.download_concurrency.to_string());
    // Appended to: a prefetcher starting (and finding another running) must not truncate the
    // running one's log. Emptied once it grows past 1 MiB.
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(state_dir.join("prefetch.log"))?;
    if log.metadata()?.len() > 1 << 20 {
        log.set_len(0)?;
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    close_inherited_on_exec();
    cmd.spawn()?;
    Ok(true)
}

/// Mark every descriptor above stdio close-on-exec, so that the prefetcher inherits none of
/// them. PostgreSQL before 16 opens its files without close-on-exec, so restore_command gets
/// the startup process's open relation files, WAL segment and pipes; a prefetcher, which lives
/// for as long as recovery asks for WAL, would keep a file that replay drops taking disk space.
fn close_inherited_on_exec() {
    close_fds::set_fds_cloexec_threadsafe(3, &[]);
}

/// In the environment of the prefetcher's worker process (see `supervise_prefetcher`).
const PREFETCH_WORKER_ENV: &str = "WALSHIP_PREFETCH_WORKER";

/// `wal-prefetch` runs as two processes: this one, which only starts the worker (the same
/// command) and waits for it, and the worker. `Some(exit code)` in the waiting process, `None`
/// everywhere else (carry on).
///
/// The prefetcher outlives the `wal-fetch` call that started it, so its parent becomes PID 1. In a
/// container started without an init (the official postgres image execs the server), PID 1 is
/// the postmaster, which takes any child ending with a status other than 0 or 1, or by a signal,
/// for a crashed backend: it stops every process and restarts, which in recovery means recovery
/// starts again. The worker may fail, panic or be killed by the OOM killer; this process, which
/// does nothing that can fail, always exits 0.
pub fn supervise_prefetcher() -> Option<std::process::ExitCode> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if !args.iter().any(|a| a == "wal-prefetch") || std::env::var_os(PREFETCH_WORKER_ENV).is_some()
    {
        return None;
    }
    if let Ok(exe) = std::env::current_exe() {
        let _ = std::process::Command::new(exe)
            .args(&args)
            .env(PREFETCH_WORKER_ENV, "1")
            .status();
    }
    Some(std::process::ExitCode::SUCCESS)
}

pub async fn prefetch(cfg: &Config, state_dir: &Path, pid_file: &Path) -> Result<(), WalError> {
    // main() has lowered this process's priority before starting the runtime's threads.
    let spool = Spool::new(state_dir, &cfg.repo_url);
    // First of all: while this process sets up, calls from recovery see a prefetcher running.
    let Some(lock) = spool
        .lock_for_prefetcher()
        .map_err(|e| WalError::local("cannot lock the spool in", state_dir, e))?
    else {
        return Ok(()); // another prefetcher runs
    };
    let ctx = Arc::new(fetch_context(cfg, None).await?);
    let server = spool::ServerWatch::new(pid_file)
        .map_err(|e| WalError::local("cannot read", pid_file, e))?;
    spool::run_prefetcher(ctx, spool, lock, server)
        .await
        .map_err(|e| WalError::local("prefetcher failed in", state_dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::{fcntl_getfd, FdFlags};

    #[test]
    fn descriptors_are_made_close_on_exec_before_the_prefetcher_starts() {
        let file = tempfile::tempfile().unwrap();
        // A descriptor as PostgreSQL 15 hands them down: dup(2) leaves close-on-exec off.
        let inherited = rustix::io::dup(&file).unwrap();
        assert!(!fcntl_getfd(&inherited).unwrap().contains(FdFlags::CLOEXEC));
        close_inherited_on_exec();
        assert!(fcntl_getfd(&inherited).unwrap().contains(FdFlags::CLOEXEC));
        assert!(
            !fcntl_getfd(std::io::stderr())
                .unwrap()
                .contains(FdFlags::CLOEXEC),
            "stdio is left alone"
        );
    }
}
