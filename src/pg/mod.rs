//! The PostgreSQL side: on-disk structures walship reads, and connections to a server. Knows
//! nothing of storage.

pub mod conn;
pub mod control;
pub mod page;
pub mod walpage;

/// The system identifier in `<data_dir>/global/pg_control` (its first 8 bytes), when the file
/// can be read.
pub fn control_system_identifier(data_dir: &std::path::Path) -> Option<u64> {
    let mut first = [0u8; 8];
    let mut f = std::fs::File::open(data_dir.join("global/pg_control")).ok()?;
    std::io::Read::read_exact(&mut f, &mut first).ok()?;
    Some(u64::from_le_bytes(first))
}
