//! Building HTTP answers: JSON, plain-text errors, empty statuses, the
//! `Location`-bearing answers of create and rename, and long JSON lists
//! sent a page at a time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde_json::Value;
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

/// Items a page of a listed answer holds: what one list keeps in memory,
/// however long it is.
pub const LIST_PAGE: u64 = 500;

/// A JSON array of every item `page` gives, read and sent a page at a
/// time: `page(after)` gives up to [`LIST_PAGE`] items, each with its key,
/// after the key `after` (0 for the first page), in the keys' order. So
/// the answer holds one page in memory, not the whole list (an address
/// list of 100,000 took 166 MiB at once). The first page is read before
/// the answer starts, so its failure is answered as any error is, and a
/// list it holds whole is answered with its length as any answer; each
/// read has `timeout`. A later page that fails ends the connection
/// before the array's end, so no client takes the part for the whole.
/// The list is not one snapshot: an item made or deleted while it is
/// sent may be in it or not.
pub async fn json_pages<P, F>(timeout: Duration, page: P) -> Result<Response, ApiError>
where
    P: Fn(i64) -> F + Send + 'static,
    F: Future<Output = Result<Vec<(i64, Value)>, ApiError>> + Send,
{
    let read = move |after| {
        let read = tokio::time::timeout(timeout, page(after));
        async move {
            read.await.unwrap_or_else(|_| {
                Err(ApiError::Unavailable(
                    "the database did not answer in time".into(),
                ))
            })
        }
    };
    let first = read(0).await?;
    if (first.len() as u64) < LIST_PAGE {
        // All of it: an answer of known length, as any other.
        let items: Vec<Value> = first.into_iter().map(|(_, v)| v).collect();
        return Ok(json(StatusCode::OK, &items));
    }
    // One page waits in the channel while the next is read.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    tokio::spawn(async move {
        let mut items = first;
        let mut chunk = b"[".to_vec();
        let mut empty = true;
        loop {
            let last = items.last().map(|(k, _)| *k);
            let more = items.len() as u64 == LIST_PAGE;
            for (_, item) in items {
                if !empty {
                    chunk.push(b',');
                }
                empty = false;
                if let Err(e) = serde_json::to_writer(&mut chunk, &item) {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            }
            let (Some(last), true) = (last, more) else {
                chunk.push(b']');
                let _ = tx.send(Ok(Bytes::from(chunk))).await;
                return;
            };
            if tx
                .send(Ok(Bytes::from(std::mem::take(&mut chunk))))
                .await
                .is_err()
            {
                return; // the client is gone
            }
            items = match read(last).await {
                Ok(items) => items,
                Err(e) => {
                    tracing::warn!(error = %e, "a list answer ends unfinished: a page could not be read");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
        }
    });
    let mut r = warp::reply::stream(Pages(rx)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// A list answer's pages as they are read.
struct Pages(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl futures_util::Stream for Pages {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
