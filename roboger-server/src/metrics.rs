//! Prometheus metrics, served at `GET /metrics` (see [`crate::api`]).
//!
//! Two kinds of series. The hot paths (a push's answer, a group commit, a
//! delivery attempt) update counters and histograms here, which are
//! atomics. Everything else is read at scrape time from what already
//! holds it ([`Scrape`]): the plugin supervisor, the routing index, the
//! database pool, the body budget's pools, the management refusals, and
//! what is read from the database so the figure is the cluster's
//! ([`Counted`]: the pending deliveries, the oldest deletion not ended),
//! at most once every [`PENDING_REFRESH`].
//!
//! Invariant: labels are bounded (HTTP status, plugin name, outcome,
//! pool state, budget pool, refusal reason); no address or endpoint id
//! ever becomes a label.

use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::outage::Outage;

/// How long what is read from the database ([`Counted`]) is reused.
pub const PENDING_REFRESH: Duration = Duration::from_secs(5);

/// The statuses a push answers with, counted from the start (at 0) so
/// rate() and alert rules work before the first of each.
const PUSH_STATUSES: [u16; 8] = [202, 400, 404, 406, 408, 413, 429, 503];

/// How a delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retry,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retry => "retry",
            Outcome::Failed => "failed",
        }
    }
}

/// The server's metrics; one per process, shared.
pub struct Metrics {
    registry: Registry,
    push_total: IntCounterVec,
    push_known: [(u16, IntCounter); PUSH_STATUSES.len()],
    push_seconds: Histogram,
    commit_seconds: Histogram,
    commit_batch_size: Histogram,
    deliveries_total: IntCounterVec,
    held_total: IntCounterVec,
    attempt_seconds: HistogramVec,
    call_events: HistogramVec,
    routing_unobeyed: IntCounter,
    /// What was last read from the database and when, and how reading it
    /// fails.
    counted: tokio::sync::Mutex<(Option<(Instant, Counted)>, Outage)>,
    /// The database server's clock minus this node's, in seconds, as last
    /// measured (never on SQLite).
    clock_offset: std::sync::Mutex<Option<f64>>,
}

/// A count per plugin name.
pub type PerPlugin = Vec<(String, i64)>;

/// What a scrape reads from the database: figures of the whole cluster,
/// the same on every node.
#[derive(Debug, Clone, Default)]
pub struct Counted {
    /// Deliveries pending, per plugin.
    pub pending: PerPlugin,
    /// When the oldest deletion recorded and not yet ended was asked for.
    pub oldest_deletion: Option<chrono::DateTime<chrono::Utc>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Latency buckets, in seconds: a push is answered in about a
/// millisecond; a plugin call may take up to the timeout.
const SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

impl Metrics {
    /// Registers every series (and the `process_*` ones on Linux).
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let push_total = IntCounterVec::new(
            Opts::new("roboger_push_total", "Pushes answered, by HTTP status."),
            &["status"],
        )?;
        let push_known =
            PUSH_STATUSES.map(|s| (s, push_total.with_label_values(&[&s.to_string()])));
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        };
        let push_seconds = histogram(
            "roboger_push_seconds",
            "Time from a push's request to its answer.",
            &SECONDS,
        )?;
        let commit_seconds = histogram(
            "roboger_commit_seconds",
            "Duration of a group commit (events, deliveries and outcomes in one transaction).",
            &SECONDS,
        )?;
        let commit_batch_size = histogram(
            "roboger_commit_batch_size",
            "Events stored by one group commit.",
            &BATCH,
        )?;
        let deliveries_total = IntCounterVec::new(
            Opts::new(
                "roboger_deliveries_total",
                "Delivery attempts, by plugin and outcome (delivered, retry, failed).",
            ),
            &["plugin", "outcome"],
        )?;
        let held_total = IntCounterVec::new(
            Opts::new(
                "roboger_deliveries_held_total",
                "Deliveries put off without a call, by plugin, because their endpoint's target asked for a wait.",
            ),
            &["plugin"],
        )?;
        let attempt_seconds = HistogramVec::new(
            HistogramOpts::new(
                "roboger_delivery_attempt_seconds",
                "Duration of one delivery attempt (the plugin's send).",
            )
            .buckets(SECONDS.to_vec()),
            &["plugin"],
        )?;
        let call_events = HistogramVec::new(
            HistogramOpts::new(
                "roboger_plugin_call_events",
                "Deliveries handed to a plugin together: 1 for send; more for send_batch (split into several calls when the plugin's max-inflight has less room).",
            )
            .buckets(BATCH.to_vec()),
            &["plugin"],
        )?;
        let routing_unobeyed = IntCounter::new(
            "roboger_routing_changes_unobeyed_total",
            "Management changes this node answered though another live node did not obey them yet (frozen, or unable to read the database; the log names it).",
        )?;
        registry.register(Box::new(push_total.clone()))?;
        registry.register(Box::new(push_seconds.clone()))?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(commit_batch_size.clone()))?;
        registry.register(Box::new(deliveries_total.clone()))?;
        registry.register(Box::new(held_total.clone()))?;
        registry.register(Box::new(attempt_seconds.clone()))?;
        registry.register(Box::new(call_events.clone()))?;
        registry.register(Box::new(routing_unobeyed.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(ProcessMetrics(
            prometheus::process_collector::ProcessCollector::for_self(),
        )))?;
        Ok(Metrics {
            registry,
            push_total,
            push_known,
            push_seconds,
            commit_seconds,
            commit_batch_size,
            deliveries_total,
            held_total,
            attempt_seconds,
            call_events,
            routing_unobeyed,
            counted: tokio::sync::Mutex::new((
                None,
                Outage::new(
                    "metrics: cannot count pending deliveries and deletions",
                    "metrics: pending deliveries and deletions are counted again",
                ),
            )),
            clock_offset: std::sync::Mutex::new(None),
        })
    }

    /// The database server's clock was `seconds` ahead of this node's
    /// (behind when negative).
    pub fn clock_offset(&self, seconds: f64) {
        if let Ok(mut o) = self.clock_offset.lock() {
            *o = Some(seconds);
        }
    }

    /// A push answered with `status`, `took` after its request arrived.
    pub fn push(&self, status: u16, took: Duration) {
        match self.push_known.iter().find(|(s, _)| *s == status) {
            Some((_, c)) => c.inc(),
            None => self
                .push_total
                .with_label_values(&[&status.to_string()])
                .inc(),
        }
        self.push_seconds.observe(took.as_secs_f64());
    }

    /// A group commit of `events` events that took `took`.
    pub fn commit(&self, events: usize, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_batch_size.observe(events as f64);
    }

    /// A delivery attempt through `plugin`.
    pub fn attempt(&self, plugin: &str, outcome: Outcome, took: Duration) {
        self.deliveries_total
            .with_label_values(&[plugin, outcome.label()])
            .inc();
        self.attempt_seconds
            .with_label_values(&[plugin])
            .observe(took.as_secs_f64());
    }

    /// A delivery through `plugin` failed for good without a try (its
    /// endpoint or address disabled until `max-age`): counted as failed,
    /// with no attempt's duration.
    pub fn failed_untried(&self, plugin: &str) {
        self.deliveries_total
            .with_label_values(&[plugin, Outcome::Failed.label()])
            .inc();
    }

    /// A delivery through `plugin` put off because its endpoint is on hold.
    pub fn held(&self, plugin: &str) {
        self.held_total.with_label_values(&[plugin]).inc();
    }

    /// `events` deliveries handed to `plugin` together.
    pub fn call(&self, plugin: &str, events: usize) {
        self.call_events
            .with_label_values(&[plugin])
            .observe(events as f64);
    }

    /// A management change answered though another live node did not
    /// obey it yet.
    pub fn routing_unobeyed(&self) {
        self.routing_unobeyed.inc();
    }

    /// What is read from the database: the last reading if it is fresh,
    /// else `read`'s (kept for [`PENDING_REFRESH`]); the last reading when
    /// `read` fails.
    pub async fn counted<F, E>(&self, read: F) -> Counted
    where
        F: Future<Output = Result<Counted, E>>,
        E: std::fmt::Display,
    {
        let mut guard = self.counted.lock().await;
        let (cached, outage) = &mut *guard;
        if let Some((at, v)) = cached.as_ref()
            && at.elapsed() < PENDING_REFRESH
        {
            return v.clone();
        }
        match read.await {
            Ok(v) => {
                outage.succeeded();
                *cached = Some((Instant::now(), v.clone()));
                v
            }
            Err(e) => {
                outage.failed(e);
                cached.as_ref().map(|(_, v)| v.clone()).unwrap_or_default()
            }
        }
    }

    /// Every series in the Prometheus text format, the scrape-time ones
    /// from `scrape`.
    pub fn render(&self, scrape: &Scrape) -> Result<String, prometheus::Error> {
        // Each plugin's delivery counters are there from its first scrape,
        // at 0, so that increase() and alert rules see its first failure
        // (a series that appears at 1 has not increased).
        for p in &scrape.plugins {
            for o in [Outcome::Delivered, Outcome::Retry, Outcome::Failed] {
                self.deliveries_total
                    .with_label_values(&[p.name.as_str(), o.label()]);
            }
            self.held_total.with_label_values(&[p.name.as_str()]);
        }
        let mut families = self.registry.gather();
        families.extend(scrape.families()?);
        if let Some(seconds) = self.clock_offset.lock().ok().and_then(|o| *o) {
            let offset = prometheus::Gauge::new(
                "roboger_clock_offset_seconds",
                "How far the database server's clock is ahead of this node's (behind when negative), measured every 10 s; absent on SQLite.",
            )?;
            offset.set(seconds);
            families.extend(offset.collect());
        }
        // A vector with no children (no plugins) is left out, as the
        // registry's own are: the encoder refuses an empty family.
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        prometheus::TextEncoder::new().encode_to_string(&families)
    }
}

/// One plugin as a scrape sees it.
#[derive(Debug, Clone)]
pub struct PluginSample {
    pub name: String,
    pub up: bool,
    pub restarts: u64,
    pub inflight: usize,
    /// Its log lines dropped past their budget (`plugin_log`).
    pub log_dropped: u64,
    /// Resident memory of its process, if it runs.
    pub resident_bytes: Option<u64>,
}

/// The values read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub plugins: Vec<PluginSample>,
    pub routing_addresses: usize,
    /// Database connections in use and idle.
    pub pool: (u64, u64),
    /// Pending deliveries and the oldest deletion, read from the
    /// database.
    pub counted: Counted,
    /// The body budget's pools.
    pub body_budget: Vec<BudgetPool>,
    /// Management requests refused, by reason.
    pub management_refused: ManagementRefused,
    /// Log lines of deliveries retried, and of deliveries failed for
    /// good, dropped past their budgets (`log_budget`).
    pub delivery_log_dropped: (u64, u64),
    /// Log lines of refused management access dropped past their budget.
    pub refused_log_dropped: u64,
    /// Requests answered 503 for a database error, and the log lines of
    /// them dropped past their budget.
    pub database_errors: (u64, u64),
    /// Plugin callbacks failed on a database error, and the log lines of
    /// them dropped past their budget.
    pub plugin_database_errors: (u64, u64),
    /// Connections open, and those asked to give way to a client that
    /// came while all places were taken (`connections`).
    pub connections: (usize, u64),
}

/// How many management requests have been refused, by reason, since
/// start (counted by `api::auth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManagementRefused {
    /// A key was given and it was not the master key (403).
    pub wrong_key: u64,
    /// The client's address is not in `master.allow` (403).
    pub not_allowed: u64,
    /// The client's address gave too many wrong keys and must wait (429).
    pub waiting: u64,
}

/// One pool of the body budget as a scrape sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPool {
    /// `small` or `large`.
    pub pool: &'static str,
    /// Room held now.
    pub used_bytes: u64,
    pub size_bytes: u64,
    /// Requests answered 503 for want of room here, since start.
    pub refused: u64,
}

impl Scrape {
    fn families(&self) -> Result<Vec<MetricFamily>, prometheus::Error> {
        let plugin_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["plugin"]);
        let up = plugin_gauge(
            "roboger_plugin_up",
            "1 while the plugin's process runs and serves calls.",
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "roboger_plugin_restarts_total",
                "Times the plugin crashed and was restarted.",
            ),
            &["plugin"],
        )?;
        let log_dropped = IntCounterVec::new(
            Opts::new(
                "roboger_plugin_log_dropped_total",
                "Lines of the plugin's log (its stderr and log calls) not written to the server's log, past 1,000 a minute.",
            ),
            &["plugin"],
        )?;
        let inflight = plugin_gauge("roboger_plugin_inflight", "Calls in flight to the plugin.")?;
        let resident = plugin_gauge(
            "roboger_plugin_resident_bytes",
            "Resident memory of the plugin's process.",
        )?;
        let pending = plugin_gauge(
            "roboger_deliveries_pending",
            "Deliveries not yet delivered or failed, in the whole cluster.",
        )?;
        for p in &self.plugins {
            let l = [p.name.as_str()];
            up.with_label_values(&l).set(i64::from(p.up));
            restarts.with_label_values(&l).inc_by(p.restarts);
            log_dropped.with_label_values(&l).inc_by(p.log_dropped);
            inflight
                .with_label_values(&l)
                .set(i64::try_from(p.inflight).unwrap_or(i64::MAX));
            if let Some(b) = p.resident_bytes {
                resident
                    .with_label_values(&l)
                    .set(i64::try_from(b).unwrap_or(i64::MAX));
            }
            // Zero for a plugin with nothing pending, rather than absent.
            pending.with_label_values(&l).set(0);
        }
        for (plugin, n) in &self.counted.pending {
            pending.with_label_values(&[plugin]).set(*n);
        }
        let deletion = prometheus::Gauge::new(
            "roboger_deletion_oldest_seconds",
            "How long ago the oldest deletion not yet ended (an address's, an endpoint's, everything) was asked for, in the whole cluster; 0 when none is.",
        )?;
        deletion.set(self.counted.oldest_deletion.map_or(0.0, |at| {
            (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
        }));
        let routing = IntGauge::new(
            "roboger_routing_addresses",
            "Addresses in this node's routing index.",
        )?;
        routing.set(i64::try_from(self.routing_addresses).unwrap_or(i64::MAX));
        let open = IntGauge::new(
            "roboger_connections_open",
            "Client connections this node holds open (at most 4096).",
        )?;
        open.set(i64::try_from(self.connections.0).unwrap_or(i64::MAX));
        let given_way = IntCounter::with_opts(Opts::new(
            "roboger_connections_given_way_total",
            "Client connections with no request in the server (idle, or a request head still arriving) closed to make room for a client that came while all 4096 places were taken.",
        ))?;
        given_way.inc_by(self.connections.1);
        let pool = IntGaugeVec::new(
            Opts::new(
                "roboger_db_pool_connections",
                "Database connections of this node's pool, by state (in_use, idle).",
            ),
            &["state"],
        )?;
        let (used, idle) = self.pool;
        pool.with_label_values(&["in_use"])
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        pool.with_label_values(&["idle"])
            .set(i64::try_from(idle).unwrap_or(i64::MAX));
        let pool_gauge =
            |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["pool"]);
        let budget_used = pool_gauge(
            "roboger_body_budget_used_bytes",
            "Room of body-budget held now by request bodies and by files and plugin answers being sent, by pool (small: every body's first 64 KiB; large: larger ones, whole).",
        )?;
        let budget_size = pool_gauge(
            "roboger_body_budget_size_bytes",
            "Size of each pool of body-budget.",
        )?;
        let budget_refused = IntCounterVec::new(
            Opts::new(
                "roboger_body_budget_refused_total",
                "Requests answered 503 for want of room in body-budget, by pool.",
            ),
            &["pool"],
        )?;
        for p in &self.body_budget {
            let l = [p.pool];
            budget_used
                .with_label_values(&l)
                .set(i64::try_from(p.used_bytes).unwrap_or(i64::MAX));
            budget_size
                .with_label_values(&l)
                .set(i64::try_from(p.size_bytes).unwrap_or(i64::MAX));
            budget_refused.with_label_values(&l).inc_by(p.refused);
        }
        let auth_refused = IntCounterVec::new(
            Opts::new(
                "roboger_management_refused_total",
                "Management, console and metrics requests refused: a wrong master key (wrong_key, 403), a client address not in master.allow (not_allowed, 403), or an address that gave too many wrong keys and must wait (waiting, 429).",
            ),
            &["reason"],
        )?;
        let r = self.management_refused;
        auth_refused
            .with_label_values(&["wrong_key"])
            .inc_by(r.wrong_key);
        auth_refused
            .with_label_values(&["not_allowed"])
            .inc_by(r.not_allowed);
        auth_refused
            .with_label_values(&["waiting"])
            .inc_by(r.waiting);
        let delivery_log_dropped = IntCounterVec::new(
            Opts::new(
                "roboger_delivery_log_dropped_total",
                "Log lines of failed deliveries not written, past 600 a minute of each outcome (retry, failed); roboger_deliveries_total counts every outcome.",
            ),
            &["outcome"],
        )?;
        let (retry, failed) = self.delivery_log_dropped;
        delivery_log_dropped
            .with_label_values(&["retry"])
            .inc_by(retry);
        delivery_log_dropped
            .with_label_values(&["failed"])
            .inc_by(failed);
        let refused_log_dropped = IntCounter::with_opts(Opts::new(
            "roboger_refused_log_dropped_total",
            "Log lines of refused management, console and metrics requests not written, past 600 a minute; roboger_management_refused_total counts every refusal.",
        ))?;
        refused_log_dropped.inc_by(self.refused_log_dropped);
        let database_errors = IntCounter::with_opts(Opts::new(
            "roboger_request_database_errors_total",
            "Requests answered 503 for a database error their handler met (management, console, public files, a push counted against its address's limits); a push whose commit failed is in roboger_push_total{status=\"503\"} instead.",
        ))?;
        database_errors.inc_by(self.database_errors.0);
        let database_log_dropped = IntCounter::with_opts(Opts::new(
            "roboger_database_error_log_dropped_total",
            "Log lines of requests failed on a database error not written, past 600 a minute; roboger_request_database_errors_total counts every such request.",
        ))?;
        database_log_dropped.inc_by(self.database_errors.1);
        let plugin_database_errors = IntCounter::with_opts(Opts::new(
            "roboger_plugin_database_errors_total",
            "Plugin callbacks (database and bucket) failed on a database error, each answered to its plugin as an error.",
        ))?;
        plugin_database_errors.inc_by(self.plugin_database_errors.0);
        let plugin_database_log_dropped = IntCounter::with_opts(Opts::new(
            "roboger_plugin_database_error_log_dropped_total",
            "Log lines of plugin callbacks failed on a database error not written, past 600 a minute; roboger_plugin_database_errors_total counts every such call.",
        ))?;
        plugin_database_log_dropped.inc_by(self.plugin_database_errors.1);
        let mut out = Vec::new();
        for c in [
            &up,
            &inflight,
            &resident,
            &pending,
            &pool,
            &budget_used,
            &budget_size,
        ] {
            out.extend(c.collect());
        }
        out.extend(restarts.collect());
        out.extend(log_dropped.collect());
        out.extend(delivery_log_dropped.collect());
        out.extend(refused_log_dropped.collect());
        out.extend(database_errors.collect());
        out.extend(database_log_dropped.collect());
        out.extend(plugin_database_errors.collect());
        out.extend(plugin_database_log_dropped.collect());
        out.extend(budget_refused.collect());
        out.extend(auth_refused.collect());
        out.extend(routing.collect());
        out.extend(open.collect());
        out.extend(given_way.collect());
        out.extend(deletion.collect());
        Ok(out)
    }
}

/// The `process_*` series of the prometheus crate's collector, but for
/// `process_cpu_seconds_total`: it counts whole seconds (an integer
/// counter, tikv/rust-prometheus#451), so a server using a little CPU
/// showed none for a while and then a whole second at once, and a rate
/// over a minute was a saw. Here it is the kernel's count, in seconds
/// with their fraction, as Prometheus's own clients give it.
#[cfg(target_os = "linux")]
struct ProcessMetrics(prometheus::process_collector::ProcessCollector);

#[cfg(target_os = "linux")]
impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        let Some(seconds) = cpu_seconds() else {
            return families;
        };
        for family in &mut families {
            if family.name() == "process_cpu_seconds_total" {
                for metric in family.mut_metric() {
                    let mut counter = prometheus::proto::Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// The CPU time this process has used (user and system), in seconds,
/// from `/proc/self/stat`.
#[cfg(target_os = "linux")]
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command's name (in parentheses, which may
    // hold spaces): the 14th and 15th of the line, utime and stime.
    let mut after = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = after.next()?.parse().ok()?;
    let stime: u64 = after.next()?.parse().ok()?;
    Some((utime + stime) as f64 / rustix::param::clock_ticks_per_second() as f64)
}
