//! The HTTP API: public routes (`/ping`, `/file/{id}`, plugins' own
//! `/plugin/{name}/...` ([`public`]), the API documentation) and the
//! management API under `/manage/v2` ([`manage`]).
//!
//! warp matches the top-level routes; request bodies are read here with a
//! size cap, and the client's socket address arrives as a request extension
//! set by the accept loop in [`crate::server`].

pub mod auth;
pub mod body;
pub mod budget;
pub mod charset;
pub mod console;
pub mod error;
pub mod form;
pub mod guessing;
pub mod manage;
pub mod metrics;
pub mod public;
pub mod push;
pub mod reply;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use roboger_plugin_sdk::protocol::HOPS_HEADER;
use warp::Filter;

use crate::App;
use error::ApiError;
use reply::Response;

/// The largest management request body accepted.
pub const MANAGE_BODY_LIMIT: usize = 1024 * 1024;

/// The socket address of the client, inserted into each request's
/// extensions by the accept loop.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

const OPENAPI: &str = include_str!("../../../schema/openapi.yaml");

/// A header as text (`None` when the request has none), or
/// [`push::NotText`] when its value is not visible ASCII. Unlike
/// `warp::header::optional` alone, such a value is no rejection (which
/// the routes would answer as a wrong method): the handler refuses it
/// with a 400 naming the header. A request with the header as text, or
/// without it, passes as through `optional` alone.
fn text_header(
    name: &'static str,
) -> impl Filter<Extract = (Result<Option<String>, push::NotText>,), Error = std::convert::Infallible>
+ Clone {
    warp::header::optional::<String>(name)
        .map(Ok)
        .or(warp::any().map(|| Err(push::NotText)))
        .unify()
}

/// Every route of the server, as one warp filter.
pub fn routes(
    app: Arc<App>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let with_app = warp::any().map(move || app.clone());

    let ping = warp::path!("ping")
        .and(warp::get())
        .and(with_app.clone())
        .then(|app: Arc<App>| async move { ping(&app).await });

    // The management API and the console route their own paths.
    let self_routed = warp::path::full()
        .and_then(|p: warp::path::FullPath| async move {
            SelfRouted::of(p.as_str()).ok_or_else(warp::reject::not_found)
        })
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::body::stream())
        .and(with_app.clone())
        .then(
            |which: SelfRouted,
             query: String,
             method: Method,
             headers: HeaderMap,
             peer: Option<PeerAddr>,
             body,
             app: Arc<App>| async move {
                let length = content_length(&headers);
                let limit = match &which {
                    SelfRouted::Manage(_) => MANAGE_BODY_LIMIT,
                    SelfRouted::Console(path) => console::body_limit(&app, path),
                };
                let (body, _room) = match app.bodies.read(body, length, limit).await {
                    Ok(b) => b,
                    Err(e) => return reply::error(&e),
                };
                let req = Request {
                    method: &method,
                    path: which.path(),
                    query: &query,
                    headers: &headers,
                    peer: peer.map(|p| p.0),
                    body,
                };
                match which {
                    SelfRouted::Manage(_) => manage::handle(&app, req).await,
                    SelfRouted::Console(_) => console::handle(&app, req).await,
                }
            },
        );

    let push = warp::path!("push")
        .and(warp::post())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(text_header("content-type"))
        .and(text_header("content-encoding"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(text_header(HOPS_HEADER))
        .and(warp::body::stream())
        .and(with_app.clone())
        .then(
            |query: String,
             content_type,
             content_encoding,
             length: Option<u64>,
             hops,
             body,
             app: Arc<App>| async move {
                let began = std::time::Instant::now();
                let limit = push::body_limit(app.config.push_max_media);
                let headers = push::Headers {
                    content_type,
                    content_encoding,
                    hops,
                };
                let answer = match app.bodies.read(body, length, limit).await {
                    Ok((b, _room)) => match push::push(&app, &query, headers, b).await {
                        Ok(r) => r,
                        Err(e) => reply::error(&e),
                    },
                    Err(e) => reply::error(&e),
                };
                app.metrics.push(answer.status().as_u16(), began.elapsed());
                answer
            },
        );

    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerAddr>())
        .and(with_app.clone())
        .then(
            |headers: HeaderMap, peer: Option<PeerAddr>, app: Arc<App>| async move {
                metrics::scrape(&app, &headers, peer.map(|p| p.0)).await
            },
        );

    let file = warp::path!("file" / String)
        .and(warp::get())
        .and(with_app.clone())
        .then(|id: String, app: Arc<App>| async move { public::file(&app, &id).await });

    let plugin_route = warp::path("plugin")
        .and(warp::path::param::<String>())
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerAddr>())
        .and(warp::body::stream())
        .and(with_app.clone())
        .then(
            |name: String,
             tail: warp::path::Tail,
             method: Method,
             query: String,
             headers: HeaderMap,
             peer: Option<PeerAddr>,
             body,
             app: Arc<App>| async move {
                let length = content_length(&headers);
                let (body, room) = match app
                    .bodies
                    .read(body, length, public::PLUGIN_BODY_LIMIT)
                    .await
                {
                    Ok(b) => b,
                    Err(e) => return reply::error(&e),
                };
                let req = public::PluginRequest {
                    name: &name,
                    path: tail.as_str(),
                    method: &method,
                    query: &query,
                    headers: &headers,
                    peer: peer.map(|p| p.0),
                    body,
                    room,
                };
                let run = public::plugin_route(&app, req);
                match tokio::time::timeout(app.config.timeout * 2, run).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => reply::error(&e),
                    Err(_) => reply::error(&ApiError::Unavailable(
                        "the plugin did not answer in time".into(),
                    )),
                }
            },
        );

    let docs = warp::get()
        .and(warp::path::full())
        .and(with_app.clone())
        .and_then(|path: warp::path::FullPath, app: Arc<App>| async move {
            match docs(&app, path.as_str()) {
                Some(r) => Ok(r),
                None => Err(warp::reject::not_found()),
            }
        });

    let unrouted = warp::path::full()
        .and(warp::method())
        .and(with_app.clone())
        .map(
            |path: warp::path::FullPath, method: Method, app: Arc<App>| {
                unrouted(&app, path.as_str(), &method)
            },
        );

    ping.or(push)
        .unify()
        .or(metrics)
        .unify()
        .or(self_routed)
        .unify()
        .or(file)
        .unify()
        .or(plugin_route)
        .unify()
        .or(docs)
        .unify()
        .or(unrouted)
        .unify()
}

/// One request for a part of the server that routes its own paths (the
/// management API, the console), with its body read.
pub struct Request<'a> {
    pub method: &'a Method,
    /// The path below the part's prefix.
    pub path: &'a str,
    /// The raw query string.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub peer: Option<SocketAddr>,
    pub body: Bytes,
}

/// Which part routes a path, with the path below its prefix.
enum SelfRouted {
    Manage(String),
    Console(String),
}

impl SelfRouted {
    fn of(path: &str) -> Option<SelfRouted> {
        let below = |prefix: &str| {
            let rest = path.strip_prefix(prefix)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| rest.to_string())
        };
        below(manage::PREFIX)
            .map(SelfRouted::Manage)
            .or_else(|| below(console::PREFIX).map(SelfRouted::Console))
    }

    fn path(&self) -> &str {
        match self {
            SelfRouted::Manage(p) | SelfRouted::Console(p) => p,
        }
    }
}

/// The routes' service `S`, answering `HEAD` as `GET` except under
/// `/plugin/`, whose routes take every method and answer for themselves.
/// HTTP wants `HEAD` wherever `GET` is (monitoring probes send it): the
/// route answers as for `GET`, and hyper, which knows the request was
/// `HEAD`, sends the status and headers without the body. Every `Allow`
/// lists `HEAD` next to `GET`.
#[derive(Clone)]
pub struct HeadAsGet<S>(pub S);

impl<S, B> tower_service::Service<http::Request<B>> for HeadAsGet<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if req.method() == Method::HEAD && !req.uri().path().starts_with("/plugin/") {
            *req.method_mut() = Method::GET;
        }
        self.0.call(req)
    }
}

/// What no route took: 405 with `Allow` for a path the server has (with
/// another method), else 404. (`/manage/v2/…` and `/plugin/…` take every
/// method and answer for themselves.)
fn unrouted(app: &App, path: &str, method: &Method) -> Response {
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let allow = match segs.as_slice() {
        ["ping"] | ["metrics"] => Some("GET, HEAD"),
        ["push"] => Some("POST"),
        ["file", id] if !id.is_empty() => Some("GET, HEAD"),
        _ if docs_page(app, path).is_some() => Some("GET, HEAD"),
        _ => None,
    };
    match allow {
        Some(allow) => reply::not_allowed(method, path, allow),
        None => reply::text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The documentation pages: the page at the `api-doc` path and the
/// OpenAPI document next to it.
#[derive(Clone, Copy)]
enum DocsPage {
    Index,
    OpenApi,
}

fn docs_page(app: &App, path: &str) -> Option<DocsPage> {
    let base = app.config.api_doc.as_deref()?.trim_end_matches('/');
    match path.strip_prefix(base)? {
        "" | "/" => Some(DocsPage::Index),
        "/openapi.yaml" => Some(DocsPage::OpenApi),
        _ => None,
    }
}

/// 204 when the database answers within the timeout and this node's
/// heartbeat was written within `node-timeout`; 503 otherwise.
async fn ping(app: &App) -> Response {
    match tokio::time::timeout(app.config.timeout, app.store.ping()).await {
        Ok(Ok(())) => {
            // A database that answers reads may still refuse this node's
            // writes: its heartbeat says so (the heartbeat's outage is
            // logged where it fails).
            let silent = app.node.silent_for();
            let limit = app.config.delivery.node_timeout;
            if silent < limit {
                return reply::empty(StatusCode::NO_CONTENT);
            }
            reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the database takes no writes from this node: its heartbeat was last \
                     written {:.1} s ago (node-timeout is {:.1} s); see the log",
                    silent.as_secs_f64(),
                    limit.as_secs_f64()
                ),
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "ping: database error");
            reply::text(StatusCode::SERVICE_UNAVAILABLE, "database error")
        }
        Err(_) => {
            tracing::warn!("ping: the database did not answer in time");
            reply::text(StatusCode::SERVICE_UNAVAILABLE, "database timeout")
        }
    }
}

/// The API documentation: a small page at the `api-doc` path and the
/// OpenAPI document next to it.
fn docs(app: &App, path: &str) -> Option<Response> {
    let base = app.config.api_doc.as_deref()?.trim_end_matches('/');
    Some(match docs_page(app, path)? {
        DocsPage::Index => {
            let page = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Roboger API</title></head>\
                 <body><h1>Roboger {}</h1><p>The REST API is described by \
                 <a href=\"{base}/openapi.yaml\">openapi.yaml</a> (OpenAPI 3).</p></body></html>",
                env!("CARGO_PKG_VERSION")
            );
            let mut r = reply::text(StatusCode::OK, page);
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        DocsPage::OpenApi => {
            let mut r = Response::new(openapi(app).into());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/yaml"),
            );
            r
        }
    })
}

/// The OpenAPI document as this server answers it: `PluginName` lists
/// the plugins it has configured (so a generated request names one).
/// Rendered once per set of plugins, not per request: parsing and
/// writing the 40 KB document again for every `GET` of a public path
/// would make it the cheapest way to keep the server busy.
fn openapi(app: &App) -> Bytes {
    /// The last document rendered, with the plugin names it was rendered
    /// for: a reload that changes the plugins renders it again.
    static RENDERED: Mutex<Option<(Vec<String>, Bytes)>> = Mutex::new(None);
    let names: Vec<String> = app
        .plugins
        .list()
        .into_iter()
        .map(|p| p.plugin_name)
        .collect();
    if let Ok(last) = RENDERED.lock()
        && let Some((for_names, doc)) = last.as_ref()
        && *for_names == names
    {
        return doc.clone();
    }
    let doc = Bytes::from(render_openapi(&names));
    if let Ok(mut last) = RENDERED.lock() {
        *last = Some((names, doc.clone()));
    }
    doc
}

/// [`OPENAPI`] with `names` as the `PluginName` enum (left as it is when
/// there are none).
fn render_openapi(names: &[String]) -> String {
    let Ok(mut doc) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(OPENAPI) else {
        return OPENAPI.to_string();
    };
    if let Some(schema) = doc
        .get_mut("components")
        .and_then(|c| c.get_mut("schemas"))
        .and_then(|s| s.get_mut("PluginName"))
        .and_then(|p| p.as_mapping_mut())
        && !names.is_empty()
    {
        let names: Vec<serde_yaml_ng::Value> = names.iter().map(|n| n.as_str().into()).collect();
        schema.insert("enum".into(), names.into());
    }
    serde_yaml_ng::to_string(&doc).unwrap_or_else(|_| OPENAPI.to_string())
}

/// The `Content-Length` of a request, if it has a valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
