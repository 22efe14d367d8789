//! The long header at the start of every WAL segment (`XLogLongPageHeaderData`), which names the
//! cluster (system identifier), the segment size and where in WAL the segment starts.
//!
//! ```text
//!  0 u16 xlp_magic    2 u16 xlp_info   4 u32 xlp_tli   8 u64 xlp_pageaddr   16 u32 xlp_rem_len
//! 24 u64 xlp_sysid   32 u32 xlp_seg_size   36 u32 xlp_xlog_blcksz
//! ```
//! Fields are in the machine's byte order; every platform PostgreSQL ships on today is little endian.

pub const LONG_HEADER_LEN: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_addr: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a WAL segment: {0}")]
pub struct NotWal(pub String);

impl LongPageHeader {
    pub fn parse(b: &[u8]) -> Result<Self, NotWal> {
        if b.len() < LONG_HEADER_LEN {
            return Err(NotWal(format!(
                "only {} bytes, shorter than a WAL page header",
                b.len()
            )));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let h = Self {
            magic: u16_at(0),
            timeline: u32_at(4),
            page_addr: u64_at(8),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        if u16_at(2) & XLP_LONG_HEADER == 0 {
            return Err(NotWal("first page has no long header".into()));
        }
        if !(0xD000..=0xD1FF).contains(&h.magic) {
            return Err(NotWal(format!("unknown page magic {:#06x}", h.magic)));
        }
        if !h.segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&h.segment_size) {
            return Err(NotWal(format!(
                "implausible segment size {}",
                h.segment_size
            )));
        }
        if !h.block_size.is_power_of_two() || h.block_size < 1024 {
            return Err(NotWal(format!("implausible block size {}", h.block_size)));
        }
        Ok(h)
    }

    /// The PostgreSQL major version that writes this WAL page magic, where known.
    pub fn pg_major(&self) -> Option<u32> {
        match self.magic {
            0xD101 => Some(12),
            0xD106 => Some(13),
            0xD10D => Some(14),
            0xD110 => Some(15),
            0xD113 => Some(16),
            0xD116 => Some(17),
            0xD118 => Some(18),
            _ => None,
        }
    }
}

#[cfg(test)]
pub fn synthetic_header(sysid: u64, tli: u32, page_addr: u64, seg_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; LONG_HEADER_LEN];
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&(XLP_LONG_HEADER | 0x0004).to_le_bytes());
    b[4..8].copy_from_slice(&tli.to_le_bytes());
    b[8..16].copy_from_slice(&page_addr.to_le_bytes());
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    b[32..36].copy_from_slice(&seg_size.to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_pg15_header() {
        let b = synthetic_header(7_311_112_222_333_344_445, 2, 0x1_0100_0000, 16 << 20);
        let h = LongPageHeader::parse(&b).unwrap();
        assert_eq!(h.system_identifier, 7_311_112_222_333_344_445);
        assert_eq!(
            (h.timeline, h.page_addr, h.segment_size, h.block_size),
            (2, 0x1_0100_0000, 16 << 20, 8192)
        );
        assert_eq!(h.pg_major(), Some(15));
    }

    #[test]
    fn rejects_what_is_not_a_segment_start() {
        assert!(LongPageHeader::parse(&[0u8; 10]).is_err());
        assert!(LongPageHeader::parse(&[0u8; 64]).is_err());
        let mut b = synthetic_header(1, 1, 0, 16 << 20);
        b[2] = 0; // short header: a page in the middle of a segment
        assert!(LongPageHeader::parse(&b).is_err());
        let mut b = synthetic_header(1, 1, 0, 16 << 20);
        b[32..36].copy_from_slice(&12345u32.to_le_bytes());
        assert!(LongPageHeader::parse(&b).is_err());
    }
}
