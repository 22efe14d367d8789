//! `walship check`: can this host use the repository, and do the keys fit it?

use crate::archive::Archive;
use crate::codec;
use crate::config::Config;

/// One line of the report: what, how it stands, and a hint when it is a problem.
pub struct Line {
    pub what: &'static str,
    pub ok: bool,
    pub text: String,
}

pub async fn run(cfg: &Config) -> Vec<Line> {
    let mut out = Vec::new();
    let mut line = |what, ok, text: String| out.push(Line { what, ok, text });
    let archive = match Archive::open(cfg, 2).await {
        Ok(a) => a,
        Err(e) => {
            line("repository", false, format!("{}: {e}", cfg.repo_url));
            return out;
        }
    };
    match archive.store().probe().await {
        Ok(info) => {
            line(
                "repository",
                true,
                format!("{} is reachable and readable", archive.store().describe()),
            );
            match info.versioning {
                Some(true) => line("versioning", true, "enabled".into()),
                Some(false) => line(
                    "versioning",
                    false,
                    "OFF: turn bucket versioning on, so that an overwritten or deleted object can be recovered".into(),
                ),
                None => line("versioning", true, "not applicable (directory repository)".into()),
            }
            if let Some(lock) = info.object_lock {
                line(
                    "object lock",
                    true,
                    if lock { "enabled" } else { "off (optional)" }.into(),
                );
            }
        }
        Err(e) => {
            line("repository", false, e.to_string());
            return out;
        }
    }
    let meta = match archive.read_meta().await {
        Ok(Some(m)) => {
            line(
                "metadata",
                true,
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
                true,
                "none yet: the first wal-push initialises the repository".into(),
            );
            None
        }
        Err(e) => {
            line("metadata", false, e.to_string());
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
                        false,
                        format!(
                        "fingerprints {} differ from the repository's {}: pushes would be refused",
                        fps.join(","),
                        m.recipient_fingerprints.join(",")
                    ),
                    )
                }
                _ => line(
                    "recipients",
                    true,
                    format!("{} key(s), fingerprints {}", fps.len(), fps.join(",")),
                ),
            }
        }
        Err(e) => line("recipients", false, format!("{e} (needed for wal-push)")),
    }
    if cfg.identity_file.is_some() || cfg.identity_env.is_some() {
        match cfg.identities() {
            Ok(ids) => {
                let mine = ids.recipients().fingerprints();
                let expected = meta
                    .as_ref()
                    .map(|m| m.recipient_fingerprints.clone())
                    .or_else(|| cfg.recipients().ok().map(|r| r.fingerprints()));
                let fits = expected
                    .as_ref()
                    .is_none_or(|exp| exp.is_empty() || mine.iter().any(|f| exp.contains(f)));
                let round_trip = cfg
                    .recipients()
                    .ok()
                    .and_then(|r| codec::encode(&b"walship check"[..], &r, 1).ok())
                    .map(|enc| codec::decode(&enc.bytes, &ids, Vec::new()).is_ok());
                if !fits || round_trip == Some(false) {
                    line("identity", false, "does not match the repository's recipients: wal-fetch could not decrypt the archive".into());
                } else {
                    line(
                        "identity",
                        true,
                        format!("matches recipient {}", mine.join(",")),
                    );
                }
            }
            Err(e) => line("identity", false, e.to_string()),
        }
    } else {
        line(
            "identity",
            true,
            "not configured (needed only where WAL is fetched)".into(),
        );
    }
    out
}
