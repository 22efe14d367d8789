//! PostgreSQL data pages: the checksum a cluster initialised with `initdb --data-checksums` keeps
//! in every page header, and the verdict on one page read during a base backup.
//!
//! The checksum is PostgreSQL's (`src/include/storage/checksum_impl.h`): the page is read as rows
//! of 32 native-endian `u32` columns, each column folded into its own FNV-1a-like hash
//! (`h = (h ^ v) * FNV_PRIME ^ ((h ^ v) >> 17)`, seeded with a fixed per-column offset), two more
//! rounds of zeros mix each column, the columns are xor-ed together with the block number, and the
//! result is reduced to 1..=65535. The header's own checksum field counts as zero.
//!
//! Page header fields used here (`PageHeaderData`): `pd_lsn` at 0 (two native `u32`s, high half
//! first), `pd_checksum` at 8, `pd_upper` at 14.

/// Columns hashed in parallel; part of the algorithm.
const COLUMNS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// Each column's starting value; part of the algorithm.
const SEEDS: [u32; COLUMNS] = [
    0x5B1F_36E9,
    0xB852_5960,
    0x02AB_50AA,
    0x1DE6_6D2A,
    0x79FF_467A,
    0x9BB9_F8A3,
    0x217E_7CD2,
    0x83E1_3D2C,
    0xF8D4_474F,
    0xE39E_B970,
    0x42C6_AE16,
    0x9932_16FA,
    0x7B09_3B5D,
    0x98DA_FF3C,
    0xF718_902A,
    0x0B1C_9CDB,
    0xE58F_764B,
    0x1876_36BC,
    0x5D7B_3BB1,
    0xE73D_E7DE,
    0x92BE_C979,
    0xCCA6_C0B2,
    0x304A_0979,
    0x85AA_43D4,
    0x7831_25BB,
    0x6CA8_EAA2,
    0xE407_EAC6,
    0x4B5C_FC3E,
    0x9FBF_8C76,
    0x15CA_20BE,
    0xF2CA_9FD3,
    0x959B_D756,
];
const CHECKSUM_AT: usize = 8;
const UPPER_AT: usize = 14;
/// The header a page needs before its fields can be read.
const HEADER_LEN: usize = 24;

#[inline(always)]
fn mix(h: u32, v: u32) -> u32 {
    let t = h ^ v;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

fn word(page: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(page[at..at + 4].try_into().expect("4 bytes"))
}

/// PostgreSQL's checksum of `page` as block `blkno` of its relation (counted from the first
/// segment file, not this one). `page.len()` must be a multiple of 128: every block size
/// PostgreSQL can be built with is.
pub fn checksum(page: &[u8], blkno: u32) -> u16 {
    assert!(page.len().is_multiple_of(COLUMNS * 4) && page.len() >= HEADER_LEN);
    let mut sums = SEEDS;
    for (row_index, row) in page.chunks_exact(COLUMNS * 4).enumerate() {
        let mut values = [0u32; COLUMNS];
        for (v, bytes) in values.iter_mut().zip(row.chunks_exact(4)) {
            *v = u32::from_ne_bytes(bytes.try_into().expect("4 bytes"));
        }
        if row_index == 0 {
            // pd_checksum is the low or high half of the third word: hashed as zero.
            let mut w = values[CHECKSUM_AT / 4].to_ne_bytes();
            w[..2].fill(0);
            values[CHECKSUM_AT / 4] = u32::from_ne_bytes(w);
        }
        for (s, v) in sums.iter_mut().zip(values) {
            *s = mix(*s, v);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            *s = mix(*s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    (folded % 65535 + 1) as u16
}

/// The LSN in the page header: the end of the last WAL record that changed the page.
pub fn lsn(page: &[u8]) -> u64 {
    (u64::from(word(page, 0)) << 32) | u64::from(word(page, 4))
}

/// The checksum the page header records.
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_ne_bytes([page[CHECKSUM_AT], page[CHECKSUM_AT + 1]])
}

/// What a backup makes of one page it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The checksum matches, or the page is new and all zeros.
    Valid,
    /// The page fails, but its LSN is at or past the backup's start. Either the read raced
    /// PostgreSQL's write of a page changed since the start (replay rewrites it from the
    /// full-page image the first change after the backup's checkpoint logged, so that is no
    /// fault), or the corruption hit the LSN itself. Which one is settled when the backup stops:
    /// no page on disk can carry an LSN past the WAL written so far, so an LSN past the stop
    /// point is corruption.
    FailedSinceStart { lsn: u64 },
    /// A page whose header says new (`pd_upper` 0) but whose bytes are not all zeros.
    NotZeroed,
    /// The checksum does not match.
    Mismatch { stored: u16, computed: u16 },
}

/// The verdict on `page`, block `blkno` of its relation, read during a backup that started at
/// `start_lsn`. The checks are PostgreSQL's own when it reads a page (`PageIsVerifiedExtended`),
/// less the header sanity checks.
pub fn verify(page: &[u8], blkno: u32, start_lsn: u64) -> Verdict {
    let upper = u16::from_ne_bytes([page[UPPER_AT], page[UPPER_AT + 1]]);
    let failed = match upper {
        0 if page.iter().all(|&b| b == 0) => return Verdict::Valid,
        0 => Verdict::NotZeroed,
        _ => {
            let (stored, computed) = (stored_checksum(page), checksum(page, blkno));
            if stored == computed {
                return Verdict::Valid;
            }
            Verdict::Mismatch { stored, computed }
        }
    };
    match lsn(page) {
        lsn if lsn >= start_lsn => Verdict::FailedSinceStart { lsn },
        _ => failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Block 0 of `pg_class` (relfilenode 1259) from a PostgreSQL 15 cluster made with
    /// `initdb --data-checksums`; its header records the checksum PostgreSQL computed.
    const PG_CLASS_BLOCK_0: &[u8] = include_bytes!("../../tests/fixtures/pg15-page-1259-0");

    #[test]
    fn agrees_with_the_checksum_postgresql_wrote() {
        let page = PG_CLASS_BLOCK_0;
        assert_eq!(page.len(), 8192);
        assert_ne!(stored_checksum(page), 0);
        assert_eq!(checksum(page, 0), stored_checksum(page));
        assert_eq!(verify(page, 0, u64::MAX), Verdict::Valid);
    }

    #[test]
    fn a_flipped_bit_a_moved_page_and_a_dirty_new_page_are_caught() {
        let page = PG_CLASS_BLOCK_0.to_vec();
        let stored = stored_checksum(&page);
        // The block number is part of the checksum: the same page elsewhere in the file fails.
        assert!(matches!(
            verify(&page, 1, u64::MAX),
            Verdict::Mismatch { .. }
        ));
        // Any single flipped bit, wherever it is (the checksum field aside), fails.
        for at in [0usize, 4, 12, 20, 100, 4096, 8191] {
            let mut bad = page.clone();
            bad[at] ^= 0x10;
            let verdict = verify(&bad, 0, u64::MAX);
            assert!(
                matches!(verdict, Verdict::Mismatch { stored: s, .. } if s == stored),
                "bit flipped at {at}: {verdict:?}"
            );
        }
        // The checksum field itself is not hashed.
        let mut other_sum = page.clone();
        other_sum[CHECKSUM_AT] ^= 1;
        assert_eq!(checksum(&other_sum, 0), stored);

        let mut new_page = vec![0u8; 8192];
        assert_eq!(verify(&new_page, 7, 1), Verdict::Valid);
        new_page[5000] = 1;
        assert_eq!(verify(&new_page, 7, 1), Verdict::NotZeroed);
    }

    #[test]
    fn a_failing_page_changed_since_the_start_is_left_to_the_stop_point() {
        let mut page = PG_CLASS_BLOCK_0.to_vec();
        let at = lsn(&page);
        assert!(at > 0);
        // Whole and changed since the start: its checksum still holds, so it is verified.
        assert_eq!(verify(&page, 0, at), Verdict::Valid);
        page[4096] ^= 0xff;
        assert_eq!(verify(&page, 0, at), Verdict::FailedSinceStart { lsn: at });
        assert!(matches!(verify(&page, 0, at + 1), Verdict::Mismatch { .. }));
        // Corruption of the LSN's high word: the checksum fails and the LSN lies far ahead.
        let mut lsn_hit = PG_CLASS_BLOCK_0.to_vec();
        lsn_hit[..4].copy_from_slice(&0xA5B7_2E0Fu32.to_ne_bytes());
        assert_eq!(
            verify(&lsn_hit, 0, at + 1),
            Verdict::FailedSinceStart {
                lsn: (0xA5B7_2E0F << 32) | (at & 0xffff_ffff)
            }
        );
    }
}
