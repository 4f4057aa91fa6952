//! Public routes other than `/ping`: public bucket objects at
//! `/file/{id}`, and `/plugin/{name}/...`, the HTTP routes plugins own
//! (answered by the plugin's `http` method).
//!
//! Invariant: what these routes send (a file, a plugin's answer) holds
//! room in the body budget for its size until the last of it is taken
//! or the connection ends, like a request body being read.
//!
//! Invariant: a public file and a plugin's answer are sent sandboxed in
//! an origin of their own (a PDF aside), and a file is never sniffed, so
//! nothing pushed and nothing a plugin serves runs as the console's
//! origin.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use roboger_plugin_sdk::protocol::HttpResponse;
use serde_json::Value;
use warp::Reply;

use super::budget::Room;
use super::error::ApiError;
use super::reply::{self, Response};
use crate::App;
use crate::store::{self, StoreError};
use crate::supervisor::CallError;

/// The largest request body passed to a plugin's HTTP route.
pub const PLUGIN_BODY_LIMIT: usize = 10 * 1024 * 1024;

/// `GET /file/{id}`: a public, unexpired bucket object with the
/// original's headers; anything else is 404.
pub async fn file(app: &App, id: &str) -> Response {
    // Room in the body budget for the object before it is read, held
    // until the last of it is sent: files being sent are bounded like
    // bodies being read.
    let within = app.config.timeout;
    let room = match store::within(within, app.store.bucket_public_size(id)).await {
        Ok(size) => match app
            .bodies
            .room_for(usize::try_from(size).unwrap_or(0))
            .await
        {
            Ok(room) => room,
            Err(e) => return reply::error(&e),
        },
        Err(StoreError::NotFound(_)) => return reply::text(StatusCode::NOT_FOUND, "no such file"),
        Err(e) => return reply::error(&e.into()),
    };
    let obj = match store::within(within, app.store.bucket_get(id, Some(true))).await {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return reply::text(StatusCode::NOT_FOUND, "no such file"),
        Err(e) => return reply::error(&e.into()),
    };
    if let Err(e) = store::within(within, app.store.bucket_touch(id)).await {
        tracing::warn!(object = id, error = %e, "cannot set the access time");
    }
    let left = (obj.expires_at - chrono::Utc::now()).num_seconds().max(0);
    let length = obj.content.len();
    let mut r = warp::reply::stream(Sending {
        rest: Bytes::from(obj.content),
        room: Some(room),
    })
    .into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&obj.mimetype)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("public, max-age={left}")) {
        h.insert(header::CACHE_CONTROL, v);
    }
    // Shown only as what its type says.
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    sandboxed(h, &obj.mimetype, FILE_SANDBOX);
    if let Some(v) = obj
        .fname
        .as_deref()
        .and_then(|f| HeaderValue::from_str(f).ok())
    {
        h.insert(HeaderName::from_static("roboger-file-name"), v);
    }
    if let Some(Value::Object(meta)) = obj.metadata {
        for (k, v) in meta {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            match (
                HeaderName::from_bytes(format!("x-roboger-{k}").as_bytes()),
                HeaderValue::from_str(&text),
            ) {
                (Ok(name), Ok(value)) => {
                    h.insert(name, value);
                }
                _ => {
                    tracing::debug!(object = id, key = %k, "metadata item is not a valid header; not sent")
                }
            }
        }
    }
    r
}

/// The sandbox a public file is sent in: an origin of its own, with no
/// scripts, forms or plugins. What it holds came from whoever pushed it,
/// and an HTML or SVG file's script run in the server's origin, where
/// the console is, would read the console's pages (a signed-in
/// operator's cookie goes with it) and post its forms.
const FILE_SANDBOX: &str = "sandbox";

/// The sandbox a plugin's route answers in: an origin of its own, where
/// a page the plugin serves may run scripts, post forms and open
/// windows, but cannot read the console (a plugin, or a page of it that
/// echoes a link's query, would otherwise act as a signed-in operator).
const PLUGIN_SANDBOX: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// Adds `sandbox` to an answer of type `mimetype`, unless it is a PDF,
/// which Chromium's PDF viewer refuses to show sandboxed (that viewer
/// runs none of the document's script in the origin). A policy the
/// answer has already stays, and both hold.
fn sandboxed(h: &mut HeaderMap, mimetype: &str, sandbox: &'static str) {
    let essence = mimetype.split(';').next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("application/pdf") {
        h.append(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(sandbox),
        );
    }
}

/// A file's or a plugin's answer as it is sent, a slice at a time, with
/// its room in the body budget: the room goes when the last slice has
/// been taken, or when the connection ends first. Slices are copies, so
/// what the connection still queues never keeps the whole buffer alive:
/// the buffer goes with the room.
struct Sending {
    rest: Bytes,
    room: Option<Room>,
}

/// How much of a file is handed to the connection at a time.
const SEND_SLICE: usize = 64 * 1024;

impl futures_util::Stream for Sending {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.rest.is_empty() {
            self.room = None;
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(SEND_SLICE);
        let slice = Bytes::copy_from_slice(&self.rest[..n]);
        if n == self.rest.len() {
            self.rest = Bytes::new();
            self.room = None;
        } else {
            self.rest = self.rest.slice(n..);
        }
        std::task::Poll::Ready(Some(Ok(slice)))
    }
}

/// A request to `/plugin/{name}/{path}`, as the HTTP layer hands it over.
pub struct PluginRequest<'a> {
    pub name: &'a str,
    pub path: &'a str,
    pub method: &'a Method,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub peer: Option<SocketAddr>,
    pub body: Bytes,
    /// The body's room in the budget, kept for the answer when that is
    /// no larger.
    pub room: Room,
}

/// Passes a request to the plugin's `http` method and its answer back.
pub async fn plugin_route(app: &App, req: PluginRequest<'_>) -> Result<Response, ApiError> {
    if !app.plugins.is_configured(req.name) {
        return Err(ApiError::NotFound(format!("no such plugin: {}", req.name)));
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers {
        if let Ok(v) = v.to_str() {
            headers
                .entry(k.as_str().to_string())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    let client_ip = app
        .auth
        .client_ip(req.peer, req.headers)
        .map(|ip| ip.to_string());
    let mut params = serde_json::Map::new();
    params.insert("method".into(), req.method.as_str().into());
    params.insert("path".into(), format!("/{}", req.path).into());
    params.insert("query".into(), req.query.into());
    params.insert(
        "headers".into(),
        serde_json::to_value(headers).unwrap_or_default(),
    );
    params.insert(
        "body".into(),
        base64::engine::general_purpose::STANDARD
            .encode(&req.body)
            .into(),
    );
    params.insert("client_ip".into(), client_ip.into());
    let answer = match app.plugins.call(req.name, "http", params).await {
        Ok(Value::Null) => {
            return Err(ApiError::NotFound(format!(
                "plugin {} serves no HTTP routes",
                req.name
            )));
        }
        Ok(v) => v,
        Err(CallError::Rejected(m) | CallError::Failed(m) | CallError::Later(m, _)) => {
            return Ok(reply::text(
                StatusCode::BAD_GATEWAY,
                format!("plugin {}: {m}", req.name),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let answer = match route_answer(req.name, answer) {
        Ok(a) => a,
        Err(bad) => {
            // The plugin's author reads the server's log, not the client's
            // answer. (Not the path: a plugin's may hold a key, as the
            // Telegram plugin's does.)
            tracing::warn!(plugin = %req.name, "{bad}");
            return Ok(reply::text(StatusCode::BAD_GATEWAY, bad.to_string()));
        }
    };
    let room = app
        .bodies
        .room_for_answer(req.room, answer.body.len())
        .await?;
    Ok(answer.response(room))
}

/// A plugin's answer to a request on its route, checked.
#[derive(Debug)]
pub struct RouteAnswer {
    pub status: StatusCode,
    /// The plugin's headers that are valid HTTP, less the framing ones.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RouteAnswer {
    /// The answer as sent, holding `room` until its body has been taken.
    fn response(self, room: Room) -> Response {
        let length = self.body.len();
        let mut r = warp::reply::stream(Sending {
            rest: self.body,
            room: Some(room),
        })
        .into_response();
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        let mimetype = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        sandboxed(r.headers_mut(), &mimetype, PLUGIN_SANDBOX);
        if has_body(self.status) {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        r
    }
}

/// A plugin's `http` method answered with something that is not an HTTP
/// answer (sent on as 502).
#[derive(Debug, thiserror::Error)]
#[error("plugin {plugin} answered {what}")]
pub struct BadAnswer {
    plugin: String,
    what: String,
}

/// The HTTP answer a plugin's `http` method described (status, headers,
/// base64 body). Headers that are not valid HTTP are left out.
pub fn route_answer(name: &str, answer: Value) -> Result<RouteAnswer, BadAnswer> {
    let bad = |what: String| BadAnswer {
        plugin: name.to_string(),
        what,
    };
    let answer: HttpResponse = match serde_json::from_value(answer) {
        Ok(a) => a,
        Err(e) => {
            return Err(bad(format!("badly: {e}")));
        }
    };
    // A final status: 1xx would break the exchange.
    let Some(status) = StatusCode::from_u16(answer.status)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
    else {
        return Err(bad(format!(
            "with status {}, which is not a final HTTP status (200 to 599)",
            answer.status
        )));
    };
    let body = match base64::engine::general_purpose::STANDARD.decode(&answer.body) {
        Ok(body) => body,
        Err(e) => return Err(bad(format!("with a body that is not base64 ({e})"))),
    };
    let mut headers = HeaderMap::new();
    for (k, v) in answer.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) && !FRAMING_HEADERS.contains(&name)
        {
            headers.append(name, value);
        }
    }
    let body = if has_body(status) {
        body.into()
    } else {
        Bytes::new()
    };
    Ok(RouteAnswer {
        status,
        headers,
        body,
    })
}

/// Whether an answer with `status` has a body, and so a length: 204 and
/// 304 have neither.
fn has_body(status: StatusCode) -> bool {
    !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// Headers that describe the connection or the body's framing: the
/// server sets them itself, and a plugin's (a wrong Content-Length)
/// would corrupt the connection.
const FRAMING_HEADERS: [HeaderName; 7] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::StreamExt;
    use tokio::sync::Semaphore;

    use super::*;

    #[tokio::test]
    async fn an_answer_gives_its_buffer_and_room_back_with_its_last_slice() {
        let budget = Arc::new(Semaphore::new(300));
        let room = budget.clone().try_acquire_many_owned(300).unwrap();
        let buffer = Bytes::from(vec![7u8; 3 * SEND_SLICE + 10]);
        let mut sending = Sending {
            rest: buffer.clone(),
            room: Some(room),
        };
        // The slices the connection may still queue, all kept.
        let mut queued = Vec::new();
        for _ in 0..3 {
            queued.push(sending.next().await.unwrap().unwrap());
            assert_eq!(budget.available_permits(), 0);
        }
        queued.push(sending.next().await.unwrap().unwrap());
        assert_eq!(budget.available_permits(), 300, "the room is back");
        assert!(
            buffer.is_unique(),
            "the queued slices or the stream still hold the buffer"
        );
        assert_eq!(queued.iter().map(Bytes::len).sum::<usize>(), buffer.len());
        assert!(sending.next().await.is_none());
    }
}
