//! `restore`: choose the backup that can reach a recovery target, and write the recovery settings
//! (`restore_command`, the target, `recovery.signal` or `standby.signal`) for the user.

pub mod timeline;

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::backup::owner::Chown;
use crate::backup::BackupError;
use crate::repo::backup::{BackupSummary, RestorePoint};
use crate::wal::name::{format_lsn, parse_lsn};

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Replay everything the archive has.
    EndOfArchive,
    /// As given (PostgreSQL parses it), and the same instant in seconds since the epoch.
    Time {
        text: String,
        epoch: f64,
    },
    /// A restore point; `point` when `walship restore-point` recorded it.
    Name {
        name: String,
        point: Option<RestorePoint>,
    },
    Xid(u64),
    Lsn(u64),
    Immediate,
}

#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    pub target: Target,
    /// promote | pause | shutdown
    pub action: Option<String>,
    pub inclusive: Option<bool>,
    pub timeline: Option<String>,
    pub standby: bool,
    /// Write `archive_mode = off`: for restore drills and copies, whose new timelines must not be
    /// archived into the production repository.
    pub archive_off: bool,
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A parsed `--target-time`: the instant, and the text for `recovery_target_time`.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTime {
    /// Seconds since the epoch.
    pub epoch: f64,
    /// What PostgreSQL gets: the time as given, except that a zone name is replaced by the
    /// offset it had then, so walship's choice of backup and PostgreSQL's stop use the same
    /// instant whatever time zone data the server has.
    pub text: String,
}

/// Parse `YYYY-MM-DD HH:MM:SS[.frac]` followed by `Z`, `UTC`, an offset (`+01`, `-05:30`,
/// `+0100`) or an IANA zone name (`Europe/Berlin`, from this host's time zone database). A time
/// without a zone is refused: PostgreSQL would read it in the server's TimeZone, which may not be
/// what the person meant; so is a local time that a clock change skipped or repeated, and an
/// abbreviation such as `CET` (tzdata and PostgreSQL read some of them differently).
pub fn parse_target_time(s: &str) -> Result<TargetTime, String> {
    let bad = || {
        format!(
            "'{s}' is not a time walship understands; use 'YYYY-MM-DD HH:MM:SS' with a zone, \
             e.g. '2026-11-24 12:44:59+00', '2026-11-24T12:44:59Z' or '2026-11-24 13:44:59 Europe/Berlin'"
        )
    };
    let t = s.trim();
    if t.len() < 19 || !t.is_char_boundary(10) {
        return Err(bad());
    }
    let (date, rest) = t.split_at(10);
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || !rest.starts_with([' ', 'T']) {
        return Err(bad());
    }
    let rest = &rest[1..];
    let time_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == ':' || c == '.'))
        .unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(time_end);
    let hms: Vec<&str> = clock.split(':').collect();
    if hms.len() != 3 {
        return Err(bad());
    }
    let h: i64 = hms[0].parse().map_err(|_| bad())?;
    let mi: i64 = hms[1].parse().map_err(|_| bad())?;
    let sec: f64 = hms[2].parse().map_err(|_| bad())?;
    if !(1..=12).contains(&d[1])
        || !(1..=days_in_month(d[0], d[1])).contains(&d[2])
        || h > 23
        || mi > 59
        || sec >= 61.0
    {
        return Err(bad());
    }
    let zone = zone.trim();
    let mut text = t.to_string();
    let offset = match zone {
        "" => {
            return Err(format!(
                "'{s}' has no time zone; add one (e.g. '+00', 'Z' or 'Europe/Berlin'), so the \
                 target cannot be read in the wrong zone"
            ))
        }
        "Z" | "UTC" | "z" | "GMT" => 0,
        z if z.starts_with(['+', '-']) => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
            let (hh, mm) = match digits.len() {
                2 => (&digits[..2], "0"),
                4 => (&digits[..2], &digits[2..]),
                _ => return Err(bad()),
            };
            let hh: i64 = hh.parse().map_err(|_| bad())?;
            let mm: i64 = mm.parse().map_err(|_| bad())?;
            // PostgreSQL's limit, which it would apply only once the server starts.
            if hh > 15 || mm > 59 {
                return Err(format!(
                    "'{s}': the offset '{z}' is out of range; PostgreSQL takes offsets from \
                     -15:59 to +15:59"
                ));
            }
            sign * (hh * 3600 + mm * 60)
        }
        // tzdata's CET, EET, MET and WET change with daylight saving time, where PostgreSQL and
        // most people read an abbreviation as one fixed offset: in July, CET would be an hour off.
        name if !name.contains('/') => {
            return Err(format!(
                "'{s}': '{name}' is an abbreviation, which can mean more than one offset; give \
                 the offset (e.g. '+01:00') or a zone name such as 'Europe/Berlin'"
            ))
        }
        name => {
            let offset = zone_offset(s, name, (date, clock), (d[0], d[1], d[2]), (h, mi, sec))?;
            text = format!("{date} {clock}{}", format_offset(offset));
            offset
        }
    };
    let days = days_from_civil(d[0], d[1], d[2]);
    Ok(TargetTime {
        epoch: (days * 86_400 + h * 3600 + mi * 60 - offset) as f64 + sec,
        text,
    })
}

/// The UTC offset, in seconds, that the civil time had in the IANA zone `name`.
fn zone_offset(
    s: &str,
    name: &str,
    (date, clock): (&str, &str),
    (y, mo, d): (i64, i64, i64),
    (h, mi, sec): (i64, i64, f64),
) -> Result<i64, String> {
    use jiff::tz::{AmbiguousOffset, TimeZone};
    let tz = TimeZone::get(name).map_err(|_| {
        format!(
            "'{s}': '{name}' is not a time zone this host knows; use an IANA name such as \
             Europe/Berlin (install tzdata if there are none) or an offset such as +01"
        )
    })?;
    let civil = jiff::civil::DateTime::new(
        i16::try_from(y).map_err(|_| format!("'{s}': year out of range"))?,
        mo as i8,
        d as i8,
        h as i8,
        mi as i8,
        sec.min(59.0) as i8,
        0,
    )
    .map_err(|e| format!("'{s}' is not a valid time: {e}"))?;
    let at =
        |o: jiff::tz::Offset| format!("'{date} {clock}{}'", format_offset(i64::from(o.seconds())));
    match tz.to_ambiguous_timestamp(civil).offset() {
        AmbiguousOffset::Unambiguous { offset } => Ok(i64::from(offset.seconds())),
        AmbiguousOffset::Gap { before, after } => Err(format!(
            "'{s}' never happened: the clocks in {name} skipped it; give the time with an offset, {} or {}",
            at(before),
            at(after)
        )),
        AmbiguousOffset::Fold { before, after } => Err(format!(
            "'{s}' happened twice: the clocks in {name} went back; say which with its offset, {} \
             (the first) or {} (the second)",
            at(before),
            at(after)
        )),
    }
}

/// Days in `month` (1 to 12) of `year`, Gregorian: PostgreSQL refuses 2026-02-30, which would
/// otherwise only show once a restore has downloaded everything and PostgreSQL starts.
fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `+01:00`, `-05:30`, `+00:00`.
fn format_offset(seconds: i64) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let m = seconds.abs() / 60;
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

/// The newest backup that can reach `target`: one that ended (became consistent) before it.
pub fn choose_backup<'a>(
    backups: &'a [BackupSummary],
    target: &Target,
) -> Result<&'a BackupSummary, BackupError> {
    let newest = backups.last().ok_or_else(|| {
        BackupError::NoBackupForTarget(
            "the repository has no backups; take one with `walship backup-push`".into(),
        )
    })?;
    let before = |ok: &dyn Fn(&BackupSummary) -> bool, what: String| {
        backups.iter().rev().find(|b| ok(b)).ok_or_else(|| {
            let oldest = &backups[0];
            BackupError::NoBackupForTarget(format!(
                "no backup can reach {what}: the oldest backup, {}, becomes consistent only at \
                 {} (LSN {}); PostgreSQL cannot recover to a point before that",
                oldest.id, oldest.stop_time, oldest.stop_lsn
            ))
        })
    };
    let ok = |b: &BackupSummary| reaches(&b.stop_lsn, b.stop_epoch, target) == Some(true);
    if let Target::Xid(xid) = target {
        // A backup whose recorded next xid is at or before the target's ends before the target
        // commits; one without the record (an older walship) might.
        return before(
            &|b| b.next_xid.is_none_or(|next| xid_at_or_after(*xid, next)),
            format!("xid {xid}"),
        );
    }
    match target {
        Target::Time { text, .. } => before(&ok, format!("time {text}")),
        Target::Lsn(lsn) => before(&ok, format!("LSN {}", format_lsn(*lsn))),
        Target::Name {
            name,
            point: Some(p),
        } => before(&ok, format!("restore point '{name}' (LSN {})", p.lsn)),
        _ => Ok(newest),
    }
}

/// Whether transaction `xid` was assigned at or after `next` (a 64-bit xid with its epoch).
/// A 64-bit `xid` compares as is; a 32-bit one (what most views show) the way PostgreSQL
/// compares xids, in the window of 2^31 around `next`.
pub fn xid_at_or_after(xid: u64, next: u64) -> bool {
    if xid > u64::from(u32::MAX) {
        return xid >= next;
    }
    (xid as u32).wrapping_sub(next as u32) as i32 >= 0
}

/// Whether a backup that becomes consistent at `stop_lsn` (`stop_epoch` by the server's clock)
/// can reach `target`: it must end before it. `None` for targets only replay can place (an xid,
/// a name walship has no record of, the end of the archive, immediate).
pub fn reaches(stop_lsn: &str, stop_epoch: f64, target: &Target) -> Option<bool> {
    let stop = parse_lsn(stop_lsn);
    match target {
        Target::Time { epoch, .. } => Some(stop_epoch < *epoch),
        Target::Lsn(lsn) => Some(stop.is_some_and(|s| s <= *lsn)),
        Target::Name { point: Some(p), .. } => {
            Some(stop.zip(parse_lsn(&p.lsn)).is_some_and(|(s, at)| s <= at))
        }
        _ => None,
    }
}

/// Quote for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A `restore_command` argument: shell-quoted, and `%` doubled, since PostgreSQL replaces `%f`,
/// `%p`, `%r` and `%%` anywhere in the command (a key file named `100%free.key` would break it).
pub fn command_arg(s: &str) -> String {
    shell_quote(s).replace('%', "%%")
}

/// Quote for postgresql.conf: PostgreSQL's lexer allows no line break inside a quoted value,
/// and reads `\n` and `\r` back as them (a restore point's name may hold one).
fn conf_quote(s: &str) -> String {
    let escaped = s
        .replace('\\', r"\\")
        .replace('\'', "''")
        .replace('\n', r"\n")
        .replace('\r', r"\r");
    format!("'{escaped}'")
}

/// The lines walship adds to postgresql.auto.conf.
pub fn recovery_settings(
    opts: &RecoveryOptions,
    restore_command: &str,
    recovery_end_command: &str,
    backup: &str,
) -> String {
    let mut s = format!(
        "\n# Added by walship restore of backup {backup}. When recovery ends, recovery_end_command \
         (`walship recovery-done`) blanks the target and sets the timeline to 'latest'.\n"
    );
    let mut set = |k: &str, v: String| s.push_str(&format!("{k} = {}\n", conf_quote(&v)));
    set("restore_command", restore_command.to_string());
    // Left in place, the target would travel on into every standby cloned from the restored
    // cluster (pg_basebackup copies postgresql.auto.conf), and into this one when a failover tool
    // rewinds it into a standby: in standby mode PostgreSQL stops at the target too, and with
    // 'promote' the standby would promote itself at its first commit past the target.
    set("recovery_end_command", recovery_end_command.to_string());
    if opts.archive_off {
        set("archive_mode", "off".into());
    }
    // Every target kind is written, the ones not asked for empty: postgresql.auto.conf is read
    // after postgresql.conf, so a target set there (the backup's, or one left from a restore of
    // the cluster it was taken on) can neither add a second kind ("multiple recovery targets
    // specified") nor stand in for the one asked for.
    let (kind, value) = match &opts.target {
        Target::EndOfArchive => ("", String::new()),
        Target::Time { text, .. } => ("recovery_target_time", text.clone()),
        Target::Name { name, .. } => ("recovery_target_name", name.clone()),
        Target::Xid(x) => ("recovery_target_xid", x.to_string()),
        Target::Lsn(l) => ("recovery_target_lsn", format_lsn(*l)),
        Target::Immediate => ("recovery_target", "immediate".into()),
    };
    // The empty ones first: PostgreSQL's assign hooks refuse any target kind, even an empty one,
    // once another kind is set.
    for key in TARGET_KEYS.iter().filter(|k| **k != kind) {
        set(key, String::new());
    }
    if !kind.is_empty() {
        set(kind, value);
    }
    if opts.target != Target::EndOfArchive {
        // PostgreSQL's defaults, written so that postgresql.conf's cannot apply.
        let action = opts.action.clone().unwrap_or_else(|| "pause".into());
        set("recovery_target_action", action);
        set(
            "recovery_target_inclusive",
            opts.inclusive.unwrap_or(true).to_string(),
        );
    }
    // A backup of a delayed standby carries its delay, which PostgreSQL applies in archive
    // recovery too: a restore to 12:44:59 would wait hours before replaying each commit.
    set("recovery_min_apply_delay", "0".into());
    // And its replication slot, which is the standby's: a restored copy streaming with it would
    // take the slot from that standby.
    set("primary_slot_name", String::new());
    // And its archive_cleanup_command, which pruned that standby's own WAL archive (typically
    // `pg_archivecleanup <dir> %r`): this recovery reads from walship, and a restored copy run at
    // every restartpoint would delete from a directory that other servers may still need.
    set("archive_cleanup_command", String::new());
    // With a target, follow the backup's own timeline unless told otherwise. PostgreSQL's default,
    // 'latest', would follow any timeline forked later, such as one a restore drill promoted into
    // the same repository, and could stop on that branch's data instead of the one the target
    // meant. Without a target (replay everything), 'latest' is what people expect. Written
    // either way, so that a value in the backup's postgresql.conf cannot decide.
    let timeline = match (&opts.timeline, &opts.target) {
        (Some(t), _) => t.clone(),
        (None, Target::EndOfArchive) => "latest".into(),
        (None, _) => "current".into(),
    };
    set("recovery_target_timeline", timeline);
    s
}

/// The recovery target kinds; PostgreSQL refuses to start with more than one set.
const TARGET_KEYS: [&str; 5] = [
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
];

/// Settings a restore writes; any of them already in postgresql.auto.conf (from an earlier
/// restore of the cluster the backup was taken on) are disabled first.
const RECOVERY_KEYS: [&str; 13] = [
    "restore_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_min_apply_delay",
    "primary_slot_name",
    "archive_cleanup_command",
];

/// postgresql.auto.conf's `text` with the recovery settings it holds commented out. An earlier
/// restore's lines travel on in every backup of the restored cluster: left in place, a second
/// target kind makes PostgreSQL refuse to start ("multiple recovery targets specified"), and an
/// old `recovery_target_action` or target applies where the new restore sets none.
pub fn disable_recovery_settings(text: &str) -> (String, usize) {
    disable_settings(text, "restore", |key, _| {
        RECOVERY_KEYS.contains(&key).then(String::new)
    })
}

/// postgresql.auto.conf's `text` with the settings `disable(key, value)` picks commented out,
/// with a note naming `by`, each followed by the line `disable` gives (if not empty); and how
/// many.
fn disable_settings(
    text: &str,
    by: &str,
    disable: impl Fn(&str, &str) -> Option<String>,
) -> (String, usize) {
    let mut disabled = 0;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        // `key = value`, or `key value`: the `=` is optional.
        let body = line.trim_start();
        let end = body
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(body.len());
        let key = body[..end].to_ascii_lowercase();
        let value = body[end..].trim_start().trim_start_matches('=').trim();
        let Some(instead) = disable(&key, value) else {
            out.push_str(line);
            continue;
        };
        out.push_str(&format!("# disabled by walship {by}: {line}"));
        if !line.ends_with('\n') {
            out.push('\n');
        }
        if !instead.is_empty() {
            out.push_str(&instead);
            out.push('\n');
        }
        disabled += 1;
    }
    (out, disabled)
}

/// postgresql.auto.conf's `text` once recovery has ended: the target the restore set is blanked
/// (not removed: the blank overrides any target in postgresql.conf, the backup's), the timeline
/// set back to PostgreSQL's default, 'latest', and recovery_end_command removed (one in
/// postgresql.conf applies again). The rest stays: restore_command, archive_mode, and what
/// overrides postgresql.conf's delay, slot and archive_cleanup_command.
pub fn disable_after_recovery(text: &str) -> (String, usize) {
    disable_settings(text, "recovery-done", |key, value| match key {
        k if TARGET_KEYS.contains(&k) && value != "''" => Some(format!("{k} = ''")),
        "recovery_target_timeline" if value != "'latest'" => {
            Some("recovery_target_timeline = 'latest'".into())
        }
        "recovery_end_command" => Some(String::new()),
        _ => None,
    })
}

/// Write the settings into postgresql.auto.conf (disabling earlier recovery settings there) and
/// create recovery.signal or standby.signal.
pub fn write_recovery(dir: &Path, settings: &str, standby: bool) -> Result<(), BackupError> {
    let conf = dir.join("postgresql.auto.conf");
    let old = match fs::read_to_string(&conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(BackupError::local("cannot read", &conf, e)),
    };
    let (mut text, disabled) = disable_recovery_settings(&old);
    if disabled > 0 {
        tracing::info!(
            "disabled {disabled} recovery setting(s) in {} left by an earlier restore",
            conf.display()
        );
    }
    text.push_str(settings);
    let chown = replace_auto_conf(dir, &text)?;
    let (wanted, other) = if standby {
        ("standby.signal", "recovery.signal")
    } else {
        ("recovery.signal", "standby.signal")
    };
    // A backup taken on a standby carries its standby.signal; left in place it would win over
    // recovery.signal and the restored cluster would wait for WAL forever instead of promoting.
    let other = dir.join(other);
    match fs::remove_file(&other) {
        Ok(()) => tracing::info!("removed {} (from the backup)", other.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(BackupError::local("cannot remove", &other, e)),
    }
    let signal = dir.join(wanted);
    fs::write(&signal, b"").map_err(|e| BackupError::local("cannot write", &signal, e))?;
    chown.apply(&signal)?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| BackupError::local("cannot fsync", dir, e))
}

/// Replace `dir`'s postgresql.auto.conf with `text`, atomically, owned like `dir` (when run as
/// root, by whoever the restore gave the directory to).
fn replace_auto_conf(dir: &Path, text: &str) -> Result<Chown, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let conf = dir.join("postgresql.auto.conf");
    let tmp = dir.join("postgresql.auto.conf.walship-tmp");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| BackupError::local("cannot write", &tmp, e))?;
    fs::rename(&tmp, &conf).map_err(|e| BackupError::local("cannot rename", &tmp, e))?;
    let chown = Chown::like(dir);
    chown.apply(&conf)?;
    Ok(chown)
}

/// `walship recovery-done`: once recovery of the restored cluster in `dir` has ended, disable
/// the target the restore wrote for it (see [`disable_after_recovery`]). PostgreSQL runs
/// it as recovery_end_command, after it removed the signal file; with a signal file still there
/// recovery has not ended, and the settings are still needed. Returns how many were disabled.
pub fn recovery_done(dir: &Path) -> Result<usize, BackupError> {
    for signal in ["recovery.signal", "standby.signal"] {
        if dir.join(signal).exists() {
            return Err(BackupError::Invalid(format!(
                "recovery has not ended in {}: {signal} is there, and PostgreSQL still needs the \
                 recovery settings; PostgreSQL runs walship recovery-done itself once recovery \
                 ends",
                dir.display()
            )));
        }
    }
    let conf = dir.join("postgresql.auto.conf");
    let old = fs::read_to_string(&conf).map_err(|e| BackupError::local("cannot read", &conf, e))?;
    let (text, disabled) = disable_after_recovery(&old);
    if disabled > 0 {
        replace_auto_conf(dir, &text)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BackupError::local("cannot fsync", dir, e))?;
    }
    Ok(disabled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earlier_recovery_settings_are_disabled_and_the_rest_kept() {
        let old = "# Do not edit this file manually!\nshared_buffers = '1GB'\n\n\
                   # Added by walship restore of backup 20261124T120000Z\n\
                   restore_command = 'walship wal-fetch %f %p'\n\
                   recovery_target_time = '2026-11-24 12:44:59+00'\n\
                   Recovery_Target_Action='promote'\n  recovery_target_timeline = 'current'\n\
                   primary_conninfo = 'host=db1'\nrecovery_target_xid_x = 1";
        let (text, n) = disable_recovery_settings(old);
        assert_eq!(n, 4);
        assert_eq!(
            text,
            "# Do not edit this file manually!\nshared_buffers = '1GB'\n\n\
             # Added by walship restore of backup 20261124T120000Z\n\
             # disabled by walship restore: restore_command = 'walship wal-fetch %f %p'\n\
             # disabled by walship restore: recovery_target_time = '2026-11-24 12:44:59+00'\n\
             # disabled by walship restore: Recovery_Target_Action='promote'\n\
             # disabled by walship restore:   recovery_target_timeline = 'current'\n\
             primary_conninfo = 'host=db1'\nrecovery_target_xid_x = 1"
        );
        assert_eq!(disable_recovery_settings("").0, "");
    }

    #[test]
    fn target_times_need_a_zone_and_mean_one_instant() {
        let epoch = |t: &str| parse_target_time(t).unwrap().epoch;
        let utc = epoch("2026-11-24 12:44:59+00");
        assert_eq!(utc, 1_795_524_299.0);
        assert_eq!(epoch("2026-11-24T12:44:59Z"), utc);
        assert_eq!(epoch("2026-11-24 13:44:59+01"), utc);
        assert_eq!(epoch("2026-11-24 07:14:59-05:30"), utc);
        assert_eq!(epoch("2026-11-24 12:44:59.25 UTC"), utc + 0.25);
        // Offsets go to PostgreSQL as given.
        let t = parse_target_time("2026-11-24 13:44:59+01").unwrap();
        assert_eq!(t.text, "2026-11-24 13:44:59+01");
        assert!(parse_target_time("2026-11-24 12:44:59")
            .unwrap_err()
            .contains("no time zone"));
        assert!(parse_target_time("yesterday").is_err());
        assert!(parse_target_time("2026-13-24 12:44:59Z").is_err());
        assert!(parse_target_time("2026-02-30 12:00:00Z").is_err());
        assert!(parse_target_time("2026-04-31 12:00:00Z").is_err());
        assert!(
            parse_target_time("2028-02-29 12:00:00Z").is_ok(),
            "a leap day"
        );
        assert!(parse_target_time("2100-02-29 12:00:00Z").is_err());
        assert_eq!(epoch("2026-11-24 12:44:59+15:59"), utc - 57540.0);
        for z in ["+16", "-16:00", "+01:60", "+0175"] {
            let err = parse_target_time(&format!("2026-11-24 12:44:59{z}")).unwrap_err();
            assert!(err.contains("out of range"), "{z}: {err}");
        }
        assert_eq!(epoch("1970-01-01 00:00:00Z"), 0.0);
    }

    #[test]
    fn zone_names_become_the_offset_they_had_then() {
        // Winter (CET, +01) and summer (CEST, +02) in Berlin; PostgreSQL gets the offset.
        let winter = parse_target_time("2026-11-24 13:44:59 Europe/Berlin").unwrap();
        assert_eq!(winter.epoch, 1_795_524_299.0);
        assert_eq!(winter.text, "2026-11-24 13:44:59+01:00");
        let summer = parse_target_time("2026-07-01 14:00:00.5 Europe/Berlin").unwrap();
        assert_eq!(
            summer.epoch,
            parse_target_time("2026-07-01 12:00:00.5Z").unwrap().epoch
        );
        assert_eq!(summer.text, "2026-07-01 14:00:00.5+02:00");
        let kolkata = parse_target_time("2026-11-24T18:14:59 Asia/Kolkata").unwrap();
        assert_eq!(kolkata.epoch, 1_795_524_299.0);
        assert_eq!(kolkata.text, "2026-11-24 18:14:59+05:30");
        // 2026-10-25 02:30 happened twice in Berlin, 2026-03-29 02:30 not at all.
        let twice = parse_target_time("2026-10-25 02:30:00 Europe/Berlin").unwrap_err();
        assert!(
            twice.contains("happened twice")
                && twice.contains("'2026-10-25 02:30:00+02:00' (the first)")
                && twice.contains("'2026-10-25 02:30:00+01:00' (the second)"),
            "{twice}"
        );
        let never = parse_target_time("2026-03-29 02:30:00 Europe/Berlin").unwrap_err();
        assert!(never.contains("never happened"), "{never}");
        // An abbreviation is refused: tzdata's CET is +02 in July, PostgreSQL's +01.
        let cet = parse_target_time("2026-07-01 14:00:00 CET").unwrap_err();
        assert!(
            cet.contains("abbreviation") && cet.contains("Europe/Berlin"),
            "{cet}"
        );
        assert_eq!(
            parse_target_time("2026-07-01 14:00:00 GMT").unwrap().epoch,
            parse_target_time("2026-07-01 14:00:00Z").unwrap().epoch
        );
        let unknown = parse_target_time("2026-11-24 12:44:59 Mars/Olympus").unwrap_err();
        assert!(
            unknown.contains("not a time zone this host knows"),
            "{unknown}"
        );
    }

    #[test]
    fn targets_follow_the_backups_timeline_unless_told() {
        let opts = |target, timeline: Option<&str>| RecoveryOptions {
            target,
            action: Some("promote".into()),
            inclusive: None,
            timeline: timeline.map(str::to_string),
            standby: false,
            archive_off: false,
        };
        let s = recovery_settings(&opts(Target::Xid(42), None), "walship wal-fetch", "w", "b");
        assert!(s.contains("recovery_target_xid = '42'"), "{s}");
        assert!(s.contains("recovery_target_timeline = 'current'"), "{s}");
        assert!(s.contains("recovery_target_action = 'promote'"), "{s}");
        // The other kinds are written empty, so postgresql.conf's cannot add a second one; before
        // the one set, which PostgreSQL requires.
        let at = |k: &str| s.find(&format!("\n{k} = ")).unwrap();
        assert!(
            at("recovery_target_time") < at("recovery_target_xid"),
            "{s}"
        );
        assert!(at("recovery_target") < at("recovery_target_xid"), "{s}");
        assert!(s.contains("recovery_target_time = ''"), "{s}");
        assert!(s.contains("recovery_min_apply_delay = '0'"), "{s}");
        assert!(s.contains("\narchive_cleanup_command = ''\n"), "{s}");
        let s = recovery_settings(&opts(Target::EndOfArchive, None), "x", "w", "b");
        for key in TARGET_KEYS {
            assert!(s.contains(&format!("\n{key} = ''\n")), "{key}: {s}");
        }
        assert!(!s.contains("recovery_target_action"), "{s}");
        assert!(s.contains("\nrecovery_target_timeline = 'latest'\n"), "{s}");
        let s = recovery_settings(
            &opts(Target::Lsn(0x1_0000_0060), Some("latest")),
            "x",
            "w",
            "b",
        );
        assert!(s.contains("recovery_target_lsn = '1/60'"), "{s}");
        assert!(s.contains("recovery_target_timeline = 'latest'"), "{s}");
    }

    #[test]
    fn once_recovery_has_ended_the_target_is_blanked_and_the_timeline_latest() {
        let opts = RecoveryOptions {
            target: Target::Xid(42),
            action: Some("promote".into()),
            inclusive: Some(false),
            timeline: None,
            standby: false,
            archive_off: true,
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("postgresql.auto.conf");
        fs::write(&conf, "recovery_target_name 'old'\n").unwrap();
        let settings = recovery_settings(
            &opts,
            "walship wal-fetch %f %p",
            "walship recovery-done",
            "b",
        );
        write_recovery(dir.path(), &settings, false).unwrap();
        // Set during recovery (ALTER SYSTEM on a hot standby): someone's own.
        let mut f = fs::OpenOptions::new().append(true).open(&conf).unwrap();
        f.write_all(b"primary_slot_name = 'mine'\nrecovery_min_apply_delay = '1h'\n")
            .unwrap();
        let written = fs::read_to_string(&conf).unwrap();
        let err = recovery_done(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("recovery.signal is there"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(&conf).unwrap(), written, "untouched");

        // PostgreSQL removes the signal file before it runs recovery_end_command.
        fs::remove_file(dir.path().join("recovery.signal")).unwrap();
        assert_eq!(recovery_done(dir.path()).unwrap(), 3);
        let text = fs::read_to_string(&conf).unwrap();
        let active: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        // The blanks stay: they override a target in postgresql.conf (the backup's).
        assert_eq!(
            active,
            [
                "restore_command = 'walship wal-fetch %f %p'",
                "archive_mode = 'off'",
                "recovery_target = ''",
                "recovery_target_name = ''",
                "recovery_target_time = ''",
                "recovery_target_lsn = ''",
                "recovery_target_xid = ''",
                "recovery_target_action = 'promote'",
                "recovery_target_inclusive = 'false'",
                "recovery_min_apply_delay = '0'",
                "primary_slot_name = ''",
                "archive_cleanup_command = ''",
                "recovery_target_timeline = 'latest'",
                "primary_slot_name = 'mine'",
                "recovery_min_apply_delay = '1h'",
            ]
        );
        assert!(
            text.contains(
                "\n# disabled by walship recovery-done: recovery_target_xid = '42'\n\
                 recovery_target_xid = ''\n"
            ),
            "{text}"
        );
        assert_eq!(recovery_done(dir.path()).unwrap(), 0, "nothing more to do");
    }

    #[test]
    fn the_signal_asked_for_replaces_the_one_from_a_standby_backup() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("standby.signal"), b"").unwrap();
        write_recovery(dir.path(), "restore_command = 'x'\n", false).unwrap();
        assert!(dir.path().join("recovery.signal").exists());
        assert!(!dir.path().join("standby.signal").exists());
        write_recovery(dir.path(), "", true).unwrap();
        assert!(dir.path().join("standby.signal").exists());
        assert!(!dir.path().join("recovery.signal").exists());
        // The second restore's settings replace the first's, which are commented out.
        let conf = fs::read_to_string(dir.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(
            conf,
            "# disabled by walship restore: restore_command = 'x'\n"
        );
    }

    #[test]
    fn xid_targets_choose_a_backup_that_ended_before_the_transaction() {
        let b = |id: &str, next_xid: Option<u64>| BackupSummary {
            format: 1,
            id: id.into(),
            system_identifier: "1".into(),
            pg_version_num: 150000,
            wal_segment_size: 16 << 20,
            timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            start_time: String::new(),
            stop_time: String::new(),
            start_epoch: 0.0,
            stop_epoch: 0.0,
            next_xid,
            from_standby: false,
            original_size: 0,
            stored_size: 0,
            files: 0,
            parts: 0,
            walship_version: String::new(),
            page_checks: None,
        };
        let epoch1 = 1u64 << 32;
        let all = [
            b("a", Some(1000)),
            b("b", Some(5000)),
            b("c", Some(epoch1 + 100)),
        ];
        let chosen = |x: u64| choose_backup(&all, &Target::Xid(x)).map(|b| b.id.clone());
        assert_eq!(chosen(epoch1 + 100).unwrap(), "c");
        assert_eq!(chosen(epoch1 + 99).unwrap(), "b", "64-bit: epoch 0's");
        assert_eq!(chosen(5000).unwrap(), "c", "32-bit: read near the newest");
        // 32-bit xids compare as PostgreSQL compares them: within 2^31 of the backup's next xid.
        assert!(xid_at_or_after(150, epoch1 + 100));
        assert!(!xid_at_or_after(99, epoch1 + 100));
        assert!(xid_at_or_after(5000, 1000) && !xid_at_or_after(999, 1000));
        let old = [b("a", Some(1000)), b("b", Some(5000))];
        let chosen = |x: u64| choose_backup(&old, &Target::Xid(x)).map(|b| b.id.clone());
        assert_eq!(chosen(4999).unwrap(), "a");
        let err = chosen(999).unwrap_err().to_string();
        assert!(err.contains("no backup can reach xid 999"), "{err}");
        // Backups from before the record: taken as they come.
        let unrecorded = [b("a", None), b("b", Some(5000))];
        assert_eq!(
            choose_backup(&unrecorded, &Target::Xid(10)).unwrap().id,
            "a"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/walship"), "/usr/bin/walship");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(conf_quote("it's"), "'it''s'");
        assert_eq!(conf_quote("a\\b\nc\rd"), r"'a\\b\nc\rd'");
        assert_eq!(command_arg("/keys/100%free.key"), "/keys/100%%free.key");
        assert_eq!(command_arg("/a b/%p"), "'/a b/%%p'");
    }
}
