//! Delivering over HTTP (the `http` feature): one shared client, a JSON
//! request with the server's timeout, and any non-2xx answer reported as
//! a failed delivery, which the server retries.

use std::sync::OnceLock;
use std::time::Duration;

pub use reqwest;

use crate::{Host, PluginError};

static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

/// The shared client (for requests `send_json` does not cover, such as
/// multipart uploads).
pub fn client() -> Result<&'static reqwest::Client, PluginError> {
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    // TLS through rustls with the ring provider (no cmake needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .user_agent(concat!("Roboger/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(PluginError::failed)?;
    Ok(CLIENT.get_or_init(|| c))
}

/// Sends `body` (already JSON text) to `url` with `method` and extra
/// `headers`, within the server's timeout; a non-2xx answer is an error.
pub async fn send_json(
    host: &Host,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(), PluginError> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(PluginError::failed)?;
    let timeout = host.get_timeout().await.unwrap_or(5.0);
    let mut req = client()?
        .request(method, url)
        .timeout(Duration::from_secs_f64(timeout))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| PluginError::failed(format!("{url}: {e}")))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(PluginError::failed(format!(
            "{url} answered {}",
            resp.status()
        )))
    }
}

/// Checks `config[key]`, when present, like [`check_url`].
pub fn check_config_url(config: &serde_json::Value, key: &str) -> Result<(), PluginError> {
    match config.get(key).and_then(serde_json::Value::as_str) {
        Some(u) => check_url(key, u),
        None => Ok(()),
    }
}

/// Checks that `url` is an http or https URL (for `validate_config`).
pub fn check_url(key: &str, url: &str) -> Result<(), PluginError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| PluginError::rejected(format!("{key}: {e}")))?;
    if matches!(parsed.scheme(), "http" | "https") {
        Ok(())
    } else {
        Err(PluginError::rejected(format!(
            "{key}: must be an http or https URL"
        )))
    }
}
