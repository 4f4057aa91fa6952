//! Building HTTP answers: JSON, plain-text errors, empty statuses and the
//! `Location`-bearing answers of create and rename.

use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use warp::Reply;

use super::error::{ApiError, retry_secs};

/// The response type every handler returns.
pub type Response = warp::reply::Response;

/// A JSON body with `status`.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

/// An empty body with `status`.
pub fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Default::default());
    *r.status_mut() = status;
    r
}

/// A short plain-text body with `status`.
pub fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = Response::new(msg.into().into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer for a failed request. A body refused for its size was not
/// read to its end, so the connection is closed after the answer rather
/// than reused by the client mid-body. A 503 asks the client to come back
/// (`Retry-After: 1`): it is an overload or an outage, not a refusal. A
/// 429 for wrong keys says how long the address must wait, and one for an
/// address over its limit when its window ends.
pub fn error(e: &ApiError) -> Response {
    let mut r = text(e.status(), e.to_string());
    if e.status() == http::StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ApiError::TooManyWrongKeys(wait)
    | ApiError::OverLimit {
        retry: Some(wait), ..
    } = e
    {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(wait)));
    }
    // The rest of such a body is not worth reading: the connection ends
    // with the answer.
    if matches!(e, ApiError::PayloadTooLarge(_) | ApiError::TooSlow(_)) {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn with_location(mut r: Response, location: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// 201 with `Location`, and the resource when the client asked for it.
pub fn created(location: &str, body: Option<serde_json::Value>) -> Response {
    let r = match body {
        Some(b) => json(StatusCode::CREATED, &b),
        None => empty(StatusCode::CREATED),
    };
    with_location(r, location)
}

/// 200 with the resource when the client asked for it, else 204.
pub fn modified(body: Option<serde_json::Value>) -> Response {
    match body {
        Some(b) => json(StatusCode::OK, &b),
        None => empty(StatusCode::NO_CONTENT),
    }
}

/// 301 with an empty body and `Location` (an address was renamed).
pub fn moved(location: &str) -> Response {
    with_location(empty(StatusCode::MOVED_PERMANENTLY), location)
}

/// 405 for a method `path` does not answer, with `Allow` listing those
/// it does.
pub fn not_allowed(method: &http::Method, path: &str, allow: &'static str) -> Response {
    let mut r = error(&ApiError::MethodNotAllowed(format!(
        "method {method} is not allowed on {path}; allowed: {allow}"
    )));
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}
