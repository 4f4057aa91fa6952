//! The console's pages: askama templates (in `templates/console/`,
//! compiled into the binary with their escaping), the values each one
//! shows, and the static assets.
//!
//! Invariant: every page is rendered by a template, which escapes every
//! value; only rows rendered by a template are inserted unescaped.

use askama::Template;
use http::{HeaderValue, StatusCode, header};

use super::schema_form::Field;
use crate::api::reply::{self, Response};
use crate::store::entity::{addr, endpoint};
use crate::store::{EventHead, SubscriptionPage};
use crate::supervisor::Status;

/// Changes when the assets change, so browsers fetch the new ones.
pub const ASSETS: &str = env!("CARGO_PKG_VERSION");

const CSS: &str = include_str!("../../../templates/console/static/console.css");
const JS: &str = include_str!("../../../templates/console/static/console.js");

/// What every page's frame shows.
#[derive(Debug, Clone, Default)]
pub struct Chrome {
    pub signed_in: bool,
    pub csrf: String,
    /// The navigation entry of this page.
    pub section: &'static str,
    /// A confirmation of what the last form did.
    pub notice: Option<String>,
    pub assets: &'static str,
}

impl Chrome {
    pub fn new(csrf: &str, section: &'static str) -> Chrome {
        Chrome {
            signed_in: true,
            csrf: csrf.to_string(),
            section,
            notice: None,
            assets: ASSETS,
        }
    }

    pub fn signed_out() -> Chrome {
        Chrome {
            assets: ASSETS,
            ..Chrome::default()
        }
    }
}

/// The levels a subscription or a test event can have.
pub const LEVELS: [(i16, &str); 5] = [
    (10, "debug"),
    (20, "info"),
    (30, "warning"),
    (40, "error"),
    (50, "critical"),
];

/// How a subscription's level is compared with an event's.
pub const MATCHES: [(&str, &str); 5] = [
    ("ge", "level or above"),
    ("g", "above level"),
    ("e", "level only"),
    ("le", "level or below"),
    ("l", "below level"),
];

#[derive(Template)]
#[template(path = "console/signin.html")]
pub struct SignIn {
    pub chrome: Chrome,
    pub next: String,
    pub error: Option<String>,
}

#[derive(Template)]
#[template(path = "console/message.html")]
pub struct Message {
    pub chrome: Chrome,
    pub heading: String,
    pub text: String,
    pub back: String,
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
pub struct Confirm {
    pub chrome: Chrome,
    pub heading: String,
    pub text: String,
    pub action: String,
    pub fields: Vec<(String, String)>,
    pub button: String,
    pub back: String,
}

#[derive(Template)]
#[template(path = "console/addr_list.html")]
pub struct AddrList {
    pub chrome: Chrome,
    pub q: String,
    pub rows: Vec<addr::Model>,
    pub total: Option<u64>,
    pub after: Option<i64>,
    pub next: Option<i64>,
}

/// An endpoint with a page of its subscriptions, on its address's page.
pub struct EndpointBlock {
    pub ep: endpoint::Model,
    pub subs: SubscriptionPage,
    /// Why its plugin cannot deliver for it here, when it cannot.
    pub plugin_note: Option<String>,
    /// Whether a deletion of it (not of its address) asked for goes on.
    pub deleting: bool,
}

#[derive(Template)]
#[template(path = "console/addr.html")]
pub struct AddrPage {
    pub chrome: Chrome,
    pub a: addr::Model,
    /// Whether a deletion asked for takes it and goes on.
    pub deleting: bool,
    pub limits: bool,
    /// How many endpoints the address has, of which `endpoints` is a page.
    pub endpoint_count: u64,
    pub endpoints: Vec<EndpointBlock>,
    /// The page's `after`, when it is not the first page.
    pub after: Option<i64>,
    /// The next page's `after`, when there is one.
    pub next: Option<i64>,
    pub plugins: Vec<String>,
    pub levels: &'static [(i16, &'static str)],
    pub matches: &'static [(&'static str, &'static str)],
}

#[derive(Template)]
#[template(path = "console/endpoint.html")]
pub struct EndpointForm {
    pub chrome: Chrome,
    pub heading: String,
    pub addr_id: i64,
    pub plugin: String,
    pub plugin_description: Option<String>,
    pub action: String,
    pub submit: String,
    pub description: String,
    pub active: bool,
    pub fields: Vec<Field>,
    pub error: Option<String>,
    /// The property the error is about, when the form knows it.
    pub error_field: Option<String>,
    /// Other endpoints of the address to copy subscriptions to.
    pub copy_targets: CopyTargets,
    /// How an existing endpoint's deliveries stand.
    pub deliveries: Option<EndpointDeliveries>,
    /// What the page says when a deletion asked for takes the endpoint
    /// (or its address) and goes on: it then offers no change.
    pub deleting: Option<&'static str>,
}

/// The other endpoints of an address, as an endpoint's page offers them
/// to copy its subscriptions to.
#[derive(Default)]
pub struct CopyTargets {
    /// By id and plugin, when there are few enough to list.
    pub named: Vec<(i64, String)>,
    /// Too many to list: the page asks for an endpoint's number.
    pub by_number: bool,
}

/// An endpoint's deliveries of the events still kept, as its page shows
/// them.
pub struct EndpointDeliveries {
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
    /// The newest error of a delivery still pending or failed, and when.
    pub last_error: Option<(String, String)>,
}

/// A delivery as the history shows it.
pub struct DeliveryRow {
    pub endpoint: String,
    pub state: String,
    pub attempts: i32,
    pub last_error: String,
    pub updated: String,
    /// When a delivery that has failed, or was put off because its
    /// endpoint is on hold, will be tried again.
    pub next_try: Option<String>,
}

#[derive(Template)]
#[template(path = "console/event_row.html")]
pub struct EventRow<'a> {
    pub e: &'a EventHead,
    pub level_name: String,
    pub created: String,
    pub deliveries: Vec<DeliveryRow>,
    pub failed: bool,
    pub csrf: &'a str,
}

#[derive(Template)]
#[template(path = "console/events.html")]
pub struct Events {
    pub chrome: Chrome,
    pub addr_id: i64,
    /// The newest page, which new events join.
    pub live: bool,
    /// Each event, rendered by [`EventRow`].
    pub rows: Vec<String>,
    pub older: Option<String>,
}

/// A node as the plugins page shows it.
pub struct NodeRow {
    pub instance: String,
    pub version: String,
    pub started: String,
    pub heartbeat: String,
    pub alive: bool,
    pub rescued: Option<String>,
    pub leased: i64,
    pub this: bool,
    /// The newest management change it obeys.
    pub routing_version: i64,
    /// Alive, and obeying an older change than another live node does
    /// (frozen, or unable to read the database): a change made meanwhile
    /// is answered without waiting for it any longer than its bound.
    pub behind: bool,
}

#[derive(Template)]
#[template(path = "console/plugins.html")]
pub struct Plugins {
    pub chrome: Chrome,
    pub plugins: Vec<Status>,
    pub nodes: Vec<NodeRow>,
}

/// An HTML answer with `status`.
pub fn html(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(body) => {
            let mut r = reply::text(status, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "console: a page failed to render");
            reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
        }
    }
}

/// A static asset by name.
pub fn asset(name: &str) -> Option<Response> {
    let (body, ctype) = match name {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    let mut r = reply::text(StatusCode::OK, body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    Some(r)
}
