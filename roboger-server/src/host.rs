//! What plugins may ask of the server: the `HostApi` callbacks (log,
//! levels, timeouts, bucket, other plugins, database), served on each
//! plugin's own pipe and answered in the name of that plugin.
//!
//! Invariant: a plugin acts only as itself: bucket objects it creates have
//! creator `plugin.NAME`, and database access needs `db: true` in its own
//! server config. A refused or failed callback is a JSON-RPC error to the
//! plugin, never a crash of the server.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use base64::Engine;
use jsonrpsee::core::RpcResult;
use jsonrpsee::types::ErrorObjectOwned;
use roboger_plugin_sdk::protocol::{BucketObject, DbInserted, HostApiServer, codes};
use serde_json::Value;

use crate::config::DbBackend;
use crate::level::Level;
use crate::log_budget;
use crate::plugin_log::PluginLog;
use crate::store::{NewObject, Store, StoreError};

/// How a plugin's `call_plugin` reaches the other plugins. The supervisor
/// implements it (and maps its own call errors to the wire's), so this
/// module does not depend on the supervisor that serves it.
#[async_trait::async_trait]
pub trait PluginCalls: Send + Sync + std::fmt::Debug {
    /// Calls `method` of plugin `name` with named `params`.
    async fn call_plugin(
        &self,
        name: &str,
        method: &str,
        params: serde_json::Map<String, Value>,
    ) -> RpcResult<Value>;
}

/// What the callbacks need from the server, shared by all plugins.
#[derive(Debug)]
pub struct HostContext {
    store: Store,
    timeout: Duration,
    use_limits: bool,
    bucket_default_expires: Duration,
    public_url: Option<String>,
    plugins: OnceLock<Weak<dyn PluginCalls>>,
}

impl HostContext {
    /// The context for a server with this store and settings.
    pub fn new(
        store: Store,
        timeout: Duration,
        use_limits: bool,
        bucket_default_expires: Duration,
        public_url: Option<String>,
    ) -> Arc<HostContext> {
        Arc::new(HostContext {
            store,
            timeout,
            use_limits,
            bucket_default_expires,
            public_url,
            plugins: OnceLock::new(),
        })
    }

    /// Lets `call_plugin` reach the other plugins.
    pub fn set_plugins(&self, p: Weak<dyn PluginCalls>) {
        let _ = self.plugins.set(p);
    }
}

/// The callbacks of one plugin.
pub struct HostHandler {
    plugin: String,
    db_granted: bool,
    /// Where its `log` calls go, within the plugin's budget.
    log: Arc<PluginLog>,
    ctx: Arc<HostContext>,
}

impl HostHandler {
    /// Callbacks answered in the name of `plugin`.
    pub fn new(
        plugin: String,
        db_granted: bool,
        log: Arc<PluginLog>,
        ctx: Arc<HostContext>,
    ) -> HostHandler {
        HostHandler {
            plugin,
            db_granted,
            log,
            ctx,
        }
    }
}

fn err(code: i32, msg: impl Into<String>) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(code, msg.into(), None::<()>)
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[async_trait::async_trait]
impl HostApiServer for HostHandler {
    async fn log(&self, level: Value, message: String) -> RpcResult<()> {
        let level = match Level::convert(&level) {
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warning => tracing::Level::WARN,
            Level::Error | Level::Critical => tracing::Level::ERROR,
        };
        self.log.write(level, &crate::plugin_log::cut(&message));
        Ok(())
    }

    async fn get_timeout(&self) -> RpcResult<f64> {
        Ok(self.ctx.timeout.as_secs_f64())
    }

    async fn get_url(&self) -> RpcResult<Option<String>> {
        Ok(self.ctx.public_url.clone())
    }

    async fn convert_level(&self, level: Value) -> RpcResult<u8> {
        Ok(Level::convert(&level).code())
    }

    async fn is_use_limits(&self) -> RpcResult<bool> {
        Ok(self.ctx.use_limits)
    }

    async fn is_use_lastrowid(&self) -> RpcResult<bool> {
        Ok(self.ctx.store.backend() == DbBackend::MySql)
    }

    async fn bucket_put(
        &self,
        content: String,
        addr_id: Option<i64>,
        mimetype: Option<String>,
        fname: Option<String>,
        public: Option<bool>,
        metadata: Option<Value>,
        expires: Option<i64>,
    ) -> RpcResult<String> {
        let content = base64::engine::general_purpose::STANDARD
            .decode(content)
            .map_err(|e| err(codes::REJECTED, format!("content is not base64: {e}")))?;
        let metadata = match metadata {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(m @ Value::Object(_)) => m,
            Some(_) => return Err(err(codes::REJECTED, "metadata must be an object")),
        };
        let expires = match expires.map(|s| u64::try_from(s).map(Duration::from_secs)) {
            None => self.ctx.bucket_default_expires,
            Some(Ok(d)) if !d.is_zero() && d <= crate::bucket::MAX_EXPIRES => d,
            Some(_) => {
                return Err(err(
                    codes::REJECTED,
                    format!(
                        "expires must be a positive number of seconds, at most {} (ten years)",
                        crate::bucket::MAX_EXPIRES.as_secs()
                    ),
                ));
            }
        };
        let mimetype = mimetype
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| crate::bucket::detect_mimetype(&content));
        if mimetype.len() > 256 || fname.as_ref().is_some_and(|f| f.len() > 256) {
            return Err(err(
                codes::REJECTED,
                "mimetype and fname are at most 256 characters",
            ));
        }
        let obj = NewObject {
            creator: format!("plugin.{}", self.plugin),
            addr_id,
            mimetype,
            fname,
            public: public.unwrap_or(false),
            metadata,
            expires,
            content,
        };
        self.within_timeout(self.ctx.store.bucket_put(obj)).await
    }

    async fn bucket_get(&self, object_id: String, public: Option<bool>) -> RpcResult<BucketObject> {
        let o = self
            .within_timeout(self.ctx.store.bucket_get(&object_id, public))
            .await?;
        Ok(BucketObject {
            id: o.id,
            creator: o.creator,
            addr_id: o.addr_id,
            mimetype: o.mimetype,
            fname: o.fname,
            size: o.size,
            public: o.public,
            metadata: o.metadata.unwrap_or(Value::Object(Default::default())),
            d: time(o.d),
            da: o.da.map(time),
            expires: o.expires,
            content: base64::engine::general_purpose::STANDARD.encode(&o.content),
        })
    }

    async fn bucket_touch(&self, object_id: String) -> RpcResult<()> {
        self.within_timeout(self.ctx.store.bucket_touch(&object_id))
            .await
    }

    async fn bucket_delete(&self, object_id: String) -> RpcResult<()> {
        self.within_timeout(self.ctx.store.bucket_delete(&object_id))
            .await
    }

    async fn call_plugin(
        &self,
        plugin_name: String,
        method: String,
        params: Option<Value>,
    ) -> RpcResult<Value> {
        let plugins = self
            .ctx
            .plugins
            .get()
            .and_then(|w| w.upgrade())
            .ok_or_else(|| err(codes::FAILED, "the server is shutting down"))?;
        let params = match params {
            None | Some(Value::Null) => Default::default(),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(err(
                    codes::REJECTED,
                    "params must be an object (named params)",
                ));
            }
        };
        plugins.call_plugin(&plugin_name, &method, params).await
    }

    async fn db_query(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<Vec<Value>> {
        self.check_db()?;
        self.within_timeout(
            self.ctx
                .store
                .plugin_query(&sql, &params.unwrap_or_default()),
        )
        .await
    }

    async fn db_execute(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<u64> {
        self.check_db()?;
        self.within_timeout(
            self.ctx
                .store
                .plugin_execute(&sql, &params.unwrap_or_default()),
        )
        .await
    }

    async fn db_insert(
        &self,
        sql: String,
        params: Option<serde_json::Map<String, Value>>,
    ) -> RpcResult<DbInserted> {
        self.check_db()?;
        let (rows_affected, last_insert_id) = self
            .within_timeout(
                self.ctx
                    .store
                    .plugin_insert(&sql, &params.unwrap_or_default()),
            )
            .await?;
        Ok(DbInserted {
            rows_affected,
            last_insert_id,
        })
    }
}

impl HostHandler {
    /// A plugin's database call, given the server's `timeout` as every
    /// other wait is.
    async fn within_timeout<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> RpcResult<T> {
        crate::store::within(self.ctx.timeout, work)
            .await
            .map_err(|e| self.store_err(e))
    }

    /// A store error as the plugin is answered it. A database error is
    /// logged within [`log_budget::PLUGIN_DATABASE`], which counts it: a
    /// plugin whose every send makes a failing query (a table gone, an
    /// outage) would otherwise write a line per event.
    fn store_err(&self, e: StoreError) -> ErrorObjectOwned {
        match e {
            StoreError::NotFound(what) => err(codes::NOT_FOUND, format!("{what} not found")),
            StoreError::Conflict(m) | StoreError::TooLarge(m) => err(codes::REJECTED, m),
            e @ (StoreError::Db(_)
            | StoreError::Connect(_)
            | StoreError::Unanswered(_)
            | StoreError::NewerSchema(_)) => {
                if log_budget::PLUGIN_DATABASE.logged() {
                    tracing::warn!(plugin = %self.plugin, error = %e, "database error in a plugin callback");
                }
                match e {
                    StoreError::Unanswered(bound) => err(
                        codes::FAILED,
                        format!(
                            "the query did not finish within the server's timeout ({} s)",
                            bound.as_secs_f64()
                        ),
                    ),
                    e => err(codes::FAILED, e.to_string()),
                }
            }
        }
    }

    fn check_db(&self) -> RpcResult<()> {
        if self.db_granted {
            Ok(())
        } else {
            Err(err(
                codes::FORBIDDEN,
                format!(
                    "database access is not granted to plugin {} (set db: true in its server config)",
                    self.plugin
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_host_serves_exactly_the_protocol_methods() {
        let url = crate::config::translate_db_url("sqlite://").unwrap();
        let store = Store::connect(&url, 1, Duration::from_secs(5))
            .await
            .unwrap();
        let ctx = HostContext::new(
            store,
            Duration::from_secs(1),
            false,
            Duration::from_secs(60),
            None,
        );
        let m = HostHandler::new("t".into(), false, Arc::new(PluginLog::new("t")), ctx).into_rpc();
        let mut names: Vec<&str> = m.method_names().collect();
        names.sort();
        let mut want = roboger_plugin_sdk::protocol::HOST_METHODS.to_vec();
        want.sort();
        assert_eq!(names, want);
    }
}
