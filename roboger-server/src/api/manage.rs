//! The management API, `/manage/v2`: addresses, endpoints, subscriptions,
//! plugins and core commands, wire-compatible with the original (and with
//! robogerctl), minus its flaws.
//!
//! One router matches the method and path segments; each handler checks
//! its body with [`Body`] and calls the [`Store`](crate::store::Store).
//! Every change made, through the API or the console, is logged with who
//! made it (the `management change` lines): what an operator reads to
//! learn who changed what, and when.
//! Invariant: every request is authenticated before its handler runs.
//! Invariant: an authenticated request runs to its end, logged, whether
//! or not its client waits for the answer.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

use super::Request;
use super::body::Body;
use super::error::{ApiError, bad};
use super::guessing::{self, Counting};
use super::reply::{self, Response};
use crate::App;
use crate::cleanup::{Cleanup, Outcome};
use crate::cluster;
use crate::deletion::Begin;
use crate::store::entity::{ADDR_LEN, PLUGIN_NAME_MAX, addr, endpoint};
use crate::store::{
    AddrPatch, AddrRef, Deleting, EndpointPatch, EventHead, StoreError, SubscriptionPatch,
    SubscriptionRow,
};

/// Where the management API lives.
pub const PREFIX: &str = "/manage/v2";

/// The build identifier reported by `GET /manage/v2/core`.
pub const BUILD: &str = match option_env!("ROBOGER_BUILD") {
    Some(b) => b,
    None => "dev",
};

/// Who sent a management request, for the log of changes.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The client's address (see `ip-header` and `ip-header-from`).
    pub ip: Option<std::net::IpAddr>,
    /// Where the request came in: `api` or `console`.
    pub via: &'static str,
}

/// Authenticates and runs a management request; every failure is answered
/// by its [`ApiError`] status.
pub async fn handle(app: &Arc<App>, req: Request<'_>) -> Response {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(allow) = allowed_methods(&segs) else {
        return reply::error(&ApiError::NotFound(format!(
            "no such resource: {PREFIX}/{}",
            segs.join("/")
        )));
    };
    if !allow.split(", ").any(|m| m == req.method.as_str()) {
        return reply::not_allowed(req.method, &format!("{PREFIX}/{}", segs.join("/")), allow);
    }
    let body = Body::parse(&req.body);
    let header_key = req.headers.get("x-auth-key").and_then(|v| v.to_str().ok());
    let key = header_key.or_else(|| body.as_ref().ok().and_then(Body::key));
    let ip = app.auth.client_ip(req.peer, req.headers);
    let checked = match key {
        Some(key) => {
            guessing::check_key(app, ip, key, Counting::WhenWrong, app.config.timeout).await
        }
        None => app.auth.check(ip, None),
    };
    let run = match (checked, body) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(body)) => {
            let caller = Caller { ip, via: "api" };
            execute(
                app,
                caller,
                req.method,
                &segs,
                req.query,
                req.headers,
                &body,
            )
            .await
        }
    };
    let mut answer = match run {
        Ok(r) => r,
        Err(e) => reply::error(&e),
    };
    if answer.status() == StatusCode::METHOD_NOT_ALLOWED {
        // An unknown command or a protected field: the original's 405,
        // which HTTP wants with the methods the resource has.
        answer
            .headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    }
    answer
}

/// Waits until every other live node obeys the routing changes this node
/// has applied (see [`cluster::wait_obeyed`]), for at most `node-timeout`
/// (or `timeout`, when shorter), and ending [`ANSWER_TIME`] before
/// `deadline` at the latest, since the change is made; the nodes that
/// still do not are named in a warning.
async fn obeyed_everywhere(app: &App, deadline: tokio::time::Instant) {
    let version = app.routes.applied();
    let cfg = &app.config.delivery;
    let limit = cfg
        .node_timeout
        .min(app.config.timeout)
        .min(before_answer(deadline));
    let behind =
        cluster::wait_obeyed(&app.store, &app.node, version, (cfg.node_timeout, limit)).await;
    if !behind.is_empty() {
        app.metrics.routing_unobeyed();
        tracing::warn!(
            version,
            nodes = %behind.join(", "),
            "a routing change is answered though not every node obeys it after {}s: a push \
             through one that does not may not follow it until it does",
            limit.as_secs_f64()
        );
    }
}

/// After a change is made: this node obeys it before answering, and so
/// do the others, which learn of it from the change log (see `routing`),
/// so a push through any node after the answer finds the change obeyed. A
/// request that changed no route (a cleanup, a plugin's restart) waits
/// for nothing. This node's catch-up is bounded by the request's
/// `deadline`, the wait for the others by `answer_by` ([`ANSWER_BY`]),
/// each less [`ANSWER_TIME`]; a failure here is logged, never answered:
/// the change is made, and a client told it failed would make it again
/// (a second address).
async fn made(
    app: &App,
    before: i64,
    (deadline, answer_by): (tokio::time::Instant, tokio::time::Instant),
) {
    let applied = app.routes.catch_up(&app.store);
    match crate::store::within(before_answer(deadline), applied).await {
        Ok(_) if app.routes.applied() > before => obeyed_everywhere(app, answer_by).await,
        Ok(_) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "a management change is made and answered, but this node could not apply it \
             first: its pushes follow it once it does (the log says if it cannot follow \
             routing changes)"
        ),
    }
}

/// How long a request waits for work that may go on longer (a deletion,
/// a cleanup, a retry, making a backlog due) before it answers 202 and
/// lets it go on: half of `timeout`. Its answer, with what comes before
/// and after that wait (a deletion's record, the other nodes obeying
/// it), then reaches a client whose own timeout is the server's in time:
/// robogerctl waits 5 s by default, the server's default `timeout`, and
/// gave up on a long deletion (and on the deploy that asked for it)
/// when the server waited all of `timeout`.
fn going_on_after(app: &App) -> Duration {
    app.config.timeout / 2
}

/// What a change's 503 adds when the change may have been made though
/// its answer was lost ([`ApiError::InDoubt`], or the request's timeout),
/// before it says why and to look before asking again.
const MAY_BE_MADE: &str = "The change may have been made all the same";

/// The share of `timeout`, from a request's start, by which a change's
/// wait for the other nodes to obey it ends at the latest: its answer
/// then reaches a client that waits as long as the server's `timeout`
/// (robogerctl's default 5 s is the server's default), after work that
/// went on ([`going_on_after`]) or a node frozen under it. Before, a
/// frozen node (alive, not obeying) held each change for `node-timeout`
/// or `timeout`, and with `node-timeout` at least `timeout` robogerctl
/// gave up on every change made meanwhile.
const ANSWER_BY: f64 = 0.9;

/// What a management request's timeout keeps for its answer after a
/// change has waited for the other nodes to obey it.
const ANSWER_TIME: Duration = Duration::from_millis(200);

/// How long a change made may go on before its answer, to be answered by
/// the request's `deadline`.
fn before_answer(deadline: tokio::time::Instant) -> Duration {
    deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .saturating_sub(ANSWER_TIME)
}

/// Runs an authenticated management request (the API's, or one the
/// console makes for a form), within the request timeout. A change is
/// logged, and answered once this node's routes obey it, and every other
/// live node's ([`obeyed_everywhere`]).
///
/// It runs in a task of its own: a client that disconnects before the
/// answer (hyper then drops the request) must not cut a change short
/// between its commit and its log line, nor a deletion or a walk over
/// deliveries before it says it has ended.
pub async fn execute(
    app: &Arc<App>,
    caller: Caller,
    method: &Method,
    segs: &[&str],
    query: &str,
    headers: &HeaderMap,
    body: &Body,
) -> Result<Response, ApiError> {
    let timeout = app.config.timeout * 2;
    let change = method != Method::GET;
    let (app, method, query, headers, body) = (
        app.clone(),
        method.clone(),
        query.to_string(),
        headers.clone(),
        body.clone(),
    );
    let segs: Vec<String> = segs.iter().map(|s| (*s).to_string()).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let answer_by = tokio::time::Instant::now() + app.config.timeout.mul_f64(ANSWER_BY);
    let run = async move {
        let before = app.routes.applied();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let answer = route(&app, &method, &segs, &query, &headers, &body).await?;
        if method != Method::GET
            && (answer.status().is_success() || answer.status().is_redirection())
        {
            tracing::info!(
                client = %caller.ip.map_or_else(|| "unknown".to_string(), |ip| ip.to_string()),
                via = %caller.via,
                method = %method,
                path = %logged_path(&segs),
                status = answer.status().as_u16(),
                "management change"
            );
            made(&app, before, (deadline, answer_by)).await;
        }
        Ok(answer)
    };
    let task = tokio::spawn(tokio::time::timeout(timeout, run));
    match task.await {
        // A client told only "database error" would ask again, and a
        // change made (its answer lost) would be made twice: a second
        // address, a second endpoint.
        Ok(Ok(Err(ApiError::InDoubt(said)))) if change => Err(ApiError::Unavailable(format!(
            "{said}. {MAY_BE_MADE} (the database's answer to it did not come back): \
                 look before asking again"
        ))),
        Ok(Ok(Err(ApiError::InDoubt(said)))) => Err(ApiError::Unavailable(said)),
        Ok(Ok(r)) => r,
        Ok(Err(_)) if change => Err(ApiError::Unavailable(format!(
            "timed out; the database or a plugin did not answer. {MAY_BE_MADE}: \
             look before asking again"
        ))),
        Ok(Err(_)) => Err(ApiError::Unavailable(
            "timed out; the database or a plugin did not answer".into(),
        )),
        Err(e) => {
            tracing::error!(error = %e, "a management request stopped");
            Err(ApiError::Unavailable(
                "the request stopped; see the server log".into(),
            ))
        }
    }
}

/// A request's path for the log, an address string in it shortened to
/// its first four characters: an address is all it takes to push to it,
/// and logs travel further than the API.
fn logged_path(segs: &[&str]) -> String {
    let mut path = String::from(PREFIX);
    for (i, seg) in segs.iter().enumerate() {
        path.push('/');
        if i == 1 && segs[0] == "addr" && matches!(AddrRef::parse(seg), AddrRef::A(_)) {
            path.extend(seg.chars().take(4));
            path.push('…');
        } else {
            path.push_str(seg);
        }
    }
    path
}

async fn route(
    app: &App,
    m: &Method,
    segs: &[&str],
    query: &str,
    headers: &HeaderMap,
    body: &Body,
) -> Result<Response, ApiError> {
    let accept = |resource: &str| wants_body(headers, resource);
    match (m.as_str(), segs) {
        ("GET", ["core"]) => {
            body.only(&[], &[])?;
            Ok(reply::json(
                StatusCode::OK,
                &json!({"ok": true, "version": env!("CARGO_PKG_VERSION"), "build": BUILD, "master": true}),
            ))
        }
        ("POST", ["core"]) => core_cmd(app, body).await,
        ("GET", ["plugin"]) => Ok(reply::json(StatusCode::OK, &app.plugins.list())),
        ("POST", ["plugin", name]) => {
            body.only(&["cmd"], &[])?;
            match body.required_str("cmd")? {
                "restart" => {
                    app.plugins.restart(name)?;
                    Ok(reply::empty(StatusCode::NO_CONTENT))
                }
                other => Err(ApiError::MethodNotAllowed(format!(
                    "unknown plugin command \"{other}\"; known: restart"
                ))),
            }
        }

        ("GET", ["node"]) => {
            body.only(&[], &[])?;
            let timeout = app.config.delivery.node_timeout;
            let now = chrono::Utc::now();
            let out: Vec<Value> = cluster::node_list(&app.store, &app.node, app.routes.applied())
                .await?
                .into_iter()
                .map(|r| {
                    let alive = r.alive(now, timeout);
                    let n = r.node;
                    json!({
                        "instance": n.instance, "name": n.name, "version": n.version,
                        "started": n.started.to_rfc3339(),
                        "heartbeat": n.heartbeat.to_rfc3339(),
                        "alive": alive,
                        "rescued": n.rescued.map(|t| t.to_rfc3339()),
                        "leased": r.leased,
                        "routing_version": n.routing_version,
                        "self": n.instance == app.node.instance,
                    })
                })
                .collect();
            Ok(reply::json(StatusCode::OK, &out))
        }
        ("GET", ["addr"]) => {
            let store = app.store.clone();
            let limits = app.config.limits.is_some();
            reply::json_pages(app.config.timeout, move |after| {
                let store = store.clone();
                async move {
                    let page = store.addr_page(None, Some(after), reply::LIST_PAGE).await?;
                    Ok::<_, ApiError>(
                        page.rows
                            .iter()
                            .map(|a| (a.id, addr_json(limits, a)))
                            .collect(),
                    )
                }
            })
            .await
        }
        ("POST", ["addr"]) => {
            body.only(&[], &[])?;
            let a = app.store.addr_create().await?;
            let loc = format!("{PREFIX}/addr/{}", a.a);
            Ok(reply::created(
                &loc,
                accept("addr").then(|| addr_json(app.config.limits.is_some(), &a)),
            ))
        }
        ("GET", ["addr", a]) => {
            let a = app.store.addr_get(&AddrRef::parse(a)).await?;
            Ok(reply::json(
                StatusCode::OK,
                &addr_json(app.config.limits.is_some(), &a),
            ))
        }
        ("PATCH", ["addr", a]) => {
            body.only(&["active", "lim_c", "lim_s"], &["id", "a"])?;
            let patch = AddrPatch {
                active: body.active("active")?,
                lim_c: body.count("lim_c")?,
                lim_s: body.count("lim_s")?,
            };
            let r = AddrRef::parse(a);
            let enabled = patch.active == Some(1) && app.store.addr_get(&r).await?.active != 1;
            let a = app.store.addr_update(&r, patch).await?;
            if enabled {
                waiting_made_due(app, Resumed::AddrEnabled(a.id)).await;
            }
            Ok(reply::modified(
                accept("addr").then(|| addr_json(app.config.limits.is_some(), &a)),
            ))
        }
        ("POST", ["addr", a]) => addr_cmd(app, a, body).await,
        ("DELETE", ["addr", a]) => {
            let a = app.store.addr_get(&AddrRef::parse(a)).await?;
            deleted(app, Deleting::Addr(a.id)).await
        }

        ("GET", ["addr", a, "endpoint"]) => {
            let a = app.store.addr_get(&AddrRef::parse(a)).await?;
            let store = app.store.clone();
            reply::json_pages(app.config.timeout, move |after| {
                let store = store.clone();
                async move {
                    let page = store.endpoint_page(a.id, after, reply::LIST_PAGE).await?;
                    Ok::<_, ApiError>(page.iter().map(|e| (e.id, endpoint_json(e))).collect())
                }
            })
            .await
        }
        ("POST", ["addr", a_seg, "endpoint"]) => {
            body.only(
                &["plugin_name", "config", "description", "active"],
                &["id", "addr_id"],
            )?;
            let plugin = body.required_str("plugin_name")?;
            if !crate::config::valid_plugin_name(plugin) {
                // Not a name at all (a well-formed unknown name is the
                // original's 404 below).
                return Err(bad(format!(
                    "field \"plugin_name\" must be 1 to {PLUGIN_NAME_MAX} of a-z, 0-9, '_' and '-'"
                )));
            }
            let config = body.object("config")?.unwrap_or_else(|| json!({}));
            let description = body.nullable_text("description")?.flatten();
            let active = body.active("active")?;
            let a = app.store.addr_get(&AddrRef::parse(a_seg)).await?;
            if !app.plugins.is_configured(plugin) {
                return Err(ApiError::NotFound(format!("no such plugin: {plugin}")));
            }
            app.plugins.register_secrets(plugin, &config);
            app.plugins.validate_config(plugin, &config).await?;
            // Created as it is asked, in one write: one created disabled
            // is never routed to, even for a moment.
            let ep = app
                .store
                .endpoint_create(a.id, plugin, config, description, active.unwrap_or(1))
                .await?;
            let loc = format!("{PREFIX}/addr/{a_seg}/endpoint/{}", ep.id);
            Ok(reply::created(
                &loc,
                accept("endpoint").then(|| endpoint_json(&ep)),
            ))
        }
        ("GET", ["addr", a, "endpoint", ep]) => {
            let ep = int_id("endpoint", ep)?;
            let a = addr_for(app, a, &format!("endpoint {ep}")).await?;
            let mut v = endpoint_json(&app.store.endpoint_get(a, ep).await?);
            // Its deliveries, from the database: the same on every node.
            let s = app.store.endpoint_delivery_stats(ep).await?;
            v["delivered"] = s.delivered.into();
            v["failed"] = s.failed.into();
            v["pending"] = s.pending.into();
            v["last_error"] = s.last_error.into();
            v["last_error_at"] = s.last_error_at.map(|t| t.to_rfc3339()).into();
            Ok(reply::json(StatusCode::OK, &v))
        }
        ("PATCH", ["addr", a, "endpoint", ep]) => {
            body.only(
                &["config", "active", "description"],
                &["id", "addr_id", "plugin_name"],
            )?;
            let ep = int_id("endpoint", ep)?;
            let a = addr_for(app, a, &format!("endpoint {ep}")).await?;
            let patch = EndpointPatch {
                config: body.object("config")?,
                active: body.active("active")?,
                description: body.nullable_text("description")?,
            };
            let mut resumed = None;
            if patch.config.is_some() || patch.active.is_some() {
                let current = app.store.endpoint_get(a, ep).await?;
                if patch.active == Some(1) && current.active != 1 {
                    resumed = Some(Resumed::EndpointEnabled(ep));
                }
                if let Some(config) = &patch.config {
                    app.plugins.register_secrets(&current.plugin_name, config);
                    app.plugins
                        .validate_config(&current.plugin_name, config)
                        .await?;
                    if *config != current.config {
                        resumed = Some(Resumed::Reconfigured(ep));
                    }
                }
            }
            let ep = app.store.endpoint_update(a, ep, patch).await?;
            if let Some(why) = resumed {
                waiting_made_due(app, why).await;
            }
            Ok(reply::modified(
                accept("endpoint").then(|| endpoint_json(&ep)),
            ))
        }
        ("POST", ["addr", a, "endpoint", ep]) => {
            body.only(&["cmd", "target", "replace"], &[])?;
            let ep = int_id("endpoint", ep)?;
            let a = addr_for(app, a, &format!("endpoint {ep}")).await?;
            app.store.endpoint_get(a, ep).await?;
            match body.required_str("cmd")? {
                "copysub" => {
                    let target = body.id("target")?;
                    app.store
                        .copy_subscriptions(a, ep, target, body.flag("replace")?)
                        .await?;
                    Ok(reply::empty(StatusCode::NO_CONTENT))
                }
                "retry" => {
                    body.only(&["cmd"], &[])?;
                    let store = app.store.clone();
                    let retry = async move {
                        let n = store.endpoint_retry(a, ep).await?;
                        tracing::info!(
                            endpoint = ep,
                            deliveries = n,
                            "failed deliveries queued again by hand"
                        );
                        Ok(n)
                    };
                    match ended_or_going_on(app, "a retry answered 202", retry).await? {
                        Some(n) => Ok(reply::json(StatusCode::OK, &json!({"retried": n}))),
                        None => Ok(reply::text(
                            StatusCode::ACCEPTED,
                            "the retry goes on (many failed deliveries are made pending a chunk \
                             at a time); the server logs how many once it has ended",
                        )),
                    }
                }
                other => Err(ApiError::MethodNotAllowed(format!(
                    "unknown endpoint command \"{other}\"; known: copysub, retry"
                ))),
            }
        }
        ("DELETE", ["addr", a, "endpoint", ep]) => {
            let ep = int_id("endpoint", ep)?;
            let a = addr_for(app, a, &format!("endpoint {ep}")).await?;
            app.store.endpoint_get(a, ep).await?;
            deleted(app, Deleting::Endpoint(a, ep)).await
        }

        ("GET", ["addr", a, "endpoint", ep, "subscription"]) => {
            let ep = int_id("endpoint", ep)?;
            let a = addr_for(app, a, &format!("endpoint {ep}")).await?;
            let list = app.store.subscription_list(a, ep).await?;
            let out: Vec<Value> = list.iter().map(subscription_json).collect();
            Ok(reply::json(StatusCode::OK, &out))
        }
        ("POST", ["addr", a_seg, "endpoint", ep_seg, "subscription"]) => {
            body.only(SUBSCRIPTION_FIELDS, SUBSCRIPTION_PROTECTED)?;
            let patch = subscription_patch(body)?;
            let ep = int_id("endpoint", ep_seg)?;
            let a = addr_for(app, a_seg, &format!("endpoint {ep}")).await?;
            let row = app.store.subscription_create(a, ep, patch).await?;
            let loc = format!(
                "{PREFIX}/addr/{a_seg}/endpoint/{ep_seg}/subscription/{}",
                row.sub.id
            );
            Ok(reply::created(
                &loc,
                accept("subscription").then(|| subscription_json(&row)),
            ))
        }
        ("GET", ["addr", a, "endpoint", ep, "subscription", s]) => {
            let (ep, s) = (int_id("endpoint", ep)?, int_id("subscription", s)?);
            let a = addr_for(app, a, &format!("subscription {s}")).await?;
            Ok(reply::json(
                StatusCode::OK,
                &subscription_json(&app.store.subscription_get(a, ep, s).await?),
            ))
        }
        ("PATCH", ["addr", a, "endpoint", ep, "subscription", s]) => {
            body.only(SUBSCRIPTION_FIELDS, SUBSCRIPTION_PROTECTED)?;
            let patch = subscription_patch(body)?;
            let (ep, s) = (int_id("endpoint", ep)?, int_id("subscription", s)?);
            let a = addr_for(app, a, &format!("subscription {s}")).await?;
            let row = app.store.subscription_update(a, ep, s, patch).await?;
            Ok(reply::modified(
                accept("subscription").then(|| subscription_json(&row)),
            ))
        }
        ("POST", ["addr", a, "endpoint", ep, "subscription", s]) => {
            let (ep, s) = (int_id("endpoint", ep)?, int_id("subscription", s)?);
            let a = addr_for(app, a, &format!("subscription {s}")).await?;
            app.store.subscription_get(a, ep, s).await?;
            Err(ApiError::MethodNotAllowed(
                "subscriptions have no commands".into(),
            ))
        }
        ("DELETE", ["addr", a, "endpoint", ep, "subscription", s]) => {
            let (ep, s) = (int_id("endpoint", ep)?, int_id("subscription", s)?);
            let a = addr_for(app, a, &format!("subscription {s}")).await?;
            app.store.subscription_delete(a, ep, s).await?;
            Ok(reply::empty(StatusCode::NO_CONTENT))
        }

        ("GET", ["addr", a, "event"]) => {
            let a = addr_id(app, a).await?;
            let limit =
                match url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "limit") {
                    Some((_, v)) => v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "limit must be a whole number from 1 to 1000, not \"{v}\""
                            ))
                        })?,
                    None => 100,
                };
            let list = app.store.event_list(a, limit).await?;
            let out: Vec<Value> = list.iter().map(event_json).collect();
            Ok(reply::json(StatusCode::OK, &out))
        }
        ("GET", ["addr", a, "event", id]) => {
            let a = addr_for(app, a, &format!("event {id}")).await?;
            let (e, deliveries) = app.store.event_get(a, id).await?;
            let mut v = event_json(&e);
            v["deliveries"] = deliveries
                .iter()
                .map(|d| {
                    json!({
                        "endpoint_id": d.endpoint_id, "state": d.state, "attempts": d.attempts,
                        "last_error": d.last_error, "next_at": d.next_at.to_rfc3339(),
                        "created": d.created.to_rfc3339(), "updated": d.updated.to_rfc3339(),
                        "leased_by": d.leased_by,
                    })
                })
                .collect();
            Ok(reply::json(StatusCode::OK, &v))
        }
        ("POST", ["addr", a, "event", id]) => {
            body.only(&["cmd"], &[])?;
            let a = addr_for(app, a, &format!("event {id}")).await?;
            match body.required_str("cmd")? {
                "retry" => {
                    let n = app.store.event_retry(a, id).await?;
                    tracing::info!(event = %id, deliveries = n, "failed deliveries queued again by hand");
                    Ok(reply::empty(StatusCode::NO_CONTENT))
                }
                other => Err(ApiError::MethodNotAllowed(format!(
                    "unknown event command \"{other}\"; known: retry"
                ))),
            }
        }

        // `handle` has answered every other method and path.
        (method, segs) => Err(ApiError::MethodNotAllowed(format!(
            "method {method} is not allowed on {PREFIX}/{}",
            segs.join("/")
        ))),
    }
}

const SUBSCRIPTION_FIELDS: &[&str] = &[
    "location",
    "tag",
    "sender",
    "level",
    "level_match",
    "active",
];
const SUBSCRIPTION_PROTECTED: &[&str] = &["id", "endpoint_id", "addr_id"];

fn subscription_patch(body: &Body) -> Result<SubscriptionPatch, ApiError> {
    Ok(SubscriptionPatch {
        active: body.active("active")?,
        location: body.nullable_text("location")?,
        tag: body.nullable_text("tag")?,
        sender: body.nullable_text("sender")?,
        level: body.level("level")?,
        level_match: body.level_match("level_match")?,
    })
}

async fn core_cmd(app: &App, body: &Body) -> Result<Response, ApiError> {
    body.only(&["cmd"], &[])?;
    match body.required_str("cmd")? {
        "cleanup" => {
            let started = app.cleanup.start();
            match Cleanup::wait(started, going_on_after(app)).await {
                Some(Outcome::Done) => {}
                Some(Outcome::Failed) => {
                    return Err(ApiError::Unavailable(
                        "the cleanup failed; see the server log".into(),
                    ));
                }
                None => {
                    return Ok(reply::text(
                        StatusCode::ACCEPTED,
                        "the cleanup goes on; the server logs \"core cleanup\" when it ends",
                    ));
                }
            }
        }
        "delete-everything" => {
            // What there is now; what is made while it goes on is kept.
            let up_to = app.store.addr_highest_id().await?;
            return deleted(app, Deleting::Everything(up_to)).await;
        }
        "reset-addr-limits" => {
            app.counters.reset(&app.store).await?;
            tracing::info!("address limits reset");
        }
        other => {
            return Err(ApiError::MethodNotAllowed(format!(
                "unknown core command \"{other}\"; known: cleanup, delete-everything, reset-addr-limits"
            )));
        }
    }
    Ok(reply::empty(StatusCode::NO_CONTENT))
}

/// Makes the deletion `what`, recorded first (`crate::deletion`), in a
/// task of its own, so that the request's timeout does not cut it short:
/// a long history is deleted a chunk at a time (`Store::history_delete`),
/// which may take longer than `timeout`. Its answer (204, or its error)
/// when it ends within [`going_on_after`], else 202 and it goes on, its failure
/// then logged and the deletion taken up again later. One answered with
/// its error is forgotten: it is not made later, and what it took is
/// routed to again (unless its record cannot be deleted either, which
/// the answer then says: it is made later). While it goes on, what it
/// takes is routed to no more (`routing`): a push to its address is
/// answered 404. One covered by a deletion recorded before is answered
/// 202 and not recorded again (`Deletions::begin`).
async fn deleted(app: &App, what: Deleting) -> Result<Response, ApiError> {
    let (id, work) = match app.deletions.begin(what).await {
        Ok(Begin::Made(id, work)) => (id, work),
        Ok(Begin::Covered(before)) => {
            tracing::info!(what = ?what, covered_by = ?before, "a deletion asked for again is under way already");
            return Ok(reply::text(
                StatusCode::ACCEPTED,
                "a deletion asked for before deletes this and goes on; \
                 what it deletes is gone when the server logs that it has ended",
            ));
        }
        // Refused by the database itself (a full disk, a constraint):
        // its transaction ended uncommitted, nothing was recorded.
        Err(e @ StoreError::Db(_)) if e.took_no_effect() => {
            let _said = ApiError::from(e);
            return Err(ApiError::Unavailable(
                "database error (see the server log); the deletion was not recorded, \
                 and nothing is deleted"
                    .into(),
            ));
        }
        Err(e @ (StoreError::Db(_) | StoreError::Unanswered(_))) => {
            // Said in the log as any database error; but the record may
            // have been written (its commit's answer lost), and is then
            // taken up and made: the client is not told it was not.
            let _said = ApiError::from(e);
            return Err(ApiError::Unavailable(
                "database error (see the server log); the deletion may have been recorded \
                 all the same, and is then made: ask for it again to know"
                    .into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    match ended_or_going_on(app, "a deletion answered 202", work).await {
        Ok(Some(())) => Ok(reply::empty(StatusCode::NO_CONTENT)),
        Ok(None) => Ok(reply::text(
            StatusCode::ACCEPTED,
            "the deletion goes on (a long history is deleted a chunk at a time); \
             what it deletes is gone when the server logs that it has ended",
        )),
        Err(e) => {
            if !app.deletions.forget(id).await {
                return Err(ApiError::Unavailable(format!(
                    "{e}; the deletion could not be called off, and is tried again later: \
                     ask for it again to know"
                )));
            }
            // What it would have deleted is routed to again: by this node
            // before it answers (a failed request waits for no other).
            let caught_up = app.routes.catch_up(&app.store);
            if let Err(e) = crate::store::within(app.config.timeout, caught_up).await {
                tracing::warn!(error = %e, "a deletion that failed is forgotten, but this node could not route to what it took yet");
            }
            Err(e)
        }
    }
}

/// What makes an endpoint's deliveries that wait for a later try due
/// now: what they waited for is over.
#[derive(Debug, Clone, Copy)]
enum Resumed {
    /// The endpoint's settings changed: they waited for an answer to the
    /// old ones.
    Reconfigured(i64),
    /// The endpoint was enabled: they waited for that (`pipeline` puts
    /// off a disabled endpoint's deliveries).
    EndpointEnabled(i64),
    /// The address was enabled: its endpoints' deliveries waited for it.
    AddrEnabled(i64),
}

impl Resumed {
    /// What happened, and the walk's name in the log.
    fn said(self) -> (&'static str, &'static str) {
        match self {
            Resumed::Reconfigured(_) => (
                "the endpoint's settings changed",
                "making due the waiting deliveries of an endpoint whose settings changed",
            ),
            Resumed::EndpointEnabled(_) => (
                "the endpoint is enabled",
                "making due the waiting deliveries of an endpoint enabled",
            ),
            Resumed::AddrEnabled(_) => (
                "the address is enabled",
                "making due the waiting deliveries of an address enabled",
            ),
        }
    }
}

/// Makes due now the deliveries that wait for a later try, of the
/// endpoint or address `why` names. The change stands whether or not
/// this works, and a delivery not made due now is still looked at when
/// it was due; so the answer does not wait past [`going_on_after`] for a
/// long backlog, which goes on meanwhile.
async fn waiting_made_due(app: &App, why: Resumed) {
    let store = app.store.clone();
    let (happened, what) = why.said();
    let work = async move {
        let n = match why {
            Resumed::Reconfigured(id) | Resumed::EndpointEnabled(id) => {
                store.endpoint_waiting_made_due(id).await?
            }
            Resumed::AddrEnabled(id) => store.addr_waiting_made_due(id).await?,
        };
        if n > 0 {
            tracing::info!(
                ?why,
                deliveries = n,
                "{happened}; its waiting deliveries are due now"
            );
        }
        Ok(())
    };
    if let Err(e) = ended_or_going_on(app, what, work).await {
        tracing::warn!(?why, error = %e, "{happened}, but its waiting deliveries could not be made due now; each is looked at when it was due");
    }
}

/// Runs `work`, a chunked walk over an endpoint's or an address's
/// deliveries that may take longer than the request may, in a task of its
/// own, and waits for it at most [`going_on_after`]: its result when it
/// ended by then, else `None` while it goes on, and the log says when it
/// ends (`what` names it there: "… has ended" or "… failed").
async fn ended_or_going_on<T: Send + 'static>(
    app: &App,
    what: &'static str,
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<Option<T>, ApiError> {
    let mut task = tokio::spawn(work);
    match tokio::time::timeout(going_on_after(app), &mut task).await {
        Ok(Ok(r)) => Ok(Some(r?)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "{what} stopped");
            Err(ApiError::Unavailable(
                "the work stopped; see the server log".into(),
            ))
        }
        Err(_) => {
            tokio::spawn(async move {
                match task.await {
                    Ok(Ok(_)) => tracing::info!("{what} has ended"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "{what} failed"),
                    Err(e) => tracing::error!(error = %e, "{what} stopped"),
                }
            });
            Ok(None)
        }
    }
}

async fn addr_cmd(app: &App, a: &str, body: &Body) -> Result<Response, ApiError> {
    body.only(&["cmd", "to"], &[])?;
    let r = AddrRef::parse(a);
    match body.required_str("cmd")? {
        "change" => {
            let to = match body.raw("to") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => {
                    if s.chars().count() != ADDR_LEN {
                        return Err(bad(format!("addr size should be {ADDR_LEN} symbols")));
                    }
                    if !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                    {
                        return Err(bad(
                            "an address may hold only letters, digits, '-', '_' and '.'",
                        ));
                    }
                    Some(s.clone())
                }
                Some(v) => {
                    return Err(bad(format!(
                        "field \"to\" must be a string or null, not {v}"
                    )));
                }
            };
            let changed = app.store.addr_change(&r, to).await?;
            Ok(reply::moved(&format!("{PREFIX}/addr/{}", changed.a)))
        }
        other => Err(ApiError::MethodNotAllowed(format!(
            "unknown addr command \"{other}\"; known: change"
        ))),
    }
}

async fn addr_id(app: &App, a: &str) -> Result<i64, ApiError> {
    Ok(app.store.addr_get(&AddrRef::parse(a)).await?.id)
}

/// The id of address `a` on the way to the object `asked` (e.g.
/// "endpoint 2") below it. When the address is gone, the 404 names the
/// object asked for, as the original's did (its client matches that text).
async fn addr_for(app: &App, a: &str, asked: &str) -> Result<i64, ApiError> {
    match app.store.addr_get(&AddrRef::parse(a)).await {
        Ok(a) => Ok(a.id),
        Err(StoreError::NotFound(_)) => Err(ApiError::NotFound(format!("{asked} not found"))),
        Err(e) => Err(e.into()),
    }
}

fn int_id(what: &str, s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .map_err(|_| bad(format!("{what} id must be an integer, not \"{s}\"")))
}

/// The methods a management resource answers (its `Allow`), or `None`
/// when there is no such resource.
fn allowed_methods(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        ["core"]
        | ["addr"]
        | ["addr", _, "endpoint"]
        | ["addr", _, "endpoint", _, "subscription"] => "GET, HEAD, POST",
        ["node"] | ["plugin"] | ["addr", _, "event"] => "GET, HEAD",
        ["plugin", _] => "POST",
        ["addr", _]
        | ["addr", _, "endpoint", _]
        | ["addr", _, "endpoint", _, "subscription", _] => "GET, HEAD, PATCH, POST, DELETE",
        ["addr", _, "event", _] => "GET, HEAD, POST",
        _ => return None,
    })
}

/// The original's `Accept` rule: `*/*`, `application/*` or the resource's
/// own media type ask for the resource in the answer.
fn wants_body(headers: &HeaderMap, resource: &str) -> bool {
    let own = format!("application/roboger.{resource}+json");
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.split(';').next().unwrap_or("").trim())
        .any(|t| t == "*/*" || t == "application/*" || t == own)
}

/// An address as the API shows it; its limits only when limits are on.
fn addr_json(limits: bool, a: &addr::Model) -> Value {
    let mut v = json!({"id": a.id, "a": a.a, "active": a.active});
    if limits {
        v["lim_c"] = json!(a.lim_c);
        v["lim_s"] = json!(a.lim_s);
    }
    v
}

fn endpoint_json(e: &endpoint::Model) -> Value {
    json!({
        "id": e.id,
        "addr_id": e.addr_id,
        "plugin_name": e.plugin_name,
        "config": e.config,
        "active": e.active,
        "description": e.description,
    })
}

fn event_json(e: &EventHead) -> Value {
    let level = crate::level::Level::from_code(i64::from(e.level)).unwrap_or_default();
    json!({
        "id": e.id, "addr_id": e.addr_id, "addr": e.addr, "msg": e.msg, "subject": e.subject,
        "formatted_subject": e.formatted_subject, "level": e.level, "level_name": level.name(),
        "location": e.location, "tag": e.tag, "sender": e.sender, "media_fname": e.media_fname,
        "media_size": e.media_size, "created": e.created.to_rfc3339(), "hops": e.hops,
    })
}

fn subscription_json(r: &SubscriptionRow) -> Value {
    let s = &r.sub;
    json!({
        "id": s.id,
        "addr_id": r.addr_id,
        "endpoint_id": s.endpoint_id,
        "active": s.active,
        "location": s.location,
        "tag": s.tag,
        "sender": s.sender,
        "level": s.level,
        "level_match": s.level_match,
    })
}
