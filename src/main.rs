//! The `walship` binary: parse arguments, set up logging, run the command, and map its error to the
//! documented exit code (see `walship::exit` and the README). Errors print as one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use walship::cli::{self, Cli, Command};
use walship::config::Config;
use walship::exit;

fn main() -> ExitCode {
    if let Some(code) = cli::wal::supervise_prefetcher() {
        return code;
    }
    // A bad flag or WALSHIP_* value, or a panic (a bug, or a runtime that cannot start its
    // threads), in restore_command must not read as "end of archive": Rust's 101 would.
    let fetching = std::env::args_os().any(|a| a == "wal-fetch");
    // Where PostgreSQL takes a failed restore_command in its stride, wal-fetch exits with a plain
    // code: in standby mode, and in the history copy at the end of archive recovery (where a
    // code above 125 would stop the server halfway through a promotion), whatever the failure.
    let lenient = std::path::Path::new("standby.signal").exists()
        || fetching
            && std::env::args_os().any(|a| {
                walship::wal::fetch::ends_archive_recovery(a.as_ref(), std::path::Path::new("."))
            });
    let code = match fetching {
        true => exit::for_wal_fetch(exit::INTERNAL, lenient),
        false => exit::INTERNAL,
    };
    std::panic::set_hook(Box::new(move |info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // Threads that cannot start (tokio panics) are the host's limit, not a bug.
        if what.contains("can't spawn") || what.contains("os error 11") {
            eprintln!(
                "walship: error: cannot start its threads ({what}): the process or thread limit \
                 is reached (ulimit -u, a container's pids limit); raise it or stop what uses it"
            );
        } else {
            eprintln!(
                "walship: error: internal error: {what}{at}; this is a bug, please report it"
            );
        }
        std::process::exit(code);
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match (e.use_stderr(), fetching) {
                (false, _) => exit::OK,
                (true, true) => exit::for_wal_fetch(exit::USAGE, lenient),
                (true, false) => exit::USAGE,
            };
            if e.use_stderr() {
                eprintln!("walship: error: {}", usage_error(&e));
            } else {
                let _ = e.print();
            }
            return ExitCode::from(code as u8);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALSHIP_LOG")
                // The AWS SDK's own warnings are multi-line dumps of what walship's error line
                // says in one; `WALSHIP_LOG=warn` shows them.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,walship=warn")),
        )
        .with_writer(std::io::stderr)
        // PostgreSQL's log is a file: no colour codes unless a person is watching a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let code = run(cli, lenient);
    ExitCode::from(code as u8)
}

/// clap's error on one line, as every walship error is (PostgreSQL's log takes a line per
/// error), naming the `WALSHIP_*` variable when the bad value came from it: in restore_command or
/// archive_command nobody typed the flag clap names.
fn usage_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let rendered = e.render().to_string();
    let mut parts = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .map(|l| {
            l.strip_prefix("error: ")
                .unwrap_or(l)
                .replace("Usage: ", "usage: ")
        });
    let mut text = parts.next().unwrap_or_default();
    let mut listing = false;
    for part in parts {
        // A list ("not provided:" and a line per argument) stays one phrase; "[possible values:
        // ...]" follows the sentence it belongs to.
        let item = part.starts_with('<') || part.starts_with('-');
        let sep = if text.ends_with(':') {
            listing = item;
            " "
        } else if listing && item {
            ", "
        } else {
            listing = false;
            if part.starts_with('[') {
                " "
            } else {
                "; "
            }
        };
        text.push_str(sep);
        text.push_str(&part);
    }
    if let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) {
        let flag = arg.split(['=', ' ']).next().unwrap_or_default();
        let typed = std::env::args_os()
            .any(|a| a == flag || a.to_string_lossy().starts_with(&format!("{flag}=")));
        if let Some(var) = env_of(&<Cli as clap::CommandFactory>::command(), flag) {
            if !typed && std::env::var_os(&var).is_some() {
                text.push_str(&format!(" (the value of {var})"));
            }
        }
    }
    format!("{text}; walship --help lists the flags and their variables")
}

/// The environment variable of the flag `--long` of `cmd` or one of its subcommands.
fn env_of(cmd: &clap::Command, flag: &str) -> Option<String> {
    let long = flag.strip_prefix("--")?;
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|v| v.to_string_lossy().into_owned())
        .or_else(|| cmd.get_subcommands().find_map(|c| env_of(c, flag)))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// wal-fetch: from the prefetch spool, else downloaded on a runtime started for it.
fn fetch_wal(
    cfg: &walship::config::Config,
    global: &cli::GlobalArgs,
    name: &str,
    path: &std::path::Path,
    deadline: Option<std::time::Instant>,
) -> Result<(), walship::wal::WalError> {
    if cli::wal::fetch_spooled(cfg, global, name, path, deadline)? {
        return Ok(());
    }
    let rt = runtime();
    let fetched = rt.block_on(cli::wal::fetch(cfg, global, name, path, deadline));
    // Not waiting for what a deadline abandoned: a read on a network mount that stopped
    // answering, a DNS lookup. The segment is placed (or not) by now.
    rt.shutdown_background();
    fetched
}

fn fail(command: &str, err: &dyn std::fmt::Display, code: i32) -> i32 {
    eprintln!("walship {command}: error: {err}");
    code
}

fn run(cli: Cli, lenient: bool) -> i32 {
    // The identity may come from the environment (never argv); read here, passed down explicitly.
    let identity_env = std::env::var("WALSHIP_IDENTITY")
        .ok()
        .filter(|s| !s.trim().is_empty());
    if let Command::Keygen(args) = &cli.command {
        return match cli::keygen::run(args) {
            Ok(public) => {
                eprintln!(
                    "walship: wrote identity to {} (keep it secret; it decrypts the archive)",
                    args.output.display()
                );
                println!("{public}");
                exit::OK
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => fail(
                "keygen",
                &format!(
                    "{} already exists: not overwriting it, since it may be the only key that \
                     decrypts an archive; choose another --output",
                    args.output.display()
                ),
                exit::LOCAL_IO,
            ),
            Err(e) => fail(
                "keygen",
                &format!(
                    "cannot create {}: {e}{}",
                    args.output.display(),
                    walship::io_hint::suffix(&e)
                ),
                exit::LOCAL_IO,
            ),
        };
    }
    // Needs no repository: it only edits the data directory's postgresql.auto.conf.
    if let Command::RecoveryDone { dir } = &cli.command {
        return match walship::restore::recovery_done(dir) {
            Ok(0) => exit::OK,
            Ok(n) => {
                eprintln!(
                    "walship: recovery has ended: disabled {n} recovery setting(s) in {}",
                    dir.join("postgresql.auto.conf").display()
                );
                exit::OK
            }
            Err(e) => fail("recovery-done", &e, exit::for_backup(&e)),
        };
    }
    let cfg = match Config::resolve(cli.global.overrides(identity_env)) {
        Ok(c) => c,
        Err(e) => {
            let code = if matches!(cli.command, Command::WalFetch { .. }) {
                exit::for_wal_fetch(exit::USAGE, lenient)
            } else {
                exit::USAGE
            };
            return fail("config", &e, code);
        }
    };
    if matches!(cli.command, Command::WalPrefetch { .. }) {
        // Prefetching fills idle time: recovery's replay and its wal-fetch calls come first. The
        // lowest priority (19 rather than 10) measured 5 to 10% faster serial wal-fetch calls on a
        // busy 2-core machine: each call waits less for a prefetcher thread to yield.
        // Linux keeps a nice value per thread, so this must happen before the runtime starts its
        // threads, which inherit it.
        if let Err(e) = rustix::process::nice(19) {
            tracing::debug!("cannot lower the prefetcher's priority: {e}");
        }
    }
    match &cli.command {
        Command::Keygen(_) | Command::RecoveryDone { .. } => unreachable!("handled above"),
        Command::Check(args) => {
            let mut lines = runtime().block_on(cli::check::run(&cfg, args));
            let argv: Vec<String> = std::env::args().collect();
            lines.extend(cli::check::unused_pg_flags(args, &argv));
            let mut ok = true;
            for l in &lines {
                println!("{:<12} {:<4} {}", l.what, l.status.label(), l.text);
                ok &= l.status != cli::check::Status::Fail;
            }
            if ok {
                exit::OK
            } else {
                eprintln!("walship check: error: some checks failed; see the FAIL lines above");
                exit::ACCESS
            }
        }
        // The fast paths (work already done) answer without starting a runtime's threads.
        Command::WalPush { path } if cli::wal::pushed_ahead(&cfg, path) => exit::OK,
        Command::WalPush { path } => match runtime().block_on(cli::wal::push(&cfg, path)) {
            Ok(()) => exit::OK,
            Err(e) => fail("wal-push", &e, exit::for_wal_push(&e)),
        },
        Command::WalFetch { name, path } => {
            let deadline = cli::wal::fetch_deadline(&cfg, lenient);
            let fetch = || fetch_wal(&cfg, &cli.global, name, path, deadline);
            let fetched = match cli::wal::fallback_guard(&cfg, name, path, lenient) {
                Some((guard, segment)) => guard.guarded(&segment, fetch),
                None => fetch(),
            };
            match fetched {
                Ok(()) => exit::OK,
                Err(walship::wal::WalError::NotInArchive(what)) => {
                    tracing::info!("{what} is not in the archive");
                    exit::NOT_IN_ARCHIVE
                }
                Err(e) => {
                    let code = exit::for_wal_fetch(exit::for_wal(&e), lenient);
                    let hint = if code >= exit::FATAL_FOR_RECOVERY {
                        " (exiting with a code that stops recovery rather than ending it early; fix the cause and start PostgreSQL again)"
                    } else {
                        ""
                    };
                    fail("wal-fetch", &format!("{name}: {e}{hint}"), code)
                }
            }
        }
        Command::BackupPush(args) => match runtime().block_on(cli::backup::push(&cfg, args)) {
            Ok(m) => {
                println!("{}", m.id);
                exit::OK
            }
            Err(e) => fail("backup-push", &e, exit::for_backup(&e)),
        },
        Command::BackupList { json } => match runtime().block_on(cli::backup::list(&cfg, *json)) {
            Ok(()) => exit::OK,
            Err(e) => fail("backup-list", &e, exit::for_backup(&e)),
        },
        Command::BackupFetch(args) => match runtime().block_on(cli::backup::fetch(&cfg, args)) {
            Ok(m) => {
                eprintln!(
                    "walship: restored backup {} into {}; it needs the archived WAL from {} on to be consistent (or use `walship restore`)",
                    m.id,
                    args.dir.display(),
                    m.start_wal
                );
                exit::OK
            }
            Err(e) => fail("backup-fetch", &e, exit::for_backup(&e)),
        },
        Command::Restore(args) => {
            match runtime().block_on(cli::backup::restore(&cfg, &cli.global, args)) {
                Ok(_) if args.dry_run => exit::OK,
                Ok(m) => {
                    eprintln!(
                        "walship: restored backup {} into {} and wrote the recovery settings to postgresql.auto.conf; start PostgreSQL on it to recover",
                        m.id,
                        args.dir.display()
                    );
                    exit::OK
                }
                Err(e) => fail("restore", &e, exit::for_backup(&e)),
            }
        }
        Command::RestorePoint(args) => {
            match runtime().block_on(cli::backup::restore_point(&cfg, args)) {
                Ok(p) => {
                    println!("{} {}", p.name, p.lsn);
                    exit::OK
                }
                Err(e) => fail("restore-point", &e, exit::for_backup(&e)),
            }
        }
        Command::WalPrefetch {
            spool_state_dir,
            postmaster_pid_file,
        } => {
            match runtime().block_on(cli::wal::prefetch(
                &cfg,
                spool_state_dir,
                postmaster_pid_file,
            )) {
                Ok(()) => exit::OK,
                Err(e) => fail("wal-prefetch", &e, exit::for_wal(&e)),
            }
        }
    }
}
