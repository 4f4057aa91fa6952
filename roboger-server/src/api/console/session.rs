//! Who is signed in to the console: the session cookie, the CSRF token of
//! its forms, and the slowing down of repeated failed sign-ins.
//!
//! A session is a random token in an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` when the public URL is https); the database keeps only its
//! SHA-256, with its CSRF token and expiry, so every node knows it and
//! signing out ends it everywhere.
//!
//! Invariant: the master key is only ever compared, never stored in a
//! session or sent back to the browser.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::App;
use crate::api::error::ApiError;
use crate::store::entity::console_session;

/// The session cookie's name.
pub const COOKIE: &str = "roboger_console";
/// How long a session lasts from sign-in.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins from one address allowed before each further attempt
/// must wait.
pub const FREE_FAILURES: i32 = 3;
/// The longest wait between sign-in attempts from one address.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A signed-in console session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The digest of its cookie (the database key).
    pub id: String,
    /// The token every state-changing form carries.
    pub csrf: String,
}

impl Session {
    /// Whether a form's `csrf` field is this session's token.
    pub fn csrf_ok(&self, given: Option<&str>) -> bool {
        given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(self.csrf.as_bytes())))
    }
}

fn token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The session cookie's value in a request, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The session a request's cookie names, if it is still valid.
pub async fn current(app: &App, headers: &HeaderMap) -> Result<Option<Session>, ApiError> {
    let Some(token) = cookie(headers) else {
        return Ok(None);
    };
    let id = digest(token);
    let row = app.store.session_get(&id, chrono::Utc::now()).await?;
    Ok(row.map(|r| Session { id, csrf: r.csrf }))
}

/// Starts a session; returns the `Set-Cookie` value that carries it.
pub async fn start(app: &App) -> Result<String, ApiError> {
    let token = token();
    let now = chrono::Utc::now();
    app.store
        .session_create(console_session::Model {
            id: digest(&token),
            csrf: self::token(),
            created: now,
            expires: now + chrono::Duration::from_std(LIFETIME).unwrap_or_default(),
        })
        .await?;
    Ok(set_cookie(app, &token, LIFETIME.as_secs()))
}

/// Ends a session; returns the `Set-Cookie` value that clears it.
pub async fn end(app: &App, s: &Session) -> Result<String, ApiError> {
    app.store.session_delete(&s.id).await?;
    Ok(set_cookie(app, "", 0))
}

fn set_cookie(app: &App, value: &str, max_age: u64) -> String {
    let secure = app
        .config
        .public_url
        .as_ref()
        .is_some_and(|u| u.scheme() == "https");
    format!(
        "{COOKIE}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
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

/// The outcome of a sign-in attempt.
#[derive(Debug)]
pub enum SignIn {
    /// Signed in: the `Set-Cookie` value.
    Started(String),
    /// The key was wrong (or missing).
    Refused,
    /// Too many failures from this address: try again after this long.
    Wait(Duration),
}

/// How many times a sign-in reads its address's failures again after
/// other attempts from that address were counted first, before it is
/// answered as one that must wait.
const CLAIM_TRIES: usize = 8;

/// Checks the key given by the sign-in form from `ip` (the network check
/// of `master.allow` has passed), counting failures per address.
///
/// Each attempt is counted as a failure before its key is checked, and
/// only if no other attempt from the address was counted since this one
/// read the count; a success then forgets them all. So attempts sent at
/// once are weighed one by one, and a wait starts when the attempt that
/// set it was counted, not when it began reading.
pub async fn sign_in(app: &App, ip: Option<IpAddr>, key: &str) -> Result<SignIn, ApiError> {
    let who = ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    let mut claimed = false;
    for _ in 0..CLAIM_TRIES {
        let seen = app.store.signin_failures(&who).await?;
        let now = chrono::Utc::now();
        if let Some(f) = &seen {
            let wait = chrono::Duration::from_std(wait_after(f.failures)).unwrap_or_default();
            let left = f.last_failure + wait - now;
            if left > chrono::Duration::zero() {
                let left = left.to_std().unwrap_or_default();
                return Ok(SignIn::Wait(left.max(Duration::from_secs(1))));
            }
        }
        if app
            .store
            .signin_claim(&who, seen.map(|f| f.failures), now)
            .await?
        {
            claimed = true;
            break;
        }
    }
    if !claimed {
        return Ok(SignIn::Wait(Duration::from_secs(1)));
    }
    match app.auth.check(ip, Some(key)) {
        Ok(()) => {
            app.store.signin_clear(&who).await?;
            tracing::info!(client = %who, "console: signed in");
            Ok(SignIn::Started(start(app).await?))
        }
        Err(ApiError::Forbidden(_) | ApiError::Unauthorized) => {
            tracing::warn!(client = %who, "console: failed sign-in");
            Ok(SignIn::Refused)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_and_stop_growing() {
        assert_eq!(wait_after(0), Duration::ZERO);
        assert_eq!(wait_after(FREE_FAILURES - 1), Duration::ZERO);
        assert_eq!(wait_after(FREE_FAILURES), Duration::from_secs(1));
        assert_eq!(wait_after(FREE_FAILURES + 2), Duration::from_secs(4));
        assert_eq!(wait_after(1000), MAX_WAIT);
    }

    #[test]
    fn finds_its_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; roboger_console=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h), Some("xyz"));
        let mut h = HeaderMap::new();
        h.append(http::header::COOKIE, "roboger_consolex=1".parse().unwrap());
        assert_eq!(cookie(&h), None);
    }
}
