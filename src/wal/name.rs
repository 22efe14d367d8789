//! Names of the files PostgreSQL archives: WAL segments, timeline history files, backup history
//! files and `.partial` segments. Pure parsing and arithmetic; no I/O.
//!
//! A segment name is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number split into a
//! "log id" and a segment within it (`0x1_0000_0000 / segment_size` segments per log id).

use std::fmt;

/// The WAL segment size PostgreSQL uses unless `initdb --wal-segsize` said otherwise.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("'{0}' is not a WAL file name (expected e.g. 000000010000000000000001, 00000002.history, 000000010000000000000001.00000028.backup or 000000010000000000000001.partial)")]
pub struct BadWalName(pub String);

/// What kind of file an archived name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFileKind {
    Segment,
    Partial,
    History,
    BackupHistory,
}

/// A validated name of an archivable WAL file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WalFileName {
    name: String,
    kind: WalFileKind,
    timeline: u32,
}

/// The position of a segment: timeline plus the 64-bit segment number split as in its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    pub timeline: u32,
    pub log: u32,
    pub seg: u32,
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalFileName {
    pub fn parse(name: &str) -> Result<Self, BadWalName> {
        let bad = || BadWalName(name.to_string());
        let (kind, stem) = if let Some(tli) = name.strip_suffix(".history") {
            (WalFileKind::History, tli)
        } else if let Some(rest) = name.strip_suffix(".partial") {
            (WalFileKind::Partial, rest)
        } else if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.').ok_or_else(bad)?;
            if offset.len() != 8 || !is_upper_hex(offset) {
                return Err(bad());
            }
            (WalFileKind::BackupHistory, seg)
        } else {
            (WalFileKind::Segment, name)
        };
        let want_len = if kind == WalFileKind::History { 8 } else { 24 };
        if stem.len() != want_len || !is_upper_hex(stem) {
            return Err(bad());
        }
        let timeline = u32::from_str_radix(&stem[..8], 16).map_err(|_| bad())?;
        if timeline == 0 {
            return Err(bad());
        }
        Ok(Self {
            name: name.to_string(),
            kind,
            timeline,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> WalFileKind {
        self.kind
    }

    pub fn timeline(&self) -> u32 {
        self.timeline
    }

    /// The segment this file belongs to (`None` for history files).
    pub fn segment(&self) -> Option<SegmentId> {
        if self.kind == WalFileKind::History {
            return None;
        }
        let hex = |r: std::ops::Range<usize>| u32::from_str_radix(&self.name[r], 16).ok();
        Some(SegmentId {
            timeline: self.timeline,
            log: hex(8..16)?,
            seg: hex(16..24)?,
        })
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl SegmentId {
    /// How many segments one log id holds for a given segment size.
    pub fn segments_per_log(segment_size: u64) -> u64 {
        0x1_0000_0000 / segment_size
    }

    /// The segment number counted from the start of WAL.
    pub fn segno(&self, segment_size: u64) -> u64 {
        u64::from(self.log) * Self::segments_per_log(segment_size) + u64::from(self.seg)
    }

    pub fn from_segno(timeline: u32, segno: u64, segment_size: u64) -> Self {
        let per = Self::segments_per_log(segment_size);
        Self {
            timeline,
            log: (segno / per) as u32,
            seg: (segno % per) as u32,
        }
    }

    /// The segment `n` after this one on the same timeline.
    pub fn advance(&self, n: u64, segment_size: u64) -> Self {
        Self::from_segno(self.timeline, self.segno(segment_size) + n, segment_size)
    }

    /// The segment holding a byte position of WAL.
    pub fn containing(timeline: u32, lsn: u64, segment_size: u64) -> Self {
        Self::from_segno(timeline, lsn / segment_size, segment_size)
    }

    pub fn file_name(&self) -> WalFileName {
        let name = format!("{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg);
        WalFileName {
            name,
            kind: WalFileKind::Segment,
            timeline: self.timeline,
        }
    }
}

/// Parse a PostgreSQL LSN such as `0/16B3748`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    Some(
        (u64::from(u32::from_str_radix(hi, 16).ok()?) << 32)
            | u64::from(u32::from_str_radix(lo, 16).ok()?),
    )
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = DEFAULT_SEGMENT_SIZE;

    #[test]
    fn parses_every_kind() {
        let s = WalFileName::parse("0000000100000002000000FE").unwrap();
        assert_eq!(s.kind(), WalFileKind::Segment);
        assert_eq!(
            s.segment(),
            Some(SegmentId {
                timeline: 1,
                log: 2,
                seg: 0xFE
            })
        );
        let h = WalFileName::parse("0000000A.history").unwrap();
        assert_eq!(
            (h.kind(), h.timeline(), h.segment()),
            (WalFileKind::History, 10, None)
        );
        let b = WalFileName::parse("000000010000000000000002.00000028.backup").unwrap();
        assert_eq!(b.kind(), WalFileKind::BackupHistory);
        assert_eq!(b.segment().unwrap().seg, 2);
        let p = WalFileName::parse("000000020000000000000005.partial").unwrap();
        assert_eq!((p.kind(), p.timeline()), (WalFileKind::Partial, 2));
    }

    #[test]
    fn rejects_what_postgres_never_archives() {
        for bad in [
            "",
            "RECOVERYXLOG",
            "00000001000000000000000",
            "0000000100000000000000001",
            "00000001000000000000000g",
            "000000010000000000000001.history",
            "000000000000000000000001",
            "../00000001000000000000001",
            "0000001.history",
            "000000010000000000000002.0028.backup",
            "000000010000000000000002.backup",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn segment_arithmetic_crosses_log_boundary() {
        let id = SegmentId {
            timeline: 3,
            log: 0,
            seg: 0xFF,
        };
        let next = id.advance(1, SEG);
        assert_eq!(next.file_name().as_str(), "000000030000000100000000");
        assert_eq!(next.segno(SEG), 256);
        // 1 GiB segments: only four per log id.
        let big = 1024 * 1024 * 1024;
        let id = SegmentId {
            timeline: 1,
            log: 0,
            seg: 3,
        };
        assert_eq!(
            id.advance(1, big).file_name().as_str(),
            "000000010000000100000000"
        );
    }

    #[test]
    fn lsn_round_trip_and_containing_segment() {
        let lsn = parse_lsn("1/16B3748").unwrap();
        assert_eq!(lsn, 0x1_016B_3748);
        assert_eq!(format_lsn(lsn), "1/16B3748");
        assert_eq!(
            SegmentId::containing(1, lsn, SEG).file_name().as_str(),
            "000000010000000100000001"
        );
        assert_eq!(parse_lsn("16B3748"), None);
        assert_eq!(parse_lsn("x/1"), None);
    }
}
