//! Delivering over HTTP (the `http` feature): one shared client, a JSON
//! request within [`Host::call_budget`] (just under the server's
//! timeout), and any non-2xx answer reported as
//! a failed delivery, which the server retries (unless the plugin says
//! the status is final).

use std::sync::OnceLock;
use std::time::Duration;

pub use reqwest;

use crate::secret::url_without_secrets;
use crate::{Host, PluginError, egress};

static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

/// The shared client (for requests `send_json` does not cover, such as
/// multipart uploads).
pub fn client() -> Result<&'static reqwest::Client, PluginError> {
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    // TLS through rustls with the ring provider (no cmake needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Every connection is checked against the egress policy: names as
    // they resolve, and every connection's peer address (literal
    // addresses, redirect hops). No proxy from the environment: it would
    // be the only address checked.
    let c = reqwest::Client::builder()
        .user_agent(concat!("Roboger/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .dns_resolver(std::sync::Arc::new(egress::Resolver))
        .connector_layer(egress::GuardLayer)
        .redirect(reqwest::redirect::Policy::custom(|hop| {
            // A literal address is checked before connecting, so the
            // error names the rule even when nothing listens there.
            if hop.previous().len() >= MAX_REDIRECTS {
                return hop.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            // Followed, these would send the next request as a GET
            // without the body: the event would be "delivered" to
            // whatever page answers there, and lost. Their answer is
            // the request's, a failed delivery that says where to.
            if BODY_LOSING.contains(&hop.status()) {
                return hop.stop();
            }
            match egress::literal(hop.url()).map(|ip| egress::current().check(ip)) {
                Some(Err(refused)) => hop.error(refused),
                _ => hop.follow(),
            }
        }))
        .build()
        .map_err(PluginError::failed)?;
    Ok(CLIENT.get_or_init(|| c))
}

/// Sends `body` (already JSON text) to `url` with `method` and extra
/// `headers`, within the server's timeout; a non-2xx answer is an error.
/// A GET is sent without the body.
pub async fn send_json(
    host: &Host,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(), PluginError> {
    send_json_with_final(host, method, url, headers, body, &[]).await
}

/// [`send_json`], where an answer with one of the `final` statuses is
/// [`PluginError::Rejected`]: the server will not try the delivery again.
pub async fn send_json_with_final(
    host: &Host,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
    r#final: &[reqwest::StatusCode],
) -> Result<(), PluginError> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(PluginError::failed)?;
    // A GET carries no body: content in one has no meaning (RFC 9110,
    // 9.3.1), and some front ends refuse the request for it.
    let bodiless = method == reqwest::Method::GET;
    // Parsed once, for the policy and the request.
    let parsed = checked(url)?;
    let timeout = host.call_budget().await;
    let req = match parsed {
        Some(u) => client()?.request(method, u),
        None => client()?.request(method, url),
    };
    // The caller's headers replace the JSON Content-Type, not add to it.
    let mut map = reqwest::header::HeaderMap::with_capacity(headers.len() + 1);
    if !bodiless {
        map.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
    }
    for (k, v) in headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes());
        let value = reqwest::header::HeaderValue::from_str(v);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Err(PluginError::rejected(format!(
                "header {k:?}: not a valid HTTP header"
            )));
        };
        map.insert(name, value);
    }
    let req = req.timeout(timeout).headers(map);
    let req = if bodiless { req } else { req.body(body) };
    let resp = req.send().await.map_err(|e| request_error(url, &e))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        let for_good = r#final.contains(&resp.status());
        Err(answer_error(url, resp, for_good).await)
    }
}

/// Bytes of a refusing answer's body that its error quotes at most.
const QUOTED: usize = 200;

/// A non-2xx answer as a delivery error: its status and the start of its
/// body, which often says why (another Roboger's answers do);
/// [`PluginError::Rejected`] when `for_good`, else [`PluginError::Failed`],
/// or [`PluginError::Later`] when a 429 or 503 says with `Retry-After`
/// how long to wait.
async fn answer_error(url: &str, mut resp: reqwest::Response, for_good: bool) -> PluginError {
    let url = url_without_secrets(url);
    let status = resp.status();
    let wait = match status {
        reqwest::StatusCode::TOO_MANY_REQUESTS | reqwest::StatusCode::SERVICE_UNAVAILABLE => resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now())),
        _ => None,
    };
    let mut body = Vec::new();
    // Within the request's timeout, as the rest of the answer.
    while body.len() < QUOTED {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) | Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(QUOTED)]);
    let text: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let mut msg = if text.is_empty() {
        format!("{url} answered {status}")
    } else {
        format!("{url} answered {status}: {text}")
    };
    if BODY_LOSING.contains(&status) {
        // Where it leads, whole when it parses against the request's URL.
        let to = match resp.headers().get(reqwest::header::LOCATION) {
            Some(to) => {
                let to = String::from_utf8_lossy(to.as_bytes());
                resp.url()
                    .join(&to)
                    .map_or_else(|_| to.into_owned(), String::from)
            }
            None => "nowhere".to_string(),
        };
        let to: String = url_without_secrets(&to)
            .chars()
            .take(QUOTED)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        msg.push_str(&format!(
            " (a redirect to {to}, not followed: the request would arrive there as a GET \
             without its body; set the URL to where it leads, or have it redirect with 307 or 308)"
        ));
    }
    match wait {
        _ if for_good => PluginError::rejected(msg),
        Some(wait) => PluginError::Later(msg, wait),
        None => PluginError::failed(msg),
    }
}

/// A `Retry-After` value as a wait from `now`: whole seconds, or an
/// HTTP-date (one already past is no wait). `None` when it is neither.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Redirects followed at most (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// The redirects that turn the next request into a GET without a body
/// (as browsers, `requests` and reqwest follow them); 307 and 308 keep
/// the method and body and are followed.
const BODY_LOSING: [reqwest::StatusCode; 3] = [
    reqwest::StatusCode::MOVED_PERMANENTLY,
    reqwest::StatusCode::FOUND,
    reqwest::StatusCode::SEE_OTHER,
];

/// Refuses `url` when it names an address the egress policy refuses (a
/// host name is checked as it resolves, at connect time); else the URL,
/// parsed (`None` when it does not parse: the request will say why).
pub fn checked(url: &str) -> Result<Option<reqwest::Url>, PluginError> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(None);
    };
    match egress::literal(&parsed).map(|ip| egress::current().check(ip)) {
        Some(Err(r)) => Err(PluginError::rejected(format!(
            "{}: {r}",
            url_without_secrets(url)
        ))),
        _ => Ok(Some(parsed)),
    }
}

/// A failed request as a delivery error, naming `url` without its
/// password: refused by the egress policy is [`PluginError::Rejected`]
/// (the server does not retry it), with the rule; anything else is
/// [`PluginError::Failed`].
pub fn request_error(url: &str, e: &reqwest::Error) -> PluginError {
    let url = url_without_secrets(url);
    match egress::refused_in(e) {
        Some(r) => PluginError::rejected(format!("{url}: {r}")),
        None => {
            // reqwest's own text names the URL it was sending to
            // ("error sending request for url (…)"), query token and
            // all: it is said as `url` is.
            let mut text = with_causes(e);
            if let Some(sent) = e.url().map(reqwest::Url::as_str) {
                text = text.replace(sent, &url_without_secrets(sent));
            }
            PluginError::failed(format!("{url}: {text}"))
        }
    }
}

/// An error's text followed by its causes', which say what went wrong
/// (reqwest's own says only "error sending request"): each cause whose
/// text the message does not already hold, after a colon.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
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
        // A literal address the policy refuses can never be delivered to.
        match egress::literal(&parsed).map(|ip| egress::current().check(ip)) {
            Some(Err(r)) => Err(PluginError::rejected(format!("{key}: {r}"))),
            _ => Ok(()),
        }
    } else {
        Err(PluginError::rejected(format!(
            "{key}: must be an http or https URL"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Egress;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server on 127.0.0.1 answering every request with a redirect to `to`.
    async fn redirecting(to: String) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n"
                );
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        base
    }

    /// A refusal quotes the start of the answer, on one line, and is
    /// final only when the plugin says its status is.
    #[tokio::test]
    async fn a_refusal_quotes_the_start_of_the_answer() {
        let answer = |body: String| {
            let r = http::Response::builder().status(409).body(body).unwrap();
            reqwest::Response::from(r)
        };
        let body = format!("  looped\r\nagain\t{}", "x".repeat(500));
        let e = answer_error("http://u/push", answer(body), true).await;
        let PluginError::Rejected(m) = e else {
            panic!("not final: {e:?}")
        };
        let quoted = format!("looped  again {}", "x".repeat(200 - 16));
        assert_eq!(m, format!("http://u/push answered 409 Conflict: {quoted}"));
        let e = answer_error("http://u/push", answer(String::new()), false).await;
        assert!(
            matches!(&e, PluginError::Failed(m) if m == "http://u/push answered 409 Conflict"),
            "{e:?}"
        );
    }

    /// A 429 or 503 with `Retry-After` asks for that wait; other
    /// statuses, unreadable values and final refusals do not.
    #[tokio::test]
    async fn retry_after_on_429_and_503_is_a_wait() {
        let answer = |status: u16, retry: Option<&str>| {
            let mut r = http::Response::builder().status(status);
            if let Some(v) = retry {
                r = r.header("retry-after", v);
            }
            reqwest::Response::from(r.body(String::new()).unwrap())
        };
        let e = answer_error("http://u", answer(429, Some("30")), false).await;
        assert!(
            matches!(&e, PluginError::Later(m, w) if m == "http://u answered 429 Too Many Requests" && *w == Duration::from_secs(30)),
            "{e:?}"
        );
        let e = answer_error("http://u", answer(503, Some(" 2 ")), false).await;
        assert!(
            matches!(e, PluginError::Later(_, w) if w == Duration::from_secs(2)),
            "{e:?}"
        );
        for (status, retry, r#final) in [
            (500, Some("30"), false),
            (429, Some("soon"), false),
            (429, None, false),
            (429, Some("30"), true),
        ] {
            let e = answer_error("http://u", answer(status, retry), r#final).await;
            assert!(
                !matches!(e, PluginError::Later(..)),
                "{status} {retry:?}: {e:?}"
            );
        }
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked() {
        egress::set(&Egress {
            deny: vec!["127.0.0.0/8".into()],
            allow: vec!["127.0.0.1/32".into()],
        });
        let base = redirecting("http://127.0.0.2:9/denied".into()).await;
        let e = client().unwrap().get(&base).send().await.unwrap_err();
        let r = request_error(&base, &e);
        assert!(matches!(r, PluginError::Rejected(_)), "{r:?}");
        assert!(
            r.to_string()
                .contains("egress refused: 127.0.0.2 is in 127.0.0.0/8"),
            "{r}"
        );
    }

    #[tokio::test]
    async fn a_failed_request_says_what_failed() {
        // A port nothing listens on: bound, then let go.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let url = format!("http://{closed}/x");
        let e = client().unwrap().get(&url).send().await.unwrap_err();
        let r = request_error(&url, &e).to_string();
        assert!(r.contains("Connection refused"), "{r}");
        // Each cause once.
        assert_eq!(r.matches("Connection refused").count(), 1, "{r}");
    }
}
