//! What to do about a local I/O error, appended to the one-line messages of every layer: "No space
//! left on device" alone says what happened, not that the fix is freeing space on that file system.
//! No dependencies, so any layer can use it.

use std::io::{Error, ErrorKind};

/// A `; <what to do>` suffix for errors whose fix is the same wherever they happen, else "".
pub fn suffix(err: &Error) -> String {
    match err.kind() {
        ErrorKind::StorageFull => {
            "; the file system is full: free space on it (or use another one) and try again".into()
        }
        ErrorKind::QuotaExceeded => {
            "; the disk quota of the user walship runs as is used up: free space or raise the quota"
                .into()
        }
        ErrorKind::ReadOnlyFilesystem => {
            "; the file system is mounted read-only: remount it read-write or use another one"
                .into()
        }
        ErrorKind::FileTooLarge => {
            "; a file size limit was hit: check `ulimit -f` for the user walship runs as".into()
        }
        ErrorKind::PermissionDenied => format!(
            "; walship runs as uid {}: give that user access (owner or mode) or run walship as the owner",
            rustix::process::geteuid().as_raw()
        ),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_fix_for_errors_with_one() {
        let enospc = Error::from_raw_os_error(28);
        assert!(
            suffix(&enospc).contains("file system is full"),
            "{enospc:?}"
        );
        assert!(suffix(&Error::from_raw_os_error(122)).contains("quota"));
        assert!(suffix(&Error::from_raw_os_error(30)).contains("read-only"));
        assert!(suffix(&Error::from_raw_os_error(27)).contains("ulimit -f"));
        assert!(suffix(&Error::from_raw_os_error(13)).contains("walship runs as uid"));
        // Errors whose fix depends on the context get no generic advice.
        assert_eq!(suffix(&Error::from(ErrorKind::NotFound)), "");
        assert_eq!(suffix(&Error::from_raw_os_error(5)), "");
    }
}
