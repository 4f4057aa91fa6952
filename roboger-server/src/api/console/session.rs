//! Who is signed in to the console: the session cookie, the CSRF token of
//! its forms, and signing in (slowed down after wrong keys by
//! `api::guessing`).
//!
//! A session is a random token in an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` when the public URL is https); the database keeps only the
//! SHA-256 of the token and the master key's digest, with its CSRF token
//! and expiry, so every node with that key knows it, signing out ends it
//! everywhere, and a new master key ends the old key's sessions.
//!
//! Invariant: the master key is only ever compared, never stored in a
//! session or sent back to the browser; a session is found only with the
//! key it was signed in with.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::App;
use crate::api::error::ApiError;
use crate::api::guessing::{self, Counting};
use crate::log_budget;
use crate::store::entity::console_session;

/// The session cookie's name.
pub const COOKIE: &str = "roboger_console";
/// How long a session lasts from sign-in.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
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

/// A session's id in the database: the digest of its cookie's token
/// and of the master key it was signed in with, so a node with another
/// key (the key changed, the nodes restarted) knows none of the old
/// key's sessions, and the database alone gives neither the token nor
/// the key.
fn digest(app: &App, token: &str) -> String {
    let mut d = Sha256::new();
    d.update(app.auth.key_digest());
    d.update(token.as_bytes());
    d.finalize().iter().map(|b| format!("{b:02x}")).collect()
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
    let id = digest(app, token);
    let row = app.store.session_get(&id, chrono::Utc::now()).await?;
    Ok(row.map(|r| Session { id, csrf: r.csrf }))
}

/// Starts a session; returns the `Set-Cookie` value that carries it.
pub async fn start(app: &App) -> Result<String, ApiError> {
    let token = token();
    let now = chrono::Utc::now();
    app.store
        .session_create(console_session::Model {
            id: digest(app, &token),
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

/// The outcome of a sign-in attempt.
#[derive(Debug)]
pub enum SignIn {
    /// Signed in: the `Set-Cookie` value.
    Started(String),
    /// The key was wrong (or missing).
    Refused,
    /// Too many wrong keys from this address: try again after this long.
    Wait(Duration),
}

/// Checks the key given by the sign-in form from `ip` (the network check
/// of `master.allow` has passed). Every attempt is counted among its
/// address's wrong keys before its key is checked (`api::guessing`), so
/// attempts sent at once gain no extra tries.
pub async fn sign_in(app: &App, ip: Option<IpAddr>, key: &str) -> Result<SignIn, ApiError> {
    let who = ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    match guessing::check_key(app, ip, key, Counting::Always, app.config.timeout).await {
        Ok(()) => {
            tracing::info!(client = %who, "console: signed in");
            Ok(SignIn::Started(start(app).await?))
        }
        Err(ApiError::TooManyWrongKeys(wait)) => Ok(SignIn::Wait(wait)),
        Err(ApiError::Forbidden(_) | ApiError::Unauthorized) => {
            if log_budget::REFUSED.logged() {
                tracing::warn!(client = %who, "console: failed sign-in");
            }
            Ok(SignIn::Refused)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
