//! Slowing down anyone guessing the master key: wrong keys from one
//! address, counted in the database (so across every node), make each
//! further attempt from that address wait, on the management API,
//! `/metrics` and the console's sign-in alike (`master.slow-down`, on by
//! default).
//!
//! After [`FREE_FAILURES`] wrong keys in a row, an address (an IPv6
//! client's whole /64) must wait 1 s
//! before its next attempt, doubling with each further wrong key up to
//! [`MAX_WAIT`]; an attempt made sooner is answered 429 with
//! `Retry-After`, whatever key it carries, so a right guess is not told
//! apart from a wrong one while the wait runs. A right key forgets the
//! address's failures.
//!
//! Invariant: once an address has a failure counted, each of its attempts
//! is counted before its key is checked, and only if no other attempt
//! from it was counted since this one read the count, so attempts sent at
//! once are weighed one by one. An address with none counted is checked
//! first on the API and `/metrics` (a request with the right key costs
//! one read, no write), so the first attempts it sends at once are all
//! checked; the console's sign-in always counts first.

use std::net::IpAddr;
use std::time::Duration;

use super::error::ApiError;
use crate::App;
use crate::store::entity::console_signin;

/// Wrong keys from one address allowed before each further attempt must
/// wait.
pub const FREE_FAILURES: i32 = 3;
/// The longest wait between attempts from one address.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How many times an attempt reads its address's failures again after
/// other attempts from that address were counted first, before it is
/// answered as one that must wait.
const CLAIM_TRIES: usize = 8;

/// How an attempt from an address with no failures counted is weighed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Counted before its key is checked (the console's sign-in, where an
    /// attempt is rare and starts a session).
    Always,
    /// Its key checked first, and counted only when wrong (the API and
    /// `/metrics`, where most requests carry the right key).
    WhenWrong,
}

/// How long a client that failed `failures` times in a row waits before
/// its next attempt.
pub fn wait_after(failures: i32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = u32::try_from(failures - FREE_FAILURES)
        .unwrap_or(u32::MAX)
        .min(16);
    Duration::from_secs(1u64 << exp).min(MAX_WAIT)
}

/// Checks `key` from `ip` as [`crate::api::auth::MasterAuth::check`]
/// does (`master.allow`, then the key), weighing it against the wrong
/// keys that address gave before: [`ApiError::TooManyWrongKeys`] while it
/// must wait. The database has `within` for its part, else the answer is
/// [`ApiError::Unavailable`].
pub async fn check_key(
    app: &App,
    ip: Option<IpAddr>,
    key: &str,
    counting: Counting,
    within: Duration,
) -> Result<(), ApiError> {
    app.auth.allowed(ip)?;
    if !app.config.master_slow_down {
        return app.auth.check(ip, Some(key));
    }
    tokio::time::timeout(within, weighed(app, ip, key, counting))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Unavailable(
                "the database did not answer in time to count wrong keys; try again".into(),
            ))
        })
}

async fn weighed(
    app: &App,
    ip: Option<IpAddr>,
    key: &str,
    counting: Counting,
) -> Result<(), ApiError> {
    let who = counted_as(ip);
    let seen = app.store.wrong_keys(&who).await?;
    if seen.is_none() && counting == Counting::WhenWrong {
        let checked = app.auth.check(ip, Some(key));
        if checked.is_err() {
            count(app, &who, None).await?;
        }
        return checked;
    }
    count(app, &who, seen).await?;
    let checked = app.auth.check(ip, Some(key));
    if checked.is_ok() {
        app.store.wrong_keys_forget(&who).await?;
    }
    checked
}

/// Whose count an attempt from `ip` joins: an IPv4 address (also as
/// an IPv4-mapped IPv6 one) is its own, an IPv6 address counts for its
/// whole /64, which one host is usually given, so a guesser cannot
/// take a fresh address for each try.
fn counted_as(ip: Option<IpAddr>) -> String {
    match ip.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(net))
        }
        None => "unknown".to_string(),
    }
}

/// Counts one more attempt from `who` (`seen` is what its caller read),
/// unless the address must wait first.
async fn count(
    app: &App,
    who: &str,
    mut seen: Option<console_signin::Model>,
) -> Result<(), ApiError> {
    for _ in 0..CLAIM_TRIES {
        let now = chrono::Utc::now();
        if let Some(f) = &seen {
            let wait = chrono::Duration::from_std(wait_after(f.failures)).unwrap_or_default();
            let left = f.last_failure + wait - now;
            if left > chrono::Duration::zero() {
                return Err(waiting(app, left.to_std().unwrap_or_default()));
            }
        }
        if app
            .store
            .wrong_key_counted(who, seen.as_ref().map(|f| f.failures), now)
            .await?
        {
            return Ok(());
        }
        seen = app.store.wrong_keys(who).await?;
    }
    Err(waiting(app, Duration::from_secs(1)))
}

fn waiting(app: &App, left: Duration) -> ApiError {
    app.auth.count_waiting();
    ApiError::TooManyWrongKeys(left.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_counts_for_its_64() {
        let as_ = |ip: &str| counted_as(Some(ip.parse().unwrap()));
        assert_eq!(as_("192.0.2.7"), "192.0.2.7");
        assert_eq!(as_("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(as_("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(as_("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64");
        assert_eq!(as_("2001:db8:1:3::1"), "2001:db8:1:3::/64");
        assert_eq!(as_("::1"), "::/64");
        assert_eq!(counted_as(None), "unknown");
    }

    #[test]
    fn waits_grow_and_stop_growing() {
        assert_eq!(wait_after(0), Duration::ZERO);
        assert_eq!(wait_after(FREE_FAILURES - 1), Duration::ZERO);
        assert_eq!(wait_after(FREE_FAILURES), Duration::from_secs(1));
        assert_eq!(wait_after(FREE_FAILURES + 2), Duration::from_secs(4));
        assert_eq!(wait_after(1000), MAX_WAIT);
    }
}
