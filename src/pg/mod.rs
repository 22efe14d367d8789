//! The PostgreSQL side: on-disk structures walship reads, and connections to a server. Knows
//! nothing of storage.

pub mod conn;
pub mod page;
pub mod walpage;
