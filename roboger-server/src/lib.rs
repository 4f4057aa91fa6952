//! Roboger server: accepts events from robots and hands them to plugins,
//! and manages addresses, endpoints and subscriptions over a REST API.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules.
#![forbid(unsafe_code)]

pub mod api;
pub mod bucket;
pub mod cleanup;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod deletion;
pub mod event;
pub mod host;
pub mod level;
pub mod limits;
pub mod listener;
pub mod log_budget;
pub mod log_writer;
pub mod metrics;
pub mod outage;
pub mod pipeline;
pub mod plugin_log;
pub mod random;
pub mod routing;
pub mod sandbox;
pub mod secrets;
pub mod server;
pub mod store;
pub mod supervisor;
pub mod systemd;

use std::sync::Arc;
use std::time::Duration;

use config::Config;
use tokio::sync::mpsc;

/// Plugins back in service whose deliveries wait to be made due: more at
/// once are not told (their deliveries go at their next look).
const BACK_IN_SERVICE_QUEUED: usize = 16;

/// Why [`App::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database did not give the routing index.
    #[error("cannot load the routing index: {0}")]
    Store(#[from] store::StoreError),
    /// The Redis URL of `limits` is not one.
    #[error("limits: {0}")]
    Limits(String),
    /// The database refused the start's first write (this node's row).
    #[error(
        "the database takes no writes from this server (a file or directory its user may not \
         write, a read-only replica?): {0}"
    )]
    NoWrites(store::StoreError),
    /// The metrics registry refused a metric.
    #[error("cannot set up the metrics: {0}")]
    Metrics(String),
}

/// What a reload changed.
#[derive(Debug)]
pub struct Reloaded {
    /// The plugins started, stopped and restarted.
    pub plugins: supervisor::Reconfigured,
    /// Settings that changed but apply only after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The database.
    pub store: store::Store,
    /// The plugins, each a supervised child process.
    pub plugins: Arc<supervisor::Supervisor>,
    /// Master key and network checks of the management API.
    pub auth: api::auth::MasterAuth,
    /// Where address limits are counted (the database or Redis).
    pub counters: limits::Counters,
    /// Which endpoints each address's events go to.
    pub routes: Arc<routing::Routes>,
    /// Accepted events on their way to the plugins.
    pub pipeline: pipeline::Pipeline,
    /// This process as a node of the servers sharing the database.
    pub node: Arc<cluster::Node>,
    /// What `/metrics` shows.
    pub metrics: Arc<metrics::Metrics>,
    /// Room for request bodies being read and handled (`body-budget`).
    pub bodies: api::budget::BodyBudget,
    /// The web console's open event streams.
    pub console: api::console::Live,
    /// Core cleanups on this node (the `cleanup` command and the periodic
    /// task).
    pub cleanup: cleanup::Cleanup,
    /// Deletions of history, recorded until they end.
    pub deletions: deletion::Deletions,
    /// The connections the server holds open ([`server::run`]).
    pub connections: Arc<connections::Connections>,
    /// The heartbeat task, stopped by [`App::stop`].
    heartbeat: tokio::task::JoinHandle<()>,
    /// The migrations a newer build applied while this node ran, once
    /// the heartbeat has seen them ([`cluster::run`]); the node is to stop.
    superseded: tokio::sync::watch::Receiver<Option<Vec<String>>>,
}

/// Makes due now, in a task of its own, the waiting deliveries of the
/// endpoints of each of `started` that runs: plugins a reload started,
/// or started anew with changed settings. Their deliveries were put off
/// while the plugin was not there to try them (for a tenth of their age,
/// up to `retry-max`: `pipeline::held_wait`), or back off after answers
/// under its old settings; the operator's reload is what they waited
/// for. The log says how many, once done.
fn plugins_waiting_made_due(
    store: &store::Store,
    plugins: &supervisor::Supervisor,
    started: Vec<String>,
) {
    let running: Vec<String> = plugins
        .list()
        .into_iter()
        .filter(|p| p.state == supervisor::State::Running && started.contains(&p.plugin_name))
        .map(|p| p.plugin_name)
        .collect();
    if running.is_empty() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        for plugin in running {
            plugin_waiting_made_due(&store, &plugin, "after a reload").await;
        }
    });
}

/// Makes due the waiting deliveries of the endpoints of each plugin the
/// supervisor says runs again after it was failed or refused
/// ([`supervisor::Options::back_in_service`]), by hand (the `restart`
/// command) or by itself (a failed plugin's slow retries): they were put
/// off while it was out of service. One plugin at a time, until the
/// supervisor is gone.
async fn back_in_service_made_due(store: store::Store, mut back: mpsc::Receiver<String>) {
    while let Some(plugin) = back.recv().await {
        plugin_waiting_made_due(&store, &plugin, "again after it was out of service").await;
    }
}

/// Makes due the waiting deliveries of plugin `plugin`'s endpoints, as
/// it runs `again` (the log's words); the log says how many.
async fn plugin_waiting_made_due(store: &store::Store, plugin: &str, again: &str) {
    match store.plugin_waiting_made_due(plugin).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            plugin,
            deliveries = n,
            "the plugin runs {again}: its endpoints' waiting deliveries are due now"
        ),
        Err(e) => tracing::warn!(
            plugin,
            error = %e,
            "the plugin runs {again}, but its endpoints' waiting deliveries could not be made \
             due now; each is looked at when it was due"
        ),
    }
}

/// Warns of the plugins that endpoints use but `configured` does not
/// name (taken out of the config, or a name mistyped): their deliveries
/// are put off, not tried, until a server that configures them takes
/// them or they pass `delivery.max-age` (`pipeline::held_wait`).
async fn warn_unconfigured(
    store: &store::Store,
    configured: &[config::PluginConfig],
    timeout: Duration,
) {
    let in_use = match tokio::time::timeout(timeout, store.endpoints_by_plugin()).await {
        Ok(Ok(in_use)) => in_use,
        Ok(Err(e)) => return tracing::warn!(error = %e, "cannot count the endpoints by plugin"),
        Err(_) => return tracing::warn!("cannot count the endpoints by plugin: no answer in time"),
    };
    let missing: Vec<String> = in_use
        .into_iter()
        .filter(|(name, _)| !configured.iter().any(|p| &p.name == name))
        .map(|(name, n)| {
            let endpoints = if n == 1 { "endpoint" } else { "endpoints" };
            format!("{name} ({n} {endpoints})")
        })
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            "endpoints use plugins this server does not configure: {}; their deliveries wait, \
             not tried, for a server that configures them, until delivery.max-age",
            missing.join(", ")
        );
    }
}

impl App {
    /// Assembles the application state and starts the plugins (returns
    /// once each has had its first start attempt, or a start's timeout
    /// passed).
    pub async fn start(config: Config, store: store::Store) -> Result<App, StartError> {
        let auth = api::auth::MasterAuth::new(
            &config.master_key,
            config.master_allow.clone(),
            config.ip_header.as_deref(),
            config.ip_header_from.clone(),
        );
        let host = host::HostContext::new(
            store.clone(),
            config.timeout,
            config.limits.is_some(),
            config.bucket_default_expires,
            config
                .public_url
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_string()),
        );
        let mut opts = supervisor::Options::new(config.timeout, config.plugin_max_line);
        opts.health_interval = config.plugin_health_interval;
        // This executable confines each plugin before running it.
        opts.launcher = std::env::current_exe().ok();
        let (back, back_in_service) = mpsc::channel(BACK_IN_SERVICE_QUEUED);
        opts.back_in_service = Some(back);
        tokio::spawn(back_in_service_made_due(store.clone(), back_in_service));
        let plugins = supervisor::Supervisor::start(config.plugins.clone(), opts, host);
        plugins.wait_started().await;
        let counters = limits::Counters::new(
            config.limits.as_ref().and_then(|l| l.redis.as_deref()),
            config.timeout,
        )
        .map_err(StartError::Limits)?;
        warn_unconfigured(&store, &config.plugins, config.timeout).await;
        let routes = Arc::new(routing::Routes::default());
        routes.load(&store).await?;
        let node = Arc::new(cluster::Node::new(&config.delivery.node));
        node.obeying(routes.applied());
        cluster::join(&store, &node, config.timeout)
            .await
            .map_err(StartError::NoWrites)?;
        // A change committed since the load did not wait for this node if
        // its node looked for the others before this one's row was there.
        store::within(config.timeout, routes.catch_up(&store)).await?;
        tokio::spawn(routing::follow(
            Arc::downgrade(&routes),
            store.clone(),
            config.timeout,
            node.clone(),
        ));
        let metrics =
            Arc::new(metrics::Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?);
        // A body gets twice the request timeout before it must keep pace.
        let bodies = api::budget::BodyBudget::new(
            config.body_budget,
            config.timeout / 2,
            config.timeout * 2,
        );
        let delivery = Arc::new(config.delivery.clone());
        let (newer, superseded) = tokio::sync::watch::channel(None);
        let heartbeat = tokio::spawn(cluster::run(
            store.clone(),
            node.clone(),
            delivery.clone(),
            metrics.clone(),
            newer,
        ));
        let pipeline = pipeline::Pipeline::start(
            store.clone(),
            plugins.clone(),
            delivery,
            config.timeout,
            node.clone(),
            metrics.clone(),
        )
        .await;
        let deletions = deletion::Deletions::new(
            store.clone(),
            node.clone(),
            config.timeout,
            config.delivery.node_timeout,
        );
        let cleanup = cleanup::Cleanup::new(
            store.clone(),
            plugins.clone(),
            deletions.clone(),
            config.event_retention,
            config.timeout,
        );
        Ok(App {
            config,
            store,
            plugins,
            auth,
            counters,
            routes,
            pipeline,
            node,
            metrics,
            bodies,
            console: api::console::Live::default(),
            cleanup,
            deletions,
            connections: connections::Connections::new(server::MAX_CONNECTIONS),
            heartbeat,
            superseded,
        })
    }

    /// Applies a reloaded configuration (SIGHUP): the plugin list takes
    /// effect at once ([`supervisor::Supervisor::reconfigure`]); any other
    /// changed setting is named in the answer and takes effect at the next
    /// restart. The deliveries waiting for a plugin it starts, or starts
    /// anew, are made due at once ([`plugins_waiting_made_due`]).
    pub async fn reload(&self, new: Config) -> Reloaded {
        let new = new.reloading(&self.config);
        let plugins = self.plugins.reconfigure(new.plugins.clone()).await;
        warn_unconfigured(&self.store, &new.plugins, new.timeout).await;
        let started = plugins.added.iter().chain(&plugins.changed);
        plugins_waiting_made_due(&self.store, &self.plugins, started.cloned().collect());
        Reloaded {
            plugins,
            needs_restart: self.config.differences(&new),
        }
    }

    /// The whole cluster's pending deliveries per plugin and oldest
    /// deletion not ended, read from the database at most every
    /// [`metrics::PENDING_REFRESH`] (the metrics and systemd's `STATUS=`
    /// share the reading).
    pub async fn counted(&self) -> metrics::Counted {
        let timeout = self.config.timeout;
        let read = async {
            Ok::<_, store::StoreError>(metrics::Counted {
                pending: self.store.pending_by_plugin().await?,
                oldest_deletion: self.store.deletion_oldest().await?,
            })
        };
        self.metrics
            .counted(async {
                match tokio::time::timeout(timeout, read).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err("the database did not answer in time".to_string()),
                }
            })
            .await
    }

    /// Resolves, with the migrations it applied, once a newer build has
    /// migrated the database while this node ran: the node is to stop.
    pub async fn superseded(&self) -> Vec<String> {
        let mut newer = self.superseded.clone();
        match newer.wait_for(Option::is_some).await {
            Ok(unknown) => unknown.clone().unwrap_or_default(),
            // The heartbeat has stopped: so has the node.
            Err(_) => std::future::pending().await,
        }
    }

    /// The migrations a newer build applied while this node ran, if the
    /// heartbeat has seen any ([`App::superseded`]).
    pub fn superseded_by(&self) -> Option<Vec<String>> {
        self.superseded.borrow().clone()
    }

    /// Stops this node cleanly: no more heartbeats, and the deliveries it
    /// still holds are left to the other nodes (or to its next start).
    pub async fn stop(&self) {
        self.heartbeat.abort();
        cluster::leave(&self.store, &self.node, self.config.timeout).await;
    }
}
