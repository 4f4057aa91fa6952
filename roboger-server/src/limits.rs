//! Address limits: at most `lim_c` messages and `lim_s` bytes per period
//! (`limits.period`), with `limits.reserve` percent of each kept for
//! WARNING and above. Counters live in the database, in windows aligned
//! to the period, so every server on it shares them.

use crate::config::Limits;
use crate::level::Level;
use crate::routing::AddrRoutes;
use crate::store::{Store, StoreError};

/// Why a push is over its address's limit (the text of the 429).
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// Over the limit; the message says which and why.
    #[error("{0}")]
    Over(String),
    /// The counters could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Counts a push of `size` bytes at `level` to the address `a`, or says
/// why it is over the limit, in the original's words.
pub async fn check(
    store: &Store,
    limits: &Limits,
    routes: &AddrRoutes,
    a: &str,
    level: Level,
    size: usize,
) -> Result<(), LimitError> {
    let period = limits.period.as_secs().max(1) as i64;
    let now = chrono::Utc::now().timestamp();
    let window = now - now.rem_euclid(period);
    let low = level < Level::Warning;
    let reserved = |lim: i64| -> i64 {
        if low {
            lim - lim * i64::from(limits.reserve) / 100
        } else {
            lim
        }
    };
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let (max_c, max_s) = (reserved(routes.lim_c), reserved(routes.lim_s));
    if store
        .count_message(routes.id, window, size, max_c, max_s)
        .await?
    {
        return Ok(());
    }
    let (count, used) = match store.limit_counters(routes.id).await? {
        Some(c) if c.window_start == window => (c.count, c.size),
        _ => (0, 0),
    };
    let period_name = &limits.period_name;
    let reserve_note = format!(
        ", {}% are reserved for WARNING and higher levels",
        limits.reserve
    );
    let msg = if count >= routes.lim_c {
        format!(
            "Messages to {a} are limited by {} per {period_name}. Limit has been reached",
            routes.lim_c
        )
    } else if count >= max_c {
        format!(
            "Messages to {a} are limited by {} per {period_name}{reserve_note}",
            routes.lim_c
        )
    } else if used + size > routes.lim_s {
        format!(
            "Messages to {a} are limited by {} bytes per {period_name}. Limit has been reached",
            routes.lim_s
        )
    } else {
        format!(
            "Messages to {a} are limited by {} bytes per {period_name}{reserve_note}",
            routes.lim_s
        )
    };
    Err(LimitError::Over(msg))
}
