//! walship: PostgreSQL WAL archiving to object storage. The binary (`main.rs`) is a thin layer over
//! these modules; see ARCHITECTURE in the README for the map.

pub mod archive;
pub mod backup;
pub mod cli;
pub mod codec;
pub mod config;
pub mod exit;
pub mod io_hint;
pub mod pg;
pub mod repo;
pub mod restore;
pub mod storage;
pub mod text;
pub mod time;
pub mod wal;
