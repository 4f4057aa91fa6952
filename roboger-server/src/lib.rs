//! Roboger server: accepts events from robots and hands them to plugins,
//! and manages addresses, endpoints and subscriptions over a REST API.
//!
//! See `ARCHITECTURE.md` at the repository root for the map of modules.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod level;
pub mod plugins;
pub mod random;
pub mod server;
pub mod store;

use config::Config;

/// Everything a request handler needs, shared by all connections.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// The database.
    pub store: store::Store,
    /// The configured plugins.
    pub plugins: plugins::Plugins,
    /// Master key and network checks of the management API.
    pub auth: api::auth::MasterAuth,
}

impl App {
    /// Assembles the application state from a loaded config and a store.
    pub fn new(config: Config, store: store::Store) -> App {
        let auth = api::auth::MasterAuth::new(
            &config.master_key,
            config.master_allow.clone(),
            config.ip_header.as_deref(),
        );
        let plugins = plugins::Plugins::new(config.plugins.clone());
        App {
            config,
            store,
            plugins,
            auth,
        }
    }
}
