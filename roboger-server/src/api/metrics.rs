//! `GET /metrics`: the Prometheus scrape. Readable with the master key
//! (`Authorization: Bearer`, as a scrape config sends it, or
//! `X-Auth-Key`), and without one from the `metrics.allow` networks.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::error::ApiError;
use super::guessing::{self, Counting};
use super::reply::{self, Response};
use crate::App;
use crate::log_budget;
use crate::metrics::{PluginSample, Scrape};
use crate::supervisor::State;

/// Answers one scrape.
pub async fn scrape(app: &App, headers: &HeaderMap, peer: Option<SocketAddr>) -> Response {
    if let Err(e) = allowed(app, headers, peer).await {
        return reply::error(&e);
    }
    let plugins = app.plugins.list();
    let mut samples = Vec::with_capacity(plugins.len());
    for p in plugins {
        samples.push(PluginSample {
            up: p.state == State::Running,
            restarts: p.restarts,
            inflight: p.inflight,
            log_dropped: p.log_dropped,
            resident_bytes: match p.pid {
                Some(pid) => resident_bytes(pid).await,
                None => None,
            },
            name: p.plugin_name,
        });
    }
    let scrape = Scrape {
        plugins: samples,
        routing_addresses: app.routes.len(),
        pool: app.store.pool_connections(),
        counted: app.counted().await,
        body_budget: app.bodies.usage().to_vec(),
        management_refused: app.auth.refused(),
        delivery_log_dropped: (
            log_budget::RETRIED.dropped_total(),
            log_budget::FAILED.dropped_total(),
        ),
        refused_log_dropped: log_budget::REFUSED.dropped_total(),
        database_errors: (
            log_budget::DATABASE.offered_total(),
            log_budget::DATABASE.dropped_total(),
        ),
        plugin_database_errors: (
            log_budget::PLUGIN_DATABASE.offered_total(),
            log_budget::PLUGIN_DATABASE.dropped_total(),
        ),
        connections: app.connections.counts(),
    };
    match app.metrics.render(&scrape) {
        Ok(body) => {
            let mut r = reply::text(StatusCode::OK, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot encode");
            reply::error(&ApiError::Unavailable("cannot encode the metrics".into()))
        }
    }
}

/// How long a scrape waits for the database to count wrong keys before
/// it checks the key alone: short, so that a scrape during an outage
/// still ends within Prometheus's default `scrape_timeout` (10 s) after
/// the pending deliveries' own wait (`timeout`).
const COUNT_WAIT: Duration = Duration::from_secs(1);

/// From a `metrics.allow` network, or with the master key (and from
/// `master.allow`, as for the management API, wrong keys slowed down as
/// there). Scrapes go on while the database cannot count wrong keys: the
/// key is then checked alone.
async fn allowed(app: &App, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
    let ip = app.auth.client_ip(peer, headers);
    if ip.is_some_and(|ip| crate::api::auth::within(&app.config.metrics_allow, ip)) {
        return Ok(());
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let key = bearer.or_else(|| headers.get("x-auth-key").and_then(|v| v.to_str().ok()));
    let Some(key) = key else {
        return app.auth.check(ip, None);
    };
    match guessing::check_key(app, ip, key, Counting::WhenWrong, COUNT_WAIT).await {
        Err(ApiError::Unavailable(why)) => {
            tracing::warn!(
                "metrics: wrong keys cannot be counted now ({why}); checking the key alone"
            );
            app.auth.check(ip, Some(key))
        }
        checked => checked,
    }
}

/// A process's resident memory, from `/proc/PID/statm`.
async fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = tokio::fs::read_to_string(format!("/proc/{pid}/statm"))
        .await
        .ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}
