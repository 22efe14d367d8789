//! Connecting to PostgreSQL the way libpq users expect: explicit settings first, then the standard
//! `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD` and `PGPASSFILE` (or `~/.pgpass`)
//! environment, then libpq's defaults (the local socket directory, port 5432, the OS user's name).

use std::path::{Path, PathBuf};

use tokio_postgres::{Client, NoTls};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to PostgreSQL at {target}: {}; check --pg-host/--pg-port/--pg-user (or PGHOST, PGPORT, PGUSER), the password (PGPASSWORD or ~/.pgpass), pg_hba.conf, and that the server is running", describe(.source))]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: {what}: {}", describe(.source))]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL: {0}")]
    Unexpected(String),
}

impl PgError {
    pub fn query(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| PgError::Query { what, source }
    }
}

/// What the server or the connection said, on one line. tokio-postgres's own `Display` names
/// only the kind ("db error", "error connecting to server"); the server's message, SQLSTATE,
/// detail and hint, or the I/O error under a failed connection, are what say what to fix.
fn describe(err: &tokio_postgres::Error) -> String {
    let text = match err.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(&format!("; DETAIL: {detail}"));
            }
            if let Some(hint) = db.hint() {
                s.push_str(&format!("; HINT: {hint}"));
            }
            s
        }
        None => {
            let mut s = err.to_string();
            let mut cause = std::error::Error::source(err);
            while let Some(c) = cause {
                s.push_str(&format!(": {c}"));
                cause = c.source();
            }
            s
        }
    };
    crate::text::one_line(&text)
}

/// Where to connect; `None` fields fall back to the environment and libpq's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgSettings {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The settings after the environment and defaults are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
}

impl PgSettings {
    pub fn resolve(&self) -> Resolved {
        let host = self
            .host
            .clone()
            .or_else(|| env("PGHOST"))
            .unwrap_or_else(|| {
                ["/var/run/postgresql", "/tmp"]
                    .into_iter()
                    .find(|d| Path::new(d).is_dir())
                    .unwrap_or("localhost")
                    .to_string()
            });
        let port = self
            .port
            .or_else(|| env("PGPORT").and_then(|p| p.parse().ok()))
            .unwrap_or(5432);
        let user = self
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "postgres".into());
        let dbname = self
            .dbname
            .clone()
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        Resolved {
            host,
            port,
            user,
            dbname,
        }
    }
}

/// The password for `r` from `PGPASSWORD` or the password file, if any.
fn password(r: &Resolved) -> Option<String> {
    if let Some(p) = env("PGPASSWORD") {
        return Some(p);
    }
    let file = env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(file).ok()?;
    let host = if r.host.starts_with('/') {
        "localhost"
    } else {
        &r.host
    };
    pgpass_lookup(&text, host, &r.port.to_string(), &r.dbname, &r.user)
}

/// Split a `.pgpass` line on unescaped `:` and drop the escapes.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

/// libpq's `.pgpass` rule: the first line whose host, port, database and user match (or are `*`).
pub fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(pgpass_fields)
        .find(|f| {
            f.len() == 5
                && [host, port, db, user]
                    .iter()
                    .zip(f.iter())
                    .all(|(want, have)| have == "*" || have == want)
        })
        .map(|f| f[4].clone())
}

/// Connect and drive the connection on the runtime. The connection ends when the client drops.
pub async fn connect(settings: &PgSettings) -> Result<Client, PgError> {
    let r = settings.resolve();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&r.host)
        .port(r.port)
        .user(&r.user)
        .dbname(&r.dbname)
        .application_name("walship");
    if let Some(p) = password(&r) {
        cfg.password(p);
    }
    let target = format!(
        "{}:{} as {} (database {})",
        r.host, r.port, r.user, r.dbname
    );
    let (client, connection) = cfg
        .connect(NoTls)
        .await
        .map_err(|source| PgError::Connect { target, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// Turn off the server's timeouts for this session. A base backup's session holds
/// `pg_backup_start` open, idle, for the whole upload; `idle_session_timeout` (or another
/// timeout set for the role or database) ending it would abort the backup hours in.
pub async fn without_timeouts(pg: &Client) -> Result<(), PgError> {
    pg.batch_execute(
        "SET statement_timeout = 0; SET idle_session_timeout = 0; \
         SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0",
    )
    .await
    .map_err(PgError::query(
        "turning off this session's statement, idle and lock timeouts",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_matches_like_libpq() {
        let text = "# comment\n\
                    db1:5432:*:alice:secret1\n\
                    *:*:app:*:sec\\:ret2\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "db1", "5432", "x", "alice").as_deref(),
            Some("secret1")
        );
        assert_eq!(
            pgpass_lookup(text, "db2", "5433", "app", "bob").as_deref(),
            Some("sec:ret2")
        );
        assert_eq!(
            pgpass_lookup(text, "db1", "5433", "x", "alice").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("h:1:d:u:p\n", "h", "2", "d", "u"), None);
    }

    #[test]
    fn explicit_settings_win_over_defaults() {
        let s = PgSettings {
            host: Some("/sock".into()),
            port: Some(6543),
            user: Some("walship".into()),
            dbname: None,
        };
        let r = s.resolve();
        assert_eq!((r.host.as_str(), r.port), ("/sock", 6543));
        assert_eq!(r.user, "walship");
        if std::env::var("PGDATABASE").is_err() {
            assert_eq!(
                r.dbname, "walship",
                "libpq: the database defaults to the user"
            );
        }
    }
}
