//! Wall-clock helpers.

use std::time::{Duration, SystemTime};

/// Now as RFC 3339 UTC with seconds, e.g. `2026-11-22T08:00:00Z`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Seconds since the epoch as RFC 3339 UTC with seconds.
pub fn epoch_rfc3339(epoch: f64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch.max(0.0));
    humantime::format_rfc3339_seconds(t).to_string()
}
