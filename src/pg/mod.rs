//! The PostgreSQL side: on-disk structures walship reads. Knows nothing of storage.

pub mod walpage;
