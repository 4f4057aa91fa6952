//! The web console at `/ui/`: server-rendered pages for what robogerctl
//! does (addresses, endpoints, subscriptions, plugins), plus an event
//! history that follows new events (server-sent events) and a test event.
//!
//! Pages read the store directly, a page at a time (addresses with a
//! search, an address's endpoints, events); every change a form asks for
//! goes through the management API's own handlers ([`manage::execute`]),
//! so the console can do nothing the API would refuse, and the cluster
//! hears of it the same way. Templates and assets are compiled into the binary ([`page`]).
//!
//! Invariant: every console request passes `master.allow`; every page but
//! sign-in needs a session ([`session`]); every POST but sign-in carries
//! the session's CSRF token.

mod page;
mod schema_form;
mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::Request;
use super::error::ApiError;
use super::form::Form;
use super::manage;
use super::push;
use super::reply::{self, Response};
use crate::App;
use crate::api::body::Body;
use crate::store::{AddrRef, Deleting, EventHead, SubscriptionsShown};
use page::{Chrome, html};
use session::Session;

/// Where the console lives.
pub const PREFIX: &str = "/ui";
/// Addresses per page of the list.
const ADDR_PAGE: u64 = 50;
/// Endpoints per page of an address, each with its subscriptions.
const ENDPOINT_PAGE: u64 = 20;

/// How many of its subscriptions an endpoint shows on its address's page
/// at a time.
const SUBSCRIPTION_PAGE: u64 = 20;
/// Other endpoints an endpoint's page offers to copy its subscriptions
/// to by name; past this many it asks for the endpoint's number.
const COPY_TARGETS: u64 = 100;
/// Events per page of the history (and followed by its stream).
const EVENT_PAGE: u64 = 20;
/// How often an open history looks for new events and changed deliveries.
const STREAM_POLL: Duration = Duration::from_secs(1);
/// How often an open history checks that its session still holds.
const STREAM_SESSION_CHECK: u32 = 30;
/// Rows an event stream may have queued for a slow browser.
const STREAM_QUEUE: usize = 32;
/// Event histories followed at once, per node.
pub const MAX_STREAMS: usize = 64;

/// The console's shared state: room for open event streams, and the
/// signal that ends them when the server stops.
#[derive(Debug)]
pub struct Live {
    streams: Arc<Semaphore>,
    closing: watch::Sender<bool>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            closing: watch::channel(false).0,
        }
    }
}

impl Live {
    /// Ends every open event stream (the server is stopping, and would
    /// otherwise wait for them).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }
}

/// The largest body a console request at `path` may have: a test event
/// carries a file, every other form is small.
pub fn body_limit(app: &App, path: &str) -> usize {
    if path.ends_with("/push") {
        push::body_limit(app.config.push_max_media)
    } else {
        super::MANAGE_BODY_LIMIT
    }
}

/// Answers a console request.
pub async fn handle(app: &Arc<App>, req: Request<'_>) -> Response {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    let mut r = match tokio::time::timeout(app.config.timeout * 2, route(app, &req, &segs)).await {
        Ok(r) => r,
        Err(_) => message(
            StatusCode::SERVICE_UNAVAILABLE,
            Chrome::signed_out(),
            "Not available",
            "The database or a plugin did not answer in time; try again.",
        ),
    };
    let h = r.headers_mut();
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    r
}

/// The methods a console path answers, or `None` when there is no such page.
fn allowed_methods(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        [] | ["static", _] | ["plugins"] | ["addr", _, "endpoint", "new"] => "GET, HEAD",
        ["addr", _, "events"] | ["addr", _, "events", "stream"] => "GET, HEAD",
        ["signin"] | ["addr"] | ["addr", _] | ["addr", _, "endpoint", _] => "GET, HEAD, POST",
        ["signout"] | ["plugins", _] | ["addr", _, "push"] | ["addr", _, "endpoint"] => "POST",
        ["addr", _, "event", _] => "POST",
        ["addr", _, "endpoint", _, "subscription"] => "POST",
        ["addr", _, "endpoint", _, "subscription", _] => "POST",
        _ => return None,
    })
}

async fn route(app: &Arc<App>, req: &Request<'_>, segs: &[&str]) -> Response {
    let Some(allow) = allowed_methods(segs) else {
        return message(
            StatusCode::NOT_FOUND,
            Chrome::signed_out(),
            "Not found",
            "There is no such page.",
        );
    };
    if !allow.split(", ").any(|m| m == req.method.as_str()) {
        return reply::not_allowed(req.method, &format!("{PREFIX}/{}", segs.join("/")), allow);
    }
    if let ["static", name] = segs {
        return page::asset(name)
            .unwrap_or_else(|| reply::text(StatusCode::NOT_FOUND, "not found"));
    }
    let ip = app.auth.client_ip(req.peer, req.headers);
    if let Err(e) = app.auth.allowed(ip) {
        return message(
            e.status(),
            Chrome::signed_out(),
            "Forbidden",
            &e.to_string(),
        );
    }
    let session = match session::current(app, req.headers).await {
        Ok(s) => s,
        Err(e) => return failed(Chrome::signed_out(), &e, "/ui/"),
    };
    let is_post = *req.method == Method::POST;
    let content_type = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let form = if is_post {
        match Form::parse(content_type, req.body.clone(), "file").await {
            Ok(f) => f,
            Err(e) => return failed(Chrome::signed_out(), &e, "/ui/"),
        }
    } else {
        Form::default()
    };
    match segs {
        ["signin"] if is_post => return sign_in(app, ip, &form).await,
        ["signin"] => {
            let next = query_value(req.query, "next").unwrap_or_default();
            if session.is_some() {
                return redirect(&safe_next(&next));
            }
            let mut chrome = Chrome::signed_out();
            chrome.notice = notice(req.query);
            return html(
                StatusCode::OK,
                &page::SignIn {
                    chrome,
                    next,
                    error: None,
                },
            );
        }
        _ => {}
    }
    let Some(session) = session else {
        // Back here after signing in (a form's target is not a page).
        let here = if is_post {
            String::from("/ui/")
        } else if req.query.is_empty() {
            format!("{PREFIX}/{}", segs.join("/"))
        } else {
            format!("{PREFIX}/{}?{}", segs.join("/"), req.query)
        };
        let next: String = url::form_urlencoded::byte_serialize(here.as_bytes()).collect();
        return redirect(&format!("/ui/signin?next={next}"));
    };
    if is_post && !session.csrf_ok(form.get("csrf")) {
        tracing::warn!(
            ?ip,
            path = req.path,
            "console: a form without its CSRF token refused"
        );
        return message(
            StatusCode::FORBIDDEN,
            Chrome::new(&session.csrf, ""),
            "Refused",
            "The form did not carry this session's token (CSRF protection). Reload the page and try again.",
        );
    }
    let ctx = Ctx {
        app,
        ip,
        session: &session,
        query: req.query,
        form: &form,
    };
    let section = if segs.first() == Some(&"plugins") {
        "plugins"
    } else {
        "addr"
    };
    dispatch(&ctx, is_post, segs)
        .await
        .unwrap_or_else(|e| failed(Chrome::new(&session.csrf, section), &e, &back_of(segs)))
}

async fn dispatch(ctx: &Ctx<'_>, is_post: bool, segs: &[&str]) -> Result<Response, ApiError> {
    match (is_post, segs) {
        (false, []) => Ok(redirect("/ui/addr")),
        (true, ["signout"]) => sign_out(ctx).await,
        (false, ["addr"]) => addr_list(ctx).await,
        (true, ["addr"]) => addr_create(ctx).await,
        (false, ["addr", a]) => addr_page(ctx, id(a)?).await,
        (true, ["addr", a]) => addr_action(ctx, id(a)?).await,
        (false, ["addr", a, "endpoint", "new"]) => endpoint_new(ctx, id(a)?).await,
        (true, ["addr", a, "endpoint"]) => endpoint_create(ctx, id(a)?).await,
        (false, ["addr", a, "endpoint", ep]) => endpoint_edit(ctx, id(a)?, id(ep)?, None).await,
        (true, ["addr", a, "endpoint", ep]) => endpoint_action(ctx, id(a)?, id(ep)?).await,
        (true, ["addr", a, "endpoint", ep, "subscription"]) => {
            subscription_create(ctx, id(a)?, id(ep)?).await
        }
        (true, ["addr", a, "endpoint", ep, "subscription", s]) => {
            subscription_action(ctx, id(a)?, id(ep)?, id(s)?).await
        }
        (false, ["addr", a, "events"]) => events(ctx, id(a)?).await,
        (false, ["addr", a, "events", "stream"]) => events_stream(ctx, id(a)?).await,
        (true, ["addr", a, "event", e]) => event_retry(ctx, id(a)?, e).await,
        (true, ["addr", a, "push"]) => test_event(ctx, id(a)?).await,
        (false, ["plugins"]) => plugins(ctx).await,
        (true, ["plugins", name]) => plugin_restart(ctx, name).await,
        _ => Err(ApiError::NotFound("there is no such page".into())),
    }
}

/// What a handler needs of its request.
struct Ctx<'a> {
    app: &'a Arc<App>,
    /// The client's address, for the log of changes.
    ip: Option<std::net::IpAddr>,
    session: &'a Session,
    query: &'a str,
    form: &'a Form,
}

impl Ctx<'_> {
    fn chrome(&self, section: &'static str) -> Chrome {
        let mut c = Chrome::new(&self.session.csrf, section);
        c.notice = notice(self.query);
        c
    }

    /// Runs a management API request for a form.
    async fn manage(&self, method: Method, path: &str, body: Value) -> Result<Response, ApiError> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let body = Body::from_value(body)?;
        let caller = manage::Caller {
            ip: self.ip,
            via: "console",
        };
        manage::execute(
            self.app,
            caller,
            &method,
            &segs,
            "",
            &HeaderMap::new(),
            &body,
        )
        .await
    }

    /// Whether the form confirmed its action (else the page asking to).
    fn confirmed(&self) -> bool {
        self.form.get("confirm") == Some("yes")
    }

    /// The page asking to confirm this form's action.
    fn confirm(
        &self,
        heading: String,
        text: String,
        action: String,
        button: &str,
        back: &str,
    ) -> Response {
        let fields = self
            .form
            .fields
            .iter()
            .filter(|(k, _)| k != "csrf" && k != "confirm")
            .cloned()
            .collect();
        html(
            StatusCode::OK,
            &page::Confirm {
                chrome: self.chrome("addr"),
                heading,
                text,
                action,
                fields,
                button: button.to_string(),
                back: back.to_string(),
            },
        )
    }
}

fn id(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .map_err(|_| ApiError::NotFound(format!("there is no page for \"{s}\"")))
}

/// Where "Back" leads from a failed request at `segs`.
fn back_of(segs: &[&str]) -> String {
    match segs {
        ["addr", a, ..] if a.parse::<i64>().is_ok() => format!("/ui/addr/{a}"),
        ["plugins", ..] => "/ui/plugins".into(),
        _ => "/ui/addr".into(),
    }
}

fn query_value(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// A page to go to after signing in: only a console path.
fn safe_next(next: &str) -> String {
    if next.starts_with("/ui/") && !next.starts_with("//") && !next.contains('\\') {
        next.to_string()
    } else {
        "/ui/addr".into()
    }
}

/// The confirmation a redirect asked to show (`?done=`), by code.
fn notice(query: &str) -> Option<String> {
    let text = match query_value(query, "done")?.as_str() {
        "created" => "Created.",
        "saved" => "Saved.",
        "deleted" => "Deleted.",
        "deleting" => {
            "Being deleted: its history is long and goes a chunk at a time; it is gone when that ends."
        }
        "enabled" => "Enabled.",
        "disabled" => "Disabled.",
        "addr-disabled" => {
            "Disabled. It takes no push, and the pending deliveries of its endpoints are not sent but wait until it is enabled again (or their max-age ends)."
        }
        "endpoint-disabled" => {
            "Disabled. It gets no new event, and its pending deliveries are not sent but wait until it is enabled again (or their max-age ends)."
        }
        "changed" => "The address string was changed.",
        "copied" => "Subscriptions copied.",
        "subscribed" => "Subscription added.",
        "sent" => "Test event accepted; it is delivered like any push.",
        "retried" => "Failed deliveries queued again.",
        "restarted" => "Restart requested.",
        "signed-out" => "Signed out.",
        _ => return None,
    };
    Some(text.into())
}

/// The notice of a deletion's answer: done (204), or going on (202).
fn deleted(r: &Response) -> &'static str {
    if r.status() == StatusCode::ACCEPTED {
        "deleting"
    } else {
        "deleted"
    }
}

/// Where a change to endpoint `ep` of address `a` leads: the page of the
/// address that holds it, scrolled to it, with the notice `done`.
fn to_endpoint(a: i64, ep: impl std::fmt::Display, done: &str) -> Response {
    redirect(&format!("/ui/addr/{a}?at={ep}&done={done}#endpoint-{ep}"))
}

/// Back to the address page, at the page of endpoint `ep`'s
/// subscriptions that holds subscription `sub`.
fn to_subscription(a: i64, ep: i64, sub: i64, done: &str) -> Response {
    redirect(&format!(
        "/ui/addr/{a}?at={ep}&sub={sub}&done={done}#endpoint-{ep}"
    ))
}

fn redirect(to: &str) -> Response {
    let mut r = reply::empty(StatusCode::SEE_OTHER);
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn message(status: StatusCode, chrome: Chrome, heading: &str, text: &str) -> Response {
    html(
        status,
        &page::Message {
            chrome,
            heading: heading.into(),
            text: text.into(),
            back: "/ui/".into(),
        },
    )
}

/// The page for a failed request, with the status the API gives it.
fn failed(chrome: Chrome, e: &ApiError, back: &str) -> Response {
    let mut r = html(
        e.status(),
        &page::Message {
            chrome,
            heading: "That did not work".into(),
            text: e.to_string(),
            back: back.into(),
        },
    );
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

// ---- signing in and out ---------------------------------------------------------

async fn sign_in(app: &App, ip: Option<std::net::IpAddr>, form: &Form) -> Response {
    let next = form.text("next").to_string();
    let again = |status, error: String| {
        html(
            status,
            &page::SignIn {
                chrome: Chrome::signed_out(),
                next: next.clone(),
                error: Some(error),
            },
        )
    };
    match session::sign_in(app, ip, form.get("key").unwrap_or("")).await {
        Ok(session::SignIn::Started(cookie)) => {
            let mut r = redirect(&safe_next(&next));
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(session::SignIn::Refused) => {
            again(StatusCode::FORBIDDEN, "That is not the master key.".into())
        }
        Ok(session::SignIn::Wait(d)) => {
            let secs = crate::api::error::retry_secs(&d);
            let mut r = again(
                StatusCode::TOO_MANY_REQUESTS,
                format!("Too many wrong keys from your address; try again in {secs} s."),
            );
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        Err(e) => failed(Chrome::signed_out(), &e, "/ui/signin"),
    }
}

async fn sign_out(ctx: &Ctx<'_>) -> Result<Response, ApiError> {
    let cookie = session::end(ctx.app, ctx.session).await?;
    let mut r = redirect("/ui/signin?done=signed-out");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

// ---- addresses ----------------------------------------------------------------------

async fn addr_list(ctx: &Ctx<'_>) -> Result<Response, ApiError> {
    let q = query_value(ctx.query, "q")
        .unwrap_or_default()
        .trim()
        .to_string();
    let after = query_value(ctx.query, "after").and_then(|a| a.parse::<i64>().ok());
    let page = ctx
        .app
        .store
        .addr_page(Some(q.as_str()), after, ADDR_PAGE)
        .await?;
    let total = if q.is_empty() {
        Some(ctx.app.store.addr_count().await?)
    } else {
        None
    };
    let next = if page.more {
        page.rows.last().map(|a| a.id)
    } else {
        None
    };
    Ok(html(
        StatusCode::OK,
        &page::AddrList {
            chrome: ctx.chrome("addr"),
            q,
            rows: page.rows,
            total,
            after,
            next,
        },
    ))
}

async fn addr_create(ctx: &Ctx<'_>) -> Result<Response, ApiError> {
    let r = ctx.manage(Method::POST, "addr", json!({})).await?;
    // The API answers with the new address's string in `Location`.
    let a = location_tail(&r).ok_or_else(|| ApiError::Unavailable("no address was made".into()))?;
    let a = ctx.app.store.addr_get(&AddrRef::A(a)).await?;
    Ok(redirect(&format!("/ui/addr/{}?done=created", a.id)))
}

/// The last segment of an answer's `Location`.
fn location_tail(r: &Response) -> Option<String> {
    let loc = r.headers().get(header::LOCATION)?.to_str().ok()?;
    Some(loc.rsplit('/').next()?.to_string())
}

async fn addr_page(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    let app = ctx.app;
    let a = app.store.addr_get(&AddrRef::Id(a)).await?;
    let number = |key| query_value(ctx.query, key).and_then(|v| v.parse::<i64>().ok());
    // `at` asks for the page that holds an endpoint just changed.
    let after = match (number("after"), number("at")) {
        (Some(after), _) => after,
        (None, Some(ep)) => {
            app.store
                .endpoint_page_holding(a.id, ep, ENDPOINT_PAGE)
                .await?
        }
        (None, None) => 0,
    };
    // `sub` asks for the page of `at`'s subscriptions that holds one.
    let subs = SubscriptionsShown {
        limit: SUBSCRIPTION_PAGE,
        holding: number("at").zip(number("sub")),
    };
    let page = app
        .store
        .endpoint_block_page(a.id, after, ENDPOINT_PAGE, subs)
        .await?;
    let next = if page.more {
        page.rows.last().map(|(ep, _)| ep.id)
    } else {
        None
    };
    let plugins = app.plugins.list();
    // Deletions answered 202 that go on: the page shows what they take.
    let deleting = app.store.deletions_of_addr(a.id).await?;
    let endpoints = page
        .rows
        .into_iter()
        .map(|(ep, subs)| page::EndpointBlock {
            plugin_note: plugin_note(&plugins, &ep.plugin_name),
            // Said once, above them all, when the address is.
            deleting: deleting.contains(&Deleting::Endpoint(a.id, ep.id)),
            ep,
            subs,
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &page::AddrPage {
            chrome: ctx.chrome("addr"),
            limits: app.config.limits.is_some(),
            endpoint_count: app.store.endpoint_count(a.id).await?,
            deleting: deleting.iter().any(|d| d.takes_addr(a.id)),
            a,
            endpoints,
            after: (after > 0).then_some(after),
            next,
            plugins: plugins.into_iter().map(|p| p.plugin_name).collect(),
            levels: &page::LEVELS,
            matches: &page::MATCHES,
        },
    ))
}

/// What an endpoint's block says when its plugin cannot deliver for it
/// here: not in this server's config (an endpoint of a database taken
/// over, or a plugin taken out), or kept from running. Its deliveries
/// wait, not tried, either way (the pipeline's `not_tried`).
fn plugin_note(plugins: &[crate::supervisor::Status], name: &str) -> Option<String> {
    use crate::supervisor::State;
    match plugins.iter().find(|p| p.plugin_name == name) {
        None => Some(format!(
            "Plugin {name} is not in this server's configuration: its deliveries wait, \
             not tried, until a server that runs it takes them or they pass delivery.max-age."
        )),
        Some(p) if matches!(p.state, State::Failed | State::Refused) => Some(format!(
            "Plugin {name} is {}: its deliveries wait, not tried, until it runs again \
             (see Plugins and nodes).",
            p.state_name()
        )),
        Some(_) => None,
    }
}

async fn addr_action(ctx: &Ctx<'_>, id: i64) -> Result<Response, ApiError> {
    let path = format!("addr/{id}");
    let here = format!("/ui/addr/{id}");
    let done = |what: &str| Ok(redirect(&format!("{here}?done={what}")));
    match ctx.form.text("action") {
        "enable" | "disable" => {
            let on = ctx.form.text("action") == "enable";
            ctx.manage(Method::PATCH, &path, json!({"active": i32::from(on)}))
                .await?;
            done(if on { "enabled" } else { "addr-disabled" })
        }
        "limits" => {
            ctx.manage(
                Method::PATCH,
                &path,
                json!({"lim_c": ctx.form.text("lim_c"), "lim_s": ctx.form.text("lim_s")}),
            )
            .await?;
            done("saved")
        }
        "change" => {
            let to = ctx.form.optional("to");
            if !ctx.confirmed() {
                let text = match &to {
                    Some(t) => format!(
                        "Address {id} will be known as {t}; senders using its current string will be refused."
                    ),
                    None => format!(
                        "Address {id} gets a new random string; senders using its current string will be refused."
                    ),
                };
                return Ok(ctx.confirm(
                    format!("Change address {id}?"),
                    text,
                    here.clone(),
                    "Change address",
                    &here,
                ));
            }
            ctx.manage(Method::POST, &path, json!({"cmd": "change", "to": to}))
                .await?;
            done("changed")
        }
        "delete" => {
            if !ctx.confirmed() {
                return Ok(ctx.confirm(
                    format!("Delete address {id}?"),
                    "Its endpoints, subscriptions and events are deleted with it.".into(),
                    here.clone(),
                    "Delete address",
                    &here,
                ));
            }
            let r = ctx.manage(Method::DELETE, &path, Value::Null).await?;
            Ok(redirect(&format!("/ui/addr?done={}", deleted(&r))))
        }
        other => Err(unknown_action(other)),
    }
}

fn unknown_action(a: &str) -> ApiError {
    ApiError::BadRequest(format!("unknown action \"{a}\""))
}

// ---- endpoints ------------------------------------------------------------------

async fn endpoint_new(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    let plugin = query_value(ctx.query, "plugin").unwrap_or_default();
    ctx.app.store.addr_get(&AddrRef::Id(a)).await?;
    if !ctx.app.plugins.is_configured(&plugin) {
        return Err(ApiError::NotFound(format!("no such plugin: {plugin}")));
    }
    Ok(endpoint_form(
        ctx,
        a,
        None,
        &plugin,
        &json!({}),
        "",
        true,
        None,
        StatusCode::OK,
    )
    .await)
}

/// The endpoint form (new when `ep` is `None`), with `error` shown next to it.
#[allow(clippy::too_many_arguments)]
async fn endpoint_form(
    ctx: &Ctx<'_>,
    a: i64,
    ep: Option<i64>,
    plugin: &str,
    config: &Value,
    description: &str,
    active: bool,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let schema = ctx.app.plugins.config_schema(plugin);
    let plugin_description = ctx
        .app
        .plugins
        .list()
        .into_iter()
        .find(|p| p.plugin_name == plugin)
        .and_then(|p| p.description);
    // A deletion answered 202 that takes the endpoint or its address:
    // the page offers no change (the API refuses each meanwhile).
    let deletions = ctx.app.store.deletions_of_addr(a).await.unwrap_or_default();
    let addr_deleting = deletions.iter().any(|d| d.takes_addr(a));
    let deleting = match ep {
        _ if addr_deleting => Some(
            "Its address is being deleted: a deletion asked for goes on, and takes its \
             endpoints. Nothing can be added to it or changed meanwhile.",
        ),
        Some(ep) if deletions.contains(&Deleting::Endpoint(a, ep)) => Some(
            "Being deleted: a deletion asked for goes on, its deliveries a chunk at a time; \
             the endpoint is gone when it ends. It gets no more events, and cannot be \
             changed meanwhile.",
        ),
        _ => None,
    };
    // An existing endpoint's page also copies its subscriptions to the
    // address's other endpoints, and says how its deliveries stand.
    let (copy_targets, deliveries) = match ep {
        None => (page::CopyTargets::default(), None),
        Some(ep) => {
            let store = &ctx.app.store;
            let mut others: Vec<(i64, String)> = store
                .endpoint_page(a, 0, COPY_TARGETS + 2)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.id != ep)
                .map(|e| (e.id, e.plugin_name))
                .collect();
            // Too many to list: the page asks for the endpoint's number.
            let by_number = others.len() as u64 > COPY_TARGETS && !addr_deleting;
            if by_number || addr_deleting {
                others.clear();
            }
            let stats = store.endpoint_delivery_stats(ep).await.ok();
            (
                page::CopyTargets {
                    named: others,
                    by_number,
                },
                stats.map(|s| page::EndpointDeliveries {
                    delivered: s.delivered,
                    pending: s.pending,
                    failed: s.failed,
                    last_error: s
                        .last_error
                        .zip(s.last_error_at)
                        .map(|(e, at)| (e, at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))),
                }),
            )
        }
    };
    let fields = schema_form::fields(schema.as_ref(), config);
    let error_field = error.as_deref().and_then(|e| {
        fields
            .iter()
            .find(|f| !f.property.is_empty() && e.contains(f.property.as_str()))
            .map(|f| f.property.clone())
    });
    html(
        status,
        &page::EndpointForm {
            chrome: ctx.chrome("addr"),
            heading: match ep {
                Some(ep) => format!("Endpoint {ep} ({plugin})"),
                None => format!("New {plugin} endpoint for address {a}"),
            },
            addr_id: a,
            plugin: plugin.to_string(),
            plugin_description,
            action: match ep {
                Some(ep) => format!("/ui/addr/{a}/endpoint/{ep}"),
                None => format!("/ui/addr/{a}/endpoint"),
            },
            submit: if ep.is_some() {
                "Save endpoint"
            } else {
                "Create endpoint"
            }
            .into(),
            description: description.to_string(),
            active,
            fields,
            error,
            error_field,
            copy_targets,
            deliveries,
            deleting,
        },
    )
}

async fn endpoint_create(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    let f = ctx.form;
    let plugin = f.text("plugin");
    if !ctx.app.plugins.is_configured(plugin) {
        return Err(ApiError::NotFound(format!("no such plugin: {plugin}")));
    }
    let schema = ctx.app.plugins.config_schema(plugin);
    let active = f.get("active").is_some();
    let description = f.text("description");
    let config = match schema_form::config(schema.as_ref(), &f.fields, None) {
        Ok(c) => c,
        Err(e) => {
            let (c, s) = (json!({}), StatusCode::BAD_REQUEST);
            return Ok(
                endpoint_form(ctx, a, None, plugin, &c, description, active, Some(e), s).await,
            );
        }
    };
    let body = json!({"plugin_name": plugin, "config": config,
        "description": f.optional("description"), "active": i32::from(active)});
    match ctx
        .manage(Method::POST, &format!("addr/{a}/endpoint"), body)
        .await
    {
        Ok(r) => Ok(to_endpoint(
            a,
            location_tail(&r).unwrap_or_default(),
            "created",
        )),
        Err(e @ (ApiError::BadRequest(_) | ApiError::Unavailable(_))) => {
            let (msg, s) = (Some(e.to_string()), e.status());
            Ok(endpoint_form(ctx, a, None, plugin, &config, description, active, msg, s).await)
        }
        Err(e) => Err(e),
    }
}

async fn endpoint_edit(
    ctx: &Ctx<'_>,
    a: i64,
    ep: i64,
    error: Option<(Value, ApiError)>,
) -> Result<Response, ApiError> {
    ctx.app.store.addr_get(&AddrRef::Id(a)).await?;
    let e = ctx.app.store.endpoint_get(a, ep).await?;
    let active = e.active != 0;
    let description = e.description.clone().unwrap_or_default();
    Ok(match error {
        None => {
            endpoint_form(
                ctx,
                a,
                Some(ep),
                &e.plugin_name,
                &e.config,
                &description,
                active,
                None,
                StatusCode::OK,
            )
            .await
        }
        Some((config, err)) => {
            let f = ctx.form;
            endpoint_form(
                ctx,
                a,
                Some(ep),
                &e.plugin_name,
                &config,
                f.text("description"),
                f.get("active").is_some(),
                Some(err.to_string()),
                err.status(),
            )
            .await
        }
    })
}

async fn endpoint_action(ctx: &Ctx<'_>, a: i64, ep: i64) -> Result<Response, ApiError> {
    let path = format!("addr/{a}/endpoint/{ep}");
    let page = format!("/ui/addr/{a}");
    let f = ctx.form;
    match f.text("action") {
        "save" => {
            let current = ctx.app.store.endpoint_get(a, ep).await?;
            let schema = ctx.app.plugins.config_schema(&current.plugin_name);
            let config =
                match schema_form::config(schema.as_ref(), &f.fields, Some(&current.config)) {
                    Ok(c) => c,
                    Err(e) => {
                        return endpoint_edit(
                            ctx,
                            a,
                            ep,
                            Some((current.config, ApiError::BadRequest(e))),
                        )
                        .await;
                    }
                };
            let body = json!({"config": config, "description": f.optional("description"),
                "active": i32::from(f.get("active").is_some())});
            match ctx.manage(Method::PATCH, &path, body).await {
                Ok(_) => Ok(to_endpoint(a, ep, "saved")),
                Err(e @ (ApiError::BadRequest(_) | ApiError::Unavailable(_))) => {
                    endpoint_edit(ctx, a, ep, Some((config, e))).await
                }
                Err(e) => Err(e),
            }
        }
        "enable" | "disable" => {
            let on = f.text("action") == "enable";
            ctx.manage(Method::PATCH, &path, json!({"active": i32::from(on)}))
                .await?;
            let done = if on { "enabled" } else { "endpoint-disabled" };
            Ok(to_endpoint(a, ep, done))
        }
        "delete" => {
            if !ctx.confirmed() {
                return Ok(ctx.confirm(
                    format!("Delete endpoint {ep}?"),
                    "Its subscriptions are deleted with it, and its pending deliveries are dropped.".into(),
                    format!("/ui/addr/{a}/endpoint/{ep}"),
                    "Delete endpoint",
                    &page,
                ));
            }
            let r = ctx.manage(Method::DELETE, &path, Value::Null).await?;
            Ok(redirect(&format!("{page}?done={}", deleted(&r))))
        }
        "copysub" => {
            ctx.manage(
                Method::POST,
                &path,
                json!({"cmd": "copysub", "target": f.text("target"),
                    "replace": f.get("replace").is_some()}),
            )
            .await?;
            Ok(to_endpoint(a, ep, "copied"))
        }
        "retry" => {
            ctx.manage(Method::POST, &path, json!({"cmd": "retry"}))
                .await?;
            Ok(redirect(&format!(
                "/ui/addr/{a}/endpoint/{ep}?done=retried#deliveries"
            )))
        }
        other => Err(unknown_action(other)),
    }
}

// ---- subscriptions ----------------------------------------------------------------

fn subscription_body(f: &Form) -> Value {
    json!({
        "level": f.text("level"),
        "level_match": f.text("level_match"),
        "location": f.optional("location"),
        "tag": f.optional("tag"),
        "sender": f.optional("sender"),
    })
}

async fn subscription_create(ctx: &Ctx<'_>, a: i64, ep: i64) -> Result<Response, ApiError> {
    let made = ctx
        .manage(
            Method::POST,
            &format!("addr/{a}/endpoint/{ep}/subscription"),
            subscription_body(ctx.form),
        )
        .await?;
    Ok(match location_tail(&made).and_then(|s| s.parse().ok()) {
        Some(s) => to_subscription(a, ep, s, "subscribed"),
        None => to_endpoint(a, ep, "subscribed"),
    })
}

async fn subscription_action(ctx: &Ctx<'_>, a: i64, ep: i64, s: i64) -> Result<Response, ApiError> {
    let path = format!("addr/{a}/endpoint/{ep}/subscription/{s}");
    let page = format!("/ui/addr/{a}");
    let done = |what: &str| Ok(to_subscription(a, ep, s, what));
    match ctx.form.text("action") {
        "save" => {
            ctx.manage(Method::PATCH, &path, subscription_body(ctx.form))
                .await?;
            done("saved")
        }
        "enable" | "disable" => {
            let on = ctx.form.text("action") == "enable";
            ctx.manage(Method::PATCH, &path, json!({"active": i32::from(on)}))
                .await?;
            done(if on { "enabled" } else { "disabled" })
        }
        "delete" => {
            if !ctx.confirmed() {
                return Ok(ctx.confirm(
                    format!("Delete subscription {s}?"),
                    format!("Endpoint {ep} stops getting the events it matched."),
                    format!("/ui/addr/{a}/endpoint/{ep}/subscription/{s}"),
                    "Delete subscription",
                    &page,
                ));
            }
            ctx.manage(Method::DELETE, &path, Value::Null).await?;
            done("deleted")
        }
        other => Err(unknown_action(other)),
    }
}

// ---- events ---------------------------------------------------------------------------

/// The events of a page with their deliveries, each rendered as its row.
async fn event_rows(
    app: &App,
    a: i64,
    before: Option<&str>,
    csrf: &str,
) -> Result<Vec<(EventHead, String)>, ApiError> {
    let events = app.store.event_page(a, before, EVENT_PAGE).await?;
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let deliveries = app.store.deliveries_of(&ids).await?;
    let mut ids: Vec<i64> = deliveries.iter().map(|d| d.endpoint_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let names: HashMap<i64, String> = app
        .store
        .endpoint_names(a, &ids)
        .await?
        .into_iter()
        .collect();
    let mut by_event: HashMap<&str, Vec<page::DeliveryRow>> = HashMap::new();
    let mut failed: HashMap<&str, bool> = HashMap::new();
    for d in &deliveries {
        if d.state == crate::store::STATE_FAILED {
            failed.insert(d.event_id.as_str(), true);
        }
        by_event
            .entry(d.event_id.as_str())
            .or_default()
            .push(page::DeliveryRow {
                endpoint: match names.get(&d.endpoint_id) {
                    Some(n) => format!("{} ({n})", d.endpoint_id),
                    None => format!("{} (deleted)", d.endpoint_id),
                },
                state: d.state.clone(),
                attempts: d.attempts,
                last_error: d.last_error.clone().unwrap_or_default(),
                updated: d.updated.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                next_try: (d.state == crate::store::STATE_PENDING
                    && (d.attempts > 0 || d.last_error.is_some()))
                .then(|| d.next_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            });
    }
    let mut out = Vec::with_capacity(events.len());
    for e in &events {
        let level = crate::level::Level::from_code(i64::from(e.level)).unwrap_or_default();
        let row = page::EventRow {
            e,
            level_name: level.name().to_ascii_lowercase(),
            created: e.created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            deliveries: by_event.remove(e.id.as_str()).unwrap_or_default(),
            failed: failed.contains_key(e.id.as_str()),
            csrf,
        };
        let html = askama::Template::render(&row)
            .map_err(|e| ApiError::Unavailable(format!("an event failed to render: {e}")))?;
        out.push(html);
    }
    Ok(events.into_iter().zip(out).collect())
}

async fn events(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    ctx.app.store.addr_get(&AddrRef::Id(a)).await?;
    let before = query_value(ctx.query, "before");
    let rows = match event_rows(ctx.app, a, before.as_deref(), &ctx.session.csrf).await {
        Err(ApiError::NotFound(_)) if before.is_some() => {
            return Err(ApiError::NotFound(
                "that page of events is gone (its first event was deleted)".into(),
            ));
        }
        r => r?,
    };
    let older = (rows.len() as u64 == EVENT_PAGE)
        .then(|| rows.last().map(|(e, _)| e.id.clone()))
        .flatten();
    Ok(html(
        StatusCode::OK,
        &page::Events {
            chrome: ctx.chrome("addr"),
            addr_id: a,
            live: before.is_none(),
            rows: rows.into_iter().map(|(_, h)| h).collect(),
            older,
        },
    ))
}

/// What an open event stream keeps between polls.
struct Follow {
    app: Arc<App>,
    addr: i64,
    session: Session,
    /// The rows last sent (or shown), by event id.
    shown: HashMap<String, String>,
    /// Rows to send before the next poll.
    queue: std::collections::VecDeque<warp::sse::Event>,
    closing: watch::Receiver<bool>,
    polls: u32,
    _permit: OwnedSemaphorePermit,
}

impl Follow {
    /// Sends what changes to `tx` until the page is closed, the session
    /// ends, the address is deleted or the server stops.
    async fn run(mut self, tx: tokio::sync::mpsc::Sender<warp::sse::Event>) {
        loop {
            let alive = tokio::select! {
                alive = self.poll() => alive,
                _ = tx.closed() => return,
            };
            for e in self.queue.drain(..) {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if !alive {
                let _ = tx
                    .send(warp::sse::Event::default().event("end").data(""))
                    .await;
                return;
            }
        }
    }

    /// Waits for the next poll and queues what changed; false when the
    /// stream should end.
    async fn poll(&mut self) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(STREAM_POLL) => {}
            _ = self.closing.wait_for(|c| *c) => return false,
        }
        self.polls += 1;
        if self.polls.is_multiple_of(STREAM_SESSION_CHECK) {
            let session = self
                .app
                .store
                .session_get(&self.session.id, chrono::Utc::now());
            match crate::store::within(self.app.config.timeout, session).await {
                Ok(Some(_)) => {}
                Ok(None) => return false,
                Err(e) => tracing::debug!(error = %e, "console stream: session check failed"),
            }
        }
        let rows = tokio::time::timeout(
            self.app.config.timeout,
            event_rows(&self.app, self.addr, None, &self.session.csrf),
        )
        .await;
        let rows = match rows {
            Ok(Ok(rows)) => rows,
            Ok(Err(ApiError::NotFound(_))) => return false,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "console stream: poll failed");
                return true;
            }
            Err(_) => return true,
        };
        let mut shown = HashMap::with_capacity(rows.len());
        // Oldest first, so new events are inserted above in order.
        for (e, html) in rows.into_iter().rev() {
            if self.shown.get(&e.id) != Some(&html) {
                let data = json!({"id": e.id, "subject": e.subject, "html": html}).to_string();
                self.queue
                    .push_back(warp::sse::Event::default().event("event").data(data));
            }
            shown.insert(e.id, html);
        }
        self.shown = shown;
        true
    }
}

async fn events_stream(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    let app = ctx.app.clone();
    app.store.addr_get(&AddrRef::Id(a)).await?;
    let Ok(permit) = app.console.streams.clone().try_acquire_owned() else {
        return Err(ApiError::Busy(
            "too many event histories are open; new events show on reload".into(),
        ));
    };
    // The first poll sends every row of the newest page: what the page
    // showed may have changed before the stream opened.
    let follow = Follow {
        closing: app.console.closing.subscribe(),
        app,
        addr: a,
        session: ctx.session.clone(),
        shown: HashMap::new(),
        queue: Default::default(),
        polls: 0,
        _permit: permit,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_QUEUE);
    tokio::spawn(follow.run(tx));
    let events = stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|e| e.map(Ok::<_, std::convert::Infallible>))
    });
    let keep = warp::sse::keep_alive().interval(Duration::from_secs(15));
    Ok(warp::reply::Reply::into_response(warp::sse::reply(
        keep.stream(events),
    )))
}

async fn event_retry(ctx: &Ctx<'_>, a: i64, e: &str) -> Result<Response, ApiError> {
    ctx.manage(
        Method::POST,
        &format!("addr/{a}/event/{e}"),
        json!({"cmd": "retry"}),
    )
    .await?;
    Ok(redirect(&format!("/ui/addr/{a}/events?done=retried")))
}

/// The test event: the form's level, subject, message and file, pushed to
/// the address as any sender's push is.
async fn test_event(ctx: &Ctx<'_>, a: i64) -> Result<Response, ApiError> {
    let addr = ctx.app.store.addr_get(&AddrRef::Id(a)).await?;
    let f = ctx.form;
    let mut fields = Map::new();
    fields.insert("addr".into(), addr.a.clone().into());
    fields.insert("level".into(), f.text("level").into());
    fields.insert("subject".into(), f.text("subject").into());
    fields.insert("msg".into(), f.get("msg").unwrap_or("").into());
    fields.insert("sender".into(), "console".into());
    let size = match ctx.form.file.clone() {
        Some(file) => push::insert_media(&mut fields, file),
        None => 0,
    };
    match push::push_fields(ctx.app, fields, 0, size).await {
        Ok(()) => Ok(redirect(&format!("/ui/addr/{a}/events?done=sent"))),
        Err(ApiError::Disabled(_)) => Err(ApiError::Conflict(
            "the address is disabled: enable it to send events to it".into(),
        )),
        Err(ApiError::OverLimit { .. }) => Err(ApiError::Conflict(
            "the address is over its limits for now".into(),
        )),
        Err(e) => Err(e),
    }
}

// ---- plugins and nodes --------------------------------------------------------------

async fn plugins(ctx: &Ctx<'_>) -> Result<Response, ApiError> {
    let app = ctx.app;
    let timeout = app.config.delivery.node_timeout;
    let now = chrono::Utc::now();
    let secs =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let rows = crate::cluster::node_list(&app.store, &app.node, app.routes.applied()).await?;
    // The newest change a live node obeys.
    let newest = rows
        .iter()
        .filter(|r| r.alive(now, timeout))
        .map(|r| r.node.routing_version)
        .max()
        .unwrap_or_default();
    let nodes = rows
        .into_iter()
        .map(|r| {
            let alive = r.alive(now, timeout);
            let n = r.node;
            page::NodeRow {
                alive,
                rescued: n.rescued.map(secs),
                started: secs(n.started),
                heartbeat: secs(n.heartbeat),
                this: n.instance == app.node.instance,
                behind: alive && n.routing_version < newest,
                routing_version: n.routing_version,
                instance: n.instance,
                version: n.version,
                leased: r.leased,
            }
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &page::Plugins {
            chrome: ctx.chrome("plugins"),
            plugins: app.plugins.list(),
            nodes,
        },
    ))
}

async fn plugin_restart(ctx: &Ctx<'_>, name: &str) -> Result<Response, ApiError> {
    ctx.manage(
        Method::POST,
        &format!("plugin/{name}"),
        json!({"cmd": "restart"}),
    )
    .await?;
    Ok(redirect("/ui/plugins?done=restarted"))
}
