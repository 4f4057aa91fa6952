//! The server's view of its plugins: which are configured, what they say
//! about themselves, and whether they accept an endpoint's config.
//!
//! This is the narrow interface the management API uses. Today it knows
//! the configured plugins from the config file; the plugin supervisor will
//! sit behind the same methods (handshake manifest for the metadata,
//! `validate_config` over JSON-RPC), so callers do not change.

use serde::Serialize;
use serde_json::Value;

use crate::config::PluginConfig;

/// Why a plugin did not accept a call.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No plugin of that name is configured.
    #[error("no such plugin: {0}")]
    NotConfigured(String),
    /// The plugin refused the endpoint configuration.
    #[error("{0}")]
    Rejected(String),
}

/// What `GET /manage/v2/plugin` shows for one plugin.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PluginInfo {
    pub plugin_name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
}

/// The configured plugins.
#[derive(Debug)]
pub struct Plugins {
    configured: Vec<PluginConfig>,
}

impl Plugins {
    /// The plugins of a configuration.
    pub fn new(configured: Vec<PluginConfig>) -> Self {
        Plugins { configured }
    }

    /// Every configured plugin, sorted by name.
    pub fn list(&self) -> Vec<PluginInfo> {
        let mut out: Vec<PluginInfo> = self
            .configured
            .iter()
            .map(|p| PluginInfo {
                plugin_name: p.name.clone(),
                version: None,
                description: None,
                url: None,
            })
            .collect();
        out.sort_by(|a, b| a.plugin_name.cmp(&b.plugin_name));
        out
    }

    /// Whether a plugin of that name is configured.
    pub fn is_configured(&self, name: &str) -> bool {
        self.configured.iter().any(|p| p.name == name)
    }

    /// Asks the plugin whether it accepts an endpoint configuration.
    pub async fn validate_config(&self, name: &str, config: &Value) -> Result<(), PluginError> {
        if !self.is_configured(name) {
            return Err(PluginError::NotConfigured(name.to_string()));
        }
        if !config.is_object() {
            return Err(PluginError::Rejected("config must be a JSON object".into()));
        }
        Ok(())
    }

    /// Runs every plugin's `cleanup`.
    pub async fn cleanup(&self) {}
}
