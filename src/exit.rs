//! The exit codes: part of walship's contract with PostgreSQL and with scripts. Documented in the
//! README; change them only with the README.

use crate::archive::ArchiveError;
use crate::backup::BackupError;
use crate::codec::CodecError;
use crate::config::ConfigError;
use crate::storage::StorageError;
use crate::wal::WalError;

pub const OK: i32 = 0;
/// wal-fetch: the archive definitely does not have the file; backup commands: no such backup, or
/// a target no backup can reach.
pub const NOT_IN_ARCHIVE: i32 = 1;
/// Bad flag, bad or missing configuration, unreadable key file.
pub const USAGE: i32 = 2;
/// Storage unreachable or failing after retries (network down, 5xx, timeouts).
pub const UNAVAILABLE: i32 = 3;
/// An archived object is corrupt or cannot be decrypted with the configured identity.
pub const CORRUPT: i32 = 4;
/// Refused to protect the archive: other content under an archived name, another cluster's
/// repository, other encryption keys.
pub const CONFLICT: i32 = 5;
/// Access denied, bucket or repository missing.
pub const ACCESS: i32 = 6;
/// Local file problem: missing input, disk full, permissions.
pub const LOCAL_IO: i32 = 7;
/// A bug in walship (a panic): the message says where.
pub const INTERNAL: i32 = 8;
/// Added to wal-fetch's code for any failure other than "not in archive" outside standby mode
/// (and the history copy at the end of archive recovery), so that it is above 125 and PostgreSQL
/// stops recovery instead of ending it early.
pub const FATAL_FOR_RECOVERY: i32 = 128;

fn storage_code(e: &StorageError) -> i32 {
    match e {
        StorageError::NotFound(_) => NOT_IN_ARCHIVE,
        StorageError::NoBucket(_) | StorageError::Denied(_) => ACCESS,
        StorageError::Transient(_) | StorageError::Credentials(_) | StorageError::Other(_) => {
            UNAVAILABLE
        }
        StorageError::Io(_) => LOCAL_IO,
        StorageError::Deleted(_) => CORRUPT,
        StorageError::InvalidKey(_) => USAGE,
    }
}

fn codec_code(e: &CodecError) -> i32 {
    match e {
        CodecError::Io(_) => LOCAL_IO,
        CodecError::BadRecipient(_) | CodecError::SecretAsRecipient | CodecError::NoIdentity(_) => {
            USAGE
        }
        _ => CORRUPT,
    }
}

pub fn for_archive(e: &ArchiveError) -> i32 {
    match e {
        ArchiveError::Storage(s) => storage_code(s),
        ArchiveError::Codec { source, .. } => codec_code(source),
        ArchiveError::Conflict(_) | ArchiveError::ForeignRepo(_) => CONFLICT,
        ArchiveError::Local { .. } => LOCAL_IO,
    }
}

pub fn for_wal(e: &WalError) -> i32 {
    match e {
        WalError::Archive(a) => for_archive(a),
        WalError::Config(ConfigError::Key(c)) => codec_code(c),
        WalError::Config(_) | WalError::BadName(_) => USAGE,
        WalError::ForeignCluster(_) => CONFLICT,
        WalError::NotInArchive(_) => NOT_IN_ARCHIVE,
        WalError::Invalid(_) => CONFLICT,
        WalError::NoRepository(_) => ACCESS,
        WalError::HeldBack(_) => UNAVAILABLE,
        WalError::Local { .. } => LOCAL_IO,
        WalError::Encode { source, .. } => codec_code(source),
    }
}

pub fn for_backup(e: &BackupError) -> i32 {
    match e {
        BackupError::Archive(a) => for_archive(a),
        BackupError::Config(ConfigError::Key(c)) => codec_code(c),
        BackupError::Config(_) | BackupError::Invalid(_) => USAGE,
        BackupError::Pg(_) => UNAVAILABLE,
        BackupError::Local { .. } => LOCAL_IO,
        BackupError::ForeignCluster(_) | BackupError::TargetNotEmpty(_) => CONFLICT,
        BackupError::WalNotArchived(_) | BackupError::TimelineSwitched(_) => UNAVAILABLE,
        BackupError::NoSuchBackup(_)
        | BackupError::NoBackups(_)
        | BackupError::NoBackupForTarget(_) => NOT_IN_ARCHIVE,
        BackupError::BadManifest { .. } | BackupError::BadHistory { .. } | BackupError::Gap(_) => {
            CORRUPT
        }
    }
}

/// wal-push's code: a missing object is not an answer for a push (a name taken and then gone
/// again before its header could be read: a delete racing the push, a listing lagging behind),
/// and PostgreSQL retries.
pub fn for_wal_push(e: &WalError) -> i32 {
    match for_wal(e) {
        NOT_IN_ARCHIVE => UNAVAILABLE,
        c => c,
    }
}

/// wal-fetch's code: 1 only for "not in archive"; other failures are ordinary (< 126) where
/// PostgreSQL does without the file (`lenient`: standby mode, where it retries, and the history
/// copy at the end of archive recovery), and fatal (>= 128) otherwise.
pub fn for_wal_fetch(code: i32, lenient: bool) -> i32 {
    match code {
        OK | NOT_IN_ARCHIVE => code,
        c if lenient => c,
        c => FATAL_FOR_RECOVERY + c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_failures_never_look_like_end_of_archive() {
        for code in [USAGE, UNAVAILABLE, CORRUPT, CONFLICT, ACCESS, LOCAL_IO] {
            let c = for_wal_fetch(code, false);
            assert!(
                c > 125 && c < 256,
                "{code} -> {c} must make PostgreSQL stop recovery"
            );
            assert_eq!(
                for_wal_fetch(code, true),
                code,
                "standby retries ordinary failures"
            );
        }
        assert_eq!(for_wal_fetch(NOT_IN_ARCHIVE, false), 1);
        let missing_bucket =
            WalError::Archive(ArchiveError::Storage(StorageError::NoBucket("b".into())));
        assert_eq!(for_wal_fetch(for_wal(&missing_bucket), false), 128 + ACCESS);
    }

    #[test]
    fn a_push_never_exits_with_the_code_for_a_missing_file() {
        let gone = WalError::Archive(ArchiveError::Storage(StorageError::NotFound("k".into())));
        assert_eq!(for_wal_push(&gone), UNAVAILABLE);
        let denied = WalError::Archive(ArchiveError::Storage(StorageError::Denied("k".into())));
        assert_eq!(for_wal_push(&denied), ACCESS);
    }
}
