//! `global/pg_control`, read whole and checked against its CRC-32C.
//!
//! PostgreSQL rewrites the file in place (one 8 KiB write) at every checkpoint and restartpoint,
//! and on some file systems (ext4) a read racing that write sees part of each version. A torn copy
//! in a backup makes the restored cluster refuse to start ("incorrect checksum in control file"),
//! so the file is read again until its checksum holds, as PostgreSQL's own tools and pgBackRest
//! do.

use std::path::Path;
use std::time::Duration;

/// PostgreSQL keeps the control data inside the first 512 bytes (`PG_CONTROL_MAX_SAFE_SIZE`), so
/// that one sector write covers it.
const MAX_SAFE_SIZE: usize = 512;

/// The CRC-32C (Castagnoli) of `data`, as PostgreSQL computes it.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

/// Whether `bytes` start with control data followed by its matching CRC-32C.
///
/// The CRC is the struct's last field, and where that lies differs between major versions; each
/// 4-byte-aligned place in the first 512 bytes is tried. A torn read matching by chance at a wrong
/// place has odds of about 2^-25.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    let end = bytes.len().min(MAX_SAFE_SIZE);
    let mut crc = !0;
    let mut done = 0;
    for at in (16..end.saturating_sub(3)).step_by(4) {
        crc = crc32c_update(crc, &bytes[done..at]);
        done = at;
        let stored = u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        if !crc == stored {
            return true;
        }
    }
    false
}

/// How often, and how far apart, [`read_checked`] reads a file that fails its checksum.
const READS: u32 = 20;
const PAUSE: Duration = Duration::from_millis(50);

/// `<data_dir>/global/pg_control`, read until its checksum holds. A file that never does within
/// about a second (a standby can write one with a wrong checksum until its next restartpoint) is
/// an `InvalidData` error.
pub fn read_checked(path: &Path) -> std::io::Result<Vec<u8>> {
    for n in 1..=READS {
        let bytes = std::fs::read(path)?;
        if checksum_ok(&bytes) {
            return Ok(bytes);
        }
        tracing::debug!("{}: checksum mismatch on read {n}", path.display());
        if n < READS {
            std::thread::sleep(PAUSE);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "its checksum failed on each of {READS} reads over {} s; PostgreSQL cannot start \
             from a copy of it. Take the backup again (on a standby, after its next restartpoint)",
            (PAUSE * READS).as_secs_f32()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Control data as PostgreSQL 15 lays it out: the CRC at 288, of what precedes it.
    fn control_file() -> Vec<u8> {
        let mut f = vec![0u8; 8192];
        for (i, b) in f[..288].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let crc = crc32c(&f[..288]);
        f[288..292].copy_from_slice(&crc.to_ne_bytes());
        f
    }

    #[test]
    fn a_whole_file_passes_and_a_torn_one_fails() {
        let f = control_file();
        assert!(checksum_ok(&f));
        let mut torn = f.clone();
        torn[100] ^= 0x40;
        assert!(!checksum_ok(&torn));
        assert!(
            !checksum_ok(&vec![0u8; 8192][..]),
            "zeros carry no checksum"
        );
        assert!(!checksum_ok(&f[..200]), "cut before the checksum");
    }

    #[test]
    fn reading_retries_until_the_checksum_holds_and_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pg_control");
        let good = control_file();
        let mut torn = good.clone();
        torn[40] ^= 1;
        std::fs::write(&path, &torn).unwrap();
        let writer = {
            let (path, good) = (path.clone(), good.clone());
            std::thread::spawn(move || {
                std::thread::sleep(PAUSE * 3);
                // Replaced whole: a read never sees a short file that happens to hold the data.
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, good).unwrap();
                std::fs::rename(tmp, path).unwrap();
            })
        };
        assert_eq!(read_checked(&path).unwrap(), good);
        writer.join().unwrap();

        std::fs::write(&path, &torn).unwrap();
        let err = read_checked(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
